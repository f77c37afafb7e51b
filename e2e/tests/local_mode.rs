//! `chat-operator local`: a manifest's ChatCluster run as real `chat-node` processes on loopback,
//! driven only through the manifest file, observed through the nodes' HTTP endpoints, real
//! WebSocket clients and local mode's `status.json`.
//!
//! Each test runs its own local mode on its own loopback range (127.0.3.x, 127.0.4.x; the other
//! tests use 127.0.0.x) with a free base port. Every wait is a bounded poll. Build the binaries
//! first: `cargo build --workspace --bins` (scripts/test.sh does).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::client::{Client, http_get, http_request};
use chat_e2e::local::{LocalMode, chat_cluster, manifest_yaml};
use serde_json::{Value, json};

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

/// A small cluster that restarts quickly ([`chat_cluster`]), anonymous, serving `hello.txt`.
fn manifest(spec: &Spec) -> String {
    let mut fields = json!({
        "config": {
            "auth": {"mode": "anonymous"},
            "history": {"size": 2000},
            "limits": {"max_connections": spec.max_connections},
        },
        "assets": {"files": {"hello.txt": spec.hello}},
    });
    if let Some(grace) = spec.grace {
        fields["drain"] = json!({"terminationGracePeriodSeconds": grace});
    }
    manifest_yaml(&[chat_cluster(NAME, spec.replicas, fields)])
}

/// Starts `chat-operator local` in `dir` on `first`, `first + 1`, … with a free port.
fn start(dir: &tempfile::TempDir, first: Ipv4Addr, spec: &Spec) -> anyhow::Result<LocalMode> {
    LocalMode::start(dir.path(), NAME, first, LocalMode::free_base_port(), &manifest(spec))
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
    let dir = tempfile::tempdir()?;
    let mut lm = start(&dir, Ipv4Addr::new(127, 0, 3, 10), &spec)?;
    let pids = lm.wait_linked(3, READY).await?;

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
    lm.edit(&manifest(&spec))?;
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

    // An invalid edit is reported with the operator's reason and changes nothing. Its
    // max_connections (8 000) differs from the valid edit's below (9 000), so a rollout of the
    // invalid manifest could not pass for the valid one's.
    let revision = lm.status()?["revision"].clone();
    let mut invalid = spec.clone();
    invalid.grace = Some(1);
    invalid.max_connections = 8_000;
    lm.edit(&manifest(&invalid))?;
    let status = lm
        .wait_for("the invalid manifest reported", T, async |lm| {
            let status = lm.status()?;
            status["manifest_problem"].as_str().context("no problem reported yet")?;
            Ok(status)
        })
        .await?;
    let problem = status["manifest_problem"].as_str().unwrap_or_default();
    assert!(problem.contains("InvalidDrain") && problem.contains("unchanged"), "{problem}");
    assert!(lm.output().contains("InvalidDrain"), "logged too:\n{}", lm.output());
    // The manifest is judged and reported in one step: had it been taken, the desired revision
    // in the same status would already be a new one.
    assert_eq!(status["revision"], revision, "the desired state is unchanged");
    let nodes = status["nodes"].as_array().context("nodes")?;
    assert!(nodes.iter().all(|n| n["revision"] == revision), "every node runs the old revision: {nodes:?}");
    assert_eq!(lm.pids()?, pids, "an invalid manifest restarts nothing");

    // A config edit rolls the nodes one at a time, highest ordinal first, while two stay ready.
    spec.max_connections = 9_000;
    lm.edit(&manifest(&spec))?;
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
        assert!(toml.contains("max_connections = 9000"), "the valid manifest's value: {toml}");
    }
    let pids = lm.wait_linked(3, READY).await?;
    assert!(lm.status()?["manifest_problem"].is_null(), "the valid manifest cleared the problem");

    // Scale up: two more nodes, in DNS, linked to everyone; the others keep running.
    spec.replicas = 5;
    lm.edit(&manifest(&spec))?;
    let scaled = lm.wait_linked(5, READY).await?;
    for (ordinal, pid) in &pids {
        assert_eq!(scaled.get(ordinal), Some(pid), "scale up leaves {NAME}-{ordinal} alone");
    }
    assert_eq!(lm.status()?["dns_records"].as_array().map(Vec::len), Some(5));

    // Scale down to two: the three highest ordinals drain and leave DNS; the rest re-converge.
    spec.replicas = 2;
    lm.edit(&manifest(&spec))?;
    let remaining = lm.wait_linked(2, READY).await?;
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
    let mut c = Client::connect(&format!("ws://{}/ws?name={user}", lm.addr(ordinal)), None).await?;
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

/// Publishes `p0`, `p1`, … every 100 ms to `room` through one of `nodes`, reconnecting to the
/// next whenever its node drains or fails, until `stop`; returns every acked publish.
async fn publish_continuously(nodes: Vec<SocketAddr>, room: &'static str, stop: Arc<AtomicBool>) -> Vec<Acked> {
    let mut acked = Vec::new();
    let mut n = 0u64;
    let mut next = 0;
    while !stop.load(Ordering::Relaxed) {
        let url = format!("ws://{}/ws?name=publisher", nodes[next]);
        next = (next + 1) % nodes.len();
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

/// Needs room replication between nodes (docs/cluster.md): a message published on one node
/// reaches subscribers on another, and acked messages survive their node's restart.
#[tokio::test]
async fn local_mode_chat_spans_nodes_and_a_rolling_restart_loses_no_acked_message() -> anyhow::Result<()> {
    let mut spec = Spec::default();
    let dir = tempfile::tempdir()?;
    let mut lm = start(&dir, Ipv4Addr::new(127, 0, 4, 10), &spec)?;
    lm.wait_linked(3, READY).await?;

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
    let nodes = (0..3).map(|ordinal| lm.addr(ordinal)).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let task = tokio::spawn(publish_continuously(nodes, "roll", stop.clone()));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = lm.pids()?;
    spec.max_connections = 9_000;
    lm.edit(&manifest(&spec))?;
    lm.wait_for("every node restarted", ROLLOUT, async |lm| {
        let now = lm.pids()?;
        ensure!(before.iter().all(|(o, p)| now.get(o).is_some_and(|q| q != p)), "pids {now:?}");
        Ok(())
    })
    .await?;
    lm.wait_linked(3, READY).await?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let acked = tokio::time::timeout(Duration::from_secs(15), task).await.context("publisher stops")??;
    assert!(acked.len() >= 20, "the publisher got few acks ({}): {}", acked.len(), lm.report());

    for ordinal in 0..3 {
        let mut reader = connect(&lm, ordinal, &format!("reader{ordinal}")).await?;
        join(&mut reader, "roll").await?;
        // The whole history, page by page (a reply holds one page).
        let mut stored: BTreeMap<String, u64> = BTreeMap::new();
        let mut since: Option<Value> = None;
        for _ in 0..100 {
            let mut request = json!({"type": "history", "id": "h", "room": "roll"});
            if let Some(position) = &since {
                request["since"] = position.clone();
            }
            reader.send_json(request).await?;
            let page = reader.recv_until("history", T).await?;
            let messages = page["messages"].as_array().context("history messages")?;
            stored
                .extend(messages.iter().filter_map(|m| Some((m["body"].as_str()?.to_owned(), m["offset"].as_u64()?))));
            if page["more"] != true {
                if since.is_some() || page["complete"] == true {
                    break;
                }
                // Without `since` a reply is the newest page: read again from the start.
                since = Some(json!({"epoch": page["epoch"], "offset": 0}));
                continue;
            }
            let last = messages.last().and_then(|m| m["offset"].as_u64()).context("a page with messages")?;
            since = Some(json!({"epoch": page["epoch"], "offset": last}));
        }
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

// ---------- the server API, from the example manifest ----------

/// `examples/server-api.yaml` as shipped: its Secret's key opens the API on every node, a
/// publish through one node reaches a WebSocket client on another, and a new key in the
/// manifest replaces the old one without restarting a node.
#[tokio::test]
async fn local_mode_serves_the_server_api_of_the_example_and_rotates_its_key() -> anyhow::Result<()> {
    const KEY: &str = "dev-only-api-key-0123456789";
    let example = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/server-api.yaml"))?;
    ensure!(example.contains(KEY), "the example's key changed; update this test");
    let dir = tempfile::tempdir()?;
    let mut lm =
        LocalMode::start(dir.path(), NAME, Ipv4Addr::new(127, 0, 5, 10), LocalMode::free_base_port(), &example)?;
    lm.wait_linked(3, READY).await?;
    ensure!(lm.output().contains("server API http://"), "the API's URL is printed: {}", lm.report());

    let mut listener = connect(&lm, 1, "listener").await?;
    join(&mut listener, "lobby").await?;
    let admin = lm.admin_addr(0);
    let publish = move |key: &'static str| async move {
        let bearer = format!("Bearer {key}");
        let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
        http_request(admin, "POST", "/api/v1/rooms/lobby/messages", &headers, br#"{"body":"from the backend"}"#).await
    };
    let answer = publish(KEY).await?;
    ensure!(answer.status == 200, "{answer:?}");
    let message = listener.recv_until("message", T).await.with_context(|| lm.report())?;
    ensure!(message["body"] == "from the backend", "{message}");

    const NEW: &str = "the-rotated-api-key-9876543210";
    let pids = lm.pids()?;
    lm.edit(&example.replace(KEY, NEW))?;
    lm.wait_for("the new key accepted and the old one refused", READY, async |_| {
        ensure!(publish(NEW).await?.status == 200, "new key not yet accepted");
        ensure!(publish(KEY).await?.status == 401, "old key still accepted");
        Ok(())
    })
    .await?;
    ensure!(lm.pids()? == pids, "a key rotation restarts no node");
    Ok(())
}
