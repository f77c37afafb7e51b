//! Pure builders of every child object of a ChatCluster, from the spec and a validated [`Plan`].

mod configmap;
mod pdb;
mod secret;
mod service;
mod statefulset;

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};

use crate::crd::ChatCluster;
use crate::reconcile::validate::Plan;

pub use configmap::{CONFIG_KEY, assets, config, files as config_map_files};
pub use pdb::pdb;
pub use secret::{PEER_KEY, peer_secret};
pub use service::{api_service, client_service, peer_service};
pub use statefulset::{REVISION_FIELD, statefulset};

/// The one field manager for every server-side apply of the operator.
pub const FIELD_MANAGER: &str = "chat-operator";
/// The label every child carries, and the selector the operator watches its children with.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
pub const MANAGED_BY_SELECTOR: &str = "app.kubernetes.io/managed-by=chat-operator";
/// Pod template annotation holding the hash of everything that needs a restart.
pub const CONFIG_HASH_ANNOTATION: &str = "chatcluster.dev/config-hash";
pub const HTTP_PORT: i32 = 8080;
pub const PEER_PORT: i32 = 8081;
/// `/metrics`, `/cluster` and the probes; not behind the client Service.
pub const ADMIN_PORT: i32 = 9090;
/// Where the node finds its files; the rendered config points into these.
pub const MOUNT_ROOT: &str = "/etc/chatcluster";
/// In a directory of its own, mounted without `subPath`: kubelet's `..data` swap then reaches
/// running pods, which re-read `cluster.size` from it (a `subPath` mount never changes).
pub const CONFIG_DIR: &str = "/etc/chatcluster/config";
pub const CONFIG_PATH: &str = "/etc/chatcluster/config/node.toml";
pub const ASSETS_DIR: &str = "/etc/chatcluster/assets";
pub const AUTH_DIR: &str = "/etc/chatcluster/auth";
/// The `spec.tls` Secret, mounted whole (no `subPath`) so that a renewal reaches the pod.
pub const TLS_DIR: &str = "/etc/chatcluster/tls";
/// The server API's keys (`spec.api.keySecretRef`).
pub const API_DIR: &str = "/etc/chatcluster/api";
pub const PEER_DIR: &str = "/etc/chatcluster/peer";
/// Where each node's volume (`spec.storage`) is mounted: the node's `cluster.data_dir`.
pub const DATA_DIR: &str = "/var/lib/chatcluster";
/// The volume claim template's name; the StatefulSet names each claim `data-<pod>`.
pub const DATA_VOLUME: &str = "data";

/// The Kubernetes cluster's DNS domain unless the operator is told otherwise
/// (`--cluster-domain`).
pub const DEFAULT_CLUSTER_DOMAIN: &str = "cluster.local";

/// Identity of the ChatCluster that every child carries.
#[derive(Clone, Debug, PartialEq)]
pub struct Owner {
    pub name: String,
    pub namespace: String,
    pub reference: OwnerReference,
    /// The DNS domain of the Kubernetes cluster, for the nodes' peer lookups.
    pub cluster_domain: String,
}

impl Owner {
    /// `None` when the object has no name, namespace or uid (never true for a stored object).
    pub fn of(cluster: &ChatCluster) -> Option<Self> {
        use kube::Resource;
        Some(Self {
            name: cluster.metadata.name.clone()?,
            namespace: cluster.metadata.namespace.clone()?,
            reference: cluster.controller_owner_ref(&())?,
            cluster_domain: DEFAULT_CLUSTER_DOMAIN.to_owned(),
        })
    }

    /// Labels that select this cluster's pods.
    pub fn selector_labels(&self) -> BTreeMap<String, String> {
        BTreeMap::from([
            ("app.kubernetes.io/name".to_owned(), "chatcluster".to_owned()),
            ("app.kubernetes.io/instance".to_owned(), self.name.clone()),
        ])
    }

    /// `key=value,...` form of [`Self::selector_labels`], for the scale subresource.
    pub fn selector_string(&self) -> String {
        self.selector_labels().iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
    }

    /// Metadata of a child: its name, the cluster's namespace, labels and controller reference.
    pub fn object_meta(&self, name: impl Into<String>) -> ObjectMeta {
        let mut labels = self.selector_labels();
        labels.insert(MANAGED_BY_LABEL.to_owned(), FIELD_MANAGER.to_owned());
        ObjectMeta {
            name: Some(name.into()),
            namespace: Some(self.namespace.clone()),
            labels: Some(labels),
            owner_references: Some(vec![self.reference.clone()]),
            ..ObjectMeta::default()
        }
    }

    pub fn peer_service_name(&self) -> String {
        format!("{}-peers", self.name)
    }

    pub fn config_name(&self) -> String {
        format!("{}-config", self.name)
    }

    pub fn assets_name(&self) -> String {
        format!("{}-assets", self.name)
    }

    pub fn api_service_name(&self) -> String {
        format!("{}-api", self.name)
    }

    pub fn peer_secret_name(&self) -> String {
        format!("{}-peer", self.name)
    }

    /// DNS name of the headless peer Service, as the nodes will use it to find each other.
    pub fn peer_dns(&self) -> String {
        format!("{}.{}.svc.{}", self.peer_service_name(), self.namespace, self.cluster_domain)
    }
}

/// Every child the cluster should have; `pdb` is `None` when it should not exist.
#[derive(Clone, Debug, PartialEq)]
pub struct Children {
    pub statefulset: StatefulSet,
    pub client_service: Service,
    pub peer_service: Service,
    pub config: ConfigMap,
    pub assets: ConfigMap,
    pub peer_secret: Secret,
    pub pdb: Option<PodDisruptionBudget>,
    /// The server API's Service, with `spec.api`.
    pub api_service: Option<Service>,
}

/// Builds every child; pure, so the same inputs always give the same objects.
pub fn build(cluster: &ChatCluster, plan: &Plan) -> Children {
    Children {
        statefulset: statefulset(cluster, plan),
        client_service: client_service(cluster, &plan.owner),
        peer_service: peer_service(&plan.owner),
        config: config(plan),
        assets: assets(plan),
        peer_secret: peer_secret(plan),
        pdb: pdb(cluster, &plan.owner),
        api_service: cluster.spec.api.as_ref().map(|_| api_service(&plan.owner)),
    }
}

/// `None` for an empty map so optional fields stay absent in applied objects.
fn non_empty<K, V>(map: BTreeMap<K, V>) -> Option<BTreeMap<K, V>> {
    (!map.is_empty()).then_some(map)
}

fn non_empty_vec<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}
