//! What local mode's StatefulSet controller (and the operator's step-wise scale-down) does next,
//! decided from a snapshot of the nodes: pure, so the order of things is unit-tested.

use std::collections::BTreeMap;

/// One ordinal as the supervisor sees it now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Slot {
    Running {
        ready: bool,
        /// Ready for at least the rollout's `minReadySeconds`.
        ready_long_enough: bool,
        /// Started with a config that needs a restart to change (revision or local settings).
        outdated: bool,
        /// Its `node.toml` has another `cluster.size` than wanted (changed in place, no restart).
        size_stale: bool,
    },
    /// Exited; `restart_now` once its back-off is over or a new revision may fix it.
    Crashed { restart_now: bool },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Rewrite `cluster.size` in these running nodes' configs.
    Resize(Vec<u32>),
    /// Drain and remove this node (the highest ordinal), then wait for the rest to be ready.
    ScaleDown(u32),
    Start(Vec<u32>),
    Roll(u32),
    Idle,
}

/// The next step towards `replicas` nodes, all on the current config.
///
/// Sizes are rewritten first, so on a scale-down every node knows the new size before the first
/// one leaves. Nodes are removed one at a time, highest ordinal first, each once every node that
/// stays is ready; crashed nodes are restarted meanwhile (they may be what the removal waits for).
/// Rollouts wait until the scale-down is done.
pub fn next(replicas: u32, rolling: bool, slots: &BTreeMap<u32, Slot>, last_rolled: Option<u32>) -> Step {
    let stale: Vec<u32> =
        slots.iter().filter(|(_, s)| matches!(s, Slot::Running { size_stale: true, .. })).map(|(i, _)| *i).collect();
    if !stale.is_empty() {
        return Step::Resize(stale);
    }
    let ready = |s: &Slot| matches!(s, Slot::Running { ready: true, .. });
    let highest_extra = slots.range(replicas..).next_back().map(|(i, _)| *i);
    if let Some(highest) = highest_extra
        && slots.range(..highest).all(|(_, s)| ready(s))
    {
        return Step::ScaleDown(highest);
    }
    let missing: Vec<u32> = (0..replicas)
        .filter(|i| match slots.get(i) {
            None => true,
            Some(Slot::Crashed { restart_now }) => *restart_now,
            Some(Slot::Running { .. }) => false,
        })
        .collect();
    if !missing.is_empty() {
        return Step::Start(missing);
    }
    if highest_extra.is_some() || !rolling {
        return Step::Idle;
    }
    let mut outdated = slots.iter().filter(|(_, s)| matches!(s, Slot::Running { outdated: true, .. }));
    let Some((&highest, _)) = outdated.next_back() else { return Step::Idle };
    // One at a time: every node ready, and the last one rolled ready for minReadySeconds.
    let all_ready = slots.values().all(ready);
    let settled = last_rolled
        .and_then(|i| slots.get(&i))
        .is_none_or(|s| matches!(s, Slot::Running { ready_long_enough: true, .. }));
    if all_ready && settled { Step::Roll(highest) } else { Step::Idle }
}

#[cfg(test)]
mod tests {
    use super::*;

    const READY: Slot = Slot::Running { ready: true, ready_long_enough: true, outdated: false, size_stale: false };
    const UNREADY: Slot = Slot::Running { ready: false, ready_long_enough: false, outdated: false, size_stale: false };
    const STALE: Slot = Slot::Running { ready: true, ready_long_enough: true, outdated: false, size_stale: true };
    const OUTDATED: Slot = Slot::Running { ready: true, ready_long_enough: true, outdated: true, size_stale: false };

    fn slots(list: &[Slot]) -> BTreeMap<u32, Slot> {
        (0u32..).zip(list.iter().copied()).collect()
    }

    #[test]
    fn scale_up_starts_the_new_nodes_at_once_after_resizing_the_others() {
        let running = slots(&[STALE, STALE, STALE]);
        assert_eq!(next(5, true, &running, None), Step::Resize(vec![0, 1, 2]));
        assert_eq!(next(5, true, &slots(&[READY, READY, READY]), None), Step::Start(vec![3, 4]));
        // Starting never waits for readiness (the StatefulSet is Parallel).
        assert_eq!(next(5, true, &slots(&[UNREADY, READY, READY]), None), Step::Start(vec![3, 4]));
    }

    #[test]
    fn scale_down_resizes_then_removes_one_node_at_a_time() {
        assert_eq!(next(2, true, &slots(&[STALE, STALE, STALE, STALE]), None), Step::Resize(vec![0, 1, 2, 3]));
        assert_eq!(next(2, true, &slots(&[READY, READY, READY, READY]), None), Step::ScaleDown(3));
        // The next one only once every node that stays is ready.
        assert_eq!(next(2, true, &slots(&[READY, UNREADY, READY]), None), Step::Idle);
        assert_eq!(next(2, true, &slots(&[READY, READY, READY]), None), Step::ScaleDown(2));
        // The one leaving need not be ready (it may be what the user is getting rid of).
        assert_eq!(next(2, true, &slots(&[READY, READY, UNREADY]), None), Step::ScaleDown(2));
        let crashed = Slot::Crashed { restart_now: false };
        assert_eq!(next(2, true, &slots(&[READY, READY, crashed]), None), Step::ScaleDown(2));
        assert_eq!(next(0, true, &slots(&[READY]), None), Step::ScaleDown(0));
    }

    #[test]
    fn a_crashed_node_that_stays_is_restarted_while_the_scale_down_waits() {
        let due = Slot::Crashed { restart_now: true };
        assert_eq!(next(2, true, &slots(&[due, READY, READY]), None), Step::Start(vec![0]));
        let waiting = Slot::Crashed { restart_now: false };
        assert_eq!(next(2, true, &slots(&[waiting, READY, READY]), None), Step::Idle);
    }

    #[test]
    fn rollouts_go_highest_first_one_at_a_time_and_after_a_scale_down() {
        let all = slots(&[OUTDATED, OUTDATED, OUTDATED]);
        assert_eq!(next(3, true, &all, None), Step::Roll(2));
        assert_eq!(next(3, false, &all, None), Step::Idle, "OnDelete");
        let rolled_not_long_enough =
            Slot::Running { ready: true, ready_long_enough: false, outdated: false, size_stale: false };
        assert_eq!(next(3, true, &slots(&[OUTDATED, OUTDATED, rolled_not_long_enough]), Some(2)), Step::Idle);
        assert_eq!(next(3, true, &slots(&[OUTDATED, OUTDATED, READY]), Some(2)), Step::Roll(1));
        assert_eq!(next(3, true, &slots(&[OUTDATED, UNREADY, READY]), Some(2)), Step::Idle);
        // Outdated nodes beyond `replicas` are removed, not rolled.
        assert_eq!(next(2, true, &slots(&[OUTDATED, OUTDATED, OUTDATED]), None), Step::ScaleDown(2));
        assert_eq!(next(2, true, &slots(&[OUTDATED, UNREADY, OUTDATED]), None), Step::Idle);
    }
}
