//! A real WebSocket client (tokio-tungstenite) that speaks protocol v1, plus raw HTTP helpers.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub const SUBPROTOCOL: &str = chat_node::protocol::SUBPROTOCOL;

pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
}

impl Client {
    /// Connects offering the v1 subprotocol, with the token as a Bearer header if given.
    pub async fn connect(ws_url: &str, token: Option<&str>) -> anyhow::Result<Client> {
        let mut request = ws_url.into_client_request()?;
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        if let Some(token) = token {
            request.headers_mut().insert("authorization", HeaderValue::from_str(&format!("Bearer {token}"))?);
        }
        let (ws, _response) = tokio_tungstenite::connect_async(request).await.context("WebSocket handshake")?;
        Ok(Client { ws })
    }

    /// Like [`Client::connect`], over a TCP connection the caller opened (e.g. inside a
    /// network namespace).
    pub async fn connect_on(stream: TcpStream, ws_url: &str) -> anyhow::Result<Client> {
        let mut request = ws_url.into_client_request()?;
        request.headers_mut().insert("sec-websocket-protocol", HeaderValue::from_static(SUBPROTOCOL));
        let stream = MaybeTlsStream::Plain(stream);
        let (ws, _response) = tokio_tungstenite::client_async(request, stream).await.context("WebSocket handshake")?;
        Ok(Client { ws })
    }

    pub async fn send_json(&mut self, value: Value) -> anyhow::Result<()> {
        self.send(Message::text(value.to_string())).await
    }

    pub async fn send(&mut self, message: Message) -> anyhow::Result<()> {
        self.ws.send(message).await.context("send")
    }

    /// The next text frame as JSON (pings are answered and skipped).
    pub async fn recv_json(&mut self, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .map_err(|_| anyhow!("no frame within {timeout:?}"))?;
            match next {
                Some(Ok(Message::Text(text))) => return Ok(serde_json::from_str(&text)?),
                Some(Ok(Message::Close(frame))) => bail!("closed: {frame:?}"),
                Some(Ok(_)) => continue,
                Some(Err(err)) => bail!("receive failed: {err}"),
                None => bail!("stream ended"),
            }
        }
    }

    /// The next frame, which must be of `kind`.
    pub async fn expect_type(&mut self, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
        let frame = self.recv_json(timeout).await?;
        if frame["type"] != kind {
            bail!("expected a {kind} frame, got {frame}");
        }
        Ok(frame)
    }

    /// Skips frames until one of `kind` arrives.
    pub async fn recv_until(&mut self, kind: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let frame = self.recv_json(left).await?;
            if frame["type"] == kind {
                return Ok(frame);
            }
        }
    }

    /// Reads until the server closes; returns its close code and reason.
    pub async fn recv_close(&mut self, timeout: Duration) -> Option<(u16, String)> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return None,
                Ok(Some(Ok(Message::Close(Some(CloseFrame { code, reason }))))) => {
                    return Some((code.into(), reason.to_string()));
                }
                Ok(Some(Ok(Message::Close(None)))) => return Some((1005, String::new())),
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(WsError::ConnectionClosed | WsError::AlreadyClosed))) | Ok(None) => {
                    return Some((1006, String::new()));
                }
                Ok(Some(Err(_))) => return Some((1006, String::new())),
            }
        }
    }

    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
    }
}

/// HTTP status of a WebSocket handshake attempt with these extra headers (0 if no response).
pub async fn handshake_status(ws_url: &str, headers: &[(&str, &str)]) -> u16 {
    let Ok(mut request) = ws_url.into_client_request() else { return 0 };
    for (name, value) in headers {
        let (Ok(name), Ok(value)) = (
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) else {
            return 0;
        };
        request.headers_mut().insert(name, value);
    }
    match tokio_tungstenite::connect_async(request).await {
        Ok((_, response)) => response.status().as_u16(),
        Err(WsError::Http(response)) => response.status().as_u16(),
        Err(_) => 0,
    }
}

/// A bare HTTP/1.1 GET: status and body.
pub async fn http_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    http_get_on(TcpStream::connect(addr).await?, addr, path).await
}

/// A bare HTTP/1.1 GET over an already connected stream (e.g. one opened inside a namespace).
pub async fn http_get_on(stream: TcpStream, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let response = http_request_on(stream, addr, "GET", path, &[], b"").await?;
    Ok((response.status, response.body))
}

/// An HTTP response as the tests look at it.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

impl HttpResponse {
    pub fn json(&self) -> anyhow::Result<serde_json::Value> {
        serde_json::from_str(&self.body).map_err(|e| anyhow!("{e}: not JSON: {:?}", self.body))
    }

    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().find_map(|line| {
            let (key, value) = line.split_once(':')?;
            key.trim().eq_ignore_ascii_case(name).then(|| value.trim())
        })
    }
}

/// A bare HTTP/1.1 request with `headers` and `body` (sent with its Content-Length).
pub async fn http_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    http_request_on(TcpStream::connect(addr).await?, addr, method, path, headers, body).await
}

async fn http_request_on(
    mut stream: TcpStream,
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<HttpResponse> {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await?;
    stream.write_all(body).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| anyhow!("no HTTP status in {text:?}"))?;
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    Ok(HttpResponse { status, head: head.to_owned(), body: body.to_owned() })
}
