//! The chat core: rooms, sessions, dispatch of protocol frames, admission and drain. It knows
//! nothing of HTTP or WebSocket libraries; connections arrive through `transport::Connection`.

pub mod outbox;
pub mod room;
mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::auth::{Authenticator, Identity, KeyError};
use crate::cluster::wire::PeerFrame;
use crate::cluster::{Cluster, PeerHandler};
use crate::config::NodeConfig;
use crate::metrics::Metrics;
use crate::replication::Replication;
use crate::replication::sessions::Sessions;
use crate::transport::Connection;

use outbox::ConnSignal;
use room::{Room, new_epoch};

pub(crate) fn unix_millis() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

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
    /// Every open connection's signal, to ask them all to close when draining.
    connections: Mutex<HashMap<u64, Arc<ConnSignal>>>,
    next_conn: AtomicU64,
    open: AtomicUsize,
    draining: AtomicBool,
    /// Present when the node is part of a cluster.
    replication: Option<Replication>,
    sessions: Sessions,
    /// Publish ids of a node without a cluster.
    next_pid: AtomicU64,
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
    /// A hub on its own (`cluster` is `None`) or sharing rooms with the cluster's other nodes.
    pub fn new(
        node_id: String,
        config: NodeConfig,
        metrics: Arc<Metrics>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Arc<Hub>, KeyError> {
        let auth = Authenticator::from_config(&config.auth)?;
        let hub = Arc::new(Hub {
            node_id,
            config,
            auth,
            metrics,
            rooms: RwLock::default(),
            connections: Mutex::default(),
            next_conn: AtomicU64::new(1),
            open: AtomicUsize::new(0),
            draining: AtomicBool::new(false),
            replication: cluster.clone().map(Replication::new),
            sessions: Sessions::default(),
            next_pid: AtomicU64::new(1),
        });
        if let Some(cluster) = cluster {
            let handler: std::sync::Weak<dyn PeerHandler> = Arc::downgrade(&hub) as _;
            cluster.set_handler(handler);
        }
        Ok(hub)
    }

    pub fn replication(&self) -> Option<&Replication> {
        self.replication.as_ref()
    }

    pub fn sessions(&self) -> &Sessions {
        &self.sessions
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

    /// Runs one authenticated client connection until it ends; `resume` is the session token
    /// of an earlier connection of the same user, whose rooms it rejoins.
    pub async fn serve<C: Connection>(
        self: Arc<Self>,
        conn: C,
        identity: Identity,
        resume: Option<String>,
        permit: Permit,
    ) {
        session::run(self, conn, identity, resume, permit).await
    }

    fn next_publish_id(&self) -> crate::cluster::wire::PublishId {
        let seq = self.next_pid.fetch_add(1, Ordering::Relaxed);
        crate::cluster::wire::PublishId { node: self.node_id.clone(), seq }
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::Acquire)
    }

    pub fn room_count(&self) -> usize {
        self.rooms.read().map(|r| r.len()).unwrap_or(0)
    }

    pub(crate) fn existing_room(&self, name: &str) -> Option<Arc<Room>> {
        self.rooms.read().ok().and_then(|r| r.get(name).cloned())
    }

    pub(crate) fn rooms_snapshot(&self) -> Vec<Arc<Room>> {
        self.rooms.read().map(|r| r.values().cloned().collect()).unwrap_or_default()
    }

    /// The room named `name`, created on first use. Alone, a node starts the room's stream;
    /// in a cluster the stream comes from the room's owner.
    pub(crate) fn room(&self, name: &str) -> Arc<Room> {
        if let Some(room) = self.existing_room(name) {
            return room;
        }
        let mut rooms = self.rooms.write().unwrap_or_else(|p| p.into_inner());
        let room = rooms.entry(name.to_owned()).or_insert_with(|| {
            let epoch = self.replication.is_none().then(new_epoch);
            Arc::new(Room::new(name.to_owned(), epoch, self.config.history.size, self.metrics.clone()))
        });
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
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).insert(id, signal);
        id
    }

    fn unregister(&self, id: u64) {
        self.connections.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
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
            self.connections.lock().unwrap_or_else(|p| p.into_inner()).values().cloned().collect();
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

impl PeerHandler for Hub {
    fn on_link_up(&self, peer: &str) {
        if let Some(replication) = &self.replication {
            replication.on_link_up(self, peer);
        }
    }

    fn on_link_down(&self, peer: &str) {
        if let Some(replication) = &self.replication {
            replication.on_link_down(self, peer);
        }
    }

    fn on_frame(&self, peer: &str, frame: PeerFrame) {
        if let Some(replication) = &self.replication {
            replication.on_frame(self, peer, frame);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests;
