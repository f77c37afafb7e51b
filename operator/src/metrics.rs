//! Prometheus metrics: reconciles, failures by kind, reconcile duration, managed clusters,
//! watch errors.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// One condition of one ChatCluster. Not `namespace`: Prometheus would rename it, as the
/// scrape target (the operator pod) has a namespace of its own.
#[derive(Clone, Debug, Hash, PartialEq, Eq, PartialOrd, Ord, EncodeLabelSet)]
pub struct ConditionLabels {
    pub chatcluster_namespace: String,
    pub chatcluster: String,
    pub r#type: String,
}

pub struct Metrics {
    registry: Registry,
    reconciles: Counter,
    failures: Family<ErrorLabels, Counter>,
    duration: Histogram,
    managed: Gauge,
    watch_errors: Counter,
    conditions: Family<ConditionLabels, Gauge>,
    /// The series set last time, so a deleted ChatCluster's go away.
    condition_series: Mutex<BTreeSet<ConditionLabels>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("chat_operator");
        let reconciles = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        // 1 ms .. ~16 s
        let duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let managed = Gauge::default();
        registry.register("reconciles", "Reconciles started", reconciles.clone());
        registry.register("reconcile_errors", "Reconciles that failed, by kind", failures.clone());
        registry.register("reconcile_duration_seconds", "Time spent per reconcile", duration.clone());
        registry.register("managed_clusters", "ChatClusters the operator watches", managed.clone());
        let watch_errors = Counter::default();
        registry.register(
            "watch_errors",
            "Failed watch or list calls (forbidden, missing CRD, relists); each is retried with back-off",
            watch_errors.clone(),
        );
        let conditions = Family::<ConditionLabels, Gauge>::default();
        registry.register(
            "cluster_condition",
            "1 while the condition `type` of the ChatCluster is True, else 0",
            conditions.clone(),
        );
        Self {
            registry,
            reconciles,
            failures,
            duration,
            managed,
            watch_errors,
            conditions,
            condition_series: Mutex::new(BTreeSet::new()),
        }
    }

    /// Counts a reconcile and records its duration when the returned guard drops.
    pub fn reconcile_timer(&self) -> ReconcileTimer<'_> {
        self.reconciles.inc();
        ReconcileTimer { metrics: self, start: Instant::now() }
    }

    pub fn reconcile_failed(&self, kind: &str) {
        self.failures.get_or_create(&ErrorLabels { error: kind.to_owned() }).inc();
    }

    pub fn watch_failed(&self) {
        self.watch_errors.inc();
    }

    pub fn watch_errors(&self) -> u64 {
        self.watch_errors.get()
    }

    pub fn set_managed(&self, clusters: usize) {
        self.managed.set(i64::try_from(clusters).unwrap_or(i64::MAX));
    }

    /// Sets the condition gauges to what the ChatClusters' statuses say, and drops the series of
    /// conditions (and clusters) no longer there.
    pub fn set_conditions(&self, observed: impl IntoIterator<Item = (ConditionLabels, bool)>) {
        let mut series = self.condition_series.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut seen = BTreeSet::new();
        for (labels, on) in observed {
            self.conditions.get_or_create(&labels).set(i64::from(on));
            seen.insert(labels);
        }
        for gone in series.difference(&seen) {
            self.conditions.remove(gone);
        }
        *series = seen;
    }

    pub fn reconciles(&self) -> u64 {
        self.reconciles.get()
    }

    /// OpenMetrics text exposition.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// Observes the reconcile duration on drop, so early returns are measured too.
pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics.duration.observe(self.start.elapsed().as_secs_f64());
    }
}
