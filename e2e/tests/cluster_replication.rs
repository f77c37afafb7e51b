//! Rooms shared by real `chat-node` processes: one order per room on every node, acks only
//! after replication, resume through any node, presence and sessions across nodes, and what
//! happens on rolling restarts, crashes, partitions and scaling. Nodes find each other through
//! the test DNS server (`chat_e2e::dns`); clients are real WebSocket clients.
//!
//! Every expectation is polled against a bounded deadline; there are no fixed sleeps in the
//! assertions. Build the binary first: `cargo build -p chat-node`.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use chat_e2e::NodeProcess;
use chat_e2e::client::Client;
use chat_e2e::cluster::*;
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(15);

/// A chat client that records what it receives: messages by offset, acks by request id.
struct Chatter {
    name: String,
    client: Client,
    session: String,
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
        let mut client = Client::connect(url, token).await?;
        let welcome = client.expect_type("welcome", WAIT).await?;
        Ok(Chatter {
            name: name.to_owned(),
            client,
            session: welcome["session_id"].as_str().unwrap_or_default().to_owned(),
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
    ensure!(joined["offset"] == 9 && joined["epoch"] == epoch.as_str(), "{joined}");
    ensure!(
        back.log() == (6..=9).map(|i| (i, format!("m{i}"))).collect::<Vec<_>>(),
        "exactly the four missed: {:?}",
        back.log()
    );
    // History through any node agrees too.
    back.client.send_json(json!({"type": "history", "id": "h", "room": "news"})).await?;
    let history = back.client.recv_until("history", WAIT).await?;
    let bodies: Vec<&str> =
        history["messages"].as_array().context("messages")?.iter().filter_map(|m| m["body"].as_str()).collect();
    ensure!(bodies == (1..=9).map(|i| format!("m{i}")).collect::<Vec<_>>(), "history {bodies:?}");
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
    watcher.client.send_json(json!({"type": "presence", "id": "p", "room": "hall"})).await?;
    let presence = watcher.client.recv_until("presence", WAIT).await?;
    let names: Vec<&str> =
        presence["users"].as_array().context("users")?.iter().filter_map(|u| u["name"].as_str()).collect();
    ensure!(names == ["ann", "watcher"], "presence through node 0: {presence}");

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
        probe.client.send_json(json!({"type": "presence", "id": "p", "room": "hall"})).await?;
        let presence = probe.client.recv_until("presence", WAIT).await?;
        let names: Vec<&str> =
            presence["users"].as_array().context("users")?.iter().filter_map(|u| u["name"].as_str()).collect();
        ensure!(names == ["probe", "watcher"], "{}: no zombies: {presence}", m.id);
    }
    let joins = watcher.presence_events.iter().filter(|e| *e == &("user_joined".to_owned(), "ann".to_owned())).count();
    ensure!(joins == 1, "one user_joined for ann: {:?}", watcher.presence_events);
    Ok(())
}

#[tokio::test]
async fn a_session_token_rejoins_its_rooms_on_another_node() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start_jwt(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let mut first = Chatter::connect_as(&cluster.members[0].node, "sam").await?;
    first.join("a", None).await?;
    first.join("b", None).await?;
    first.publish("a", "1", "hello a").await?;
    first.pump_until("ack and message", |c| c.acks.len() == 1 && c.messages.len() == 1).await?;
    let session = first.session.clone();
    first.client.close().await;

    let mut writer = Chatter::connect_as(&cluster.members[1].node, "wes").await?;
    writer.join("a", None).await?;
    writer.publish("a", "2", "missed by sam").await?;
    writer.pump_until("ack", |c| c.acks.len() == 1).await?;

    // Another node and the session token; another user does not get the session.
    let url = format!("{}?session={session}", cluster.members[2].node.ws_url());
    let mut client = Client::connect(&url, Some(&user_token("sam"))).await?;
    let welcome = client.expect_type("welcome", WAIT).await?;
    ensure!(welcome["resumed"] == true && welcome["session_id"] == session.as_str(), "{welcome}");
    let mut joined = Vec::new();
    let mut missed = Vec::new();
    while joined.len() < 2 {
        let frame = client.recv_json(WAIT).await?;
        match frame["type"].as_str() {
            Some("joined") => joined.push(frame["room"].as_str().unwrap_or_default().to_owned()),
            Some("message") => missed.push(frame["body"].as_str().unwrap_or_default().to_owned()),
            _ => {}
        }
    }
    joined.sort();
    ensure!(joined == ["a", "b"], "rejoined both rooms: {joined:?}");
    ensure!(missed == ["missed by sam"], "got what was missed in a: {missed:?}");

    let mut eve = Client::connect(&url, Some(&user_token("eve"))).await?;
    let welcome = eve.expect_type("welcome", WAIT).await?;
    ensure!(welcome["resumed"] == false && welcome["session_id"] != session.as_str(), "{welcome}");
    Ok(())
}
