//! The admin port: `/metrics`, `/cluster` and the probes. Kept apart from the client port because
//! `/cluster` names every room, peer address and node id, and neither should be reachable by chat
//! clients (the client Service does not expose this port).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use warp::Filter;
use warp::http::{Response, StatusCode, header};

use super::{AppState, plain, probes};

/// `/cluster`: the peer links, the room log's members, groups and readiness, and the
/// connection counts the rebalancing works from.
#[derive(serde::Serialize)]
struct ClusterView {
    #[serde(flatten)]
    links: crate::cluster::ClusterStatus,
    #[serde(flatten)]
    log: crate::replication::ReplicationStatus,
    rebalance: Option<crate::rebalance::BalanceView>,
}

/// Every route of the admin port; anything else is 404.
pub fn routes(
    state: Arc<AppState>,
) -> impl Filter<Extract = (Response<Bytes>,), Error = Infallible> + Clone + Send + Sync + 'static {
    let with_state = {
        let state = state.clone();
        warp::any().map(move || state.clone())
    };
    let (healthz, readyz) = probes(with_state.clone());
    let metrics = warp::path!("metrics").and(with_state.clone()).map(|state: Arc<AppState>| {
        let metrics = state.hub.metrics();
        metrics.rooms.set(state.hub.room_count() as i64);
        Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")
            .body(Bytes::from(metrics.render()))
            .unwrap_or_else(|_| Response::new(Bytes::new()))
    });
    let cluster = warp::path!("cluster").and(with_state).map(|state: Arc<AppState>| {
        let body = match (&state.cluster, &state.room_log) {
            (Some(cluster), Some(log)) => serde_json::to_vec_pretty(&ClusterView {
                links: cluster.status(),
                log: log.status(),
                rebalance: state.hub.balance().view(),
            }),
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
    let api = super::api::routes(state.clone(), Arc::new(super::api::ApiKeys::new(&state.hub.config().admin)));
    let get_routes = warp::get().and(metrics.or(cluster).unify().or(healthz).unify().or(readyz).unify());
    api.or(get_routes)
        .unify()
        .or(warp::get().map(|| plain(StatusCode::NOT_FOUND, "not found\n")))
        .unify()
        .or(warp::any().map(|| plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")))
        .unify()
}
