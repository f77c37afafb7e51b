//! ChatCluster node: a clustered WebSocket chat server.
//!
//! Without the default `server` feature only [`config`] (the schema the operator embeds in its
//! CRD) and [`protocol`] (the wire types) are built.

pub mod config;
pub mod protocol;

#[cfg(feature = "server")]
pub mod api;
#[cfg(feature = "server")]
pub mod auth;
#[cfg(feature = "server")]
pub mod cluster;
#[cfg(feature = "server")]
pub mod http;
#[cfg(feature = "server")]
pub mod hub;
#[cfg(feature = "server")]
pub mod metrics;
#[cfg(feature = "server")]
pub mod random;
#[cfg(feature = "server")]
pub mod rebalance;
#[cfg(feature = "server")]
pub mod replication;
#[cfg(feature = "server")]
pub mod server;
#[cfg(feature = "server")]
pub mod telemetry;
#[cfg(feature = "server")]
pub mod transport;

#[cfg(all(test, feature = "server"))]
mod fuzz;
