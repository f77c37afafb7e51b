//! Operator end-to-end tests against a real Kubernetes cluster: they run when `KUBECONFIG` is
//! set, and without it `cargo test` reports them as ignored with the reason, never as passed
//! (`e2e/build.rs` sets `cfg(kube_cluster)`). Two replicas of the operator's run loop (leader
//! election on a Lease, then the controller) run in this process, watching a fresh namespace;
//! the scenario stops the leader half way (the standby must take over); covered too: chat
//! through the client Service, a config rollout, asset hot reload, scale up and step-wise down,
//! a lost peer Secret, `OnDelete`, a name conflict and garbage collection; the chat-node image must be pullable by the cluster
//! (`CHAT_NODE_IMAGE` overrides it, e.g. after `kind load docker-image`). The client Service is
//! reached through the API server's port-forward to one of the pods it selects.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};
use chat_e2e::client::{Client as ChatClient, http_get};
use chat_operator::crd::{ChatCluster, ChatClusterStatus};
use chat_operator::metrics::Metrics;
use chat_operator::reconcile::status::condition;
use chat_operator::{crd, run};
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod, Secret, Service};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, CustomResourceExt, ResourceExt};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

const NAME: &str = "chat";
const SELECTOR: &str = "app.kubernetes.io/instance=chat";
const READY_TIMEOUT: Duration = Duration::from_secs(300);

#[tokio::test]
#[cfg_attr(not(kube_cluster), ignore = "skipped: KUBECONFIG not set (needs a Kubernetes cluster)")]
async fn operator_runs_a_chat_cluster_end_to_end() -> anyhow::Result<()> {
    if std::env::var_os("KUBECONFIG").is_none() {
        bail!("KUBECONFIG is not set: this test needs a Kubernetes cluster");
    }
    let client = Client::try_default().await?;
    install_crd(&client).await?;
    let ns = format!("chat-e2e-{}", std::process::id());
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let mut namespace = Namespace::default();
    namespace.metadata.name = Some(ns.clone());
    namespaces.create(&PostParams::default(), &namespace).await?;

    // Two replicas of the operator's run loop elect a leader on a Lease in the test namespace;
    // the scenario stops the leader half way and the standby must carry on.
    let replicas = [Replica::start(&client, &ns, "e2e-a"), Replica::start(&client, &ns, "e2e-b")];
    let result = scenario(&client, &ns, &replicas).await;
    for replica in &replicas {
        let _ = replica.stop.send(true);
    }
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    result
}

async fn install_crd(client: &Client) -> anyhow::Result<()> {
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    let crd = ChatCluster::crd();
    crds.patch(&crd.name_any(), &PatchParams::apply("chat-e2e").force(), &Patch::Apply(&crd)).await?;
    wait("CRD established", Duration::from_secs(60), || async {
        let crd = crds.get(ChatCluster::crd_name()).await?;
        let conditions = crd.status.and_then(|s| s.conditions).unwrap_or_default();
        Ok(conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"))
    })
    .await
}

/// One operator replica: the binary's run loop, with leader election.
struct Replica {
    health: Arc<chat_operator::http::Health>,
    stop: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), run::Error>>,
}

impl Replica {
    fn start(client: &Client, ns: &str, identity: &str) -> Replica {
        let (stop, stopped) = watch::channel(false);
        let health = Arc::new(chat_operator::http::Health::default());
        let options = run::Options {
            namespace: Some(ns.to_owned()),
            lease: Some(run::LeaseOptions {
                name: "chat-operator-e2e".into(),
                namespace: ns.to_owned(),
                ttl: Duration::from_secs(15),
                renew: Duration::from_secs(5),
            }),
            identity: identity.to_owned(),
            cluster_domain: "cluster.local".into(),
            // The test runs outside the cluster: pod DNS names do not resolve here.
            probe: Arc::new(chat_operator::reconcile::balance::NoProbe),
        };
        let task = tokio::spawn(run::run(client.clone(), options, Arc::new(Metrics::new()), health.clone(), stopped));
        Replica { health, stop, task }
    }

    fn leads(&self) -> bool {
        self.health.leader.load(std::sync::atomic::Ordering::Relaxed)
    }
}

async fn scenario(client: &Client, ns: &str, replicas: &[Replica; 2]) -> anyhow::Result<()> {
    let clusters: Api<ChatCluster> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let manifest = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/minimal.yaml"))?;
    let mut cluster: ChatCluster = serde_norway::from_str(&manifest)?;
    cluster.metadata.name = Some(NAME.into());
    cluster.spec.image = std::env::var("CHAT_NODE_IMAGE").unwrap_or_else(|_| crd::default_image());
    clusters.patch(NAME, &PatchParams::apply("chat-e2e").force(), &Patch::Apply(&cluster)).await?;
    let ready = wait_rolled_out(&clusters, 3).await?;

    // Chat through a pod behind the client Service.
    let addr = forward(pods.clone()).await?;
    let mut alice = ChatClient::connect(&format!("ws://{addr}/ws?name=alice"), None).await?;
    alice.expect_type("welcome", Duration::from_secs(10)).await?;
    alice.send_json(json!({"type": "join", "room": "e2e", "id": "j"})).await?;
    alice.recv_until("joined", Duration::from_secs(10)).await?;
    alice.send_json(json!({"type": "publish", "room": "e2e", "body": "hello", "id": "p"})).await?;
    let message = alice.recv_until("message", Duration::from_secs(10)).await?;
    assert_eq!(message["body"], "hello");
    alice.close().await;

    // A config change rolls every pod.
    let before = pod_uids(&pods).await?;
    let merge = PatchParams::default();
    clusters.patch(NAME, &merge, &Patch::Merge(json!({"spec": {"config": {"history": {"size": 42}}}}))).await?;
    let rolled = wait("new config hash", READY_TIMEOUT, || async {
        let status = status(&clusters).await?;
        Ok(status.target_config_hash != ready.target_config_hash && status.config_hash == status.target_config_hash)
    });
    rolled.await?;
    wait_rolled_out(&clusters, 3).await?;
    let after = pod_uids(&pods).await?;
    assert!(after.iter().all(|uid| !before.contains(uid)), "every pod replaced: {before:?} -> {after:?}");

    // An asset change is served without a restart.
    let addr = forward(pods.clone()).await?;
    for version in ["v1", "v2"] {
        let svg = format!("<svg xmlns=\"http://www.w3.org/2000/svg\" id=\"e2e-{version}\"/>");
        clusters.patch(NAME, &merge, &Patch::Merge(json!({"spec": {"assets": {"files": {"logo.svg": svg}}}}))).await?;
        wait("asset served", Duration::from_secs(180), || async {
            let (code, body) = http_get(addr, "/logo.svg").await?;
            Ok(code == 200 && body.contains(&format!("e2e-{version}")))
        })
        .await?;
    }
    assert_eq!(pod_uids(&pods).await?, after, "assets must not restart pods");

    // Leader failover: the leading replica shuts down (releasing the Lease); the standby takes
    // over and carries out the next change.
    let leader = replicas.iter().position(Replica::leads).context("one replica leads")?;
    let standby = &replicas[1 - leader];
    ensure!(!standby.leads(), "two leaders");
    let _ = replicas[leader].stop.send(true);
    wait("the standby to lead", Duration::from_secs(60), || async { Ok(standby.leads()) }).await?;
    ensure!(replicas[leader].task.is_finished() || !replicas[leader].leads(), "the old leader stopped leading");

    // Scale through the scale subresource, as kubectl scale and HPA do.
    clusters.patch_scale(NAME, &merge, &Patch::Merge(json!({"spec": {"replicas": 4}}))).await?;
    wait_rolled_out(&clusters, 4).await?;

    // Scale down 4 -> 2: the StatefulSet goes down one pod at a time, each after the one before
    // has drained, left and gone.
    let statefulsets: Api<StatefulSet> = Api::namespaced(client.clone(), ns);
    clusters.patch_scale(NAME, &merge, &Patch::Merge(json!({"spec": {"replicas": 2}}))).await?;
    let mut seen = vec![4];
    let started = Instant::now();
    while started.elapsed() < READY_TIMEOUT {
        let sts = statefulsets.get(NAME).await?;
        let wanted = sts.spec.replicas.unwrap_or_default();
        let running = sts.status.as_ref().map_or(0, |s| s.replicas);
        if seen.last() != Some(&wanted) {
            assert!(running <= wanted + 1, "lowered to {wanted} while {running} pods still ran");
            seen.push(wanted);
        }
        if wanted == 2 && running == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert_eq!(seen, [4, 3, 2], "one step at a time");
    wait_rolled_out(&clusters, 2).await?;

    // A lost peer Secret: a new key and a warning; the cluster stays available and rolls.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    secrets.delete(&format!("{NAME}-peer"), &DeleteParams::default()).await?;
    wait("PeerKeyRegenerated event", Duration::from_secs(60), || async {
        let events: Api<k8s_openapi::api::events::v1::Event> = Api::namespaced(client.clone(), ns);
        let list = events.list(&ListParams::default()).await?;
        Ok(list.items.iter().any(|e| e.reason.as_deref() == Some("PeerKeyRegenerated")))
    })
    .await?;
    wait_rolled_out(&clusters, 2).await?;

    // OnDelete: a config change waits (Progressing) until the pods are deleted by hand.
    clusters.patch(NAME, &merge, &Patch::Merge(json!({"spec": {"rollout": {"strategy": "OnDelete"}}}))).await?;
    wait_rolled_out(&clusters, 2).await?;
    let before = pod_uids(&pods).await?;
    clusters.patch(NAME, &merge, &Patch::Merge(json!({"spec": {"config": {"history": {"size": 43}}}}))).await?;
    wait("OnDelete rollout waiting", Duration::from_secs(60), || async {
        let s = status(&clusters).await?;
        Ok(condition(&s, "Progressing").is_some_and(|c| c.status == "True"))
    })
    .await?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    assert_eq!(pod_uids(&pods).await?, before, "OnDelete never replaces pods by itself");
    for (done, pod) in pods.list(&ListParams::default().labels(SELECTOR)).await?.items.iter().enumerate() {
        pods.delete(&pod.name_any(), &DeleteParams::default()).await?;
        // One at a time, as a careful admin would: the next only once this one is back and ready.
        wait("the replaced pod ready", READY_TIMEOUT, || async {
            let s = status(&clusters).await?;
            Ok(s.ready_replicas == 2 && s.updated_replicas > done as i32)
        })
        .await?;
    }
    wait_rolled_out(&clusters, 2).await?;
    let after = pod_uids(&pods).await?;
    assert!(after.iter().all(|uid| !before.contains(uid)), "every pod replaced by hand: {before:?} -> {after:?}");

    // A ChatCluster named like another application's Service never takes it over.
    let services: Api<Service> = Api::namespaced(client.clone(), ns);
    let foreign: Service = serde_json::from_value(json!({
        "metadata": {"name": "taken", "labels": {"app": "someone-else"}},
        "spec": {"ports": [{"port": 9999}], "selector": {"app": "someone-else"}}
    }))?;
    services.create(&PostParams::default(), &foreign).await?;
    let mut conflicting = cluster.clone();
    conflicting.metadata.name = Some("taken".into());
    conflicting.metadata.resource_version = None;
    clusters.patch("taken", &PatchParams::apply("chat-e2e").force(), &Patch::Apply(&conflicting)).await?;
    wait("Degraded NameConflict", Duration::from_secs(60), || async {
        let s = clusters.get("taken").await?.status.unwrap_or_default();
        Ok(condition(&s, "Degraded").is_some_and(|c| c.status == "True" && c.reason == "NameConflict"))
    })
    .await?;
    let kept = services.get("taken").await?;
    assert_eq!(kept.spec.and_then(|s| s.ports).map(|p| p[0].port), Some(9999), "the foreign Service is untouched");
    assert!(kept.metadata.owner_references.unwrap_or_default().is_empty(), "and not adopted");
    clusters.delete("taken", &DeleteParams::background()).await?;

    // Deleting the cluster garbage-collects every child.
    clusters.delete(NAME, &DeleteParams::background()).await?;
    wait("children collected", Duration::from_secs(180), || async {
        let lp = ListParams::default().labels(SELECTOR);
        let sts = Api::<StatefulSet>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
        let svc = Api::<Service>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
        let cms = Api::<ConfigMap>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
        let secrets = Api::<Secret>::namespaced(client.clone(), ns).list(&lp).await?.items.len();
        Ok(sts + svc + cms + secrets == 0)
    })
    .await
}

async fn status(clusters: &Api<ChatCluster>) -> anyhow::Result<ChatClusterStatus> {
    Ok(clusters.get(NAME).await?.status.unwrap_or_default())
}

/// Waits for `replicas` ready, up-to-date nodes and returns that status.
async fn wait_rolled_out(clusters: &Api<ChatCluster>, replicas: i32) -> anyhow::Result<ChatClusterStatus> {
    wait(&format!("{replicas} nodes ready"), READY_TIMEOUT, || async {
        let s = status(clusters).await?;
        let is = |t: &str, v: &str| condition(&s, t).is_some_and(|c| c.status == v);
        Ok(s.ready_replicas == replicas && is("Available", "True") && is("Progressing", "False"))
    })
    .await?;
    status(clusters).await
}

async fn pod_uids(pods: &Api<Pod>) -> anyhow::Result<Vec<String>> {
    let list = pods.list(&ListParams::default().labels(SELECTOR)).await?;
    let mut uids: Vec<String> = list.items.iter().filter_map(|p| p.metadata.uid.clone()).collect();
    uids.sort();
    Ok(uids)
}

/// A local port whose connections are forwarded to port 8080 of a ready pod of the Service.
async fn forward(pods: Api<Pod>) -> anyhow::Result<SocketAddr> {
    let list = pods.list(&ListParams::default().labels(SELECTOR)).await?;
    let ready = |p: &&Pod| {
        let conditions = p.status.as_ref().and_then(|s| s.conditions.as_ref());
        conditions.is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let pod = list.items.iter().find(ready).context("no ready pod")?.name_any();
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut local, _)) = listener.accept().await {
            let (pods, pod) = (pods.clone(), pod.clone());
            tokio::spawn(async move {
                let Ok(mut forwarder) = pods.portforward(&pod, &[8080]).await else { return };
                if let Some(mut remote) = forwarder.take_stream(8080) {
                    let _ = tokio::io::copy_bidirectional(&mut local, &mut remote).await;
                }
            });
        }
    });
    Ok(addr)
}

/// Polls `check` every 2 s until it is true or `timeout` passes.
async fn wait<F, Fut>(what: &str, timeout: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let start = Instant::now();
    loop {
        match check().await {
            Ok(true) => return Ok(()),
            Ok(false) => {}
            Err(e) if start.elapsed() > timeout => return Err(e.context(format!("waiting for {what}"))),
            Err(_) => {}
        }
        if start.elapsed() > timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}
