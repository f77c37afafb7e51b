//! Scale-down one node at a time. Each removed node leaves its Raft groups (its leaderships move by election) and leaves the
//! voter set while it drains; removing several at once could take a majority of the voters away
//! before the membership has shrunk. So the StatefulSet's replicas drop by one, and the next step
//! waits until the StatefulSet has settled: the removed pod gone, every other pod ready and on
//! one revision. Scale-up needs no such care and goes at once.

use k8s_openapi::api::apps::v1::StatefulSet;

/// The StatefulSet's replicas for this reconcile, on the way to `wanted`.
pub fn step(wanted: i32, existing: Option<&StatefulSet>) -> i32 {
    let Some(current) = existing.and_then(|s| s.spec.replicas) else {
        return wanted;
    };
    match existing {
        Some(sts) if wanted < current && settled(sts) => current - 1,
        _ if wanted < current => current,
        _ => wanted,
    }
}

/// Whether the StatefulSet controller has finished its last change: it has seen the latest spec,
/// every pod it wants exists, is ready and runs one revision, and no other pod is left (a
/// terminating pod still counts in `status.replicas`).
pub fn settled(sts: &StatefulSet) -> bool {
    let Some(status) = sts.status.as_ref() else { return false };
    let want = sts.spec.replicas.unwrap_or(1);
    let seen = status.observed_generation.is_some() && status.observed_generation >= sts.metadata.generation;
    let one_revision = status.current_replicas.unwrap_or(0) == want || status.updated_replicas.unwrap_or(0) == want;
    seen && status.replicas == want && status.ready_replicas.unwrap_or(0) == want && one_revision
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{StatefulSetSpec, StatefulSetStatus};

    fn sts(want: i32, replicas: i32, ready: i32, updated: i32, current: i32) -> StatefulSet {
        let mut sts = StatefulSet {
            spec: StatefulSetSpec { replicas: Some(want), ..Default::default() },
            status: Some(StatefulSetStatus {
                observed_generation: Some(4),
                replicas,
                ready_replicas: Some(ready),
                updated_replicas: Some(updated),
                current_replicas: Some(current),
                ..Default::default()
            }),
            ..Default::default()
        };
        sts.metadata.generation = Some(4);
        sts
    }

    #[test]
    fn scale_up_and_creation_go_at_once() {
        assert_eq!(step(5, None), 5);
        assert_eq!(step(7, Some(&sts(3, 3, 1, 3, 3))), 7, "even while unsettled");
        assert_eq!(step(3, Some(&sts(3, 3, 3, 3, 3))), 3);
    }

    #[test]
    fn scale_down_takes_one_step_once_settled() {
        assert_eq!(step(2, Some(&sts(5, 5, 5, 5, 5))), 4);
        assert_eq!(step(0, Some(&sts(1, 1, 1, 1, 1))), 0);
        // The previous step's pod is still terminating.
        assert_eq!(step(2, Some(&sts(4, 5, 4, 4, 4))), 4);
        // A pod is not ready.
        assert_eq!(step(2, Some(&sts(4, 4, 3, 4, 4))), 4);
        // A rollout is half way.
        assert_eq!(step(2, Some(&sts(4, 4, 4, 2, 2))), 4);
        // OnDelete with a pending update: every pod on the current revision is settled.
        assert_eq!(step(2, Some(&sts(4, 4, 4, 0, 4))), 3);
        // The StatefulSet controller has not seen the last change yet.
        let mut unseen = sts(4, 4, 4, 4, 4);
        unseen.metadata.generation = Some(5);
        assert_eq!(step(2, Some(&unseen)), 4);
        let mut no_status = sts(4, 4, 4, 4, 4);
        no_status.status = None;
        assert_eq!(step(2, Some(&no_status)), 4);
    }
}
