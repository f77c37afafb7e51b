//! Wires a node together: binds the client and admin ports, serves HTTP/WebSocket connections, sweeps idle
//! rooms, and drains on shutdown (not ready → grace → rate-limited disconnects → exit by deadline).

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::TcpListener;

use crate::auth::KeyError;
use crate::cluster::{Cluster, ClusterError, discovery};
use crate::config::NodeConfig;
use crate::http::RemoteAddr;
use crate::http::assets::Assets;
use crate::http::{AppState, routes};
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::replication::{ReplicatedLog, ReplicationError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Tls(#[from] crate::transport::tls::TlsError),
    #[error(transparent)]
    Cluster(#[from] ClusterError),
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error("{0}; drained, exiting so the node restarts")]
    RoomLogFailed(String),
}

/// A bound, not yet running node.
pub struct Server {
    listener: TcpListener,
    /// TLS on the client port (`tls.*`).
    tls: Option<tokio_rustls::TlsAcceptor>,
    admin_listener: TcpListener,
    peer_listener: Option<TcpListener>,
    state: Arc<AppState>,
}

async fn bind(addr: SocketAddr) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr).await.map_err(|source| ServerError::Bind { addr, source })
}

/// The node's id: the configured one, else `$POD_NAME`, else the host name.
pub fn node_id(config: &NodeConfig) -> String {
    config
        .node_id
        .clone()
        .or_else(|| std::env::var("POD_NAME").ok().filter(|n| !n.is_empty()))
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty())
        })
        .unwrap_or_else(|| "chat-node".to_owned())
}

impl Server {
    pub async fn bind(config: NodeConfig) -> Result<Server, ServerError> {
        let tls = match (&config.tls.cert_file, &config.tls.key_file) {
            (Some(cert), Some(key)) => Some(crate::transport::tls::CertFiles::open(cert, key)?.acceptor()?),
            _ => None,
        };
        let listener = bind(config.listen).await?;
        let admin_listener = bind(config.admin.listen).await?;
        let assets = Assets::new(config.assets_dir.clone());
        let metrics = Arc::new(Metrics::new());
        let id = node_id(&config);
        let (cluster, peer_listener, room_log) = if config.cluster.enabled() {
            let cluster = Cluster::new(id.clone(), config.cluster.clone(), metrics.clone())?;
            let log = ReplicatedLog::new(id.clone(), config.cluster.clone(), cluster.clone(), metrics.clone())?;
            (Some(cluster), Some(bind(config.cluster.peer_listen).await?), Some(log))
        } else {
            metrics.standalone();
            (None, None, None)
        };
        let hub = Hub::new(id, config, metrics, room_log.clone().map(|log| log as _))?;
        if let Some(log) = &room_log {
            // After the hub is attached: stored snapshots and logs are applied to it.
            log.start().await?;
        }
        let state = Arc::new(AppState { hub, assets, cluster, room_log, started: AtomicBool::new(false) });
        Ok(Server { listener, tls, admin_listener, peer_listener, state })
    }

    /// Whether the client port speaks TLS (`wss://`).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or_else(|_| self.state.hub.config().listen)
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().unwrap_or_else(|_| self.state.hub.config().admin.listen)
    }

    pub fn hub(&self) -> &Arc<Hub> {
        &self.state.hub
    }

    /// The replicated room log, in a cluster.
    pub fn room_log(&self) -> Option<Arc<ReplicatedLog>> {
        self.state.room_log.clone()
    }

    /// Serves until `shutdown` resolves, then drains and returns; also drains, and returns the
    /// error, when a room-log group stopped for good.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
        let Server { listener, tls, admin_listener, peer_listener, state } = self;
        let hub = state.hub.clone();
        let header_timeout = Duration::from_secs(hub.config().limits.handshake_timeout_secs);
        let mut tasks = vec![
            tokio::spawn(accept_loop(
                listener,
                tls,
                routes(state.clone()),
                header_timeout,
                // Twice the write deadline: the node's own deadline ends a stuck client first (and
                // counts it); the kernel's is the backstop.
                Duration::from_secs(hub.config().limits.write_timeout_secs) * 2,
            )),
            tokio::spawn(accept_loop(
                admin_listener,
                None,
                crate::http::admin::routes(state.clone()),
                header_timeout,
                Duration::from_secs(hub.config().limits.write_timeout_secs) * 2,
            )),
            tokio::spawn(sweep_rooms(hub.clone())),
        ];
        if let (Some(cluster), Some(peer_listener)) = (&state.cluster, peer_listener) {
            tasks.push(tokio::spawn(accept_loop(
                peer_listener,
                None,
                crate::http::peer::routes(cluster.clone()),
                header_timeout,
                Duration::from_millis(cluster.config().peer_timeout_ms) * 2,
            )));
            tasks.push(tokio::spawn(discovery::run(cluster.clone())));
        }
        if let Some(log) = &state.room_log {
            tasks.push(tokio::spawn(log.clone().run()));
            if hub.config().rebalance.enabled {
                tasks.push(tokio::spawn(crate::rebalance::run(hub.clone(), log.clone() as _)));
            }
        }
        state.started.store(true, Ordering::Release);
        let room_log = state.room_log.clone();
        let failed = async move {
            match room_log {
                Some(log) => log.failed().await,
                None => std::future::pending().await,
            }
        };
        let failure = tokio::select! {
            () = shutdown => None,
            reason = failed => Some(reason),
        };
        drain(&hub, state.room_log.as_deref(), state.cluster.as_deref()).await;
        for task in tasks {
            task.abort();
        }
        if let Some(log) = &state.room_log {
            log.shutdown().await;
        }
        failure.map_or(Ok(()), |reason| Err(ServerError::RoomLogFailed(reason)))
    }
}

/// Serves HTTP/1.1 (with upgrades) on every accepted connection, over TLS when `tls` is set,
/// with `RemoteAddr` on each request. `dead_after` bounds how long a silent socket with
/// unacknowledged data lives (`transport::tcp`).
async fn accept_loop<F>(
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    routes: F,
    header_timeout: Duration,
    dead_after: Duration,
) where
    F: warp::Filter<Extract = (warp::http::Response<bytes::Bytes>,), Error = std::convert::Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
{
    let service = warp::service(routes);
    loop {
        let (tcp, remote) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(err) => {
                // Out of file descriptors or a connection reset before accept: back off briefly
                // instead of spinning.
                tracing::warn!(%err, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        if let Err(err) = crate::transport::tcp::tune(&tcp, dead_after) {
            tracing::debug!(%err, "setting TCP options failed");
        }
        let service = service.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(RemoteAddr(remote));
            tower_service::Service::call(&mut service.clone(), request)
        });
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => serve_http(TokioIo::new(tcp), service, header_timeout).await,
                // The TLS handshake shares the deadline of the request head.
                Some(tls) => match tokio::time::timeout(header_timeout, tls.accept(tcp)).await {
                    Ok(Ok(stream)) => serve_http(TokioIo::new(stream), service, header_timeout).await,
                    Ok(Err(err)) => return tracing::debug!(%err, %remote, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(%remote, "TLS handshake timed out"),
                },
            };
            if let Err(err) = result {
                tracing::debug!(%err, "HTTP connection ended with an error");
            }
        });
    }
}

/// One HTTP/1.1 connection with upgrades, its request heads read within `header_timeout`.
async fn serve_http<I, S>(io: I, service: S, header_timeout: Duration) -> Result<(), hyper::Error>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: hyper::service::HttpService<hyper::body::Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .with_upgrades()
        .await
}

async fn sweep_rooms(hub: Arc<Hub>) {
    let every = Duration::from_secs(hub.config().history.empty_room_ttl_secs.clamp(1, 60));
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let forgotten = hub.sweep(std::time::Instant::now(), crate::hub::unix_millis());
        if forgotten > 0 {
            tracing::debug!(forgotten, "forgot idle rooms");
        }
    }
}

/// Bound for leaving the room-log groups: a leader change and a membership commit per group.
const HAND_OVER_TIMEOUT: Duration = Duration::from_secs(5);

/// Drains within `drain.deadline_secs`: whatever is not done by then is cut off.
async fn drain(hub: &Arc<Hub>, room_log: Option<&ReplicatedLog>, cluster: Option<&Cluster>) {
    let drain = &hub.config().drain;
    let deadline = Duration::from_secs(drain.deadline_secs);
    let started = tokio::time::Instant::now();
    hub.start_draining();
    tracing::info!(connections = hub.open_connections(), "draining: not ready, refusing new connections");
    let orderly = async {
        // Leaves the groups before clients are sent away, so their publishes keep flowing.
        if let Some(log) = room_log {
            log.leave(HAND_OVER_TIMEOUT).await;
        }
        tokio::time::sleep(Duration::from_secs(drain.lb_grace_secs)).await;
        hub.disconnect_all(drain.rate_per_sec).await;
        while hub.open_connections() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The closed sessions' records (and presence departures) go to the peers before exit.
        if let Some(log) = room_log {
            log.send_pending();
        }
        if let Some(cluster) = cluster {
            cluster.flush(Duration::from_secs(1)).await;
        }
    };
    match tokio::time::timeout(deadline, orderly).await {
        Ok(()) => tracing::info!(elapsed_ms = started.elapsed().as_millis() as u64, "drained"),
        Err(_) => tracing::warn!(left = hub.open_connections(), "drain deadline reached; exiting anyway"),
    }
}
