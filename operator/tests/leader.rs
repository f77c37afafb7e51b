//! Lease election against the fake API: one leader at a time, renewal, release and takeover.

use std::time::Duration;

use chat_operator::fake::FakeApi;
use chat_operator::leader::LeaseElector;
use k8s_openapi::api::coordination::v1::Lease;

fn elector(fake: &FakeApi, id: &str) -> LeaseElector {
    LeaseElector::new(fake.client(), "ops", "chat-operator-leader", id, Duration::from_secs(15))
}

#[tokio::test]
async fn only_one_replica_leads_and_release_hands_over() {
    let fake = FakeApi::new();
    let (a, b) = (elector(&fake, "a"), elector(&fake, "b"));
    assert!(a.try_acquire_or_renew().await.unwrap());
    assert!(!b.try_acquire_or_renew().await.unwrap(), "a holds an unexpired lease");
    assert!(a.try_acquire_or_renew().await.unwrap(), "renewal by the holder");

    a.release().await.unwrap();
    assert!(b.try_acquire_or_renew().await.unwrap(), "a released lease is free");
    let lease = fake.get::<Lease>("ops", "chat-operator-leader").unwrap().spec.unwrap();
    assert_eq!(lease.holder_identity.as_deref(), Some("b"));
    assert_eq!(lease.lease_transitions, Some(1));
    assert!(!a.try_acquire_or_renew().await.unwrap());
}

#[tokio::test]
async fn expired_lease_is_taken_over() {
    let fake = FakeApi::new();
    let a = LeaseElector::new(fake.client(), "ops", "l", "a", Duration::from_secs(0));
    assert!(a.try_acquire_or_renew().await.unwrap());
    fake.edit::<Lease>("ops", "l", |l| l["spec"]["renewTime"] = serde_json::json!("2020-01-01T00:00:00.000000Z"));
    let b = LeaseElector::new(fake.client(), "ops", "l", "b", Duration::from_secs(15));
    assert!(b.try_acquire_or_renew().await.unwrap());
}

#[tokio::test]
async fn a_concurrent_write_loses_the_race() {
    let fake = FakeApi::new();
    let a = elector(&fake, "a");
    assert!(a.try_acquire_or_renew().await.unwrap());
    // Another writer changes the lease between our read and write: the replace gets a 409.
    fake.fail_next(http::Method::PUT, 409, 1);
    assert!(!a.try_acquire_or_renew().await.unwrap());
}

/// The holder's `renewTime` says nothing about expiry on this machine (clocks differ): a lease
/// another replica holds expires only after this replica saw it unchanged for its duration.
#[tokio::test(start_paused = true)]
async fn a_lease_with_an_old_renew_time_is_not_taken_until_seen_unchanged_for_its_duration() {
    let fake = FakeApi::new();
    let a = elector(&fake, "a");
    assert!(a.try_acquire_or_renew().await.unwrap());
    // a's clock runs years behind.
    fake.edit::<Lease>("ops", "chat-operator-leader", |l| {
        l["spec"]["renewTime"] = serde_json::json!("2020-01-01T00:00:00.000000Z")
    });
    let b = elector(&fake, "b");
    assert!(!b.try_acquire_or_renew().await.unwrap(), "first seen now: not expired");
    tokio::time::advance(Duration::from_secs(14)).await;
    assert!(!b.try_acquire_or_renew().await.unwrap(), "unchanged for 14 s of a 15 s lease");
    // a renews (with its skewed clock): the record changed, b starts counting again.
    fake.edit::<Lease>("ops", "chat-operator-leader", |l| {
        l["spec"]["renewTime"] = serde_json::json!("2020-01-01T00:00:05.000000Z")
    });
    tokio::time::advance(Duration::from_secs(2)).await;
    assert!(!b.try_acquire_or_renew().await.unwrap(), "renewed 2 s ago");
    tokio::time::advance(Duration::from_secs(15)).await;
    assert!(b.try_acquire_or_renew().await.unwrap(), "unchanged for a whole lease: taken over");
}

#[tokio::test]
async fn renewing_keeps_what_else_the_lease_holds() {
    let fake = FakeApi::new();
    let a = elector(&fake, "a");
    assert!(a.try_acquire_or_renew().await.unwrap());
    fake.edit::<Lease>("ops", "chat-operator-leader", |l| {
        l["metadata"]["labels"] = serde_json::json!({"team": "chat"});
        l["spec"]["preferredHolder"] = serde_json::json!("a");
    });
    assert!(a.try_acquire_or_renew().await.unwrap());
    let lease = fake.get::<Lease>("ops", "chat-operator-leader").unwrap();
    assert_eq!(lease.metadata.labels.unwrap()["team"], "chat");
    assert_eq!(lease.spec.unwrap().preferred_holder.as_deref(), Some("a"));
}

/// A renewal that hangs (a stalled connection) must not keep the replica leading after the
/// renew deadline: a standby may take the lease once it expires.
#[tokio::test(start_paused = true)]
async fn a_stalled_renewal_steps_down_by_the_renew_deadline() {
    let fake = FakeApi::new();
    let a = elector(&fake, "a");
    assert!(a.try_acquire_or_renew().await.unwrap());
    fake.stall_next(http::Method::GET, 1);
    let started = tokio::time::Instant::now();
    let held = tokio::time::timeout(Duration::from_secs(60), a.hold(Duration::from_secs(5))).await;
    assert!(held.is_ok(), "hold never returned: still leading on a stalled connection");
    let stepped_down = started.elapsed();
    assert!(stepped_down <= Duration::from_secs(10), "stepped down after {stepped_down:?}, past the 10 s deadline");
}
