//! What the nodes say of their rebalancing (`spec.rebalance`): every node knows every node's
//! connection count, so one node's `/cluster` (admin port, reached through the peer Service's
//! per-pod DNS names) tells whether a rebalance is under way. Its start and end become Events
//! and `status.rebalancing`; while one may be near, the cluster is looked at again soon.

use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use crate::resources::{ADMIN_PORT, Owner};

/// How soon a cluster is looked at again while its nodes are rebalancing or about to.
pub const RECHECK: Duration = Duration::from_secs(5);
/// Bound on asking one node.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// Nodes asked in turn before giving up for this reconcile.
const NODES_ASKED: i32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("cannot reach {0}: {1}")]
    Connect(String, String),
    #[error("{0} did not answer within {ASK_TIMEOUT:?}")]
    Timeout(String),
    #[error("{0} answered {1}")]
    Status(String, u16),
    #[error("{0} answered something that is not its rebalancing: {1}")]
    Body(String, String),
}

/// One node's account of the cluster's balance.
#[derive(Debug, Clone, PartialEq)]
pub struct Balance {
    /// Some node sheds connections, or did within its cooldown.
    pub rebalancing: bool,
    /// Every node is within the tolerance of the mean.
    pub even: bool,
    /// Why the asked node does not shed now (`settling`, `changing`, …), if it does not.
    pub hold: Option<String>,
    pub spread_percent: f64,
    /// Node name and connection count, in name order.
    pub counts: Vec<(String, u64)>,
}

impl Balance {
    /// Reads the `rebalance` part of a node's `/cluster` answer.
    pub fn from_cluster_view(view: &Value) -> Option<Balance> {
        let r = view.get("rebalance")?;
        let counts = r["nodes"]
            .as_array()?
            .iter()
            .map(|n| Some((n["node"].as_str()?.to_owned(), n["connections"].as_u64()?)))
            .collect::<Option<Vec<_>>>()?;
        Some(Balance {
            rebalancing: r["rebalancing"].as_bool()?,
            even: r["even"].as_bool()?,
            hold: r["hold"].as_str().map(str::to_owned),
            spread_percent: r["spread_percent"].as_f64().unwrap_or(0.0),
            counts,
        })
    }

    /// A rebalance may start within moments: the membership or the counts just changed, or
    /// a round just ended.
    pub fn may_start_soon(&self) -> bool {
        matches!(self.hold.as_deref(), Some("settling" | "changing" | "cooldown" | "members_missing"))
    }

    pub fn describe(&self) -> String {
        let counts: Vec<String> = self.counts.iter().map(|(node, n)| format!("{node} {n}")).collect();
        format!("connections per node: {} (busiest {:.1} % above the mean)", counts.join(", "), self.spread_percent)
    }
}

/// Asks a node of a cluster about its balance.
#[async_trait::async_trait]
pub trait NodeProbe: Send + Sync + std::fmt::Debug {
    async fn balance(&self, owner: &Owner, ordinal: i32) -> Result<Balance, ProbeError>;
}

/// Asks nothing: the operator does not reach the pods (tests, or a run outside the cluster).
#[derive(Debug)]
pub struct NoProbe;

#[async_trait::async_trait]
impl NodeProbe for NoProbe {
    async fn balance(&self, owner: &Owner, ordinal: i32) -> Result<Balance, ProbeError> {
        Err(ProbeError::Connect(format!("{}-{ordinal}", owner.name), "no node probe configured".into()))
    }
}

/// `GET /cluster` on the pod's admin port, by its DNS name under the peer Service.
#[derive(Debug)]
pub struct HttpProbe;

#[async_trait::async_trait]
impl NodeProbe for HttpProbe {
    async fn balance(&self, owner: &Owner, ordinal: i32) -> Result<Balance, ProbeError> {
        let host = format!("{}-{ordinal}.{}", owner.name, owner.peer_dns());
        ask(&host, u16::try_from(ADMIN_PORT).unwrap_or(9090)).await
    }
}

/// `GET /cluster` on a node's admin port at `host:port`, within [`ASK_TIMEOUT`].
pub async fn ask(host: &str, port: u16) -> Result<Balance, ProbeError> {
    match tokio::time::timeout(ASK_TIMEOUT, get_cluster_view(host, port)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout(host.to_owned())),
    }
}

async fn get_cluster_view(host: &str, port: u16) -> Result<Balance, ProbeError> {
    let connect_error = |e: &dyn std::fmt::Display| ProbeError::Connect(host.to_owned(), e.to_string());
    let tcp = tokio::net::TcpStream::connect((host, port)).await.map_err(|e| connect_error(&e))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp))
        .await
        .map_err(|e| connect_error(&e))?;
    tokio::spawn(connection);
    let request = http::Request::get("/cluster")
        .header(http::header::HOST, host)
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| connect_error(&e))?;
    let response = sender.send_request(request).await.map_err(|e| connect_error(&e))?;
    if !response.status().is_success() {
        return Err(ProbeError::Status(host.to_owned(), response.status().as_u16()));
    }
    let body = response.into_body().collect().await.map_err(|e| connect_error(&e))?.to_bytes();
    let view: Value = serde_json::from_slice(&body).map_err(|e| ProbeError::Body(host.to_owned(), e.to_string()))?;
    Balance::from_cluster_view(&view).ok_or_else(|| ProbeError::Body(host.to_owned(), "no rebalance section".into()))
}

/// The first answer of the cluster's first few ready nodes; `None` if none answered.
pub async fn observe(probe: &dyn NodeProbe, owner: &Owner, ready: i32) -> Option<Balance> {
    for ordinal in 0..ready.min(NODES_ASKED) {
        match probe.balance(owner, ordinal).await {
            Ok(balance) => return Some(balance),
            Err(err) => tracing::debug!(%err, "could not ask a node about its rebalancing"),
        }
    }
    None
}

/// What changed between the last status and now: `Some((reason, note))` for an Event.
pub fn transition(was: Option<bool>, now: &Balance) -> Option<(&'static str, String)> {
    match (was.unwrap_or(false), now.rebalancing) {
        (false, true) => {
            Some(("RebalanceStarted", format!("nodes above the mean move connections; {}", now.describe())))
        }
        (true, false) => {
            let how = if now.even { "connections are even" } else { "no node may move more connections now" };
            Some(("RebalanceFinished", format!("{how}; {}", now.describe())))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn view(rebalancing: bool, even: bool, hold: Option<&str>) -> Value {
        json!({"node_id": "chat-0", "rebalance": {
            "enabled": true, "shedding": false, "rebalancing": rebalancing, "even": even, "hold": hold,
            "mean": 600.0, "spread_percent": 12.5,
            "nodes": [{"node": "chat-0", "connections": 675, "revision": "r", "ready": true, "rebalancing": false},
                      {"node": "chat-1", "connections": 525, "revision": "r", "ready": true, "rebalancing": true}],
        }})
    }

    #[test]
    fn a_rebalance_starts_and_finishes_once_each() {
        let started = Balance::from_cluster_view(&view(true, false, None)).unwrap();
        let (reason, note) = transition(None, &started).unwrap();
        assert_eq!(reason, "RebalanceStarted");
        assert!(note.contains("chat-0 675, chat-1 525") && note.contains("12.5 %"), "{note}");
        assert_eq!(transition(Some(true), &started), None, "still going: no second event");
        let done = Balance::from_cluster_view(&view(false, true, Some("balanced"))).unwrap();
        assert_eq!(transition(Some(true), &done).map(|t| t.0), Some("RebalanceFinished"));
        assert_eq!(transition(Some(false), &done), None);
        assert!(!done.may_start_soon());
        assert!(Balance::from_cluster_view(&view(false, false, Some("settling"))).unwrap().may_start_soon());
    }

    #[test]
    fn a_node_without_the_rebalance_section_is_no_answer() {
        assert_eq!(Balance::from_cluster_view(&json!({"node_id": "chat-0", "clustered": false})), None);
    }
}
