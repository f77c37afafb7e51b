//! One room's replicated stream: claiming ownership with a term, sequencing as owner,
//! storing and acknowledging as follower, committing once `commit_quorum` nodes hold an entry.
//! Every function runs under the room's lock; sends only queue frames on peer links.
//!
//! Safety rests on two majorities meeting: a claim needs promises from a majority, and a
//! commit needs a majority (at least) of stored copies. So a new owner always sees every
//! committed entry, and a node that promised a newer term refuses the old owner's appends.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::{Duration, Instant};

use crate::cluster::Cluster;
use crate::cluster::wire::{Entry, Outcome, PeerFrame, PublishId};
use crate::hub::room::{RoomState, new_epoch};
use crate::protocol::{ErrorCode, UserInfo};

/// A publish on its way to being sequenced.
#[derive(Debug, Clone)]
pub struct Proposal {
    pub pid: PublishId,
    pub sender: UserInfo,
    pub body: String,
    pub ts: u64,
}

/// What one node holds of a room, as promised to a claimer.
struct Promised {
    epoch: Option<String>,
    committed: u64,
    entries: Vec<Entry>,
}

struct Claim {
    term: u64,
    started: Instant,
    promises: HashMap<String, Promised>,
    queue: Vec<Proposal>,
    /// Peers that asked for the room's stream while it was being claimed.
    fetchers: BTreeSet<String>,
}

struct Sequencer {
    term: u64,
    next: u64,
    /// Nodes holding each in-flight entry (this node included).
    acks: BTreeMap<u64, BTreeSet<String>>,
}

#[derive(Default)]
enum Role {
    #[default]
    Follower,
    Claiming(Claim),
    Sequencing(Sequencer),
}

/// A room's replication state, kept inside the room (same lock).
#[derive(Default)]
pub struct Replica {
    /// The highest term this node has promised or seen.
    promised: u64,
    /// Proposed entries after the last committed offset, by offset.
    pub(crate) pending: BTreeMap<u64, Entry>,
    /// The node that last sent appends or commits: the room's owner as far as we know.
    sequencer: Option<String>,
    /// When the sequencer was last heard from, or a claim or fetch was last started.
    last_activity: Option<Instant>,
    last_fetch: Option<Instant>,
    role: Role,
}

impl Replica {
    /// Nothing in flight and no claim: the room may be forgotten when idle.
    pub fn is_idle(&self) -> bool {
        self.pending.is_empty() && matches!(self.role, Role::Follower)
    }

    pub fn is_sequencing(&self) -> bool {
        matches!(self.role, Role::Sequencing(_))
    }

    pub fn sequencer(&self) -> Option<&str> {
        self.sequencer.as_deref()
    }
}

/// Where frames and publish results go; built per call by the replication layer.
pub struct Net<'a> {
    pub me: &'a str,
    pub cluster: &'a Cluster,
    /// Delivers a publish result to the client that is waiting on this node.
    pub local_result: &'a dyn Fn(&str, &PublishId, Outcome),
}

/// Proposals that must be routed again once the room's lock is released (their owner moved).
pub type Reroute = Vec<Proposal>;

/// How long a claim may wait for promises before it is retried.
pub const CLAIM_TIMEOUT: Duration = Duration::from_millis(1000);
/// Fetches of one room are at least this far apart.
const MIN_FETCH_INTERVAL: Duration = Duration::from_millis(300);

impl Net<'_> {
    fn result(&self, room: &str, pid: &PublishId, outcome: Outcome) {
        if pid.node == self.me {
            (self.local_result)(room, pid, outcome);
        } else {
            let frame = PeerFrame::PublishResult { room: room.to_owned(), pid: pid.clone(), outcome };
            self.cluster.send(&pid.node, &frame);
        }
    }
}

pub fn unavailable(message: &str) -> Outcome {
    Outcome::Refused { code: ErrorCode::Unavailable, message: message.to_owned() }
}

/// A publish that reached the room's owner (this node).
pub fn propose(net: &Net, st: &mut RoomState, proposal: Proposal) {
    if let Some(offset) = st.stored_offset(&proposal.pid) {
        let epoch = st.epoch.clone().unwrap_or_default();
        net.result(st.name(), &proposal.pid, Outcome::Stored { offset, epoch });
        return;
    }
    if st.replica.pending.values().any(|e| e.pid == proposal.pid) {
        // In flight already (a retry after an owner change): its commit answers it.
        return;
    }
    match &mut st.replica.role {
        // Committed entries past our numbering came from another owner (we were cut off):
        // our sequencing is stale, so claim afresh.
        Role::Sequencing(seq) if seq.next <= st.last_offset => {
            st.replica.role = Role::Follower;
            claim(net, st, vec![proposal], None);
        }
        Role::Sequencing(_) => sequence(net, st, vec![proposal]),
        Role::Claiming(claim) => claim.queue.push(proposal),
        Role::Follower => claim(net, st, vec![proposal], None),
    }
}

/// Starts claiming the room with a term above any seen.
pub fn claim(net: &Net, st: &mut RoomState, queue: Vec<Proposal>, fetcher: Option<String>) {
    let term = st.replica.promised + 1;
    st.replica.promised = term;
    let own = Promised {
        epoch: st.epoch.clone(),
        committed: st.last_offset,
        entries: st.replica.pending.values().cloned().collect(),
    };
    let claim = Claim {
        term,
        started: Instant::now(),
        promises: HashMap::from([(net.me.to_owned(), own)]),
        queue,
        fetchers: fetcher.into_iter().collect(),
    };
    st.replica.role = Role::Claiming(claim);
    st.replica.last_activity = Some(Instant::now());
    tracing::debug!(room = st.name(), term, "claiming room");
    let frame = PeerFrame::Claim { room: st.name().to_owned(), term, epoch: st.epoch.clone(), after: st.last_offset };
    net.cluster.broadcast(&frame);
    try_activate(net, st);
}

/// Another node claims the room: promise (and stop sequencing) if its term is newer.
pub fn on_claim(
    net: &Net,
    st: &mut RoomState,
    from: &str,
    term: u64,
    epoch: Option<String>,
    after: u64,
    reroute: &mut Reroute,
) {
    if term <= st.replica.promised {
        net.cluster.send(from, &PeerFrame::Refuse { room: st.name().to_owned(), term: st.replica.promised });
        return;
    }
    adopt_term(st, term, reroute);
    st.replica.sequencer = Some(from.to_owned());
    st.replica.last_activity = Some(Instant::now());
    let after = if epoch.is_some() && epoch == st.epoch { after } else { 0 };
    let mut entries = st.entries_after(after, 0);
    entries.extend(st.replica.pending.values().cloned());
    let frame = PeerFrame::Promise {
        room: st.name().to_owned(),
        term,
        epoch: st.epoch.clone(),
        committed: st.last_offset,
        entries,
    };
    net.cluster.send(from, &frame);
}

/// Records a newer term; a claim or sequencing of an older term ends, and its queued
/// publishes go to whoever owns the room now.
fn adopt_term(st: &mut RoomState, term: u64, reroute: &mut Reroute) {
    if term <= st.replica.promised && matches!(st.replica.role, Role::Follower) {
        return;
    }
    st.replica.promised = st.replica.promised.max(term);
    let current = match &st.replica.role {
        Role::Follower => return,
        Role::Claiming(c) => c.term,
        Role::Sequencing(s) => s.term,
    };
    if current < st.replica.promised {
        step_down(st, reroute);
    }
}

pub fn step_down(st: &mut RoomState, reroute: &mut Reroute) {
    if let Role::Claiming(claim) = std::mem::take(&mut st.replica.role) {
        reroute.extend(claim.queue);
    }
}

pub fn on_promise(
    net: &Net,
    st: &mut RoomState,
    from: &str,
    term: u64,
    epoch: Option<String>,
    committed: u64,
    entries: Vec<Entry>,
) {
    let Role::Claiming(claim) = &mut st.replica.role else { return };
    if claim.term != term {
        return;
    }
    claim.promises.insert(from.to_owned(), Promised { epoch, committed, entries });
    try_activate(net, st);
}

pub fn on_refuse(st: &mut RoomState, term: u64, reroute: &mut Reroute) {
    adopt_term(st, term, reroute);
}

/// Becomes the sequencer once a majority promised: takes on the longest committed stream
/// among the promises, proposes again every entry that may have been committed, then the
/// queued publishes.
fn try_activate(net: &Net, st: &mut RoomState) {
    let Role::Claiming(claim) = &st.replica.role else { return };
    if claim.promises.len() < net.cluster.majority() {
        return;
    }
    let Role::Claiming(claim) = std::mem::take(&mut st.replica.role) else { return };
    let best = claim
        .promises
        .values()
        .filter(|p| p.epoch.is_some())
        .max_by_key(|p| (p.committed, p.epoch.as_deref() == st.epoch.as_deref()));
    match best {
        Some(best) => {
            let epoch = best.epoch.clone().unwrap_or_default();
            if st.epoch.as_deref() != Some(epoch.as_str()) || best.committed > st.last_offset {
                let committed: Vec<Entry> =
                    best.entries.iter().filter(|e| e.offset <= best.committed).cloned().collect();
                st.adopt(&epoch, best.committed, &committed);
            }
        }
        None if st.epoch.is_none() => st.start_stream(new_epoch()),
        None => {}
    }
    let epoch = st.epoch.clone().unwrap_or_default();
    // Entries that may have been committed: per offset the one of the highest term, up to
    // the first gap (nothing after a gap can have been committed).
    let mut merged: BTreeMap<u64, Entry> = BTreeMap::new();
    for promise in claim.promises.values().filter(|p| p.epoch.as_deref() == Some(epoch.as_str())) {
        for entry in promise.entries.iter().filter(|e| e.offset > st.last_offset && e.offset > promise.committed) {
            match merged.get(&entry.offset) {
                Some(held) if held.term >= entry.term => {}
                _ => {
                    merged.insert(entry.offset, entry.clone());
                }
            }
        }
    }
    let mut next = st.last_offset + 1;
    let mut carried = Vec::new();
    while let Some(mut entry) = merged.remove(&next) {
        entry.term = claim.term;
        carried.push(entry);
        next += 1;
    }
    st.replica.pending.clear();
    st.replica.sequencer = Some(net.me.to_owned());
    st.replica.role = Role::Sequencing(Sequencer { term: claim.term, next: st.last_offset + 1, acks: BTreeMap::new() });
    tracing::info!(
        room = st.name(),
        term = claim.term,
        offset = st.last_offset,
        carried = carried.len(),
        "owning room"
    );
    let room = st.name().to_owned();
    append(net, st, carried);
    let fresh: Vec<Proposal> = claim.queue;
    sequence(net, st, fresh);
    let commit = PeerFrame::Commit { room: room.clone(), epoch: epoch.clone(), term: claim.term, upto: st.last_offset };
    net.cluster.broadcast(&commit);
    for fetcher in &claim.fetchers {
        send_entries(net, st, fetcher, 0);
    }
    try_commit(net, st);
}

/// Appends new proposals (skipping any already stored or in flight) as owner.
fn sequence(net: &Net, st: &mut RoomState, proposals: Vec<Proposal>) {
    let Role::Sequencing(seq) = &st.replica.role else { return };
    let (term, mut next) = (seq.term, seq.next);
    let mut entries = Vec::with_capacity(proposals.len());
    for p in proposals {
        if let Some(offset) = st.stored_offset(&p.pid) {
            let epoch = st.epoch.clone().unwrap_or_default();
            net.result(st.name(), &p.pid, Outcome::Stored { offset, epoch });
            continue;
        }
        if st.replica.pending.values().any(|e| e.pid == p.pid) {
            // Carried over from a previous owner and in flight: its commit answers it.
            continue;
        }
        entries.push(Entry { offset: next, term, pid: p.pid, sender: p.sender, body: p.body, ts: p.ts });
        next += 1;
    }
    append(net, st, entries);
    try_commit(net, st);
}

/// Stores `entries` (already numbered in this term) as in flight and sends them to every peer.
fn append(net: &Net, st: &mut RoomState, entries: Vec<Entry>) {
    let Role::Sequencing(seq) = &mut st.replica.role else { return };
    if entries.is_empty() {
        return;
    }
    for entry in &entries {
        seq.next = seq.next.max(entry.offset + 1);
        seq.acks.insert(entry.offset, BTreeSet::from([net.me.to_owned()]));
    }
    let term = seq.term;
    for entry in &entries {
        st.replica.pending.insert(entry.offset, entry.clone());
    }
    let frame =
        PeerFrame::Append { room: st.name().to_owned(), epoch: st.epoch.clone().unwrap_or_default(), term, entries };
    net.cluster.broadcast(&frame);
}

/// Sends a newly linked peer the entries still in flight, so it can count towards commits.
pub fn resend_in_flight(net: &Net, st: &RoomState, peer: &str) {
    let Role::Sequencing(seq) = &st.replica.role else { return };
    let entries: Vec<Entry> = st.replica.pending.values().cloned().collect();
    if entries.is_empty() {
        return;
    }
    let epoch = st.epoch.clone().unwrap_or_default();
    net.cluster.send(peer, &PeerFrame::Append { room: st.name().to_owned(), epoch, term: seq.term, entries });
}

/// Commits, in order, every in-flight entry held by enough nodes.
fn try_commit(net: &Net, st: &mut RoomState) {
    let needed = net.cluster.commit_quorum();
    let mut committed = false;
    loop {
        let Role::Sequencing(seq) = &mut st.replica.role else { return };
        let next = st.last_offset + 1;
        if seq.acks.get(&next).is_none_or(|acks| acks.len() < needed) {
            break;
        }
        seq.acks.remove(&next);
        let Some(entry) = st.replica.pending.remove(&next) else { break };
        st.apply(&entry);
        let epoch = st.epoch.clone().unwrap_or_default();
        net.result(st.name(), &entry.pid, Outcome::Stored { offset: entry.offset, epoch });
        committed = true;
    }
    if committed && let Role::Sequencing(seq) = &st.replica.role {
        let epoch = st.epoch.clone().unwrap_or_default();
        let frame = PeerFrame::Commit { room: st.name().to_owned(), epoch, term: seq.term, upto: st.last_offset };
        net.cluster.broadcast(&frame);
    }
}

pub fn on_append(
    net: &Net,
    st: &mut RoomState,
    from: &str,
    epoch: &str,
    term: u64,
    entries: Vec<Entry>,
    reroute: &mut Reroute,
) {
    if term < st.replica.promised {
        net.cluster.send(from, &PeerFrame::Refuse { room: st.name().to_owned(), term: st.replica.promised });
        return;
    }
    // Entries are stored (they count for the commit) even while our copy of the stream is
    // fetched again for another epoch.
    heard_from_owner(net, st, from, epoch, term, reroute);
    let (Some(first), Some(last)) = (entries.first().map(|e| e.offset), entries.last().map(|e| e.offset)) else {
        return;
    };
    for entry in entries {
        if entry.offset > st.last_offset {
            st.replica.pending.insert(entry.offset, entry);
        }
    }
    let ack = PeerFrame::Appended { room: st.name().to_owned(), term, from: first, to: last };
    net.cluster.send(from, &ack);
}

/// Notes an append or commit of the current term from the room's owner. False when our copy
/// of the stream has another epoch than the owner's: it is fetched again.
fn heard_from_owner(net: &Net, st: &mut RoomState, from: &str, epoch: &str, term: u64, reroute: &mut Reroute) -> bool {
    adopt_term(st, term, reroute);
    st.replica.sequencer = Some(from.to_owned());
    st.replica.last_activity = Some(Instant::now());
    if st.epoch.as_deref() == Some(epoch) {
        return true;
    }
    fetch(net, st, from, 0);
    false
}

pub fn on_appended(net: &Net, st: &mut RoomState, from: &str, term: u64, first: u64, last: u64) {
    let Role::Sequencing(seq) = &mut st.replica.role else { return };
    if seq.term != term {
        return;
    }
    for (_, acks) in seq.acks.range_mut(first..=last) {
        acks.insert(from.to_owned());
    }
    try_commit(net, st);
}

pub fn on_commit(net: &Net, st: &mut RoomState, from: &str, epoch: &str, term: u64, upto: u64, reroute: &mut Reroute) {
    if term < st.replica.promised {
        // An older owner's commit is still a fact, but our copies of its entries may be of
        // another term (or refused): take the committed messages themselves from it.
        if upto > st.last_offset && st.epoch.as_deref() == Some(epoch) {
            let after = st.last_offset;
            fetch(net, st, from, after);
        }
        return;
    }
    if !heard_from_owner(net, st, from, epoch, term, reroute) {
        return;
    }
    while st.last_offset < upto {
        let next = st.last_offset + 1;
        match st.replica.pending.get(&next) {
            Some(entry) if entry.term == term => {
                if let Some(entry) = st.replica.pending.remove(&next) {
                    st.apply(&entry);
                }
            }
            _ => break,
        }
    }
    if st.last_offset < upto {
        let after = st.last_offset;
        fetch(net, st, from, after);
    }
}

/// Asks `from` for committed messages after `after`, at most every few hundred milliseconds.
pub fn fetch(net: &Net, st: &mut RoomState, from: &str, after: u64) {
    if st.replica.last_fetch.is_some_and(|t| t.elapsed() < MIN_FETCH_INTERVAL) {
        return;
    }
    st.replica.last_fetch = Some(Instant::now());
    net.cluster.send(from, &PeerFrame::Fetch { room: st.name().to_owned(), after });
}

pub fn send_entries(net: &Net, st: &RoomState, to: &str, after: u64) {
    let Some(epoch) = st.epoch.clone() else { return };
    let frame = PeerFrame::Entries {
        room: st.name().to_owned(),
        epoch,
        committed: st.last_offset,
        entries: st.entries_after(after, 0),
    };
    net.cluster.send(to, &frame);
}

/// A peer asks for the stream: answer if it is known here; claim it if this node owns it.
pub fn on_fetch(net: &Net, st: &mut RoomState, from: &str, after: u64, owner_is_me: bool) {
    if st.epoch.is_some() {
        send_entries(net, st, from, after);
        return;
    }
    match &mut st.replica.role {
        Role::Claiming(claim) => {
            claim.fetchers.insert(from.to_owned());
        }
        Role::Follower if owner_is_me => claim(net, st, Vec::new(), Some(from.to_owned())),
        _ => {}
    }
}

/// Committed messages from a peer. A different epoch replaces ours only if it is further
/// along (ties broken by the epoch string), so every node converges on the same stream.
pub fn on_entries(st: &mut RoomState, epoch: &str, committed: u64, entries: &[Entry], reroute: &mut Reroute) {
    let take = match st.epoch.as_deref() {
        None => true,
        Some(ours) if ours == epoch => committed > st.last_offset,
        Some(ours) => (committed, epoch) > (st.last_offset, ours),
    };
    if !take {
        return;
    }
    // Someone else committed what we lacked: whatever we were sequencing or claiming is stale.
    step_down(st, reroute);
    st.adopt(epoch, committed, entries);
}

/// Periodic care: retry stalled claims, fetch streams that joins wait for, and take over
/// rooms whose owner went quiet with entries in flight.
pub fn tick(net: &Net, st: &mut RoomState, owner_is_me: bool, owner: Option<&str>, reroute: &mut Reroute) {
    let quiet = st.replica.last_activity.is_none_or(|t| t.elapsed() >= CLAIM_TIMEOUT);
    match &st.replica.role {
        Role::Claiming(claim) if claim.started.elapsed() >= CLAIM_TIMEOUT => {
            if owner_is_me {
                let Role::Claiming(claim) = std::mem::take(&mut st.replica.role) else { return };
                let fetcher = claim.fetchers.into_iter().next();
                self::claim(net, st, claim.queue, fetcher);
            } else {
                step_down(st, reroute);
            }
        }
        // Take over a room this node now ranks first for: one whose entries are stuck in flight,
        // one a join waits for, or (scale-up, a restarted node) one another node sequences while
        // it is idle — a busy one moves with its next publish, which is routed here.
        Role::Follower
            if owner_is_me
                && quiet
                && (!st.replica.pending.is_empty()
                    || st.has_waiters()
                    || (net.cluster.is_ready() && st.epoch.is_some() && st.replica.sequencer() != Some(net.me))) =>
        {
            claim(net, st, Vec::new(), None);
        }
        Role::Follower if st.epoch.is_none() && st.has_waiters() => {
            if let Some(owner) = owner {
                fetch(net, st, owner, 0);
            }
        }
        _ => {}
    }
}

/// Whether the sequencer this room last heard from is `peer`.
pub fn sequenced_by(st: &RoomState, peer: &str) -> bool {
    st.replica.sequencer() == Some(peer)
}

/// Makes the room's owner take over now (after its sequencer left), if that is this node.
pub fn take_over(net: &Net, st: &mut RoomState) {
    if matches!(st.replica.role, Role::Follower) {
        claim(net, st, Vec::new(), None);
    }
}
