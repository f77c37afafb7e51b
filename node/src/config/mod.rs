//! The node's configuration schema: the single source of truth for the TOML file the node reads,
//! the `CHAT_*` environment overrides, and the `spec.config` block the operator embeds in the CRD.
//! This module holds types and validation only; it must not do I/O (see `load` for that).

#[cfg(feature = "server")]
pub mod load;
pub mod reference;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Configuration of one chat node.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct NodeConfig {
    /// Name of this node in logs, metrics and `welcome` frames. Defaults to `$POD_NAME`, then the
    /// host name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_id: Option<String>,
    /// Address of the client port: WebSocket `/ws`, `/healthz`, `/readyz` and the web page only.
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// Directory of static assets served at `/`. Files here override the built-in web page
    /// (`index.html`, `app.js`, `chatcluster.js`, `style.css`, `logo.svg`); changes on disk, including a kubelet
    /// ConfigMap `..data` swap, are served at once without a restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub assets_dir: Option<PathBuf>,
    pub history: HistoryConfig,
    pub limits: LimitsConfig,
    pub auth: AuthConfig,
    pub drain: DrainConfig,
    pub rebalance: RebalanceConfig,
    pub cluster: ClusterConfig,
    pub admin: AdminConfig,
    pub tls: TlsConfig,
    pub log: LogConfig,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            assets_dir: None,
            history: HistoryConfig::default(),
            limits: LimitsConfig::default(),
            auth: AuthConfig::default(),
            drain: DrainConfig::default(),
            rebalance: RebalanceConfig::default(),
            cluster: ClusterConfig::default(),
            admin: AdminConfig::default(),
            tls: TlsConfig::default(),
            log: LogConfig::default(),
        }
    }
}

/// The admin port, for operators and Prometheus rather than chat clients: it tells room names,
/// peer addresses and node ids, so keep it off the public network (the client Service does not
/// expose it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin port: `/metrics` (Prometheus text), `/cluster` (links, Raft groups,
    /// readiness), `/healthz` and `/readyz` (the pod's probes), and the server API for backends
    /// under `/api/v1` (see docs/api.md) when API keys are configured.
    #[schemars(with = "String")]
    pub listen: SocketAddr,
    /// File with the server API's keys, one per line (at least 16 characters each; several
    /// during a rotation). Read again when it changes. The operator mounts
    /// `spec.api.keySecretRef` here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_keys_file: Option<PathBuf>,
    /// The server API's keys inline; prefer `api_keys_file`. With neither, `/api/v1` answers
    /// 404 `api_disabled`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<String>,
}

/// TLS on the client port: `wss://` and `https://` instead of `ws://` and `http://`. Both files
/// or neither. They are read again when they change (a renewed certificate reaches new
/// connections without a restart); the admin and peer ports stay as they are.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first (e.g. `tls.crt` of a `kubernetes.io/tls` Secret).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// PEM private key of the certificate (PKCS#8, PKCS#1 or SEC1; e.g. `tls.key`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
}

impl TlsConfig {
    pub fn enabled(&self) -> bool {
        self.cert_file.is_some()
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], 9090)), api_keys_file: None, api_keys: Vec::new() }
    }
}

/// Room history kept for `history` requests and for resume after reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct HistoryConfig {
    /// Messages kept per room (a ring: the oldest is dropped first). 0 disables history and resume.
    #[schemars(range(max = 100000))]
    pub size: usize,
    /// Seconds a room with no subscribers keeps its history before it is forgotten.
    #[schemars(range(min = 1))]
    pub empty_room_ttl_secs: u64,
}

impl Default for HistoryConfig {
    fn default() -> Self {
        Self { size: 100, empty_room_ttl_secs: 300 }
    }
}

/// Limits that protect the node from heavy, slow or abusive clients.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Open client connections per node; more are refused with HTTP 503 at the handshake.
    #[schemars(range(min = 1))]
    pub max_connections: usize,
    /// Largest WebSocket message a client may send, in bytes (close 1009 above it).
    #[schemars(range(min = 256, max = 16777216))]
    pub max_message_bytes: usize,
    /// Rooms one connection may be joined to at once.
    #[schemars(range(min = 1))]
    pub max_rooms_per_connection: usize,
    /// Rooms this node holds at once: a `join` that would create one more is refused with
    /// `too_many_rooms` (rooms already there can still be joined; idle ones are forgotten after
    /// `history.empty_room_ttl_secs`). Bounds the memory clients can make the node spend.
    #[schemars(range(min = 1))]
    pub max_rooms: usize,
    /// Sustained publishes per second allowed per connection.
    #[schemars(range(min = 1))]
    pub publish_rate_per_sec: u32,
    /// Publishes allowed in a burst above the sustained rate.
    #[schemars(range(min = 1))]
    pub publish_burst: u32,
    /// Connections one user (the token's `sub`) may hold on this node (HTTP 429 above it). Each
    /// anonymous connection is a user of its own: cap those with `max_connections_per_ip`.
    #[schemars(range(min = 1))]
    pub max_connections_per_user: usize,
    /// Connections one client address may hold on this node (HTTP 429 above it); unset: no cap. Behind a proxy or
    /// load balancer every client has its address unless `trust_forwarded_for` is set.
    #[schemars(range(min = 1))]
    pub max_connections_per_ip: Option<usize>,
    /// Take the client's address from the last entry of `X-Forwarded-For` (the one your proxy
    /// added) instead of the TCP peer. Only behind a proxy that sets it: clients can forge it.
    pub trust_forwarded_for: bool,
    /// Sustained frames per second allowed per connection, of every type (join, leave, history,
    /// presence, ping, publish, malformed): one connection cannot flood the room's members and
    /// the peer links with join/leave pairs. Unset: twice `publish_rate_per_sec`, at least 50.
    #[schemars(range(min = 1))]
    pub frame_rate_per_sec: Option<u32>,
    /// Frames allowed in a burst above `frame_rate_per_sec`. Unset: twice `publish_burst`, at
    /// least 100.
    #[schemars(range(min = 1))]
    pub frame_burst: Option<u32>,
    /// Consecutive rate-limited frames after which the connection is closed (code 4003).
    #[schemars(range(min = 1))]
    pub rate_limit_strikes: u32,
    /// Frames queued for one client before it counts as a slow consumer and is closed (code 4001).
    #[schemars(range(min = 16))]
    pub outbound_queue_frames: usize,
    /// Bytes queued for one client before it counts as a slow consumer and is closed (code 4001).
    #[schemars(range(min = 4096))]
    pub outbound_queue_bytes: usize,
    /// Seconds between server pings.
    #[schemars(range(min = 1))]
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the client (pongs count) before it is closed (code 4002).
    #[schemars(range(min = 2))]
    pub idle_timeout_secs: u64,
    /// Seconds a client may take to finish the WebSocket handshake.
    #[schemars(range(min = 1))]
    pub handshake_timeout_secs: u64,
    /// Seconds one write to a client (or its ping or close) may wait for the client to read;
    /// a client that stops reading is then dropped as a slow consumer, so the idle, token-expiry
    /// and slow-consumer closes keep working.
    #[schemars(range(min = 1))]
    pub write_timeout_secs: u64,
    /// Read buffer per connection in bytes (tungstenite allocates it eagerly; its default is
    /// 128 KiB, which costs ~1 GiB at 10 000 connections). Larger messages still arrive whole:
    /// the buffer grows for them.
    #[schemars(range(min = 512, max = 1048576))]
    pub ws_read_buffer_bytes: usize,
    /// Bytes buffered before a write goes to the socket (frames are always flushed when the
    /// outbound queue runs empty). The buffer keeps its size between bursts, so this bounds what
    /// an idle connection holds.
    #[schemars(range(max = 1048576))]
    pub ws_write_buffer_bytes: usize,
}

impl LimitsConfig {
    /// The frame budget per connection: (sustained per second, burst).
    pub fn frame_budget(&self) -> (u32, u32) {
        (
            self.frame_rate_per_sec.unwrap_or_else(|| self.publish_rate_per_sec.saturating_mul(2).max(50)),
            self.frame_burst.unwrap_or_else(|| self.publish_burst.saturating_mul(2).max(100)),
        )
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_connections: 10_000,
            max_message_bytes: 16 * 1024,
            max_rooms_per_connection: 64,
            max_rooms: 100_000,
            publish_rate_per_sec: 20,
            publish_burst: 40,
            frame_rate_per_sec: None,
            frame_burst: None,
            max_connections_per_user: 100,
            max_connections_per_ip: None,
            trust_forwarded_for: false,
            rate_limit_strikes: 20,
            outbound_queue_frames: 1024,
            outbound_queue_bytes: 1024 * 1024,
            ping_interval_secs: 25,
            idle_timeout_secs: 60,
            handshake_timeout_secs: 10,
            write_timeout_secs: 10,
            ws_read_buffer_bytes: 2048,
            ws_write_buffer_bytes: 4096,
        }
    }
}

/// How clients prove who they are at the handshake, and which roles may do what.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    pub mode: AuthMode,
    /// File holding the HS256 key (the operator mounts a Secret here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret_file: Option<PathBuf>,
    /// The HS256 key inline; prefer `jwt_secret_file` or the `CHAT_AUTH__JWT_SECRET` variable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_secret: Option<String>,
    /// Required `iss` claim, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    /// Clock skew tolerated on `exp`/`nbf`, in seconds.
    pub leeway_secs: u64,
    /// Roles of which a client needs at least one to connect at all (empty: any valid token).
    pub connect_roles: Vec<String>,
    /// Per-room rules `{pattern, join_roles, publish_roles}`; the first rule whose pattern matches
    /// the room applies. A room no rule matches is open to every connected client.
    pub rooms: Vec<RoomRule>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            mode: AuthMode::Jwt,
            jwt_secret_file: None,
            jwt_secret: None,
            issuer: None,
            audience: None,
            leeway_secs: 30,
            connect_roles: Vec::new(),
            rooms: Vec::new(),
        }
    }
}

/// `jwt` requires an HS256 token; `anonymous` (local development only) lets anyone in, named by
/// the `name` query parameter, with no roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    Jwt,
    Anonymous,
}

/// Which roles may join and publish in the rooms whose name matches `pattern`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RoomRule {
    /// Room name pattern: `*` matches any run of characters, `?` one character.
    pub pattern: String,
    /// Roles of which a client needs one to join (empty: anyone).
    #[serde(default)]
    pub join_roles: Vec<String>,
    /// Roles of which a client needs one to publish (empty: anyone who may join).
    #[serde(default)]
    pub publish_roles: Vec<String>,
}

/// Graceful shutdown on SIGTERM.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct DrainConfig {
    /// Seconds `/readyz` reports not-ready before clients are disconnected, so load balancers
    /// stop sending new clients first.
    pub lb_grace_secs: u64,
    /// Clients disconnected per second with close code 4000 ("reconnect elsewhere"), to spread
    /// the reconnect load over the remaining nodes.
    #[schemars(range(min = 1))]
    pub rate_per_sec: u32,
    /// Seconds after SIGTERM by which the process exits whatever is left.
    #[schemars(range(min = 1))]
    pub deadline_secs: u64,
}

impl Default for DrainConfig {
    fn default() -> Self {
        Self { lb_grace_secs: 0, rate_per_sec: 500, deadline_secs: 25 }
    }
}

/// Moving long-lived connections from busy nodes to idle ones after a scale-out (in a cluster
/// only). While any node is more than `tolerance_percent` from the cluster's mean, the nodes
/// above the mean close connections down to it with close code 4000 and reason `rebalance`;
/// clients reconnect at once and resume where they were. See docs/cluster.md, "Rebalancing".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RebalanceConfig {
    /// Whether busy nodes shed connections at all (on by default).
    pub enabled: bool,
    /// How far from the cluster's mean connection count, above or below, any node may be
    /// before the nodes above the mean shed their excess, in percent.
    #[schemars(range(min = 1, max = 1000))]
    pub tolerance_percent: u32,
    /// Connections one node closes per second at most while it sheds.
    #[schemars(range(min = 1))]
    pub connections_per_sec: u32,
    /// Connections younger than this are never shed, so a client does not bounce between nodes.
    #[schemars(range(max = 86400))]
    pub min_connection_age_secs: u64,
    /// Seconds a node waits after a round of shedding (so the moved clients reconnect and every
    /// node reports its new count) and, doubled, after the cluster's membership changed.
    #[schemars(range(min = 1, max = 3600))]
    pub cooldown_secs: u64,
}

impl Default for RebalanceConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            tolerance_percent: 10,
            connections_per_sec: 100,
            min_connection_age_secs: 60,
            cooldown_secs: 5,
        }
    }
}

/// How nodes find and trust each other. The node runs alone unless `dns_name` or `static_peers`
/// is set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// Address of the peer port (WebSocket `/peer`, for other nodes only). Every node uses the
    /// same port number.
    #[schemars(with = "String")]
    pub peer_listen: SocketAddr,
    /// DNS name whose A/AAAA records are the peers: the headless Service, e.g.
    /// `chat-peers.default.svc.cluster.local`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dns_name: Option<String>,
    /// DNS server to ask (`IP:port`); the system resolver configuration when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub dns_server: Option<SocketAddr>,
    /// Peer ports (`host:port`) to use instead of DNS, for local runs.
    pub static_peers: Vec<String>,
    /// This node's own address, left out of the DNS answers. Defaults to `$POD_IP`, then the
    /// IP of `peer_listen` when it is not a wildcard.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schemars(with = "Option<String>")]
    pub advertise_ip: Option<IpAddr>,
    /// Seconds between DNS lookups.
    #[schemars(range(min = 1))]
    pub discovery_interval_secs: u64,
    /// How many nodes the cluster is meant to have (the operator writes the ChatCluster's
    /// `spec.replicas`). Voters are the lowest ordinals, at most 5; a node has quorum once a
    /// majority of them is linked. Re-read from the config file while the node runs, so a scale
    /// needs no restart.
    #[schemars(range(min = 1))]
    pub size: usize,
    /// This node's ordinal in the cluster (0, 1, …). Defaults to the number after the last `-`
    /// of the node id, as in StatefulSet pod names (`chat-2` → 2).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ordinal: Option<u32>,
    /// Raft groups the rooms are spread over (by a hash of the room name). Each group has its
    /// own leader, so sequencing is spread over the nodes. Fixed for the life of a cluster's
    /// stored data.
    #[schemars(range(min = 1, max = 64))]
    pub partitions: u32,
    /// Where the replicated room logs live: `memory` (a restarted node rejoins as a new member
    /// and copies the logs from its peers) or `disk` (under `data_dir`; a restarted node, or a
    /// whole cluster, comes back with every room's history).
    pub storage: StorageMode,
    /// Directory of the on-disk room logs (`storage = "disk"`); the operator mounts the
    /// ChatCluster's volume here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,
    /// The pod template revision this node runs (the operator sets `CHAT_CLUSTER__REVISION` from
    /// the pod's `controller-revision-hash`). Nodes on different revisions mean a rollout is under
    /// way, and rebalancing waits for it to end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// File holding the shared cluster secret (the operator mounts the peer Secret here).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret_file: Option<PathBuf>,
    /// The shared cluster secret inline; prefer `secret_file` or `CHAT_CLUSTER__SECRET`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    /// Milliseconds between heartbeats on a peer link.
    #[schemars(range(min = 50))]
    pub heartbeat_ms: u64,
    /// Milliseconds without a frame after which a peer link counts as dead.
    #[schemars(range(min = 200))]
    pub peer_timeout_ms: u64,
    /// Milliseconds between a Raft leader's heartbeats to its followers.
    #[schemars(range(min = 10))]
    pub raft_heartbeat_ms: u64,
    /// Milliseconds a follower waits without hearing from its leader before it stands for
    /// election (randomized between this and twice this). Must exceed 3 × `raft_heartbeat_ms`.
    #[schemars(range(min = 50))]
    pub election_timeout_ms: u64,
    /// Milliseconds a client's publish waits for the room owner's answer before it gets error
    /// `unavailable` (the message may still have been stored).
    #[schemars(range(min = 100))]
    pub publish_timeout_ms: u64,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            peer_listen: SocketAddr::from(([0, 0, 0, 0], 8081)),
            dns_name: None,
            dns_server: None,
            static_peers: Vec::new(),
            advertise_ip: None,
            discovery_interval_secs: 5,
            size: 1,
            ordinal: None,
            partitions: 8,
            storage: StorageMode::Memory,
            data_dir: None,
            revision: None,
            secret_file: None,
            secret: None,
            heartbeat_ms: 1000,
            peer_timeout_ms: 5000,
            raft_heartbeat_ms: 50,
            election_timeout_ms: 200,
            publish_timeout_ms: 5000,
        }
    }
}

/// Where a node keeps its replicated room logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StorageMode {
    Memory,
    Disk,
}

impl ClusterConfig {
    /// Whether this node looks for peers at all.
    pub fn enabled(&self) -> bool {
        self.dns_name.is_some() || !self.static_peers.is_empty()
    }

    /// This node's ordinal: `ordinal`, else the number ending `node_id` (`chat-2` → 2).
    pub fn ordinal_of(&self, node_id: &str) -> Option<u32> {
        self.ordinal.or_else(|| node_id.rsplit_once('-').and_then(|(_, n)| n.parse().ok()))
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.enabled() {
            return Ok(());
        }
        check_secret(
            ("cluster.secret_file", &self.secret_file),
            ("cluster.secret", &self.secret),
            "required when peers are configured (or set cluster.secret / CHAT_CLUSTER__SECRET)",
        )?;
        if self.size == 0 {
            return Err(invalid("cluster.size", "must be at least 1"));
        }
        if !(1..=64).contains(&self.partitions) {
            return Err(invalid("cluster.partitions", "must be between 1 and 64"));
        }
        if self.storage == StorageMode::Disk && self.data_dir.is_none() {
            return Err(invalid("cluster.data_dir", "required when cluster.storage is \"disk\""));
        }
        if self.raft_heartbeat_ms < 10 {
            return Err(invalid("cluster.raft_heartbeat_ms", "must be at least 10"));
        }
        if self.election_timeout_ms <= self.raft_heartbeat_ms * 3 {
            return Err(invalid("cluster.election_timeout_ms", "must be more than 3 × cluster.raft_heartbeat_ms"));
        }
        if self.discovery_interval_secs == 0 {
            return Err(invalid("cluster.discovery_interval_secs", "must be at least 1"));
        }
        if self.heartbeat_ms < 50 {
            return Err(invalid("cluster.heartbeat_ms", "must be at least 50"));
        }
        if self.peer_timeout_ms <= self.heartbeat_ms * 2 {
            return Err(invalid("cluster.peer_timeout_ms", "must be more than twice cluster.heartbeat_ms"));
        }
        if self.publish_timeout_ms < 100 {
            return Err(invalid("cluster.publish_timeout_ms", "must be at least 100"));
        }
        if let Some((i, _)) = self
            .static_peers
            .iter()
            .enumerate()
            .find(|(_, p)| p.rsplit_once(':').is_none_or(|(h, port)| h.is_empty() || port.parse::<u16>().is_err()))
        {
            return Err(invalid(&format!("cluster.static_peers[{i}]"), "must be host:port"));
        }
        Ok(())
    }
}

/// Log output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    pub format: LogFormat,
    /// `tracing` filter directives, e.g. `info` or `chat_node=debug`; `RUST_LOG` wins if set.
    pub filter: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { format: LogFormat::Human, filter: "info".to_owned() }
    }
}

/// `human`: readable lines; `json`: one JSON object per line, for log collectors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Human,
    Json,
}

/// A config value that parses but cannot work, named by its dotted path.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid config: {field}: {message}")]
pub struct ConfigError {
    pub field: String,
    pub message: String,
}

fn invalid(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError { field: field.to_owned(), message: message.into() }
}

/// The shortest server API key accepted (a guessable key would open the API to anyone on the
/// pod network).
pub const MIN_API_KEY_CHARS: usize = 16;

/// What `check-config` prints in place of an inline secret.
pub const REDACTED: &str = "<redacted>";

impl NodeConfig {
    /// The config with inline secrets replaced by [`REDACTED`], fit to print or log.
    pub fn redacted(&self) -> NodeConfig {
        let mut shown = self.clone();
        for secret in [&mut shown.auth.jwt_secret, &mut shown.cluster.secret] {
            if secret.is_some() {
                *secret = Some(REDACTED.to_owned());
            }
        }
        for key in &mut shown.admin.api_keys {
            *key = REDACTED.to_owned();
        }
        shown
    }

    /// Checks what the types cannot express; the first problem found is returned.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(short) = self.admin.api_keys.iter().find(|k| k.trim().len() < MIN_API_KEY_CHARS) {
            return Err(invalid(
                "admin.api_keys",
                format!(
                    "every key must be at least {MIN_API_KEY_CHARS} characters ({} has {})",
                    REDACTED,
                    short.trim().len()
                ),
            ));
        }
        let l = &self.limits;
        let positive = [
            ("limits.max_connections", l.max_connections as u64),
            ("limits.max_rooms_per_connection", l.max_rooms_per_connection as u64),
            ("limits.max_rooms", l.max_rooms as u64),
            ("limits.max_connections_per_user", l.max_connections_per_user as u64),
            ("limits.publish_rate_per_sec", u64::from(l.publish_rate_per_sec)),
            ("limits.publish_burst", u64::from(l.publish_burst)),
            ("limits.rate_limit_strikes", u64::from(l.rate_limit_strikes)),
            ("limits.ping_interval_secs", l.ping_interval_secs),
            ("limits.handshake_timeout_secs", l.handshake_timeout_secs),
            ("limits.write_timeout_secs", l.write_timeout_secs),
            ("history.empty_room_ttl_secs", self.history.empty_room_ttl_secs),
            ("drain.rate_per_sec", u64::from(self.drain.rate_per_sec)),
            ("drain.deadline_secs", self.drain.deadline_secs),
            ("rebalance.tolerance_percent", u64::from(self.rebalance.tolerance_percent)),
            ("rebalance.connections_per_sec", u64::from(self.rebalance.connections_per_sec)),
            ("rebalance.cooldown_secs", self.rebalance.cooldown_secs),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err(invalid(field, "must be at least 1"));
        }
        if l.max_connections_per_ip == Some(0) {
            return Err(invalid("limits.max_connections_per_ip", "must be at least 1 (leave it unset for no cap)"));
        }
        let (frame_rate, frame_burst) = l.frame_budget();
        if frame_rate < l.publish_rate_per_sec || frame_burst < l.publish_burst {
            let field =
                if frame_rate < l.publish_rate_per_sec { "limits.frame_rate_per_sec" } else { "limits.frame_burst" };
            return Err(invalid(field, "must not be below the publish rate and burst (every publish is a frame)"));
        }
        if !(256..=16 * 1024 * 1024).contains(&l.max_message_bytes) {
            return Err(invalid("limits.max_message_bytes", "must be between 256 and 16777216"));
        }
        if l.outbound_queue_frames < 16 {
            return Err(invalid("limits.outbound_queue_frames", "must be at least 16"));
        }
        if l.outbound_queue_bytes < 4096 {
            return Err(invalid("limits.outbound_queue_bytes", "must be at least 4096"));
        }
        if !(512..=1024 * 1024).contains(&l.ws_read_buffer_bytes) {
            return Err(invalid("limits.ws_read_buffer_bytes", "must be between 512 and 1048576"));
        }
        if l.ws_write_buffer_bytes > 1024 * 1024 {
            return Err(invalid("limits.ws_write_buffer_bytes", "must be at most 1048576"));
        }
        if l.idle_timeout_secs <= l.ping_interval_secs {
            return Err(invalid(
                "limits.idle_timeout_secs",
                format!("must be greater than limits.ping_interval_secs ({})", l.ping_interval_secs),
            ));
        }
        let r = &self.rebalance;
        for (field, value, max) in [
            ("rebalance.tolerance_percent", u64::from(r.tolerance_percent), 1000),
            ("rebalance.cooldown_secs", r.cooldown_secs, 3600),
            ("rebalance.min_connection_age_secs", r.min_connection_age_secs, 86_400),
        ] {
            if value > max {
                return Err(invalid(field, format!("must be at most {max}")));
            }
        }
        if self.history.size > 100_000 {
            return Err(invalid("history.size", "must be at most 100000"));
        }
        if self.drain.lb_grace_secs >= self.drain.deadline_secs {
            return Err(invalid("drain.lb_grace_secs", "must be less than drain.deadline_secs"));
        }
        if let Some(id) = &self.node_id
            && (id.is_empty() || id.len() > 253)
        {
            return Err(invalid("node_id", "must be 1 to 253 characters"));
        }
        let mut ports = vec![("listen", self.listen), ("admin.listen", self.admin.listen)];
        if self.cluster.enabled() {
            ports.push(("cluster.peer_listen", self.cluster.peer_listen));
        }
        for (i, (field, addr)) in ports.iter().enumerate() {
            if let Some((other, _)) = ports[..i].iter().find(|(_, earlier)| same_socket(*earlier, *addr)) {
                return Err(invalid(field, format!("must not be the same port as {other} ({addr})")));
            }
        }
        match (&self.tls.cert_file, &self.tls.key_file) {
            (Some(_), None) => return Err(invalid("tls.key_file", "required with tls.cert_file")),
            (None, Some(_)) => return Err(invalid("tls.cert_file", "required with tls.key_file")),
            _ => {}
        }
        self.auth.validate()?;
        self.cluster.validate()
    }
}

/// Whether binding both would collide: the same port on the same address or a wildcard.
fn same_socket(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port() && a.port() != 0 && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// A secret is given either as a file or inline (then at least 16 bytes), never both.
fn check_secret(
    (file_field, file): (&str, &Option<PathBuf>),
    (inline_field, inline): (&str, &Option<String>),
    missing: &str,
) -> Result<(), ConfigError> {
    match (file, inline) {
        (None, None) => Err(invalid(file_field, missing)),
        (Some(_), Some(_)) => {
            Err(invalid(inline_field, format!("set either {inline_field} or {file_field}, not both")))
        }
        (None, Some(secret)) if secret.len() < 16 => Err(invalid(inline_field, "must be at least 16 bytes")),
        _ => Ok(()),
    }
}

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.mode == AuthMode::Jwt {
            check_secret(
                ("auth.jwt_secret_file", &self.jwt_secret_file),
                ("auth.jwt_secret", &self.jwt_secret),
                "required when auth.mode is \"jwt\" (or set auth.jwt_secret / CHAT_AUTH__JWT_SECRET, or use auth.mode = \"anonymous\" for local development)",
            )?;
        }
        for (i, rule) in self.rooms.iter().enumerate() {
            if rule.pattern.is_empty() {
                return Err(invalid(&format!("auth.rooms[{i}].pattern"), "must not be empty"));
            }
        }
        Ok(())
    }
}

/// JSON Schema of [`NodeConfig`], as embedded in the ChatCluster CRD.
pub fn json_schema() -> schemars::Schema {
    schemars::schema_for!(NodeConfig)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anonymous() -> NodeConfig {
        let mut cfg = NodeConfig::default();
        cfg.auth.mode = AuthMode::Anonymous;
        cfg
    }

    #[test]
    fn defaults_require_a_jwt_key() {
        let err = NodeConfig::default().validate().unwrap_err();
        assert_eq!(err.field, "auth.jwt_secret_file");
        assert!(anonymous().validate().is_ok());
    }

    #[test]
    fn idle_timeout_must_exceed_ping_interval() {
        let mut cfg = anonymous();
        cfg.limits.idle_timeout_secs = cfg.limits.ping_interval_secs;
        assert_eq!(cfg.validate().unwrap_err().field, "limits.idle_timeout_secs");
    }

    #[test]
    fn the_ports_must_not_collide() {
        let mut cfg = anonymous();
        cfg.admin.listen = "127.0.0.1:8080".parse().unwrap();
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.field, "admin.listen", "the wildcard client port takes 8080 on every address: {err}");
        cfg.listen = "127.0.0.2:8080".parse().unwrap();
        assert!(cfg.validate().is_ok(), "the same port on two addresses is fine");
        cfg.cluster.static_peers = vec!["127.0.0.3:8081".into()];
        cfg.cluster.secret = Some("0123456789abcdef".into());
        cfg.cluster.peer_listen = "0.0.0.0:9090".parse().unwrap();
        cfg.admin.listen = "0.0.0.0:9090".parse().unwrap();
        assert_eq!(cfg.validate().unwrap_err().field, "cluster.peer_listen");
    }

    #[test]
    fn zero_limits_are_named() {
        let mut cfg = anonymous();
        cfg.limits.publish_burst = 0;
        let err = cfg.validate().unwrap_err();
        assert_eq!(err.to_string(), "invalid config: limits.publish_burst: must be at least 1");
    }

    #[test]
    fn toml_round_trip_and_unknown_fields() {
        let cfg: NodeConfig = toml::from_str(
            "listen = \"127.0.0.1:9000\"\n[auth]\nmode = \"anonymous\"\n[[auth.rooms]]\npattern = \"ops-*\"\njoin_roles = [\"ops\"]\n",
        )
        .unwrap();
        assert_eq!(cfg.listen.port(), 9000);
        assert_eq!(cfg.auth.rooms[0].join_roles, vec!["ops".to_owned()]);
        let again: NodeConfig = toml::from_str(&toml::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(cfg, again);
        let err = toml::from_str::<NodeConfig>("lissen = \"x\"").unwrap_err();
        assert!(err.to_string().contains("lissen"), "{err}");
    }

    #[test]
    fn peers_need_a_secret() {
        let mut cfg = anonymous();
        cfg.cluster.static_peers = vec!["127.0.0.3:8081".into()];
        assert_eq!(cfg.validate().unwrap_err().field, "cluster.secret_file");
        cfg.cluster.secret = Some("0123456789abcdef".into());
        assert!(cfg.validate().is_ok());
        cfg.cluster.static_peers.push("no-port".into());
        assert_eq!(cfg.validate().unwrap_err().field, "cluster.static_peers[1]");
    }

    #[test]
    fn schema_describes_fields() {
        let schema = serde_json::to_value(json_schema()).unwrap();
        let text = schema.to_string();
        assert!(text.contains("max_message_bytes"));
        assert!(text.contains("Messages kept per room"));
    }
}
