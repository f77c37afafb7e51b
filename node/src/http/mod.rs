//! The client port on warp: `/ws` (handshake checks, then the WebSocket is handed to the hub),
//! `/healthz`, `/readyz`, `/metrics` and the static assets.

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

/// Every route of the client port.
/// `/cluster`: the peer links, and the room log's members, groups and readiness.
#[derive(serde::Serialize)]
struct ClusterView {
    #[serde(flatten)]
    links: crate::cluster::ClusterStatus,
    #[serde(flatten)]
    log: crate::replication::ReplicationStatus,
}

pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response<Bytes>,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_state = warp::any().map(move || state.clone());

    let healthz = warp::path!("healthz").map(|| plain(StatusCode::OK, "ok\n"));
    let readyz = warp::path!("readyz").and(with_state.clone()).map(|state: Arc<AppState>| {
        if state.is_ready() {
            plain(StatusCode::OK, "ready\n")
        } else if state.hub.is_draining() {
            plain(StatusCode::SERVICE_UNAVAILABLE, "draining\n")
        } else {
            plain(StatusCode::SERVICE_UNAVAILABLE, "starting\n")
        }
    });
    let metrics = warp::path!("metrics").and(with_state.clone()).map(|state: Arc<AppState>| {
        let metrics = state.hub.metrics();
        metrics.rooms.set(state.hub.room_count() as i64);
        Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
            .body(Bytes::from(metrics.render()))
            .unwrap_or_else(|_| Response::new(Bytes::new()))
    });
    let cluster = warp::path!("cluster").and(with_state.clone()).map(|state: Arc<AppState>| {
        let body = match (&state.cluster, &state.room_log) {
            (Some(cluster), Some(log)) => {
                serde_json::to_vec_pretty(&ClusterView { links: cluster.status(), log: log.status() })
            }
            _ => serde_json::to_vec_pretty(&serde_json::json!({
                "node_id": state.hub.node_id(),
                "members": [],
                "clustered": false,
            })),
        };
        Response::builder()
            .header(header::CONTENT_TYPE, "application/json")
            .body(Bytes::from(body.unwrap_or_default()))
            .unwrap_or_else(|_| Response::new(Bytes::new()))
    });
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

    let get_routes = warp::get().and(
        ws.or(healthz).unify().or(readyz).unify().or(metrics).unify().or(cluster).unify().or(static_files).unify(),
    );
    get_routes.or(warp::any().map(|| plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"))).unify()
}
