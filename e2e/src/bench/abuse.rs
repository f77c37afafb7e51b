//! `chat-bench abuse`: one node with its default limits (a few deadlines shortened so each abuse
//! ends within its phase), well-behaved clients chatting in one room the whole time, and one
//! abuse per phase. Prints, per phase, the other clients' publish → delivery latency and
//! deliveries, the node's RSS and peak RSS, and what each abuser got (close codes, statuses).
//!
//! Everything runs on 127.0.0.1; every abuser loop stops at the end of its phase.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use futures_util::{SinkExt as _, StreamExt as _};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::procs::{self, Server};

#[derive(clap::Args, Debug, Clone)]
pub struct Opts {
    /// chat-node binary (default: chat-node next to this binary).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// Seconds each abuse runs (the well-behaved clients' figures cover these seconds).
    #[arg(long, default_value_t = 6.0)]
    pub phase_secs: f64,
    /// Well-behaved subscribers in the calm room.
    #[arg(long, default_value_t = 20)]
    pub subscribers: usize,
    /// Well-behaved publishers in the calm room, 10 messages/s each.
    #[arg(long, default_value_t = 10)]
    pub publishers: usize,
    /// Only these phases (comma-separated names; default all).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Fail unless every abuser got its documented outcome, the other clients got every
    /// message, and the node's peak RSS stayed under `--max-rss-mib` (the end-to-end test).
    #[arg(long)]
    pub check: bool,
    #[arg(long, default_value_t = 256)]
    pub max_rss_mib: u64,
}

const SUBPROTOCOL: &str = "chatcluster.v1.json";
/// Deadlines shortened from the defaults so that the node ends each abuser within a phase.
const HANDSHAKE_TIMEOUT_SECS: u64 = 3;
const IDLE_TIMEOUT_SECS: u64 = 4;
const WRITE_TIMEOUT_SECS: u64 = 3;

fn node_toml(port: u16, admin_port: u16, secret: &str) -> String {
    format!(
        "node_id = \"abuse\"\nlisten = \"127.0.0.1:{port}\"\n\n[limits]\nmax_connections = 20000\n\
         handshake_timeout_secs = {HANDSHAKE_TIMEOUT_SECS}\nping_interval_secs = 1\n\
         idle_timeout_secs = {IDLE_TIMEOUT_SECS}\nwrite_timeout_secs = {WRITE_TIMEOUT_SECS}\n\n\
         [auth]\nmode = \"jwt\"\njwt_secret = \"{secret}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n\
         [log]\nfilter = \"error\"\n"
    )
}

/// What the abusers of one phase got, by outcome (e.g. "close 4001", "HTTP 408", "still open").
#[derive(Default)]
struct Outcomes(Mutex<BTreeMap<String, usize>>);

impl Outcomes {
    fn add(&self, outcome: impl Into<String>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()).entry(outcome.into()).or_default() += 1;
    }

    fn summary(&self) -> String {
        let map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if map.is_empty() {
            return "-".to_owned();
        }
        map.iter().map(|(k, v)| format!("{k} ×{v}")).collect::<Vec<_>>().join(", ")
    }
}

/// The well-behaved side: publishers stamp each body with the send time, subscribers record
/// the latency of each delivery into the current phase's histogram.
struct Calm {
    latency: Mutex<Histogram<u64>>,
    delivered: AtomicU64,
    sent: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

fn now_micros() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as u64).unwrap_or(0)
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(addr: SocketAddr, token: &str) -> anyhow::Result<Ws> {
    let mut request = format!("ws://{addr}/ws").into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
    request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
    // No Nagle: a small publish must not wait for the previous one's ACK.
    let (ws, _) = tokio_tungstenite::connect_async_with_config(request, None, true).await?;
    Ok(ws)
}

async fn join(ws: &mut Ws, room: &str) -> anyhow::Result<()> {
    ws.send(Message::text(format!(r#"{{"type":"join","id":"j","room":"{room}"}}"#))).await?;
    loop {
        let Some(frame) = ws.next().await else { anyhow::bail!("closed before joining {room}") };
        if let Message::Text(text) = frame? {
            if text.contains("\"joined\"") {
                return Ok(());
            }
            anyhow::ensure!(!text.contains("\"error\""), "join {room}: {text}");
        }
    }
}

impl Calm {
    async fn start(addr: SocketAddr, secret: &str, o: &Opts) -> anyhow::Result<Arc<Calm>> {
        let calm = Arc::new(Calm {
            latency: Mutex::new(Histogram::new_with_bounds(1, 60_000_000, 3)?),
            delivered: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        for i in 0..o.subscribers {
            let mut ws = connect(addr, &chat_e2e::mint_token(secret, &format!("calm-sub-{i}"), "s", &[], 3600)).await?;
            join(&mut ws, "calm").await?;
            let calm = calm.clone();
            tokio::spawn(async move {
                while let Some(Ok(frame)) = ws.next().await {
                    let Message::Text(text) = frame else { continue };
                    let Ok(value) = serde_json::from_str::<serde_json::Value>(&text) else { continue };
                    if value["type"] == "message"
                        && let Some(sent) = value["body"].as_str().and_then(|b| b.parse::<u64>().ok())
                    {
                        let took = now_micros().saturating_sub(sent).max(1);
                        let _ = calm.latency.lock().unwrap_or_else(|p| p.into_inner()).record(took);
                        calm.delivered.fetch_add(1, Ordering::Relaxed);
                    }
                    if calm.stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
            });
        }
        for i in 0..o.publishers {
            let mut ws = connect(addr, &chat_e2e::mint_token(secret, &format!("calm-pub-{i}"), "p", &[], 3600)).await?;
            join(&mut ws, "calm").await?;
            let calm = calm.clone();
            tokio::spawn(async move {
                let (mut write, mut read) = ws.split();
                let errors = calm.clone();
                // Acks, echoes and pings are read (and pongs sent) so the publisher stays healthy.
                tokio::spawn(async move {
                    while let Some(Ok(frame)) = read.next().await {
                        if let Message::Text(text) = frame
                            && text.contains("\"error\"")
                        {
                            errors.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                });
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                while !calm.stop.load(Ordering::Relaxed) {
                    tick.tick().await;
                    let frame = format!(r#"{{"type":"publish","room":"calm","body":"{}"}}"#, now_micros());
                    if write.send(Message::text(frame)).await.is_err() {
                        calm.errors.fetch_add(1, Ordering::Relaxed);
                        break;
                    }
                    calm.sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        Ok(calm)
    }

    /// Clears the figures for a new phase.
    fn reset(&self) -> (u64, u64, u64) {
        self.latency.lock().unwrap_or_else(|p| p.into_inner()).reset();
        (self.sent.load(Ordering::Relaxed), self.delivered.load(Ordering::Relaxed), self.errors.load(Ordering::Relaxed))
    }
}

/// A raw TCP socket that upgrades to `/ws` with a token and the subprotocol, for abusers that
/// need to send what a WebSocket library would not.
async fn raw_upgrade(addr: SocketAddr, token: &str) -> anyhow::Result<TcpStream> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let request = format!(
        "GET /ws HTTP/1.1\r\nHost: {addr}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\nAuthorization: Bearer {token}\r\n\r\n"
    );
    tcp.write_all(request.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        tcp.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    anyhow::ensure!(head.starts_with(b"HTTP/1.1 101"), "upgrade refused: {}", String::from_utf8_lossy(&head));
    Ok(tcp)
}

/// A masked client frame.
fn frame(opcode_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![opcode_byte];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n < 65_536 => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let mask = [0x11, 0x22, 0x33, 0x44];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads server frames as they arrive (unmasked), keeping only an unfinished one, and
/// remembers the last close code.
#[derive(Default)]
struct Scanner {
    pending: Vec<u8>,
    close: Option<u16>,
}

impl Scanner {
    fn feed(&mut self, bytes: &[u8]) {
        self.pending.extend_from_slice(bytes);
        let mut at = 0;
        loop {
            let rest = &self.pending[at..];
            if rest.len() < 2 {
                break;
            }
            let (len, header) = match rest[1] & 0x7f {
                126 if rest.len() >= 4 => (u64::from(u16::from_be_bytes([rest[2], rest[3]])), 4),
                127 if rest.len() >= 10 => {
                    let mut n = [0u8; 8];
                    n.copy_from_slice(&rest[2..10]);
                    (u64::from_be_bytes(n), 10)
                }
                n @ 0..=125 => (u64::from(n), 2),
                _ => break,
            };
            let Some(end) =
                usize::try_from(len).ok().and_then(|len| (header + len <= rest.len()).then_some(header + len))
            else {
                break;
            };
            if rest[0] & 0x0f == 0x8 && len >= 2 {
                self.close = Some(u16::from_be_bytes([rest[header], rest[header + 1]]));
            }
            at += end;
        }
        self.pending.drain(..at);
    }

    fn outcome(&self) -> String {
        self.close.map_or_else(|| "dropped".to_owned(), |code| format!("close {code}"))
    }
}

/// Reads a raw socket until the node closes it: the close code it sent (or how it ended).
async fn raw_outcome(tcp: &mut TcpStream, limit: Duration) -> String {
    let mut buf = vec![0u8; 64 * 1024];
    let mut scanner = Scanner::default();
    let ended = tokio::time::timeout(limit, async {
        while let Ok(n @ 1..) = tcp.read(&mut buf).await {
            scanner.feed(&buf[..n]);
        }
    })
    .await;
    if ended.is_err() { "still open".to_owned() } else { scanner.outcome() }
}

/// One abuse: started at the phase's beginning; returns once its abusers are done (at most a
/// few seconds after `until`).
type Abuse = fn(Ctx) -> futures_util::future::BoxFuture<'static, ()>;

#[derive(Clone)]
struct Ctx {
    addr: SocketAddr,
    secret: String,
    until: Instant,
    outcomes: Arc<Outcomes>,
}

impl Ctx {
    fn token(&self, user: &str) -> String {
        chat_e2e::mint_token(&self.secret, user, user, &[], 3600)
    }

    fn running(&self) -> bool {
        Instant::now() < self.until
    }

    /// How long after the phase an abuser waits for the node to end it.
    fn grace(&self) -> Duration {
        self.until.saturating_duration_since(Instant::now()) + Duration::from_secs(WRITE_TIMEOUT_SECS + 3)
    }
}

/// Runs `per` for `n` abusers at once and waits for all of them.
async fn crowd<F, Fut>(ctx: &Ctx, n: usize, per: F)
where
    F: Fn(Ctx, usize) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let tasks: Vec<_> = (0..n).map(|i| tokio::spawn(per(ctx.clone(), i))).collect();
    for task in tasks {
        let _ = task.await;
    }
}

fn slowloris_http(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        crowd(&ctx, 500, |ctx, _| async move {
            let Ok(mut tcp) = TcpStream::connect(ctx.addr).await else { return ctx.outcomes.add("connect failed") };
            let _ = tcp.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await;
            let (mut read, mut write) = tcp.into_split();
            let drip = async {
                while ctx.running() {
                    if write.write_all(b"X").await.is_err() {
                        return;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                std::future::pending::<()>().await;
            };
            let mut buf = [0u8; 512];
            let answer = tokio::time::timeout(ctx.grace(), async {
                tokio::select! {
                    n = read.read(&mut buf) => n.ok(),
                    () = drip => None,
                }
            })
            .await;
            match answer {
                Ok(Some(0)) | Ok(None) => ctx.outcomes.add("closed by the node"),
                Ok(Some(n)) => {
                    let status = String::from_utf8_lossy(&buf[..n]).split_whitespace().nth(1).unwrap_or("?").to_owned();
                    ctx.outcomes.add(format!("HTTP {status}"));
                }
                Err(_) => ctx.outcomes.add("still open"),
            }
        })
        .await;
    })
}

fn slowloris_ws(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        crowd(&ctx, 300, |ctx, i| async move {
            let Ok(mut tcp) = raw_upgrade(ctx.addr, &ctx.token(&format!("sloth-{i}"))).await else {
                return ctx.outcomes.add("upgrade failed");
            };
            // Half a frame header, then nothing (and no pongs).
            let _ = tcp.write_all(&[0x81, 0xfe]).await;
            let outcome = raw_outcome(&mut tcp, ctx.grace()).await;
            ctx.outcomes.add(outcome);
        })
        .await;
    })
}

fn non_readers(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        let flood = {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                crowd(&ctx, 20, |ctx, i| async move {
                    let Ok(mut ws) = connect(ctx.addr, &ctx.token(&format!("loud-{i}"))).await else { return };
                    if join(&mut ws, "busy").await.is_err() {
                        return;
                    }
                    let (mut write, mut read) = ws.split();
                    tokio::spawn(async move { while let Some(Ok(_)) = read.next().await {} });
                    let body = "x".repeat(8 * 1024);
                    let mut tick = tokio::time::interval(Duration::from_millis(50));
                    while ctx.running() {
                        tick.tick().await;
                        let frame = format!(r#"{{"type":"publish","room":"busy","body":"{body}"}}"#);
                        if write.send(Message::text(frame)).await.is_err() {
                            return;
                        }
                    }
                })
                .await;
            })
        };
        crowd(&ctx, 50, |ctx, i| async move {
            let Ok(mut tcp) = raw_upgrade(ctx.addr, &ctx.token(&format!("deaf-{i}"))).await else {
                return ctx.outcomes.add("upgrade failed");
            };
            let _ = tcp.write_all(&frame(0x81, br#"{"type":"join","room":"busy"}"#)).await;
            // Never reads until the phase is over; then sees how the node ended it.
            tokio::time::sleep(ctx.until.saturating_duration_since(Instant::now())).await;
            let outcome = raw_outcome(&mut tcp, Duration::from_secs(WRITE_TIMEOUT_SECS + 3)).await;
            ctx.outcomes.add(outcome);
        })
        .await;
        let _ = flood.await;
    })
}

/// `n` connections each sending `frames()` as fast as the socket takes them until the node
/// closes it or the phase ends.
async fn flood(ctx: &Ctx, n: usize, who: &'static str, frames: fn(usize) -> Vec<u8>) {
    crowd(ctx, n, move |ctx, i| async move {
        let Ok(tcp) = raw_upgrade(ctx.addr, &ctx.token(&format!("{who}-{i}"))).await else {
            return ctx.outcomes.add("upgrade failed");
        };
        let (mut read, mut write) = tcp.into_split();
        let reader = tokio::spawn(async move {
            let mut scanner = Scanner::default();
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = read.read(&mut buf).await {
                scanner.feed(&buf[..n]);
            }
            scanner.outcome()
        });
        let mut k = 0;
        while ctx.running() {
            if write.write_all(&frames(k)).await.is_err() {
                break;
            }
            k += 1;
            if k % 64 == 0 {
                tokio::task::yield_now().await;
            }
        }
        let outcome = match tokio::time::timeout(ctx.grace(), reader).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(_)) => "dropped".to_owned(),
            Err(_) => "still open".to_owned(),
        };
        ctx.outcomes.add(outcome);
    })
    .await;
}

fn join_leave_flood(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        flood(&ctx, 20, "churn", |k| {
            let text =
                if k % 2 == 0 { r#"{"type":"join","room":"churn"}"# } else { r#"{"type":"leave","room":"churn"}"# };
            frame(0x81, text.as_bytes())
        })
        .await;
    })
}

fn publish_flood(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        flood(&ctx, 20, "spam", |k| {
            if k == 0 {
                return frame(0x81, br#"{"type":"join","room":"spam"}"#);
            }
            frame(0x81, br#"{"type":"publish","room":"spam","body":"spam spam spam"}"#)
        })
        .await;
    })
}

fn ping_flood(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        flood(&ctx, 20, "pinger", |_| frame(0x89, b"ping")).await;
    })
}

fn oversize(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        crowd(&ctx, 100, |ctx, i| async move {
            let Ok(mut tcp) = raw_upgrade(ctx.addr, &ctx.token(&format!("huge-{i}"))).await else {
                return ctx.outcomes.add("upgrade failed");
            };
            let _ = tcp.write_all(&frame(0x81, &vec![b'x'; 1 << 20])).await;
            let outcome = raw_outcome(&mut tcp, ctx.grace()).await;
            ctx.outcomes.add(outcome);
        })
        .await;
    })
}

fn fragments(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        // A text message that never ends: one-byte continuation frames until the node objects.
        flood(&ctx, 20, "shard", |k| if k == 0 { frame(0x01, b"{") } else { frame(0x00, b" ") }).await;
    })
}

fn many_rooms(ctx: Ctx) -> futures_util::future::BoxFuture<'static, ()> {
    Box::pin(async move {
        let joined = Arc::new(AtomicU64::new(0));
        let done = joined.clone();
        // 10 000 rooms: 157 connections join 64 rooms each (the per-connection limit), then
        // leave them all.
        crowd(&ctx, 157, move |ctx, i| {
            let joined = joined.clone();
            async move {
                let Ok(mut ws) = connect(ctx.addr, &ctx.token(&format!("roamer-{i}"))).await else {
                    return ctx.outcomes.add("connect failed");
                };
                let rooms: Vec<String> = (0..64).map(|r| format!("roam-{}", i * 64 + r)).collect();
                for room in &rooms {
                    if join(&mut ws, room).await.is_err() {
                        return ctx.outcomes.add("join refused");
                    }
                    joined.fetch_add(1, Ordering::Relaxed);
                }
                for room in &rooms {
                    let leave = format!(r#"{{"type":"leave","room":"{room}"}}"#);
                    if ws.send(Message::text(leave)).await.is_err() {
                        return ctx.outcomes.add("closed while leaving");
                    }
                }
                let _ = ws.close(None).await;
                ctx.outcomes.add("joined and left 64 rooms");
            }
        })
        .await;
        ctx.outcomes.add(format!("rooms joined in all: {}", done.load(Ordering::Relaxed)));
    })
}

/// One abuse: its name, what it does, how it runs, and the outcomes its abusers may get (the
/// documented close codes; "dropped": the node ended the socket before it could write a close
/// frame to a client that reads nothing).
struct Phase {
    name: &'static str,
    what: &'static str,
    abuse: Option<Abuse>,
    allowed: &'static [&'static str],
}

const PHASES: &[Phase] = &[
    Phase { name: "baseline", what: "no abuse", abuse: None, allowed: &[] },
    Phase {
        name: "slowloris-http",
        what: "500 sockets dripping an HTTP request head",
        abuse: Some(slowloris_http),
        allowed: &["closed by the node", "HTTP 408"],
    },
    Phase {
        name: "slowloris-ws",
        what: "300 WebSockets stalled in a frame header, answering no pings",
        abuse: Some(slowloris_ws),
        allowed: &["close 4002", "dropped"],
    },
    Phase {
        name: "non-readers",
        what: "50 joined sockets that never read, 20 publishers of 8 KiB at 20/s",
        abuse: Some(non_readers),
        allowed: &["close 4001", "close 4002", "dropped"],
    },
    Phase {
        name: "join-leave-flood",
        what: "20 sockets sending join/leave as fast as TCP takes them",
        abuse: Some(join_leave_flood),
        // The flooders share a room on one node: each one's joins and leaves are presence events
        // in the others' outboxes (coalesced only towards other nodes), so a slow one can
        // overflow (4001) before its budget runs out (4003).
        allowed: &["close 4003", "close 4001"],
    },
    Phase {
        name: "publish-flood",
        what: "20 sockets publishing as fast as TCP takes them",
        abuse: Some(publish_flood),
        allowed: &["close 4003"],
    },
    Phase {
        name: "ping-flood",
        what: "20 sockets sending WebSocket pings as fast as TCP takes them",
        abuse: Some(ping_flood),
        allowed: &["close 4003"],
    },
    Phase {
        name: "oversize",
        what: "100 sockets each sending one 1 MiB frame",
        abuse: Some(oversize),
        allowed: &["close 1009"],
    },
    Phase {
        name: "fragments",
        what: "20 sockets sending one endless message in 1-byte fragments",
        abuse: Some(fragments),
        allowed: &["close 1009"],
    },
    Phase {
        name: "10k-rooms",
        what: "157 connections joining 64 rooms each (10 048 rooms), then leaving",
        abuse: Some(many_rooms),
        allowed: &["joined and left 64 rooms", "rooms joined in all: 10048"],
    },
];

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let here = std::env::current_exe()?.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let bin = o.node_bin.clone().unwrap_or_else(|| here.join("chat-node"));
    let (port, admin) = (procs::free_port()?, procs::free_port()?);
    let secret = format!("abuse-secret-{}", now_micros());
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut node = Server::launch_node(&bin, &node_toml(port, admin, &secret), addr, None)?;
    node.wait_ready(Duration::from_secs(30)).await?;
    println!(
        "# chat-bench abuse: one node ({}), default limits except handshake {HANDSHAKE_TIMEOUT_SECS} s, idle {IDLE_TIMEOUT_SECS} s, write {WRITE_TIMEOUT_SECS} s; {} subscribers and {} publishers (10 msg/s each) in the calm room; {} s per abuse; {}",
        bin.display(),
        o.subscribers,
        o.publishers,
        o.phase_secs,
        crate::utc_now()
    );
    println!("# command: {}", crate::command_line());
    let calm = Calm::start(addr, &secret, &o).await.context("the well-behaved clients")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    println!();
    println!(
        "| phase | abuse | others' deliveries | others' p50 / p99 / max, ms | node RSS after / peak, MiB | what the abusers got |"
    );
    println!("| --- | --- | ---: | ---: | ---: | --- |");
    let mut problems = Vec::new();
    for Phase { name, what, abuse, allowed } in PHASES {
        if !o.only.is_empty() && !o.only.iter().any(|p| p == name) {
            continue;
        }
        let (sent_before, delivered_before, _) = calm.reset();
        let outcomes = Arc::new(Outcomes::default());
        let until = Instant::now() + Duration::from_secs_f64(o.phase_secs);
        let ctx = Ctx { addr, secret: secret.clone(), until, outcomes: outcomes.clone() };
        let abusers = abuse.map(|abuse| tokio::spawn(abuse(ctx)));
        tokio::time::sleep(until.saturating_duration_since(Instant::now())).await;
        let (sent, delivered) = (
            calm.sent.load(Ordering::Relaxed) - sent_before,
            calm.delivered.load(Ordering::Relaxed) - delivered_before,
        );
        let histogram = calm.latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(abusers) = abusers {
            let _ = tokio::time::timeout(Duration::from_secs(30), abusers).await;
        }
        if let Some(status) = node.exited() {
            anyhow::bail!("the node exited during {name}: {status}");
        }
        let rss = node.rss_kib()? as f64 / 1024.0;
        let peak = procs::vm_hwm_kib(node.pid)? as f64 / 1024.0;
        let ms = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
        let expected = sent * o.subscribers as u64;
        println!(
            "| {name} | {what} | {delivered} of {expected} | {:.2} / {:.2} / {:.2} | {rss:.0} / {peak:.0} | {} |",
            ms(0.5),
            ms(0.99),
            histogram.max() as f64 / 1000.0,
            outcomes.summary()
        );
        let got = outcomes.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(other) = got.keys().find(|k| !allowed.contains(&k.as_str())) {
            problems.push(format!("{name}: an abuser got {other:?}, not one of {allowed:?}"));
        }
        if abuse.is_some() && got.is_empty() {
            problems.push(format!("{name}: no abuser reported an outcome"));
        }
        // Publishes in flight at the phase's edges land in the next phase's count.
        if (delivered as f64) < expected as f64 * 0.98 {
            problems.push(format!("{name}: the other clients got {delivered} of {expected} messages"));
        }
        if peak > o.max_rss_mib as f64 {
            problems.push(format!("{name}: peak RSS {peak:.0} MiB over {} MiB", o.max_rss_mib));
        }
        // Let the node settle (closes, queues) before the next phase.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    calm.stop.store(true, Ordering::Relaxed);
    let refused = calm.errors.load(Ordering::Relaxed);
    println!("\nthe calm clients' publishes refused: {refused}");
    if refused > 0 {
        problems.push(format!("{refused} publishes of the well-behaved clients were refused"));
    }
    node.stop().await?;
    if o.check && !problems.is_empty() {
        anyhow::bail!("abuse check failed:\n{}", problems.join("\n"));
    }
    Ok(())
}
