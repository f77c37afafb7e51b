//! Cluster membership across real `chat-node` processes: DNS discovery through a real DNS server
//! (`chat_e2e::dns`), the Raft membership of the room-log groups (voters are the live
//! incarnation of each ordinal `0..min(size, 5)`, new nodes join as learners, a crashed node
//! comes back as a new incarnation that replaces the old voter), scale up and down with
//! `cluster.size` rewritten first, crashes and freezes, DNS outages, a wrong cluster secret, the
//! peer port's isolation, and a network partition between hosts in network namespaces
//! (`chat_e2e::netns`).
//!
//! No fixed sleeps: every expectation is polled on `/cluster` (or `/metrics`, or the node's log)
//! against a bounded deadline. Nodes run with `discovery_interval_secs = 1`, `heartbeat_ms =
//! 100`, `peer_timeout_ms = 600` and short Raft timeouts, so each test takes a few seconds.
//!
//! The loopback tests put the nodes on 127.0.0.2, .3, … (ordinals 0, 1, …; one client port and
//! one peer port per test, the same on every node, as in Kubernetes). The partition test needs
//! root for network namespaces. Build the binaries first: `cargo build --workspace --bins`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::NodeProcess;
use chat_e2e::client::{handshake_status, http_get};
use chat_e2e::cluster::*;
use chat_e2e::dns::RecordType;
use serde_json::Value;

/// `cluster.partitions` of the test nodes (the default).
const PARTITIONS: usize = 8;

// ---------- reading /cluster ----------

fn names(list: &Value) -> Vec<String> {
    let mut names: Vec<String> =
        list.as_array().map(|l| l.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect()).unwrap_or_default();
    names.sort();
    names
}

fn set(ids: &[&str]) -> BTreeSet<String> {
    ids.iter().map(|s| (*s).to_owned()).collect()
}

fn ids(group: &[&Member]) -> BTreeSet<String> {
    group.iter().map(|m| m.id.clone()).collect()
}

/// Every group votes exactly `voters` (each name once: one incarnation per node) and has
/// exactly `learners` as learners.
fn membership_is(status: &Value, voters: &BTreeSet<String>, learners: &BTreeSet<String>) -> bool {
    let Some(groups) = status["groups"].as_array() else { return false };
    let want_v: Vec<String> = voters.iter().cloned().collect();
    let want_l: Vec<String> = learners.iter().cloned().collect();
    groups.len() == PARTITIONS
        && groups.iter().all(|g| names(&g["voters"]) == want_v && names(&g["learners"]) == want_l)
}

/// Every group has a leader, and it is one of `among`.
fn leaders_among(status: &Value, among: &BTreeSet<String>) -> bool {
    status["groups"].as_array().is_some_and(|gs| {
        gs.len() == PARTITIONS && gs.iter().all(|g| g["leader"].as_str().is_some_and(|l| among.contains(l)))
    })
}

fn raft_id(status: &Value) -> anyhow::Result<String> {
    status["raft_id"].as_str().map(str::to_owned).with_context(|| format!("no raft_id in {status:#}"))
}

/// The ordinal in a Raft id's high half (`types::raft_id`), as `/cluster` prints ids in hex.
fn ordinal_of_raft_id(hex: &str) -> anyhow::Result<u64> {
    Ok(u64::from_str_radix(hex, 16).with_context(|| format!("raft_id {hex}"))? >> 32)
}

async fn wait_metric_at_least(m: &Member, name: &str, min: f64) -> anyhow::Result<f64> {
    wait_metric(m, name, &format!("≥ {min}"), |v| v >= min).await
}

async fn wait_metric(m: &Member, name: &str, expected: &str, ok: impl Fn(f64) -> bool) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let value = metric_of(&m.node, name).await?;
        if ok(value) {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("{}: {name} is {value}, expected {expected}\n--- log tail ---\n{}", m.id, tail(&m.node.output(), 40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------- a. discovery ----------

#[tokio::test]
async fn three_nodes_discover_each_other_through_dns() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let all = ids(&cluster.all());

    let mut raft_ids = BTreeSet::new();
    for (i, m) in cluster.members.iter().enumerate() {
        let status = wait_status(m, "every group led by a member", CONVERGE, |s| leaders_among(s, &all)).await?;
        assert_eq!(status["node_id"], m.id.as_str());
        assert_eq!(status["ready"], true, "{status:#}");
        assert_eq!(status["quorum"], true, "{status:#}");
        assert_eq!(status["size"], 3, "{status:#}");
        assert_eq!(status["ordinal"], i, "{status:#}");
        assert_eq!(status["leaving"], false, "{status:#}");
        let id = raft_id(&status)?;
        assert_eq!(ordinal_of_raft_id(&id)?, i as u64, "the raft id carries the ordinal: {id}");
        raft_ids.insert(id);
        assert!(membership_is(&status, &all, &BTreeSet::new()), "all three vote in every group: {status:#}");
        let links = status["links"].as_array().context("links")?;
        assert_eq!(links.len(), 2, "{status:#}");
        for link in links {
            let addr: SocketAddr = link["addr"].as_str().context("link addr")?.parse()?;
            assert_eq!(addr.port(), cluster.ports.peer, "peers are reached on the peer port: {link}");
            assert!(link["linked_for_ms"].is_u64() && link["rtt_ms"].is_number(), "{link}");
            assert!(link["queued_frames"].is_u64(), "link lag: {link}");
        }
        // Discovery is DNS only (no static peers): every record was found.
        let discovered = status["discovered"].to_string();
        for last in 2..=4 {
            assert!(discovered.contains(&format!("127.0.0.{last}:")), "{}: discovered {discovered}", m.id);
        }
        assert_eq!(m.node.http_get("/readyz").await?.0, 200, "{} ready", m.id);
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} gauge", m.id);
        wait_metric(m, "chat_cluster_quorum", "1 (the alerts' quorum gauge)", |v| v == 1.0).await?;
        assert_eq!(metric_of(&m.node, "chat_cluster_size").await?, 3.0, "{} size gauge", m.id);
        assert!(metric_of(&m.node, "chat_peer_links_established_total").await? >= 2.0, "{} links", m.id);
        assert_eq!(metric_of(&m.node, "chat_peer_auth_failures_total").await?, 0.0, "{} auth failures", m.id);
        assert_eq!(metric_of(&m.node, "chat_raft_groups_voting").await?, PARTITIONS as f64, "{} votes", m.id);
    }
    assert_eq!(raft_ids.len(), 3, "distinct raft ids: {raft_ids:?}");

    // One leader per group, the same one seen from every node, and each group's leader says so.
    let deadline = Instant::now() + CONVERGE;
    loop {
        let mut views = Vec::new();
        for m in &cluster.members {
            let s = cluster_status(&m.node).await?;
            let leaders: Vec<Option<String>> = s["groups"]
                .as_array()
                .context("groups")?
                .iter()
                .map(|g| g["leader"].as_str().map(str::to_owned))
                .collect();
            views.push((m.id.clone(), leaders, s));
        }
        let agreed = views.windows(2).all(|w| w[0].1 == w[1].1)
            && views.iter().all(|(id, leaders, s)| {
                leaders
                    .iter()
                    .zip(s["groups"].as_array().into_iter().flatten())
                    .all(|(l, g)| (l.as_deref() == Some(id.as_str())) == (g["role"] == "leader"))
            });
        if agreed {
            let led: usize = views[0].1.iter().flatten().count();
            assert_eq!(led, PARTITIONS);
            break;
        }
        ensure!(Instant::now() < deadline, "nodes disagree on the groups' leaders: {views:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(cluster.dns.queries() > 0, "the nodes asked the test DNS server");
    Ok(())
}

// ---------- b. scale up and down ----------

#[tokio::test]
async fn scale_up_to_four_and_back_to_three() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let three = ids(&cluster.all());

    // Scale up: the operator writes the new size first; three of four voter slots are still
    // linked, so quorum and the voters hold until the new node is there.
    cluster.resize(4)?;
    for m in &cluster.members {
        wait_status(m, "size 4, quorum with 3 of 4 slots, three voters", CONVERGE, |s| {
            s["size"] == 4 && s["quorum"] == true && s["ready"] == true && membership_is(s, &three, &BTreeSet::new())
        })
        .await?;
    }
    // The StatefulSet's new pod is published in DNS, then starts: a learner first, a voter
    // once caught up (start returns when it is ready, which needs its vote).
    cluster.dns.add_record(loopback(5));
    let cfg = cluster.config("node-5", 5, SECRET);
    let fourth = Member { id: "node-5".into(), node: start(&cfg).await? };
    cluster.members.push(fourth);
    wait_converged(&cluster.all(), 4).await?;
    let four = ids(&cluster.all());
    let newcomer = raft_id(&cluster_status(&cluster.members[3].node).await?)?;
    assert_eq!(ordinal_of_raft_id(&newcomer)?, 3);
    // It was added as a learner before it was made a voter (the leaders' membership changes).
    let logs: String = cluster.members[..3].iter().map(|m| m.node.output()).collect();
    assert!(
        logs.lines()
            .any(|l| l.contains("changing room-log membership") && l.contains("AddNodes") && l.contains("node-5")),
        "node-5 was added as a learner first; leaders' membership changes:\n{}",
        logs.lines().filter(|l| l.contains("changing room-log membership")).collect::<Vec<_>>().join("\n")
    );
    for m in &cluster.members {
        let s = cluster_status(&m.node).await?;
        assert!(membership_is(&s, &four, &BTreeSet::new()), "{}: four voters: {s:#}", m.id);
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 4.0, "{} gauge", m.id);
    }

    // Scale down: the size shrinks first; node-5 (ordinal 3) loses its voter slot and stays a
    // learner while it runs, still ready (it has no slot to vote in).
    cluster.resize(3)?;
    for m in &cluster.members {
        wait_status(m, "three voters and node-5 a learner", CONVERGE, |s| {
            s["size"] == 3 && s["ready"] == true && membership_is(s, &three, &set(&["node-5"]))
        })
        .await?;
    }
    assert_eq!(cluster.members[3].node.http_get("/readyz").await?.0, 200, "a learner without a slot is ready");
    // The pod is deleted (drain), then its endpoint leaves DNS.
    let mut gone = cluster.members.pop().context("the fourth node")?;
    gone.node.terminate();
    gone.node.wait_exit(Duration::from_secs(10)).await?;
    cluster.dns.remove_record(loopback(5));
    wait_converged(&cluster.all(), 3).await?;
    for m in &cluster.members {
        let s = wait_status(m, "no learners left", CONVERGE, |s| membership_is(s, &three, &BTreeSet::new())).await?;
        assert_eq!(s["quorum"], true, "{s:#}");
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} gauge", m.id);
        let s = wait_status(m, "forgot 127.0.0.5", CONVERGE, |s| !s["discovered"].to_string().contains("127.0.0.5"))
            .await?;
        assert_eq!(s["ready"], true, "{s:#}");
    }
    Ok(())
}

// ---------- c. crash and restart ----------

/// Waits until every node of `group` has dropped `gone` from its links, and returns how long
/// that took from `since`.
async fn wait_dropped(group: &[&Member], gone: &str, since: Instant) -> anyhow::Result<Duration> {
    for m in group {
        wait_status(m, &format!("without {gone}"), CONVERGE, |s| !member_ids(s).contains(gone)).await?;
    }
    Ok(since.elapsed())
}

#[tokio::test]
async fn killed_node_is_dropped_within_peer_timeout_and_rejoins_as_a_new_incarnation() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let all = ids(&cluster.all());

    let victim = cluster.members.pop().context("node-4")?;
    let old_id = raft_id(&cluster_status(&victim.node).await?)?;
    let cfg = cluster.config(&victim.id, 4, SECRET);
    let killed = Instant::now();
    victim.node.kill();
    let took = wait_dropped(&cluster.all(), &victim.id, killed).await?;
    let bound = Duration::from_millis(PEER_TIMEOUT_MS) + Duration::from_millis(500);
    assert!(took <= bound, "kill -9: dropped after {took:?}, expected within peer_timeout ({bound:?} with slack)");
    let survivors = ids(&cluster.all());
    for m in &cluster.members {
        // Two of three voter slots are linked: quorum; groups the victim led get new leaders;
        // the dead voter keeps its slot until a new incarnation can replace it.
        let s = wait_status(m, "ready, every group led by a survivor", CONVERGE, |s| {
            s["ready"] == true && leaders_among(s, &survivors)
        })
        .await?;
        assert_eq!(s["size"], 3, "{}: {s:#}", m.id);
        assert_eq!(s["quorum"], true, "{}: {s:#}", m.id);
        assert!(membership_is(&s, &all, &BTreeSet::new()), "{}: the dead voter keeps its slot: {s:#}", m.id);
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 2.0, "{} gauge", m.id);
    }
    drop(victim);

    // Restart on the same address, without its memory: a new incarnation, which replaces the
    // old voter in every group (start returns once it is ready, i.e. votes everywhere).
    cluster.members.push(Member { id: cfg.node_id.clone().unwrap_or_default(), node: start(&cfg).await? });
    wait_converged(&cluster.all(), 3).await?;
    let reborn = &cluster.members[2];
    let new_id = raft_id(&cluster_status(&reborn.node).await?)?;
    assert_ne!(new_id, old_id, "a restart without state is a new incarnation");
    assert_eq!(ordinal_of_raft_id(&new_id)?, 2, "same ordinal, new incarnation: {new_id}");
    assert_eq!(
        metric_of(&reborn.node, "chat_raft_groups_voting").await?,
        PARTITIONS as f64,
        "the new incarnation votes"
    );
    for m in &cluster.members {
        // Exactly one node-4 among the voters (the one that votes is the new raft id, above) and
        // the old incarnation is not even a learner any more.
        wait_status(m, "node-4 voting once, no learners", CONVERGE, |s| membership_is(s, &all, &BTreeSet::new()))
            .await?;
    }
    Ok(())
}

#[tokio::test]
async fn frozen_node_is_dropped_by_heartbeat_timeout_and_rejoins_when_resumed() -> anyhow::Result<()> {
    freeze_one_of_three(false).await
}

/// A frozen peer stops reading while the others keep writing to it (every committed entry is
/// relayed to every node): the links' writes block once the socket buffers are full, and only
/// their write deadline ends them; a blocked write must not keep the link "up" for TCP's ~15
/// minutes, nor let its queue grow without bound.
#[tokio::test]
async fn a_frozen_peer_under_load_is_dropped_by_the_write_deadline() -> anyhow::Result<()> {
    freeze_one_of_three(true).await
}

/// Publishes 16 KiB messages through `node` until aborted, reading what comes back so the
/// publisher itself is never a slow consumer.
async fn publish_load(node: &NodeProcess) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let mut client = chat_e2e::client::Client::connect(&format!("{}?name=loader", node.ws_url()), None).await?;
    client.expect_type("welcome", CONVERGE).await?;
    client.send_json(serde_json::json!({"type": "join", "room": "load", "id": "j"})).await?;
    client.recv_until("joined", CONVERGE).await?;
    let body = "x".repeat(16 * 1024 - 64);
    Ok(tokio::spawn(async move {
        for n in 0u64.. {
            let publish = serde_json::json!({"type": "publish", "room": "load", "id": n.to_string(), "body": body});
            if client.send_json(publish).await.is_err() {
                return;
            }
            while client.recv_json(Duration::from_millis(1)).await.is_ok() {}
        }
    }))
}

/// SIGSTOP keeps a node's sockets open but silent: the others must drop it within the peer
/// timeout (by heartbeat, or by write deadline when `load` makes their writes block), keep
/// quorum, and take the same incarnation back after SIGCONT.
async fn freeze_one_of_three(load: bool) -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let all = ids(&cluster.all());
    let (frozen, rest) = cluster.members.split_last().context("three nodes")?;
    let frozen_id = raft_id(&cluster_status(&frozen.node).await?)?;
    let loader = if load { Some(publish_load(&rest[0].node).await?) } else { None };
    let pid = frozen.node.pid().context("pid")? as libc::pid_t;
    let stopped = Instant::now();
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let result = async {
        let group: Vec<&Member> = rest.iter().collect();
        let took = wait_dropped(&group, &frozen.id, stopped).await?;
        let bound = Duration::from_millis(PEER_TIMEOUT_MS + 2 * HEARTBEAT_MS) + Duration::from_millis(500);
        ensure!(took <= bound, "SIGSTOP: dropped after {took:?}, expected within peer_timeout ({bound:?} with slack)");
        if !load {
            ensure!(
                took >= Duration::from_millis(PEER_TIMEOUT_MS) - Duration::from_millis(HEARTBEAT_MS),
                "dropped after {took:?}: before peer_timeout?"
            );
        }
        let survivors = ids(&group);
        for m in &group {
            let s = wait_status(m, "ready, every group led by a survivor", CONVERGE, |s| {
                s["ready"] == true && s["quorum"] == true && leaders_among(s, &survivors)
            })
            .await?;
            ensure!(membership_is(&s, &all, &BTreeSet::new()), "{}: the frozen voter keeps its slot: {s:#}", m.id);
            // The dropped link's queue went with it.
            let queued = metric_of(&m.node, "chat_peer_queued_frames").await?;
            ensure!(queued < 65_536.0, "{}: {queued} frames queued for peers", m.id);
        }
        if load {
            let written = metric_of(&rest[0].node, "chat_messages_committed_total").await?;
            ensure!(written > 100.0, "the load kept flowing while the peer was frozen: {written} messages");
            // Some link to the frozen node ended in a blocked write, not by its heartbeat.
            let blocked = group.iter().any(|m| {
                m.node.output().lines().any(|l| l.contains("peer link ended") && l.contains("write timed out"))
            });
            ensure!(blocked, "no link ended by its write deadline:\n{}", tail(&rest[0].node.output(), 30));
        }
        Ok(())
    }
    .await;
    if let Some(loader) = loader {
        loader.abort();
    }
    // SAFETY: as above; resume it whatever happened, so it can be killed cleanly.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    result?;
    wait_converged(&cluster.all(), 3).await?;
    // The same incarnation came back (it lost nothing), and votes everywhere again.
    let s = cluster_status(&frozen.node).await?;
    assert_eq!(raft_id(&s)?, frozen_id, "{s:#}");
    wait_metric_at_least(frozen, "chat_raft_groups_voting", PARTITIONS as f64).await?;
    for m in &cluster.members {
        let s = cluster_status(&m.node).await?;
        assert!(membership_is(&s, &all, &BTreeSet::new()), "{}: {s:#}", m.id);
    }
    Ok(())
}

// ---------- d. wrong secret ----------

/// A node that can never be ready (its secret is wrong): started without waiting for `/readyz`,
/// returned once it serves `/healthz`.
async fn start_intruder(cfg: &chat_node::config::NodeConfig) -> anyhow::Result<Member> {
    cfg.validate().context("the test's own config is invalid")?;
    let id = cfg.node_id.clone().unwrap_or_default();
    let mut node = NodeProcess::start_unready(&toml::to_string(cfg)?)?;
    let deadline = Instant::now() + CONVERGE;
    while node.http_get("/healthz").await.ok().map(|r| r.0) != Some(200) {
        ensure!(!node.has_exited(), "{id} exited:\n{}", node.output());
        ensure!(Instant::now() < deadline, "{id} does not serve /healthz:\n{}", node.output());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Ok(Member { id, node })
}

/// No node of `good` is linked to any of `intruders` nor lists them in a group, the good ones
/// keep their voters and readiness, and the intruders are linked to nobody, have no quorum,
/// belong to no group and are not ready.
async fn assert_kept_out(good: &[&Member], intruders: &[&Member]) -> anyhow::Result<()> {
    let bad: BTreeSet<String> = intruders.iter().map(|m| m.id.clone()).collect();
    let voters = ids(good);
    for m in good {
        let s = cluster_status(&m.node).await?;
        ensure!(member_ids(&s).is_disjoint(&bad), "{} accepted a node with the wrong secret: {s:#}", m.id);
        ensure!(membership_is(&s, &voters, &BTreeSet::new()), "{}: membership changed: {s:#}", m.id);
        ensure!(s["ready"] == true && s["quorum"] == true, "{}: {s:#}", m.id);
    }
    for m in intruders {
        let s = cluster_status(&m.node).await?;
        ensure!(member_ids(&s).is_empty(), "{} (wrong secret) linked to someone: {s:#}", m.id);
        ensure!(s["quorum"] == false && s["ready"] == false, "{} (wrong secret) alone: {s:#}", m.id);
        let in_groups =
            s["groups"].as_array().into_iter().flatten().any(|g| {
                !names(&g["voters"]).is_empty() || !names(&g["learners"]).is_empty() || !g["leader"].is_null()
            });
        ensure!(!in_groups, "{} (wrong secret) belongs to a room-log group: {s:#}", m.id);
        ensure!(m.node.http_get("/readyz").await?.0 == 503, "{} (wrong secret) is not ready", m.id);
    }
    Ok(())
}

#[tokio::test]
async fn nodes_with_a_wrong_secret_are_never_members() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    // Two intruders with their own secrets, claiming the voter slots of ordinals 0 and 1 (if
    // let in, they would replace node-2 and node-3 as voters): `node-0` sorts below everyone,
    // so it dials the others and they check its proof; `node-9` sorts above everyone, so the
    // others dial it and it checks theirs.
    cluster.dns.add_record(loopback(6));
    cluster.dns.add_record(loopback(7));
    let mut low_cfg = cluster.config("node-0", 6, "a-different-secret-0000000000");
    low_cfg.cluster.ordinal = Some(0);
    let mut high_cfg = cluster.config("node-9", 7, "yet-another-secret-9999999999");
    high_cfg.cluster.ordinal = Some(1);
    let low = start_intruder(&low_cfg).await?;
    let high = start_intruder(&high_cfg).await?;

    for m in &cluster.members {
        // Each good node rejects node-0's dials, and node-9 rejects its dials.
        wait_metric_at_least(m, "chat_peer_auth_failures_total", 2.0).await?;
    }
    // node-9 rejects every good node's dial (and node-0's).
    wait_metric_at_least(&high, "chat_peer_auth_failures_total", 3.0).await?;
    // node-0 sees its own dials refused.
    wait_metric_at_least(&low, "chat_peer_auth_failures_total", 1.0).await?;
    assert_kept_out(&cluster.all(), &[&low, &high]).await?;

    // Some more discovery rounds and redials later, still nobody let them in.
    futures_util::future::try_join_all(
        cluster.members.iter().map(|m| wait_metric_at_least(m, "chat_peer_auth_failures_total", 4.0)),
    )
    .await?;
    assert_kept_out(&cluster.all(), &[&low, &high]).await?;
    // The good nodes still form their cluster.
    wait_converged(&cluster.all(), 3).await?;
    for m in &cluster.members {
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} gauge", m.id);
    }
    for m in [&low, &high] {
        assert_eq!(metric_of(&m.node, "chat_peer_links_established_total").await?, 0.0, "{}: never linked", m.id);
    }
    cluster.members.extend([low, high]);
    Ok(())
}

/// A rotated cluster secret (a regenerated peer Secret) reaches each pod at its own moment:
/// nodes re-read their secret file, dial and accept with the new secret, and keep accepting the
/// previous one for a while. Every step below restarts a node whose copy of the secret is
/// behind or ahead of its peers', and the cluster must link up again each time.
#[tokio::test]
async fn a_rotated_cluster_secret_keeps_the_cluster_linked() -> anyhow::Result<()> {
    const OLD: &str = "the-old-cluster-secret-0123456789";
    const NEW: &str = "the-new-cluster-secret-9876543210";
    let files = tempfile::tempdir()?;
    let dir = files.path().to_owned();
    let write_key = |last: u8, key: &str| std::fs::write(dir.join(format!("node-{last}.key")), key);
    for last in 2..5 {
        write_key(last, OLD)?;
    }
    let key_dir = dir.clone();
    let mut cluster = LoopbackCluster::start_tuned(3, move |cfg| {
        cfg.cluster.secret = None;
        cfg.cluster.secret_file = Some(key_dir.join(format!("{}.key", cfg.node_id.as_deref().unwrap_or_default())));
    })
    .await?;
    wait_converged(&cluster.all(), 3).await?;
    let config = |cluster: &LoopbackCluster, last: u8| cluster.config(&format!("node-{last}"), last, SECRET);

    // Restarting node `last` with what its key file holds now; the others must take it back.
    async fn restart(
        cluster: &mut LoopbackCluster,
        index: usize,
        cfg: &chat_node::config::NodeConfig,
    ) -> anyhow::Result<()> {
        let node = &mut cluster.members[index].node;
        node.kill();
        node.wait_exit(CONVERGE).await?;
        cluster.members[index] = Member { id: cfg.node_id.clone().unwrap_or_default(), node: start(cfg).await? };
        wait_converged(&cluster.all(), 3).await
    }

    // node-3 sees the new secret first.
    write_key(3, NEW)?;
    wait_metric_at_least(&cluster.members[1], "chat_peer_secret_rotations_total", 1.0).await?;
    // node-2 (the lowest id: it dials everyone) comes back with the old secret only: node-3
    // accepts it as its previous one.
    let cfg = config(&cluster, 2);
    restart(&mut cluster, 0, &cfg).await.context("node-2 with the old secret dialing node-3 with the new one")?;
    // node-4 (the highest: everyone dials it) comes back with the old secret only: node-3's
    // dial with the new secret is refused, and it dials again with the previous one.
    let cfg = config(&cluster, 4);
    restart(&mut cluster, 2, &cfg).await.context("node-3 with the new secret dialing node-4 with the old one")?;

    // The rotation completes: every file holds the new secret, and a node started with only
    // the new one links with all.
    write_key(2, NEW)?;
    write_key(4, NEW)?;
    for index in [0, 2] {
        wait_metric_at_least(&cluster.members[index], "chat_peer_secret_rotations_total", 1.0).await?;
    }
    let cfg = config(&cluster, 3);
    restart(&mut cluster, 1, &cfg).await.context("node-3 with only the new secret")?;
    for m in &cluster.members {
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} linked to all", m.id);
    }
    Ok(())
}

/// A node whose dials are refused for a bad proof (close 4101) should see that in its own
/// `chat_peer_auth_failures_total`: the misconfigured pod is where an operator looks first.
#[tokio::test]
async fn a_node_with_a_wrong_secret_counts_auth_failures_itself() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(2).await?;
    wait_converged(&cluster.all(), 2).await?;
    cluster.dns.add_record(loopback(6));
    // The lowest id: it is always the dialer, and always refused.
    let cfg = cluster.config("node-0", 6, "a-different-secret-0000000000");
    let intruder = start_intruder(&cfg).await?;
    for m in &cluster.members {
        wait_metric_at_least(m, "chat_peer_auth_failures_total", 1.0).await?;
    }
    wait_metric_at_least(&intruder, "chat_peer_auth_failures_total", 1.0).await?;
    assert_kept_out(&cluster.all(), &[&intruder]).await?;
    Ok(())
}

// ---------- DNS failures ----------

fn lookup_failures(m: &Member) -> usize {
    m.node.output().lines().filter(|l| l.contains("peer lookup failed")).count()
}

/// Every node linked to exactly the others, ready with quorum, all of `voters` voting.
async fn assert_holding(group: &[&Member], voters: &BTreeSet<String>, when: &str) -> anyhow::Result<()> {
    let all = ids(group);
    for m in group {
        let s = cluster_status(&m.node).await?;
        let mut others = all.clone();
        others.remove(&m.id);
        ensure!(
            member_ids(&s) == others
                && s["ready"] == true
                && s["quorum"] == true
                && s["size"] == 3
                && membership_is(&s, voters, &BTreeSet::new()),
            "{when}: {} lost links, voters or readiness: {s:#}\n--- log tail ---\n{}",
            m.id,
            tail(&m.node.output(), 30)
        );
    }
    Ok(())
}

/// DNS only says where peers are: while every lookup fails (SERVFAIL on A and AAAA) the nodes
/// keep their links, voters and readiness; a node killed meanwhile leaves quorum to the other
/// two (the size comes from the config, not DNS); and restarted during the outage, when it
/// cannot resolve anyone itself, it is dialed by the others, which still know its address,
/// and replaces its old incarnation as a voter.
#[tokio::test]
async fn dns_servfail_does_not_matter_for_membership() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let all = ids(&cluster.all());

    let before: Vec<usize> = cluster.members.iter().map(lookup_failures).collect();
    let asked = cluster.dns.queries();
    cluster.dns.fail_queries(&[RecordType::A, RecordType::AAAA]);
    // Hold everything while each node has failed at least three lookups (one per second).
    let deadline = Instant::now() + CONVERGE;
    loop {
        assert_holding(&cluster.all(), &all, "during the DNS outage").await?;
        let failed: Vec<usize> = cluster.members.iter().zip(&before).map(|(m, b)| lookup_failures(m) - b).collect();
        if failed.iter().all(|f| *f >= 3) {
            // Every question since the outage began was answered SERVFAIL.
            ensure!(
                cluster.dns.queries() >= asked + 9,
                "{} questions during the outage",
                cluster.dns.queries() - asked
            );
            break;
        }
        ensure!(Instant::now() < deadline, "lookups did not fail as expected: {failed:?} new failures per node");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A crash during the outage: two of three voter slots keep quorum.
    let victim = cluster.members.pop().context("node-4")?;
    let old_id = raft_id(&cluster_status(&victim.node).await?)?;
    let cfg = cluster.config(&victim.id, 4, SECRET);
    victim.node.kill();
    drop(victim);
    let survivors = ids(&cluster.all());
    for m in &cluster.members {
        let s = wait_status(m, "alone with the other survivor, ready", CONVERGE, |s| {
            member_ids(s).len() == 1 && s["ready"] == true && leaders_among(s, &survivors)
        })
        .await?;
        ensure!(s["quorum"] == true && s["size"] == 3, "{}: {s:#}", m.id);
        ensure!(membership_is(&s, &all, &BTreeSet::new()), "{}: voters kept: {s:#}", m.id);
    }

    // Restarted while DNS still fails: its own lookups fail, the survivors dial it.
    let restarted_at = cluster.dns.queries();
    cluster.members.push(Member { id: cfg.node_id.clone().unwrap_or_default(), node: start(&cfg).await? });
    wait_converged(&cluster.all(), 3).await?;
    let reborn = &cluster.members[2];
    wait_status(reborn, "its own lookups failing", CONVERGE, |_| lookup_failures(reborn) >= 1).await?;
    ensure!(cluster.dns.queries() > restarted_at, "the restarted node asked DNS");
    let new_id = raft_id(&cluster_status(&reborn.node).await?)?;
    ensure!(new_id != old_id, "a new incarnation: {new_id}");
    for m in &cluster.members {
        wait_status(m, "node-4 voting once", CONVERGE, |s| membership_is(s, &all, &BTreeSet::new())).await?;
    }
    assert_holding(&cluster.all(), &all, "after the restart, DNS still failing").await?;

    // DNS recovers: nothing changes.
    cluster.dns.fail_queries(&[]);
    let asked = cluster.dns.queries();
    wait_status(&cluster.members[0], "asking DNS again", CONVERGE, |_| cluster.dns.queries() >= asked + 6).await?;
    assert_holding(&cluster.all(), &all, "after DNS recovered").await?;
    Ok(())
}

// ---------- e. port isolation ----------

#[tokio::test]
async fn each_port_serves_only_its_own_endpoints() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(1).await?;
    let node = &cluster.members[0].node;
    let client = node.addr();
    let peer = SocketAddr::new(client.ip(), cluster.ports.peer);

    // The client port never routes /peer, neither as plain GET nor as a WebSocket upgrade.
    let (status, _) = http_get(client, "/peer").await?;
    assert!(status == 404 || status == 400, "GET /peer on the client port: {status}");
    let status = handshake_status(&format!("ws://{client}/peer"), &[]).await;
    assert!(status == 404 || status == 400, "WebSocket /peer on the client port: {status}");
    // …while it serves the client endpoints, and nothing that tells rooms, peers or metrics.
    assert_eq!(http_get(client, "/healthz").await?.0, 200);
    assert_eq!(http_get(client, "/readyz").await?.0, 200);
    for path in ["/cluster", "/metrics"] {
        let (status, body) = http_get(client, path).await?;
        assert_eq!(status, 404, "GET {path} on the client port: {status} {body}");
    }

    // The admin port serves /metrics, /cluster and the probes, and no chat.
    let admin = node.admin_addr();
    for path in ["/cluster", "/metrics", "/healthz", "/readyz"] {
        assert_eq!(http_get(admin, path).await?.0, 200, "GET {path} on the admin port");
    }
    for path in ["/", "/ws", "/index.html", "/peer"] {
        assert_eq!(http_get(admin, path).await?.0, 404, "GET {path} on the admin port");
    }
    let status = handshake_status(&format!("ws://{admin}/ws"), &[("sec-websocket-protocol", "chat.v1")]).await;
    assert_eq!(status, 404, "client WebSocket on the admin port");

    // The peer port serves /peer (a WebSocket for peers only) and nothing else.
    for path in ["/", "/ws", "/healthz", "/readyz", "/metrics", "/cluster", "/index.html", "/peer/x", "/peers"] {
        let (status, body) = http_get(peer, path).await?;
        assert_eq!(status, 404, "GET {path} on the peer port: {status} {body}");
    }
    let status = handshake_status(&format!("ws://{peer}/ws"), &[("sec-websocket-protocol", "chat.v1")]).await;
    assert_eq!(status, 404, "client WebSocket on the peer port");
    let (status, _) = http_get(peer, "/peer").await?;
    assert_eq!(status, 400, "GET /peer without an upgrade");
    let status = handshake_status(&format!("ws://{peer}/peer"), &[]).await;
    assert_eq!(status, 101, "a WebSocket upgrade on /peer is accepted (authentication follows)");
    Ok(())
}

#[tokio::test]
async fn unauthenticated_peer_sockets_are_small_short_and_few() -> anyhow::Result<()> {
    use futures_util::StreamExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let cluster = LoopbackCluster::start(1).await?;
    let node = &cluster.members[0].node;

    // A frame announcing 1 MiB before authenticating, 100 KiB of it sent: the node cuts the
    // socket off after a few KiB instead of buffering on until the handshake deadline (5 s).
    let peer = SocketAddr::new(node.addr().ip(), cluster.ports.peer);
    let mut raw = tokio::net::TcpStream::connect(peer).await?;
    let upgrade = format!(
        "GET /peer HTTP/1.1\r\nHost: {peer}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    raw.write_all(upgrade.as_bytes()).await?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 4096 {
        raw.read_exact(&mut byte).await?;
        head.push(byte[0]);
    }
    ensure!(head.starts_with(b"HTTP/1.1 101"), "{}", String::from_utf8_lossy(&head));
    let mut frame = vec![0x81, 0x80 | 127];
    frame.extend_from_slice(&(1u64 << 20).to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend(std::iter::repeat_n(b'x', 100 * 1024));
    let _ = tokio::time::timeout(Duration::from_secs(2), raw.write_all(&frame)).await;
    let cut_off = tokio::time::timeout(Duration::from_secs(2), async {
        let mut sink = [0u8; 4096];
        while matches!(raw.read(&mut sink).await, Ok(n) if n > 0) {}
    })
    .await;
    ensure!(cut_off.is_ok(), "still reading a frame of 1 MiB from a peer that never authenticated");

    // Silent sockets take the handshake slots only until the handshake deadline (5 s).
    let url = format!("ws://{peer}/peer");
    let mut silent = Vec::new();
    for _ in 0..16 {
        silent.push(tokio_tungstenite::connect_async(url.as_str()).await?.0);
    }
    assert_eq!(handshake_status(&url, &[]).await, 503, "a 17th unauthenticated socket is refused");
    let started = Instant::now();
    let mut status = 0;
    while status != 101 && started.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(250)).await;
        status = handshake_status(&url, &[]).await;
    }
    assert_eq!(status, 101, "slots come back once the silent sockets' deadline passed");
    for mut socket in silent {
        let closed =
            tokio::time::timeout(Duration::from_secs(2), async { while let Some(Ok(_)) = socket.next().await {} })
                .await;
        ensure!(closed.is_ok(), "a silent socket outlived the handshake deadline");
    }
    assert_eq!(http_get(node.addr(), "/healthz").await?.0, 200);
    Ok(())
}

// ---------- f. partition ----------

#[tokio::test]
async fn partitioned_minority_loses_quorum_and_heals() -> anyhow::Result<()> {
    let cluster = NetnsCluster::start(3).await?;
    let (net, all) = (&cluster.net, cluster.all());
    let everyone = ids(&all);

    // Cut node-2 off (it is the acceptor of both its links).
    net.partition(2)?;
    let (isolated, majority) = all.split_last().context("three")?;
    let isolated_id = raft_id(&cluster_status(&isolated.node).await?)?;
    // The majority keeps two of three voter slots: quorum, ready, every group led on its side,
    // and the cut-off node keeps its voter slot.
    wait_converged_with(majority, 3, &everyone).await?;
    let majority_ids = ids(majority);
    for m in majority {
        let s = wait_status(m, "every group led in the majority", CONVERGE, |s| {
            s["ready"] == true && leaders_among(s, &majority_ids)
        })
        .await?;
        ensure!(s["quorum"] == true && membership_is(&s, &everyone, &BTreeSet::new()), "{}: {s:#}", m.id);
        assert_eq!(m.node.http_get("/readyz").await?.0, 200, "{} ready", m.id);
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 2.0, "{} gauge", m.id);
    }
    // The minority: alone, no quorum, not ready.
    wait_status(isolated, "alone without quorum, not ready", CONVERGE, |s| {
        member_ids(s).is_empty() && s["size"] == 3 && s["quorum"] == false && s["ready"] == false
    })
    .await?;
    assert_eq!(isolated.node.http_get("/readyz").await?.0, 503, "the minority is not ready");
    assert_eq!(metric_of(&isolated.node, "chat_cluster_members").await?, 1.0, "isolated gauge");
    // …and stays so while the majority works on.
    for m in majority {
        let s = cluster_status(&m.node).await?;
        ensure!(s["ready"] == true && s["quorum"] == true, "{}: {s:#}", m.id);
    }
    let s = cluster_status(&isolated.node).await?;
    ensure!(s["quorum"] == false && s["ready"] == false, "isolated: {s:#}");
    wait_metric(isolated, "chat_cluster_quorum", "0 on the minority", |v| v == 0.0).await?;

    // Cut node-0 too (the dialer of both its links): node-1 is alone as well, nobody has
    // quorum, nobody is ready.
    net.partition(0)?;
    for m in &all {
        wait_status(m, "alone without quorum, not ready", CONVERGE, |s| {
            member_ids(s).is_empty() && s["quorum"] == false && s["ready"] == false
        })
        .await?;
        assert_eq!(m.node.http_get("/readyz").await?.0, 503, "{} not ready", m.id);
    }

    net.heal(0)?;
    net.heal(2)?;
    wait_converged(&all, 3).await?;
    for m in &all {
        let s = wait_status(m, "every group led", CONVERGE, |s| leaders_among(s, &everyone)).await?;
        ensure!(membership_is(&s, &everyone, &BTreeSet::new()), "{}: {s:#}", m.id);
    }
    // The cut-off node was the same incarnation all along.
    assert_eq!(raft_id(&cluster_status(&isolated.node).await?)?, isolated_id);
    Ok(())
}
