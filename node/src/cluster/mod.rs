//! The mesh of peer links: which peers this node has discovered and which it is linked to.
//! Discovery (`discovery`) feeds addresses in, peer links (`link`) register themselves here.
//! After the authenticated handshake a link carries opaque text frames for the replication
//! layer ([`PeerHandler`]); who is a member of the cluster is decided there, not here.

pub mod auth;
pub mod discovery;
pub mod link;
pub mod seal;
pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::mpsc::UnboundedSender;
use tokio_tungstenite::tungstenite::Utf8Bytes;

use crate::auth::{KeyError, read_secret};
use crate::config::ClusterConfig;
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Secret(#[from] KeyError),
    #[error("the cluster secret must be at least 16 bytes")]
    ShortSecret,
}

/// Where a discovered peer address stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "state", content = "node_id", rename_all = "snake_case")]
pub enum AddrState {
    /// Not tried yet.
    New,
    Dialing,
    /// Linked to this node id.
    Linked(String),
    /// This id sorts lower than ours: it dials us.
    AwaitingDial(String),
    /// Our own address (the DNS answer includes us).
    Itself,
    Unreachable,
}

/// Frames a link may hold unwritten. A peer that falls this far behind is dropped (its task
/// sees it on the next heartbeat) and catches up on the next link, rather than growing the
/// queue without bound; meanwhile frames to it are refused as if it were not linked.
pub const MAX_QUEUED_FRAMES: usize = 65_536;

impl Link {
    fn queue(&self, text: Utf8Bytes) -> bool {
        if self.queued.load(Ordering::Acquire) >= MAX_QUEUED_FRAMES {
            return false;
        }
        // Counted before it can be written, so the writer's decrement never runs first.
        self.queued.fetch_add(1, Ordering::AcqRel);
        let queued = self.outbound.send(text).is_ok();
        if !queued {
            self.queued.fetch_sub(1, Ordering::AcqRel);
        }
        queued
    }
}

/// What the rest of the node does with peer traffic (the replication layer implements it).
pub trait PeerHandler: Send + Sync {
    fn on_link_up(&self, peer: &str);
    fn on_link_down(&self, peer: &str);
    fn on_frame(&self, peer: &str, text: &str);
}

struct Link {
    addr: String,
    generation: u64,
    since: Instant,
    rtt_us: Arc<AtomicU64>,
    /// Serialized frames for the link's task to write, in order.
    outbound: UnboundedSender<Utf8Bytes>,
    /// Frames queued and not yet written: the link's lag.
    queued: Arc<AtomicUsize>,
    /// Frames written so far (so a caller can wait for what it queued, not for an empty queue).
    written: Arc<AtomicU64>,
}

#[derive(Default)]
struct State {
    /// Ordered, so a broadcast reaches the peers in the same order every time.
    links: BTreeMap<String, Link>,
    discovered: HashMap<SocketAddr, AddrState>,
}

/// How long a replaced cluster secret is still accepted: kubelet updates each pod's copy of a
/// rotated Secret on its own schedule (about a minute), and links made meanwhile must hold.
pub const PREVIOUS_SECRET_GRACE: Duration = Duration::from_secs(600);

/// The cluster secret, and for [`PREVIOUS_SECRET_GRACE`] after it changed, the one before it.
struct Keyring {
    current: Vec<u8>,
    previous: Option<(Vec<u8>, Instant)>,
}

pub struct Cluster {
    node_id: String,
    config: ClusterConfig,
    keyring: RwLock<Keyring>,
    /// `ip:port` other nodes reach our peer port at.
    advertised: String,
    own_ip: Option<IpAddr>,
    state: Mutex<State>,
    generation: AtomicU64,
    metrics: Arc<Metrics>,
    handler: OnceLock<Weak<dyn PeerHandler>>,
    /// Slots for peer sockets that have not authenticated yet (see `link::accept`).
    handshakes: Arc<tokio::sync::Semaphore>,
}

/// Peer sockets allowed to be in their handshake at once; more are refused with 503.
pub const MAX_PENDING_HANDSHAKES: usize = 16;

/// A link as `/cluster` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct MemberStatus {
    pub node_id: String,
    pub addr: String,
    pub linked_for_ms: u64,
    pub rtt_ms: f64,
    /// Frames queued for the peer and not yet written.
    pub queued_frames: usize,
}

/// What `/cluster` returns.
#[derive(Debug, Clone, Serialize)]
pub struct ClusterStatus {
    pub node_id: String,
    pub peer_addr: String,
    pub links: Vec<MemberStatus>,
    pub discovered: Vec<(String, AddrState)>,
}

fn cluster_secret(config: &ClusterConfig) -> Result<Vec<u8>, ClusterError> {
    let secret = match (&config.secret_file, &config.secret) {
        (Some(path), _) => read_secret("cluster.secret_file", path)?,
        (None, Some(secret)) => secret.as_bytes().to_vec(),
        (None, None) => Vec::new(),
    };
    if secret.len() < 16 {
        return Err(ClusterError::ShortSecret);
    }
    Ok(secret)
}

impl Cluster {
    pub fn new(node_id: String, config: ClusterConfig, metrics: Arc<Metrics>) -> Result<Arc<Cluster>, ClusterError> {
        let secret = cluster_secret(&config)?;
        let own_ip = config
            .advertise_ip
            .or_else(|| std::env::var("POD_IP").ok().and_then(|ip| ip.parse().ok()))
            .or_else(|| Some(config.peer_listen.ip()).filter(|ip| !ip.is_unspecified()));
        let port = config.peer_listen.port();
        let advertised = own_ip.map_or_else(|| format!("{node_id}:{port}"), |ip| SocketAddr::new(ip, port).to_string());
        Ok(Arc::new(Cluster {
            node_id,
            config,
            keyring: RwLock::new(Keyring { current: secret, previous: None }),
            advertised,
            own_ip,
            state: Mutex::default(),
            generation: AtomicU64::new(0),
            metrics,
            handler: OnceLock::new(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES)),
        }))
    }

    /// A slot for one unauthenticated peer socket, held until its handshake ends.
    pub fn handshake_slot(&self) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.handshakes.clone().try_acquire_owned().ok()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// The secrets a handshake may use, the current one first.
    pub(crate) fn secrets(&self) -> Vec<Vec<u8>> {
        let keyring = self.keyring.read().unwrap_or_else(|p| p.into_inner());
        let previous = keyring.previous.as_ref().filter(|(_, since)| since.elapsed() < PREVIOUS_SECRET_GRACE);
        std::iter::once(keyring.current.clone()).chain(previous.map(|(key, _)| key.clone())).collect()
    }

    /// Re-reads `cluster.secret_file`: a changed secret becomes the current one and the old
    /// one stays accepted for [`PREVIOUS_SECRET_GRACE`], so a rotation (or a lost and
    /// regenerated peer Secret) never splits the cluster while the pods pick it up. An
    /// unreadable or short file keeps the secret in use.
    pub fn reload_secret(&self) {
        let Some(path) = &self.config.secret_file else { return };
        let fresh = match read_secret("cluster.secret_file", path) {
            Ok(fresh) if fresh.len() >= 16 => fresh,
            Ok(_) => {
                tracing::warn!(path = %path.display(), "the cluster secret file holds fewer than 16 bytes; keeping the secret in use");
                return;
            }
            Err(err) => {
                tracing::warn!(%err, "cannot re-read the cluster secret; keeping the secret in use");
                return;
            }
        };
        let mut keyring = self.keyring.write().unwrap_or_else(|p| p.into_inner());
        if fresh == keyring.current {
            return;
        }
        let old = std::mem::replace(&mut keyring.current, fresh);
        keyring.previous = Some((old, Instant::now()));
        self.metrics.peer_secret_rotations.inc();
        tracing::warn!(
            grace_secs = PREVIOUS_SECRET_GRACE.as_secs(),
            "the cluster secret changed; new links use it, and the previous one is still accepted for a while"
        );
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Connects the replication layer; links report to it from then on.
    pub fn set_handler(&self, handler: Weak<dyn PeerHandler>) {
        let _ = self.handler.set(handler);
    }

    pub(crate) fn handler(&self) -> Option<Arc<dyn PeerHandler>> {
        self.handler.get().and_then(Weak::upgrade)
    }

    fn changed(&self) {
        let members = self.lock().links.len() + 1;
        self.metrics.cluster_members.set(members as i64);
    }

    /// Linked peers.
    pub fn peers(&self) -> Vec<String> {
        self.lock().links.keys().cloned().collect()
    }

    /// Queues a frame to one peer; false if it is not linked.
    pub fn send(&self, peer: &str, text: Utf8Bytes) -> bool {
        self.lock().links.get(peer).is_some_and(|l| l.queue(text))
    }

    /// Queues a frame to every linked peer; returns how many.
    pub fn broadcast(&self, text: Utf8Bytes) -> usize {
        self.lock().links.values().filter(|l| l.queue(text.clone())).count()
    }

    /// Frames queued on every link and not yet written.
    pub fn queued_frames(&self) -> usize {
        self.lock().links.values().map(|l| l.queued.load(Ordering::Acquire)).sum()
    }

    /// Waits until every frame queued so far was written (or its link ended), at most
    /// `timeout`. Unlike [`Cluster::flush`] it does not wait for frames queued after the call.
    pub async fn written_so_far(&self, timeout: Duration) {
        let marks: Vec<(String, u64, Arc<AtomicU64>, u64)> = self
            .lock()
            .links
            .iter()
            .map(|(id, l)| {
                // `queued` first: a batch written between the two loads then counts twice
                // (a later target, a little more waiting), never zero times.
                let queued = l.queued.load(Ordering::Acquire) as u64;
                let target = l.written.load(Ordering::Acquire) + queued;
                (id.clone(), l.generation, l.written.clone(), target)
            })
            .collect();
        let deadline = tokio::time::Instant::now() + timeout;
        let pending = |marks: &[(String, u64, Arc<AtomicU64>, u64)]| {
            marks.iter().any(|(id, generation, written, target)| {
                written.load(Ordering::Acquire) < *target && self.is_current(id, *generation)
            })
        };
        while pending(&marks) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    /// Waits until every queued peer frame was written, at most `timeout`.
    pub async fn flush(&self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.queued_frames() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Registers a link; a previous link to the same node is replaced (its task sees its
    /// generation is gone and ends).
    pub(crate) fn register(
        &self,
        node_id: &str,
        addr: String,
        rtt_us: Arc<AtomicU64>,
        outbound: UnboundedSender<Utf8Bytes>,
        queued: Arc<AtomicUsize>,
        written: Arc<AtomicU64>,
    ) -> u64 {
        let generation = self.generation.fetch_add(1, Ordering::Relaxed) + 1;
        {
            let mut state = self.lock();
            if let Ok(sock) = addr.parse::<SocketAddr>() {
                state.discovered.entry(sock).and_modify(|s| *s = AddrState::Linked(node_id.to_owned()));
            }
            let since = Instant::now();
            let link = Link { addr, generation, since, rtt_us, outbound, queued, written };
            state.links.insert(node_id.to_owned(), link);
        }
        self.metrics.peer_links_established.inc();
        tracing::info!(peer = node_id, "peer linked");
        self.changed();
        if let Some(handler) = self.handler() {
            handler.on_link_up(node_id);
        }
        generation
    }

    pub(crate) fn is_current(&self, node_id: &str, generation: u64) -> bool {
        self.lock().links.get(node_id).is_some_and(|l| l.generation == generation)
    }

    pub(crate) fn unregister(&self, node_id: &str, generation: u64) {
        let removed = {
            let mut state = self.lock();
            let current = state.links.get(node_id).is_some_and(|l| l.generation == generation);
            if current {
                state.links.remove(node_id);
                for s in state.discovered.values_mut() {
                    if *s == AddrState::Linked(node_id.to_owned()) {
                        *s = AddrState::Unreachable;
                    }
                }
            }
            current
        };
        if removed {
            tracing::info!(peer = node_id, "peer link lost");
            self.changed();
            if let Some(handler) = self.handler() {
                handler.on_link_down(node_id);
            }
        }
    }

    pub fn is_own_ip(&self, ip: IpAddr) -> bool {
        self.own_ip == Some(ip)
    }

    pub(crate) fn advertised(&self) -> &str {
        &self.advertised
    }

    pub fn status(&self) -> ClusterStatus {
        let state = self.lock();
        let mut members: Vec<MemberStatus> = state
            .links
            .iter()
            .map(|(id, l)| MemberStatus {
                node_id: id.clone(),
                addr: l.addr.clone(),
                linked_for_ms: l.since.elapsed().as_millis() as u64,
                rtt_ms: l.rtt_us.load(Ordering::Relaxed) as f64 / 1000.0,
                queued_frames: l.queued.load(Ordering::Relaxed),
            })
            .collect();
        members.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let mut discovered: Vec<(String, AddrState)> =
            state.discovered.iter().map(|(a, s)| (a.to_string(), s.clone())).collect();
        discovered.sort_by(|a, b| a.0.cmp(&b.0));
        ClusterStatus { node_id: self.node_id.clone(), peer_addr: self.advertised.clone(), links: members, discovered }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_link_refuses_frames_once_its_queue_is_full() {
        let (outbound, mut written) = tokio::sync::mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(MAX_QUEUED_FRAMES - 1));
        let link = Link {
            addr: "peer".into(),
            generation: 1,
            since: Instant::now(),
            rtt_us: Arc::default(),
            outbound,
            queued,
            written: Arc::default(),
        };
        assert!(link.queue(Utf8Bytes::from_static("last one")));
        assert!(!link.queue(Utf8Bytes::from_static("one too many")), "refused, as if not linked");
        assert_eq!(link.queued.load(Ordering::Acquire), MAX_QUEUED_FRAMES);
        assert_eq!(written.try_recv().ok().as_deref(), Some("last one"));
        assert!(written.try_recv().is_err());
    }
}
