//! Pure validation: checks the spec and the dereferenced objects, renders the node config and
//! computes the config hash. Whatever it rejects becomes a `Degraded` condition, never a change.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use chat_node::config::{AuthMode, DrainConfig, NodeConfig};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sha2::{Digest, Sha256};

use super::{scale, storage};
use crate::crd::{ChatCluster, MAX_NAME_LEN, ServiceType};
use crate::resources::{
    ADMIN_PORT, API_DIR, ASSETS_DIR, AUTH_DIR, HTTP_PORT, Owner, PEER_DIR, PEER_KEY, PEER_PORT, TLS_DIR,
};

/// Shortest JWT key accepted (the node's own minimum for inline keys).
const MIN_JWT_KEY_BYTES: usize = 16;
/// Shortest peer key kept; anything shorter in an existing Secret is replaced. Generated keys
/// are 64 hex characters (32 random bytes): text, because the node trims trailing whitespace.
pub const PEER_KEY_BYTES: usize = 32;
/// Assets must fit one ConfigMap (1 MiB) with room for metadata.
const MAX_ASSET_BYTES: usize = 900 * 1024;

/// Objects the spec references, as read from the API (`None`: absent or not referenced).
#[derive(Clone, Debug, Default)]
pub struct Refs {
    pub auth_secret: Option<Secret>,
    /// The `spec.tls` Secret.
    pub tls_secret: Option<Secret>,
    /// The `spec.api.keySecretRef` Secret.
    pub api_secret: Option<Secret>,
    pub assets_config_map: Option<ConfigMap>,
    pub peer_secret: Option<Secret>,
    /// Random key used only when no usable peer key exists yet.
    pub fresh_peer_key: Vec<u8>,
    /// The cluster's StatefulSet as it is now: its volume claim templates cannot change, and its
    /// status paces a scale-down.
    pub statefulset: Option<StatefulSet>,
    /// The other children as they are now (`None`: absent): a same-named object that is not
    /// this cluster's is never taken over, and a child already as wanted is not written again.
    pub existing: ExistingChildren,
}

#[derive(Clone, Debug, Default)]
pub struct ExistingChildren {
    pub config: Option<ConfigMap>,
    pub assets: Option<ConfigMap>,
    pub peer_service: Option<Service>,
    pub client_service: Option<Service>,
    pub pdb: Option<PodDisruptionBudget>,
    pub api_service: Option<Service>,
}

/// A spec problem only the operator can see; `reason` is the condition/event reason.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Invalid {
    pub reason: &'static str,
    pub message: String,
}

pub(super) fn invalid(reason: &'static str, message: impl Into<String>) -> Invalid {
    Invalid { reason, message: message.into() }
}

/// Everything the builders need beyond the spec.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    pub owner: Owner,
    pub config: NodeConfig,
    pub config_toml: String,
    /// File name → content: text from `data` and `spec.assets.files`, bytes from `binaryData`.
    pub assets: BTreeMap<String, Vec<u8>>,
    pub peer_key: Vec<u8>,
    pub config_hash: String,
    pub termination_grace_seconds: i64,
    /// The StatefulSet's replicas now: `spec.replicas`, or one step towards it when scaling down.
    pub replicas: i32,
}

pub fn validate(cluster: &ChatCluster, owner: Owner, refs: &Refs) -> Result<Plan, Invalid> {
    check_name(&owner.name)?;
    check_ownership(cluster, &owner, refs)?;
    let auth_key = auth_key(cluster, &owner, refs)?;
    check_tls_secret(cluster, &owner, refs)?;
    check_api_secret(cluster, &owner, refs)?;
    let config = render_config(cluster, &owner.peer_dns())?;
    storage::check_unchanged(cluster.spec.storage.as_ref(), refs.statefulset.as_ref(), &owner.name)?;
    let termination_grace_seconds = termination_grace(cluster)?;
    if cluster.spec.service.type_ == ServiceType::ClusterIP && cluster.spec.service.node_port.is_some() {
        return Err(invalid("InvalidService", "spec.service.nodePort needs type NodePort or LoadBalancer"));
    }
    let assets = assets(cluster, &owner, refs)?;
    let peer_key = peer_key(refs);
    let config_toml = toml::to_string(&config).map_err(|e| invalid("InvalidConfig", e.to_string()))?;
    let config_hash = config_hash(&restart_relevant(&config)?, auth_key.as_deref(), &peer_key);
    let replicas = scale::step(cluster.spec.replicas, refs.statefulset.as_ref());
    Ok(Plan { owner, config, config_toml, assets, peer_key, config_hash, termination_grace_seconds, replicas })
}

/// Every child the spec wants must be absent or this cluster's: applying with `force` would
/// otherwise take another application's object over, and garbage collection later delete it.
fn check_ownership(cluster: &ChatCluster, owner: &Owner, refs: &Refs) -> Result<(), Invalid> {
    let existing = &refs.existing;
    let pdb_wanted = cluster.spec.pdb.enabled;
    let children: [(&str, Option<&ObjectMeta>); 8] = [
        ("Service", existing.api_service.as_ref().filter(|_| cluster.spec.api.is_some()).map(|o| &o.metadata)),
        ("ConfigMap", existing.config.as_ref().map(|o| &o.metadata)),
        ("ConfigMap", existing.assets.as_ref().map(|o| &o.metadata)),
        ("Secret", refs.peer_secret.as_ref().map(|o| &o.metadata)),
        ("Service", existing.peer_service.as_ref().map(|o| &o.metadata)),
        ("Service", existing.client_service.as_ref().map(|o| &o.metadata)),
        ("PodDisruptionBudget", existing.pdb.as_ref().filter(|_| pdb_wanted).map(|o| &o.metadata)),
        ("StatefulSet", refs.statefulset.as_ref().map(|o| &o.metadata)),
    ];
    for (kind, meta) in children {
        let Some(meta) = meta else { continue };
        let ours =
            meta.owner_references.iter().flatten().any(|r| r.uid == owner.reference.uid && r.controller == Some(true));
        if !ours {
            let name = meta.name.clone().unwrap_or_default();
            return Err(invalid(
                "NameConflict",
                format!(
                    "{kind} {}/{name} exists and is not controlled by this ChatCluster; rename the ChatCluster or remove that {kind} (it is left alone)",
                    owner.namespace
                ),
            ));
        }
    }
    Ok(())
}

/// The CRD's CEL rule on the name, for API servers without CEL and for local mode.
fn check_name(name: &str) -> Result<(), Invalid> {
    let starts_with_letter = name.starts_with(|c: char| c.is_ascii_lowercase());
    let ends_alphanumeric = name.ends_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit());
    let allowed = name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if name.len() > MAX_NAME_LEN || !(starts_with_letter && ends_alphanumeric && allowed) {
        return Err(invalid(
            "InvalidName",
            format!(
                "metadata.name {name:?}: at most {MAX_NAME_LEN} characters of lower-case letters, digits and '-', starting with a letter and ending with a letter or digit (it names the StatefulSet's pods and the Services)"
            ),
        ));
    }
    Ok(())
}

/// `spec.config` with the operator-owned fields forced, checked by the node's own rules;
/// `peer_dns` is the headless peer Service's name, which the nodes resolve to find each other.
pub fn render_config(cluster: &ChatCluster, peer_dns: &str) -> Result<NodeConfig, Invalid> {
    let spec = &cluster.spec;
    let mut cfg = spec.config.clone();
    if cfg.node_id.is_some() {
        return Err(invalid(
            "OperatorOwnedField",
            "spec.config.node_id must be unset: each node is named after its pod",
        ));
    }
    if cfg.auth.jwt_secret.is_some() {
        return Err(invalid(
            "InlineSecret",
            "spec.config.auth.jwt_secret must not be set: put the key in a Secret and reference it in spec.auth.jwtSecretRef",
        ));
    }
    if cfg.auth.jwt_secret_file.is_some() {
        return Err(invalid(
            "OperatorOwnedField",
            "spec.config.auth.jwt_secret_file is set by the operator: use spec.auth.jwtSecretRef",
        ));
    }
    if cfg.cluster.secret.is_some() {
        return Err(invalid(
            "InlineSecret",
            "spec.config.cluster.secret must not be set: the operator generates the peer key",
        ));
    }
    let cluster_owned = [
        ("ordinal", cfg.cluster.ordinal.is_some()),
        ("secret_file", cfg.cluster.secret_file.is_some()),
        ("dns_name", cfg.cluster.dns_name.is_some()),
        ("static_peers", !cfg.cluster.static_peers.is_empty()),
        ("advertise_ip", cfg.cluster.advertise_ip.is_some()),
    ];
    if let Some((field, _)) = cluster_owned.iter().find(|(_, set)| *set) {
        return Err(invalid(
            "OperatorOwnedField",
            format!(
                "spec.config.cluster.{field} is set by the operator (each pod's ordinal comes from its name, \
                 peers are found through the headless Service)"
            ),
        ));
    }
    cfg.listen = SocketAddr::from(([0, 0, 0, 0], HTTP_PORT as u16));
    cfg.admin.listen = SocketAddr::from(([0, 0, 0, 0], ADMIN_PORT as u16));
    if cfg.tls != Default::default() {
        return Err(invalid("OperatorOwnedField", "spec.config.tls is set by the operator: use spec.tls.secretName"));
    }
    if !cfg.admin.api_keys.is_empty() {
        return Err(invalid(
            "InlineSecret",
            "spec.config.admin.api_keys must not be set: put the keys in a Secret and reference it in spec.api.keySecretRef",
        ));
    }
    if cfg.admin.api_keys_file.is_some() {
        return Err(invalid(
            "OperatorOwnedField",
            "spec.config.admin.api_keys_file is set by the operator: use spec.api.keySecretRef",
        ));
    }
    if let Some(api) = &spec.api {
        cfg.admin.api_keys_file = Some(PathBuf::from(API_DIR).join(&api.key_secret_ref.key));
    }
    if spec.tls.is_some() {
        cfg.tls.cert_file = Some(PathBuf::from(TLS_DIR).join(TLS_CERT_KEY));
        cfg.tls.key_file = Some(PathBuf::from(TLS_DIR).join(TLS_KEY_KEY));
    }
    cfg.cluster.peer_listen = SocketAddr::from(([0, 0, 0, 0], PEER_PORT as u16));
    cfg.cluster.dns_name = Some(peer_dns.to_owned());
    cfg.cluster.secret_file = Some(PathBuf::from(PEER_DIR).join(PEER_KEY));
    cfg.assets_dir = Some(PathBuf::from(ASSETS_DIR));
    // The node re-reads the size while it runs; it is never 0 (a cluster scaled to zero runs none).
    cfg.cluster.size = usize::try_from(spec.replicas).unwrap_or(0).max(1);
    storage::render(spec.storage.as_ref(), &mut cfg)?;
    match &spec.auth.jwt_secret_ref {
        Some(secret) => {
            cfg.auth.mode = AuthMode::Jwt;
            cfg.auth.jwt_secret_file = Some(PathBuf::from(AUTH_DIR).join(&secret.key));
        }
        None if cfg.auth.mode == AuthMode::Jwt => {
            return Err(invalid(
                "MissingJwtSecret",
                "auth mode \"jwt\" needs spec.auth.jwtSecretRef (or set spec.config.auth.mode: anonymous)",
            ));
        }
        None => {}
    }
    if !spec.auth.rooms.is_empty() {
        if !cfg.auth.rooms.is_empty() {
            return Err(invalid(
                "ConflictingRoomRules",
                "set room rules in spec.auth.rooms or spec.config.auth.rooms, not both",
            ));
        }
        cfg.auth.rooms = spec.auth.rooms.clone();
    }
    if cfg.rebalance != Default::default() {
        return Err(invalid("OperatorOwnedField", "spec.config.rebalance is set by the operator: use spec.rebalance"));
    }
    if cfg.cluster.revision.is_some() {
        return Err(invalid(
            "OperatorOwnedField",
            "spec.config.cluster.revision is set by the operator (each pod's controller-revision-hash)",
        ));
    }
    cfg.rebalance = spec.rebalance.node_config();
    cfg.drain = DrainConfig {
        lb_grace_secs: spec.drain.lb_grace_seconds,
        rate_per_sec: spec.drain.rate_per_second,
        deadline_secs: spec.drain.deadline_seconds,
    };
    cfg.validate().map_err(|e| invalid("InvalidConfig", e.to_string()))?;
    Ok(cfg)
}

fn termination_grace(cluster: &ChatCluster) -> Result<i64, Invalid> {
    let drain = &cluster.spec.drain;
    let deadline = i64::try_from(drain.deadline_seconds)
        .map_err(|_| invalid("InvalidDrain", "spec.drain.deadlineSeconds is too large"))?;
    // Five seconds beyond the node's own deadline, so the kubelet never SIGKILLs a draining node.
    let grace = drain.termination_grace_period_seconds.unwrap_or(deadline.saturating_add(5));
    if grace <= deadline {
        return Err(invalid(
            "InvalidDrain",
            format!("spec.drain.terminationGracePeriodSeconds ({grace}) must exceed deadlineSeconds ({deadline})"),
        ));
    }
    Ok(grace)
}

/// The keys of a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
pub const TLS_KEY_KEY: &str = "tls.key";

/// The `spec.tls` Secret exists and has both keys. Its content is not checked here: the node
/// refuses a certificate it cannot use, and keeps serving the last good one after a renewal.
fn check_tls_secret(cluster: &ChatCluster, owner: &Owner, refs: &Refs) -> Result<(), Invalid> {
    let Some(tls) = &cluster.spec.tls else { return Ok(()) };
    let Some(secret) = &refs.tls_secret else {
        return Err(invalid(
            "SecretNotFound",
            format!("Secret {}/{} (spec.tls.secretName) does not exist", owner.namespace, tls.secret_name),
        ));
    };
    let data = secret.data.as_ref();
    if let Some(missing) = [TLS_CERT_KEY, TLS_KEY_KEY].into_iter().find(|k| data.is_none_or(|d| !d.contains_key(*k))) {
        return Err(invalid(
            "SecretKeyNotFound",
            format!("Secret {}/{} has no key {missing:?} (spec.tls.secretName)", owner.namespace, tls.secret_name),
        ));
    }
    Ok(())
}

/// The server API's keys must be there and long enough: the node would otherwise ignore them
/// (and answer 401 to every call) without anyone noticing.
fn check_api_secret(cluster: &ChatCluster, owner: &Owner, refs: &Refs) -> Result<(), Invalid> {
    let Some(api) = &cluster.spec.api else { return Ok(()) };
    let reference = &api.key_secret_ref;
    let Some(secret) = &refs.api_secret else {
        return Err(invalid(
            "SecretNotFound",
            format!("Secret {}/{} (spec.api.keySecretRef) does not exist", owner.namespace, reference.name),
        ));
    };
    let Some(keys) = secret.data.as_ref().and_then(|d| d.get(&reference.key)) else {
        return Err(invalid(
            "SecretKeyNotFound",
            format!(
                "Secret {}/{} has no key {:?} (spec.api.keySecretRef.key)",
                owner.namespace, reference.name, reference.key
            ),
        ));
    };
    let text = String::from_utf8_lossy(&keys.0);
    let lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let min = chat_node::config::MIN_API_KEY_CHARS;
    if lines.is_empty() || lines.iter().any(|k| k.len() < min) {
        return Err(invalid(
            "WeakApiKey",
            format!("every API key in Secret {} must be at least {min} characters, one per line", reference.name),
        ));
    }
    Ok(())
}

fn auth_key(cluster: &ChatCluster, owner: &Owner, refs: &Refs) -> Result<Option<Vec<u8>>, Invalid> {
    let Some(reference) = &cluster.spec.auth.jwt_secret_ref else { return Ok(None) };
    let Some(secret) = &refs.auth_secret else {
        return Err(invalid(
            "SecretNotFound",
            format!("Secret {}/{} (spec.auth.jwtSecretRef) does not exist", owner.namespace, reference.name),
        ));
    };
    let Some(key) = secret.data.as_ref().and_then(|d| d.get(&reference.key)) else {
        return Err(invalid(
            "SecretKeyNotFound",
            format!(
                "Secret {}/{} has no key {:?} (spec.auth.jwtSecretRef.key)",
                owner.namespace, reference.name, reference.key
            ),
        ));
    };
    if key.0.len() < MIN_JWT_KEY_BYTES {
        return Err(invalid(
            "WeakJwtSecret",
            format!("the JWT key in Secret {} must be at least {MIN_JWT_KEY_BYTES} bytes", reference.name),
        ));
    }
    Ok(Some(key.0.clone()))
}

fn assets(cluster: &ChatCluster, owner: &Owner, refs: &Refs) -> Result<BTreeMap<String, Vec<u8>>, Invalid> {
    let spec = &cluster.spec.assets;
    let mut files = BTreeMap::new();
    if let Some(reference) = &spec.config_map_ref {
        let Some(cm) = &refs.assets_config_map else {
            return Err(invalid(
                "ConfigMapNotFound",
                format!("ConfigMap {}/{} (spec.assets.configMapRef) does not exist", owner.namespace, reference.name),
            ));
        };
        // Images and fonts come in binaryData.
        files.extend(crate::resources::config_map_files(cm.clone()));
    }
    files.extend(spec.files.iter().map(|(k, v)| (k.clone(), v.clone().into_bytes())));
    if let Some(bad) = files.keys().find(|k| !valid_file_name(k)) {
        return Err(invalid(
            "InvalidAssetName",
            format!("asset name {bad:?} must be letters, digits, '-', '_' or '.', and not start with \"..\""),
        ));
    }
    let total: usize = files.iter().map(|(k, v)| k.len() + v.len()).sum();
    if total > MAX_ASSET_BYTES {
        return Err(invalid("AssetsTooLarge", format!("assets total {total} bytes; at most {MAX_ASSET_BYTES} fit")));
    }
    Ok(files)
}

/// ConfigMap key rules, minus names kubelet reserves for its atomic-swap links.
fn valid_file_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && !name.starts_with("..")
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The existing key when usable, so re-applying the Secret never rotates it.
fn peer_key(refs: &Refs) -> Vec<u8> {
    existing_peer_key(refs).map_or_else(|| refs.fresh_peer_key.clone(), <[u8]>::to_vec)
}

fn existing_peer_key(refs: &Refs) -> Option<&[u8]> {
    refs.peer_secret
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| d.get(PEER_KEY))
        .filter(|k| k.0.len() >= PEER_KEY_BYTES)
        .map(|k| k.0.as_slice())
}

/// A running cluster (its StatefulSet exists) whose peer Secret is gone or holds no usable key:
/// this reconcile gives it a new key. Nodes accept their old key for a while after the new one
/// reaches them, so the cluster stays linked, but someone deleted or broke the Secret.
pub fn peer_key_regenerated(refs: &Refs) -> bool {
    refs.statefulset.is_some() && existing_peer_key(refs).is_none()
}

/// The rendered config without what a running node re-reads (`cluster.size`), as the text the
/// config hash covers: a scale (`kubectl scale`, an HPA) must never restart pods.
pub fn restart_relevant(config: &NodeConfig) -> Result<String, Invalid> {
    let mut value = toml::Table::try_from(config).map_err(|e| invalid("InvalidConfig", e.to_string()))?;
    if let Some(cluster) = value.get_mut("cluster").and_then(toml::Value::as_table_mut) {
        cluster.remove("size");
    }
    toml::to_string(&value).map_err(|e| invalid("InvalidConfig", e.to_string()))
}

/// Hash of everything a running node reads only at start. Keys enter the hash together with the
/// random peer key, so the published hash cannot be used to guess a weak JWT key offline.
fn config_hash(config_toml: &str, auth_key: Option<&[u8]>, peer_key: &[u8]) -> String {
    let mut hasher = Sha256::new();
    hasher.update(config_toml.as_bytes());
    hasher.update([0]);
    hasher.update(auth_key.unwrap_or_default());
    hasher.update([0]);
    hasher.update(peer_key);
    hasher.finalize().iter().take(16).map(|b| format!("{b:02x}")).collect()
}
