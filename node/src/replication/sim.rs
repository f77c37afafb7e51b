//! Deterministic simulation of the replicated room log: nodes (hubs with their Raft groups) in
//! one single-threaded runtime on a paused clock, peer links as in-memory channels with seeded
//! delays, and seeded faults while clients publish: crashes with and without state loss,
//! restarts, partitions (in-flight frames dropped), scale up and down. A checker asserts
//! per-room total order, no acked publish lost, none stored twice, and every node's history a
//! prefix of the longest. Every choice — faults, delays, election timeouts, ids, epochs —
//! comes from the seed, so a failing seed (printed) replays exactly:
//! `SIM_SEED=<n> cargo test -p chat-node replication::sim -- --nocapture`.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::disk::Disk;
use super::state_machine::SnapshotRule;
use super::{ReplicatedLog, steward};
use crate::cluster::{Cluster, PeerHandler};
use crate::config::NodeConfig;
use crate::hub::Hub;
use crate::hub::log::{Command, Reply};
use crate::hub::outbox::{Inbox, Outbox, outbox};
use crate::hub::room::JoinOutcome;
use crate::metrics::Metrics;
use crate::protocol::{StreamPosition, UserInfo};

const ROOMS: [&str; 2] = ["lobby", "ops"];
const PARTITIONS: u32 = 2;
/// Virtual time a publish may stay unanswered before its client retries it elsewhere.
const CLIENT_RETRY: Duration = Duration::from_secs(4);

struct SimNode {
    name: String,
    hub: Arc<Hub>,
    log: Arc<ReplicatedLog>,
    cluster: Arc<Cluster>,
    run: JoinHandle<()>,
    /// Its subscribers joined: like a load balancer, only once the node is ready.
    subscribed: bool,
}

struct Link {
    generation: u64,
    pump: JoinHandle<()>,
}

/// A publisher: its messages, each identified by its idempotency key (also its body).
struct Client {
    id: usize,
    outbox: Outbox,
    inbox: Inbox,
    next: usize,
    /// Keys sent and not answered yet, with when they were sent.
    pending: BTreeMap<String, Instant>,
    /// Keys to send again (refused `unavailable`, or unanswered too long).
    retry: BTreeSet<String>,
    room_of: BTreeMap<String, &'static str>,
}

/// A subscriber on one node and room: what it was delivered.
struct Subscriber {
    node: usize,
    room: &'static str,
    conn: u64,
    outbox: Outbox,
    inbox: Inbox,
    position: Option<StreamPosition>,
    delivered: Vec<(String, u64, String)>,
}

pub struct Sim {
    seed: u64,
    rng: StdRng,
    disk_mode: bool,
    size: usize,
    nodes: BTreeMap<usize, SimNode>,
    disks: BTreeMap<usize, Arc<Disk>>,
    links: BTreeMap<(usize, usize), Link>,
    isolated: BTreeSet<usize>,
    clients: Vec<Client>,
    subscribers: Vec<Subscriber>,
    next_conn: u64,
    acked: BTreeMap<String, (String, u64, String)>,
    trace: Vec<String>,
    metrics: Arc<Metrics>,
    started: Instant,
}

fn config(ordinal: usize, size: usize) -> NodeConfig {
    let mut cfg = NodeConfig { node_id: Some(format!("sim-{ordinal}")), ..NodeConfig::default() };
    cfg.history.size = 100_000;
    let c = &mut cfg.cluster;
    c.static_peers = vec!["simulated:1".into()];
    c.secret = Some("simulated-cluster-secret".into());
    c.size = size;
    c.partitions = PARTITIONS;
    c.raft_heartbeat_ms = 50;
    c.publish_timeout_ms = 3000;
    cfg
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let disk_mode = rng.random_bool(0.4);
        Sim {
            seed,
            rng,
            disk_mode,
            size: 3,
            nodes: BTreeMap::new(),
            disks: BTreeMap::new(),
            links: BTreeMap::new(),
            isolated: BTreeSet::new(),
            clients: Vec::new(),
            subscribers: Vec::new(),
            next_conn: 1,
            acked: BTreeMap::new(),
            trace: Vec::new(),
            metrics: Arc::new(Metrics::new()),
            started: Instant::now(),
        }
    }

    fn note(&mut self, event: String) {
        self.trace.push(format!("{:>8} {event}", self.started.elapsed().as_millis()));
    }

    async fn start_node(&mut self, ordinal: usize) {
        let mut cfg = config(ordinal, self.size);
        if self.disk_mode {
            cfg.cluster.storage = crate::config::StorageMode::Disk;
        }
        let name = cfg.node_id.clone().unwrap_or_default();
        let metrics = Arc::new(Metrics::new());
        let cluster = Cluster::new(name.clone(), cfg.cluster.clone(), metrics.clone()).expect("sim cluster config");
        let disk = self.disk_mode.then(|| self.disks.entry(ordinal).or_insert_with(Disk::in_memory).clone());
        let log =
            ReplicatedLog::with_storage(name.clone(), cfg.cluster.clone(), cluster.clone(), metrics.clone(), disk)
                .expect("sim room log");
        let _ = log.fixed_election_ms.set(150 + self.rng.random_range(0..300));
        // Short runs snapshot often and keep little log behind, so followers and new
        // incarnations catch up from snapshots too.
        let _ = log.snapshot_rule.set(SnapshotRule {
            log_factor: 1,
            min_log_bytes: 4096,
            max_log_bytes: 1 << 20,
            max_log_entries: 30,
            keep_log_entries: 10,
        });
        let hub = Hub::new(name.clone(), cfg, metrics, Some(log.clone() as _)).expect("sim hub");
        log.start().await.expect("sim groups start");
        let run = tokio::spawn(log.clone().run());
        self.nodes.insert(ordinal, SimNode { name: name.clone(), hub, log, cluster, run, subscribed: false });
        self.note(format!("start {name}"));
        let peers: Vec<usize> = self.nodes.keys().copied().filter(|p| *p != ordinal).collect();
        for peer in peers {
            self.connect(ordinal, peer);
        }
    }

    /// Links `a` and `b` both ways, unless one of them is cut off.
    fn connect(&mut self, a: usize, b: usize) {
        if self.isolated.contains(&a) || self.isolated.contains(&b) {
            return;
        }
        for (from, to) in [(a, b), (b, a)] {
            if self.links.contains_key(&(from, to)) {
                continue;
            }
            let (Some(source), Some(target)) = (self.nodes.get(&from), self.nodes.get(&to)) else { return };
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio_tungstenite::tungstenite::Utf8Bytes>();
            let queued = Arc::new(AtomicUsize::new(0));
            let receiver = target.log.clone();
            let sender = source.name.clone();
            let mut delays = StdRng::seed_from_u64(self.rng.random());
            let max_delay = self.rng.random_range(1..20u64);
            let counter = queued.clone();
            let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let written_count = written.clone();
            // FIFO like a WebSocket: a frame never overtakes the one before it.
            let pump = tokio::spawn(async move {
                let mut last = Instant::now();
                while let Some(text) = rx.recv().await {
                    written_count.fetch_add(1, Ordering::AcqRel);
                    counter.fetch_sub(1, Ordering::AcqRel);
                    let at = last.max(Instant::now() + Duration::from_millis(delays.random_range(0..max_delay)));
                    tokio::time::sleep_until(at).await;
                    last = at;
                    receiver.on_frame(&sender, &text);
                }
            });
            let generation =
                source.cluster.register(&target.name, "simulated".into(), Arc::default(), tx, queued, written);
            self.links.insert((from, to), Link { generation, pump });
        }
    }

    /// Cuts both directions; frames in flight are lost.
    fn disconnect(&mut self, a: usize, b: usize) {
        for (from, to) in [(a, b), (b, a)] {
            if let Some(link) = self.links.remove(&(from, to)) {
                link.pump.abort();
                if let (Some(source), Some(target)) = (self.nodes.get(&from), self.nodes.get(&to)) {
                    source.cluster.unregister(&target.name, link.generation);
                }
            }
        }
    }

    async fn crash(&mut self, ordinal: usize) {
        let peers: Vec<usize> = self.nodes.keys().copied().filter(|p| *p != ordinal).collect();
        for peer in peers {
            self.disconnect(ordinal, peer);
        }
        if let Some(node) = self.nodes.remove(&ordinal) {
            node.run.abort();
            node.log.shutdown().await;
            self.note(format!("crash {} (state {})", node.name, if self.disk_mode { "kept" } else { "lost" }));
        }
    }

    fn isolate(&mut self, ordinal: usize) {
        let peers: Vec<usize> = self.nodes.keys().copied().filter(|p| *p != ordinal).collect();
        for peer in peers {
            self.disconnect(ordinal, peer);
        }
        self.isolated.insert(ordinal);
        self.note(format!("isolate sim-{ordinal}"));
    }

    fn heal(&mut self) {
        self.isolated.clear();
        let alive: Vec<usize> = self.nodes.keys().copied().collect();
        for a in &alive {
            for b in &alive {
                if a < b {
                    self.connect(*a, *b);
                }
            }
        }
        self.note("heal".into());
    }

    fn resize(&mut self, size: usize) {
        self.size = size;
        for node in self.nodes.values() {
            node.log.set_size(size);
        }
        self.note(format!("size {size}"));
    }

    async fn scale_up(&mut self) {
        let ordinal = self.size;
        self.resize(self.size + 1);
        self.start_node(ordinal).await;
    }

    /// Drains the highest ordinal as a pod's SIGTERM would, then stops it for good.
    async fn scale_down(&mut self) {
        let ordinal = self.size - 1;
        self.resize(self.size - 1);
        if let Some(node) = self.nodes.get(&ordinal) {
            let log = node.log.clone();
            log.leave(Duration::from_secs(5)).await;
        }
        self.crash(ordinal).await;
        self.disks.remove(&ordinal);
        self.subscribers.retain(|s| s.node != ordinal);
    }

    fn all_ready(&self) -> bool {
        self.nodes.len() == self.size && self.nodes.values().all(|n| n.hub.is_ready())
    }

    /// Runs virtual time until `done` holds or `limit` passes.
    async fn settle(&mut self, limit: Duration, done: impl Fn(&Sim) -> bool) -> bool {
        let until = Instant::now() + limit;
        while Instant::now() < until {
            self.collect();
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    // ---------- clients ----------

    fn add_clients(&mut self, n: usize) {
        for id in 0..n {
            let (outbox, inbox) = outbox(100_000, usize::MAX, self.metrics.clone());
            self.clients.push(Client {
                id,
                outbox,
                inbox,
                next: 0,
                pending: BTreeMap::new(),
                retry: BTreeSet::new(),
                room_of: BTreeMap::new(),
            });
        }
    }

    fn publish(&mut self, client: usize, fresh: bool) {
        let alive: Vec<usize> = self.nodes.keys().copied().collect();
        if alive.is_empty() {
            return;
        }
        let node = alive[self.rng.random_range(0..alive.len())];
        let c = &mut self.clients[client];
        let key = if fresh || c.retry.is_empty() {
            c.next += 1;
            format!("c{}-{}", c.id, c.next)
        } else {
            let Some(key) = c.retry.pop_first() else { return };
            key
        };
        let next_room = ROOMS[(c.id + c.next) % ROOMS.len()];
        // A retry goes to the room it was first sent to.
        let room = *c.room_of.entry(key.clone()).or_insert(next_room);
        c.pending.insert(key.clone(), Instant::now());
        let command = Command::Publish {
            room: room.to_owned(),
            key: key.clone(),
            sender: UserInfo { id: format!("u{}", c.id), name: format!("U{}", c.id) },
            body: key.clone(),
            ts: 0,
            epoch: format!("{:016x}", crate::random::random::<u64>()),
        };
        let reply = Reply { outbox: c.outbox.clone(), id: Some(key.clone()) };
        let name = self.nodes[&node].name.clone();
        if let Some(answer) = self.nodes[&node].hub.log().publish(command, reply) {
            c.outbox.push(&answer);
        }
        self.note(format!("publish {key} in {room} via {name}"));
    }

    /// Reads what clients and subscribers were sent; subscribes on nodes that became ready.
    fn collect(&mut self) {
        let ready: Vec<usize> =
            self.nodes.iter().filter(|(_, n)| !n.subscribed && n.hub.is_ready()).map(|(o, _)| *o).collect();
        for ordinal in ready {
            self.resubscribe(ordinal);
            if let Some(node) = self.nodes.get_mut(&ordinal) {
                node.subscribed = true;
            }
        }
        for c in &mut self.clients {
            let mut frames = Vec::new();
            c.inbox.take_into(&mut frames, usize::MAX);
            for frame in frames {
                let Ok(v) = serde_json::from_str::<Value>(&frame) else { continue };
                let key = v["id"].as_str().unwrap_or_default().to_owned();
                c.pending.remove(&key);
                match v["type"].as_str() {
                    Some("ack") => {
                        let entry = (
                            v["room"].as_str().unwrap_or_default().to_owned(),
                            v["offset"].as_u64().unwrap_or(0),
                            v["epoch"].as_str().unwrap_or_default().to_owned(),
                        );
                        if let Some(before) = self.acked.get(&key) {
                            assert_eq!(before, &entry, "seed {}: {key} acked twice differently", self.seed);
                        }
                        self.trace.push(format!("ack {key} {entry:?}"));
                        self.acked.insert(key, entry);
                    }
                    _ => {
                        c.retry.insert(key);
                    }
                }
            }
            let stale: Vec<String> =
                c.pending.iter().filter(|(_, at)| at.elapsed() >= CLIENT_RETRY).map(|(k, _)| k.clone()).collect();
            for key in stale {
                c.pending.remove(&key);
                c.retry.insert(key);
            }
        }
        for s in &mut self.subscribers {
            let mut frames = Vec::new();
            s.inbox.take_into(&mut frames, usize::MAX);
            for frame in frames {
                record(s, &frame);
            }
        }
    }

    /// (Re)joins the subscribers of a node that (re)started, each from where it was.
    fn resubscribe(&mut self, ordinal: usize) {
        let Some(node) = self.nodes.get(&ordinal) else { return };
        let hub = node.hub.clone();
        if !self.subscribers.iter().any(|s| s.node == ordinal) {
            for room in ROOMS {
                let (outbox, inbox) = outbox(1_000_000, usize::MAX, self.metrics.clone());
                self.subscribers.push(Subscriber {
                    node: ordinal,
                    room,
                    conn: 0,
                    outbox,
                    inbox,
                    position: None,
                    delivered: Vec::new(),
                });
            }
        }
        let user = UserInfo { id: "watcher".into(), name: "Watcher".into() };
        for s in self.subscribers.iter_mut().filter(|s| s.node == ordinal) {
            self.next_conn += 1;
            s.conn = self.next_conn;
            let room = hub.room(s.room);
            let (outcome, _) = room.join(s.conn, s.outbox.clone(), &user, None, s.position.clone());
            match outcome {
                JoinOutcome::Joined { missed, .. } => {
                    for frame in missed {
                        record(s, &frame);
                    }
                }
                JoinOutcome::Waiting => hub.log().open(s.room),
                JoinOutcome::Gone => {}
            }
        }
    }

    // ---------- the run ----------

    async fn run(&mut self) {
        crate::random::seed_thread(Some(self.seed));
        for ordinal in 0..self.size {
            self.start_node(ordinal).await;
        }
        let ready = self.settle(Duration::from_secs(20), Sim::all_ready).await;
        assert!(ready, "seed {}: the cluster never became ready\n{}", self.seed, self.trace.join("\n"));
        self.add_clients(3);
        let steps = 150;
        for _ in 0..steps {
            let wait = self.rng.random_range(5..60);
            self.settle(Duration::from_millis(wait), |_| false).await;
            let roll = self.rng.random_range(0..100);
            match roll {
                0..=74 => {
                    let client = self.rng.random_range(0..self.clients.len());
                    let fresh = self.rng.random_bool(0.7);
                    self.publish(client, fresh);
                }
                75..=77 => self.fault_crash().await,
                78..=79 => self.fault_drain().await,
                80..=84 => self.fault_restart().await,
                85..=88 => {
                    let alive: Vec<usize> = self.nodes.keys().copied().collect();
                    if self.isolated.is_empty() && !alive.is_empty() {
                        let victim = alive[self.rng.random_range(0..alive.len())];
                        self.isolate(victim);
                    }
                }
                89..=93 => self.heal(),
                94..=96 if self.size < 5 && self.all_ready() => self.scale_up().await,
                97..=99 if self.size > 3 && self.all_ready() => self.scale_down().await,
                _ => {}
            }
            self.check_prefixes();
        }
        self.finish().await;
    }

    /// Crashes a node. Without durable state only when every node is ready (caught up), so a
    /// majority never loses its state at once; with disk storage any node, any time.
    async fn fault_crash(&mut self) {
        if self.nodes.len() < self.size || (!self.disk_mode && !self.all_ready()) {
            return;
        }
        let alive: Vec<usize> = self.nodes.keys().copied().collect();
        let victim = alive[self.rng.random_range(0..alive.len())];
        self.crash(victim).await;
    }

    /// A rolling restart's step: a node drains as on SIGTERM (hands over the groups it leads,
    /// leaves their voters) and exits; `fault_restart` brings it back later.
    async fn fault_drain(&mut self) {
        if self.nodes.len() < self.size || !self.all_ready() {
            return;
        }
        let alive: Vec<usize> = self.nodes.keys().copied().collect();
        let victim = alive[self.rng.random_range(0..alive.len())];
        self.note(format!("drain sim-{victim}"));
        let log = self.nodes[&victim].log.clone();
        log.leave(Duration::from_secs(5)).await;
        self.crash(victim).await;
    }

    async fn fault_restart(&mut self) {
        let down: Vec<usize> = (0..self.size).filter(|o| !self.nodes.contains_key(o)).collect();
        if let Some(&ordinal) = down.first() {
            self.start_node(ordinal).await;
        }
    }

    /// During the run: on every node, each room's history is a prefix of the longest.
    fn check_prefixes(&mut self) {
        for room in ROOMS {
            let histories: Vec<(String, Vec<(u64, String)>)> =
                self.nodes.values().map(|n| history(&n.hub, room)).filter(|(e, _)| !e.is_empty()).collect();
            let Some(longest) = histories.iter().max_by_key(|(_, h)| h.len()) else { continue };
            for (epoch, h) in &histories {
                if epoch == &longest.0 {
                    assert!(
                        longest.1.starts_with(h),
                        "seed {}: a history of {room} is not a prefix of the longest\n{}",
                        self.seed,
                        self.trace.join("\n")
                    );
                }
            }
        }
    }

    /// Heals everything, brings every node back, lets clients finish, then checks.
    async fn finish(&mut self) {
        self.heal();
        for ordinal in 0..self.size {
            if !self.nodes.contains_key(&ordinal) {
                self.start_node(ordinal).await;
            }
        }
        let settled = self
            .settle(Duration::from_secs(60), |sim| {
                sim.all_ready() && sim.clients.iter().all(|c| c.pending.is_empty() && c.retry.is_empty())
            })
            .await;
        // Retries that were still owed go out now that the cluster is whole.
        for _ in 0..3 {
            for client in 0..self.clients.len() {
                while !self.clients[client].retry.is_empty() {
                    self.publish(client, false);
                }
            }
            self.settle(Duration::from_secs(10), |sim| sim.clients.iter().all(|c| c.pending.is_empty())).await;
        }
        assert!(
            settled || self.all_ready(),
            "seed {}: the cluster did not recover\n{}\n{}",
            self.seed,
            self.trace.join("\n"),
            self.statuses()
        );
        let converged = self
            .settle(Duration::from_secs(20), |sim| {
                ROOMS.iter().all(|room| {
                    let histories: BTreeSet<_> = sim.nodes.values().map(|n| history(&n.hub, room)).collect();
                    histories.len() == 1
                })
            })
            .await;
        assert!(converged, "seed {}: histories differ after recovery\n{}", self.seed, self.trace.join("\n"));
        self.check_final();
    }

    fn check_final(&mut self) {
        let seed = self.seed;
        let Some(node) = self.nodes.values().next() else { return };
        let mut stored: BTreeMap<String, (String, u64, String)> = BTreeMap::new();
        for room in ROOMS {
            let (epoch, h) = history(&node.hub, room);
            let offsets: Vec<u64> = h.iter().map(|(o, _)| *o).collect();
            assert!(offsets.iter().copied().eq(1..=h.len() as u64), "seed {seed}: {room} has gaps: {offsets:?}");
            for (offset, body) in &h {
                let before = stored.insert(body.clone(), (room.to_owned(), *offset, epoch.clone()));
                assert!(before.is_none(), "seed {seed}: {body} stored twice ({before:?} and {room}@{offset})");
            }
            self.trace.push(format!("final {room} {epoch} {:?}", h));
        }
        for (key, acked) in &self.acked {
            assert_eq!(
                stored.get(key),
                Some(acked),
                "seed {seed}: acked {key} lost or moved\n{}",
                self.trace.join("\n")
            );
        }
        for s in &self.subscribers {
            let (epoch, h) = history(&self.nodes[&s.node].hub, s.room);
            let mut last = 0;
            for (e, offset, body) in &s.delivered {
                if e != &epoch {
                    continue;
                }
                assert!(*offset > last, "seed {seed}: sim-{} got {} out of order in {}", s.node, offset, s.room);
                last = *offset;
                let expected = h.get((*offset as usize).wrapping_sub(1)).map(|(_, b)| b);
                assert_eq!(expected, Some(body), "seed {seed}: sim-{} got a delivery unlike the history", s.node);
            }
        }
        assert!(!self.acked.is_empty(), "seed {seed}: nothing was acked at all\n{}", self.trace.join("\n"));
    }

    /// Every node's `/cluster` view of the room log, for failure messages.
    fn statuses(&self) -> String {
        let statuses: Vec<String> = self
            .nodes
            .values()
            .map(|n| format!("{}: {}", n.name, serde_json::to_string(&n.log.status()).unwrap_or_default()))
            .collect();
        statuses.join("\n")
    }

    fn digest(&self) -> String {
        let mut hasher = Sha256::new();
        for line in &self.trace {
            hasher.update(line.as_bytes());
            hasher.update(b"\n");
        }
        format!("{:x}", hasher.finalize())
    }
}

fn record(s: &mut Subscriber, frame: &str) {
    let Ok(v) = serde_json::from_str::<Value>(frame) else { return };
    if v["type"] == "message" {
        let epoch = v["epoch"].as_str().unwrap_or_default().to_owned();
        let offset = v["offset"].as_u64().unwrap_or(0);
        s.position = Some(StreamPosition { epoch: epoch.clone(), offset });
        s.delivered.push((epoch, offset, v["body"].as_str().unwrap_or_default().to_owned()));
    }
}

fn history(hub: &Hub, room: &str) -> (String, Vec<(u64, String)>) {
    let (epoch, messages, _) = hub.room(room).history(None, None);
    (epoch, messages.into_iter().map(|m| (m.offset, m.body)).collect())
}

/// Runs `work` on a single-threaded runtime of its own whose clock only moves when every task
/// waits, so a run is the same every time.
fn on_paused_clock<T>(work: impl std::future::Future<Output = T>) -> T {
    if let Ok(filter) = std::env::var("SIM_LOG") {
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    }
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
    runtime.block_on(work)
}

/// Runs one seed to the end on its own paused-clock runtime; returns the trace digest and how
/// many relayed entries the surviving nodes applied and left to Raft.
fn run_seed(seed: u64) -> (String, u64, u64) {
    on_paused_clock(async move {
        let mut sim = Sim::new(seed);
        sim.run().await;
        let digest = sim.digest();
        if let Ok(dir) = std::env::var("SIM_TRACE_DIR") {
            let _ = std::fs::write(format!("{dir}/sim-{seed}-{digest}.txt"), sim.trace.join("\n"));
        }
        let (mut applied, mut skipped) = (0, 0);
        for node in sim.nodes.values() {
            applied += node.log.metrics.relayed_entries_applied.get();
            skipped += node.log.metrics.relayed_entries_skipped.get();
            node.log.shutdown().await;
        }
        (digest, applied, skipped)
    })
}

fn seeds() -> Vec<u64> {
    if let Some(seed) = std::env::var("SIM_SEED").ok().and_then(|s| s.parse().ok()) {
        return vec![seed];
    }
    let count = std::env::var("SIM_SEEDS").ok().and_then(|s| s.parse().ok()).unwrap_or(200);
    (1..=count).collect()
}

#[test]
fn seeded_faults_lose_no_acked_publish() {
    let (mut relayed, mut left_to_raft) = (0, 0);
    for seed in seeds() {
        match std::panic::catch_unwind(|| run_seed(seed)) {
            Ok((_, applied, skipped)) => {
                relayed += applied;
                left_to_raft += skipped;
            }
            Err(panic) => {
                eprintln!("simulation failed for seed {seed}; replay with SIM_SEED={seed}");
                std::panic::resume_unwind(panic);
            }
        }
    }
    // Both ways into the rooms ran under the faults the checker judged.
    assert!(relayed > 0 && left_to_raft > 0, "relayed entries applied {relayed}, left to Raft {left_to_raft}");
}

#[test]
fn seeds_replay_exactly() {
    for seed in seeds().into_iter().take(3) {
        assert_eq!(run_seed(seed).0, run_seed(seed).0, "seed {seed} did not replay the same run");
    }
}

/// Three ready nodes (memory storage unless `disk`), then `settle` of quiet time.
async fn three_ready_nodes(seed: u64, disk: bool, settle: Duration) -> Sim {
    crate::random::seed_thread(Some(seed));
    let mut sim = Sim::new(seed);
    sim.disk_mode = disk;
    for ordinal in 0..sim.size {
        sim.start_node(ordinal).await;
    }
    assert!(sim.settle(Duration::from_secs(20), Sim::all_ready).await, "the cluster never became ready");
    sim.settle(settle, |_| false).await;
    sim
}

fn leader_and_term(sim: &Sim, group: usize) -> Option<(usize, u64)> {
    sim.nodes.iter().find_map(|(ordinal, node)| {
        let m = node.log.groups()[group].metrics().borrow().clone();
        (m.current_leader == Some(node.log.raft_id)).then_some((*ordinal, m.current_term))
    })
}

#[test]
fn a_draining_leader_hands_its_groups_to_a_successor() {
    on_paused_clock(async {
        let mut sim = three_ready_nodes(11, false, Duration::from_secs(2)).await;
        let (leader, term) = leader_and_term(&sim, 0).expect("group 0 has a leader");
        let led: Vec<usize> =
            (0..PARTITIONS as usize).filter(|g| leader_and_term(&sim, *g).map(|l| l.0) == Some(leader)).collect();
        let log = sim.nodes[&leader].log.clone();
        let started = Instant::now();
        let watch = async {
            let mut moved = BTreeMap::new();
            while moved.len() < led.len() && started.elapsed() < Duration::from_secs(5) {
                for group in &led {
                    if let Some((by, term)) = leader_and_term(&sim, *group).filter(|(by, _)| *by != leader) {
                        moved.entry(*group).or_insert((by, term, started.elapsed()));
                    }
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            moved
        };
        let (moved, ()) = tokio::join!(watch, log.leave(Duration::from_secs(5)));
        assert_eq!(moved.len(), led.len(), "every group sim-{leader} led has a new leader: {moved:?}");
        for (group, (_, new_term, after)) in &moved {
            // Simulated time, so not a speed figure but an order of events: without a hand-over
            // no voter could grant a vote before its leader lease ran out, and the shortest
            // lease here is 151 ms (election timeouts are 150–450 ms, the lease their maximum).
            assert!(*after < Duration::from_millis(151), "group {group} waited out a lease: {after:?}");
            if *group == 0 {
                assert_eq!(*new_term, term + 1, "group 0 changed leader in one election");
            }
        }
        assert!(!steward::votes_anywhere(&log), "the drained node votes nowhere");
        sim.crash(leader).await;
        for node in sim.nodes.values() {
            node.log.shutdown().await;
        }
    });
}

#[test]
fn a_group_stopped_by_a_storage_error_makes_the_node_fail() {
    on_paused_clock(async {
        let mut sim = three_ready_nodes(12, true, Duration::from_millis(500)).await;
        sim.disks[&1].fail_writes();
        sim.add_clients(1);
        for _ in 0..10 {
            sim.publish(0, true);
        }
        let log = sim.nodes[&1].log.clone();
        let failed = tokio::time::timeout(Duration::from_secs(10), log.failed()).await;
        let reason = failed.expect("the node reports the stopped group");
        assert!(reason.contains("stopped"), "{reason}");
        assert!(sim.nodes[&0].log.failure.borrow().is_none(), "the other nodes keep going");
        for ordinal in [0, 1, 2] {
            sim.crash(ordinal).await;
        }
    });
}
