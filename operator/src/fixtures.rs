//! Builders of ChatClusters and referenced objects for tests and the benchmark.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use chat_node::config::{AuthMode, RoomRule};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, ResourceRequirements, Secret, Toleration};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::crd::{AuthSpec, ChatCluster, ChatClusterSpec, LocalRef, PdbSpec, SecretKeyRef, ServiceType, StorageSpec};
use crate::fake::FakeApi;
use crate::metrics::Metrics;
use crate::reconcile::Context;
use crate::reconcile::apply::RetryPolicy;

pub const NAMESPACE: &str = "chat";

fn meta(name: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_owned()),
        namespace: Some(NAMESPACE.to_owned()),
        uid: Some(format!("uid-{name}")),
        generation: Some(1),
        ..ObjectMeta::default()
    }
}

/// The smallest useful cluster: defaults, anonymous auth.
pub fn minimal(name: &str) -> ChatCluster {
    let mut spec = ChatClusterSpec::default();
    spec.config.auth.mode = AuthMode::Anonymous;
    ChatCluster { metadata: meta(name), spec, status: None }
}

/// A cluster that sets every part of the spec.
pub fn full(name: &str) -> ChatCluster {
    let mut spec =
        ChatClusterSpec { replicas: 5, image: "registry.example/chat-node:1.2.3".to_owned(), ..Default::default() };
    spec.resources = Some(ResourceRequirements {
        requests: Some(BTreeMap::from([("cpu".to_owned(), Quantity("250m".to_owned()))])),
        limits: Some(BTreeMap::from([("memory".to_owned(), Quantity("256Mi".to_owned()))])),
        ..ResourceRequirements::default()
    });
    spec.config.history.size = 500;
    spec.auth = AuthSpec {
        jwt_secret_ref: Some(SecretKeyRef { name: "chat-jwt".to_owned(), key: "key".to_owned() }),
        rooms: vec![RoomRule {
            pattern: "ops-*".to_owned(),
            join_roles: vec!["ops".to_owned()],
            publish_roles: vec![],
        }],
    };
    spec.assets.files =
        BTreeMap::from([("logo.svg".to_owned(), "<svg xmlns=\"http://www.w3.org/2000/svg\"/>".to_owned())]);
    spec.assets.config_map_ref = Some(LocalRef { name: "chat-theme".to_owned() });
    spec.service.type_ = ServiceType::LoadBalancer;
    spec.service.annotations = BTreeMap::from([("example.com/lb".to_owned(), "internal".to_owned())]);
    spec.pod.node_selector = BTreeMap::from([("pool".to_owned(), "chat".to_owned())]);
    spec.pod.tolerations = vec![Toleration {
        key: Some("dedicated".to_owned()),
        operator: Some("Exists".to_owned()),
        ..Toleration::default()
    }];
    spec.pod.labels = BTreeMap::from([("team".to_owned(), "chat".to_owned())]);
    spec.pdb = PdbSpec { enabled: true, max_unavailable: 2 };
    spec.drain.deadline_seconds = 40;
    spec.drain.lb_grace_seconds = 10;
    spec.storage = Some(StorageSpec { size: "2Gi".to_owned(), storage_class_name: Some("fast-ssd".to_owned()) });
    ChatCluster { metadata: meta(name), spec, status: None }
}

pub fn jwt_secret(name: &str, key: &str) -> Secret {
    Secret {
        metadata: meta(name),
        data: Some(BTreeMap::from([(key.to_owned(), ByteString(b"0123456789abcdef0123456789abcdef".to_vec()))])),
        ..Secret::default()
    }
}

/// A Secret with server API keys under `api-keys`, one per line.
pub fn api_keys_secret(name: &str, keys: &str) -> Secret {
    Secret {
        metadata: meta(name),
        data: Some(BTreeMap::from([("api-keys".to_owned(), ByteString(keys.as_bytes().to_vec()))])),
        ..Secret::default()
    }
}

/// `minimal(name)` with the server API on, its keys in Secret `chat-api`.
pub fn with_api(name: &str) -> ChatCluster {
    let mut cluster = minimal(name);
    cluster.spec.api = Some(crate::crd::ApiSpec {
        key_secret_ref: crate::crd::ApiKeySecretRef { name: "chat-api".to_owned(), key: "api-keys".to_owned() },
    });
    cluster
}

/// A `kubernetes.io/tls` Secret; the content is not a real certificate (the operator only
/// checks that both keys are there).
pub fn tls_secret(name: &str) -> Secret {
    Secret {
        metadata: meta(name),
        type_: Some("kubernetes.io/tls".to_owned()),
        data: Some(BTreeMap::from([
            ("tls.crt".to_owned(), ByteString(b"-----BEGIN CERTIFICATE-----".to_vec())),
            ("tls.key".to_owned(), ByteString(b"-----BEGIN PRIVATE KEY-----".to_vec())),
        ])),
        ..Secret::default()
    }
}

pub fn theme_config_map(name: &str) -> ConfigMap {
    ConfigMap {
        metadata: meta(name),
        data: Some(BTreeMap::from([("style.css".to_owned(), "body { color: teal }".to_owned())])),
        // Not UTF-8: only binaryData can carry it.
        binary_data: Some(BTreeMap::from([(
            "favicon.ico".to_owned(),
            k8s_openapi::ByteString(vec![0, 0, 1, 0, 1, 0, 0xff, 0xfe]),
        )])),
        ..ConfigMap::default()
    }
}

/// A reconcile context on the fake API with quick retries.
pub fn context(fake: &FakeApi) -> Arc<Context> {
    let mut ctx = Context::new(fake.client(), Arc::new(Metrics::new()), Some("test".to_owned()));
    ctx.retry = RetryPolicy { attempts: 4, first_delay: Duration::from_millis(1) };
    Arc::new(ctx)
}
