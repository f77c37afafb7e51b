//! Leader election on a coordination.k8s.io/v1 Lease: only the holder runs the controller.
//! Acquire and renew are resourceVersion-checked replaces, so two candidates never both win.
//! As client-go does, a lease held by another replica counts as expired only once this replica
//! has seen it unchanged for the lease duration by its own clock (so clock skew between
//! machines cannot make a standby take a live lease), and the holder steps down when a renewal
//! has not succeeded within the renew deadline (so a stalled connection cannot keep it leading
//! after the lease ran out).

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};
use tokio::sync::watch;

pub struct LeaseElector {
    api: Api<Lease>,
    name: String,
    identity: String,
    ttl: Duration,
    /// A leader that has not renewed for this long steps down (two thirds of the lease, as
    /// client-go's defaults of 10 s for 15 s), well before a standby may take the lease.
    renew_deadline: Duration,
    /// The lease record as last seen, and when (by this replica's clock) it last changed.
    observed: Mutex<Option<(Record, Instant)>>,
}

/// What identifies a lease holder's term: it changes with every renewal.
#[derive(Clone, Debug, PartialEq)]
struct Record {
    holder: Option<String>,
    renew_time: Option<MicroTime>,
    duration_seconds: Option<i32>,
}

impl LeaseElector {
    pub fn new(client: kube::Client, namespace: &str, name: &str, identity: &str, ttl: Duration) -> Self {
        Self {
            api: Api::namespaced(client, namespace),
            name: name.to_owned(),
            identity: identity.to_owned(),
            ttl,
            renew_deadline: ttl * 2 / 3,
            observed: Mutex::new(None),
        }
    }

    /// Notes the record read now; returns since when it has been unchanged.
    fn observe(&self, record: Record) -> Instant {
        let mut observed = self.observed.lock().unwrap_or_else(|e| e.into_inner());
        match observed.as_ref() {
            Some((seen, since)) if *seen == record => *since,
            _ => {
                let now = Instant::now();
                *observed = Some((record, now));
                now
            }
        }
    }

    fn record(spec: &LeaseSpec) -> Record {
        Record {
            holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
            renew_time: spec.renew_time.clone(),
            duration_seconds: spec.lease_duration_seconds,
        }
    }

    /// One election round; `true` when this process holds the lease afterwards.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = jiff::Timestamp::now();
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.name.clone()), ..ObjectMeta::default() },
                spec: Some(self.claim(LeaseSpec { lease_transitions: Some(0), ..LeaseSpec::default() }, now, false)),
            };
            return self.written(self.api.create(&PostParams::default(), &lease).await);
        };
        let spec = lease.spec.take().unwrap_or_default();
        let since = self.observe(Self::record(&spec));
        let holder = spec.holder_identity.as_deref().filter(|h| !h.is_empty());
        let mine = holder == Some(self.identity.as_str());
        let duration = Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(0)).unwrap_or(0));
        if holder.is_some() && !mine && since.elapsed() < duration {
            return Ok(false);
        }
        // The fetched object, changed: other fields (labels, annotations, newer spec fields)
        // stay as they are.
        lease.spec = Some(self.claim(spec, now, !mine));
        self.written(self.api.replace(&self.name, &PostParams::default(), &lease).await)
    }

    /// `spec` with this replica as the holder, renewed `now`; `transition` when it takes the
    /// lease from another holder or from none (client-go counts both).
    fn claim(&self, mut spec: LeaseSpec, now: jiff::Timestamp, transition: bool) -> LeaseSpec {
        if transition {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = i32::try_from(self.ttl.as_secs()).ok();
        spec.renew_time = Some(MicroTime(now));
        spec.acquire_time.get_or_insert(MicroTime(now));
        spec.lease_transitions.get_or_insert(0);
        spec
    }

    fn written(&self, result: Result<Lease, kube::Error>) -> Result<bool, kube::Error> {
        let won = lost_race(result)?;
        if let Some(lease) = won.as_ref().and_then(|l| l.spec.as_ref()) {
            self.observe(Self::record(lease));
        }
        Ok(won.is_some())
    }

    /// Waits until this process leads (`true`) or shutdown is signalled (`false`).
    pub async fn acquire(&self, retry: Duration, shutdown: &mut watch::Receiver<bool>) -> bool {
        loop {
            match tokio::time::timeout(self.renew_deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => return true,
                Ok(Ok(false)) => tracing::debug!(lease = %self.name, "another replica leads; waiting"),
                Ok(Err(e)) => tracing::warn!(error = %e, "lease election failed; retrying"),
                Err(_) => tracing::warn!(deadline = ?self.renew_deadline, "lease election round timed out; retrying"),
            }
            tokio::select! {
                _ = tokio::time::sleep(retry) => {}
                _ = shutdown.wait_for(|stop| *stop) => return false,
            }
        }
    }

    /// Renews until the lease is lost or no renewal succeeded within the renew deadline (a
    /// failing or stalled API call counts the same); then returns, and the caller stops leading.
    pub async fn hold(&self, renew: Duration) {
        let mut last_renewed = Instant::now();
        loop {
            tokio::time::sleep(renew).await;
            let deadline = last_renewed + self.renew_deadline;
            match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                Ok(Ok(true)) => last_renewed = Instant::now(),
                Ok(Ok(false)) => return,
                Ok(Err(e)) if Instant::now() + renew >= deadline => {
                    tracing::error!(error = %e, "could not renew the lease in time; stepping down");
                    return;
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "lease renewal failed; retrying"),
                Err(_) => {
                    tracing::error!(deadline = ?self.renew_deadline, "lease renewal stalled past the renew deadline; stepping down");
                    return;
                }
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
fn lost_race(result: Result<Lease, kube::Error>) -> Result<Option<Lease>, kube::Error> {
    match result {
        Ok(lease) => Ok(Some(lease)),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(None),
        Err(e) => Err(e),
    }
}
