//! The on-disk room logs (`cluster.storage = "disk"`): one redb database under
//! `cluster.data_dir` for every group's log entries, vote, commit index and latest snapshot,
//! plus the node's Raft identity. One writer thread applies every pending write of every group
//! in a single transaction and fsyncs once (group commit); Raft hears an append is durable only
//! after that commit. Reads happen once, at start: the log stores keep an in-memory copy.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};

use openraft::storage::LogFlushed;
use redb::{Database, ReadableDatabase, TableDefinition};

use super::types::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};

const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
const META: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("meta");
/// The node-wide rows of `META` use this group number.
const NODE: u32 = u32::MAX;
/// Writes gathered into one transaction at most.
const BATCH: usize = 1024;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("cannot create the data directory {path}: {source}")]
    Dir { path: String, source: std::io::Error },
    #[error("room log database: {0}")]
    Db(#[from] redb::Error),
    #[error("room log database holds an unreadable record: {0}")]
    Decode(#[from] serde_json::Error),
    #[error("the room log writer has stopped")]
    Stopped,
    #[error("writing the room log database: {0}")]
    Write(String),
}

macro_rules! db_error_from {
    ($($t:ty),*) => {$(impl From<$t> for DiskError {
        fn from(e: $t) -> Self { DiskError::Db(e.into()) }
    })*};
}
db_error_from!(redb::DatabaseError, redb::TransactionError, redb::TableError, redb::StorageError, redb::CommitError);

/// What a write reports when it is durable.
pub enum Done {
    Flushed(LogFlushed<TypeConfig>),
    Notify(tokio::sync::oneshot::Sender<Result<(), String>>),
    Sync(std::sync::mpsc::Sender<Result<(), String>>),
    Nothing,
}

impl Done {
    fn finish(self, result: &Result<(), String>) {
        match self {
            Done::Flushed(callback) => {
                callback.log_io_completed(result.clone().map_err(std::io::Error::other));
            }
            Done::Notify(tx) => {
                let _ = tx.send(result.clone());
            }
            Done::Sync(tx) => {
                let _ = tx.send(result.clone());
            }
            Done::Nothing => {}
        }
    }
}

enum Op {
    Append {
        group: u32,
        entries: Vec<(u64, Vec<u8>)>,
    },
    Put {
        group: u32,
        key: &'static str,
        value: Vec<u8>,
    },
    /// Deletes the entries from `from` on.
    Truncate {
        group: u32,
        from: u64,
    },
    /// Deletes the entries up to `upto`.
    Purge {
        group: u32,
        upto: u64,
    },
}

/// A group's stored state, as read at start.
#[derive(Default)]
pub struct Loaded {
    pub entries: Vec<Entry>,
    pub vote: Option<Vote>,
    pub committed: Option<LogId>,
    pub purged: Option<LogId>,
    pub snapshot: Option<(SnapshotMeta, Vec<u8>)>,
}

pub struct Disk {
    backend: Backend,
}

enum Backend {
    Redb {
        db: Arc<Database>,
        writes: Sender<(Op, Done)>,
        writer: Option<std::thread::JoinHandle<()>>,
    },
    /// The same tables in memory, written synchronously: "disk" for deterministic simulations,
    /// where a restarted node must find what it wrote.
    Memory(Mutex<MemoryTables>),
}

#[derive(Default)]
struct MemoryTables {
    log: BTreeMap<(u32, u64), Vec<u8>>,
    meta: BTreeMap<(u32, String), Vec<u8>>,
    /// Simulations make every write fail from some point on, as a broken disk would.
    failing: bool,
}

impl MemoryTables {
    fn apply(&mut self, op: Op) {
        match op {
            Op::Append { group, entries } => {
                for (index, bytes) in entries {
                    self.log.insert((group, index), bytes);
                }
            }
            Op::Put { group, key, value } => {
                self.meta.insert((group, key.to_owned()), value);
            }
            Op::Truncate { group, from } => {
                self.log.retain(|(g, i), _| *g != group || *i < from);
            }
            Op::Purge { group, upto } => {
                self.log.retain(|(g, i), _| *g != group || *i > upto);
            }
        }
    }
}

impl Disk {
    pub fn open(dir: &Path) -> Result<Arc<Disk>, DiskError> {
        std::fs::create_dir_all(dir).map_err(|source| DiskError::Dir { path: dir.display().to_string(), source })?;
        let db = Arc::new(Database::create(dir.join("rooms.redb"))?);
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        let (writes, queue) = channel();
        let writer_db = db.clone();
        let writer = std::thread::Builder::new()
            .name("room-log-writer".into())
            .spawn(move || write_loop(&writer_db, &queue))
            .map_err(|source| DiskError::Dir { path: dir.display().to_string(), source })?;
        Ok(Arc::new(Disk { backend: Backend::Redb { db, writes, writer: Some(writer) } }))
    }

    /// Tables in memory that outlive the node using them (simulated restarts with state).
    pub fn in_memory() -> Arc<Disk> {
        Arc::new(Disk { backend: Backend::Memory(Mutex::default()) })
    }

    fn memory(tables: &Mutex<MemoryTables>) -> std::sync::MutexGuard<'_, MemoryTables> {
        tables.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn meta(&self, group: u32, key: &str) -> Result<Option<Vec<u8>>, DiskError> {
        match &self.backend {
            Backend::Redb { db, .. } => {
                let txn = db.begin_read()?;
                let table = txn.open_table(META)?;
                Ok(table.get((group, key))?.map(|v| v.value().to_vec()))
            }
            Backend::Memory(tables) => Ok(Self::memory(tables).meta.get(&(group, key.to_owned())).cloned()),
        }
    }

    fn log_entries(&self, group: u32) -> Result<Vec<Vec<u8>>, DiskError> {
        match &self.backend {
            Backend::Redb { db, .. } => {
                let txn = db.begin_read()?;
                let table = txn.open_table(LOG)?;
                let mut rows = Vec::new();
                for row in table.range((group, 0)..=(group, u64::MAX))? {
                    rows.push(row?.1.value().to_vec());
                }
                Ok(rows)
            }
            Backend::Memory(tables) => {
                Ok(Self::memory(tables).log.range((group, 0)..=(group, u64::MAX)).map(|(_, v)| v.clone()).collect())
            }
        }
    }

    /// This node's Raft id, made by `create` on the first start and kept from then on.
    pub fn identity(&self, create: impl FnOnce() -> u64) -> Result<u64, DiskError> {
        if let Some(bytes) = self.meta(NODE, "raft_id")? {
            return Ok(serde_json::from_slice(&bytes)?);
        }
        let id = create();
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit(Op::Put { group: NODE, key: "raft_id", value: serde_json::to_vec(&id)? }, Done::Sync(tx));
        rx.recv().unwrap_or_else(|_| Err(DiskError::Stopped.to_string())).map_err(DiskError::Write)?;
        Ok(id)
    }

    pub fn load(&self, group: u32) -> Result<Loaded, DiskError> {
        let decode = |key: &str| -> Result<Option<Vec<u8>>, DiskError> { self.meta(group, key) };
        let mut loaded = Loaded {
            vote: decode("vote")?.map(|b| serde_json::from_slice(&b)).transpose()?,
            committed: decode("committed")?.map(|b| serde_json::from_slice(&b)).transpose()?,
            purged: decode("purged")?.map(|b| serde_json::from_slice(&b)).transpose()?,
            ..Loaded::default()
        };
        if let (Some(meta), Some(data)) = (decode("snapshot_meta")?, decode("snapshot")?) {
            loaded.snapshot = Some((serde_json::from_slice(&meta)?, data));
        }
        for bytes in self.log_entries(group)? {
            loaded.entries.push(serde_json::from_slice(&bytes)?);
        }
        Ok(loaded)
    }

    fn submit(&self, op: Op, done: Done) {
        match &self.backend {
            Backend::Redb { writes, .. } => {
                if let Err(failed) = writes.send((op, done)) {
                    failed.0.1.finish(&Err(DiskError::Stopped.to_string()));
                }
            }
            Backend::Memory(tables) => {
                let mut tables = Self::memory(tables);
                if tables.failing {
                    drop(tables);
                    done.finish(&Err("simulated disk failure".to_owned()));
                    return;
                }
                tables.apply(op);
                drop(tables);
                done.finish(&Ok(()));
            }
        }
    }

    /// From now on every write fails (in-memory tables only).
    #[cfg(test)]
    pub fn fail_writes(&self) {
        if let Backend::Memory(tables) = &self.backend {
            Self::memory(tables).failing = true;
        }
    }

    /// Queues entries; `done` fires once they are durable.
    pub fn append(&self, group: u32, entries: &[Entry], done: Done) {
        let encoded = entries.iter().map(|e| (e.log_id.index, serde_json::to_vec(e).unwrap_or_default())).collect();
        self.submit(Op::Append { group, entries: encoded }, done);
    }

    pub fn put(&self, group: u32, key: &'static str, value: &impl serde::Serialize, done: Done) {
        self.submit(Op::Put { group, key, value: serde_json::to_vec(value).unwrap_or_default() }, done);
    }

    pub fn put_raw(&self, group: u32, key: &'static str, value: Vec<u8>, done: Done) {
        self.submit(Op::Put { group, key, value }, done);
    }

    pub fn truncate(&self, group: u32, from: u64, done: Done) {
        self.submit(Op::Truncate { group, from }, done);
    }

    pub fn purge(&self, group: u32, upto: u64, done: Done) {
        self.submit(Op::Purge { group, upto }, done);
    }

    /// Runs `op` and waits until it is durable.
    pub async fn durably(&self, op: impl FnOnce(&Disk, Done)) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        op(self, Done::Notify(tx));
        rx.await.unwrap_or_else(|_| Err(DiskError::Stopped.to_string()))
    }
}

impl Drop for Disk {
    /// Finishes the queued writes and closes the database, so it can be opened again at once.
    fn drop(&mut self) {
        if let Backend::Redb { writes, writer, .. } = &mut self.backend {
            drop(std::mem::replace(writes, channel().0));
            if let Some(writer) = writer.take() {
                let _ = writer.join();
            }
        }
    }
}

fn write_loop(db: &Database, queue: &Receiver<(Op, Done)>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (ops, dones): (Vec<Op>, Vec<Done>) = batch.into_iter().unzip();
        let started = std::time::Instant::now();
        let count = ops.len();
        let result = write_batch(db, ops).map_err(|e| e.to_string());
        tracing::trace!(count, took = ?started.elapsed(), "room log write");
        if let Err(err) = &result {
            tracing::error!(%err, "writing the room logs failed");
        }
        for done in dones {
            done.finish(&result);
        }
    }
}

fn write_batch(db: &Database, ops: Vec<Op>) -> Result<(), DiskError> {
    let txn = db.begin_write()?;
    {
        let mut log = txn.open_table(LOG)?;
        let mut meta = txn.open_table(META)?;
        for op in ops {
            match op {
                Op::Append { group, entries } => {
                    for (index, bytes) in entries {
                        log.insert((group, index), bytes.as_slice())?;
                    }
                }
                Op::Put { group, key, value } => {
                    meta.insert((group, key), value.as_slice())?;
                }
                Op::Truncate { group, from } => {
                    log.retain_in((group, from)..=(group, u64::MAX), |_, _| false)?;
                }
                Op::Purge { group, upto } => {
                    log.retain_in((group, 0)..=(group, upto), |_, _| false)?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload, LogId};

    use super::*;
    use crate::hub::log::Command;

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 7), index),
            payload: EntryPayload::Normal(vec![Command::Open { room: format!("r{index}"), epoch: "e".into() }]),
        }
    }

    async fn roundtrip(disk: &Arc<Disk>) {
        let id = disk.identity(|| 42).unwrap();
        assert_eq!(disk.identity(|| 7).unwrap(), id, "the identity is made once");
        let entries: Vec<Entry> = (1..=10).map(entry).collect();
        disk.durably(|d, done| d.append(3, &entries, done)).await.unwrap();
        disk.durably(|d, done| d.truncate(3, 9, done)).await.unwrap();
        disk.durably(|d, done| d.purge(3, 2, done)).await.unwrap();
        let vote = Vote::new(4, 9);
        disk.durably(|d, done| d.put(3, "vote", &vote, done)).await.unwrap();
    }

    fn check(loaded: &Loaded) {
        let indexes: Vec<u64> = loaded.entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (3..=8).collect::<Vec<_>>(), "truncated from 9, purged up to 2");
        assert_eq!(loaded.vote, Some(Vote::new(4, 9)));
    }

    #[tokio::test]
    async fn redb_keeps_entries_votes_and_identity_across_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let disk = Disk::open(dir.path()).unwrap();
            roundtrip(&disk).await;
            check(&disk.load(3).unwrap());
            assert!(disk.load(4).unwrap().entries.is_empty(), "groups are separate");
        }
        let reopened = Disk::open(dir.path()).unwrap();
        check(&reopened.load(3).unwrap());
        assert_eq!(reopened.identity(|| 1).unwrap(), 42);
    }

    #[tokio::test]
    async fn the_memory_backend_behaves_the_same() {
        let disk = Disk::in_memory();
        roundtrip(&disk).await;
        check(&disk.load(3).unwrap());
    }
}
