//! The replicated room log: rooms map by hash to `cluster.partitions` Raft groups (openraft),
//! each a log of the hub's commands with its own leader. Raft RPCs travel over the peer links
//! (`network`), logs live in memory or on disk (`store`, `disk`), and every node applies every
//! committed command to its hub (`state_machine`), so history and resume are answered locally.
//! Membership is explicit and changed through Raft by the groups' leaders (`steward`).
//! `docs/cluster.md` describes the design and its failure cases.

pub mod disk;
pub mod network;
#[cfg(test)]
mod sim;
mod state_machine;
mod steward;
pub mod store;
pub mod types;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::Duration;

use tokio::time::Instant;

use openraft::{Config, SnapshotPolicy};
use serde::Serialize;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

use crate::cluster::{Cluster, PeerHandler};
use crate::config::{ClusterConfig, StorageMode};
use crate::hub::Hub;
use crate::hub::log::{Applied, Command, IdleStream, Reply, RoomLog};
use crate::hub::room::{RoomCapture, RoomImage};
use crate::hub::sessions::SessionRecord;
use crate::metrics::Metrics;
use crate::protocol::{ErrorCode, UserInfo};
use crate::rebalance::{LoadReport, LoadSource, NodeLoad, REPORT_STALE};
use crate::transport::Frame;

use disk::{Disk, DiskError, Loaded};
use network::{Calls, NetworkFactory};
use state_machine::{AppliedGate, Applier, SnapshotDue, SnapshotRule, StateMachine};
use store::LogStore;
use types::{Batch, Raft, RaftServerMetrics, group_of, new_incarnation, raft_id};
use wire::{MemberInfo, RaftReply, RaftRpc, ReplicaFrame};

/// How often membership, readiness and waiting publishes are looked after.
pub const TICK: Duration = Duration::from_millis(100);
/// How long a client told to reconnect at once waits for its session record to reach the peers.
const SESSION_FLUSH_BOUND: Duration = Duration::from_millis(500);
/// A waiting publish is proposed again at once when its group's leader changes, the link to it
/// drops or it reports a failure; otherwise only after half of `publish_timeout_ms` (a proposal
/// lost some other way). Each proposal is appended to the log again, and dedupe only covers a
/// room's recent keys: proposing again while the first is on its way risks storing it twice.
const SAFETY_RETRY_SHARE: u32 = 2;
/// How long a leaving leader tries to hand each group to a successor before it leaves anyway.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    #[error("cluster.ordinal is not set and node id {0:?} does not end in -<number>")]
    NoOrdinal(String),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("the data directory belongs to node ordinal {stored}, not {ours}")]
    ForeignData { stored: u32, ours: u32 },
    #[error("raft config: {0}")]
    Config(String),
    #[error("starting raft group {group}: {message}")]
    Start { group: u32, message: String },
    #[error("stored snapshot of group {group} is unreadable: {source}")]
    Snapshot { group: u32, source: serde_json::Error },
}

/// A command for this node to append as a group's leader; `from` is the node that proposed it.
struct Append {
    command: Command,
    from: Option<String>,
}

/// A client's publish waiting to be committed and applied here.
struct Waiting {
    reply: Reply,
    room: String,
    group: u32,
    command: Command,
    since: Instant,
    /// When and to which leader it was last proposed.
    sent_at: Instant,
    sent_to: Option<u64>,
}

pub struct ReplicatedLog {
    name: String,
    ordinal: u32,
    raft_id: u64,
    config: ClusterConfig,
    /// The cluster's intended size, re-read from the config file while running.
    size: AtomicUsize,
    cluster: Arc<Cluster>,
    metrics: Arc<Metrics>,
    disk: Option<Arc<Disk>>,
    this: Weak<ReplicatedLog>,
    hub: OnceLock<Weak<Hub>>,
    groups: OnceLock<Vec<Raft>>,
    /// Per group, the commands this node appends as its leader, in arrival order: a client's
    /// publishes keep their order.
    appends: OnceLock<Vec<UnboundedSender<Append>>>,
    /// Per group, entries this node handed to Raft as leader that have not committed yet.
    uncommitted: OnceLock<Vec<Arc<AtomicUsize>>>,
    calls: Arc<Calls>,
    /// Linked peers by node name, once they have said who they are.
    members: Mutex<HashMap<String, MemberInfo>>,
    leaving: AtomicBool,
    ready: AtomicBool,
    ticks: AtomicU64,
    /// Ordered, so retries go out in the same order every time (simulations replay exactly).
    waiting: Mutex<BTreeMap<String, Waiting>>,
    steward: Mutex<steward::Steward>,
    /// A simulation fixes each node's election timeout (seeded) so runs replay exactly.
    fixed_election_ms: OnceLock<u64>,
    /// Per group, how much it applied since its last snapshot.
    snapshots: OnceLock<Vec<Arc<SnapshotDue>>>,
    /// Per group, how far its rooms applied the log (from Raft or the leader's relay).
    gates: OnceLock<Vec<Arc<AppliedGate>>>,
    /// `SnapshotRule::DEFAULT`, or a simulation's smaller one (so its short runs snapshot).
    snapshot_rule: OnceLock<SnapshotRule>,
    /// Set once a group's Raft stopped on an error: the node must restart (see `failed`).
    failure: tokio::sync::watch::Sender<Option<String>>,
    /// Presence changes for the peers, by (room, user id; ordered, so simulations replay), sent
    /// at the next tick: only the last state of each goes out, so a connection flapping in and
    /// out of a room costs every peer at most one frame per tick instead of one per change.
    presence_out: Mutex<BTreeMap<(String, String), (UserInfo, bool)>>,
    /// Session records changed since the last tick, the latest of each session.
    sessions_out: Mutex<BTreeMap<String, SessionRecord>>,
    /// The peers' latest load reports, with when each arrived.
    loads: Mutex<HashMap<String, (LoadReport, std::time::Instant)>>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

impl ReplicatedLog {
    /// The node's room log; `start` brings its Raft groups up once the hub is attached.
    pub fn new(
        name: String,
        config: ClusterConfig,
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
    ) -> Result<Arc<ReplicatedLog>, ReplicationError> {
        let disk = match (config.storage, &config.data_dir) {
            (StorageMode::Disk, Some(dir)) => Some(Disk::open(dir)?),
            _ => None,
        };
        Self::with_storage(name, config, cluster, metrics, disk)
    }

    /// Like [`ReplicatedLog::new`], with the node's stored state in `disk` (`None`: memory).
    pub fn with_storage(
        name: String,
        config: ClusterConfig,
        cluster: Arc<Cluster>,
        metrics: Arc<Metrics>,
        disk: Option<Arc<Disk>>,
    ) -> Result<Arc<ReplicatedLog>, ReplicationError> {
        let ordinal = config.ordinal_of(&name).ok_or_else(|| ReplicationError::NoOrdinal(name.clone()))?;
        let raft_id = match &disk {
            Some(disk) => {
                let id = disk.identity(|| raft_id(ordinal, new_incarnation()))?;
                if types::ordinal_of(id) != ordinal {
                    return Err(ReplicationError::ForeignData { stored: types::ordinal_of(id), ours: ordinal });
                }
                id
            }
            // Without durable state a restarted node is a new member (see `types::raft_id`).
            None => raft_id(ordinal, new_incarnation()),
        };
        let log = Arc::new_cyclic(|this| ReplicatedLog {
            name,
            ordinal,
            raft_id,
            size: AtomicUsize::new(config.size),
            config,
            cluster: cluster.clone(),
            metrics,
            disk,
            this: this.clone(),
            hub: OnceLock::new(),
            groups: OnceLock::new(),
            appends: OnceLock::new(),
            uncommitted: OnceLock::new(),
            calls: Arc::default(),
            members: Mutex::default(),
            leaving: AtomicBool::new(false),
            ready: AtomicBool::new(false),
            ticks: AtomicU64::new(0),
            waiting: Mutex::default(),
            steward: Mutex::default(),
            fixed_election_ms: OnceLock::new(),
            snapshots: OnceLock::new(),
            gates: OnceLock::new(),
            snapshot_rule: OnceLock::new(),
            failure: tokio::sync::watch::Sender::new(None),
            presence_out: Mutex::default(),
            sessions_out: Mutex::default(),
            loads: Mutex::default(),
        });
        let handler: Weak<dyn PeerHandler> = log.this.clone() as _;
        cluster.set_handler(handler);
        Ok(log)
    }

    fn raft_config(&self) -> Result<Arc<Config>, ReplicationError> {
        let c = &self.config;
        let (election_min, election_max) = match self.fixed_election_ms.get() {
            Some(fixed) => (*fixed, fixed + 1),
            None => (c.election_timeout_ms, c.election_timeout_ms * 2),
        };
        let config = Config {
            cluster_name: "chatcluster".into(),
            heartbeat_interval: c.raft_heartbeat_ms,
            election_timeout_min: election_min,
            election_timeout_max: election_max,
            // The tick asks for snapshots by size (`SnapshotRule`); some log stays behind each,
            // so a briefly absent follower catches up from the log.
            snapshot_policy: SnapshotPolicy::Never,
            max_in_snapshot_log_to_keep: self.snapshot_rule().keep_log_entries,
            snapshot_max_chunk_size: 256 * 1024,
            max_payload_entries: 512,
            ..Config::default()
        };
        Ok(Arc::new(config.validate().map_err(|e| ReplicationError::Config(e.to_string()))?))
    }

    /// Starts the Raft groups: with disk storage each resumes from its stored snapshot and log.
    pub async fn start(&self) -> Result<(), ReplicationError> {
        let config = self.raft_config()?;
        let applier: Weak<dyn Applier> = self.this.clone() as _;
        let mut groups = Vec::new();
        let mut appends = Vec::new();
        let mut uncommitted = Vec::new();
        let mut snapshots = Vec::new();
        let mut gates = Vec::new();
        for group in 0..self.config.partitions {
            let mut loaded = match &self.disk {
                Some(disk) => disk.load(group)?,
                None => Loaded::default(),
            };
            let store = LogStore::new(group, self.disk.clone(), &mut loaded);
            let due = Arc::new(SnapshotDue::default());
            snapshots.push(due.clone());
            let gate = Arc::new(AppliedGate::default());
            gates.push(gate.clone());
            let sm = StateMachine::new(group, applier.clone(), gate.clone(), self.disk.clone(), due, &mut loaded)
                .map_err(|source| ReplicationError::Snapshot { group, source })?;
            let network = NetworkFactory { group, cluster: self.cluster.clone(), calls: self.calls.clone() };
            let raft = Raft::new(self.raft_id, config.clone(), network, store, sm)
                .await
                .map_err(|e| ReplicationError::Start { group, message: e.to_string() })?;
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let in_flight = entries_in_flight(self.config.storage);
            let pending = Arc::new(AtomicUsize::new(0));
            tokio::spawn(append_in_order(raft.clone(), group, in_flight, pending.clone(), rx, self.this.clone()));
            uncommitted.push(pending);
            tokio::spawn(watch_leader(raft.server_metrics(), gate, self.raft_id, self.this.clone()));
            appends.push(tx);
            groups.push(raft);
        }
        let _ = self.groups.set(groups);
        let _ = self.appends.set(appends);
        let _ = self.uncommitted.set(uncommitted);
        let _ = self.snapshots.set(snapshots);
        let _ = self.gates.set(gates);
        tracing::info!(
            raft_id = format!("{:x}", self.raft_id),
            ordinal = self.ordinal,
            partitions = self.config.partitions,
            storage = ?self.config.storage,
            "room log started"
        );
        Ok(())
    }

    /// Runs membership care, readiness and publish retries for the node's lifetime.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.tick();
        }
    }

    fn tick(&self) {
        self.send_pending();
        self.check_groups();
        self.take_due_snapshots();
        steward::tend(self);
        self.retry_waiting();
        self.metrics.peer_queued_frames.set(self.cluster.queued_frames() as i64);
        if let Some(hub) = self.hub()
            && self.ticks.fetch_add(1, Ordering::Relaxed).is_multiple_of(10)
        {
            for room in hub.rooms_awaiting_stream() {
                self.open(&room);
            }
            self.report_load(&hub);
        }
    }

    /// Tells the peers that take it this node's load (every second: `rebalance::REPORT_EVERY`).
    fn report_load(&self, hub: &Hub) {
        let peers: Vec<String> =
            self.members().iter().filter(|(_, m)| m.reports_load).map(|(name, _)| name.clone()).collect();
        if peers.is_empty() {
            return;
        }
        let frame = ReplicaFrame::Load(hub.load_report()).encode();
        for peer in peers {
            self.cluster.send(&peer, frame.clone());
        }
    }

    /// Sends the presence and session changes since the last tick, each (room, user) and each
    /// session in its latest state: a client flooding joins and leaves costs each peer a frame
    /// per tick, not one per change. Also called by the drain before the node exits.
    pub fn send_pending(&self) {
        let changes = std::mem::take(&mut *lock(&self.presence_out));
        for ((room, _), (user, present)) in changes {
            self.cluster.broadcast(ReplicaFrame::Presence { room, user, present }.encode());
        }
        self.send_sessions();
    }

    fn send_sessions(&self) {
        // Held while the records are queued too: a caller that then waits for the links'
        // writes (`send_sessions_now`) must not find them taken by the tick but not yet queued.
        let mut out = lock(&self.sessions_out);
        let sessions = std::mem::take(&mut *out);
        self.metrics.session_records_sent.inc_by(sessions.len() as u64);
        for session in sessions.into_values() {
            self.cluster.broadcast(ReplicaFrame::Session { session }.encode());
        }
    }

    /// A group whose Raft stopped on an error (a storage failure, or openraft's own "replication
    /// channel closed") answers nothing from then on: the node cannot serve its rooms again
    /// without a restart, so it reports the failure for the server to drain and exit.
    fn check_groups(&self) {
        if self.failure.borrow().is_some() {
            return;
        }
        for (group, raft) in self.groups().iter().enumerate() {
            let stopped = match &raft.metrics().borrow().running_state {
                Err(openraft::error::Fatal::Stopped) | Ok(()) => None,
                Err(err) => Some(err.to_string()),
            };
            if let Some(err) = stopped {
                tracing::error!(group, %err, "a room-log group stopped on an error; the node drains and exits to restart");
                self.metrics.raft_group_failures.inc();
                self.failure.send_replace(Some(format!("room-log group {group} stopped: {err}")));
                return;
            }
        }
    }

    fn snapshot_rule(&self) -> SnapshotRule {
        self.snapshot_rule.get().copied().unwrap_or(SnapshotRule::DEFAULT)
    }

    fn take_due_snapshots(&self) {
        let Some(snapshots) = self.snapshots.get() else { return };
        let tick = self.ticks.load(Ordering::Relaxed);
        for (raft, due) in self.groups().iter().zip(snapshots) {
            if due.due(&self.snapshot_rule()) && due.request(tick) {
                let raft = raft.clone();
                tokio::spawn(async move {
                    if let Err(err) = raft.trigger().snapshot().await {
                        tracing::debug!(%err, "snapshot not taken");
                    }
                });
            }
        }
    }

    /// Resolves once a group stopped on an error, with what happened.
    pub async fn failed(&self) -> String {
        let mut failure = self.failure.subscribe();
        loop {
            if let Some(reason) = failure.borrow_and_update().clone() {
                return reason;
            }
            if failure.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    }

    pub fn set_size(&self, size: usize) {
        if self.size.swap(size.max(1), Ordering::AcqRel) != size {
            tracing::info!(size, "cluster size changed");
        }
    }

    pub fn size(&self) -> usize {
        self.size.load(Ordering::Acquire)
    }

    fn hub(&self) -> Option<Arc<Hub>> {
        self.hub.get().and_then(Weak::upgrade)
    }

    fn groups(&self) -> &[Raft] {
        self.groups.get().map(Vec::as_slice).unwrap_or_default()
    }

    fn group_of(&self, room: &str) -> u32 {
        group_of(room, self.config.partitions)
    }

    /// This node's own announcement.
    fn member_info(&self) -> MemberInfo {
        let initialized =
            self.groups().iter().any(|raft| raft.metrics().borrow().membership_config.membership().nodes().count() > 0);
        MemberInfo {
            raft_id: self.raft_id,
            ordinal: self.ordinal,
            leaving: self.leaving.load(Ordering::Acquire),
            initialized,
            forgets_rooms: true,
            reports_load: true,
        }
    }

    /// Every node of the intended cluster is linked and can apply `Command::Forget`.
    fn all_forget_rooms(&self) -> bool {
        let members = self.members();
        members.len() + 1 >= self.size() && members.values().all(|m| m.forgets_rooms)
    }

    fn members(&self) -> MutexGuard<'_, HashMap<String, MemberInfo>> {
        lock(&self.members)
    }

    /// The node name of Raft member `id` in `group`, from the group's membership.
    fn name_of(&self, group: u32, id: u64) -> Option<String> {
        let raft = self.groups().get(group as usize)?;
        let metrics = raft.server_metrics();
        let metrics = metrics.borrow();
        metrics.membership_config.membership().get_node(&id).map(|n| n.addr.clone())
    }

    /// Draining: the groups this node leads get a successor first (`steward::hand_over`), then
    /// leaders take it out of their groups; it waits until it votes nowhere (bounded by
    /// `timeout`), so its leaving never costs a group its quorum.
    pub async fn leave(&self, timeout: Duration) {
        // Before `leaving` is set, or a tick could take this node out of a group it leads
        // first, and its vote would no longer count for the successor.
        let led = steward::stop_appending_to_led_groups(self);
        self.leaving.store(true, Ordering::Release);
        self.cluster.broadcast(ReplicaFrame::Member(self.member_info()).encode());
        let started = Instant::now();
        steward::hand_over(self, led, HAND_OVER_TIMEOUT.min(timeout)).await;
        while started.elapsed() < timeout && steward::votes_anywhere(self) {
            steward::tend(self);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(
            still_voting = steward::votes_anywhere(self),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "left the room-log groups"
        );
    }

    /// Stops every group (after a drain, before exit).
    pub async fn shutdown(&self) {
        for raft in self.groups() {
            let _ = raft.shutdown().await;
        }
    }

    // ---------- publishing ----------

    fn waiting(&self) -> MutexGuard<'_, BTreeMap<String, Waiting>> {
        lock(&self.waiting)
    }

    /// Sends a command to its group's leader, or appends it here if that is this node.
    fn propose(&self, group: u32, command: Command) -> Option<u64> {
        let raft = self.groups().get(group as usize)?;
        let leader = raft.server_metrics().borrow().current_leader?;
        if leader == self.raft_id {
            self.append(group, command, None);
        } else {
            let name = self.name_of(group, leader)?;
            self.cluster.send(&name, ReplicaFrame::Propose { group, command }.encode());
        }
        Some(leader)
    }

    /// Whether entries this node appended to `group` as its leader are still on their way: the
    /// group's log may still grow by them.
    fn appends_pending(&self, group: u32) -> bool {
        self.uncommitted.get().and_then(|u| u.get(group as usize)).is_some_and(|n| n.load(Ordering::Acquire) > 0)
    }

    fn append(&self, group: u32, command: Command, from: Option<String>) {
        if let Some(queue) = self.appends.get().and_then(|a| a.get(group as usize)) {
            let _ = queue.send(Append { command, from });
        }
    }

    /// An append failed (this node is no longer the leader, or is stopping): the proposer
    /// retries now instead of at its next retry time.
    fn append_failed(&self, key: &str, from: Option<&str>) {
        if key.is_empty() {
            // An `open`: the next join or tick proposes it again.
            return;
        }
        match from {
            Some(peer) => {
                self.cluster.send(peer, ReplicaFrame::ProposeFailed { key: key.to_owned() }.encode());
            }
            None => {
                if let Some(waiting) = self.waiting().get_mut(key) {
                    waiting.sent_to = None;
                }
            }
        }
    }

    /// Proposes again what waited too long or went to a leader that is no longer one; refuses
    /// what waited past `publish_timeout_ms`.
    fn retry_waiting(&self) {
        let timeout = Duration::from_millis(self.config.publish_timeout_ms);
        let leaders: Vec<Option<u64>> = self.groups().iter().map(|r| r.metrics().borrow().current_leader).collect();
        let mut expired = Vec::new();
        let mut again = Vec::new();
        for (key, waiting) in self.waiting().iter() {
            if waiting.since.elapsed() >= timeout {
                expired.push(key.clone());
            } else if waiting.sent_to.is_none()
                || waiting.sent_to != leaders.get(waiting.group as usize).copied().flatten()
                || waiting.sent_at.elapsed() >= timeout / SAFETY_RETRY_SHARE
            {
                again.push((key.clone(), waiting.group, waiting.command.clone()));
            }
        }
        for key in expired {
            if let Some(waiting) = self.waiting().remove(&key) {
                self.metrics.publishes_in_flight.dec();
                self.metrics.publishes_unavailable.inc();
                waiting.reply.refuse(
                    ErrorCode::Unavailable,
                    "not committed in time (no leader or no quorum for this room); it may still appear once; retry with the same key",
                );
            }
        }
        for (key, group, command) in again {
            let sent_to = self.propose(group, command);
            if let Some(waiting) = self.waiting().get_mut(&key) {
                waiting.sent_to = sent_to;
                waiting.sent_at = Instant::now();
            }
        }
    }

    /// A command was applied here: answer the publish waiting for it, if any.
    fn applied(&self, room: &str, key: &str, offset: u64, epoch: &str) {
        if let Some(waiting) = self.waiting().remove(key) {
            self.metrics.publishes_in_flight.dec();
            waiting.reply.ack(room, offset, epoch);
        }
    }

    // ---------- peer frames ----------

    fn on_call(&self, peer: &str, call: u64, group: u32, to: u64, rpc: RaftRpc) {
        let raft = self.groups().get(group as usize).cloned();
        let (Some(raft), true) = (raft, to == self.raft_id) else {
            // Addressed to an earlier incarnation: never answer for its promises.
            self.cluster.send(peer, ReplicaFrame::Reply { call, reply: RaftReply::WrongMember }.encode());
            return;
        };
        let cluster = self.cluster.clone();
        let peer = peer.to_owned();
        tokio::spawn(async move {
            let reply = match rpc {
                RaftRpc::Append(req) => RaftReply::Append(raft.append_entries(req).await),
                RaftRpc::Vote(req) => RaftReply::Vote(raft.vote(req).await),
                RaftRpc::Snapshot(req) => RaftReply::Snapshot(raft.install_snapshot(req).await),
            };
            cluster.send(&peer, ReplicaFrame::Reply { call, reply }.encode());
        });
    }

    fn handle(&self, peer: &str, frame: ReplicaFrame) {
        let Some(hub) = self.hub() else { return };
        match frame {
            ReplicaFrame::Member(info) => {
                self.members().insert(peer.to_owned(), info);
            }
            ReplicaFrame::Call { call, group, to, rpc } => self.on_call(peer, call, group, to, rpc),
            ReplicaFrame::Reply { call, reply } => self.calls.answer(peer, call, reply),
            // The answer is the commit itself, which reaches the proposer through the log; only
            // a failure is reported back.
            ReplicaFrame::Propose { group, command } => self.append(group, command, Some(peer.to_owned())),
            ReplicaFrame::ProposeFailed { key } => {
                if let Some(waiting) = self.waiting().get_mut(&key) {
                    waiting.sent_to = None;
                }
            }
            ReplicaFrame::Elect { group, to } => {
                let Some(raft) = self.groups().get(group as usize).cloned() else { return };
                if to != self.raft_id || self.leaving.load(Ordering::Acquire) {
                    return;
                }
                tokio::spawn(async move {
                    // A leader, or a node that is no longer a voter, ignores it.
                    if let Err(err) = raft.trigger().elect().await {
                        tracing::debug!(group, %err, "standing for election failed");
                    }
                });
            }
            ReplicaFrame::Bootstrap { group, members } => {
                let Some(raft) = self.groups().get(group as usize).cloned() else { return };
                tokio::spawn(async move {
                    // Refused when the group has begun already: then there is nothing to do.
                    if let Err(err) = raft.initialize(members).await {
                        tracing::debug!(group, %err, "bootstrap of a room-log group skipped");
                    }
                });
            }
            ReplicaFrame::Committed { group, index, commands } => {
                let Some(gate) = self.gates.get().and_then(|gates| gates.get(group as usize)) else { return };
                let applied = gate.apply_relayed(index, || {
                    for command in &commands {
                        Applier::apply(self, group, command);
                    }
                });
                let counter =
                    if applied { &self.metrics.relayed_entries_applied } else { &self.metrics.relayed_entries_skipped };
                counter.inc();
            }
            ReplicaFrame::Presence { room, user, present } => hub.set_remote_presence(peer, &room, &user, present),
            ReplicaFrame::PresenceSnapshot { entries } => hub.replace_remote_presence(peer, entries),
            ReplicaFrame::Session { session } => {
                self.metrics.session_records_received.inc();
                hub.sessions().merge(session);
            }
            ReplicaFrame::Load(report) => {
                lock(&self.loads).insert(peer.to_owned(), (report, std::time::Instant::now()));
            }
            ReplicaFrame::Disconnect { user_id, code } => {
                let closed = hub.disconnect_user(&user_id, code);
                tracing::info!(user = %user_id, code, closed, from = peer, "disconnected a user for the server API");
            }
        }
    }

    pub fn status(&self) -> ReplicationStatus {
        steward::status(self)
    }
}

/// Raft entries of one group that may wait for their commit at once (see `append_in_order`).
/// In memory an append costs nothing, so a few entries pipeline; on disk each entry costs the
/// leader a flush before it takes the next, so one entry at a time gathers the largest batches
/// (`chat-bench cluster --storage disk`: p50 14 ms with 1, 19–28 ms with 2 or 4, 59 ms with 64).
fn entries_in_flight(storage: StorageMode) -> usize {
    match storage {
        StorageMode::Memory => 4,
        StorageMode::Disk => 1,
    }
}
/// Most commands, and most bytes of message bodies, in one entry.
const BATCH_COMMANDS: usize = 512;
const BATCH_BODY_BYTES: usize = 256 * 1024;

/// Appends one group's commands in the order they were queued, in as few Raft entries as the
/// load allows: at most `in_flight` entries wait for their commit, and the commands that
/// queue meanwhile go into the next entry together. openraft 0.9 flushes the leader's log once
/// per entry before it takes the next one, so one command per entry would cap a group with disk
/// storage at one fsync per message. A command that cannot be appended goes back to its proposer.
async fn append_in_order(
    raft: Raft,
    group: u32,
    in_flight: usize,
    uncommitted: Arc<AtomicUsize>,
    mut queue: UnboundedReceiver<Append>,
    log: Weak<ReplicatedLog>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(in_flight));
    while let Some(first) = queue.recv().await {
        // Waiting for a slot first lets the next entry gather what arrives meanwhile.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let mut batch = vec![first];
        let mut body_bytes = 0;
        while batch.len() < BATCH_COMMANDS && body_bytes < BATCH_BODY_BYTES {
            match queue.try_recv() {
                Ok(next) => {
                    body_bytes += next.command.body_len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let Some(node) = log.upgrade() else { return };
        if lock(&node.steward).handing_over.contains(&group) {
            // The successor must be able to catch up: the proposers retry with it.
            for append in &batch {
                node.append_failed(append.command.key().unwrap_or_default(), append.from.as_deref());
            }
            continue;
        }
        drop(node);
        let (commands, origins): (Batch, Vec<(String, Option<String>)>) = batch
            .into_iter()
            .map(|a| {
                let key = a.command.key().unwrap_or_default().to_owned();
                (a.command, (key, a.from))
            })
            .unzip();
        uncommitted.fetch_add(1, Ordering::AcqRel);
        let outcome = match raft.client_write_ff(commands).await {
            Ok(outcome) => outcome,
            Err(_) => return,
        };
        let log = log.clone();
        let uncommitted = uncommitted.clone();
        tokio::spawn(async move {
            let committed = matches!(outcome.await, Ok(Ok(_)));
            uncommitted.fetch_sub(1, Ordering::AcqRel);
            drop(slot);
            if !committed && let Some(log) = log.upgrade() {
                for (key, from) in origins {
                    log.append_failed(&key, from.as_deref());
                }
            }
        });
    }
}

/// Follows a group's leader: tells the group's gate whether this node leads (then it relays
/// committed entries), and proposes waiting publishes again as soon as there is a new leader,
/// rather than on the next tick.
async fn watch_leader(
    mut metrics: tokio::sync::watch::Receiver<RaftServerMetrics>,
    gate: Arc<AppliedGate>,
    raft_id: u64,
    log: Weak<ReplicatedLog>,
) {
    let mut leader = metrics.borrow().current_leader;
    gate.set_leading(leader == Some(raft_id));
    while metrics.changed().await.is_ok() {
        let now = metrics.borrow_and_update().current_leader;
        if now != leader {
            leader = now;
            gate.set_leading(now == Some(raft_id));
            match log.upgrade() {
                Some(log) if now.is_some() => log.retry_waiting(),
                Some(_) => {}
                None => return,
            }
        }
    }
}

/// `/cluster`'s view of the room log.
#[derive(Debug, Clone, Serialize)]
pub struct ReplicationStatus {
    pub raft_id: String,
    pub ordinal: u32,
    pub size: usize,
    pub storage: StorageMode,
    pub quorum: bool,
    pub ready: bool,
    pub leaving: bool,
    pub publishes_in_flight: usize,
    pub groups: Vec<GroupStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct GroupStatus {
    pub group: u32,
    pub role: String,
    pub leader: Option<String>,
    pub term: u64,
    pub voters: Vec<String>,
    pub learners: Vec<String>,
    pub last_log: Option<u64>,
    pub last_applied: Option<u64>,
}

impl Applier for ReplicatedLog {
    fn apply(&self, _group: u32, command: &Command) -> Applied {
        let Some(hub) = self.hub() else { return Applied::Opened };
        let applied = hub.apply(command);
        if let (Applied::Stored { offset, epoch, .. }, Some(key)) = (&applied, command.key()) {
            self.applied(command.room(), key, *offset, epoch);
        }
        applied
    }

    fn images(&self, group: u32) -> Vec<RoomCapture> {
        let partitions = self.config.partitions;
        self.hub().map(|hub| hub.images(|room| group_of(room, partitions) == group)).unwrap_or_default()
    }

    fn relay(&self, group: u32, index: u64, commands: &[Command]) {
        self.cluster.broadcast(ReplicaFrame::Committed { group, index, commands: commands.to_vec() }.encode());
    }

    fn install(&self, group: u32, images: Vec<RoomImage>) {
        let Some(hub) = self.hub() else { return };
        let partitions = self.config.partitions;
        hub.install_images(|room| group_of(room, partitions) == group, images);
        // Publishes whose commit arrived inside the snapshot are answered from its keys.
        let found: Vec<(String, String, u64, String)> = self
            .waiting()
            .iter()
            .filter(|(_, w)| w.group == group)
            .filter_map(|(key, w)| hub.stored(&w.room, key).map(|(o, e)| (w.room.clone(), key.clone(), o, e)))
            .collect();
        for (room, key, offset, epoch) in found {
            self.applied(&room, &key, offset, &epoch);
        }
    }
}

impl RoomLog for ReplicatedLog {
    fn attach(&self, hub: Weak<Hub>) {
        let _ = self.hub.set(hub);
    }

    fn publish(&self, command: Command, reply: Reply) -> Option<Frame> {
        let key = command.key()?.to_owned();
        let room = command.room().to_owned();
        let group = self.group_of(&room);
        if let Some(waiting) = self.waiting().get_mut(&key) {
            // A retry (often from a new connection) while the first is still in flight: it is
            // the same publish, and the answer goes to the latest request.
            waiting.reply = reply;
            return None;
        }
        let now = Instant::now();
        self.metrics.publishes_in_flight.inc();
        let command_copy = command.clone();
        self.waiting()
            .insert(key.clone(), Waiting { reply, room, group, command, since: now, sent_at: now, sent_to: None });
        let sent_to = self.propose(group, command_copy);
        if let Some(waiting) = self.waiting().get_mut(&key) {
            waiting.sent_to = sent_to;
        }
        None
    }

    fn open(&self, room: &str) {
        let command = Command::Open { room: room.to_owned(), epoch: crate::hub::room::new_epoch() };
        self.propose(self.group_of(room), command);
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }

    fn presence_changed(&self, room: &str, user: &UserInfo, present: bool) {
        lock(&self.presence_out).insert((room.to_owned(), user.id.clone()), (user.clone(), present));
    }

    fn disconnect_user(&self, user_id: &str, code: u16) {
        self.cluster.broadcast(ReplicaFrame::Disconnect { user_id: user_id.to_owned(), code }.encode());
    }

    fn session_changed(&self, record: &SessionRecord) {
        lock(&self.sessions_out).insert(record.id.clone(), record.clone());
    }

    fn send_sessions_now(&self) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send + '_>> {
        self.send_sessions();
        Box::pin(self.cluster.written_so_far(SESSION_FLUSH_BOUND))
    }

    fn keeps_streams(&self) -> bool {
        true
    }

    /// The leader of each idle room's group proposes to end its stream; every node applies
    /// that in log order, so all agree on when the room restarts with a new epoch.
    fn forget(&self, idle: Vec<IdleStream>) {
        if !self.all_forget_rooms() {
            return;
        }
        for IdleStream { room, epoch, last_offset } in idle {
            let group = self.group_of(&room);
            let leads = self
                .groups()
                .get(group as usize)
                .is_some_and(|raft| raft.metrics().borrow().current_leader == Some(self.raft_id));
            if leads {
                self.append(group, Command::Forget { room, epoch, last_offset }, None);
            }
        }
    }
}

impl LoadSource for ReplicatedLog {
    fn size(&self) -> usize {
        ReplicatedLog::size(self)
    }

    fn peer_loads(&self, now: std::time::Instant) -> Vec<NodeLoad> {
        let mut loads: Vec<NodeLoad> = lock(&self.loads)
            .iter()
            .filter(|(_, (_, at))| now.saturating_duration_since(*at) < REPORT_STALE)
            .map(|(node, (report, _))| NodeLoad { node: node.clone(), report: report.clone() })
            .collect();
        loads.sort_by(|a, b| a.node.cmp(&b.node));
        loads
    }
}

impl PeerHandler for ReplicatedLog {
    fn on_link_up(&self, peer: &str) {
        self.cluster.send(peer, ReplicaFrame::Member(self.member_info()).encode());
        if let Some(hub) = self.hub() {
            self.cluster.send(peer, ReplicaFrame::PresenceSnapshot { entries: hub.local_presence() }.encode());
            for session in hub.sessions().all() {
                self.cluster.send(peer, ReplicaFrame::Session { session }.encode());
            }
        }
    }

    fn on_link_down(&self, peer: &str) {
        if let Some(gone) = self.members().remove(peer) {
            // What went to that leader may be lost with the link: propose it again.
            for waiting in self.waiting().values_mut().filter(|w| w.sent_to == Some(gone.raft_id)) {
                waiting.sent_to = None;
            }
        }
        self.calls.fail_peer(peer);
        lock(&self.loads).remove(peer);
        if let Some(hub) = self.hub() {
            hub.replace_remote_presence(peer, Vec::new());
        }
    }

    fn on_frame(&self, peer: &str, text: &str) {
        match serde_json::from_str::<ReplicaFrame>(text) {
            Ok(frame) => self.handle(peer, frame),
            Err(err) => tracing::warn!(peer, %err, "dropped a malformed peer frame"),
        }
    }
}
