//! The client Service (WebSocket and web page) and the headless peer Service (mesh discovery).

use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use super::{ADMIN_PORT, Owner, PEER_PORT, non_empty};
use crate::crd::{ChatCluster, ServiceType};

pub fn client_service(cluster: &ChatCluster, owner: &Owner) -> Service {
    let spec = &cluster.spec.service;
    let mut metadata = owner.object_meta(owner.name.clone());
    metadata.annotations = non_empty(spec.annotations.clone());
    // A nodePort on a ClusterIP Service is rejected by the API server; validation warns earlier.
    let node_port = if spec.type_ == ServiceType::ClusterIP { None } else { spec.node_port };
    Service {
        metadata,
        spec: Some(ServiceSpec {
            type_: Some(spec.type_.as_str().to_owned()),
            selector: Some(owner.selector_labels()),
            ports: Some(vec![ServicePort {
                name: Some("http".to_owned()),
                port: spec.port,
                target_port: Some(IntOrString::String("http".to_owned())),
                node_port,
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// The server API (`/api/v1` on the nodes' admin port) for backends inside the cluster. Ready
/// pods only: a node without quorum answers publishes with 503 anyway.
pub fn api_service(owner: &Owner) -> Service {
    Service {
        metadata: owner.object_meta(owner.api_service_name()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(owner.selector_labels()),
            ports: Some(vec![ServicePort {
                name: Some("api".to_owned()),
                port: ADMIN_PORT,
                target_port: Some(IntOrString::String("admin".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}

/// Headless, and listing pods before they are ready, so peers can dial each other at start-up.
pub fn peer_service(owner: &Owner) -> Service {
    Service {
        metadata: owner.object_meta(owner.peer_service_name()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".to_owned()),
            publish_not_ready_addresses: Some(true),
            selector: Some(owner.selector_labels()),
            ports: Some(vec![ServicePort {
                name: Some("peer".to_owned()),
                port: PEER_PORT,
                target_port: Some(IntOrString::String("peer".to_owned())),
                protocol: Some("TCP".to_owned()),
                ..ServicePort::default()
            }]),
            ..ServiceSpec::default()
        }),
        ..Service::default()
    }
}
