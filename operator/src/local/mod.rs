//! Local mode: `chat-operator local manifest.yaml` runs the ChatCluster a manifest describes on
//! this machine, without Kubernetes. The operator's own validation and builders decide the node
//! config, assets, keys and rollout revision (see [`plan`]); this module plays the parts
//! Kubernetes plays: a StatefulSet controller (start nodes `<name>-0 …`, roll them one at a time
//! on a revision change, scale), the kubelet (files for the pod's mounts, the `..data` swap of
//! the assets, readiness probes, SIGTERM then SIGKILL after the grace period) and CoreDNS (the
//! headless peer Service's A records, see [`dns`]).

mod atomic;
mod balance;
pub mod dns;
pub mod manifest;
mod node;
pub mod plan;
mod step;

use std::collections::BTreeMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::RngCore;
use serde::Serialize;
use tokio::sync::{Notify, watch};

use crate::reconcile::validate::{Invalid, PEER_KEY_BYTES};
use chat_node::config::NodeConfig;
use dns::{DnsError, DnsServer};
use manifest::{Manifest, ManifestError, SecretValue};
use node::{Launch, Node};
use plan::{Addressing, Desired, Layout, NodeAddr, Peers};
use step::Step;

/// First node address when `--first-ip` is not given: clear of 127.0.0.1, where other local
/// services usually listen.
pub const DEFAULT_FIRST_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 10);
pub const DEFAULT_BASE_PORT: u16 = 8080;
/// Longest pause between restarts of a crashing node (kubelet's is 5 minutes; local runs want
/// to see a fix sooner).
const MAX_CRASH_BACKOFF: Duration = Duration::from_secs(30);

/// What `chat-operator local` was asked to do.
#[derive(Clone, Debug)]
pub struct Options {
    pub manifest: PathBuf,
    /// Which ChatCluster, when the manifest holds several.
    pub cluster: Option<String>,
    /// Secret keys the manifest references but does not contain.
    pub secrets: Vec<SecretValue>,
    /// Kept after exit; `None`: a temporary directory, removed on exit.
    pub state_dir: Option<PathBuf>,
    pub node_binary: Option<PathBuf>,
    /// `None`: [`DEFAULT_FIRST_IP`], or 127.0.0.1 with distinct ports where that is not usable.
    pub first_ip: Option<Ipv4Addr>,
    pub base_port: u16,
    /// All nodes on 127.0.0.1 with distinct ports and static peer lists, even where other
    /// loopback addresses work.
    pub single_ip: bool,
    /// How often the manifest is read for changes.
    pub poll_interval: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("the manifest is invalid ({}): {}; the operator would set Degraded=True{}", .0.reason, .0.message, hint(.0))]
    Invalid(Invalid),
    #[error(
        "no chat-node binary next to {beside} or on PATH: build it (`cargo build --release`) or pass --node-binary"
    )]
    NodeBinary { beside: String },
    #[error("{what} {path}: {source}")]
    Io { what: &'static str, path: PathBuf, source: io::Error },
    #[error("{addr} is not available ({source}); choose other addresses with --first-ip or --base-port")]
    AddressInUse { addr: SocketAddr, source: io::Error },
    #[error("{ip} cannot be used on this machine ({source})")]
    Unassignable { ip: Ipv4Addr, source: io::Error },
    #[error("node {ordinal} has no address: the ports or addresses after --first-ip/--base-port ran out")]
    NoAddress { ordinal: u32 },
    #[error("starting {node}: {source}")]
    Spawn { node: String, source: io::Error },
    #[error(transparent)]
    Dns(#[from] DnsError),
}

/// What to do about a reference that only a cluster could resolve.
fn hint(invalid: &Invalid) -> &'static str {
    match invalid.reason {
        "SecretNotFound" | "SecretKeyNotFound" => {
            " (add a `kind: Secret` document to the manifest, or pass --secret NAME/KEY=VALUE)"
        }
        "ConfigMapNotFound" => " (add a `kind: ConfigMap` document to the manifest)",
        "StorageImmutable" => " (locally: stop local mode and start it again with the new spec.storage)",
        _ => "",
    }
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

/// Runs the cluster until `shutdown` resolves, then drains and stops every node; once
/// `force_signal` resolves, nodes still draining are killed.
///
/// Must run on the thread that lives longest (e.g. directly in `main`'s `block_on`, not in a
/// spawned task): nodes are asked to drain when the thread that started them ends.
pub async fn run(
    options: Options,
    shutdown: impl Future<Output = ()> + Send + 'static,
    force_signal: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let (stop_tx, stop) = watch::channel(false);
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let (force_tx, force) = watch::channel(false);
    tokio::spawn(async move {
        force_signal.await;
        tracing::warn!("killing the nodes without waiting for their drain");
        let _ = force_tx.send(true);
    });

    let text = std::fs::read_to_string(&options.manifest).map_err(io_error("reading", &options.manifest))?;
    let manifest = manifest::parse(&text, options.cluster.as_deref(), &options.secrets)?;
    let peer_key = fresh_peer_key();
    let desired = plan::desired(&manifest, &peer_key, None).map_err(Error::Invalid)?;
    let binary = node_binary(options.node_binary.as_deref())?;

    let (root, temp) = match &options.state_dir {
        Some(dir) => (dir.clone(), None),
        None => {
            let temp = tempfile::Builder::new()
                .prefix("chatcluster-local-")
                .tempdir()
                .map_err(io_error("creating a state directory in", &std::env::temp_dir()))?;
            (temp.path().to_path_buf(), Some(temp))
        }
    };
    std::fs::create_dir_all(&root).map_err(io_error("creating", &root))?;
    let layout = Layout { root: std::fs::canonicalize(&root).map_err(io_error("resolving", &root))? };
    remove_stale_data(&layout, &desired)?;

    let addressing = addressing(&options)?;
    let dns = match addressing {
        Addressing::PerNodeIp { .. } => Some(DnsServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), &desired.peer_dns)?),
        Addressing::SharedIp { .. } => None,
    };
    for ordinal in 0..desired.replicas {
        let addr = addressing.node(ordinal).ok_or(Error::NoAddress { ordinal })?;
        for socket in [addr.client, addr.peer, addr.admin] {
            std::net::TcpListener::bind(socket).map_err(|source| Error::AddressInUse { addr: socket, source })?;
        }
    }

    tracing::info!(
        cluster = %format!("{}/{}", desired.namespace, desired.name),
        replicas = desired.replicas,
        state = %layout.root.display(),
        node = %binary.display(),
        "starting the cluster locally"
    );
    let kept = if temp.is_some() { "removed on exit; pass --state-dir to keep it" } else { "kept" };
    println!("state directory: {} ({kept}); Ctrl-C drains and stops every node", layout.root.display());
    println!("node logs: {}", layout.node_log(&format!("{}-<ordinal>", desired.name)).display());
    match &dns {
        Some(dns) => println!("peer DNS: {} answers {}", dns.addr(), desired.peer_dns),
        None => println!("all nodes share 127.0.0.1: peers are listed in each node's config (no DNS)"),
    }

    let mut supervisor = Supervisor {
        binary,
        layout,
        addressing,
        dns,
        peer_key,
        manifest_path: options.manifest.clone(),
        pick: options.cluster.clone(),
        secrets: options.secrets.clone(),
        manifest_text: text,
        manifest_problem: None,
        desired,
        slots: BTreeMap::new(),
        crashes: BTreeMap::new(),
        changed: Arc::new(Notify::new()),
        last_rolled: None,
        printed: Vec::new(),
        status: String::new(),
        on_delete_noted: None,
        force,
        balance: Arc::default(),
    };
    tokio::spawn(supervisor.balance.clone().run(stop.clone()));
    supervisor.write_shared_files(None)?;
    let result = supervisor.run(options.poll_interval, stop).await;
    supervisor.stop_all().await;
    drop(temp);
    result
}

fn fresh_peer_key() -> Vec<u8> {
    // Like the operator's generated peer Secret: 32 random bytes as hex, once per run.
    let mut random = [0u8; PEER_KEY_BYTES];
    rand::rng().fill_bytes(&mut random);
    random.iter().map(|b| format!("{b:02x}")).collect::<String>().into_bytes()
}

/// `--node-binary`, else `chat-node` next to this executable (the same cargo target folder),
/// else the first one on `PATH`.
fn node_binary(given: Option<&Path>) -> Result<PathBuf, Error> {
    if let Some(path) = given {
        return Ok(path.to_path_buf());
    }
    let exe = std::env::current_exe().ok();
    let beside = exe.as_deref().and_then(Path::parent).map(|dir| dir.join("chat-node"));
    if let Some(path) = beside.as_ref().filter(|p| p.is_file()) {
        return Ok(path.clone());
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).map(|dir| dir.join("chat-node")).find(|p| p.is_file()));
    on_path.flatten().ok_or_else(|| Error::NodeBinary {
        beside: beside.and_then(|p| p.parent().map(|d| d.display().to_string())).unwrap_or_default(),
    })
}

/// One loopback address per node where the machine allows it (Linux routes all of 127.0.0.0/8
/// to `lo`; macOS only has 127.0.0.1 unless aliases are added).
fn addressing(options: &Options) -> Result<Addressing, Error> {
    let peer_port = options.base_port.checked_add(1).ok_or(Error::NoAddress { ordinal: 0 })?;
    let admin_port = options.base_port.checked_add(2).ok_or(Error::NoAddress { ordinal: 0 })?;
    let shared = Addressing::SharedIp { ip: Ipv4Addr::LOCALHOST, base_port: options.base_port };
    if options.single_ip {
        return Ok(shared);
    }
    let first = options.first_ip.unwrap_or(DEFAULT_FIRST_IP);
    match std::net::TcpListener::bind((first, 0)) {
        Ok(_) => Ok(Addressing::PerNodeIp { first, client_port: options.base_port, peer_port, admin_port }),
        Err(source) if options.first_ip.is_some() => Err(Error::Unassignable { ip: first, source }),
        Err(err) => {
            tracing::warn!(%first, %err, "cannot use other loopback addresses here; all nodes share 127.0.0.1");
            Ok(shared)
        }
    }
}

/// A StatefulSet ordinal: a running node, or one waiting to be restarted after a crash.
// A handful of slots at most, so the size difference between the variants costs nothing.
#[allow(clippy::large_enum_variant)]
enum Slot {
    Running(Node),
    Crashed { retry_at: Instant, revision: String },
}

struct Supervisor {
    binary: PathBuf,
    layout: Layout,
    addressing: Addressing,
    dns: Option<DnsServer>,
    peer_key: Vec<u8>,
    manifest_path: PathBuf,
    pick: Option<String>,
    secrets: Vec<SecretValue>,
    /// The manifest as last read, to notice changes.
    manifest_text: String,
    /// The last problem reported, so it is reported once rather than on every poll.
    manifest_problem: Option<String>,
    desired: Desired,
    slots: BTreeMap<u32, Slot>,
    /// Consecutive crashes per ordinal, for the restart back-off.
    crashes: BTreeMap<u32, u32>,
    /// Notified when a node's readiness changes.
    changed: Arc<Notify>,
    /// The node restarted last by a rollout, which must be ready for `minReadySeconds` before
    /// the next one goes.
    last_rolled: Option<u32>,
    /// The URL table printed last.
    printed: Vec<(String, String, String)>,
    /// The status file as written last.
    status: String,
    /// The revision for which "OnDelete: not rolling" was logged.
    on_delete_noted: Option<String>,
    /// Set when draining nodes are to be killed at once.
    force: watch::Receiver<bool>,
    /// Asks the nodes whether they are rebalancing.
    balance: Arc<balance::BalanceWatch>,
}

impl Supervisor {
    async fn run(&mut self, poll: Duration, mut stop: watch::Receiver<bool>) -> Result<(), Error> {
        let mut first = true;
        let mut last_poll = Instant::now();
        while !*stop.borrow() {
            if last_poll.elapsed() >= poll {
                last_poll = Instant::now();
                self.poll_manifest();
            }
            self.reap();
            match self.next_step() {
                Step::Resize(ordinals) => self.resize(&ordinals),
                Step::ScaleDown(ordinal) => self.scale_down(ordinal).await,
                Step::Start(ordinals) => {
                    let started = self.start(&ordinals);
                    // Failing to start the first nodes is an error of the invocation (wrong
                    // binary, say); later it is a crash like any other and is retried.
                    if first {
                        started?;
                    } else if let Err(err) = started {
                        tracing::error!(%err, "could not start a node; retrying");
                    }
                }
                Step::Roll(ordinal) => self.roll(ordinal).await,
                Step::Idle => {
                    let wait = poll.saturating_sub(last_poll.elapsed());
                    tokio::select! {
                        _ = stop.changed() => {}
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.changed.notified() => {}
                    }
                }
            }
            self.report();
            first = false;
        }
        tracing::info!("stopping: draining every node");
        Ok(())
    }

    // ---------- desired state ----------

    /// Re-reads the manifest; a valid change becomes the desired state, an invalid one is
    /// reported and changes nothing (as the operator's Degraded condition).
    fn poll_manifest(&mut self) {
        let text = match std::fs::read_to_string(&self.manifest_path) {
            Ok(text) => text,
            Err(err) => {
                // Editors may replace the file in two steps; keep running what we have.
                self.problem(format!("cannot read {}: {err}", self.manifest_path.display()));
                return;
            }
        };
        if text == self.manifest_text {
            return;
        }
        self.manifest_text = text;
        match self.load(&self.manifest_text) {
            Ok(desired) => {
                if self.manifest_problem.take().is_some() {
                    tracing::info!("the manifest is valid again");
                }
                self.apply(desired);
            }
            Err(err) => self.problem(format!("{err}; the running cluster is unchanged")),
        }
    }

    fn load(&self, text: &str) -> Result<Desired, Error> {
        let manifest: Manifest = manifest::parse(text, self.pick.as_deref(), &self.secrets)?;
        if manifest.name() != self.desired.name || manifest.namespace() != self.desired.namespace {
            return Err(ManifestError::Renamed {
                old: format!("{}/{}", self.desired.namespace, self.desired.name),
                new: format!("{}/{}", manifest.namespace(), manifest.name()),
            }
            .into());
        }
        plan::desired(&manifest, &self.peer_key, Some(&self.desired.statefulset)).map_err(Error::Invalid)
    }

    fn problem(&mut self, message: String) {
        if self.manifest_problem.as_ref() != Some(&message) {
            tracing::error!("{message}");
            self.manifest_problem = Some(message);
        }
    }

    fn apply(&mut self, desired: Desired) {
        let old = std::mem::replace(&mut self.desired, desired);
        let new = &self.desired;
        if old.replicas < new.replicas {
            tracing::info!(from = old.replicas, to = new.replicas, "scaling up");
        } else if old.replicas > new.replicas {
            tracing::info!(from = old.replicas, to = new.replicas, "scaling down, one node at a time");
        }
        if old.revision != new.revision {
            let how = if new.rolling {
                "rolling the nodes one at a time"
            } else {
                "OnDelete: nodes keep theirs until restarted"
            };
            tracing::info!(from = %old.revision, to = %new.revision, "config changed; {how}");
        }
        if let Err(err) = self.write_shared_files(Some(&old)) {
            tracing::error!(%err, "could not write the cluster's files");
        }
    }

    /// The files of the pod's mounts that all nodes share: peer key, JWT key, TLS certificate,
    /// assets. Assets and the certificate change in place (the running nodes use them at once);
    /// keys are read at start, so a new key only reaches nodes as the rollout restarts them.
    fn write_shared_files(&self, old: Option<&Desired>) -> Result<(), Error> {
        let desired = &self.desired;
        if old.is_none() {
            write_private(&self.layout.peer_key_file(), &desired.peer_key)?;
        }
        if let Some((key, value)) = &desired.auth_key
            && old.is_none_or(|old| old.auth_key.as_ref() != desired.auth_key.as_ref())
        {
            write_private(&self.layout.auth_key_file(key), value)?;
        }
        // The nodes read the API keys again when the file changes: no restart.
        if let Some((key, value)) = &desired.api_keys
            && old.is_none_or(|old| old.api_keys.as_ref() != desired.api_keys.as_ref())
        {
            write_private(&self.layout.api_keys_file(key), value)?;
        }
        // The nodes read a renewed certificate at their next handshake: no restart.
        if let Some(files) = &desired.tls_files
            && old.is_none_or(|old| old.tls_files.as_ref() != Some(files))
        {
            for (name, content) in files {
                write_private(&self.layout.tls_file(name), content)?;
            }
            if old.is_some() {
                tracing::info!("TLS certificate updated in place (no restart)");
            }
        }
        let dir = self.layout.assets_dir();
        let changed = atomic::write(&dir, &desired.assets).map_err(io_error("writing assets to", &dir))?;
        if changed && old.is_some() {
            tracing::info!(files = desired.assets.len(), "assets updated in place (no restart)");
        }
        Ok(())
    }

    // ---------- the StatefulSet controller ----------

    fn peers(&self) -> Peers {
        match &self.dns {
            Some(dns) => Peers::Dns(dns.addr()),
            None => Peers::Static(
                (0..self.desired.replicas)
                    .filter_map(|i| self.addressing.node(i))
                    .map(|a| a.peer.to_string())
                    .collect(),
            ),
        }
    }

    /// The config node `ordinal` should run with now.
    fn node_config(&self, ordinal: u32, addr: &NodeAddr) -> NodeConfig {
        plan::node_config(&self.desired, ordinal, addr, &self.peers(), &self.layout)
    }

    fn outdated(&self, ordinal: u32, node: &Node) -> bool {
        node.revision != self.desired.revision
            || plan::needs_restart(&node.config, &self.node_config(ordinal, &node.addr))
    }

    fn next_step(&mut self) -> Step {
        let now = Instant::now();
        let views = self
            .slots
            .iter()
            .map(|(&i, slot)| {
                let view = match slot {
                    Slot::Running(node) => step::Slot::Running {
                        ready: node.is_ready(),
                        ready_long_enough: node.ready_since().is_some_and(|t| t.elapsed() >= self.desired.min_ready),
                        outdated: self.outdated(i, node),
                        size_stale: node.size != self.desired.config.cluster.size,
                    },
                    // A node that crashed with an older config may well be fixed by the new one.
                    Slot::Crashed { retry_at, revision } => {
                        step::Slot::Crashed { restart_now: *retry_at <= now || *revision != self.desired.revision }
                    }
                };
                (i, view)
            })
            .collect();
        let next = step::next(self.desired.replicas, self.desired.rolling, &views, self.last_rolled);
        let outdated = views.values().filter(|v| matches!(v, step::Slot::Running { outdated: true, .. })).count();
        if next == Step::Idle
            && !self.desired.rolling
            && outdated > 0
            && self.on_delete_noted.as_ref() != Some(&self.desired.revision)
        {
            tracing::info!(nodes = outdated, "rollout strategy OnDelete: outdated nodes are not restarted");
            self.on_delete_noted = Some(self.desired.revision.clone());
        }
        next
    }

    /// Writes the new `cluster.size` into running nodes' configs, which they re-read: a scale
    /// restarts nobody. Only the size changes in the file; anything else that changed waits for
    /// the node's restart, as it would in a pod.
    fn resize(&mut self, ordinals: &[u32]) {
        let size = self.desired.config.cluster.size;
        for ordinal in ordinals {
            let Some(Slot::Running(node)) = self.slots.get_mut(ordinal) else { continue };
            let mut cfg = node.config.clone();
            cfg.cluster.size = size;
            let path = self.layout.node_config(&node.name);
            let written = toml::to_string(&cfg)
                .map_err(io::Error::other)
                .and_then(|text| atomic::write_file(&path, text.as_bytes()));
            match written {
                Ok(()) => tracing::info!(node = %node.name, size, "cluster size updated in place (no restart)"),
                // The node keeps its old size; trying again on every step would only repeat this.
                Err(err) => tracing::error!(node = %node.name, %err, "could not update the cluster size"),
            }
            node.size = size;
        }
    }

    /// Starts these ordinals (all at once: the operator's StatefulSet is `Parallel`).
    fn start(&mut self, ordinals: &[u32]) -> Result<(), Error> {
        for &ordinal in ordinals {
            match self.spawn(ordinal) {
                Ok(node) => {
                    tracing::info!(node = %node.name, pid = node.pid, url = %node.url(), "started");
                    self.slots.insert(ordinal, Slot::Running(node));
                }
                Err(err) => {
                    let count = self.crashes.entry(ordinal).or_insert(0);
                    *count += 1;
                    self.slots.insert(ordinal, crashed(*count, self.desired.revision.clone()));
                    return Err(err);
                }
            }
        }
        Ok(())
    }

    fn spawn(&self, ordinal: u32) -> Result<Node, Error> {
        let desired = &self.desired;
        let name = desired.node_name(ordinal);
        let addr = self.addressing.node(ordinal).ok_or(Error::NoAddress { ordinal })?;
        let config = self.node_config(ordinal, &addr);
        let dir = self.layout.node_dir(&name);
        std::fs::create_dir_all(&dir).map_err(io_error("creating", &dir))?;
        if let Some(data) = &config.cluster.data_dir {
            create_private_dir(data)?;
        }
        let path = self.layout.node_config(&name);
        let text = toml::to_string(&config).map_err(|e| io_error("rendering", &path)(io::Error::other(e)))?;
        atomic::write_file(&path, text.as_bytes()).map_err(io_error("writing", &path))?;
        // In DNS as soon as it exists, ready or not: the peer Service publishes not-ready
        // addresses, and a starting node needs its peers to find it before it can be ready.
        if let Some(dns) = &self.dns {
            dns.add_record(addr.ip);
        }
        let launch = Launch {
            binary: &self.binary,
            args: plan::node_args(&desired.container, &self.layout, &name),
            env: plan::node_env(&desired.container, &name, &desired.namespace, addr.ip, &desired.revision),
            log: self.layout.node_log(&name),
        };
        append_log_marker(&launch.log, &format!("starting {name}, revision {}", desired.revision));
        Node::spawn(launch, name.clone(), addr, desired.revision.clone(), config, self.changed.clone())
            .map_err(|source| Error::Spawn { node: name, source })
    }

    /// One scale-down step: the highest node is drained as the kubelet would (SIGTERM, then its
    /// grace period) and its data removed, as the StatefulSet's `whenScaled: Delete` does with
    /// its volume, so it never comes back later with stale state. The next step waits (in
    /// [`step::next`]) until every node that stays is ready.
    async fn scale_down(&mut self, ordinal: u32) {
        self.stop_nodes(vec![ordinal], "scaling down").await;
        let data = self.layout.node_data(&self.desired.node_name(ordinal));
        match std::fs::remove_dir_all(&data) {
            Ok(()) => tracing::info!(data = %data.display(), "removed the data of the scaled-away node"),
            Err(err) if err.kind() == io::ErrorKind::NotFound => {}
            Err(err) => tracing::error!(data = %data.display(), %err, "could not remove the scaled-away node's data"),
        }
    }

    /// Out of DNS first, so no peer dials them any more, then drained all at once.
    async fn stop_nodes(&mut self, ordinals: Vec<u32>, why: &str) {
        let mut draining = Vec::new();
        for ordinal in ordinals {
            self.crashes.remove(&ordinal);
            if let Some(Slot::Running(node)) = self.slots.remove(&ordinal) {
                if let Some(dns) = &self.dns {
                    dns.remove_record(node.addr.ip);
                }
                tracing::info!(node = %node.name, pid = node.pid, "{why}: draining");
                draining.push(node);
            }
        }
        let grace = self.desired.grace;
        let stops = draining.into_iter().map(|node| {
            let name = node.name.clone();
            let force = self.force.clone();
            async move {
                let status = node.stop(grace, force).await;
                tracing::info!(node = %name, status = %exit_text(status), "stopped");
            }
        });
        futures_util::future::join_all(stops).await;
    }

    /// Replaces one node: drain and wait for its exit, then start it with the new config. The
    /// next one waits (in [`Self::next_step`]) until this one is ready.
    async fn roll(&mut self, ordinal: u32) {
        let Some(Slot::Running(node)) = self.slots.remove(&ordinal) else { return };
        let outdated =
            self.slots.iter().filter(|(i, s)| matches!(s, Slot::Running(n) if self.outdated(**i, n))).count();
        tracing::info!(node = %node.name, pid = node.pid, left_after = outdated, "rolling: draining");
        let name = node.name.clone();
        let status = node.stop(self.desired.grace, self.force.clone()).await;
        tracing::info!(node = %name, status = %exit_text(status), "drained");
        self.last_rolled = Some(ordinal);
        if let Err(err) = self.start(&[ordinal]) {
            tracing::error!(%err, "could not restart a node; retrying");
        }
    }

    /// Notices nodes that exited on their own and schedules their restart, with back-off.
    fn reap(&mut self) {
        for (ordinal, slot) in self.slots.iter_mut() {
            let Slot::Running(node) = slot else { continue };
            let Some(status) = node.exited() else { continue };
            let count = self.crashes.entry(*ordinal).or_insert(0);
            // A node that ran for a while was not crash-looping: count afresh.
            *count = if node.started.elapsed() > MAX_CRASH_BACKOFF * 2 { 1 } else { *count + 1 };
            let next = crashed(*count, node.revision.clone());
            let log = self.layout.node_log(&node.name);
            if let Slot::Crashed { retry_at, .. } = &next {
                tracing::error!(
                    node = %node.name,
                    %status,
                    restart_in = ?retry_at.saturating_duration_since(Instant::now()),
                    "exited unexpectedly; last lines of {}:\n{}",
                    log.display(),
                    node::log_tail(&log, 15)
                );
            }
            *slot = next;
        }
    }

    async fn stop_all(&mut self) {
        if let Some(dns) = &self.dns {
            for ip in dns.records() {
                dns.remove_record(ip);
            }
        }
        let ordinals: Vec<u32> = self.slots.keys().copied().collect();
        self.stop_nodes(ordinals, "stopping").await;
        self.slots.clear();
        let _ = self.write_status();
        tracing::info!("every node stopped");
    }

    // ---------- reporting ----------

    /// Prints the URLs once every wanted node is ready (again after each change of the set),
    /// and keeps the status file current.
    fn report(&mut self) {
        if let Err(err) = self.write_status() {
            tracing::warn!(%err, "could not write the status file");
        }
        let ready: Vec<(String, String, String)> = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Running(n) if n.is_ready() => Some((n.name.clone(), n.url(), n.admin_url())),
                _ => None,
            })
            .collect();
        let admins = self
            .slots
            .values()
            .filter_map(|s| match s {
                Slot::Running(n) if n.is_ready() => Some(n.addr.admin),
                _ => None,
            })
            .collect();
        self.balance.set_nodes(admins, self.desired.config.rebalance.enabled);
        if ready.len() != self.desired.replicas as usize || ready == self.printed {
            return;
        }
        let mut out = format!(
            "ChatCluster {}/{}: {} node{} ready\n",
            self.desired.namespace,
            self.desired.name,
            ready.len(),
            if ready.len() == 1 { "" } else { "s" }
        );
        for (name, url, admin) in &ready {
            out.push_str(&format!("  {name}  web chat {url}  membership {admin}cluster"));
            if self.desired.api_keys.is_some() {
                out.push_str(&format!("  server API {admin}api/v1"));
            }
            out.push('\n');
        }
        print!("{out}");
        self.printed = ready;
    }

    fn write_status(&mut self) -> Result<(), Error> {
        let nodes: Vec<NodeStatus> = self
            .slots
            .iter()
            .map(|(ordinal, slot)| match slot {
                Slot::Running(n) => NodeStatus {
                    name: n.name.clone(),
                    ordinal: *ordinal,
                    pid: Some(n.pid),
                    url: Some(n.url()),
                    peer: Some(n.addr.peer.to_string()),
                    ready: n.is_ready(),
                    revision: n.revision.clone(),
                    crashes: self.crashes.get(ordinal).copied().unwrap_or(0),
                },
                Slot::Crashed { revision, .. } => NodeStatus {
                    name: self.desired.node_name(*ordinal),
                    ordinal: *ordinal,
                    pid: None,
                    url: None,
                    peer: None,
                    ready: false,
                    revision: revision.clone(),
                    crashes: self.crashes.get(ordinal).copied().unwrap_or(0),
                },
            })
            .collect();
        let status = Status {
            cluster: format!("{}/{}", self.desired.namespace, self.desired.name),
            replicas: self.desired.replicas,
            revision: self.desired.revision.clone(),
            manifest_problem: self.manifest_problem.clone(),
            dns: self.dns.as_ref().map(|d| d.addr().to_string()),
            dns_records: self.dns.as_ref().map(|d| d.records().iter().map(IpAddr::to_string).collect()),
            nodes,
            rebalancing: self.balance.rebalancing(),
        };
        let text = serde_json::to_string_pretty(&status).unwrap_or_default();
        if text == self.status {
            return Ok(());
        }
        let path = self.layout.status_file();
        let tmp = path.with_extension("json.tmp");
        // Readers (scripts, tests) never see a half-written file.
        std::fs::write(&tmp, &text).map_err(io_error("writing", &tmp))?;
        std::fs::rename(&tmp, &path).map_err(io_error("writing", &path))?;
        self.status = text;
        Ok(())
    }
}

/// A crashed slot, restarted after 1, 2, 4 … seconds (at most [`MAX_CRASH_BACKOFF`]).
fn crashed(crashes: u32, revision: String) -> Slot {
    let backoff = Duration::from_secs(1u64 << crashes.saturating_sub(1).min(5)).min(MAX_CRASH_BACKOFF);
    Slot::Crashed { retry_at: Instant::now() + backoff, revision }
}

/// `<state>/status.json`: what runs, for scripts and tests.
#[derive(Serialize)]
struct Status {
    cluster: String,
    replicas: u32,
    revision: String,
    manifest_problem: Option<String>,
    dns: Option<String>,
    dns_records: Option<Vec<String>>,
    nodes: Vec<NodeStatus>,
    /// Whether the nodes are moving connections to even out (as the operator's
    /// `status.rebalancing`); absent until two nodes are ready and answer.
    rebalancing: Option<bool>,
}

#[derive(Serialize)]
struct NodeStatus {
    name: String,
    ordinal: u32,
    pid: Option<u32>,
    url: Option<String>,
    peer: Option<String>,
    ready: bool,
    revision: String,
    crashes: u32,
}

fn exit_text(status: Option<std::process::ExitStatus>) -> String {
    status.map_or_else(|| "unknown".to_owned(), |s| s.to_string())
}

/// Data of ordinals beyond `replicas` (left by an earlier run with more nodes) would bring those
/// nodes back with stale state when the cluster grows again; the StatefulSet deletes the volume
/// of a scaled-away pod for the same reason.
fn remove_stale_data(layout: &Layout, desired: &Desired) -> Result<(), Error> {
    let nodes = layout.root.join("nodes");
    let entries = match std::fs::read_dir(&nodes) {
        Ok(entries) => entries,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(err) => return Err(io_error("reading", &nodes)(err)),
    };
    let prefix = format!("{}-", desired.name);
    for entry in entries {
        let name = entry.map_err(io_error("reading", &nodes))?.file_name().to_string_lossy().into_owned();
        let beyond =
            name.strip_prefix(&prefix).and_then(|n| n.parse::<u32>().ok()).is_some_and(|i| i >= desired.replicas);
        let data = layout.node_data(&name);
        if beyond && data.exists() {
            std::fs::remove_dir_all(&data).map_err(io_error("removing", &data))?;
            tracing::info!(data = %data.display(), "removed the data of a node beyond spec.replicas");
        }
    }
    Ok(())
}

/// The node's data directory: its own, like a pod's volume.
fn create_private_dir(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(path).map_err(io_error("creating", path))
}

/// Keys are readable by their owner only, like the pod's `defaultMode: 0400` Secret volumes.
fn write_private(path: &Path, content: &[u8]) -> Result<(), Error> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io_error("creating", dir))?;
    }
    // Written aside and renamed over: a node re-reading the file (a renewed TLS certificate)
    // never sees half of it.
    let temp = path.with_extension("new");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&temp)
        .map_err(io_error("writing", &temp))?;
    file.write_all(content).map_err(io_error("writing", &temp))?;
    std::fs::rename(&temp, path).map_err(io_error("writing", path))
}

/// A line in the node's log between its runs, so restarts are easy to find.
fn append_log_marker(path: &Path, text: &str) {
    use std::io::Write;
    if let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path) {
        let _ = writeln!(file, "----- chat-operator local: {text} -----");
    }
}
