//! One group's state machine: the hub's rooms of that group. Committed commands are applied
//! to the hub (which delivers them to subscribers and answers waiting publishes); snapshots
//! are the rooms' replicated state (`RoomImage`), kept for followers that fell behind and, with
//! disk storage, on disk so a restarted node starts from its latest one.

use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{AnyError, EntryPayload, RaftSnapshotBuilder, StorageIOError};

use super::disk::{Disk, Loaded};
use super::types::{Entry, LogId, SnapshotMeta, StorageError, StoredMembership, TypeConfig};
use crate::hub::log::{Applied, Command};
use crate::hub::room::RoomImage;

/// What a group's state machine does to the node's rooms.
pub trait Applier: Send + Sync + 'static {
    fn apply(&self, group: u32, command: &Command) -> Applied;
    fn images(&self, group: u32) -> Vec<RoomImage>;
    fn install(&self, group: u32, images: Vec<RoomImage>);
}

type StoredSnapshot = (SnapshotMeta, Vec<u8>);

pub struct StateMachine {
    group: u32,
    applier: Weak<dyn Applier>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    disk: Option<Arc<Disk>>,
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
        loaded: &mut Loaded,
    ) -> Result<StateMachine, serde_json::Error> {
        let mut sm = StateMachine {
            group,
            applier,
            last_applied: None,
            membership: StoredMembership::default(),
            current: Arc::default(),
            disk,
        };
        if let Some((meta, data)) = loaded.snapshot.take() {
            sm.restore(&meta, &data)?;
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
    images: Vec<RoomImage>,
    last_applied: Option<LogId>,
    membership: StoredMembership,
    current: Arc<Mutex<Option<StoredSnapshot>>>,
    disk: Option<Arc<Disk>>,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError> {
        let data = serde_json::to_vec(&self.images).map_err(sm_error)?;
        let snapshot_id = match self.last_applied {
            Some(id) => format!("{}-{}-{}", self.group, id.leader_id.term, id.index),
            None => format!("{}-empty", self.group),
        };
        let meta =
            SnapshotMeta { last_log_id: self.last_applied, last_membership: self.membership.clone(), snapshot_id };
        // Durable before Raft purges the log entries it covers.
        StateMachine::persist(&self.disk, self.group, &meta, &data).await?;
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
        for entry in entries {
            self.last_applied = Some(entry.log_id);
            match entry.payload {
                EntryPayload::Blank => {}
                EntryPayload::Normal(batch) => {
                    if let Some(applier) = &applier {
                        for command in &batch {
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
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        // Captured now, between applies, so the snapshot matches `last_applied` exactly.
        let images = self.applier.upgrade().map(|a| a.images(self.group)).unwrap_or_default();
        Builder {
            group: self.group,
            images,
            last_applied: self.last_applied,
            membership: self.membership.clone(),
            current: self.current.clone(),
            disk: self.disk.clone(),
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
        *lock(&self.current) = Some((meta.clone(), data));
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> Result<Option<Snapshot<TypeConfig>>, StorageError> {
        Ok(lock(&self.current).clone().map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}
