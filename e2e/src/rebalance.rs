//! A fleet of real WebSocket clients for rebalancing runs (the e2e test and `chat-bench
//! rebalance`): each connects through a "Service" (the first time to node `i mod n`, afterwards to
//! a random node of the current list), resumes its session after every close that says to
//! reconnect, and records what happened to it. A publisher sends numbered messages to a probe
//! room with idempotency keys; probe subscribers record every offset they get, and the latency
//! of each delivery while they were never moved.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use hdrhistogram::Histogram;
use rand::Rng;
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::cluster::user_token;

/// The room every probe subscriber joins and the publisher publishes to.
pub const PROBE_ROOM: &str = "rebalance-probe";
const NOT_CONNECTED: usize = usize::MAX;
/// Bound on one client's reconnect attempts over a run.
const MAX_ATTEMPTS: u32 = 2_000;

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What one client went through.
#[derive(Default)]
pub struct ClientState {
    /// Index into the node list it is connected to, or [`NOT_CONNECTED`].
    pub node: AtomicUsize,
    /// Closes with reason `rebalance`.
    pub moves: AtomicU32,
    /// Reconnects after a move whose `welcome` did not say `resumed`.
    pub not_resumed: AtomicU32,
    /// Probe offsets received, in order (probe subscribers only).
    pub offsets: Mutex<Vec<u64>>,
    /// The probe room's offset when it first joined.
    pub joined_at: AtomicU64,
}

/// The shared state of a fleet run.
pub struct Fleet {
    /// The addresses the "Service" sends clients to; grows on scale-out.
    pub nodes: RwLock<Vec<SocketAddr>>,
    pub clients: Vec<ClientState>,
    probes: usize,
    /// Turns true when the clients are to stop (one watch, not a timer per client).
    stop: tokio::sync::watch::Sender<bool>,
    stop_publishing: AtomicBool,
    /// (node index, when) of every `rebalance` close, as the clients saw them.
    pub moves: Mutex<Vec<(usize, Instant)>>,
    /// Probe deliveries to clients never moved, in microseconds; swapped out per phase.
    pub latency: Mutex<Histogram<u64>>,
    /// Offsets the publisher got acked.
    pub acked: Mutex<Vec<u64>>,
    pub problems: Mutex<Vec<String>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).unwrap_or_else(|_| Histogram::new(3).expect("3 significant digits"))
}

fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

impl Fleet {
    pub fn new(nodes: Vec<SocketAddr>, clients: usize, probes: usize) -> Arc<Fleet> {
        Arc::new(Fleet {
            nodes: RwLock::new(nodes),
            clients: (0..clients)
                .map(|_| ClientState { node: AtomicUsize::new(NOT_CONNECTED), ..ClientState::default() })
                .collect(),
            probes: probes.min(clients),
            stop: tokio::sync::watch::Sender::new(false),
            stop_publishing: AtomicBool::new(false),
            moves: Mutex::default(),
            latency: Mutex::new(histogram()),
            acked: Mutex::default(),
            problems: Mutex::default(),
        })
    }

    fn problem(&self, what: String) {
        self.problems.lock().unwrap_or_else(|p| p.into_inner()).push(what);
    }

    /// Starts every client, `per_second` new connections a second; returns once all connected.
    pub async fn connect_all(self: &Arc<Self>, per_second: usize, timeout: Duration) -> anyhow::Result<()> {
        let batch = (per_second / 10).max(1);
        for start in (0..self.clients.len()).step_by(batch) {
            for i in start..(start + batch).min(self.clients.len()) {
                tokio::spawn(client(self.clone(), i));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let deadline = Instant::now() + timeout;
        while self.connected() < self.clients.len() {
            if Instant::now() > deadline {
                bail!("{} of {} clients connected within {timeout:?}", self.connected(), self.clients.len());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Ok(())
    }

    pub fn connected(&self) -> usize {
        self.clients.iter().filter(|c| c.node.load(Ordering::Acquire) != NOT_CONNECTED).count()
    }

    /// Connections per node index, as the clients see them.
    pub fn per_node(&self) -> Vec<usize> {
        let mut counts = vec![0; self.nodes.read().map(|n| n.len()).unwrap_or(0)];
        for c in &self.clients {
            if let Some(count) = counts.get_mut(c.node.load(Ordering::Acquire)) {
                *count += 1;
            }
        }
        counts
    }

    /// Every client connected and every node within `tolerance_percent` of the mean, above and
    /// below (or at the mean rounded, for small counts).
    pub fn even(&self, tolerance_percent: u32) -> bool {
        let counts = self.per_node();
        let mean = self.clients.len() as f64 / counts.len().max(1) as f64;
        let tolerance = f64::from(tolerance_percent) / 100.0;
        let (high, low) = ((mean * (1.0 + tolerance)).max(mean.ceil()), (mean * (1.0 - tolerance)).min(mean.floor()));
        self.connected() == self.clients.len() && counts.iter().all(|&c| (low..=high).contains(&(c as f64)))
    }

    pub fn add_node(&self, addr: SocketAddr) {
        self.nodes.write().unwrap_or_else(|p| p.into_inner()).push(addr);
    }

    /// Stops every client (and the publisher).
    pub fn stop(&self) {
        self.stop_publishing.store(true, Ordering::Release);
        self.stop.send_replace(true);
    }

    fn stopped(&self) -> bool {
        *self.stop.borrow()
    }

    /// Stops the publisher after its pending publish; the subscribers stay.
    pub fn stop_publishing(&self) {
        self.stop_publishing.store(true, Ordering::Release);
    }

    /// The latency histogram so far, replaced by an empty one.
    pub fn take_latency(&self) -> Histogram<u64> {
        std::mem::replace(&mut *self.latency.lock().unwrap_or_else(|p| p.into_inner()), histogram())
    }

    pub fn moves_total(&self) -> usize {
        self.moves.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The most `rebalance` closes one node sent within one whole second.
    pub fn worst_second(&self) -> usize {
        let moves = self.moves.lock().unwrap_or_else(|p| p.into_inner());
        let Some(first) = moves.iter().map(|(_, at)| *at).min() else { return 0 };
        let mut buckets: BTreeMap<(usize, u64), usize> = BTreeMap::new();
        for (node, at) in moves.iter() {
            *buckets.entry((*node, at.duration_since(first).as_secs())).or_default() += 1;
        }
        buckets.values().max().copied().unwrap_or(0)
    }

    /// What went wrong for any client: moved twice, not resumed, a gap or a duplicate in the
    /// probe room, an acked message some probe subscriber never got.
    pub fn check(&self) -> anyhow::Result<()> {
        let problems = self.problems.lock().unwrap_or_else(|p| p.into_inner());
        if !problems.is_empty() {
            bail!("{} problems, first: {}", problems.len(), problems[0]);
        }
        let twice = self.clients.iter().filter(|c| c.moves.load(Ordering::Acquire) > 1).count();
        anyhow::ensure!(twice == 0, "{twice} clients were moved more than once");
        let unresumed: u32 = self.clients.iter().map(|c| c.not_resumed.load(Ordering::Acquire)).sum();
        anyhow::ensure!(unresumed == 0, "{unresumed} moves did not resume their session");
        let acked = self.acked.lock().unwrap_or_else(|p| p.into_inner());
        let last_acked = acked.iter().max().copied().unwrap_or(0);
        for (i, c) in self.clients.iter().take(self.probes).enumerate() {
            let offsets = c.offsets.lock().unwrap_or_else(|p| p.into_inner());
            let start = c.joined_at.load(Ordering::Acquire);
            for (n, offset) in offsets.iter().enumerate() {
                if *offset != start + 1 + n as u64 {
                    bail!(
                        "probe subscriber {i} got offset {offset} where {} was due (joined at {start})",
                        start + 1 + n as u64
                    );
                }
            }
            let last = offsets.last().copied().unwrap_or(start);
            anyhow::ensure!(last >= last_acked, "probe subscriber {i} ended at {last}, the last acked is {last_acked}");
        }
        Ok(())
    }
}

async fn connect(addr: SocketAddr, token: &str, session: Option<&str>) -> anyhow::Result<Ws> {
    let url = match session {
        Some(session) => format!("ws://{addr}/ws?session={session}"),
        None => format!("ws://{addr}/ws"),
    };
    let mut request = url.into_client_request()?;
    let headers = request.headers_mut();
    headers.insert("sec-websocket-protocol", HeaderValue::from_static(crate::client::SUBPROTOCOL));
    headers.insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    let connecting = tokio_tungstenite::connect_async(request);
    let (ws, _) = tokio::time::timeout(Duration::from_secs(5), connecting)
        .await
        .map_err(|_| anyhow!("handshake timed out"))??;
    Ok(ws)
}

/// The server closed the connection with this code and reason.
#[derive(Debug, thiserror::Error)]
#[error("closed with {code} {reason:?}")]
struct Closed {
    code: u16,
    reason: String,
}

async fn next_json(ws: &mut Ws, timeout: Duration) -> anyhow::Result<Value> {
    loop {
        let frame = tokio::time::timeout(timeout, ws.next()).await.map_err(|_| anyhow!("no frame in {timeout:?}"))?;
        match frame {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(Message::Close(close))) => {
                let (code, reason) =
                    close.map(|c| (u16::from(c.code), c.reason.to_string())).unwrap_or((1005, String::new()));
                return Err(Closed { code, reason }.into());
            }
            Some(Ok(_)) => {}
            Some(Err(err)) => return Err(err.into()),
            None => bail!("connection ended"),
        }
    }
}

/// How a connection ended.
enum Ended {
    /// Close code 4000: reconnect at once, spread over a second (docs/protocol.md).
    Moved {
        rebalance: bool,
    },
    Other,
    Stopped,
}

/// One fleet client until the fleet stops; bounded by [`MAX_ATTEMPTS`] connection attempts.
async fn client(fleet: Arc<Fleet>, i: usize) {
    let me = &fleet.clients[i];
    let token = user_token(&format!("fleet-{i}"));
    let probe = i < fleet.probes;
    let room = if probe { PROBE_ROOM.to_owned() } else { format!("fleet-{}", i % 50) };
    let mut session: Option<String> = None;
    let mut moved_last = false;
    for attempt in 0..MAX_ATTEMPTS {
        if fleet.stopped() {
            return;
        }
        let (index, addr) = {
            let nodes = fleet.nodes.read().unwrap_or_else(|p| p.into_inner());
            let index = if attempt == 0 { i % nodes.len() } else { rand::rng().random_range(0..nodes.len()) };
            (index, nodes[index])
        };
        let ended = match serve(&fleet, me, addr, index, &token, &mut session, &room, moved_last, probe).await {
            Ok(ended) => ended,
            Err(_) => Ended::Other,
        };
        me.node.store(NOT_CONNECTED, Ordering::Release);
        moved_last = false;
        let wait = match ended {
            Ended::Stopped => return,
            Ended::Moved { rebalance } => {
                if rebalance {
                    me.moves.fetch_add(1, Ordering::AcqRel);
                    fleet.moves.lock().unwrap_or_else(|p| p.into_inner()).push((index, Instant::now()));
                    moved_last = true;
                }
                rand::rng().random_range(0..1000)
            }
            Ended::Other => 200 + rand::rng().random_range(0..300),
        };
        tokio::time::sleep(Duration::from_millis(wait)).await;
    }
    fleet.problem(format!("client {i} gave up after {MAX_ATTEMPTS} attempts"));
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    fleet: &Fleet,
    me: &ClientState,
    addr: SocketAddr,
    index: usize,
    token: &str,
    session: &mut Option<String>,
    room: &str,
    after_move: bool,
    probe: bool,
) -> anyhow::Result<Ended> {
    let mut ws = connect(addr, token, session.as_deref()).await?;
    let welcome = next_json(&mut ws, Duration::from_secs(5)).await.context("welcome")?;
    let resumed = welcome["resumed"].as_bool() == Some(true);
    if after_move && !resumed {
        me.not_resumed.fetch_add(1, Ordering::AcqRel);
    }
    *session = welcome["session_id"].as_str().map(str::to_owned);
    if !resumed {
        ws.send(Message::text(json!({"type": "join", "room": room}).to_string())).await?;
    }
    me.node.store(index, Ordering::Release);
    let mut stop = fleet.stop.subscribe();
    loop {
        let frame = tokio::select! {
            frame = ws.next() => Some(frame),
            _ = stop.wait_for(|stop| *stop) => None,
        };
        let Some(frame) = frame else {
            let _ = ws.close(None).await;
            return Ok(Ended::Stopped);
        };
        match frame {
            Some(Ok(Message::Text(text))) => {
                let v: Value = serde_json::from_str(&text)?;
                match v["type"].as_str() {
                    Some("joined") if probe && !resumed && me.offsets.lock().map(|o| o.is_empty()).unwrap_or(false) => {
                        me.joined_at.store(v["offset"].as_u64().unwrap_or(0), Ordering::Release);
                    }
                    Some("message") if probe => {
                        let offset = v["offset"].as_u64().unwrap_or(0);
                        let mut offsets = me.offsets.lock().unwrap_or_else(|p| p.into_inner());
                        let due = offsets.last().copied().unwrap_or(me.joined_at.load(Ordering::Acquire)) + 1;
                        if offset != due {
                            fleet.problem(format!("a probe subscriber on {addr} got offset {offset} where {due} was due (resumed: {resumed}): {v}"));
                        }
                        offsets.push(offset);
                        drop(offsets);
                        if me.moves.load(Ordering::Acquire) == 0
                            && let Some(sent) =
                                v["body"].as_str().and_then(|b| b.split(':').nth(1)).and_then(|t| t.parse::<u64>().ok())
                        {
                            let _ = fleet
                                .latency
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .record(now_us().saturating_sub(sent).max(1));
                        }
                    }
                    Some("error") => fleet.problem(format!("error frame: {v}")),
                    _ => {}
                }
            }
            Some(Ok(Message::Close(close))) => {
                let (code, reason) =
                    close.map(|c| (u16::from(c.code), c.reason.to_string())).unwrap_or((1005, String::new()));
                return Ok(if code == 4000 { Ended::Moved { rebalance: reason == "rebalance" } } else { Ended::Other });
            }
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Ok(Ended::Other),
        }
    }
}

/// Publishes `n:<micros>` to the probe room every `every` until the fleet stops, each with its
/// own key, waiting for its ack and retrying it (same key) on another connection after a close.
pub async fn publish(fleet: Arc<Fleet>, every: Duration) {
    let token = user_token("fleet-publisher");
    let mut session: Option<String> = None;
    let mut n: u64 = 0;
    let mut pending: Option<(String, String)> = None;
    for _ in 0..MAX_ATTEMPTS {
        let (index, addr) = {
            let nodes = fleet.nodes.read().unwrap_or_else(|p| p.into_inner());
            let index = rand::rng().random_range(0..nodes.len());
            (index, nodes[index])
        };
        let Ok(mut ws) = connect(addr, &token, session.as_deref()).await else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        let Ok(welcome) = next_json(&mut ws, Duration::from_secs(5)).await else { continue };
        session = welcome["session_id"].as_str().map(str::to_owned);
        if welcome["resumed"].as_bool() != Some(true) {
            let join = json!({"type": "join", "room": PROBE_ROOM});
            if ws.send(Message::text(join.to_string())).await.is_err() {
                continue;
            }
        }
        loop {
            if fleet.stop_publishing.load(Ordering::Acquire) && pending.is_none() {
                let _ = ws.close(None).await;
                return;
            }
            let (key, body) = pending.get_or_insert_with(|| {
                n += 1;
                (format!("k{n}"), format!("{n}:{}", now_us()))
            });
            let frame = json!({"type": "publish", "id": key, "key": key, "room": PROBE_ROOM, "body": body});
            if ws.send(Message::text(frame.to_string())).await.is_err() {
                break;
            }
            match wait_ack(&mut ws, key).await {
                Ok(Some(offset)) => {
                    fleet.acked.lock().unwrap_or_else(|p| p.into_inner()).push(offset);
                    pending = None;
                    tokio::time::sleep(every).await;
                }
                // Refused for now (e.g. `unavailable`): the same key again shortly.
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
                Err(err) => {
                    if err.downcast_ref::<Closed>().is_some_and(|c| c.reason == "rebalance") {
                        fleet.moves.lock().unwrap_or_else(|p| p.into_inner()).push((index, Instant::now()));
                    }
                    break;
                }
            }
        }
        let jitter = rand::rng().random_range(0..1000);
        tokio::time::sleep(Duration::from_millis(jitter)).await;
    }
    fleet.problem("the publisher gave up".into());
}

async fn wait_ack(ws: &mut Ws, key: &str) -> anyhow::Result<Option<u64>> {
    loop {
        let v = next_json(ws, Duration::from_secs(10)).await?;
        if v["id"].as_str() != Some(key) {
            continue;
        }
        return Ok(match v["type"].as_str() {
            Some("ack") => v["offset"].as_u64(),
            _ => None,
        });
    }
}
