//! Membership of the room-log groups, changed only through Raft and only by each group's
//! leader: nodes join as learners, are promoted to voters once caught up (the lowest
//! ordinals, at most 5), replace their earlier incarnation, and leave when draining or scaled
//! away. Also the one-time bootstrap of a fresh cluster, announcements to peers, readiness
//! and the `/cluster` view. DNS only tells where peers are: who votes is decided here.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::time::Instant;

use openraft::{BasicNode, ChangeMembers, ServerState};

use super::types::ordinal_of;
use super::wire::{MemberInfo, ReplicaFrame};
use super::{GroupStatus, ReplicatedLog, ReplicationStatus};

/// Most voters a group has: more would only slow commits.
pub const MAX_VOTERS: usize = 5;
/// A learner this close to the leader's last log index counts as caught up.
const CAUGHT_UP_LAG: u64 = 64;
/// Time a membership change may take before the steward tries again.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
pub struct Steward {
    announced: Option<MemberInfo>,
    bootstrapped: bool,
    /// Groups with a membership change under way, and since when.
    changing: BTreeMap<u32, Instant>,
    /// Groups this leaving node leads and is handing to a successor: it appends nothing more to
    /// them and keeps their voters as they are, so the successor can win with its vote.
    pub handing_over: BTreeSet<u32>,
}

/// Voter slots: the ordinals `0..slots` vote.
fn slots(size: usize) -> usize {
    size.clamp(1, MAX_VOTERS)
}

/// Live members by Raft id: this node unless leaving, and linked peers that announced
/// themselves and are not leaving.
fn live(log: &ReplicatedLog) -> BTreeMap<u64, (String, MemberInfo)> {
    let mut live: BTreeMap<u64, (String, MemberInfo)> =
        log.members().iter().filter(|(_, m)| !m.leaving).map(|(name, m)| (m.raft_id, (name.clone(), *m))).collect();
    let me = log.member_info();
    if !me.leaving {
        live.insert(log.raft_id, (log.name.clone(), me));
    }
    live
}

/// A majority of the voter slots is linked (this node included).
fn has_quorum(log: &ReplicatedLog) -> bool {
    let slots = slots(log.size());
    let mut ordinals: BTreeSet<u32> =
        log.members().values().map(|m| m.ordinal).filter(|o| (*o as usize) < slots).collect();
    if (log.ordinal as usize) < slots {
        ordinals.insert(log.ordinal);
    }
    ordinals.len() > slots / 2
}

pub fn votes_anywhere(log: &ReplicatedLog) -> bool {
    log.groups().iter().any(|raft| {
        let metrics = raft.metrics().borrow().clone();
        let config = &metrics.membership_config;
        // A membership without this node counts only once this node applied it (so it is
        // committed): until then the previous one, with this node, may still be the group's.
        let settled = config.log_id().map(|id| id.index) <= metrics.last_applied.map(|id| id.index);
        !settled || config.membership().voter_ids().any(|id| id == log.raft_id)
    })
}

pub fn tend(log: &ReplicatedLog) {
    announce(log);
    bootstrap(log);
    for group in 0..log.groups().len() as u32 {
        reconcile(log, group);
    }
    update_readiness(log);
}

fn steward(log: &ReplicatedLog) -> std::sync::MutexGuard<'_, Steward> {
    super::lock(&log.steward)
}

/// Tells the peers when this node's announcement changed (it also goes out on every new link).
fn announce(log: &ReplicatedLog) {
    let info = log.member_info();
    let mut steward = steward(log);
    if steward.announced != Some(info) {
        steward.announced = Some(info);
        drop(steward);
        log.cluster.broadcast(ReplicaFrame::Member(info).encode());
    }
}

/// A fresh cluster starts once: ordinal 0, seeing a majority of the voter slots and nobody
/// who belongs to a group already, initializes every group with the voters it sees. Each
/// group is initialized by the voter meant to lead it, so leadership starts spread.
fn bootstrap(log: &ReplicatedLog) {
    if log.ordinal != 0 || log.leaving.load(Ordering::Acquire) || steward(log).bootstrapped {
        return;
    }
    if log.member_info().initialized || !has_quorum(log) {
        return;
    }
    if log.members().values().any(|m| m.initialized) {
        // An existing cluster: its leaders add this node.
        steward(log).bootstrapped = true;
        return;
    }
    let slots = slots(log.size());
    let mut voters: BTreeMap<u32, (u64, String)> = BTreeMap::new();
    for (id, (name, info)) in live(log) {
        if (info.ordinal as usize) < slots {
            voters.entry(info.ordinal).or_insert((id, name));
        }
    }
    let members: BTreeMap<u64, BasicNode> =
        voters.values().map(|(id, name)| (*id, BasicNode { addr: name.clone() })).collect();
    let order: Vec<u64> = voters.values().map(|(id, _)| *id).collect();
    steward(log).bootstrapped = true;
    tracing::info!(voters = ?voters.values().map(|(_, n)| n).collect::<Vec<_>>(), "bootstrapping the room-log groups");
    for (group, raft) in log.groups().iter().enumerate() {
        let preferred = order[group % order.len()];
        if preferred == log.raft_id {
            let raft = raft.clone();
            let members = members.clone();
            tokio::spawn(async move {
                if let Err(err) = raft.initialize(members).await {
                    tracing::warn!(group, %err, "initializing a room-log group failed");
                }
            });
        } else if let Some((_, name)) = voters.values().find(|(id, _)| *id == preferred) {
            // Initializing with identical members on several nodes is safe; the preferred one
            // stands for election first.
            log.cluster.send(name, ReplicaFrame::Bootstrap { group: group as u32, members: members.clone() }.encode());
        }
    }
}

/// What the leader of `group` wants its voters to be: per voter slot, the live incarnation of
/// that ordinal once caught up, else whoever holds the slot now (absent, maybe restarting).
fn desired_voters(
    log: &ReplicatedLog,
    voters: &BTreeSet<u64>,
    nodes: &BTreeMap<u64, BasicNode>,
    live: &BTreeMap<u64, (String, MemberInfo)>,
    caught_up: impl Fn(u64) -> bool,
) -> BTreeSet<u64> {
    let leaving: BTreeSet<u64> = log.members().values().filter(|m| m.leaving).map(|m| m.raft_id).collect();
    let me_leaving = log.leaving.load(Ordering::Acquire);
    let mut desired = BTreeSet::new();
    for slot in 0..slots(log.size()) as u32 {
        let fresh = live.keys().find(|id| ordinal_of(**id) == slot && nodes.contains_key(id) && caught_up(**id));
        let current = voters
            .iter()
            .find(|id| ordinal_of(**id) == slot && !leaving.contains(id) && !(me_leaving && **id == log.raft_id));
        if let Some(id) = fresh.or(current) {
            desired.insert(*id);
        }
    }
    desired
}

/// The leader's care of one group's membership: one change at a time.
fn reconcile(log: &ReplicatedLog, group: u32) {
    let Some(raft) = log.groups().get(group as usize).cloned() else { return };
    let metrics = raft.metrics().borrow().clone();
    if metrics.current_leader != Some(log.raft_id) {
        return;
    }
    {
        let mut steward = steward(log);
        if steward.handing_over.contains(&group) {
            return;
        }
        match steward.changing.get(&group) {
            Some(since) if since.elapsed() < CHANGE_TIMEOUT => return,
            _ => steward.changing.remove(&group),
        };
    }
    let membership = metrics.membership_config.membership();
    // A joint config left behind by a change cut short (its leader went away) is finished by
    // the next change; until then the incoming config is what the voters become.
    let joint = membership.get_joint_config().len() > 1;
    let voters: BTreeSet<u64> = membership.get_joint_config().last().cloned().unwrap_or_default();
    let nodes: BTreeMap<u64, BasicNode> = membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
    let live = live(log);
    let size = log.size();
    let last = metrics.last_log_index.unwrap_or(0);
    let matched = metrics.replication.clone().unwrap_or_default();
    let caught_up = |id: u64| {
        id == log.raft_id || matched.get(&id).copied().flatten().is_some_and(|l| l.index + CAUGHT_UP_LAG >= last)
    };

    let change = if let Some((id, (name, _))) =
        live.iter().find(|(id, (_, info))| !nodes.contains_key(id) && (info.ordinal as usize) < size)
    {
        Some(ChangeMembers::AddNodes(BTreeMap::from([(*id, BasicNode { addr: name.clone() })])))
    } else {
        let desired = desired_voters(log, &voters, &nodes, &live, caught_up);
        let live_desired = desired.iter().filter(|id| live.contains_key(id)).count();
        if !desired.is_empty() && (joint || desired != voters) && live_desired * 2 > desired.len() {
            Some(ChangeMembers::ReplaceAllVoters(desired))
        } else {
            // Learners that are gone for good: scaled away, or an earlier incarnation. A node
            // that is draining stays a learner while it runs, so its clients keep receiving
            // messages (and acks) until it sends them away.
            let mut linked: BTreeSet<u64> = log.members().values().map(|m| m.raft_id).collect();
            linked.insert(log.raft_id);
            let stale: BTreeSet<u64> = nodes
                .keys()
                .filter(|id| !voters.contains(id) && !linked.contains(id))
                .filter(|id| {
                    let ordinal = ordinal_of(**id);
                    let replaced = live.keys().any(|l| ordinal_of(*l) == ordinal && *l != **id);
                    replaced || ordinal as usize >= size
                })
                .copied()
                .collect();
            (!stale.is_empty()).then_some(ChangeMembers::RemoveNodes(stale))
        }
    };
    let Some(change) = change else { return };
    steward(log).changing.insert(group, Instant::now());
    tracing::info!(group, ?change, "changing room-log membership");
    let this = log.this.clone();
    tokio::spawn(async move {
        // Voters taken out stay learners until a later step removes them, so a node that is
        // only restarting keeps receiving the log meanwhile.
        if let Err(err) = raft.change_membership(change, true).await {
            tracing::debug!(group, %err, "membership change did not go through");
        }
        if let Some(log) = this.upgrade() {
            steward(&log).changing.remove(&group);
        }
    });
}

/// How long a successor that was asked to stand for election has before it is asked again.
const ASK_AGAIN: Duration = Duration::from_millis(150);

/// Before a leaving node leaves its groups: every group it leads gets a successor first. It
/// stops appending to the group, waits until a live voter has its whole log and asks that voter
/// to stand for election at once; this node grants the vote, which with the successor's own is
/// a majority of three voters. Without this the other voters would refuse every candidate
/// until their leader lease runs out, then wait an election timeout (0.6–0.8 s at the
/// defaults). With five voters the other three still refuse until their lease runs out, and a
/// group that has no caught-up successor by `timeout` is left as before (see `reconcile`).
pub async fn hand_over(log: &ReplicatedLog, led: BTreeSet<u32>, timeout: Duration) {
    let started = Instant::now();
    let mut asked: BTreeMap<u32, Instant> = BTreeMap::new();
    // A successor counts as caught up only when two looks in a row agree: an append that was
    // already on its way when appends stopped shows up in between.
    let mut caught_up_once: BTreeSet<u32> = BTreeSet::new();
    while started.elapsed() < timeout {
        let pending: Vec<u32> = led.iter().copied().filter(|g| leads(log, *g)).collect();
        if pending.is_empty() {
            break;
        }
        for group in pending {
            if asked.get(&group).is_some_and(|at| at.elapsed() < ASK_AGAIN) {
                continue;
            }
            match successor(log, group) {
                Some((id, name)) if !caught_up_once.insert(group) => {
                    tracing::info!(group, successor = %name, "handing room-log leadership over");
                    log.cluster.send(&name, ReplicaFrame::Elect { group, to: id }.encode());
                    asked.insert(group, Instant::now());
                }
                Some(_) => {}
                None => {
                    caught_up_once.remove(&group);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let kept: Vec<u32> = led.iter().copied().filter(|g| leads(log, *g)).collect();
    if !kept.is_empty() {
        tracing::warn!(groups = ?kept, "no successor took over in time; leaving those groups as their leader");
    }
    steward(log).handing_over.clear();
}

/// The first step of a hand-over: the groups this node leads and that have another voter to
/// take over (a single-voter group has nobody), which it appends nothing more to.
pub fn stop_appending_to_led_groups(log: &ReplicatedLog) -> BTreeSet<u32> {
    let has_other_voter = |group: u32| {
        log.groups().get(group as usize).is_some_and(|raft| {
            raft.metrics().borrow().membership_config.membership().voter_ids().any(|id| id != log.raft_id)
        })
    };
    let led: BTreeSet<u32> = (0..log.groups().len() as u32).filter(|g| leads(log, *g) && has_other_voter(*g)).collect();
    steward(log).handing_over = led.clone();
    led
}

fn leads(log: &ReplicatedLog, group: u32) -> bool {
    log.groups().get(group as usize).is_some_and(|raft| {
        let m = raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(log.raft_id)
    })
}

/// A voter of `group` other than this node, linked and not leaving, that has every entry this
/// node has; the lowest ordinal first, so the choice is the same every time.
fn successor(log: &ReplicatedLog, group: u32) -> Option<(u64, String)> {
    if log.appends_pending(group) {
        // An entry handed to Raft may not be in the log yet: the successor would lack it, and
        // this node would refuse it its vote.
        return None;
    }
    let raft = log.groups().get(group as usize)?;
    let m = raft.metrics().borrow().clone();
    let last = m.last_log_index?;
    let matched = m.replication.clone().unwrap_or_default();
    let membership = m.membership_config.membership();
    let live = live(log);
    membership
        .voter_ids()
        .filter(|id| *id != log.raft_id)
        .filter(|id| matched.get(id).copied().flatten().is_some_and(|l| l.index >= last))
        .filter_map(|id| live.get(&id).map(|(name, info)| (info.ordinal, id, name.clone())))
        .min()
        .map(|(_, id, name)| (id, name))
}

/// Ready: a majority of the voter slots is linked, and in every group this node is a member
/// that keeps up and votes if its ordinal has a voter slot. A leader election does not make
/// nodes unready: publishes wait for the new leader meanwhile.
fn update_readiness(log: &ReplicatedLog) {
    let must_vote = (log.ordinal as usize) < slots(log.size());
    let groups = log.groups();
    let mut led = 0;
    let mut voting = 0;
    let quorum = has_quorum(log);
    log.metrics.cluster_quorum.set(i64::from(quorum));
    log.metrics.cluster_size.set(log.size() as i64);
    let mut all_ready = !groups.is_empty() && quorum;
    for raft in groups {
        let m = raft.metrics().borrow().clone();
        let membership = m.membership_config.membership();
        let voter = membership.voter_ids().any(|id| id == log.raft_id);
        led += usize::from(m.state == ServerState::Leader);
        voting += usize::from(voter);
        let member = membership.get_node(&log.raft_id).is_some();
        let applied = m.last_applied.map_or(0, |l| l.index);
        let keeping_up = applied + CAUGHT_UP_LAG >= m.last_log_index.unwrap_or(0);
        all_ready &= member && keeping_up && (voter || !must_vote);
    }
    log.metrics.raft_groups_led.set(led as i64);
    log.metrics.raft_groups_voting.set(voting as i64);
    let was = log.ready.swap(all_ready, Ordering::AcqRel);
    if was != all_ready {
        tracing::info!(ready = all_ready, "room-log readiness changed");
    }
}

pub fn status(log: &ReplicatedLog) -> ReplicationStatus {
    let names: BTreeMap<u64, String> = log.members().iter().map(|(name, m)| (m.raft_id, name.clone())).collect();
    let groups = log
        .groups()
        .iter()
        .enumerate()
        .map(|(group, raft)| {
            let m = raft.metrics().borrow().clone();
            let membership = m.membership_config.membership();
            let name = |id: u64| {
                membership
                    .get_node(&id)
                    .map(|n| n.addr.clone())
                    .or_else(|| names.get(&id).cloned())
                    .unwrap_or_else(|| format!("{id:x}"))
            };
            GroupStatus {
                group: group as u32,
                role: format!("{:?}", m.state).to_lowercase(),
                leader: m.current_leader.map(name),
                term: m.current_term,
                voters: membership.voter_ids().map(name).collect(),
                learners: membership.learner_ids().map(name).collect(),
                last_log: m.last_log_index,
                last_applied: m.last_applied.map(|l| l.index),
            }
        })
        .collect();
    ReplicationStatus {
        raft_id: format!("{:x}", log.raft_id),
        ordinal: log.ordinal,
        size: log.size(),
        storage: log.config.storage,
        quorum: has_quorum(log),
        ready: log.ready.load(Ordering::Acquire),
        leaving: log.leaving.load(Ordering::Acquire),
        publishes_in_flight: log.waiting().len(),
        groups,
    }
}
