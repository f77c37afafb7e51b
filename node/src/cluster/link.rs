//! One WebSocket link to a peer: the authenticated handshake (both directions, with a key
//! exchange), then a loop that seals and sends queued frames, opens received ones, answers and
//! measures heartbeats, and declares the link dead when the peer goes quiet.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::Cluster;
use super::auth::{Proof, nonce, sign, verify};
use super::seal::{Exchange, Link, Opener, Sealer, Transcript};
use super::wire::{CLOSE_AUTH_FAILED, CLOSE_DIAL_BACK, CLOSE_REPLACED, PeerFrame};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Bytes an accepted peer socket may send before it has authenticated: a hello is well under
/// 1 KiB, so anything near this is not a peer.
const PRE_AUTH_BYTES: usize = 16 * 1024;

/// A remote value (a claimed node id, an unexpected frame) as it may appear in a log line or an
/// error: escaped and at most 64 characters.
fn shown(remote: &str) -> String {
    let mut text: String = remote.chars().take(64).flat_map(char::escape_debug).collect();
    if remote.chars().nth(64).is_some() {
        text.push('…');
    }
    text
}

/// The byte stream of an accepted peer socket, cut off once it has sent `PRE_AUTH_BYTES`
/// before its handshake succeeded (`PreAuthLimit::open` lifts the limit).
pub struct PreAuthLimit<S> {
    inner: S,
    read: usize,
    open: Arc<std::sync::atomic::AtomicBool>,
}

impl<S> PreAuthLimit<S> {
    pub fn new(inner: S) -> (PreAuthLimit<S>, Arc<std::sync::atomic::AtomicBool>) {
        let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
        (PreAuthLimit { inner, read: 0, open: open.clone() }, open)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for PreAuthLimit<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let open = self.open.load(Ordering::Acquire);
        if !open && self.read >= PRE_AUTH_BYTES {
            return std::task::Poll::Ready(Err(std::io::Error::other("peer sent too much before authenticating")));
        }
        let before = buf.filled().len();
        let polled = std::pin::Pin::new(&mut self.inner).poll_read(cx, buf);
        if !open {
            self.read += buf.filled().len() - before;
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for PreAuthLimit<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// tungstenite settings for peer links: larger buffers than clients, there are few links.
pub fn peer_ws_config() -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(16 * 1024)
        .write_buffer_size(64 * 1024)
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20))
}

pub enum DialOutcome {
    /// Linked; the link ran and has ended.
    Ran,
    /// The address is this node.
    Itself,
    /// The peer's id sorts lower: it dials us.
    DialBack(String),
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
enum HandshakeError {
    #[error("peer link: {0}")]
    Ws(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("peer handshake timed out")]
    Timeout,
    #[error("unexpected frame in peer handshake: {0}")]
    Unexpected(String),
    #[error("peer closed during the handshake (code {0})")]
    Closed(u16),
}

async fn send_frame<S>(ws: &mut WebSocketStream<S>, frame: &PeerFrame) -> Result<(), HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let text = serde_json::to_string(frame).map_err(|e| HandshakeError::Unexpected(e.to_string()))?;
    ws.send(Message::text(text)).await?;
    Ok(())
}

async fn recv_frame<S>(ws: &mut WebSocketStream<S>) -> Result<PeerFrame, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let next = tokio::time::timeout(HANDSHAKE_TIMEOUT, async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(frame))) => {
                    return Err(HandshakeError::Closed(frame.map_or(1005, |f| u16::from(f.code))));
                }
                None => return Err(HandshakeError::Closed(1006)),
                Some(Ok(_)) => continue,
                Some(Err(err)) => return Err(err.into()),
            }
        }
    })
    .await
    .map_err(|_| HandshakeError::Timeout)??;
    serde_json::from_str(&next).map_err(|_| HandshakeError::Unexpected(shown(&next)))
}

async fn close<S>(ws: &mut WebSocketStream<S>, code: u16, reason: &str)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let _ = ws.close(Some(CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason) })).await;
}

/// Dials the peer port at `addr`, authenticates both ways and runs the link until it ends.
/// While a rotated secret is still accepted, a peer that refuses the current one (it has not
/// seen the new secret yet) is dialed again with the previous one.
pub async fn dial(cluster: Arc<Cluster>, addr: SocketAddr) -> DialOutcome {
    for secret in cluster.secrets() {
        if let Some(outcome) = dial_with(cluster.clone(), addr, &secret).await {
            return outcome;
        }
    }
    cluster.metrics().peer_auth_failures.inc();
    tracing::warn!(%addr, "peer refused our proof (wrong cluster secret?)");
    DialOutcome::Failed("peer refused our authentication".into())
}

/// One dial with one secret; `None` when the peer refused our proof of it.
async fn dial_with(cluster: Arc<Cluster>, addr: SocketAddr, secret: &[u8]) -> Option<DialOutcome> {
    let url = format!("ws://{addr}/peer");
    let connect = tokio_tungstenite::connect_async_with_config(url.as_str(), Some(peer_ws_config()), true);
    let mut ws = match tokio::time::timeout(HANDSHAKE_TIMEOUT, connect).await {
        Ok(Ok((ws, _))) => ws,
        Ok(Err(err)) => return Some(DialOutcome::Failed(err.to_string())),
        Err(_) => return Some(DialOutcome::Failed("connect timed out".into())),
    };
    if let tokio_tungstenite::MaybeTlsStream::Plain(tcp) = ws.get_ref() {
        // Twice the link's own write deadline, which should fire first.
        let dead_after = Duration::from_millis(cluster.config().peer_timeout_ms) * 2;
        if let Err(err) = crate::transport::tcp::tune(tcp, dead_after) {
            tracing::debug!(%err, "setting TCP options on a peer link failed");
        }
    }
    let (peer_id, acceptor_nonce, acceptor_key) = match recv_frame(&mut ws).await {
        Ok(PeerFrame::Challenge { node_id, nonce, key }) => (node_id, nonce, key),
        Ok(other) => return Some(DialOutcome::Failed(format!("expected a challenge, got {other:?}"))),
        Err(err) => return Some(DialOutcome::Failed(err.to_string())),
    };
    let me = cluster.node_id().to_owned();
    if peer_id == me {
        close(&mut ws, 1000, "that is me").await;
        return Some(DialOutcome::Itself);
    }
    if peer_id < me {
        close(&mut ws, CLOSE_DIAL_BACK, "the lower node id dials").await;
        return Some(DialOutcome::DialBack(peer_id));
    }
    let my_nonce = nonce();
    let exchange = match Exchange::new() {
        Ok(exchange) => exchange,
        Err(err) => return Some(DialOutcome::Failed(err.to_string())),
    };
    let my_key = exchange.public_hex();
    let proof = |role, nonce, signer, verifier| Proof {
        role,
        nonce,
        signer,
        verifier,
        dialer_key: &my_key,
        acceptor_key: &acceptor_key,
    };
    let hello = PeerFrame::Hello {
        node_id: me.clone(),
        peer_addr: cluster.advertised().to_owned(),
        nonce: my_nonce.clone(),
        key: my_key.clone(),
        mac: sign(secret, proof("dialer", &acceptor_nonce, &me, &peer_id)),
    };
    if let Err(err) = send_frame(&mut ws, &hello).await {
        return Some(DialOutcome::Failed(err.to_string()));
    }
    match recv_frame(&mut ws).await {
        Ok(PeerFrame::Accepted { mac }) if verify(secret, proof("acceptor", &my_nonce, &peer_id, &me), &mac) => {}
        Ok(_) => {
            cluster.metrics().peer_auth_failures.inc();
            tracing::warn!(%addr, peer = peer_id, "peer failed authentication (wrong cluster secret?)");
            close(&mut ws, CLOSE_AUTH_FAILED, "authentication failed").await;
            return Some(DialOutcome::Failed("peer failed authentication".into()));
        }
        Err(HandshakeError::Closed(CLOSE_AUTH_FAILED)) => return None,
        Err(err) => return Some(DialOutcome::Failed(err.to_string())),
    }
    let transcript =
        Transcript { dialer_id: &me, acceptor_id: &peer_id, dialer_nonce: &my_nonce, acceptor_nonce: &acceptor_nonce };
    let link = match exchange.finish(&acceptor_key, secret, &transcript, true) {
        Ok(link) => link,
        Err(err) => {
            close(&mut ws, CLOSE_AUTH_FAILED, "key exchange failed").await;
            return Some(DialOutcome::Failed(err.to_string()));
        }
    };
    run(cluster, peer_id, addr.to_string(), ws, link).await;
    Some(DialOutcome::Ran)
}

/// Runs the acceptor side of the handshake on an upgraded `/peer` socket, then the link. Until
/// the peer has proved the cluster secret, the socket holds a handshake slot (`slot`), may send
/// only a few KiB (`PreAuthLimit`, lifted through `unlock`) and has `HANDSHAKE_TIMEOUT` in all.
pub async fn accept<S>(
    cluster: Arc<Cluster>,
    mut ws: WebSocketStream<S>,
    remote: Option<SocketAddr>,
    unlock: Arc<std::sync::atomic::AtomicBool>,
    slot: tokio::sync::OwnedSemaphorePermit,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let handshake = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor_handshake(&cluster, &mut ws, remote)).await;
    drop(slot);
    let Ok(Some(dialer)) = handshake else { return };
    unlock.store(true, Ordering::Release);
    // Sent only now, with the limit lifted: the dialer starts replicating once it reads this.
    if send_frame(&mut ws, &PeerFrame::Accepted { mac: dialer.proof }).await.is_err() {
        return;
    }
    run(cluster, dialer.node_id, dialer.peer_addr, ws, dialer.link).await;
}

/// A dialer that proved the cluster secret, the link's keys and this node's proof for it.
struct Dialer {
    node_id: String,
    peer_addr: String,
    link: Link,
    proof: String,
}

/// The acceptor's half of the handshake: the dialer, once it proved the secret; `None` after
/// refusing it.
async fn acceptor_handshake<S>(
    cluster: &Cluster,
    ws: &mut WebSocketStream<S>,
    remote: Option<SocketAddr>,
) -> Option<Dialer>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let me = cluster.node_id().to_owned();
    let my_nonce = nonce();
    let Ok(exchange) = Exchange::new() else { return None };
    let my_key = exchange.public_hex();
    let challenge = PeerFrame::Challenge { node_id: me.clone(), nonce: my_nonce.clone(), key: my_key.clone() };
    if send_frame(ws, &challenge).await.is_err() {
        return None;
    }
    // The secret the dialer proved: the current one, or the previous one during a rotation.
    let proven_secret = |node_id: &str, key: &str, mac: &str| {
        let proof = Proof {
            role: "dialer",
            nonce: &my_nonce,
            signer: node_id,
            verifier: &me,
            dialer_key: key,
            acceptor_key: &my_key,
        };
        cluster.secrets().into_iter().find(|secret| verify(secret, proof, mac))
    };
    let hello = match recv_frame(ws).await {
        Ok(PeerFrame::Hello { node_id, peer_addr, nonce, key, mac }) => {
            let secret = proven_secret(&node_id, &key, &mac);
            Ok((node_id, peer_addr, nonce, key, secret))
        }
        other => Err(other),
    };
    let (peer_id, peer_addr, dialer_nonce, dialer_key, secret) = match hello {
        Ok((node_id, peer_addr, nonce, key, Some(secret))) => (node_id, peer_addr, nonce, key, secret),
        Ok((node_id, ..)) => {
            cluster.metrics().peer_auth_failures.inc();
            let claimed = shown(&node_id);
            tracing::warn!(?remote, claimed, "rejected a peer with a bad HMAC proof (wrong cluster secret?)");
            close(ws, CLOSE_AUTH_FAILED, "authentication failed").await;
            return None;
        }
        // Anything but a hello (another handshake frame, or a replication frame sent without
        // authenticating) is refused like a bad proof.
        Err(Ok(_) | Err(HandshakeError::Unexpected(_))) => {
            cluster.metrics().peer_auth_failures.inc();
            tracing::warn!(?remote, "refused a peer that sent something other than a hello");
            close(ws, CLOSE_AUTH_FAILED, "expected hello").await;
            return None;
        }
        // Dialers that find out they should be dialed instead just close: not an error. A peer
        // over the pre-authentication limit ends here too (its read failed).
        Err(Err(err)) => {
            tracing::debug!(?remote, %err, "peer handshake ended");
            return None;
        }
    };
    if peer_id >= me {
        close(ws, CLOSE_DIAL_BACK, "the lower node id dials").await;
        return None;
    }
    let transcript =
        Transcript { dialer_id: &peer_id, acceptor_id: &me, dialer_nonce: &dialer_nonce, acceptor_nonce: &my_nonce };
    let link = match exchange.finish(&dialer_key, &secret, &transcript, false) {
        Ok(link) => link,
        Err(err) => {
            cluster.metrics().peer_auth_failures.inc();
            tracing::warn!(?remote, %err, "refused a peer's key exchange");
            close(ws, CLOSE_AUTH_FAILED, "key exchange failed").await;
            return None;
        }
    };
    let proof = Proof {
        role: "acceptor",
        nonce: &dialer_nonce,
        signer: &me,
        verifier: &peer_id,
        dialer_key: &dialer_key,
        acceptor_key: &my_key,
    };
    let proof = sign(&secret, proof);
    Some(Dialer { node_id: peer_id, peer_addr, link, proof })
}

/// Frames written before one flush: the queue is drained in batches under load.
const WRITE_BATCH: usize = 512;

struct Written {
    /// Frames taken from the queue (written, or lost with the failed link).
    written: usize,
    failed: bool,
}

/// Seals one frame and feeds it to the socket; false when either fails.
async fn feed_sealed<S>(ws: &mut WebSocketStream<S>, sealer: &mut Sealer, text: &Utf8Bytes) -> bool
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    match sealer.seal(text.as_bytes()) {
        Ok(sealed) => ws.feed(Message::Binary(sealed.into())).await.is_ok(),
        Err(err) => {
            tracing::warn!(%err, "sealing a peer frame failed");
            false
        }
    }
}

async fn write_batch<S>(
    ws: &mut WebSocketStream<S>,
    sealer: &mut Sealer,
    first: Utf8Bytes,
    queued: &mut tokio::sync::mpsc::UnboundedReceiver<Utf8Bytes>,
) -> Written
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut written = 1;
    let mut failed = !feed_sealed(ws, sealer, &first).await;
    while !failed && written < WRITE_BATCH {
        match queued.try_recv() {
            Ok(text) => {
                written += 1;
                failed = !feed_sealed(ws, sealer, &text).await;
            }
            Err(_) => break,
        }
    }
    failed = failed || ws.flush().await.is_err();
    Written { written, failed }
}

/// A received frame's text, if it opens as the next frame and is UTF-8.
fn open(opener: &mut Opener, sealed: &[u8]) -> Option<String> {
    opener.open(sealed).ok().and_then(|plain| String::from_utf8(plain).ok())
}

/// Microseconds since `origin`, carried in pings to measure round trips.
fn stamp(origin: Instant) -> Bytes {
    Bytes::copy_from_slice(&(origin.elapsed().as_micros() as u64).to_be_bytes())
}

async fn run<S>(cluster: Arc<Cluster>, peer_id: String, peer_addr: String, mut ws: WebSocketStream<S>, link: Link)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let Link { send: mut sealer, receive: mut opener } = link;
    let rtt_us = Arc::new(AtomicU64::new(0));
    let (outbound, mut queued) = tokio::sync::mpsc::unbounded_channel();
    let unsent = Arc::new(AtomicUsize::new(0));
    let written = Arc::new(AtomicU64::new(0));
    let generation = cluster.register(&peer_id, peer_addr, rtt_us.clone(), outbound, unsent.clone(), written.clone());
    let handler = cluster.handler();
    let heartbeat = Duration::from_millis(cluster.config().heartbeat_ms);
    let timeout = Duration::from_millis(cluster.config().peer_timeout_ms);
    let origin = Instant::now();
    let mut tick = tokio::time::interval(heartbeat);
    let mut last_seen = Instant::now();
    let reason = loop {
        tokio::select! {
            inbound = ws.next() => {
                last_seen = Instant::now();
                match inbound {
                    Some(Ok(Message::Pong(payload))) => {
                        if let Ok(sent) = <[u8; 8]>::try_from(payload.as_ref()) {
                            let now = origin.elapsed().as_micros() as u64;
                            rtt_us.store(now.saturating_sub(u64::from_be_bytes(sent)), Ordering::Relaxed);
                        }
                    }
                    Some(Ok(Message::Binary(sealed))) => match open(&mut opener, &sealed) {
                        Some(text) => {
                            if let Some(handler) = &handler {
                                handler.on_frame(&peer_id, &text);
                            }
                        }
                        None => {
                            cluster.metrics().peer_frames_rejected.inc();
                            tracing::warn!(peer = peer_id, "a peer frame failed to open: ending the link");
                            close(&mut ws, CLOSE_AUTH_FAILED, "frame failed to open").await;
                            break "frame failed to open";
                        }
                    },
                    // Everything after the handshake is sealed: a text frame was injected (or
                    // comes from a build without sealing).
                    Some(Ok(Message::Text(_))) => {
                        cluster.metrics().peer_frames_rejected.inc();
                        tracing::warn!(peer = peer_id, "an unsealed peer frame: ending the link");
                        close(&mut ws, CLOSE_AUTH_FAILED, "unsealed frame").await;
                        break "unsealed frame";
                    }
                    Some(Ok(Message::Close(_))) | None => break "closed by peer",
                    Some(Ok(_)) => {}
                    Some(Err(_)) => break "read failed",
                }
            }
            next = queued.recv() => {
                let Some(first) = next else { break "unregistered" };
                // A peer that stops reading must not hold this task (and its heartbeat) forever.
                let Ok(result) = tokio::time::timeout(timeout, write_batch(&mut ws, &mut sealer, first, &mut queued)).await else {
                    break "write timed out";
                };
                // Counted written before unsent drops, so `written + unsent` never undercounts.
                written.fetch_add(result.written as u64, Ordering::AcqRel);
                unsent.fetch_sub(result.written, Ordering::AcqRel);
                if result.failed {
                    break "write failed";
                }
            }
            _ = tick.tick() => {
                if !cluster.is_current(&peer_id, generation) {
                    close(&mut ws, CLOSE_REPLACED, "replaced by a newer link").await;
                    break "replaced";
                }
                if last_seen.elapsed() > timeout {
                    break "heartbeat timeout";
                }
                if unsent.load(Ordering::Acquire) >= super::MAX_QUEUED_FRAMES {
                    break "queue overflow";
                }
                if !matches!(tokio::time::timeout(timeout, ws.send(Message::Ping(stamp(origin)))).await, Ok(Ok(()))) {
                    break "write failed or timed out";
                }
            }
        }
    };
    tracing::info!(peer = peer_id, reason, "peer link ended");
    cluster.unregister(&peer_id, generation);
    // Frames still queued die with the link; catch-up on the next link covers them.
    queued.close();
    let mut dropped = 0;
    while queued.try_recv().is_ok() {
        dropped += 1;
    }
    unsent.fetch_sub(dropped, Ordering::AcqRel);
}
