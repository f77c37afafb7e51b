//! The peer port: only `/peer`, the WebSocket other nodes dial. Kept on its own listener so the
//! client port can never reach it.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use warp::Filter;
use warp::http::{HeaderMap, Response, StatusCode};

use super::upgrade::{refuse, switching_protocols, websocket_key};
use super::{RemoteAddr, plain};
use crate::cluster::Cluster;
use crate::cluster::link::{PreAuthLimit, accept, peer_ws_config};

pub fn routes(
    cluster: Arc<Cluster>,
) -> impl Filter<Extract = (Response<Bytes>,), Error = Infallible> + Clone + Send + Sync + 'static {
    let peer = warp::path!("peer")
        .and(warp::get())
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .and(warp::ext::optional::<RemoteAddr>())
        .map(move |headers: HeaderMap, on_upgrade: Option<OnUpgrade>, remote: Option<RemoteAddr>| {
            upgrade(cluster.clone(), &headers, on_upgrade, remote.map(|r| r.0))
        });
    peer.or(warp::any().map(|| plain(StatusCode::NOT_FOUND, "not found\n"))).unify()
}

fn upgrade(
    cluster: Arc<Cluster>,
    headers: &HeaderMap,
    on_upgrade: Option<OnUpgrade>,
    remote: Option<SocketAddr>,
) -> Response<Bytes> {
    let (Some(key), Some(on_upgrade)) = (websocket_key(headers), on_upgrade) else {
        return refuse(StatusCode::BAD_REQUEST, "bad_handshake", "expected a WebSocket upgrade on /peer");
    };
    let Some(slot) = cluster.handshake_slot() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_peer_handshakes",
            "too many peer sockets are authenticating; retry later",
        );
    };
    tokio::spawn(async move {
        if let Ok(upgraded) = on_upgrade.await {
            let (limited, unlock) = PreAuthLimit::new(TokioIo::new(upgraded));
            let ws = WebSocketStream::from_raw_socket(limited, Role::Server, Some(peer_ws_config())).await;
            accept(cluster, ws, remote, unlock, slot).await;
        }
    });
    switching_protocols(&key, None)
}
