//! Cluster membership across real `chat-node` processes: DNS discovery through a real DNS server
//! (`chat_e2e::dns`), scale up and down, crashes, a wrong cluster secret, the peer port's
//! isolation, and a network partition between hosts in network namespaces (`chat_e2e::netns`).
//!
//! No fixed sleeps: every expectation is polled on `/cluster` (or `/metrics`) against a bounded
//! deadline. Nodes run with `discovery_interval_secs = 1`, `heartbeat_ms = 100`,
//! `peer_timeout_ms = 600`, so each test takes a few seconds.
//!
//! The loopback tests put the nodes on 127.0.0.2, .3, … (one client port and one peer port per
//! test, the same on every node, as in Kubernetes). The partition test needs root for network
//! namespaces. Build the binary first: `cargo build -p chat-node`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::client::{handshake_status, http_get};
use chat_e2e::cluster::*;
use chat_e2e::dns::RecordType;

// ---------- a. discovery ----------

#[tokio::test]
async fn three_nodes_discover_each_other_through_dns() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    for m in &cluster.members {
        let status = cluster_status(&m.node).await?;
        assert_eq!(status["node_id"], m.id.as_str());
        assert_eq!(status["ready"], true, "{status:#}");
        let members = status["members"].as_array().context("members")?;
        for member in members {
            let addr: SocketAddr = member["addr"].as_str().context("member addr")?.parse()?;
            assert_eq!(addr.port(), cluster.ports.peer, "peers are reached on the peer port: {member}");
            assert!(member["linked_for_ms"].is_u64() && member["rtt_ms"].is_number(), "{member}");
            assert!(member["queued_frames"].is_u64() && member["synced"] == true, "link lag and sync: {member}");
        }
        assert_eq!(m.node.http_get("/readyz").await?.0, 200, "{} ready", m.id);
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} gauge", m.id);
        assert!(metric_of(&m.node, "chat_peer_links_established_total").await? >= 2.0, "{} links", m.id);
        assert_eq!(metric_of(&m.node, "chat_peer_auth_failures_total").await?, 0.0, "{} auth failures", m.id);
    }
    assert!(cluster.dns.queries() > 0, "the nodes asked the test DNS server");
    Ok(())
}

// ---------- b. scale up and down ----------

#[tokio::test]
async fn scale_up_to_four_and_back_to_three() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    // Scale up: the StatefulSet's new pod is published in DNS, then starts.
    cluster.dns.add_record(loopback(5));
    let cfg = cluster.config("node-5", 5, SECRET);
    let fourth = Member { id: "node-5".into(), node: start(&cfg).await? };
    cluster.members.push(fourth);
    wait_converged(&cluster.all(), 4).await?;
    for m in &cluster.members {
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 4.0, "{} gauge", m.id);
    }

    // Scale down: the pod goes away and its endpoint leaves DNS.
    let mut gone = cluster.members.pop().context("the fourth node")?;
    gone.node.kill();
    gone.node.wait_exit(Duration::from_secs(5)).await?;
    cluster.dns.remove_record(loopback(5));
    wait_converged(&cluster.all(), 3).await?;
    for m in &cluster.members {
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} gauge", m.id);
        let status = cluster_status(&m.node).await?;
        let discovered = status["discovered"].to_string();
        assert!(!discovered.contains("127.0.0.5"), "{}: forgot the removed node: {discovered}", m.id);
    }
    Ok(())
}

// ---------- c. crash and restart ----------

/// Waits until every node of `group` has dropped `gone` from its members, and returns how long
/// that took from `since`.
async fn wait_dropped(group: &[&Member], gone: &str, since: Instant) -> anyhow::Result<Duration> {
    for m in group {
        wait_status(m, &format!("without {gone}"), CONVERGE, |s| !member_ids(s).contains(gone)).await?;
    }
    Ok(since.elapsed())
}

#[tokio::test]
async fn killed_node_is_dropped_within_peer_timeout_and_rejoins_after_restart() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    let victim = cluster.members.pop().context("node-4")?;
    let cfg = cluster.config(&victim.id, 4, SECRET);
    let killed = Instant::now();
    victim.node.kill();
    let took = wait_dropped(&cluster.all(), &victim.id, killed).await?;
    let bound = Duration::from_millis(PEER_TIMEOUT_MS) + Duration::from_millis(500);
    assert!(took <= bound, "kill -9: dropped after {took:?}, expected within peer_timeout ({bound:?} with slack)");
    for m in &cluster.members {
        // Still in DNS, so still known: 2 of 3 keep quorum.
        let s = cluster_status(&m.node).await?;
        assert_eq!(s["known_size"], 3, "{}: {s:#}", m.id);
        assert_eq!(s["quorum"], true, "{}: {s:#}", m.id);
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 2.0, "{} gauge", m.id);
    }
    drop(victim);

    // Restart on the same address: it rejoins.
    cluster.members.push(Member { id: cfg.node_id.clone().unwrap_or_default(), node: start(&cfg).await? });
    wait_converged(&cluster.all(), 3).await?;
    Ok(())
}

#[tokio::test]
async fn frozen_node_is_dropped_by_heartbeat_timeout_and_rejoins_when_resumed() -> anyhow::Result<()> {
    // SIGSTOP keeps the node's sockets open but silent: only the heartbeat timeout can notice.
    let cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let (frozen, rest) = cluster.members.split_last().context("three nodes")?;
    let pid = frozen.node.pid().context("pid")? as libc::pid_t;
    let stopped = Instant::now();
    // SAFETY: signals our own child.
    unsafe { libc::kill(pid, libc::SIGSTOP) };
    let result = async {
        let group: Vec<&Member> = rest.iter().collect();
        let took = wait_dropped(&group, &frozen.id, stopped).await?;
        let bound = Duration::from_millis(PEER_TIMEOUT_MS + 2 * HEARTBEAT_MS) + Duration::from_millis(500);
        ensure!(took <= bound, "SIGSTOP: dropped after {took:?}, expected within peer_timeout ({bound:?} with slack)");
        ensure!(
            took >= Duration::from_millis(PEER_TIMEOUT_MS) - Duration::from_millis(HEARTBEAT_MS),
            "dropped after {took:?}: before peer_timeout?"
        );
        Ok(())
    }
    .await;
    // SAFETY: as above; resume it whatever happened, so it can be killed cleanly.
    unsafe { libc::kill(pid, libc::SIGCONT) };
    result?;
    wait_converged(&cluster.all(), 3).await?;
    Ok(())
}

// ---------- d. wrong secret ----------

async fn wait_metric_at_least(m: &Member, name: &str, min: f64) -> anyhow::Result<f64> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let value = metric_of(&m.node, name).await?;
        if value >= min {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("{}: {name} is {value}, expected ≥ {min}\n--- log tail ---\n{}", m.id, tail(&m.node.output(), 40));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Asserts no node of `all` lists any of `intruders` (nor they anyone).
async fn assert_not_members(all: &[&Member], intruders: &[&Member]) -> anyhow::Result<()> {
    let bad: BTreeSet<String> = intruders.iter().map(|m| m.id.clone()).collect();
    for m in all {
        let s = cluster_status(&m.node).await?;
        let ids = member_ids(&s);
        ensure!(ids.is_disjoint(&bad), "{} accepted a node with the wrong secret: {s:#}", m.id);
    }
    for m in intruders {
        let s = cluster_status(&m.node).await?;
        ensure!(member_ids(&s).is_empty(), "{} (wrong secret) linked to someone: {s:#}", m.id);
        ensure!(
            s["quorum"] == false,
            "{} (wrong secret) alone among {} known has no quorum: {s:#}",
            m.id,
            s["known_size"]
        );
    }
    Ok(())
}

#[tokio::test]
async fn nodes_with_a_wrong_secret_are_never_members() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    // Two intruders with their own secrets: `node-0` sorts below everyone, so it dials the
    // others and they check its proof; `node-9` sorts above everyone, so the others dial it and
    // it checks theirs.
    cluster.dns.add_record(loopback(6));
    cluster.dns.add_record(loopback(7));
    let low_cfg = cluster.config("node-0", 6, "a-different-secret-0000000000");
    let high_cfg = cluster.config("node-9", 7, "yet-another-secret-9999999999");
    let (low, high) = tokio::try_join!(start(&low_cfg), start(&high_cfg))?;
    let low = Member { id: "node-0".into(), node: low };
    let high = Member { id: "node-9".into(), node: high };

    for m in &cluster.members {
        // Each good node rejects node-0's dials.
        wait_metric_at_least(m, "chat_peer_auth_failures_total", 1.0).await?;
        assert_not_members(&cluster.all(), &[&low, &high]).await?;
    }
    // node-9 rejects every good node's dial (and node-0's).
    wait_metric_at_least(&high, "chat_peer_auth_failures_total", 3.0).await?;

    // Some more discovery rounds and redials later, still nobody let them in.
    let more: Vec<f64> = futures_util::future::try_join_all(
        cluster.members.iter().map(|m| wait_metric_at_least(m, "chat_peer_auth_failures_total", 2.0)),
    )
    .await?;
    assert!(more.iter().all(|v| *v >= 2.0));
    assert_not_members(&cluster.all(), &[&low, &high]).await?;
    // The good nodes still form their cluster (the intruders count as known: 3 of 5 is quorum).
    wait_converged(&cluster.all(), 5).await?;
    for m in &cluster.members {
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 3.0, "{} gauge", m.id);
    }
    cluster.members.extend([low, high]);
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
    let intruder = Member { id: "node-0".into(), node: start(&cfg).await? };
    for m in &cluster.members {
        wait_metric_at_least(m, "chat_peer_auth_failures_total", 1.0).await?;
    }
    wait_metric_at_least(&intruder, "chat_peer_auth_failures_total", 1.0).await?;
    assert_not_members(&cluster.all(), &[&intruder]).await?;
    Ok(())
}

// ---------- DNS failures ----------

/// A DNS server that fails (SERVFAIL) must not make a node forget the peers it knows: the
/// lookup failed, so the node keeps the set it had, and a lone survivor of three has no quorum.
#[tokio::test]
async fn dns_servfail_does_not_shrink_the_known_size() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    // The A question fails; AAAA still gets its (empty) NOERROR answer.
    cluster.dns.fail_queries(&[RecordType::A]);
    let others: Vec<Member> = cluster.members.drain(1..).collect();
    for m in &others {
        m.node.kill();
    }
    let survivor = &cluster.members[0];
    wait_status(survivor, "alone", CONVERGE, |s| member_ids(s).is_empty()).await?;
    // A few discovery rounds (A + AAAA each) after the links died.
    let asked = cluster.dns.queries();
    let deadline = Instant::now() + CONVERGE;
    while cluster.dns.queries() < asked + 2 * 2 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = cluster_status(&survivor.node).await?;
    ensure!(
        s["known_size"] == 3 && s["quorum"] == false,
        "after SERVFAIL on A, {} should still know 3 nodes and have no quorum (1 of 3); got {s:#}",
        survivor.id
    );

    // DNS recovers: still 3 known, still alone.
    cluster.dns.fail_queries(&[]);
    let s = wait_status(survivor, "knowing 3 again", CONVERGE, |s| s["known_size"] == 3).await?;
    ensure!(s["quorum"] == false, "{s:#}");
    Ok(())
}

// ---------- e. port isolation ----------

#[tokio::test]
async fn peer_endpoint_only_on_the_peer_port() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(1).await?;
    let node = &cluster.members[0].node;
    let client = node.addr();
    let peer = SocketAddr::new(client.ip(), cluster.ports.peer);

    // The client port never routes /peer, neither as plain GET nor as a WebSocket upgrade.
    let (status, _) = http_get(client, "/peer").await?;
    assert!(status == 404 || status == 400, "GET /peer on the client port: {status}");
    let status = handshake_status(&format!("ws://{client}/peer"), &[]).await;
    assert!(status == 404 || status == 400, "WebSocket /peer on the client port: {status}");
    // …while it serves the client endpoints.
    assert_eq!(http_get(client, "/healthz").await?.0, 200);
    assert_eq!(http_get(client, "/cluster").await?.0, 200);

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

// ---------- f. partition ----------

#[tokio::test]
async fn partitioned_minority_loses_quorum_and_heals() -> anyhow::Result<()> {
    let cluster = NetnsCluster::start(3).await?;
    let (net, all) = (&cluster.net, cluster.all());

    // Cut node-2 off (it is the acceptor of both its links).
    net.partition(2)?;
    let (isolated, majority) = all.split_last().context("three")?;
    wait_converged(majority, 3).await?;
    wait_status(isolated, "alone without quorum", CONVERGE, |s| {
        member_ids(s).is_empty() && s["known_size"] == 3 && s["quorum"] == false
    })
    .await?;
    for m in majority {
        assert_eq!(metric_of(&m.node, "chat_cluster_members").await?, 2.0, "{} gauge", m.id);
    }
    assert_eq!(metric_of(&isolated.node, "chat_cluster_members").await?, 1.0, "isolated gauge");

    // Cut node-0 too (the dialer of both its links): node-1 is alone as well.
    net.partition(0)?;
    for m in &all {
        wait_status(m, "alone without quorum", CONVERGE, |s| member_ids(s).is_empty() && s["quorum"] == false).await?;
    }

    net.heal(0)?;
    net.heal(2)?;
    wait_converged(&all, 3).await?;
    Ok(())
}
