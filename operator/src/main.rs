//! The `chat-operator` binary: `run` (default) reconciles ChatClusters; `crd` prints the CRD.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use chat_operator::http::{self, Health};
use chat_operator::leader::LeaseElector;
use chat_operator::metrics::Metrics;
use chat_operator::reconcile::Context;
use chat_operator::{controller, crd};
use clap::{Parser, Subcommand, ValueEnum};
use tokio::sync::watch;

#[derive(Parser)]
#[command(name = "chat-operator", version, about = "Runs ChatClusters on Kubernetes")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator (the default).
    Run,
    /// Print the ChatCluster CRD as YAML.
    Crd,
}

/// Global, so they work both with and without the `run` subcommand.
#[derive(clap::Args)]
struct RunArgs {
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, global = true, env = "CHAT_OPERATOR_HTTP_ADDR", default_value = "0.0.0.0:8080")]
    http_addr: SocketAddr,
    #[arg(long, global = true, env = "CHAT_OPERATOR_LOG_FORMAT", value_enum, default_value = "human")]
    log_format: LogFormat,
    /// Log filter (`RUST_LOG` wins when set).
    #[arg(long, global = true, default_value = "info")]
    log_filter: String,
    /// Watch only this namespace instead of the whole cluster.
    #[arg(long, global = true, env = "CHAT_OPERATOR_NAMESPACE")]
    namespace: Option<String>,
    /// Run without a Lease (only safe with a single replica).
    #[arg(long, global = true)]
    no_leader_election: bool,
    #[arg(long, global = true, default_value = "chat-operator-leader")]
    lease_name: String,
    /// Namespace of the Lease: the operator's own.
    #[arg(long, global = true, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    /// This replica's identity in the Lease and in events: its pod name.
    #[arg(long, global = true, env = "POD_NAME")]
    identity: Option<String>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Human,
    Json,
}

const LEASE_TTL: Duration = Duration::from_secs(15);
const LEASE_RENEW: Duration = Duration::from_secs(5);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Crd => {
            print!("{}", crd::crd_yaml().context("rendering the CRD")?);
            Ok(())
        }
        Command::Run => run(cli.run).await,
    }
}

fn init_tracing(args: &RunArgs) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&args.log_filter));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match args.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_tracing(&args);
    let identity = args.identity.clone().unwrap_or_else(|| format!("chat-operator-{}", std::process::id()));
    let client = kube::Client::try_default().await.context("connecting to the Kubernetes API")?;
    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let server = {
        let (metrics, health, stop) = (metrics.clone(), health.clone(), stop_rx.clone());
        tokio::spawn(async move {
            if let Err(e) = http::serve(args.http_addr, metrics, health, stop).await {
                tracing::error!(error = %e, addr = %args.http_addr, "metrics/health endpoint failed");
            }
        })
    };
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });
    health.ready.store(true, Ordering::Relaxed);

    let elector = (!args.no_leader_election)
        .then(|| LeaseElector::new(client.clone(), &args.lease_namespace, &args.lease_name, &identity, LEASE_TTL));
    if let Some(elector) = &elector {
        tracing::info!(lease = %args.lease_name, %identity, "waiting for leadership");
        if !elector.acquire(LEASE_RENEW, &mut stop_rx.clone()).await {
            return Ok(());
        }
    }
    health.leader.store(true, Ordering::Relaxed);
    tracing::info!(%identity, "leading; starting the controller");

    let mut stop = stop_rx.clone();
    let shutdown = async move {
        let _ = stop.wait_for(|s| *s).await;
    };
    let ctx = Arc::new(Context::new(client.clone(), metrics, Some(identity)));
    let controller = controller::run(client, ctx, args.namespace.as_deref(), shutdown);
    let lost = match &elector {
        Some(elector) => tokio::select! {
            _ = controller => false,
            // Dropping the controller here stops all writes at once: a non-leader must not write.
            _ = elector.hold(LEASE_RENEW) => true,
        },
        None => {
            controller.await;
            false
        }
    };
    health.leader.store(false, Ordering::Relaxed);
    if lost {
        // Exiting lets Kubernetes restart us as a fresh candidate.
        anyhow::bail!("lost the leader lease");
    }
    if let Some(elector) = &elector
        && let Err(e) = elector.release().await
    {
        tracing::warn!(error = %e, "could not release the lease");
    }
    server.abort();
    Ok(())
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
