//! In-memory transport: a pair of channels standing in for a socket, for hub unit tests.

use bytes::Bytes;
use tokio::sync::mpsc;

use super::{Connection, Frame, Inbound, TransportError};

/// What the server side sends towards the test client.
#[derive(Debug, Clone, PartialEq)]
pub enum ToClient {
    Frame(Frame),
    Ping,
    Close(u16, String),
}

/// Server side of an in-memory connection.
pub struct MemoryConnection {
    inbound: mpsc::Receiver<Inbound>,
    outbound: mpsc::UnboundedSender<ToClient>,
    closed: bool,
}

/// Test side of an in-memory connection.
pub struct MemoryClient {
    pub inbound: mpsc::Sender<Inbound>,
    pub outbound: mpsc::UnboundedReceiver<ToClient>,
}

impl MemoryClient {
    pub async fn send_text(&self, text: &str) -> bool {
        self.inbound.send(Inbound::Text(Bytes::copy_from_slice(text.as_bytes()))).await.is_ok()
    }

    /// The next server frame parsed as JSON, skipping pings; `None` once closed or gone.
    pub async fn next_json(&mut self) -> Option<serde_json::Value> {
        loop {
            match self.outbound.recv().await? {
                ToClient::Frame(frame) => return serde_json::from_str(&frame).ok(),
                ToClient::Ping => continue,
                ToClient::Close(..) => return None,
            }
        }
    }

    /// The JSON frames until the connection closes, and its close code; `None` when the
    /// server did not close within `within` (or dropped the connection without a close).
    pub async fn frames_until_close(&mut self, within: std::time::Duration) -> (Vec<serde_json::Value>, Option<u16>) {
        let mut frames = Vec::new();
        let code = tokio::time::timeout(within, async {
            while let Some(item) = self.outbound.recv().await {
                match item {
                    ToClient::Frame(frame) => frames.extend(serde_json::from_str(&frame).ok()),
                    ToClient::Ping => {}
                    ToClient::Close(code, _) => return Some(code),
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        (frames, code)
    }

    /// Everything until the connection closes; returns the close code.
    pub async fn close_code(&mut self) -> Option<u16> {
        while let Some(item) = self.outbound.recv().await {
            if let ToClient::Close(code, _) = item {
                return Some(code);
            }
        }
        None
    }
}

/// A connected pair; `inbound_capacity` bounds what the client may send ahead.
pub fn pair(inbound_capacity: usize) -> (MemoryConnection, MemoryClient) {
    let (in_tx, in_rx) = mpsc::channel(inbound_capacity);
    let (out_tx, out_rx) = mpsc::unbounded_channel();
    (
        MemoryConnection { inbound: in_rx, outbound: out_tx, closed: false },
        MemoryClient { inbound: in_tx, outbound: out_rx },
    )
}

impl MemoryConnection {
    fn push(&self, item: ToClient) -> Result<(), TransportError> {
        self.outbound.send(item).map_err(|_| TransportError("memory client dropped".into()))
    }
}

impl Connection for MemoryConnection {
    async fn recv(&mut self) -> Inbound {
        if self.closed {
            return Inbound::Closed;
        }
        self.inbound.recv().await.unwrap_or(Inbound::Closed)
    }

    async fn feed(&mut self, frame: Frame) -> Result<(), TransportError> {
        self.push(ToClient::Frame(frame))
    }

    async fn flush(&mut self) -> Result<(), TransportError> {
        Ok(())
    }

    async fn ping(&mut self) -> Result<(), TransportError> {
        self.push(ToClient::Ping)
    }

    async fn close(&mut self, code: u16, reason: &str) {
        self.closed = true;
        let _ = self.push(ToClient::Close(code, reason.to_owned()));
    }
}
