//! WebSocket transport over tokio-tungstenite, on any upgraded byte stream (hyper's, in `http`).

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};

use super::{Connection, Frame, Inbound, TransportError};
use crate::config::LimitsConfig;
use crate::protocol::close;

/// The tungstenite settings for client connections, from the node's limits. Buffer sizes are
/// set explicitly: tungstenite's 128 KiB default read buffer is allocated for every connection.
pub fn websocket_config(limits: &LimitsConfig) -> WebSocketConfig {
    WebSocketConfig::default()
        .read_buffer_size(limits.ws_read_buffer_bytes)
        .write_buffer_size(limits.ws_write_buffer_bytes)
        .max_write_buffer_size(
            limits.ws_write_buffer_bytes.max(limits.max_message_bytes) * 4 + limits.outbound_queue_bytes,
        )
        .max_message_size(Some(limits.max_message_bytes))
        .max_frame_size(Some(limits.max_message_bytes))
}

/// How long a closing connection waits for the client's close reply.
const CLOSE_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

pub struct WsConnection<S> {
    ws: WebSocketStream<S>,
}

impl<S> WsConnection<S> {
    pub fn new(ws: WebSocketStream<S>) -> Self {
        Self { ws }
    }
}

/// Protocol errors that mean the connection is already over, not a client to answer with 1002.
fn ends_the_connection(violation: &ProtocolError) -> bool {
    matches!(
        violation,
        ProtocolError::ResetWithoutClosingHandshake
            | ProtocolError::SendAfterClosing
            | ProtocolError::ReceivedAfterClosing
    )
}

fn lost(err: WsError) -> TransportError {
    TransportError(err.to_string())
}

impl<S> Connection for WsConnection<S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    async fn recv(&mut self) -> Inbound {
        match self.ws.next().await {
            Some(Ok(Message::Text(text))) => Inbound::Text(Bytes::from(text)),
            Some(Ok(Message::Binary(_))) => Inbound::Binary,
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => Inbound::Activity,
            Some(Ok(Message::Close(_))) | None => Inbound::Closed,
            Some(Err(WsError::Capacity(CapacityError::MessageTooLong { .. } | CapacityError::TooManyHeaders))) => {
                Inbound::TooBig
            }
            Some(Err(WsError::Utf8(_))) => Inbound::Malformed(close::INVALID_PAYLOAD),
            Some(Err(WsError::Protocol(violation))) if !ends_the_connection(&violation) => {
                Inbound::Malformed(close::PROTOCOL_ERROR)
            }
            Some(Err(_)) => Inbound::Closed,
        }
    }

    async fn feed(&mut self, frame: Frame) -> Result<(), TransportError> {
        self.ws.feed(Message::Text(frame)).await.map_err(lost)
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        self.ws.flush().await.map_err(lost)
    }

    async fn ping(&mut self) -> Result<(), TransportError> {
        self.ws.send(Message::Ping(Bytes::new())).await.map_err(lost)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        let frame = CloseFrame { code: CloseCode::from(code), reason: Utf8Bytes::from(reason) };
        // The client may already be gone; a failed close changes nothing for us.
        if self.ws.close(Some(frame)).await.is_err() {
            return;
        }
        // Read until the client answers the close: dropping a socket with unread input makes the
        // kernel send RST, and the client could lose our close frame (and its code).
        let drain = async { while let Some(Ok(_)) = self.ws.next().await {} };
        let _ = tokio::time::timeout(CLOSE_LINGER, drain).await;
    }
}
