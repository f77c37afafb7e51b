//! Helpers for tests of several `chat-node` processes forming a cluster: node configs that find
//! each other through the test DNS server, `/cluster` polling, metrics, and a loopback cluster
//! on 127.0.0.2, .3, … Nodes run with short heartbeats and timeouts so tests take seconds.

use std::collections::BTreeSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use chat_node::config::{AuthMode, NodeConfig};
use serde_json::Value;

use crate::dns::DnsServer;
use crate::{NodeProcess, free_port};

pub const NAME: &str = "chat-peers.test.svc.cluster.local";
pub const SECRET: &str = "cluster-e2e-secret-0123456789";
pub const HEARTBEAT_MS: u64 = 100;
pub const PEER_TIMEOUT_MS: u64 = 600;
pub const RAFT_HEARTBEAT_MS: u64 = 50;
/// Generous for a loaded 2-core machine running several nodes: no spurious elections.
pub const ELECTION_TIMEOUT_MS: u64 = 300;
/// Bound for a cluster to (re)converge: a discovery round, redial backoff (which grows to 5 s
/// while a peer is away) and a loaded CI machine.
pub const CONVERGE: Duration = Duration::from_secs(15);

// ---------- helpers ----------

pub fn loopback(last: u8) -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
}

/// Ports shared by every node of one test (the peer port is the same on every node).
#[derive(Clone, Copy)]
pub struct Ports {
    pub client: u16,
    pub peer: u16,
    pub admin: u16,
}

impl Ports {
    pub fn free() -> Ports {
        Ports { client: free_port(), peer: free_port(), admin: free_port() }
    }
}

/// A node config discovering its peers through `dns` only.
pub fn node_config(id: &str, ip: IpAddr, ports: Ports, dns: SocketAddr, secret: &str) -> NodeConfig {
    let mut cfg =
        NodeConfig { listen: SocketAddr::new(ip, ports.client), node_id: Some(id.into()), ..NodeConfig::default() };
    cfg.admin.listen = SocketAddr::new(ip, ports.admin);
    cfg.auth.mode = AuthMode::Anonymous;
    cfg.drain.deadline_secs = 2;
    cfg.drain.lb_grace_secs = 0;
    // Large enough that every resume during a test's restarts is within the window.
    cfg.history.size = 20_000;
    // Load tests publish faster than a person would.
    cfg.limits.publish_rate_per_sec = 10_000;
    cfg.limits.publish_burst = 10_000;
    let c = &mut cfg.cluster;
    c.peer_listen = SocketAddr::new(ip, ports.peer);
    c.dns_name = Some(NAME.into());
    c.dns_server = Some(dns);
    c.static_peers = Vec::new();
    c.discovery_interval_secs = 1;
    c.heartbeat_ms = HEARTBEAT_MS;
    c.peer_timeout_ms = PEER_TIMEOUT_MS;
    c.raft_heartbeat_ms = RAFT_HEARTBEAT_MS;
    c.election_timeout_ms = ELECTION_TIMEOUT_MS;
    c.secret = Some(secret.into());
    cfg
}

pub async fn start(cfg: &NodeConfig) -> anyhow::Result<NodeProcess> {
    cfg.validate().context("the test's own config is invalid")?;
    NodeProcess::start(&toml::to_string(cfg)?).await
}

pub async fn start_in(ns: &str, cfg: &NodeConfig) -> anyhow::Result<NodeProcess> {
    cfg.validate().context("the test's own config is invalid")?;
    NodeProcess::start_in_netns(ns, &toml::to_string(cfg)?).await
}

/// A node of a test cluster: its id and its process.
pub struct Member {
    pub id: String,
    pub node: NodeProcess,
}

pub async fn cluster_status(node: &NodeProcess) -> anyhow::Result<Value> {
    let (status, body) = node.admin_get("/cluster").await?;
    ensure!(status == 200, "/cluster answered {status}: {body}");
    serde_json::from_str(&body).with_context(|| format!("/cluster is not JSON: {body}"))
}

/// The peers a node is linked to.
pub fn member_ids(status: &Value) -> BTreeSet<String> {
    status["links"]
        .as_array()
        .map(|m| m.iter().filter_map(|m| m["node_id"].as_str().map(str::to_owned)).collect())
        .unwrap_or_default()
}

/// A sample's value in a Prometheus text exposition (first series of that name).
pub fn metric(body: &str, name: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|line| {
        let rest = line.strip_prefix(name)?;
        let value = match rest.chars().next()? {
            ' ' => rest.trim(),
            '{' => rest.split_once('}')?.1.trim(),
            _ => return None,
        };
        value.split_whitespace().next()?.parse().ok()
    })
}

pub async fn metric_of(node: &NodeProcess, name: &str) -> anyhow::Result<f64> {
    let (status, body) = node.admin_get("/metrics").await?;
    ensure!(status == 200, "/metrics answered {status}");
    metric(&body, name).with_context(|| format!("no {name} in /metrics:\n{body}"))
}

pub fn tail(output: &str, lines: usize) -> String {
    let all: Vec<&str> = output.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Polls `/cluster` until `pred` holds; the error shows the last status and the node's log.
pub async fn wait_status(
    m: &Member,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> anyhow::Result<Value> {
    let deadline = Instant::now() + timeout;
    let mut last: Value;
    loop {
        match cluster_status(&m.node).await {
            Ok(status) if pred(&status) => return Ok(status),
            Ok(status) => last = status,
            Err(err) => last = Value::String(format!("{err:#}")),
        }
        if Instant::now() >= deadline {
            bail!(
                "{}: not {what} within {timeout:?}; last /cluster: {last:#}\n--- log tail ---\n{}",
                m.id,
                tail(&m.node.output(), 40)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The node names voting in every room-log group, if all groups agree.
pub fn voters(status: &Value) -> Option<BTreeSet<String>> {
    let groups = status["groups"].as_array()?;
    let sets: BTreeSet<BTreeSet<String>> = groups
        .iter()
        .map(|g| g["voters"].as_array().map(|v| v.iter().filter_map(|n| n.as_str().map(str::to_owned)).collect()))
        .collect::<Option<_>>()?;
    (sets.len() == 1).then(|| sets.into_iter().next()).flatten()
}

/// Waits until every node in `group` is linked to exactly the others, intends a cluster of
/// `size`, is ready, and sees `voters` voting in every group.
pub async fn wait_converged_with(
    group: &[&Member],
    size: usize,
    voters_wanted: &BTreeSet<String>,
) -> anyhow::Result<()> {
    let ids: BTreeSet<String> = group.iter().map(|m| m.id.clone()).collect();
    for m in group {
        let mut others = ids.clone();
        others.remove(&m.id);
        let what = format!("linked to exactly {others:?}, size {size}, ready, voters {voters_wanted:?}");
        wait_status(m, &what, CONVERGE, |s| {
            member_ids(s) == others
                && s["size"] == size
                && s["ready"] == true
                && voters(s).as_ref() == Some(voters_wanted)
        })
        .await?;
    }
    Ok(())
}

/// Waits until every node of `group` is linked to the others, ready, and every one of them
/// votes in every group (clusters of at most 5).
pub async fn wait_converged(group: &[&Member], size: usize) -> anyhow::Result<()> {
    let ids: BTreeSet<String> = group.iter().map(|m| m.id.clone()).collect();
    wait_converged_with(group, size, &ids).await
}

/// A DNS server on 127.0.0.1 plus nodes on 127.0.0.2, .3, … listed in it.
pub struct LoopbackCluster {
    pub dns: DnsServer,
    pub ports: Ports,
    /// The intended size new node configs get (`cluster.size`).
    pub size: usize,
    pub members: Vec<Member>,
    /// Nodes take JWTs signed with [`JWT_SECRET`] instead of anonymous names.
    pub jwt: bool,
    /// The test's own settings, applied to every node config this cluster makes.
    pub tune: Arc<dyn Fn(&mut NodeConfig) + Send + Sync>,
}

/// The HS256 key of clusters started with [`LoopbackCluster::start_jwt`].
pub const JWT_SECRET: &str = "cluster-e2e-jwt-secret-0123456789";

/// A token for user `sub` accepted by a [`LoopbackCluster::start_jwt`] cluster.
pub fn user_token(sub: &str) -> String {
    crate::mint_token(JWT_SECRET, sub, sub, &[], 3600)
}

impl LoopbackCluster {
    /// `n` nodes `node-2` … on 127.0.0.2 … (ordinals 0 …), all in DNS before they start (as
    /// with `publishNotReadyAddresses`), started concurrently.
    pub async fn start(n: u8) -> anyhow::Result<LoopbackCluster> {
        Self::start_with(n, false, Arc::new(|_| {})).await
    }

    /// Like [`LoopbackCluster::start`], with JWT authentication (stable user ids).
    pub async fn start_jwt(n: u8) -> anyhow::Result<LoopbackCluster> {
        Self::start_with(n, true, Arc::new(|_| {})).await
    }

    /// Like [`LoopbackCluster::start`], with `tune` applied to every node's config (also to
    /// those [`LoopbackCluster::config`] makes later).
    pub async fn start_tuned(
        n: u8,
        tune: impl Fn(&mut NodeConfig) + Send + Sync + 'static,
    ) -> anyhow::Result<LoopbackCluster> {
        Self::start_with(n, false, Arc::new(tune)).await
    }

    async fn start_with(
        n: u8,
        jwt: bool,
        tune: Arc<dyn Fn(&mut NodeConfig) + Send + Sync>,
    ) -> anyhow::Result<LoopbackCluster> {
        let dns = DnsServer::start(loopback(1), NAME).await?;
        let mut cluster = LoopbackCluster { dns, ports: Ports::free(), size: n.into(), members: Vec::new(), jwt, tune };
        let lasts: Vec<u8> = (2..2 + n).collect();
        cluster.dns.set_records(lasts.iter().map(|l| loopback(*l)).collect());
        let starts = lasts.iter().map(|l| {
            let cfg = cluster.config(&format!("node-{l}"), *l, SECRET);
            async move { start(&cfg).await.map(|node| Member { id: cfg.node_id.clone().unwrap_or_default(), node }) }
        });
        cluster.members = futures_util::future::try_join_all(starts).await?;
        Ok(cluster)
    }

    /// The config of the node on 127.0.0.`last`: ordinal `last - 2`, this cluster's size.
    pub fn config(&self, id: &str, last: u8, secret: &str) -> NodeConfig {
        let mut cfg = node_config(id, loopback(last), self.ports, self.dns.addr(), secret);
        cfg.cluster.ordinal = Some(u32::from(last.saturating_sub(2)));
        cfg.cluster.size = self.size;
        if self.jwt {
            cfg.auth.mode = AuthMode::Jwt;
            cfg.auth.jwt_secret = Some(JWT_SECRET.into());
        }
        (self.tune)(&mut cfg);
        cfg
    }

    pub fn all(&self) -> Vec<&Member> {
        self.members.iter().collect()
    }

    /// Sets the intended size and tells every running node (they re-read their config file).
    pub fn resize(&mut self, size: usize) -> anyhow::Result<()> {
        self.size = size;
        for m in &self.members {
            let last = last_octet(&m.node)?;
            let cfg = self.config(&m.id, last, SECRET);
            m.node.rewrite_config(&toml::to_string(&cfg)?)?;
        }
        Ok(())
    }
}

fn last_octet(node: &NodeProcess) -> anyhow::Result<u8> {
    match node.addr().ip() {
        IpAddr::V4(ip) => Ok(ip.octets()[3]),
        IpAddr::V6(_) => bail!("loopback test nodes are IPv4"),
    }
}

/// Ports of the nodes of a [`NetnsCluster`]: the same in every namespace.
pub const NETNS_PORTS: Ports = Ports { client: 18080, peer: 18081, admin: 18082 };

/// Hosts in network namespaces on one bridge (so links can be cut), a DNS server listing them
/// and a node on each, listening on every address of its namespace (reached at 127.0.0.1 in
/// there). Needs root. Fields drop in order: nodes, DNS, then the namespaces.
pub struct NetnsCluster {
    pub members: Vec<Member>,
    pub dns: DnsServer,
    pub net: crate::netns::TestNet,
}

impl NetnsCluster {
    /// `n` nodes `node-0` … started concurrently and converged.
    pub async fn start(n: usize) -> anyhow::Result<NetnsCluster> {
        Self::start_with(n, false).await
    }

    /// Like [`NetnsCluster::start`], with JWT authentication (stable user ids, see [`user_token`]).
    pub async fn start_jwt(n: usize) -> anyhow::Result<NetnsCluster> {
        Self::start_with(n, true).await
    }

    async fn start_with(n: usize, jwt: bool) -> anyhow::Result<NetnsCluster> {
        let net = crate::netns::TestNet::new(n)?;
        let dns = net.start_dns(NAME).await?;
        dns.set_records(net.hosts().iter().map(|h| h.ip_addr()).collect());
        let starts = net.hosts().iter().enumerate().map(|(i, host)| {
            let id = format!("node-{i}");
            let mut cfg = node_config(&id, host.ip_addr(), NETNS_PORTS, dns.addr(), SECRET);
            cfg.cluster.size = n;
            cfg.listen = SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), NETNS_PORTS.client);
            if jwt {
                cfg.auth.mode = AuthMode::Jwt;
                cfg.auth.jwt_secret = Some(JWT_SECRET.into());
            }
            let ns = host.ns.clone();
            async move { start_in(&ns, &cfg).await.map(|node| Member { id, node }) }
        });
        let members = futures_util::future::try_join_all(starts).await?;
        let cluster = NetnsCluster { members, dns, net };
        wait_converged(&cluster.all(), n).await?;
        Ok(cluster)
    }

    pub fn all(&self) -> Vec<&Member> {
        self.members.iter().collect()
    }
}
