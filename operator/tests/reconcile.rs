//! Reconciles against the in-process fake API server: create, config and asset updates, scale,
//! drift repair, child deletion, pause, invalid references, conflicts and status.

use std::collections::BTreeMap;
use std::sync::Arc;

use chat_operator::crd::{ChatCluster, PAUSED_ANNOTATION};
use chat_operator::fake::FakeApi;
use chat_operator::fixtures::{NAMESPACE, context, full, jwt_secret, minimal, theme_config_map};
use chat_operator::reconcile::status::{AVAILABLE, DEGRADED, PROGRESSING, READY, RECONCILE_SUCCESS, condition};
use chat_operator::reconcile::{Context, Error, reconcile};
use chat_operator::resources::{CONFIG_HASH_ANNOTATION, PEER_KEY};
use http::Method;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde_json::json;

async fn run(fake: &FakeApi, ctx: &Arc<Context>, name: &str) -> Result<(), Error> {
    let cluster = fake.get::<ChatCluster>(NAMESPACE, name).expect("cluster stored");
    reconcile(Arc::new(cluster), ctx.clone()).await.map(drop)
}

fn stored(fake: &FakeApi, name: &str) -> ChatCluster {
    fake.get::<ChatCluster>(NAMESPACE, name).unwrap()
}

fn cond(fake: &FakeApi, name: &str, type_: &str) -> (String, String) {
    let status = stored(fake, name).status.unwrap();
    let c = condition(&status, type_).unwrap_or_else(|| panic!("no {type_} condition"));
    (c.status.clone(), c.reason.clone())
}

fn config_hash(fake: &FakeApi, name: &str) -> String {
    let sts = fake.get::<StatefulSet>(NAMESPACE, name).unwrap();
    sts.spec.template.metadata.unwrap().annotations.unwrap()[CONFIG_HASH_ANNOTATION].clone()
}

fn setup(cluster: ChatCluster) -> (FakeApi, Arc<Context>) {
    let fake = FakeApi::new();
    fake.put(&cluster);
    let ctx = context(&fake);
    (fake, ctx)
}

#[tokio::test]
async fn the_server_api_service_comes_and_goes_with_spec_api() {
    let (fake, ctx) = setup(chat_operator::fixtures::with_api("demo"));
    fake.put(&chat_operator::fixtures::api_keys_secret("chat-api", "the-backend-key-0123456789\n"));
    run(&fake, &ctx, "demo").await.unwrap();
    let service = fake.get::<Service>(NAMESPACE, "demo-api").expect("the API Service");
    assert_eq!(service.spec.unwrap().ports.unwrap()[0].port, 9090);
    let status = stored(&fake, "demo").status.unwrap();
    assert_eq!(status.api_endpoint.as_deref(), Some("http://demo-api.chat.svc:9090/api/v1"));

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["api"] = serde_json::Value::Null);
    run(&fake, &ctx, "demo").await.unwrap();
    assert!(fake.get::<Service>(NAMESPACE, "demo-api").is_none(), "deleted with spec.api");
    assert!(stored(&fake, "demo").status.unwrap().api_endpoint.is_none());
    assert!(fake.events().contains(&("Normal".into(), "Deleted".into())));
}

#[tokio::test]
async fn a_tls_cluster_reports_a_wss_endpoint() {
    let mut cluster = minimal("secure");
    cluster.spec.tls = Some(chat_operator::crd::TlsSpec { secret_name: "secure-tls".into() });
    let (fake, ctx) = setup(cluster);
    fake.put(&chat_operator::fixtures::tls_secret("secure-tls"));
    run(&fake, &ctx, "secure").await.unwrap();
    let status = stored(&fake, "secure").status.unwrap();
    assert_eq!(status.endpoint.as_deref(), Some("wss://secure.chat.svc:80/ws"));
}

#[tokio::test]
async fn create_applies_every_child_and_writes_status() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();

    let sts = fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap();
    let owner = &sts.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.controller), ("ChatCluster", Some(true)));
    assert!(fake.get::<Service>(NAMESPACE, "demo").is_some());
    let peers = fake.get::<Service>(NAMESPACE, "demo-peers").unwrap().spec.unwrap();
    assert_eq!(peers.publish_not_ready_addresses, Some(true));
    assert!(fake.get::<ConfigMap>(NAMESPACE, "demo-config").is_some());
    assert!(fake.get::<ConfigMap>(NAMESPACE, "demo-assets").is_some());
    assert!(fake.get::<Secret>(NAMESPACE, "demo-peer").is_some());
    assert!(fake.get::<PodDisruptionBudget>(NAMESPACE, "demo").is_some());

    let status = stored(&fake, "demo").status.unwrap();
    assert_eq!(status.observed_generation, Some(1));
    assert_eq!((status.replicas, status.ready_replicas, status.updated_replicas), (3, 3, 3));
    assert_eq!(status.selector.as_deref(), Some("app.kubernetes.io/instance=demo,app.kubernetes.io/name=chatcluster"));
    assert_eq!(status.endpoint.as_deref(), Some("ws://demo.chat.svc:80/ws"));
    assert_eq!(status.config_hash, Some(config_hash(&fake, "demo")));
    assert_eq!(status.phase.as_deref(), Some("Running"));
    assert_eq!(cond(&fake, "demo", AVAILABLE).0, "True");
    assert_eq!(cond(&fake, "demo", PROGRESSING), ("False".into(), "RolloutComplete".into()));
    assert_eq!(cond(&fake, "demo", DEGRADED).0, "False");
    assert_eq!(cond(&fake, "demo", RECONCILE_SUCCESS).0, "True");
    assert_eq!(cond(&fake, "demo", READY), ("True".into(), "Ready".into()));
    assert_eq!(status.image, Some(chat_operator::crd::default_image()), "the image in use, resolved");
    assert!(fake.events().contains(&("Normal".into(), "Created".into())));
}

#[tokio::test]
async fn unchanged_cluster_does_not_rewrite_status() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    fake.clear_requests();
    run(&fake, &ctx, "demo").await.unwrap();
    let status_writes = fake.requests().iter().filter(|r| r.ends_with("/status")).count();
    assert_eq!(status_writes, 0, "{:?}", fake.requests());
}

#[tokio::test]
async fn config_change_rolls_pods_and_asset_change_does_not() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let first = config_hash(&fake, "demo");

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["assets"] = json!({"files": {"logo.svg": "<svg/>"}}));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(config_hash(&fake, "demo"), first, "assets must not restart pods");
    let assets = fake.get::<ConfigMap>(NAMESPACE, "demo-assets").unwrap().data.unwrap();
    assert_eq!(assets["logo.svg"], "<svg/>");

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["config"]["history"] = json!({"size": 7}));
    run(&fake, &ctx, "demo").await.unwrap();
    let second = config_hash(&fake, "demo");
    assert_ne!(second, first, "a config change must change the pod template");
    let status = stored(&fake, "demo").status.unwrap();
    assert_eq!(status.target_config_hash, Some(second));
    assert_eq!(status.observed_generation, Some(3));
    assert!(fake.events().contains(&("Normal".into(), "ConfigRollout".into())));
}

#[tokio::test]
async fn rollout_in_progress_is_progressing_until_pods_are_updated() {
    let (fake, ctx) = setup(minimal("demo"));
    fake.set_auto_ready(false);
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", AVAILABLE), ("False".into(), "NoReplicasReady".into()));
    assert_eq!(cond(&fake, "demo", PROGRESSING).0, "True");
    assert_eq!(stored(&fake, "demo").status.unwrap().config_hash, None, "not rolled out yet");
}

/// Runs the operator after every step of the (gradual) StatefulSet controller until nothing
/// moves; returns the Progressing reasons seen, in order, without repeats, and whether the
/// cluster stayed Available at every step.
async fn reasons_until_settled(fake: &FakeApi, ctx: &Arc<Context>, name: &str) -> (Vec<String>, bool) {
    let mut reasons: Vec<String> = Vec::new();
    let mut always_available = true;
    for _ in 0..100 {
        run(fake, ctx, name).await.unwrap();
        let reason = cond(fake, name, PROGRESSING).1;
        always_available &= cond(fake, name, AVAILABLE).0 == "True";
        let ready = cond(fake, name, READY);
        if reason == "RolloutComplete" {
            assert_eq!(ready, ("True".into(), "Ready".into()));
        } else {
            assert_eq!(ready, ("False".into(), reason.clone()), "Ready says why not");
        }
        if reasons.last() != Some(&reason) {
            reasons.push(reason);
        }
        if !fake.step_statefulsets() {
            return (reasons, always_available);
        }
    }
    panic!("the StatefulSet never settled: {reasons:?}");
}

#[tokio::test]
async fn a_rollout_reports_each_stage_and_records_the_hash_once_complete() {
    let (fake, ctx) = setup(minimal("demo"));
    fake.set_auto_ready(false);
    let (created, _) = reasons_until_settled(&fake, &ctx, "demo").await;
    assert_eq!(created, ["Applying", "RollingUpdate", "WaitingForReady", "RolloutComplete"]);
    let first = stored(&fake, "demo").status.unwrap().config_hash;
    assert_eq!(first, Some(config_hash(&fake, "demo")));

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["config"]["history"] = json!({"size": 7}));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(stored(&fake, "demo").status.unwrap().config_hash, first, "not rolled out yet");
    let (rolled, available) = reasons_until_settled(&fake, &ctx, "demo").await;
    assert_eq!(rolled, ["Applying", "RollingUpdate", "WaitingForReady", "RolloutComplete"]);
    assert!(available, "one pod at a time: the others keep serving");
    let status = stored(&fake, "demo").status.unwrap();
    assert_eq!(status.config_hash, Some(config_hash(&fake, "demo")));
    assert_ne!(status.config_hash, first);
    assert_eq!((status.ready_replicas, status.updated_replicas), (3, 3));
}

#[tokio::test]
async fn an_on_delete_rollout_completes_once_every_pod_was_replaced() {
    let (fake, ctx) = setup(minimal("demo"));
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["rollout"] = json!({"strategy": "OnDelete"}));
    fake.set_auto_ready(false);
    reasons_until_settled(&fake, &ctx, "demo").await;
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["config"]["history"] = json!({"size": 7}));
    let (waiting, _) = reasons_until_settled(&fake, &ctx, "demo").await;
    assert_eq!(waiting.last().map(String::as_str), Some("RollingUpdate"), "waits for the pods' deletion");

    fake.delete_statefulset_pods(NAMESPACE, "demo");
    let (replaced, _) = reasons_until_settled(&fake, &ctx, "demo").await;
    assert_eq!(replaced.last().map(String::as_str), Some("RolloutComplete"), "{replaced:?}");
    let sts = fake.get::<StatefulSet>(NAMESPACE, "demo").and_then(|s| s.status).unwrap();
    assert_ne!(sts.current_revision, sts.update_revision, "the controller never moves it under OnDelete");
    assert_eq!(stored(&fake, "demo").status.unwrap().config_hash, Some(config_hash(&fake, "demo")));
}

#[tokio::test]
async fn the_nodes_find_their_peers_in_the_configured_cluster_domain() {
    let fake = FakeApi::new();
    fake.put(&minimal("demo"));
    let ctx = context(&fake);
    let mut custom = chat_operator::reconcile::Context::new(fake.client(), ctx.metrics.clone(), None)
        .with_cluster_domain("corp.internal".to_owned());
    custom.retry = ctx.retry;
    run(&fake, &Arc::new(custom), "demo").await.unwrap();
    let wanted = "demo-peers.chat.svc.corp.internal";
    let sts = fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap();
    let env = sts.spec.template.spec.unwrap().containers[0].env.clone().unwrap_or_default();
    let peer_dns = env.iter().find(|e| e.name == "CHAT_PEER_DNS").and_then(|e| e.value.clone());
    assert_eq!(peer_dns.as_deref(), Some(wanted));
    let config = fake.get::<ConfigMap>(NAMESPACE, "demo-config").and_then(|c| c.data).unwrap();
    assert!(config.values().any(|toml| toml.contains(wanted)), "{config:?}");
}

fn sts_replicas(fake: &FakeApi, name: &str) -> Option<i32> {
    fake.get::<StatefulSet>(NAMESPACE, name).unwrap().spec.replicas
}

/// `cluster.size` in the rendered node config.
fn config_size(fake: &FakeApi, name: &str) -> usize {
    let cm = fake.get::<ConfigMap>(NAMESPACE, &format!("{name}-config")).unwrap();
    let config: chat_node::config::NodeConfig = toml::from_str(&cm.data.unwrap()["node.toml"]).unwrap();
    config.cluster.size
}

#[tokio::test]
async fn scale_up_goes_at_once_and_rewrites_the_size_without_rolling_pods() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let hash = config_hash(&fake, "demo");
    assert_eq!(config_size(&fake, "demo"), 3);
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["replicas"] = json!(5));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(5));
    assert_eq!(config_size(&fake, "demo"), 5, "running nodes re-read it from the ConfigMap");
    assert_eq!(config_hash(&fake, "demo"), hash, "a scale must not roll the pods");
    assert_eq!(stored(&fake, "demo").status.unwrap().replicas, 5);
    assert!(fake.events().contains(&("Normal".into(), "Scaled".into())));

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["config"]["cluster"] = json!({"partitions": 16}));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_ne!(config_hash(&fake, "demo"), hash, "another config field does roll them");
}

#[tokio::test]
async fn scale_down_removes_one_node_per_settled_step() {
    let (fake, ctx) = setup(minimal("demo"));
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["replicas"] = json!(5));
    run(&fake, &ctx, "demo").await.unwrap();
    let hash = config_hash(&fake, "demo");
    fake.set_auto_ready(false);

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["replicas"] = json!(3));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(4), "one step");
    assert_eq!(config_size(&fake, "demo"), 3, "every node learns the target at once");
    assert!(fake.events().contains(&("Normal".into(), "ScaleDownStep".into())));
    let (progressing, reason) = cond(&fake, "demo", PROGRESSING);
    assert_eq!((progressing.as_str(), reason.as_str()), ("True", "ScalingDown"));

    // The StatefulSet has not settled (the removed pod still terminates): no second step,
    // however often the operator looks.
    for _ in 0..3 {
        run(&fake, &ctx, "demo").await.unwrap();
        assert_eq!(sts_replicas(&fake, "demo"), Some(4));
    }
    assert_eq!(cond(&fake, "demo", PROGRESSING).1, "ScalingDown");

    fake.settle_statefulset(NAMESPACE, "demo");
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(3), "the next step once settled");
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(3), "never below spec.replicas");
    fake.settle_statefulset(NAMESPACE, "demo");
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(3));
    assert_eq!(cond(&fake, "demo", PROGRESSING), ("False".into(), "RolloutComplete".into()));
    assert_eq!(config_hash(&fake, "demo"), hash, "no step rolled the pods");

    // A scale-up in the middle of a scale-down goes at once.
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["replicas"] = json!(1));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(2));
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["replicas"] = json!(4));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(sts_replicas(&fake, "demo"), Some(4));
}

#[tokio::test]
async fn storage_cannot_be_added_to_an_existing_cluster() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let hash = config_hash(&fake, "demo");
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["storage"] = json!({"size": "1Gi"}));
    fake.clear_requests();
    run(&fake, &ctx, "demo").await.unwrap();
    let status = stored(&fake, "demo").status.unwrap();
    let degraded = condition(&status, DEGRADED).unwrap();
    assert_eq!((degraded.status.as_str(), degraded.reason.as_str()), ("True", "StorageImmutable"));
    assert!(degraded.message.contains("volumeClaimTemplates are immutable"), "{}", degraded.message);
    assert!(fake.events().contains(&("Warning".into(), "StorageImmutable".into())));
    let writes = fake.requests().into_iter().filter(|r| r.starts_with("PATCH") && !r.ends_with("/status")).count();
    assert_eq!(writes, 0, "nothing applied: {:?}", fake.requests());
    let sts = fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap();
    assert!(sts.spec.volume_claim_templates.is_none());
    assert_eq!(config_hash(&fake, "demo"), hash);

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| {
        c["spec"].as_object_mut().unwrap().remove("storage");
    });
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", DEGRADED).0, "False");
}

#[tokio::test]
async fn a_new_cluster_with_storage_gets_its_volumes_and_keeps_them() {
    let mut cluster = minimal("demo");
    cluster.spec.storage = Some(chat_operator::crd::StorageSpec { size: "1Gi".into(), storage_class_name: None });
    let (fake, ctx) = setup(cluster);
    run(&fake, &ctx, "demo").await.unwrap();
    let sts = fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap();
    assert_eq!(sts.spec.volume_claim_templates.map(|t| t.len()), Some(1));
    // The API server writes quantities canonically; 1024Mi is the same size.
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["storage"]["size"] = json!("1024Mi"));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", DEGRADED).0, "False");
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["storage"]["size"] = json!("2Gi"));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", DEGRADED), ("True".into(), "StorageImmutable".into()));
}

#[tokio::test]
async fn drift_is_reverted_and_deleted_children_recreated() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let key = fake.get::<Secret>(NAMESPACE, "demo-peer").unwrap().data.unwrap()[PEER_KEY].clone();

    fake.edit::<StatefulSet>(NAMESPACE, "demo", |s| {
        s["spec"]["template"]["spec"]["containers"][0]["image"] = json!("evil")
    });
    fake.edit::<Service>(NAMESPACE, "demo", |s| s["spec"]["ports"][0]["port"] = json!(9999));
    assert!(fake.remove::<ConfigMap>(NAMESPACE, "demo-config"));
    run(&fake, &ctx, "demo").await.unwrap();

    let sts = fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap();
    assert_eq!(sts.spec.template.spec.unwrap().containers[0].image, Some(chat_operator::crd::default_image()));
    assert_eq!(fake.get::<Service>(NAMESPACE, "demo").unwrap().spec.unwrap().ports.unwrap()[0].port, 80);
    assert!(fake.get::<ConfigMap>(NAMESPACE, "demo-config").is_some());
    let again = fake.get::<Secret>(NAMESPACE, "demo-peer").unwrap().data.unwrap()[PEER_KEY].clone();
    assert_eq!(key, again, "the peer key must never rotate by accident");
}

#[tokio::test]
async fn disabled_pdb_is_deleted_but_a_foreign_one_is_kept() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["pdb"] = json!({"enabled": false}));
    run(&fake, &ctx, "demo").await.unwrap();
    assert!(fake.get::<PodDisruptionBudget>(NAMESPACE, "demo").is_none());
    assert!(fake.events().contains(&("Normal".into(), "Deleted".into())));

    let mut foreign = PodDisruptionBudget::default();
    foreign.metadata.name = Some("demo".into());
    foreign.metadata.namespace = Some(NAMESPACE.into());
    fake.put(&foreign);
    run(&fake, &ctx, "demo").await.unwrap();
    assert!(fake.get::<PodDisruptionBudget>(NAMESPACE, "demo").is_some(), "not ours: kept");
}

#[tokio::test]
async fn paused_cluster_is_left_alone() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| {
        c["metadata"]["annotations"] = json!({PAUSED_ANNOTATION: "true"});
        c["spec"]["replicas"] = json!(7);
    });
    fake.clear_requests();
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap().spec.replicas, Some(3));
    assert!(fake.requests().iter().all(|r| !r.contains("/statefulsets/")), "{:?}", fake.requests());
    assert_eq!(cond(&fake, "demo", PROGRESSING), ("False".into(), "Paused".into()));
    assert_eq!(stored(&fake, "demo").status.unwrap().phase.as_deref(), Some("Paused"));

    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["metadata"]["annotations"] = json!({}));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(fake.get::<StatefulSet>(NAMESPACE, "demo").unwrap().spec.replicas, Some(7));
}

#[tokio::test]
async fn missing_secret_is_degraded_and_changes_nothing() {
    let (fake, ctx) = setup(full("prod"));
    fake.put(&theme_config_map("chat-theme"));
    run(&fake, &ctx, "prod").await.unwrap();
    assert_eq!(cond(&fake, "prod", DEGRADED), ("True".into(), "SecretNotFound".into()));
    assert_eq!(cond(&fake, "prod", RECONCILE_SUCCESS), ("False".into(), "SecretNotFound".into()));
    assert_eq!(cond(&fake, "prod", READY), ("False".into(), "SecretNotFound".into()));
    assert!(fake.events().contains(&("Warning".into(), "SecretNotFound".into())));
    assert_eq!(fake.count::<StatefulSet>(), 0, "nothing may be created from an invalid spec");

    fake.put(&jwt_secret("chat-jwt", "key"));
    run(&fake, &ctx, "prod").await.unwrap();
    assert_eq!(cond(&fake, "prod", DEGRADED).0, "False");
    let running = config_hash(&fake, "prod");

    // Breaking a running cluster keeps what runs.
    fake.remove::<Secret>(NAMESPACE, "chat-jwt");
    fake.edit::<ChatCluster>(NAMESPACE, "prod", |c| c["spec"]["replicas"] = json!(9));
    run(&fake, &ctx, "prod").await.unwrap();
    assert_eq!(cond(&fake, "prod", DEGRADED).0, "True");
    let sts = fake.get::<StatefulSet>(NAMESPACE, "prod").unwrap();
    assert_eq!((sts.spec.replicas, config_hash(&fake, "prod")), (Some(5), running));
}

#[tokio::test]
async fn invalid_config_is_degraded_with_the_field_named() {
    let mut cluster = minimal("demo");
    cluster.spec.config.limits.idle_timeout_secs = 1;
    let (fake, ctx) = setup(cluster);
    run(&fake, &ctx, "demo").await.unwrap();
    let status = stored(&fake, "demo").status.unwrap();
    let degraded = condition(&status, DEGRADED).unwrap();
    assert_eq!(degraded.reason, "InvalidConfig");
    assert!(degraded.message.contains("limits.idle_timeout_secs"), "{}", degraded.message);
}

#[tokio::test]
async fn conflicts_are_retried_without_degrading() {
    let (fake, ctx) = setup(minimal("demo"));
    fake.fail_next(Method::PATCH, 409, 2);
    fake.fail_next(Method::GET, 503, 1);
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", DEGRADED).0, "False");
    let config_patches =
        fake.requests().iter().filter(|r| r.starts_with("PATCH") && r.ends_with("/demo-config")).count();
    assert_eq!(config_patches, 3, "two conflicts, then success");
}

fn peer_key(fake: &FakeApi) -> k8s_openapi::ByteString {
    fake.get::<Secret>(NAMESPACE, "demo-peer").and_then(|s| s.data).expect("peer secret")[PEER_KEY].clone()
}

#[tokio::test]
async fn a_failed_read_of_the_existing_peer_secret_never_replaces_its_key() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let key = peer_key(&fake);

    fake.fail_next(Method::GET, 503, 1);
    run(&fake, &ctx, "demo").await.expect("a transient failure is retried");
    assert_eq!(peer_key(&fake), key);

    // Read as "absent", a failure would write a fresh key: pods restarted with it could no
    // longer link to the others.
    fake.clear_requests();
    fake.fail_next(Method::GET, 503, 50);
    let err = run(&fake, &ctx, "demo").await.expect_err("a read that keeps failing fails the reconcile");
    assert!(
        matches!(&err, Error::Read { kind, name, .. } if kind == "Secret" && name == "demo-peer"),
        "unexpected error: {err}"
    );
    let writes: Vec<String> = fake.requests().into_iter().filter(|r| !r.starts_with("GET")).collect();
    assert!(writes.iter().all(|w| !w.contains("/secrets/")), "no Secret written: {writes:?}");
    assert_eq!(peer_key(&fake), key);
}

#[tokio::test]
async fn a_lost_peer_secret_gets_a_new_key_and_a_warning() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let key = peer_key(&fake);
    run(&fake, &ctx, "demo").await.unwrap();
    let regenerated = ("Warning".to_owned(), "PeerKeyRegenerated".to_owned());
    assert!(!fake.events().contains(&regenerated), "no warning while the Secret is there");

    assert!(fake.remove::<Secret>(NAMESPACE, "demo-peer"));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_ne!(peer_key(&fake), key, "a new key");
    assert!(fake.events().contains(&regenerated), "events: {:?}", fake.events());
}

#[tokio::test]
async fn persistent_api_errors_fail_without_degrading_at_first() {
    let (fake, ctx) = setup(minimal("demo"));
    fake.fail_next(Method::PATCH, 500, 4);
    let err = run(&fake, &ctx, "demo").await.unwrap_err();
    assert!(matches!(err, Error::Apply { .. }), "{err}");
    assert!(stored(&fake, "demo").status.is_none(), "no Degraded on the first failure");
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", DEGRADED).0, "False");
}

#[tokio::test]
async fn user_assets_config_map_is_merged_with_inline_files() {
    let mut cluster = minimal("demo");
    cluster.spec.assets.config_map_ref = Some(chat_operator::crd::LocalRef { name: "chat-theme".into() });
    cluster.spec.assets.files = BTreeMap::from([("logo.svg".into(), "<svg/>".into())]);
    let (fake, ctx) = setup(cluster);
    fake.put(&theme_config_map("chat-theme"));
    run(&fake, &ctx, "demo").await.unwrap();
    let data = fake.get::<ConfigMap>(NAMESPACE, "demo-assets").unwrap().data.unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), ["logo.svg", "style.css"]);
}

#[tokio::test]
async fn requests_follow_the_pipeline_order() {
    let (fake, ctx) = setup(minimal("demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    let core = "/api/v1/namespaces/chat";
    let reads = [
        format!("GET {core}/secrets/demo-peer"),
        "GET /apis/apps/v1/namespaces/chat/statefulsets/demo".to_owned(),
        format!("GET {core}/configmaps/demo-config"),
        format!("GET {core}/configmaps/demo-assets"),
        format!("GET {core}/services/demo-peers"),
        format!("GET {core}/services/demo"),
        "GET /apis/policy/v1/namespaces/chat/poddisruptionbudgets/demo".to_owned(),
    ];
    let writes = [
        format!("PATCH {core}/configmaps/demo-config"),
        format!("PATCH {core}/configmaps/demo-assets"),
        format!("PATCH {core}/secrets/demo-peer"),
        format!("PATCH {core}/services/demo-peers"),
        format!("PATCH {core}/services/demo"),
        "PATCH /apis/policy/v1/namespaces/chat/poddisruptionbudgets/demo".to_owned(),
        "PATCH /apis/apps/v1/namespaces/chat/statefulsets/demo".to_owned(),
        "POST /apis/events.k8s.io/v1/namespaces/chat/events".to_owned(),
        "PATCH /apis/chatcluster.dev/v1alpha1/namespaces/chat/chatclusters/demo/status".to_owned(),
    ];
    assert_eq!(fake.requests(), [&reads[..], &writes[..]].concat());

    // Nothing changed: the operator only reads (1 000 clusters resynced every 5 minutes cost
    // the API server no writes).
    fake.clear_requests();
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(fake.requests(), reads);
    // Someone edits a child: exactly that child is written back.
    fake.edit::<Service>(NAMESPACE, "demo", |s| s["spec"]["ports"][0]["port"] = json!(9999));
    fake.clear_requests();
    run(&fake, &ctx, "demo").await.unwrap();
    let written: Vec<String> = fake.requests().into_iter().filter(|r| !r.starts_with("GET")).collect();
    assert_eq!(written, [format!("PATCH {core}/services/demo")]);
    // A wanted field removed (an annotation no longer in spec.pod): the child is written even
    // though what remains is all there.
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["service"]["annotations"] = json!({"a": "1"}));
    run(&fake, &ctx, "demo").await.unwrap();
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["service"]["annotations"] = json!({}));
    fake.clear_requests();
    run(&fake, &ctx, "demo").await.unwrap();
    let svc = fake.get::<Service>(NAMESPACE, "demo").unwrap();
    assert!(!svc.metadata.annotations.unwrap_or_default().contains_key("a"), "the removed annotation is gone");
}

#[tokio::test]
async fn a_same_named_object_of_another_application_is_never_taken_over() {
    let (fake, ctx) = setup(minimal("demo"));
    let mut foreign = Service::default();
    foreign.metadata.name = Some("demo".into());
    foreign.metadata.namespace = Some(NAMESPACE.into());
    foreign.metadata.labels = Some([("app".to_owned(), "billing".to_owned())].into());
    fake.put(&foreign);
    run(&fake, &ctx, "demo").await.unwrap();
    let (degraded, reason) = cond(&fake, "demo", DEGRADED);
    assert_eq!((degraded.as_str(), reason.as_str()), ("True", "NameConflict"));
    assert!(fake.events().contains(&("Warning".into(), "NameConflict".into())));
    assert_eq!(fake.count::<StatefulSet>(), 0, "nothing is created next to a conflict");
    let svc = fake.get::<Service>(NAMESPACE, "demo").unwrap();
    assert_eq!(svc.metadata.labels.unwrap()["app"], "billing");
    assert!(svc.metadata.owner_references.is_none(), "not adopted, so never garbage-collected with the cluster");

    assert!(fake.remove::<Service>(NAMESPACE, "demo"));
    run(&fake, &ctx, "demo").await.unwrap();
    assert_eq!(cond(&fake, "demo", DEGRADED).0, "False", "resolved once the name is free");
}

/// A node probe that answers what the test set last, and counts the nodes asked.
#[derive(Debug, Default)]
struct ScriptedProbe {
    answer: std::sync::Mutex<Option<chat_operator::reconcile::balance::Balance>>,
    asked: std::sync::atomic::AtomicUsize,
}

#[async_trait::async_trait]
impl chat_operator::reconcile::balance::NodeProbe for ScriptedProbe {
    async fn balance(
        &self,
        owner: &chat_operator::resources::Owner,
        ordinal: i32,
    ) -> Result<chat_operator::reconcile::balance::Balance, chat_operator::reconcile::balance::ProbeError> {
        self.asked.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.answer.lock().unwrap().clone().ok_or_else(|| {
            chat_operator::reconcile::balance::ProbeError::Connect(format!("{}-{ordinal}", owner.name), "down".into())
        })
    }
}

/// `ctx` with a [`ScriptedProbe`] asking the nodes.
fn with_scripted_probe(fake: &FakeApi, ctx: &Arc<Context>) -> (Arc<ScriptedProbe>, Arc<Context>) {
    let probe = Arc::new(ScriptedProbe::default());
    let mut with_probe =
        Context::new(fake.client(), ctx.metrics.clone(), None).with_node_probe(probe.clone() as Arc<_>);
    with_probe.retry = ctx.retry;
    (probe, Arc::new(with_probe))
}

fn balance(rebalancing: bool, even: bool, hold: Option<&str>) -> chat_operator::reconcile::balance::Balance {
    chat_operator::reconcile::balance::Balance {
        rebalancing,
        even,
        hold: hold.map(str::to_owned),
        spread_percent: if even { 4.0 } else { 66.7 },
        counts: vec![("demo-0".into(), 1000), ("demo-1".into(), 1000), ("demo-2".into(), 0)],
    }
}

#[tokio::test]
async fn a_rebalance_is_announced_when_it_starts_and_when_it_ends() {
    let (fake, ctx) = setup(minimal("demo"));
    let (probe, ctx) = with_scripted_probe(&fake, &ctx);
    let reconcile_once = async || {
        let cluster = fake.get::<ChatCluster>(NAMESPACE, "demo").unwrap();
        reconcile(Arc::new(cluster), ctx.clone()).await.unwrap()
    };
    let count = |reason: &str| fake.events().iter().filter(|(_, r)| r == reason).count();
    reconcile_once().await;
    fake.settle_statefulset(NAMESPACE, "demo");

    // The new node just joined: the cluster is looked at again within seconds.
    *probe.answer.lock().unwrap() = Some(balance(false, false, Some("settling")));
    let action = reconcile_once().await;
    assert!(action_delay(&action) < std::time::Duration::from_secs(6), "{action:?}");
    assert_eq!(stored(&fake, "demo").status.unwrap().rebalancing, Some(false));

    *probe.answer.lock().unwrap() = Some(balance(true, false, None));
    reconcile_once().await;
    reconcile_once().await;
    assert_eq!(count("RebalanceStarted"), 1, "once per rebalance: {:?}", fake.events());
    assert_eq!(stored(&fake, "demo").status.unwrap().rebalancing, Some(true));

    // A node that cannot be asked changes nothing.
    *probe.answer.lock().unwrap() = None;
    reconcile_once().await;
    assert_eq!(stored(&fake, "demo").status.unwrap().rebalancing, Some(true));

    *probe.answer.lock().unwrap() = Some(balance(false, true, Some("balanced")));
    let action = reconcile_once().await;
    reconcile_once().await;
    assert_eq!(count("RebalanceFinished"), 1, "{:?}", fake.events());
    assert_eq!(stored(&fake, "demo").status.unwrap().rebalancing, Some(false));
    assert!(action_delay(&action) > std::time::Duration::from_secs(60), "back to the slow resync: {action:?}");

    // With rebalancing off nobody is asked and the status says nothing.
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["rebalance"] = json!({"enabled": false}));
    let asked = probe.asked.load(std::sync::atomic::Ordering::SeqCst);
    reconcile_once().await;
    assert_eq!(probe.asked.load(std::sync::atomic::Ordering::SeqCst), asked);
    assert_eq!(stored(&fake, "demo").status.unwrap().rebalancing, None);
}

#[tokio::test]
async fn turning_rebalancing_off_mid_rebalance_announces_its_end() {
    let (fake, ctx) = setup(minimal("demo"));
    let (probe, ctx) = with_scripted_probe(&fake, &ctx);
    run(&fake, &ctx, "demo").await.unwrap();
    fake.settle_statefulset(NAMESPACE, "demo");
    *probe.answer.lock().unwrap() = Some(balance(true, false, None));
    run(&fake, &ctx, "demo").await.unwrap();
    assert!(fake.events().contains(&("Normal".into(), "RebalanceStarted".into())));
    fake.edit::<ChatCluster>(NAMESPACE, "demo", |c| c["spec"]["rebalance"] = json!({"enabled": false}));
    run(&fake, &ctx, "demo").await.unwrap();
    assert!(fake.events().contains(&("Normal".into(), "RebalanceFinished".into())), "{:?}", fake.events());
    assert_eq!(stored(&fake, "demo").status.unwrap().rebalancing, None);
}

/// The delay of a requeue (`Action` shows it only through `Debug`).
fn action_delay(action: &kube::runtime::controller::Action) -> std::time::Duration {
    let text = format!("{action:?}");
    let secs = text.split("requeue_after: Some(").nth(1).and_then(|rest| rest.split(')').next()).unwrap_or("0s");
    let (number, unit) = secs.split_at(secs.find(|c: char| c.is_alphabetic()).unwrap_or(secs.len()));
    let number: f64 = number.parse().unwrap_or(0.0);
    match unit {
        "ms" => std::time::Duration::from_secs_f64(number / 1000.0),
        "µs" => std::time::Duration::from_secs_f64(number / 1e6),
        _ => std::time::Duration::from_secs_f64(number),
    }
}
