//! The StatefulSet of chat nodes: stable pod names, rolling updates keyed on the config hash,
//! probes, downward-API env, secure defaults, a grace period that covers the node's drain, and
//! a volume per node when `spec.storage` asks for one.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec, StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::{
    Affinity, Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EmptyDirVolumeSource, EnvVar,
    EnvVarSource, HTTPGetAction, KeyToPath, ObjectFieldSelector, PersistentVolumeClaim, PersistentVolumeClaimSpec,
    PodAffinityTerm, PodAntiAffinity, PodSecurityContext, PodSpec, PodTemplateSpec, Probe, SeccompProfile,
    SecretVolumeSource, SecurityContext, TopologySpreadConstraint, Volume, VolumeMount, VolumeResourceRequirements,
    WeightedPodAffinityTerm,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{
    ADMIN_PORT, API_DIR, ASSETS_DIR, AUTH_DIR, CONFIG_DIR, CONFIG_HASH_ANNOTATION, CONFIG_PATH, DATA_DIR, DATA_VOLUME,
    HTTP_PORT, Owner, PEER_DIR, PEER_PORT, TLS_DIR, non_empty, non_empty_vec,
};
use crate::crd::{ChatCluster, RolloutStrategy, StorageSpec};
use crate::reconcile::validate::Plan;

/// UID/GID of the node process; any non-root id works, this is the distroless "nonroot" user.
const RUN_AS: i64 = 65532;

pub fn statefulset(cluster: &ChatCluster, plan: &Plan) -> StatefulSet {
    let owner = &plan.owner;
    let spec = &cluster.spec;
    let strategy = match spec.rollout.strategy {
        RolloutStrategy::RollingUpdate => "RollingUpdate",
        RolloutStrategy::OnDelete => "OnDelete",
    };
    StatefulSet {
        metadata: owner.object_meta(owner.name.clone()),
        spec: StatefulSetSpec {
            // One step at a time when scaling down (see reconcile::scale).
            replicas: Some(plan.replicas),
            selector: LabelSelector { match_labels: Some(owner.selector_labels()), ..LabelSelector::default() },
            service_name: Some(owner.peer_service_name()),
            // A node is ready only once a majority of the intended voters is linked: started one
            // at a time (OrderedReady), the first would wait for peers that are never started.
            pod_management_policy: Some("Parallel".to_owned()),
            update_strategy: Some(StatefulSetUpdateStrategy { type_: Some(strategy.to_owned()), rolling_update: None }),
            min_ready_seconds: (spec.rollout.min_ready_seconds > 0).then_some(spec.rollout.min_ready_seconds),
            template: pod_template(cluster, plan),
            volume_claim_templates: spec.storage.as_ref().map(|s| vec![data_claim(owner, s)]),
            // A scaled-away node must not come back later with its stale state; deleting the
            // ChatCluster keeps the data.
            persistent_volume_claim_retention_policy: spec.storage.as_ref().map(|_| {
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_scaled: Some("Delete".to_owned()),
                    when_deleted: Some("Retain".to_owned()),
                }
            }),
            ..StatefulSetSpec::default()
        },
        ..StatefulSet::default()
    }
}

fn pod_template(cluster: &ChatCluster, plan: &Plan) -> PodTemplateSpec {
    let pod = &cluster.spec.pod;
    let mut labels = pod.labels.clone();
    labels.extend(plan.owner.selector_labels());
    let mut annotations = pod.annotations.clone();
    annotations.insert(CONFIG_HASH_ANNOTATION.to_owned(), plan.config_hash.clone());
    PodTemplateSpec {
        metadata: Some(ObjectMeta { labels: Some(labels), annotations: Some(annotations), ..ObjectMeta::default() }),
        spec: Some(PodSpec {
            containers: vec![container(cluster, plan)],
            volumes: Some(volumes(cluster, plan)),
            termination_grace_period_seconds: Some(plan.termination_grace_seconds),
            // The node never talks to the API server.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            service_account_name: pod.service_account_name.clone(),
            priority_class_name: pod.priority_class_name.clone(),
            node_selector: non_empty(pod.node_selector.clone()),
            tolerations: non_empty_vec(&pod.tolerations),
            affinity: Some(pod.affinity.clone().unwrap_or_else(|| spread_over_nodes(plan))),
            topology_spread_constraints: Some(if pod.topology_spread_constraints.is_empty() {
                vec![spread_over_zones(plan)]
            } else {
                pod.topology_spread_constraints.clone()
            }),
            image_pull_secrets: non_empty_vec(&cluster.spec.image_pull_secrets),
            security_context: Some(pod.security_context.clone().unwrap_or_else(|| PodSecurityContext {
                run_as_non_root: Some(true),
                run_as_user: Some(RUN_AS),
                run_as_group: Some(RUN_AS),
                fs_group: Some(RUN_AS),
                // Only a new volume needs its owner set; a recursive chown of a full one at every
                // start would slow restarts down.
                fs_group_change_policy: cluster.spec.storage.as_ref().map(|_| "OnRootMismatch".to_owned()),
                seccomp_profile: Some(SeccompProfile {
                    type_: "RuntimeDefault".to_owned(),
                    ..SeccompProfile::default()
                }),
                ..PodSecurityContext::default()
            })),
            ..PodSpec::default()
        }),
    }
}

/// Losing a machine should cost a cluster one node, not a quorum: prefer machines without
/// another of its pods. Soft, so that three pods still schedule on fewer machines.
fn spread_over_nodes(plan: &Plan) -> Affinity {
    let term = PodAffinityTerm {
        label_selector: Some(LabelSelector {
            match_labels: Some(plan.owner.selector_labels()),
            ..LabelSelector::default()
        }),
        topology_key: "kubernetes.io/hostname".to_owned(),
        ..PodAffinityTerm::default()
    };
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![WeightedPodAffinityTerm {
                weight: 100,
                pod_affinity_term: term,
            }]),
            ..PodAntiAffinity::default()
        }),
        ..Affinity::default()
    }
}

/// Likewise over zones, where the cluster has them (a zone outage then costs a minority).
fn spread_over_zones(plan: &Plan) -> TopologySpreadConstraint {
    TopologySpreadConstraint {
        max_skew: 1,
        topology_key: "topology.kubernetes.io/zone".to_owned(),
        when_unsatisfiable: "ScheduleAnyway".to_owned(),
        label_selector: Some(LabelSelector {
            match_labels: Some(plan.owner.selector_labels()),
            ..LabelSelector::default()
        }),
        ..TopologySpreadConstraint::default()
    }
}

fn container(cluster: &ChatCluster, plan: &Plan) -> Container {
    // No subPath anywhere: kubelet's atomic `..data` swap must reach running pods (the node
    // re-reads `cluster.size` from its config and serves assets from disk).
    let mut mounts = vec![
        mount("config", CONFIG_DIR, true),
        mount("assets", ASSETS_DIR, true),
        mount("peer", PEER_DIR, true),
        mount("tmp", "/tmp", false),
    ];
    if cluster.spec.tls.is_some() {
        mounts.push(mount("tls", TLS_DIR, true));
    }
    if cluster.spec.auth.jwt_secret_ref.is_some() {
        mounts.push(mount("auth", AUTH_DIR, true));
    }
    if cluster.spec.api.is_some() {
        mounts.push(mount("api", API_DIR, true));
    }
    if cluster.spec.storage.is_some() {
        mounts.push(mount(DATA_VOLUME, DATA_DIR, false));
    }
    Container {
        name: "chat-node".to_owned(),
        image: Some(cluster.spec.image.clone()),
        image_pull_policy: cluster.spec.image_pull_policy.map(|p| p.as_str().to_owned()),
        args: Some(vec!["--config".to_owned(), CONFIG_PATH.to_owned()]),
        ports: Some(vec![port("http", HTTP_PORT), port("peer", PEER_PORT), port("admin", ADMIN_PORT)]),
        env: Some(vec![
            field_env("POD_NAME", "metadata.name"),
            field_env("POD_NAMESPACE", "metadata.namespace"),
            field_env("POD_IP", "status.podIP"),
            // Nodes on different revisions are mid-rollout: they hold off rebalancing.
            field_env("CHAT_CLUSTER__REVISION", REVISION_FIELD),
            EnvVar { name: "CHAT_PEER_DNS".to_owned(), value: Some(plan.owner.peer_dns()), ..EnvVar::default() },
        ]),
        // Starting can take a while with disk storage (the room logs are read back); the
        // liveness probe only starts once the node answered.
        startup_probe: Some(probe("/healthz", 2, 60)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        // Two misses in a row, every 2 s: one slow answer does not take a node out of the
        // Service, and a draining node leaves it within 4 s, inside the default
        // `drain.lbGraceSeconds` (5).
        readiness_probe: Some(probe("/readyz", 2, 2)),
        resources: cluster.spec.resources.clone(),
        security_context: Some(SecurityContext {
            allow_privilege_escalation: Some(false),
            read_only_root_filesystem: Some(true),
            run_as_non_root: Some(true),
            privileged: Some(false),
            capabilities: Some(Capabilities { drop: Some(vec!["ALL".to_owned()]), add: None }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(mounts),
        ..Container::default()
    }
}

fn volumes(cluster: &ChatCluster, plan: &Plan) -> Vec<Volume> {
    let owner = &plan.owner;
    let mut volumes = vec![
        Volume {
            name: "config".to_owned(),
            config_map: Some(ConfigMapVolumeSource { name: owner.config_name(), ..ConfigMapVolumeSource::default() }),
            ..Volume::default()
        },
        Volume {
            name: "assets".to_owned(),
            config_map: Some(ConfigMapVolumeSource { name: owner.assets_name(), ..ConfigMapVolumeSource::default() }),
            ..Volume::default()
        },
        secret_volume("peer", owner.peer_secret_name(), None),
        Volume { name: "tmp".to_owned(), empty_dir: Some(EmptyDirVolumeSource::default()), ..Volume::default() },
    ];
    if let Some(auth) = &cluster.spec.auth.jwt_secret_ref {
        volumes.push(secret_volume("auth", auth.name.clone(), Some(&auth.key)));
    }
    if let Some(tls) = &cluster.spec.tls {
        volumes.push(secret_volume("tls", tls.secret_name.clone(), None));
    }
    if let Some(api) = &cluster.spec.api {
        // The key alone, in place (no subPath): a rotated Secret reaches the running node,
        // which reads the file again.
        volumes.push(secret_volume("api", api.key_secret_ref.name.clone(), Some(&api.key_secret_ref.key)));
    }
    volumes
}

/// Owner-read-only files: keys never need to be readable by anyone else in the pod.
fn secret_volume(name: &str, secret: String, only_key: Option<&str>) -> Volume {
    let items =
        only_key.map(|key| vec![KeyToPath { key: key.to_owned(), path: key.to_owned(), ..KeyToPath::default() }]);
    Volume {
        name: name.to_owned(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret),
            items,
            default_mode: Some(0o400),
            optional: Some(false),
            ..SecretVolumeSource::default()
        }),
        ..Volume::default()
    }
}

fn mount(volume: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: volume.to_owned(),
        mount_path: path.to_owned(),
        read_only: Some(read_only),
        ..VolumeMount::default()
    }
}

/// The claim template of each node's data volume (`data-<pod>`), written only by its own pod.
fn data_claim(owner: &Owner, storage: &StorageSpec) -> PersistentVolumeClaim {
    PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some(DATA_VOLUME.to_owned()),
            labels: Some(owner.selector_labels()),
            ..ObjectMeta::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".to_owned()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([("storage".to_owned(), Quantity(storage.size.clone()))])),
                ..VolumeResourceRequirements::default()
            }),
            ..PersistentVolumeClaimSpec::default()
        }),
        ..PersistentVolumeClaim::default()
    }
}

fn port(name: &str, number: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: number,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

/// The pod's StatefulSet revision, set by the StatefulSet controller on every pod it creates.
pub const REVISION_FIELD: &str = "metadata.labels['controller-revision-hash']";

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector { field_path: path.to_owned(), api_version: None }),
            ..EnvVarSource::default()
        }),
        ..EnvVar::default()
    }
}

fn probe(path: &str, period: i32, failures: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::String("admin".to_owned()),
            ..HTTPGetAction::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        timeout_seconds: Some(2),
        ..Probe::default()
    }
}
