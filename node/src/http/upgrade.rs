//! The WebSocket handshake on `/ws`: every refusal is a plain HTTP status with a JSON body,
//! decided before the upgrade; an accepted socket gets tungstenite with the node's buffer sizes.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use warp::http::{HeaderMap, HeaderValue, Response, StatusCode, header};

use super::{AppState, RemoteAddr};
use crate::hub::Refusal;
use crate::protocol::SUBPROTOCOL;
use crate::transport::websocket::{WsConnection, websocket_config};

pub(crate) fn refuse(status: StatusCode, code: &str, message: &str) -> Response<Bytes> {
    let body = serde_json::json!({ "code": code, "message": message }).to_string();
    let mut builder = Response::builder().status(status).header(header::CONTENT_TYPE, "application/json");
    if status == StatusCode::UNAUTHORIZED {
        builder = builder.header(header::WWW_AUTHENTICATE, "Bearer");
    }
    if status == StatusCode::SERVICE_UNAVAILABLE || status == StatusCode::TOO_MANY_REQUESTS {
        builder = builder.header(header::RETRY_AFTER, "5");
    }
    builder.body(Bytes::from(body)).unwrap_or_else(|_| Response::new(Bytes::new()))
}

fn header_has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// The subprotocol to answer with: `Ok(None)` when the client offered none (spoken to in v1).
fn negotiate_subprotocol(headers: &HeaderMap) -> Result<Option<&'static str>, ()> {
    let offered: Vec<&str> = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    match offered.is_empty() {
        true => Ok(None),
        false if offered.contains(&SUBPROTOCOL) => Ok(Some(SUBPROTOCOL)),
        false => Err(()),
    }
}

/// What a client may put in the `/ws` query string.
#[derive(Default)]
struct QueryParams {
    token: Option<String>,
    name: Option<String>,
    /// The session token of an earlier connection, to get its rooms back.
    session: Option<String>,
}

fn query_params(query: &str) -> QueryParams {
    let mut params = QueryParams::default();
    for (key, value) in form_urlencoded_pairs(query) {
        match key.as_str() {
            "token" => params.token = Some(value),
            "name" => params.name = Some(value),
            "session" => params.session = Some(value),
            _ => {}
        }
    }
    params
}

fn form_urlencoded_pairs(query: &str) -> Vec<(String, String)> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(query).unwrap_or_default()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim().to_owned())
}

pub(super) fn handshake(
    headers: HeaderMap,
    query: String,
    on_upgrade: Option<OnUpgrade>,
    remote: Option<RemoteAddr>,
    state: Arc<AppState>,
) -> Response<Bytes> {
    let hub = &state.hub;
    let metrics = hub.metrics();
    let (Some(key), Some(on_upgrade)) = (websocket_key(&headers), on_upgrade) else {
        metrics.reject_handshake("bad_handshake");
        return refuse(StatusCode::BAD_REQUEST, "bad_handshake", "expected a WebSocket upgrade (version 13) on /ws");
    };
    let Ok(subprotocol) = negotiate_subprotocol(&headers) else {
        metrics.reject_handshake("unsupported_subprotocol");
        return refuse(
            StatusCode::BAD_REQUEST,
            "unsupported_subprotocol",
            &format!("this server speaks the subprotocol {SUBPROTOCOL}"),
        );
    };
    let address = client_address(&headers, remote, hub.config().limits.trust_forwarded_for);
    let refused = |refusal: Refusal| {
        metrics.reject_handshake(refusal.code());
        let status = StatusCode::from_u16(refusal.http_status()).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        refuse(status, refusal.code(), &refusal.to_string())
    };
    let mut permit = match hub.admit(address) {
        Ok(permit) => permit,
        Err(refusal) => return refused(refusal),
    };
    let QueryParams { token: query_token, name, session } = query_params(&query);
    let token = bearer(&headers).or(query_token);
    let identity = match hub.authenticator().authenticate(token.as_deref(), name.as_deref()) {
        Ok(identity) => identity,
        Err(err) => {
            metrics.auth_failures.get_or_create(&[("reason", err.code())]).inc();
            metrics.reject_handshake(err.code());
            let status = StatusCode::from_u16(err.http_status()).unwrap_or(StatusCode::UNAUTHORIZED);
            return refuse(status, err.code(), &err.to_string());
        }
    };
    if let Err(refusal) = permit.claim_user(&identity.user.id) {
        return refused(refusal);
    }

    let config = websocket_config(&hub.config().limits);
    let timeout = Duration::from_secs(hub.config().limits.handshake_timeout_secs);
    let hub = hub.clone();
    tokio::spawn(async move {
        let upgraded = match tokio::time::timeout(timeout, on_upgrade).await {
            Ok(Ok(upgraded)) => upgraded,
            Ok(Err(err)) => return tracing::debug!(%err, "upgrade failed"),
            Err(_) => return tracing::debug!("upgrade timed out"),
        };
        // Taking the TcpStream back out of hyper frees its read buffer and the boxed IO: a few
        // KiB per idle connection.
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => {
                let tcp = parts.io.into_inner();
                let ws = if parts.read_buf.is_empty() {
                    WebSocketStream::from_raw_socket(tcp, Role::Server, Some(config)).await
                } else {
                    WebSocketStream::from_partially_read(tcp, parts.read_buf.to_vec(), Role::Server, Some(config)).await
                };
                hub.serve(WsConnection::new(ws), identity, session, permit).await;
            }
            Err(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
                hub.serve(WsConnection::new(ws), identity, session, permit).await;
            }
        }
    });

    switching_protocols(&key, subprotocol)
}

/// Who the connection counts against for `limits.max_connections_per_ip`: the TCP peer, or,
/// behind a trusted proxy, the last address in `X-Forwarded-For` (the one that proxy added).
fn client_address(headers: &HeaderMap, remote: Option<RemoteAddr>, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        let forwarded = headers.get_all("x-forwarded-for").iter().next_back().and_then(|v| v.to_str().ok());
        if let Some(last) = forwarded.and_then(|list| list.rsplit(',').next()) {
            return last.trim().parse().ok();
        }
    }
    remote.map(|RemoteAddr(addr)| addr.ip())
}

/// The `Sec-WebSocket-Key` of a well-formed WebSocket upgrade request (version 13), if it is one.
pub(crate) fn websocket_key(headers: &HeaderMap) -> Option<HeaderValue> {
    let is_upgrade = header_has_token(headers, header::CONNECTION, "upgrade")
        && header_has_token(headers, header::UPGRADE, "websocket")
        && headers.get(header::SEC_WEBSOCKET_VERSION).is_some_and(|v| v == "13");
    headers.get(header::SEC_WEBSOCKET_KEY).filter(|_| is_upgrade).cloned()
}

/// The 101 response that completes a WebSocket handshake.
pub(crate) fn switching_protocols(key: &HeaderValue, subprotocol: Option<&str>) -> Response<Bytes> {
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(key.as_bytes()));
    if let Some(protocol) = subprotocol {
        response = response.header(header::SEC_WEBSOCKET_PROTOCOL, protocol);
    }
    response.body(Bytes::new()).unwrap_or_else(|_| Response::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake's parsers on a header block and query string from the input (`name: value`
    /// lines, then a `?query` line): upgrade check, subprotocol, query, bearer token, forwarded
    /// address, and the token through the JWT authenticator. Seeds in `node/fuzz/handshake/`.
    #[test]
    fn fuzz_handshake() {
        let jwt = crate::config::AuthConfig {
            mode: crate::config::AuthMode::Jwt,
            jwt_secret: Some("fuzz-secret-0123456789".into()),
            ..crate::config::AuthConfig::default()
        };
        let jwt = crate::auth::Authenticator::from_config(&jwt).unwrap();
        let anonymous = crate::config::AuthConfig { mode: crate::config::AuthMode::Anonymous, ..Default::default() };
        let anonymous = crate::auth::Authenticator::from_config(&anonymous).unwrap();
        let peer = Some(RemoteAddr("10.0.0.9:5000".parse().unwrap()));
        crate::fuzz::run("handshake", |input: &[u8]| {
            let text = String::from_utf8_lossy(input);
            let mut headers = HeaderMap::new();
            let mut query = "";
            for line in text.lines() {
                if let Some(q) = line.strip_prefix('?') {
                    query = q;
                } else if let Some((name, value)) = line.split_once(':')
                    && let (Ok(name), Ok(value)) =
                        (header::HeaderName::from_bytes(name.trim().as_bytes()), HeaderValue::from_str(value.trim()))
                {
                    // What hyper would hand over: only valid names and values get this far.
                    headers.append(name, value);
                }
            }
            let _ = websocket_key(&headers);
            let _ = negotiate_subprotocol(&headers);
            let _ = client_address(&headers, peer, true);
            let params = query_params(query);
            let token = bearer(&headers).or(params.token);
            if let Err(err) = jwt.authenticate(token.as_deref(), params.name.as_deref()) {
                assert!((400..500).contains(&err.http_status()), "{err}: {}", err.http_status());
            }
            let identity = anonymous.authenticate(None, params.name.as_deref()).expect("anonymous always connects");
            assert!(identity.user.name.chars().count() <= 64, "names are cut to 64 characters");
        });
    }

    #[test]
    fn subprotocol_negotiation() {
        let mut headers = HeaderMap::new();
        assert_eq!(negotiate_subprotocol(&headers), Ok(None));
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("mqtt, chatcluster.v1.json"));
        assert_eq!(negotiate_subprotocol(&headers), Ok(Some(SUBPROTOCOL)));
        headers.insert(header::SEC_WEBSOCKET_PROTOCOL, HeaderValue::from_static("mqtt"));
        assert_eq!(negotiate_subprotocol(&headers), Err(()));
    }

    #[test]
    fn client_address_from_the_peer_or_a_trusted_proxy() {
        let peer = Some(RemoteAddr("10.0.0.9:5000".parse().unwrap()));
        let mut headers = HeaderMap::new();
        headers.append("x-forwarded-for", HeaderValue::from_static("6.6.6.6, 203.0.113.7"));
        assert_eq!(client_address(&headers, peer, false), Some("10.0.0.9".parse().unwrap()), "not trusted");
        assert_eq!(client_address(&headers, peer, true), Some("203.0.113.7".parse().unwrap()), "the proxy's entry");
        headers.append("x-forwarded-for", HeaderValue::from_static("198.51.100.1"));
        assert_eq!(client_address(&headers, peer, true), Some("198.51.100.1".parse().unwrap()), "the last header");
        assert_eq!(client_address(&HeaderMap::new(), peer, true), Some("10.0.0.9".parse().unwrap()), "no header");
    }

    #[test]
    fn token_from_header_or_query() {
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer abc.def"));
        assert_eq!(bearer(&headers).as_deref(), Some("abc.def"));
        let params = query_params("token=x%2Ey&name=Ann%20B&session=s1");
        assert_eq!(
            (params.token.as_deref(), params.name.as_deref(), params.session.as_deref()),
            (Some("x.y"), Some("Ann B"), Some("s1"))
        );
    }
}
