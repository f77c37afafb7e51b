//! Rooms, presence and sessions shared by every node of a cluster.
//!
//! Each room is owned by the node that ranks first for it (`ranking`) among the members that
//! may own rooms; the owner sequences the room's messages and commits each one once enough
//! nodes store it (`stream`). Every node applies every committed message, so history and
//! resume work through any node. Presence entries belong to the node holding the connection
//! and are broadcast; session records are replicated to every node (`sessions`).
//! `docs/cluster.md` describes the design and its failure cases.

pub mod ranking;
pub mod sessions;
pub mod stream;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::cluster::wire::{Outcome, PeerFrame, PublishId, RoomDigest};
use crate::hub::Hub;
use crate::hub::outbox::Outbox;
use crate::hub::room::{RoomState, encode};
use crate::protocol::{ErrorCode, ServerFrame, UserInfo};

use stream::{Net, Proposal, Reroute};

/// How often rooms are checked for stalled claims, missing streams and expired publishes.
pub const TICK: Duration = Duration::from_millis(200);

/// Forwards of one publish before it is refused: views of membership differ only briefly.
const MAX_HOPS: u8 = 3;

/// A client's publish waiting for its owner's answer.
struct Waiting {
    outbox: Outbox,
    id: Option<String>,
    room: String,
    proposal: Proposal,
    /// The owner it was forwarded to; if that link drops the publish is routed again.
    sent_to: Option<String>,
    since: Instant,
}

pub struct Replication {
    cluster: Arc<Cluster>,
    next_seq: AtomicU64,
    waiting: Mutex<HashMap<u64, Waiting>>,
    publish_timeout: Duration,
}

impl Replication {
    pub fn new(cluster: Arc<Cluster>) -> Self {
        let publish_timeout = Duration::from_millis(cluster.config().publish_timeout_ms);
        Self { cluster, next_seq: AtomicU64::new(1), waiting: Mutex::default(), publish_timeout }
    }

    pub fn cluster(&self) -> &Arc<Cluster> {
        &self.cluster
    }

    fn me(&self) -> &str {
        self.cluster.node_id()
    }

    fn waiting(&self) -> MutexGuard<'_, HashMap<u64, Waiting>> {
        self.waiting.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the room's state under its lock, then routes again what it handed back.
    fn with_room(&self, hub: &Hub, room: &str, f: impl FnOnce(&Net, &mut RoomState, &mut Reroute)) {
        let target = hub.room(room);
        let mut reroute = Reroute::new();
        {
            let complete = |room: &str, pid: &PublishId, outcome: Outcome| self.complete(room, pid, outcome);
            let net = Net { me: self.me(), cluster: &self.cluster, local_result: &complete };
            let mut st = target.lock();
            f(&net, &mut st, &mut reroute);
        }
        for proposal in reroute {
            self.route(hub, room, proposal, 1);
        }
    }

    fn owner(&self, room: &str) -> Option<String> {
        ranking::owner(room, &self.cluster.owner_candidates()).map(str::to_owned)
    }

    /// A client of this node publishes: the ack (or error) reaches it through its outbox.
    pub fn publish(&self, hub: &Hub, room: &str, sender: &UserInfo, body: String, id: Option<String>, outbox: Outbox) {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let pid = PublishId { node: self.me().to_owned(), seq };
        let proposal = Proposal { pid, sender: sender.clone(), body, ts: crate::hub::unix_millis() };
        let waiting = Waiting {
            outbox,
            id,
            room: room.to_owned(),
            proposal: proposal.clone(),
            sent_to: None,
            since: Instant::now(),
        };
        self.waiting().insert(seq, waiting);
        hub.metrics().publishes_in_flight.inc();
        self.route(hub, room, proposal, 0);
    }

    /// Sends a publish to the room's owner, or sequences it here if that is this node.
    fn route(&self, hub: &Hub, room: &str, proposal: Proposal, hops: u8) {
        match self.owner(room) {
            None => self.refuse(room, &proposal.pid, "no quorum: this node cannot reach a majority of the cluster"),
            Some(owner) if owner == self.me() => {
                self.with_room(hub, room, |net, st, _| stream::propose(net, st, proposal));
            }
            Some(_) if hops >= MAX_HOPS => self.refuse(room, &proposal.pid, "room owner is moving; retry"),
            Some(owner) => {
                if proposal.pid.node == self.me()
                    && let Some(waiting) = self.waiting().get_mut(&proposal.pid.seq)
                {
                    waiting.sent_to = Some(owner.clone());
                }
                let Proposal { pid, sender, body, ts } = proposal;
                let frame = PeerFrame::Publish { room: room.to_owned(), pid, sender, body, ts, hops: hops + 1 };
                self.cluster.send(&owner, &frame);
            }
        }
    }

    fn refuse(&self, room: &str, pid: &PublishId, message: &str) {
        let outcome = stream::unavailable(message);
        if pid.node == self.me() {
            self.complete(room, pid, outcome);
        } else {
            let frame = PeerFrame::PublishResult { room: room.to_owned(), pid: pid.clone(), outcome };
            self.cluster.send(&pid.node, &frame);
        }
    }

    /// Answers the client waiting for publish `pid` of this node.
    fn complete(&self, room: &str, pid: &PublishId, outcome: Outcome) {
        let Some(waiting) = self.waiting().remove(&pid.seq) else { return };
        let metrics = self.cluster.metrics();
        metrics.publishes_in_flight.dec();
        let frame = match outcome {
            Outcome::Stored { offset, epoch } => {
                ServerFrame::Ack { id: waiting.id, room: room.to_owned(), offset, epoch }
            }
            Outcome::Refused { code, message } => {
                if code == ErrorCode::Unavailable {
                    metrics.publishes_unavailable.inc();
                }
                ServerFrame::Error { id: waiting.id, code, message }
            }
        };
        waiting.outbox.push(&encode(&frame));
    }

    /// A join found the room's stream unknown here: fetch it from the owner, or claim it.
    pub fn want_stream(&self, hub: &Hub, room: &str) {
        self.tick_room(hub, room, &self.cluster.owner_candidates());
    }

    /// A user's first connection on this node joined a room, or its last one left.
    pub fn presence_changed(&self, room: &str, user: &UserInfo, present: bool) {
        let frame = PeerFrame::Presence { room: room.to_owned(), user: user.clone(), present };
        self.cluster.broadcast(&frame);
    }

    fn tick_room(&self, hub: &Hub, room: &str, candidates: &[String]) {
        let owner = ranking::owner(room, candidates);
        let owner_is_me = owner == Some(self.me());
        self.with_room(hub, room, |net, st, reroute| stream::tick(net, st, owner_is_me, owner, reroute));
    }

    /// Periodic care of every room and of publishes waiting too long.
    pub fn tick(&self, hub: &Hub) {
        let expired: Vec<(String, PublishId)> = self
            .waiting()
            .values()
            .filter(|w| w.since.elapsed() >= self.publish_timeout)
            .map(|w| (w.room.clone(), w.proposal.pid.clone()))
            .collect();
        for (room, pid) in expired {
            self.complete(&room, &pid, stream::unavailable("no answer from the room's owner in time; retry"));
        }
        // One view of membership for the whole round.
        let candidates = self.cluster.owner_candidates();
        for room in hub.rooms_snapshot() {
            self.tick_room(hub, room.name(), &candidates);
        }
        let metrics = self.cluster.metrics();
        metrics.rooms_owned.set(self.owned_room_names(hub).len() as i64);
        metrics.peer_queued_frames.set(self.cluster.queued_frames() as i64);
        hub.sessions().expire(crate::hub::unix_millis());
    }

    /// Rooms this node sequences right now.
    pub fn owned_room_names(&self, hub: &Hub) -> Vec<String> {
        let mut names: Vec<String> = hub
            .rooms_snapshot()
            .iter()
            .filter(|r| r.lock().replica.is_sequencing())
            .map(|r| r.name().to_owned())
            .collect();
        names.sort();
        names
    }

    /// Publishes of this node's clients waiting for their owner's answer.
    pub fn in_flight(&self) -> usize {
        self.waiting().len()
    }

    /// Takes over (where this node now ranks first) the rooms `peer` was sequencing.
    fn take_over_from(&self, hub: &Hub, peer: &str) {
        let candidates = self.cluster.owner_candidates();
        for room in hub.rooms_snapshot() {
            let owner_is_me = ranking::owner(room.name(), &candidates) == Some(self.me());
            if owner_is_me {
                self.with_room(hub, room.name(), |net, st, _| {
                    if stream::sequenced_by(st, peer) {
                        stream::take_over(net, st);
                    }
                });
            }
        }
    }

    pub fn on_link_up(&self, hub: &Hub, peer: &str) {
        let rooms = hub.rooms_snapshot();
        let mut digests = Vec::new();
        let mut presence = Vec::new();
        for room in &rooms {
            let st = room.lock();
            if let Some(epoch) = &st.epoch {
                digests.push(RoomDigest {
                    room: room.name().to_owned(),
                    epoch: epoch.clone(),
                    committed: st.last_offset,
                });
            }
            presence.extend(st.local_users().map(|u| (room.name().to_owned(), u.clone())));
        }
        self.cluster.send(peer, &PeerFrame::Digest { rooms: digests });
        self.cluster.send(peer, &PeerFrame::PresenceSnapshot { entries: presence });
        for record in hub.sessions().all() {
            self.cluster.send(peer, &PeerFrame::Session { session: record });
        }
        let complete = |room: &str, pid: &PublishId, outcome: Outcome| self.complete(room, pid, outcome);
        let net = Net { me: self.me(), cluster: &self.cluster, local_result: &complete };
        for room in &rooms {
            stream::resend_in_flight(&net, &room.lock(), peer);
        }
    }

    pub fn on_link_down(&self, hub: &Hub, peer: &str) {
        for room in hub.rooms_snapshot() {
            room.lock().retain_remote_presence(peer, &[]);
        }
        self.take_over_from(hub, peer);
        let lost: Vec<(String, Proposal)> = self
            .waiting()
            .values()
            .filter(|w| w.sent_to.as_deref() == Some(peer))
            .map(|w| (w.room.clone(), w.proposal.clone()))
            .collect();
        // The owner may have stored them before it went: the new owner recognizes their ids.
        for (room, proposal) in lost {
            self.route(hub, &room, proposal, 0);
        }
    }

    fn on_digest(&self, hub: &Hub, peer: &str, rooms: Vec<RoomDigest>) {
        let complete = |room: &str, pid: &PublishId, outcome: Outcome| self.complete(room, pid, outcome);
        let net = Net { me: self.me(), cluster: &self.cluster, local_result: &complete };
        let listed: HashSet<&str> = rooms.iter().map(|d| d.room.as_str()).collect();
        for digest in &rooms {
            let Some(room) = hub.existing_room(&digest.room) else { continue };
            let st = room.lock();
            match st.epoch.as_deref() {
                Some(ours) if ours == digest.epoch && st.last_offset > digest.committed => {
                    stream::send_entries(&net, &st, peer, digest.committed);
                }
                Some(ours) if ours != digest.epoch && (st.last_offset, ours) > (digest.committed, &digest.epoch) => {
                    stream::send_entries(&net, &st, peer, 0);
                }
                _ => {}
            }
        }
        for room in hub.rooms_snapshot().iter().filter(|r| !listed.contains(r.name())) {
            stream::send_entries(&net, &room.lock(), peer, 0);
        }
        self.cluster.send(peer, &PeerFrame::SyncDone);
    }

    fn on_presence_snapshot(&self, hub: &Hub, peer: &str, entries: Vec<(String, UserInfo)>) {
        let mut by_room: HashMap<String, Vec<UserInfo>> = HashMap::new();
        for (room, user) in entries {
            by_room.entry(room).or_default().push(user);
        }
        for room in hub.rooms_snapshot() {
            let users = by_room.remove(room.name()).unwrap_or_default();
            let keep: Vec<&str> = users.iter().map(|u| u.id.as_str()).collect();
            let mut st = room.lock();
            st.retain_remote_presence(peer, &keep);
            for user in &users {
                st.set_remote_presence(peer, user, true);
            }
        }
        for (room, users) in by_room {
            let target = hub.room(&room);
            let mut st = target.lock();
            for user in &users {
                st.set_remote_presence(peer, user, true);
            }
        }
    }

    pub fn on_frame(&self, hub: &Hub, peer: &str, frame: PeerFrame) {
        match frame {
            PeerFrame::Publish { room, pid, sender, body, ts, hops } => {
                self.route(hub, &room, Proposal { pid, sender, body, ts }, hops);
            }
            PeerFrame::PublishResult { room, pid, outcome } => self.complete(&room, &pid, outcome),
            PeerFrame::Claim { room, term, epoch, after } => self.with_room(hub, &room, |net, st, reroute| {
                stream::on_claim(net, st, peer, term, epoch, after, reroute);
            }),
            PeerFrame::Promise { room, term, epoch, committed, entries } => {
                self.with_room(hub, &room, |net, st, _| {
                    stream::on_promise(net, st, peer, term, epoch, committed, entries);
                });
            }
            PeerFrame::Refuse { room, term } => {
                self.with_room(hub, &room, |_, st, reroute| stream::on_refuse(st, term, reroute));
            }
            PeerFrame::Append { room, epoch, term, entries } => self.with_room(hub, &room, |net, st, reroute| {
                stream::on_append(net, st, peer, &epoch, term, entries, reroute);
            }),
            PeerFrame::Appended { room, term, from, to } => {
                self.with_room(hub, &room, |net, st, _| stream::on_appended(net, st, peer, term, from, to));
            }
            PeerFrame::Commit { room, epoch, term, upto } => self.with_room(hub, &room, |net, st, reroute| {
                stream::on_commit(net, st, peer, &epoch, term, upto, reroute);
            }),
            PeerFrame::Fetch { room, after } => {
                let owner_is_me = self.owner(&room).as_deref() == Some(self.me());
                self.with_room(hub, &room, |net, st, _| stream::on_fetch(net, st, peer, after, owner_is_me));
            }
            PeerFrame::Entries { room, epoch, committed, entries } => {
                self.with_room(hub, &room, |_, st, reroute| {
                    stream::on_entries(st, &epoch, committed, &entries, reroute)
                });
            }
            PeerFrame::Digest { rooms } => self.on_digest(hub, peer, rooms),
            PeerFrame::SyncDone => self.cluster.mark_synced(peer),
            PeerFrame::Leaving => {
                self.cluster.mark_leaving(peer);
                self.take_over_from(hub, peer);
            }
            PeerFrame::Presence { room, user, present } => {
                hub.room(&room).lock().set_remote_presence(peer, &user, present);
            }
            PeerFrame::PresenceSnapshot { entries } => self.on_presence_snapshot(hub, peer, entries),
            PeerFrame::Session { session } => hub.sessions().merge(session),
            PeerFrame::Challenge { .. } | PeerFrame::Hello { .. } | PeerFrame::Accepted { .. } => {
                tracing::warn!(peer, "handshake frame on an established peer link");
            }
        }
    }
}
