//! The load: fleets of connections (one task each) that set up (handshake, auth, joins), then
//! read and count deliveries until aborted; publishers that send at a fixed rate or as fast as a
//! bounded window of outstanding publishes allows.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use hdrhistogram::Histogram;
use tokio::io::{AsyncRead, AsyncWriteExt as _};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::{Notify, Semaphore, mpsc};
use tokio::task::JoinHandle;

use crate::client::{self, Conn, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT};
use crate::procs::Kind;

static START: OnceLock<Instant> = OnceLock::new();

/// Nanoseconds since the bench started (monotonic): the clock of publish timestamps.
pub fn now_ns() -> u64 {
    START.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

const HIST_SHARDS: usize = 16;

pub fn new_hist() -> Histogram<u64> {
    // Microseconds, 1 µs .. 10 min, 3 significant figures.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("static histogram bounds are valid")
}

/// Counters shared by every connection of a run.
pub struct Stats {
    /// Frames carrying a benchmark body (`message` frames of the node, echoed payloads of the
    /// reference server).
    pub delivered: AtomicU64,
    /// Payload bytes of the delivered frames.
    pub delivered_bytes: AtomicU64,
    pub frames: AtomicU64,
    pub error_frames: AtomicU64,
    pub closes: AtomicU64,
    pub eofs: AtomicU64,
    pub pings: AtomicU64,
    pub problems: Mutex<Vec<String>>,
    /// Latencies are recorded for publishes sent in `[lat_from, lat_to)` (ns, [`now_ns`]).
    pub lat_from: AtomicU64,
    pub lat_to: AtomicU64,
    hist: Vec<Mutex<Histogram<u64>>>,
    pub publishers: Vec<PubState>,
}

pub struct PubState {
    pub outstanding: AtomicI64,
    pub sent: AtomicU64,
    pub notify: Notify,
}

impl Stats {
    pub fn new(publishers: usize) -> Arc<Self> {
        Arc::new(Stats {
            delivered: AtomicU64::new(0),
            delivered_bytes: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            error_frames: AtomicU64::new(0),
            closes: AtomicU64::new(0),
            eofs: AtomicU64::new(0),
            pings: AtomicU64::new(0),
            problems: Mutex::new(Vec::new()),
            lat_from: AtomicU64::new(u64::MAX),
            lat_to: AtomicU64::new(0),
            hist: (0..HIST_SHARDS).map(|_| Mutex::new(new_hist())).collect(),
            publishers: (0..publishers)
                .map(|_| PubState { outstanding: AtomicI64::new(0), sent: AtomicU64::new(0), notify: Notify::new() })
                .collect(),
        })
    }

    pub fn problem(&self, what: String) {
        let mut p = self.problems.lock().unwrap_or_else(|e| e.into_inner());
        if p.len() < 20 {
            p.push(what);
        }
    }

    /// Starts recording latencies of publishes sent from now on (and resets the histogram).
    pub fn record_from_now(&self) {
        for h in &self.hist {
            h.lock().unwrap_or_else(|e| e.into_inner()).reset();
        }
        self.lat_to.store(u64::MAX, Ordering::SeqCst);
        self.lat_from.store(now_ns(), Ordering::SeqCst);
    }

    /// Stops recording latencies of publishes sent from now on.
    pub fn record_until_now(&self) {
        self.lat_to.store(now_ns(), Ordering::SeqCst);
    }

    pub fn latency(&self) -> Histogram<u64> {
        let mut all = new_hist();
        for h in &self.hist {
            let _ = all.add(&*h.lock().unwrap_or_else(|e| e.into_inner()));
        }
        all
    }

    pub fn outstanding(&self) -> i64 {
        self.publishers.iter().map(|p| p.outstanding.load(Ordering::Relaxed)).sum()
    }

    pub fn sent(&self) -> u64 {
        self.publishers.iter().map(|p| p.sent.load(Ordering::Relaxed)).sum()
    }
}

/// What every connection of a fleet does at setup.
pub struct Spec {
    pub kind: Kind,
    pub addr: SocketAddr,
    /// One token per connection index (the node); empty for the reference server.
    pub tokens: Vec<String>,
    /// Rooms connection `i` joins (the node only).
    pub rooms: Box<dyn Fn(usize) -> Vec<String> + Send + Sync>,
    /// Connections `0..publishers` hand their write half back to the controller.
    pub publishers: usize,
    pub source_ips: u8,
    pub buf_size: usize,
}

/// Running connections; aborted (sockets closed) when dropped.
pub struct Fleet {
    pub handles: Vec<JoinHandle<()>>,
    pub writers: Vec<OwnedWriteHalf>,
    pub setup_elapsed: Duration,
    /// Setup time per connection, µs.
    pub setup_hist: Histogram<u64>,
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for h in &self.handles {
            h.abort();
        }
    }
}

type Ready = (usize, Duration, Result<Option<OwnedWriteHalf>, String>);

/// Opens `n` connections with at most `concurrency` setups in flight; each one then reads
/// until the fleet is dropped. Fails if any setup fails.
pub async fn launch(n: usize, concurrency: usize, spec: Arc<Spec>, stats: Arc<Stats>) -> anyhow::Result<Fleet> {
    let sem = Arc::new(Semaphore::new(concurrency.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel::<Ready>();
    let mut handles = Vec::with_capacity(n);
    let mut writers: Vec<Option<OwnedWriteHalf>> = (0..spec.publishers.min(n)).map(|_| None).collect();
    let mut setup_hist = new_hist();
    let mut done = 0;
    let t0 = Instant::now();
    for i in 0..n {
        let permit = sem.clone().acquire_owned().await.context("semaphore closed")?;
        let (spec, stats, tx) = (spec.clone(), stats.clone(), tx.clone());
        handles.push(tokio::spawn(async move {
            let started = Instant::now();
            let conn = match tokio::time::timeout(client::SETUP_TIMEOUT, setup(&spec, i)).await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    drop(permit);
                    let _ = tx.send((i, started.elapsed(), Err(format!("{e:#}"))));
                    return;
                }
                Err(_) => {
                    drop(permit);
                    let _ = tx.send((i, started.elapsed(), Err("setup timed out".into())));
                    return;
                }
            };
            let took = started.elapsed();
            drop(permit);
            if i < spec.publishers {
                let (reader, writer) = conn.into_split();
                let _ = tx.send((i, took, Ok(Some(writer))));
                drain(reader, &stats, Some(i as u32), i).await;
            } else {
                let _ = tx.send((i, took, Ok(None)));
                drain(conn, &stats, None, i).await;
            }
        }));
        // Fail fast on setup errors.
        while let Ok(r) = rx.try_recv() {
            done += 1;
            absorb(r, &mut writers, &mut setup_hist)?;
        }
    }
    drop(tx);
    while done < n {
        let r = rx.recv().await.context("setup tasks ended early")?;
        done += 1;
        absorb(r, &mut writers, &mut setup_hist)?;
    }
    let setup_elapsed = t0.elapsed();
    let writers = writers.into_iter().map(|w| w.context("publisher missing")).collect::<anyhow::Result<_>>()?;
    Ok(Fleet { handles, writers, setup_elapsed, setup_hist })
}

fn absorb(r: Ready, writers: &mut [Option<OwnedWriteHalf>], hist: &mut Histogram<u64>) -> anyhow::Result<()> {
    let (i, took, res) = r;
    let w = res.map_err(|e| anyhow::anyhow!("connection {i}: {e}"))?;
    let _ = hist.record((took.as_micros() as u64).max(1));
    if let Some(w) = w
        && let Some(slot) = writers.get_mut(i)
    {
        *slot = Some(w);
    }
    Ok(())
}

async fn setup(spec: &Spec, i: usize) -> anyhow::Result<Conn<tokio::net::TcpStream>> {
    let src = Ipv4Addr::new(127, 0, 0, 1 + (i % usize::from(spec.source_ips.max(1))) as u8);
    let stream = client::tcp_connect(src, spec.addr).await?;
    let host = spec.addr.to_string();
    match spec.kind {
        Kind::Ref => Conn::handshake(stream, &host, "/ws", None, spec.buf_size).await,
        Kind::Node => {
            let token = spec.tokens.get(i).context("no token for this connection")?;
            let mut conn = Conn::handshake(stream, &host, "/ws", Some(token), spec.buf_size).await?;
            let (op, first) = conn.next_frame().await?;
            if op != OP_TEXT || !first.starts_with(b"{\"type\":\"welcome\"") {
                bail!("first frame is not welcome: {}", String::from_utf8_lossy(&first));
            }
            let rooms = (spec.rooms)(i);
            for (k, room) in rooms.iter().enumerate() {
                let join = format!("{{\"type\":\"join\",\"id\":\"j{k}\",\"room\":\"{room}\"}}");
                conn.send_text(join.as_bytes()).await?;
            }
            for _ in &rooms {
                conn.expect("joined").await?;
            }
            Ok(conn)
        }
    }
}

/// Reads frames in place until EOF, a close frame or abort, counting deliveries and recording
/// latencies; `publisher` is this connection's publisher index, whose own echoes release window.
async fn drain<R: AsyncRead + Unpin>(mut conn: Conn<R>, stats: &Stats, publisher: Option<u32>, i: usize) {
    let shard = &stats.hist[i % HIST_SHARDS];
    let mut lats: Vec<u64> = Vec::with_capacity(64);
    loop {
        let now = now_ns();
        let from = stats.lat_from.load(Ordering::Relaxed);
        let to = stats.lat_to.load(Ordering::Relaxed);
        let (mut frames, mut delivered, mut bytes, mut own) = (0u64, 0u64, 0u64, 0i64);
        loop {
            let f = match client::parse_frame(&conn.buf[conn.pos..conn.len]) {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    stats.problem(format!("connection {i}: {e:#}"));
                    return;
                }
            };
            let payload = &conn.buf[conn.pos + f.start..conn.pos + f.end];
            conn.pos += f.end;
            frames += 1;
            match f.opcode {
                OP_TEXT | OP_CONT => {
                    if let Some((ts, p)) = client::scan_body(payload) {
                        delivered += 1;
                        bytes += payload.len() as u64;
                        if ts >= from && ts < to {
                            lats.push(now.saturating_sub(ts) / 1000);
                        }
                        if Some(p) == publisher {
                            own += 1;
                        }
                    } else if payload.starts_with(b"{\"type\":\"error\"") {
                        stats.error_frames.fetch_add(1, Ordering::Relaxed);
                        stats.problem(format!("connection {i}: {}", String::from_utf8_lossy(payload)));
                        // A refused publish (e.g. `unavailable` in a cluster) will not come back:
                        // free its window slot so the publisher does not stall for good.
                        if publisher.is_some() {
                            own += 1;
                        }
                    }
                }
                OP_CLOSE => {
                    stats.closes.fetch_add(1, Ordering::Relaxed);
                    stats.problem(format!("connection {i} closed by server: {}", client::describe_close(payload)));
                    return;
                }
                OP_PING => {
                    stats.pings.fetch_add(1, Ordering::Relaxed);
                }
                _ => {}
            }
        }
        if frames > 0 {
            stats.frames.fetch_add(frames, Ordering::Relaxed);
        }
        if delivered > 0 {
            stats.delivered.fetch_add(delivered, Ordering::Relaxed);
            stats.delivered_bytes.fetch_add(bytes, Ordering::Relaxed);
        }
        if !lats.is_empty() {
            let mut h = shard.lock().unwrap_or_else(|e| e.into_inner());
            for &l in &lats {
                let _ = h.record(l.max(1));
            }
            drop(h);
            lats.clear();
        }
        if own > 0
            && let Some(p) = publisher
            && let Some(st) = stats.publishers.get(p as usize)
        {
            st.outstanding.fetch_sub(own, Ordering::AcqRel);
            st.notify.notify_one();
        }
        if let Err(e) = conn.fill().await {
            stats.eofs.fetch_add(1, Ordering::Relaxed);
            stats.problem(format!("connection {i}: {e:#}"));
            return;
        }
    }
}

/// How publishers send during one phase.
#[derive(Debug, Clone, Copy)]
pub enum Pace {
    /// Publishes per second per publisher, evenly spaced, publishers staggered.
    Rate(f64),
    /// As fast as possible with at most this many of the publisher's own publishes not yet
    /// echoed back to it.
    Window(i64),
}

pub struct PublishPlan {
    pub room: String,
    pub body_bytes: usize,
    pub pace: Pace,
    pub duration: Duration,
}

/// Runs every publisher for `plan.duration`; returns the write halves for the next phase.
pub async fn publish_phase(
    writers: Vec<OwnedWriteHalf>,
    stats: &Arc<Stats>,
    plan: &PublishPlan,
) -> anyhow::Result<Vec<OwnedWriteHalf>> {
    let n = writers.len();
    let start = tokio::time::Instant::now();
    let end = start + plan.duration;
    let mut tasks = Vec::with_capacity(n);
    for (idx, w) in writers.into_iter().enumerate() {
        let stats = stats.clone();
        let room = plan.room.clone();
        let (pace, body_bytes) = (plan.pace, plan.body_bytes);
        tasks
            .push(tokio::spawn(async move { publisher(w, idx, n, &stats, &room, body_bytes, pace, start, end).await }));
    }
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.context("publisher panicked")??);
    }
    Ok(out)
}

#[allow(clippy::too_many_arguments)]
async fn publisher(
    mut w: OwnedWriteHalf,
    idx: usize,
    n: usize,
    stats: &Stats,
    room: &str,
    body_bytes: usize,
    pace: Pace,
    start: tokio::time::Instant,
    end: tokio::time::Instant,
) -> anyhow::Result<OwnedWriteHalf> {
    let st = stats.publishers.get(idx).context("publisher index")?;
    let mut out = Vec::with_capacity(4096);
    let mut seq: u64 = st.sent.load(Ordering::Relaxed);
    let push = |out: &mut Vec<u8>, seq: &mut u64| {
        let head = format!("T{}:{idx}:", now_ns());
        let pad = body_bytes.saturating_sub(head.len());
        let frame = format!(
            "{{\"type\":\"publish\",\"id\":\"{seq}\",\"room\":\"{room}\",\"body\":\"{head}{}\"}}",
            "x".repeat(pad)
        );
        client::encode_text(out, frame.as_bytes());
        *seq += 1;
    };
    match pace {
        Pace::Rate(per_sec) => {
            let period = Duration::from_secs_f64(1.0 / per_sec.max(1e-3));
            let mut next = start + period.mul_f64(idx as f64 / n.max(1) as f64);
            while next < end {
                tokio::time::sleep_until(next).await;
                out.clear();
                push(&mut out, &mut seq);
                st.outstanding.fetch_add(1, Ordering::AcqRel);
                st.sent.fetch_add(1, Ordering::Relaxed);
                w.write_all(&out).await?;
                next += period;
            }
        }
        Pace::Window(window) => {
            while tokio::time::Instant::now() < end {
                let outstanding = st.outstanding.load(Ordering::Acquire);
                if outstanding >= window {
                    let left = end.saturating_duration_since(tokio::time::Instant::now());
                    let _ = tokio::time::timeout(left.min(Duration::from_millis(100)), st.notify.notified()).await;
                    continue;
                }
                let k = window - outstanding;
                out.clear();
                for _ in 0..k {
                    push(&mut out, &mut seq);
                }
                st.outstanding.fetch_add(k, Ordering::AcqRel);
                st.sent.fetch_add(k as u64, Ordering::Relaxed);
                w.write_all(&out).await?;
            }
        }
    }
    Ok(w)
}

/// One publishing phase: publishers send per `pace` for `warmup + window`; over `window` the
/// deliveries counted by `measured` give the rate and its latencies are recorded. `meter` starts
/// when the window opens and its reading (CPU use) is returned with the rate.
#[allow(clippy::too_many_arguments)]
pub async fn measured_phase<M, R>(
    writers: Vec<OwnedWriteHalf>,
    publishing: &Arc<Stats>,
    measured: &Stats,
    body_bytes: usize,
    pace: Pace,
    warmup: Duration,
    window: Duration,
    meter: impl FnOnce() -> M,
    read: impl FnOnce(M) -> R,
) -> anyhow::Result<(Vec<OwnedWriteHalf>, f64, R)> {
    let plan = PublishPlan {
        room: "bench".to_owned(),
        body_bytes,
        pace,
        duration: warmup + window + Duration::from_millis(200),
    };
    let measure = async {
        tokio::time::sleep(warmup).await;
        measured.record_from_now();
        let d0 = measured.delivered.load(Ordering::Relaxed);
        let started = meter();
        let t = Instant::now();
        tokio::time::sleep(window).await;
        measured.record_until_now();
        let d1 = measured.delivered.load(Ordering::Relaxed);
        ((d1 - d0) as f64 / t.elapsed().as_secs_f64(), read(started))
    };
    let (writers, (per_sec, reading)) = tokio::join!(publish_phase(writers, publishing, &plan), measure);
    Ok((writers?, per_sec, reading))
}

/// Waits until every publish has come back to its publisher and deliveries stop, at most
/// `limit`. Returns whether it settled.
pub async fn settle(stats: &Stats, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut last = stats.frames.load(Ordering::Relaxed);
    let mut quiet = 0;
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = stats.frames.load(Ordering::Relaxed);
        if now == last && stats.outstanding() <= 0 {
            quiet += 1;
            if quiet >= 3 {
                return true;
            }
        } else {
            quiet = 0;
        }
        last = now;
    }
    false
}
