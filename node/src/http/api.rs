//! The server API over HTTP, under `/api/v1` on the admin port: API-key authentication
//! (`Authorization: Bearer <key>`, compared in constant time), JSON bodies with field-level
//! errors, and the OpenAPI document at `/api/v1/openapi.json`. The operations are in
//! [`crate::api`]; docs/api.md describes them for users.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::{Buf, Bytes};
use futures_util::StreamExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use warp::Filter;
use warp::http::{Method, Response, StatusCode, header};

use super::AppState;
use crate::api::{self, ApiError, ErrorBody};
use crate::config::{AdminConfig, MIN_API_KEY_CHARS};

/// Largest request body read: a publish is bounded by `limits.max_message_bytes` (at most
/// 16 MiB) plus its JSON.
const MAX_REQUEST_BYTES: usize = 17 * 1024 * 1024;

/// The accepted keys, as SHA-256 digests: inline ones, and the key file's, read again when it
/// changes.
pub struct ApiKeys {
    inline: Vec<[u8; 32]>,
    file: Option<PathBuf>,
    from_file: Mutex<(Option<SystemTime>, Vec<[u8; 32]>)>,
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.trim().as_bytes()).into()
}

impl ApiKeys {
    pub fn new(config: &AdminConfig) -> Self {
        ApiKeys {
            inline: config.api_keys.iter().map(|k| digest(k)).collect(),
            file: config.api_keys_file.clone(),
            from_file: Mutex::new((None, Vec::new())),
        }
    }

    pub fn enabled(&self) -> bool {
        !self.inline.is_empty() || self.file.is_some()
    }

    /// The key file's keys, re-read when its modification time changed (a rotated Secret).
    fn file_keys(&self) -> Vec<[u8; 32]> {
        let Some(path) = &self.file else { return Vec::new() };
        let mut cached = self.from_file.lock().unwrap_or_else(|p| p.into_inner());
        let modified = std::fs::metadata(path).and_then(|m| m.modified()).ok();
        if modified.is_some() && modified != cached.0 {
            match std::fs::read_to_string(path) {
                Ok(text) => {
                    let keys = text.lines().map(str::trim).filter(|k| k.len() >= MIN_API_KEY_CHARS);
                    *cached = (modified, keys.map(digest).collect());
                }
                Err(err) => {
                    tracing::warn!(%err, path = %path.display(), "cannot read the API key file; keeping the keys read before")
                }
            }
        }
        cached.1.clone()
    }

    /// Whether `presented` is one of the keys. Digests are compared in constant time, all of
    /// them, so the answer's timing says nothing about which key came close.
    pub fn accepts(&self, presented: &str) -> bool {
        let presented = digest(presented);
        let mut accepted = subtle::Choice::from(0);
        for key in self.inline.iter().chain(self.file_keys().iter()) {
            accepted |= key.ct_eq(&presented);
        }
        bool::from(accepted)
    }
}

fn json_response(status: StatusCode, body: &impl Serialize) -> Response<Bytes> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Bytes::from(bytes))
        .unwrap_or_else(|_| Response::new(Bytes::new()))
}

fn error_response(
    status: StatusCode,
    code: &str,
    message: impl Into<String>,
    field: Option<String>,
) -> Response<Bytes> {
    json_response(status, &ErrorBody { code: code.to_owned(), message: message.into(), field })
}

fn api_error(error: &ApiError) -> Response<Bytes> {
    let status = StatusCode::from_u16(error.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = json_response(status, &error.body());
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("1"));
    }
    response
}

fn answer<T: Serialize>(result: Result<T, ApiError>) -> Response<Bytes> {
    match result {
        Ok(value) => json_response(StatusCode::OK, &value),
        Err(error) => api_error(&error),
    }
}

/// A JSON body as `T`; a bad one is a 400 naming the field at fault.
fn parse_body<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut parser = serde_json::Deserializer::from_slice(body);
    serde_path_to_error::deserialize(&mut parser).map_err(|error| {
        let path = error.path().to_string();
        let field = if path == "." { "body" } else { "request" };
        let inner = error.into_inner();
        ApiError::BadRequest {
            field,
            message: if path == "." { inner.to_string() } else { format!("{path}: {inner}") },
        }
    })
}

/// Query parameters as `T`; a bad one is a 400 naming it.
fn parse_query<T: DeserializeOwned>(query: &str) -> Result<T, ApiError> {
    let parser = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
    serde_path_to_error::deserialize(parser).map_err(|error| {
        let path = error.path().to_string();
        ApiError::BadRequest { field: "query", message: format!("query {path}: {}", error.into_inner()) }
    })
}

/// Reads the request body, at most `MAX_REQUEST_BYTES` of it.
async fn read_body(
    body: impl futures_util::Stream<Item = Result<impl Buf, warp::Error>>,
) -> Result<Vec<u8>, Response<Bytes>> {
    let mut body = std::pin::pin!(body);
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(|e| error_response(StatusCode::BAD_REQUEST, "bad_request", e.to_string(), None))?;
        if bytes.len() + chunk.remaining() > MAX_REQUEST_BYTES {
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("request body over {MAX_REQUEST_BYTES} bytes"),
                Some("body".into()),
            ));
        }
        bytes.extend_from_slice(chunk.chunk());
    }
    Ok(bytes)
}

/// One API request: everything the router needs.
struct Request {
    method: Method,
    path: Vec<String>,
    query: String,
    body: Vec<u8>,
}

/// Routes one authenticated request.
async fn route(state: &Arc<AppState>, request: Request) -> Response<Bytes> {
    let hub = &state.hub;
    let segments: Vec<&str> = request.path.iter().map(String::as_str).collect();
    let method = &request.method;
    match (method, segments.as_slice()) {
        (&Method::POST, ["rooms", room, "messages"]) => match parse_body(&request.body) {
            Ok(message) => answer(api::publish(hub, room, message).await),
            Err(error) => api_error(&error),
        },
        (&Method::POST, ["broadcast"]) => match parse_body(&request.body) {
            Ok(broadcast) => answer(api::broadcast(hub, broadcast).await),
            Err(error) => api_error(&error),
        },
        (&Method::GET, ["rooms"]) => json_response(StatusCode::OK, &api::rooms(hub)),
        (&Method::GET, ["rooms", room]) => answer(api::room(hub, room)),
        (&Method::GET, ["rooms", room, "history"]) => {
            answer(parse_query(&request.query).and_then(|query| api::history(hub, room, query)))
        }
        (&Method::GET, ["rooms", room, "presence"]) => {
            answer(parse_query(&request.query).and_then(|query| api::presence(hub, room, query)))
        }
        (&Method::POST, ["users", user, "disconnect"]) => {
            let request = if request.body.iter().all(u8::is_ascii_whitespace) {
                Ok(api::DisconnectRequest::default())
            } else {
                parse_body(&request.body)
            };
            answer(request.and_then(|request| api::disconnect(hub, user, request)))
        }
        (_, ["rooms"] | ["rooms", _] | ["rooms", _, "history" | "presence"]) => not_allowed(method, "GET"),
        (_, ["rooms", _, "messages"] | ["broadcast"] | ["users", _, "disconnect"]) => not_allowed(method, "POST"),
        _ => {
            error_response(StatusCode::NOT_FOUND, "not_found", "no such API endpoint (see /api/v1/openapi.json)", None)
        }
    }
}

fn not_allowed(method: &Method, allowed: &'static str) -> Response<Bytes> {
    let mut response = error_response(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed here"),
        None,
    );
    response.headers_mut().insert(header::ALLOW, header::HeaderValue::from_static(allowed));
    response
}

/// The API routes; anything not under `/api/v1` is left to the admin port's other routes.
pub fn routes(
    state: Arc<AppState>,
    keys: Arc<ApiKeys>,
) -> impl Filter<Extract = (Response<Bytes>,), Error = warp::Rejection> + Clone + Send + Sync + 'static {
    let openapi = Bytes::from(serde_json::to_vec_pretty(&api::openapi::document()).unwrap_or_default());
    warp::path("api")
        .and(warp::path("v1"))
        .and(warp::path::tail())
        .and(warp::method())
        .and(warp::header::optional::<String>("authorization"))
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::body::stream())
        .then(move |tail: warp::path::Tail, method: Method, authorization: Option<String>, query: String, body| {
            let (state, keys, openapi) = (state.clone(), keys.clone(), openapi.clone());
            async move {
                // Segments arrive percent-encoded (`@` and `:` of room names often are).
                let path: Option<Vec<String>> = tail
                    .as_str()
                    .split('/')
                    .filter(|s| !s.is_empty())
                    .map(|s| percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|s| s.into_owned()))
                    .collect();
                let response = match path {
                    Some(path) => serve(&state, &keys, &openapi, method, path, authorization, query, body).await,
                    None => error_response(StatusCode::BAD_REQUEST, "bad_request", "the path is not UTF-8", None),
                };
                state.hub.metrics().api_request(response.status().as_u16());
                response
            }
        })
}

#[allow(clippy::too_many_arguments)]
async fn serve(
    state: &Arc<AppState>,
    keys: &ApiKeys,
    openapi: &Bytes,
    method: Method,
    path: Vec<String>,
    authorization: Option<String>,
    query: String,
    body: impl futures_util::Stream<Item = Result<impl Buf, warp::Error>>,
) -> Response<Bytes> {
    if path == ["openapi.json"] && method == Method::GET {
        return Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(openapi.clone())
            .unwrap_or_else(|_| Response::new(Bytes::new()));
    }
    if !keys.enabled() {
        return error_response(
            StatusCode::NOT_FOUND,
            "api_disabled",
            "the server API is off: configure admin.api_keys_file (spec.api.keySecretRef)",
            None,
        );
    }
    let presented = authorization.as_deref().and_then(|value| value.strip_prefix("Bearer "));
    let Some(presented) = presented else {
        let mut response = error_response(
            StatusCode::UNAUTHORIZED,
            "missing_key",
            "send the API key as Authorization: Bearer <key>",
            None,
        );
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    };
    if !keys.accepts(presented) {
        let mut response = error_response(StatusCode::UNAUTHORIZED, "invalid_key", "the API key is not valid", None);
        response.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return response;
    }
    let body = match read_body(body).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    route(state, Request { method, path, query, body }).await
}
