//! `chat-bench cluster`: three `chat-node` processes on 127.0.0.2–4 form a cluster (Raft room
//! logs, intended size 3, ordinals 0–2); publishers on the first node, subscribers on the other
//! two. Measures publish → deliver latency on the remote nodes at a fixed message rate, then the
//! highest sustained cross-node delivery rate. Also the node layout `chat-bench failover` uses.
//! See docs/benchmarks.md. Everything runs on loopback and is killed when the run ends.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use clap::ValueEnum;

use crate::load::{self, Pace, Spec, Stats};
use crate::procs::{self, CpuMeter, Kind, Server};

/// Where the nodes keep their room logs (`cluster.storage`).
#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
pub enum Storage {
    /// In memory: a restarted node rejoins as a new member and copies the logs.
    Memory,
    /// redb files in a temporary directory per node, fsync per write batch.
    Disk,
}

/// Node settings shared by `cluster` and `failover`.
#[derive(clap::Args, Debug, Clone)]
pub struct NodeOpts {
    /// chat-node binary (default: chat-node next to this binary).
    #[arg(long)]
    pub node_bin: Option<PathBuf>,
    /// Room-log storage of the nodes; disk puts each node's data directory in a temporary
    /// directory that lives as long as the run.
    #[arg(long, value_enum, default_value = "memory")]
    pub storage: Storage,
    /// Extra TOML lines for the nodes' `[cluster]` section, e.g. 'election_timeout_ms = 300'
    /// (keys must not repeat the ones the bench sets: size, ordinal, storage, data_dir, peers).
    #[arg(long, default_value = "")]
    pub node_cluster: String,
    /// The nodes' log filter (`[log] filter`).
    #[arg(long, default_value = "warn")]
    pub node_log: String,
    /// Write the nodes' output to files in this directory (kept after the run) instead of
    /// temporary ones.
    #[arg(long)]
    pub log_dir: Option<PathBuf>,
}

#[derive(clap::Args, Debug)]
pub struct Opts {
    #[command(flatten)]
    node: NodeOpts,
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
}

/// Nodes in the cluster: `bench-<ordinal>` on 127.0.0.<ordinal + 2>.
pub const SIZE: usize = 3;
/// `cluster.partitions` the bench gives the nodes (the node's default).
pub const PARTITIONS: u32 = 8;

/// Three nodes' configs: ports, secrets and data directories that stay the same across restarts.
pub struct Layout {
    pub bin: PathBuf,
    pub port: u16,
    pub peer_port: u16,
    pub jwt: String,
    /// The server API's key (`admin.api_keys`).
    pub api_key: String,
    secret: String,
    pub opts: NodeOpts,
    /// Parent of the nodes' data directories (disk storage).
    data: Option<tempfile::TempDir>,
}

impl Layout {
    pub fn new(opts: &NodeOpts) -> anyhow::Result<Layout> {
        let here = std::env::current_exe()?.parent().map(|p| p.to_path_buf()).unwrap_or_default();
        let bin = opts.node_bin.clone().unwrap_or_else(|| here.join("chat-node"));
        let data = match opts.storage {
            Storage::Disk => Some(tempfile::Builder::new().prefix("chat-bench-data").tempdir()?),
            Storage::Memory => None,
        };
        if let Some(dir) = &opts.log_dir {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        Ok(Layout {
            bin,
            port: procs::free_port()?,
            peer_port: procs::free_port()?,
            jwt: crate::random_hex(),
            api_key: crate::random_hex(),
            secret: crate::random_hex(),
            opts: opts.clone(),
            data,
        })
    }

    pub fn ip(ordinal: usize) -> Ipv4Addr {
        Ipv4Addr::new(127, 0, 0, 2 + ordinal as u8)
    }

    pub fn addr(&self, ordinal: usize) -> SocketAddr {
        SocketAddr::new(IpAddr::V4(Self::ip(ordinal)), self.port)
    }

    pub fn name(ordinal: usize) -> String {
        format!("bench-{ordinal}")
    }

    /// Node `ordinal`'s config: intended size 3, static peers, no rate limits, short drain.
    pub fn toml(&self, ordinal: usize) -> anyhow::Result<String> {
        let ip = Self::ip(ordinal);
        let peers: Vec<String> =
            (0..SIZE).filter(|o| *o != ordinal).map(|o| format!("\"{}:{}\"", Self::ip(o), self.peer_port)).collect();
        let storage = match &self.data {
            Some(root) => {
                let dir = root.path().join(Self::name(ordinal));
                std::fs::create_dir_all(&dir)?;
                format!("storage = \"disk\"\ndata_dir = {:?}\n", dir.to_str().context("data dir path is not UTF-8")?)
            }
            None => "storage = \"memory\"\n".to_owned(),
        };
        let extra =
            if self.opts.node_cluster.is_empty() { String::new() } else { format!("{}\n", self.opts.node_cluster) };
        Ok(format!(
            "node_id = \"{name}\"\nlisten = \"{ip}:{port}\"\n\n[limits]\nmax_connections = 20000\n\
             publish_rate_per_sec = 1000000\npublish_burst = 1000000\nrate_limit_strikes = 1000000\n\
             ping_interval_secs = 3600\nidle_timeout_secs = 7200\noutbound_queue_frames = 65536\n\
             outbound_queue_bytes = 67108864\n\n[auth]\nmode = \"jwt\"\njwt_secret = \"{jwt}\"\n\n\
             [drain]\nlb_grace_secs = 0\ndeadline_secs = 8\n\n\
             [cluster]\npeer_listen = \"{ip}:{peer_port}\"\nstatic_peers = [{peers}]\nsecret = \"{secret}\"\n\
             size = {SIZE}\nordinal = {ordinal}\npartitions = {PARTITIONS}\n{storage}{extra}\n\
             [admin]\nlisten = \"{admin}\"\napi_keys = [\"{api_key}\"]\n\n[log]\nfilter = \"{filter}\"\n",
            admin = admin_addr(self.addr(ordinal)),
            name = Self::name(ordinal),
            port = self.port,
            jwt = self.jwt,
            api_key = self.api_key,
            peer_port = self.peer_port,
            peers = peers.join(", "),
            secret = self.secret,
            filter = self.opts.node_log,
        ))
    }

    /// Starts node `ordinal` without waiting for it; `tag` names its log file in `--log-dir`.
    pub fn launch(&self, ordinal: usize, tag: &str) -> anyhow::Result<Server> {
        let log = self.opts.log_dir.as_ref().map(|d| d.join(format!("{}.{tag}.log", Self::name(ordinal))));
        Server::launch_node(&self.bin, &self.toml(ordinal)?, self.addr(ordinal), log)
    }

    /// Starts the three nodes at once and waits until every one answers `/readyz` with 200
    /// (linked, a majority of voters seen, a voter with a known leader in every group).
    pub async fn start_all(&self) -> anyhow::Result<Vec<Server>> {
        let mut nodes = Vec::new();
        for ordinal in 0..SIZE {
            nodes.push(self.launch(ordinal, "0")?);
        }
        for node in &mut nodes {
            node.wait_ready(Duration::from_secs(30)).await?;
        }
        Ok(nodes)
    }

    pub fn storage_note(&self) -> String {
        match &self.data {
            Some(dir) => format!("disk (redb under {})", dir.path().display()),
            None => "memory".to_owned(),
        }
    }
}

/// The admin port of the bench node whose client port is `client`: each node has an address of
/// its own (127.0.0.2-4), so one fixed port serves them all.
pub fn admin_addr(client: SocketAddr) -> SocketAddr {
    SocketAddr::new(client.ip(), 9090)
}

/// `/cluster` of the node whose client port is `addr`, parsed.
pub async fn cluster_status(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    let body = procs::http_get_body(admin_addr(addr), "/cluster").await?;
    serde_json::from_str(&body).with_context(|| format!("/cluster of {addr} is not JSON: {body}"))
}

/// The Raft group of `room` (what the node computes from `cluster.partitions`).
pub fn group_of(room: &str) -> u32 {
    chat_node::replication::types::group_of(room, PARTITIONS)
}

/// What a node says about one group: (role, leader name, term).
pub fn group_view(status: &serde_json::Value, group: u32) -> Option<(String, Option<String>, u64)> {
    let g = status["groups"].as_array()?.iter().find(|g| g["group"] == group)?;
    Some((
        g["role"].as_str().unwrap_or_default().to_owned(),
        g["leader"].as_str().map(str::to_owned),
        g["term"].as_u64().unwrap_or(0),
    ))
}

pub async fn run(o: Opts) -> anyhow::Result<()> {
    let layout = Layout::new(&o.node)?;
    let nodes = layout.start_all().await?;
    let room = "bench";
    let group = group_of(room);
    let leader = match cluster_status(nodes[0].addr).await.ok().and_then(|s| group_view(&s, group)) {
        Some((_, Some(leader), term)) => format!("{leader} (term {term})"),
        _ => "unknown".to_owned(),
    };
    println!(
        "# chat-bench cluster: 3 nodes on 127.0.0.2-4 (bench-0..2, size 3), storage {}, {} cores, {}",
        layout.storage_note(),
        std::thread::available_parallelism()?.get(),
        crate::utc_now()
    );
    println!("# command: {}", crate::command_line());
    println!(
        "# all 3 nodes ready; room {room:?} is in group {group} of {PARTITIONS}, led by {leader}; publishers on bench-0"
    );

    let all_tokens = Arc::new(crate::make_tokens(&layout.jwt, o.publishers + 2 * o.subscribers_per_node)?);
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
    let mut nodes = nodes;
    for node in &mut nodes {
        if let Some(status) = node.exited() {
            println!("PROBLEM: node at {} exited during the run ({status}): {}", node.addr, node.log_tail());
        }
    }
    let sent = local.sent();
    let delivered = remote.delivered.load(Ordering::Relaxed);
    let expected = sent * remote_members as u64;
    println!("sent {sent}, remote deliveries {delivered} (expected {expected}), error frames {errors}");
    if delivered > expected {
        println!(
            "PROBLEM: {} more deliveries than publishes x remote subscribers: messages were stored or delivered twice",
            delivered - expected
        );
    } else if delivered < expected {
        println!(
            "PROBLEM: {} deliveries missing (publishes refused with an error frame are not stored, or not yet)",
            expected - delivered
        );
    }
    drop(subs);
    drop(pubs);
    for node in nodes {
        node.stop().await?;
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
        let uses: Vec<procs::CpuUse> = meters.iter().map(CpuMeter::read).collect();
        let nodes = uses.iter().map(|u| format!("{:.0} %", u.server_pct())).collect::<Vec<_>>().join(" / ");
        // Each meter counts the other nodes as "other processes": take them out.
        let first = uses.first().copied().unwrap_or_default();
        let others: f64 = uses.iter().skip(1).map(|u| u.server_secs).sum();
        let other_pct = 100.0 * (first.other_secs - others).max(0.0) / first.wall.max(1e-9);
        format!(
            "{nodes} (of one core; load tool {:.0} %, other processes {other_pct:.0} %, irq+softirq {:.0} %, steal {:.0} %)",
            first.bench_pct(),
            first.softirq_pct(),
            first.steal_pct()
        )
    };
    let (writers, per_sec, cpu) =
        load::measured_phase(writers, local, remote, o.body_bytes, pace, warmup, window, meters, read).await?;
    pubs.writers = writers;
    if !load::settle(local, Duration::from_secs(20)).await {
        println!("PROBLEM: publishes still not delivered back to their publishers 20 s after the phase");
    }
    let h = remote.latency();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok((per_sec, ms(0.5), ms(0.99), h.max() as f64 / 1000.0, cpu))
}
