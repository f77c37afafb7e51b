//! Protocol v1 against a real `chat-node` process, with real WebSocket clients: chat, resume,
//! history, presence, auth, protocol errors, limits, slow consumers, idle timeouts and drain.
//!
//! Every test starts its own node on a free loopback port with limits small enough that it runs
//! in a second or two. Build the binary first: `cargo build -p chat-node`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_e2e::client::{Client, SUBPROTOCOL, handshake_status, http_get};
use chat_e2e::{NodeProcess, free_port, mint_token};
use chat_node::config::{AuthMode, NodeConfig, RoomRule};
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

/// Upper bound for any single expected event; generous because CI machines are small.
const T: Duration = Duration::from_secs(5);
const SECRET: &str = "e2e-test-secret-0123456789";

// ---------- helpers ----------

fn anonymous_config() -> NodeConfig {
    let mut cfg = NodeConfig {
        listen: ([127, 0, 0, 1], free_port()).into(),
        node_id: Some("e2e-node".into()),
        ..NodeConfig::default()
    };
    cfg.auth.mode = AuthMode::Anonymous;
    cfg.drain.deadline_secs = 5;
    cfg
}

fn jwt_config() -> NodeConfig {
    let mut cfg = anonymous_config();
    cfg.auth.mode = AuthMode::Jwt;
    cfg.auth.jwt_secret = Some(SECRET.into());
    cfg
}

async fn start(cfg: &NodeConfig) -> anyhow::Result<NodeProcess> {
    cfg.validate().context("the test's own config is invalid")?;
    let text = toml::to_string(cfg)?;
    NodeProcess::start(&text).await
}

fn anon_url(node: &NodeProcess, name: &str) -> String {
    format!("{}?name={name}", node.ws_url())
}

/// Connects in anonymous mode and reads the `welcome` frame.
async fn anon(node: &NodeProcess, name: &str) -> anyhow::Result<(Client, Value)> {
    let mut c = Client::connect(&anon_url(node, name), None).await?;
    let welcome = c.expect_type("welcome", T).await?;
    ensure!(welcome["user"]["name"] == name, "welcome names the user: {welcome}");
    Ok((c, welcome))
}

/// Connects with a token and reads the `welcome` frame.
async fn with_token(node: &NodeProcess, token: &str) -> anyhow::Result<(Client, Value)> {
    let mut c = Client::connect(&node.ws_url(), Some(token)).await?;
    let welcome = c.expect_type("welcome", T).await?;
    Ok((c, welcome))
}

fn token(sub: &str, roles: &[&str]) -> String {
    mint_token(SECRET, sub, &format!("{sub}-name"), roles, 3600)
}

/// The next frame that is not a presence event (`user_joined`/`user_left`).
async fn next_frame(c: &mut Client) -> anyhow::Result<Value> {
    loop {
        let f = c.recv_json(T).await?;
        if f["type"] != "user_joined" && f["type"] != "user_left" {
            return Ok(f);
        }
    }
}

/// Joins `room` and returns the `joined` frame (presence events before it are skipped).
async fn join(c: &mut Client, room: &str) -> anyhow::Result<Value> {
    let id = format!("join-{room}");
    c.send_json(json!({"type": "join", "id": id, "room": room})).await?;
    let f = next_frame(c).await?;
    ensure!(f["type"] == "joined" && f["id"] == id && f["room"] == room, "expected joined, got {f}");
    Ok(f)
}

/// Publishes and waits for the `ack`; the sender's own copy of the `message` is consumed too.
async fn publish(c: &mut Client, room: &str, body: &str) -> anyhow::Result<Value> {
    let id = format!("pub-{}", body.chars().take(32).collect::<String>());
    c.send_json(json!({"type": "publish", "id": id, "room": room, "body": body})).await?;
    let mut ack = None;
    let mut echoed = false;
    while ack.is_none() || !echoed {
        let f = next_frame(c).await?;
        match f["type"].as_str() {
            Some("ack") => {
                ensure!(f["id"] == id, "ack for another request: {f}");
                ack = Some(f);
            }
            Some("message") if f["body"] == body => echoed = true,
            _ => bail!("unexpected frame while publishing {body:?}: {f}"),
        }
    }
    Ok(ack.expect("loop ends with an ack"))
}

fn offset(f: &Value) -> u64 {
    f["offset"].as_u64().unwrap_or(u64::MAX)
}

/// Status and headers+body of a plain GET.
async fn get(node: &NodeProcess, path: &str) -> anyhow::Result<(u16, String)> {
    http_get(node.addr(), path).await
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut cond: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond().await {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    bail!("timed out after {timeout:?} waiting for {what}")
}

/// Sum of the samples of every metric whose name contains `needle`.
fn metric_sum(metrics: &str, needle: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            name.contains(needle).then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

// ---------- chat ----------

#[tokio::test]
async fn two_clients_chat_in_order_with_acks() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut alice, welcome) = anon(&node, "alice").await?;
    assert_eq!(welcome["protocol"], SUBPROTOCOL, "{welcome}");
    assert_eq!(welcome["node_id"], "e2e-node", "{welcome}");
    assert!(welcome["session_id"].as_str().is_some_and(|s| !s.is_empty()), "{welcome}");
    assert!(welcome["ping_interval_secs"].as_u64().is_some(), "{welcome}");
    assert!(welcome["user"]["id"].as_str().is_some_and(|s| s.starts_with("anon-")), "{welcome}");
    let (mut bob, _) = anon(&node, "bob").await?;

    let joined = join(&mut alice, "general").await?;
    assert_eq!(joined["offset"], 0, "a new room starts at offset 0: {joined}");
    assert_eq!(joined["recovered"], false, "{joined}");
    let epoch = joined["epoch"].as_str().context("joined has an epoch")?.to_owned();
    let joined_bob = join(&mut bob, "general").await?;
    assert_eq!(joined_bob["epoch"], epoch.as_str());

    let bodies = ["one", "two", "three"];
    for (i, body) in bodies.iter().enumerate() {
        let ack = publish(&mut alice, "general", body).await?;
        assert_eq!(ack["room"], "general", "{ack}");
        assert_eq!(ack["epoch"], epoch.as_str(), "{ack}");
        assert_eq!(offset(&ack), i as u64 + 1, "offsets are 1, 2, 3: {ack}");
    }
    for (i, body) in bodies.iter().enumerate() {
        let m = next_frame(&mut bob).await?;
        assert_eq!(m["type"], "message", "{m}");
        assert_eq!(m["body"], *body, "in publish order: {m}");
        assert_eq!(offset(&m), i as u64 + 1, "{m}");
        assert_eq!(m["epoch"], epoch.as_str(), "{m}");
        assert_eq!(m["room"], "general", "{m}");
        assert_eq!(m["sender"]["name"], "alice", "{m}");
        assert!(m["ts"].as_u64().is_some_and(|ts| ts > 1_600_000_000_000), "ts in ms: {m}");
    }

    // And the other way round.
    let ack = publish(&mut bob, "general", "hi alice").await?;
    assert_eq!(offset(&ack), 4);
    let m = next_frame(&mut alice).await?;
    assert_eq!((m["body"].as_str(), m["sender"]["name"].as_str()), (Some("hi alice"), Some("bob")));

    // ping/pong with an id.
    alice.send_json(json!({"type": "ping", "id": "p-1"})).await?;
    let pong = next_frame(&mut alice).await?;
    assert_eq!(pong, json!({"type": "pong", "id": "p-1"}));
    Ok(())
}

#[tokio::test]
async fn publish_before_join_is_not_joined_and_leave_answers_left() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut c, _) = anon(&node, "carl").await?;
    c.send_json(json!({"type": "publish", "id": "x", "room": "r", "body": "b"})).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("not_joined"), Some("x")),
        "{e}"
    );
    c.send_json(json!({"type": "join", "id": "bad", "room": "no spaces"})).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("invalid_room")), "{e}");
    join(&mut c, "r").await?;
    c.send_json(json!({"type": "leave", "id": "l", "room": "r"})).await?;
    let left = next_frame(&mut c).await?;
    assert_eq!(left, json!({"type": "left", "id": "l", "room": "r"}));
    Ok(())
}

// ---------- resume and history ----------

#[tokio::test]
async fn resume_after_disconnect_gets_exactly_the_missed_messages() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut alice, _) = anon(&node, "alice").await?;
    let (mut bob, _) = anon(&node, "bob").await?;
    let epoch = join(&mut alice, "r").await?["epoch"].as_str().unwrap_or_default().to_owned();
    join(&mut bob, "r").await?;
    publish(&mut alice, "r", "m1").await?;
    let m1 = next_frame(&mut bob).await?;
    assert_eq!((m1["body"].as_str(), offset(&m1)), (Some("m1"), 1), "{m1}");
    bob.close().await;

    publish(&mut alice, "r", "m2").await?;
    publish(&mut alice, "r", "m3").await?;

    let (mut bob, _) = anon(&node, "bob").await?;
    bob.send_json(json!({"type": "join", "id": "rj", "room": "r", "since": {"epoch": epoch, "offset": 1}})).await?;
    let mut missed = Vec::new();
    let joined = loop {
        let f = next_frame(&mut bob).await?;
        match f["type"].as_str() {
            Some("message") => missed.push(f),
            Some("joined") => break f,
            _ => bail!("unexpected frame during resume: {f}"),
        }
    };
    let got: Vec<(u64, &str)> = missed.iter().map(|m| (offset(m), m["body"].as_str().unwrap_or(""))).collect();
    assert_eq!(got, vec![(2, "m2"), (3, "m3")], "exactly the missed messages, in order");
    assert_eq!(joined["recovered"], true, "{joined}");
    assert_eq!(joined["id"], "rj", "{joined}");
    assert_eq!(joined["epoch"], epoch.as_str(), "{joined}");
    assert_eq!(offset(&joined), 3, "{joined}");

    // Live delivery continues after the join, with no duplicates.
    publish(&mut alice, "r", "m4").await?;
    let m4 = next_frame(&mut bob).await?;
    assert_eq!((m4["body"].as_str(), offset(&m4)), (Some("m4"), 4), "{m4}");
    Ok(())
}

#[tokio::test]
async fn resume_with_unknown_epoch_is_not_recovered() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut alice, _) = anon(&node, "alice").await?;
    join(&mut alice, "r").await?;
    publish(&mut alice, "r", "a").await?;
    publish(&mut alice, "r", "b").await?;

    let (mut bob, _) = anon(&node, "bob").await?;
    bob.send_json(json!({"type": "join", "id": "j", "room": "r", "since": {"epoch": "no-such-epoch", "offset": 7}}))
        .await?;
    let mut sent = Vec::new();
    let joined = loop {
        let f = next_frame(&mut bob).await?;
        match f["type"].as_str() {
            Some("message") => sent.push(offset(&f)),
            Some("joined") => break f,
            _ => bail!("unexpected frame during resume: {f}"),
        }
    };
    assert_eq!(joined["recovered"], false, "{joined}");
    assert_eq!(offset(&joined), 2, "{joined}");
    assert_eq!(sent, vec![1, 2], "the messages the node still has");
    Ok(())
}

#[tokio::test]
async fn resume_past_the_history_ring_is_not_recovered() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.history.size = 3;
    let node = start(&cfg).await?;
    let (mut alice, _) = anon(&node, "alice").await?;
    let epoch = join(&mut alice, "r").await?["epoch"].as_str().unwrap_or_default().to_owned();
    for i in 1..=6 {
        publish(&mut alice, "r", &format!("m{i}")).await?;
    }
    let (mut bob, _) = anon(&node, "bob").await?;
    bob.send_json(json!({"type": "join", "room": "r", "since": {"epoch": epoch, "offset": 1}})).await?;
    let mut sent = Vec::new();
    let joined = loop {
        let f = next_frame(&mut bob).await?;
        match f["type"].as_str() {
            Some("message") => sent.push(offset(&f)),
            Some("joined") => break f,
            _ => bail!("unexpected frame during resume: {f}"),
        }
    };
    assert_eq!(sent, vec![4, 5, 6], "what is left in the ring");
    assert_eq!(joined["recovered"], false, "{joined}");

    bob.send_json(json!({"type": "history", "id": "h", "room": "r"})).await?;
    let h = next_frame(&mut bob).await?;
    assert_eq!(h["type"], "history", "{h}");
    let offsets: Vec<u64> = h["messages"].as_array().map(|a| a.iter().map(offset).collect()).unwrap_or_default();
    assert_eq!(offsets, vec![4, 5, 6], "{h}");
    assert_eq!(h["complete"], false, "older messages were dropped: {h}");
    Ok(())
}

#[tokio::test]
async fn history_requests() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut alice, _) = anon(&node, "alice").await?;
    let epoch = join(&mut alice, "hist").await?["epoch"].as_str().unwrap_or_default().to_owned();
    for i in 1..=5 {
        publish(&mut alice, "hist", &format!("h{i}")).await?;
    }
    let (mut bob, _) = anon(&node, "bob").await?;
    join(&mut bob, "hist").await?;

    let ask = |id: &str, extra: Value| {
        let mut req = json!({"type": "history", "id": id, "room": "hist"});
        if let (Some(obj), Some(more)) = (req.as_object_mut(), extra.as_object()) {
            obj.extend(more.clone());
        }
        req
    };
    let bodies = |h: &Value| -> Vec<String> {
        h["messages"]
            .as_array()
            .map(|a| a.iter().map(|m| m["body"].as_str().unwrap_or("").to_owned()).collect())
            .unwrap_or_default()
    };

    bob.send_json(ask("all", json!({}))).await?;
    let h = next_frame(&mut bob).await?;
    assert_eq!(
        (h["type"].as_str(), h["id"].as_str(), h["room"].as_str()),
        (Some("history"), Some("all"), Some("hist")),
        "{h}"
    );
    assert_eq!(h["epoch"], epoch.as_str(), "{h}");
    assert_eq!(bodies(&h), ["h1", "h2", "h3", "h4", "h5"], "{h}");
    assert_eq!(h["complete"], true, "{h}");
    assert_eq!(h["messages"][0]["sender"]["name"], "alice", "{h}");

    bob.send_json(ask("last2", json!({"limit": 2}))).await?;
    let h = next_frame(&mut bob).await?;
    assert_eq!(h["id"], "last2", "{h}");
    assert_eq!(bodies(&h), ["h4", "h5"], "the last `limit` messages: {h}");

    bob.send_json(ask("since3", json!({"since": {"epoch": epoch, "offset": 3}}))).await?;
    let h = next_frame(&mut bob).await?;
    assert_eq!(h["id"], "since3", "{h}");
    assert_eq!(bodies(&h), ["h4", "h5"], "the messages after offset 3: {h}");
    Ok(())
}

// ---------- presence ----------

#[tokio::test]
async fn presence_lists_users_and_events_come_once_per_user() -> anyhow::Result<()> {
    let node = start(&jwt_config()).await?;
    let (mut carol, _) = with_token(&node, &token("carol", &[])).await?;
    join(&mut carol, "p").await?;

    // Presence of a room not joined is refused.
    let (mut other, _) = with_token(&node, &token("dave", &[])).await?;
    other.send_json(json!({"type": "presence", "id": "np", "room": "p"})).await?;
    let e = next_frame(&mut other).await?;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("not_joined")), "{e}");

    let alice_token = token("alice", &[]);
    let (mut alice1, _) = with_token(&node, &alice_token).await?;
    let (mut alice2, _) = with_token(&node, &alice_token).await?;
    let (mut bob, _) = with_token(&node, &token("bob", &[])).await?;

    join(&mut alice1, "p").await?;
    let ev = user_joined_other_than(&mut carol, "carol").await?;
    assert_eq!((ev["room"].as_str(), ev["user"]["id"].as_str()), (Some("p"), Some("alice")), "{ev}");
    assert_eq!(ev["user"]["name"], "alice-name", "{ev}");
    // alice's second connection is not a new user; bob's join is the next event carol sees.
    join(&mut alice2, "p").await?;
    join(&mut bob, "p").await?;
    let ev = user_joined_other_than(&mut carol, "carol").await?;
    assert_eq!(ev["user"]["id"], "bob", "no second user_joined for alice: {ev}");

    carol.send_json(json!({"type": "presence", "id": "who", "room": "p"})).await?;
    let p = carol.expect_type("presence", T).await?;
    assert_eq!((p["id"].as_str(), p["room"].as_str()), (Some("who"), Some("p")), "{p}");
    let mut ids: Vec<&str> = p["users"].as_array().context("users")?.iter().filter_map(|u| u["id"].as_str()).collect();
    ids.sort_unstable();
    assert_eq!(ids, ["alice", "bob", "carol"], "each user once: {p}");

    // alice's first connection goes away: she is still present through the second.
    alice1.close().await;
    // Her second one leaves: now she is gone.
    alice2.send_json(json!({"type": "leave", "id": "bye", "room": "p"})).await?;
    alice2.recv_until("left", T).await?;
    // bob leaves by disconnecting.
    bob.close().await;

    let mut events: HashMap<(String, String), usize> = HashMap::new();
    let deadline = Instant::now() + T;
    while !events.contains_key(&("user_left".into(), "bob".into())) {
        let f = carol.recv_json(deadline.saturating_duration_since(Instant::now())).await?;
        let key = (f["type"].as_str().unwrap_or("").to_owned(), f["user"]["id"].as_str().unwrap_or("").to_owned());
        *events.entry(key).or_default() += 1;
    }
    // A sentinel round trip so that any duplicate event would have arrived by now.
    carol.send_json(json!({"type": "presence", "id": "after", "room": "p"})).await?;
    let p = loop {
        let f = carol.recv_json(T).await?;
        if f["type"] == "presence" {
            break f;
        }
        let key = (f["type"].as_str().unwrap_or("").to_owned(), f["user"]["id"].as_str().unwrap_or("").to_owned());
        *events.entry(key).or_default() += 1;
    };
    let left = |id: &str| events.get(&("user_left".to_owned(), id.to_owned())).copied().unwrap_or(0);
    assert_eq!(left("alice"), 1, "one user_left for alice's two connections: {events:?}");
    assert_eq!(left("bob"), 1, "{events:?}");
    assert_eq!(events.len(), 2, "only user_left events: {events:?}");
    let ids: Vec<&str> = p["users"].as_array().context("users")?.iter().filter_map(|u| u["id"].as_str()).collect();
    assert_eq!(ids, ["carol"], "{p}");
    Ok(())
}

/// The next `user_joined` about someone else (a node may tell a user about their own join).
async fn user_joined_other_than(c: &mut Client, me: &str) -> anyhow::Result<Value> {
    loop {
        let f = c.recv_json(T).await?;
        ensure!(f["type"] == "user_joined", "expected user_joined, got {f}");
        if f["user"]["id"] != me {
            return Ok(f);
        }
    }
}

// ---------- auth ----------

fn auth_config() -> NodeConfig {
    let mut cfg = jwt_config();
    cfg.auth.connect_roles = vec!["chat".into()];
    cfg.auth.rooms = vec![
        RoomRule { pattern: "ops-*".into(), join_roles: vec!["ops".into()], publish_roles: vec![] },
        RoomRule { pattern: "announce".into(), join_roles: vec![], publish_roles: vec!["admin".into()] },
    ];
    cfg
}

#[tokio::test]
async fn handshake_auth_failures() -> anyhow::Result<()> {
    let node = start(&auth_config()).await?;
    let url = node.ws_url();
    let sp = ("Sec-WebSocket-Protocol", SUBPROTOCOL);
    let bearer = |t: &str| format!("Bearer {t}");

    assert_eq!(handshake_status(&url, &[sp]).await, 401, "missing token");
    let forged = mint_token("another-secret-0123456789", "mallory", "m", &["chat"], 3600);
    assert_eq!(handshake_status(&url, &[sp, ("Authorization", &bearer(&forged))]).await, 401, "bad signature");
    let expired = mint_token(SECRET, "old", "old", &["chat"], -3600);
    assert_eq!(handshake_status(&url, &[sp, ("Authorization", &bearer(&expired))]).await, 401, "expired");
    assert_eq!(handshake_status(&format!("{url}?token=garbage"), &[sp]).await, 401, "not a JWT");
    let guest = token("guest", &["guest"]);
    assert_eq!(handshake_status(&url, &[sp, ("Authorization", &bearer(&guest))]).await, 403, "no connect role");

    let ok = token("ok", &["chat"]);
    assert_eq!(handshake_status(&url, &[sp, ("Authorization", &bearer(&ok))]).await, 101, "valid header token");
    assert_eq!(handshake_status(&format!("{url}?token={ok}"), &[sp]).await, 101, "valid query token");

    // The refusal body is JSON with a stable code.
    let (status, body) = raw_handshake(node.addr(), "/ws", &[("Sec-WebSocket-Protocol", SUBPROTOCOL)]).await?;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("\"missing_token\""), "{body}");
    Ok(())
}

#[tokio::test]
async fn token_in_query_and_per_room_rules() -> anyhow::Result<()> {
    let node = start(&auth_config()).await?;
    // A token in the query string (what browsers do).
    let t = token("user", &["chat"]);
    let mut user = Client::connect(&format!("{}?token={t}", node.ws_url()), None).await?;
    let welcome = user.expect_type("welcome", T).await?;
    assert_eq!(welcome["user"], json!({"id": "user", "name": "user-name"}), "{welcome}");
    assert_eq!(welcome["roles"], json!(["chat"]), "{welcome}");

    user.send_json(json!({"type": "join", "id": "j-ops", "room": "ops-eu"})).await?;
    let e = next_frame(&mut user).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("forbidden"), Some("j-ops")),
        "{e}"
    );
    // Open rooms and rooms with publish rules can be joined.
    join(&mut user, "lobby").await?;
    join(&mut user, "announce").await?;
    user.send_json(json!({"type": "publish", "id": "p-ann", "room": "announce", "body": "hello"})).await?;
    let e = next_frame(&mut user).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("forbidden"), Some("p-ann")),
        "{e}"
    );
    publish(&mut user, "lobby", "fine here").await?;

    let (mut ops, _) = with_token(&node, &token("op", &["chat", "ops", "admin"])).await?;
    join(&mut ops, "ops-eu").await?;
    publish(&mut ops, "ops-eu", "ops only").await?;
    join(&mut ops, "announce").await?;
    publish(&mut ops, "announce", "news").await?;
    let m = next_frame(&mut user).await?;
    assert_eq!((m["type"].as_str(), m["body"].as_str()), (Some("message"), Some("news")), "{m}");
    Ok(())
}

#[tokio::test]
async fn token_expiring_while_connected_closes_4500() -> anyhow::Result<()> {
    let mut cfg = jwt_config();
    cfg.auth.leeway_secs = 0;
    // Default heartbeat (25 s): the close must come at `exp`, not at the next tick.
    let node = start(&cfg).await?;
    let short = mint_token(SECRET, "brief", "brief", &[], 2);
    let (mut c, _) = with_token(&node, &short).await?;
    join(&mut c, "r").await?;
    assert_eq!(c.recv_close(Duration::from_secs(10)).await.map(|(code, _)| code), Some(4500));
    Ok(())
}

#[tokio::test]
async fn too_many_rooms_per_connection() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.max_rooms_per_connection = 2;
    let node = start(&cfg).await?;
    let (mut c, _) = anon(&node, "many").await?;
    join(&mut c, "a").await?;
    join(&mut c, "b").await?;
    c.send_json(json!({"type": "join", "id": "third", "room": "c"})).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!(
        (e["type"].as_str(), e["code"].as_str(), e["id"].as_str()),
        (Some("error"), Some("too_many_rooms"), Some("third")),
        "{e}"
    );
    // Leaving one makes room for another.
    c.send_json(json!({"type": "leave", "id": "l", "room": "a"})).await?;
    assert_eq!(next_frame(&mut c).await?["type"], "left");
    join(&mut c, "c").await?;
    Ok(())
}

#[tokio::test]
async fn subprotocol_negotiation() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let url = anon_url(&node, "sp");
    assert_eq!(handshake_status(&url, &[("Sec-WebSocket-Protocol", "chat.v2, mqtt")]).await, 400, "wrong subprotocol");
    let (status, body) = raw_handshake(node.addr(), "/ws?name=sp", &[("Sec-WebSocket-Protocol", "chat.v2")]).await?;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("unsupported_subprotocol") && body.contains(SUBPROTOCOL), "{body}");

    // Several offered, ours among them: accepted and echoed.
    let (status, head) =
        raw_handshake(node.addr(), "/ws?name=sp", &[("Sec-WebSocket-Protocol", &format!("chat.v2, {SUBPROTOCOL}"))])
            .await?;
    assert_eq!(status, 101, "{head}");
    assert!(head.to_ascii_lowercase().contains(&format!("sec-websocket-protocol: {SUBPROTOCOL}")), "{head}");

    // No subprotocol offered: accepted, none answered, and spoken to in v1 JSON.
    let (mut ws, response) = tokio_tungstenite::connect_async(url.as_str()).await.context("plain handshake")?;
    assert!(response.headers().get("sec-websocket-protocol").is_none(), "{response:?}");
    let first = tokio::time::timeout(T, ws.next()).await?.context("a frame")??;
    let welcome: Value = serde_json::from_str(first.to_text()?)?;
    assert_eq!(welcome["type"], "welcome", "{welcome}");

    // Not an upgrade at all.
    let (status, _) = get(&node, "/ws").await?;
    assert_eq!(status, 400, "GET /ws without upgrade");
    Ok(())
}

// ---------- protocol errors and limits ----------

#[tokio::test]
async fn malformed_and_unknown_frames_get_errors_and_keep_the_connection() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut c, _) = anon(&node, "errs").await?;

    c.send(Message::text("{not json")).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{e}");

    c.send_json(json!({"type": "join", "id": "typed", "room": 5})).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "{e}");

    c.send_json(json!({"type": "ping", "id": "x".repeat(65)})).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("bad_request")), "id > 64 chars: {e}");

    c.send_json(json!({"type": "teleport", "id": "u1"})).await?;
    let e = next_frame(&mut c).await?;
    assert_eq!((e["type"].as_str(), e["code"].as_str()), (Some("error"), Some("unknown_type")), "{e}");

    // Still open and working.
    c.send_json(json!({"type": "ping", "id": "still"})).await?;
    assert_eq!(next_frame(&mut c).await?, json!({"type": "pong", "id": "still"}));
    join(&mut c, "ok").await?;
    Ok(())
}

#[tokio::test]
async fn binary_frame_closes_4501() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    let (mut c, _) = anon(&node, "bin").await?;
    c.send(Message::binary(vec![1u8, 2, 3])).await?;
    assert_eq!(c.recv_close(T).await.map(|(code, _)| code), Some(4501));
    Ok(())
}

#[tokio::test]
async fn oversized_message_closes_1009() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.max_message_bytes = 1024;
    let node = start(&cfg).await?;
    let (mut c, _) = anon(&node, "big").await?;
    join(&mut c, "r").await?;
    // Just under the limit is fine.
    publish(&mut c, "r", &"a".repeat(900)).await?;
    let _ = c.send_json(json!({"type": "publish", "room": "r", "body": "x".repeat(4096)})).await;
    assert_eq!(c.recv_close(T).await.map(|(code, _)| code), Some(1009));
    Ok(())
}

#[tokio::test]
async fn rate_limit_errors_then_closes_4003() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.publish_rate_per_sec = 1;
    cfg.limits.publish_burst = 2;
    cfg.limits.rate_limit_strikes = 5;
    let node = start(&cfg).await?;
    let (mut c, _) = anon(&node, "spam").await?;
    join(&mut c, "r").await?;
    for i in 0..30 {
        // The node may close while we are still writing.
        if c.send_json(json!({"type": "publish", "id": format!("s{i}"), "room": "r", "body": "spam"})).await.is_err() {
            break;
        }
    }
    let (mut acks, mut messages, mut limited) = (0, 0, 0);
    let close = loop {
        match c.recv_json(T).await {
            Ok(f) => match (f["type"].as_str(), f["code"].as_str()) {
                (Some("ack"), _) => acks += 1,
                (Some("message"), _) => messages += 1,
                (Some("error"), Some("rate_limited")) => limited += 1,
                _ => bail!("unexpected frame: {f}"),
            },
            Err(err) => break err.to_string(),
        }
    };
    assert!(acks >= 1, "the burst goes through");
    assert_eq!(acks, messages, "a rate-limited publish is not sent");
    assert!(limited >= 1, "rate_limited errors before the close");
    assert!(close.contains("4003"), "closed with 4003 after sustained abuse: {close}");
    Ok(())
}

#[tokio::test]
async fn max_connections_refuses_with_503() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.max_connections = 2;
    let node = start(&cfg).await?;
    let (_a, _) = anon(&node, "a").await?;
    let (b, _) = anon(&node, "b").await?;
    let sp = [("Sec-WebSocket-Protocol", SUBPROTOCOL)];
    assert_eq!(handshake_status(&anon_url(&node, "c"), &sp).await, 503);
    let (status, head) = raw_handshake(node.addr(), "/ws?name=c", &sp).await?;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("too_many_connections"), "{head}");
    // A slot frees up when a client leaves.
    b.close().await;
    let url = anon_url(&node, "c");
    wait_for("a free connection slot", T, || {
        let url = url.clone();
        async move { handshake_status(&url, &[("Sec-WebSocket-Protocol", SUBPROTOCOL)]).await == 101 }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn one_user_cannot_take_every_connection() -> anyhow::Result<()> {
    let mut cfg = jwt_config();
    cfg.limits.max_connections_per_user = 2;
    let node = start(&cfg).await?;
    let ann = token("ann", &[]);
    let (first, _) = with_token(&node, &ann).await?;
    let (_second, _) = with_token(&node, &ann).await?;
    let sp = ("Sec-WebSocket-Protocol", SUBPROTOCOL);
    let bearer = format!("Bearer {ann}");
    let (status, head) = raw_handshake(node.addr(), "/ws", &[sp, ("Authorization", &bearer)]).await?;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("too_many_connections_for_user"), "{head}");
    let (_bob, _) = with_token(&node, &token("bob", &[])).await?;
    // Her slot comes back when one of her connections ends.
    first.close().await;
    let url = node.ws_url();
    wait_for("ann's slot back", T, || {
        let (url, bearer) = (url.clone(), bearer.clone());
        async move { handshake_status(&url, &[sp, ("Authorization", &bearer)]).await == 101 }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn one_address_cannot_take_every_connection_and_a_trusted_proxy_names_the_client() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.max_connections_per_ip = Some(2);
    let node = start(&cfg).await?;
    let (_a, _) = anon(&node, "a").await?;
    let (_b, _) = anon(&node, "b").await?;
    let sp = ("Sec-WebSocket-Protocol", SUBPROTOCOL);
    let (status, head) = raw_handshake(node.addr(), "/ws?name=c", &[sp]).await?;
    assert_eq!(status, 429, "{head}");
    assert!(head.contains("too_many_connections_from_address"), "{head}");
    // Not trusted: a forged header changes nothing.
    let (status, _) = raw_handshake(node.addr(), "/ws?name=c", &[sp, ("X-Forwarded-For", "192.0.2.1")]).await?;
    assert_eq!(status, 429);

    cfg.limits.trust_forwarded_for = true;
    cfg.listen = ([127, 0, 0, 1], free_port()).into();
    let proxied = start(&cfg).await?;
    let mut held = Vec::new();
    for client in ["192.0.2.1", "192.0.2.1", "192.0.2.2"] {
        let stream = TcpStream::connect(proxied.addr()).await?;
        let url = anon_url(&proxied, "p");
        let mut request = tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)?;
        request.headers_mut().insert("Sec-WebSocket-Protocol", SUBPROTOCOL.parse()?);
        request.headers_mut().insert("X-Forwarded-For", format!("10.9.9.9, {client}").parse()?);
        held.push(tokio_tungstenite::client_async(request, stream).await.with_context(|| client.to_owned())?);
    }
    let (status, head) =
        raw_handshake(proxied.addr(), "/ws?name=p", &[sp, ("X-Forwarded-For", "10.9.9.9, 192.0.2.1")]).await?;
    assert_eq!(status, 429, "192.0.2.1 has two already: {head}");
    Ok(())
}

#[tokio::test]
async fn slow_consumer_is_closed_4001_and_counted() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    // Small queues, but several of the flood's messages fit, so a client that reads keeps up.
    cfg.limits.outbound_queue_frames = 64;
    cfg.limits.outbound_queue_bytes = 32 * 1024;
    cfg.limits.publish_rate_per_sec = 100_000;
    cfg.limits.publish_burst = 100_000;
    cfg.limits.rate_limit_strikes = 100_000;
    let node = start(&cfg).await?;

    // The slow client joins and then never reads.
    let (mut slow, _) = anon(&node, "slow").await?;
    join(&mut slow, "flood").await?;
    let (mut fast, _) = anon(&node, "fast").await?;
    join(&mut fast, "flood").await?;

    let body = "z".repeat(2000);
    let mut slow_count = 0.0;
    // Loopback socket buffers hold a few MB; up to 15 000 × 2 KB is far more than that. The
    // flood stops as soon as /metrics counts the slow consumer.
    for batch in 0..75 {
        for i in 0..200 {
            let id = format!("f{batch}-{i}");
            fast.send_json(json!({"type": "publish", "id": id, "room": "flood", "body": body})).await?;
            // Read our own ack (and echo) so that the fast client never becomes slow itself.
            loop {
                let f = fast.recv_json(T).await?;
                if f["type"] == "ack" && f["id"] == id {
                    break;
                }
                ensure!(f["type"] != "error", "publish failed: {f}");
            }
        }
        let (_, metrics) = node.admin_get("/metrics").await?;
        slow_count = metric_sum(&metrics, "slow_consumer");
        if slow_count >= 1.0 {
            break;
        }
    }
    assert!(slow_count >= 1.0, "/metrics counts the slow consumer");
    let close = slow.recv_close(Duration::from_secs(30)).await;
    assert_eq!(close.map(|(code, _)| code), Some(4001), "the slow client is closed with 4001");
    // The fast client is unaffected.
    fast.send_json(json!({"type": "ping", "id": "alive"})).await?;
    fast.recv_until("pong", T).await?;
    Ok(())
}

// ---------- idle timeout ----------

#[tokio::test]
async fn a_client_that_stops_reading_is_dropped_within_the_write_timeout() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.write_timeout_secs = 1;
    cfg.limits.max_message_bytes = 64 * 1024;
    cfg.limits.publish_rate_per_sec = 10_000;
    cfg.limits.publish_burst = 10_000;
    // Room enough that the outbox never overflows: only the write deadline can end it.
    cfg.limits.outbound_queue_bytes = 64 << 20;
    cfg.limits.outbound_queue_frames = 100_000;
    let node = start(&cfg).await?;
    let connections = |admin: std::net::SocketAddr| async move {
        let metrics = http_get(admin, "/metrics").await.map(|(_, m)| m).unwrap_or_default();
        let gauge = metrics.lines().find_map(|l| l.strip_prefix("chat_connections "));
        gauge.and_then(|v| v.trim().parse::<f64>().ok()).unwrap_or(-1.0)
    };
    // A subscriber that joins and then never reads again, with a small receive buffer.
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut mute = socket.connect(node.addr()).await?;
    let upgrade = upgrade_request(node.addr(), "/ws?name=mute", &[("Sec-WebSocket-Protocol", SUBPROTOCOL)]);
    mute.write_all(upgrade.as_bytes()).await?;
    let (status, head, _) = read_response_head(&mut mute).await?;
    ensure!(status == 101, "{head}");
    mute.write_all(&masked_frame(0x81, br#"{"type":"join","room":"r"}"#)).await?;
    let (mut publisher, _) = anon(&node, "pub").await?;
    join(&mut publisher, "r").await?;
    // 9 MB of messages: far more than the socket buffers between the node and the mute client.
    let body = "x".repeat(60 * 1024);
    for _ in 0..150 {
        publish(&mut publisher, "r", &body).await?;
    }
    wait_for("the mute client dropped", Duration::from_secs(15), || async {
        connections(node.admin_addr()).await == 1.0
    })
    .await?;
    let metrics = node.admin_get("/metrics").await?.1;
    assert_eq!(metric_sum(&metrics, "chat_slow_consumer_disconnects"), 1.0, "counted as a slow consumer");
    drop(mute);
    Ok(())
}

#[tokio::test]
async fn silent_client_is_closed_4002() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.limits.ping_interval_secs = 1;
    cfg.limits.idle_timeout_secs = 2;
    let node = start(&cfg).await?;
    let (mut tcp, rest) = raw_session(&node, "mute").await?;
    // Stay silent (never answer pings) and read server frames until the close frame.
    let (code, opcodes) = read_until_close(&mut tcp, rest, Duration::from_secs(10)).await?;
    assert_eq!(code, 4002, "idle timeout close code (frames seen: {opcodes:?})");
    assert!(opcodes.contains(&0x9), "the node pinged before giving up: {opcodes:?}");
    Ok(())
}

#[tokio::test]
async fn broken_frames_get_the_rfc_6455_close_codes() -> anyhow::Result<()> {
    let node = start(&anonymous_config()).await?;
    // A text frame that is not UTF-8: 1007.
    let (mut tcp, rest) = raw_session(&node, "utf8").await?;
    tcp.write_all(&masked_frame(0x81, &[0xff, 0xfe, 0xfd])).await?;
    let (code, opcodes) = read_until_close(&mut tcp, rest, T).await?;
    assert_eq!(code, 1007, "invalid UTF-8 (frames seen: {opcodes:?})");
    // A reserved bit set without an extension that defines it: 1002.
    let (mut tcp, rest) = raw_session(&node, "rsv").await?;
    tcp.write_all(&masked_frame(0x80 | 0x40 | 0x1, b"{}")).await?;
    let (code, opcodes) = read_until_close(&mut tcp, rest, T).await?;
    assert_eq!(code, 1002, "protocol violation (frames seen: {opcodes:?})");
    // The node serves others as before.
    let (mut c, _) = anon(&node, "fine").await?;
    join(&mut c, "r").await?;
    Ok(())
}

#[tokio::test]
async fn a_token_that_never_expires_keeps_its_connection() -> anyhow::Result<()> {
    let node = start(&jwt_config()).await?;
    let claims = json!({"sub": "forever", "exp": u64::MAX});
    let forever = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )?;
    let (mut c, _) = with_token(&node, &forever).await?;
    join(&mut c, "r").await?;
    publish(&mut c, "r", "still here").await?;
    Ok(())
}

// ---------- drain ----------

#[tokio::test]
async fn sigterm_drains_and_exits_zero() -> anyhow::Result<()> {
    let mut cfg = anonymous_config();
    cfg.drain.lb_grace_secs = 2;
    cfg.drain.rate_per_sec = 100;
    cfg.drain.deadline_secs = 8;
    let mut node = start(&cfg).await?;
    let mut clients = Vec::new();
    for i in 0..3 {
        let (mut c, _) = anon(&node, &format!("d{i}")).await?;
        join(&mut c, "r").await?;
        clients.push(c);
    }
    assert_eq!(get(&node, "/readyz").await?.0, 200);

    node.terminate();
    let addr = node.addr();
    wait_for("/readyz to turn 503", T, || async move {
        http_get(addr, "/readyz").await.map(|(s, _)| s == 503).unwrap_or(false)
    })
    .await?;
    let sp = [("Sec-WebSocket-Protocol", SUBPROTOCOL)];
    let (status, head) = raw_handshake(addr, "/ws?name=late", &sp).await?;
    assert_eq!(status, 503, "new handshakes are refused while draining: {head}");
    assert!(head.contains("draining"), "{head}");

    for (i, c) in clients.iter_mut().enumerate() {
        let close = c.recv_close(Duration::from_secs(10)).await;
        assert_eq!(close.map(|(code, _)| code), Some(4000), "client {i} told to reconnect elsewhere");
    }
    let status = node.wait_exit(Duration::from_secs(10)).await?;
    assert!(status.success(), "exit status {status}; log:\n{}", node.output());
    Ok(())
}

// ---------- HTTP endpoints ----------

/// Metric names in Prometheus text (`# TYPE` lines), with the sample suffixes of their type.
fn exported_names(text: &str) -> std::collections::BTreeSet<String> {
    let mut names = std::collections::BTreeSet::new();
    for line in text.lines() {
        let mut words = line.strip_prefix("# TYPE ").unwrap_or_default().split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else { continue };
        let suffixes: &[&str] = match kind {
            "counter" => &["_total"],
            "histogram" => &["_bucket", "_sum", "_count"],
            _ => &[""],
        };
        names.extend(suffixes.iter().map(|s| format!("{name}{s}")));
    }
    names
}

/// `chat_…` identifiers in a PromQL expression (label values are quoted, so skipped).
fn promql_metrics(expr: &str) -> Vec<String> {
    let unquoted: String = expr.split('"').step_by(2).collect::<Vec<_>>().join(" ");
    unquoted
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("chat_"))
        .map(str::to_owned)
        .collect()
}

/// The chart's alerts and dashboard name only metrics a real node or the operator exports, and
/// docs/operator.md lists every metric a node exports.
#[tokio::test]
async fn alerts_dashboard_and_docs_name_the_metrics_a_node_exports() -> anyhow::Result<()> {
    let node = start(&jwt_config()).await?;
    // Families with labels show up once they have a series: a refused handshake and a closed
    // connection give them one.
    ensure!(handshake_status(&node.ws_url(), &[("Sec-WebSocket-Protocol", SUBPROTOCOL)]).await == 401);
    with_token(&node, &token("alice", &[])).await?.0.close().await;
    let mut text = String::new();
    for _ in 0..100 {
        text = node.admin_get("/metrics").await?.1;
        if text.contains("chat_disconnects_total{") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node_metrics = exported_names(&text);
    let operator = chat_operator::metrics::Metrics::new();
    operator.reconcile_failed("read");
    let condition = chat_operator::metrics::ConditionLabels {
        chatcluster_namespace: "chat".into(),
        chatcluster: "demo".into(),
        r#type: "Progressing".into(),
    };
    operator.set_conditions([(condition, true)]);
    let operator_metrics = exported_names(&operator.encode()?);
    ensure!(node_metrics.contains("chat_cluster_quorum"), "node metrics: {node_metrics:?}");
    ensure!(operator_metrics.contains("chat_operator_cluster_condition"), "operator metrics: {operator_metrics:?}");
    // On its own a node is a cluster of one, with quorum: the no-quorum alert stays silent.
    for (gauge, want) in [("chat_cluster_quorum", 1.0), ("chat_cluster_size", 1.0), ("chat_cluster_members", 1.0)] {
        ensure!(metric_sum(&text, gauge) == want, "{gauge} should be {want}:\n{text}");
    }

    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let chart = repo.join("charts/chatcluster-operator/files");
    let alerts: Value = serde_norway::from_str(&std::fs::read_to_string(chart.join("alerts.yaml"))?)?;
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(chart.join("dashboard.json"))?)?;
    let mut exprs: Vec<(String, String)> = Vec::new();
    for group in alerts["groups"].as_array().context("alert groups")? {
        for rule in group["rules"].as_array().context("rules")? {
            exprs.push((format!("alert {}", rule["alert"]), rule["expr"].as_str().context("expr")?.to_owned()));
        }
    }
    for panel in dashboard["panels"].as_array().context("panels")? {
        for target in panel["targets"].as_array().into_iter().flatten() {
            exprs.push((format!("panel {}", panel["title"]), target["expr"].as_str().context("expr")?.to_owned()));
        }
    }
    ensure!(exprs.len() > 20, "found only {} expressions", exprs.len());
    let mut unknown = Vec::new();
    for (source, expr) in &exprs {
        for name in promql_metrics(expr) {
            if !node_metrics.contains(&name) && !operator_metrics.contains(&name) {
                unknown.push(format!("{source}: {name}"));
            }
        }
    }
    ensure!(unknown.is_empty(), "metrics nobody exports: {unknown:#?}");

    let docs = std::fs::read_to_string(repo.join("docs/operator.md"))?;
    let undocumented: Vec<&String> = node_metrics.iter().filter(|name| !docs.contains(&format!("| `{name}"))).collect();
    ensure!(undocumented.is_empty(), "node metrics missing from docs/operator.md's table: {undocumented:?}");
    Ok(())
}

#[tokio::test]
async fn health_metrics_and_web_assets() -> anyhow::Result<()> {
    // The assets directory has a sibling file that traversal must never reach.
    let root = tempfile::tempdir()?;
    let assets = root.path().join("assets");
    std::fs::create_dir(&assets)?;
    std::fs::write(root.path().join("secret.txt"), "outside-the-assets-directory")?;
    std::fs::write(assets.join("logo.svg"), "<svg id=\"custom-logo\"></svg>")?;
    let mut cfg = anonymous_config();
    cfg.assets_dir = Some(assets.clone());
    let node = start(&cfg).await?;

    assert_eq!(get(&node, "/healthz").await?.0, 200);
    assert_eq!(get(&node, "/readyz").await?.0, 200);
    let (status, metrics) = node.admin_get("/metrics").await?;
    assert_eq!(status, 200);
    assert!(metrics.contains("# TYPE"), "Prometheus text format: {metrics}");

    let (status, index) = get(&node, "/").await?;
    assert_eq!(status, 200);
    assert!(index.contains("ChatCluster") && index.contains("app.js"), "built-in page: {index}");
    for path in ["/app.js", "/style.css", "/index.html"] {
        assert_eq!(get(&node, path).await?.0, 200, "{path}");
    }
    let (status, logo) = get(&node, "/logo.svg").await?;
    assert_eq!(status, 200);
    assert!(logo.contains("custom-logo"), "assets_dir overrides the built-in logo: {logo}");
    // Changes on disk are served without a restart.
    std::fs::write(assets.join("logo.svg"), "<svg id=\"second-logo\"></svg>")?;
    let addr = node.addr();
    wait_for("the new logo", T, || async move {
        http_get(addr, "/logo.svg").await.map(|(_, b)| b.contains("second-logo")).unwrap_or(false)
    })
    .await?;
    assert_eq!(get(&node, "/no-such-file.txt").await?.0, 404);
    for probe in [
        "/../secret.txt",
        "/..%2fsecret.txt",
        "/%2e%2e/secret.txt",
        "/%2e%2e%2fsecret.txt",
        "/logo.svg/../../secret.txt",
    ] {
        let (status, body) = get(&node, probe).await?;
        assert!(!body.contains("outside-the-assets-directory"), "path traversal through {probe}: {status}");
        assert_eq!(status / 100, 4, "{probe} is refused");
    }
    Ok(())
}

// ---------- raw HTTP / WebSocket helpers ----------

fn upgrade_request(addr: std::net::SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (name, value) in headers {
        req.push_str(&format!("{name}: {value}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Reads an HTTP response head; returns the status, the head text and any bytes after it.
async fn read_response_head(tcp: &mut TcpStream) -> anyhow::Result<(u16, String, Vec<u8>)> {
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).into_owned();
            let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).context("status line")?;
            return Ok((status, head, raw[end + 4..].to_vec()));
        }
        let n = tokio::time::timeout(T, tcp.read(&mut buf)).await.context("response head in time")??;
        ensure!(n > 0, "connection closed before the response head: {:?}", String::from_utf8_lossy(&raw));
        raw.extend_from_slice(&buf[..n]);
    }
}

/// A WebSocket handshake by hand: the status and the whole response text (head and, for a
/// refusal, body).
async fn raw_handshake(
    addr: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<(u16, String)> {
    let mut tcp = TcpStream::connect(addr).await?;
    tcp.write_all(upgrade_request(addr, path, headers).as_bytes()).await?;
    let (status, head, mut rest) = read_response_head(&mut tcp).await?;
    if status != 101 {
        let len = head
            .lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length").then(|| v.trim().parse::<usize>().ok()).flatten()
            })
            .unwrap_or(0);
        let mut buf = [0u8; 4096];
        while rest.len() < len {
            let n = tokio::time::timeout(T, tcp.read(&mut buf)).await.context("response body in time")??;
            if n == 0 {
                break;
            }
            rest.extend_from_slice(&buf[..n]);
        }
    }
    Ok((status, format!("{head}\r\n\r\n{}", String::from_utf8_lossy(&rest))))
}

/// A WebSocket session opened by hand, for frames no client library sends: the socket and
/// what followed the response head.
async fn raw_session(node: &NodeProcess, name: &str) -> anyhow::Result<(TcpStream, Vec<u8>)> {
    let mut tcp = TcpStream::connect(node.addr()).await?;
    let path = format!("/ws?name={name}");
    tcp.write_all(upgrade_request(node.addr(), &path, &[("Sec-WebSocket-Protocol", SUBPROTOCOL)]).as_bytes()).await?;
    let (status, head, rest) = read_response_head(&mut tcp).await?;
    ensure!(status == 101, "handshake refused: {head}");
    Ok((tcp, rest))
}

/// Reads server frames until the close frame: its code and the opcodes of every frame seen.
async fn read_until_close(tcp: &mut TcpStream, mut rest: Vec<u8>, within: Duration) -> anyhow::Result<(u16, Vec<u8>)> {
    let deadline = Instant::now() + within;
    let mut opcodes = Vec::new();
    loop {
        while let Some((opcode, payload, used)) = parse_frame(&rest) {
            rest.drain(..used);
            opcodes.push(opcode);
            if opcode == 0x8 {
                ensure!(payload.len() >= 2, "close frame without a code");
                return Ok((u16::from_be_bytes([payload[0], payload[1]]), opcodes));
            }
        }
        let mut buf = [0u8; 4096];
        let left = deadline.saturating_duration_since(Instant::now());
        let n = tokio::time::timeout(left, tcp.read(&mut buf))
            .await
            .with_context(|| format!("no close frame in time (frames seen: {opcodes:?})"))??;
        ensure!(n > 0, "connection closed without a close frame (frames seen: {opcodes:?})");
        rest.extend_from_slice(&buf[..n]);
    }
}

/// A client frame (masked, as RFC 6455 requires) with this first byte (FIN, RSV, opcode).
fn masked_frame(first: u8, payload: &[u8]) -> Vec<u8> {
    assert!(payload.len() < 126, "short frames only");
    let mask = [0x12, 0x34, 0x56, 0x78];
    let mut frame = vec![first, 0x80 | payload.len() as u8];
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    frame
}

/// One unmasked server frame from the front of `buf`: (opcode, payload, bytes used).
fn parse_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0f;
    let (len, start) = match buf[1] & 0x7f {
        126 => (u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?]) as usize, 4),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize, 10),
        n => (n as usize, 2),
    };
    let payload = buf.get(start..start + len)?.to_vec();
    Some((opcode, payload, start + len))
}
