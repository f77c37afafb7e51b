//! `chat-bench api`: the server API's publish rate into a three-node cluster (the `cluster`
//! layout) with WebSocket subscribers spread over the nodes. HTTP publishers keep their
//! connections alive, are spread over the three nodes' admin ports, and each waits for its
//! answer (a publish is answered once committed); the subscribers measure publish → deliver
//! latency and count deliveries. See docs/benchmarks.md.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::cluster::{Layout, NodeOpts, SIZE, admin_addr};
use crate::load::{self, Spec, Stats, now_ns};
use crate::procs::{CpuMeter, Kind};

#[derive(clap::Args, Debug)]
pub struct Opts {
    #[command(flatten)]
    node: NodeOpts,
    /// WebSocket subscribers of the room, spread over the three nodes.
    #[arg(long, default_value_t = 1000)]
    subscribers: usize,
    /// HTTP connections publishing at once, spread over the three nodes.
    #[arg(long, default_value_t = 48)]
    connections: usize,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    secs: f64,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

const ROOM: &str = "api";

/// One keep-alive HTTP/1.1 connection to a node's admin port.
struct HttpConn {
    stream: BufReader<TcpStream>,
    host: SocketAddr,
}

impl HttpConn {
    async fn open(host: SocketAddr) -> anyhow::Result<Self> {
        let stream = TcpStream::connect(host).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn { stream: BufReader::new(stream), host })
    }

    /// POSTs `body` and returns the answer's status (the body is read and dropped).
    async fn post(&mut self, path: &str, key: &str, body: &str) -> anyhow::Result<u16> {
        let request = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(request.as_bytes()).await?;
        let mut line = String::new();
        self.stream.read_line(&mut line).await?;
        let status: u16 = line.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("no status")?;
        let mut length = 0usize;
        loop {
            line.clear();
            if self.stream.read_line(&mut line).await? == 0 {
                bail!("connection closed mid-answer");
            }
            if line == "\r\n" {
                break;
            }
            if let Some((name, value)) = line.split_once(':')
                && name.eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse()?;
            }
        }
        let mut answer = vec![0; length];
        self.stream.read_exact(&mut answer).await?;
        Ok(status)
    }
}

/// What the publishers did.
#[derive(Default)]
struct Published {
    ok: AtomicU64,
    refused: AtomicU64,
    /// OK answers to publishes sent inside the measured window.
    in_window: AtomicU64,
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let layout = Layout::new(&o.node)?;
    let nodes = layout.start_all().await?;
    println!(
        "# chat-bench api: 3 nodes on 127.0.0.2-4, storage {}, {} WebSocket subscribers, {} HTTP publishers, {} cores, {}",
        layout.storage_note(),
        o.subscribers,
        o.connections,
        std::thread::available_parallelism()?.get(),
        crate::utc_now()
    );
    println!("# command: {}", crate::command_line());
    let tokens = Arc::new(crate::make_tokens(&layout.jwt, o.subscribers)?);
    let stats = Stats::new(0);
    let mut fleets = Vec::new();
    for (k, node) in nodes.iter().enumerate() {
        let count = o.subscribers / SIZE + usize::from(k < o.subscribers % SIZE);
        let offset = (0..k).map(|j| o.subscribers / SIZE + usize::from(j < o.subscribers % SIZE)).sum::<usize>();
        let spec = Spec {
            kind: Kind::Node,
            addr: node.addr,
            tokens: tokens[offset..].to_vec(),
            rooms: Box::new(|_| vec![ROOM.to_owned()]),
            publishers: 0,
            source_ips: 1,
            buf_size: 64 * 1024,
        };
        fleets.push(load::launch(count, 64, Arc::new(spec), stats.clone()).await?);
    }

    let published = Arc::new(Published::default());
    let window = Arc::new((AtomicU64::new(u64::MAX), AtomicU64::new(u64::MAX)));
    let stop = Arc::new(AtomicBool::new(false));
    let pad = "x".repeat(o.body_bytes.saturating_sub(32));
    let mut publishers = Vec::new();
    for i in 0..o.connections {
        let host = admin_addr(nodes[i % SIZE].addr);
        let mut conn = HttpConn::open(host).await?;
        let (published, window, stop, key, pad) =
            (published.clone(), window.clone(), stop.clone(), layout.api_key.clone(), pad.clone());
        publishers.push(tokio::spawn(async move {
            let path = format!("/api/v1/rooms/{ROOM}/messages");
            while !stop.load(Ordering::Relaxed) {
                let sent = now_ns();
                let body = format!("{{\"body\":\"T{sent}:{i}:{pad}\"}}");
                match conn.post(&path, &key, &body).await {
                    Ok(200) => {
                        published.ok.fetch_add(1, Ordering::Relaxed);
                        let (from, to) = (window.0.load(Ordering::Relaxed), window.1.load(Ordering::Relaxed));
                        if sent >= from && sent < to {
                            published.in_window.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Ok(_) => {
                        published.refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => return,
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs_f64(o.warmup_secs)).await;
    let meters: Vec<CpuMeter> = nodes.iter().map(CpuMeter::start).collect();
    stats.record_from_now();
    window.0.store(now_ns(), Ordering::SeqCst);
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs_f64(o.secs)).await;
    window.1.store(now_ns(), Ordering::SeqCst);
    stats.record_until_now();
    let elapsed = started.elapsed().as_secs_f64();
    let cpu = meters.iter().map(|m| format!("{:.0} %", m.read().server_pct())).collect::<Vec<_>>().join(" / ");
    stop.store(true, Ordering::SeqCst);
    for publisher in publishers {
        let _ = tokio::time::timeout(Duration::from_secs(10), publisher).await;
    }
    // Let the last deliveries arrive before counting.
    let expected = published.ok.load(Ordering::Relaxed) * o.subscribers as u64;
    let deadline = Instant::now() + Duration::from_secs(10);
    while stats.delivered.load(Ordering::Relaxed) < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let in_window = published.in_window.load(Ordering::Relaxed);
    let latency = stats.latency();
    let ms = |q: f64| latency.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "API publishes: {:.0}/s acked ({in_window} in {elapsed:.1} s), each delivered to {} subscribers = {:.0} deliveries/s; \
         publish -> deliver p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; node CPU {cpu}",
        in_window as f64 / elapsed,
        o.subscribers,
        in_window as f64 * o.subscribers as f64 / elapsed,
        ms(0.5),
        ms(0.99),
        latency.max() as f64 / 1000.0
    );
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let refused = published.refused.load(Ordering::Relaxed);
    println!(
        "acked {} publishes in all, refused {refused}; deliveries {delivered} (expected {expected})",
        published.ok.load(Ordering::Relaxed)
    );
    if delivered != expected || refused > 0 {
        println!("PROBLEM: deliveries or refusals off: {delivered} of {expected} delivered, {refused} refused");
    }
    for problem in stats.problems.lock().map(|p| p.clone()).unwrap_or_default() {
        println!("PROBLEM: {problem}");
    }
    drop(fleets);
    for node in nodes {
        node.stop().await?;
    }
    Ok(())
}
