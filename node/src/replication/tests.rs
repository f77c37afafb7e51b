//! Replication between hubs wired together in memory (seed 003: the transport is pluggable):
//! each peer link is a channel pumped by a task, each client a memory-transport connection.
//! Fast and deterministic enough for the state machine; the same behaviours across real
//! processes, sockets and network namespaces are in `e2e/tests/cluster_replication.rs`.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tokio::task::JoinHandle;

use crate::cluster::wire::PeerFrame;
use crate::cluster::{Cluster, PeerHandler};
use crate::hub::Hub;
use crate::hub::tests::{config, connect, expect, join, send};
use crate::metrics::Metrics;
use crate::replication::ranking;
use crate::transport::memory::MemoryClient;

struct MemNode {
    id: String,
    hub: Arc<Hub>,
    cluster: Arc<Cluster>,
}

/// Nodes linked pairwise in memory. Link (from, to) delivers `from`'s frames to `to`.
struct MemCluster {
    nodes: Vec<MemNode>,
    links: HashMap<(usize, usize), (u64, JoinHandle<()>)>,
}

impl MemCluster {
    fn new(n: usize) -> MemCluster {
        let mut cluster = Self::unlinked(n);
        for from in 0..n {
            for to in 0..n {
                if from != to {
                    cluster.link(from, to);
                }
            }
        }
        cluster
    }

    /// `n` nodes that know nothing of each other yet.
    fn unlinked(n: usize) -> MemCluster {
        let nodes: Vec<MemNode> = (0..n)
            .map(|i| {
                let id = format!("mem-{i}");
                let mut cfg = config();
                cfg.node_id = Some(id.clone());
                cfg.cluster.static_peers = vec!["in-memory:1".into()];
                cfg.cluster.secret = Some("in-memory-cluster-secret".into());
                // No discovery runs in memory: readiness comes from the timeout.
                cfg.cluster.ready_timeout_secs = 1;
                let metrics = Arc::new(Metrics::new());
                let cluster = Cluster::new(id.clone(), cfg.cluster.clone(), metrics.clone()).unwrap();
                let hub = Hub::new(id.clone(), cfg, metrics, Some(cluster.clone())).unwrap();
                MemNode { id, hub, cluster }
            })
            .collect();
        MemCluster { nodes, links: HashMap::new() }
    }

    fn link(&mut self, from: usize, to: usize) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<tokio_tungstenite::tungstenite::Utf8Bytes>();
        let queued = Arc::new(AtomicUsize::new(0));
        let (source, target) = (self.nodes[from].id.clone(), self.nodes[to].hub.clone());
        let generation = self.nodes[from].cluster.register(
            &self.nodes[to].id,
            "in-memory".into(),
            Arc::default(),
            tx,
            queued.clone(),
        );
        let task = tokio::spawn(async move {
            while let Some(text) = rx.recv().await {
                queued.fetch_sub(1, Ordering::AcqRel);
                let frame: PeerFrame = serde_json::from_str(&text).expect("our own frames parse");
                target.on_frame(&source, frame);
            }
        });
        self.links.insert((from, to), (generation, task));
    }

    /// Node `k` vanishes: its links stop and every other node sees them drop.
    fn crash(&mut self, k: usize) {
        let gone = self.nodes[k].id.clone();
        let keys: Vec<(usize, usize)> = self.links.keys().filter(|(a, b)| *a == k || *b == k).copied().collect();
        for key in keys {
            let Some((generation, task)) = self.links.remove(&key) else { continue };
            task.abort();
            if key.0 != k {
                self.nodes[key.0].cluster.unregister(&gone, generation);
            }
        }
    }

    fn owner_of(&self, room: &str) -> usize {
        let ids: Vec<String> = self.nodes.iter().map(|n| n.id.clone()).collect();
        let owner = ranking::owner(room, &ids).expect("members");
        ids.iter().position(|id| id == owner).expect("owner is a node")
    }
}

/// Publishes `count` messages with ids `{tag}{i}` and waits for each ack; returns the offsets.
async fn publish_acked(client: &mut MemoryClient, room: &str, tag: &str, count: usize) -> Vec<u64> {
    let mut offsets = Vec::new();
    for i in 0..count {
        let id = format!("{tag}{i}");
        send(client, json!({"type": "publish", "id": id, "room": room, "body": id})).await;
        loop {
            let frame = crate::hub::tests::next(client).await;
            match frame["type"].as_str() {
                Some("ack") if frame["id"] == id.as_str() => {
                    offsets.push(frame["offset"].as_u64().expect("offset"));
                    break;
                }
                Some("error") => panic!("publish {id} refused: {frame}"),
                _ => {}
            }
        }
    }
    offsets
}

/// Reads until `count` messages arrived; returns (offset, body) in arrival order.
async fn messages(client: &mut MemoryClient, count: usize) -> Vec<(u64, String)> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = crate::hub::tests::next(client).await;
        if frame["type"] == "message" {
            got.push((frame["offset"].as_u64().expect("offset"), frame["body"].as_str().unwrap_or("").to_owned()));
        }
    }
    got
}

#[tokio::test]
async fn every_node_delivers_the_same_stream_once_in_order() {
    let cluster = MemCluster::new(3);
    let (mut readers, mut writers) = (Vec::new(), Vec::new());
    for node in &cluster.nodes {
        let (mut reader, mut writer) = (connect(&node.hub, "rea").await, connect(&node.hub, "wes").await);
        join(&mut reader, "r").await;
        join(&mut writer, "r").await;
        readers.push(reader);
        writers.push(writer);
    }
    let mut acked = Vec::new();
    for (i, writer) in writers.iter_mut().enumerate() {
        acked.extend(publish_acked(writer, "r", &format!("n{i}-"), 5).await);
    }
    acked.sort();
    assert_eq!(acked, (1..=15).collect::<Vec<u64>>(), "one offset per publish, no gaps");
    let reference = messages(&mut readers[0], 15).await;
    assert!(reference.windows(2).all(|w| w[0].0 + 1 == w[1].0), "in order, once: {reference:?}");
    for reader in &mut readers[1..] {
        assert_eq!(messages(reader, 15).await, reference);
    }
    let owner = cluster.owner_of("r");
    for (i, node) in cluster.nodes.iter().enumerate() {
        let sequencing = node.hub.replication().map(|r| r.owned_room_names(&node.hub)).unwrap_or_default();
        assert_eq!(sequencing == ["r"], i == owner, "only the ranked owner sequences: {i} {sequencing:?}");
    }
}

#[tokio::test]
async fn the_owner_crashing_loses_no_acked_message_and_offsets_continue() {
    let mut cluster = MemCluster::new(3);
    let owner = cluster.owner_of("r");
    let others: Vec<usize> = (0..3).filter(|i| *i != owner).collect();
    let mut writer = connect(&cluster.nodes[others[0]].hub, "wes").await;
    let mut reader = connect(&cluster.nodes[others[1]].hub, "rea").await;
    let joined = join(&mut reader, "r").await;
    join(&mut writer, "r").await;
    let epoch = joined["epoch"].clone();

    let before = publish_acked(&mut writer, "r", "a", 5).await;
    cluster.crash(owner);
    let after = publish_acked(&mut writer, "r", "b", 5).await;
    assert_eq!(before, (1..=5).collect::<Vec<u64>>());
    assert_eq!(after, (6..=10).collect::<Vec<u64>>(), "the new owner continues after every acked message");

    let got = messages(&mut reader, 10).await;
    let offsets: Vec<u64> = got.iter().map(|(o, _)| *o).collect();
    assert_eq!(offsets, (1..=10).collect::<Vec<u64>>());
    // Same stream: a resume from before the crash still recovers.
    let mut late = connect(&cluster.nodes[others[1]].hub, "late").await;
    send(&late, json!({"type": "join", "room": "r", "since": {"epoch": epoch, "offset": 3}})).await;
    let missed = messages(&mut late, 7).await;
    assert_eq!(missed.first().map(|m| m.0), Some(4));
    let resumed = expect(&mut late, "joined").await;
    assert_eq!((resumed["recovered"].as_bool(), resumed["offset"].as_u64()), (Some(true), Some(10)));
}

#[tokio::test]
async fn a_newer_claim_takes_the_room_without_losing_or_renumbering_messages() {
    let cluster = MemCluster::new(3);
    let owner = cluster.owner_of("r");
    let mut writer = connect(&cluster.nodes[owner].hub, "wes").await;
    join(&mut writer, "r").await;
    publish_acked(&mut writer, "r", "a", 2).await;
    // Another node claims the room with a newer term (as after a membership change it saw
    // first): the old owner promises and stops sequencing.
    let usurper = (owner + 1) % 3;
    let room = cluster.nodes[usurper].hub.room("r");
    {
        let no_local_publishes = |_: &str, _: &crate::cluster::wire::PublishId, _| {};
        let usurper = &cluster.nodes[usurper];
        let net = super::stream::Net { me: &usurper.id, cluster: &usurper.cluster, local_result: &no_local_publishes };
        super::stream::claim(&net, &mut room.lock(), Vec::new(), None);
    }
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    while cluster.nodes[owner]
        .hub
        .replication()
        .is_some_and(|r| !r.owned_room_names(&cluster.nodes[owner].hub).is_empty())
    {
        assert!(tokio::time::Instant::now() < deadline, "the old owner kept sequencing");
        tokio::task::yield_now().await;
    }
    // The old owner forwards to the ranked owner (itself): it claims again with a higher term,
    // and nothing committed is lost or renumbered.
    let after = publish_acked(&mut writer, "r", "b", 2).await;
    assert_eq!(after, vec![3, 4]);
}

#[tokio::test]
async fn a_new_node_takes_over_the_idle_rooms_it_ranks_first_for() {
    let mut cluster = MemCluster::unlinked(3);
    cluster.link(0, 1);
    cluster.link(1, 0);
    let all: Vec<String> = cluster.nodes.iter().map(|n| n.id.clone()).collect();
    // Rooms the third node will rank first for once it is a member.
    let rooms: Vec<String> =
        (0..40).map(|i| format!("room-{i}")).filter(|r| ranking::owner(r, &all) == Some("mem-2")).take(3).collect();
    assert!(!rooms.is_empty());
    let mut writer = connect(&cluster.nodes[0].hub, "wes").await;
    for room in &rooms {
        join(&mut writer, room).await;
    }
    for room in &rooms {
        publish_acked(&mut writer, room, room, 2).await;
    }
    // Scale-up: the third node links to both; once synced and ready it claims its share.
    for (a, b) in [(0, 2), (2, 0), (1, 2), (2, 1)] {
        cluster.link(a, b);
    }
    let newcomer = &cluster.nodes[2];
    let replication = newcomer.hub.replication().expect("clustered");
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        replication.tick(&newcomer.hub);
        if replication.owned_room_names(&newcomer.hub).len() == rooms.len() {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "owns {:?}", replication.owned_room_names(&newcomer.hub));
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    // Nothing moved backwards: the next publish continues each room's offsets.
    for room in &rooms {
        assert_eq!(publish_acked(&mut writer, room, "next", 1).await, vec![3], "{room}");
    }
}
