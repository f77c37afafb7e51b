//! The reconcile loop: dereference → validate → build → apply → delete unwanted → status.

pub mod apply;
pub mod balance;
pub mod dereference;
pub mod scale;
pub mod status;
pub mod storage;
pub mod validate;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::{Client, Resource, ResourceExt};

use crate::crd::ChatCluster;
use crate::metrics::Metrics;
use crate::resources::{self, Owner};
use apply::RetryPolicy;

/// Consecutive failures after which API errors show as `Degraded` (never on the first one).
const DEGRADED_AFTER_FAILURES: u32 = 5;
/// Periodic re-check even without events (owned objects are watched, so this is a safety net).
const RESYNC: Duration = Duration::from_secs(300);
/// Re-check of an invalid spec, in case a referenced object appears without an event reaching us.
const INVALID_RECHECK: Duration = Duration::from_secs(60);
/// Re-check while a scale-down waits for the StatefulSet to settle; its status changes are
/// watched, so this is a safety net too.
const SCALE_DOWN_RECHECK: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("object has no name, namespace or uid")]
    MissingObjectKey,
    #[error("reading {kind} {name}: {source}")]
    Read { kind: String, name: String, source: kube::Error },
    #[error("applying {kind} {name}: {source}")]
    Apply { kind: String, name: String, source: kube::Error },
    #[error("deleting {kind} {name}: {source}")]
    Delete { kind: String, name: String, source: kube::Error },
    #[error("writing status of {name}: {source}")]
    Status { name: String, source: kube::Error },
}

impl Error {
    /// Short label for the errors metric.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Self::MissingObjectKey => "missing_key",
            Self::Read { .. } => "read",
            Self::Apply { .. } => "apply",
            Self::Delete { .. } => "delete",
            Self::Status { .. } => "status",
        }
    }
}

/// Shared state of every reconcile.
pub struct Context {
    pub client: Client,
    pub metrics: Arc<Metrics>,
    pub recorder: Recorder,
    pub retry: RetryPolicy,
    /// Consecutive failures per cluster (`namespace/name`), for back-off and `Degraded`.
    failures: Mutex<HashMap<String, u32>>,
    /// DNS domain of the Kubernetes cluster (`--cluster-domain`).
    pub cluster_domain: String,
    /// Asks nodes about their rebalancing (none unless the operator reaches the pods).
    pub probe: Arc<dyn balance::NodeProbe>,
}

impl Context {
    pub fn new(client: Client, metrics: Arc<Metrics>, instance: Option<String>) -> Self {
        let reporter = Reporter { controller: resources::FIELD_MANAGER.to_owned(), instance };
        Self {
            recorder: Recorder::new(client.clone(), reporter),
            client,
            metrics,
            retry: RetryPolicy::default(),
            failures: Mutex::new(HashMap::new()),
            cluster_domain: resources::DEFAULT_CLUSTER_DOMAIN.to_owned(),
            probe: Arc::new(balance::NoProbe),
        }
    }

    /// Asks the nodes about their rebalancing with `probe` (the operator's run loop: HTTP).
    pub fn with_node_probe(mut self, probe: Arc<dyn balance::NodeProbe>) -> Self {
        self.probe = probe;
        self
    }

    /// The Kubernetes cluster's DNS domain, when it is not `cluster.local`.
    pub fn with_cluster_domain(mut self, domain: String) -> Self {
        self.cluster_domain = domain;
        self
    }

    fn failures(&self, key: &str, failed: bool) -> u32 {
        // A poisoned lock only means another reconcile panicked; the counts are still usable.
        let mut map = self.failures.lock().unwrap_or_else(|e| e.into_inner());
        if failed {
            let n = map.entry(key.to_owned()).or_insert(0);
            *n += 1;
            *n
        } else {
            map.remove(key);
            0
        }
    }

    /// Publishes an event; failures are logged only, an event is never worth a failed reconcile.
    pub async fn event(&self, cluster: &ChatCluster, type_: EventType, reason: &str, note: String) {
        let note = Some(event_note(note));
        let event = Event { type_, reason: reason.to_owned(), note, action: reason.to_owned(), secondary: None };
        if let Err(e) = self.recorder.publish(&event, &cluster.object_ref(&())).await {
            tracing::warn!(error = %e, reason, "could not publish event");
        }
    }
}

fn key(cluster: &ChatCluster) -> String {
    format!("{}/{}", cluster.namespace().unwrap_or_default(), cluster.name_any())
}

fn now() -> Time {
    Time(jiff::Timestamp::now())
}

/// Entry point for the controller.
pub async fn reconcile(cluster: Arc<ChatCluster>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.reconcile_timer();
    let mut owner = Owner::of(&cluster).ok_or(Error::MissingObjectKey)?;
    owner.cluster_domain.clone_from(&ctx.cluster_domain);
    let result = reconcile_owned(&cluster, &owner, &ctx).await;
    let failures = ctx.failures(&key(&cluster), result.is_err());
    if let Err(e) = &result {
        ctx.metrics.reconcile_failed(e.metric_label());
        tracing::warn!(cluster = %key(&cluster), error = %e, failures, "reconcile failed");
        if failures == DEGRADED_AFTER_FAILURES {
            let message = format!("{failures} reconciles in a row failed; last: {e}");
            ctx.event(&cluster, EventType::Warning, "ApiError", message.clone()).await;
            // Best effort: the API is failing, so this write may fail too.
            let _ = status::write(&ctx, &cluster, &owner, status::api_failing(&cluster, message, now())).await;
        }
    }
    result
}

/// Back-off for failed reconciles: 2, 4, 8 ... seconds, at most five minutes.
pub fn error_policy(cluster: Arc<ChatCluster>, _error: &Error, ctx: Arc<Context>) -> Action {
    let failures = ctx.failures.lock().map(|m| m.get(&key(&cluster)).copied().unwrap_or(1)).unwrap_or(1);
    Action::requeue(jittered(backoff(failures)))
}

/// `base` plus up to a tenth more, at random: clusters created together (an operator start,
/// a GitOps sync of many) must not come back to the API server in the same second forever.
pub fn jittered(base: Duration) -> Duration {
    base + base.mul_f64(rand::random_range(0.0..0.1))
}

pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(2u64.saturating_pow(failures.clamp(1, 9)).min(300))
}

async fn reconcile_owned(cluster: &ChatCluster, owner: &Owner, ctx: &Context) -> Result<Action, Error> {
    if cluster.is_paused() {
        let was_paused = cluster.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Paused");
        if !was_paused {
            ctx.event(cluster, EventType::Normal, "Paused", "reconciliation paused by annotation".to_owned()).await;
        }
        status::write(ctx, cluster, owner, status::paused(cluster, now())).await?;
        return Ok(Action::requeue(jittered(RESYNC)));
    }
    let refs = dereference::fetch(ctx, cluster, owner).await?;
    let plan = match validate::validate(cluster, owner.clone(), &refs) {
        Ok(plan) => plan,
        Err(problem) => {
            tracing::info!(cluster = %key(cluster), %problem, "invalid spec; nothing changed");
            ctx.event(cluster, EventType::Warning, problem.reason, problem.message.clone()).await;
            status::write(ctx, cluster, owner, status::degraded(cluster, &problem, now())).await?;
            return Ok(Action::requeue(jittered(INVALID_RECHECK)));
        }
    };
    if validate::peer_key_regenerated(&refs) {
        let note = format!(
            "Secret {} was missing or held no usable key: generated a new peer key. Running nodes pick \
             it up and accept the old one for 10 minutes, so links hold; the pods roll to the new key",
            owner.peer_secret_name()
        );
        ctx.event(cluster, EventType::Warning, "PeerKeyRegenerated", note).await;
    }
    let children = resources::build(cluster, &plan);
    let before = refs.statefulset.as_ref().and_then(|s| s.spec.replicas);
    let applied = apply::apply_all(ctx, owner, &children, &refs).await?;
    if let Some(before) = before.filter(|n| plan.replicas < *n) {
        let note = format!(
            "removing {}-{}: {before} → {} nodes, {} wanted (one at a time)",
            owner.name, plan.replicas, plan.replicas, cluster.spec.replicas
        );
        ctx.event(cluster, EventType::Normal, "ScaleDownStep", note).await;
    }
    let had_api = cluster.status.as_ref().is_some_and(|s| s.api_endpoint.is_some());
    for object in apply::delete_unwanted(ctx, owner, &children, had_api).await? {
        ctx.event(cluster, EventType::Normal, "Deleted", format!("deleted {object}: no longer wanted")).await;
    }
    let mut new = status::observed(cluster, &plan, &applied.statefulset, &applied.client_service, now());
    announce(ctx, cluster, &new).await;
    let balance = watch_balance(ctx, cluster, owner, &mut new).await;
    status::write(ctx, cluster, owner, new).await?;
    let scaling_down = plan.replicas > cluster.spec.replicas;
    let recheck = if scaling_down {
        SCALE_DOWN_RECHECK
    } else if balance.is_some_and(|b| b.rebalancing || b.may_start_soon()) {
        balance::RECHECK
    } else {
        RESYNC
    };
    Ok(Action::requeue(jittered(recheck)))
}

/// Asks a node whether the cluster is rebalancing: sets `status.rebalancing` and announces a
/// start or an end. Nothing is asked of a cluster of one or with rebalancing off.
async fn watch_balance(
    ctx: &Context,
    cluster: &ChatCluster,
    owner: &Owner,
    new: &mut crate::crd::ChatClusterStatus,
) -> Option<balance::Balance> {
    if !cluster.spec.rebalance.enabled || new.ready_replicas < 2 {
        if new.rebalancing == Some(true) {
            let why = if cluster.spec.rebalance.enabled {
                "fewer than two nodes are ready"
            } else {
                "spec.rebalance.enabled is false"
            };
            ctx.event(cluster, EventType::Normal, "RebalanceFinished", format!("no longer watched: {why}")).await;
        }
        new.rebalancing = None;
        return None;
    }
    let balance = balance::observe(ctx.probe.as_ref(), owner, new.ready_replicas).await?;
    if let Some((reason, note)) = balance::transition(new.rebalancing, &balance) {
        ctx.event(cluster, EventType::Normal, reason, note).await;
    }
    new.rebalancing = Some(balance.rebalancing);
    Some(balance)
}

/// Events for significant changes, found by comparing with the previous status.
async fn announce(ctx: &Context, cluster: &ChatCluster, new: &crate::crd::ChatClusterStatus) {
    let Some(old) = &cluster.status else {
        ctx.event(cluster, EventType::Normal, "Created", "created the chat cluster's children".to_owned()).await;
        return;
    };
    if old.target_config_hash.is_some() && old.target_config_hash != new.target_config_hash {
        let note = format!("config changed; rolling nodes to {}", new.target_config_hash.as_deref().unwrap_or(""));
        ctx.event(cluster, EventType::Normal, "ConfigRollout", note).await;
    }
    let new_generation = old.observed_generation != cluster.metadata.generation;
    if new_generation && old.replicas != cluster.spec.replicas {
        let note = format!("scaling from {} to {} nodes", old.replicas, cluster.spec.replicas);
        ctx.event(cluster, EventType::Normal, "Scaled", note).await;
    }
    if status::condition(old, status::DEGRADED).is_some_and(|c| c.status == "True") {
        ctx.event(cluster, EventType::Normal, "Recovered", "spec and references are valid again".to_owned()).await;
    }
}

/// The API server refuses events whose note exceeds 1 KiB: long messages (a config error that
/// quotes the config) are cut at a character boundary instead.
pub const MAX_EVENT_NOTE_BYTES: usize = 1024;

pub fn event_note(mut note: String) -> String {
    const ELLIPSIS: &str = "…";
    if note.len() > MAX_EVENT_NOTE_BYTES {
        let mut end = MAX_EVENT_NOTE_BYTES - ELLIPSIS.len();
        while !note.is_char_boundary(end) {
            end -= 1;
        }
        note.truncate(end);
        note.push_str(ELLIPSIS);
    }
    note
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requeues_spread_over_a_tenth_of_their_period() {
        let base = Duration::from_secs(300);
        let delays: std::collections::BTreeSet<Duration> = (0..100).map(|_| jittered(base)).collect();
        assert!(delays.iter().all(|d| *d >= base && *d < base + base / 10), "{delays:?}");
        let (Some(first), Some(last)) = (delays.first(), delays.last()) else { panic!("no delays") };
        assert!(*last - *first > Duration::from_secs(15), "spread over the window, not one instant: {delays:?}");
    }

    #[test]
    fn event_notes_fit_the_api_servers_limit() {
        assert_eq!(event_note("short".into()), "short");
        let long = event_note("é".repeat(MAX_EVENT_NOTE_BYTES));
        assert!(long.len() <= MAX_EVENT_NOTE_BYTES, "{}", long.len());
        assert!(long.ends_with('…') && long.starts_with("éé"), "cut at a character boundary");
        let exact = "a".repeat(MAX_EVENT_NOTE_BYTES);
        assert_eq!(event_note(exact.clone()), exact);
    }
}
