//! The operator's own HTTP endpoint: `/metrics`, `/healthz` and `/readyz`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::Metrics;

/// Process state the probes report.
#[derive(Debug, Default)]
pub struct Health {
    /// Set once the API client works; a standby replica is ready too (it serves metrics).
    pub ready: AtomicBool,
    pub leader: AtomicBool,
    /// Set once the leader's ChatCluster watch has listed everything: until then (no CRD,
    /// forbidden, API unreachable) the leader reconciles nothing and is not ready.
    pub watches_synced: AtomicBool,
}

/// Answers one request: status, content type and body.
pub fn route(path: &str, metrics: &Metrics, health: &Health) -> (StatusCode, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    match path {
        "/metrics" => match metrics.encode() {
            Ok(body) => (StatusCode::OK, "application/openmetrics-text; version=1.0.0; charset=utf-8", body),
            Err(_) => (StatusCode::INTERNAL_SERVER_ERROR, TEXT, "metrics encoding failed\n".to_owned()),
        },
        "/healthz" => (StatusCode::OK, TEXT, "ok\n".to_owned()),
        "/readyz" if !health.ready.load(Ordering::Relaxed) => {
            (StatusCode::SERVICE_UNAVAILABLE, TEXT, "not ready\n".to_owned())
        }
        "/readyz" if !health.leader.load(Ordering::Relaxed) => (StatusCode::OK, TEXT, "ready (standby)\n".to_owned()),
        "/readyz" if health.watches_synced.load(Ordering::Relaxed) => {
            (StatusCode::OK, TEXT, "ready (leader)\n".to_owned())
        }
        "/readyz" => (
            StatusCode::SERVICE_UNAVAILABLE,
            TEXT,
            "not ready: leading, but the ChatCluster watch has not synced (see the log and chat_operator_watch_errors_total)\n"
                .to_owned(),
        ),
        _ => (StatusCode::NOT_FOUND, TEXT, "not found\n".to_owned()),
    }
}

/// Serves until `shutdown` turns true.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(%addr, "serving /metrics, /healthz and /readyz");
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let (metrics, health) = (metrics.clone(), health.clone());
        let service = service_fn(move |request: Request<Incoming>| {
            let (code, content_type, body) = route(request.uri().path(), &metrics, &health);
            let mut response = Response::new(Full::new(Bytes::from(body)));
            *response.status_mut() = code;
            response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static(content_type));
            std::future::ready(Ok::<_, Infallible>(response))
        });
        tokio::spawn(async move {
            if let Err(e) = http1::Builder::new().serve_connection(TokioIo::new(stream), service).await {
                tracing::debug!(error = %e, "http connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let metrics = Metrics::new();
        let health = Health::default();
        assert_eq!(route("/healthz", &metrics, &health).0, StatusCode::OK);
        assert_eq!(route("/readyz", &metrics, &health).0, StatusCode::SERVICE_UNAVAILABLE);
        health.ready.store(true, Ordering::Relaxed);
        assert_eq!(route("/readyz", &metrics, &health).2, "ready (standby)\n");
        health.leader.store(true, Ordering::Relaxed);
        let (code, _, body) = route("/readyz", &metrics, &health);
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE, "a leader whose watch never synced reconciles nothing");
        assert!(body.contains("has not synced"), "{body}");
        health.watches_synced.store(true, Ordering::Relaxed);
        assert_eq!(route("/readyz", &metrics, &health).2, "ready (leader)\n");
        metrics.watch_failed();
        let _timer = metrics.reconcile_timer();
        let (code, _, body) = route("/metrics", &metrics, &health);
        assert_eq!(code, StatusCode::OK);
        assert!(body.contains("chat_operator_reconciles_total 1"), "{body}");
        assert!(body.contains("chat_operator_managed_clusters"), "{body}");
        assert!(body.contains("chat_operator_watch_errors_total 1"), "{body}");
        assert_eq!(route("/nope", &metrics, &health).0, StatusCode::NOT_FOUND);
    }
}
