//! TCP options for every client and peer socket: no Nagle delay (chat frames are small and
//! latency matters more than packet count), and keepalive with a user timeout, so a peer that
//! vanished without a FIN (power loss, a partition) is noticed within `dead_after` instead of
//! after TCP's ~15 minutes of retransmissions, even while data waits to be acknowledged.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

pub fn tune(tcp: &TcpStream, dead_after: Duration) -> std::io::Result<()> {
    tcp.set_nodelay(true)?;
    let socket = SockRef::from(tcp);
    let idle = (dead_after / 2).max(Duration::from_secs(1));
    let probes = TcpKeepalive::new().with_time(idle).with_interval(Duration::from_secs(1)).with_retries(3);
    socket.set_tcp_keepalive(&probes)?;
    #[cfg(target_os = "linux")]
    socket.set_tcp_user_timeout(Some(dead_after))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn sockets_get_keepalive_and_a_user_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (server, _) = listener.accept().await.unwrap();
        for tcp in [&client, &server] {
            tune(tcp, Duration::from_secs(8)).unwrap();
            let socket = SockRef::from(tcp);
            assert!(tcp.nodelay().unwrap());
            assert!(socket.keepalive().unwrap());
            assert_eq!(socket.tcp_keepalive_time().unwrap(), Duration::from_secs(4));
            assert_eq!(socket.tcp_keepalive_retries().unwrap(), 3);
            #[cfg(target_os = "linux")]
            assert_eq!(socket.tcp_user_timeout().unwrap(), Some(Duration::from_secs(8)));
        }
    }
}
