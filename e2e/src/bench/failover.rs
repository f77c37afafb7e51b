//! `chat-bench failover`: three nodes on 127.0.0.2–4, one publisher per node publishing to one
//! room every few milliseconds, each publish with its own idempotency key (retried with the same
//! key after `unavailable` or a lost connection). Each round finds the leader of the room's Raft
//! group through `/cluster` and either kills it (`kill -9`) or sends it SIGTERM (a drain: it
//! leaves its groups, then exits), and measures how long publishers on the surviving nodes could
//! not publish. The victim is restarted between rounds. See docs/benchmarks.md.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use serde::Deserialize;
use tokio::io::AsyncWriteExt as _;

use crate::client::{self, Conn, OP_CLOSE, OP_TEXT};
use crate::cluster::{self, Layout, NodeOpts, SIZE};
use crate::load::now_ns;
use crate::procs::{self, Server};

#[derive(clap::Args, Debug)]
pub struct Opts {
    #[command(flatten)]
    node: NodeOpts,
    /// Rounds of each fault (kill -9 of the leader, SIGTERM = drain of the leader), interleaved.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// Milliseconds between two publishes of one publisher.
    #[arg(long, default_value_t = 2)]
    interval_ms: u64,
    /// Seconds of steady publishing before each fault.
    #[arg(long, default_value_t = 1.0)]
    steady_secs: f64,
    /// Seconds of publishing after the first post-fault ack, before the victim is restarted.
    #[arg(long, default_value_t = 1.0)]
    after_secs: f64,
    /// Bound of the rounds, in seconds from the start: no round starts in its last 20 s and
    /// every wait of a round ends by it (the final checks take at most 10 s more).
    #[arg(long, default_value_t = 165)]
    budget_secs: u64,
    /// The room every publisher publishes to.
    #[arg(long, default_value = "failover")]
    room: String,
}

/// Publish keys a node remembers per room: those of the last 60 s, up to 10 000 (and at least
/// `max(history.size, 1000)`), as docs/protocol.md says. A key stored twice fewer than 10 000
/// messages apart counts as inside the window (at this bench's 1 500 publishes/s those are
/// under 7 s apart, well inside the 60 s).
const DEDUPE_WINDOW: u64 = 10_000;

#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Fault {
    Kill,
    Drain,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::Kill => "kill -9",
            Fault::Drain => "SIGTERM (drain)",
        }
    }
    fn signal(self) -> libc::c_int {
        match self {
            Fault::Kill => libc::SIGKILL,
            Fault::Drain => libc::SIGTERM,
        }
    }
    fn target_ms(self) -> f64 {
        match self {
            Fault::Kill => 2000.0,
            Fault::Drain => 200.0,
        }
    }
}

/// One publisher's counters, shared with the controller.
#[derive(Default)]
struct Pub {
    /// (ack time, first send time of that publish), ns of [`now_ns`], in arrival order.
    acks: Mutex<Vec<(u64, u64)>>,
    connected: AtomicBool,
    last_ack_ns: AtomicU64,
    /// Ack time of the first publish first sent at or after `Shared::fault_ns` (0: none yet).
    first_after: AtomicU64,
    published: AtomicU64,
    sends: AtomicU64,
    pending: AtomicU64,
    unavailable: AtomicU64,
    in_flight_refusals: AtomicU64,
    drops: AtomicU64,
    late_acks: AtomicU64,
    dup_deliveries: AtomicU64,
}

struct Shared {
    pubs: Vec<Pub>,
    /// Stop publishing new messages (pending ones are still retried until acked).
    stop: AtomicBool,
    /// Give up entirely.
    done: AtomicBool,
    fault_ns: AtomicU64,
    /// Offset (per epoch) → the publish (publisher, seq) that got it, from acks and deliveries.
    offsets: Mutex<HashMap<(String, u64), (usize, u64)>>,
    /// (publisher, seq) → the offset it was stored at.
    stored: Mutex<HashMap<(usize, u64), (String, u64)>>,
    /// Publishes stored twice: (publisher, seq) → both offsets.
    twice: Mutex<BTreeMap<(usize, u64), (u64, u64)>>,
    problems: Mutex<Vec<String>>,
}

impl Shared {
    fn problem(&self, what: String) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < 30 {
            p.push(what);
        }
    }

    /// Checks that publish (p, seq) has one offset and that no other publish has it.
    fn check_offset(&self, p: usize, seq: u64, epoch: &str, offset: u64, how: &str) {
        let key = (epoch.to_owned(), offset);
        {
            let mut offsets = self.offsets.lock().unwrap_or_else(|e| e.into_inner());
            match offsets.get(&key) {
                Some(&other) if other != (p, seq) => self.problem(format!(
                    "offset {offset} (epoch {epoch}) given to publish {p}:{} and to {p2}:{s2} ({how})",
                    seq,
                    p2 = other.0,
                    s2 = other.1
                )),
                Some(_) => {}
                None => {
                    offsets.insert(key, (p, seq));
                }
            }
        }
        let mut stored = self.stored.lock().unwrap_or_else(|e| e.into_inner());
        match stored.get(&(p, seq)) {
            Some((e, o)) if (e.as_str(), *o) != (epoch, offset) => {
                let first = *o;
                let same_epoch = e == epoch;
                drop(stored);
                let mut twice = self.twice.lock().unwrap_or_else(|e| e.into_inner());
                if twice.insert((p, seq), (first, offset)).is_none()
                    && (!same_epoch || offset.abs_diff(first) <= DEDUPE_WINDOW)
                {
                    self.problem(format!(
                        "publish {p}:{seq} (one idempotency key) stored twice, {} messages apart (inside the \
                         node's dedupe window): offsets {first} and {offset} ({how})",
                        offset.abs_diff(first)
                    ));
                }
            }
            Some(_) => {}
            None => {
                stored.insert((p, seq), (epoch.to_owned(), offset));
            }
        }
    }
}

#[derive(Deserialize)]
struct In {
    #[serde(rename = "type")]
    ty: String,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    code: Option<String>,
    #[serde(default)]
    message: Option<String>,
    #[serde(default)]
    body: Option<String>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    epoch: Option<String>,
}

fn encode_publish(out: &mut Vec<u8>, room: &str, p: usize, seq: u64) {
    let frame = format!(
        "{{\"type\":\"publish\",\"id\":\"{seq}\",\"room\":\"{room}\",\"key\":\"k{seq}\",\"body\":\"F{p}:{seq}\"}}"
    );
    client::encode_text(out, frame.as_bytes());
}

async fn connect(addr: SocketAddr, token: &str, room: &str) -> anyhow::Result<Conn<tokio::net::TcpStream>> {
    let stream = client::tcp_connect(Ipv4Addr::LOCALHOST, addr).await?;
    let mut conn = Conn::handshake(stream, &addr.to_string(), "/ws", Some(token), 64 * 1024).await?;
    conn.expect("welcome").await?;
    conn.send_text(format!("{{\"type\":\"join\",\"id\":\"j\",\"room\":\"{room}\"}}").as_bytes()).await?;
    conn.expect("joined").await?;
    Ok(conn)
}

/// Publisher `p`: connects to its home node (again and again while it is away), publishes every
/// `interval`, retries what was refused or lost with the same key, records acks.
async fn publisher(sh: Arc<Shared>, p: usize, addr: SocketAddr, token: String, room: String, interval: Duration) {
    let st = &sh.pubs[p];
    // seq → first send time, for publishes not acked yet.
    let mut pending: BTreeMap<u64, u64> = BTreeMap::new();
    let mut later: Vec<(Instant, u64)> = Vec::new();
    let mut next_seq: u64 = 0;
    // Deliveries the current connection saw: (publisher, seq) → offset.
    let mut seen: HashMap<(usize, u64), u64> = HashMap::new();
    let mut out: Vec<u8> = Vec::with_capacity(4096);
    let mut conns = 0u32;
    'connection: loop {
        if sh.done.load(Ordering::Acquire) || (sh.stop.load(Ordering::Acquire) && pending.is_empty()) {
            break;
        }
        let conn = match tokio::time::timeout(Duration::from_secs(2), connect(addr, &token, &room)).await {
            Ok(Ok(conn)) => conn,
            _ => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (mut rd, mut wr) = conn.into_split();
        conns += 1;
        seen.clear();
        out.clear();
        for &seq in pending.keys() {
            encode_publish(&mut out, &room, p, seq);
        }
        st.sends.fetch_add(pending.len() as u64, Ordering::Relaxed);
        later.clear();
        if wr.write_all(&out).await.is_err() {
            st.drops.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        st.connected.store(true, Ordering::Release);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            out.clear();
            let now = now_ns();
            let mut lost = false;
            loop {
                let f = match client::parse_frame(&rd.buf[rd.pos..rd.len]) {
                    Ok(Some(f)) => f,
                    Ok(None) => break,
                    Err(e) => {
                        sh.problem(format!("publisher {p}: {e:#}"));
                        lost = true;
                        break;
                    }
                };
                let payload = &rd.buf[rd.pos + f.start..rd.pos + f.end];
                rd.pos += f.end;
                if f.opcode == OP_CLOSE {
                    lost = true;
                    break;
                }
                if f.opcode != OP_TEXT {
                    continue;
                }
                let Ok(frame) = serde_json::from_slice::<In>(payload) else {
                    sh.problem(format!("publisher {p}: unparsable frame {}", String::from_utf8_lossy(payload)));
                    continue;
                };
                let seq = frame.id.as_deref().and_then(|id| id.parse::<u64>().ok());
                match frame.ty.as_str() {
                    "ack" => {
                        let Some(seq) = seq else { continue };
                        let Some(first) = pending.remove(&seq) else {
                            st.late_acks.fetch_add(1, Ordering::Relaxed);
                            continue;
                        };
                        later.retain(|(_, s)| *s != seq);
                        if let (Some(epoch), Some(offset)) = (frame.epoch.as_deref(), frame.offset) {
                            sh.check_offset(p, seq, epoch, offset, &format!("ack on connection {conns}"));
                        }
                        st.acks.lock().unwrap_or_else(|e| e.into_inner()).push((now, first));
                        st.last_ack_ns.store(now, Ordering::Release);
                        if first >= sh.fault_ns.load(Ordering::Acquire) {
                            let _ = st.first_after.compare_exchange(0, now, Ordering::AcqRel, Ordering::Acquire);
                        }
                    }
                    "error" => {
                        let code = frame.code.as_deref().unwrap_or_default();
                        let message = frame.message.as_deref().unwrap_or_default();
                        match (seq, code) {
                            (Some(seq), "unavailable") if pending.contains_key(&seq) => {
                                st.unavailable.fetch_add(1, Ordering::Relaxed);
                                st.sends.fetch_add(1, Ordering::Relaxed);
                                encode_publish(&mut out, &room, p, seq);
                            }
                            (Some(seq), "bad_request")
                                if message.contains("in flight") && pending.contains_key(&seq) =>
                            {
                                // The node still waits for this key from a lost connection.
                                st.in_flight_refusals.fetch_add(1, Ordering::Relaxed);
                                later.push((Instant::now() + Duration::from_millis(200), seq));
                            }
                            _ => sh.problem(format!("publisher {p}: {}", String::from_utf8_lossy(payload))),
                        }
                    }
                    "message" => {
                        let Some((from, s)) = frame.body.as_deref().and_then(parse_body) else { continue };
                        let (Some(offset), Some(epoch)) = (frame.offset, frame.epoch.as_deref()) else { continue };
                        if seen.insert((from, s), offset).is_some() {
                            st.dup_deliveries.fetch_add(1, Ordering::Relaxed);
                        }
                        let how = format!("seen by publisher {p}'s connection {conns} to {}", Layout::name(p));
                        sh.check_offset(from, s, epoch, offset, &how);
                    }
                    _ => {}
                }
            }
            st.pending.store(pending.len() as u64, Ordering::Relaxed);
            if lost {
                break;
            }
            if !out.is_empty() && wr.write_all(&out).await.is_err() {
                break;
            }
            if sh.done.load(Ordering::Acquire) || (sh.stop.load(Ordering::Acquire) && pending.is_empty()) {
                break 'connection;
            }
            tokio::select! {
                r = rd.fill() => {
                    if r.is_err() {
                        break;
                    }
                }
                _ = tick.tick() => {
                    out.clear();
                    if !sh.stop.load(Ordering::Acquire) {
                        let seq = next_seq;
                        next_seq += 1;
                        pending.insert(seq, now_ns());
                        encode_publish(&mut out, &room, p, seq);
                        st.published.fetch_add(1, Ordering::Relaxed);
                        st.sends.fetch_add(1, Ordering::Relaxed);
                    }
                    let due = Instant::now();
                    later.retain(|&(at, seq)| {
                        if at <= due && pending.contains_key(&seq) {
                            encode_publish(&mut out, &room, p, seq);
                            st.sends.fetch_add(1, Ordering::Relaxed);
                            false
                        } else {
                            at > due
                        }
                    });
                    if !out.is_empty() && wr.write_all(&out).await.is_err() {
                        break;
                    }
                }
            }
        }
        st.connected.store(false, Ordering::Release);
        st.drops.fetch_add(1, Ordering::Relaxed);
        // Publishes unanswered for long when the connection went: their acks were lost (or the
        // node held them); they are sent again with the same key on the next connection.
        let now = now_ns();
        let old: Vec<(u64, u64)> = pending
            .iter()
            .filter(|(_, first)| now.saturating_sub(**first) > 1_000_000_000)
            .map(|(s, f)| (*s, *f))
            .collect();
        if let Some(&(seq, first)) = old.first() {
            sh.problem(format!(
                "publisher {p} lost its connection {conns} to {} with {} publishes unanswered for over 1 s (of {} pending); \
                 the oldest, seq {seq}, was sent {:.0} ms before",
                Layout::name(p),
                old.len(),
                pending.len(),
                (now - first) as f64 / 1e6
            ));
        }
    }
    st.connected.store(false, Ordering::Release);
    st.pending.store(pending.len() as u64, Ordering::Relaxed);
}

/// `F<publisher>:<seq>` → (publisher, seq).
fn parse_body(body: &str) -> Option<(usize, u64)> {
    let (p, s) = body.strip_prefix('F')?.split_once(':')?;
    Some((p.parse().ok()?, s.parse().ok()?))
}

/// The leader of `group` and its term, if every node at `addrs` names the same one and that
/// one calls itself leader.
async fn agreed_leader(addrs: &[SocketAddr], group: u32) -> Option<(String, u64)> {
    let mut views = Vec::new();
    for &addr in addrs {
        let status = cluster::cluster_status(addr).await.ok()?;
        let name = status["node_id"].as_str().unwrap_or_default().to_owned();
        views.push((name, cluster::group_view(&status, group)?));
    }
    let (_, (_, leader, term)) = views.first()?.clone();
    let leader = leader?;
    let same = views.iter().all(|(_, (_, l, t))| l.as_deref() == Some(leader.as_str()) && *t == term);
    let claims = views.iter().any(|(name, (role, _, _))| *name == leader && role == "leader");
    (same && claims).then_some((leader, term))
}

async fn all_ready(addrs: &[SocketAddr]) -> bool {
    for &addr in addrs {
        if procs::http_get_status(addr, "/readyz").await.ok() != Some(200) {
            return false;
        }
    }
    true
}

/// Waits until every node is ready, they agree on the room group's leader and every publisher
/// is connected and got an ack in the last 300 ms.
async fn wait_steady(sh: &Shared, addrs: &[SocketAddr], group: u32, limit: Duration) -> anyhow::Result<(String, u64)> {
    let deadline = Instant::now() + limit;
    loop {
        let last = if all_ready(addrs).await {
            match agreed_leader(addrs, group).await {
                Some(leader) => {
                    let now = now_ns();
                    let slow: Vec<usize> = (0..sh.pubs.len())
                        .filter(|&p| {
                            let st = &sh.pubs[p];
                            !st.connected.load(Ordering::Acquire)
                                || now.saturating_sub(st.last_ack_ns.load(Ordering::Acquire)) > 300_000_000
                        })
                        .collect();
                    if slow.is_empty() {
                        return Ok(leader);
                    }
                    format!("publishers {slow:?} not connected or not acked in the last 300 ms")
                }
                None => format!("nodes do not agree on a leader of group {group}"),
            }
        } else {
            "not every node answers /readyz with 200".to_owned()
        };
        if Instant::now() > deadline {
            bail!("not steady after {limit:?}: {last}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Round {
    fault: Fault,
    victim: String,
    term: u64,
    /// Fault → first ack of a publish first sent after the fault, on a surviving node (ms).
    window_ms: Option<f64>,
    first_on: String,
    /// Largest gap between consecutive acks of the surviving publishers around the fault (ms).
    gap_ms: f64,
    gap_at_ms: f64,
    /// Longest send→ack wait of a surviving publisher's publish first sent after the fault (ms).
    worst_wait_ms: f64,
    unavailable: u64,
    new_leader: String,
    new_term: u64,
    exit_ms: Option<f64>,
    ready_ms: Option<f64>,
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let layout = Layout::new(&o.node)?;
    let mut nodes: Vec<Server> = layout.start_all().await?;
    let addrs: Vec<SocketAddr> = (0..SIZE).map(|i| layout.addr(i)).collect();
    let group = cluster::group_of(&o.room);
    println!(
        "# chat-bench failover: 3 nodes on 127.0.0.2-4 (bench-0..2, size 3, {} Raft groups), storage {}, {} cores, {}",
        cluster::PARTITIONS,
        layout.storage_note(),
        std::thread::available_parallelism()?.get(),
        crate::utc_now()
    );
    println!("# command: {}", crate::command_line());
    println!(
        "# room {:?} (group {group}); one publisher per node, a publish every {} ms each with its own key; \
         {} rounds of each fault",
        o.room, o.interval_ms, o.rounds
    );

    let tokens = crate::make_tokens(&layout.jwt, SIZE)?;
    let sh = Arc::new(Shared {
        pubs: (0..SIZE).map(|_| Pub::default()).collect(),
        stop: AtomicBool::new(false),
        done: AtomicBool::new(false),
        fault_ns: AtomicU64::new(u64::MAX),
        offsets: Mutex::default(),
        stored: Mutex::default(),
        twice: Mutex::default(),
        problems: Mutex::default(),
    });
    let mut tasks = Vec::new();
    for (p, token) in tokens.into_iter().enumerate() {
        let (sh, room) = (sh.clone(), o.room.clone());
        let interval = Duration::from_millis(o.interval_ms.max(1));
        tasks.push(tokio::spawn(publisher(sh, p, addrs[p], token, room, interval)));
    }

    let mut rounds: Vec<Round> = Vec::new();
    let mut retired: Vec<Server> = Vec::new();
    let faults: Vec<Fault> = (0..o.rounds).flat_map(|_| [Fault::Kill, Fault::Drain]).collect();
    let mut failure: Option<String> = None;
    for (k, &fault) in faults.iter().enumerate() {
        if t0.elapsed() + Duration::from_secs(20) > Duration::from_secs(o.budget_secs) {
            println!("PROBLEM: time budget of {} s used up: rounds {}.. not run", o.budget_secs, k + 1);
            break;
        }
        let end = t0 + Duration::from_secs(o.budget_secs);
        let res = round(&o, &layout, &sh, &mut nodes, &mut retired, &addrs, group, fault, k, end).await;
        match res {
            Ok(r) => {
                print_round(k + 1, faults.len(), &r);
                rounds.push(r);
            }
            Err(e) => {
                let msg = format!("round {} ({}) failed: {e:#}", k + 1, fault.name());
                println!("PROBLEM: {msg}");
                failure = Some(msg);
                break;
            }
        }
    }

    // Stop publishing; wait until every publish is acked.
    sh.stop.store(true, Ordering::Release);
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline && tasks.iter().any(|t| !t.is_finished()) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sh.done.store(true, Ordering::Release);
    for t in &tasks {
        t.abort();
    }

    print_summary(&rounds);
    let sum = |f: fn(&Pub) -> &AtomicU64| sh.pubs.iter().map(|p| f(p).load(Ordering::Relaxed)).sum::<u64>();
    let published = sum(|p| &p.published);
    let pending = sum(|p| &p.pending);
    let acked: u64 = sh.pubs.iter().map(|p| p.acks.lock().map(|a| a.len() as u64).unwrap_or(0)).sum();
    let stored = sh.stored.lock().map(|s| s.len()).unwrap_or(0);
    let epochs: BTreeSet<String> =
        sh.stored.lock().map(|s| s.values().map(|(e, _)| e.clone()).collect()).unwrap_or_default();
    println!(
        "publishes {published} (each with its own key), acked {acked}, never acked {pending}; sends {} (retries after \
         `unavailable` {}, after a lost connection the rest; refused as \"already in flight\" {}); connections lost {}; \
         late acks {}; publishes seen stored {stored}; duplicate deliveries {}; room epochs seen {}",
        sum(|p| &p.sends),
        sum(|p| &p.unavailable),
        sum(|p| &p.in_flight_refusals),
        sum(|p| &p.drops),
        sum(|p| &p.late_acks),
        sum(|p| &p.dup_deliveries),
        epochs.len(),
    );
    let twice: Vec<((usize, u64), (u64, u64))> =
        sh.twice.lock().map(|t| t.iter().map(|(k, v)| (*k, *v)).collect()).unwrap_or_default();
    let (inside, beyond): (Vec<_>, Vec<_>) = twice.iter().partition(|(_, (a, b))| a.abs_diff(*b) <= DEDUPE_WINDOW);
    println!(
        "publishes stored twice: {} inside the dedupe window, {} beyond it (retried after more than {DEDUPE_WINDOW} \
         newer messages in the room, past the node's dedupe window: documented){}",
        inside.len(),
        beyond.len(),
        if beyond.is_empty() {
            String::new()
        } else {
            format!(
                ": {}",
                beyond
                    .iter()
                    .take(8)
                    .map(|((p, s), (a, b))| format!("{p}:{s} at {a} and {b}"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    + if beyond.len() > 8 { ", ..." } else { "" }
            )
        }
    );
    if pending > 0 {
        println!("PROBLEM: {pending} publishes were never acked (10 s after publishing stopped)");
    }
    if epochs.len() > 1 {
        println!("PROBLEM: the room's epoch changed during the run ({epochs:?}): its stream restarted");
    }
    for p in sh.problems.lock().map(|p| p.clone()).unwrap_or_default() {
        println!("PROBLEM: {p}");
    }
    for node in &mut nodes {
        if let Some(status) = node.exited() {
            println!("PROBLEM: node at {} exited unexpectedly ({status}): {}", node.addr, node.log_tail());
        }
    }
    if let Some(dir) = &o.node.log_dir {
        println!("# node logs in {}", dir.display());
    }
    println!("# {:.1} s in all", t0.elapsed().as_secs_f64());
    for node in nodes.into_iter().chain(retired) {
        node.stop().await?;
    }
    drop(layout);
    if failure.is_some() {
        // Reported above (a PROBLEM line); exit non-zero without an error trace.
        std::process::exit(1);
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
async fn round(
    o: &Opts,
    layout: &Layout,
    sh: &Shared,
    nodes: &mut [Server],
    retired: &mut Vec<Server>,
    addrs: &[SocketAddr],
    group: u32,
    fault: Fault,
    k: usize,
    end: Instant,
) -> anyhow::Result<Round> {
    // Every wait below ends by `end` at the latest.
    let cap = |d: Duration| d.min(end.saturating_duration_since(Instant::now()));
    let (leader, term) = wait_steady(sh, addrs, group, cap(Duration::from_secs(20))).await?;
    tokio::time::sleep(Duration::from_secs_f64(o.steady_secs)).await;
    // The leader may have changed while we waited.
    let (leader, term) = agreed_leader(addrs, group).await.unwrap_or((leader, term));
    let victim = (0..SIZE)
        .find(|&i| Layout::name(i) == leader)
        .with_context(|| format!("leader {leader:?} is not a bench node"))?;
    let survivors: Vec<usize> = (0..SIZE).filter(|&i| i != victim).collect();
    let unavailable0: u64 = sh.pubs.iter().map(|p| p.unavailable.load(Ordering::Relaxed)).sum();
    for p in &sh.pubs {
        p.first_after.store(0, Ordering::Release);
    }

    let fault_ns = now_ns();
    sh.fault_ns.store(fault_ns, Ordering::Release);
    let fault_at = Instant::now();
    nodes[victim].signal(fault.signal())?;

    // The first ack, on a surviving node, of a publish sent after the fault; meanwhile the
    // victim exits (at once after kill -9; after its drain for SIGTERM).
    let limit = cap(Duration::from_secs(12));
    let observe = async {
        loop {
            let firsts: Vec<(u64, usize)> = survivors
                .iter()
                .filter_map(|&p| match sh.pubs[p].first_after.load(Ordering::Acquire) {
                    0 => None,
                    at => Some((at, p)),
                })
                .collect();
            if let Some(&first) = firsts.iter().min() {
                break Some(first);
            }
            if fault_at.elapsed() > limit {
                break None;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let exit_limit = cap(match fault {
        Fault::Kill => Duration::from_secs(5),
        Fault::Drain => Duration::from_secs(12),
    });
    let victim_node = &mut nodes[victim];
    let exited = async { victim_node.wait_exit(exit_limit).await.map(|_| fault_at.elapsed()) };
    let (first, exited) = tokio::join!(observe, exited);
    // Keep watching for `after_secs` past the first post-fault ack, and past the victim's exit
    // (a draining leader hands over while it drains, before it exits).
    let mut until = fault_at + Duration::from_secs_f64(o.after_secs);
    if let Some((at, _)) = first {
        until = until.max(fault_at + Duration::from_nanos(at - fault_ns) + Duration::from_secs_f64(o.after_secs));
    }
    if let Some(exit) = exited {
        until = until.max(fault_at + exit + Duration::from_millis(300));
    }
    tokio::time::sleep_until(until.min(end).into()).await;
    sh.fault_ns.store(u64::MAX, Ordering::Release);
    let end_ns = now_ns();

    // Acks of the surviving publishers from 1 s before the fault until now; gaps that end
    // after the fault count.
    let from_ns = fault_ns.saturating_sub(1_000_000_000);
    let mut acks: Vec<(u64, u64)> = Vec::new();
    for &p in &survivors {
        let a = sh.pubs[p].acks.lock().unwrap_or_else(|e| e.into_inner());
        acks.extend(a.iter().filter(|(at, _)| *at >= from_ns && *at <= end_ns));
    }
    acks.sort_unstable();
    let (mut gap, mut gap_at) = (0u64, 0u64);
    for w in acks.windows(2) {
        if w[1].0 > fault_ns && w[1].0 - w[0].0 > gap {
            gap = w[1].0 - w[0].0;
            gap_at = w[0].0;
        }
    }
    let worst_wait = acks.iter().filter(|(_, sent)| *sent >= fault_ns).map(|(at, sent)| at - sent).max().unwrap_or(0);
    let ms = |ns: u64| ns as f64 / 1e6;
    let unavailable = sh.pubs.iter().map(|p| p.unavailable.load(Ordering::Relaxed)).sum::<u64>() - unavailable0;

    let survivor_addrs: Vec<SocketAddr> = survivors.iter().map(|&i| addrs[i]).collect();
    let mut new_leader = ("?".to_owned(), 0);
    let deadline = Instant::now() + cap(Duration::from_secs(5));
    while Instant::now() < deadline {
        if let Some(l) = agreed_leader(&survivor_addrs, group).await {
            new_leader = l;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let exit_ms = match exited {
        Some(exit) => Some(exit.as_secs_f64() * 1000.0),
        None => {
            sh.problem(format!(
                "round {}: {leader} still running {:.1} s after {}; killed",
                k + 1,
                fault_at.elapsed().as_secs_f64(),
                fault.name()
            ));
            let _ = nodes[victim].signal(libc::SIGKILL);
            let _ = nodes[victim].wait_exit(Duration::from_secs(5)).await;
            None
        }
    };
    let restarted = Instant::now();
    let fresh = layout.launch(victim, &format!("{}", k + 1))?;
    retired.push(std::mem::replace(&mut nodes[victim], fresh));
    let ready_ms = match nodes[victim].wait_ready(cap(Duration::from_secs(20))).await {
        Ok(()) => {
            let deadline = Instant::now() + cap(Duration::from_secs(10));
            loop {
                if all_ready(addrs).await && agreed_leader(addrs, group).await.is_some() {
                    break Some(restarted.elapsed().as_secs_f64() * 1000.0);
                }
                if Instant::now() > deadline {
                    break None;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Err(e) => {
            sh.problem(format!("round {}: restarted {leader} not ready: {e:#}", k + 1));
            None
        }
    };

    Ok(Round {
        fault,
        victim: leader,
        term,
        window_ms: first.map(|(at, _)| ms(at - fault_ns)),
        first_on: first.map(|(_, p)| Layout::name(p)).unwrap_or_else(|| "-".into()),
        gap_ms: ms(gap),
        gap_at_ms: (gap_at as f64 - fault_ns as f64) / 1e6,
        worst_wait_ms: ms(worst_wait),
        unavailable,
        new_leader: new_leader.0,
        new_term: new_leader.1,
        exit_ms,
        ready_ms,
    })
}

fn fmt_opt(v: Option<f64>, unit: &str) -> String {
    v.map(|v| format!("{v:.0} {unit}")).unwrap_or_else(|| "-".into())
}

fn print_round(n: usize, of: usize, r: &Round) {
    let window = match r.window_ms {
        Some(w) => format!("{w:.1} ms (first on {}'s publisher)", r.first_on),
        None => "NONE within 12 s".to_owned(),
    };
    println!(
        "round {n:>2}/{of} {:<15} leader {} (term {}): window {window}; largest ack gap {:.1} ms (from {:+.1} ms); \
         slowest post-fault publish {:.1} ms; `unavailable` {}; new leader {} (term {}); victim exited after \
         {}, restarted and all 3 ready in {}",
        r.fault.name(),
        r.victim,
        r.term,
        r.gap_ms,
        r.gap_at_ms,
        r.worst_wait_ms,
        r.unavailable,
        r.new_leader,
        r.new_term,
        fmt_opt(r.exit_ms, "ms"),
        fmt_opt(r.ready_ms, "ms"),
    );
}

/// Nearest-rank median and max.
fn p50_max(mut v: Vec<f64>) -> Option<(f64, f64)> {
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    Some((v[(v.len() - 1) / 2], v[v.len() - 1]))
}

fn print_summary(rounds: &[Round]) {
    println!();
    println!(
        "unavailability = the larger of the window (fault -> first ack of a publish sent after it) and the largest \
         ack gap (no publisher on a surviving node got an ack); rounds without a post-fault ack count as missing."
    );
    println!(
        "| fault | rounds | window p50 / max, ms | largest ack gap p50 / max, ms | slowest post-fault publish p50 / max, ms | unavailability p50 / max, ms | target | met? |"
    );
    println!("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |");
    for fault in [Fault::Kill, Fault::Drain] {
        let rs: Vec<&Round> = rounds.iter().filter(|r| r.fault == fault).collect();
        if rs.is_empty() {
            continue;
        }
        let missing = rs.iter().filter(|r| r.window_ms.is_none()).count();
        let window = p50_max(rs.iter().filter_map(|r| r.window_ms).collect());
        let gap = p50_max(rs.iter().map(|r| r.gap_ms).collect());
        let wait = p50_max(rs.iter().map(|r| r.worst_wait_ms).collect());
        let unavailable = p50_max(rs.iter().filter_map(|r| r.window_ms.map(|w| w.max(r.gap_ms))).collect());
        let f = |v: Option<(f64, f64)>| v.map(|(a, b)| format!("{a:.0} / {b:.0}")).unwrap_or_else(|| "-".into());
        let met = match unavailable {
            Some((_, max)) if missing == 0 && max < fault.target_ms() => "yes",
            _ => "NO",
        };
        println!(
            "| {} | {} | {}{} | {} | {} | {} | < {:.0} ms | {met} |",
            fault.name(),
            rs.len(),
            f(window),
            if missing > 0 { format!(" ({missing} missing)") } else { String::new() },
            f(gap),
            f(wait),
            f(unavailable),
            fault.target_ms(),
        );
    }
}
