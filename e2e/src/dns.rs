//! The end-to-end tests' DNS server: local mode's ([`chat_operator::local::dns`]), authoritative
//! for one headless-Service name such as `chat-peers.test.svc.cluster.local`, whose A/AAAA record
//! set the test changes at run time — the way Kubernetes publishes and withdraws endpoints when a
//! StatefulSet scales — and which can simulate an outage ([`fail_queries`]) and count the
//! questions the nodes ask ([`queries`]).
//!
//! This adapter only gives it the harness's signatures (async, `anyhow`); everything else is
//! [`chat_operator::local::dns::DnsServer`]'s, reached through `Deref`.
//!
//! [`fail_queries`]: chat_operator::local::dns::DnsServer::fail_queries
//! [`queries`]: chat_operator::local::dns::DnsServer::queries

use std::net::{IpAddr, SocketAddr};
use std::ops::Deref;

use chat_operator::local::dns;
pub use chat_operator::local::dns::{DnsError, RecordType, TTL};

/// A running DNS server; stops when dropped.
pub struct DnsServer(dns::DnsServer);

impl DnsServer {
    /// Serves `name` on `ip`, UDP and TCP on the same (free) port, with no records yet.
    pub async fn start(ip: IpAddr, name: &str) -> anyhow::Result<DnsServer> {
        Ok(DnsServer(dns::DnsServer::start(ip, name)?))
    }

    /// Serves `name` on this exact address (UDP and TCP).
    pub async fn start_at(addr: SocketAddr, name: &str) -> anyhow::Result<DnsServer> {
        Ok(DnsServer(dns::DnsServer::start_at(addr, name)?))
    }

    /// Serves `name` on sockets bound elsewhere (e.g. inside a network namespace, see
    /// [`crate::netns`]). Both must be bound to the same address; needs a Tokio runtime.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener, name: &str) -> anyhow::Result<DnsServer> {
        Ok(DnsServer(dns::DnsServer::from_std(udp, tcp, name)?))
    }
}

impl Deref for DnsServer {
    type Target = dns::DnsServer;

    fn deref(&self) -> &dns::DnsServer {
        &self.0
    }
}

/// What the nodes' resolver (hickory-resolver, as configured by the node) makes of the answers;
/// the answers themselves are tested with the implementation, in `chat_operator::local::dns`.
#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use std::time::Duration;

    use hickory_resolver::TokioResolver;
    use hickory_resolver::config::{NameServerConfig, ResolverConfig};
    use hickory_resolver::net::runtime::TokioRuntimeProvider;
    use hickory_resolver::proto::op::ResponseCode;
    use hickory_resolver::proto::rr::RecordType;

    use super::*;

    const NAME: &str = "chat-peers.test.svc.cluster.local";

    /// A resolver like the node's: only this server, no cache; `tcp` picks the transport.
    fn resolver(server: SocketAddr, tcp: bool) -> TokioResolver {
        let mut ns = if tcp { NameServerConfig::tcp(server.ip()) } else { NameServerConfig::udp(server.ip()) };
        for conn in &mut ns.connections {
            conn.port = server.port();
        }
        let config = ResolverConfig::from_parts(None, vec![], vec![ns]);
        let mut builder = TokioResolver::builder_with_config(config, TokioRuntimeProvider::default());
        builder.options_mut().cache_size = 0;
        builder.options_mut().attempts = 1;
        builder.options_mut().timeout = Duration::from_secs(2);
        builder.build().expect("resolver")
    }

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    async fn ips(resolver: &TokioResolver) -> Result<Vec<IpAddr>, hickory_resolver::net::NetError> {
        let mut ips: Vec<IpAddr> = resolver.lookup_ip(NAME).await?.iter().collect();
        ips.sort();
        Ok(ips)
    }

    #[tokio::test]
    async fn answers_a_records_and_follows_changes_over_udp_and_tcp() {
        let dns = DnsServer::start(v4(1), NAME).await.unwrap();
        assert_eq!(dns.name(), NAME);
        for tcp in [false, true] {
            let resolver = resolver(dns.addr(), tcp);
            dns.set_records(vec![v4(2), v4(3), v4(4)]);
            assert_eq!(ips(&resolver).await.unwrap(), vec![v4(2), v4(3), v4(4)], "tcp={tcp}");

            dns.add_record(v4(5));
            assert_eq!(ips(&resolver).await.unwrap(), vec![v4(2), v4(3), v4(4), v4(5)], "scale up, tcp={tcp}");

            dns.remove_record(v4(5));
            dns.remove_record(v4(2));
            assert_eq!(ips(&resolver).await.unwrap(), vec![v4(3), v4(4)], "scale down, tcp={tcp}");

            let lookup = resolver.lookup(NAME, RecordType::A).await.unwrap();
            assert!(lookup.answers().iter().all(|r| r.ttl == TTL), "TTL {TTL}: {lookup:?}");
        }
        assert!(dns.queries() > 0);
    }

    #[tokio::test]
    async fn aaaa_of_an_ipv4_only_name_is_nodata() {
        let dns = DnsServer::start(v4(1), NAME).await.unwrap();
        dns.set_records(vec![v4(2)]);
        let resolver = resolver(dns.addr(), false);
        let err = resolver.lookup(NAME, RecordType::AAAA).await.unwrap_err();
        assert!(err.is_no_records_found(), "{err:?}");
        assert!(!err.is_nx_domain(), "the name exists, so NODATA rather than NXDOMAIN: {err:?}");

        dns.set_records(vec![IpAddr::V6(Ipv6Addr::LOCALHOST), v4(2)]);
        let aaaa: Vec<IpAddr> = resolver.lookup_ip(NAME).await.unwrap().iter().collect();
        assert!(aaaa.contains(&IpAddr::V6(Ipv6Addr::LOCALHOST)) && aaaa.contains(&v4(2)), "{aaaa:?}");
    }

    #[tokio::test]
    async fn empty_set_and_unknown_names_are_nxdomain_and_other_zones_refused() {
        let dns = DnsServer::start(v4(1), NAME).await.unwrap();
        let resolver = resolver(dns.addr(), false);

        let err = ips(&resolver).await.unwrap_err();
        assert!(err.is_no_records_found() && err.is_nx_domain(), "no endpoints: {err:?}");

        dns.set_records(vec![v4(2)]);
        let err = resolver.lookup("other.test.svc.cluster.local.", RecordType::A).await.unwrap_err();
        assert!(err.is_nx_domain(), "{err:?}");

        let err = resolver.lookup("example.com.", RecordType::A).await.unwrap_err();
        assert!(!err.is_no_records_found(), "refused, not an answer: {err:?}");
        assert!(format!("{err:?}").contains(&format!("{:?}", ResponseCode::Refused)), "{err:?}");

        // Case does not matter, and the zone has a SOA.
        let ip: Vec<IpAddr> = resolver.lookup_ip("Chat-Peers.TEST.svc.cluster.local.").await.unwrap().iter().collect();
        assert_eq!(ip, vec![v4(2)]);
        let soa = resolver.lookup("test.svc.cluster.local.", RecordType::SOA).await.unwrap();
        assert_eq!(soa.answers().len(), 1);
    }

    #[tokio::test]
    async fn injected_servfail() {
        let dns = DnsServer::start(v4(1), NAME).await.unwrap();
        dns.set_records(vec![v4(2)]);
        let resolver = resolver(dns.addr(), false);
        dns.fail_queries(&[RecordType::A, RecordType::AAAA]);
        let err = resolver.lookup(NAME, RecordType::A).await.unwrap_err();
        assert!(!err.is_no_records_found(), "SERVFAIL is a failure, not an empty answer: {err:?}");
        dns.fail_queries(&[]);
        assert_eq!(ips(&resolver).await.unwrap(), vec![v4(2)]);
    }

    /// What the node sees when only the A question fails: hickory's default `lookup_ip`
    /// (`Ipv6AndIpv4`) reports the AAAA error, i.e. "no records", not the A failure.
    #[tokio::test]
    async fn servfail_on_a_only_surfaces_as_no_records_in_lookup_ip() {
        let dns = DnsServer::start(v4(1), NAME).await.unwrap();
        dns.set_records(vec![v4(2)]);
        let resolver = resolver(dns.addr(), false);
        dns.fail_queries(&[RecordType::A]);
        let err = resolver.lookup_ip(NAME).await.unwrap_err();
        // Pinned so a hickory upgrade that changes it is noticed (the node must not read this as
        // "the Service has no endpoints").
        assert!(err.is_no_records_found(), "{err:?}");
        assert!(format!("{err:?}").contains("AAAA"), "{err:?}");
    }
}
