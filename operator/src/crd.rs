//! The `ChatCluster` custom resource (group `chatcluster.dev`, version `v1alpha1`) and its CRD.

use std::collections::BTreeMap;

use chat_node::config::{NodeConfig, RoomRule};
use k8s_openapi::api::core::v1::{
    Affinity, LocalObjectReference, PodSecurityContext, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::JSONSchemaProps;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Annotation that stops the operator from changing anything of this cluster while `"true"`.
pub const PAUSED_ANNOTATION: &str = "chatcluster.dev/paused";

/// A clustered WebSocket chat service: a StatefulSet of chat nodes plus their Services, config,
/// assets, peer key and disruption budget, all owned by this resource.
// The lint mistakes the repeated `type_ = ...` keys of separate `printcolumn(...)` for duplicates.
#[allow(clippy::duplicated_attributes)]
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "chatcluster.dev",
    version = "v1alpha1",
    kind = "ChatCluster",
    namespaced,
    shortname = "chat",
    status = "ChatClusterStatus",
    derive = "PartialEq",
    doc = "A clustered WebSocket chat service managed by chat-operator.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Available",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Available\")].status"
    ),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = k8s_formats)]
pub struct ChatClusterSpec {
    /// Number of chat nodes (pods).
    #[serde(default = "default_replicas")]
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// Container image of the chat node; unset: the node release matching the operator, which an
    /// operator upgrade moves (`status.image` shows the image in use).
    #[serde(default = "default_image")]
    #[schemars(length(min = 1))]
    pub image: String,
    /// When the kubelet pulls the image; unset: Kubernetes' default (`Always` for `:latest`, else
    /// `IfNotPresent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<PullPolicy>,
    /// Secrets (same namespace) with the registry credentials for the image.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub image_pull_secrets: Vec<LocalObjectReference>,
    /// CPU and memory requests/limits of the chat container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,
    /// The node's own configuration (see the node's config reference). The operator owns
    /// `listen`, `admin.listen`, `tls`, `assets_dir`, `auth.jwt_secret_file`, `drain`, `cluster.size` and
    /// `cluster.data_dir`; set those through `spec.auth`, `spec.drain`, `spec.replicas` and
    /// `spec.storage` instead.
    #[serde(default)]
    pub config: NodeConfig,
    #[serde(default)]
    pub auth: AuthSpec,
    #[serde(default)]
    pub assets: AssetsSpec,
    #[serde(default)]
    pub service: ServiceSpec,
    #[serde(default)]
    pub pod: PodSettings,
    #[serde(default)]
    pub pdb: PdbSpec,
    #[serde(default)]
    pub drain: DrainSpec,
    #[serde(default)]
    pub rebalance: RebalanceSpec,
    #[serde(default)]
    pub rollout: RolloutSpec,
    /// A volume per node for its room logs (sets `cluster.storage = "disk"`); unset: the logs
    /// live in memory. Cannot be added, changed or removed once the cluster exists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageSpec>,
    /// TLS on the client port (`wss://`): a `kubernetes.io/tls` Secret, e.g. cert-manager's.
    /// A renewed certificate reaches running pods without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,
    /// The server API for the application's backend (`/api/v1` on each node's admin port,
    /// behind the ClusterIP Service `<name>-api`; docs/api.md). Unset: the API is off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<ApiSpec>,
}

/// Where the server API's keys live.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiSpec {
    /// Secret (same namespace) and key holding the API keys, one per line (each at least 16
    /// characters; several during a rotation). Changes reach running pods without a restart.
    pub key_secret_ref: ApiKeySecretRef,
}

/// A Secret key with the server API's keys.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct ApiKeySecretRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default = "default_api_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_api_key() -> String {
    "api-keys".to_owned()
}

/// Where the client port's certificate lives.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret (same namespace) with `tls.crt` (PEM chain, leaf first) and `tls.key`.
    #[schemars(length(min = 1, max = 253))]
    pub secret_name: String,
}

impl Default for ChatClusterSpec {
    fn default() -> Self {
        Self {
            replicas: default_replicas(),
            image: default_image(),
            image_pull_policy: None,
            image_pull_secrets: Vec::new(),
            resources: None,
            config: NodeConfig::default(),
            auth: AuthSpec::default(),
            assets: AssetsSpec::default(),
            service: ServiceSpec::default(),
            pod: PodSettings::default(),
            pdb: PdbSpec::default(),
            drain: DrainSpec::default(),
            rebalance: RebalanceSpec::default(),
            rollout: RolloutSpec::default(),
            storage: None,
            tls: None,
            api: None,
        }
    }
}

fn default_replicas() -> i32 {
    3
}

/// Default image: the node release matching this operator.
pub fn default_image() -> String {
    format!("chatcluster/chat-node:{}", env!("CARGO_PKG_VERSION"))
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PullPolicy {
    Always,
    IfNotPresent,
    Never,
}

impl PullPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Always => "Always",
            Self::IfNotPresent => "IfNotPresent",
            Self::Never => "Never",
        }
    }
}

/// Client authentication: where the JWT key lives, and room rules.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// Secret (same namespace) holding the HS256 key; sets `auth.mode = "jwt"`. Without it the
    /// node config's `auth.mode` must be `anonymous`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_secret_ref: Option<SecretKeyRef>,
    /// Per-room rules (first match wins); they replace `config.auth.rooms`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rooms: Vec<RoomRule>,
}

/// A key in a Secret of the cluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct SecretKeyRef {
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key inside the Secret's data.
    #[serde(default = "default_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub key: String,
}

fn default_secret_key() -> String {
    "jwt-secret".to_owned()
}

/// Static files served by the nodes at `/`, overriding the built-in page per file name.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AssetsSpec {
    /// Inline files by name (e.g. `logo.svg`, `style.css`); they win over the ConfigMap's.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub files: BTreeMap<String, String>,
    /// A ConfigMap (same namespace) whose data keys are file names; changes are picked up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map_ref: Option<LocalRef>,
}

/// A named object in the cluster's namespace.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct LocalRef {
    /// Name of the object.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// The client Service (WebSocket and web page on `port`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    /// Kubernetes Service type; `NodePort` and `LoadBalancer` reach outside the cluster.
    #[serde(default = "default_service_type", rename = "type")]
    pub type_: ServiceType,
    /// Port of the client Service (it forwards to the nodes' client port, 8080).
    #[serde(default = "default_service_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: i32,
    /// Only for `NodePort` and `LoadBalancer`; picked by Kubernetes when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 65535))]
    pub node_port: Option<i32>,
    /// Extra annotations of the client Service (e.g. for a cloud load balancer).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

impl Default for ServiceSpec {
    fn default() -> Self {
        Self {
            type_: default_service_type(),
            port: default_service_port(),
            node_port: None,
            annotations: BTreeMap::new(),
        }
    }
}

fn default_service_type() -> ServiceType {
    ServiceType::ClusterIP
}

fn default_service_port() -> i32 {
    80
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum ServiceType {
    ClusterIP,
    NodePort,
    LoadBalancer,
}

impl ServiceType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ClusterIP => "ClusterIP",
            Self::NodePort => "NodePort",
            Self::LoadBalancer => "LoadBalancer",
        }
    }
}

/// Scheduling and metadata of the chat pods.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodSettings {
    /// Node labels a node must have to run the pods.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Taints of nodes the pods tolerate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tolerations: Vec<Toleration>,
    /// Node affinity and pod (anti-)affinity of the pods; unset: prefer nodes without another
    /// pod of this cluster (soft, so a small cluster still schedules).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    /// How the pods spread over topology domains; empty: spread over zones where possible
    /// (`ScheduleAnyway`, max skew 1).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub topology_spread_constraints: Vec<TopologySpreadConstraint>,
    /// Replaces the pods' security context (default: non-root uid/gid 65532, fsGroup 65532,
    /// RuntimeDefault seccomp). Set `{}` where the platform assigns ids itself (OpenShift's
    /// restricted SCC); the container stays non-root, read-only, without capabilities.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub security_context: Option<PodSecurityContext>,
    /// PriorityClass of the pods.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority_class_name: Option<String>,
    /// ServiceAccount the pods run as; unset: the namespace's `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_name: Option<String>,
    /// Extra pod annotations (the operator's own `chatcluster.dev/*` keys win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// Extra pod labels (the selector labels win).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
}

/// PodDisruptionBudget over the chat pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PdbSpec {
    /// Whether the operator creates the PodDisruptionBudget.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Chat pods that voluntary disruptions (node drains, evictions) may take down at once.
    #[serde(default = "default_one")]
    #[schemars(range(min = 1))]
    pub max_unavailable: i32,
}

impl Default for PdbSpec {
    fn default() -> Self {
        Self { enabled: true, max_unavailable: 1 }
    }
}

fn default_true() -> bool {
    true
}

fn default_one() -> i32 {
    1
}

/// Graceful shutdown of a node (written to the node config's `drain` section).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DrainSpec {
    /// Seconds `/readyz` fails before clients are disconnected, so endpoints drop the pod first.
    #[serde(default = "default_lb_grace")]
    #[schemars(range(min = 0, max = 600))]
    pub lb_grace_seconds: u64,
    /// Clients disconnected per second (close code 4000).
    #[serde(default = "default_drain_rate")]
    #[schemars(range(min = 1))]
    pub rate_per_second: u32,
    /// Seconds after SIGTERM by which the node exits.
    #[serde(default = "default_deadline")]
    #[schemars(range(min = 1, max = 3600))]
    pub deadline_seconds: u64,
    /// Pod termination grace; defaults to `deadlineSeconds + 5` and must exceed it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub termination_grace_period_seconds: Option<i64>,
}

impl Default for DrainSpec {
    fn default() -> Self {
        Self {
            lb_grace_seconds: default_lb_grace(),
            rate_per_second: default_drain_rate(),
            deadline_seconds: default_deadline(),
            termination_grace_period_seconds: None,
        }
    }
}

fn default_lb_grace() -> u64 {
    5
}

fn default_drain_rate() -> u32 {
    500
}

fn default_deadline() -> u64 {
    25
}

/// Moving connections from busy nodes to idle ones after a scale-out (written to the node
/// config's `rebalance` section; docs/cluster.md, "Rebalancing").
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceSpec {
    /// Whether busy nodes shed connections at all (on by default).
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// How far from the cluster's mean connection count, above or below, any node may be
    /// before the nodes above the mean shed their excess, in percent.
    #[serde(default = "default_rebalance_tolerance")]
    #[schemars(range(min = 1, max = 1000))]
    pub tolerance_percent: u32,
    /// Connections one node closes per second at most while it sheds (close code 4000, reason
    /// `rebalance`; clients reconnect at once and resume).
    #[serde(default = "default_rebalance_rate")]
    #[schemars(range(min = 1))]
    pub connections_per_second: u32,
    /// Connections younger than this are never moved, so clients do not bounce.
    #[serde(default = "default_rebalance_min_age")]
    #[schemars(range(min = 0, max = 86400))]
    pub min_connection_age_seconds: u64,
    /// Seconds a node waits after a round of shedding, and twice that after the membership changed.
    #[serde(default = "default_rebalance_cooldown")]
    #[schemars(range(min = 1, max = 3600))]
    pub cooldown_seconds: u64,
}

impl Default for RebalanceSpec {
    fn default() -> Self {
        Self {
            enabled: true,
            tolerance_percent: default_rebalance_tolerance(),
            connections_per_second: default_rebalance_rate(),
            min_connection_age_seconds: default_rebalance_min_age(),
            cooldown_seconds: default_rebalance_cooldown(),
        }
    }
}

impl RebalanceSpec {
    /// The node config section it stands for.
    pub fn node_config(&self) -> chat_node::config::RebalanceConfig {
        chat_node::config::RebalanceConfig {
            enabled: self.enabled,
            tolerance_percent: self.tolerance_percent,
            connections_per_sec: self.connections_per_second,
            min_connection_age_secs: self.min_connection_age_seconds,
            cooldown_secs: self.cooldown_seconds,
        }
    }
}

// The node's defaults, so a ChatCluster without `spec.rebalance` runs as a node on its own would.
fn default_rebalance_tolerance() -> u32 {
    chat_node::config::RebalanceConfig::default().tolerance_percent
}

fn default_rebalance_rate() -> u32 {
    chat_node::config::RebalanceConfig::default().connections_per_sec
}

fn default_rebalance_min_age() -> u64 {
    chat_node::config::RebalanceConfig::default().min_connection_age_secs
}

fn default_rebalance_cooldown() -> u64 {
    chat_node::config::RebalanceConfig::default().cooldown_secs
}

/// How changes that need a restart (config, auth key) reach running pods.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutSpec {
    /// `RollingUpdate` replaces pods one at a time at once; `OnDelete` waits until each pod is
    /// deleted by someone else.
    #[serde(default = "default_strategy")]
    pub strategy: RolloutStrategy,
    /// Seconds a new pod must be ready before the rollout moves on.
    #[serde(default)]
    #[schemars(range(min = 0, max = 3600))]
    pub min_ready_seconds: i32,
}

impl Default for RolloutSpec {
    fn default() -> Self {
        Self { strategy: default_strategy(), min_ready_seconds: 0 }
    }
}

fn default_strategy() -> RolloutStrategy {
    RolloutStrategy::RollingUpdate
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RolloutStrategy {
    RollingUpdate,
    OnDelete,
}

/// A persistent volume per node for its room logs (`cluster.storage = "disk"`), so a restarted
/// node, or the whole cluster, comes back with every room's history. Fixed once the cluster
/// exists: a StatefulSet's volume claim templates cannot change.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Size of each node's volume, a Kubernetes quantity such as `1Gi` or `500Mi`.
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|Ei|k|M|G|T|P|E)?$"))]
    pub size: String,
    /// StorageClass of the volumes; unset: the cluster's default class.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub storage_class_name: Option<String>,
}

/// Observed state, written by the operator only.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChatClusterStatus {
    /// `metadata.generation` of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The chat node image the pods are given: `spec.image`, or the operator's default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Chat pods that exist.
    #[serde(default)]
    pub replicas: i32,
    /// Chat pods that are ready.
    #[serde(default)]
    pub ready_replicas: i32,
    /// Chat pods running the current pod template.
    #[serde(default)]
    pub updated_replicas: i32,
    /// Config hash every pod runs (set once a rollout completes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_hash: Option<String>,
    /// Config hash on the pod template (what is being rolled out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_config_hash: Option<String>,
    /// Label selector of the pods, for the scale subresource (HPA).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// WebSocket URL of the client Service inside the cluster.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Base URL of the server API inside the cluster (with `spec.api`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
    /// Nodes are moving connections to even the cluster out (`spec.rebalance`), as a node's
    /// `/cluster` said at the last reconcile; unset while no node could be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebalancing: Option<bool>,
    /// One word summary: Running, Progressing, Degraded or Paused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// `Ready`, `Available`, `Progressing`, `Degraded` and `ReconcileSuccess` (see
    /// docs/operator.md); one per type, so server-side apply merges them by type.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

impl ChatCluster {
    /// Whether the pause annotation is set to `"true"`.
    pub fn is_paused(&self) -> bool {
        self.metadata.annotations.as_ref().and_then(|a| a.get(PAUSED_ANNOTATION)).is_some_and(|v| v == "true")
    }
}

/// Formats the API server knows; schemars' Rust-specific ones (`uint`, `uint64`, ...) are dropped
/// so the CRD carries no unrecognised formats (the `minimum` next to them still holds).
const K8S_FORMATS: &[&str] = &[
    "int32",
    "int64",
    "float",
    "double",
    "byte",
    "binary",
    "date",
    "date-time",
    "duration",
    "password",
    "uri",
    "email",
    "hostname",
    "ipv4",
    "ipv6",
    "cidr",
    "mac",
    "uuid",
];

fn k8s_formats(schema: &mut schemars::Schema) {
    fn walk(v: &mut serde_json::Value) {
        let Some(o) = v.as_object_mut() else { return };
        if o.get("format").and_then(|f| f.as_str()).is_some_and(|f| !K8S_FORMATS.contains(&f)) {
            o.remove("format");
        }
        // Only schema positions: `default`/`enum` values may hold a field literally named "format".
        if let Some(props) = o.get_mut("properties").and_then(|p| p.as_object_mut()) {
            props.values_mut().for_each(walk);
        }
        for key in ["items", "additionalProperties"] {
            if let Some(sub) = o.get_mut(key) {
                walk(sub);
            }
        }
    }
    if let Some(o) = schema.as_object_mut() {
        let mut value = serde_json::Value::Object(std::mem::take(o));
        walk(&mut value);
        if let serde_json::Value::Object(map) = value {
            *o = map;
        }
    }
}

/// Longest ChatCluster name: the StatefulSet's pods carry a `controller-revision-hash` label of
/// the name plus 11 characters, and labels stop at 63.
pub const MAX_NAME_LEN: usize = 52;
/// What the name must look like: it names Services, which need a DNS-1035 label.
pub const NAME_PATTERN: &str = "^[a-z]([-a-z0-9]*[a-z0-9])?$";

/// The ChatCluster CRD: the derived one plus the admission rule on the name (CEL, checked by
/// API servers that have CEL; the operator's validation checks the same for the others).
pub fn definition() -> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::ValidationRule;
    use kube::CustomResourceExt;
    let mut crd = ChatCluster::crd();
    let rule = ValidationRule {
        rule: format!("self.metadata.name.size() <= {MAX_NAME_LEN} && self.metadata.name.matches('{NAME_PATTERN}')"),
        message: Some(format!(
            "the name must be at most {MAX_NAME_LEN} characters of lower-case letters, digits and '-', start with a letter and end with a letter or digit"
        )),
        reason: Some("FieldValueInvalid".to_owned()),
        ..ValidationRule::default()
    };
    for version in &mut crd.spec.versions {
        if let Some(schema) = version.schema.as_mut().and_then(|s| s.open_api_v3_schema.as_mut()) {
            schema.x_kubernetes_validations.get_or_insert_with(Vec::new).push(rule.clone());
            drop_null_from_enums(schema);
            drop_version_bound_defaults(schema);
        }
    }
    crd
}

/// Defaults the API server would write into every stored ChatCluster, freezing them at the
/// operator version that created it: the image, and the node config (whose defaults belong to
/// the node release). Without them the operator fills in its own defaults on every reconcile,
/// so upgrading the operator moves existing clusters to its node image and config defaults.
fn drop_version_bound_defaults(root: &mut JSONSchemaProps) {
    let Some(spec) = root.properties.as_mut().and_then(|p| p.get_mut("spec")) else { return };
    let Some(fields) = spec.properties.as_mut() else { return };
    if let Some(image) = fields.get_mut("image") {
        image.default = None;
    }
    if let Some(config) = fields.get_mut("config") {
        visit_schemas(config, &mut |schema| schema.default = None);
    }
}

/// schemars lists `null` among an optional enum's values; kubectl's client-side validation
/// refuses that (`unknown object type "nil"`) where the API server has no field validation of
/// its own. `nullable: true` already allows the null.
fn drop_null_from_enums(root: &mut JSONSchemaProps) {
    visit_schemas(root, &mut |schema| {
        if let Some(values) = schema.enum_.as_mut() {
            values.retain(|v| v.0 != serde_json::Value::Null);
        }
    });
}

/// Calls `change` on `schema` and every schema nested in it.
fn visit_schemas(schema: &mut JSONSchemaProps, change: &mut impl FnMut(&mut JSONSchemaProps)) {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::{
        JSONSchemaPropsOrArray, JSONSchemaPropsOrBool,
    };
    change(schema);
    for sub in schema.properties.iter_mut().flat_map(|p| p.values_mut()) {
        visit_schemas(sub, change);
    }
    if let Some(JSONSchemaPropsOrArray::Schema(items)) = schema.items.as_mut() {
        visit_schemas(items, change);
    }
    if let Some(JSONSchemaPropsOrBool::Schema(extra)) = schema.additional_properties.as_mut() {
        visit_schemas(extra, change);
    }
    for list in [&mut schema.all_of, &mut schema.any_of, &mut schema.one_of].into_iter().flatten() {
        list.iter_mut().for_each(|sub| visit_schemas(sub, change));
    }
}

/// The CRD as YAML, exactly as `chat-operator crd` prints it and `crds/chatcluster.yaml` holds.
pub fn crd_yaml() -> Result<String, serde_norway::Error> {
    let yaml = serde_norway::to_string(&definition())?;
    Ok(format!("# Generated by `chat-operator crd`; do not edit.\n{yaml}"))
}
