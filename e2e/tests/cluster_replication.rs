//! Rooms shared by real `chat-node` processes: one order per room on every node, acks only
//! after replication, resume through any node, presence and sessions across nodes, and what
//! happens on rolling restarts, crashes, partitions and scaling. Nodes find each other through
//! the test DNS server (`chat_e2e::dns`); clients are real WebSocket clients.
//!
//! Every expectation is polled against a bounded deadline; there are no fixed sleeps in the
//! assertions. Build the binary first: `cargo build -p chat-node`.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail, ensure};
use chat_e2e::NodeProcess;
use chat_e2e::client::Client;
use chat_e2e::cluster::*;
use serde_json::{Value, json};
use tokio::task::JoinHandle;

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
        Self::from_client(Client::connect(url, token).await?, name).await
    }

    async fn from_client(mut client: Client, name: &str) -> anyhow::Result<Chatter> {
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

    /// Names of the users present in `room`, as this connection's node answers.
    async fn presence_names(&mut self, room: &str) -> anyhow::Result<Vec<String>> {
        self.client.send_json(json!({"type": "presence", "id": "p", "room": room})).await?;
        let presence = self.client.recv_until("presence", WAIT).await?;
        let users = presence["users"].as_array().with_context(|| format!("users in {presence}"))?;
        Ok(users.iter().filter_map(|u| u["name"].as_str().map(str::to_owned)).collect())
    }

    /// Bodies of the room's history, as this connection's node answers.
    async fn history_bodies(&mut self, room: &str) -> anyhow::Result<Vec<String>> {
        self.client.send_json(json!({"type": "history", "id": "h", "room": room})).await?;
        let history = self.client.recv_until("history", WAIT).await?;
        let messages = history["messages"].as_array().with_context(|| format!("messages in {history}"))?;
        Ok(messages.iter().filter_map(|m| m["body"].as_str().map(str::to_owned)).collect())
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
    let bodies = back.history_bodies("news").await?;
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

#[tokio::test]
async fn a_session_token_rejoins_its_rooms_on_another_node_after_a_drain() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start_jwt(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let mut sam = Chatter::connect_as(&cluster.members[0].node, "sam").await?;
    sam.join("a", None).await?;
    sam.join("b", None).await?;
    sam.publish("a", "1", "hello a").await?;
    sam.pump_until("ack and message", |c| c.acks.len() == 1 && c.messages.len() == 1).await?;
    let session = sam.session.clone();

    // Sam's node drains: the server flushes, closes with 4000, and records where Sam was.
    cluster.members[0].node.terminate();
    let close = sam.client.recv_close(WAIT).await;
    ensure!(close.as_ref().is_some_and(|(code, _)| *code == 4000), "drain closes with 4000: {close:?}");
    cluster.members[0].node.wait_exit(WAIT).await?;
    cluster.members.remove(0);

    let mut wes = Chatter::connect_as(&cluster.members[0].node, "wes").await?;
    wes.join("a", None).await?;
    wes.publish("a", "2", "missed by sam").await?;
    wes.pump_until("ack", |c| c.acks.len() == 1).await?;

    // Another node and the session token: both rooms back, with only what was missed.
    let url = format!("{}?session={session}", cluster.members[1].node.ws_url());
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
    ensure!(missed == ["missed by sam"], "got exactly what was missed in a: {missed:?}");

    // Another user presenting Sam's token gets a fresh session.
    let mut eve = Client::connect(&url, Some(&user_token("eve"))).await?;
    let welcome = eve.expect_type("welcome", WAIT).await?;
    ensure!(welcome["resumed"] == false && welcome["session_id"] != session.as_str(), "{welcome}");
    Ok(())
}

// ---------- c. continuous load across restarts, crashes and scaling ----------

const LOAD_ROOM: &str = "load";

/// Node URLs the load's clients may use; tests change it as nodes come and go.
type Urls = Arc<Mutex<Vec<String>>>;

/// What a subscriber saw over its whole life, across reconnects.
struct Seen {
    name: String,
    messages: BTreeMap<u64, String>,
    arrivals: Vec<u64>,
    reconnects: usize,
    problems: Vec<String>,
}

/// One publisher (one message in flight, acked or refused before the next) and subscribers,
/// each moving to another node whenever its node goes away and resuming with `since`.
struct Load {
    stop: Arc<AtomicBool>,
    /// The highest acked offset, once publishing stopped: subscribers read up to it.
    target: Arc<AtomicU64>,
    acked_count: Arc<AtomicU64>,
    publisher: JoinHandle<anyhow::Result<(BTreeMap<u64, String>, u64)>>,
    subscribers: Vec<JoinHandle<Seen>>,
}

fn pick(urls: &Urls, i: usize) -> Option<String> {
    let urls = urls.lock().unwrap_or_else(|p| p.into_inner());
    (!urls.is_empty()).then(|| urls[i % urls.len()].clone())
}

fn is_timeout(err: &anyhow::Error) -> bool {
    err.to_string().starts_with("no frame within")
}

impl Load {
    async fn start(urls: Urls, subscribers: usize) -> anyhow::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let target = Arc::new(AtomicU64::new(0));
        let mut subs = Vec::new();
        for i in 0..subscribers {
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
            subs.push(tokio::spawn(subscribe(urls.clone(), i, stop.clone(), target.clone(), ready_tx)));
            ready_rx.await.context("subscriber failed to join")?;
        }
        let acked_count = Arc::new(AtomicU64::new(0));
        let publisher = tokio::spawn(publish_loop(urls, stop.clone(), acked_count.clone()));
        Ok(Load { stop, target, acked_count, publisher, subscribers: subs })
    }

    /// Waits until `more` further messages were acked.
    async fn wait_acks(&self, more: u64) -> anyhow::Result<()> {
        let goal = self.acked_count.load(Ordering::Relaxed) + more;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while self.acked_count.load(Ordering::Relaxed) < goal {
            ensure!(
                tokio::time::Instant::now() < deadline,
                "publishing stalled at {} acks, below {goal}",
                self.acked_count.load(Ordering::Relaxed)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Stops publishing, lets subscribers catch up, and checks what everyone saw: every acked
    /// message at its offset for every subscriber, each delivered once, in order.
    async fn finish(self) -> anyhow::Result<(BTreeMap<u64, String>, Vec<Seen>)> {
        self.stop.store(true, Ordering::Release);
        let (acked, unknown) = self.publisher.await??;
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
            for (offset, body) in &acked {
                ensure!(
                    s.messages.get(offset) == Some(body),
                    "{}: acked offset {offset} ({body}) missing or different: {:?}",
                    s.name,
                    s.messages.get(offset)
                );
            }
            ensure!(s.messages.keys().copied().eq(1..=s.messages.len() as u64), "{}: gaps in offsets", s.name);
        }
        for pair in seen.windows(2) {
            let common = pair[0].messages.len().min(pair[1].messages.len()) as u64;
            for offset in 1..=common {
                ensure!(pair[0].messages[&offset] == pair[1].messages[&offset], "subscribers disagree at {offset}");
            }
        }
        eprintln!(
            "load: {} acked, {unknown} refused or unanswered, reconnects {:?}",
            acked.len(),
            seen.iter().map(|s| s.reconnects).collect::<Vec<_>>()
        );
        Ok((acked, seen))
    }
}

async fn publish_loop(
    urls: Urls,
    stop: Arc<AtomicBool>,
    acked_count: Arc<AtomicU64>,
) -> anyhow::Result<(BTreeMap<u64, String>, u64)> {
    let mut acked = BTreeMap::new();
    let (mut n, mut unknown, mut attempt) = (0u64, 0u64, 0usize);
    'connect: while !stop.load(Ordering::Acquire) {
        attempt += 1;
        let Some(url) = pick(&urls, attempt) else { break };
        let Ok(mut c) = Chatter::connect_url(&format!("{url}?name=publisher"), "publisher", None).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        if c.join(LOAD_ROOM, None).await.is_err() {
            continue;
        }
        while !stop.load(Ordering::Acquire) {
            n += 1;
            let (id, body) = (format!("m{n}"), format!("body {n}"));
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
                        acked.insert(frame["offset"].as_u64().context("ack offset")?, body);
                        acked_count.fetch_add(1, Ordering::Relaxed);
                    }
                    Some("error") if frame["code"] == "unavailable" => {
                        unknown += 1;
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    _ => bail!("unexpected answer to a publish: {frame}"),
                }
                break;
            }
            // About 200 messages per second: enough churn, and resumes stay in the window.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    Ok((acked, unknown))
}

async fn subscribe(
    urls: Urls,
    index: usize,
    stop: Arc<AtomicBool>,
    target: Arc<AtomicU64>,
    ready: tokio::sync::oneshot::Sender<()>,
) -> Seen {
    let name = format!("sub{index}");
    let mut seen = Seen {
        name: name.clone(),
        messages: BTreeMap::new(),
        arrivals: Vec::new(),
        reconnects: 0,
        problems: Vec::new(),
    };
    let mut ready = Some(ready);
    let mut epoch: Option<String> = None;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let mut attempt = index;
    while tokio::time::Instant::now() < deadline {
        let done = stop.load(Ordering::Acquire) && {
            let t = target.load(Ordering::Acquire);
            t > 0 && seen.messages.keys().next_back().is_some_and(|last| *last >= t)
        };
        if done {
            break;
        }
        let Some(url) = pick(&urls, attempt) else { break };
        attempt += 1;
        let Ok(mut c) = Chatter::connect_url(&format!("{url}?name={name}"), &name, None).await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let since = epoch.clone().zip(seen.messages.keys().next_back().copied().or(Some(0)));
        let joined = match c.join(LOAD_ROOM, since.clone()).await {
            Ok(joined) => joined,
            Err(_) => continue,
        };
        if since.is_some() && joined["recovered"] != true {
            seen.problems.push(format!("resume from {since:?} not recovered: {joined}"));
        }
        epoch = joined["epoch"].as_str().map(str::to_owned);
        if let Some(ready) = ready.take() {
            let _ = ready.send(());
        } else {
            seen.reconnects += 1;
        }
        absorb(&mut seen, &mut c);
        loop {
            let t = target.load(Ordering::Acquire);
            if stop.load(Ordering::Acquire) && t > 0 && seen.messages.keys().next_back().is_some_and(|l| *l >= t) {
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                seen.problems.push(format!("did not reach offset {t} in time"));
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

#[tokio::test]
async fn rolling_restart_under_load_loses_no_acked_message() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let urls: Urls = Arc::new(Mutex::new(cluster.members.iter().map(member_url).collect()));
    let load = Load::start(urls, 3).await?;
    load.wait_acks(50).await?;

    for i in 0..cluster.members.len() {
        let id = cluster.members[i].id.clone();
        cluster.members[i].node.terminate();
        cluster.members[i].node.wait_exit(Duration::from_secs(10)).await?;
        load.wait_acks(30).await.with_context(|| format!("while {id} is down"))?;
        let cfg = cluster.config(&id, last_octet(&id)?, SECRET);
        cluster.members[i].node = start(&cfg).await?;
        wait_converged(&cluster.all(), 3).await?;
        load.wait_acks(30).await.with_context(|| format!("after {id} came back"))?;
    }
    let (_, seen) = load.finish().await?;
    ensure!(seen.iter().all(|s| s.reconnects >= 1), "every subscriber had to move at least once");
    Ok(())
}

#[tokio::test]
async fn kill_9_under_load_loses_no_acked_message() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let urls: Urls = Arc::new(Mutex::new(cluster.members.iter().map(member_url).collect()));
    let load = Load::start(urls.clone(), 3).await?;
    if let Err(err) = load.wait_acks(50).await {
        for m in &cluster.members {
            eprintln!("--- {} ---\n{}", m.id, m.node.output());
        }
        return Err(err);
    }

    // Kill the node that owns the room, the hardest case: the owner has entries in flight.
    let owner = owner_of(&cluster, LOAD_ROOM).await?;
    let victim = cluster.members.remove(owner);
    urls.lock().unwrap_or_else(|p| p.into_inner()).retain(|u| *u != member_url(&victim));
    victim.node.kill();
    load.wait_acks(50).await.context("after the owner was killed")?;
    let (_, seen) = load.finish().await?;
    ensure!(seen.iter().any(|s| s.reconnects >= 1), "the killed node's subscriber resumed elsewhere");
    Ok(())
}

/// Index of the member that sequences `room` (from its `chat_rooms_owned` gauge).
async fn owner_of(cluster: &LoopbackCluster, room: &str) -> anyhow::Result<usize> {
    for (i, m) in cluster.members.iter().enumerate() {
        let (_, body) = m.node.http_get("/cluster").await?;
        let status: Value = serde_json::from_str(&body)?;
        if status["owned_rooms"].as_array().is_some_and(|rooms| rooms.iter().any(|r| r == room)) {
            return Ok(i);
        }
    }
    bail!("no node owns {room}")
}

#[tokio::test]
async fn scale_one_to_three_to_one_under_load() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(1).await?;
    let urls: Urls = Arc::new(Mutex::new(vec![member_url(&cluster.members[0])]));
    let load = Load::start(urls.clone(), 2).await?;
    load.wait_acks(40).await?;

    for last in [3u8, 4] {
        cluster.dns.add_record(loopback(last));
        let cfg = cluster.config(&format!("node-{last}"), last, SECRET);
        let node = start(&cfg).await?;
        cluster.members.push(Member { id: format!("node-{last}"), node });
        urls.lock().unwrap_or_else(|p| p.into_inner()).push(member_url(&cluster.members[cluster.members.len() - 1]));
    }
    wait_converged(&cluster.all(), 3).await?;
    load.wait_acks(40).await.context("at three nodes")?;

    for last in [4u8, 3] {
        let mut gone = cluster.members.pop().context("a node to remove")?;
        urls.lock().unwrap_or_else(|p| p.into_inner()).retain(|u| *u != member_url(&gone));
        gone.node.terminate();
        gone.node.wait_exit(Duration::from_secs(10)).await?;
        cluster.dns.remove_record(loopback(last));
    }
    wait_converged(&cluster.all(), 1).await?;
    load.wait_acks(40).await.context("back at one node")?;
    load.finish().await?;
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

#[tokio::test]
async fn partition_minority_refuses_publishes_and_converges_after_heal() -> anyhow::Result<()> {
    let cluster = NetnsCluster::start(3).await?;
    let (net, all) = (&cluster.net, cluster.all());

    let mut chatters = Vec::new();
    for (i, host) in net.hosts().iter().enumerate() {
        let mut c = chatter_in(&host.ns, &format!("user{i}")).await?;
        c.join("ops", None).await?;
        chatters.push(c);
    }
    chatters[0].publish("ops", "before", "before the partition").await?;
    for c in &mut chatters {
        c.pump_until("the first message", |c| c.messages.len() == 1).await?;
    }

    net.partition(2)?;
    let (isolated, majority) = all.split_last().context("three")?;
    wait_converged(majority, 3).await?;
    wait_status(isolated, "without quorum", CONVERGE, |s| s["quorum"] == false).await?;

    // The minority refuses writes; the majority keeps taking them.
    chatters[2].publish("ops", "minority", "written on the minority side").await?;
    chatters[2].pump_until("a refusal", |c| !c.errors.is_empty()).await?;
    ensure!(chatters[2].errors[0]["code"] == "unavailable", "minority publish: {:?}", chatters[2].errors);
    for i in 1..=5 {
        chatters[0].publish("ops", &format!("m{i}"), &format!("during the partition {i}")).await?;
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
    chatters[2].publish("ops", "after", "written after the heal").await?;
    for c in &mut chatters {
        let got = c.pump_until("the post-heal message", |c| c.messages.len() == 7).await;
        if let Err(err) = got {
            let logs: Vec<String> = all.iter().map(|m| format!("--- {} ---\n{}", m.id, m.node.output())).collect();
            return Err(err.context(logs.join("\n")));
        }
    }
    ensure!(chatters[0].log() == chatters[2].log(), "one order after the heal");
    Ok(())
}

#[tokio::test]
async fn a_node_with_the_wrong_secret_cannot_inject_messages() -> anyhow::Result<()> {
    let mut cluster = LoopbackCluster::start(3).await?;
    wait_converged(&cluster.all(), 3).await?;
    let mut insider = Chatter::connect(&cluster.members[0].node, "insider").await?;
    insider.join("vault", None).await?;

    cluster.dns.add_record(loopback(6));
    let cfg = cluster.config("node-0", 6, "a-different-secret-0000000000");
    let intruder = start(&cfg).await?;
    let mut mallory = Chatter::connect(&intruder, "mallory").await?;
    mallory.join("vault", None).await.ok();
    mallory.publish("vault", "x", "injected").await?;
    mallory.pump_until("a refusal", |c| !c.errors.is_empty() || !c.acks.is_empty()).await?;
    ensure!(mallory.acks.is_empty(), "the intruder alone cannot commit: {:?}", mallory.acks);

    insider.publish("vault", "ok", "legit").await?;
    insider.pump_until("own message", |c| c.messages.len() == 1).await?;
    for m in &cluster.members {
        let mut probe = Chatter::connect(&m.node, "probe").await?;
        probe.join("vault", None).await?;
        let bodies = probe.history_bodies("vault").await?;
        ensure!(!bodies.iter().any(|b| b == "injected"), "{}: {bodies:?}", m.id);
    }
    cluster.members.push(Member { id: "node-0".into(), node: intruder });
    Ok(())
}
