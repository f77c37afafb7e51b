//! Even load after a scale-out. WebSocket connections never move by themselves, so nodes added
//! by `kubectl scale` or an HPA would sit idle until clients churn. Every node reports its
//! connection count to its peers each second; while any node is more than
//! `rebalance.tolerance_percent` from the cluster's mean, the nodes above the mean close
//! connections down to it, at most `rebalance.connections_per_sec`, with close code 4000 and
//! reason `rebalance`. The clients
//! reconnect at once through the Service and resume exactly (the close flushes what their
//! outboxes hold and saves their positions first).
//!
//! Nothing moves while the cluster is not steady: a node missing, draining or without quorum,
//! nodes on different pod revisions (a rollout), shortly after the membership changed or after a
//! round of shedding. Young connections and sessions moved once before are never chosen.
//!
//! The [`Planner`] decides from what it is shown and the time it is given, so the seeded
//! simulation below replays exactly; [`run`] feeds it the live node.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::RebalanceConfig;

/// How often nodes tell their peers their load.
pub const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A report older than this no longer counts: its node (or the link to it) is gone.
pub const REPORT_STALE: Duration = Duration::from_secs(3);
/// How often the planner looks at the cluster and spends its shedding budget.
pub const STEP_EVERY: Duration = Duration::from_millis(100);

/// What a node tells its peers about its load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    pub connections: u64,
    /// The pod revision it runs (`cluster.revision`).
    #[serde(default)]
    pub revision: String,
    /// It serves clients: not draining, with quorum.
    pub ready: bool,
    /// It is shedding connections, or did within its last cooldown (so a rebalance that goes
    /// in rounds reads as one).
    #[serde(default)]
    pub rebalancing: bool,
}

/// One node's load, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeLoad {
    pub node: String,
    #[serde(flatten)]
    pub report: LoadReport,
}

/// The cluster at one moment, from one node's point of view.
#[derive(Debug, Clone)]
pub struct Observation {
    pub now: Instant,
    /// The cluster's intended size (`cluster.size`).
    pub size: usize,
    pub own: NodeLoad,
    /// This node's connections that may move (old enough, never moved, not closing).
    pub movable: u64,
    /// The peers whose reports are fresh.
    pub peers: Vec<NodeLoad>,
}

impl Observation {
    fn nodes(&self) -> impl Iterator<Item = &NodeLoad> {
        std::iter::once(&self.own).chain(&self.peers)
    }

    fn mean(&self) -> f64 {
        let total: u64 = self.nodes().map(|n| n.report.connections).sum();
        total as f64 / (self.peers.len() + 1) as f64
    }

    /// Whether every node is within `tolerance_percent` of the mean, above and below (with
    /// whole connections: the mean rounded up or down always is).
    pub fn within(&self, tolerance_percent: u32) -> bool {
        let mean = self.mean();
        let tolerance = f64::from(tolerance_percent) / 100.0;
        let (high, low) = ((mean * (1.0 + tolerance)).max(mean.ceil()), (mean * (1.0 - tolerance)).min(mean.floor()));
        self.nodes().all(|n| (low..=high).contains(&(n.report.connections as f64)))
    }

    /// How far the busiest node is above the mean, in percent (0 for an empty cluster).
    pub fn spread_percent(&self) -> f64 {
        let mean = self.mean();
        let busiest = self.nodes().map(|n| n.report.connections).max().unwrap_or(0);
        if mean <= 0.0 { 0.0 } else { (busiest as f64 - mean) / mean * 100.0 }
    }
}

/// Why a node does not shed now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Hold {
    Disabled,
    /// Fewer (or more) nodes report than the cluster's intended size: one is down or starting,
    /// or the cluster is being resized.
    MembersMissing,
    /// A node drains, or has no quorum.
    NotReady,
    /// Nodes run different pod revisions: a rollout is under way.
    Rolling,
    /// The membership changed moments ago.
    Settling,
    /// The cluster's connection count is changing fast (clients arriving or leaving): counts
    /// reported a second apart do not compare yet.
    Changing,
    /// A round of shedding ended moments ago; the moved clients are still arriving.
    Cooldown,
    /// Every node is within the tolerance, or this one is at or below the mean.
    Balanced,
    /// This node is above the mean, but every connection it holds is too young or was moved
    /// here before: nothing may move.
    NothingToMove,
}

/// What the node should do now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Hold(Hold),
    /// Close this many eligible connections now (0: the budget refills).
    Shed(usize),
}

/// A round of shedding: down to the mean at its start, spent at the configured rate.
#[derive(Debug, Clone, Copy)]
struct Round {
    target: u64,
}

/// Decides when this node sheds and how many connections, from observations only.
pub struct Planner {
    config: RebalanceConfig,
    /// The nodes (and their revisions) last seen, to notice membership changes.
    members: Vec<(String, String)>,
    settle_until: Instant,
    cooldown_until: Instant,
    round: Option<Round>,
    /// Connections that may be closed now: refilled at `connections_per_sec`.
    tokens: f64,
    last_step: Instant,
    /// The cluster's total connection count at each step of the last `cooldown_secs`.
    totals: VecDeque<(Instant, u64)>,
}

impl Planner {
    pub fn new(config: RebalanceConfig, now: Instant) -> Planner {
        Planner {
            settle_until: now + settle_time(&config),
            cooldown_until: now,
            config,
            members: Vec::new(),
            round: None,
            tokens: 0.0,
            last_step: now,
            totals: VecDeque::new(),
        }
    }

    pub fn shedding(&self) -> bool {
        self.round.is_some()
    }

    /// Shedding now, or within the last cooldown.
    pub fn rebalancing(&self, now: Instant) -> bool {
        self.round.is_some() || now < self.cooldown_until
    }

    /// The next step for the cluster as observed.
    pub fn step(&mut self, obs: &Observation) -> Step {
        let elapsed = obs.now.saturating_duration_since(self.last_step);
        self.last_step = obs.now;
        match self.hold(obs) {
            Some(hold) => {
                self.end_round(obs.now);
                Step::Hold(hold)
            }
            None => {
                let rate = f64::from(self.config.connections_per_sec);
                // A burst of at most a fifth of a second's budget: closes spread evenly.
                self.tokens = (self.tokens + rate * elapsed.as_secs_f64()).min((rate / 5.0).max(1.0));
                let target = self.round.map_or(0, |r| r.target);
                let excess = obs.own.report.connections.saturating_sub(target);
                let now = (self.tokens.floor() as u64).min(excess);
                Step::Shed(usize::try_from(now).unwrap_or(usize::MAX))
            }
        }
    }

    /// `asked` connections were to be closed and `closed` were: fewer means none is left that
    /// may move (all young or moved before), so the round ends.
    pub fn shed(&mut self, now: Instant, asked: usize, closed: usize) {
        self.tokens = (self.tokens - closed as f64).max(0.0);
        if closed < asked {
            self.end_round(now);
        }
    }

    fn end_round(&mut self, now: Instant) {
        if self.round.take().is_some() {
            self.cooldown_until = now + Duration::from_secs(self.config.cooldown_secs);
        }
    }

    /// Why nothing is shed now, if so; starts or ends a round as the counts say.
    fn hold(&mut self, obs: &Observation) -> Option<Hold> {
        if !self.config.enabled {
            return Some(Hold::Disabled);
        }
        let mut members: Vec<(String, String)> =
            obs.nodes().map(|n| (n.node.clone(), n.report.revision.clone())).collect();
        members.sort();
        if members != self.members {
            self.members = members;
            self.settle_until = obs.now + settle_time(&self.config);
        }
        if obs.peers.len() + 1 != obs.size {
            return Some(Hold::MembersMissing);
        }
        if obs.nodes().any(|n| !n.report.ready) {
            return Some(Hold::NotReady);
        }
        if obs.peers.iter().any(|n| n.report.revision != obs.own.report.revision) {
            return Some(Hold::Rolling);
        }
        let steady = self.steady(obs);
        if obs.now < self.settle_until {
            return Some(Hold::Settling);
        }
        let own = obs.own.report.connections;
        let mean = obs.mean();
        let even = obs.within(self.config.tolerance_percent);
        if let Some(round) = self.round {
            // The target stays the mean at the round's start: the mean seen meanwhile is low by
            // the clients still on their way to another node.
            return (own <= round.target || even).then(|| {
                self.end_round(obs.now);
                Hold::Cooldown
            });
        }
        if obs.now < self.cooldown_until {
            return Some(Hold::Cooldown);
        }
        // Only a steady total is compared: while clients pour in, this node's live count runs a
        // second ahead of its peers' reports and would look like an excess.
        if !steady {
            return Some(Hold::Changing);
        }
        // Every node above the mean sheds its excess while any node is beyond the tolerance,
        // above or below: new nodes fill up even when no old one is far above.
        let target = mean.ceil() as u64;
        if even || own <= target {
            return Some(Hold::Balanced);
        }
        if obs.movable == 0 {
            return Some(Hold::NothingToMove);
        }
        tracing::info!(
            connections = own,
            mean = format!("{mean:.1}"),
            target,
            "rebalance: shedding connections down to the cluster's mean"
        );
        self.round = Some(Round { target });
        self.tokens = 0.0;
        None
    }
}

impl Planner {
    /// Records the cluster's total and says whether it stayed within half the tolerance over
    /// the last `cooldown_secs`.
    fn steady(&mut self, obs: &Observation) -> bool {
        let window = Duration::from_secs(self.config.cooldown_secs);
        let total: u64 = obs.nodes().map(|n| n.report.connections).sum();
        self.totals.push_back((obs.now, total));
        while self.totals.front().is_some_and(|(at, _)| obs.now.saturating_duration_since(*at) > window) {
            self.totals.pop_front();
        }
        let covered =
            self.totals.front().is_some_and(|(at, _)| obs.now.saturating_duration_since(*at) >= window.mul_f64(0.9));
        let (low, high) = self.totals.iter().fold((u64::MAX, 0), |(lo, hi), (_, t)| (lo.min(*t), hi.max(*t)));
        let allowed = (total as f64 * f64::from(self.config.tolerance_percent) / 200.0).max(1.0);
        covered && (high - low) as f64 <= allowed
    }
}

fn settle_time(config: &RebalanceConfig) -> Duration {
    Duration::from_secs(config.cooldown_secs * 2)
}

/// What `/cluster` shows of the rebalancing.
#[derive(Debug, Clone, Serialize)]
pub struct BalanceView {
    pub enabled: bool,
    /// This node is shedding connections.
    pub shedding: bool,
    /// Some node of the cluster sheds connections or did within its cooldown: a rebalance is
    /// under way.
    pub rebalancing: bool,
    /// Every node is within the tolerance of the mean.
    pub even: bool,
    /// Why this node does not shed now, if it does not.
    pub hold: Option<Hold>,
    pub mean: f64,
    pub spread_percent: f64,
    pub nodes: Vec<NodeLoad>,
}

/// The node's side of the rebalancing that the rest of the node reads: what it reports to its
/// peers and shows at `/cluster`.
#[derive(Default)]
pub struct Status {
    rebalancing: AtomicBool,
    view: Mutex<Option<BalanceView>>,
}

impl Status {
    /// This node sheds, or did within its cooldown.
    pub fn rebalancing(&self) -> bool {
        self.rebalancing.load(Ordering::Acquire)
    }

    pub fn view(&self) -> Option<BalanceView> {
        self.view.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn publish(&self, view: BalanceView, rebalancing: bool) {
        self.rebalancing.store(rebalancing, Ordering::Release);
        *self.view.lock().unwrap_or_else(|p| p.into_inner()) = Some(view);
    }
}

/// Where the live node's counts come from (the replicated log in a cluster).
pub trait LoadSource: Send + Sync {
    /// The cluster's intended size.
    fn size(&self) -> usize;
    /// The peers whose reports arrived within [`REPORT_STALE`] of `now`.
    fn peer_loads(&self, now: Instant) -> Vec<NodeLoad>;
}

/// Runs the planner for the node's lifetime: each step observes the cluster, closes what the
/// planner says, and publishes the outcome for `/cluster`, the metrics and the load reports.
pub async fn run(hub: Arc<crate::hub::Hub>, source: Arc<dyn LoadSource>) {
    let config = hub.config().rebalance.clone();
    let min_age = Duration::from_secs(config.min_connection_age_secs);
    let mut planner = Planner::new(config.clone(), Instant::now());
    let mut tick = tokio::time::interval(STEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let metrics = hub.metrics().clone();
    loop {
        tick.tick().await;
        let now = Instant::now();
        let obs = Observation {
            now,
            size: source.size(),
            own: NodeLoad { node: hub.node_id().to_owned(), report: hub.load_report() },
            movable: hub.movable_connections(min_age) as u64,
            peers: source.peer_loads(now),
        };
        let was_shedding = planner.shedding();
        let step = planner.step(&obs);
        if let Step::Shed(asked) = step
            && asked > 0
        {
            let closed = hub.shed(asked, min_age);
            planner.shed(now, asked, closed);
        }
        let shedding = planner.shedding();
        if shedding && !was_shedding {
            metrics.rebalance_rounds.inc();
        }
        if was_shedding && !shedding {
            tracing::info!(connections = hub.open_connections(), hold = ?step, "rebalance: round ended");
        }
        metrics.rebalance_shedding.set(i64::from(shedding));
        let spread = obs.spread_percent();
        metrics.rebalance_spread_percent.set(spread.round() as i64);
        let rebalancing = planner.rebalancing(now);
        let view = BalanceView {
            enabled: config.enabled,
            shedding,
            rebalancing: rebalancing || obs.peers.iter().any(|p| p.report.rebalancing),
            even: obs.within(config.tolerance_percent),
            hold: match step {
                Step::Hold(hold) => Some(hold),
                Step::Shed(_) => None,
            },
            mean: (obs.mean() * 10.0).round() / 10.0,
            spread_percent: (spread * 10.0).round() / 10.0,
            nodes: obs.nodes().cloned().collect(),
        };
        hub.balance().publish(view, rebalancing);
    }
}

#[cfg(test)]
mod tests;
