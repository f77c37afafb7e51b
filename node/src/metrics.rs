//! Prometheus metrics of one node, exposed as text at `/metrics`. Counters are plain atomics,
//! cheap enough for the broadcast path; label sets are small and fixed.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

type Reason = [(&'static str, &'static str); 1];

pub struct Metrics {
    registry: Registry,
    pub connections: Gauge,
    pub connections_accepted: Counter,
    pub rooms: Gauge,
    pub frames_in: Counter,
    pub frames_out: Counter,
    pub publishes: Counter,
    pub slow_consumer_disconnects: Counter,
    pub dropped_frames: Counter,
    pub rate_limited: Counter,
    pub auth_failures: Family<Reason, Counter>,
    pub handshake_rejections: Family<Reason, Counter>,
    pub disconnects: Family<[(&'static str, String); 1], Counter>,
    pub draining: Gauge,
    pub cluster_members: Gauge,
    pub cluster_size: Gauge,
    pub cluster_quorum: Gauge,
    pub peer_links_established: Counter,
    pub peer_auth_failures: Counter,
    pub peer_frames_rejected: Counter,
    pub peer_secret_rotations: Counter,
    pub session_records_sent: Counter,
    pub session_records_received: Counter,
    pub api_requests: Family<[(&'static str, String); 1], Counter>,
    pub messages_committed: Counter,
    pub publishes_unavailable: Counter,
    pub raft_groups_led: Gauge,
    pub raft_groups_voting: Gauge,
    pub raft_group_failures: Counter,
    pub publishes_in_flight: Gauge,
    pub peer_queued_frames: Gauge,
    pub relayed_entries_applied: Counter,
    pub relayed_entries_skipped: Counter,
    pub rebalance_shed: Counter,
    pub rebalance_rounds: Counter,
    pub rebalance_shedding: Gauge,
    pub rebalance_spread_percent: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut m = Metrics {
            connections: Gauge::default(),
            connections_accepted: Counter::default(),
            rooms: Gauge::default(),
            frames_in: Counter::default(),
            frames_out: Counter::default(),
            publishes: Counter::default(),
            slow_consumer_disconnects: Counter::default(),
            dropped_frames: Counter::default(),
            rate_limited: Counter::default(),
            auth_failures: Family::default(),
            handshake_rejections: Family::default(),
            disconnects: Family::default(),
            draining: Gauge::default(),
            cluster_members: Gauge::default(),
            cluster_size: Gauge::default(),
            cluster_quorum: Gauge::default(),
            peer_links_established: Counter::default(),
            peer_auth_failures: Counter::default(),
            peer_frames_rejected: Counter::default(),
            peer_secret_rotations: Counter::default(),
            session_records_sent: Counter::default(),
            session_records_received: Counter::default(),
            api_requests: Family::default(),
            messages_committed: Counter::default(),
            publishes_unavailable: Counter::default(),
            raft_groups_led: Gauge::default(),
            raft_groups_voting: Gauge::default(),
            raft_group_failures: Counter::default(),
            publishes_in_flight: Gauge::default(),
            peer_queued_frames: Gauge::default(),
            relayed_entries_applied: Counter::default(),
            relayed_entries_skipped: Counter::default(),
            rebalance_shed: Counter::default(),
            rebalance_rounds: Counter::default(),
            rebalance_shedding: Gauge::default(),
            rebalance_spread_percent: Gauge::default(),
            registry: Registry::with_prefix("chat"),
        };
        let registry = &mut m.registry;
        registry.register("connections", "Open client connections", m.connections.clone());
        registry.register("connections_accepted", "Client connections accepted", m.connections_accepted.clone());
        registry.register("rooms", "Rooms held by this node", m.rooms.clone());
        registry.register("messages_in", "Frames received from clients", m.frames_in.clone());
        registry.register("messages_out", "Frames queued to clients", m.frames_out.clone());
        registry.register("publishes", "Messages published by clients on this node", m.publishes.clone());
        registry.register(
            "slow_consumer_disconnects",
            "Clients closed because their outbound queue overflowed",
            m.slow_consumer_disconnects.clone(),
        );
        registry.register("dropped_frames", "Frames not delivered because a queue was full", m.dropped_frames.clone());
        registry.register("rate_limited", "Publishes refused by the rate limit", m.rate_limited.clone());
        registry.register("auth_failures", "Handshakes refused by authentication", m.auth_failures.clone());
        registry.register("handshake_rejections", "Handshakes refused, by reason", m.handshake_rejections.clone());
        registry.register("disconnects", "Client connections closed, by close code", m.disconnects.clone());
        registry.register("draining", "1 while the node drains for shutdown", m.draining.clone());
        registry.register(
            "cluster_members",
            "Nodes this node is linked to, itself included",
            m.cluster_members.clone(),
        );
        registry.register("cluster_size", "The cluster's intended size (cluster.size)", m.cluster_size.clone());
        registry.register(
            "cluster_quorum",
            "1 while a majority of the cluster's voters is linked (this node may sequence and be ready)",
            m.cluster_quorum.clone(),
        );
        registry.register(
            "peer_links_established",
            "Authenticated peer links set up",
            m.peer_links_established.clone(),
        );
        registry.register(
            "peer_auth_failures",
            "Peer links refused for a bad HMAC proof",
            m.peer_auth_failures.clone(),
        );
        registry.register(
            "peer_frames_rejected",
            "Peer links ended by a frame that failed to open or was not sealed (altered, injected or replayed)",
            m.peer_frames_rejected.clone(),
        );
        registry.register(
            "peer_secret_rotations",
            "Changes of the cluster secret file seen by this node (the previous secret stays accepted for 10 minutes)",
            m.peer_secret_rotations.clone(),
        );
        registry.register(
            "session_records_sent",
            "Session records sent to the peers (the latest of each session per 100 ms tick)",
            m.session_records_sent.clone(),
        );
        registry.register(
            "session_records_received",
            "Session records received from the peers (so a session resumes here)",
            m.session_records_received.clone(),
        );
        registry.register("api_requests", "Server API requests answered, by HTTP status", m.api_requests.clone());
        registry.register(
            "messages_committed",
            "Room messages stored and delivered on this node (from any publisher)",
            m.messages_committed.clone(),
        );
        registry.register(
            "publishes_unavailable",
            "Publishes answered `unavailable` (no quorum, or no owner answer in time)",
            m.publishes_unavailable.clone(),
        );
        registry.register("raft_groups_led", "Room-log Raft groups this node leads", m.raft_groups_led.clone());
        registry.register(
            "raft_groups_voting",
            "Room-log Raft groups this node votes in",
            m.raft_groups_voting.clone(),
        );
        registry.register(
            "raft_group_failures",
            "Room-log Raft groups that stopped on an error (the node then drains and exits)",
            m.raft_group_failures.clone(),
        );
        registry.register(
            "publishes_in_flight",
            "Publishes of this node's clients waiting to be committed",
            m.publishes_in_flight.clone(),
        );
        registry.register(
            "peer_queued_frames",
            "Frames queued for peers and not yet written (replication lag)",
            m.peer_queued_frames.clone(),
        );
        registry.register(
            "relayed_entries_applied",
            "Committed room-log entries applied from the leader's relay, ahead of this node's own commit",
            m.relayed_entries_applied.clone(),
        );
        registry.register(
            "relayed_entries_skipped",
            "Relayed entries left to Raft's apply (already applied, or not next in line)",
            m.relayed_entries_skipped.clone(),
        );
        registry.register(
            "rebalance_connections_shed",
            "Client connections this node closed to even out the cluster (close code 4000, reason `rebalance`, sent)",
            m.rebalance_shed.clone(),
        );
        registry.register(
            "rebalance_rounds",
            "Rounds of shedding this node started (each ends when its share is shed, or a hold stops it)",
            m.rebalance_rounds.clone(),
        );
        registry.register("rebalance_shedding", "1 while this node sheds connections", m.rebalance_shedding.clone());
        registry.register(
            "rebalance_spread_percent",
            "How far the busiest node is above the cluster's mean connection count, in percent (as this node sees it)",
            m.rebalance_spread_percent.clone(),
        );
        m
    }

    /// A node on its own is a whole cluster of one, with quorum.
    pub fn standalone(&self) {
        self.cluster_size.set(1);
        self.cluster_members.set(1);
        self.cluster_quorum.set(1);
    }

    pub fn reject_handshake(&self, reason: &'static str) {
        self.handshake_rejections.get_or_create(&[("reason", reason)]).inc();
    }

    pub fn api_request(&self, status: u16) {
        self.api_requests.get_or_create(&[("status", status.to_string())]).inc();
    }

    pub fn disconnected(&self, code: u16) {
        self.disconnects.get_or_create(&[("code", code.to_string())]).inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let m = Metrics::new();
        m.connections.set(3);
        m.reject_handshake("too_many_connections");
        m.disconnected(4001);
        let text = m.render();
        assert!(text.contains("chat_connections 3"), "{text}");
        assert!(text.contains("chat_handshake_rejections_total{reason=\"too_many_connections\"} 1"), "{text}");
        assert!(text.contains("chat_disconnects_total{code=\"4001\"} 1"), "{text}");
    }
}
