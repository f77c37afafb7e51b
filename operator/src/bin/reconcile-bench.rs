//! Benchmark: reconciles many ChatClusters against the in-process fake API server and prints
//! reconciles per second (create, steady state, config change) and the process's memory.
//! Run: `cargo run --release -p chat-operator --bin reconcile-bench [-- --clusters 1000]`.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use anyhow::Context as _;
use chat_operator::crd::ChatCluster;
use chat_operator::fake::FakeApi;
use chat_operator::fixtures::{NAMESPACE, context, minimal};
use chat_operator::reconcile::{Context, reconcile};
use clap::Parser;
use futures_util::StreamExt;

/// Counts live heap bytes, so the operator's share can be told from the fake API's.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live_mib() -> f64 {
    LIVE.load(Ordering::Relaxed) as f64 / (1024.0 * 1024.0)
}

#[derive(Parser)]
struct Args {
    #[arg(long, default_value_t = 1000)]
    clusters: usize,
    /// Reconciles in flight at once (the controller's default is unbounded; 16 is conservative).
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
}

/// Every cluster as stored now, like the controller's reflector cache holds them.
fn cache(fake: &FakeApi, names: &[String]) -> anyhow::Result<Vec<Arc<ChatCluster>>> {
    names.iter().map(|n| fake.get::<ChatCluster>(NAMESPACE, n).map(Arc::new).context("cluster missing")).collect()
}

/// One reconcile of every cluster; returns reconciles per second.
async fn round(ctx: &Arc<Context>, clusters: &[Arc<ChatCluster>], concurrency: usize) -> anyhow::Result<f64> {
    let start = Instant::now();
    let results: Vec<_> = futures_util::stream::iter(clusters.iter().cloned())
        .map(|c| reconcile(c, ctx.clone()))
        .buffer_unordered(concurrency)
        .collect()
        .await;
    let elapsed = start.elapsed().as_secs_f64();
    let failed = results.iter().filter(|r| r.is_err()).count();
    anyhow::ensure!(failed == 0, "{failed} reconciles failed");
    Ok(clusters.len() as f64 / elapsed)
}

/// `VmHWM` (peak) and `VmRSS` (current) in KiB, from /proc (Linux only).
fn memory_kib() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fake = FakeApi::new();
    fake.set_recording(false);
    let names: Vec<String> = (0..args.clusters).map(|i| format!("chat-{i:04}")).collect();
    for name in &names {
        fake.put(&minimal(name));
    }
    let ctx = context(&fake);
    let (_, before) = memory_kib();

    let create = round(&ctx, &cache(&fake, &names)?, args.concurrency).await?;
    // The steady round's requests are counted (recording is off elsewhere: it would inflate the
    // memory figures).
    fake.set_recording(true);
    let steady = round(&ctx, &cache(&fake, &names)?, args.concurrency).await?;
    let requests = fake.requests();
    fake.clear_requests();
    fake.set_recording(false);
    let reads = requests.iter().filter(|r| r.starts_with("GET ")).count();
    let writes = requests.len() - reads;
    for name in &names {
        fake.edit::<ChatCluster>(NAMESPACE, name, |c| c["spec"]["config"]["history"]["size"] = serde_json::json!(7));
    }
    let clusters = cache(&fake, &names)?;
    let change = round(&ctx, &clusters, args.concurrency).await?;
    let (peak, now) = memory_kib();
    let heap_all = live_mib();
    let reconciles = ctx.metrics.reconciles();
    // What the operator itself keeps: its cache of clusters and its context (event cache, client).
    drop((clusters, ctx));
    let heap_without_operator = live_mib();
    drop(fake);
    let heap_base = live_mib();

    println!("clusters: {}  concurrency: {}", args.clusters, args.concurrency);
    println!("reconciles/s  create: {create:.0}  steady: {steady:.0}  config change: {change:.0}");
    println!("reconciles total: {reconciles}");
    let per_cluster = |n: usize| n as f64 / names.len().max(1) as f64;
    println!(
        "steady-state reconcile (nothing changed): {:.1} requests per cluster, {:.1} reads and {:.1} writes",
        per_cluster(requests.len()),
        per_cluster(reads),
        per_cluster(writes)
    );
    println!(
        "process  VmRSS: {:.1} MiB  VmHWM: {:.1} MiB  (before reconciling: {:.1} MiB; includes the fake API)",
        now as f64 / 1024.0,
        peak as f64 / 1024.0,
        before as f64 / 1024.0
    );
    println!(
        "live heap  operator: {:.1} MiB  fake API store: {:.1} MiB  rest: {:.1} MiB",
        heap_all - heap_without_operator,
        heap_without_operator - heap_base,
        heap_base
    );
    Ok(())
}
