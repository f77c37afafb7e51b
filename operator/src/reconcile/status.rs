//! Status: conditions computed from what the API server reports (pure), and the status write.

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::api::{Api, Patch, PatchParams};

use super::apply::retry;
use super::validate::{Invalid, Plan};
use super::{Context, Error};
use crate::crd::{ChatCluster, ChatClusterStatus};
use crate::resources::{FIELD_MANAGER, Owner};

/// kstatus' summary condition (Flux, `kubectl wait --for=condition=Ready`): True once the
/// cluster runs the current spec with every node ready and nothing wrong.
pub const READY: &str = "Ready";
pub const AVAILABLE: &str = "Available";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";
pub const RECONCILE_SUCCESS: &str = "ReconcileSuccess";

/// Status after a successful apply, from the StatefulSet and Service the API server returned.
pub fn observed(
    cluster: &ChatCluster,
    plan: &Plan,
    statefulset: &StatefulSet,
    service: &Service,
    now: Time,
) -> ChatClusterStatus {
    let old = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    let desired = cluster.spec.replicas;
    let st = statefulset.status.clone().unwrap_or_default();
    let ready = st.ready_replicas.unwrap_or(0);
    let updated = st.updated_replicas.unwrap_or(0);
    let seen = st.observed_generation.is_some() && st.observed_generation >= statefulset.metadata.generation;
    let progress = if st.replicas > desired || plan.replicas > desired {
        // First: the scale-down is what the other reasons (a pod leaving, not yet seen) are part of.
        let message = format!(
            "{} nodes, {desired} wanted: removing one at a time, each once the StatefulSet has settled ({ready} ready)",
            st.replicas.max(plan.replicas)
        );
        Some(("ScalingDown", message))
    } else if !seen {
        Some(("Applying", "the StatefulSet controller has not seen the latest spec yet".to_owned()))
    } else if updated < desired {
        // Counts, not revisions: under `OnDelete` the StatefulSet's currentRevision never moves.
        Some(("RollingUpdate", format!("{updated}/{desired} nodes run the latest pod template")))
    } else if ready < desired {
        Some(("WaitingForReady", format!("{ready}/{desired} nodes ready")))
    } else {
        None
    };
    let mut conditions = old.conditions.clone();
    let mut set = |type_: &str, status: bool, reason: &str, message: String| {
        set_condition(&mut conditions, type_, status, reason, message, generation, &now);
    };
    match (desired, ready) {
        (0, _) => set(AVAILABLE, true, "ScaledToZero", "no nodes are wanted".to_owned()),
        (_, 0) => set(AVAILABLE, false, "NoReplicasReady", format!("0/{desired} nodes ready")),
        _ => set(AVAILABLE, true, "ReplicasReady", format!("{ready}/{desired} nodes ready")),
    }
    match &progress {
        Some((reason, message)) => set(PROGRESSING, true, reason, message.clone()),
        None => set(PROGRESSING, false, "RolloutComplete", format!("{desired} nodes ready and up to date")),
    }
    set(DEGRADED, false, "AsExpected", "spec and references are valid".to_owned());
    set(RECONCILE_SUCCESS, true, "Reconciled", "all children applied".to_owned());
    match &progress {
        None => set(READY, true, "Ready", format!("{desired} nodes ready and up to date")),
        Some((reason, message)) => set(READY, false, reason, message.clone()),
    }
    ChatClusterStatus {
        observed_generation: generation,
        image: Some(cluster.spec.image.clone()),
        replicas: st.replicas,
        ready_replicas: ready,
        updated_replicas: updated,
        config_hash: if progress.is_none() { Some(plan.config_hash.clone()) } else { old.config_hash },
        target_config_hash: Some(plan.config_hash.clone()),
        selector: Some(plan.owner.selector_string()),
        endpoint: Some(endpoint(&plan.owner, cluster, service)),
        api_endpoint: cluster.spec.api.as_ref().map(|_| {
            let owner = &plan.owner;
            format!(
                "http://{}.{}.svc:{}/api/v1",
                owner.api_service_name(),
                owner.namespace,
                crate::resources::ADMIN_PORT
            )
        }),
        phase: Some(if progress.is_none() { "Running" } else { "Progressing" }.to_owned()),
        conditions,
        // What the nodes say is added by `balance`; until then, what they said last.
        rebalancing: old.rebalancing,
    }
}

/// Status when the spec or a reference is invalid: nothing was changed, so replica counts stay.
pub fn degraded(cluster: &ChatCluster, problem: &Invalid, now: Time) -> ChatClusterStatus {
    let mut status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    set_condition(&mut status.conditions, DEGRADED, true, problem.reason, problem.message.clone(), generation, &now);
    let message = format!("nothing changed: {}", problem.message);
    set_condition(&mut status.conditions, READY, false, problem.reason, message.clone(), generation, &now);
    set_condition(&mut status.conditions, RECONCILE_SUCCESS, false, problem.reason, message, generation, &now);
    status.observed_generation = generation;
    status.phase = Some("Degraded".to_owned());
    status
}

/// Status after repeated API failures: surfaced only once retries and back-off did not help.
pub fn api_failing(cluster: &ChatCluster, message: String, now: Time) -> ChatClusterStatus {
    let mut status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    set_condition(&mut status.conditions, RECONCILE_SUCCESS, false, "ApiError", message.clone(), generation, &now);
    set_condition(&mut status.conditions, READY, false, "ApiError", message.clone(), generation, &now);
    set_condition(&mut status.conditions, DEGRADED, true, "ApiError", message, generation, &now);
    status.phase = Some("Degraded".to_owned());
    status
}

/// Status while paused: counts as before, and conditions saying that nothing is changed.
pub fn paused(cluster: &ChatCluster, now: Time) -> ChatClusterStatus {
    let mut status = cluster.status.clone().unwrap_or_default();
    let generation = cluster.metadata.generation;
    let message = format!("{} is \"true\": the operator changes nothing", crate::crd::PAUSED_ANNOTATION);
    set_condition(&mut status.conditions, PROGRESSING, false, "Paused", message.clone(), generation, &now);
    set_condition(&mut status.conditions, RECONCILE_SUCCESS, true, "Paused", message, generation, &now);
    status.phase = Some("Paused".to_owned());
    status
}

/// Client endpoint: the load balancer's address once it has one, else the in-cluster name.
fn endpoint(owner: &Owner, cluster: &ChatCluster, service: &Service) -> String {
    let port = cluster.spec.service.port;
    let external = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
        .and_then(|ingress| ingress.first())
        .and_then(|i| i.hostname.clone().or_else(|| i.ip.clone()));
    let scheme = if cluster.spec.tls.is_some() { "wss" } else { "ws" };
    match external {
        Some(host) => format!("{scheme}://{host}:{port}/ws"),
        None => format!("{scheme}://{}.{}.svc:{port}/ws", owner.name, owner.namespace),
    }
}

/// Upserts a condition, keeping its transition time when the status did not flip.
pub fn set_condition(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_owned();
    let previous = conditions.iter().position(|c| c.type_ == type_);
    let last_transition_time = match previous.map(|i| &conditions[i]) {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => now.clone(),
    };
    let condition = Condition {
        type_: type_.to_owned(),
        status,
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    };
    match previous {
        Some(i) => conditions[i] = condition,
        None => conditions.push(condition),
    }
}

pub fn condition<'a>(status: &'a ChatClusterStatus, type_: &str) -> Option<&'a Condition> {
    status.conditions.iter().find(|c| c.type_ == type_)
}

/// Writes status through the status subresource, skipping the write when nothing changed (so a
/// status write never triggers an endless chain of reconciles).
pub async fn write(
    ctx: &Context,
    cluster: &ChatCluster,
    owner: &Owner,
    status: ChatClusterStatus,
) -> Result<(), Error> {
    if cluster.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ChatCluster> = Api::namespaced(ctx.client.clone(), &owner.namespace);
    let patch = serde_json::json!({
        "apiVersion": "chatcluster.dev/v1alpha1",
        "kind": "ChatCluster",
        "status": status,
    });
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let patch = Patch::Apply(&patch);
    retry(ctx.retry, || api.patch_status(&owner.name, &params, &patch))
        .await
        .map(drop)
        .map_err(|source| Error::Status { name: owner.name.clone(), source })
}
