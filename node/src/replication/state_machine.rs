//! One group's state machine: the hub's rooms of that group. Committed commands are applied
//! to the hub (which delivers them to subscribers and answers waiting publishes); snapshots
//! are the rooms' replicated state (`RoomImage`), kept for followers that fell behind and, with
//! disk storage, on disk so a restarted node starts from its latest one.
//!
//! The group's leader also relays every committed entry straight to the other nodes
//! (`Applier::relay`): a follower learns of a commit only with the leader's next append, which
//! it flushes first, so applying the relayed entry saves it a flush and a round trip. The rooms
//! apply each entry once, whichever way it comes first ([`AppliedGate`]), so snapshots record
//! how far the rooms had applied (`applied_through`), which may be past the snapshot's log id.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};
use serde::{Deserialize, Serialize};

use super::disk::{Disk, Loaded};
use super::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::hub::log::{Applied, Command};
use crate::hub::room::{RoomCapture, RoomImage};

/// What a group's state machine does to the node's rooms.
pub trait Applier: Send + Sync + 'static {
    fn apply(&self, group: u32, command: &Command) -> Applied;
    fn images(&self, group: u32) -> Vec<RoomCapture>;
    fn install(&self, group: u32, images: Vec<RoomImage>);
    /// Entry `index` of `group` is committed and this node leads the group: send it to the
    /// other nodes, which apply it ahead of their own commit if it is next in line.
    fn relay(&self, group: u32, index: u64, commands: &[Command]);
}

/// How far the rooms of one group have applied its log. Entries reach the rooms from this
/// node's state machine and, ahead of it, from the leader's relay; each applies once, in order.
#[derive(Debug, Default)]
pub struct AppliedGate {
    through: Mutex<u64>,
    /// This node leads the group (set by the leader watcher): its applies are relayed.
    leading: std::sync::atomic::AtomicBool,
}

impl AppliedGate {
    fn through(&self) -> MutexGuard<'_, u64> {
        self.through.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_leading(&self, leading: bool) {
        self.leading.store(leading, Ordering::Relaxed);
    }

    fn leading(&self) -> bool {
        self.leading.load(Ordering::Relaxed)
    }

    /// The state machine's path: applies entry `index` unless a relay applied it already.
    fn apply(&self, index: u64, apply: impl FnOnce()) {
        let mut through = self.through();
        if index > *through {
            apply();
            *through = index;
        }
    }

    /// A relayed committed entry: applied only when it is the next one, else left to the state
    /// machine (true if applied).
    pub fn apply_relayed(&self, index: u64, apply: impl FnOnce()) -> bool {
        let mut through = self.through();
        if index != *through + 1 {
            return false;
        }
        apply();
        *through = index;
        true
    }

    /// Runs `capture` with the rooms held at a known point: no entry applies meanwhile.
    fn hold<T>(&self, capture: impl FnOnce(u64) -> T) -> T {
        let through = self.through();
        capture(*through)
    }

    /// Installs a snapshot of the rooms through `index` unless they are there already.
    fn install(&self, index: u64, install: impl FnOnce()) {
        let mut through = self.through();
        if index > *through {
            install();
            *through = index;
        }
    }
}

/// A snapshot as stored and sent: the group's rooms and the last entry they had applied.
#[derive(Serialize)]
struct SnapshotOut<'a> {
    applied_through: u64,
    rooms: &'a [RoomCapture],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SnapshotIn {
    Current {
        applied_through: u64,
        rooms: Vec<RoomImage>,
    },
    /// Written before relays: the rooms at the snapshot's own log id.
    RoomsOnly(Vec<RoomImage>),
}

type StoredSnapshot = (SnapshotMeta, Vec<u8>);

/// When a group takes its next snapshot. A snapshot costs in proportion to the rooms' state
/// (history windows and dedupe keys), the log it replaces in proportion to the messages since
/// the last one: taking one once the log outweighs the last snapshot `log_factor` times keeps
/// the snapshot work per message small however large the rooms are (a fixed count of entries
/// made snapshots of busy rooms the largest source of latency spikes, docs/benchmarks.md).
/// Writing a snapshot also holds up the log's fsyncs on the same disk for a few milliseconds,
/// so they should be rare: 16 times the snapshot, at most 64 MiB, between two.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRule {
    pub log_factor: u64,
    /// Log bytes below which no snapshot is taken.
    pub min_log_bytes: u64,
    /// Log bytes after which one is taken however large the last one was (bounds the log kept
    /// in memory and replayed after a restart).
    pub max_log_bytes: u64,
    /// Entries after which one is taken whatever their size (bounds replay after a restart).
    pub max_log_entries: u64,
    /// Entries kept behind a snapshot, so a briefly absent follower catches up from the log.
    pub keep_log_entries: u64,
}

impl SnapshotRule {
    pub const DEFAULT: SnapshotRule = SnapshotRule {
        log_factor: 16,
        min_log_bytes: 1 << 20,
        max_log_bytes: 64 << 20,
        max_log_entries: 50_000,
        keep_log_entries: 2000,
    };
}

/// What a group applied since its last snapshot; shared between its state machine and the
/// node's tick, which asks Raft for a snapshot when `due`.
#[derive(Debug, Default)]
pub struct SnapshotDue {
    log_bytes: AtomicU64,
    log_entries: AtomicU64,
    snapshot_bytes: AtomicU64,
    /// The tick (plus one) at which a snapshot was last asked for and not yet taken.
    requested_at: AtomicU64,
}

/// Ticks after which a snapshot asked for but not taken (Raft was busy) is asked for again.
const REQUEST_AGAIN_TICKS: u64 = 10;

/// What a command costs in the log besides its body (ids, room, key, timestamps).
const COMMAND_OVERHEAD_BYTES: u64 = 96;

impl SnapshotDue {
    fn applied(&self, entries: u64, bytes: u64) {
        self.log_entries.fetch_add(entries, Ordering::Relaxed);
        self.log_bytes.fetch_add(bytes, Ordering::Relaxed);
    }

    /// The state was captured for a snapshot: what follows is the new log.
    fn captured(&self) {
        self.log_entries.store(0, Ordering::Relaxed);
        self.log_bytes.store(0, Ordering::Relaxed);
        self.requested_at.store(0, Ordering::Relaxed);
    }

    fn stored(&self, snapshot_bytes: usize) {
        self.snapshot_bytes.store(snapshot_bytes as u64, Ordering::Relaxed);
    }

    pub fn due(&self, rule: &SnapshotRule) -> bool {
        let bytes = self.log_bytes.load(Ordering::Relaxed);
        let wanted = self.snapshot_bytes.load(Ordering::Relaxed).saturating_mul(rule.log_factor);
        bytes >= wanted.max(rule.min_log_bytes).min(rule.max_log_bytes)
            || self.log_entries.load(Ordering::Relaxed) >= rule.max_log_entries
    }

    /// Marks a snapshot as asked for at `tick`; false if it was asked for recently.
    pub fn request(&self, tick: u64) -> bool {
        let before = self.requested_at.load(Ordering::Relaxed);
        if before != 0 && tick + 1 < before + REQUEST_AGAIN_TICKS {
            return false;
        }
        self.requested_at.store(tick + 1, Ordering::Relaxed);
        true
    }
}

pub struct StateMachine {
    group: u32,
    applier: Weak<dyn Applier>,
    gate: Arc<AppliedGate>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    disk: Option<Arc<Disk>>,
    due: Arc<SnapshotDue>,
}

fn lock(current: &Mutex<Option<StoredSnapshot>>) -> MutexGuard<'_, Option<StoredSnapshot>> {
    current.lock().unwrap_or_else(|p| p.into_inner())
}

fn sm_error(source: impl ToString) -> StorageError {
    StorageIOError::write_state_machine(AnyError::error(source.to_string())).into()
}

impl StateMachine {
    /// The state machine of `group`, starting from the stored snapshot in `loaded` if any.
    pub fn new(
        group: u32,
        applier: Weak<dyn Applier>,
        gate: Arc<AppliedGate>,
        disk: Option<Arc<Disk>>,
        due: Arc<SnapshotDue>,
        loaded: &mut Loaded,
    ) -> Result<StateMachine, serde_json::Error> {
        let mut sm = StateMachine {
            group,
            applier,
            gate,
            last_applied: None,
            membership: StoredMembership::default(),
            current: Arc::default(),
            disk,
            due,
        };
        if let Some((meta, data)) = loaded.snapshot.take() {
            sm.restore(&meta, &data)?;
            sm.due.stored(data.len());
            *lock(&sm.current) = Some((meta, data));
        }
        Ok(sm)
    }

    fn restore(&mut self, meta: &SnapshotMeta, data: &[u8]) -> Result<(), serde_json::Error> {
        let (through, images) = match serde_json::from_slice(data)? {
            SnapshotIn::Current { applied_through, rooms } => (applied_through, rooms),
            SnapshotIn::RoomsOnly(rooms) => (meta.last_log_id.map_or(0, |id| id.index), rooms),
        };
        // Rooms that applied this far already (from relays) are newer than the snapshot.
        self.gate.install(through, || {
            if let Some(applier) = self.applier.upgrade() {
                applier.install(self.group, images);
            }
        });
        self.last_applied = meta.last_log_id;
        self.membership = meta.last_membership.clone();
        Ok(())
    }

    async fn persist(
        disk: &Option<Arc<Disk>>,
        group: u32,
        meta: &SnapshotMeta,
        data: &[u8],
    ) -> Result<(), StorageError> {
        let Some(disk) = disk else { return Ok(()) };
        let meta = serde_json::to_vec(meta).map_err(sm_error)?;
        let data = data.to_vec();
        disk.durably(|disk, done| disk.put_snapshot(group, meta, data, done)).await.map_err(sm_error)
    }
}

pub struct Builder {
    group: u32,
    images: Vec<RoomCapture>,
    applied_through: u64,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    disk: Option<Arc<Disk>>,
    due: Arc<SnapshotDue>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let out = SnapshotOut { applied_through: self.applied_through, rooms: &self.images };
        let data = serde_json::to_vec(&out).map_err(sm_error)?;
        let encoded = started.elapsed();
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{}", self.group, id.leader_id.term, id.index),
            None => format!("{}-empty", self.group),
        };
        let meta =
            SnapshotMeta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id };
        // Durable before Raft purges the log entries it covers.
        StateMachine::persist(&self.disk, self.group, &meta, &data).await?;
        self.due.stored(data.len());
        tracing::debug!(group = self.group, bytes = data.len(), ?encoded, stored = ?started.elapsed(), "snapshot built");
        *lock(&self.current) = Some((meta.clone(), data.clone()));
        Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), StorageError> {
        Ok((self.last_applied, self.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<()>, StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let applier = self.applier.upgrade();
        let leading = self.gate.leading();
        let mut results = Vec::new();
        let mut log_bytes = 0;
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            let index = entry.log_id.index;
            let commands: &[Command] = match &entry.payload {
                EntryPayload::Normal(batch) => batch,
                EntryPayload::Blank | EntryPayload::Membership(_) => &[],
            };
            if let (true, Some(applier)) = (leading, &applier) {
                // Entries without commands go too: a follower applies relays only in order.
                applier.relay(self.group, index, commands);
            }
            log_bytes += commands.iter().map(|c| c.body_len() as u64 + COMMAND_OVERHEAD_BYTES).sum::<u64>();
            self.gate.apply(index, || {
                if let Some(applier) = &applier {
                    for command in commands {
                        applier.apply(self.group, command);
                    }
                }
            });
            if let EntryPayload::Membership(membership) = entry.payload {
                self.membership = StoredMembership::new(Some(entry.log_id), membership);
            }
            results.push(());
        }
        self.due.applied(results.len() as u64, log_bytes);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured between applies, with relays held off, so the rooms match `applied_through`.
        let started = std::time::Instant::now();
        let (applied_through, images) = self
            .gate
            .hold(|through| (through, self.applier.upgrade().map(|a| a.images(self.group)).unwrap_or_default()));
        tracing::debug!(group = self.group, took = ?started.elapsed(), "rooms captured for a snapshot");
        self.due.captured();
        Builder {
            group: self.group,
            images,
            applied_through,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            current: self.current.clone(),
            disk: self.disk.clone(),
            due: self.due.clone(),
        }
    }

    async fn begin_receiving_snapshot(&mut self) -> Result<Box<Cursor<Vec<u8>>>, StorageError> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError> {
        let data = snapshot.into_inner();
        self.restore(meta, &data).map_err(sm_error)?;
        Self::persist(&self.disk, self.group, meta, &data).await?;
        self.due.captured();
        self.due.stored(data.len());
        *lock(&self.current) = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(lock(&self.current).clone().map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULE: SnapshotRule = SnapshotRule {
        log_factor: 4,
        min_log_bytes: 1000,
        max_log_bytes: 100_000,
        max_log_entries: 100,
        keep_log_entries: 10,
    };

    #[test]
    fn a_snapshot_is_due_once_the_log_outweighs_the_last_one() {
        let due = SnapshotDue::default();
        due.applied(1, 999);
        assert!(!due.due(&RULE), "below the minimum");
        due.applied(1, 1);
        assert!(due.due(&RULE), "at the minimum, with no snapshot yet");
        due.captured();
        due.stored(10_000);
        due.applied(10, 39_999);
        assert!(!due.due(&RULE), "a large snapshot waits for four times its size of log");
        due.applied(1, 1);
        assert!(due.due(&RULE));
        due.captured();
        due.applied(99, 99);
        assert!(!due.due(&RULE));
        due.applied(1, 1);
        assert!(due.due(&RULE), "many small entries make one due whatever their size");
        due.captured();
        due.stored(1_000_000);
        due.applied(1, 99_999);
        assert!(!due.due(&RULE));
        due.applied(1, 1);
        assert!(due.due(&RULE), "a huge snapshot does not let the log grow without bound");
    }

    #[test]
    fn a_snapshot_is_asked_for_again_only_after_a_while() {
        let due = SnapshotDue::default();
        assert!(due.request(0));
        assert!(!due.request(REQUEST_AGAIN_TICKS - 1), "Raft may still be taking it");
        assert!(due.request(REQUEST_AGAIN_TICKS), "asked again: the first request may have been ignored");
        due.captured();
        assert!(due.request(REQUEST_AGAIN_TICKS + 1), "taken: the next one may be asked for at once");
    }

    #[test]
    fn the_rooms_apply_each_entry_once_whichever_way_it_comes_first() {
        let gate = AppliedGate::default();
        let applied = Mutex::new(Vec::new());
        let note = |index: u64| applied.lock().unwrap().push(index);
        gate.apply(1, || note(1));
        assert!(gate.apply_relayed(2, || note(2)), "the next entry, relayed");
        assert!(!gate.apply_relayed(4, || note(4)), "not next in line: left to Raft");
        assert!(!gate.apply_relayed(2, || note(2)), "already applied");
        gate.apply(2, || note(2));
        gate.apply(3, || note(3));
        assert!(gate.apply_relayed(4, || note(4)));
        gate.apply(4, || note(4));
        assert_eq!(*applied.lock().unwrap(), vec![1, 2, 3, 4]);
        // A snapshot through 3 is older than the rooms; one through 9 replaces them.
        gate.install(3, || panic!("rooms already past the snapshot were replaced"));
        let mut installed = false;
        gate.install(9, || installed = true);
        assert!(installed);
        assert!(gate.apply_relayed(10, || ()), "relays go on from the snapshot");
        gate.hold(|through| assert_eq!(through, 10));
    }

    #[test]
    fn snapshots_from_before_relays_still_restore() {
        let old: SnapshotIn = serde_json::from_str("[]").unwrap();
        assert!(matches!(old, SnapshotIn::RoomsOnly(rooms) if rooms.is_empty()));
        let out = serde_json::to_string(&SnapshotOut { applied_through: 7, rooms: &[] }).unwrap();
        let new: SnapshotIn = serde_json::from_str(&out).unwrap();
        assert!(matches!(new, SnapshotIn::Current { applied_through: 7, .. }));
    }
}
