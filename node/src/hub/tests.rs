//! Hub behaviour driven through the in-memory transport: no sockets, no HTTP.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use super::Hub;
use crate::auth::Identity;
use crate::config::{AuthMode, NodeConfig, RoomRule};
use crate::metrics::Metrics;
use crate::protocol::{UserInfo, close};
use crate::transport::Inbound;
use crate::transport::memory::{MemoryClient, pair};

pub(crate) fn config() -> NodeConfig {
    let mut config = NodeConfig::default();
    config.auth.mode = AuthMode::Anonymous;
    config
}

fn hub(config: NodeConfig) -> Arc<Hub> {
    Hub::new("test-node".into(), config, Arc::new(Metrics::new()), None).unwrap()
}

pub(crate) fn identity(user: &str, roles: &[&str]) -> Identity {
    Identity {
        user: UserInfo { id: user.into(), name: user.to_uppercase() },
        roles: roles.iter().map(|r| r.to_string()).collect(),
        expires_at: None,
    }
}

pub(crate) async fn connect_as(hub: &Arc<Hub>, identity: Identity) -> MemoryClient {
    let (conn, mut client) = pair(64);
    let permit = hub.admit(None).unwrap();
    tokio::spawn(hub.clone().serve(conn, identity, None, permit));
    let welcome = client.next_json().await.unwrap();
    assert_eq!(welcome["type"], "welcome");
    assert_eq!(welcome["node_id"], hub.node_id());
    client
}

pub(crate) async fn connect(hub: &Arc<Hub>, user: &str) -> MemoryClient {
    connect_as(hub, identity(user, &[])).await
}

pub(crate) async fn send(client: &MemoryClient, frame: Value) {
    assert!(client.send_text(&frame.to_string()).await);
}

pub(crate) async fn next(client: &mut MemoryClient) -> Value {
    tokio::time::timeout(Duration::from_secs(5), client.next_json()).await.expect("a frame in time").expect("open")
}

pub(crate) async fn expect(client: &mut MemoryClient, kind: &str) -> Value {
    let frame = next(client).await;
    assert_eq!(frame["type"], kind, "{frame}");
    frame
}

pub(crate) async fn join(client: &mut MemoryClient, room: &str) -> Value {
    send(client, json!({"type": "join", "room": room})).await;
    expect(client, "joined").await
}

#[tokio::test]
async fn two_clients_chat_in_order() {
    let hub = hub(config());
    let (mut ann, mut bob) = (connect(&hub, "ann").await, connect(&hub, "bob").await);
    let joined = join(&mut ann, "lobby").await;
    assert_eq!((joined["offset"].as_u64(), joined["recovered"].as_bool()), (Some(0), Some(false)));
    join(&mut bob, "lobby").await;
    assert_eq!(expect(&mut ann, "user_joined").await["user"]["id"], "bob");

    for (i, body) in ["one", "two"].iter().enumerate() {
        send(&ann, json!({"type": "publish", "id": format!("p{i}"), "room": "lobby", "body": body})).await;
        let ack = expect(&mut ann, "ack").await;
        assert_eq!((ack["id"].as_str(), ack["offset"].as_u64()), (Some(format!("p{i}").as_str()), Some(i as u64 + 1)));
        let mine = expect(&mut ann, "message").await;
        let theirs = expect(&mut bob, "message").await;
        assert_eq!(mine, theirs);
        assert_eq!((theirs["body"].as_str(), theirs["sender"]["name"].as_str()), (Some(*body), Some("ANN")));
        assert_eq!(theirs["epoch"], ack["epoch"]);
    }
}

#[tokio::test]
async fn a_publish_key_is_stored_once_per_user() {
    let hub = hub(config());
    let mut ann = connect(&hub, "ann").await;
    let mut bob = connect(&hub, "bob").await;
    join(&mut ann, "r").await;
    join(&mut bob, "r").await;
    expect(&mut ann, "user_joined").await;
    let publish =
        |id: &str, key: &str, body: &str| json!({"type": "publish", "id": id, "room": "r", "body": body, "key": key});
    send(&ann, publish("1", "k1", "first")).await;
    assert_eq!(expect(&mut ann, "ack").await["offset"], 1);
    expect(&mut ann, "message").await;
    // A retry with the same key (another body, as a client would never send, to tell them
    // apart): acked at the first copy's offset, nothing stored or delivered.
    send(&ann, publish("2", "k1", "retry")).await;
    let ack = expect(&mut ann, "ack").await;
    assert_eq!((ack["id"].as_str(), ack["offset"].as_u64()), (Some("2"), Some(1)));
    // Keys are per user: bob's k1 is another message.
    send(&bob, publish("3", "k1", "bob's")).await;
    let mut delivered = Vec::new();
    let mut acks = Vec::new();
    while delivered.len() < 2 || acks.is_empty() {
        let frame = next(&mut bob).await;
        match frame["type"].as_str() {
            Some("message") => delivered.push(frame["body"].as_str().map(str::to_owned)),
            Some("ack") => acks.push(frame["offset"].as_u64()),
            _ => panic!("unexpected {frame}"),
        }
    }
    assert_eq!(acks, [Some(2)]);
    assert_eq!(delivered, [Some("first".to_owned()), Some("bob's".to_owned())]);
    assert_eq!(expect(&mut ann, "message").await["body"], "bob's");
    send(&ann, json!({"type": "publish", "room": "r", "body": "x", "key": ""})).await;
    assert_eq!(expect(&mut ann, "error").await["code"], "bad_request");
}

#[tokio::test]
async fn resume_delivers_exactly_what_was_missed() {
    let hub = hub(config());
    let mut ann = connect(&hub, "ann").await;
    let epoch = join(&mut ann, "r").await["epoch"].clone();
    for body in ["a", "b", "c"] {
        send(&ann, json!({"type": "publish", "room": "r", "body": body})).await;
        expect(&mut ann, "ack").await;
        expect(&mut ann, "message").await;
    }
    let mut bob = connect(&hub, "bob").await;
    send(&bob, json!({"type": "join", "room": "r", "since": {"epoch": epoch, "offset": 1}})).await;
    assert_eq!(expect(&mut bob, "message").await["body"], "b");
    assert_eq!(expect(&mut bob, "message").await["body"], "c");
    let joined = expect(&mut bob, "joined").await;
    assert_eq!((joined["recovered"].as_bool(), joined["offset"].as_u64()), (Some(true), Some(3)));

    let mut eve = connect(&hub, "eve").await;
    send(&eve, json!({"type": "join", "room": "r", "since": {"epoch": "stale", "offset": 1}})).await;
    for _ in 0..3 {
        expect(&mut eve, "message").await;
    }
    assert_eq!(expect(&mut eve, "joined").await["recovered"], false);
}

#[tokio::test]
async fn history_is_a_bounded_ring() {
    let mut cfg = config();
    cfg.history.size = 3;
    let hub = hub(cfg);
    let mut ann = connect(&hub, "ann").await;
    let epoch = join(&mut ann, "r").await["epoch"].clone();
    for i in 0..5 {
        send(&ann, json!({"type": "publish", "room": "r", "body": i.to_string()})).await;
        expect(&mut ann, "ack").await;
        expect(&mut ann, "message").await;
    }
    send(&ann, json!({"type": "history", "id": "h", "room": "r"})).await;
    let history = expect(&mut ann, "history").await;
    let offsets: Vec<u64> =
        history["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect();
    assert_eq!(offsets, vec![3, 4, 5]);
    assert_eq!(history["complete"], false);

    let mut bob = connect(&hub, "bob").await;
    send(&bob, json!({"type": "join", "room": "r", "since": {"epoch": epoch, "offset": 1}})).await;
    for _ in 0..3 {
        expect(&mut bob, "message").await;
    }
    assert_eq!(expect(&mut bob, "joined").await["recovered"], false, "offset 2 fell out of the ring");
}

#[tokio::test]
async fn history_comes_in_pages_that_fit_the_write_buffer() {
    let mut cfg = config();
    cfg.history.size = 100;
    cfg.limits.outbound_queue_bytes = 64 * 1024; // pages of about 16 KiB
    cfg.limits.publish_rate_per_sec = 1000;
    cfg.limits.publish_burst = 1000;
    let hub = hub(cfg);
    let mut ann = connect(&hub, "ann").await;
    let epoch = join(&mut ann, "r").await["epoch"].clone();
    let body = "x".repeat(1024);
    for _ in 0..50 {
        send(&ann, json!({"type": "publish", "room": "r", "body": body})).await;
        expect(&mut ann, "ack").await;
        expect(&mut ann, "message").await;
    }
    let offsets = |page: &Value| -> Vec<u64> {
        page["messages"].as_array().unwrap().iter().map(|m| m["offset"].as_u64().unwrap()).collect()
    };
    // Forward from the start, page by page: every message once, in order.
    let (mut seen, mut since, mut pages) = (Vec::new(), 0, 0);
    loop {
        let request = json!({"type": "history", "room": "r", "since": {"epoch": epoch, "offset": since}});
        send(&ann, request).await;
        let page = expect(&mut ann, "history").await;
        let got = offsets(&page);
        assert!(got.len() < 50 && !got.is_empty(), "a page, not everything: {}", got.len());
        since = *got.last().unwrap();
        seen.extend(got);
        pages += 1;
        if page["more"] == false {
            break;
        }
        assert!(pages < 10, "paging ends");
    }
    assert_eq!(seen, (1..=50).collect::<Vec<_>>());
    assert!(pages >= 3, "{pages} pages");
    // The latest messages: the newest page, and not complete.
    send(&ann, json!({"type": "history", "room": "r"})).await;
    let latest = expect(&mut ann, "history").await;
    assert_eq!(offsets(&latest).last(), Some(&50));
    assert_eq!((latest["complete"].as_bool(), latest["more"].as_bool()), (Some(false), Some(false)));
}

#[tokio::test]
async fn presence_comes_in_pages_that_fit_the_write_buffer() {
    let mut cfg = config();
    cfg.limits.outbound_queue_bytes = 4096; // pages of about 1 KiB: four of these users each
    let hub = hub(cfg);
    let name = |i: usize| format!("{i:02}-{}", "m".repeat(100));
    let mut members = Vec::new();
    for i in 0..12 {
        let mut member = connect(&hub, &name(i)).await;
        join(&mut member, "r").await;
        members.push(member);
    }
    // The last to join has no user_joined events waiting.
    let watcher = members.last_mut().unwrap();
    let (mut seen, mut offset, mut pages) = (Vec::new(), None::<u64>, 0);
    loop {
        let mut request = json!({"type": "presence", "room": "r"});
        if let Some(offset) = offset {
            request["offset"] = json!(offset);
        }
        send(watcher, request).await;
        let page = expect(watcher, "presence").await;
        let users = page["users"].as_array().unwrap();
        assert!(!users.is_empty() && users.len() < 12, "a page, not everyone: {}", users.len());
        seen.extend(users.iter().map(|u| u["id"].as_str().unwrap().to_owned()));
        pages += 1;
        match page["next"].as_u64() {
            Some(next) => offset = Some(next),
            None => break,
        }
        assert!(pages < 12, "paging ends");
    }
    let mut expected: Vec<String> = (0..12).map(name).collect();
    expected.sort();
    seen.sort();
    assert_eq!(seen, expected, "every user once");
    assert!(pages >= 3, "{pages} pages");
}

#[tokio::test]
async fn presence_counts_users_not_connections() {
    let hub = hub(config());
    let mut watcher = connect(&hub, "watcher").await;
    join(&mut watcher, "r").await;
    let mut tab1 = connect(&hub, "ann").await;
    let mut tab2 = connect(&hub, "ann").await;
    join(&mut tab1, "r").await;
    assert_eq!(expect(&mut watcher, "user_joined").await["user"]["id"], "ann");
    join(&mut tab2, "r").await;
    send(&watcher, json!({"type": "presence", "room": "r"})).await;
    let presence = expect(&mut watcher, "presence").await;
    assert_eq!(presence["users"].as_array().unwrap().len(), 2, "{presence}");

    send(&tab2, json!({"type": "leave", "room": "r"})).await;
    expect(&mut tab2, "left").await;
    drop(tab1); // the last connection of ann goes away
    assert_eq!(expect(&mut watcher, "user_left").await["user"]["id"], "ann", "left once, after the last tab");
}

#[tokio::test]
async fn bad_input_gets_errors_not_panics() {
    let hub = hub(config());
    let mut ann = connect(&hub, "ann").await;
    ann.send_text("{not json").await;
    assert_eq!(expect(&mut ann, "error").await["code"], "bad_request");
    send(&ann, json!({"type": "shout", "id": "7"})).await;
    let err = expect(&mut ann, "error").await;
    assert_eq!((err["code"].as_str(), err["id"].as_str()), (Some("unknown_type"), Some("7")));
    send(&ann, json!({"type": "publish", "room": "r"})).await;
    assert_eq!(expect(&mut ann, "error").await["code"], "bad_request");
    send(&ann, json!({"type": "join", "room": "no spaces"})).await;
    assert_eq!(expect(&mut ann, "error").await["code"], "invalid_room");
    send(&ann, json!({"type": "publish", "room": "r", "body": "x"})).await;
    assert_eq!(expect(&mut ann, "error").await["code"], "not_joined");
    join(&mut ann, "r").await;
    send(&ann, json!({"type": "join", "room": "r"})).await;
    assert_eq!(expect(&mut ann, "error").await["code"], "already_joined");
    send(&ann, json!({"type": "ping", "id": "p"})).await;
    assert_eq!(expect(&mut ann, "pong").await["id"], "p");

    ann.inbound.send(Inbound::Binary).await.unwrap();
    assert_eq!(ann.close_code().await, Some(close::UNSUPPORTED_DATA));
    let mut bob = connect(&hub, "bob").await;
    bob.inbound.send(Inbound::TooBig).await.unwrap();
    assert_eq!(bob.close_code().await, Some(close::MESSAGE_TOO_BIG));
}

#[tokio::test]
async fn room_rules_and_limits() {
    let mut cfg = config();
    cfg.auth.rooms =
        vec![RoomRule { pattern: "ops-*".into(), join_roles: vec!["ops".into()], publish_roles: vec!["lead".into()] }];
    cfg.limits.max_rooms_per_connection = 2;
    let hub = hub(cfg);
    let mut guest = connect(&hub, "guest").await;
    send(&guest, json!({"type": "join", "room": "ops-eu"})).await;
    assert_eq!(expect(&mut guest, "error").await["code"], "forbidden");
    join(&mut guest, "a").await;
    join(&mut guest, "b").await;
    send(&guest, json!({"type": "join", "room": "c"})).await;
    assert_eq!(expect(&mut guest, "error").await["code"], "too_many_rooms");

    let mut ops = connect_as(&hub, identity("op", &["ops"])).await;
    join(&mut ops, "ops-eu").await;
    send(&ops, json!({"type": "publish", "room": "ops-eu", "body": "x"})).await;
    assert_eq!(expect(&mut ops, "error").await["code"], "forbidden");
    let mut lead = connect_as(&hub, identity("lead", &["ops", "lead"])).await;
    join(&mut lead, "ops-eu").await;
    send(&lead, json!({"type": "publish", "room": "ops-eu", "body": "x"})).await;
    expect(&mut lead, "ack").await;
}

#[tokio::test]
async fn sustained_rate_abuse_is_closed() {
    let mut cfg = config();
    cfg.limits.publish_rate_per_sec = 1;
    cfg.limits.publish_burst = 2;
    cfg.limits.rate_limit_strikes = 3;
    let hub = hub(cfg);
    let mut ann = connect(&hub, "ann").await;
    join(&mut ann, "r").await;
    for _ in 0..5 {
        send(&ann, json!({"type": "publish", "room": "r", "body": "spam"})).await;
    }
    let (frames, code) = ann.frames_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(close::TOO_MANY_REQUESTS), "the third strike closes the connection with 4003");
    let mut kinds: Vec<String> = frames
        .iter()
        .map(|frame| frame["code"].as_str().unwrap_or(frame["type"].as_str().unwrap_or("")).to_owned())
        .collect();
    // Replies and room deliveries travel separately, so only the replies' order is fixed.
    let messages = kinds.iter().filter(|k| *k == "message").count();
    kinds.retain(|k| k != "message");
    assert_eq!(messages, 2);
    assert_eq!(kinds, ["ack", "ack", "rate_limited", "rate_limited"]);
    assert_eq!(hub.metrics().rate_limited.get(), 3);
}

/// A hub whose connections may send 4 frames at once, 1 a second after that, and are closed
/// after 5 frames over that in a row.
fn tight_frame_budget() -> Arc<Hub> {
    let mut cfg = config();
    cfg.limits.frame_rate_per_sec = Some(1);
    cfg.limits.frame_burst = Some(4);
    cfg.limits.publish_rate_per_sec = 1;
    cfg.limits.publish_burst = 1;
    cfg.limits.rate_limit_strikes = 5;
    hub(cfg)
}

#[tokio::test]
async fn every_frame_type_spends_one_budget() {
    let hub = tight_frame_budget();
    let mut watcher = connect(&hub, "watcher").await;
    join(&mut watcher, "r").await;
    let mut ann = connect(&hub, "ann").await;
    // Join/leave pairs, pings and garbage: none of them is a publish, all of them count.
    for _ in 0..3 {
        send(&ann, json!({"type": "join", "room": "r"})).await;
        send(&ann, json!({"type": "leave", "room": "r"})).await;
    }
    for _ in 0..2 {
        send(&ann, json!({"type": "ping"})).await;
    }
    ann.inbound.send(Inbound::Text("not json".into())).await.unwrap();
    let (frames, code) = ann.frames_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(close::TOO_MANY_REQUESTS), "the fifth frame over the budget in a row closes with 4003");
    let limited = frames.iter().filter(|f| f["code"] == "rate_limited").count();
    assert_eq!(limited, 4, "{frames:?}");
    assert_eq!(frames.iter().filter(|f| f["type"] == "joined").count(), 2, "within the burst: {frames:?}");
    // The other member heard of one join/leave pair, not of the flood.
    let mut seen = Vec::new();
    while let Ok(frame) = tokio::time::timeout(Duration::from_millis(200), next(&mut watcher)).await {
        seen.push(frame["type"].as_str().unwrap_or_default().to_owned());
    }
    assert_eq!(seen.iter().filter(|t| *t == "user_joined").count(), 2, "{seen:?}");
}

#[test]
fn the_frame_budget_never_undercuts_publishes() {
    let mut cfg = config();
    cfg.limits.publish_rate_per_sec = 1000;
    assert_eq!(cfg.limits.frame_budget().0, 2000, "unset: twice the publish rate");
    cfg.limits.frame_rate_per_sec = Some(10);
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("limits.frame_rate_per_sec"), "{err}");
}

#[tokio::test(start_paused = true)]
async fn silent_clients_time_out() {
    let mut cfg = config();
    cfg.limits.ping_interval_secs = 1;
    cfg.limits.idle_timeout_secs = 3;
    let hub = hub(cfg);
    let mut ann = connect(&hub, "ann").await;
    assert_eq!(ann.close_code().await, Some(close::IDLE_TIMEOUT));
}

#[tokio::test]
async fn drain_refuses_new_work_and_asks_clients_to_reconnect() {
    let mut cfg = config();
    cfg.limits.max_connections = 2;
    let hub = hub(cfg);
    let mut ann = connect(&hub, "ann").await;
    let mut bob = connect(&hub, "bob").await;
    assert_eq!(hub.admit(None).err(), Some(super::Refusal::Full));
    hub.start_draining();
    assert_eq!(hub.admit(None).err(), Some(super::Refusal::Draining));
    send(&bob, json!({"type": "join", "room": "r"})).await;
    assert_eq!(expect(&mut bob, "error").await["code"], "draining");
    hub.disconnect_all(1000).await;
    assert_eq!(ann.close_code().await, Some(close::RECONNECT_ELSEWHERE));
    assert_eq!(bob.close_code().await, Some(close::RECONNECT_ELSEWHERE));
    for _ in 0..100 {
        if hub.open_connections() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(hub.open_connections(), 0);
}

#[tokio::test]
async fn a_node_on_its_own_forgets_expired_sessions() {
    let hub = hub(config());
    let mut ann = connect(&hub, "ann").await;
    join(&mut ann, "r").await;
    send(&ann, json!({"type": "leave", "room": "r"})).await;
    expect(&mut ann, "left").await;
    let session = hub.sessions().all().first().map(|r| r.id.clone()).expect("the session was recorded");
    let now = std::time::Instant::now();
    let now_ms = super::unix_millis();
    hub.sweep(now, now_ms);
    assert!(hub.sessions().get(&session, "ann").is_some(), "still fresh");
    hub.sweep(now, now_ms + super::sessions::SESSION_TTL_MS + 1);
    assert!(hub.sessions().get(&session, "ann").is_none(), "expired without a cluster tick");
}

#[tokio::test]
async fn idle_rooms_are_forgotten_with_a_new_epoch() {
    let hub = hub(config());
    let mut ann = connect(&hub, "ann").await;
    let first = join(&mut ann, "r").await["epoch"].clone();
    send(&ann, json!({"type": "leave", "room": "r"})).await;
    expect(&mut ann, "left").await;
    let later = std::time::Instant::now() + Duration::from_secs(301);
    assert_eq!(hub.sweep_rooms(later), 1);
    assert_eq!(hub.room_count(), 0);
    assert_ne!(join(&mut ann, "r").await["epoch"], first);
}

#[tokio::test]
async fn a_node_holds_at_most_max_rooms_but_existing_ones_stay_open() {
    let mut config = config();
    config.limits.max_rooms = 2;
    let hub = hub(config);
    let (mut ann, mut bob) = (connect(&hub, "ann").await, connect(&hub, "bob").await);
    join(&mut ann, "a").await;
    join(&mut ann, "b").await;
    send(&ann, json!({"type": "join", "id": "third", "room": "c"})).await;
    let refused = expect(&mut ann, "error").await;
    assert_eq!(
        (refused["code"].as_str(), refused["id"].as_str()),
        (Some("too_many_rooms"), Some("third")),
        "{refused}"
    );
    assert_eq!(hub.room_count(), 2, "the refused room was not created");
    join(&mut bob, "a").await;
}

#[tokio::test]
async fn a_flood_of_websocket_pings_spends_the_budget_and_closes_4003() {
    let hub = tight_frame_budget();
    let mut ann = connect(&hub, "ann").await;
    for _ in 0..9 {
        ann.inbound.send(Inbound::Activity).await.unwrap();
    }
    let (frames, code) = ann.frames_until_close(Duration::from_secs(5)).await;
    assert_eq!(code, Some(close::TOO_MANY_REQUESTS), "four in the burst, then five strikes: {frames:?}");
    assert!(frames.is_empty(), "pings over the budget get no error frames: {frames:?}");
    assert_eq!(hub.metrics().rate_limited.get(), 5);
}

/// The close the server sent (code and reason), skipping frames and pings.
async fn close_of(client: &mut MemoryClient) -> Option<(u16, String)> {
    let closed = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(item) = client.outbound.recv().await {
            if let crate::transport::memory::ToClient::Close(code, reason) = item {
                return Some((code, reason));
            }
        }
        None
    });
    closed.await.ok().flatten()
}

/// A connection of `user` resuming `session` (`None`: a new session), and its `welcome`.
async fn connect_resuming(hub: &Arc<Hub>, user: &str, session: Option<String>) -> (MemoryClient, Value) {
    let (conn, mut client) = pair(64);
    let permit = hub.admit(None).unwrap();
    tokio::spawn(hub.clone().serve(conn, identity(user, &[]), session, permit));
    let welcome = client.next_json().await.unwrap();
    (client, welcome)
}

#[tokio::test]
async fn a_shed_connection_resumes_exactly_and_is_never_shed_again() {
    let hub = hub(config());
    let (mut ann, welcome) = connect_resuming(&hub, "ann", None).await;
    let session = welcome["session_id"].as_str().unwrap().to_owned();
    join(&mut ann, "r").await;
    let mut bob = connect(&hub, "bob").await;
    join(&mut bob, "r").await;
    expect(&mut ann, "user_joined").await;
    send(&bob, json!({"type": "publish", "room": "r", "body": "one"})).await;
    assert_eq!(expect(&mut ann, "message").await["offset"], 1);

    // Connections younger than the minimum age stay.
    assert_eq!(hub.shed(10, Duration::from_secs(3600)), 0);
    assert_eq!(hub.shed(10, Duration::ZERO), 2, "both are old enough");
    assert_eq!(hub.shed(10, Duration::ZERO), 0, "a connection asked to close is not asked again");
    assert_eq!(close_of(&mut ann).await, Some((close::RECONNECT_ELSEWHERE, "rebalance".to_owned())));
    assert_eq!(close_of(&mut bob).await.map(|c| c.0), Some(close::RECONNECT_ELSEWHERE));

    // Back through "another node" (here the same hub): the session resumes where it was.
    let (mut ann, welcome) = connect_resuming(&hub, "ann", Some(session)).await;
    assert_eq!(welcome["resumed"], true);
    let rejoined = expect(&mut ann, "joined").await;
    assert_eq!((rejoined["offset"].as_u64(), rejoined["recovered"].as_bool()), (Some(1), Some(true)));
    let mut cat = connect(&hub, "cat").await;
    join(&mut cat, "r").await;
    send(&cat, json!({"type": "publish", "room": "r", "body": "two"})).await;
    let next = loop {
        let frame = next(&mut ann).await;
        if frame["type"] == "message" {
            break frame;
        }
    };
    assert_eq!((next["offset"].as_u64(), next["body"].as_str()), (Some(2), Some("two")), "no message twice or lost");

    // The moved session is never moved again; cat, never moved, is.
    assert_eq!(hub.shed(10, Duration::ZERO), 1);
    assert_eq!(close_of(&mut cat).await.map(|c| c.0), Some(close::RECONNECT_ELSEWHERE));
    for _ in 0..100 {
        if hub.metrics().rebalance_shed.get() == 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(hub.metrics().rebalance_shed.get(), 3, "every close sent is counted");
}

/// A log that is not ready until told (a cluster node catching up), else a node on its own.
#[derive(Default)]
struct CatchingUp {
    local: super::log::LocalLog,
    ready: std::sync::atomic::AtomicBool,
}

impl super::log::RoomLog for CatchingUp {
    fn attach(&self, hub: std::sync::Weak<Hub>) {
        self.local.attach(hub);
    }

    fn publish(&self, command: super::log::Command, reply: super::log::Reply) -> Option<crate::transport::Frame> {
        self.local.publish(command, reply)
    }

    fn open(&self, room: &str) {
        self.local.open(room);
    }

    fn ready(&self) -> bool {
        self.ready.load(std::sync::atomic::Ordering::Acquire)
    }
}

#[tokio::test]
async fn a_node_lets_clients_in_only_once_it_was_ready() {
    let log = Arc::new(CatchingUp::default());
    let hub = Hub::new("test-node".into(), config(), Arc::new(Metrics::new()), Some(log.clone() as _)).unwrap();
    let refused = hub.admit(None).err();
    assert_eq!(refused, Some(super::Refusal::Starting));
    assert_eq!(refused.map(|r| r.http_status()), Some(503));
    log.ready.store(true, std::sync::atomic::Ordering::Release);
    let _ann = connect(&hub, "ann").await;
    // Later losses of readiness (quorum, a partition) keep the node open to its clients.
    log.ready.store(false, std::sync::atomic::Ordering::Release);
    assert!(hub.admit(None).is_ok());
}
