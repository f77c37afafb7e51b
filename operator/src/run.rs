//! The operator's run loop once it has an API client: leader election on a Lease, then the
//! controller until shutdown or until the lease is lost. The binary adds flags, logging, the
//! HTTP endpoint and signal handling; the tests run this loop against the fake API server.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use kube::Client;
use tokio::sync::watch;

use crate::controller;
use crate::http::Health;
use crate::leader::LeaseElector;
use crate::metrics::Metrics;
use crate::reconcile::Context;

/// What the run loop watches and how it elects a leader.
#[derive(Clone, Debug)]
pub struct Options {
    /// Watch only this namespace; `None`: the whole cluster.
    pub namespace: Option<String>,
    /// `None`: run without a Lease (only safe with a single replica).
    pub lease: Option<LeaseOptions>,
    /// This replica's identity in the Lease and in events.
    pub identity: String,
    /// The Kubernetes cluster's DNS domain (see `Context::with_cluster_domain`).
    pub cluster_domain: String,
    /// Asks nodes about their rebalancing: `HttpProbe` in a cluster, `NoProbe` where the pods
    /// cannot be reached.
    pub probe: Arc<dyn crate::reconcile::balance::NodeProbe>,
}

/// The Lease replicas elect their leader with.
#[derive(Clone, Debug)]
pub struct LeaseOptions {
    pub name: String,
    pub namespace: String,
    /// How long a lease lasts without renewal.
    pub ttl: Duration,
    /// How often candidates try to take it and the leader renews it.
    pub renew: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The leader could not renew in time or another replica took the lease: the controller
    /// has stopped. Exiting lets Kubernetes restart the process as a fresh candidate.
    #[error("lost the leader lease")]
    LostLease,
}

/// Waits for leadership (unless `options.lease` is `None`), then runs the controller until
/// `shutdown` turns true, and releases the lease so a standby takes over at once. Returns
/// `Ok` without leading when shutdown comes first. `health.leader` is true while the
/// controller runs.
pub async fn run(
    client: Client,
    options: Options,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), Error> {
    let Options { namespace, lease, identity, cluster_domain, probe } = options;
    let elector = lease.map(|lease| {
        let elector = LeaseElector::new(client.clone(), &lease.namespace, &lease.name, &identity, lease.ttl);
        (elector, lease.renew, lease.name)
    });
    if let Some((elector, renew, name)) = &elector {
        tracing::info!(lease = %name, %identity, "waiting for leadership");
        if !elector.acquire(*renew, &mut shutdown.clone()).await {
            return Ok(());
        }
    }
    health.leader.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "leading; starting the controller");

    let mut stop = shutdown.clone();
    let stopped = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let ctx = Arc::new(
        Context::new(client.clone(), metrics, Some(identity))
            .with_cluster_domain(cluster_domain)
            .with_node_probe(probe),
    );
    let controller = controller::run(client, ctx, namespace.as_deref(), health.clone(), stopped);
    let lost = match &elector {
        Some((elector, renew, _)) => tokio::select! {
            _ = controller => false,
            // Dropping the controller here stops all writes at once: a non-leader must not write.
            _ = elector.hold(*renew) => true,
        },
        None => {
            controller.await;
            false
        }
    };
    health.leader.store(false, Ordering::Relaxed);
    if lost {
        return Err(Error::LostLease);
    }
    if let Some((elector, ..)) = &elector
        && let Err(e) = elector.release().await
    {
        tracing::warn!(error = %e, "could not release the lease");
    }
    Ok(())
}
