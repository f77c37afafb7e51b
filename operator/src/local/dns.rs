//! The DNS server of local mode: authoritative for the headless peer Service's name
//! (`<name>-peers.<ns>.svc.cluster.local`), answering A/AAAA records with the addresses of the
//! running nodes, the way CoreDNS answers for a headless Service with
//! `publishNotReadyAddresses`. Scaling changes only these records, as in Kubernetes.
//!
//! Answers: the name with addresses → `NOERROR` with one record per address of the asked family
//! (`NOERROR` with no answers and the SOA when there is none of that family); the name without
//! addresses or another name in the zone → `NXDOMAIN` with the SOA; names outside the zone →
//! `REFUSED` (it is no recursive resolver). TTL 0 everywhere so nodes never cache a stale set.
//! Modelled on the e2e tests' DNS server (`e2e/src/dns.rs`), without its fault injection.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::Time;
use hickory_server::proto::op::{Edns, Header, HeaderCounts, MessageType, Metadata, OpCode, ResponseCode};
use hickory_server::proto::rr::rdata::{A, AAAA, SOA};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;

const TTL: u32 = 0;
/// Attempts at finding a port free for both UDP and TCP.
const PORT_ATTEMPTS: usize = 20;

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("binding the DNS server on {ip}: {source}")]
    Bind { ip: IpAddr, source: std::io::Error },
    #[error("no port on {0} is free for both UDP and TCP")]
    NoPort(IpAddr),
    #[error("{name:?} is not a usable DNS name: {message}")]
    Name { name: String, message: String },
}

struct Zone {
    name: LowerName,
    origin: LowerName,
    soa: Record,
    addrs: Mutex<Vec<IpAddr>>,
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
    zone: Arc<Zone>,
    server: Server<Handler>,
}

impl DnsServer {
    /// Serves `name` on `ip`, UDP and TCP on the same free port (the node's resolver uses both),
    /// with no records yet. Needs a Tokio runtime.
    pub fn start(ip: IpAddr, name: &str) -> Result<DnsServer, DnsError> {
        let zone = Arc::new(zone(name)?);
        let bind = |source| DnsError::Bind { ip, source };
        for _ in 0..PORT_ATTEMPTS {
            let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(bind)?;
            let addr = udp.local_addr().map_err(bind)?;
            // The UDP port may be taken for TCP by someone else: then try another one.
            let Ok(tcp) = std::net::TcpListener::bind(addr) else { continue };
            udp.set_nonblocking(true).map_err(bind)?;
            tcp.set_nonblocking(true).map_err(bind)?;
            let mut server = Server::new(Handler(zone.clone()));
            server.register_socket(tokio::net::UdpSocket::from_std(udp).map_err(bind)?);
            let tcp = tokio::net::TcpListener::from_std(tcp).map_err(bind)?;
            server.register_listener(tcp, Duration::from_secs(5), 64);
            return Ok(DnsServer { addr, zone, server });
        }
        Err(DnsError::NoPort(ip))
    }

    /// Where it listens: the nodes' `cluster.dns_server`.
    pub fn addr(&self) -> SocketAddr {
        self.addr
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
}

impl Drop for DnsServer {
    fn drop(&mut self) {
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
    Ok(Zone { name: LowerName::from(&absolute), origin: LowerName::from(&origin), soa, addrs: Mutex::new(Vec::new()) })
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use hickory_server::proto::op::{Message, Query};

    use super::*;

    const NAME: &str = "chat-peers.default.svc.cluster.local";

    /// One question over UDP: the response code and the answers' addresses.
    async fn ask(server: SocketAddr, name: &str, kind: RecordType) -> (ResponseCode, Vec<IpAddr>) {
        let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut query = Message::query();
        query.metadata.id = 7;
        query.add_query(Query::query(Name::from_ascii(name).unwrap(), kind));
        socket.send_to(&query.to_vec().unwrap(), server).await.unwrap();
        let mut buf = vec![0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(5), socket.recv(&mut buf)).await.unwrap().unwrap();
        let answer = Message::from_vec(&buf[..n]).unwrap();
        let ips = answer
            .answers
            .iter()
            .filter_map(|r| match &r.data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })
            .collect();
        (answer.metadata.response_code, ips)
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
}
