//! `chat-bench cluster`: three `chat-node` processes on 127.0.0.2–4 form a cluster; publishers
//! on the first node, subscribers on the other two. Measures publish → deliver latency on the
//! remote nodes at a fixed message rate, then the highest sustained cross-node delivery rate.
//! See docs/benchmarks.md. Everything runs on loopback and is killed when the run ends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::bail;

use crate::load::{self, Pace, Spec, Stats};
use crate::procs::{self, CpuMeter, Kind, Server};

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// chat-node binary (default: chat-node next to this binary).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// Publishing connections on the first node.
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    /// Subscribers on each of the two other nodes.
    #[arg(long, default_value_t = 5)]
    subscribers_per_node: usize,
    /// Messages per second (all publishers together) for the latency phase.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    #[arg(long, default_value_t = 10.0)]
    rate_secs: f64,
    #[arg(long, default_value_t = 5.0)]
    sat_secs: f64,
    /// Saturation: per publisher, publishes not yet delivered back to it.
    #[arg(long, default_value_t = 32)]
    window: i64,
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
    /// Nodes that must store a message before it is acked (the node's `cluster.replication`).
    #[arg(long, default_value_t = 2)]
    replication: usize,
}

const NODES: [u8; 3] = [2, 3, 4];

fn node_toml(last: u8, port: u16, peer_port: u16, jwt: &str, cluster_secret: &str, replication: usize) -> String {
    let peers: Vec<String> =
        NODES.iter().filter(|l| **l != last).map(|l| format!("\"127.0.0.{l}:{peer_port}\"")).collect();
    format!(
        "node_id = \"bench-{last}\"\nlisten = \"127.0.0.{last}:{port}\"\n\n[limits]\nmax_connections = 20000\n\
         publish_rate_per_sec = 1000000\npublish_burst = 1000000\nrate_limit_strikes = 1000000\n\
         ping_interval_secs = 3600\nidle_timeout_secs = 7200\noutbound_queue_frames = 65536\n\
         outbound_queue_bytes = 67108864\n\n[auth]\nmode = \"jwt\"\njwt_secret = \"{jwt}\"\n\n\
         [cluster]\npeer_listen = \"127.0.0.{last}:{peer_port}\"\nstatic_peers = [{}]\nsecret = \"{cluster_secret}\"\n\
         replication = {replication}\nready_timeout_secs = 5\n\n[log]\nfilter = \"warn\"\n",
        peers.join(", ")
    )
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let here = std::env::current_exe()?.parent().map(|p| p.to_path_buf()).unwrap_or_default();
    let bin = o.node_bin.clone().unwrap_or_else(|| here.join("chat-node"));
    let (port, peer_port) = (procs::free_port()?, procs::free_port()?);
    let (jwt, cluster_secret) = (crate::random_hex(), crate::random_hex());
    let mut nodes = Vec::new();
    for last in NODES {
        let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)), port);
        let toml = node_toml(last, port, peer_port, &jwt, &cluster_secret, o.replication);
        nodes.push(Server::spawn_node_with(&bin, &toml, addr).await?);
    }
    wait_meshed(&nodes).await?;
    println!("# chat-bench cluster: 3 nodes on 127.0.0.2-4, {} cores", std::thread::available_parallelism()?.get());
    println!("# command: {}", std::env::args().collect::<Vec<_>>().join(" "));

    let all_tokens = Arc::new(crate::make_tokens(&jwt, o.publishers + 2 * o.subscribers_per_node)?);
    let spec = |addr: SocketAddr, publishers: usize, offset: usize| Spec {
        kind: Kind::Node,
        addr,
        tokens: all_tokens[offset..].to_vec(),
        rooms: Box::new(|_| vec!["bench".to_owned()]),
        publishers,
        source_ips: 1,
        buf_size: 64 * 1024,
    };
    // Publishers count their own echoes (window flow control); remote subscribers measure.
    let local = Stats::new(o.publishers);
    let remote = Stats::new(0);
    let mut pubs =
        load::launch(o.publishers, 16, Arc::new(spec(nodes[0].addr, o.publishers, 0)), local.clone()).await?;
    let mut subs = Vec::new();
    for (k, node) in nodes[1..].iter().enumerate() {
        let offset = o.publishers + k * o.subscribers_per_node;
        subs.push(
            load::launch(o.subscribers_per_node, 16, Arc::new(spec(node.addr, 0, offset)), remote.clone()).await?,
        );
    }
    let remote_members = (2 * o.subscribers_per_node) as f64;

    let per_pub = o.rate / o.publishers as f64;
    let (per_sec, p50, p99, max, cpu) =
        phase(&mut pubs, &local, &remote, &nodes, &o, Pace::Rate(per_pub), o.rate_secs).await?;
    println!(
        "fixed rate {:.0} msg/s: cross-node deliveries {per_sec:.0}/s ({:.0} msg/s per remote subscriber), \
         latency p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms; node CPU {cpu}",
        o.rate,
        per_sec / remote_members
    );
    let (per_sec, p50, p99, _, cpu) =
        phase(&mut pubs, &local, &remote, &nodes, &o, Pace::Window(o.window), o.sat_secs).await?;
    println!(
        "saturation (window {} per publisher): cross-node deliveries {per_sec:.0}/s = {:.0} msg/s to each remote \
         subscriber, latency p50 {p50:.2} ms, p99 {p99:.2} ms; node CPU {cpu}",
        o.window,
        per_sec / remote_members
    );
    let errors = local.error_frames.load(Ordering::Relaxed) + remote.error_frames.load(Ordering::Relaxed);
    let problems: Vec<String> =
        [&local, &remote].iter().flat_map(|s| s.problems.lock().map(|p| p.clone()).unwrap_or_default()).collect();
    for p in &problems {
        println!("PROBLEM: {p}");
    }
    let sent = local.sent();
    let delivered = remote.delivered.load(Ordering::Relaxed);
    println!(
        "sent {sent}, remote deliveries {delivered} (expected {}), error frames {errors}",
        sent * remote_members as u64
    );
    drop(subs);
    drop(pubs);
    for node in nodes {
        node.stop().await?;
    }
    Ok(())
}

/// Waits until each node links to both others (`/cluster` lists two members).
async fn wait_meshed(nodes: &[Server]) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    for node in nodes {
        loop {
            let body = procs::http_get_body(node.addr, "/cluster").await.unwrap_or_default();
            if body.matches("\"linked_for_ms\"").count() == 2 {
                break;
            }
            if Instant::now() > deadline {
                bail!("nodes did not link within 30 s: {body}\n{}", node.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Ok(())
}

/// One publishing phase; returns remote deliveries/s, p50/p99/max ms and the nodes' CPU use.
async fn phase(
    pubs: &mut load::Fleet,
    local: &Arc<Stats>,
    remote: &Arc<Stats>,
    nodes: &[Server],
    o: &Opts,
    pace: Pace,
    secs: f64,
) -> anyhow::Result<(f64, f64, f64, f64, String)> {
    let warmup = Duration::from_secs_f64(o.warmup_secs);
    let window = Duration::from_secs_f64(secs);
    let writers = std::mem::take(&mut pubs.writers);
    let meters = || nodes.iter().map(CpuMeter::start).collect::<Vec<_>>();
    let read = |meters: Vec<CpuMeter>| {
        meters.iter().map(|m| format!("{:.0} %", m.read().server_pct())).collect::<Vec<_>>().join(" / ")
    };
    let (writers, per_sec, cpu) =
        load::measured_phase(writers, local, remote, o.body_bytes, pace, warmup, window, meters, read).await?;
    pubs.writers = writers;
    load::settle(local, Duration::from_secs(20)).await;
    let h = remote.latency();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok((per_sec, ms(0.5), ms(0.99), h.max() as f64 / 1000.0, cpu))
}
