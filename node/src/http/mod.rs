//! The client port on warp: `/ws` (handshake checks, then the WebSocket is handed to the hub),
//! `/healthz`, `/readyz` and the static assets. `/metrics` and `/cluster` are on the admin port.

pub mod admin;
pub mod api;
pub mod assets;
pub mod peer;
mod upgrade;

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use warp::Filter;
use warp::http::{Response, StatusCode, header};

use crate::cluster::Cluster;
use crate::hub::Hub;
use crate::replication::ReplicatedLog;
use assets::Assets;

/// The client's address, put on every request by the accept loop.
#[derive(Debug, Clone, Copy)]
pub struct RemoteAddr(pub std::net::SocketAddr);

/// What the HTTP handlers share.
pub struct AppState {
    pub hub: Arc<Hub>,
    pub assets: Assets,
    pub cluster: Option<Arc<Cluster>>,
    pub room_log: Option<Arc<ReplicatedLog>>,
    /// Set once start-up is done; `/readyz` stays 503 before that and while draining.
    pub started: AtomicBool,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.started.load(Ordering::Acquire) && self.hub.is_ready()
    }
}

pub(crate) fn plain(status: StatusCode, body: &'static str) -> Response<Bytes> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Bytes::from_static(body.as_bytes()))
        .unwrap_or_else(|_| Response::new(Bytes::new()))
}

/// `/healthz` (the process answers) and `/readyz` (started, ready, not draining), served on both
/// ports: the pod's probes use the admin port, load balancers in front of the client port may
/// probe it too.
fn probes(
    with_state: impl Filter<Extract = (Arc<AppState>,), Error = Infallible> + Clone + Send + Sync + 'static,
) -> (
    impl Filter<Extract = (Response<Bytes>,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
    impl Filter<Extract = (Response<Bytes>,), Error = warp::Rejection> + Clone + Send + Sync + 'static,
) {
    let healthz = warp::path!("healthz").map(|| plain(StatusCode::OK, "ok\n"));
    let readyz = warp::path!("readyz").and(with_state).map(|state: Arc<AppState>| {
        if state.is_ready() {
            plain(StatusCode::OK, "ready\n")
        } else if state.hub.is_draining() {
            plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else {
            plain(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
        }
    });
    (healthz, readyz)
}

/// Every route of the client port.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response<Bytes>,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_state = warp::any().map(move || state.clone());

    let (healthz, readyz) = probes(with_state.clone());
    let ws = warp::path!("ws")
        .and(warp::header::headers_cloned())
        .and(warp::query::raw().or(warp::any().map(String::new)).unify())
        .and(warp::ext::optional::<hyper::upgrade::OnUpgrade>())
        .and(warp::ext::optional::<RemoteAddr>())
        .and(with_state.clone())
        .map(upgrade::handshake);
    let static_files = warp::path::tail()
        .and(with_state)
        .then(|tail: warp::path::Tail, state: Arc<AppState>| async move { state.assets.response(tail.as_str()).await });

    let get_routes = warp::get().and(ws.or(healthz).unify().or(readyz).unify().or(static_files).unify());
    get_routes.or(warp::any().map(|| plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"))).unify()
}
