//! The chat core: rooms, sessions, dispatch of protocol frames, admission and drain. It knows
//! nothing of HTTP or WebSocket libraries; connections arrive through `transport::Connection`.

pub mod outbox;
pub mod room;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use crate::auth::{Authenticator, Identity, KeyError};
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::transport::Connection;

use outbox::ConnSignal;
use room::Room;

/// Why a new connection is not admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("the node is draining; connect to another node")]
    Draining,
    #[error("the node holds its maximum number of connections")]
    Full,
}

impl Refusal {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Draining => "draining",
            Self::Full => "too_many_connections",
        }
    }
}

pub struct Hub {
    node_id: String,
    config: NodeConfig,
    auth: Authenticator,
    metrics: Arc<Metrics>,
    rooms: RwLock<HashMap<String, Arc<Room>>>,
    sessions: Mutex<HashMap<u64, Arc<ConnSignal>>>,
    next_conn: AtomicU64,
    open: AtomicUsize,
    draining: AtomicBool,
}

/// A reserved connection slot; released when dropped.
pub struct Permit {
    hub: Arc<Hub>,
}

impl Drop for Permit {
    fn drop(&mut self) {
        self.hub.open.fetch_sub(1, Ordering::AcqRel);
        self.hub.metrics.connections.dec();
    }
}

impl Hub {
    pub fn new(node_id: String, config: NodeConfig, metrics: Arc<Metrics>) -> Result<Arc<Hub>, KeyError> {
        let auth = Authenticator::from_config(&config.auth)?;
        Ok(Arc::new(Hub {
            node_id,
            config,
            auth,
            metrics,
            rooms: RwLock::default(),
            sessions: Mutex::default(),
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
        }))
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn authenticator(&self) -> &Authenticator {
        &self.auth
    }

    /// Reserves a slot for a new connection, before any handshake work is done.
    pub fn admit(self: &Arc<Self>) -> Result<Permit, Refusal> {
        if self.is_draining() {
            return Err(Refusal::Draining);
        }
        let max = self.config.limits.max_connections;
        self.open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
            .map_err(|_| Refusal::Full)?;
        self.metrics.connections.inc();
        self.metrics.connections_accepted.inc();
        Ok(Permit { hub: self.clone() })
    }

    /// Runs one authenticated client connection until it ends.
    pub async fn serve<C: Connection>(self: Arc<Self>, conn: C, identity: Identity, permit: Permit) {
        session::run(self, conn, identity, permit).await
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.read().map(|r| r.len()).unwrap_or(0)
    }

    /// The room named `name`, created on first use.
    fn room(&self, name: &str) -> Arc<Room> {
        if let Some(room) = self.rooms.read().ok().and_then(|r| r.get(name).cloned()) {
            return room;
        }
        let mut rooms = self.rooms.write().unwrap_or_else(|p| p.into_inner());
        let room =
            rooms.entry(name.to_owned()).or_insert_with(|| Arc::new(Room::new(name.to_owned(), self.metrics.clone())));
        let room = room.clone();
        self.metrics.rooms.set(rooms.len() as i64);
        room
    }

    /// Forgets rooms that have had no subscribers for `history.empty_room_ttl_secs`.
    pub fn sweep_rooms(&self, now: Instant) -> usize {
        let ttl = Duration::from_secs(self.config.history.empty_room_ttl_secs);
        let Some(cutoff) = now.checked_sub(ttl) else { return 0 };
        let mut rooms = self.rooms.write().unwrap_or_else(|p| p.into_inner());
        let before = rooms.len();
        rooms.retain(|_, room| !room.retire_if_idle_since(cutoff));
        self.metrics.rooms.set(rooms.len() as i64);
        before - rooms.len()
    }

    fn register(&self, signal: Arc<ConnSignal>) -> u64 {
        let id = self.next_conn.fetch_add(1, Ordering::Relaxed);
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).insert(id, signal);
        id
    }

    fn unregister(&self, id: u64) {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Stops admitting connections and joins; `/readyz` reports not ready from now on.
    pub fn start_draining(&self) {
        if !self.draining.swap(true, Ordering::AcqRel) {
            self.metrics.draining.set(1);
        }
    }

    /// Asks every connected client to reconnect elsewhere, at most `rate_per_sec` per second so
    /// the remaining nodes are not hit by a reconnect storm. Returns once all were asked.
    pub async fn disconnect_all(&self, rate_per_sec: u32) {
        let signals: Vec<Arc<ConnSignal>> =
            self.sessions.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
        let batch = (rate_per_sec as usize / 10).max(1);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        for chunk in signals.chunks(batch) {
            tick.tick().await;
            for signal in chunk {
                signal.close(crate::protocol::close::RECONNECT_ELSEWHERE);
            }
        }
    }
}

#[cfg(test)]
mod tests;
