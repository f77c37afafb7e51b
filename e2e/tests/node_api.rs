//! The server API (`/api/v1` on the admin port) against real `chat-node` processes, with real
//! WebSocket clients on the other side: keys, publishing (once per idempotency key) into rooms
//! that clients hear on every node, field-level errors, history, presence, rooms, disconnecting
//! a user everywhere, and the implementation checked against its OpenAPI document with
//! schemathesis (installed by `.ci/run` into `target/api-check-venv`).

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, ensure};
use chat_e2e::client::{Client, HttpResponse, http_request};
use chat_e2e::cluster::{LoopbackCluster, user_token, wait_converged};
use chat_e2e::{NodeProcess, free_port, mint_token};
use serde_json::{Value, json};

const KEY: &str = "api-key-for-the-e2e-tests-0123456789";
const JWT: &str = "node-api-e2e-jwt-secret-0123456789abcdef";
const T: Duration = Duration::from_secs(10);

fn config(extra: &str) -> String {
    let (port, admin) = (free_port(), free_port());
    format!(
        "listen = \"127.0.0.1:{port}\"\nnode_id = \"api-node\"\n[admin]\nlisten = \"127.0.0.1:{admin}\"\n\
         api_keys = [\"{KEY}\"]\n[auth]\nmode = \"jwt\"\njwt_secret = \"{JWT}\"\n{extra}"
    )
}

async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<HttpResponse> {
    let bearer = format!("Bearer {KEY}");
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let headers = [("Authorization", bearer.as_str()), ("Content-Type", "application/json")];
    http_request(addr, method, path, &headers, body.as_bytes()).await
}

/// Asserts `status` and the error body's `code` (and `field`, when given).
fn refused(response: &HttpResponse, status: u16, code: &str, field: Option<&str>) -> anyhow::Result<()> {
    let body = response.json()?;
    ensure!(response.status == status && body["code"] == code, "expected {status} {code}, got {response:?}");
    if let Some(field) = field {
        ensure!(body["field"] == field, "expected field {field}: {body}");
    }
    ensure!(body["message"].as_str().is_some_and(|m| !m.is_empty()), "a message: {body}");
    Ok(())
}

async fn user(node: &NodeProcess, sub: &str) -> anyhow::Result<Client> {
    let mut client = Client::connect(&node.ws_url(), Some(&mint_token(JWT, sub, sub, &[], 3600))).await?;
    client.expect_type("welcome", T).await?;
    Ok(client)
}

async fn join(client: &mut Client, room: &str) -> anyhow::Result<()> {
    client.send_json(json!({"type": "join", "room": room, "id": "j"})).await?;
    client.recv_until("joined", T).await.map(|_| ())
}

#[tokio::test]
async fn the_api_needs_a_key_and_is_off_without_keys() -> anyhow::Result<()> {
    let node = NodeProcess::start(&config("")).await?;
    let admin = node.admin_addr();
    let missing = http_request(admin, "GET", "/api/v1/rooms", &[], b"").await?;
    refused(&missing, 401, "missing_key", None)?;
    ensure!(missing.header("www-authenticate") == Some("Bearer"), "{missing:?}");
    let wrong =
        http_request(admin, "GET", "/api/v1/rooms", &[("Authorization", "Bearer not-the-key-at-all-0000")], b"")
            .await?;
    refused(&wrong, 401, "invalid_key", None)?;
    ensure!(call(admin, "GET", "/api/v1/rooms", None).await?.status == 200);
    // The document needs no key; the client port serves no API.
    let document = http_request(admin, "GET", "/api/v1/openapi.json", &[], b"").await?.json()?;
    ensure!(document["openapi"] == "3.0.3" && document["paths"]["/rooms/{room}/messages"]["post"].is_object());
    ensure!(call(node.addr(), "GET", "/api/v1/rooms", None).await?.status == 404, "the API is not on the client port");

    let off = NodeProcess::start(&config("").replace(&format!("api_keys = [\"{KEY}\"]\n"), "")).await?;
    refused(&call(off.admin_addr(), "GET", "/api/v1/rooms", None).await?, 404, "api_disabled", None)?;

    // Keys from a file are read again when it changes (a rotated Secret).
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("keys");
    std::fs::write(&file, format!("{KEY}\n"))?;
    let keyed = config("").replace(&format!("api_keys = [\"{KEY}\"]"), &format!("api_keys_file = {:?}", file));
    let node = NodeProcess::start(&keyed).await?;
    ensure!(call(node.admin_addr(), "GET", "/api/v1/rooms", None).await?.status == 200);
    std::fs::write(&file, "another-key-after-the-rotation-000\n")?;
    let mut rotated = false;
    for _ in 0..50 {
        if call(node.admin_addr(), "GET", "/api/v1/rooms", None).await?.status == 401 {
            rotated = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(rotated, "the old key still works after the key file changed");
    Ok(())
}

#[tokio::test]
async fn a_publish_reaches_subscribers_once_per_key() -> anyhow::Result<()> {
    let node = NodeProcess::start(&config("")).await?;
    let mut alice = user(&node, "alice").await?;
    join(&mut alice, "news").await?;

    let publish = json!({"body": "from the backend", "key": "order-1"});
    let first = call(node.admin_addr(), "POST", "/api/v1/rooms/news/messages", Some(publish.clone())).await?;
    ensure!(first.status == 200, "{first:?}");
    let stored = first.json()?;
    ensure!(stored["room"] == "news" && stored["offset"] == 1 && stored["epoch"].is_string(), "{stored}");
    let message = alice.recv_until("message", T).await?;
    ensure!(message["body"] == "from the backend" && message["sender"]["id"] == "server", "{message}");

    // A retry with the same key is the same message: same offset, nothing new delivered.
    let again = call(node.admin_addr(), "POST", "/api/v1/rooms/news/messages", Some(publish)).await?.json()?;
    ensure!(again["offset"] == 1, "a retry is stored once: {again}");
    let named = json!({"body": "second", "sender": {"id": "bot", "name": "News bot"}});
    let second = call(node.admin_addr(), "POST", "/api/v1/rooms/news/messages", Some(named)).await?.json()?;
    ensure!(second["offset"] == 2, "{second}");
    let message = alice.recv_until("message", T).await?;
    ensure!(message["offset"] == 2 && message["sender"]["name"] == "News bot", "no duplicate of #1 first: {message}");

    let broadcast = json!({"rooms": ["news", "sport"], "body": "everywhere"});
    let result = call(node.admin_addr(), "POST", "/api/v1/broadcast", Some(broadcast)).await?.json()?;
    let results = result["results"].as_array().context("results")?;
    ensure!(results.len() == 2 && results[0]["room"] == "news" && results[0]["offset"] == 3, "{result}");
    ensure!(results[1]["room"] == "sport" && results[1]["offset"] == 1, "{result}");
    ensure!(alice.recv_until("message", T).await?["body"] == "everywhere");
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_naming_the_field() -> anyhow::Result<()> {
    let node =
        NodeProcess::start(&config("[limits]\nmax_message_bytes = 1024\n[[auth.rooms]]\npattern = \"public.*\"\n"))
            .await?;
    let admin = node.admin_addr();
    let post = |path: &'static str, body: Value| call(admin, "POST", path, Some(body));
    refused(&post("/api/v1/rooms/public.a/messages", json!({})).await?, 400, "bad_request", Some("body"))?;
    refused(&post("/api/v1/rooms/public.a/messages", json!({"body": 5})).await?, 400, "bad_request", Some("request"))?;
    let unknown = post("/api/v1/rooms/public.a/messages", json!({"body": "x", "colour": "red"})).await?;
    refused(&unknown, 400, "bad_request", None)?;
    ensure!(unknown.body.contains("colour"), "the unknown field is named: {unknown:?}");
    let long_key = "k".repeat(65);
    refused(
        &post("/api/v1/rooms/public.a/messages", json!({"body": "x", "key": long_key})).await?,
        400,
        "bad_request",
        Some("key"),
    )?;
    let no_name = json!({"body": "x", "sender": {"id": "bot", "name": " "}});
    refused(&post("/api/v1/rooms/public.a/messages", no_name).await?, 400, "bad_request", Some("sender.name"))?;
    refused(
        &post("/api/v1/rooms/public.a/messages", json!({"body": "x".repeat(1025)})).await?,
        413,
        "too_large",
        Some("body"),
    )?;
    refused(&post("/api/v1/rooms/bad%20room/messages", json!({"body": "x"})).await?, 400, "bad_request", Some("room"))?;
    refused(&post("/api/v1/rooms/private/messages", json!({"body": "x"})).await?, 403, "forbidden", None)?;
    refused(&post("/api/v1/broadcast", json!({"rooms": [], "body": "x"})).await?, 400, "bad_request", Some("rooms"))?;
    let twice = json!({"rooms": ["public.a", "public.a"], "body": "x"});
    refused(&post("/api/v1/broadcast", twice).await?, 400, "bad_request", Some("rooms"))?;
    refused(&post("/api/v1/users/u/disconnect", json!({"code": 1000})).await?, 400, "bad_request", Some("code"))?;
    let get = |path: &'static str| call(admin, "GET", path, None);
    refused(&get("/api/v1/rooms/public.none").await?, 404, "room_not_found", None)?;
    refused(&get("/api/v1/rooms/public.a/history?limit=many").await?, 400, "bad_request", Some("query"))?;
    refused(&get("/api/v1/nowhere").await?, 404, "not_found", None)?;
    refused(&call(admin, "DELETE", "/api/v1/rooms", None).await?, 405, "method_not_allowed", None)?;
    let not_json =
        http_request(admin, "POST", "/api/v1/broadcast", &[("Authorization", &format!("Bearer {KEY}"))], b"{not json")
            .await?;
    refused(&not_json, 400, "bad_request", None)?;
    // Nothing of the above was stored.
    refused(&get("/api/v1/rooms/public.a").await?, 404, "room_not_found", None)?;
    Ok(())
}

/// A room only the API writes to has no subscriber, yet it is in use: it keeps its stream for
/// as long as messages come (the idle time counts from the last message).
#[tokio::test]
async fn a_room_fed_only_by_the_api_is_not_forgotten_while_in_use() -> anyhow::Result<()> {
    let node = NodeProcess::start(&config("[history]\nempty_room_ttl_secs = 1\n")).await?;
    let mut epochs = std::collections::BTreeSet::new();
    for n in 1..=8u64 {
        let stored =
            call(node.admin_addr(), "POST", "/api/v1/rooms/feed/messages", Some(json!({"body": n.to_string()})))
                .await?
                .json()?;
        ensure!(stored["offset"] == n, "message {n} at {stored}: the stream restarted");
        epochs.insert(stored["epoch"].to_string());
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    ensure!(epochs.len() == 1, "one stream: {epochs:?}");
    let history = call(node.admin_addr(), "GET", "/api/v1/rooms/feed/history", None).await?.json()?;
    ensure!(history["messages"].as_array().map(Vec::len) == Some(8), "{history}");
    Ok(())
}

#[tokio::test]
async fn history_presence_and_rooms() -> anyhow::Result<()> {
    let node = NodeProcess::start(&config("")).await?;
    let admin = node.admin_addr();
    let mut alice = user(&node, "alice").await?;
    join(&mut alice, "lobby").await?;
    for n in 1..=3 {
        let published =
            call(admin, "POST", "/api/v1/rooms/lobby/messages", Some(json!({"body": format!("m{n}")}))).await?;
        ensure!(published.status == 200, "{published:?}");
    }
    let newest = call(admin, "GET", "/api/v1/rooms/lobby/history?limit=2", None).await?.json()?;
    let bodies = |page: &Value| -> Vec<String> {
        page["messages"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|m| m["body"].as_str().map(str::to_owned))
            .collect()
    };
    // `complete`: nothing older than what was asked for has left the history.
    ensure!(bodies(&newest) == ["m2", "m3"] && newest["complete"] == true, "{newest}");
    let epoch = newest["epoch"].as_str().context("epoch")?;
    let forward = call(admin, "GET", &format!("/api/v1/rooms/lobby/history?since_epoch={epoch}&since_offset=1"), None)
        .await?
        .json()?;
    ensure!(bodies(&forward) == ["m2", "m3"] && forward["more"] == false, "{forward}");

    let presence = call(admin, "GET", "/api/v1/rooms/lobby/presence", None).await?.json()?;
    ensure!(
        presence["users"] == json!([{"id": "alice", "name": "alice"}]) && presence.get("next").is_none(),
        "{presence}"
    );
    let info = call(admin, "GET", "/api/v1/rooms/lobby", None).await?.json()?;
    ensure!(
        info == json!({"room": "lobby", "epoch": epoch, "last_offset": 3, "present_users": 1, "local_subscribers": 1}),
        "{info}"
    );
    let rooms = call(admin, "GET", "/api/v1/rooms", None).await?.json()?;
    ensure!(rooms["rooms"] == json!([info]), "{rooms}");
    Ok(())
}

#[tokio::test]
async fn disconnect_closes_every_connection_of_the_user() -> anyhow::Result<()> {
    let node = NodeProcess::start(&config("")).await?;
    let (mut first, mut second, mut bob) =
        (user(&node, "mallory").await?, user(&node, "mallory").await?, user(&node, "bob").await?);
    let answer = call(node.admin_addr(), "POST", "/api/v1/users/mallory/disconnect", None).await?.json()?;
    ensure!(answer == json!({"user_id": "mallory", "code": 4502, "local_connections": 2}), "{answer}");
    for client in [&mut first, &mut second] {
        ensure!(client.recv_close(T).await.map(|(code, _)| code) == Some(4502), "closed with 4502 (do not reconnect)");
    }
    bob.send_json(json!({"type": "ping", "id": "still-here"})).await?;
    ensure!(bob.recv_until("pong", T).await?["id"] == "still-here", "other users stay");
    // 4000 asks clients to reconnect at once (e.g. to pick up new roles).
    let mut again = user(&node, "mallory").await?;
    let answer = call(node.admin_addr(), "POST", "/api/v1/users/mallory/disconnect", Some(json!({"code": 4000})))
        .await?
        .json()?;
    ensure!(answer["local_connections"] == 1, "{answer}");
    ensure!(again.recv_close(T).await.map(|(code, _)| code) == Some(4000));
    Ok(())
}

/// Any node answers: a publish through one node's API reaches WebSocket subscribers on every
/// node, and a disconnect through one node closes the user's connections on the others.
#[tokio::test]
async fn any_node_publishes_and_disconnects_for_the_whole_cluster() -> anyhow::Result<()> {
    let cluster = LoopbackCluster::start_tuned(3, |cfg| {
        cfg.admin.api_keys = vec![KEY.to_owned()];
        cfg.auth.mode = chat_node::config::AuthMode::Jwt;
        cfg.auth.jwt_secret = Some(chat_e2e::cluster::JWT_SECRET.to_owned());
    })
    .await?;
    wait_converged(&cluster.all(), 3).await?;
    let mut listeners = Vec::new();
    for m in &cluster.members[1..] {
        let mut client = Client::connect(&m.node.ws_url(), Some(&user_token("listener"))).await?;
        client.expect_type("welcome", T).await?;
        join(&mut client, "townhall").await?;
        listeners.push(client);
    }
    let api = cluster.members[0].node.admin_addr();
    let published =
        call(api, "POST", "/api/v1/rooms/townhall/messages", Some(json!({"body": "hello cluster"}))).await?;
    ensure!(published.status == 200 && published.json()?["offset"] == 1, "{published:?}");
    for listener in &mut listeners {
        let message = listener.recv_until("message", T).await?;
        ensure!(message["body"] == "hello cluster" && message["offset"] == 1, "{message}");
    }
    // Presence is cluster-wide: node 0 has no subscriber of its own but lists the listener
    // (presence reaches the peers within a tick).
    let mut info = Value::Null;
    for _ in 0..50 {
        info = call(api, "GET", "/api/v1/rooms/townhall", None).await?.json()?;
        if info["present_users"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure!(info["present_users"] == 1 && info["local_subscribers"] == 0, "{info}");

    // One key in two rooms is two messages, each stored once however often it is retried
    // (the key names the publish while it waits for its commit, per room).
    let broadcast = json!({"rooms": ["townhall", "annex"], "body": "both", "key": "b-1"});
    for attempt in 0..2 {
        let result = call(api, "POST", "/api/v1/broadcast", Some(broadcast.clone())).await?.json()?;
        let offsets: Vec<&Value> =
            result["results"].as_array().context("results")?.iter().map(|r| &r["offset"]).collect();
        ensure!(offsets == [&json!(2), &json!(1)], "attempt {attempt}: {result}");
    }
    for listener in &mut listeners {
        let message = listener.recv_until("message", T).await?;
        ensure!(message["body"] == "both" && message["offset"] == 2, "{message}");
    }

    let answer = call(api, "POST", "/api/v1/users/listener/disconnect", None).await?.json()?;
    ensure!(answer["local_connections"] == 0, "none on the answering node: {answer}");
    for listener in &mut listeners {
        ensure!(listener.recv_close(T).await.map(|(code, _)| code) == Some(4502), "closed on the other nodes too");
    }
    Ok(())
}

/// The running API matches its OpenAPI document: schemathesis generates requests from it
/// (valid and invalid) and checks every answer's status and body against the document.
#[tokio::test]
async fn the_api_conforms_to_its_openapi_document() -> anyhow::Result<()> {
    let venv = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/api-check-venv/bin/schemathesis");
    ensure!(venv.exists(), "{} is missing: .ci/run installs it (scripts/api-check.sh --install)", venv.display());
    let node = NodeProcess::start(&config("")).await?;
    let mut alice = user(&node, "alice").await?;
    join(&mut alice, "lobby").await?;
    let admin = node.admin_addr();
    call(admin, "POST", "/api/v1/rooms/lobby/messages", Some(json!({"body": "seed"}))).await?;
    // schemathesis keeps a cache of what it found in its working directory.
    let scratch = tempfile::tempdir()?;
    let output = tokio::process::Command::new(&venv)
        .current_dir(scratch.path())
        .args(["run", &format!("http://{admin}/api/v1/openapi.json"), "--url", &format!("http://{admin}/api/v1")])
        .args(["--header", &format!("Authorization: Bearer {KEY}"), "--checks", "all", "--max-examples", "30"])
        .args(["--seed", "1", "--no-color", "--phases", "examples,coverage,fuzzing"])
        .env("SCHEMATHESIS_HOOKS", "")
        .kill_on_drop(true)
        .output();
    let output =
        tokio::time::timeout(Duration::from_secs(240), output).await.context("schemathesis took too long")??;
    let text = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    ensure!(output.status.success(), "schemathesis found problems:\n{text}");
    println!("{}", text.lines().rev().take(12).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n"));
    drop(alice);
    Ok(())
}
