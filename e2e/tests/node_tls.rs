//! TLS on the client port: `wss://` with a certificate from files, a renewed certificate served
//! to new connections without a restart while open ones go on, and the plain admin port.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, ensure};
use chat_e2e::NodeProcess;
use chat_e2e::free_port;
use futures_util::{SinkExt, StreamExt};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

const T: Duration = Duration::from_secs(10);

/// A self-signed certificate for `ips`: (certificate PEM, key PEM, certificate DER).
fn certificate(ips: &[&str], name: &str) -> anyhow::Result<(String, String, CertificateDer<'static>)> {
    let mut params = rcgen::CertificateParams::new(ips.iter().map(|ip| (*ip).to_owned()).collect::<Vec<_>>())?;
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let key = rcgen::KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem(), cert.der().clone()))
}

/// A certificate for 127.0.0.1, written as PEM to `dir/cert.pem` and `dir/key.pem` the way a
/// Secret update lands (new files renamed over the old); returns its DER.
fn issue(dir: &Path, name: &str) -> anyhow::Result<CertificateDer<'static>> {
    let (cert, key, der) = certificate(&["127.0.0.1"], name)?;
    for (file, pem) in [("key.pem", key), ("cert.pem", cert)] {
        let temp = dir.join(format!("{file}.new"));
        std::fs::write(&temp, pem)?;
        std::fs::rename(&temp, dir.join(file))?;
    }
    Ok(der)
}

/// A TLS connection to `addr` that trusts only `root`; also returns the certificate served.
async fn tls_connect(
    addr: std::net::SocketAddr,
    root: &CertificateDer<'static>,
) -> anyhow::Result<(tokio_rustls::client::TlsStream<tokio::net::TcpStream>, CertificateDer<'static>)> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(root.clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let name = ServerName::IpAddress(addr.ip().into());
    let stream = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await?;
    let served = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).context("no certificate")?.clone();
    Ok((stream, served.into_owned()))
}

type Wss = tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

async fn wss(
    node: &NodeProcess,
    root: &CertificateDer<'static>,
    name: &str,
) -> anyhow::Result<(Wss, CertificateDer<'static>)> {
    wss_at(node.addr(), root, name).await
}

async fn wss_at(
    addr: std::net::SocketAddr,
    root: &CertificateDer<'static>,
    name: &str,
) -> anyhow::Result<(Wss, CertificateDer<'static>)> {
    let (stream, served) = tls_connect(addr, root).await?;
    let mut request = format!("wss://{addr}/ws?name={name}").into_client_request()?;
    request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static("chatcluster.v1.json"));
    let (mut ws, _) = tokio_tungstenite::client_async(request, stream).await?;
    let welcome = next_json(&mut ws).await?;
    ensure!(welcome["type"] == "welcome", "{welcome}");
    Ok((ws, served))
}

async fn next_json(ws: &mut Wss) -> anyhow::Result<serde_json::Value> {
    loop {
        match tokio::time::timeout(T, ws.next()).await.context("no frame in time")? {
            Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
            Some(Ok(_)) => continue,
            other => anyhow::bail!("connection ended: {other:?}"),
        }
    }
}

async fn until(ws: &mut Wss, kind: &str) -> anyhow::Result<serde_json::Value> {
    loop {
        let frame = next_json(ws).await?;
        if frame["type"] == kind {
            return Ok(frame);
        }
    }
}

#[tokio::test]
async fn wss_with_a_certificate_that_is_renewed_without_a_restart() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let first = issue(dir.path(), "first")?;
    let config = format!(
        "listen = \"127.0.0.1:{}\"\n[auth]\nmode = \"anonymous\"\n[tls]\ncert_file = {:?}\nkey_file = {:?}\n",
        free_port(),
        dir.path().join("cert.pem"),
        dir.path().join("key.pem"),
    );
    let node = NodeProcess::start(&config).await?;

    // wss:// works and serves the first certificate; plain ws:// on the same port does not.
    let (mut ann, served) = wss(&node, &first, "ann").await?;
    ensure!(served == first, "the first certificate is served");
    ann.send(Message::text(r#"{"type":"join","room":"tls"}"#)).await?;
    until(&mut ann, "joined").await?;
    let plain = chat_e2e::client::Client::connect(&format!("ws://{}/ws?name=x", node.addr()), None).await;
    ensure!(plain.is_err(), "a plain WebSocket on the TLS port must fail");
    // HTTPS for the page and the probes; the admin port stays plain HTTP.
    let (mut https, _) = tls_connect(node.addr(), &first).await?;
    https.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await?;
    let mut answer = String::new();
    https.read_to_string(&mut answer).await?;
    ensure!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    ensure!(node.admin_get("/metrics").await?.0 == 200, "the admin port is plain HTTP");

    // The certificate is renewed on disk: new connections get it, without a restart...
    let second = issue(dir.path(), "second")?;
    let (mut bob, served) = wss(&node, &second, "bob").await?;
    ensure!(served == second, "the renewed certificate is served to a new connection");
    ensure!(tls_connect(node.addr(), &first).await.is_err(), "the old certificate is no longer served");
    // ...and the connection opened before the renewal goes on.
    bob.send(Message::text(r#"{"type":"join","room":"tls"}"#)).await?;
    until(&mut bob, "joined").await?;
    ann.send(Message::text(r#"{"type":"publish","room":"tls","body":"still here"}"#)).await?;
    let message = until(&mut bob, "message").await?;
    ensure!(message["body"] == "still here", "{message}");

    // A renewal that cannot be used (a key that does not match) keeps the certificate served.
    std::fs::write(dir.path().join("key.pem.new"), rcgen::KeyPair::generate()?.serialize_pem())?;
    std::fs::rename(dir.path().join("key.pem.new"), dir.path().join("key.pem"))?;
    let (_carol, served) = wss(&node, &second, "carol").await?;
    ensure!(served == second, "a broken renewal keeps the working certificate");
    let log = node.output();
    ensure!(log.contains("serving the previous one"), "the broken renewal is logged:\n{log}");
    Ok(())
}

/// `spec.tls` in local mode: the Secret in the manifest is served, and a renewed one in an edit
/// reaches the running nodes without restarting them.
#[tokio::test]
async fn local_mode_serves_spec_tls_and_a_renewal_restarts_nothing() -> anyhow::Result<()> {
    use chat_e2e::local::{LocalMode, chat_cluster, manifest_yaml};
    let first = std::net::Ipv4Addr::new(127, 0, 9, 10);
    let ips = ["127.0.9.10", "127.0.9.11"];
    let manifest = |cert: &str, key: &str| {
        let cluster = chat_cluster(
            "chat",
            2,
            serde_json::json!({"tls": {"secretName": "chat-tls"}, "config": {"auth": {"mode": "anonymous"}}}),
        );
        let secret = serde_json::json!({
            "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "chat-tls"},
            "type": "kubernetes.io/tls", "stringData": {"tls.crt": cert, "tls.key": key},
        });
        manifest_yaml(&[cluster, secret])
    };
    let (cert, key, der) = certificate(&ips, "first")?;
    let dir = tempfile::tempdir()?;
    let mut lm = LocalMode::start(dir.path(), "chat", first, LocalMode::free_base_port(), &manifest(&cert, &key))?;
    let pids = lm.wait_ready(2, Duration::from_secs(60)).await?;
    for ordinal in 0..2 {
        let (_ws, served) = wss_at(lm.addr(ordinal), &der, "ann").await?;
        ensure!(served == der, "node {ordinal} serves the manifest's certificate");
    }

    let (cert, key, renewed) = certificate(&ips, "second")?;
    lm.edit(&manifest(&cert, &key))?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while wss_at(lm.addr(1), &renewed, "bob").await.is_err() {
        ensure!(tokio::time::Instant::now() < deadline, "the renewed certificate was not served within 20 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_ws, served) = wss_at(lm.addr(0), &renewed, "carol").await?;
    ensure!(served == renewed, "every node serves the renewal");
    ensure!(lm.pids()? == pids, "no node restarted for the renewal");
    Ok(())
}
