//! Client sessions kept on every node: a client that reconnects anywhere with its session token
//! is rejoined to its rooms from where it was. Records are small (rooms and positions) and
//! replicated whole on every change; the newest update wins.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use crate::protocol::StreamPosition;

/// What a reconnecting client's session token brings back: its rooms and where it was.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub id: String,
    pub user_id: String,
    pub rooms: Vec<(String, Option<StreamPosition>)>,
    /// Unix milliseconds of the last update, for expiry.
    pub updated: u64,
    /// The session was moved to another node once to even out the cluster; it is not moved again.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub moved: bool,
}

/// How long a session outlives its last update (milliseconds).
pub const SESSION_TTL_MS: u64 = 10 * 60 * 1000;

#[derive(Default)]
pub struct Sessions {
    records: Mutex<HashMap<String, SessionRecord>>,
}

impl Sessions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, SessionRecord>> {
        self.records.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Stores a record unless a newer one of the same session is known.
    pub fn merge(&self, record: SessionRecord) {
        let mut records = self.lock();
        match records.get(&record.id) {
            Some(held) if held.updated > record.updated => {}
            _ => {
                records.insert(record.id.clone(), record);
            }
        }
    }

    /// The session `id` if it belongs to `user_id`.
    pub fn get(&self, id: &str, user_id: &str) -> Option<SessionRecord> {
        self.lock().get(id).filter(|r| r.user_id == user_id).cloned()
    }

    pub fn all(&self) -> Vec<SessionRecord> {
        self.lock().values().cloned().collect()
    }

    pub fn expire(&self, now_ms: u64) {
        self.lock().retain(|_, r| r.updated + SESSION_TTL_MS > now_ms);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, updated: u64, rooms: &[&str]) -> SessionRecord {
        SessionRecord {
            id: id.into(),
            user_id: "u1".into(),
            rooms: rooms.iter().map(|r| (r.to_string(), None)).collect(),
            updated,
            moved: false,
        }
    }

    #[test]
    fn newest_update_wins_and_owner_is_checked() {
        let sessions = Sessions::default();
        sessions.merge(record("s", 10, &["a", "b"]));
        sessions.merge(record("s", 5, &["stale"]));
        assert_eq!(sessions.get("s", "u1").map(|r| r.rooms.len()), Some(2));
        assert!(sessions.get("s", "someone-else").is_none());
        sessions.expire(10 + SESSION_TTL_MS);
        assert!(sessions.get("s", "u1").is_none());
    }
}
