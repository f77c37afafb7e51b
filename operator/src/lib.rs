//! chat-operator: reconciles `ChatCluster` resources into running chat clusters.

pub mod controller;
pub mod crd;
pub mod fake;
pub mod fixtures;
pub mod http;
pub mod leader;
#[cfg(unix)]
pub mod local;
pub mod metrics;
pub mod reconcile;
pub mod reference;
pub mod resources;
pub mod run;
