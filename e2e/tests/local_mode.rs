//! `chat-operator local`: a manifest's ChatCluster run as real `chat-node` processes on loopback,
//! driven only through the manifest file, observed through the nodes' HTTP endpoints, real
//! WebSocket clients and local mode's `status.json`.
//!
//! Each test runs its own local mode on its own loopback range (127.0.3.x, 127.0.4.x; the other
//! tests use 127.0.0.x) with a free base port. Every wait is a bounded poll. Build the binaries
//! first: `cargo build --workspace --bins` (scripts/test.sh does).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::client::{Client, http_get};
use chat_e2e::{free_port, operator_binary};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

const NAME: &str = "chat";
/// Bound for nodes to start, link up and report ready (a loaded 2-core machine included).
const READY: Duration = Duration::from_secs(30);
/// Bound for a whole rolling restart of three nodes (each drains within 2 s, then starts).
const ROLLOUT: Duration = Duration::from_secs(60);
const T: Duration = Duration::from_secs(5);

// ---------- the manifest ----------

/// The parts of the test manifest the tests change.
#[derive(Clone)]
struct Spec {
    replicas: u32,
    max_connections: u32,
    hello: &'static str,
    /// `spec.drain.terminationGracePeriodSeconds`; 1 is below the drain deadline: invalid.
    grace: Option<u32>,
}

impl Default for Spec {
    fn default() -> Self {
        Spec { replicas: 3, max_connections: 10_000, hello: "v1", grace: None }
    }
}

/// A small cluster that restarts quickly: no load-balancer grace, a 2 s drain deadline, and
/// discovery and failure detection in about a second.
fn manifest_yaml(spec: &Spec) -> String {
    let grace = spec.grace.map(|g| format!("    terminationGracePeriodSeconds: {g}\n")).unwrap_or_default();
    format!(
        "apiVersion: chatcluster.dev/v1alpha1
kind: ChatCluster
metadata:
  name: {NAME}
spec:
  replicas: {replicas}
  config:
    auth:
      mode: anonymous
    history:
      size: 2000
    limits:
      max_connections: {max}
    cluster:
      discovery_interval_secs: 1
      heartbeat_ms: 100
      peer_timeout_ms: 600
  assets:
    files:
      hello.txt: \"{hello}\"
  drain:
    lbGraceSeconds: 0
    deadlineSeconds: 2
{grace}",
        replicas = spec.replicas,
        max = spec.max_connections,
        hello = spec.hello,
    )
}

// ---------- local mode as a process ----------

struct LocalMode {
    child: Child,
    pid: u32,
    first: Ipv4Addr,
    port: u16,
    manifest: PathBuf,
    state: PathBuf,
    output: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl LocalMode {
    /// Starts `chat-operator local` on `first`, `first + 1`, … with a free port.
    async fn start(first: Ipv4Addr, spec: &Spec) -> anyhow::Result<LocalMode> {
        let dir = tempfile::tempdir()?;
        let manifest = dir.path().join("cluster.yaml");
        std::fs::write(&manifest, manifest_yaml(spec))?;
        let state = dir.path().join("state");
        let port = free_port();
        let mut child = Command::new(operator_binary())
            .arg("local")
            .arg(&manifest)
            .arg("--state-dir")
            .arg(&state)
            .args(["--first-ip", &first.to_string(), "--base-port", &port.to_string(), "--poll-ms", "200"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn chat-operator local")?;
        let pid = child.id().context("local mode has a pid")?;
        let output = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, output.clone(), "stdout");
        }
        if let Some(err) = child.stderr.take() {
            collect(err, output.clone(), "stderr");
        }
        Ok(LocalMode { child, pid, first, port, manifest, state, output, _dir: dir })
    }

    /// Replaces the manifest the way editors save: a new file renamed over the old one.
    fn edit(&self, spec: &Spec) -> anyhow::Result<()> {
        let tmp = self.manifest.with_extension("yaml.tmp");
        std::fs::write(&tmp, manifest_yaml(spec))?;
        std::fs::rename(&tmp, &self.manifest)?;
        Ok(())
    }

    fn addr(&self, ordinal: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(u32::from(self.first) + ordinal), self.port))
    }

    fn ws_url(&self, ordinal: u32, user: &str) -> String {
        format!("ws://{}/ws?name={user}", self.addr(ordinal))
    }

    fn status(&self) -> anyhow::Result<Value> {
        let path = self.state.join("status.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Ordinal → pid of every running node, from `status.json`.
    fn pids(&self) -> anyhow::Result<BTreeMap<u32, u32>> {
        let status = self.status()?;
        let nodes = status["nodes"].as_array().context("nodes")?;
        Ok(nodes.iter().filter_map(|n| Some((n["ordinal"].as_u64()? as u32, n["pid"].as_u64()? as u32))).collect())
    }

    fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    fn node_log(&self, ordinal: u32) -> String {
        std::fs::read_to_string(self.state.join(format!("{NAME}-{ordinal}.log"))).unwrap_or_default()
    }

    /// Local mode's output and the nodes' log tails, for failure messages.
    fn report(&self) -> String {
        let mut text = format!("--- local mode ---\n{}", tail(&self.output(), 60));
        for ordinal in 0..6 {
            let log = self.node_log(ordinal);
            if !log.is_empty() {
                text.push_str(&format!("\n--- {NAME}-{ordinal}.log ---\n{}", tail(&log, 15)));
            }
        }
        text
    }

    /// Polls `check` every 50 ms until it yields a value; the error carries the last reason and
    /// what local mode and the nodes printed.
    async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl AsyncFnMut(&LocalMode) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("local mode exited with {status} while waiting for {what}\n{}", self.report());
            }
            let last = match check(self).await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                bail!("not {what} within {timeout:?}: {last:#}\n{}", self.report());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Exactly `n` nodes, all on the current revision and ready (as local mode and as the
    /// nodes' own `/readyz` say), each linked to the other `n − 1`.
    async fn wait_cluster(&mut self, n: u32) -> anyhow::Result<BTreeMap<u32, u32>> {
        self.wait_for(&format!("{n} ready, linked nodes"), READY, async |lm| {
            let status = lm.status()?;
            let nodes = status["nodes"].as_array().context("nodes")?;
            ensure!(nodes.len() == n as usize, "{} nodes: {status:#}", nodes.len());
            for node in nodes {
                ensure!(node["ready"] == true && node["revision"] == status["revision"], "not ready: {node}");
            }
            for ordinal in 0..n {
                let (code, body) = http_get(lm.addr(ordinal), "/cluster").await?;
                ensure!(code == 200, "/cluster of {ordinal}: {code}");
                let cluster: Value = serde_json::from_str(&body)?;
                let links = cluster["links"].as_array().map_or(0, Vec::len);
                ensure!(
                    links == n as usize - 1 && cluster["size"] == n && cluster["ready"] == true,
                    "{NAME}-{ordinal}: {links} links, size {}, ready {}",
                    cluster["size"],
                    cluster["ready"]
                );
                ensure!(http_get(lm.addr(ordinal), "/readyz").await?.0 == 200, "{ordinal} /readyz");
            }
            lm.pids()
        })
        .await
    }

    fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, signal);
        }
    }

    async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("local mode still running after {timeout:?}\n{}", self.report()),
        }
    }
}

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, log: Arc<Mutex<String>>, name: &'static str) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("E2E_ECHO").is_some() {
                eprintln!("[local {name}] {line}");
            }
            if let Ok(mut log) = log.lock() {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Whether a process exists (a zombie counts as gone: it no longer runs).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

async fn get_body(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let (code, body) = http_get(addr, path).await?;
    ensure!(code == 200, "GET {path} on {addr}: {code}");
    Ok(body)
}

// ---------- the cluster's lifecycle ----------

#[tokio::test]
async fn local_mode_runs_rolls_reloads_assets_scales_and_stops() -> anyhow::Result<()> {
    let mut spec = Spec::default();
    let mut lm = LocalMode::start(Ipv4Addr::new(127, 0, 3, 10), &spec).await?;
    let pids = lm.wait_cluster(3).await?;

    // The URLs are printed, and they serve the page and the manifest's asset.
    let urls = lm
        .wait_for("URLs printed", T, async |lm| {
            let out = lm.output();
            ensure!(out.contains("3 nodes ready"), "no URL table yet");
            Ok(out)
        })
        .await?;
    for ordinal in 0..3 {
        let url = format!("http://{}/", lm.addr(ordinal));
        assert!(urls.contains(&url), "{url} printed:\n{urls}");
        assert!(get_body(lm.addr(ordinal), "/").await?.contains("<html"), "web page of {ordinal}");
        assert_eq!(get_body(lm.addr(ordinal), "/hello.txt").await?, "v1");
        let toml = std::fs::read_to_string(lm.state.join(format!("nodes/{NAME}-{ordinal}/node.toml")))?;
        assert!(toml.contains("dns_name = \"chat-peers.default.svc.cluster.local\""), "{toml}");
    }

    // An asset edit is served without a restart.
    spec.hello = "v2";
    lm.edit(&spec)?;
    lm.wait_for("the new asset served by every node", T, async |lm| {
        for ordinal in 0..3 {
            let body = get_body(lm.addr(ordinal), "/hello.txt").await?;
            ensure!(body == "v2", "{ordinal} serves {body:?}");
        }
        Ok(())
    })
    .await?;
    assert_eq!(lm.pids()?, pids, "assets changed in place: same processes");
    assert!(pids.values().all(|pid| running(*pid)));

    // An invalid edit is reported with the operator's reason and changes nothing.
    let mut invalid = spec.clone();
    invalid.grace = Some(1);
    invalid.max_connections = 9_000;
    lm.edit(&invalid)?;
    let problem = lm
        .wait_for("the invalid manifest reported", T, async |lm| {
            let status = lm.status()?;
            let problem = status["manifest_problem"].as_str().context("no problem reported yet")?;
            Ok(problem.to_owned())
        })
        .await?;
    assert!(problem.contains("InvalidDrain") && problem.contains("unchanged"), "{problem}");
    assert!(lm.output().contains("InvalidDrain"), "logged too:\n{}", lm.output());
    // Several polls later, still the same processes.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(lm.pids()?, pids, "an invalid manifest restarts nothing");

    // A config edit rolls the nodes one at a time, highest ordinal first, while two stay ready.
    spec.max_connections = 9_000;
    lm.edit(&spec)?;
    let mut seen: BTreeMap<u32, Vec<u32>> = pids.iter().map(|(o, p)| (*o, vec![*p])).collect();
    let mut order = Vec::new();
    let mut most_unready = 0;
    let deadline = Instant::now() + ROLLOUT;
    loop {
        let mut unready = 0;
        for ordinal in 0..3 {
            if http_get(lm.addr(ordinal), "/readyz").await.map(|r| r.0).unwrap_or(0) != 200 {
                unready += 1;
            }
        }
        most_unready = most_unready.max(unready);
        for (ordinal, pid) in lm.pids().unwrap_or_default() {
            let pids = seen.entry(ordinal).or_default();
            if pids.last() != Some(&pid) {
                pids.push(pid);
                order.push(ordinal);
            }
        }
        let status = lm.status()?;
        let done = seen.values().all(|p| p.len() >= 2)
            && status["nodes"].as_array().is_some_and(|nodes| {
                nodes.len() == 3 && nodes.iter().all(|n| n["ready"] == true && n["revision"] == status["revision"])
            });
        if done && unready == 0 {
            break;
        }
        if Instant::now() >= deadline {
            bail!("rollout not done within {ROLLOUT:?}: pids {seen:?}\n{}", lm.report());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (ordinal, pids) in &seen {
        assert_eq!(pids.len(), 2, "{NAME}-{ordinal} restarted exactly once: {pids:?}");
        assert!(!running(pids[0]), "the old {NAME}-{ordinal} is gone");
    }
    assert_eq!(order, [2, 1, 0], "one at a time, highest ordinal first");
    assert!(most_unready <= 1, "at most one node unready at a time, saw {most_unready}");
    for ordinal in 0..3 {
        let toml = std::fs::read_to_string(lm.state.join(format!("nodes/{NAME}-{ordinal}/node.toml")))?;
        assert!(toml.contains("max_connections = 9000"), "{toml}");
    }
    let pids = lm.wait_cluster(3).await?;
    assert!(lm.status()?["manifest_problem"].is_null(), "the valid manifest cleared the problem");

    // Scale up: two more nodes, in DNS, linked to everyone; the others keep running.
    spec.replicas = 5;
    lm.edit(&spec)?;
    let scaled = lm.wait_cluster(5).await?;
    for (ordinal, pid) in &pids {
        assert_eq!(scaled.get(ordinal), Some(pid), "scale up leaves {NAME}-{ordinal} alone");
    }
    assert_eq!(lm.status()?["dns_records"].as_array().map(Vec::len), Some(5));

    // Scale down to two: the three highest ordinals drain and leave DNS; the rest re-converge.
    spec.replicas = 2;
    lm.edit(&spec)?;
    let remaining = lm.wait_cluster(2).await?;
    assert_eq!(remaining.keys().copied().collect::<Vec<_>>(), [0, 1]);
    assert_eq!(remaining.get(&0), scaled.get(&0));
    for ordinal in 2..5 {
        let pid = scaled[&ordinal];
        lm.wait_for(&format!("{NAME}-{ordinal} gone"), T, async |lm| {
            ensure!(!running(pid), "pid {pid} still runs");
            ensure!(http_get(lm.addr(ordinal), "/readyz").await.is_err(), "its port still answers");
            Ok(())
        })
        .await?;
    }
    let records: BTreeSet<String> = lm.status()?["dns_records"]
        .as_array()
        .context("dns records")?
        .iter()
        .filter_map(|r| r.as_str().map(str::to_owned))
        .collect();
    assert_eq!(records, BTreeSet::from([lm.addr(0).ip().to_string(), lm.addr(1).ip().to_string()]));

    // Ctrl-C: every node drains and stops, then local mode exits 0.
    lm.signal(libc::SIGINT);
    let status = lm.wait_exit(Duration::from_secs(30)).await?;
    assert!(status.success(), "exit status {status}\n{}", lm.report());
    for pid in remaining.values() {
        assert!(!running(*pid), "node pid {pid} still runs after local mode exited");
    }
    assert!(lm.output().contains("every node stopped"), "{}", lm.report());
    Ok(())
}

// ---------- chat across nodes, through a rolling restart ----------

async fn connect(lm: &LocalMode, ordinal: u32, user: &str) -> anyhow::Result<Client> {
    let mut c = Client::connect(&lm.ws_url(ordinal, user), None).await?;
    c.expect_type("welcome", T).await?;
    Ok(c)
}

/// Joins `room`, skipping presence events.
async fn join(c: &mut Client, room: &str) -> anyhow::Result<()> {
    c.send_json(json!({"type": "join", "id": "j", "room": room})).await?;
    let joined = c.recv_until("joined", T).await?;
    ensure!(joined["room"] == room, "{joined}");
    Ok(())
}

/// One acked publish: its body, room offset and epoch.
#[derive(Clone, Debug)]
struct Acked {
    body: String,
    offset: u64,
}

/// Publishes `p0`, `p1`, … every 100 ms to `room`, reconnecting to the next node whenever its
/// node drains or fails, until `stop`; returns every acked publish.
async fn publish_continuously(lm: Arc<LocalModeAddrs>, room: &'static str, stop: Arc<AtomicBool>) -> Vec<Acked> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    let mut ordinal = 0;
    while !stop.load(Ordering::Relaxed) {
        let url = format!("ws://{}/ws?name=publisher", lm.addr(ordinal));
        ordinal = (ordinal + 1) % lm.nodes;
        let Ok(mut c) = Client::connect(&url, None).await else {
            tokio::time::sleep(Duration::from_millis(100)).await;
            continue;
        };
        if c.expect_type("welcome", T).await.is_err() || join(&mut c, room).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Relaxed) {
            let body = format!("p{n}");
            n += 1;
            let id = body.clone();
            if c.send_json(json!({"type": "publish", "id": id, "room": room, "body": body})).await.is_err() {
                break;
            }
            // The ack, or an error for this id (not acked: nothing to check), or a broken link.
            let outcome = async {
                loop {
                    let frame = c.recv_json(T).await?;
                    if frame["id"] == id.as_str() && (frame["type"] == "ack" || frame["type"] == "error") {
                        return anyhow::Ok(frame);
                    }
                }
            }
            .await;
            match outcome {
                Ok(frame) if frame["type"] == "ack" => {
                    acked.push(Acked { body, offset: frame["offset"].as_u64().unwrap_or(u64::MAX) })
                }
                Ok(_) => {}
                Err(_) => break,
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    acked
}

/// What the publisher task needs of [`LocalMode`] (which stays with the test).
struct LocalModeAddrs {
    first: Ipv4Addr,
    port: u16,
    nodes: u32,
}

impl LocalModeAddrs {
    fn addr(&self, ordinal: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(u32::from(self.first) + ordinal), self.port))
    }
}

/// Needs room replication between nodes (docs/cluster.md): a message published on one node
/// reaches subscribers on another, and acked messages survive their node's restart.
#[tokio::test]
async fn local_mode_chat_spans_nodes_and_a_rolling_restart_loses_no_acked_message() -> anyhow::Result<()> {
    let mut spec = Spec::default();
    let mut lm = LocalMode::start(Ipv4Addr::new(127, 0, 4, 10), &spec).await?;
    lm.wait_cluster(3).await?;

    // Published on node 0, received by a subscriber on node 1.
    let mut subscriber = connect(&lm, 1, "sub").await?;
    join(&mut subscriber, "lobby").await?;
    let mut publisher = connect(&lm, 0, "pub").await?;
    join(&mut publisher, "lobby").await?;
    publisher.send_json(json!({"type": "publish", "id": "hi", "room": "lobby", "body": "hello from node 0"})).await?;
    let ack = publisher.recv_until("ack", T).await?;
    let message = subscriber.recv_until("message", T).await.with_context(|| lm.report())?;
    assert_eq!(message["body"], "hello from node 0", "{message}");
    assert_eq!(message["offset"], ack["offset"], "the same message: {message} / {ack}");
    subscriber.close().await;
    publisher.close().await;

    // A continuous publisher through a rolling restart: every ack is a promise kept.
    let addrs = Arc::new(LocalModeAddrs { first: lm.first, port: lm.port, nodes: 3 });
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(publish_continuously(addrs, "roll", stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = lm.pids()?;
    spec.max_connections = 9_000;
    lm.edit(&spec)?;
    lm.wait_for("every node restarted", ROLLOUT, async |lm| {
        let now = lm.pids()?;
        ensure!(before.iter().all(|(o, p)| now.get(o).is_some_and(|q| q != p)), "pids {now:?}");
        Ok(())
    })
    .await?;
    lm.wait_cluster(3).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = tokio::time::timeout(Duration::from_secs(15), task).await.context("publisher stops")??;
    assert!(acked.len() >= 20, "the publisher got few acks ({}): {}", acked.len(), lm.report());

    for ordinal in 0..3 {
        let mut reader = connect(&lm, ordinal, &format!("reader{ordinal}")).await?;
        join(&mut reader, "roll").await?;
        reader.send_json(json!({"type": "history", "id": "h", "room": "roll"})).await?;
        let history = reader.recv_until("history", T).await?;
        let stored: BTreeMap<String, u64> = history["messages"]
            .as_array()
            .context("history messages")?
            .iter()
            .filter_map(|m| Some((m["body"].as_str()?.to_owned(), m["offset"].as_u64()?)))
            .collect();
        let lost: Vec<&Acked> = acked.iter().filter(|a| stored.get(&a.body) != Some(&a.offset)).collect();
        assert!(
            lost.is_empty(),
            "{NAME}-{ordinal}: {} of {} acked messages missing from history: {lost:?}",
            lost.len(),
            acked.len()
        );
        reader.close().await;
    }

    lm.signal(libc::SIGINT);
    assert!(lm.wait_exit(Duration::from_secs(30)).await?.success());
    Ok(())
}
