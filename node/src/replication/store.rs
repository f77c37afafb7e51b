//! One group's Raft log: entries, vote and commit index in memory, written through to the
//! on-disk database when the node has one (`disk`). Raft hears that an append, a vote or a
//! truncation is done only once it is durable there.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::ops::RangeBounds;
use std::sync::{Arc, Mutex, MutexGuard};

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, RaftLogReader, StorageIOError};

use super::disk::{Disk, Done, Loaded};
use super::types::{Entry, LogId, StorageError, TypeConfig, Vote};

#[derive(Default)]
struct LogData {
    entries: BTreeMap<u64, Entry>,
    vote: Option<Vote>,
    committed: Option<LogId>,
    purged: Option<LogId>,
}

#[derive(Clone)]
pub struct LogStore {
    group: u32,
    data: Arc<Mutex<LogData>>,
    disk: Option<Arc<Disk>>,
}

fn io_error(source: String) -> StorageError {
    StorageIOError::write_logs(AnyError::error(source)).into()
}

impl LogStore {
    /// A log for `group`, starting from what `loaded` holds (nothing, for memory storage).
    pub fn new(group: u32, disk: Option<Arc<Disk>>, loaded: &mut Loaded) -> LogStore {
        let data = LogData {
            entries: std::mem::take(&mut loaded.entries).into_iter().map(|e| (e.log_id.index, e)).collect(),
            vote: loaded.vote,
            committed: loaded.committed,
            purged: loaded.purged,
        };
        LogStore { group, data: Arc::new(Mutex::new(data)), disk }
    }

    fn lock(&self) -> MutexGuard<'_, LogData> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether this log has ever held anything (a vote, an entry, a purge).
    pub fn is_pristine(&self) -> bool {
        let data = self.lock();
        data.vote.is_none() && data.entries.is_empty() && data.purged.is_none()
    }

    async fn durably(&self, op: impl FnOnce(&Disk, Done)) -> Result<(), StorageError> {
        match &self.disk {
            Some(disk) => disk.durably(op).await.map_err(io_error),
            None => Ok(()),
        }
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError> {
        Ok(self.lock().entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError> {
        let data = self.lock();
        let last = data.entries.values().next_back().map(|e| e.log_id).or(data.purged);
        Ok(LogState { last_purged_log_id: data.purged, last_log_id: last })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), StorageError> {
        self.lock().vote = Some(*vote);
        let group = self.group;
        // A vote must be durable before it is answered: a node that forgets it may vote twice.
        self.durably(|disk, done| disk.put(group, "vote", vote, done)).await
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, StorageError> {
        Ok(self.lock().vote)
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), StorageError> {
        self.lock().committed = committed;
        if let Some(disk) = &self.disk {
            // Only a hint for replay after a restart: no need to wait for it.
            disk.put(self.group, "committed", &committed, Done::Nothing);
        }
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, StorageError> {
        Ok(self.lock().committed)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        {
            let mut data = self.lock();
            for entry in &entries {
                data.entries.insert(entry.log_id.index, entry.clone());
            }
        }
        match &self.disk {
            Some(disk) => disk.append(self.group, &entries, Done::Flushed(callback)),
            None => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId) -> Result<(), StorageError> {
        self.lock().entries.split_off(&log_id.index);
        let group = self.group;
        self.durably(|disk, done| disk.truncate(group, log_id.index, done)).await
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), StorageError> {
        {
            let mut data = self.lock();
            data.purged = Some(log_id);
            data.entries = data.entries.split_off(&(log_id.index + 1));
        }
        let group = self.group;
        self.durably(|disk, done| disk.purge(group, log_id, done)).await
    }
}
