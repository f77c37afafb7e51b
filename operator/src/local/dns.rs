//! The DNS server of local mode, also the end-to-end tests' DNS server (`chat_e2e::dns`):
//! authoritative for one headless-Service name (`<name>-peers.<ns>.svc.cluster.local`),
//! answering A/AAAA records with the addresses of the running nodes, the way CoreDNS answers for
//! a headless Service with `publishNotReadyAddresses`. Scaling changes only these records, as in
//! Kubernetes.
//!
//! Answers: the name with addresses → `NOERROR` with one record per address of the asked family
//! (`NOERROR` with no answers and the SOA when there is none of that family); the name without
//! addresses or another name in the zone → `NXDOMAIN` with the SOA; names outside the zone →
//! `REFUSED` (it is no recursive resolver). TTL 0 everywhere so nodes never cache a stale set.
//!
//! It listens on UDP and TCP on the same address and port and stops when dropped. For tests it
//! counts the questions it gets ([`DnsServer::queries`]) and can simulate a DNS outage
//! ([`DnsServer::fail_queries`]); local mode uses neither.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

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
/// Attempts at finding a port free for both UDP and TCP.
const PORT_ATTEMPTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding the DNS server on {ip}: {source}")]
    Bind { ip: IpAddr, source: std::io::Error },
    #[error("binding the DNS server on {addr}: {source}")]
    BindAddr { addr: SocketAddr, source: std::io::Error },
    #[error("no port on {0} is free for both UDP and TCP")]
    NoPort(IpAddr),
    #[error("{name:?} is not a usable DNS name: {message}")]
    Name { name: String, message: String },
    #[error("the DNS server's sockets: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the DNS server's UDP socket ({udp}) and TCP listener ({tcp}) are bound to different addresses")]
    AddrMismatch { udp: SocketAddr, tcp: SocketAddr },
}

/// The record set and counters shared by the handler and the [`DnsServer`].
struct Zone {
    /// The headless-Service name (absolute).
    name: LowerName,
    /// The zone the server is authoritative for: the name's parent.
    origin: LowerName,
    soa: Record,
    addrs: Mutex<Vec<IpAddr>>,
    /// Question types answered with SERVFAIL (see [`DnsServer::fail_queries`]).
    failing: Mutex<Vec<RecordType>>,
    queries: AtomicU64,
}

impl Zone {
    fn addrs(&self) -> Vec<IpAddr> {
        self.addrs.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn failing(&self, qtype: RecordType) -> bool {
        self.failing.lock().unwrap_or_else(|p| p.into_inner()).contains(&qtype)
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
        if zone.failing(query.query_type()) {
            metadata.response_code = ResponseCode::ServFail;
            return send(&mut response, builder.build_no_records(metadata), metadata).await;
        }
        metadata.authoritative = true;
        let name = Name::from(zone.name.clone());
        let qtype = query.query_type();
        let mut answers: Vec<Record> = Vec::new();
        let negative = if *query.name() == zone.name {
            let addrs = zone.addrs();
            if addrs.is_empty() {
                // A headless Service without endpoints: CoreDNS answers NXDOMAIN.
                metadata.response_code = ResponseCode::NXDomain;
            }
            for ip in addrs {
                let rdata = match (ip, qtype) {
                    (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => RData::A(A(v4)),
                    (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => RData::AAAA(AAAA(v6)),
                    _ => continue,
                };
                answers.push(Record::from_rdata(name.clone(), TTL, rdata));
            }
            answers.is_empty()
        } else if *query.name() == zone.origin && matches!(qtype, RecordType::SOA | RecordType::ANY) {
            answers.push(zone.soa.clone());
            false
        } else {
            if *query.name() != zone.origin {
                metadata.response_code = ResponseCode::NXDomain;
            }
            true
        };
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
    /// Serves `name` on `ip`, UDP and TCP on the same free port (the node's resolver uses both),
    /// with no records yet. Needs a Tokio runtime.
    pub fn start(ip: IpAddr, name: &str) -> Result<DnsServer, DnsError> {
        let zone = zone(name)?;
        let bind = |source| DnsError::Bind { ip, source };
        for _ in 0..PORT_ATTEMPTS {
            let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(bind)?;
            let addr = udp.local_addr().map_err(bind)?;
            // The UDP port may be taken for TCP by someone else: then try another one.
            let Ok(tcp) = std::net::TcpListener::bind(addr) else { continue };
            return DnsServer::serve(addr, name, zone, udp, tcp).map_err(bind);
        }
        Err(DnsError::NoPort(ip))
    }

    /// Serves `name` on this exact address (UDP and TCP), with no records yet. Needs a Tokio
    /// runtime.
    pub fn start_at(addr: SocketAddr, name: &str) -> Result<DnsServer, DnsError> {
        let bind = |source| DnsError::BindAddr { addr, source };
        let udp = std::net::UdpSocket::bind(addr).map_err(bind)?;
        let tcp = std::net::TcpListener::bind(addr).map_err(bind)?;
        DnsServer::from_std(udp, tcp, name)
    }

    /// Serves `name` on sockets bound elsewhere (e.g. inside a network namespace), with no
    /// records yet. Both must be bound to the same address; needs a Tokio runtime.
    pub fn from_std(udp: std::net::UdpSocket, tcp: std::net::TcpListener, name: &str) -> Result<DnsServer, DnsError> {
        let addr = udp.local_addr().map_err(DnsError::Socket)?;
        let tcp_addr = tcp.local_addr().map_err(DnsError::Socket)?;
        if tcp_addr != addr {
            return Err(DnsError::AddrMismatch { udp: addr, tcp: tcp_addr });
        }
        DnsServer::serve(addr, name, zone(name)?, udp, tcp).map_err(DnsError::Socket)
    }

    fn serve(
        addr: SocketAddr,
        name: &str,
        zone: Zone,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> std::io::Result<DnsServer> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let zone = Arc::new(zone);
        let mut server = Server::new(Handler(zone.clone()));
        server.register_socket(tokio::net::UdpSocket::from_std(udp)?);
        server.register_listener(tokio::net::TcpListener::from_std(tcp)?, Duration::from_secs(5), 64);
        Ok(DnsServer { addr, name: name.trim_end_matches('.').to_owned(), zone, server })
    }

    /// Where it listens (UDP and TCP): the nodes' `cluster.dns_server`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name it serves, without the trailing dot: the nodes' `cluster.dns_name`.
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

    /// Simulates a DNS outage: questions of these types (inside the zone) are answered with
    /// SERVFAIL from now on, the way a DNS server that cannot reach its backend answers. Empty:
    /// serve normally again.
    pub fn fail_queries(&self, types: &[RecordType]) {
        *self.zone.failing.lock().unwrap_or_else(|p| p.into_inner()) = types.to_vec();
    }

    /// Questions received so far (any name, any type, both transports).
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

fn zone(name: &str) -> Result<Zone, DnsError> {
    let bad = |message: String| DnsError::Name { name: name.to_owned(), message };
    let absolute =
        Name::from_ascii(name).and_then(|n| n.append_domain(&Name::root())).map_err(|e| bad(e.to_string()))?;
    if absolute.num_labels() < 2 {
        return Err(bad("it needs a parent zone".to_owned()));
    }
    let origin = absolute.base_name();
    let label = |l: &str| Name::from_ascii(l).and_then(|n| n.append_domain(&origin)).map_err(|e| bad(e.to_string()));
    let soa = Record::from_rdata(
        origin.clone(),
        TTL,
        RData::SOA(SOA::new(label("ns")?, label("hostmaster")?, 1, 30, 30, 3600, TTL)),
    );
    Ok(Zone {
        name: LowerName::from(&absolute),
        origin: LowerName::from(&origin),
        soa,
        addrs: Mutex::new(Vec::new()),
        failing: Mutex::new(Vec::new()),
        queries: AtomicU64::new(0),
    })
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, Ipv6Addr};

    use hickory_server::proto::op::{Message, Query};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;

    const NAME: &str = "chat-peers.default.svc.cluster.local";

    fn v4(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, last))
    }

    /// One question, over TCP or UDP: the whole response.
    async fn exchange(server: SocketAddr, name: &str, kind: RecordType, tcp: bool) -> Message {
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        let query = query.to_vec().unwrap();
        let response = async {
            if tcp {
                // RFC 1035 4.2.2: each message is preceded by its length.
                let mut stream = tokio::net::TcpStream::connect(server).await.unwrap();
                stream.write_all(&u16::try_from(query.len()).unwrap().to_be_bytes()).await.unwrap();
                stream.write_all(&query).await.unwrap();
                let mut buf = vec![0u8; usize::from(stream.read_u16().await.unwrap())];
                stream.read_exact(&mut buf).await.unwrap();
                buf
            } else {
                let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
                socket.send_to(&query, server).await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = socket.recv(&mut buf).await.unwrap();
                buf.truncate(n);
                buf
            }
        };
        let response = tokio::time::timeout(Duration::from_secs(5), response).await.unwrap();
        Message::from_vec(&response).unwrap()
    }

    fn addresses(answer: &Message) -> Vec<IpAddr> {
        answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect()
    }

    /// One question over UDP: the response code and the answers' addresses.
    async fn ask(server: SocketAddr, name: &str, kind: RecordType) -> (ResponseCode, Vec<IpAddr>) {
        let answer = exchange(server, name, kind, false).await;
        (answer.metadata.response_code, addresses(&answer))
    }

    /// Whether a negative answer carries the zone's SOA (for the resolver's negative caching).
    fn has_soa(answer: &Message) -> bool {
        answer.authorities.len() == 1 && matches!(answer.authorities[0].data, RData::SOA(_))
    }

    #[tokio::test]
    async fn answers_the_running_nodes_like_a_headless_service() {
        let dns = DnsServer::start(IpAddr::V4(Ipv4Addr::LOCALHOST), NAME).unwrap();
        let ip = |last| IpAddr::V4(Ipv4Addr::new(127, 0, 0, last));
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await.0, ResponseCode::NXDomain, "no endpoints yet");

        dns.add_record(ip(10));
        dns.add_record(ip(11));
        dns.add_record(ip(11));
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await, (ResponseCode::NoError, vec![ip(10), ip(11)]));
        assert_eq!(ask(dns.addr(), NAME, RecordType::AAAA).await, (ResponseCode::NoError, vec![]), "NODATA");

        dns.remove_record(ip(10));
        assert_eq!(dns.records(), vec![ip(11)]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await.1, vec![ip(11)]);

        let other = "other.default.svc.cluster.local";
        assert_eq!(ask(dns.addr(), other, RecordType::A).await.0, ResponseCode::NXDomain);
        assert_eq!(ask(dns.addr(), "example.com", RecordType::A).await.0, ResponseCode::Refused);
    }

    #[tokio::test]
    async fn follows_the_record_set_over_udp_and_tcp_with_ttl_0() {
        let dns = DnsServer::start(v4(1), &format!("{NAME}.")).unwrap();
        assert_eq!(dns.name(), NAME, "without the trailing dot");
        assert_eq!(dns.addr().ip(), v4(1));
        for tcp in [false, true] {
            let a = || exchange(dns.addr(), NAME, RecordType::A, tcp);
            dns.set_records(vec![v4(2), v4(3), v4(4)]);
            assert_eq!(addresses(&a().await), vec![v4(2), v4(3), v4(4)], "tcp={tcp}");

            dns.add_record(v4(5));
            assert_eq!(addresses(&a().await), vec![v4(2), v4(3), v4(4), v4(5)], "scale up, tcp={tcp}");

            dns.remove_record(v4(5));
            dns.remove_record(v4(2));
            let answer = a().await;
            assert_eq!(addresses(&answer), vec![v4(3), v4(4)], "scale down, tcp={tcp}");
            assert!(answer.metadata.authoritative, "tcp={tcp}");
            assert!(answer.answers.iter().all(|r| r.ttl == TTL), "TTL {TTL}: {answer:?}");
        }
        assert_eq!(dns.queries(), 6, "three questions over each transport");
    }

    #[tokio::test]
    async fn negative_answers_carry_the_soa() {
        let dns = DnsServer::start(v4(1), NAME).unwrap();
        let empty = exchange(dns.addr(), NAME, RecordType::A, false).await;
        assert_eq!(empty.metadata.response_code, ResponseCode::NXDomain, "no endpoints");
        assert!(has_soa(&empty), "{empty:?}");

        dns.set_records(vec![v4(2)]);
        let nodata = exchange(dns.addr(), NAME, RecordType::AAAA, false).await;
        assert_eq!((nodata.metadata.response_code, addresses(&nodata)), (ResponseCode::NoError, vec![]));
        assert!(has_soa(&nodata), "the name exists, so NODATA rather than NXDOMAIN: {nodata:?}");

        dns.set_records(vec![IpAddr::V6(Ipv6Addr::LOCALHOST), v4(2)]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::AAAA).await.1, vec![IpAddr::V6(Ipv6Addr::LOCALHOST)]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await.1, vec![v4(2)]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::ANY).await.1, vec![IpAddr::V6(Ipv6Addr::LOCALHOST), v4(2)]);

        let other = exchange(dns.addr(), "other.default.svc.cluster.local.", RecordType::A, false).await;
        assert_eq!(other.metadata.response_code, ResponseCode::NXDomain);
        assert!(has_soa(&other), "{other:?}");

        // Case does not matter, and the zone has a SOA.
        assert_eq!(ask(dns.addr(), "Chat-Peers.DEFAULT.svc.cluster.local.", RecordType::A).await.1, vec![v4(2)]);
        let soa = exchange(dns.addr(), "default.svc.cluster.local.", RecordType::SOA, false).await;
        assert_eq!(soa.metadata.response_code, ResponseCode::NoError);
        assert!(soa.answers.len() == 1 && matches!(soa.answers[0].data, RData::SOA(_)), "{soa:?}");
        let origin = exchange(dns.addr(), "default.svc.cluster.local.", RecordType::A, false).await;
        assert_eq!((origin.metadata.response_code, origin.answers.len()), (ResponseCode::NoError, 0));
        assert!(has_soa(&origin), "{origin:?}");
    }

    #[tokio::test]
    async fn fail_queries_simulates_an_outage_and_queries_counts_the_questions() {
        let dns = DnsServer::start(v4(1), NAME).unwrap();
        dns.set_records(vec![v4(2)]);
        assert_eq!(dns.queries(), 0);

        dns.fail_queries(&[RecordType::A, RecordType::AAAA]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await, (ResponseCode::ServFail, vec![]));
        assert_eq!(ask(dns.addr(), NAME, RecordType::AAAA).await.0, ResponseCode::ServFail);
        let tcp = exchange(dns.addr(), NAME, RecordType::A, true).await;
        assert_eq!(tcp.metadata.response_code, ResponseCode::ServFail);
        assert_eq!(ask(dns.addr(), "example.com", RecordType::A).await.0, ResponseCode::Refused, "outside the zone");

        dns.fail_queries(&[RecordType::A]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await.0, ResponseCode::ServFail);
        assert_eq!(ask(dns.addr(), NAME, RecordType::AAAA).await, (ResponseCode::NoError, vec![]), "only A fails");

        dns.fail_queries(&[]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await, (ResponseCode::NoError, vec![v4(2)]));
        assert_eq!(dns.queries(), 7, "every question, answered or not");
    }

    #[tokio::test]
    async fn serves_given_sockets_or_an_exact_address() {
        // Both transports on one port, bound by the caller (as inside a network namespace).
        let (udp, tcp) = loop {
            let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            if let Ok(tcp) = std::net::TcpListener::bind(udp.local_addr().unwrap()) {
                break (udp, tcp);
            }
        };
        let dns = DnsServer::from_std(udp, tcp, NAME).unwrap();
        dns.set_records(vec![v4(2)]);
        assert_eq!(addresses(&exchange(dns.addr(), NAME, RecordType::A, true).await), vec![v4(2)]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await.1, vec![v4(2)]);

        let taken = DnsServer::start_at(dns.addr(), NAME).err().unwrap();
        assert!(matches!(taken, DnsError::BindAddr { addr, .. } if addr == dns.addr()), "{taken}");
        drop(dns);

        let udp = std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let tcp = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        if udp.local_addr().unwrap() != tcp.local_addr().unwrap() {
            let err = DnsServer::from_std(udp, tcp, NAME).err().unwrap();
            assert!(matches!(err, DnsError::AddrMismatch { .. }), "{err}");
        }

        // start_at: a port that was just free (retried in the unlikely case it was taken meanwhile).
        let dns = (0..PORT_ATTEMPTS)
            .find_map(|_| {
                let free = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap().local_addr().unwrap();
                DnsServer::start_at(free, NAME).ok()
            })
            .expect("a free port");
        dns.set_records(vec![v4(3)]);
        assert_eq!(ask(dns.addr(), NAME, RecordType::A).await.1, vec![v4(3)]);
    }

    #[tokio::test]
    async fn rejects_unusable_names() {
        for name in ["local", "bad..name", ""] {
            let err = DnsServer::start(v4(1), name).err().unwrap();
            assert!(matches!(&err, DnsError::Name { name: n, .. } if n == name), "{name:?}: {err}");
        }
    }

    #[tokio::test]
    async fn stops_when_dropped() {
        let dns = DnsServer::start(v4(1), NAME).unwrap();
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
