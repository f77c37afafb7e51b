//! Wires the reconciler into a kube-runtime Controller: the ChatCluster watch, owned children,
//! and the user's Secrets/ConfigMaps that a cluster references (so key and asset edits apply).

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{Controller, watcher};
use kube::{Client, Resource, ResourceExt};

use crate::crd::ChatCluster;
use crate::reconcile::{Context, error_policy, reconcile};

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
            Referenced::Secret => c.spec.auth.jwt_secret_ref.as_ref().is_some_and(|r| r.name == name),
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

/// Runs the controller until `shutdown` resolves; in-flight reconciles finish first.
pub async fn run(
    client: Client,
    ctx: Arc<Context>,
    namespace: Option<&str>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let config = watcher::Config::default().any_semantic();
    let controller = Controller::new(api::<ChatCluster>(&client, namespace), config.clone());
    let store = controller.store();
    let (secrets, config_maps) = (store.clone(), store.clone());
    let gauge = tokio::spawn(report_managed(store, ctx.clone()));
    controller
        .owns(api::<StatefulSet>(&client, namespace), config.clone())
        .owns(api::<Service>(&client, namespace), config.clone())
        .owns(api::<PodDisruptionBudget>(&client, namespace), config.clone())
        .watches(api::<Secret>(&client, namespace), config.clone(), move |s: Secret| {
            affected(&s, Referenced::Secret, &secrets.state())
        })
        .watches(api::<ConfigMap>(&client, namespace), config, move |c: ConfigMap| {
            affected(&c, Referenced::ConfigMap, &config_maps.state())
        })
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|result| async move {
            match result {
                Ok((object, _)) => tracing::debug!(cluster = %object, "reconciled"),
                Err(e) => tracing::debug!(error = %e, "reconcile error"),
            }
        })
        .await;
    gauge.abort();
}

/// Keeps the managed-clusters gauge in step with the controller's cache.
async fn report_managed(store: Store<ChatCluster>, ctx: Arc<Context>) {
    loop {
        ctx.metrics.set_managed(store.state().len());
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
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
    }
}
