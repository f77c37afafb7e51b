//! The on-disk room logs (`cluster.storage = "disk"`): one redb database under
//! `cluster.data_dir` for every group's log entries, vote and commit index, plus the node's Raft
//! identity, and a second one for the groups' latest snapshots. Each database has one writer
//! thread that applies every pending write in a single transaction and fsyncs once (group
//! commit); Raft hears an append is durable only after that commit. A snapshot (hundreds of KB)
//! or the deletion of thousands of purged entries in the log's transaction stalled every group's
//! appends for 10–36 ms (docs/benchmarks.md), so snapshots commit beside the log, and purged
//! entries are deleted a small chunk at a time while the log writer is idle. Reads happen once,
//! at start: the log stores keep an in-memory copy.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, TryRecvError, channel};
use std::sync::{Arc, Mutex};

use openraft::storage::LogFlushed;
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use super::types::{Entry, LogId, SnapshotMeta, TypeConfig, Vote};

const LOG: TableDefinition<(u32, u64), &[u8]> = TableDefinition::new("log");
const META: TableDefinition<(u32, &str), &[u8]> = TableDefinition::new("meta");
/// The node-wide rows of `META` use this group number.
const NODE: u32 = u32::MAX;
/// Writes gathered into one transaction at most.
const BATCH: usize = 1024;
/// Purged entries deleted per idle-time transaction: few enough that an append arriving
/// meanwhile waits well under a millisecond.
const PURGE_CHUNK: usize = 64;

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
db_error_from!(
    redb::DatabaseError,
    redb::TransactionError,
    redb::TableError,
    redb::StorageError,
    redb::CommitError,
    redb::SetDurabilityError
);

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
    /// Records `purged` (the encoded last purged log id) and deletes the entries up to `upto`,
    /// in the background on disk: `load` skips them until they are gone.
    Purge {
        group: u32,
        upto: u64,
        purged: Vec<u8>,
    },
    /// Replaces the group's snapshot, its data and meta in one commit.
    Snapshot {
        group: u32,
        meta: Vec<u8>,
        data: Vec<u8>,
    },
}

/// A snapshot's meta and data, encoded.
type EncodedSnapshot = (Vec<u8>, Vec<u8>);

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
        log: Writer,
        snapshots: Writer,
    },
    /// The same tables in memory, written synchronously: "disk" for deterministic simulations,
    /// where a restarted node must find what it wrote.
    Memory(Mutex<MemoryTables>),
}

/// One redb database and the thread that writes it.
struct Writer {
    db: Arc<Database>,
    writes: Sender<(Op, Done)>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Writer {
    fn open(path: &Path, thread_name: &str) -> Result<Writer, DiskError> {
        let db = Arc::new(Database::create(path)?);
        let txn = db.begin_write()?;
        txn.open_table(LOG)?;
        txn.open_table(META)?;
        txn.commit()?;
        let (writes, queue) = channel();
        let writer_db = db.clone();
        let thread = std::thread::Builder::new()
            .name(thread_name.into())
            .spawn(move || write_loop(&writer_db, &queue))
            .map_err(|source| DiskError::Dir { path: path.display().to_string(), source })?;
        Ok(Writer { db, writes, thread: Some(thread) })
    }

    fn meta(&self, group: u32, key: &str) -> Result<Option<Vec<u8>>, DiskError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(META)?;
        Ok(table.get((group, key))?.map(|v| v.value().to_vec()))
    }

    fn log_entries(&self, group: u32) -> Result<Vec<Vec<u8>>, DiskError> {
        let txn = self.db.begin_read()?;
        let table = txn.open_table(LOG)?;
        let mut rows = Vec::new();
        for row in table.range((group, 0)..=(group, u64::MAX))? {
            rows.push(row?.1.value().to_vec());
        }
        Ok(rows)
    }
}

impl Drop for Writer {
    /// Finishes the queued writes and closes the database, so it can be opened again at once.
    fn drop(&mut self) {
        drop(std::mem::replace(&mut self.writes, channel().0));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
            Op::Purge { group, upto, purged } => {
                self.meta.insert((group, "purged".to_owned()), purged);
                self.log.retain(|(g, i), _| *g != group || *i > upto);
            }
            Op::Snapshot { group, meta, data } => {
                self.meta.insert((group, "snapshot".to_owned()), data);
                self.meta.insert((group, "snapshot_meta".to_owned()), meta);
            }
        }
    }
}

impl Disk {
    pub fn open(dir: &Path) -> Result<Arc<Disk>, DiskError> {
        std::fs::create_dir_all(dir).map_err(|source| DiskError::Dir { path: dir.display().to_string(), source })?;
        let log = Writer::open(&dir.join("rooms.redb"), "room-log-writer")?;
        let snapshots = Writer::open(&dir.join("snapshots.redb"), "snapshot-writer")?;
        Ok(Arc::new(Disk { backend: Backend::Redb { log, snapshots } }))
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
            Backend::Redb { log, .. } => log.meta(group, key),
            Backend::Memory(tables) => Ok(Self::memory(tables).meta.get(&(group, key.to_owned())).cloned()),
        }
    }

    /// The group's snapshot as (meta, data). Data directories written before snapshots had a
    /// database of their own keep it in the log's.
    fn snapshot(&self, group: u32) -> Result<Option<EncodedSnapshot>, DiskError> {
        if let Backend::Redb { snapshots, .. } = &self.backend
            && let Some(found) = snapshots.meta(group, "snapshot_meta")?.zip(snapshots.meta(group, "snapshot")?)
        {
            return Ok(Some(found));
        }
        Ok(self.meta(group, "snapshot_meta")?.zip(self.meta(group, "snapshot")?))
    }

    fn log_entries(&self, group: u32) -> Result<Vec<Vec<u8>>, DiskError> {
        match &self.backend {
            Backend::Redb { log, .. } => log.log_entries(group),
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
        if let Some((meta, data)) = self.snapshot(group)? {
            loaded.snapshot = Some((serde_json::from_slice(&meta)?, data));
        }
        let purged_upto = loaded.purged.map(|id| id.index);
        let mut unfinished_purge = false;
        for bytes in self.log_entries(group)? {
            let entry: Entry = serde_json::from_slice(&bytes)?;
            if purged_upto.is_some_and(|upto| entry.log_id.index <= upto) {
                unfinished_purge = true;
            } else {
                loaded.entries.push(entry);
            }
        }
        if let (true, Some(purged)) = (unfinished_purge, loaded.purged) {
            // The node stopped before the purged entries were all deleted: finish the job.
            self.purge(group, purged, Done::Nothing);
        }
        Ok(loaded)
    }

    fn submit(&self, op: Op, done: Done) {
        match &self.backend {
            Backend::Redb { log, snapshots } => {
                let writer = if matches!(op, Op::Snapshot { .. }) { snapshots } else { log };
                if let Err(failed) = writer.writes.send((op, done)) {
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

    /// Replaces the group's snapshot; `done` fires once meta and data are durable together.
    pub fn put_snapshot(&self, group: u32, meta: Vec<u8>, data: Vec<u8>, done: Done) {
        self.submit(Op::Snapshot { group, meta, data }, done);
    }

    pub fn truncate(&self, group: u32, from: u64, done: Done) {
        self.submit(Op::Truncate { group, from }, done);
    }

    /// Records `purged` as the group's last purged entry (durable when `done` fires) and
    /// deletes the entries up to it.
    pub fn purge(&self, group: u32, purged: LogId, done: Done) {
        let record = serde_json::to_vec(&Some(purged)).unwrap_or_default();
        self.submit(Op::Purge { group, upto: purged.index, purged: record }, done);
    }

    /// Runs `op` and waits until it is durable.
    pub async fn durably(&self, op: impl FnOnce(&Disk, Done)) -> Result<(), String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        op(self, Done::Notify(tx));
        rx.await.unwrap_or_else(|_| Err(DiskError::Stopped.to_string()))
    }

    /// Whether entries up to a purge are still stored (deletion is deferred).
    #[cfg(test)]
    fn stored_indexes(&self, group: u32) -> Vec<u64> {
        let Backend::Redb { log, .. } = &self.backend else { return Vec::new() };
        let txn = log.db.begin_read().unwrap();
        let table = txn.open_table(LOG).unwrap();
        table.range((group, 0)..=(group, u64::MAX)).unwrap().map(|row| row.unwrap().0.value().1).collect()
    }
}

fn write_loop(db: &Database, queue: &Receiver<(Op, Done)>) {
    // Per group, the highest purged index whose entries may still be in the table.
    let mut purges: HashMap<u32, u64> = HashMap::new();
    loop {
        let first = if purges.is_empty() {
            match queue.recv() {
                Ok(first) => first,
                Err(_) => return,
            }
        } else {
            match queue.try_recv() {
                Ok(first) => first,
                Err(TryRecvError::Empty) => {
                    if let Err(err) = delete_purged_chunk(db, &mut purges) {
                        tracing::warn!(%err, "deleting purged room log entries failed; the next start retries");
                        purges.clear();
                    }
                    continue;
                }
                Err(TryRecvError::Disconnected) => return,
            }
        };
        let mut batch = vec![first];
        while batch.len() < BATCH {
            match queue.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let (ops, dones): (Vec<Op>, Vec<Done>) = batch.into_iter().unzip();
        // Nobody waits on hints such as the commit index: they ride on the next durable
        // commit instead of costing an fsync each (they were half of all commits).
        let durable = dones.iter().any(|done| !matches!(done, Done::Nothing));
        let started = std::time::Instant::now();
        let shape = tracing::enabled!(tracing::Level::TRACE).then(|| BatchShape::of(&ops, durable));
        let result = write_batch(db, ops, durable, &mut purges).map_err(|e| e.to_string());
        if let Some(shape) = shape {
            tracing::trace!(?shape, took = ?started.elapsed(), "room log write");
        }
        if let Err(err) = &result {
            tracing::error!(%err, "writing the room logs failed");
        }
        for done in dones {
            done.finish(&result);
        }
    }
}

/// Deletes up to `PURGE_CHUNK` purged entries of one group without an fsync: the next durable
/// commit carries the deletion, and a crash before it only leaves entries that `load` skips.
fn delete_purged_chunk(db: &Database, purges: &mut HashMap<u32, u64>) -> Result<(), DiskError> {
    let Some((&group, &upto)) = purges.iter().next() else { return Ok(()) };
    let started = std::time::Instant::now();
    let mut txn = db.begin_write()?;
    txn.set_durability(redb::Durability::None)?;
    let deleted = {
        let mut log = txn.open_table(LOG)?;
        let mut doomed = Vec::with_capacity(PURGE_CHUNK);
        for row in log.range((group, 0)..=(group, upto))?.take(PURGE_CHUNK) {
            doomed.push(row?.0.value().1);
        }
        for index in &doomed {
            log.remove((group, *index))?;
        }
        doomed.len()
    };
    txn.commit()?;
    if deleted < PURGE_CHUNK {
        purges.remove(&group);
    }
    tracing::trace!(group, deleted, took = ?started.elapsed(), "purged room log entries deleted");
    Ok(())
}

/// What one commit carried, for the trace that finds slow commits.
#[derive(Debug, Default)]
#[allow(dead_code)] // read through Debug only
struct BatchShape {
    durable: bool,
    ops: usize,
    entries: usize,
    bytes: usize,
    puts: Vec<&'static str>,
    truncates: usize,
    purges: usize,
}

impl BatchShape {
    fn of(ops: &[Op], durable: bool) -> BatchShape {
        let mut shape = BatchShape { durable, ops: ops.len(), ..BatchShape::default() };
        for op in ops {
            match op {
                Op::Append { entries, .. } => {
                    shape.entries += entries.len();
                    shape.bytes += entries.iter().map(|(_, b)| b.len()).sum::<usize>();
                }
                Op::Put { key, value, .. } => {
                    shape.puts.push(*key);
                    shape.bytes += value.len();
                }
                Op::Truncate { .. } => shape.truncates += 1,
                Op::Purge { .. } => shape.purges += 1,
                Op::Snapshot { meta, data, .. } => {
                    shape.puts.push("snapshot");
                    shape.bytes += meta.len() + data.len();
                }
            }
        }
        shape
    }
}

fn write_batch(db: &Database, ops: Vec<Op>, durable: bool, purges: &mut HashMap<u32, u64>) -> Result<(), DiskError> {
    let mut txn = db.begin_write()?;
    if !durable {
        txn.set_durability(redb::Durability::None)?;
    }
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
                Op::Purge { group, upto, purged } => {
                    meta.insert((group, "purged"), purged.as_slice())?;
                    let pending = purges.entry(group).or_insert(upto);
                    *pending = (*pending).max(upto);
                }
                Op::Snapshot { group, meta: snapshot_meta, data } => {
                    meta.insert((group, "snapshot"), data.as_slice())?;
                    meta.insert((group, "snapshot_meta"), snapshot_meta.as_slice())?;
                }
            }
        }
    }
    txn.commit()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use openraft::{CommittedLeaderId, EntryPayload};

    use super::*;
    use crate::hub::log::Command;

    fn log_id(index: u64) -> LogId {
        LogId::new(CommittedLeaderId::new(1, 7), index)
    }

    fn entry(index: u64) -> Entry {
        Entry {
            log_id: log_id(index),
            payload: EntryPayload::Normal(vec![Command::Open { room: format!("r{index}"), epoch: "e".into() }]),
        }
    }

    async fn roundtrip(disk: &Arc<Disk>) {
        let id = disk.identity(|| 42).unwrap();
        assert_eq!(disk.identity(|| 7).unwrap(), id, "the identity is made once");
        let entries: Vec<Entry> = (1..=10).map(entry).collect();
        disk.durably(|d, done| d.append(3, &entries, done)).await.unwrap();
        disk.durably(|d, done| d.truncate(3, 9, done)).await.unwrap();
        disk.durably(|d, done| d.purge(3, log_id(2), done)).await.unwrap();
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

    #[tokio::test]
    async fn purged_entries_are_skipped_at_once_and_deleted_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let entries: Vec<Entry> = (1..=300).map(entry).collect();
        {
            let disk = Disk::open(dir.path()).unwrap();
            disk.durably(|d, done| d.append(5, &entries, done)).await.unwrap();
            disk.durably(|d, done| d.purge(5, log_id(250), done)).await.unwrap();
            // Stopping now may leave purged entries on disk (they go a chunk at a time).
        }
        let disk = Disk::open(dir.path()).unwrap();
        let loaded = disk.load(5).unwrap();
        let indexes: Vec<u64> = loaded.entries.iter().map(|e| e.log_id.index).collect();
        assert_eq!(indexes, (251..=300).collect::<Vec<_>>());
        assert_eq!(loaded.purged, Some(log_id(250)));
        // The reopened database finishes an interrupted purge by itself.
        let mut stored = disk.stored_indexes(5);
        for _ in 0..200 {
            if stored.first() == Some(&251) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            stored = disk.stored_indexes(5);
        }
        assert_eq!(stored, (251..=300).collect::<Vec<_>>(), "purged entries deleted from the file");
    }

    #[tokio::test]
    async fn snapshots_live_beside_the_log_and_old_data_directories_keep_theirs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let disk = Disk::open(dir.path()).unwrap();
            // A data directory from before snapshots had their own database.
            disk.durably(|d, done| {
                d.submit(Op::Put { group: 1, key: "snapshot", value: b"old".to_vec() }, Done::Nothing);
                d.submit(Op::Put { group: 1, key: "snapshot_meta", value: b"old-meta".to_vec() }, done);
            })
            .await
            .unwrap();
            disk.durably(|d, done| d.put_snapshot(2, b"meta".to_vec(), b"data".to_vec(), done)).await.unwrap();
        }
        let disk = Disk::open(dir.path()).unwrap();
        assert_eq!(disk.snapshot(1).unwrap(), Some((b"old-meta".to_vec(), b"old".to_vec())));
        assert_eq!(disk.snapshot(2).unwrap(), Some((b"meta".to_vec(), b"data".to_vec())));
        assert_eq!(disk.meta(2, "snapshot").unwrap(), None, "not in the log's database");
        disk.durably(|d, done| d.put_snapshot(1, b"new-meta".to_vec(), b"new".to_vec(), done)).await.unwrap();
        assert_eq!(disk.snapshot(1).unwrap(), Some((b"new-meta".to_vec(), b"new".to_vec())), "the newer one wins");
    }
}
