//! One group's state machine: the hub's rooms of that group. Committed commands are applied
//! to the hub (which delivers them to subscribers and answers waiting publishes); snapshots
//! are the rooms' replicated state (`RoomImage`), kept for followers that fell behind and, with
//! disk storage, on disk so a restarted node starts from its latest one.

use std::io::Cursor;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};

use super::disk::{Disk, Loaded};
use super::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::hub::log::{Applied, Command};
use crate::hub::room::{RoomCapture, RoomImage};

/// What a group's state machine does to the node's rooms.
pub trait Applier: Send + Sync + 'static {
    fn apply(&self, group: u32, command: &Command) -> Applied;
    fn images(&self, group: u32) -> Vec<RoomCapture>;
    fn install(&self, group: u32, images: Vec<RoomImage>);
}

type StoredSnapshot = (SnapshotMeta, Vec<u8>);

/// When a group takes its next snapshot. A snapshot costs in proportion to the rooms' state
/// (history windows and dedupe keys), the log it replaces in proportion to the messages since
/// the last one: taking one once the log outweighs the last snapshot `log_factor` times keeps
/// the snapshot work per message small however large the rooms are (a fixed count of entries
/// made snapshots of busy rooms the largest source of latency spikes, docs/benchmarks.md).
#[derive(Debug, Clone, Copy)]
pub struct SnapshotRule {
    pub log_factor: u64,
    /// Log bytes below which no snapshot is taken.
    pub min_log_bytes: u64,
    /// Entries after which one is taken whatever their size (bounds replay after a restart).
    pub max_log_entries: u64,
    /// Entries kept behind a snapshot, so a briefly absent follower catches up from the log.
    pub keep_log_entries: u64,
}

impl SnapshotRule {
    pub const DEFAULT: SnapshotRule =
        SnapshotRule { log_factor: 4, min_log_bytes: 1 << 20, max_log_entries: 50_000, keep_log_entries: 2000 };
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
        bytes >= wanted.max(rule.min_log_bytes) || self.log_entries.load(Ordering::Relaxed) >= rule.max_log_entries
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
        disk: Option<Arc<Disk>>,
        due: Arc<SnapshotDue>,
        loaded: &mut Loaded,
    ) -> Result<StateMachine, serde_json::Error> {
        let mut sm = StateMachine {
            group,
            applier,
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
        let images: Vec<RoomImage> = serde_json::from_slice(data)?;
        if let Some(applier) = self.applier.upgrade() {
            applier.install(self.group, images);
        }
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
        disk.durably(|disk, done| {
            disk.put_raw(group, "snapshot", data, super::disk::Done::Nothing);
            disk.put_raw(group, "snapshot_meta", meta, done);
        })
        .await
        .map_err(sm_error)
    }
}

pub struct Builder {
    group: u32,
    images: Vec<RoomCapture>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    disk: Option<Arc<Disk>>,
    due: Arc<SnapshotDue>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let started = std::time::Instant::now();
        let data = serde_json::to_vec(&self.images).map_err(sm_error)?;
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
        let mut results = Vec::new();
        let mut log_bytes = 0;
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    for command in &batch {
                        log_bytes += command.body_len() as u64 + COMMAND_OVERHEAD_BYTES;
                        if let Some(applier) = &applier {
                            applier.apply(self.group, command);
                        }
                    }
                }
                EntryPayload::Membership(membership) => {
                    self.membership = StoredMembership::new(Some(entry.log_id), membership);
                }
            }
            results.push(());
        }
        self.due.applied(results.len() as u64, log_bytes);
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured now, between applies, so the snapshot matches `last_applied` exactly.
        let started = std::time::Instant::now();
        let images = self.applier.upgrade().map(|a| a.images(self.group)).unwrap_or_default();
        tracing::debug!(group = self.group, took = ?started.elapsed(), "rooms captured for a snapshot");
        self.due.captured();
        Builder {
            group: self.group,
            images,
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

    const RULE: SnapshotRule =
        SnapshotRule { log_factor: 4, min_log_bytes: 1000, max_log_entries: 100, keep_log_entries: 10 };

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
}
