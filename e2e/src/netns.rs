//! Test hosts in Linux network namespaces, so a test can cut one host off the network and heal it.
//!
//! A [`TestNet`] is a "switch" namespace holding a bridge (`br0`, 10.203.0.1/24) plus one
//! namespace per host, each joined to the bridge by a veth pair (`eth0` 10.203.0.11, .12, … in
//! the host; `h0`, `h1`, … on the bridge). Everything lives in namespaces this module creates:
//! the root namespace gets no interface, address or route, so parallel tests (even with the same
//! subnet) never collide, and no traffic leaves the test hosts. [`TestNet::partition`] sets the
//! host's bridge port down (the host's `eth0` loses carrier), [`TestNet::heal`] sets it up again.
//! Dropping the `TestNet` deletes every namespace (and with them the veths and the bridge), also
//! when the test panics.
//!
//! The test process itself stays in the root namespace; it reaches into a namespace by creating
//! sockets from a short-lived thread that has joined it (`setns`): a socket keeps the namespace
//! it was created in. That is how the DNS server listens on the bridge address
//! ([`TestNet::start_dns`]) and how the test talks to a node that is partitioned away
//! ([`http_get_in`]).
//!
//! Needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) and iproute2's `ip` (Debian package `iproute2`,
//! `/usr/sbin/ip`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};

use crate::dns::DnsServer;

/// Every namespace this module creates starts with this.
const PREFIX: &str = "ccnet";
/// The bridge's address in the switch namespace: where the DNS server listens.
pub const BRIDGE_IP: Ipv4Addr = Ipv4Addr::new(10, 203, 0, 1);
const PREFIX_LEN: u8 = 24;

static NEXT_NET: AtomicUsize = AtomicUsize::new(0);

/// The `ip` binary (iproute2).
pub fn ip_binary() -> anyhow::Result<PathBuf> {
    for candidate in ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"] {
        let path = PathBuf::from(candidate);
        if path.exists() {
            return Ok(path);
        }
    }
    bail!("iproute2's `ip` is not installed (Debian/Ubuntu: apt-get install iproute2)")
}

/// Fails with a clear message unless network namespaces can be made here.
pub fn check_support() -> anyhow::Result<()> {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        bail!(
            "network-namespace tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN); running as uid {euid}. \
             Run them as root (CI does), e.g. `sudo -E cargo test -p chat-e2e --test cluster_membership`"
        );
    }
    ip_binary()?;
    Ok(())
}

/// Runs `ip ARGS…`; its stderr becomes the error.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(ip_binary()?).args(args).output().context("run ip")?;
    if !out.status.success() {
        bail!("`ip {}` failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Runs `f` on a fresh thread that has joined network namespace `ns` (which must exist under
/// /run/netns). Sockets `f` creates belong to `ns` for good, whichever thread uses them later.
pub fn in_netns<T, F>(ns: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let path = format!("/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path)?;
        // SAFETY: setns on a valid namespace fd; only this short-lived thread changes namespace.
        let rc = unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        f()
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?
}

/// Like [`in_netns`], without blocking the async runtime while `f` runs.
pub async fn in_netns_async<T, F>(ns: &str, f: F) -> io::Result<T>
where
    T: Send + 'static,
    F: FnOnce() -> io::Result<T> + Send + 'static,
{
    let ns = ns.to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::spawn(move || {
        let _ = tx.send(in_netns(&ns, f));
    });
    rx.await.map_err(|_| io::Error::other("netns thread vanished"))?
}

/// A TCP connection made from inside namespace `ns`.
pub async fn connect_in(ns: &str, addr: SocketAddr, timeout: Duration) -> io::Result<tokio::net::TcpStream> {
    let stream = in_netns_async(ns, move || std::net::TcpStream::connect_timeout(&addr, timeout)).await?;
    stream.set_nonblocking(true)?;
    tokio::net::TcpStream::from_std(stream)
}

/// A bare HTTP/1.1 GET from inside namespace `ns`: status and body.
pub async fn http_get_in(ns: &str, addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let stream =
        connect_in(ns, addr, Duration::from_secs(2)).await.with_context(|| format!("connect {addr} in {ns}"))?;
    crate::client::http_get_on(stream, addr, path).await
}

/// Deletes namespaces left by test processes that died without cleaning up (SIGKILL).
fn remove_stale() {
    let Ok(entries) = std::fs::read_dir("/run/netns") else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix(&format!("{PREFIX}-")) else { continue };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else { continue };
        if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
            let _ = ip(&["netns", "del", &name]);
        }
    }
}

/// One host of a [`TestNet`].
#[derive(Debug, Clone)]
pub struct Host {
    /// Its network namespace (for `ip netns exec`).
    pub ns: String,
    /// Its address on the test bridge.
    pub ip: Ipv4Addr,
    /// Its port on the bridge, in the switch namespace.
    port: String,
}

impl Host {
    pub fn ip_addr(&self) -> IpAddr {
        IpAddr::V4(self.ip)
    }
}

/// A bridge with hosts in network namespaces; everything is deleted on drop.
pub struct TestNet {
    switch: String,
    hosts: Vec<Host>,
}

impl TestNet {
    /// A switch namespace with a bridge and `hosts` host namespaces attached to it.
    pub fn new(hosts: usize) -> anyhow::Result<TestNet> {
        check_support()?;
        assert!(hosts < 200, "one /24 holds the hosts");
        remove_stale();
        let id = format!("{PREFIX}-{}-{}", std::process::id(), NEXT_NET.fetch_add(1, Ordering::Relaxed));
        let mut net = TestNet { switch: format!("{id}-sw"), hosts: Vec::new() };
        // From here on, Drop cleans up whatever was made, also when a step fails.
        ip(&["netns", "add", &net.switch])?;
        let sw = net.switch.clone();
        ip(&["-n", &sw, "link", "set", "lo", "up"])?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "addr", "add", &format!("{BRIDGE_IP}/{PREFIX_LEN}"), "dev", "br0"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..hosts {
            let host =
                Host { ns: format!("{id}-h{i}"), ip: Ipv4Addr::new(10, 203, 0, 11 + i as u8), port: format!("h{i}") };
            ip(&["netns", "add", &host.ns])?;
            net.hosts.push(host.clone());
            ip(&["-n", &sw, "link", "add", &host.port, "type", "veth", "peer", "name", "eth0", "netns", &host.ns])?;
            ip(&["-n", &sw, "link", "set", &host.port, "master", "br0"])?;
            ip(&["-n", &sw, "link", "set", &host.port, "up"])?;
            ip(&["-n", &host.ns, "link", "set", "lo", "up"])?;
            ip(&["-n", &host.ns, "addr", "add", &format!("{}/{PREFIX_LEN}", host.ip), "dev", "eth0"])?;
            ip(&["-n", &host.ns, "link", "set", "eth0", "up"])?;
        }
        Ok(net)
    }

    pub fn hosts(&self) -> &[Host] {
        &self.hosts
    }

    pub fn host(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    /// The namespace holding the bridge (and the DNS server).
    pub fn switch_ns(&self) -> &str {
        &self.switch
    }

    /// A DNS server for `name` on the bridge address, port 53, reachable from every host that is
    /// not partitioned away.
    pub async fn start_dns(&self, name: &str) -> anyhow::Result<DnsServer> {
        let addr = SocketAddr::new(IpAddr::V4(BRIDGE_IP), 53);
        let (udp, tcp) = in_netns_async(&self.switch, move || {
            Ok((std::net::UdpSocket::bind(addr)?, std::net::TcpListener::bind(addr)?))
        })
        .await
        .with_context(|| format!("bind DNS {addr} in {}", self.switch))?;
        DnsServer::from_std(udp, tcp, name)
    }

    /// Cuts host `i` off: its bridge port goes down, so its `eth0` loses carrier.
    pub fn partition(&self, i: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &self.hosts[i].port, "down"])
    }

    /// Reconnects host `i`.
    pub fn heal(&self, i: usize) -> anyhow::Result<()> {
        ip(&["-n", &self.switch, "link", "set", &self.hosts[i].port, "up"])
    }
}

impl Drop for TestNet {
    fn drop(&mut self) {
        // Deleting a namespace destroys its interfaces; a veth goes with its peer.
        for host in &self.hosts {
            if let Err(err) = ip(&["netns", "del", &host.ns]) {
                eprintln!("cleanup: {err:#}");
            }
        }
        if let Err(err) = ip(&["netns", "del", &self.switch]) {
            eprintln!("cleanup: {err:#}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn namespaces() -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|d| d.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect())
            .unwrap_or_default()
    }

    #[tokio::test]
    async fn hosts_reach_each_other_until_partitioned_and_everything_is_removed() {
        let net = TestNet::new(2).expect("test network (needs root)");
        let names: Vec<String> = net.hosts().iter().map(|h| h.ns.clone()).chain([net.switch_ns().to_owned()]).collect();
        assert!(names.iter().all(|n| namespaces().contains(n)), "{names:?} exist");

        // A listener in host 1; host 0 connects to it across the bridge.
        let target = SocketAddr::new(net.host(1).ip_addr(), 7000);
        let listener = in_netns(&net.host(1).ns, move || std::net::TcpListener::bind(target)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let listener = tokio::net::TcpListener::from_std(listener).unwrap();
        let (accepted_tx, mut accepted) = tokio::sync::mpsc::unbounded_channel();
        let acceptor = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let _ = accepted_tx.send(stream);
            }
        });
        connect_in(&net.host(0).ns, target, Duration::from_secs(2)).await.expect("bridged");
        accepted.recv().await.expect("accepted in host 1");

        net.partition(1).unwrap();
        assert!(connect_in(&net.host(0).ns, target, Duration::from_millis(500)).await.is_err(), "cut off");
        net.heal(1).unwrap();
        let mut healed = false;
        for _ in 0..50 {
            if connect_in(&net.host(0).ns, target, Duration::from_millis(500)).await.is_ok() {
                healed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(healed, "reachable again after heal");
        acceptor.abort();

        drop(net);
        let left = namespaces();
        assert!(names.iter().all(|n| !left.contains(n)), "{names:?} removed, left {left:?}");
    }

    #[tokio::test]
    async fn dns_on_the_bridge_answers_hosts() {
        let net = TestNet::new(1).expect("test network (needs root)");
        let dns = net.start_dns("peers.test.local").await.unwrap();
        dns.set_records(vec![net.host(0).ip_addr()]);
        // A raw UDP query from inside the host (no resolver crate needed: check the answer count).
        let query: Vec<u8> = {
            let mut q = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
            for label in ["peers", "test", "local"] {
                q.push(label.len() as u8);
                q.extend_from_slice(label.as_bytes());
            }
            q.extend_from_slice(&[0, 0, 1, 0, 1]);
            q
        };
        let server = dns.addr();
        let answer = in_netns_async(&net.host(0).ns, move || {
            let sock = std::net::UdpSocket::bind("0.0.0.0:0")?;
            sock.set_read_timeout(Some(Duration::from_secs(2)))?;
            sock.send_to(&query, server)?;
            let mut buf = [0u8; 512];
            let (n, _) = sock.recv_from(&mut buf)?;
            Ok(buf[..n].to_vec())
        })
        .await
        .expect("DNS answer from the bridge");
        assert_eq!(&answer[..2], &[0x12, 0x34]);
        assert_eq!(answer[3] & 0x0f, 0, "NOERROR");
        assert_eq!(u16::from_be_bytes([answer[6], answer[7]]), 1, "one A record");
        assert!(answer.ends_with(&net.host(0).ip.octets()));
    }
}
