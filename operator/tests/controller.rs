//! The operator's run loop (leader election, the controller and its watches) against the fake
//! API server, end to end: nothing here calls `reconcile`; every change reaches the operator
//! through a watch, as in a cluster. Also the API server's admission of ChatClusters: defaults
//! from the CRD's schema, and 422 for objects that violate it.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chat_operator::crd::{ChatCluster, LocalRef};
use chat_operator::fake::FakeApi;
use chat_operator::fixtures::{NAMESPACE, minimal, theme_config_map};
use chat_operator::http::Health;
use chat_operator::metrics::Metrics;
use chat_operator::reconcile::status::{AVAILABLE, READY, RECONCILE_SUCCESS, condition};
use chat_operator::run::{self, LeaseOptions, Options};
use http::Method;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How long any wait may take: generous for a loaded CI machine, yet a broken watch fails the
/// test long before the operator's own 5-minute resync could hide it.
const WAIT: Duration = Duration::from_secs(20);
const LEASE: &str = "chat-operator-leader";
const LEASE_NAMESPACE: &str = "ops";

/// One operator replica: the real run loop on its own client of the shared fake.
struct Replica {
    identity: String,
    health: Arc<Health>,
    metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    task: JoinHandle<Result<(), run::Error>>,
}

fn lease(ttl: Duration) -> LeaseOptions {
    LeaseOptions { name: LEASE.into(), namespace: LEASE_NAMESPACE.into(), ttl, renew: Duration::from_millis(100) }
}

/// Starts a replica watching every namespace, as the operator does by default.
fn start(fake: &FakeApi, identity: &str, lease: Option<LeaseOptions>) -> Replica {
    let options = Options {
        namespace: None,
        lease,
        identity: identity.to_owned(),
        cluster_domain: "cluster.local".to_owned(),
        probe: Arc::new(chat_operator::reconcile::balance::NoProbe),
    };
    let (metrics, health) = (Arc::new(Metrics::new()), Arc::new(Health::default()));
    let (stop, stopped) = watch::channel(false);
    let client = fake.client_as(identity);
    let task = tokio::spawn(run::run(client, options, metrics.clone(), health.clone(), stopped));
    Replica { identity: identity.to_owned(), health, metrics, stop, task }
}

impl Replica {
    fn leads(&self) -> bool {
        self.health.leader.load(Ordering::Relaxed)
    }

    fn synced(&self) -> bool {
        self.health.watches_synced.load(Ordering::Relaxed)
    }

    /// Waits for the run loop to return on its own.
    async fn finished(&mut self) -> Result<(), run::Error> {
        let joined = tokio::time::timeout(WAIT, &mut self.task).await;
        let joined = joined.unwrap_or_else(|_| panic!("{}'s run loop still running after {WAIT:?}", self.identity));
        joined.expect("the run loop panicked")
    }

    /// Signals shutdown and waits for the run loop to return.
    async fn shut_down(mut self) -> Result<(), run::Error> {
        let _ = self.stop.send(true);
        self.finished().await
    }
}

/// Polls `check` until it holds; fails the test with `what` after `WAIT`.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {WAIT:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `who` has sent no request for a while: the reconciles its own writes caused are
/// over, so whatever it does next was caused by what the test does next.
async fn settled(fake: &FakeApi, who: &str) {
    let quiet = Duration::from_millis(150);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut seen = fake.requests_from(who).len();
    loop {
        tokio::time::sleep(quiet).await;
        let now = fake.requests_from(who).len();
        if now == seen {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{who} still busy after {WAIT:?}");
        seen = now;
    }
}

/// A cluster as a user writes it: no server-set metadata.
fn cluster(name: &str) -> ChatCluster {
    let mut cluster = minimal(name);
    cluster.metadata.uid = None;
    cluster.metadata.generation = None;
    cluster
}

async fn create(fake: &FakeApi, cluster: &ChatCluster) {
    let api: Api<ChatCluster> = Api::namespaced(fake.client(), NAMESPACE);
    api.create(&PostParams::default(), cluster).await.expect("ChatCluster created");
}

/// Whether the operator has reconciled the cluster's current generation successfully.
fn reconciled(fake: &FakeApi, name: &str) -> bool {
    let Some(cluster) = fake.get::<ChatCluster>(NAMESPACE, name) else { return false };
    let Some(status) = cluster.status else { return false };
    status.observed_generation == cluster.metadata.generation
        && condition(&status, RECONCILE_SUCCESS).is_some_and(|c| c.status == "True")
}

fn resource_version<K: kube::Resource>(object: &K) -> u64 {
    object.meta().resource_version.as_deref().and_then(|v| v.parse().ok()).unwrap_or(0)
}

fn lease_holder(fake: &FakeApi) -> Option<String> {
    fake.get::<Lease>(LEASE_NAMESPACE, LEASE).and_then(|l| l.spec).and_then(|s| s.holder_identity)
}

#[tokio::test]
async fn a_created_cluster_is_reconciled_from_the_watch() {
    let fake = FakeApi::new();
    let replica = start(&fake, "solo", None);
    eventually("the ChatCluster watch to sync", || replica.synced()).await;
    // Created after the controller's initial list: only the watch can bring it in.
    create(&fake, &cluster("demo")).await;
    eventually("demo to be reconciled", || reconciled(&fake, "demo")).await;

    assert!(fake.get::<StatefulSet>(NAMESPACE, "demo").is_some(), "StatefulSet");
    assert!(fake.get::<Service>(NAMESPACE, "demo").is_some(), "client Service");
    assert!(fake.get::<Service>(NAMESPACE, "demo-peers").is_some(), "peer Service");
    assert!(fake.get::<ConfigMap>(NAMESPACE, "demo-config").is_some(), "config ConfigMap");
    assert!(fake.get::<ConfigMap>(NAMESPACE, "demo-assets").is_some(), "assets ConfigMap");
    assert!(fake.get::<Secret>(NAMESPACE, "demo-peer").is_some(), "peer key Secret");
    assert!(fake.get::<PodDisruptionBudget>(NAMESPACE, "demo").is_some(), "PodDisruptionBudget");
    let status = fake.get::<ChatCluster>(NAMESPACE, "demo").and_then(|c| c.status).unwrap();
    assert_eq!(status.observed_generation, Some(1));
    for type_ in [READY, AVAILABLE] {
        let found = condition(&status, type_).unwrap_or_else(|| panic!("no {type_} condition: {status:?}"));
        assert_eq!(found.status, "True", "{type_}: {found:?}");
    }
    assert!(replica.leads(), "without leader election the replica leads at once");

    // A spec change arrives the same way.
    let api: Api<ChatCluster> = Api::namespaced(fake.client(), NAMESPACE);
    api.patch("demo", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": 5}}))).await.unwrap();
    eventually("the scale-up to be applied", || {
        fake.get::<StatefulSet>(NAMESPACE, "demo").and_then(|s| s.spec.replicas) == Some(5)
    })
    .await;
    eventually("generation 2 to be reconciled", || reconciled(&fake, "demo")).await;
    replica.shut_down().await.expect("a clean shutdown");
}

#[tokio::test]
async fn a_deleted_child_comes_back() {
    let fake = FakeApi::new();
    let replica = start(&fake, "solo", None);
    create(&fake, &cluster("demo")).await;
    eventually("demo to be reconciled", || reconciled(&fake, "demo")).await;
    settled(&fake, "solo").await;

    let services: Api<Service> = Api::namespaced(fake.client(), NAMESPACE);
    services.delete("demo", &DeleteParams::default()).await.expect("deleted");
    let deleted_at = fake.revision();
    assert!(fake.get::<Service>(NAMESPACE, "demo").is_none());
    // The deletion reaches the operator through its watch of owned Services; the periodic
    // resync is five minutes away.
    eventually("the client Service to be created again", || {
        fake.get::<Service>(NAMESPACE, "demo").is_some_and(|s| resource_version(&s) > deleted_at)
    })
    .await;
    replica.shut_down().await.expect("a clean shutdown");
}

#[tokio::test]
async fn an_edited_referenced_config_map_is_applied() {
    let fake = FakeApi::new();
    fake.put(&theme_config_map("chat-theme"));
    let replica = start(&fake, "solo", None);
    let mut themed = cluster("themed");
    themed.spec.assets.config_map_ref = Some(LocalRef { name: "chat-theme".to_owned() });
    create(&fake, &themed).await;
    let style = || {
        let assets = fake.get::<ConfigMap>(NAMESPACE, "themed-assets")?;
        assets.data?.get("style.css").cloned()
    };
    eventually("the theme to reach the assets ConfigMap", || style().as_deref() == Some("body { color: teal }")).await;
    eventually("themed to be reconciled", || reconciled(&fake, "themed")).await;
    settled(&fake, "solo").await;

    // The ChatCluster does not change: only the metadata watch of ConfigMaps tells the operator.
    let generation = fake.get::<ChatCluster>(NAMESPACE, "themed").and_then(|c| c.metadata.generation);
    let maps: Api<ConfigMap> = Api::namespaced(fake.client(), NAMESPACE);
    let edit = json!({"data": {"style.css": "body { color: navy }"}});
    maps.patch("chat-theme", &PatchParams::default(), &Patch::Merge(edit)).await.expect("edited");
    eventually("the edited theme to be applied", || style().as_deref() == Some("body { color: navy }")).await;
    assert_eq!(fake.get::<ChatCluster>(NAMESPACE, "themed").and_then(|c| c.metadata.generation), generation);
    replica.shut_down().await.expect("a clean shutdown");
}

#[tokio::test]
async fn only_the_leader_writes_and_shutdown_hands_the_lease_over() {
    let fake = FakeApi::new();
    // A lease far longer than the takeover may take: only a released lease is taken that soon.
    let ttl = Duration::from_secs(10);
    let a = start(&fake, "a", Some(lease(ttl)));
    eventually("a to lead", || a.leads()).await;
    let b = start(&fake, "b", Some(lease(ttl)));
    eventually("b to try for the lease a few times", || fake.requests_from("b").len() >= 3).await;

    create(&fake, &cluster("one")).await;
    eventually("the leader to reconcile one", || reconciled(&fake, "one")).await;
    assert!(!b.leads());
    let read_lease = format!("GET /apis/coordination.k8s.io/v1/namespaces/{LEASE_NAMESPACE}/leases/{LEASE}");
    let from_b = fake.requests_from("b");
    assert!(from_b.iter().all(|r| *r == read_lease), "the standby only reads the lease: {from_b:?}");
    assert_eq!(b.metrics.reconciles(), 0);
    assert!(a.metrics.reconciles() > 0);
    assert_eq!(lease_holder(&fake).as_deref(), Some("a"));

    a.shut_down().await.expect("the leader shuts down cleanly");
    let stopped = tokio::time::Instant::now();
    eventually("b to take over", || b.leads()).await;
    assert!(stopped.elapsed() < ttl / 2, "took {:?}: the lease was not released", stopped.elapsed());
    assert_eq!(lease_holder(&fake).as_deref(), Some("b"));

    create(&fake, &cluster("two")).await;
    eventually("the new leader to reconcile two", || reconciled(&fake, "two")).await;
    let writes_two =
        |who: &str| fake.requests_from(who).into_iter().filter(|r| r.starts_with("PATCH") && r.contains("/two"));
    assert!(writes_two("b").count() > 0, "b applied two's children");
    assert_eq!(writes_two("a").count(), 0, "a stopped writing");
    b.shut_down().await.expect("b shuts down cleanly");
    assert_eq!(lease_holder(&fake), None, "released at shutdown");
}

/// Renewals that fail, or hang, end the leader's run loop with the lost-lease error before its
/// lease could expire; from then on it writes nothing.
async fn a_leader_that_cannot_renew(break_renewals: impl FnOnce(&FakeApi)) {
    let fake = FakeApi::new();
    let mut a = start(&fake, "a", Some(lease(Duration::from_secs(2))));
    create(&fake, &cluster("one")).await;
    eventually("the leader to reconcile one", || reconciled(&fake, "one")).await;

    // Renewals replace the Lease (PUT); nothing else the operator does is a PUT.
    break_renewals(&fake);
    let result = a.finished().await;
    assert!(matches!(result, Err(run::Error::LostLease)), "{result:?}");
    assert!(!a.leads());

    let before = fake.requests_from("a").len();
    create(&fake, &cluster("two")).await;
    // A short look: a controller still running would have reconciled two by now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(fake.requests_from("a").len(), before, "{:?}", &fake.requests_from("a")[before..]);
    assert!(fake.get::<StatefulSet>(NAMESPACE, "two").is_none());
}

#[tokio::test]
async fn a_leader_whose_renewals_fail_stops_with_the_lost_lease_error() {
    a_leader_that_cannot_renew(|fake| fake.fail_next(Method::PUT, 500, 1000)).await;
}

#[tokio::test]
async fn a_leader_whose_renewal_stalls_stops_with_the_lost_lease_error() {
    a_leader_that_cannot_renew(|fake| fake.stall_next(Method::PUT, 1)).await;
}

fn chat_clusters(fake: &FakeApi) -> Api<DynamicObject> {
    Api::namespaced_with(fake.client(), NAMESPACE, &ApiResource::erase::<ChatCluster>(&()))
}

fn dynamic(name: &str, spec: Value) -> DynamicObject {
    let object = json!({"apiVersion": "chatcluster.dev/v1alpha1", "kind": "ChatCluster",
        "metadata": {"name": name, "namespace": NAMESPACE}, "spec": spec});
    serde_json::from_value(object).expect("a ChatCluster object")
}

#[tokio::test]
async fn absent_fields_get_the_schemas_defaults() {
    let fake = FakeApi::new();
    let api = chat_clusters(&fake);
    let spec = json!({"config": {"auth": {"mode": "jwt"}}, "service": {"type": "NodePort"},
        "auth": {"jwtSecretRef": {"name": "chat-jwt"}}});
    api.create(&PostParams::default(), &dynamic("sparse", spec)).await.expect("created");
    let spec = api.get("sparse").await.expect("read back").data["spec"].clone();
    assert_eq!(spec["replicas"], 3, "absent: the schema's default");
    assert_eq!(spec["service"], json!({"type": "NodePort", "port": 80}), "a present object's absent fields");
    assert_eq!(spec["auth"]["jwtSecretRef"], json!({"name": "chat-jwt", "key": "jwt-secret"}));
    assert_eq!(spec["pdb"], json!({"enabled": true, "maxUnavailable": 1}));
    assert_eq!(spec["drain"], json!({"lbGraceSeconds": 5, "ratePerSecond": 500, "deadlineSeconds": 25}));
    assert!(spec.get("image").is_none(), "the schema has no image default (the operator's own applies)");

    // Server-side apply is defaulted the same way.
    let applied = dynamic("applied", json!({"replicas": 1, "rollout": {"minReadySeconds": 5}}));
    api.patch("applied", &PatchParams::apply("someone"), &Patch::Apply(&applied)).await.expect("applied");
    let spec = api.get("applied").await.expect("read back").data["spec"].clone();
    assert_eq!(spec["replicas"], 1, "a set field keeps its value");
    assert_eq!(spec["rollout"], json!({"minReadySeconds": 5, "strategy": "RollingUpdate"}));
    assert_eq!(spec["service"], json!({"type": "ClusterIP", "port": 80}));
}

#[tokio::test]
async fn schema_violations_are_refused_with_422_invalid() {
    let fake = FakeApi::new();
    let api = chat_clusters(&fake);
    let anonymous = json!({"auth": {"mode": "anonymous"}});
    let cases = [
        (json!({"replicas": 2000}), "spec.replicas", "should be less than or equal to 1000"),
        (json!({"replicas": "three"}), "spec.replicas", "must be of type integer"),
        (json!({"service": {"type": "Ingress"}}), "spec.service.type", "Unsupported value: \"Ingress\""),
        (json!({"storage": {"storageClassName": "fast"}}), "spec.storage.size", "Required value"),
        (json!({"storage": {"size": "lots"}}), "spec.storage.size", "should match"),
        (json!({"image": ""}), "spec.image", "should be at least 1 chars long"),
        (json!({"pdb": {"maxUnavailable": 0}}), "spec.pdb.maxUnavailable", "greater than or equal to 1"),
    ];
    for (i, (mut spec, field, says)) in cases.into_iter().enumerate() {
        spec["config"] = anonymous.clone();
        let name = format!("bad-{i}");
        let refused = api.create(&PostParams::default(), &dynamic(&name, spec.clone())).await;
        let Err(kube::Error::Api(status)) = refused else { panic!("{spec} was not refused: {refused:?}") };
        assert_eq!((status.code, status.reason.as_str()), (422, "Invalid"), "{spec}: {status:?}");
        assert!(status.message.contains(says), "{spec}: {}", status.message);
        let causes = status.details.map(|d| d.causes).unwrap_or_default();
        assert!(causes.iter().any(|c| c.field == field), "{spec}: {field} not among {causes:?}");
        assert!(api.get_opt(&name).await.unwrap().is_none(), "{spec} was stored");
    }

    let missing =
        json!({"apiVersion": "chatcluster.dev/v1alpha1", "kind": "ChatCluster", "metadata": {"name": "bare"}});
    let refused = api.create(&PostParams::default(), &serde_json::from_value(missing).unwrap()).await;
    assert!(
        matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422 && s.message.contains("spec: Required value"))
    );

    // Updates are validated too, and a refused one changes nothing.
    api.create(&PostParams::default(), &dynamic("good", json!({"config": anonymous}))).await.expect("valid");
    let before = api.get("good").await.unwrap();
    let refused = api.patch("good", &PatchParams::default(), &Patch::Merge(json!({"spec": {"replicas": -1}}))).await;
    assert!(matches!(&refused, Err(kube::Error::Api(s)) if s.code == 422), "{refused:?}");
    let after = api.get("good").await.unwrap();
    assert_eq!(after.data["spec"], before.data["spec"]);
    assert_eq!(after.metadata.resource_version, before.metadata.resource_version);
}
