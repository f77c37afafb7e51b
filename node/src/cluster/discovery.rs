//! Finds peers: resolves the headless Service name (or the static peer list) periodically and
//! keeps one dial supervisor per discovered address, with exponential backoff and full jitter.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{NameServerConfig, ResolverConfig};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::proto::rr::{RData, RecordType};

use super::link::{self, DialOutcome};
use super::{AddrState, Cluster};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

fn resolver(dns_server: Option<SocketAddr>) -> Option<TokioResolver> {
    let builder = match dns_server {
        Some(server) => {
            let mut ns = NameServerConfig::udp_and_tcp(server.ip());
            for conn in &mut ns.connections {
                conn.port = server.port();
            }
            let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
            TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
        }
        None => match TokioResolver::builder_tokio() {
            Ok(builder) => builder,
            Err(err) => {
                tracing::error!(%err, "cannot read the system resolver configuration");
                return None;
            }
        },
    };
    let mut builder = builder;
    // Membership must follow the Service's endpoints, not a cached answer.
    builder.options_mut().cache_size = 0;
    match builder.build() {
        Ok(resolver) => Some(resolver),
        Err(err) => {
            tracing::error!(%err, "cannot build the DNS resolver");
            None
        }
    }
}

/// Peer addresses right now; `None` when the lookup failed (keep what we had).
async fn lookup(cluster: &Cluster, resolver: Option<&TokioResolver>) -> Option<HashSet<SocketAddr>> {
    let config = cluster.config();
    let port = config.peer_listen.port();
    let mut found = HashSet::new();
    if let (Some(name), Some(resolver)) = (&config.dns_name, resolver) {
        // A and AAAA are asked separately: a combined lookup reports a failed A query as "no
        // records" when AAAA has none, and the node would forget every peer on a DNS hiccup.
        for kind in [RecordType::A, RecordType::AAAA] {
            match resolver.lookup(name.as_str(), kind).await {
                Ok(answer) => found.extend(answer.answers().iter().filter_map(|record| match &record.data {
                    RData::A(a) => Some(SocketAddr::new(IpAddr::V4(a.0), port)),
                    RData::AAAA(aaaa) => Some(SocketAddr::new(IpAddr::V6(aaaa.0), port)),
                    _ => None,
                })),
                Err(err) if err.is_no_records_found() => {}
                Err(err) => {
                    tracing::warn!(%err, name, ?kind, "peer lookup failed; keeping the peers we know");
                    return None;
                }
            }
        }
    }
    for peer in &config.static_peers {
        match tokio::net::lookup_host(peer.as_str()).await {
            Ok(addrs) => found.extend(addrs),
            Err(err) => tracing::warn!(%err, peer, "static peer does not resolve"),
        }
    }
    Some(found)
}

/// Runs discovery for the node's lifetime.
pub async fn run(cluster: Arc<Cluster>) {
    let resolver = cluster.config().dns_name.as_ref().and_then(|_| resolver(cluster.config().dns_server));
    let interval = Duration::from_secs(cluster.config().discovery_interval_secs);
    let mut tick = tokio::time::interval(interval);
    loop {
        tick.tick().await;
        // A mounted Secret changes in place; checked here, as often as peers are looked up.
        cluster.reload_secret();
        let Some(found) = lookup(&cluster, resolver.as_ref()).await else { continue };
        let fresh = cluster.update_discovered(&found);
        for addr in fresh {
            tokio::spawn(supervise(cluster.clone(), addr));
        }
    }
}

fn jittered(backoff: Duration) -> Duration {
    backoff.mul_f64(rand::random::<f64>())
}

/// Keeps a link to `addr` while it stays discovered.
async fn supervise(cluster: Arc<Cluster>, addr: SocketAddr) {
    let peer_timeout = Duration::from_millis(cluster.config().peer_timeout_ms);
    let mut backoff = BACKOFF_MIN;
    loop {
        match cluster.addr_state(addr) {
            None | Some(AddrState::Itself) => return,
            Some(AddrState::Linked(_)) => {
                tokio::time::sleep(peer_timeout / 4).await;
                continue;
            }
            _ => {}
        }
        cluster.set_addr_state(addr, AddrState::Dialing);
        match link::dial(cluster.clone(), addr).await {
            DialOutcome::Ran => backoff = BACKOFF_MIN,
            DialOutcome::Itself => {
                cluster.set_addr_state(addr, AddrState::Itself);
                return;
            }
            DialOutcome::DialBack(peer) => {
                cluster.set_addr_state(addr, AddrState::AwaitingDial(peer));
                // The lower node dials us; look again if it has not after a while.
                tokio::time::sleep(peer_timeout).await;
                continue;
            }
            DialOutcome::Failed(err) => {
                tracing::debug!(%addr, %err, "peer dial failed");
                cluster.set_addr_state(addr, AddrState::Unreachable);
            }
        }
        tokio::time::sleep(jittered(backoff)).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

impl Cluster {
    /// Replaces the discovered set; returns addresses that are new.
    fn update_discovered(&self, found: &HashSet<SocketAddr>) -> Vec<SocketAddr> {
        let own_port = self.config().peer_listen.port();
        let mut state = self.lock();
        let before = state.discovered.len();
        state.discovered.retain(|addr, _| found.contains(addr));
        let mut fresh = Vec::new();
        for addr in found {
            if !state.discovered.contains_key(addr) {
                let itself = self.is_own_ip(addr.ip()) && addr.port() == own_port;
                state.discovered.insert(*addr, if itself { AddrState::Itself } else { AddrState::New });
                if !itself {
                    fresh.push(*addr);
                }
            }
        }
        let changed = before != state.discovered.len() || !fresh.is_empty();
        drop(state);
        if changed {
            self.changed();
        }
        fresh
    }

    fn addr_state(&self, addr: SocketAddr) -> Option<AddrState> {
        self.lock().discovered.get(&addr).cloned()
    }

    /// Records a dial's outcome, unless the address meanwhile got a live link (the peer dialed
    /// us while we were dialing it).
    fn set_addr_state(&self, addr: SocketAddr, new: AddrState) {
        let mut guard = self.lock();
        let state = &mut *guard;
        if let Some(current) = state.discovered.get_mut(&addr) {
            let live = matches!(current, AddrState::Linked(id) if state.links.contains_key(id.as_str()));
            if !live {
                *current = new;
            }
        }
    }
}
