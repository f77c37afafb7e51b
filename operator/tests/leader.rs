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
