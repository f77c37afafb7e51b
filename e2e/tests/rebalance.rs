//! Rebalancing with real processes (`chat-operator local`) and real WebSocket clients
//! (`chat_e2e::rebalance::Fleet`): a scale-out evens the connections out, each client moves at
//! most once and resumes exactly, and nothing moves during a rollout or while a node is lost.
//! Build the binaries first: `cargo build --workspace --bins`.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context, ensure};
use chat_e2e::client::http_get;
use chat_e2e::cluster::{JWT_SECRET, metric};
use chat_e2e::local::{LocalMode, chat_cluster, manifest_yaml};
use chat_e2e::rebalance::{Fleet, publish};
use serde_json::{Value, json};

const NAME: &str = "chat";
const TOLERANCE: u32 = 10;
/// The default rate, as the issue asks the test to run at.
const RATE: usize = 100;
/// Closes one node may send within a whole second: the rate, the fifth of a second it may burst
/// at a second's edge, and 5 % for timing the closes at the clients.
const MOST_PER_SECOND: usize = RATE + RATE / 5 + RATE / 20;
/// docs/cluster.md, "Rebalancing": 3 000 connections even out within this after a 3 → 5 scale-out.
const EVEN_WITHIN: Duration = Duration::from_secs(90);
const READY: Duration = Duration::from_secs(40);

/// One cluster at a time: the machine has two cores.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn manifest(replicas: u32, history_size: u32, extra: Value) -> String {
    let mut spec = json!({
        "config": {
            "history": {"size": history_size},
            "limits": {"max_connections": 20000, "publish_rate_per_sec": 1000, "publish_burst": 1000},
        },
        "auth": {"jwtSecretRef": {"name": "chat-jwt", "key": "jwt-secret"}},
        // Short waits, so the test is quick; the rate is the default.
        "rebalance": {"minConnectionAgeSeconds": 3, "cooldownSeconds": 2, "tolerancePercent": TOLERANCE},
    });
    if let (Some(spec), Value::Object(extra)) = (spec.as_object_mut(), extra) {
        spec.extend(extra);
    }
    let secret = json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "chat-jwt"},
        "stringData": {"jwt-secret": JWT_SECRET},
    });
    manifest_yaml(&[chat_cluster(NAME, replicas, spec), secret])
}

async fn shed_counter(lm: &LocalMode, ordinal: u32) -> f64 {
    match http_get(lm.admin_addr(ordinal), "/metrics").await {
        Ok((200, body)) => metric(&body, "chat_rebalance_connections_shed_total").unwrap_or(0.0),
        _ => 0.0,
    }
}

/// Stops the publisher, lets the subscribers get what it published last, stops them and checks
/// the books.
async fn finish(fleet: &Fleet, publisher: tokio::task::JoinHandle<()>) -> anyhow::Result<()> {
    fleet.stop_publishing();
    publisher.await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    fleet.stop();
    fleet.check()
}

/// Node 0 says every node is within the tolerance and no node is rebalancing.
async fn settled_even(lm: &LocalMode) -> bool {
    match cluster_view(lm, 0).await {
        Ok(view) => view["rebalance"]["even"] == true && view["rebalance"]["rebalancing"] == false,
        Err(_) => false,
    }
}

async fn cluster_view(lm: &LocalMode, ordinal: u32) -> anyhow::Result<Value> {
    let (code, body) = http_get(lm.admin_addr(ordinal), "/cluster").await?;
    ensure!(code == 200, "/cluster answered {code}");
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_out_evens_out_3000_connections_each_moved_at_most_once() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    // 3 000 clients need more than the default 1 024 descriptors, here and in the nodes.
    chat_e2e::raise_nofile();
    let dir = tempfile::tempdir()?;
    let mut lm = LocalMode::start(
        dir.path(),
        NAME,
        Ipv4Addr::new(127, 0, 10, 10),
        LocalMode::free_base_port(),
        &manifest(3, 1000, json!({})),
    )?;
    lm.wait_linked(3, READY).await?;
    let fleet = Fleet::new((0..3).map(|i| lm.addr(i)).collect(), 3000, 50);
    fleet.connect_all(500, Duration::from_secs(60)).await.map_err(|e| e.context(lm.report()))?;
    let publisher = tokio::spawn(publish(fleet.clone(), Duration::from_millis(20)));
    println!("3 000 clients on 3 nodes: {:?}", fleet.per_node());
    // An even cluster moves nobody, old connections or not.
    tokio::time::sleep(Duration::from_secs(6)).await;
    ensure!(fleet.moves_total() == 0, "{} clients moved off an even cluster", fleet.moves_total());

    lm.edit(&manifest(5, 1000, json!({})))?;
    let scaled = Instant::now();
    fleet.add_node(lm.addr(3));
    fleet.add_node(lm.addr(4));
    lm.wait_linked(5, READY).await?;
    println!("5 nodes linked after {:.1} s", scaled.elapsed().as_secs_f64());
    let deadline = scaled + EVEN_WITHIN;
    // Even as the clients count (every one connected) and as the nodes count (they also see the
    // publisher's connection, which can tip a count that sits on the tolerance's edge), with no
    // round running any more.
    while !fleet.even(TOLERANCE) || !settled_even(&lm).await {
        ensure!(
            Instant::now() < deadline,
            "not even {EVEN_WITHIN:?} after the scale-out: {:?}, {} connected\n{}",
            fleet.per_node(),
            fleet.connected(),
            lm.report()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let took = scaled.elapsed();
    println!(
        "even {:.1} s after the scale-out: {:?}, {} moves",
        took.as_secs_f64(),
        fleet.per_node(),
        fleet.moves_total()
    );
    // Nothing more moves once even.
    let moved = fleet.moves_total();
    tokio::time::sleep(Duration::from_secs(8)).await;
    ensure!(fleet.moves_total() == moved, "{} more moves after the cluster was even", fleet.moves_total() - moved);
    ensure!(fleet.even(TOLERANCE), "uneven again: {:?}", fleet.per_node());
    let view = cluster_view(&lm, 0).await?;
    ensure!(view["rebalance"]["hold"] == "balanced", "node 0 says {}", view["rebalance"]);
    // Local mode announces the rebalance as the operator does with Events.
    let output = lm.output();
    let started = output.find("event RebalanceStarted").context("no RebalanceStarted announced")?;
    let finished =
        output.find("event RebalanceFinished: connections are even").context("no RebalanceFinished announced")?;
    ensure!(started < finished, "announced in the wrong order");
    ensure!(lm.status()?["rebalancing"] == false, "status.json says {}", lm.status()?["rebalancing"]);

    finish(&fleet, publisher).await?;
    let acked = fleet.acked.lock().map(|a| a.len()).unwrap_or(0);
    ensure!(acked > 500, "only {acked} probe messages acked");
    // The closes per second stayed within the rate (plus the fifth of a second a node may burst).
    let worst = fleet.worst_second();
    ensure!(worst <= MOST_PER_SECOND, "a node closed {worst} connections within one second");
    // The nodes counted what the clients saw.
    let mut shed = 0.0;
    for ordinal in 0..5 {
        shed += shed_counter(&lm, ordinal).await;
    }
    ensure!(shed as usize == moved, "the nodes count {shed} connections shed, the clients saw {moved}");
    println!(
        "OK: {moved} moves, none twice, all resumed; {acked} probe messages, every one delivered once to 50 subscribers; worst second {worst} closes"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_moves_during_a_rollout_or_while_a_node_is_lost() -> anyhow::Result<()> {
    let _serial = SERIAL.lock().await;
    // 3 000 clients need more than the default 1 024 descriptors, here and in the nodes.
    chat_e2e::raise_nofile();
    let dir = tempfile::tempdir()?;
    // A pause between pods longer than the settling time: the revisions hold the shedding off.
    let rollout = json!({"rollout": {"minReadySeconds": 6}});
    let mut lm = LocalMode::start(
        dir.path(),
        NAME,
        Ipv4Addr::new(127, 0, 11, 10),
        LocalMode::free_base_port(),
        &manifest(3, 1000, rollout.clone()),
    )?;
    lm.wait_linked(3, READY).await?;
    // Every client on node 0: far above the mean, and old enough to move 3 s from now.
    let fleet = Fleet::new(vec![lm.addr(0)], 600, 20);
    fleet.connect_all(1000, Duration::from_secs(30)).await.map_err(|e| e.context(lm.report()))?;
    fleet.add_node(lm.addr(1));
    fleet.add_node(lm.addr(2));
    let publisher = tokio::spawn(publish(fleet.clone(), Duration::from_millis(50)));

    // A rollout: a config edit restarts the nodes one by one (2, 1, then 0).
    let before = lm.status()?["revision"].clone();
    lm.edit(&manifest(3, 1001, rollout.clone()))?;
    lm.wait_for("the new revision", Duration::from_secs(10), async |lm| {
        let status = lm.status()?;
        ensure!(status["revision"] != before, "still {before}");
        Ok(())
    })
    .await?;
    let started = Instant::now();
    let mut holds = std::collections::BTreeSet::new();
    lm.wait_for("the rollout", Duration::from_secs(90), async |lm| {
        if let Ok(view) = cluster_view(lm, 0).await
            && let Some(hold) = view["rebalance"]["hold"].as_str()
        {
            holds.insert(hold.to_owned());
        }
        ensure!(fleet.moves_total() == 0, "a client was moved during the rollout");
        let status = lm.status()?;
        let nodes = status["nodes"].as_array().context("nodes")?;
        ensure!(
            nodes.len() == 3 && nodes.iter().all(|n| n["ready"] == true && n["revision"] == status["revision"]),
            "rolling"
        );
        Ok(())
    })
    .await?;
    ensure!(fleet.moves_total() == 0, "{} clients were moved during the rollout", fleet.moves_total());
    println!("rollout took {:.1} s, no client moved; node 0 held for {holds:?}", started.elapsed().as_secs_f64());
    ensure!(holds.contains("rolling"), "node 0 never saw the revisions differ: {holds:?}");

    // Node 0 drained last: its clients went to the others. Put them back on node 0 for the next
    // part: a fresh fleet there, every client old by the time node 2 is lost.
    finish(&fleet, publisher).await?;
    lm.wait_linked(3, READY).await?;
    let fleet = Fleet::new(vec![lm.addr(0)], 600, 20);
    fleet.connect_all(1000, Duration::from_secs(30)).await.map_err(|e| e.context(lm.report()))?;
    fleet.add_node(lm.addr(1));
    let pids = lm.pids()?;
    let lost = *pids.get(&2).context("node 2's pid")?;
    // SAFETY: plain syscall on a node process of this test.
    unsafe { libc::kill(lost as libc::pid_t, libc::SIGSTOP) };
    let frozen = Instant::now();
    let mut seen = std::collections::BTreeSet::new();
    while frozen.elapsed() < Duration::from_secs(10) {
        if let Ok(view) = cluster_view(&lm, 0).await
            && let Some(hold) = view["rebalance"]["hold"].as_str()
        {
            seen.insert(hold.to_owned());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let moved_while_lost = fleet.moves_total();
    // SAFETY: as above.
    unsafe { libc::kill(lost as libc::pid_t, libc::SIGCONT) };
    ensure!(
        moved_while_lost == 0,
        "{moved_while_lost} clients were moved while node 2 was lost (node 0 held for {seen:?})"
    );
    ensure!(seen.contains("members_missing"), "node 0 never missed node 2: {seen:?}");
    // Once node 2 is back, node 0 does shed (this run could have seen it), at the rate.
    fleet.add_node(lm.addr(2));
    let back = Instant::now();
    while fleet.moves_total() == 0 {
        ensure!(back.elapsed() < Duration::from_secs(30), "node 0 never shed after node 2 came back\n{}", lm.report());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !fleet.even(TOLERANCE) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    fleet.stop();
    let worst = fleet.worst_second();
    ensure!(worst <= MOST_PER_SECOND, "node 0 closed {worst} connections within one second");
    fleet.check()?;
    println!(
        "node lost 10 s: none moved (holds {seen:?}); back: {} moved, worst second {worst}, {:?}",
        fleet.moves_total(),
        fleet.per_node()
    );
    Ok(())
}
