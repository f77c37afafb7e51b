//! Rooms shared by real `chat-node` processes: one order per room on every node, acks only
//! after commit, resume through any node, presence and sessions across nodes, and what happens
//! on rolling restarts, crashes, partitions, scaling and forged peer traffic. Nodes find each
//! other through the test DNS server (`chat_e2e::dns`); clients are real WebSocket clients.
//! Each room lives in one Raft group (`group_of(room, partitions)`), sequenced by that group's
//! leader.
//!
//! Every expectation is polled against a bounded deadline; there are no fixed sleeps in the
//! assertions. Build the binaries first: `cargo build --workspace --bins`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::NodeProcess;
use chat_e2e::client::Client;
use chat_e2e::cluster::*;
use chat_node::replication::types::group_of;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

const WAIT: Duration = Duration::from_secs(15);
/// `cluster.partitions` of the test nodes (the default).
const PARTITIONS: u32 = 8;

/// A chat client that records what it receives: messages by offset, acks by request id.
struct Chatter {
    name: String,
    client: Client,
    session: String,
    user_id: String,
    messages: BTreeMap<u64, String>,
    /// Deliveries in arrival order, to check order and duplicates.
    arrivals: Vec<u64>,
    acks: HashMap<String, u64>,
    errors: Vec<Value>,
    epoch: Option<String>,
    presence_events: Vec<(String, String)>,
}

impl Chatter {
    async fn connect(node: &NodeProcess, name: &str) -> anyhow::Result<Chatter> {
        Self::connect_url(&format!("{}?name={name}", node.ws_url()), name, None).await
    }

    /// Connects as user `name` with a token (clusters started with `start_jwt`).
    async fn connect_as(node: &NodeProcess, name: &str) -> anyhow::Result<Chatter> {
        Self::connect_url(&node.ws_url(), name, Some(&user_token(name))).await
    }

    async fn connect_url(url: &str, name: &str, token: Option<&str>) -> anyhow::Result<Chatter> {
        Self::from_client(Client::connect(url, token).await?, name).await
    }

    async fn from_client(mut client: Client, name: &str) -> anyhow::Result<Chatter> {
        let welcome = client.expect_type("welcome", WAIT).await?;
        Ok(Chatter {
            name: name.to_owned(),
            client,
            session: welcome["session_id"].as_str().unwrap_or_default().to_owned(),
            user_id: welcome["user"]["id"].as_str().unwrap_or_default().to_owned(),
            messages: BTreeMap::new(),
            arrivals: Vec::new(),
            acks: HashMap::new(),
            errors: Vec::new(),
            epoch: None,
            presence_events: Vec::new(),
        })
    }

    fn record(&mut self, frame: &Value) -> anyhow::Result<()> {
        match frame["type"].as_str() {
            Some("message") => {
                let offset = frame["offset"].as_u64().context("offset")?;
                self.epoch = frame["epoch"].as_str().map(str::to_owned);
                self.arrivals.push(offset);
                self.messages.insert(offset, frame["body"].as_str().unwrap_or_default().to_owned());
            }
            Some("ack") => {
                let id = frame["id"].as_str().unwrap_or_default().to_owned();
                self.acks.insert(id, frame["offset"].as_u64().context("ack offset")?);
            }
            Some("error") => self.errors.push(frame.clone()),
            Some("joined") => self.epoch = frame["epoch"].as_str().map(str::to_owned),
            Some(kind @ ("user_joined" | "user_left")) => {
                self.presence_events.push((kind.to_owned(), frame["user"]["name"].as_str().unwrap_or("").to_owned()));
            }
            _ => {}
        }
        Ok(())
    }

    /// Reads frames until `done` holds (true at once if it already does).
    async fn pump_until(&mut self, what: &str, done: impl Fn(&Chatter) -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + WAIT;
        while !done(self) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self
                .client
                .recv_json(left)
                .await
                .with_context(|| format!("{}: waiting for {what}; errors so far {:?}", self.name, self.errors))?;
            self.record(&frame)?;
        }
        Ok(())
    }

    async fn join(&mut self, room: &str, since: Option<(String, u64)>) -> anyhow::Result<Value> {
        let mut frame = json!({"type": "join", "id": format!("join-{room}"), "room": room});
        if let Some((epoch, offset)) = since {
            frame["since"] = json!({"epoch": epoch, "offset": offset});
        }
        self.client.send_json(frame).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.client.recv_json(left).await.with_context(|| format!("{}: joined {room}", self.name))?;
            self.record(&frame)?;
            match frame["type"].as_str() {
                Some("joined") => return Ok(frame),
                Some("error") => bail!("{}: join {room} failed: {frame}", self.name),
                _ => {}
            }
        }
    }

    async fn publish(&mut self, room: &str, id: &str, body: &str) -> anyhow::Result<()> {
        self.client.send_json(json!({"type": "publish", "id": id, "room": room, "body": body})).await
    }

    /// Sends a request and reads until its answer of `kind` (same id), recording whatever else
    /// arrives meanwhile.
    async fn request(&mut self, request: Value, kind: &str) -> anyhow::Result<Value> {
        let id = request["id"].clone();
        self.client.send_json(request).await?;
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame =
                self.client.recv_json(left).await.with_context(|| format!("{}: waiting for {kind}", self.name))?;
            if frame["type"] == kind && frame["id"] == id {
                return Ok(frame);
            }
            if frame["type"] == "error" && frame["id"] == id {
                bail!("{}: {kind} refused: {frame}", self.name);
            }
            self.record(&frame)?;
        }
    }

    /// Names of the users present in `room`, as this connection's node answers.
    async fn presence_names(&mut self, room: &str) -> anyhow::Result<Vec<String>> {
        let presence = self.request(json!({"type": "presence", "id": "p", "room": room}), "presence").await?;
        let users = presence["users"].as_array().with_context(|| format!("users in {presence}"))?;
        Ok(users.iter().filter_map(|u| u["name"].as_str().map(str::to_owned)).collect())
    }

    /// Bodies of the room's history, as this connection's node answers.
    async fn history_bodies(&mut self, room: &str) -> anyhow::Result<Vec<String>> {
        Ok(self.history_all(room).await?.into_iter().map(|(_, body)| body).collect())
    }

    /// The room's whole history on this connection's node, as (offset, body), read in pages.
    async fn history_all(&mut self, room: &str) -> anyhow::Result<Vec<(u64, String)>> {
        let first = self.request(json!({"type": "history", "id": "h0", "room": room, "limit": 1}), "history").await?;
        let epoch = first["epoch"].as_str().context("history epoch")?.to_owned();
        let mut all = Vec::new();
        let mut after = 0;
        for page in 1.. {
            let request = json!({"type": "history", "id": format!("h{page}"), "room": room, "limit": 500,
                "since": {"epoch": epoch, "offset": after}});
            let history = self.request(request, "history").await?;
            ensure!(history["epoch"] == epoch.as_str(), "{}: the epoch changed while paging: {history}", self.name);
            let messages = history["messages"].as_array().with_context(|| format!("messages in {history}"))?;
            if messages.is_empty() {
                break;
            }
            for m in messages {
                let offset = m["offset"].as_u64().context("history offset")?;
                all.push((offset, m["body"].as_str().unwrap_or_default().to_owned()));
                after = offset;
            }
        }
        Ok(all)
    }

    /// The room's whole history once this node has applied it up to `offset` (an ack only
    /// says it was applied on the publisher's node).
    async fn history_through(&mut self, room: &str, offset: u64) -> anyhow::Result<Vec<(u64, String)>> {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        loop {
            let last =
                self.request(json!({"type": "history", "id": "hl", "room": room, "limit": 1}), "history").await?;
            let at = last["messages"][0]["offset"].as_u64().unwrap_or(0);
            if at >= offset {
                return self.history_all(room).await;
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "{}: history of {room} stays at {at}, below {offset}",
                self.name
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Messages received so far, in offset order, as (offset, body).
    fn log(&self) -> Vec<(u64, String)> {
        self.messages.iter().map(|(o, b)| (*o, b.clone())).collect()
    }

    fn assert_in_order_once(&self) -> anyhow::Result<()> {
        ensure!(
            self.arrivals.windows(2).all(|w| w[0] < w[1]),
            "{}: deliveries out of order or duplicated: {:?}",
            self.name,
            self.arrivals
        );
        Ok(())
    }
}

// ---------- reading /cluster ----------

/// The name of the leader of `room`'s group, once every node of `members` agrees on it and the
/// leader itself says it leads; with its index in `members`.
async fn leader_of(members: &[Member], room: &str) -> anyhow::Result<(usize, String)> {
    let group = group_of(room, PARTITIONS) as usize;
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let mut seen = Vec::new();
        for m in members {
            let s = cluster_status(&m.node).await?;
            seen.push((s["groups"][group]["leader"].as_str().map(str::to_owned), s["groups"][group]["role"].clone()));
        }
        if let Some(Some(leader)) = seen.first().map(|s| s.0.clone())
            && seen.iter().all(|s| s.0.as_deref() == Some(leader.as_str()))
            && let Some(i) = members.iter().position(|m| m.id == leader)
            && seen[i].1 == "leader"
        {
            return Ok((i, leader));
        }
        ensure!(tokio::time::Instant::now() < deadline, "no agreed leader of group {group} ({room}): {seen:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until every node of `group` sees a leader of `room`'s group among `group`.
async fn wait_room_led_within(group: &[&Member], room: &str) -> anyhow::Result<()> {
    let g = group_of(room, PARTITIONS) as usize;
    let names: BTreeSet<String> = group.iter().map(|m| m.id.clone()).collect();
    for m in group {
        wait_status(m, &format!("group {g} led by one of {names:?}"), CONVERGE, |s| {
            s["groups"][g]["leader"].as_str().is_some_and(|l| names.contains(l))
        })
        .await?;
    }
    Ok(())
}

/// Every node's history of `room` holds every acked message at its offset, offsets run 1, 2, …
/// without gaps, and no body is stored twice.
async fn assert_histories(group: &[&Member], room: &str, acked: &BTreeMap<u64, String>) -> anyhow::Result<()> {
    for m in group {
        let mut probe = Chatter::connect(&m.node, "auditor").await?;
        probe.join(room, None).await?;
        let top = acked.keys().next_back().copied().unwrap_or(0);
        let history = probe.history_through(room, top).await?;
        ensure!(
            history.iter().map(|(o, _)| *o).eq(1..=history.len() as u64),
            "{}: history offsets are not 1..={}: {:?}",
            m.id,
            history.len(),
            history.iter().map(|(o, _)| o).collect::<Vec<_>>()
        );
        let stored: BTreeMap<u64, &String> = history.iter().map(|(o, b)| (*o, b)).collect();
        for (offset, body) in acked {
            ensure!(
                stored.get(offset) == Some(&body),
                "{}: acked {body:?} at offset {offset} is missing from history (found {:?})",
                m.id,
                stored.get(offset)
            );
        }
        let mut bodies = BTreeSet::new();
        for (offset, body) in &history {
            ensure!(bodies.insert(body), "{}: {body:?} stored twice (again at {offset})", m.id);
        }
        probe.client.close().await;
    }
    Ok(())
}

// ---------- a. one order everywhere ----------

#[tokio::test]
async fn clients_on_three_nodes_chat_with_one_order_and_offsets() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    let mut chatters = Vec::new();
    for (i, m) in cluster.members.iter().enumerate() {
        let mut c = Chatter::connect(&m.node, &format!("user{i}")).await?;
        let joined = c.join("lobby", None).await?;
        ensure!(joined["offset"] == 0, "a new room starts at offset 0: {joined}");
        chatters.push(c);
    }
    let epochs: Vec<Option<String>> = chatters.iter().map(|c| c.epoch.clone()).collect();
    ensure!(epochs.iter().all(|e| e.is_some() && *e == epochs[0]), "one epoch on every node: {epochs:?}");

    const PER_CLIENT: usize = 20;
    for round in 0..PER_CLIENT {
        for (i, c) in chatters.iter_mut().enumerate() {
            c.publish("lobby", &format!("p{round}"), &format!("from user{i} #{round}")).await?;
        }
    }
    let total = (PER_CLIENT * chatters.len()) as u64;
    for c in &mut chatters {
        c.pump_until("every message and ack", |c| c.messages.len() as u64 >= total && c.acks.len() >= PER_CLIENT)
            .await?;
        ensure!(c.errors.is_empty(), "{}: errors {:?}", c.name, c.errors);
        c.assert_in_order_once()?;
    }
    let reference = chatters[0].log();
    ensure!(
        reference.iter().map(|(o, _)| *o).eq(1..=total),
        "offsets are 1..={total} without gaps: {:?}",
        reference.iter().map(|(o, _)| o).collect::<Vec<_>>()
    );
    for c in &chatters[1..] {
        ensure!(c.log() == reference, "{} saw another order than {}", c.name, chatters[0].name);
    }
    // Each ack names the offset its message got.
    for (i, c) in chatters.iter().enumerate() {
        for round in 0..PER_CLIENT {
            let offset = c.acks[&format!("p{round}")];
            ensure!(
                reference[(offset - 1) as usize].1 == format!("from user{i} #{round}"),
                "ack of p{round} by user{i}"
            );
        }
    }
    // Messages from one client keep its order.
    for i in 0..chatters.len() {
        let mine: Vec<&String> =
            reference.iter().map(|(_, b)| b).filter(|b| b.starts_with(&format!("from user{i} "))).collect();
        let expected: Vec<String> = (0..PER_CLIENT).map(|r| format!("from user{i} #{r}")).collect();
        ensure!(mine.iter().map(|s| s.as_str()).eq(expected.iter().map(String::as_str)), "user{i}'s order");
    }
    Ok(())
}

/// A room nobody uses for `history.empty_room_ttl_secs` ends its stream on every node through
/// the log (so `max_rooms` is not used up by rooms of the past), and restarts with a new epoch
/// that every node agrees on. A room with a subscriber on any node is kept, even on nodes
/// where nobody is in it.
#[tokio::test]
async fn idle_rooms_are_forgotten_on_every_node_and_restart_with_a_new_epoch() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start_tuned(3, |cfg| cfg.history.empty_room_ttl_secs = 1).await?;
    wait_converged(&cluster.all(), 3).await?;
    let nodes = &cluster.members;

    let mut watcher = Chatter::connect(&nodes[1].node, "watcher").await?;
    watcher.join("watched", None).await?;
    watcher.publish("watched", "w1", "kept").await?;
    watcher.pump_until("the ack of w1", |c| c.acks.contains_key("w1")).await?;
    let watched_epoch = watcher.epoch.clone().context("watched epoch")?;

    let mut alice = Chatter::connect(&nodes[0].node, "alice").await?;
    alice.join("idle", None).await?;
    alice.publish("idle", "a1", "one").await?;
    alice.publish("idle", "a2", "two").await?;
    alice.pump_until("both acks", |c| c.acks.len() == 2).await?;
    let old_epoch = alice.epoch.clone().context("idle epoch")?;
    alice.client.close().await;

    // Only "watched" stays, on every node (the gauge is read at each scrape).
    for m in nodes {
        let deadline = Instant::now() + CONVERGE;
        loop {
            let rooms = metric_of(&m.node, "chat_rooms").await?;
            if rooms == 1.0 {
                break;
            }
            ensure!(Instant::now() < deadline, "{}: still {rooms} rooms", m.id);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // Back through another node: the old position is not recovered, and the new stream starts
    // at offset 1 with one new epoch everywhere.
    let mut bob = Chatter::connect(&nodes[2].node, "bob").await?;
    let joined = bob.join("idle", Some((old_epoch.clone(), 2))).await?;
    ensure!(joined["recovered"] == false, "the forgotten stream cannot be resumed: {joined}");
    bob.publish("idle", "b1", "fresh").await?;
    bob.pump_until("the ack of b1", |c| c.acks.contains_key("b1")).await?;
    ensure!(bob.acks["b1"] == 1, "a new stream starts at offset 1: {:?}", bob.acks);
    let new_epoch = bob.epoch.clone().context("new epoch")?;
    ensure!(new_epoch != old_epoch, "a new epoch");
    for (i, m) in nodes.iter().enumerate() {
        let mut reader = Chatter::connect(&m.node, &format!("reader{i}")).await?;
        reader.join("idle", None).await?;
        reader.join("watched", None).await?;
        ensure!(reader.history_through("idle", 1).await? == [(1, "fresh".to_owned())], "{}: idle history", m.id);
        let first =
            reader.request(json!({"type": "history", "id": "e", "room": "idle", "limit": 1}), "history").await?;
        ensure!(first["epoch"] == new_epoch.as_str(), "{}: one new epoch everywhere: {first}", m.id);
        let watched = reader.request(json!({"type": "history", "id": "w", "room": "watched"}), "history").await?;
        ensure!(watched["epoch"] == watched_epoch.as_str(), "{}: the watched room kept its stream: {watched}", m.id);
        ensure!(watched["messages"][0]["body"] == "kept", "{}: {watched}", m.id);
    }
    Ok(())
}

// ---------- b. resume through another node, presence, sessions ----------

#[tokio::test]
async fn resume_on_another_node_gets_exactly_what_was_missed() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let (a, b) = (&cluster.members[0].node, &cluster.members[1].node);

    let mut reader = Chatter::connect(a, "reader").await?;
    reader.join("news", None).await?;
    let mut writer = Chatter::connect(b, "writer").await?;
    writer.join("news", None).await?;
    for i in 1..=5 {
        writer.publish("news", &format!("w{i}"), &format!("m{i}")).await?;
    }
    reader.pump_until("five messages", |c| c.messages.len() == 5).await?;
    let epoch = reader.epoch.clone().context("epoch")?;
    reader.client.close().await;

    for i in 6..=9 {
        writer.publish("news", &format!("w{i}"), &format!("m{i}")).await?;
    }
    writer.pump_until("nine acks", |c| c.acks.len() == 9).await?;

    // Back on the third node, from offset 5.
    let mut back = Chatter::connect(&cluster.members[2].node, "reader").await?;
    let joined = back.join("news", Some((epoch.clone(), 5))).await?;
    ensure!(joined["recovered"] == true, "resumed within the window: {joined}");
    // The ack came after commit and apply on the writer's node; this node may apply the last
    // ones a moment later: those arrive live, after `joined`.
    let at = joined["offset"].as_u64().context("joined offset")?;
    ensure!((5..=9).contains(&at) && joined["epoch"] == epoch.as_str(), "{joined}");
    back.pump_until("the four missed", |c| c.messages.len() >= 4).await?;
    ensure!(
        back.log() == (6..=9).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>(),
        "exactly the four missed: {:?}",
        back.log()
    );
    back.assert_in_order_once()?;
    // History through any node agrees too.
    let bodies = back.history_bodies("news").await?;
    ensure!(bodies == (1..=9).map(|i| format!("m{i}")).collect::<Vec<_>>(), "history {bodies:?}");
    Ok(())
}

/// A user flapping in and out of a room on one node: the other nodes get its presence changes
/// coalesced per tick (the last state of each), so their members see a few events, not one per
/// flap, and the final state.
#[tokio::test]
async fn presence_flapping_reaches_other_nodes_coalesced() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start_jwt(2).await?;
    wait_converged(&cluster.all(), 2).await?;
    let mut watcher = Chatter::connect_as(&cluster.members[1].node, "watcher").await?;
    watcher.join("flap", None).await?;
    let mut flapper = Chatter::connect_as(&cluster.members[0].node, "flapper").await?;
    let records_before = metric_of(&cluster.members[0].node, "chat_session_records_sent_total").await?;
    const FLAPS: usize = 40;
    for _ in 0..FLAPS {
        flapper.client.send_json(json!({"type": "join", "room": "flap"})).await?;
        flapper.client.send_json(json!({"type": "leave", "room": "flap"})).await?;
    }
    // Then a real join, which must arrive.
    flapper.join("flap", None).await?;
    // Collect everything the watcher gets for a second (several ticks).
    let _ = tokio::time::timeout(Duration::from_secs(1), watcher.pump_until("nothing", |_| false)).await;
    let events: Vec<&(String, String)> = watcher.presence_events.iter().filter(|(_, who)| who == "flapper").collect();
    ensure!(events.len() <= 10, "{} presence events for {FLAPS} join/leave pairs: {events:?}", events.len());
    ensure!(events.last().is_some_and(|(kind, _)| kind == "user_joined"), "the final state arrives: {events:?}");
    let names = watcher.presence_names("flap").await?;
    ensure!(names == ["flapper", "watcher"], "the final state: {names:?}");
    // Each join and leave changed the flapper's session record; the peers got one per tick.
    let records = metric_of(&cluster.members[0].node, "chat_session_records_sent_total").await? - records_before;
    ensure!(records <= 12.0, "{records} session records sent for {} changes", 2 * FLAPS + 1);
    // The last one arrived: the session resumes through the other node in the room it is in.
    let session = flapper.session.clone();
    flapper.client.close().await;
    let url = format!("{}?session={session}", cluster.members[1].node.ws_url());
    let mut back = Client::connect(&url, Some(&user_token("flapper"))).await?;
    let welcome = back.expect_type("welcome", WAIT).await?;
    ensure!(welcome["resumed"] == true, "{welcome}");
    let joined = back.recv_until("joined", WAIT).await?;
    ensure!(joined["room"] == "flap", "rejoined the room of the last record: {joined}");
    Ok(())
}

#[tokio::test]
async fn presence_is_cluster_wide_and_a_killed_node_leaves_no_zombies() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start_jwt(3).await?;
    wait_converged(&cluster.all(), 3).await?;

    let mut watcher = Chatter::connect_as(&cluster.members[0].node, "watcher").await?;
    watcher.join("hall", None).await?;
    // Ann has two connections on two nodes: one user_joined, and no user_left while one stays.
    let mut ann_b = Chatter::connect_as(&cluster.members[1].node, "ann").await?;
    ann_b.join("hall", None).await?;
    let mut ann_c = Chatter::connect_as(&cluster.members[2].node, "ann").await?;
    ann_c.join("hall", None).await?;
    watcher.pump_until("ann joined", |c| c.presence_events.contains(&("user_joined".into(), "ann".into()))).await?;
    let names = watcher.presence_names("hall").await?;
    ensure!(names == ["ann", "watcher"], "presence through node 0: {names:?}");

    // Ann's connection on node 1 ends: she is still present through node 2.
    ann_b.client.close().await;
    // Bob's connection lives on node 2, which is killed: both Bob and Ann must go.
    let mut bob = Chatter::connect_as(&cluster.members[2].node, "bob").await?;
    bob.join("hall", None).await?;
    watcher.pump_until("bob joined", |c| c.presence_events.contains(&("user_joined".into(), "bob".into()))).await?;
    ensure!(
        !watcher.presence_events.contains(&("user_left".into(), "ann".into())),
        "ann still has a connection: {:?}",
        watcher.presence_events
    );
    let killed = cluster.members.remove(2);
    killed.node.kill();
    watcher
        .pump_until("ann and bob left", |c| {
            c.presence_events.contains(&("user_left".into(), "ann".into()))
                && c.presence_events.contains(&("user_left".into(), "bob".into()))
        })
        .await?;
    for m in &cluster.members {
        let mut probe = Chatter::connect_as(&m.node, "probe").await?;
        probe.join("hall", None).await?;
        let names = probe.presence_names("hall").await?;
        ensure!(names == ["probe", "watcher"], "{}: no zombies: {names:?}", m.id);
    }
    let joins = watcher.presence_events.iter().filter(|e| *e == &("user_joined".to_owned(), "ann".to_owned())).count();
    ensure!(joins == 1, "one user_joined for ann: {:?}", watcher.presence_events);
    Ok(())
}

/// Sam on node 0 in rooms `a` and `b`, one message of his in `a`; returns him and his session.
async fn sam_in_two_rooms(cluster: &LoopbackCluster) -> anyhow::Result<(Chatter, String)> {
    let mut sam = Chatter::connect_as(&cluster.members[0].node, "sam").await?;
    sam.join("a", None).await?;
    sam.join("b", None).await?;
    sam.publish("a", "1", "hello a").await?;
    sam.pump_until("ack and message", |c| c.acks.len() == 1 && c.messages.len() == 1).await?;
    let session = sam.session.clone();
    Ok((sam, session))
}

/// Wes publishes in `a` through the first remaining node while Sam is away.
async fn publish_while_sam_is_away(cluster: &LoopbackCluster) -> anyhow::Result<()> {
    let mut wes = Chatter::connect_as(&cluster.members[0].node, "wes").await?;
    wes.join("a", None).await?;
    wes.publish("a", "2", "missed by sam").await?;
    wes.pump_until("ack", |c| c.acks.len() == 1).await
}

/// Sam comes back with his session token through the second remaining node: both rooms are
/// rejoined; returns the `want` first messages he receives.
async fn resume_sam(cluster: &LoopbackCluster, session: &str, want: usize) -> anyhow::Result<Vec<String>> {
    let url = format!("{}?session={session}", cluster.members[1].node.ws_url());
    let mut client = Client::connect(&url, Some(&user_token("sam"))).await?;
    let welcome = client.expect_type("welcome", WAIT).await?;
    ensure!(welcome["resumed"] == true && welcome["session_id"] == session, "{welcome}");
    let mut joined = Vec::new();
    let mut received = Vec::new();
    // A missed message may apply on this node just after the rejoin: then it arrives live.
    while joined.len() < 2 || received.len() < want {
        let frame = client.recv_json(WAIT).await?;
        match frame["type"].as_str() {
            Some("joined") => joined.push(frame["room"].as_str().unwrap_or_default().to_owned()),
            Some("message") => received.push(frame["body"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    joined.sort();
    ensure!(joined == ["a", "b"], "rejoined both rooms: {joined:?}");
    Ok(received)
}

#[tokio::test]
async fn a_session_token_rejoins_its_rooms_on_another_node_after_a_drain() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start_jwt(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let (mut sam, session) = sam_in_two_rooms(&cluster).await?;

    // Sam's node drains: the server flushes, closes with 4000, and records where Sam was.
    cluster.members[0].node.terminate();
    let close = sam.client.recv_close(WAIT).await;
    ensure!(close.as_ref().is_some_and(|(code, _)| *code == 4000), "drain closes with 4000: {close:?}");
    cluster.members[0].node.wait_exit(WAIT).await?;
    cluster.members.remove(0);
    publish_while_sam_is_away(&cluster).await?;

    // Only what was missed: the drain recorded exact positions.
    let missed = resume_sam(&cluster, &session, 1).await?;
    ensure!(missed == ["missed by sam"], "got exactly what was missed in a: {missed:?}");

    // Another user presenting Sam's token gets a fresh session.
    let url = format!("{}?session={session}", cluster.members[1].node.ws_url());
    let mut eve = Client::connect(&url, Some(&user_token("eve"))).await?;
    let welcome = eve.expect_type("welcome", WAIT).await?;
    ensure!(welcome["resumed"] == false && welcome["session_id"] != session.as_str(), "{welcome}");
    Ok(())
}

#[tokio::test]
async fn a_session_token_rejoins_its_rooms_on_another_node_after_its_node_crashed() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start_jwt(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let (_sam, session) = sam_in_two_rooms(&cluster).await?;

    // Sam's node dies without a drain: only the records the peers already hold survive. They
    // go out once per tick (100 ms); what changed in the last tick before a crash is lost, so
    // the kill comes once the peers hold everything Sam's node sent since its last change.
    let deadline = tokio::time::Instant::now() + WAIT;
    // Sam changes nothing any more: once the sent count has held for a few ticks, it is final.
    let mut unchanged_since = (-1.0, tokio::time::Instant::now());
    loop {
        let total = metric_of(&cluster.members[0].node, "chat_session_records_sent_total").await?;
        if total != unchanged_since.0 {
            unchanged_since = (total, tokio::time::Instant::now());
        }
        let mut received = Vec::new();
        for m in &cluster.members[1..] {
            received.push(metric_of(&m.node, "chat_session_records_received_total").await?);
        }
        let settled = unchanged_since.1.elapsed() >= Duration::from_millis(300);
        if settled && total > 0.0 && received.iter().all(|r| *r >= total) {
            break;
        }
        ensure!(tokio::time::Instant::now() < deadline, "records sent {total}, received {received:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    cluster.members[0].node.kill();
    cluster.members[0].node.wait_exit(WAIT).await?;
    cluster.members.remove(0);
    publish_while_sam_is_away(&cluster).await?;

    // After a crash the record holds the positions the rooms were joined at, so Sam gets
    // everything since (at least once, in order).
    let received = resume_sam(&cluster, &session, 2).await?;
    ensure!(received == ["hello a", "missed by sam"], "room a since the join, in order: {received:?}");
    Ok(())
}

// ---------- c. continuous load across restarts, crashes and scaling ----------

const LOAD_ROOM: &str = "load";

/// Node URLs the load's clients may use; tests change it as nodes come and go.
type Urls = Arc<Mutex<Vec<String>>>;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Where a load client connects.
#[derive(Clone, Debug)]
enum Route {
    /// Any listed node, moving on to the next one after each lost connection.
    Roam,
    /// Its home node while that is listed, then any listed node (it moves when the home node is
    /// scaled away).
    Prefer(String),
    /// Only its home node, waiting for it while it restarts.
    Pinned(String),
}

fn pick(urls: &Urls, route: &Route, attempt: usize) -> Option<String> {
    let urls = lock(urls);
    match route {
        Route::Pinned(home) => Some(home.clone()),
        Route::Prefer(home) if urls.contains(home) => Some(home.clone()),
        _ => (!urls.is_empty()).then(|| urls[attempt % urls.len()].clone()),
    }
}

fn is_timeout(err: &anyhow::Error) -> bool {
    err.to_string().starts_with("no frame within")
}

/// What a subscriber saw over its whole life, across reconnects.
struct Seen {
    name: String,
    /// The room's offset when it first joined: it expects every message after it.
    start: u64,
    messages: BTreeMap<u64, String>,
    arrivals: Vec<u64>,
    reconnects: usize,
    problems: Vec<String>,
}

/// A publisher's progress, readable while it runs.
#[derive(Default)]
struct PubStats {
    acked: AtomicU64,
    /// Connections it has joined the room on.
    connects: AtomicU64,
    /// Acks received on its current connection.
    acked_here: AtomicU64,
}

struct Publisher {
    name: String,
    stats: Arc<PubStats>,
    task: JoinHandle<anyhow::Result<(BTreeMap<u64, String>, u64)>>,
}

/// Publishers (one message in flight each, acked or refused before the next) and subscribers
/// of [`LOAD_ROOM`], each reconnecting along its [`Route`] when its node goes away and resuming
/// with `since`.
struct Load {
    urls: Urls,
    stop: Arc<AtomicBool>,
    /// The highest acked offset, once publishing stopped: subscribers read up to it.
    target: Arc<AtomicU64>,
    acked_total: Arc<AtomicU64>,
    publishers: Vec<Publisher>,
    subscribers: Vec<JoinHandle<Seen>>,
}

impl Load {
    fn new(urls: Urls) -> Load {
        Load {
            urls,
            stop: Arc::default(),
            target: Arc::default(),
            acked_total: Arc::default(),
            publishers: Vec::new(),
            subscribers: Vec::new(),
        }
    }

    /// Starts a subscriber and waits until it has joined.
    async fn subscribe(&mut self, name: &str, route: Route, first: usize) -> anyhow::Result<()> {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (urls, stop, target) = (self.urls.clone(), self.stop.clone(), self.target.clone());
        self.subscribers.push(tokio::spawn(subscribe(name.to_owned(), urls, route, first, stop, target, ready_tx)));
        ready_rx.await.with_context(|| format!("subscriber {name} failed to join"))
    }

    fn publish(&mut self, name: &str, route: Route) {
        let stats = Arc::new(PubStats::default());
        let task = tokio::spawn(publish_loop(
            name.to_owned(),
            self.urls.clone(),
            route,
            self.stop.clone(),
            stats.clone(),
            self.acked_total.clone(),
        ));
        self.publishers.push(Publisher { name: name.to_owned(), stats, task });
    }

    fn stats(&self, name: &str) -> anyhow::Result<Arc<PubStats>> {
        self.publishers.iter().find(|p| p.name == name).map(|p| p.stats.clone()).with_context(|| format!("no {name}"))
    }

    async fn wait(&self, what: &str, done: impl Fn() -> bool) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !done() {
            if let Some(p) = self.publishers.iter().find(|p| p.task.is_finished()) {
                bail!("publisher {} stopped early while waiting for {what}", p.name);
            }
            ensure!(
                tokio::time::Instant::now() < deadline,
                "publishing stalled waiting for {what}: {} acks in all; {:?}",
                self.acked_total.load(Ordering::Relaxed),
                self.publishers
                    .iter()
                    .map(|p| (p.name.clone(), p.stats.acked.load(Ordering::Relaxed)))
                    .collect::<Vec<_>>()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Waits until `more` further messages were acked, by any publisher.
    async fn wait_acks(&self, more: u64) -> anyhow::Result<()> {
        let goal = self.acked_total.load(Ordering::Relaxed) + more;
        self.wait(&format!("{goal} acks"), || self.acked_total.load(Ordering::Relaxed) >= goal).await
    }

    /// Waits until publisher `name` had `more` further messages acked.
    async fn wait_acks_of(&self, name: &str, more: u64) -> anyhow::Result<()> {
        let stats = self.stats(name)?;
        let goal = stats.acked.load(Ordering::Relaxed) + more;
        self.wait(&format!("{goal} acks of {name}"), || stats.acked.load(Ordering::Relaxed) >= goal).await
    }

    /// Waits until publisher `name` is on a connection opened after its `connects`-th one and
    /// had `acks` messages acked on it.
    async fn wait_acks_on_new_connection(&self, name: &str, connects: u64, acks: u64) -> anyhow::Result<()> {
        let stats = self.stats(name)?;
        self.wait(&format!("{acks} acks of {name} on a new connection"), || {
            stats.connects.load(Ordering::Acquire) > connects && stats.acked_here.load(Ordering::Acquire) >= acks
        })
        .await
    }

    /// Stops publishing, lets subscribers catch up, and checks what everyone saw: every acked
    /// message at its offset for every subscriber (after where it started), each delivered
    /// once, in order, no offset acked twice and no message stored twice.
    async fn finish(self) -> anyhow::Result<(BTreeMap<u64, String>, Vec<Seen>)> {
        self.stop.store(true, Ordering::Release);
        let mut acked: BTreeMap<u64, String> = BTreeMap::new();
        let mut unknown = 0;
        for p in self.publishers {
            let (mine, refused) = p.task.await?.with_context(|| format!("publisher {}", p.name))?;
            unknown += refused;
            for (offset, body) in mine {
                if let Some(other) = acked.insert(offset, body.clone()) {
                    bail!("offset {offset} acked twice: to {other:?} and to {body:?}");
                }
            }
        }
        let top = acked.keys().next_back().copied().unwrap_or(0);
        self.target.store(top.max(1), Ordering::Release);
        let mut seen = Vec::new();
        for sub in self.subscribers {
            seen.push(sub.await?);
        }
        ensure!(acked.len() >= 20, "too few acked messages to mean anything: {}", acked.len());
        for s in &seen {
            ensure!(s.problems.is_empty(), "{}: {:?}", s.name, s.problems);
            ensure!(s.arrivals.windows(2).all(|w| w[0] < w[1]), "{}: out of order or twice: {:?}", s.name, s.arrivals);
            for (offset, body) in acked.range(s.start + 1..) {
                ensure!(
                    s.messages.get(offset) == Some(body),
                    "{}: acked offset {offset} ({body}) missing or different: {:?}",
                    s.name,
                    s.messages.get(offset)
                );
            }
            ensure!(
                s.messages.keys().copied().eq(s.start + 1..=s.start + s.messages.len() as u64),
                "{}: gaps in offsets after {}",
                s.name,
                s.start
            );
            let mut bodies = BTreeSet::new();
            for (offset, body) in &s.messages {
                ensure!(bodies.insert(body), "{}: {body:?} delivered at two offsets (again at {offset})", s.name);
            }
        }
        for pair in seen.windows(2) {
            for (offset, body) in &pair[0].messages {
                if let Some(other) = pair[1].messages.get(offset) {
                    ensure!(body == other, "{} and {} disagree at {offset}", pair[0].name, pair[1].name);
                }
            }
        }
        eprintln!(
            "load: {} acked, {unknown} refused or unanswered, reconnects {:?}",
            acked.len(),
            seen.iter().map(|s| (s.name.as_str(), s.reconnects)).collect::<Vec<_>>()
        );
        Ok((acked, seen))
    }
}

async fn publish_loop(
    name: String,
    urls: Urls,
    route: Route,
    stop: Arc<AtomicBool>,
    stats: Arc<PubStats>,
    acked_total: Arc<AtomicU64>,
) -> anyhow::Result<(BTreeMap<u64, String>, u64)> {
    let mut acked = BTreeMap::new();
    let (mut n, mut unknown, mut attempt) = (0u64, 0u64, 0usize);
    'connect: while !stop.load(Ordering::Acquire) {
        attempt += 1;
        let connected = match pick(&urls, &route, attempt) {
            Some(url) => Chatter::connect_url(&format!("{url}?name={name}"), &name, None).await.ok(),
            None => None,
        };
        let Some(mut c) = connected else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if c.join(LOAD_ROOM, None).await.is_err() {
            continue;
        }
        stats.acked_here.store(0, Ordering::Release);
        stats.connects.fetch_add(1, Ordering::AcqRel);
        while !stop.load(Ordering::Acquire) {
            n += 1;
            let (id, body) = (format!("{name}-{n}"), format!("{name} says {n}"));
            if c.publish(LOAD_ROOM, &id, &body).await.is_err() {
                unknown += 1;
                continue 'connect;
            }
            let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let frame = match c.client.recv_json(left).await {
                    Ok(frame) => frame,
                    Err(_) => {
                        unknown += 1;
                        continue 'connect;
                    }
                };
                if frame["id"] != id.as_str() {
                    continue;
                }
                match frame["type"].as_str() {
                    Some("ack") => {
                        let offset = frame["offset"].as_u64().context("ack offset")?;
                        if let Some(earlier) = acked.insert(offset, body.clone()) {
                            bail!("{name}: offset {offset} acked for {earlier:?} and again for {body:?}");
                        }
                        stats.acked.fetch_add(1, Ordering::AcqRel);
                        stats.acked_here.fetch_add(1, Ordering::AcqRel);
                        acked_total.fetch_add(1, Ordering::AcqRel);
                    }
                    Some("error") if frame["code"] == "unavailable" || frame["code"] == "draining" => {
                        unknown += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => bail!("{name}: unexpected answer to a publish: {frame}"),
                }
                break;
            }
            // About 50 messages per second per publisher: enough churn, and the 2-core machine
            // keeps up.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    Ok((acked, unknown))
}

async fn subscribe(
    name: String,
    urls: Urls,
    route: Route,
    first: usize,
    stop: Arc<AtomicBool>,
    target: Arc<AtomicU64>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Seen {
    let mut seen = Seen {
        name: name.clone(),
        start: 0,
        messages: BTreeMap::new(),
        arrivals: Vec::new(),
        reconnects: 0,
        problems: Vec::new(),
    };
    let mut ready = Some(ready);
    let mut epoch: Option<String> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90);
    let mut attempt = first;
    let reached = |seen: &Seen| {
        let t = target.load(Ordering::Acquire);
        stop.load(Ordering::Acquire) && t > 0 && seen.messages.keys().next_back().is_some_and(|last| *last >= t)
    };
    while tokio::time::Instant::now() < deadline && !reached(&seen) {
        let Some(url) = pick(&urls, &route, attempt) else { break };
        attempt += 1;
        let Ok(mut c) = Chatter::connect_url(&format!("{url}?name={name}"), &name, None).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let since = epoch.clone().map(|e| (e, seen.messages.keys().next_back().copied().unwrap_or(seen.start)));
        let joined = match c.join(LOAD_ROOM, since.clone()).await {
            Ok(joined) => joined,
            Err(_) => continue,
        };
        if since.is_some() && joined["recovered"] != true {
            seen.problems.push(format!("resume from {since:?} on {url} not recovered: {joined}"));
        }
        if let (Some(before), Some(now)) = (&epoch, joined["epoch"].as_str())
            && before != now
        {
            seen.problems.push(format!("the epoch changed from {before} to {now} on {url}"));
        }
        epoch = joined["epoch"].as_str().map(str::to_owned);
        if let Some(ready) = ready.take() {
            seen.start = joined["offset"].as_u64().unwrap_or(0);
            let _ = ready.send(());
        } else {
            seen.reconnects += 1;
        }
        absorb(&mut seen, &mut c);
        loop {
            if reached(&seen) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                seen.problems.push(format!("did not reach offset {} in time", target.load(Ordering::Acquire)));
                break;
            }
            match c.client.recv_json(Duration::from_millis(200)).await {
                Ok(frame) => {
                    let _ = c.record(&frame);
                    absorb(&mut seen, &mut c);
                }
                Err(err) if is_timeout(&err) => {}
                Err(_) => break,
            }
        }
    }
    seen
}

/// Moves what a connection received into the subscriber's life-long record.
fn absorb(seen: &mut Seen, c: &mut Chatter) {
    seen.arrivals.append(&mut c.arrivals);
    seen.messages.append(&mut c.messages);
}

fn member_url(m: &Member) -> String {
    m.node.ws_url()
}

fn last_octet(id: &str) -> anyhow::Result<u8> {
    id.strip_prefix("node-").and_then(|n| n.parse().ok()).with_context(|| format!("node id {id}"))
}

/// Every node restarts in turn (drain, then a new process without the old one's memory). A
/// client pinned to each node publishes through it before its restart and again after, on a
/// new connection to the new process; roaming clients keep publishing and reading throughout.
#[tokio::test]
async fn rolling_restart_under_load_loses_no_acked_message() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let urls: Urls = Arc::new(Mutex::new(cluster.members.iter().map(member_url).collect()));
    let mut load = Load::new(urls);
    for i in 0..3 {
        load.subscribe(&format!("sub{i}"), Route::Roam, i).await?;
    }
    load.publish("roamer", Route::Roam);
    for m in &cluster.members {
        load.publish(&format!("pin-{}", m.id), Route::Pinned(member_url(m)));
    }
    load.wait_acks(50).await?;

    for i in 0..cluster.members.len() {
        let id = cluster.members[i].id.clone();
        let pinned = format!("pin-{id}");
        load.wait_acks_of(&pinned, 10).await.with_context(|| format!("through {id} before its restart"))?;
        cluster.members[i].node.terminate();
        cluster.members[i].node.wait_exit(Duration::from_secs(10)).await?;
        let connects = load.stats(&pinned)?.connects.load(Ordering::Acquire);
        load.wait_acks(30).await.with_context(|| format!("while {id} is down"))?;
        let cfg = cluster.config(&id, last_octet(&id)?, SECRET);
        cluster.members[i].node = start(&cfg).await?;
        wait_converged(&cluster.all(), 3).await?;
        load.wait_acks_on_new_connection(&pinned, connects, 10)
            .await
            .with_context(|| format!("through {id} after its restart"))?;
        load.wait_acks(30).await.with_context(|| format!("after {id} came back"))?;
    }
    let (acked, seen) = load.finish().await?;
    ensure!(seen.iter().all(|s| s.reconnects >= 1), "every subscriber had to move at least once");
    assert_histories(&cluster.all(), LOAD_ROOM, &acked).await?;
    Ok(())
}

/// The leader of the load room's group is killed with entries in flight: a survivor takes
/// over the group, nothing acked is lost, and the killed node's clients resume elsewhere.
#[tokio::test]
async fn kill_9_under_load_loses_no_acked_message() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let urls: Urls = Arc::new(Mutex::new(cluster.members.iter().map(member_url).collect()));
    let mut load = Load::new(urls.clone());
    for i in 0..3 {
        load.subscribe(&format!("sub{i}"), Route::Roam, i).await?;
    }
    load.publish("roamer", Route::Roam);
    for m in &cluster.members {
        load.publish(&format!("pub-{}", m.id), Route::Prefer(member_url(m)));
    }
    if let Err(err) = load.wait_acks(50).await {
        for m in &cluster.members {
            eprintln!("--- {} ---\n{}", m.id, m.node.output());
        }
        return Err(err);
    }

    // Kill the node that sequences the room, the hardest case: it has entries in flight.
    let (leader, name) = leader_of(&cluster.members, LOAD_ROOM).await?;
    let victim = cluster.members.remove(leader);
    let publisher = format!("pub-{name}");
    let connects = load.stats(&publisher)?.connects.load(Ordering::Acquire);
    lock(&urls).retain(|u| *u != member_url(&victim));
    victim.node.kill();
    wait_room_led_within(&cluster.all(), LOAD_ROOM).await.context("a survivor leads the room's group")?;
    let (_, new_leader) = leader_of(&cluster.members, LOAD_ROOM).await?;
    ensure!(new_leader != name, "the killed leader {name} still leads");
    load.wait_acks(50).await.context("after the leader was killed")?;
    load.wait_acks_on_new_connection(&publisher, connects, 10).await.context("the killed node's publisher moved")?;
    let (acked, seen) = load.finish().await?;
    ensure!(seen.iter().any(|s| s.reconnects >= 1), "the killed node's subscriber resumed elsewhere");
    assert_histories(&cluster.all(), LOAD_ROOM, &acked).await?;
    Ok(())
}

/// One node, then three, then one again, under load, with the size written first each time.
/// Every node that exists has its own subscriber and publisher; those of a node that is scaled
/// away move to a remaining node and resume there with `since`.
#[tokio::test]
async fn scale_one_to_three_to_one_under_load() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(1).await?;
    wait_converged(&cluster.all(), 1).await?;
    let first = member_url(&cluster.members[0]);
    let urls: Urls = Arc::new(Mutex::new(vec![first.clone()]));
    let mut load = Load::new(urls.clone());
    load.subscribe("sub-node-2", Route::Prefer(first.clone()), 0).await?;
    load.publish("pub-node-2", Route::Prefer(first));
    load.wait_acks(40).await?;

    cluster.resize(3)?;
    for last in [3u8, 4] {
        cluster.dns.add_record(loopback(last));
        let cfg = cluster.config(&format!("node-{last}"), last, SECRET);
        let node = start(&cfg).await.with_context(|| format!("node-{last} joining"))?;
        cluster.members.push(Member { id: format!("node-{last}"), node });
        let url = member_url(&cluster.members[cluster.members.len() - 1]);
        lock(&urls).push(url.clone());
        load.subscribe(&format!("sub-node-{last}"), Route::Prefer(url.clone()), 0).await?;
        load.publish(&format!("pub-node-{last}"), Route::Prefer(url));
    }
    wait_converged(&cluster.all(), 3).await?;
    for last in [3u8, 4] {
        load.wait_acks_of(&format!("pub-node-{last}"), 20).await.with_context(|| format!("through node-{last}"))?;
    }
    load.wait_acks(40).await.context("at three nodes")?;

    cluster.resize(1)?;
    let node2 = &cluster.members[0];
    wait_status(node2, "node-2 the only voter, the others learners", CONVERGE, |s| {
        s["size"] == 1
            && s["groups"].as_array().is_some_and(|gs| {
                gs.len() == PARTITIONS as usize
                    && gs.iter().all(|g| {
                        g["voters"] == json!(["node-2"]) && g["learners"].as_array().is_some_and(|l| l.len() == 2)
                    })
            })
    })
    .await?;
    let mut moved = Vec::new();
    for last in [4u8, 3] {
        let mut gone = cluster.members.pop().context("a node to remove")?;
        let publisher = format!("pub-node-{last}");
        moved.push((publisher.clone(), load.stats(&publisher)?.connects.load(Ordering::Acquire)));
        lock(&urls).retain(|u| *u != member_url(&gone));
        gone.node.terminate();
        gone.node.wait_exit(Duration::from_secs(10)).await?;
        cluster.dns.remove_record(loopback(last));
    }
    wait_converged(&cluster.all(), 1).await?;
    wait_status(&cluster.members[0], "no learners left", CONVERGE, |s| {
        s["groups"].as_array().is_some_and(|gs| gs.iter().all(|g| g["learners"] == json!([])))
    })
    .await?;
    load.wait_acks(40).await.context("back at one node")?;
    for (publisher, connects) in &moved {
        load.wait_acks_on_new_connection(publisher, *connects, 10)
            .await
            .with_context(|| format!("{publisher} moved to node-2"))?;
    }
    let (acked, seen) = load.finish().await?;
    for s in &seen {
        if s.name != "sub-node-2" {
            ensure!(s.reconnects >= 1, "{} moved off its removed node", s.name);
        }
    }
    assert_histories(&cluster.all(), LOAD_ROOM, &acked).await?;
    Ok(())
}

// ---------- d. partitions and intruders ----------

/// A chat client connected from inside a node's network namespace.
async fn chatter_in(ns: &str, name: &str) -> anyhow::Result<Chatter> {
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], NETNS_PORTS.client));
    let stream = chat_e2e::netns::connect_in(ns, addr, Duration::from_secs(2)).await?;
    let client = Client::connect_on(stream, &format!("ws://{addr}/ws?name={name}")).await?;
    Chatter::from_client(client, name).await
}

/// A room whose group `node` leads right now (else any room, when it leads none).
async fn room_led_by(node: &Member) -> anyhow::Result<String> {
    let s = cluster_status(&node.node).await?;
    let led: BTreeSet<u32> = s["groups"]
        .as_array()
        .context("groups")?
        .iter()
        .filter(|g| g["role"] == "leader")
        .filter_map(|g| g["group"].as_u64().map(|g| g as u32))
        .collect();
    let room = (0..100).map(|i| format!("ops-{i}")).find(|r| led.contains(&group_of(r, PARTITIONS)));
    if room.is_none() {
        eprintln!("{} leads no group: the minority publish goes to a majority leader", node.id);
    }
    Ok(room.unwrap_or_else(|| "ops".to_owned()))
}

/// The node cut off is the leader of the room's group when the partition starts (the harder
/// case: it appends the minority's publish to its own log, which must never commit). Its
/// client's publish is refused with `unavailable`; the majority elects a new leader and goes
/// on; after the heal the minority gets exactly the majority's messages, and the refused one
/// appears in no history, on no node.
#[tokio::test]
async fn partition_minority_refuses_publishes_and_converges_after_heal() -> anyhow::Result<()> {
    let cluster = NetnsCluster::start(3).await?;
    let (net, all) = (&cluster.net, cluster.all());
    let (isolated, majority) = all.split_last().context("three")?;
    let room = room_led_by(isolated).await?;
    let room = room.as_str();

    let mut chatters = Vec::new();
    for (i, host) in net.hosts().iter().enumerate() {
        let mut c = chatter_in(&host.ns, &format!("user{i}")).await?;
        c.join(room, None).await?;
        chatters.push(c);
    }
    chatters[0].publish(room, "before", "before the partition").await?;
    for c in &mut chatters {
        c.pump_until("the first message", |c| c.messages.len() == 1).await?;
    }

    net.partition(2)?;
    let everyone: BTreeSet<String> = all.iter().map(|m| m.id.clone()).collect();
    wait_converged_with(majority, 3, &everyone).await?;
    wait_room_led_within(majority, room).await?;
    wait_status(isolated, "without quorum", CONVERGE, |s| s["quorum"] == false && member_ids(s).is_empty()).await?;

    // The minority refuses writes; the majority keeps taking them.
    const REFUSED: &str = "written on the minority side";
    chatters[2].publish(room, "minority", REFUSED).await?;
    chatters[2].pump_until("a refusal", |c| !c.errors.is_empty() || !c.acks.is_empty()).await?;
    ensure!(chatters[2].acks.is_empty(), "the minority acked a publish: {:?}", chatters[2].acks);
    ensure!(
        chatters[2].errors.len() == 1
            && chatters[2].errors[0]["code"] == "unavailable"
            && chatters[2].errors[0]["id"] == "minority",
        "minority publish: {:?}",
        chatters[2].errors
    );
    for i in 1..=5 {
        chatters[0].publish(room, &format!("m{i}"), &format!("during the partition {i}")).await?;
    }
    chatters[0].pump_until("five acks", |c| c.acks.len() == 6).await?;
    chatters[1].pump_until("six messages", |c| c.messages.len() == 6).await?;
    ensure!(chatters[2].messages.len() == 1, "the minority saw nothing new: {:?}", chatters[2].log());

    net.heal(2)?;
    wait_converged(&all, 3).await?;
    // The minority's subscriber receives what it missed, in order, with the same offsets.
    chatters[2].pump_until("the partition's messages", |c| c.messages.len() == 6).await?;
    ensure!(chatters[2].log() == chatters[1].log(), "converged: {:?} vs {:?}", chatters[2].log(), chatters[1].log());
    chatters[2].assert_in_order_once()?;
    chatters[2].publish(room, "after", "written after the heal").await?;
    for c in &mut chatters {
        let got = c.pump_until("the post-heal message", |c| c.messages.len() == 7).await;
        if let Err(err) = got {
            let logs: Vec<String> = all.iter().map(|m| format!("--- {} ---\n{}", m.id, m.node.output())).collect();
            return Err(err.context(logs.join("\n")));
        }
        c.assert_in_order_once()?;
    }
    ensure!(chatters[0].log() == chatters[2].log(), "one order after the heal");
    chatters[2].pump_until("the post-heal ack", |c| c.acks.contains_key("after")).await?;
    ensure!(chatters[2].acks["after"] == 7, "ack of the post-heal publish: {:?}", chatters[2].acks);
    let expected = chatters[0].log();
    ensure!(expected.iter().map(|(o, _)| *o).eq(1..=7), "no offset went to the refused publish: {expected:?}");
    // Every node's history: exactly the seven, never the refused one.
    for (i, c) in chatters.iter_mut().enumerate() {
        ensure!(!c.messages.values().any(|b| b == REFUSED), "user{i} received the refused publish");
        let history = c.history_all(room).await?;
        ensure!(history == expected, "node-{i}'s history {history:?}, expected {expected:?}");
    }
    Ok(())
}

// ---------- forged peer traffic ----------

type PeerWs = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

const FORGED: &str = "forged";

/// Per node that dialed the fake peer, the close code of each of its dials.
type Refusals = Arc<Mutex<BTreeMap<String, Vec<Option<u16>>>>>;

/// Frames a peer with the secret could send, forged: a publish for the insider's room in the
/// insider's name, a Raft append with that publish from a "leader" of a much higher term
/// (addressed to `target`'s Raft id, right after its last log entry, committing it), and a
/// member announcement claiming ordinal 0's voter slot. Each is checked to be well-formed, so
/// only authentication can keep it out.
fn forged_frames(
    insider: &Chatter,
    room: &str,
    target: &Value,
    raft_ids: &HashMap<String, u64>,
    tag: &str,
) -> anyhow::Result<Vec<String>> {
    use chat_node::hub::log::Command;
    use chat_node::protocol::UserInfo;
    use chat_node::replication::wire::{MemberInfo, ReplicaFrame};

    let group = group_of(room, PARTITIONS);
    let sender = UserInfo { id: insider.user_id.clone(), name: insider.name.clone() };
    let epoch = insider.epoch.clone().context("the insider's epoch")?;
    let publish = |n: u32| Command::Publish {
        room: room.to_owned(),
        key: format!("u:{}:{FORGED}-{tag}-{n}", insider.user_id),
        sender: sender.clone(),
        body: format!("{FORGED} {tag} {n}"),
        ts: 1,
        epoch: epoch.clone(),
    };
    let to = u64::from_str_radix(target["raft_id"].as_str().context("raft_id")?, 16)?;
    let g = &target["groups"][group as usize];
    let term = g["term"].as_u64().context("term")?;
    let last = g["last_log"].as_u64().context("last_log")?;
    let leader_name = g["leader"].as_str().context("the group's leader")?;
    let leader_id = *raft_ids.get(leader_name).with_context(|| format!("raft id of {leader_name}"))?;
    let leader = json!({"term": term, "node_id": leader_id});
    let forged_leader = json!({"term": term + 1000, "node_id": leader_id});
    let append = json!({"call": {"call": 7, "group": group, "to": to, "rpc": {"append": {
        "vote": {"leader_id": forged_leader, "committed": true},
        "prev_log_id": {"leader_id": leader, "index": last},
        "entries": [{"log_id": {"leader_id": forged_leader, "index": last + 1},
                     "payload": {"Normal": serde_json::to_value(vec![publish(2)])?}}],
        "leader_commit": {"leader_id": forged_leader, "index": last + 1},
    }}}});
    serde_json::from_value::<ReplicaFrame>(append.clone()).context("the forged append must be a well-formed frame")?;
    let member = ReplicaFrame::Member(MemberInfo {
        raft_id: 0xbad,
        ordinal: 0,
        leaving: false,
        initialized: true,
        forgets_rooms: true,
        reports_load: true,
    });
    Ok(vec![
        ReplicaFrame::Propose { group, command: publish(1) }.encode().to_string(),
        append.to_string(),
        member.encode().to_string(),
    ])
}

/// Reads until the other side closes: its close code (1006 when it just dropped the link), or
/// `None` if it kept the link open.
async fn close_code(ws: &mut PeerWs) -> Option<u16> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Err(_) => return None,
            Ok(Some(Ok(Message::Close(frame)))) => return Some(frame.map_or(1005, |f| u16::from(f.code))),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) => return Some(1006),
        }
    }
}

/// Dials a node's `/peer` as a forger and sends `frames` after the challenge: without any
/// proof (`hello: None`), or after a `hello` whose proof is made with the wrong secret.
/// Returns the close code the node answered with.
async fn forge_dial(peer: SocketAddr, hello: Option<&str>, frames: &[String]) -> anyhow::Result<Option<u16>> {
    use chat_node::cluster::wire::PeerFrame;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{peer}/peer")).await.context("dial /peer")?;
    let challenge = match close_or_text(&mut ws).await? {
        Some(text) => serde_json::from_str::<PeerFrame>(&text)?,
        None => bail!("no challenge from {peer}"),
    };
    let PeerFrame::Challenge { node_id: acceptor, nonce, key: acceptor_key } = challenge else {
        bail!("expected a challenge: {challenge:?}")
    };
    if let Some(claimed) = hello {
        let key = chat_node::cluster::seal::Exchange::new()?.public_hex();
        let proof = chat_node::cluster::auth::Proof {
            role: "dialer",
            nonce: &nonce,
            signer: claimed,
            verifier: &acceptor,
            dialer_key: &key,
            acceptor_key: &acceptor_key,
        };
        let mac = chat_node::cluster::auth::sign(b"not-the-cluster-secret-000000", proof);
        let hello = PeerFrame::Hello {
            node_id: claimed.to_owned(),
            peer_addr: "127.0.0.6:1".to_owned(),
            nonce: chat_node::cluster::auth::nonce(),
            key,
            mac,
        };
        ws.send(Message::text(serde_json::to_string(&hello)?)).await?;
    }
    for frame in frames {
        // The node may already have closed: what it answers is all that matters.
        if ws.send(Message::text(frame.clone())).await.is_err() {
            break;
        }
    }
    Ok(close_code(&mut ws).await)
}

async fn close_or_text(ws: &mut PeerWs) -> anyhow::Result<Option<String>> {
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::Message;
    loop {
        match tokio::time::timeout(Duration::from_secs(3), ws.next()).await.context("no frame")? {
            Some(Ok(Message::Text(text))) => return Ok(Some(text.to_string())),
            Some(Ok(Message::Close(_))) | None => return Ok(None),
            Some(Ok(_)) => continue,
            Some(Err(err)) => bail!("{err}"),
        }
    }
}

/// A forger listening where DNS sends the nodes: to every node that dials it, it answers a
/// challenge as `node-9` (so the node goes on), then a made-up proof and the forged frames.
/// Reports, per dialing node, the close codes it got.
fn forge_acceptor(listener: tokio::net::TcpListener, frames: Arc<Vec<String>>) -> (JoinHandle<()>, Refusals) {
    use chat_node::cluster::wire::PeerFrame;
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    let seen: Refusals = Arc::default();
    let record = seen.clone();
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let (frames, record) = (frames.clone(), record.clone());
            tokio::spawn(async move {
                let Ok(mut ws) =
                    tokio_tungstenite::accept_async(tokio_tungstenite::MaybeTlsStream::Plain(stream)).await
                else {
                    return;
                };
                let Ok(exchange) = chat_node::cluster::seal::Exchange::new() else { return };
                let challenge = PeerFrame::Challenge {
                    node_id: "node-9".into(),
                    nonce: chat_node::cluster::auth::nonce(),
                    key: exchange.public_hex(),
                };
                let Ok(text) = serde_json::to_string(&challenge) else { return };
                if ws.send(Message::text(text)).await.is_err() {
                    return;
                }
                let Ok(Some(hello)) = close_or_text(&mut ws).await else { return };
                let Ok(PeerFrame::Hello { node_id, .. }) = serde_json::from_str::<PeerFrame>(&hello) else { return };
                let accepted = PeerFrame::Accepted { mac: "00".repeat(32) };
                let Ok(text) = serde_json::to_string(&accepted) else { return };
                let _ = ws.send(Message::text(text)).await;
                for frame in frames.iter() {
                    if ws.send(Message::text(frame.clone())).await.is_err() {
                        break;
                    }
                }
                let code = close_code(&mut ws).await;
                lock(&record).entry(node_id).or_default().push(code);
            });
        }
    });
    (task, seen)
}

async fn auth_failures(m: &Member) -> anyhow::Result<f64> {
    metric_of(&m.node, "chat_peer_auth_failures_total").await
}

/// Waits until `m`'s auth-failure count reaches `want`, and checks it does not go beyond.
async fn wait_auth_failures(m: &Member, want: f64) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + CONVERGE;
    loop {
        let now = auth_failures(m).await?;
        ensure!(now <= want, "{}: {now} peer auth failures counted, expected {want}", m.id);
        if now == want {
            return Ok(());
        }
        ensure!(tokio::time::Instant::now() < deadline, "{}: {now} peer auth failures counted, expected {want}", m.id);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Forged peer traffic never gets into a room: dialing `/peer` and sending well-formed
/// replication frames (a publish, a Raft append from a forged leader, a member announcement)
/// with no proof or a wrong one; answering the nodes' dials as a fake peer with a made-up proof
/// and the same frames; and a real node with a wrong secret, whose client publishes. Each
/// forged link must be refused with close 4101 and counted in `chat_peer_auth_failures_total`,
/// and no forged message may appear in any node's history, nor membership change.
#[tokio::test]
async fn a_node_with_the_wrong_secret_cannot_inject_messages() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    const ROOM: &str = "vault";
    let mut insider = Chatter::connect(&cluster.members[0].node, "insider").await?;
    insider.join(ROOM, None).await?;
    insider.publish(ROOM, "first", "legit before").await?;
    insider.pump_until("own message", |c| c.messages.len() == 1 && c.acks.len() == 1).await?;
    let peer_of = |m: &Member| SocketAddr::new(m.node.addr().ip(), cluster.ports.peer);
    let everyone: BTreeSet<String> = cluster.members.iter().map(|m| m.id.clone()).collect();
    let mut raft_ids = HashMap::new();
    for m in &cluster.members {
        let s = cluster_status(&m.node).await?;
        raft_ids.insert(m.id.clone(), u64::from_str_radix(s["raft_id"].as_str().context("raft_id")?, 16)?);
    }

    // 1. A forger dials every node: frames without any proof, then after a wrong proof.
    for m in &cluster.members {
        let before = auth_failures(m).await?;
        let target = cluster_status(&m.node).await?;
        let frames = forged_frames(&insider, ROOM, &target, &raft_ids, &format!("dial-{}", m.id))?;
        let unproven = forge_dial(peer_of(m), None, &frames).await?;
        ensure!(unproven == Some(4101), "{}: frames without a hello were answered with {unproven:?}, not 4101", m.id);
        let wrong = forge_dial(peer_of(m), Some("node-0"), &frames).await?;
        ensure!(wrong == Some(4101), "{}: a hello with a wrong proof was answered with {wrong:?}, not 4101", m.id);
        wait_auth_failures(m, before + 2.0).await?;
    }

    // 2. A forger where DNS points the nodes: each dials it and must refuse its proof.
    let fake = SocketAddr::new(loopback(7), cluster.ports.peer);
    let listener = tokio::net::TcpListener::bind(fake).await.context("bind the fake peer")?;
    let target = cluster_status(&cluster.members[1].node).await?;
    let frames = Arc::new(forged_frames(&insider, ROOM, &target, &raft_ids, "accept")?);
    let before: Vec<f64> = futures_util::future::try_join_all(cluster.members.iter().map(auth_failures)).await?;
    let (fake_task, refusals) = forge_acceptor(listener, frames);
    cluster.dns.add_record(loopback(7));
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while !everyone.iter().all(|id| lock(&refusals).get(id).is_some_and(|codes| !codes.is_empty())) {
        ensure!(tokio::time::Instant::now() < deadline, "not every node dialed the fake peer: {:?}", lock(&refusals));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cluster.dns.remove_record(loopback(7));
    for m in &cluster.members {
        wait_status(m, "forgot the fake peer", CONVERGE, |s| !s["discovered"].to_string().contains("127.0.0.7"))
            .await?;
    }
    // Let dials under way end before counting.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let settled = |r: &BTreeMap<String, Vec<Option<u16>>>| r.values().map(Vec::len).sum::<usize>();
    let mut count = settled(&lock(&refusals));
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = settled(&lock(&refusals));
        if now == count || tokio::time::Instant::now() >= deadline {
            break;
        }
        count = now;
    }
    fake_task.abort();
    let refusals = lock(&refusals).clone();
    for (m, before) in cluster.members.iter().zip(before) {
        let codes = &refusals[&m.id];
        ensure!(codes.iter().all(|c| *c == Some(4101)), "{}: the fake peer's proof was answered with {codes:?}", m.id);
        wait_auth_failures(m, before + codes.len() as f64).await?;
    }

    // 3. A real node with a wrong secret, claiming ordinal 0's voter slot.
    let before: Vec<f64> = futures_util::future::try_join_all(cluster.members.iter().map(auth_failures)).await?;
    cluster.dns.add_record(loopback(6));
    let mut cfg = cluster.config("node-0", 6, "a-different-secret-0000000000");
    cfg.cluster.ordinal = Some(0);
    cfg.validate()?;
    let intruder = NodeProcess::start_unready(&toml::to_string(&cfg)?)?;
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while intruder.http_get("/healthz").await.ok().map(|r| r.0) != Some(200) {
        ensure!(tokio::time::Instant::now() < deadline, "the intruder does not start:\n{}", intruder.output());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let intruder = Member { id: "node-0".into(), node: intruder };
    // Never ready, it lets no client in (503 `starting`): its clients cannot even try.
    let refused = chat_e2e::client::handshake_status(&format!("{}?name=mallory", intruder.node.ws_url()), &[]).await;
    ensure!(refused == 503, "the intruder answered mallory's handshake with {refused}, not 503");
    // node-0 sorts lowest: it dials everyone, and everyone refuses its proof.
    for (m, before) in cluster.members.iter().zip(before) {
        let deadline = tokio::time::Instant::now() + CONVERGE;
        while auth_failures(m).await? < before + 1.0 {
            ensure!(tokio::time::Instant::now() < deadline, "{}: the intruder's dial was not refused", m.id);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let deadline = tokio::time::Instant::now() + CONVERGE;
    while auth_failures(&intruder).await? < 1.0 {
        ensure!(tokio::time::Instant::now() < deadline, "the intruder did not see its dials refused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = cluster_status(&intruder.node).await?;
    ensure!(member_ids(&s).is_empty() && s["ready"] == false, "the intruder stays alone: {s:#}");

    // Nothing forged anywhere: the insider's next message follows its first, on every node,
    // and membership is what it was.
    insider.publish(ROOM, "second", "legit after").await?;
    insider.pump_until("own message", |c| c.messages.len() == 2 && c.acks.len() == 2).await?;
    let expected = vec![(1, "legit before".to_owned()), (2, "legit after".to_owned())];
    ensure!(insider.log() == expected, "the insider saw {:?}", insider.log());
    for m in &cluster.members {
        let mut probe = Chatter::connect(&m.node, "probe").await?;
        probe.join(ROOM, None).await?;
        let history = probe.history_through(ROOM, 2).await?;
        ensure!(history == expected, "{}: history {history:?}", m.id);
        let s = cluster_status(&m.node).await?;
        let mut others = everyone.clone();
        others.remove(&m.id);
        ensure!(member_ids(&s) == others, "{}: linked to {:?}", m.id, member_ids(&s));
        ensure!(s["ready"] == true, "{}: {s:#}", m.id);
        for g in s["groups"].as_array().context("groups")? {
            let voters: BTreeSet<String> =
                g["voters"].as_array().into_iter().flatten().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            ensure!(voters == everyone && g["learners"] == json!([]), "{}: membership changed: {g}", m.id);
        }
    }
    cluster.members.push(intruder);
    Ok(())
}

/// A TCP relay between two addresses that records every byte it carries and, when asked, flips
/// the last byte of one chunk going `from` → `to` (the end of a frame: a sealed frame's tag).
struct Tap {
    seen: Arc<Mutex<Vec<u8>>>,
    flip: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Tap {
    async fn start(listen: SocketAddr, to: SocketAddr) -> anyhow::Result<Tap> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind(listen).await?;
        let (seen, flip) = (Arc::new(Mutex::new(Vec::new())), Arc::new(AtomicBool::new(false)));
        let (record, tamper) = (seen.clone(), flip.clone());
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let Ok(outbound) = tokio::net::TcpStream::connect(to).await else { continue };
                let (mut in_read, mut in_write) = inbound.into_split();
                let (mut out_read, mut out_write) = outbound.into_split();
                let (record_up, record_down, tamper) = (record.clone(), record.clone(), tamper.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = in_read.read(&mut buf).await {
                        lock(&record_up).extend_from_slice(&buf[..n]);
                        // Only data frames: pings and handshake lines are shorter.
                        if n > 64 && tamper.swap(false, Ordering::AcqRel) {
                            buf[n - 1] ^= 0x01;
                        }
                        if out_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 * 1024];
                    while let Ok(n @ 1..) = out_read.read(&mut buf).await {
                        lock(&record_down).extend_from_slice(&buf[..n]);
                        if in_write.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Ok(Tap { seen, flip, task })
    }

    fn saw(&self, needle: &[u8]) -> bool {
        lock(&self.seen).windows(needle.len()).any(|w| w == needle)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Two nodes whose only link runs through a tap: the handshake is readable, nothing after it
/// is (chat bodies, room names and Raft traffic are sealed), and a frame altered on the way
/// ends the link, which comes back, and no altered message is ever delivered.
#[tokio::test]
async fn peer_frames_are_sealed_on_the_wire_and_an_altered_one_ends_the_link() -> anyhow::Result<()> {
    let dns = chat_e2e::dns::DnsServer::start(loopback(1), NAME).await?;
    let ports = Ports::free();
    let (dialer_ip, acceptor_ip, tap_ip) = (loopback(40), loopback(41), loopback(49));
    // The lower id dials: node-40 reaches node-41 only through the tap's address.
    dns.set_records(vec![dialer_ip, tap_ip]);
    let tap = Tap::start(SocketAddr::new(tap_ip, ports.peer), SocketAddr::new(acceptor_ip, ports.peer)).await?;
    let mut members = Vec::new();
    for (ordinal, (id, ip)) in [("node-40", dialer_ip), ("node-41", acceptor_ip)].into_iter().enumerate() {
        let mut cfg = node_config(id, ip, ports, dns.addr(), SECRET);
        cfg.cluster.size = 2;
        cfg.cluster.ordinal = Some(ordinal as u32);
        members.push(Member { id: id.to_owned(), node: start_unready_config(&cfg)? });
    }
    for m in &mut members {
        m.node.wait_ready(CONVERGE).await?;
    }
    let all: Vec<&Member> = members.iter().collect();
    wait_converged(&all, 2).await?;
    ensure!(tap.saw(b"\"challenge\""), "the tap carried the handshake (it sees the link)");

    const ROOM: &str = "sealed-room-name";
    // The writer on the acceptor: whichever node leads the room's group, the body then crosses
    // the link from the acceptor, whose WebSocket frames are not masked, so the tap would see
    // clear text. The reader on the dialer publishes the filler the tampering lands on.
    let mut writer = Chatter::connect(&members[1].node, "writer").await?;
    let mut reader = Chatter::connect(&members[0].node, "reader").await?;
    writer.join(ROOM, None).await?;
    reader.join(ROOM, None).await?;
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
    let secret_body = format!("a confidential message {nanos}");
    writer.publish(ROOM, "s1", &secret_body).await?;
    reader.pump_until("the message through the tap", |c| c.messages.values().any(|b| *b == secret_body)).await?;
    ensure!(!tap.saw(secret_body.as_bytes()), "a chat body crossed the peer link in clear text");
    ensure!(!tap.saw(ROOM.as_bytes()), "a room name crossed the peer link in clear text");

    // Alter frames on the way until one fails to open; each time the link ends and comes back.
    let acceptor = &members[1];
    let rejected = || metric_of(&acceptor.node, "chat_peer_frames_rejected_total");
    let established = metric_of(&acceptor.node, "chat_peer_links_established_total").await?;
    let mut sent = 1;
    for _ in 0..20 {
        if rejected().await? >= 1.0 {
            break;
        }
        tap.flip.store(true, Ordering::Release);
        // Traffic the flip can land on.
        for _ in 0..5 {
            sent += 1;
            reader.publish(ROOM, &format!("s{sent}"), &format!("filler {sent} {}", "x".repeat(200))).await?;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    ensure!(rejected().await? >= 1.0, "no altered frame was rejected");
    wait_converged(&all, 2).await?;
    ensure!(
        metric_of(&acceptor.node, "chat_peer_links_established_total").await? > established,
        "the link was not re-established after the altered frame"
    );
    // The cluster goes on: a new message arrives, and everything delivered is what was sent.
    writer.publish(ROOM, "after", "after the tampering").await?;
    reader
        .pump_until("a message after the tampering", |c| c.messages.values().any(|b| b == "after the tampering"))
        .await?;
    for body in reader.messages.values() {
        ensure!(
            *body == secret_body || body.starts_with("filler ") || body == "after the tampering",
            "an altered message was delivered: {body:?}"
        );
    }
    Ok(())
}

/// Starts a node from a test config without waiting for `/readyz` (a 2-node cluster is ready
/// only once both run).
fn start_unready_config(cfg: &chat_node::config::NodeConfig) -> anyhow::Result<NodeProcess> {
    cfg.validate().context("the test's own config is invalid")?;
    NodeProcess::start_unready(&toml::to_string(cfg)?)
}
