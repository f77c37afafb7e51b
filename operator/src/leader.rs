//! Leader election on a coordination.k8s.io/v1 Lease: only the holder runs the controller.
//! Acquire and renew are resourceVersion-checked replaces, so two candidates never both win.

use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    ttl: Duration,
}

impl LeaseElector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, ttl: Duration) -> Self {
        Self { api: Api::namespaced(client, namespace), name: name.to_owned(), identity: identity.to_owned(), ttl }
    }

    fn lease(
        &self,
        acquired: jiff::Timestamp,
        now: jiff::Timestamp,
        transitions: i32,
        version: Option<String>,
    ) -> Lease {
        Lease {
            metadata: ObjectMeta { name: Some(self.name.clone()), resource_version: version, ..ObjectMeta::default() },
            spec: Some(LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: i32::try_from(self.ttl.as_secs()).ok(),
                acquire_time: Some(MicroTime(acquired)),
                renew_time: Some(MicroTime(now)),
                lease_transitions: Some(transitions),
                ..LeaseSpec::default()
            }),
        }
    }

    /// One election round; `true` when this process holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let Some(existing) = self.api.get_opt(&self.name).await? else {
            return lost_race(self.api.create(&PostParams::default(), &self.lease(now, now, 0, None)).await);
        };
        let spec = existing.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(self.identity.as_str());
        let expires = spec.renew_time.as_ref().map_or(0, |t| t.0.as_second())
            + i64::from(spec.lease_duration_seconds.unwrap_or(0));
        if holder.is_some() && !mine && expires >= now.as_second() {
            return Ok(false);
        }
        let acquired = match (&spec.acquire_time, mine) {
            (Some(t), true) => t.0,
            _ => now,
        };
        let transitions = spec.lease_transitions.unwrap_or(0) + i32::from(!mine);
        let lease = self.lease(acquired, now, transitions, existing.metadata.resource_version.clone());
        lost_race(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }

    /// Waits until this process leads (`true`) or shutdown is signalled (`false`).
    pub async fn acquire(&self, retry: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return true,
                Ok(false) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Err(e) => tracing::warn!(error = %e, "lease election failed; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.wait_for(|stop| *stop) => return false,
            }
        }
    }

    /// Renews until the lease is lost or renewals failed for too long; then returns.
    pub async fn hold(&self, renew: Duration) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(renew).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = Instant::now(),
                Ok(false) => return,
                // Stop leading before the lease can expire under us and another replica takes it.
                Err(e) if last_renewed.elapsed() + renew >= self.ttl => {
                    tracing::error!(error = %e, "could not renew the lease in time");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
            }
        }
    }

    /// Gives the lease up at shutdown so a standby replica takes over without waiting for expiry.
    pub async fn release(&self) -> Result<(), kube::Error> {
        let Some(mut lease) = self.api.get_opt(&self.name).await? else { return Ok(()) };
        let Some(spec) = lease.spec.as_mut() else { return Ok(()) };
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        lost_race(self.api.replace(&self.name, &PostParams::default(), &lease).await).map(drop)
    }
}

/// A 409 means another candidate wrote first: not an error, just not leading.
fn lost_race(result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
    match result {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
        Err(e) => Err(e),
    }
}
