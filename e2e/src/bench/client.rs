//! A minimal WebSocket client for the load tool: a hand-written HTTP upgrade and a frame parser
//! that works in place on one read buffer per connection. Delivered frames are not copied, not
//! UTF-8 checked and not JSON-parsed (a byte scan finds the timestamp in the body), so that the
//! tool costs far less CPU per delivery than the servers it measures. Client frames are masked
//! with the all-zero key (valid per RFC 6455; the servers still run their unmasking code).

use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd as _;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

pub const SUBPROTOCOL: &str = "chatcluster.v1.json";
const MAX_FRAME: usize = 16 * 1024 * 1024;

/// Opens a TCP connection from `src` (any 127.0.0.x) to `dst`, with `TCP_NODELAY`.
/// Binding uses `IP_BIND_ADDRESS_NO_PORT` so the ephemeral port is chosen per 4-tuple.
pub async fn tcp_connect(src: Ipv4Addr, dst: SocketAddr) -> anyhow::Result<TcpStream> {
    let sock = TcpSocket::new_v4()?;
    if src != Ipv4Addr::LOCALHOST {
        let one: libc::c_int = 1;
        // SAFETY: setsockopt on an owned, open socket with a valid c_int option value.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_BIND_ADDRESS_NO_PORT,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            bail!("IP_BIND_ADDRESS_NO_PORT: {}", std::io::Error::last_os_error());
        }
        sock.bind(SocketAddr::from((src, 0))).with_context(|| format!("binding {src}"))?;
    }
    let stream = sock.connect(dst).await.with_context(|| format!("connecting to {dst}"))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A frame header found in a buffer: payload is `start..end` of the slice that was parsed.
#[derive(Debug, Clone, Copy)]
pub struct Frame {
    pub opcode: u8,
    pub start: usize,
    pub end: usize,
}

pub const OP_TEXT: u8 = 1;
pub const OP_CONT: u8 = 0;
pub const OP_CLOSE: u8 = 8;
pub const OP_PING: u8 = 9;

/// Parses one server frame at the start of `b`; `None` if it is not complete yet.
pub fn parse_frame(b: &[u8]) -> anyhow::Result<Option<Frame>> {
    if b.len() < 2 {
        return Ok(None);
    }
    let opcode = b[0] & 0x0f;
    if b[1] & 0x80 != 0 {
        bail!("server sent a masked frame");
    }
    let (len, hdr) = match b[1] & 0x7f {
        126 => {
            if b.len() < 4 {
                return Ok(None);
            }
            (usize::from(u16::from_be_bytes([b[2], b[3]])), 4)
        }
        127 => {
            if b.len() < 10 {
                return Ok(None);
            }
            let mut n = [0u8; 8];
            n.copy_from_slice(&b[2..10]);
            (usize::try_from(u64::from_be_bytes(n)).unwrap_or(usize::MAX), 10)
        }
        n => (usize::from(n), 2),
    };
    if len > MAX_FRAME {
        bail!("server frame of {len} bytes");
    }
    if b.len() < hdr + len {
        return Ok(None);
    }
    Ok(Some(Frame { opcode, start: hdr, end: hdr + len }))
}

/// Appends a masked (zero key) text frame carrying `payload` to `out`.
pub fn encode_text(out: &mut Vec<u8>, payload: &[u8]) {
    out.push(0x81);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= usize::from(u16::MAX) {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(payload);
}

/// A connection with its read buffer; `buf[pos..len]` is read but not yet consumed.
pub struct Conn<S> {
    pub stream: S,
    pub buf: Vec<u8>,
    pub pos: usize,
    pub len: usize,
}

impl<S: AsyncRead + Unpin> Conn<S> {
    /// Reads more bytes (compacting or growing the buffer as needed); errors on EOF.
    pub async fn fill(&mut self) -> anyhow::Result<()> {
        if self.pos > 0 {
            self.buf.copy_within(self.pos..self.len, 0);
            self.len -= self.pos;
            self.pos = 0;
        }
        if self.len == self.buf.len() {
            let grown = (self.buf.len() * 2).max(4096);
            if grown > 2 * MAX_FRAME {
                bail!("read buffer would exceed {grown} bytes");
            }
            self.buf.resize(grown, 0);
        }
        let n = self.stream.read(&mut self.buf[self.len..]).await?;
        if n == 0 {
            bail!("connection closed by the server");
        }
        self.len += n;
        Ok(())
    }

    /// The next whole frame, copied out (setup path only; the load path parses in place).
    pub async fn next_frame(&mut self) -> anyhow::Result<(u8, Vec<u8>)> {
        loop {
            if let Some(f) = parse_frame(&self.buf[self.pos..self.len])? {
                let payload = self.buf[self.pos + f.start..self.pos + f.end].to_vec();
                self.pos += f.end;
                return Ok((f.opcode, payload));
            }
            self.fill().await?;
        }
    }

    /// Reads frames until a text frame starting with `{"type":"<ty>"`; skips other types,
    /// fails on `error` frames and close frames.
    pub async fn expect(&mut self, ty: &str) -> anyhow::Result<Vec<u8>> {
        let want = format!("{{\"type\":\"{ty}\"");
        loop {
            let (op, payload) = self.next_frame().await?;
            match op {
                OP_TEXT if payload.starts_with(want.as_bytes()) => return Ok(payload),
                OP_TEXT if payload.starts_with(b"{\"type\":\"error\"") => {
                    bail!("waiting for {ty}: got {}", String::from_utf8_lossy(&payload))
                }
                OP_CLOSE => bail!("waiting for {ty}: closed with {}", describe_close(&payload)),
                _ => {}
            }
        }
    }
}

impl Conn<TcpStream> {
    /// Performs the WebSocket upgrade on `stream` for `path` (with query), offering the
    /// chatcluster subprotocol and sending `token` as a Bearer header when given.
    pub async fn handshake(
        mut stream: TcpStream,
        host: &str,
        path: &str,
        token: Option<&str>,
        buf_size: usize,
    ) -> anyhow::Result<Self> {
        let auth = token.map(|t| format!("Authorization: Bearer {t}\r\n")).unwrap_or_default();
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Sec-WebSocket-Protocol: {SUBPROTOCOL}\r\n{auth}\r\n"
        );
        stream.write_all(req.as_bytes()).await?;
        let mut conn = Conn { stream, buf: vec![0; buf_size.max(1024)], pos: 0, len: 0 };
        let head_end = loop {
            if let Some(i) = find(&conn.buf[..conn.len], b"\r\n\r\n") {
                break i + 4;
            }
            if conn.len >= 64 * 1024 {
                bail!("handshake response headers too long");
            }
            conn.fill().await.context("reading the handshake response")?;
        };
        let head = &conn.buf[..head_end];
        if !head.starts_with(b"HTTP/1.1 101") {
            let status = head.split(|&c| c == b'\r').next().unwrap_or_default();
            let body = &conn.buf[head_end..conn.len];
            bail!(
                "handshake refused: {} {}",
                String::from_utf8_lossy(status),
                String::from_utf8_lossy(&body[..body.len().min(300)])
            );
        }
        conn.pos = head_end;
        Ok(conn)
    }

    pub async fn send_text(&mut self, payload: &[u8]) -> anyhow::Result<()> {
        let mut out = Vec::with_capacity(payload.len() + 14);
        encode_text(&mut out, payload);
        self.stream.write_all(&out).await?;
        Ok(())
    }

    pub fn into_split(self) -> (Conn<OwnedReadHalf>, OwnedWriteHalf) {
        let (r, w) = self.stream.into_split();
        (Conn { stream: r, buf: self.buf, pos: self.pos, len: self.len }, w)
    }
}

pub fn describe_close(payload: &[u8]) -> String {
    if payload.len() >= 2 {
        let code = u16::from_be_bytes([payload[0], payload[1]]);
        format!("code {code} {:?}", String::from_utf8_lossy(&payload[2..]))
    } else {
        "no code".to_owned()
    }
}

pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() || hay.len() < needle.len() {
        return None;
    }
    let first = needle[0];
    let last = hay.len() - needle.len();
    let mut i = 0;
    while i <= last {
        match hay[i..=last].iter().position(|&c| c == first) {
            None => return None,
            Some(p) => {
                i += p;
                if &hay[i..i + needle.len()] == needle {
                    return Some(i);
                }
                i += 1;
            }
        }
    }
    None
}

/// Finds `"body":"T<nanos>:<publisher>` in a frame: the send time and the publisher index.
pub fn scan_body(payload: &[u8]) -> Option<(u64, u32)> {
    const MARK: &[u8] = b"\"body\":\"T";
    let at = find(payload, MARK)? + MARK.len();
    let rest = &payload[at..];
    let (ts, used) = parse_digits(rest)?;
    if rest.get(used) != Some(&b':') {
        return None;
    }
    let (publisher, _) = parse_digits(&rest[used + 1..])?;
    Some((ts, u32::try_from(publisher).ok()?))
}

fn parse_digits(b: &[u8]) -> Option<(u64, usize)> {
    let mut v: u64 = 0;
    let mut n = 0;
    for &c in b.iter().take(20) {
        if !c.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
        n += 1;
    }
    (n > 0).then_some((v, n))
}

/// How long to wait for one connection's setup before calling it failed.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip() {
        let mut out = Vec::new();
        encode_text(&mut out, b"hello");
        // An unmasked server frame of the same payload parses.
        let server = [&[0x81u8, 5][..], b"hello"].concat();
        let f = parse_frame(&server).unwrap().unwrap();
        assert_eq!((f.opcode, &server[f.start..f.end]), (OP_TEXT, &b"hello"[..]));
        assert!(parse_frame(&server[..4]).unwrap().is_none());
        assert!(parse_frame(&out).is_err(), "client frames are masked");
        let big = vec![b'x'; 300];
        let mut srv = vec![0x81u8, 126, 1, 44];
        srv.extend_from_slice(&big);
        let f = parse_frame(&srv).unwrap().unwrap();
        assert_eq!(f.end - f.start, 300);
    }

    #[test]
    fn scans_body() {
        let m = br#"{"type":"message","room":"r","body":"T12345:7:xxxx","ts":1}"#;
        assert_eq!(scan_body(m), Some((12345, 7)));
        assert_eq!(scan_body(br#"{"type":"ack","id":"1"}"#), None);
        assert_eq!(find(b"abcabd", b"abd"), Some(3));
    }
}
