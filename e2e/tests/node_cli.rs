//! The `chat-node` command line: config precedence (file < env < flags), clear config errors with
//! exit code 2, JSON logs, and the helper subcommands.

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chat_e2e::client::{Client, handshake_status};
use chat_e2e::{NodeProcess, free_port, node_binary};

/// Runs chat-node to completion; a run that should have failed fast but serves instead is
/// killed after a bounded wait, so a regression fails the test rather than hanging it.
fn run(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(node_binary());
    cmd.args(args).env_remove("RUST_LOG").stdout(Stdio::piped()).stderr(Stdio::piped());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run chat-node");
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().expect("poll chat-node").is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    child.wait_with_output().expect("collect chat-node output")
}

fn write_config(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), text).unwrap();
    file
}

#[test]
fn invalid_config_names_the_field_and_exits_2() {
    let file = write_config("[auth]\nmode = \"anonymous\"\n[limits]\nmax_message_bytes = 10\n");
    let out = run(&["--config", file.path().to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.max_message_bytes"), "{stderr}");

    let out = run(&["--anonymous"], &[("CHAT_LIMITS__MAX_CONNECTIONS", "lots")]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("limits.max_connections") && stderr.contains("CHAT_"), "{stderr}");

    let out = run(&[], &[]);
    assert_eq!(out.status.code(), Some(2), "jwt mode without a key is refused");
    assert!(String::from_utf8_lossy(&out.stderr).contains("auth.jwt_secret_file"));
}

#[test]
fn env_overrides_file_and_flags_override_env() {
    let file = write_config("listen = \"127.0.0.1:1\"\n[auth]\nmode = \"anonymous\"\n[history]\nsize = 7\n");
    let out = run(
        &["--config", file.path().to_str().unwrap(), "--listen", "127.0.0.1:2", "check-config"],
        &[("CHAT_HISTORY__SIZE", "9"), ("CHAT_LISTEN", "127.0.0.1:3"), ("CHAT_UNRELATED_THING", "x")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let effective: toml::Value = toml::from_str(&String::from_utf8_lossy(&out.stdout)).unwrap();
    assert_eq!(effective["history"]["size"].as_integer(), Some(9), "env beats the file");
    assert_eq!(effective["listen"].as_str(), Some("127.0.0.1:2"), "flags beat env");
}

#[test]
fn check_config_never_prints_inline_secrets() {
    let file = write_config("[auth]\njwt_secret = \"jwt-secret-of-twenty-bytes\"\n");
    let out = run(
        &["--config", file.path().to_str().unwrap(), "check-config"],
        &[("CHAT_CLUSTER__SECRET", "cluster-secret-of-twenty-bytes")],
    );
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(!shown.contains("jwt-secret-of") && !shown.contains("cluster-secret-of"), "{shown}");
    let effective: toml::Value = toml::from_str(&shown).unwrap();
    assert_eq!(effective["auth"]["jwt_secret"].as_str(), Some("<redacted>"), "set, and said so");
    assert_eq!(effective["cluster"]["secret"].as_str(), Some("<redacted>"));
}

#[tokio::test]
async fn a_token_minted_from_a_secret_file_verifies_on_the_node() {
    // Trailing blanks are part of the secret; only the final newline is not (both readers agree).
    let secret = write_config("0123456789abcdef0123  \n");
    let config = write_config(&format!("[auth]\njwt_secret_file = \"{}\"\n", secret.path().display()));
    let out = run(&["--config", config.path().to_str().unwrap(), "token", "--sub", "ann"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let port = free_port();
    let node_config =
        format!("listen = \"127.0.0.1:{port}\"\n[auth]\njwt_secret_file = \"{}\"\n", secret.path().display());
    let node = NodeProcess::start_with_env(&node_config, &[]).await.unwrap();
    assert_eq!(handshake_status(&node.ws_url(), &[("Authorization", &format!("Bearer {token}"))]).await, 101);
}

#[test]
fn schema_and_token_subcommands() {
    let out = run(&["schema"], &[]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let schema: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(schema["title"], "NodeConfig");

    let secret = "0123456789abcdef0123";
    let out = run(&["token", "--sub", "ann", "--roles", "a,b"], &[("CHAT_AUTH__JWT_SECRET", secret)]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // Signed with the configured secret (HS256), for the subject and roles asked for.
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
    validation.required_spec_claims = ["sub", "exp"].iter().map(|c| c.to_string()).collect();
    let key = jsonwebtoken::DecodingKey::from_secret(secret.as_bytes());
    let claims = jsonwebtoken::decode::<serde_json::Value>(&token, &key, &validation)
        .unwrap_or_else(|e| panic!("the token does not verify with the secret: {e}: {token}"))
        .claims;
    assert_eq!(claims["sub"], "ann", "{claims}");
    assert_eq!(claims["roles"], serde_json::json!(["a", "b"]), "{claims}");
    let wrong = jsonwebtoken::DecodingKey::from_secret(b"another secret of twenty bytes");
    assert!(jsonwebtoken::decode::<serde_json::Value>(&token, &wrong, &validation).is_err(), "signature checked");
}

#[tokio::test]
async fn json_logs_and_env_limits_apply_to_a_running_node() {
    let port = free_port();
    let config = format!("listen = \"127.0.0.1:{port}\"\n[auth]\nmode = \"anonymous\"\n[log]\nformat = \"json\"\n");
    // The file leaves limits.max_connections at its default (thousands); the environment says 1.
    let node = NodeProcess::start_with_env(&config, &[("CHAT_LIMITS__MAX_CONNECTIONS", "1")]).await.unwrap();
    let first = Client::connect(&node.ws_url(), None).await.expect("the first connection fits the limit");
    assert_eq!(handshake_status(&node.ws_url(), &[]).await, 503, "a second one is over the limit from the environment");
    first.close().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut ok = 0;
    while ok != 101 && Instant::now() < deadline {
        ok = handshake_status(&node.ws_url(), &[]).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(ok, 101, "the slot is free again once the first connection closed");
    let logs = node.output();
    let json_line = logs.lines().find(|l| l.starts_with('{')).unwrap_or_else(|| panic!("no JSON log line in:\n{logs}"));
    let parsed: serde_json::Value = serde_json::from_str(json_line).unwrap();
    assert!(parsed.get("level").is_some(), "{parsed}");
    node.terminate();
    let mut node = node;
    assert!(node.wait_exit(Duration::from_secs(10)).await.unwrap().success());
}
