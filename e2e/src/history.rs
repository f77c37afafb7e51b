//! History check: real WebSocket clients publish and subscribe through every node of a cluster
//! while a test injects faults; afterwards every node's history is read and checked against what
//! the clients were told.
//!
//! - [`Recorder`] runs the clients. A *publisher* is bound to one node: it always reconnects to
//!   that node's URL (also after the node restarted) and publishes `run/publisher/seq` bodies,
//!   one at a time, to a few rooms. Each publish carries a unique idempotency `key` (unless
//!   [`HistoryConfig::send_key`] is off, for servers that do not know the field); after
//!   `unavailable`, a timeout or a dropped connection the *same* body is retried with the *same*
//!   key, a bounded number of times. Every publish is recorded with its outcome: acked (offset,
//!   epoch) or given up. A *subscriber* joins every room on its home node and records every
//!   `message` frame in order; when its connection ends it reconnects (to its home node, or to a
//!   fallback node once the home node has been unreachable for a while) and resumes with `join` +
//!   `since` the last message it saw.
//! - [`settle`] polls every node's full history (paged `history` requests) until every node
//!   answers and nothing changes any more.
//! - [`check`] compares: (a) every acked publish is stored exactly once, at its acked offset and
//!   epoch, with its body, on every node; (b) all nodes hold the same history of each room;
//!   (c) offsets are 1..N without gaps; (d) each subscriber's deliveries are strictly increasing
//!   and equal to the history at their offsets; (e) no gap follows a resume answered with
//!   `recovered: true` (nor inside a live subscription); and each subscriber caught up with the
//!   final history. The [`Report`] prints a summary line and the first violations with counts.
//!
//! Everything talks to loopback addresses, or to nodes in the test's own network namespaces.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::task::JoinHandle;

use crate::client::Client;

/// Messages asked for per `history` request.
pub const PAGE: usize = 500;
/// Bound for one handshake, `welcome` or `joined`.
const STEP: Duration = Duration::from_secs(5);
/// How many violations a report shows in full.
const SHOWN: usize = 10;
/// Environment variable: `off` makes publishers send no idempotency `key` (for a server whose
/// protocol does not have the field yet).
pub const KEYS_ENV: &str = "HISTORY_CHECK_KEYS";

// ---------- where clients connect ----------

/// A node as the clients reach it: by address from the test's namespace, or from inside a
/// network namespace (a node of a [`crate::cluster::NetnsCluster`], at 127.0.0.1 in there).
#[derive(Clone, Debug)]
pub struct NodeTarget {
    pub name: String,
    pub addr: SocketAddr,
    pub netns: Option<String>,
}

impl NodeTarget {
    pub fn loopback(name: &str, addr: SocketAddr) -> NodeTarget {
        NodeTarget { name: name.to_owned(), addr, netns: None }
    }

    pub fn in_netns(name: &str, ns: &str, addr: SocketAddr) -> NodeTarget {
        NodeTarget { name: name.to_owned(), addr, netns: Some(ns.to_owned()) }
    }

    /// A WebSocket connection with `query` (`token=…` or `name=…`), bounded in time.
    pub async fn connect(&self, query: &str) -> anyhow::Result<Client> {
        let url = format!("ws://{}/ws?{query}", self.addr);
        let connect = async {
            match &self.netns {
                None => Client::connect(&url, None).await,
                Some(ns) => {
                    let stream = crate::netns::connect_in(ns, self.addr, Duration::from_secs(2)).await?;
                    Client::connect_on(stream, &url).await
                }
            }
        };
        tokio::time::timeout(STEP, connect).await.map_err(|_| anyhow::anyhow!("handshake timed out"))?
    }

    /// Whether `/readyz` answers 200.
    pub async fn ready(&self) -> bool {
        let get = async {
            match &self.netns {
                None => crate::client::http_get(self.addr, "/readyz").await,
                Some(ns) => crate::netns::http_get_in(ns, self.addr, "/readyz").await,
            }
        };
        matches!(tokio::time::timeout(STEP, get).await, Ok(Ok((200, _))))
    }
}

// ---------- configuration ----------

/// What the clients do.
#[derive(Clone, Debug)]
pub struct HistoryConfig {
    /// Prefix of every body and key, unique per run (a second run on the same stored data
    /// must not reuse keys).
    pub run: String,
    pub rooms: Vec<String>,
    /// Send the idempotency `key` field with each publish.
    pub send_key: bool,
    /// HS256 key of the cluster's JWT auth (stable user ids, so a key is the same user's across
    /// reconnects); `None`: anonymous mode (`?name=`).
    pub jwt_secret: Option<String>,
    /// Pause between two publishes of one publisher (frames are read meanwhile).
    pub publish_interval: Duration,
    /// Sends of one publish before it is given up.
    pub max_attempts: u32,
    /// Time one publish may take, retries included, before it is given up.
    pub publish_deadline: Duration,
    /// Wait for the answer to one send; then the connection counts as broken.
    pub ack_timeout: Duration,
}

impl HistoryConfig {
    /// Defaults for a few-hundred-messages-per-second load; `send_key` from [`KEYS_ENV`]
    /// (on unless it is `off`).
    pub fn new(run: &str, rooms: &[&str]) -> HistoryConfig {
        let send_key = std::env::var(KEYS_ENV).map(|v| v != "off" && v != "0").unwrap_or(true);
        HistoryConfig {
            run: run.to_owned(),
            rooms: rooms.iter().map(|r| (*r).to_owned()).collect(),
            send_key,
            jwt_secret: None,
            publish_interval: Duration::from_millis(15),
            max_attempts: 12,
            publish_deadline: Duration::from_secs(20),
            ack_timeout: Duration::from_secs(8),
        }
    }

    fn query(&self, user: &str) -> String {
        match &self.jwt_secret {
            Some(secret) => format!("token={}", crate::mint_token(secret, user, user, &[], 3600)),
            None => format!("name={user}"),
        }
    }
}

// ---------- records ----------

#[derive(Clone, Debug)]
pub enum Outcome {
    Acked {
        offset: u64,
        epoch: String,
        /// Which send got the ack (1 = the first).
        attempt: u32,
        /// Milliseconds since the recorder started.
        at_ms: u64,
    },
    GaveUp {
        reason: String,
    },
}

/// One publish (a body and its key) and what became of it.
#[derive(Clone, Debug)]
pub struct PublishRecord {
    pub publisher: String,
    pub node: String,
    pub room: String,
    pub key: String,
    pub body: String,
    /// Sends of this publish.
    pub attempts: u32,
    /// Sends whose outcome is unknown (`unavailable`, `internal`, no answer, connection lost):
    /// the message may be stored although it was not acked.
    pub ambiguous: u32,
    /// Short reasons of the retries, in order.
    pub retries: Vec<String>,
    pub outcome: Outcome,
}

impl PublishRecord {
    pub fn acked(&self) -> Option<(u64, &str)> {
        match &self.outcome {
            Outcome::Acked { offset, epoch, .. } => Some((*offset, epoch)),
            Outcome::GaveUp { .. } => None,
        }
    }
}

/// A `message` frame a subscriber received.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub offset: u64,
    pub epoch: String,
    pub body: String,
    /// The subscriber's connection number (1 = the first).
    pub conn: u32,
}

/// A `join` of a subscriber and its `joined` answer.
#[derive(Clone, Debug)]
pub struct Resume {
    pub room: String,
    pub conn: u32,
    pub node: String,
    pub since: Option<(String, u64)>,
    pub epoch: String,
    /// The room's latest offset, as `joined` said.
    pub offset: u64,
    pub recovered: bool,
    /// Deliveries of the room recorded before this join was sent.
    pub index: usize,
}

/// Everything one subscriber saw.
#[derive(Clone, Debug, Default)]
pub struct SubscriberLog {
    pub name: String,
    pub home: String,
    pub deliveries: BTreeMap<String, Vec<Delivery>>,
    pub resumes: Vec<Resume>,
    pub connections: u32,
    /// Why each connection ended (close frames, errors), in order.
    pub ends: Vec<String>,
    /// Set by [`Recorder::finish`] when the subscriber did not reach the end of the history.
    pub behind: Option<String>,
}

impl SubscriberLog {
    pub fn delivered(&self) -> usize {
        self.deliveries.values().map(Vec::len).sum()
    }
}

/// Counters of one publisher that tests wait on.
#[derive(Default)]
pub struct PublisherStats {
    pub acked: AtomicU64,
    pub gave_up: AtomicU64,
    /// Answers `unavailable`.
    pub unavailable: AtomicU64,
    pub connections: AtomicU64,
    /// Why the publisher ended early, if it did.
    pub failure: Mutex<Option<String>>,
}

struct PublisherHandle {
    name: String,
    stop: Arc<AtomicBool>,
    stats: Arc<PublisherStats>,
    task: JoinHandle<anyhow::Result<Vec<PublishRecord>>>,
}

/// Room → (epoch, offset) of the last message a subscriber received.
type Progress = Arc<Mutex<BTreeMap<String, (String, u64)>>>;

struct SubscriberHandle {
    name: String,
    stop: Arc<AtomicBool>,
    progress: Progress,
    task: JoinHandle<SubscriberLog>,
}

/// One room's history as a node returns it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RoomHistory {
    pub epoch: String,
    /// (offset, epoch, body) in the order the node returned them.
    pub messages: Vec<(u64, String, String)>,
    /// The node said nothing older was dropped.
    pub complete: bool,
}

/// Node name → room → history.
pub type Histories = BTreeMap<String, BTreeMap<String, RoomHistory>>;

/// What a [`Recorder`] recorded, after [`Recorder::finish`].
#[derive(Clone, Debug)]
pub struct Recorded {
    pub publishes: Vec<PublishRecord>,
    pub subscribers: Vec<SubscriberLog>,
    /// The settled histories subscribers were waited for.
    pub histories: Histories,
}

// ---------- the recorder ----------

/// Runs publishers and subscribers until [`Recorder::finish`].
pub struct Recorder {
    cfg: Arc<HistoryConfig>,
    started: Instant,
    publishers: Vec<PublisherHandle>,
    subscribers: Vec<SubscriberHandle>,
}

impl Recorder {
    pub fn new(cfg: HistoryConfig) -> Recorder {
        Recorder { cfg: Arc::new(cfg), started: Instant::now(), publishers: Vec::new(), subscribers: Vec::new() }
    }

    pub fn config(&self) -> &HistoryConfig {
        &self.cfg
    }

    /// A publisher bound to `node`, publishing from now on.
    pub fn add_publisher(&mut self, name: &str, node: NodeTarget) {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(PublisherStats::default());
        let run = publisher(self.cfg.clone(), name.to_owned(), node, stop.clone(), stats.clone(), self.started);
        let failure = stats.clone();
        let task = tokio::spawn(async move {
            let result = run.await;
            if let Err(err) = &result {
                *failure.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(format!("{err:#}"));
            }
            result
        });
        self.publishers.push(PublisherHandle { name: name.to_owned(), stop, stats, task });
    }

    /// A subscriber on `home`; returns once it has joined every room. After `failover_after`
    /// of its home node not answering it moves to the `fallback` nodes in turn (and back home as
    /// soon as home answers); with no fallback it waits for its home node.
    pub async fn add_subscriber(
        &mut self,
        name: &str,
        home: NodeTarget,
        fallback: Vec<NodeTarget>,
        failover_after: Duration,
    ) -> anyhow::Result<()> {
        let stop = Arc::new(AtomicBool::new(false));
        let progress: Progress = Arc::default();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(subscriber(
            self.cfg.clone(),
            name.to_owned(),
            home,
            fallback,
            failover_after,
            stop.clone(),
            progress.clone(),
            ready_tx,
        ));
        self.subscribers.push(SubscriberHandle { name: name.to_owned(), stop: stop.clone(), progress, task });
        match tokio::time::timeout(Duration::from_secs(30), ready_rx).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                stop.store(true, Ordering::Release);
                bail!("subscriber {name} did not join {:?} within 30 s", self.cfg.rooms)
            }
        }
    }

    fn stats(&self, name: &str) -> Option<&Arc<PublisherStats>> {
        self.publishers.iter().find(|p| p.name == name).map(|p| &p.stats)
    }

    /// Acks received by every publisher so far.
    pub fn acked(&self) -> u64 {
        self.publishers.iter().map(|p| p.stats.acked.load(Ordering::Relaxed)).sum()
    }

    pub fn acked_by(&self, publisher: &str) -> u64 {
        self.stats(publisher).map_or(0, |s| s.acked.load(Ordering::Relaxed))
    }

    pub fn unavailable_by(&self, publisher: &str) -> u64 {
        self.stats(publisher).map_or(0, |s| s.unavailable.load(Ordering::Relaxed))
    }

    /// Per publisher: acked, gave up, `unavailable` answers, connections.
    pub fn progress_text(&self) -> String {
        let parts: Vec<String> = self
            .publishers
            .iter()
            .map(|p| {
                let s = &p.stats;
                format!(
                    "{} acked {} gave up {} unavailable {} connections {}",
                    p.name,
                    s.acked.load(Ordering::Relaxed),
                    s.gave_up.load(Ordering::Relaxed),
                    s.unavailable.load(Ordering::Relaxed),
                    s.connections.load(Ordering::Relaxed)
                )
            })
            .collect();
        parts.join("; ")
    }

    /// Waits until every publisher in `names` got `more` further acks (bounded).
    pub async fn wait_acks_each(&self, names: &[&str], more: u64, timeout: Duration) -> anyhow::Result<()> {
        let goals: Vec<(&str, u64)> = names.iter().map(|n| (*n, self.acked_by(n) + more)).collect();
        let deadline = Instant::now() + timeout;
        loop {
            let short: Vec<String> = goals
                .iter()
                .filter(|(n, goal)| self.acked_by(n) < *goal)
                .map(|(n, goal)| format!("{n} at {} of {goal}", self.acked_by(n)))
                .collect();
            if short.is_empty() {
                return Ok(());
            }
            if let Some(p) = self.publishers.iter().find(|p| names.contains(&p.name.as_str()) && p.task.is_finished()) {
                bail!("publisher {} ended early: {}", p.name, failure_of(p));
            }
            if Instant::now() >= deadline {
                bail!("publishing stalled: {} within {timeout:?} ({})", short.join(", "), self.progress_text());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `more` further acks arrived in total (bounded).
    pub async fn wait_acks(&self, more: u64, timeout: Duration) -> anyhow::Result<()> {
        let goal = self.acked() + more;
        let deadline = Instant::now() + timeout;
        while self.acked() < goal {
            let ended = self.publishers.iter().find(|p| !p.stop.load(Ordering::Acquire) && p.task.is_finished());
            if let Some(p) = ended {
                bail!("publisher {} ended early: {}", p.name, failure_of(p));
            }
            if Instant::now() >= deadline {
                bail!("publishing stalled at {} acks, below {goal}, within {timeout:?} ({})", self.acked(), {
                    self.progress_text()
                });
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops publisher `name` starting new publishes; its publish in flight is still resolved
    /// (acked or given up within the bounds). Used when its node goes away for good.
    pub fn retire_publisher(&self, name: &str) {
        if let Some(p) = self.publishers.iter().find(|p| p.name == name) {
            p.stop.store(true, Ordering::Release);
        }
    }

    /// Stops publishing, waits until every node in `nodes` answers with a history that no
    /// longer changes, lets every subscriber catch up with it, and stops the subscribers.
    /// Fails if a publisher failed (e.g. the server rejected the `key` field) or the histories
    /// did not settle; gaps and losses are left to [`check`].
    pub async fn finish(self, nodes: &[NodeTarget], settle_timeout: Duration) -> anyhow::Result<Recorded> {
        for p in &self.publishers {
            p.stop.store(true, Ordering::Release);
        }
        let mut publishes = Vec::new();
        let mut failures = Vec::new();
        for p in self.publishers {
            // A publish in flight may retry for `publish_deadline`.
            match tokio::time::timeout(self.cfg.publish_deadline + Duration::from_secs(10), p.task).await {
                Ok(Ok(Ok(records))) => publishes.extend(records),
                Ok(Ok(Err(err))) => failures.push(format!("publisher {}: {err:#}", p.name)),
                Ok(Err(err)) => failures.push(format!("publisher {} panicked: {err}", p.name)),
                Err(_) => failures.push(format!("publisher {} did not stop", p.name)),
            }
        }
        if !failures.is_empty() {
            for s in &self.subscribers {
                s.stop.store(true, Ordering::Release);
            }
            bail!("{}", failures.join("\n"));
        }
        let histories = settle(nodes, &self.cfg, settle_timeout).await?;
        // The end every subscriber should reach: the first node's history.
        let reference = nodes.first().and_then(|n| histories.get(&n.name)).cloned().unwrap_or_default();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let all = self.subscribers.iter().all(|s| caught_up(&s.progress, &reference).is_none());
            if all || Instant::now() >= deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut subscribers = Vec::new();
        for s in self.subscribers {
            let behind = caught_up(&s.progress, &reference);
            s.stop.store(true, Ordering::Release);
            let mut log = match tokio::time::timeout(Duration::from_secs(10), s.task).await {
                Ok(Ok(log)) => log,
                _ => bail!("subscriber {} did not stop", s.name),
            };
            log.behind = behind;
            subscribers.push(log);
        }
        Ok(Recorded { publishes, subscribers, histories })
    }
}

fn failure_of(p: &PublisherHandle) -> String {
    let failure = p.stats.failure.lock().unwrap_or_else(|p| p.into_inner());
    failure.clone().unwrap_or_else(|| "no error recorded".to_owned())
}

/// `None` when the subscriber's last message in every room is the last of `reference`, else why
/// not.
fn caught_up(progress: &Progress, reference: &BTreeMap<String, RoomHistory>) -> Option<String> {
    let progress = progress.lock().unwrap_or_else(|p| p.into_inner());
    let mut short = Vec::new();
    for (room, history) in reference {
        let Some((offset, epoch, _)) = history.messages.last() else { continue };
        match progress.get(room) {
            Some((e, o)) if e == epoch && o == offset => {}
            got => short.push(format!("{room}: last received {got:?}, history ends at ({epoch}, {offset})")),
        }
    }
    (!short.is_empty()).then(|| short.join("; "))
}

// ---------- publisher ----------

fn is_timeout(err: &anyhow::Error) -> bool {
    err.to_string().starts_with("no frame within")
}

/// Connects, reads `welcome` and joins every room.
async fn connect_and_join(cfg: &HistoryConfig, target: &NodeTarget, user: &str) -> anyhow::Result<Client> {
    let mut c = target.connect(&cfg.query(user)).await?;
    c.expect_type("welcome", STEP).await?;
    for room in &cfg.rooms {
        let id = format!("join-{room}");
        c.send_json(json!({"type": "join", "id": id, "room": room})).await?;
        loop {
            let frame = c.recv_json(STEP).await?;
            if frame["id"] == id.as_str() {
                match frame["type"].as_str() {
                    Some("joined") => break,
                    _ => bail!("join {room}: {frame}"),
                }
            }
        }
    }
    Ok(c)
}

fn short(err: &anyhow::Error) -> String {
    let text = format!("{err:#}");
    text.chars().take(120).collect()
}

async fn publisher(
    cfg: Arc<HistoryConfig>,
    name: String,
    target: NodeTarget,
    stop: Arc<AtomicBool>,
    stats: Arc<PublisherStats>,
    started: Instant,
) -> anyhow::Result<Vec<PublishRecord>> {
    let mut records = Vec::new();
    let mut conn: Option<Client> = None;
    let mut seq = 0u64;
    while !stop.load(Ordering::Acquire) {
        seq += 1;
        let room = cfg.rooms[seq as usize % cfg.rooms.len()].clone();
        let record = PublishRecord {
            publisher: name.clone(),
            node: target.name.clone(),
            key: format!("{}:{name}:{seq}", cfg.run),
            body: format!("{}/{name}/{seq}", cfg.run),
            room,
            attempts: 0,
            ambiguous: 0,
            retries: Vec::new(),
            outcome: Outcome::GaveUp { reason: String::new() },
        };
        let record = publish_one(&cfg, &target, &mut conn, record, &stats, started).await?;
        match record.outcome {
            Outcome::Acked { .. } => stats.acked.fetch_add(1, Ordering::Relaxed),
            Outcome::GaveUp { .. } => stats.gave_up.fetch_add(1, Ordering::Relaxed),
        };
        records.push(record);
        // Pace, reading what arrives meanwhile (the rooms' messages) so nothing piles up.
        let until = tokio::time::Instant::now() + cfg.publish_interval;
        while let Some(c) = conn.as_mut() {
            let left = until.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                break;
            }
            match c.recv_json(left).await {
                Ok(_) => {}
                Err(err) if is_timeout(&err) => break,
                Err(_) => conn = None,
            }
        }
        if conn.is_none() {
            tokio::time::sleep(cfg.publish_interval).await;
        }
    }
    if let Some(c) = conn {
        c.close().await;
    }
    Ok(records)
}

/// Sends one publish until it is acked or given up; the same body and key on every send.
async fn publish_one(
    cfg: &HistoryConfig,
    target: &NodeTarget,
    conn: &mut Option<Client>,
    mut record: PublishRecord,
    stats: &PublisherStats,
    started: Instant,
) -> anyhow::Result<PublishRecord> {
    let begun = Instant::now();
    let mut pause = Duration::from_millis(50);
    loop {
        if record.attempts >= cfg.max_attempts || begun.elapsed() >= cfg.publish_deadline {
            let reason = format!(
                "{} sends in {:?}; last: {}",
                record.attempts,
                begun.elapsed(),
                record.retries.last().map(String::as_str).unwrap_or("-")
            );
            record.outcome = Outcome::GaveUp { reason };
            return Ok(record);
        }
        let c = match conn {
            Some(c) => c,
            None => match connect_and_join(cfg, target, &record.publisher).await {
                Ok(c) => {
                    stats.connections.fetch_add(1, Ordering::Relaxed);
                    conn.insert(c)
                }
                Err(err) => {
                    // Not a send: only the deadline bounds reconnecting.
                    let reason = format!("connect: {}", short(&err));
                    if record.retries.last() != Some(&reason) {
                        record.retries.push(reason);
                    }
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                    continue;
                }
            },
        };
        record.attempts += 1;
        let id = format!("p{}", record.attempts);
        let mut frame = json!({"type": "publish", "id": id, "room": record.room, "body": record.body});
        if cfg.send_key {
            frame["key"] = json!(record.key);
        }
        if let Err(err) = c.send_json(frame).await {
            record.ambiguous += 1;
            record.retries.push(format!("send: {}", short(&err)));
            *conn = None;
            continue;
        }
        let answer = async {
            loop {
                let frame = c.recv_json(cfg.ack_timeout).await?;
                if frame["id"] == id.as_str() && (frame["type"] == "ack" || frame["type"] == "error") {
                    return anyhow::Ok(frame);
                }
            }
        }
        .await;
        let frame = match answer {
            Ok(frame) => frame,
            Err(err) => {
                // No answer, or the connection ended: the message may or may not be stored.
                record.ambiguous += 1;
                record.retries.push(format!("no answer: {}", short(&err)));
                *conn = None;
                continue;
            }
        };
        if frame["type"] == "ack" {
            let (Some(offset), Some(epoch)) = (frame["offset"].as_u64(), frame["epoch"].as_str()) else {
                bail!("{}: malformed ack {frame}", record.publisher);
            };
            if frame["room"] != record.room.as_str() {
                bail!("{}: ack for another room: {frame} (published to {})", record.publisher, record.room);
            }
            record.outcome = Outcome::Acked {
                offset,
                epoch: epoch.to_owned(),
                attempt: record.attempts,
                at_ms: started.elapsed().as_millis() as u64,
            };
            return Ok(record);
        }
        let code = frame["code"].as_str().unwrap_or("");
        let message = frame["message"].as_str().unwrap_or("");
        record.retries.push(format!("error {code}"));
        match code {
            "unavailable" | "internal" => {
                stats.unavailable.fetch_add(u64::from(code == "unavailable"), Ordering::Relaxed);
                record.ambiguous += 1;
            }
            // Refused before anything was stored.
            "rate_limited" => {}
            "draining" | "not_joined" => *conn = None,
            "bad_request" if cfg.send_key && message.contains("key") => bail!(
                "{}: the server rejects the publish `key` field ({message}): it has no idempotency keys; \
                 run with {KEYS_ENV}=off to check it without them",
                record.publisher
            ),
            _ => bail!("{}: unexpected answer to a publish: {frame}", record.publisher),
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(500));
    }
}

// ---------- subscriber ----------

#[allow(clippy::too_many_arguments)]
async fn subscriber(
    cfg: Arc<HistoryConfig>,
    name: String,
    home: NodeTarget,
    fallback: Vec<NodeTarget>,
    failover_after: Duration,
    stop: Arc<AtomicBool>,
    progress: Progress,
    ready: tokio::sync::oneshot::Sender<()>,
) -> SubscriberLog {
    let mut log = SubscriberLog { name: name.clone(), home: home.name.clone(), ..SubscriberLog::default() };
    let mut ready = Some(ready);
    // Per room: the stream position to resume from.
    let mut position: BTreeMap<String, (String, u64)> = BTreeMap::new();
    let mut home_down_since: Option<Instant> = None;
    let mut turn = 0usize;
    while !stop.load(Ordering::Acquire) {
        let away = home_down_since.is_some_and(|t| t.elapsed() >= failover_after) && !fallback.is_empty();
        let target = if away {
            turn += 1;
            &fallback[turn % fallback.len()]
        } else {
            &home
        };
        let mut c = match target.connect(&cfg.query(&name)).await {
            Ok(c) => c,
            Err(_) => {
                if target.name == home.name {
                    home_down_since.get_or_insert_with(Instant::now);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if target.name == home.name {
            home_down_since = None;
        }
        log.connections += 1;
        let conn = log.connections;
        let end = subscription(&cfg, &mut c, target, conn, &mut log, &mut position, &progress, &stop, &mut ready).await;
        log.ends.push(format!("conn {conn} on {}: {end}", target.name));
        if target.name == home.name && !stop.load(Ordering::Acquire) {
            // Its node went away (drain, crash): prefer a fallback if it stays away.
            home_down_since.get_or_insert_with(Instant::now);
        }
        if stop.load(Ordering::Acquire) {
            c.close().await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    log
}

/// Records one message frame.
fn deliver(frame: &Value, conn: u32, log: &mut SubscriberLog, position: &mut BTreeMap<String, (String, u64)>) {
    let room = frame["room"].as_str().unwrap_or_default().to_owned();
    let offset = frame["offset"].as_u64().unwrap_or(0);
    let epoch = frame["epoch"].as_str().unwrap_or_default().to_owned();
    let body = frame["body"].as_str().unwrap_or_default().to_owned();
    position.insert(room.clone(), (epoch.clone(), offset));
    log.deliveries.entry(room).or_default().push(Delivery { offset, epoch, body, conn });
}

/// One connection: join (with `since` where known) every room, then record until it ends or
/// `stop`; returns why it ended.
#[allow(clippy::too_many_arguments)]
async fn subscription(
    cfg: &HistoryConfig,
    c: &mut Client,
    target: &NodeTarget,
    conn: u32,
    log: &mut SubscriberLog,
    position: &mut BTreeMap<String, (String, u64)>,
    progress: &Progress,
    stop: &AtomicBool,
    ready: &mut Option<tokio::sync::oneshot::Sender<()>>,
) -> String {
    let publish = |position: &BTreeMap<String, (String, u64)>| {
        let mut p = progress.lock().unwrap_or_else(|p| p.into_inner());
        p.clone_from(position);
    };
    if let Err(err) = c.expect_type("welcome", STEP).await {
        return format!("no welcome: {}", short(&err));
    }
    for room in &cfg.rooms {
        let since = position.get(room).cloned();
        let id = format!("join-{room}-{conn}");
        let mut frame = json!({"type": "join", "id": id, "room": room});
        if let Some((epoch, offset)) = &since {
            frame["since"] = json!({"epoch": epoch, "offset": offset});
        }
        let index = log.deliveries.get(room).map_or(0, Vec::len);
        if let Err(err) = c.send_json(frame).await {
            return format!("join {room}: {}", short(&err));
        }
        loop {
            let frame = match c.recv_json(STEP).await {
                Ok(frame) => frame,
                Err(err) => return format!("joining {room}: {}", short(&err)),
            };
            match frame["type"].as_str() {
                Some("message") => deliver(&frame, conn, log, position),
                Some("joined") if frame["id"] == id.as_str() => {
                    let epoch = frame["epoch"].as_str().unwrap_or_default().to_owned();
                    let offset = frame["offset"].as_u64().unwrap_or(0);
                    let recovered = frame["recovered"] == true;
                    log.resumes.push(Resume {
                        room: room.clone(),
                        conn,
                        node: target.name.clone(),
                        since: since.clone(),
                        epoch: epoch.clone(),
                        offset,
                        recovered,
                        index,
                    });
                    // Without a full recovery, live messages continue from the room's latest
                    // offset (unless the missed ones brought us there already).
                    let delivered = log.deliveries.get(room).map_or(0, Vec::len) > index;
                    if since.is_none() || !recovered {
                        let at = position.get(room);
                        if !(delivered && at.is_some_and(|(e, o)| *e == epoch && *o >= offset)) {
                            position.insert(room.clone(), (epoch, offset));
                        }
                    }
                    break;
                }
                Some("error") if frame["id"] == id.as_str() => return format!("join {room} refused: {frame}"),
                _ => {}
            }
        }
    }
    publish(position);
    if let Some(ready) = ready.take() {
        let _ = ready.send(());
    }
    loop {
        if stop.load(Ordering::Acquire) {
            return "stopped".to_owned();
        }
        match c.recv_json(Duration::from_millis(200)).await {
            Ok(frame) => {
                if frame["type"] == "message" {
                    deliver(&frame, conn, log, position);
                    publish(position);
                }
            }
            Err(err) if is_timeout(&err) => {}
            Err(err) => return short(&err),
        }
    }
}

// ---------- reading histories ----------

/// Every room's full history on `target`, read in pages of [`PAGE`] with `since`.
pub async fn read_histories(target: &NodeTarget, cfg: &HistoryConfig) -> anyhow::Result<BTreeMap<String, RoomHistory>> {
    let mut c = target.connect(&cfg.query("history-checker")).await?;
    c.expect_type("welcome", STEP).await?;
    let mut out = BTreeMap::new();
    for room in &cfg.rooms {
        c.send_json(json!({"type": "join", "id": format!("j-{room}"), "room": room})).await?;
        let joined = loop {
            let frame = c.recv_json(STEP).await?;
            if frame["id"] == format!("j-{room}").as_str() {
                if frame["type"] != "joined" {
                    bail!("join {room} on {}: {frame}", target.name);
                }
                break frame;
            }
        };
        let epoch = joined["epoch"].as_str().context("joined epoch")?.to_owned();
        let mut history = RoomHistory { epoch: epoch.clone(), messages: Vec::new(), complete: true };
        let mut after = 0u64;
        for page in 0.. {
            if page > 10_000 {
                bail!("{}: {room}: more than 10 000 pages of history", target.name);
            }
            let id = format!("h-{room}-{page}");
            c.send_json(json!({
                "type": "history", "id": id, "room": room,
                "since": {"epoch": epoch, "offset": after}, "limit": PAGE,
            }))
            .await?;
            let frame = loop {
                let frame = c.recv_json(Duration::from_secs(10)).await?;
                if frame["id"] == id.as_str() {
                    break frame;
                }
            };
            if frame["type"] != "history" {
                bail!("history of {room} on {}: {frame}", target.name);
            }
            if frame["epoch"] != epoch.as_str() {
                bail!("{}: {room}'s epoch changed while reading: {epoch} then {}", target.name, frame["epoch"]);
            }
            if page == 0 && frame["complete"] != true {
                history.complete = false;
            }
            let messages = frame["messages"].as_array().context("history messages")?;
            // `since` + `limit` must mean the first `limit` messages after `since`: the first page
            // of a complete history starts at offset 1 (later gaps are the checker's to report).
            let first = messages.first().and_then(|m| m["offset"].as_u64());
            if let Some(first) = first
                && page == 0
                && first != 1
                && history.complete
            {
                bail!(
                    "{}: {room}: history after offset 0 (limit {PAGE}) starts at offset {first}, and says it is \
                     complete: is `limit` taken from the end?",
                    target.name
                );
            }
            for m in messages {
                let offset = m["offset"].as_u64().context("offset")?;
                let body = m["body"].as_str().unwrap_or_default().to_owned();
                history.messages.push((offset, m["epoch"].as_str().unwrap_or_default().to_owned(), body));
                after = after.max(offset);
            }
            // A page may also end early to fit the node's write buffer (`more`).
            if messages.len() < PAGE && frame["more"] != true {
                break;
            }
        }
        out.insert(room.clone(), history);
    }
    c.close().await;
    Ok(out)
}

/// Reads every node's histories until every node answers and two reads in a row, at least
/// 500 ms apart, are the same; bounded by `timeout`.
pub async fn settle(nodes: &[NodeTarget], cfg: &HistoryConfig, timeout: Duration) -> anyhow::Result<Histories> {
    let deadline = Instant::now() + timeout;
    let mut last: Option<Histories> = None;
    loop {
        let mut read = Histories::new();
        let mut errors = Vec::new();
        for node in nodes {
            match read_histories(node, cfg).await {
                Ok(h) => {
                    read.insert(node.name.clone(), h);
                }
                Err(err) => errors.push(format!("{}: {}", node.name, short(&err))),
            }
        }
        if errors.is_empty() {
            if last.as_ref() == Some(&read) {
                return Ok(read);
            }
            last = Some(read);
        }
        if Instant::now() >= deadline {
            let lengths = last.as_ref().map(lengths_text).unwrap_or_default();
            bail!(
                "histories did not settle within {timeout:?}: {}; last lengths: {lengths}",
                if errors.is_empty() { "still changing".to_owned() } else { errors.join("; ") }
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn lengths_text(h: &Histories) -> String {
    let parts: Vec<String> = h
        .iter()
        .map(|(node, rooms)| {
            let total: usize = rooms.values().map(|r| r.messages.len()).sum();
            format!("{node} {total}")
        })
        .collect();
    parts.join(", ")
}

// ---------- the checker ----------

#[derive(Clone, Debug)]
pub struct Violation {
    pub kind: &'static str,
    pub text: String,
}

/// The outcome of [`check`]: a summary and the violations found.
#[derive(Clone, Debug)]
pub struct Report {
    pub scenario: String,
    pub summary: String,
    pub violations: Vec<Violation>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.violations.is_empty()
    }

    /// Counts per kind, in the order the kinds were first found.
    pub fn counts(&self) -> Vec<(&'static str, usize)> {
        let mut counts: Vec<(&'static str, usize)> = Vec::new();
        for v in &self.violations {
            match counts.iter_mut().find(|(k, _)| *k == v.kind) {
                Some((_, n)) => *n += 1,
                None => counts.push((v.kind, 1)),
            }
        }
        counts
    }

    /// `Err` with the whole report unless there is no violation.
    pub fn into_result(self) -> anyhow::Result<()> {
        if self.ok() { Ok(()) } else { bail!("{self}") }
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "history check {}: {}", self.scenario, self.summary)?;
        if self.ok() {
            return write!(f, "history check {}: OK, no violation", self.scenario);
        }
        let counts: Vec<String> = self.counts().iter().map(|(k, n)| format!("{n} × {k}")).collect();
        writeln!(f, "history check {}: {} violations: {}", self.scenario, self.violations.len(), counts.join(", "))?;
        // The first ones, but at least one of each kind.
        let mut shown: Vec<&Violation> = self.violations.iter().take(SHOWN).collect();
        for (kind, _) in self.counts() {
            if !shown.iter().any(|v| v.kind == kind)
                && let Some(v) = self.violations.iter().find(|v| v.kind == kind)
            {
                shown.push(v);
            }
        }
        for v in shown {
            writeln!(f, "  [{}] {}", v.kind, v.text)?;
        }
        Ok(())
    }
}

pub const ACKED_LOST: &str = "acked publish missing";
pub const ACKED_MOVED: &str = "acked publish at another offset or epoch";
pub const ACKED_TWICE: &str = "acked publish stored more than once";
pub const STORED_TWICE: &str = "message stored more than once";
pub const UNKNOWN: &str = "stored message nobody published";
pub const NODES_DIFFER: &str = "node histories differ";
pub const OFFSETS: &str = "offsets not 1..N";
pub const TRUNCATED: &str = "history incomplete";
pub const ORDER: &str = "delivery out of order or repeated";
pub const MISMATCH: &str = "delivery differs from history";
pub const RESUME_GAP: &str = "gap after a recovered resume";
pub const LIVE_GAP: &str = "gap in a live subscription";
pub const BEHIND: &str = "subscriber did not catch up";

/// Offset → (epoch, body) of one node's history of one room.
type ByOffset<'a> = BTreeMap<u64, (&'a str, &'a str)>;

fn quote(s: &str) -> String {
    format!("{s:?}")
}

/// Checks what was recorded (one or more runs, e.g. before and after a whole-cluster restart)
/// against the final histories of the surviving nodes (`histories`, in the order of `nodes`:
/// the first node's history is the reference for deliveries).
pub fn check(scenario: &str, cfg: &HistoryConfig, runs: &[&Recorded], histories: &Histories) -> Report {
    let mut v: Vec<Violation> = Vec::new();
    let mut push = |kind: &'static str, text: String| v.push(Violation { kind, text });
    let publishes: Vec<&PublishRecord> = runs.iter().flat_map(|r| r.publishes.iter()).collect();
    let subscribers: Vec<&SubscriberLog> = runs.iter().flat_map(|r| r.subscribers.iter()).collect();
    let by_body: HashMap<&str, &PublishRecord> = publishes.iter().map(|p| (p.body.as_str(), *p)).collect();
    let node_names: Vec<&String> = histories.keys().collect();
    let reference_node = node_names.first().map(|s| s.as_str()).unwrap_or("-");
    let describe = |body: &str| match by_body.get(body) {
        Some(p) => match &p.outcome {
            Outcome::Acked { offset, attempt, at_ms, .. } => format!(
                "{} (by {} via {}, acked at offset {offset} on send {attempt}, t={at_ms} ms)",
                quote(body),
                p.publisher,
                p.node
            ),
            Outcome::GaveUp { .. } => format!("{} (by {} via {}, given up)", quote(body), p.publisher, p.node),
        },
        None => format!("{} (published by nobody)", quote(body)),
    };

    // Per node and room: body → offsets, offset → (epoch, body).
    let mut positions: BTreeMap<(&str, &str), HashMap<&str, Vec<u64>>> = BTreeMap::new();
    let mut at_offset: BTreeMap<(&str, &str), ByOffset> = BTreeMap::new();
    for (node, rooms) in histories {
        for (room, h) in rooms {
            let pos = positions.entry((node, room)).or_default();
            let at = at_offset.entry((node, room)).or_default();
            for (offset, epoch, body) in &h.messages {
                pos.entry(body).or_default().push(*offset);
                at.insert(*offset, (epoch, body));
            }
        }
    }

    // (a) every acked publish exactly once, at its offset and epoch, on every node.
    for p in &publishes {
        let Some((offset, epoch)) = p.acked() else { continue };
        let mut problems: Vec<(Vec<&str>, String)> = Vec::new();
        let mut kind = None;
        for node in &node_names {
            let key = (node.as_str(), p.room.as_str());
            let found = positions.get(&key).and_then(|m| m.get(p.body.as_str())).cloned().unwrap_or_default();
            let stored_epoch = histories[*node].get(&p.room).map(|h| h.epoch.as_str()).unwrap_or("");
            // Without keys, a retry after an ambiguous send may store a second copy: allowed
            // as long as the acked offset holds it.
            let copies_allowed = !cfg.send_key && p.ambiguous > 0;
            let this = match found.as_slice() {
                [] => Some((ACKED_LOST, "missing".to_owned())),
                [o] if *o == offset && stored_epoch == epoch => None,
                many if copies_allowed && many.contains(&offset) && stored_epoch == epoch => None,
                [o] => Some((ACKED_MOVED, format!("stored at ({stored_epoch}, {o})"))),
                many => Some((ACKED_TWICE, format!("stored at offsets {many:?}"))),
            };
            if let Some((k, text)) = this {
                kind.get_or_insert(k);
                let holder = at_offset
                    .get(&key)
                    .and_then(|m| m.get(&offset))
                    .map(|(_, b)| format!("; offset {offset} holds {}", describe(b)))
                    .unwrap_or_else(|| format!("; no offset {offset}"));
                let text = format!("{text}{holder}");
                // Nodes with the same problem are named together.
                match problems.iter_mut().find(|(_, t)| *t == text) {
                    Some((nodes, _)) => nodes.push(node.as_str()),
                    None => problems.push((vec![node.as_str()], text)),
                }
            }
        }
        let problems: Vec<String> =
            problems.iter().map(|(nodes, text)| format!("{}: {text}", nodes.join(", "))).collect();
        if let Some(kind) = kind {
            let Outcome::Acked { attempt, at_ms, .. } = &p.outcome else { continue };
            push(
                kind,
                format!(
                    "{}: {} key {} by {} via {} acked ({epoch}, {offset}) on send {attempt} at t={at_ms} ms: {}",
                    p.room,
                    quote(&p.body),
                    p.key,
                    p.publisher,
                    p.node,
                    problems.join(" | ")
                ),
            );
        }
    }

    // (b) every node holds the reference node's history; (c) offsets 1..N; stored bodies known
    // and (with keys, or without an ambiguous send) stored once.
    for room in &cfg.rooms {
        let reference = histories.get(reference_node).and_then(|r| r.get(room));
        for node in &node_names {
            let Some(h) = histories[*node].get(room) else { continue };
            if !h.complete {
                push(TRUNCATED, format!("{node}: {room}: older messages were dropped (history.size too small?)"));
            }
            if let Some(gap) = h.messages.iter().enumerate().find(|(i, (o, _, _))| *o != *i as u64 + 1) {
                let (i, (o, _, _)) = gap;
                push(
                    OFFSETS,
                    format!("{node}: {room}: entry {} has offset {o} (expected {}); {} entries", i + 1, i + 1, {
                        h.messages.len()
                    }),
                );
            }
            if let Some(m) = h.messages.iter().find(|(_, e, _)| *e != h.epoch) {
                push(OFFSETS, format!("{node}: {room}: offset {} in epoch {} within stream {}", m.0, m.1, h.epoch));
            }
            if *node.as_str() != *reference_node
                && let Some(r) = reference
                && r != h
            {
                let first = r.messages.iter().zip(&h.messages).position(|(a, b)| a != b);
                let detail = match first {
                    Some(i) => format!(
                        "first difference at entry {}: {reference_node} has ({}, {}) {}, {node} has ({}, {}) {}",
                        i + 1,
                        r.messages[i].1,
                        r.messages[i].0,
                        quote(&r.messages[i].2),
                        h.messages[i].1,
                        h.messages[i].0,
                        quote(&h.messages[i].2)
                    ),
                    None => "one is a prefix of the other".to_owned(),
                };
                push(
                    NODES_DIFFER,
                    format!(
                        "{room}: {reference_node} has {} messages in epoch {}, {node} has {} in epoch {}; {detail}",
                        r.messages.len(),
                        r.epoch,
                        h.messages.len(),
                        h.epoch
                    ),
                );
            }
        }
        // Per body, on the reference node (the others are compared above).
        if let Some(pos) = positions.get(&(reference_node, room.as_str())) {
            let mut bodies: Vec<(&&str, &Vec<u64>)> = pos.iter().collect();
            bodies.sort_by_key(|(_, offsets)| offsets[0]);
            for (body, offsets) in bodies {
                match by_body.get(*body) {
                    None => push(UNKNOWN, format!("{reference_node}: {room}: {} at offsets {offsets:?}", quote(body))),
                    // An acked one stored twice is reported above. Without keys, a retry after an
                    // ambiguous send may legitimately store a second copy.
                    Some(p) if offsets.len() > 1 && p.acked().is_none() && (cfg.send_key || p.ambiguous == 0) => {
                        push(
                            STORED_TWICE,
                            format!(
                                "{reference_node}: {room}: {} at offsets {offsets:?} ({} sends, {} ambiguous)",
                                describe(body),
                                p.attempts,
                                p.ambiguous
                            ),
                        );
                    }
                    _ => {}
                }
            }
        }
    }

    // (d) deliveries in order and equal to the history; (e) no gap after a recovered resume or
    // inside a live subscription.
    let reference = histories.get(reference_node);
    for s in &subscribers {
        if let Some(behind) = &s.behind {
            push(BEHIND, format!("{}: {behind}; connections ended: {}", s.name, tail_of(&s.ends, 3)));
        }
        for (room, deliveries) in &s.deliveries {
            let stored = reference.and_then(|r| r.get(room));
            for (i, d) in deliveries.iter().enumerate() {
                if i > 0 {
                    let prev = &deliveries[i - 1];
                    if d.offset <= prev.offset {
                        push(
                            ORDER,
                            format!(
                                "{}: {room}: delivery {} is offset {} after offset {} (conn {} then conn {}): {} after {}",
                                s.name,
                                i + 1,
                                d.offset,
                                prev.offset,
                                prev.conn,
                                d.conn,
                                quote(&d.body),
                                quote(&prev.body)
                            ),
                        );
                    }
                }
                let entry = stored.and_then(|h| h.messages.get((d.offset as usize).wrapping_sub(1)));
                match entry {
                    Some((o, e, b)) if *o == d.offset && *e == d.epoch && *b == d.body => {}
                    other => push(
                        MISMATCH,
                        format!(
                            "{}: {room}: received ({}, {}) {} on conn {}; {reference_node}'s history has {}",
                            s.name,
                            d.epoch,
                            d.offset,
                            quote(&d.body),
                            d.conn,
                            other.map_or("no such offset".to_owned(), |(o, e, b)| format!("({e}, {o}) {}", quote(b)))
                        ),
                    ),
                }
            }
            // Contiguity within each join's span.
            let joins: Vec<&Resume> = s.resumes.iter().filter(|r| &r.room == room).collect();
            for (j, r) in joins.iter().enumerate() {
                let end = joins.get(j + 1).map_or(deliveries.len(), |n| n.index);
                let span = &deliveries[r.index.min(end)..end];
                let (expected, kind, why) = match &r.since {
                    Some((epoch, offset)) if r.recovered => {
                        if *epoch != r.epoch {
                            push(
                                RESUME_GAP,
                                format!(
                                    "{}: {room}: resume on {} (conn {}) from ({epoch}, {offset}) answered recovered \
                                     in another epoch {}",
                                    s.name, r.node, r.conn, r.epoch
                                ),
                            );
                        }
                        (offset + 1, RESUME_GAP, format!("resume from ({epoch}, {offset}), recovered: true"))
                    }
                    Some(_) => continue,
                    None => (r.offset + 1, LIVE_GAP, format!("join at offset {}", r.offset)),
                };
                for (want, d) in (expected..).zip(span) {
                    if d.offset != want {
                        push(
                            kind,
                            format!(
                                "{}: {room}: on {} (conn {}, {why}): expected offset {want}, received {} {}",
                                s.name,
                                r.node,
                                r.conn,
                                d.offset,
                                quote(&d.body)
                            ),
                        );
                        break;
                    }
                }
            }
        }
    }

    // Summary.
    let acked = publishes.iter().filter(|p| p.acked().is_some()).count();
    let gave_up = publishes.len() - acked;
    let retried = publishes.iter().filter(|p| p.attempts > 1).count();
    let ambiguous: u32 = publishes.iter().map(|p| p.ambiguous).sum();
    let stored_given_up = publishes
        .iter()
        .filter(|p| p.acked().is_none())
        .filter(|p| positions.get(&(reference_node, p.room.as_str())).is_some_and(|m| m.contains_key(p.body.as_str())))
        .count();
    let extra_copies: usize = positions
        .iter()
        .filter(|((node, _), _)| *node == reference_node)
        .flat_map(|(_, m)| m.values())
        .map(|offsets| offsets.len().saturating_sub(1))
        .sum();
    let stored: Vec<String> = cfg
        .rooms
        .iter()
        .map(|room| {
            let h = reference.and_then(|r| r.get(room));
            format!(
                "{room} {} (epoch {})",
                h.map_or(0, |h| h.messages.len()),
                h.map_or("-", |h| h.epoch.as_str()).chars().take(12).collect::<String>()
            )
        })
        .collect();
    let resumes: usize = subscribers.iter().map(|s| s.resumes.iter().filter(|r| r.since.is_some()).count()).sum();
    let recovered: usize =
        subscribers.iter().map(|s| s.resumes.iter().filter(|r| r.since.is_some() && r.recovered).count()).sum();
    let deliveries: Vec<String> =
        subscribers.iter().map(|s| format!("{} {} ({} conns)", s.name, s.delivered(), s.connections)).collect();
    let summary = format!(
        "published {} (keys {}), acked {acked}, gave up {gave_up} ({stored_given_up} of them stored), retried \
         {retried} ({ambiguous} ambiguous sends, {extra_copies} extra copies stored); stored: {}; history length per node: {}; subscriber deliveries: {}; resumes {resumes} ({recovered} recovered)",
        publishes.len(),
        if cfg.send_key { "on" } else { "off" },
        stored.join(", "),
        lengths_text(histories),
        deliveries.join(", ")
    );
    Report { scenario: scenario.to_owned(), summary, violations: v }
}

fn tail_of(items: &[String], n: usize) -> String {
    items[items.len().saturating_sub(n)..].join(" / ")
}

// ---------- a seeded random number generator ----------

/// splitmix64: enough randomness to pick victims, and a seed that replays the same picks.
pub struct SeededRng(u64);

impl SeededRng {
    /// From `$HISTORY_CHECK_SEED` if set, else from the clock; print [`SeededRng::seed`].
    pub fn from_env_or_time() -> SeededRng {
        let seed = std::env::var("HISTORY_CHECK_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
        });
        SeededRng(seed)
    }

    pub fn seed(&self) -> u64 {
        self.0
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn history(epoch: &str, bodies: &[&str]) -> RoomHistory {
        RoomHistory {
            epoch: epoch.into(),
            messages: bodies.iter().enumerate().map(|(i, b)| (i as u64 + 1, epoch.into(), (*b).into())).collect(),
            complete: true,
        }
    }

    fn acked(body: &str, offset: u64) -> PublishRecord {
        PublishRecord {
            publisher: "p".into(),
            node: "n0".into(),
            room: "r".into(),
            key: format!("k-{body}"),
            body: body.into(),
            attempts: 1,
            ambiguous: 0,
            retries: Vec::new(),
            outcome: Outcome::Acked { offset, epoch: "E".into(), attempt: 1, at_ms: 0 },
        }
    }

    fn run(publishes: Vec<PublishRecord>, subscribers: Vec<SubscriberLog>) -> Recorded {
        Recorded { publishes, subscribers, histories: Histories::new() }
    }

    fn cfg() -> HistoryConfig {
        let mut cfg = HistoryConfig::new("t", &["r"]);
        cfg.send_key = true;
        cfg
    }

    fn nodes(h: &[RoomHistory]) -> Histories {
        h.iter().enumerate().map(|(i, h)| (format!("n{i}"), BTreeMap::from([("r".to_owned(), h.clone())]))).collect()
    }

    #[test]
    fn a_clean_history_passes() {
        let h = history("E", &["a", "b"]);
        let r = run(vec![acked("a", 1), acked("b", 2)], Vec::new());
        let report = check("clean", &cfg(), &[&r], &nodes(&[h.clone(), h]));
        assert!(report.ok(), "{report}");
    }

    #[test]
    fn an_ack_pointing_at_an_older_message_is_reported_with_what_is_there() {
        // The restart bug: "c" acked with offset 1, which holds "a"; "c" was never stored.
        let h = history("E", &["a", "b"]);
        let r = run(vec![acked("a", 1), acked("b", 2), acked("c", 1)], Vec::new());
        let report = check("lost", &cfg(), &[&r], &nodes(&[h.clone(), h]));
        assert_eq!(report.counts(), [(ACKED_LOST, 1)], "{report}");
        let text = report.to_string();
        assert!(text.contains("\"c\"") && text.contains("offset 1 holds \"a\""), "{text}");
    }

    #[test]
    fn diverging_nodes_gaps_and_duplicates_are_reported() {
        let r = run(vec![acked("a", 1), acked("b", 2)], Vec::new());
        let report = check("diverge", &cfg(), &[&r], &nodes(&[history("E", &["a", "b"]), history("E", &["a", "x"])]));
        let kinds: Vec<&str> = report.counts().iter().map(|(k, _)| *k).collect();
        assert!(kinds.contains(&ACKED_LOST) && kinds.contains(&NODES_DIFFER), "{report}");

        let mut gap = history("E", &["a", "b"]);
        gap.messages[1].0 = 3;
        let report = check("gap", &cfg(), &[&run(vec![acked("a", 1)], Vec::new())], &nodes(&[gap]));
        assert!(report.counts().iter().any(|(k, _)| *k == OFFSETS), "{report}");

        let twice = history("E", &["a", "a"]);
        let report = check("twice", &cfg(), &[&run(vec![acked("a", 1)], Vec::new())], &nodes(&[twice]));
        assert_eq!(report.counts(), [(ACKED_TWICE, 1)], "{report}");
    }

    #[test]
    fn subscriber_reorders_mismatches_and_gaps_are_reported() {
        let h = history("E", &["a", "b", "c", "d"]);
        let d = |offset: u64, body: &str, conn: u32| Delivery { offset, epoch: "E".into(), body: body.into(), conn };
        let resume = |conn, since: Option<u64>, offset, recovered, index| Resume {
            room: "r".into(),
            conn,
            node: "n0".into(),
            since: since.map(|o| ("E".to_owned(), o)),
            epoch: "E".into(),
            offset,
            recovered,
            index,
        };
        let sub = SubscriberLog {
            name: "s".into(),
            home: "n0".into(),
            // Live 1, 2; resumed from 2 (recovered) but got 4; then 3 again.
            deliveries: BTreeMap::from([(
                "r".to_owned(),
                vec![d(1, "a", 1), d(2, "b", 1), d(4, "d", 2), d(3, "x", 2)],
            )]),
            resumes: vec![resume(1, None, 0, false, 0), resume(2, Some(2), 4, true, 2)],
            connections: 2,
            ..SubscriberLog::default()
        };
        let r = run(vec![acked("a", 1), acked("b", 2), acked("c", 3), acked("d", 4)], vec![sub]);
        let report = check("subs", &cfg(), &[&r], &nodes(&[h]));
        let kinds: Vec<&str> = report.counts().iter().map(|(k, _)| *k).collect();
        assert_eq!(kinds, [ORDER, MISMATCH, RESUME_GAP], "{report}");
    }
}
