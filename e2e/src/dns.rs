//! A real DNS server for tests (hickory-server), authoritative for one headless-Service name such
//! as `chat-peers.test.svc.cluster.local`, whose A/AAAA record set the test changes at run time —
//! the way Kubernetes publishes and withdraws endpoints when a StatefulSet scales.
//!
//! It answers like CoreDNS does for a headless Service:
//! * the name with addresses: `NOERROR` and one record per address of the asked family (an
//!   AAAA question with only IPv4 addresses gets `NOERROR` with no answers and the zone's SOA);
//! * the name with no addresses, or any other name inside the zone: `NXDOMAIN` with the SOA;
//! * names outside the zone: `REFUSED` (it is no recursive resolver).
//!
//! Every answer has TTL 0 so a resolver never caches a stale set. It listens on UDP and TCP on
//! the same address and port (loopback in the single-host tests; a test bridge in the
//! network-namespace tests) and stops when dropped.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
pub use hickory_server::proto::rr::RecordType;
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

/// TTL of every record served (A, AAAA and the SOA used for negative answers).
pub const TTL: u32 = 0;

/// The record set and counters shared by the handler and the test.
struct Zone {
    /// The headless-Service name (absolute).
    name: LowerName,
    /// The zone the server is authoritative for: the name's parent.
    origin: LowerName,
    soa: Record,
    addrs: Mutex<Vec<IpAddr>>,
    /// Question types answered with SERVFAIL (fault injection).
    failing: Mutex<Vec<RecordType>>,
    queries: AtomicU64,
}

impl Zone {
    fn addrs(&self) -> Vec<IpAddr> {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct Handler(Arc<Zone>);

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(&self, request: &Request, mut response: R) -> ResponseInfo {
        let zone = &self.0;
        zone.queries.fetch_add(1, Ordering::Relaxed);
        let mut metadata = Metadata::response_from_request(&request.metadata);
        let response_edns = request.edns.as_ref().map(|edns| {
            let mut ours = Edns::new();
            ours.set_max_payload(edns.max_payload().max(512));
            ours
        });
        let mut builder = MessageResponseBuilder::from_message_request(request);
        if let Some(edns) = &response_edns {
            builder.edns(edns);
        }

        let query = match request.request_info() {
            Ok(info) if request.metadata.message_type == MessageType::Query => info.query,
            _ => {
                metadata.response_code = ResponseCode::FormErr;
                return send(&mut response, builder.build_no_records(metadata), metadata).await;
            }
        };
        if request.metadata.op_code != OpCode::Query {
            metadata.response_code = ResponseCode::NotImp;
            return send(&mut response, builder.build_no_records(metadata), metadata).await;
        }
        if !zone.origin.zone_of(query.name()) {
            metadata.response_code = ResponseCode::Refused;
            return send(&mut response, builder.build_no_records(metadata), metadata).await;
        }
        let failing = zone.failing.lock().unwrap_or_else(|p| p.into_inner()).contains(&query.query_type());
        if failing {
            metadata.response_code = ResponseCode::ServFail;
            return send(&mut response, builder.build_no_records(metadata), metadata).await;
        }
        metadata.authoritative = true;

        let name = Name::from(zone.name.clone());
        let qtype = query.query_type();
        let mut answers: Vec<Record> = Vec::new();
        let mut negative = false;
        if *query.name() == zone.name {
            let addrs = zone.addrs();
            if addrs.is_empty() {
                // A headless Service without endpoints: CoreDNS answers NXDOMAIN.
                metadata.response_code = ResponseCode::NXDomain;
                negative = true;
            } else {
                for ip in addrs {
                    let rdata = match (ip, qtype) {
                        (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(v4)),
                        (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(v6)),
                        _ => continue,
                    };
                    answers.push(Record::from_rdata(name.clone(), TTL, rdata));
                }
                // NODATA: the name exists, but has nothing of this type.
                negative = answers.is_empty();
            }
        } else if *query.name() == zone.origin {
            if matches!(qtype, RecordType::SOA | RecordType::ANY) {
                answers.push(zone.soa.clone());
            } else {
                negative = true;
            }
        } else {
            metadata.response_code = ResponseCode::NXDomain;
            negative = true;
        }
        let soa: &[Record] = if negative { std::slice::from_ref(&zone.soa) } else { &[] };
        let message = builder.build(metadata, answers.iter(), [], soa.iter(), []);
        send(&mut response, message, metadata).await
    }
}

async fn send<'a, R: ResponseHandler>(
    response: &mut R,
    message: hickory_server::zone_handler::MessageResponse<
        '_,
        'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
        impl Iterator<Item = &'a Record> + Send + 'a,
    >,
    metadata: Metadata,
) -> ResponseInfo {
    match response.send_response(message).await {
        Ok(info) => info,
        Err(_) => {
            let mut failed = metadata;
            failed.response_code = ResponseCode::ServFail;
            ResponseInfo::from(Header { metadata: failed, counts: HeaderCounts::default() })
        }
    }
}

/// A running DNS server; stops when dropped.
pub struct DnsServer {
    addr: SocketAddr,
    name: String,
    zone: Arc<Zone>,
    server: Server<Handler>,
}

impl DnsServer {
    /// Serves `name` on `ip`, UDP and TCP on the same (free) port, with no records yet.
    pub async fn start(ip: IpAddr, name: &str) -> anyhow::Result<DnsServer> {
        // Take a free UDP port, then the same TCP port; retry if TCP happens to be taken.
        for _ in 0..20 {
            let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).context("bind the DNS UDP socket")?;
            let port = udp.local_addr()?.port();
            if let Ok(tcp) = std::net::TcpListener::bind(SocketAddr::new(ip, port)) {
                return DnsServer::from_std(udp, tcp, name);
            }
        }
        bail!("no port free for both UDP and TCP on {ip}")
    }

    /// Serves `name` on this exact address (UDP and TCP).
    pub async fn start_at(addr: SocketAddr, name: &str) -> anyhow::Result<DnsServer> {
        let udp = std::net::UdpSocket::bind(addr).with_context(|| format!("bind DNS UDP {addr}"))?;
        let tcp = std::net::TcpListener::bind(addr).with_context(|| format!("bind DNS TCP {addr}"))?;
        DnsServer::from_std(udp, tcp, name)
    }

    /// Serves `name` on sockets bound elsewhere (e.g. inside a network namespace, see
    /// [`crate::netns`]). Both must be bound to the same address; needs a Tokio runtime.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener, name: &str) -> anyhow::Result<DnsServer> {
        let addr = udp.local_addr()?;
        anyhow::ensure!(tcp.local_addr()? == addr, "UDP {addr} and TCP {} differ", tcp.local_addr()?);
        let absolute =
            Name::from_ascii(name).with_context(|| format!("DNS name {name:?}"))?.append_domain(&Name::root())?;
        anyhow::ensure!(absolute.num_labels() >= 2, "{name:?} needs a parent zone");
        let origin = absolute.base_name();
        let soa = Record::from_rdata(
            origin.clone(),
            TTL,
            RData::SOA(SOA::new(
                Name::from_ascii("ns")?.append_domain(&origin)?,
                Name::from_ascii("hostmaster")?.append_domain(&origin)?,
                1,
                30,
                30,
                3600,
                TTL,
            )),
        );
        let zone = Arc::new(Zone {
            name: LowerName::from(&absolute),
            origin: LowerName::from(&origin),
            soa,
            addrs: Mutex::new(Vec::new()),
            failing: Mutex::new(Vec::new()),
            queries: AtomicU64::new(0),
        });
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let mut server = Server::new(Handler(zone.clone()));
        server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
        server.register_listener(tokio::net::TcpListener::from_std(tcp)?, Duration::from_secs(5), 64);
        Ok(DnsServer { addr, name: name.trim_end_matches('.').to_owned(), zone, server })
    }

    /// Where it listens (UDP and TCP): the value of `cluster.dns_server`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name it serves, without the trailing dot: the value of `cluster.dns_name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Replaces the record set (IPv4 addresses become A records, IPv6 ones AAAA).
    pub fn set_records(&self, addrs: Vec<IpAddr>) {
        *self.zone.addrs.lock().unwrap_or_else(|p| p.into_inner()) = addrs;
    }

    pub fn add_record(&self, addr: IpAddr) {
        let mut addrs = self.zone.addrs.lock().unwrap_or_else(|p| p.into_inner());
        if !addrs.contains(&addr) {
            addrs.push(addr);
        }
    }

    pub fn remove_record(&self, addr: IpAddr) {
        self.zone.addrs.lock().unwrap_or_else(|p| p.into_inner()).retain(|a| *a != addr);
    }

    pub fn records(&self) -> Vec<IpAddr> {
        self.zone.addrs()
    }

    /// Answers questions of these types with SERVFAIL from now on (empty: serve normally), the
    /// way a DNS server that cannot reach its backend does.
    pub fn fail_queries(&self, types: &[RecordType]) {
        *self.zone.failing.lock().unwrap_or_else(|p| p.into_inner()) = types.to_vec();
    }

    /// Questions answered so far (any name, any type, both transports).
    pub fn queries(&self) -> u64 {
        self.zone.queries.load(Ordering::Relaxed)
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // Ends the listener tasks; dropping `server` aborts whatever is left.
        self.server.shutdown_token().cancel();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

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

    #[tokio::test]
    async fn stops_when_dropped() {
        let dns = DnsServer::start(v4(1), NAME).await.unwrap();
        let addr = dns.addr();
        drop(dns);
        // The TCP port is released (the listener task ended).
        let mut freed = false;
        for _ in 0..100 {
            if std::net::TcpListener::bind(addr).is_ok() {
                freed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(freed, "{addr} still bound after drop");
    }
}
