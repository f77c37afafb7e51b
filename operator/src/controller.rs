//! Wires the reconciler into a kube-runtime Controller: the ChatCluster watch, owned children
//! (selected by the operator's label), and the Secrets/ConfigMaps a cluster owns or references
//! (so key and asset edits apply). Secrets and ConfigMaps are watched as metadata only: a
//! cluster's namespace may hold many large ones (Helm keeps every release in a Secret), and the
//! reconcile reads the few it needs itself.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, controller, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::crd::ChatCluster;
use crate::http::Health;
use crate::metrics::ConditionLabels;
use crate::reconcile::{Context, error_policy, reconcile};
use crate::resources::MANAGED_BY_SELECTOR;

/// Which reference of a spec a watched object may be the target of.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Referenced {
    Secret,
    ConfigMap,
}

/// Clusters to reconcile when `object` changes: its controller owner, and every cluster of the
/// namespace whose spec names it.
pub fn affected<K: Resource>(
    object: &K,
    kind: Referenced,
    clusters: &[Arc<ChatCluster>],
) -> Vec<ObjectRef<ChatCluster>> {
    let namespace = object.meta().namespace.clone().unwrap_or_default();
    let name = object.meta().name.clone().unwrap_or_default();
    let owners = object
        .owner_references()
        .iter()
        .filter(|r| r.kind == "ChatCluster" && r.api_version.starts_with("chatcluster.dev/"))
        .map(|r| ObjectRef::new(&r.name).within(&namespace));
    let referencing = clusters
        .iter()
        .filter(|c| c.namespace().as_deref() == Some(namespace.as_str()))
        .filter(|c| match kind {
            Referenced::Secret => {
                c.spec.auth.jwt_secret_ref.as_ref().is_some_and(|r| r.name == name)
                    || c.spec.tls.as_ref().is_some_and(|t| t.secret_name == name)
                    || c.spec.api.as_ref().is_some_and(|a| a.key_secret_ref.name == name)
            }
            Referenced::ConfigMap => c.spec.assets.config_map_ref.as_ref().is_some_and(|r| r.name == name),
        })
        .map(|c| ObjectRef::from_obj(c.as_ref()));
    owners.chain(referencing).collect()
}

fn api<K>(client: &Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>,
{
    match namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    }
}

/// Reconciles running at once: each makes a handful of API calls, so a thousand ChatClusters
/// changing together (an operator upgrade, a GitOps sync) reach the API server as a steady
/// stream instead of a burst.
pub const MAX_CONCURRENT_RECONCILES: u16 = 16;

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first. `health`
/// learns when the ChatCluster watch has synced.
pub async fn run(
    client: Client,
    ctx: Arc<Context>,
    namespace: Option<&str>,
    health: Arc<Health>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let config = watcher::Config::default().any_semantic();
    let owned = config.clone().labels(MANAGED_BY_SELECTOR);
    let controller = Controller::new(api::<ChatCluster>(&client, namespace), config.clone());
    let store = controller.store();
    let (secrets, config_maps) = (store.clone(), store.clone());
    // Stopped with the controller, also when the caller drops this future (a lost lease).
    let _synced = AbortOnDrop(tokio::spawn(report_synced(store.clone(), health)));
    let _gauge = AbortOnDrop(tokio::spawn(report_managed(store, ctx.clone())));
    let metrics = ctx.metrics.clone();
    controller
        .owns(api::<StatefulSet>(&client, namespace), owned.clone())
        .owns(api::<Service>(&client, namespace), owned.clone())
        .owns(api::<PodDisruptionBudget>(&client, namespace), owned)
        // `Api<PartialObjectMeta<_>>` lists and watches metadata only.
        .watches(api::<PartialObjectMeta<Secret>>(&client, namespace), config.clone(), move |s| {
            affected(&s, Referenced::Secret, &secrets.state())
        })
        .watches(api::<PartialObjectMeta<ConfigMap>>(&client, namespace), config, move |c| {
            affected(&c, Referenced::ConfigMap, &config_maps.state())
        })
        .with_config(controller::Config::default().concurrency(MAX_CONCURRENT_RECONCILES))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| {
            log_outcome(&metrics, result);
            std::future::ready(())
        })
        .await;
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Watch failures (403, a missing CRD, relists) stop everything the watch feeds: they are
/// warnings and counted. Reconcile failures are reported by `error_policy`.
fn log_outcome<E: std::error::Error, Q: std::error::Error>(
    metrics: &crate::metrics::Metrics,
    result: Result<(ObjectRef<ChatCluster>, kube::runtime::controller::Action), controller::Error<E, Q>>,
) {
    match result {
        Ok((object, _)) => tracing::debug!(cluster = %object, "reconciled"),
        Err(controller::Error::QueueError(e)) => {
            metrics.watch_failed();
            tracing::warn!(error = %e, "a watch failed; retrying with back-off");
        }
        Err(e) => tracing::debug!(error = %e, "reconcile error"),
    }
}

/// Marks the watches synced once the ChatCluster cache has its first full list.
async fn report_synced(store: Store<ChatCluster>, health: Arc<Health>) {
    if store.wait_until_ready().await.is_ok() {
        health.watches_synced.store(true, std::sync::atomic::Ordering::Relaxed);
        tracing::info!("ChatCluster watch synced");
    }
}

/// Keeps the managed-clusters gauge and the condition gauges in step with the controller's
/// cache: what the API server holds, as users and alerts see it.
async fn report_managed(store: Store<ChatCluster>, ctx: Arc<Context>) {
    loop {
        let clusters = store.state();
        ctx.metrics.set_managed(clusters.len());
        ctx.metrics.set_conditions(clusters.iter().flat_map(|c| condition_series(c)));
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}

fn condition_series(cluster: &ChatCluster) -> Vec<(ConditionLabels, bool)> {
    let (Some(namespace), Some(name)) = (&cluster.metadata.namespace, &cluster.metadata.name) else {
        return Vec::new();
    };
    let conditions = cluster.status.as_ref().map(|s| s.conditions.as_slice()).unwrap_or_default();
    conditions
        .iter()
        .map(|c| {
            let labels = ConditionLabels {
                chatcluster_namespace: namespace.clone(),
                chatcluster: name.clone(),
                r#type: c.type_.clone(),
            };
            (labels, c.status == "True")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::LocalRef;
    use crate::fixtures::{full, jwt_secret, minimal, theme_config_map};

    #[test]
    fn referenced_and_owned_objects_map_to_their_clusters() {
        let mut with_theme = minimal("themed");
        with_theme.spec.assets.config_map_ref = Some(LocalRef { name: "chat-theme".into() });
        let clusters = vec![Arc::new(full("prod")), Arc::new(minimal("plain")), Arc::new(with_theme)];
        let names = |refs: Vec<ObjectRef<ChatCluster>>| refs.into_iter().map(|r| r.name).collect::<Vec<_>>();

        assert_eq!(names(affected(&jwt_secret("chat-jwt", "key"), Referenced::Secret, &clusters)), ["prod"]);
        let theme = theme_config_map("chat-theme");
        assert_eq!(names(affected(&theme, Referenced::ConfigMap, &clusters)), ["prod", "themed"]);
        assert!(affected(&theme, Referenced::Secret, &clusters).is_empty());

        let mut owned = theme_config_map("plain-config");
        owned.metadata.owner_references = crate::resources::Owner::of(&minimal("plain")).map(|o| vec![o.reference]);
        assert_eq!(names(affected(&owned, Referenced::ConfigMap, &clusters)), ["plain"]);

        // What the metadata-only watches deliver maps the same way.
        use kube::core::PartialObjectMetaExt;
        let meta = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| m.clone();
        let secret = meta(&jwt_secret("chat-jwt", "key").metadata).into_response_partial::<Secret>();
        assert_eq!(names(affected(&secret, Referenced::Secret, &clusters)), ["prod"]);
        let owned = meta(&owned.metadata).into_response_partial::<ConfigMap>();
        assert_eq!(names(affected(&owned, Referenced::ConfigMap, &clusters)), ["plain"]);
    }

    #[test]
    fn condition_gauges_follow_the_clusters_statuses_and_go_with_them() {
        let condition = |type_: &str, status: &str| k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition {
            type_: type_.to_owned(),
            status: status.to_owned(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::UNIX_EPOCH),
            message: String::new(),
            observed_generation: None,
            reason: "Test".to_owned(),
        };
        let mut rolling = minimal("rolling");
        rolling.status = Some(crate::crd::ChatClusterStatus {
            conditions: vec![condition("Progressing", "True"), condition("Degraded", "False")],
            ..Default::default()
        });
        let metrics = crate::metrics::Metrics::new();
        let clusters = [rolling.clone(), minimal("new")];
        metrics.set_conditions(clusters.iter().flat_map(condition_series));
        let text = metrics.encode().unwrap();
        let series = |name: &str, type_: &str, value: u8| {
            format!(
                "chat_operator_cluster_condition{{chatcluster_namespace=\"{}\",chatcluster=\"{name}\",type=\"{type_}\"}} {value}\n",
                crate::fixtures::NAMESPACE
            )
        };
        assert!(text.contains(&series("rolling", "Progressing", 1)), "{text}");
        assert!(text.contains(&series("rolling", "Degraded", 0)), "{text}");
        assert!(!text.contains("chatcluster=\"new\""), "no status, no series: {text}");

        // Rolled out: Progressing turns False; then the cluster is deleted.
        rolling.status = Some(crate::crd::ChatClusterStatus {
            conditions: vec![condition("Progressing", "False")],
            ..Default::default()
        });
        metrics.set_conditions(condition_series(&rolling));
        let text = metrics.encode().unwrap();
        assert!(text.contains(&series("rolling", "Progressing", 0)), "{text}");
        assert!(!text.contains("type=\"Degraded\""), "a condition no longer in the status is dropped: {text}");
        metrics.set_conditions(Vec::new());
        assert!(!metrics.encode().unwrap().contains("chatcluster=\"rolling\""));
    }

    #[test]
    fn watch_failures_are_counted_and_reconcile_failures_are_not() {
        let metrics = crate::metrics::Metrics::new();
        let watch: controller::Error<std::io::Error, watcher::Error> =
            controller::Error::QueueError(watcher::Error::NoResourceVersion);
        log_outcome(&metrics, Err(watch));
        let object = ObjectRef::<ChatCluster>::new("demo").within("chat");
        let failed: controller::Error<std::io::Error, watcher::Error> =
            controller::Error::ReconcilerFailed(std::io::Error::other("boom"), Box::new(object.erase()));
        log_outcome(&metrics, Err(failed));
        assert_eq!(metrics.watch_errors(), 1);
    }
}
