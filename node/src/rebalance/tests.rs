//! The planner in a seeded simulation of a whole cluster: nodes report their counts each second,
//! shed clients reconnect after a random delay to a random node (as through a Service), and the
//! run replays exactly from its seed.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::*;

const TOLERANCE: u32 = 10;
const RATE: u32 = 100;
const MIN_AGE: Duration = Duration::from_secs(10);

fn config() -> RebalanceConfig {
    RebalanceConfig {
        enabled: true,
        tolerance_percent: TOLERANCE,
        connections_per_sec: RATE,
        min_connection_age_secs: MIN_AGE.as_secs(),
        cooldown_secs: 5,
    }
}

struct Client {
    node: Option<usize>,
    since: Instant,
    moved: bool,
    moves: u32,
    reconnect_at: Option<Instant>,
}

struct Node {
    name: String,
    planner: Planner,
    revision: String,
    ready: bool,
    /// The last report its peers got, with when.
    reported: Option<(LoadReport, Instant)>,
    /// Connections closed per whole second of the run.
    shed_per_second: BTreeMap<u64, usize>,
}

struct Sim {
    rng: StdRng,
    start: Instant,
    now: Instant,
    nodes: Vec<Node>,
    clients: Vec<Client>,
    size: usize,
    /// `rebalance.min_connection_age_secs` (the hub's choice, so the sim's here).
    min_age: Duration,
}

impl Sim {
    /// `nodes` nodes holding `clients` old connections between them, evenly.
    fn new(seed: u64, nodes: usize, clients: usize) -> Sim {
        let start = Instant::now();
        let mut sim = Sim {
            rng: StdRng::seed_from_u64(seed),
            start,
            now: start,
            nodes: Vec::new(),
            clients: Vec::new(),
            size: nodes,
            min_age: MIN_AGE,
        };
        for _ in 0..nodes {
            sim.add_node();
        }
        let long_ago = start.checked_sub(Duration::from_secs(3600)).unwrap_or(start);
        sim.clients = (0..clients)
            .map(|i| Client { node: Some(i % nodes), since: long_ago, moved: false, moves: 0, reconnect_at: None })
            .collect();
        sim
    }

    fn add_node(&mut self) {
        let name = format!("chat-{}", self.nodes.len());
        let planner = Planner::new(config(), self.now);
        self.nodes.push(Node {
            name,
            planner,
            revision: "r1".into(),
            ready: true,
            reported: None,
            shed_per_second: BTreeMap::new(),
        });
    }

    fn count(&self, node: usize) -> u64 {
        self.clients.iter().filter(|c| c.node == Some(node)).count() as u64
    }

    fn report(&self, node: usize) -> LoadReport {
        let n = &self.nodes[node];
        LoadReport {
            connections: self.count(node),
            revision: n.revision.clone(),
            ready: n.ready,
            rebalancing: n.planner.rebalancing(self.now),
        }
    }

    /// Advances the run by one planner step.
    fn step(&mut self) {
        self.now += STEP_EVERY;
        let now = self.now;
        let elapsed = now - self.start;
        // Reports go out each second, each node at its own phase.
        for i in 0..self.nodes.len() {
            let phase = Duration::from_millis(100 * i as u64 % 1000);
            if elapsed.as_millis() % 1000 == phase.as_millis() {
                self.nodes[i].reported = Some((self.report(i), now));
            }
        }
        // Moved clients arrive wherever the Service sends them.
        let live = self.nodes.len();
        for c in 0..self.clients.len() {
            if self.clients[c].reconnect_at.is_some_and(|at| at <= now) {
                let node = self.rng.random_range(0..live);
                let client = &mut self.clients[c];
                client.node = Some(node);
                client.since = now;
                client.reconnect_at = None;
            }
        }
        for i in 0..self.nodes.len() {
            let obs = self.observe(i);
            let step = self.nodes[i].planner.step(&obs);
            if let Step::Shed(asked) = step {
                let closed = self.shed(i, asked);
                self.nodes[i].planner.shed(now, asked, closed);
                *self.nodes[i].shed_per_second.entry(elapsed.as_secs()).or_default() += closed;
            }
        }
    }

    fn observe(&self, i: usize) -> Observation {
        let peers = (0..self.nodes.len())
            .filter(|&j| j != i)
            .filter_map(|j| {
                let (report, at) = self.nodes[j].reported.clone()?;
                (self.now - at < REPORT_STALE).then(|| NodeLoad { node: self.nodes[j].name.clone(), report })
            })
            .collect();
        let movable = self.clients.iter().filter(|c| self.may_move(c, i)).count() as u64;
        Observation {
            now: self.now,
            size: self.size,
            own: NodeLoad { node: self.nodes[i].name.clone(), report: self.report(i) },
            movable,
            peers,
        }
    }

    fn may_move(&self, client: &Client, node: usize) -> bool {
        client.node == Some(node) && !client.moved && self.now - client.since >= self.min_age
    }

    /// Closes up to `asked` eligible clients of node `i`, chosen at random, as `Hub::shed` does.
    fn shed(&mut self, i: usize, asked: usize) -> usize {
        let now = self.now;
        let mut eligible: Vec<usize> =
            (0..self.clients.len()).filter(|&c| self.may_move(&self.clients[c], i)).collect();
        let mut closed = 0;
        while closed < asked && !eligible.is_empty() {
            let pick = eligible.swap_remove(self.rng.random_range(0..eligible.len()));
            let delay = Duration::from_millis(self.rng.random_range(0..1000));
            let client = &mut self.clients[pick];
            client.node = None;
            client.moved = true;
            client.moves += 1;
            client.reconnect_at = Some(now + delay);
            closed += 1;
        }
        closed
    }

    /// What node `i`'s planner says now.
    fn next_step(&mut self, i: usize) -> Step {
        let obs = self.observe(i);
        self.nodes[i].planner.step(&obs)
    }

    fn run_for(&mut self, time: Duration) {
        let steps = time.as_millis() / STEP_EVERY.as_millis();
        for _ in 0..steps {
            self.step();
        }
    }

    /// Runs until every node is within tolerance and every client is connected, at most `limit`.
    fn run_until_even(&mut self, limit: Duration) -> Option<Duration> {
        let deadline = self.now + limit;
        while self.now < deadline {
            self.step();
            if self.even() {
                return Some(self.now - self.start);
            }
        }
        None
    }

    fn mean(&self) -> f64 {
        self.clients.len() as f64 / self.nodes.len() as f64
    }

    /// Every client connected and every node within the tolerance of the mean, both ways.
    fn even(&self) -> bool {
        let mean = self.mean();
        let tolerance = f64::from(TOLERANCE) / 100.0;
        let (high, low) = ((mean * (1.0 + tolerance)).max(mean.ceil()), (mean * (1.0 - tolerance)).min(mean.floor()));
        self.clients.iter().all(|c| c.node.is_some())
            && (0..self.nodes.len()).all(|i| (low..=high).contains(&(self.count(i) as f64)))
    }

    fn total_shed(&self) -> usize {
        self.nodes.iter().flat_map(|n| n.shed_per_second.values()).sum()
    }

    /// Scales out to `size` nodes (their reports start with the next second).
    fn scale_to(&mut self, size: usize) {
        self.size = size;
        while self.nodes.len() < size {
            self.add_node();
        }
    }
}

#[test]
fn a_scale_out_evens_out_once_per_client_at_the_rate() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed, 3, 3000);
        sim.run_for(Duration::from_secs(15));
        assert_eq!(sim.total_shed(), 0, "seed {seed}: an even cluster sheds nothing");
        sim.scale_to(5);
        let took = sim.run_until_even(Duration::from_secs(180));
        let took = took.unwrap_or_else(|| {
            let counts: Vec<u64> = (0..5).map(|i| sim.count(i)).collect();
            panic!("seed {seed}: not even after 180 s: {counts:?}")
        });
        // A while longer: nothing more moves once even.
        let shed = sim.total_shed();
        sim.run_for(Duration::from_secs(30));
        assert_eq!(sim.total_shed(), shed, "seed {seed}: shedding went on after the cluster was even");
        assert!(sim.clients.iter().all(|c| c.moves <= 1), "seed {seed}: a client was moved twice");
        for node in &sim.nodes {
            let worst = node.shed_per_second.values().max().copied().unwrap_or(0);
            // The rate, plus the one-fifth-second burst at a second's edge.
            assert!(worst <= (RATE + RATE / 5) as usize, "seed {seed}: {} shed {worst} in one second", node.name);
        }
        assert!(took < Duration::from_secs(90), "seed {seed}: took {took:?}");
        println!("seed {seed}: even {:.1} s after the scale-out, {shed} clients moved", took.as_secs_f64() - 15.0);
    }
}

#[test]
fn the_same_seed_replays_the_same_run() {
    let run = |seed| {
        let mut sim = Sim::new(seed, 3, 900);
        sim.run_for(Duration::from_secs(12));
        sim.scale_to(4);
        let took = sim.run_until_even(Duration::from_secs(120));
        let counts: Vec<u64> = (0..4).map(|i| sim.count(i)).collect();
        (took, counts, sim.total_shed())
    };
    assert_eq!(run(7), run(7));
}

#[test]
fn nodes_on_different_revisions_shed_nothing() {
    let mut sim = Sim::new(1, 3, 3000);
    sim.run_for(Duration::from_secs(15));
    sim.scale_to(5);
    // A rollout: the new pods run the new revision, the old ones not yet.
    sim.nodes[3].revision = "r2".into();
    sim.nodes[4].revision = "r2".into();
    sim.run_for(Duration::from_secs(60));
    assert_eq!(sim.total_shed(), 0);
    assert!((0..5).all(|i| sim.next_step(i) == Step::Hold(Hold::Rolling)));
}

#[test]
fn no_shedding_without_every_node_ready_and_present() {
    // A node draining (or without quorum) holds everyone.
    let mut sim = Sim::new(2, 3, 3000);
    sim.run_for(Duration::from_secs(15));
    sim.scale_to(5);
    sim.nodes[4].ready = false;
    sim.run_for(Duration::from_secs(60));
    assert_eq!(sim.total_shed(), 0);
    assert_eq!(sim.observe(0).peers.len(), 4);
    assert_eq!(sim.next_step(0), Step::Hold(Hold::NotReady));

    // The intended size says five, and only four report.
    let mut sim = Sim::new(3, 3, 3000);
    sim.run_for(Duration::from_secs(15));
    sim.scale_to(4);
    sim.size = 5;
    sim.run_for(Duration::from_secs(60));
    assert_eq!(sim.total_shed(), 0);
    assert_eq!(sim.next_step(0), Step::Hold(Hold::MembersMissing));

    // Once the missing node reports, shedding starts, but only after the membership settled.
    sim.scale_to(5);
    let joined = sim.now;
    while sim.total_shed() == 0 && sim.now - joined < Duration::from_secs(60) {
        sim.step();
    }
    let waited = sim.now - joined;
    assert!(waited >= Duration::from_secs(2 * config().cooldown_secs), "shed {waited:?} after the membership changed");
}

#[test]
fn a_hold_mid_round_stops_the_shedding_at_once() {
    let mut sim = Sim::new(4, 3, 3000);
    sim.run_for(Duration::from_secs(15));
    sim.scale_to(5);
    while sim.total_shed() == 0 {
        sim.step();
    }
    // A rollout starts: node 0 restarts on a new revision.
    sim.nodes[0].revision = "r2".into();
    sim.run_for(Duration::from_secs(2));
    let shed = sim.total_shed();
    sim.run_for(Duration::from_secs(30));
    assert_eq!(sim.total_shed(), shed, "nothing is shed while the revisions differ");
}

#[test]
fn young_connections_and_moved_sessions_stay() {
    // Node 0's clients all connected 5 s in, so they are young until 15 s; the planner may
    // start at 10 s (the membership settled), finds none it may move and ends its round.
    let mut sim = Sim::new(5, 2, 200);
    sim.run_for(Duration::from_secs(5));
    for client in sim.clients.iter_mut().filter(|c| c.node == Some(0)) {
        client.since = sim.now;
    }
    // Node 1's clients were moved here before: they never move again.
    for client in sim.clients.iter_mut().filter(|c| c.node == Some(1)) {
        client.moved = true;
    }
    sim.scale_to(3);
    sim.run_for(Duration::from_millis(9_900));
    assert_eq!(sim.count(0), 100, "young connections were shed");
    let moved_before: Vec<usize> = (0..sim.clients.len()).filter(|&c| sim.clients[c].node == Some(1)).collect();
    sim.run_for(Duration::from_secs(60));
    assert!(
        moved_before.iter().all(|&c| sim.clients[c].moves == 0 && sim.clients[c].node == Some(1)),
        "moved sessions were moved again"
    );
    assert!(sim.count(0) < 100, "old connections were not shed");
    assert!(sim.clients.iter().all(|c| c.moves <= 1));
}

fn load(node: &str, connections: u64) -> NodeLoad {
    NodeLoad {
        node: node.into(),
        report: LoadReport { connections, revision: String::new(), ready: true, rebalancing: false },
    }
}

#[test]
fn only_a_node_beyond_the_tolerance_sheds_and_only_down_to_the_mean() {
    let start = Instant::now();
    let settled = start + Duration::from_secs(60);
    let observe = |own, others: [u64; 2], at| Observation {
        now: at,
        size: 3,
        own: load("a", own),
        movable: own,
        peers: vec![load("b", others[0]), load("c", others[1])],
    };
    // The same counts for a while: the membership settled and the total is steady.
    let steady = |planner: &mut Planner, own, others| {
        let mut at = settled - Duration::from_secs(12);
        while at < settled {
            let _ = planner.step(&observe(own, others, at));
            at += STEP_EVERY;
        }
    };
    // 108 against a mean of 100: within 10 %.
    let mut planner = Planner::new(config(), start);
    steady(&mut planner, 108, [96, 96]);
    assert_eq!(planner.step(&observe(108, [96, 96], settled)), Step::Hold(Hold::Balanced));
    // 130 against a mean of 110: beyond it. The budget refills at the rate, a fifth of a second
    // at most, and the round ends at the mean it started with.
    let mut planner = Planner::new(config(), start);
    steady(&mut planner, 130, [100, 100]);
    let mut at = settled;
    let mut own = 130;
    let mut steps = Vec::new();
    for _ in 0..10 {
        at += STEP_EVERY;
        // The others' reports lag: they still count the clients on their way.
        match planner.step(&observe(own, [100, 100], at)) {
            Step::Shed(n) => {
                planner.shed(at, n, n);
                own -= n as u64;
                steps.push(n);
            }
            Step::Hold(hold) => {
                assert_eq!(hold, Hold::Cooldown);
                break;
            }
        }
    }
    assert_eq!(own, 110, "shed to the mean: {steps:?}");
    assert!(steps.iter().all(|&n| n <= 20), "a step closed more than a fifth of a second's budget: {steps:?}");
    assert!(!planner.shedding());
    // And nothing more until the cooldown is over, even if the counts say so.
    assert_eq!(planner.step(&observe(140, [100, 100], at + Duration::from_secs(1))), Step::Hold(Hold::Cooldown));
}

#[test]
fn clients_pouring_in_are_not_taken_for_an_excess() {
    // Clients connect round-robin over six seconds: each node's own count runs up to a second
    // ahead of its peers' reports, which looks like 30 % and more above the mean.
    let mut sim = Sim::new(6, 3, 0);
    // Old enough to move long before the last ones arrive.
    sim.min_age = Duration::from_secs(1);
    sim.run_for(Duration::from_secs(15));
    let start = sim.now;
    sim.clients = (0..3000)
        .map(|i| Client {
            node: None,
            since: start,
            moved: false,
            moves: 0,
            reconnect_at: Some(start + Duration::from_millis(2 * i as u64)),
        })
        .collect();
    let mut first = (0..3000).map(|i| i % 3);
    // The sim sends reconnects to random nodes; first connections go round-robin instead.
    for _ in 0..70 {
        sim.now += STEP_EVERY;
        let now = sim.now;
        for client in sim.clients.iter_mut().filter(|c| !c.moved && c.reconnect_at.is_some_and(|at| at <= now)) {
            client.node = first.next();
            client.reconnect_at = None;
        }
        sim.now -= STEP_EVERY;
        sim.step();
    }
    sim.run_for(Duration::from_secs(30));
    assert_eq!(sim.total_shed(), 0, "clients were moved off an evenly filled cluster");
}

#[test]
fn a_node_with_nothing_it_may_move_holds_without_empty_rounds() {
    let start = Instant::now();
    let mut planner = Planner::new(config(), start);
    let mut at = start;
    let mut steps = Vec::new();
    // 130 against a mean of 110 for a minute, every connection young or moved here before.
    while at < start + Duration::from_secs(60) {
        let obs = Observation {
            now: at,
            size: 3,
            own: load("a", 130),
            movable: 0,
            peers: vec![load("b", 100), load("c", 100)],
        };
        steps.push(planner.step(&obs));
        assert!(!planner.rebalancing(at), "an empty round reads as a rebalance");
        at += STEP_EVERY;
    }
    assert_eq!(steps.last(), Some(&Step::Hold(Hold::NothingToMove)));
    assert!(steps.iter().all(|s| !matches!(s, Step::Shed(_))));
}

#[test]
fn a_disabled_planner_holds() {
    let now = Instant::now();
    let mut planner = Planner::new(RebalanceConfig { enabled: false, ..config() }, now);
    let obs = Observation {
        now: now + Duration::from_secs(60),
        size: 2,
        own: load("a", 100),
        movable: 100,
        peers: vec![load("b", 0)],
    };
    assert_eq!(planner.step(&obs), Step::Hold(Hold::Disabled));
    assert!((obs.spread_percent() - 100.0).abs() < 1e-9);
}
