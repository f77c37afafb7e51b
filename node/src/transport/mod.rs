//! The connection abstraction the hub is driven through. The hub never sees warp, hyper or
//! tungstenite: a transport only moves text frames and close codes. `websocket` is the real one,
//! `memory` drives the hub in fast in-process tests.

pub mod memory;
pub mod tcp;
pub mod tls;
pub mod websocket;

use std::future::Future;

use bytes::Bytes;

/// A serialized server frame: UTF-8 JSON, shared between every recipient of a broadcast.
/// tungstenite's `Utf8Bytes` is a plain reference-counted, known-valid UTF-8 buffer: using it
/// here means a broadcast is checked once, not once per subscriber.
pub type Frame = tokio_tungstenite::tungstenite::Utf8Bytes;

/// What a transport delivers from the client.
#[derive(Debug)]
pub enum Inbound {
    /// A complete text message (UTF-8 JSON expected).
    Text(Bytes),
    /// A binary message, which protocol v1 does not allow.
    Binary,
    /// A control frame (ping/pong): proof the client is alive, nothing to dispatch.
    Activity,
    /// The client sent a message over `limits.max_message_bytes`.
    TooBig,
    /// The client broke the framing rules; close with this code (1002 or 1007).
    Malformed(u16),
    /// The client closed the connection or it failed.
    Closed,
}

#[derive(Debug, thiserror::Error)]
#[error("connection lost: {0}")]
pub struct TransportError(pub String);

/// One client connection as the hub sees it. Futures must be cancel-safe: the hub polls `recv`
/// inside `select!` and may drop it when another branch wins.
pub trait Connection: Send + 'static {
    fn recv(&mut self) -> impl Future<Output = Inbound> + Send;
    /// Queues a frame; it reaches the client on the next `flush` (or earlier if buffers fill).
    fn feed(&mut self, frame: Frame) -> impl Future<Output = Result<(), TransportError>> + Send;
    fn flush(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Sends a transport-level liveness probe (a WebSocket ping).
    fn ping(&mut self) -> impl Future<Output = Result<(), TransportError>> + Send;
    /// Sends a close with this code and reason, then stops.
    fn close(&mut self, code: u16, reason: &str) -> impl Future<Output = ()> + Send;
}
