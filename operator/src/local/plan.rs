//! What the operator would create for a manifest, taken from its own validation and builders,
//! and how each node's pod maps onto this machine: the pod's mounts under `/etc/chatcluster`
//! become files in the state directory, the pod IP a loopback address.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use chat_node::config::NodeConfig;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Container, EnvVar};

use super::manifest::Manifest;
use crate::crd::RolloutStrategy;
use crate::reconcile::validate::{Invalid, Refs, TLS_CERT_KEY, TLS_KEY_KEY, validate};
use crate::resources::{
    self, AUTH_DIR, CONFIG_HASH_ANNOTATION, CONFIG_KEY, CONFIG_PATH, MOUNT_ROOT, Owner, PEER_DIR, PEER_KEY,
    config_map_files,
};

/// The ChatCluster as the operator would run it.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    pub name: String,
    pub namespace: String,
    /// `spec.replicas`: local mode steps a scale-down itself, as the operator does.
    pub replicas: u32,
    /// The config ConfigMap's `node.toml`, parsed.
    pub config: NodeConfig,
    /// The assets ConfigMap's files (`data` and `binaryData`).
    pub assets: BTreeMap<String, Vec<u8>>,
    /// The peer Secret's key.
    pub peer_key: Vec<u8>,
    /// The JWT Secret's key and the file name the pod would see it under.
    pub auth_key: Option<(String, Vec<u8>)>,
    /// The server API's keys (`spec.api.keySecretRef`) and their file name.
    pub api_keys: Option<(String, Vec<u8>)>,
    /// The `spec.tls` Secret's `tls.crt` and `tls.key`, by file name.
    pub tls_files: Option<Vec<(String, Vec<u8>)>>,
    /// The pod template's config hash: a change means the StatefulSet would replace the pods.
    pub revision: String,
    pub rolling: bool,
    pub min_ready: Duration,
    /// The pod's termination grace period: how long a drain may take before SIGKILL.
    pub grace: Duration,
    /// The node container, for its arguments and environment.
    pub container: Container,
    /// `<name>-peers.<ns>.svc.cluster.local`.
    pub peer_dns: String,
    /// The StatefulSet the operator would apply: the next manifest is checked against it as the
    /// operator checks against the one in the cluster (its volume claims cannot change).
    pub statefulset: StatefulSet,
}

fn local_invalid(message: String) -> Invalid {
    Invalid { reason: "InvalidConfig", message }
}

/// Runs the operator's validation and builders; `peer_key` plays the generated peer Secret,
/// `running` the StatefulSet of the manifest that runs now (`None` at start).
pub fn desired(manifest: &Manifest, peer_key: &[u8], running: Option<&StatefulSet>) -> Result<Desired, Invalid> {
    let cluster = &manifest.cluster;
    let owner = Owner::of(cluster).ok_or_else(|| local_invalid("the ChatCluster has no name".to_owned()))?;
    let spec = &cluster.spec;
    let refs = Refs {
        auth_secret: spec.auth.jwt_secret_ref.as_ref().and_then(|r| manifest.secrets.get(&r.name)).cloned(),
        tls_secret: spec.tls.as_ref().and_then(|t| manifest.secrets.get(&t.secret_name)).cloned(),
        api_secret: spec.api.as_ref().and_then(|a| manifest.secrets.get(&a.key_secret_ref.name)).cloned(),
        assets_config_map: spec.assets.config_map_ref.as_ref().and_then(|r| manifest.config_maps.get(&r.name)).cloned(),
        peer_secret: None,
        fresh_peer_key: peer_key.to_vec(),
        statefulset: running.cloned(),
        // Local mode makes every child itself: nothing else can hold their names.
        existing: Default::default(),
    };
    let plan = validate(cluster, owner.clone(), &refs)?;
    let children = resources::build(cluster, &plan);
    let config_toml = children.config.data.as_ref().and_then(|d| d.get(CONFIG_KEY)).cloned().unwrap_or_default();
    // The node parses exactly this text; parsing it here too catches a rendering it would refuse.
    let config: NodeConfig =
        toml::from_str(&config_toml).map_err(|e| local_invalid(format!("rendered node.toml: {e}")))?;
    let peer_key =
        children.peer_secret.data.as_ref().and_then(|d| d.get(PEER_KEY)).map(|k| k.0.clone()).unwrap_or_default();
    let secret_file = |secret: Option<&k8s_openapi::api::core::v1::Secret>, key: &str| {
        Some((key.to_owned(), secret?.data.as_ref()?.get(key)?.0.clone()))
    };
    let auth_key = spec.auth.jwt_secret_ref.as_ref().and_then(|r| secret_file(refs.auth_secret.as_ref(), &r.key));
    let api_keys = spec.api.as_ref().and_then(|a| secret_file(refs.api_secret.as_ref(), &a.key_secret_ref.key));
    let tls_files = refs.tls_secret.as_ref().and_then(|secret| secret.data.as_ref()).map(|data| {
        [TLS_CERT_KEY, TLS_KEY_KEY]
            .into_iter()
            .filter_map(|key| data.get(key).map(|value| (key.to_owned(), value.0.clone())))
            .collect()
    });
    let statefulset = children.statefulset;
    let sts = statefulset.spec.clone();
    let template = sts.template;
    let revision = template
        .metadata
        .as_ref()
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION))
        .cloned()
        .unwrap_or_else(|| plan.config_hash.clone());
    let pod = template.spec.unwrap_or_default();
    let grace = pod.termination_grace_period_seconds.unwrap_or(plan.termination_grace_seconds);
    let container = pod.containers.into_iter().next().unwrap_or_default();
    Ok(Desired {
        name: owner.name.clone(),
        namespace: owner.namespace.clone(),
        replicas: u32::try_from(spec.replicas).unwrap_or(0),
        config,
        assets: config_map_files(children.assets),
        peer_key,
        auth_key,
        api_keys,
        tls_files,
        revision,
        rolling: spec.rollout.strategy == RolloutStrategy::RollingUpdate,
        min_ready: Duration::from_secs(u64::try_from(sts.min_ready_seconds.unwrap_or(0)).unwrap_or(0)),
        grace: Duration::from_secs(u64::try_from(grace).unwrap_or(0)),
        container,
        peer_dns: owner.peer_dns(),
        statefulset,
    })
}

impl Desired {
    /// StatefulSet pod name of `ordinal`.
    pub fn node_name(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.name)
    }
}

/// Where each node listens on this machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// Node `i` on `first + i`, every node on the same three ports: the pod network's shape, so
    /// the nodes find each other through DNS A records as in Kubernetes.
    PerNodeIp { first: Ipv4Addr, client_port: u16, peer_port: u16, admin_port: u16 },
    /// Every node on one address (hosts where only 127.0.0.1 is assignable, e.g. macOS), with
    /// ports `base + 3i` (client), `base + 3i + 1` (peer) and `base + 3i + 2` (admin). DNS
    /// answers carry no ports, so the nodes get a static peer list instead.
    SharedIp { ip: Ipv4Addr, base_port: u16 },
}

/// One node's addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct NodeAddr {
    pub ip: IpAddr,
    pub client: SocketAddr,
    pub peer: SocketAddr,
    /// `/metrics`, `/cluster` and the probes.
    pub admin: SocketAddr,
}

impl Addressing {
    /// `None` when the ordinal runs past the address or port space.
    pub fn node(&self, ordinal: u32) -> Option<NodeAddr> {
        match *self {
            Addressing::PerNodeIp { first, client_port, peer_port, admin_port } => {
                let ip = IpAddr::V4(Ipv4Addr::from(u32::from(first).checked_add(ordinal)?));
                let at = |port| SocketAddr::new(ip, port);
                Some(NodeAddr { ip, client: at(client_port), peer: at(peer_port), admin: at(admin_port) })
            }
            Addressing::SharedIp { ip, base_port } => {
                let client = u16::try_from(u32::from(base_port).checked_add(ordinal.checked_mul(3)?)?).ok()?;
                let (peer, admin) = (client.checked_add(1)?, client.checked_add(2)?);
                let ip = IpAddr::V4(ip);
                let at = |port| SocketAddr::new(ip, port);
                Some(NodeAddr { ip, client: at(client), peer: at(peer), admin: at(admin) })
            }
        }
    }

    pub fn uses_dns(&self) -> bool {
        matches!(self, Addressing::PerNodeIp { .. })
    }
}

/// The state directory: the pod's `/etc/chatcluster` mounts, and one folder per node.
#[derive(Clone, Debug)]
pub struct Layout {
    pub root: PathBuf,
}

impl Layout {
    /// Where a path inside the pod is on this machine.
    pub fn host_path(&self, pod_path: &Path) -> PathBuf {
        match pod_path.strip_prefix(MOUNT_ROOT) {
            Ok(rest) => self.root.join(rest),
            Err(_) => pod_path.to_path_buf(),
        }
    }

    pub fn assets_dir(&self) -> PathBuf {
        self.host_path(Path::new(resources::ASSETS_DIR))
    }

    pub fn peer_key_file(&self) -> PathBuf {
        self.host_path(&Path::new(PEER_DIR).join(PEER_KEY))
    }

    pub fn auth_key_file(&self, key: &str) -> PathBuf {
        self.host_path(&Path::new(AUTH_DIR).join(key))
    }

    /// Where the nodes find the server API's keys.
    pub fn api_keys_file(&self, key: &str) -> PathBuf {
        self.host_path(&Path::new(resources::API_DIR).join(key))
    }

    /// Where a node finds file `name` of the `spec.tls` Secret.
    pub fn tls_file(&self, name: &str) -> PathBuf {
        self.host_path(&Path::new(resources::TLS_DIR).join(name))
    }

    pub fn node_dir(&self, node: &str) -> PathBuf {
        self.root.join("nodes").join(node)
    }

    pub fn node_config(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("node.toml")
    }

    /// The node's volume (`spec.storage`): kept across runs with the same state directory.
    pub fn node_data(&self, node: &str) -> PathBuf {
        self.node_dir(node).join("data")
    }

    pub fn node_log(&self, node: &str) -> PathBuf {
        self.root.join(format!("{node}.log"))
    }

    pub fn status_file(&self) -> PathBuf {
        self.root.join("status.json")
    }
}

/// How a node finds its peers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Peers {
    /// The local DNS server answers the peer Service's name.
    Dns(SocketAddr),
    /// Every node's peer address (the node skips its own).
    Static(Vec<String>),
}

/// The node config of one node on this machine: the rendered `node.toml` with what differs
/// from a pod (addresses, the mounts' host paths, the volume, how peers are found).
pub fn node_config(desired: &Desired, ordinal: u32, addr: &NodeAddr, peers: &Peers, layout: &Layout) -> NodeConfig {
    let mut cfg = desired.config.clone();
    // The node would take it from its name too; explicit, so `--node-id` in the args cannot
    // change it.
    cfg.cluster.ordinal = Some(ordinal);
    if cfg.cluster.data_dir.is_some() {
        cfg.cluster.data_dir = Some(layout.node_data(&desired.node_name(ordinal)));
    }
    cfg.listen = addr.client;
    cfg.admin.listen = addr.admin;
    cfg.cluster.peer_listen = addr.peer;
    cfg.cluster.advertise_ip = Some(addr.ip);
    cfg.assets_dir = cfg.assets_dir.as_deref().map(|p| layout.host_path(p));
    cfg.auth.jwt_secret_file = cfg.auth.jwt_secret_file.as_deref().map(|p| layout.host_path(p));
    cfg.admin.api_keys_file = cfg.admin.api_keys_file.as_deref().map(|p| layout.host_path(p));
    cfg.tls.cert_file = cfg.tls.cert_file.as_deref().map(|p| layout.host_path(p));
    cfg.tls.key_file = cfg.tls.key_file.as_deref().map(|p| layout.host_path(p));
    cfg.cluster.secret_file = cfg.cluster.secret_file.as_deref().map(|p| layout.host_path(p));
    match peers {
        Peers::Dns(server) => cfg.cluster.dns_server = Some(*server),
        Peers::Static(list) => {
            // A failing lookup of the (unresolvable) Service name would hide the static list.
            cfg.cluster.dns_name = None;
            cfg.cluster.static_peers = list.clone();
        }
    }
    cfg
}

/// Whether a node running `started` must restart to run `wanted`: they differ in more than what
/// a running node re-reads (`cluster.size`).
pub fn needs_restart(started: &NodeConfig, wanted: &NodeConfig) -> bool {
    let mut same_size = wanted.clone();
    same_size.cluster.size = started.cluster.size;
    *started != same_size
}

/// The container's environment for one node, with the downward API resolved as the kubelet
/// would: pod name, namespace, IP and revision (the local rollout's, in place of the
/// StatefulSet controller's hash).
pub fn node_env(
    container: &Container,
    node: &str,
    namespace: &str,
    ip: IpAddr,
    revision: &str,
) -> Vec<(String, String)> {
    let env: &[EnvVar] = container.env.as_deref().unwrap_or_default();
    env.iter()
        .filter_map(|var| {
            let value = match (&var.value, var.value_from.as_ref().and_then(|f| f.field_ref.as_ref())) {
                (Some(value), _) => value.clone(),
                (None, Some(field)) => match field.field_path.as_str() {
                    "metadata.name" => node.to_owned(),
                    "metadata.namespace" => namespace.to_owned(),
                    "status.podIP" => ip.to_string(),
                    crate::resources::REVISION_FIELD => revision.to_owned(),
                    other => {
                        tracing::warn!(var = %var.name, field = other, "no local value for this downward-API field");
                        return None;
                    }
                },
                (None, None) => return None,
            };
            Some((var.name.clone(), value))
        })
        .collect()
}

/// The container's arguments with pod paths mapped, and the config file replaced by the node's.
pub fn node_args(container: &Container, layout: &Layout, node: &str) -> Vec<String> {
    let args = container.args.as_deref().unwrap_or_default();
    args.iter()
        .map(|arg| {
            if arg == CONFIG_PATH {
                layout.node_config(node).display().to_string()
            } else if arg.starts_with('/') {
                layout.host_path(Path::new(arg)).display().to_string()
            } else {
                arg.clone()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::manifest;

    fn minimal() -> Manifest {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/minimal.yaml")).unwrap();
        manifest::parse(&text, None, &[]).unwrap()
    }

    #[test]
    fn desired_comes_from_the_operator_builders() {
        let m = minimal();
        let d = desired(&m, &[b'a'; 64], None).unwrap();
        assert_eq!((d.name.as_str(), d.namespace.as_str(), d.replicas), ("chat", "default", 3));
        assert_eq!(d.peer_dns, "chat-peers.default.svc.cluster.local");
        assert_eq!(d.peer_key, vec![b'a'; 64]);
        assert_eq!(d.grace, Duration::from_secs(30), "deadline 25 + 5");
        assert!(d.rolling);
        // The same peer key gives the same revision; another config gives another one.
        assert_eq!(desired(&m, &[b'a'; 64], None).unwrap().revision, d.revision);
        let mut changed = m.clone();
        changed.cluster.spec.config.limits.max_connections = 5;
        assert_ne!(desired(&changed, &[b'a'; 64], None).unwrap().revision, d.revision);
        // Assets do not restart pods.
        let mut assets = m.clone();
        assets.cluster.spec.assets.files.insert("x.txt".into(), "x".into());
        let with_assets = desired(&assets, &[b'a'; 64], None).unwrap();
        assert_eq!(with_assets.revision, d.revision);
        assert_eq!(with_assets.assets["x.txt"], b"x");
    }

    #[test]
    fn invalid_spec_is_the_operators_degraded_reason() {
        let mut m = minimal();
        m.cluster.spec.drain.termination_grace_period_seconds = Some(1);
        assert_eq!(desired(&m, &[0; 64], None).unwrap_err().reason, "InvalidDrain");
        let mut m = minimal();
        m.cluster.spec.auth.jwt_secret_ref =
            Some(crate::crd::SecretKeyRef { name: "jwt".into(), key: "jwt-secret".into() });
        assert_eq!(desired(&m, &[0; 64], None).unwrap_err().reason, "SecretNotFound");
    }

    #[test]
    fn node_config_maps_mounts_and_addresses() {
        let d = desired(&minimal(), &[b'a'; 64], None).unwrap();
        let layout = Layout { root: PathBuf::from("/state") };
        let addressing = Addressing::PerNodeIp {
            first: Ipv4Addr::new(127, 0, 0, 10),
            client_port: 8080,
            peer_port: 8081,
            admin_port: 8082,
        };
        let addr = addressing.node(2).unwrap();
        assert_eq!(addr.client.to_string(), "127.0.0.12:8080");
        assert_eq!(addr.admin.to_string(), "127.0.0.12:8082");
        let dns: SocketAddr = "127.0.0.1:5353".parse().unwrap();
        let cfg = node_config(&d, 2, &addr, &Peers::Dns(dns), &layout);
        cfg.validate().unwrap();
        assert_eq!(cfg.cluster.peer_listen.to_string(), "127.0.0.12:8081");
        assert_eq!(cfg.cluster.dns_name.as_deref(), Some("chat-peers.default.svc.cluster.local"));
        assert_eq!(cfg.cluster.dns_server, Some(dns));
        assert_eq!(cfg.cluster.secret_file.as_deref(), Some(Path::new("/state/peer/hmac-key")));
        assert_eq!(cfg.assets_dir.as_deref(), Some(Path::new("/state/assets")));

        let shared = Addressing::SharedIp { ip: Ipv4Addr::LOCALHOST, base_port: 8080 };
        let addr = shared.node(1).unwrap();
        assert_eq!((addr.client.port(), addr.peer.port(), addr.admin.port()), (8083, 8084, 8085));
        let cfg = node_config(&d, 1, &addr, &Peers::Static(vec!["127.0.0.1:8081".into()]), &layout);
        cfg.validate().unwrap();
        assert_eq!(cfg.cluster.dns_name, None);
        assert!(Addressing::SharedIp { ip: Ipv4Addr::LOCALHOST, base_port: 65534 }.node(1).is_none());

        let env = node_env(&d.container, "chat-2", "default", "127.0.0.12".parse().unwrap(), "r1");
        let env: BTreeMap<_, _> = env.into_iter().collect();
        assert_eq!(env["POD_NAME"], "chat-2");
        assert_eq!(env["POD_IP"], "127.0.0.12");
        assert_eq!(env["CHAT_CLUSTER__REVISION"], "r1");
        assert_eq!(env["CHAT_PEER_DNS"], "chat-peers.default.svc.cluster.local");
        assert_eq!(node_args(&d.container, &layout, "chat-2"), ["--config", "/state/nodes/chat-2/node.toml"]);
    }

    #[test]
    fn each_node_gets_the_size_its_ordinal_and_its_own_data_directory() {
        let mut m = minimal();
        m.cluster.spec.replicas = 4;
        m.cluster.spec.storage = Some(crate::crd::StorageSpec { size: "1Gi".into(), storage_class_name: None });
        let d = desired(&m, &[b'a'; 64], None).unwrap();
        let layout = Layout { root: PathBuf::from("/state") };
        let addr = Addressing::SharedIp { ip: Ipv4Addr::LOCALHOST, base_port: 8080 }.node(3).unwrap();
        let cfg = node_config(&d, 3, &addr, &Peers::Static(vec![]), &layout);
        cfg.validate().unwrap();
        assert_eq!((cfg.cluster.size, cfg.cluster.ordinal), (4, Some(3)));
        assert_eq!(cfg.cluster.storage, chat_node::config::StorageMode::Disk);
        assert_eq!(cfg.cluster.data_dir.as_deref(), Some(Path::new("/state/nodes/chat-3/data")));

        let memory = desired(&minimal(), &[b'a'; 64], None).unwrap();
        assert_eq!(node_config(&memory, 0, &addr, &Peers::Static(vec![]), &layout).cluster.data_dir, None);
    }

    #[test]
    fn a_scale_changes_neither_the_revision_nor_anything_that_needs_a_restart() {
        let m = minimal();
        let d = desired(&m, &[b'a'; 64], None).unwrap();
        let mut scaled = m.clone();
        scaled.cluster.spec.replicas = 5;
        let s = desired(&scaled, &[b'a'; 64], Some(&d.statefulset)).unwrap();
        assert_eq!((s.replicas, s.config.cluster.size), (5, 5));
        assert_eq!(s.revision, d.revision);
        assert!(!needs_restart(&d.config, &s.config));
        let mut changed = s.config.clone();
        changed.history.size = 7;
        assert!(needs_restart(&d.config, &changed));
    }

    #[test]
    fn storage_cannot_change_while_running_as_in_a_cluster() {
        let m = minimal();
        let d = desired(&m, &[b'a'; 64], None).unwrap();
        let mut disk = m.clone();
        disk.cluster.spec.storage = Some(crate::crd::StorageSpec { size: "1Gi".into(), storage_class_name: None });
        assert_eq!(desired(&disk, &[b'a'; 64], Some(&d.statefulset)).unwrap_err().reason, "StorageImmutable");
        assert!(desired(&disk, &[b'a'; 64], None).is_ok(), "a fresh start may choose");
    }
}
