//! Load tool: runs the same load against `chat-node` and against `ref-server` (a bare
//! tokio-tungstenite broadcast server), one after the other, and prints absolute figures and the
//! ratio node/reference. See docs/benchmarks.md.
//!
//! Everything it starts listens on 127.0.0.1 (the cluster benchmarks: 127.0.0.2–4) and is
//! killed when the run ends; every loop is bounded in count and time.

#[path = "../bench/abuse.rs"]
mod abuse;
#[path = "../bench/api.rs"]
mod api;
#[path = "../bench/client.rs"]
mod client;
#[path = "../bench/cluster.rs"]
mod cluster;
#[path = "../bench/failover.rs"]
mod failover;
#[path = "../bench/load.rs"]
mod load;
#[path = "../bench/procs.rs"]
mod procs;
#[path = "../bench/rebalance.rs"]
mod rebalance;

use std::hash::{BuildHasher as _, Hasher as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use hdrhistogram::Histogram;
use jsonwebtoken::{Algorithm, EncodingKey, Header};

use load::{Fleet, Pace, Spec, Stats};
use procs::{CpuMeter, CpuUse, Kind, NodeTuning, Server};

#[derive(Parser, Debug)]
#[command(about = "ChatCluster benchmark: chat-node against a bare tokio-tungstenite reference server")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// RSS per idle authenticated connection joined to rooms.
    Memory(Opts),
    /// One room: latency at a fixed delivery rate, then deliveries/s at saturation.
    Broadcast(Opts),
    /// Connection setup rate (node: handshake + auth + join; reference: bare handshake).
    Connect(Opts),
    /// memory, connect and broadcast, then one table.
    All(Opts),
    /// Three nodes: cross-node latency at a fixed message rate, then saturation.
    Cluster(cluster::Opts),
    /// Three nodes: publish unavailability when the leader of a room's Raft group is killed
    /// (kill -9) or drained (SIGTERM).
    Failover(failover::Opts),
    /// One node: other clients' latency, the node's memory and each abuser's close code while
    /// hostile clients do one thing after another (slowloris, floods, oversize frames, …).
    Abuse(abuse::Opts),
    /// Three nodes: server API publishes/s into a room with WebSocket subscribers on every node.
    Api(api::Opts),
    /// Three nodes scaled to five: time to an even spread of the connections, and the latency of
    /// clients that were not moved, before and during.
    Rebalance(rebalance::Opts),
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, ValueEnum)]
enum Only {
    Node,
    Ref,
    Both,
}

#[derive(clap::Args, Debug, Clone)]
struct Opts {
    /// chat-node binary (default: chat-node next to this binary).
    #[arg(long)]
    node_bin: Option<PathBuf>,
    /// ref-server binary (default: ref-server next to this binary).
    #[arg(long)]
    ref_bin: Option<PathBuf>,
    /// Extra TOML lines for the node's `[limits]` section, e.g. 'ws_write_buffer_bytes = 0'
    /// (keys must not repeat the ones the bench sets).
    #[arg(long, default_value = "")]
    node_limits: String,
    /// Which servers to measure.
    #[arg(long, value_enum, default_value = "both")]
    only: Only,
    /// Connection setups in flight at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Spread client sockets over 127.0.0.1 .. 127.0.0.N (ephemeral ports are per 4-tuple).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u8).range(1..=250))]
    source_ips: u8,

    /// memory: idle connections to open.
    #[arg(long, default_value_t = 10_000)]
    idle_conns: usize,
    /// memory: rooms each connection joins (node only).
    #[arg(long, default_value_t = 2)]
    rooms_per_conn: usize,
    /// memory: connections per room.
    #[arg(long, default_value_t = 100)]
    room_size: usize,

    /// connect: connections to open per round (kept open until the round ends).
    #[arg(long, default_value_t = 2_000)]
    setup_conns: usize,
    /// connect: rounds, each against a fresh server; the median round is reported.
    #[arg(long, default_value_t = 5)]
    setup_rounds: usize,

    /// broadcast: connections in the room, publishers included (every publish is delivered to
    /// each of them, the sender included).
    #[arg(long, default_value_t = 2_000)]
    members: usize,
    /// broadcast: how many of the members publish.
    #[arg(long, default_value_t = 10)]
    publishers: usize,
    /// broadcast: deliveries per second for the latency phase.
    #[arg(long, default_value_t = 100_000.0)]
    target_rate: f64,
    /// broadcast: seconds of publishing before each measurement window.
    #[arg(long, default_value_t = 2.0)]
    warmup_secs: f64,
    /// broadcast: measurement window of the fixed-rate phase.
    #[arg(long, default_value_t = 10.0)]
    rate_secs: f64,
    /// broadcast: measurement window of the saturation phase.
    #[arg(long, default_value_t = 5.0)]
    sat_secs: f64,
    /// broadcast: per publisher, publishes sent but not yet delivered back to it.
    #[arg(long, default_value_t = 8)]
    window: i64,
    /// broadcast: bytes of each message body.
    #[arg(long, default_value_t = 64)]
    body_bytes: usize,
}

#[derive(Debug, Default, Clone)]
struct MemoryResult {
    conns: usize,
    before_kib: u64,
    after_kib: u64,
}

impl MemoryResult {
    fn per_conn_kib(&self) -> f64 {
        (self.after_kib as f64 - self.before_kib as f64) / self.conns.max(1) as f64
    }
}

#[derive(Debug, Default, Clone)]
struct ConnectResult {
    conns: usize,
    per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    cpu: CpuUse,
}

#[derive(Debug, Default, Clone)]
struct Phase {
    deliveries_per_sec: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    samples: u64,
    cpu: CpuUse,
}

#[derive(Debug, Default, Clone)]
struct BroadcastResult {
    rate: Phase,
    sat: Phase,
    sent: u64,
    delivered: u64,
    expected: u64,
    frame_bytes: f64,
}

#[derive(Debug, Default)]
struct Results {
    memory: Option<MemoryResult>,
    connect: Option<ConnectResult>,
    broadcast: Option<BroadcastResult>,
    problems: Vec<String>,
}

struct Ctx {
    opts: Opts,
    node_bin: PathBuf,
    ref_bin: PathBuf,
    secret: String,
    tokens: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    load::now_ns();
    let nofile = procs::raise_nofile();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("runtime")?;
    rt.block_on(run(cli, nofile))
}

async fn run(cli: Cli, nofile: u64) -> anyhow::Result<()> {
    let command = command_line();
    let (opts, which) = match cli.cmd {
        Cmd::Memory(o) => (o, [true, false, false]),
        Cmd::Connect(o) => (o, [false, true, false]),
        Cmd::Broadcast(o) => (o, [false, false, true]),
        Cmd::All(o) => (o, [true, true, true]),
        Cmd::Cluster(o) => return cluster::run(o).await,
        Cmd::Failover(o) => return failover::run(o).await,
        Cmd::Abuse(o) => return abuse::run(o).await,
        Cmd::Api(o) => return api::run(o).await,
        Cmd::Rebalance(o) => return rebalance::run(o).await,
    };
    if opts.publishers == 0 || opts.publishers > opts.members {
        bail!("--publishers must be between 1 and --members");
    }
    let needed = opts.idle_conns.max(opts.setup_conns).max(opts.members) as u64 + 100;
    if nofile < needed {
        bail!("open files limit is {nofile}; {needed} are needed (raise `ulimit -n` or lower the counts)");
    }
    let here = std::env::current_exe()?.parent().map(Path::to_path_buf).unwrap_or_default();
    let node_bin = opts.node_bin.clone().unwrap_or_else(|| here.join("chat-node"));
    let ref_bin = opts.ref_bin.clone().unwrap_or_else(|| here.join("ref-server"));
    let secret = random_hex();
    let n_tokens = opts.idle_conns.max(opts.setup_conns).max(opts.members);
    let tokens = make_tokens(&secret, n_tokens)?;
    let ctx = Ctx { opts, node_bin, ref_bin, secret, tokens };

    println!("# chat-bench on {} cores, {}", cores(), utc_now());
    println!("# command: {command}");
    println!("# open files limit (soft=hard): {nofile}");
    println!("# load average at start: {}", std::fs::read_to_string("/proc/loadavg").unwrap_or_default().trim());
    let cpu0 = procs::self_cpu_secs();
    let t0 = Instant::now();

    let kinds: Vec<Kind> = match ctx.opts.only {
        Only::Node => vec![Kind::Node],
        Only::Ref => vec![Kind::Ref],
        Only::Both => vec![Kind::Node, Kind::Ref],
    };
    let mut node = Results::default();
    let mut reference = Results::default();
    let tests: [(&str, usize); 3] = [("memory", 0), ("connect", 1), ("broadcast", 2)];
    for (name, t) in tests {
        if !which[t] {
            continue;
        }
        for &kind in &kinds {
            let res = if kind == Kind::Node { &mut node } else { &mut reference };
            eprintln!("[{}] {name} ...", kind.name());
            let outcome = match t {
                0 => memory(&ctx, kind, &mut res.problems).await.map(|m| res.memory = Some(m)),
                1 => connect(&ctx, kind, &mut res.problems).await.map(|c| res.connect = Some(c)),
                _ => broadcast(&ctx, kind, &mut res.problems).await.map(|b| res.broadcast = Some(b)),
            };
            if let Err(e) = outcome {
                let msg = format!("{name} failed: {e:#}");
                eprintln!("[{}] {msg}", kind.name());
                res.problems.push(msg);
            }
        }
    }

    let wall = t0.elapsed().as_secs_f64();
    let cpu = procs::self_cpu_secs() - cpu0;
    print_report(&ctx.opts, &node, &reference);
    println!(
        "\n\"other processes\" is /proc/stat user+system time minus the server's and the load tool's: \
         above ~10 % of one core the figures are disturbed by something else running; so they are by \
         hypervisor steal (time the host gave our vCPUs to other guests)."
    );
    println!(
        "load tool CPU (getrusage user+sys): {cpu:.1} s over {wall:.1} s wall = {:.0} % of one core \
         (this machine has {} cores)",
        100.0 * cpu / wall.max(1e-9),
        cores()
    );
    for (kind, res) in [("node", &node), ("reference", &reference)] {
        for p in &res.problems {
            println!("PROBLEM [{kind}]: {p}");
        }
    }
    println!("# command: {command}");
    Ok(())
}

fn spec(ctx: &Ctx, kind: Kind, addr: std::net::SocketAddr) -> Spec {
    Spec {
        kind,
        addr,
        tokens: if kind == Kind::Node { ctx.tokens.clone() } else { Vec::new() },
        rooms: Box::new(|_| Vec::new()),
        publishers: 0,
        source_ips: ctx.opts.source_ips,
        buf_size: 16 * 1024,
    }
}

async fn start(ctx: &Ctx, kind: Kind, big_queues: bool) -> anyhow::Result<Server> {
    match kind {
        Kind::Node => {
            Server::spawn_node(
                &ctx.node_bin,
                &ctx.secret,
                &NodeTuning { big_queues, extra_limits: ctx.opts.node_limits.clone() },
            )
            .await
        }
        Kind::Ref => Server::spawn_ref(&ctx.ref_bin).await,
    }
}

fn check_alive(server: &mut Server, problems: &mut Vec<String>) -> anyhow::Result<()> {
    if let Some(status) = server.exited() {
        let msg = format!("{} exited during the run ({status}): {}", server.kind.name(), server.log_tail());
        problems.push(msg.clone());
        bail!(msg);
    }
    Ok(())
}

fn take_problems(stats: &Stats, problems: &mut Vec<String>) {
    let p = stats.problems.lock().unwrap_or_else(|e| e.into_inner());
    let (closes, eofs, errors) = (
        stats.closes.load(Ordering::Relaxed),
        stats.eofs.load(Ordering::Relaxed),
        stats.error_frames.load(Ordering::Relaxed),
    );
    if closes + eofs + errors > 0 {
        problems.push(format!("{closes} close frames, {eofs} connections lost, {errors} error frames"));
    }
    problems.extend(p.iter().take(5).cloned());
}

async fn memory(ctx: &Ctx, kind: Kind, problems: &mut Vec<String>) -> anyhow::Result<MemoryResult> {
    let o = &ctx.opts;
    let mut server = start(ctx, kind, false).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before_kib = server.rss_kib()?;
    let stats = Stats::new(0);
    let mut s = spec(ctx, kind, server.addr);
    let (n, size, per) = (o.idle_conns, o.room_size.max(1), o.rooms_per_conn);
    let groups = n.div_ceil(size).max(1);
    // Room k of connection i: even k groups consecutive connections, odd k strided ones, so
    // every room has about `room_size` members and rooms overlap like a real chat.
    s.rooms = Box::new(move |i| {
        (0..per)
            .map(|k| if k % 2 == 0 { format!("m{k}-{}", i / size) } else { format!("m{k}-{}", i % groups) })
            .collect()
    });
    let fleet = load::launch(n, o.concurrency, Arc::new(s), stats.clone()).await?;
    eprintln!(
        "[{}] {n} connections set up in {:.2} s; waiting for RSS to settle",
        kind.name(),
        fleet.setup_elapsed.as_secs_f64()
    );
    let mut last = server.rss_kib()?;
    let mut last_frames = stats.frames.load(Ordering::Relaxed);
    let mut stable = 0;
    for _ in 0..40 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let rss = server.rss_kib()?;
        let frames = stats.frames.load(Ordering::Relaxed);
        if rss.abs_diff(last) < 256 && frames == last_frames {
            stable += 1;
            if stable >= 2 {
                break;
            }
        } else {
            stable = 0;
        }
        (last, last_frames) = (rss, frames);
    }
    let after_kib = server.rss_kib()?;
    check_alive(&mut server, problems)?;
    take_problems(&stats, problems);
    drop(fleet);
    server.stop().await?;
    let r = MemoryResult { conns: n, before_kib, after_kib };
    eprintln!("[{}] RSS {before_kib} KiB -> {after_kib} KiB: {:.2} KiB per connection", kind.name(), r.per_conn_kib());
    Ok(r)
}

async fn connect(ctx: &Ctx, kind: Kind, problems: &mut Vec<String>) -> anyhow::Result<ConnectResult> {
    let o = &ctx.opts;
    let mut rounds = Vec::new();
    for round in 0..o.setup_rounds.max(1) {
        let mut server = start(ctx, kind, false).await?;
        let stats = Stats::new(0);
        let mut s = spec(ctx, kind, server.addr);
        // Rooms of 10: joins do real work but presence fan-out stays small.
        s.rooms = Box::new(|i| vec![format!("c{}", i / 10)]);
        let meter = CpuMeter::start(&server);
        let fleet = load::launch(o.setup_conns, o.concurrency, Arc::new(s), stats.clone()).await?;
        let cpu = meter.read();
        check_alive(&mut server, problems)?;
        take_problems(&stats, problems);
        let r = ConnectResult {
            conns: o.setup_conns,
            per_sec: o.setup_conns as f64 / fleet.setup_elapsed.as_secs_f64().max(1e-9),
            p50_ms: fleet.setup_hist.value_at_quantile(0.5) as f64 / 1000.0,
            p99_ms: fleet.setup_hist.value_at_quantile(0.99) as f64 / 1000.0,
            cpu,
        };
        drop(fleet);
        server.stop().await?;
        eprintln!(
            "[{}] round {}: {:.0} connections/s (p50 {:.2} ms, p99 {:.2} ms per setup; server CPU {:.0} %, bench CPU {:.0} %, other {:.0} %, softirq {:.0} %, steal {:.0} %)",
            kind.name(),
            round + 1,
            r.per_sec,
            r.p50_ms,
            r.p99_ms,
            cpu.server_pct(),
            cpu.bench_pct(),
            cpu.other_pct(),
            cpu.softirq_pct(),
            cpu.steal_pct()
        );
        rounds.push(r);
    }
    rounds.sort_by(|a, b| a.per_sec.total_cmp(&b.per_sec));
    let median = rounds.swap_remove(rounds.len() / 2);
    Ok(median)
}

async fn broadcast(ctx: &Ctx, kind: Kind, problems: &mut Vec<String>) -> anyhow::Result<BroadcastResult> {
    let o = &ctx.opts;
    let mut server = start(ctx, kind, true).await?;
    let stats = Stats::new(o.publishers);
    let mut s = spec(ctx, kind, server.addr);
    s.rooms = Box::new(|_| vec!["bench".to_owned()]);
    s.publishers = o.publishers;
    s.buf_size = 64 * 1024;
    let mut fleet = load::launch(o.members, o.concurrency, Arc::new(s), stats.clone()).await?;
    eprintln!("[{}] {} members joined in {:.2} s", kind.name(), o.members, fleet.setup_elapsed.as_secs_f64());
    load::settle(&stats, Duration::from_secs(30)).await;

    let per_pub = o.target_rate / (o.members as f64 * o.publishers as f64);
    let rate = run_phase(&mut fleet, &stats, &server, o, Pace::Rate(per_pub), o.rate_secs).await?;
    check_alive(&mut server, problems)?;
    eprintln!(
        "[{}] fixed rate ({per_pub:.2} publishes/s per publisher): {:.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        kind.name(),
        rate.deliveries_per_sec,
        rate.p50_ms,
        rate.p99_ms,
        rate.max_ms
    );
    let sat = run_phase(&mut fleet, &stats, &server, o, Pace::Window(o.window), o.sat_secs).await?;
    check_alive(&mut server, problems)?;
    eprintln!(
        "[{}] saturation (window {}): {:.0} deliveries/s, p50 {:.2} ms, p99 {:.2} ms; server CPU {:.0} %, bench CPU {:.0} %",
        kind.name(),
        o.window,
        sat.deliveries_per_sec,
        sat.p50_ms,
        sat.p99_ms,
        sat.cpu.server_pct(),
        sat.cpu.bench_pct()
    );
    let sent = stats.sent();
    let delivered = stats.delivered.load(Ordering::Relaxed);
    let expected = sent * o.members as u64;
    if delivered != expected {
        problems.push(format!("broadcast: {sent} publishes should make {expected} deliveries, {delivered} arrived"));
    }
    take_problems(&stats, problems);
    drop(fleet);
    server.stop().await?;
    let frame_bytes = stats.delivered_bytes.load(Ordering::Relaxed) as f64 / delivered.max(1) as f64;
    Ok(BroadcastResult { rate, sat, sent, delivered, expected, frame_bytes })
}

async fn run_phase(
    fleet: &mut Fleet,
    stats: &Arc<Stats>,
    server: &Server,
    o: &Opts,
    pace: Pace,
    secs: f64,
) -> anyhow::Result<Phase> {
    let warmup = Duration::from_secs_f64(o.warmup_secs.max(0.0));
    let window = Duration::from_secs_f64(secs.max(0.1));
    let writers = std::mem::take(&mut fleet.writers);
    let meter = || CpuMeter::start(server);
    let (writers, per_sec, cpu) =
        load::measured_phase(writers, stats, stats, o.body_bytes, pace, warmup, window, meter, |m| m.read()).await?;
    fleet.writers = writers;
    if !load::settle(stats, Duration::from_secs(20)).await {
        eprintln!("warning: deliveries still outstanding 20 s after the phase ended");
    }
    let h: Histogram<u64> = stats.latency();
    let ms = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    Ok(Phase {
        deliveries_per_sec: per_sec,
        p50_ms: ms(0.5),
        p99_ms: ms(0.99),
        max_ms: h.max() as f64 / 1000.0,
        samples: h.len(),
        cpu,
    })
}

/// One line of the report table.
struct Row {
    figure: String,
    node: Option<f64>,
    reference: Option<f64>,
    target: &'static str,
    met: Option<bool>,
}

impl Row {
    /// A figure shown for information, with no target.
    fn info(figure: impl Into<String>, node: Option<f64>, reference: Option<f64>) -> Row {
        Row { figure: figure.into(), node, reference, target: "", met: None }
    }

    /// A throughput figure whose target is the node reaching `min` of the reference.
    fn ratio(figure: String, node: Option<f64>, reference: Option<f64>, min: f64) -> Row {
        let met = match (node, reference) {
            (Some(n), Some(r)) if r > 0.0 => Some(n / r >= min),
            _ => None,
        };
        Row { figure, node, reference, target: "node >= 80 % of ref", met }
    }
}

/// The CPU rows of one phase: server, load tool, everything else, loopback softirq, steal.
fn cpu_rows(rows: &mut Vec<Row>, phase: &str, node: Option<&CpuUse>, reference: Option<&CpuUse>) {
    type Figure = (&'static str, fn(&CpuUse) -> f64);
    let figures: [Figure; 5] = [
        ("server CPU", CpuUse::server_pct),
        ("load tool CPU", CpuUse::bench_pct),
        ("other processes CPU", CpuUse::other_pct),
        ("irq + softirq (loopback TCP)", CpuUse::softirq_pct),
        ("hypervisor steal", CpuUse::steal_pct),
    ];
    for (name, f) in figures {
        rows.push(Row::info(format!("{phase}: {name}, % of one core"), node.map(f), reference.map(f)));
    }
}

fn print_report(o: &Opts, node: &Results, reference: &Results) {
    let mut rows: Vec<Row> = Vec::new();
    let mem = |r: &Results| r.memory.as_ref().map(MemoryResult::per_conn_kib);
    if node.memory.is_some() || reference.memory.is_some() {
        rows.push(Row {
            figure: format!(
                "RSS per idle connection, KiB ({} conns; node: JWT + {} rooms of {}; ref: bare)",
                o.idle_conns, o.rooms_per_conn, o.room_size
            ),
            node: mem(node),
            reference: mem(reference),
            target: "node <= 8 KiB",
            met: mem(node).map(|v| v <= 8.0),
        });
    }
    let b = |r: &Results, f: fn(&BroadcastResult) -> f64| r.broadcast.as_ref().map(f);
    let (nb, rb) = (node.broadcast.as_ref(), reference.broadcast.as_ref());
    if nb.is_some() || rb.is_some() {
        let label = format!("{} members, {} publishers", o.members, o.publishers);
        rows.push(Row::info(
            format!("fixed rate: deliveries/s achieved (asked {:.0}; {label})", o.target_rate),
            b(node, |x| x.rate.deliveries_per_sec),
            b(reference, |x| x.rate.deliveries_per_sec),
        ));
        rows.push(Row::info(
            "fixed rate: publish->deliver p50, ms",
            b(node, |x| x.rate.p50_ms),
            b(reference, |x| x.rate.p50_ms),
        ));
        rows.push(Row {
            figure: "fixed rate: publish->deliver p99, ms".into(),
            node: b(node, |x| x.rate.p99_ms),
            reference: b(reference, |x| x.rate.p99_ms),
            target: "node <= 30 ms",
            met: b(node, |x| x.rate.p99_ms).map(|v| v <= 30.0),
        });
        rows.push(Row::info(
            "fixed rate: publish->deliver max, ms",
            b(node, |x| x.rate.max_ms),
            b(reference, |x| x.rate.max_ms),
        ));
        cpu_rows(&mut rows, "fixed rate", nb.map(|x| &x.rate.cpu), rb.map(|x| &x.rate.cpu));
        rows.push(Row::info(
            format!("delivered frame payload, bytes (body {} bytes)", o.body_bytes),
            b(node, |x| x.frame_bytes),
            b(reference, |x| x.frame_bytes),
        ));
        rows.push(Row::ratio(
            format!("saturation: deliveries/s (window {} per publisher)", o.window),
            b(node, |x| x.sat.deliveries_per_sec),
            b(reference, |x| x.sat.deliveries_per_sec),
            0.8,
        ));
        rows.push(Row::info(
            "saturation: publish->deliver p50, ms",
            b(node, |x| x.sat.p50_ms),
            b(reference, |x| x.sat.p50_ms),
        ));
        rows.push(Row::info(
            "saturation: publish->deliver p99, ms",
            b(node, |x| x.sat.p99_ms),
            b(reference, |x| x.sat.p99_ms),
        ));
        cpu_rows(&mut rows, "saturation", nb.map(|x| &x.sat.cpu), rb.map(|x| &x.sat.cpu));
    }
    let c = |r: &Results, f: fn(&ConnectResult) -> f64| r.connect.as_ref().map(f);
    let (nc, rc) = (node.connect.as_ref(), reference.connect.as_ref());
    if nc.is_some() || rc.is_some() {
        rows.push(Row::ratio(
            format!(
                "connection setup/s (median of {} rounds of {} conns, {} in flight; node: handshake+JWT+join; ref: handshake)",
                o.setup_rounds, o.setup_conns, o.concurrency
            ),
            c(node, |x| x.per_sec),
            c(reference, |x| x.per_sec),
            0.8,
        ));
        rows.push(Row::info("connection setup p99, ms", c(node, |x| x.p99_ms), c(reference, |x| x.p99_ms)));
        cpu_rows(&mut rows, "connection setup", nc.map(|x| &x.cpu), rc.map(|x| &x.cpu));
    }
    let fmt = |v: Option<f64>| match v {
        None => "-".to_owned(),
        Some(v) if v.abs() >= 1000.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    };
    println!();
    println!("| figure | node | reference | node/ref | target | met? |");
    println!("| --- | ---: | ---: | ---: | --- | --- |");
    for r in rows {
        let ratio = match (r.node, r.reference) {
            (Some(n), Some(rf)) if rf != 0.0 => format!("{:.2}", n / rf),
            _ => "-".to_owned(),
        };
        let met = match r.met {
            Some(true) => "yes",
            Some(false) => "NO",
            None => "",
        };
        println!("| {} | {} | {} | {ratio} | {} | {met} |", r.figure, fmt(r.node), fmt(r.reference), r.target);
    }
    for (name, r) in [("node", node), ("reference", reference)] {
        if let Some(m) = &r.memory {
            println!(
                "  {name} memory: VmRSS {} KiB before, {} KiB after {} connections",
                m.before_kib, m.after_kib, m.conns
            );
        }
        if let Some(bc) = &r.broadcast {
            println!(
                "  {name} broadcast: {} publishes, {} of {} deliveries arrived; latency samples {} (fixed rate), {} (saturation)",
                bc.sent, bc.delivered, bc.expected, bc.rate.samples, bc.sat.samples
            );
        }
        if let Some(cr) = &r.connect {
            println!("  {name} connect: {} connections, p50 {:.2} ms per setup", cr.conns, cr.p50_ms);
        }
    }
}

#[derive(serde::Serialize)]
struct Claims {
    sub: String,
    name: String,
    roles: Vec<String>,
    exp: u64,
}

fn make_tokens(secret: &str, n: usize) -> anyhow::Result<Vec<String>> {
    let key = EncodingKey::from_secret(secret.as_bytes());
    let header = Header::new(Algorithm::HS256);
    let exp = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs() + 6 * 3600;
    (0..n)
        .map(|i| {
            let claims = Claims { sub: format!("u{i}"), name: format!("User {i}"), roles: vec!["user".into()], exp };
            jsonwebtoken::encode(&header, &claims, &key).context("signing a token")
        })
        .collect()
}

fn random_hex() -> String {
    let mut out = String::new();
    for i in 0..4u64 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u64(i ^ u64::from(std::process::id()));
        h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn utc_now() -> String {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02} UTC", rem / 3600, rem % 3600 / 60)
}

fn command_line() -> String {
    std::env::args()
        .map(|a| {
            if !a.is_empty() && a.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,".contains(c)) {
                a
            } else {
                format!("'{}'", a.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}
