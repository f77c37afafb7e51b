//! `chat-bench rebalance`: time from a 3 → 5 scale-out (`chat-operator local`, manifest edit)
//! to an even spread, at the default rate and tolerance, for each connection count asked; and
//! the publish → deliver latency of probe subscribers that were never moved, before the
//! scale-out and while the cluster rebalances. See docs/benchmarks.md, "Rebalancing".

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use chat_e2e::cluster::JWT_SECRET;
use chat_e2e::local::{LocalMode, chat_cluster, manifest_yaml};
use chat_e2e::rebalance::{Fleet, publish};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::procs::raise_nofile;

#[derive(clap::Args, Debug)]
pub struct Opts {
    /// Connection counts to measure, one run each.
    #[arg(long, value_delimiter = ',', default_values_t = [3000, 10_000])]
    connections: Vec<usize>,
    /// Probe subscribers (of the connections) that measure latency.
    #[arg(long, default_value_t = 100)]
    probes: usize,
    /// Seconds of latency measurement before the scale-out.
    #[arg(long, default_value_t = 10.0)]
    before_secs: f64,
    /// `spec.rebalance.minConnectionAgeSeconds` (the default, 60, only makes the run wait).
    #[arg(long, default_value_t = 5)]
    min_age_secs: u64,
    /// Bound on waiting for an even spread.
    #[arg(long, default_value_t = 300)]
    limit_secs: u64,
}

const TOLERANCE: u32 = 10;

fn manifest(replicas: u32, min_age: u64) -> String {
    let spec = json!({
        "config": {"limits": {"max_connections": 50_000, "publish_rate_per_sec": 1000, "publish_burst": 1000}},
        "auth": {"jwtSecretRef": {"name": "chat-jwt", "key": "jwt-secret"}},
        // The default rate, tolerance and cooldown.
        "rebalance": {"minConnectionAgeSeconds": min_age},
    });
    let secret = json!({
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-jwt"},
        "stringData": {"jwt-secret": JWT_SECRET},
    });
    manifest_yaml(&[chat_cluster("chat", replicas, spec), secret])
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

struct Outcome {
    connections: usize,
    linked_secs: f64,
    even_secs: f64,
    moves: usize,
    worst_second: usize,
    counts: Vec<usize>,
    before: Histogram<u64>,
    during: Histogram<u64>,
}

async fn run_one(opts: &Opts, connections: usize, first: Ipv4Addr) -> anyhow::Result<Outcome> {
    let dir = tempfile::tempdir()?;
    let mut lm =
        LocalMode::start(dir.path(), "chat", first, LocalMode::free_base_port(), &manifest(3, opts.min_age_secs))?;
    lm.wait_linked(3, Duration::from_secs(60)).await?;
    let fleet = Fleet::new((0..3).map(|i| lm.addr(i)).collect(), connections, opts.probes);
    fleet.connect_all(1000, Duration::from_secs(120)).await.map_err(|e| e.context(lm.report()))?;
    let publisher = tokio::spawn(publish(fleet.clone(), Duration::from_millis(10)));
    // Old enough to move by the time the new nodes settle; the latency before starts clean.
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.take_latency();
    tokio::time::sleep(Duration::from_secs_f64(opts.before_secs)).await;
    let before = fleet.take_latency();
    anyhow::ensure!(fleet.moves_total() == 0, "clients moved before the scale-out");

    lm.edit(&manifest(5, opts.min_age_secs))?;
    let scaled = Instant::now();
    fleet.add_node(lm.addr(3));
    fleet.add_node(lm.addr(4));
    lm.wait_linked(5, Duration::from_secs(60)).await?;
    let linked_secs = scaled.elapsed().as_secs_f64();
    let limit = Duration::from_secs(opts.limit_secs);
    while !fleet.even(TOLERANCE) {
        anyhow::ensure!(scaled.elapsed() < limit, "not even after {limit:?}: {:?}\n{}", fleet.per_node(), lm.report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let even_secs = scaled.elapsed().as_secs_f64();
    let during = fleet.take_latency();
    let counts = fleet.per_node();
    fleet.stop_publishing();
    publisher.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.stop();
    fleet.check().context("client books")?;
    Ok(Outcome {
        connections,
        linked_secs,
        even_secs,
        moves: fleet.moves_total(),
        worst_second: fleet.worst_second(),
        counts,
        before,
        during,
    })
}

pub async fn run(opts: Opts) -> anyhow::Result<()> {
    let limit = raise_nofile();
    println!(
        "open files limit {limit}; rate 100 connections/s per node, tolerance {TOLERANCE} %, minimum age {} s",
        opts.min_age_secs
    );
    let mut outcomes = Vec::new();
    for (i, &connections) in opts.connections.iter().enumerate() {
        let first = Ipv4Addr::new(127, 0, 12 + i as u8, 10);
        println!("{connections} connections on 3 nodes, then 5 …");
        let outcome = run_one(&opts, connections, first).await?;
        println!(
            "  5 nodes linked {:.1} s after the edit; even {:.1} s after it: {:?}; {} moves, at most {} closes by one node in a second",
            outcome.linked_secs, outcome.even_secs, outcome.counts, outcome.moves, outcome.worst_second
        );
        outcomes.push(outcome);
    }
    println!();
    println!(
        "| connections | 5 nodes linked | even spread | clients moved | most closes / node / s | untouched p50 / p99 before | during |"
    );
    println!("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    for o in &outcomes {
        println!(
            "| {} | {:.1} s | {:.1} s | {} ({:.0} %) | {} | {:.2} / {:.2} ms | {:.2} / {:.2} ms |",
            o.connections,
            o.linked_secs,
            o.even_secs,
            o.moves,
            o.moves as f64 * 100.0 / o.connections as f64,
            o.worst_second,
            ms(&o.before, 0.5),
            ms(&o.before, 0.99),
            ms(&o.during, 0.5),
            ms(&o.during, 0.99),
        );
    }
    Ok(())
}
