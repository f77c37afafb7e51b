//! History checks under faults: publishers bound to every node publish continuously (each
//! publish with its own idempotency key, retried with the same key after `unavailable` or a lost
//! connection), subscribers on every node record every delivery and resume with `since`, while
//! the test kills, rolls, scales, partitions or restarts the cluster. Afterwards every node's
//! history is read and checked by `chat_e2e::history::check`: no acked publish lost, moved or
//! stored twice, identical histories, offsets 1..N, deliveries in order and equal to the history.
//!
//! Clusters run under `chat-operator local` (loopback 127.0.5.x–127.0.8.x, free ports), except
//! the partition scenario, which uses node processes in network namespaces (`NetnsCluster`, needs
//! root). The scenarios take turns (one cluster at a time on a 2-core machine). Build the
//! binaries first: `cargo build --workspace --bins`.
//!
//! Environment: `HISTORY_CHECK_SEED` replays the `kill -9` victims; `HISTORY_CHECK_KEYS=off`
//! sends no `key` field (for a server without idempotency keys).

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::cluster::{JWT_SECRET, NETNS_PORTS, NetnsCluster};
use chat_e2e::history::{self, HistoryConfig, NodeTarget, Recorded, Recorder, SeededRng};
use chat_e2e::local::{LocalMode, chat_cluster, manifest_yaml};
use serde_json::json;

const NAME: &str = "chat";
const ROOMS: &[&str] = &["hc-a", "hc-b"];
/// Bound for nodes to start and report ready (a loaded 2-core machine included).
const READY: Duration = Duration::from_secs(40);
/// Bound for a rolling restart of three nodes (each drains within 2 s, then starts).
const ROLLOUT: Duration = Duration::from_secs(60);
/// Bound for publishers to make the progress a step waits for.
const PROGRESS: Duration = Duration::from_secs(30);
/// Bound for every node's history to answer and stop changing.
const SETTLE: Duration = Duration::from_secs(30);

/// One cluster at a time: the scenarios are timing-sensitive and the machine has two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

// ---------- the manifest ----------

#[derive(Clone, Copy)]
struct Spec {
    replicas: u32,
    /// A config value that changes the rollout revision when edited.
    max_connections: u32,
    /// `spec.storage: {size: 1Gi}`: nodes keep room logs on disk.
    disk: bool,
}

impl Default for Spec {
    fn default() -> Self {
        Spec { replicas: 3, max_connections: 10_000, disk: false }
    }
}

/// A small cluster that restarts quickly ([`chat_cluster`]), with JWT auth (stable user ids across
/// reconnects, so a retried key is the same user's), a history large enough to keep every message
/// of a scenario and rate limits above the load.
fn manifest(spec: Spec) -> String {
    let mut fields = json!({
        "config": {
            "history": {"size": 20000},
            "limits": {"max_connections": spec.max_connections, "publish_rate_per_sec": 10000, "publish_burst": 10000},
        },
        "auth": {"jwtSecretRef": {"name": "chat-jwt", "key": "jwt-secret"}},
    });
    if spec.disk {
        fields["storage"] = json!({"size": "1Gi"});
    }
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "chat-jwt"},
        "stringData": {"jwt-secret": JWT_SECRET},
    });
    manifest_yaml(&[chat_cluster(NAME, spec.replicas, fields), secret])
}

fn config(run: &str) -> HistoryConfig {
    let mut cfg = HistoryConfig::new(run, ROOMS);
    cfg.jwt_secret = Some(JWT_SECRET.into());
    cfg
}

/// A run name unique per process and scenario, so bodies and keys never repeat.
fn run_name(scenario: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{scenario}-{nanos:08x}")
}

fn publisher_name(node: &NodeTarget) -> String {
    format!("pub-{}", node.name)
}

/// A subscriber on every node (first, so they see every message), then a publisher on every
/// node. Subscribers move to one of `fallback` once their node has not answered for
/// `failover_after`.
async fn start_traffic(
    rec: &mut Recorder,
    nodes: &[NodeTarget],
    fallback: &[NodeTarget],
    failover_after: Duration,
) -> anyhow::Result<()> {
    start_traffic_tagged(rec, "", nodes, fallback, failover_after).await
}

/// [`start_traffic`] with subscriber names `sub-<tag><node>` (several runs in one check).
async fn start_traffic_tagged(
    rec: &mut Recorder,
    tag: &str,
    nodes: &[NodeTarget],
    fallback: &[NodeTarget],
    failover_after: Duration,
) -> anyhow::Result<()> {
    for node in nodes {
        let others: Vec<NodeTarget> = fallback.iter().filter(|f| f.name != node.name).cloned().collect();
        rec.add_subscriber(&format!("sub-{tag}{}", node.name), node.clone(), others, failover_after).await?;
    }
    for node in nodes {
        rec.add_publisher(&publisher_name(node), node.clone());
    }
    Ok(())
}

fn publishers(nodes: &[NodeTarget]) -> Vec<String> {
    nodes.iter().map(publisher_name).collect()
}

fn refs(names: &[String]) -> Vec<&str> {
    names.iter().map(String::as_str).collect()
}

/// The error first, then the logs that explain it.
fn with_logs(err: anyhow::Error, logs: String) -> anyhow::Error {
    anyhow::anyhow!("{err:#}\n{logs}")
}

/// Prints the report (summary line, violations) and fails on any violation.
fn conclude(report: history::Report) -> anyhow::Result<()> {
    if report.ok() {
        println!("{report}");
    }
    report.into_result()
}

/// Settles, reads every node's history back, stops local mode, and checks the run.
async fn check_local(scenario: &str, rec: Recorder, nodes: &[NodeTarget], lm: LocalMode) -> anyhow::Result<()> {
    let cfg = rec.config().clone();
    let recorded = rec.finish(nodes, SETTLE).await.map_err(|e| with_logs(e, lm.report()))?;
    let report = history::check(scenario, &cfg, &[&recorded], &recorded.histories);
    lm.stop(Duration::from_secs(30)).await?;
    conclude(report)
}

async fn start_local(dir: &std::path::Path, first: Ipv4Addr, port: u16, spec: Spec) -> anyhow::Result<LocalMode> {
    let mut lm = LocalMode::start(dir, NAME, first, port, &manifest(spec))?;
    lm.wait_ready(spec.replicas, READY).await?;
    Ok(lm)
}

fn targets(lm: &LocalMode, n: u32) -> Vec<NodeTarget> {
    (0..n).map(|i| lm.target(i)).collect()
}

// ---------- kill -9 ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_random_nodes() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let mut lm =
        start_local(dir.path(), Ipv4Addr::new(127, 0, 5, 10), LocalMode::free_base_port(), Spec::default()).await?;
    let nodes = targets(&lm, 3);
    let mut rec = Recorder::new(config(&run_name("kill9")));
    // Subscribers wait for their own node to come back.
    start_traffic(&mut rec, &nodes, &[], Duration::MAX).await?;
    rec.wait_acks(100, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;

    let mut rng = SeededRng::from_env_or_time();
    println!("kill9_random_nodes: seed {} (HISTORY_CHECK_SEED={} replays the victims)", rng.seed(), rng.seed());
    for round in 1..=3 {
        let victim = rng.below(3) as u32;
        let pid = lm.kill_node(victim)?;
        println!("kill9_random_nodes: round {round}: kill -9 {} (pid {pid})", lm.node_name(victim));
        // Local mode restarts it after its crash back-off.
        lm.wait_for(&format!("{} restarted and ready", lm.node_name(victim)), READY, async |lm| {
            let status = lm.status()?;
            let node = status["nodes"]
                .as_array()
                .and_then(|n| n.iter().find(|n| n["ordinal"] == victim))
                .context("no such node in status.json")?;
            ensure!(node["pid"].as_u64().is_some_and(|p| p != u64::from(pid)), "not restarted yet: {node}");
            ensure!(node["ready"] == true, "not ready yet: {node}");
            Ok(())
        })
        .await?;
        // Publishing goes on through every node, the restarted one included.
        let names = publishers(&nodes);
        rec.wait_acks_each(&refs(&names), 20, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;
    }
    lm.wait_ready(3, READY).await?;
    rec.wait_acks(50, PROGRESS).await?;
    check_local("kill9_random_nodes", rec, &nodes, lm).await
}

// ---------- rolling restart ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_restart_from_config_edit() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let mut spec = Spec::default();
    let mut lm = start_local(dir.path(), Ipv4Addr::new(127, 0, 6, 10), LocalMode::free_base_port(), spec).await?;
    let nodes = targets(&lm, 3);
    let mut rec = Recorder::new(config(&run_name("rolling")));
    start_traffic(&mut rec, &nodes, &[], Duration::MAX).await?;
    rec.wait_acks(100, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;

    // A distinct config value: every node gets a new config, one at a time.
    let before = lm.pids()?;
    spec.max_connections = 9_000;
    lm.edit(&manifest(spec))?;
    let mut seen: BTreeMap<u32, Vec<u32>> = before.iter().map(|(o, p)| (*o, vec![*p])).collect();
    let deadline = Instant::now() + ROLLOUT;
    loop {
        for (ordinal, pid) in lm.pids().unwrap_or_default() {
            let pids = seen.entry(ordinal).or_default();
            if pids.last() != Some(&pid) {
                pids.push(pid);
            }
        }
        let status = lm.status()?;
        let done = seen.values().all(|p| p.len() >= 2)
            && status["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == 3 && nodes.iter().all(|n| n["ready"] == true && n["revision"] == status["revision"])
            });
        if done {
            break;
        }
        if Instant::now() >= deadline {
            bail!("rollout not done within {ROLLOUT:?}: pids {seen:?}\n{}", lm.report());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (ordinal, pids) in &seen {
        ensure!(pids.len() == 2, "{} restarted exactly once: pids {pids:?}", lm.node_name(*ordinal));
    }
    for ordinal in 0..3 {
        let toml = std::fs::read_to_string(lm.state.join(format!("nodes/{}/node.toml", lm.node_name(ordinal))))?;
        ensure!(toml.contains("max_connections = 9000"), "{} runs the new config: {toml}", lm.node_name(ordinal));
    }
    println!("rolling_restart_from_config_edit: every node restarted once: {seen:?}");
    lm.wait_ready(3, READY).await?;
    // Publishing goes on through each node after its restart.
    let names = publishers(&nodes);
    rec.wait_acks_each(&refs(&names), 50, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;
    check_local("rolling_restart_from_config_edit", rec, &nodes, lm).await
}

// ---------- scale 3 → 5 → 3 ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_3_5_3() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let mut spec = Spec::default();
    let mut lm = start_local(dir.path(), Ipv4Addr::new(127, 0, 7, 10), LocalMode::free_base_port(), spec).await?;
    let stay = targets(&lm, 3);
    let mut rec = Recorder::new(config(&run_name("scale")));
    start_traffic(&mut rec, &stay, &stay, Duration::from_secs(2)).await?;
    rec.wait_acks(100, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;

    spec.replicas = 5;
    lm.edit(&manifest(spec))?;
    lm.wait_ready(5, READY).await?;
    println!("scale_3_5_3: 5 nodes ready");
    // Traffic through the new nodes too, while they exist; their subscribers move to a staying
    // node once theirs is gone.
    let extra: Vec<NodeTarget> = (3..5).map(|i| lm.target(i)).collect();
    start_traffic(&mut rec, &extra, &stay, Duration::from_millis(500)).await?;
    let all: Vec<String> = publishers(&stay).into_iter().chain(publishers(&extra)).collect();
    rec.wait_acks_each(&refs(&all), 30, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;

    for node in &extra {
        rec.retire_publisher(&publisher_name(node));
    }
    spec.replicas = 3;
    lm.edit(&manifest(spec))?;
    lm.wait_ready(3, READY).await?;
    println!("scale_3_5_3: back to 3 nodes");
    let names = publishers(&stay);
    rec.wait_acks_each(&refs(&names), 30, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;
    check_local("scale_3_5_3", rec, &stay, lm).await
}

// ---------- partition ----------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partition_minority_then_heal() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let cluster = NetnsCluster::start_jwt(3).await?;
    let client = SocketAddr::from(([127, 0, 0, 1], NETNS_PORTS.client));
    // Each node's clients live in its namespace: the partition cuts them off with their node.
    let nodes: Vec<NodeTarget> = cluster
        .members
        .iter()
        .zip(cluster.net.hosts())
        .map(|(m, host)| NodeTarget::in_netns(&m.id, &host.ns, client))
        .collect();
    let logs = || -> String {
        cluster.members.iter().map(|m| format!("--- {} ---\n{}", m.id, tail(&m.node.output(), 30))).collect()
    };
    let mut rec = Recorder::new(config(&run_name("partition")));
    start_traffic(&mut rec, &nodes, &[], Duration::MAX).await?;
    rec.wait_acks(100, PROGRESS).await.map_err(|e| with_logs(e, logs()))?;

    let names = publishers(&nodes);
    let (majority, minority) = (&names[..2], &names[2]);
    cluster.net.partition(2)?;
    println!("partition_minority_then_heal: {} cut off", nodes[2].name);
    rec.wait_acks_each(&refs(majority), 60, PROGRESS)
        .await
        .context("the majority keeps publishing")
        .map_err(|e| with_logs(e, logs()))?;
    // The minority's publishes are refused or wait: until one `unavailable`, or a few seconds.
    let deadline = Instant::now() + Duration::from_secs(8);
    while rec.unavailable_by(minority) == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("partition_minority_then_heal: during the partition: {}", rec.progress_text());
    cluster.net.heal(2)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    for node in &nodes {
        while !node.ready().await {
            ensure!(Instant::now() < deadline, "{} not ready again after the heal\n{}", node.name, logs());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    println!("partition_minority_then_heal: healed");
    rec.wait_acks_each(&refs(&names), 20, PROGRESS)
        .await
        .context("after the heal")
        .map_err(|e| with_logs(e, logs()))?;
    let cfg = rec.config().clone();
    let recorded = rec.finish(&nodes, SETTLE).await.map_err(|e| with_logs(e, logs()))?;
    conclude(history::check("partition_minority_then_heal", &cfg, &[&recorded], &recorded.histories))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n") + "\n"
}

// ---------- whole-cluster restart on disk ----------

/// Needs `spec.storage` in the ChatCluster and disk storage in the node: stopping local mode and
/// starting it again on the same state directory keeps every room's history, same epochs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_cluster_restart_with_disk_storage() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir()?;
    let spec = Spec { disk: true, ..Spec::default() };
    let first = Ipv4Addr::new(127, 0, 8, 10);
    let port = LocalMode::free_base_port();

    let mut recorded: Vec<Recorded> = Vec::new();
    // Whether local mode rendered disk storage into the node config (`cluster.storage = "disk"`):
    // until the ChatCluster has `spec.storage` and the node has disk storage, it does not, and
    // the restart loses the first run's messages.
    let mut waiting = None;
    let mut cfg = None;
    for run in 1..=2 {
        let mut lm = LocalMode::start(dir.path(), NAME, first, port, &manifest(spec))?;
        lm.wait_ready(3, READY).await?;
        if run == 1 {
            let path = lm.state.join(format!("nodes/{}/node.toml", lm.node_name(0)));
            let toml = std::fs::read_to_string(&path)?;
            if !toml.contains("storage = \"disk\"") {
                let note = format!(
                    "WAITING ON spec.storage: {} has no `storage = \"disk\"`: this chat-operator ignores \
                     `spec.storage` or the node has no disk storage yet",
                    path.display()
                );
                println!("whole_cluster_restart_with_disk_storage: {note}");
                waiting = Some(note);
            }
        }
        let nodes = targets(&lm, 3);
        let mut rec = Recorder::new(config(&run_name(&format!("disk{run}"))));
        start_traffic_tagged(&mut rec, &format!("run{run}-"), &nodes, &[], Duration::MAX).await?;
        rec.wait_acks(150, PROGRESS).await.map_err(|e| with_logs(e, lm.report()))?;
        cfg = Some(rec.config().clone());
        recorded.push(rec.finish(&nodes, SETTLE).await.map_err(|e| with_logs(e, lm.report()))?);
        // Ctrl-C: every node drains and exits; the state directory stays.
        lm.stop(Duration::from_secs(30)).await?;
        println!("whole_cluster_restart_with_disk_storage: run {run} stopped");
    }
    let last = &recorded[1].histories;
    // The first run's acks carry its epochs: (a) finds them again only in the same epochs.
    for (node, rooms) in &recorded[0].histories {
        for (room, before) in rooms {
            let after = last.get(node).and_then(|r| r.get(room)).map(|h| h.epoch.as_str());
            println!("whole_cluster_restart_with_disk_storage: {node} {room}: epoch {} then {after:?}", before.epoch);
        }
    }
    let runs: Vec<&Recorded> = recorded.iter().collect();
    let cfg = cfg.context("two runs")?;
    let result = conclude(history::check("whole_cluster_restart_with_disk_storage", &cfg, &runs, last));
    match waiting {
        Some(note) => result.context(note),
        None => result,
    }
}
