//! The `chat-operator` binary: `run` (default) reconciles ChatClusters; `crd` prints the CRD;
//! `crd-reference` prints its field reference (docs/chatcluster-reference.md); `local` runs a
//! manifest's ChatCluster on this machine without Kubernetes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use anyhow::Context as _;
use chat_operator::http::{self, Health};
use chat_operator::metrics::Metrics;
use chat_operator::run::{LeaseOptions, Options};
use chat_operator::{crd, reference};
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
    /// Print the Markdown reference of the ChatCluster's fields (docs/chatcluster-reference.md).
    CrdReference,
    /// Run the ChatCluster of a manifest on this machine, without Kubernetes (see docs/local.md).
    #[cfg(unix)]
    Local(LocalArgs),
}

#[cfg(unix)]
#[derive(clap::Args)]
// Apart from the operator's global flags, most of which do not apply here.
#[command(next_help_heading = "Local mode")]
struct LocalArgs {
    /// Manifest with a ChatCluster, plus any Secrets and ConfigMaps it references.
    manifest: std::path::PathBuf,
    /// Which ChatCluster, when the manifest holds several.
    #[arg(long)]
    cluster: Option<String>,
    /// A Secret key the manifest references but does not contain: `name/key=value` (repeatable).
    #[arg(long = "secret", value_name = "NAME/KEY=VALUE")]
    secrets: Vec<chat_operator::local::manifest::SecretValue>,
    /// Where node configs, keys, assets, logs and status.json go (kept after exit); default: a
    /// temporary directory, removed on exit.
    #[arg(long)]
    state_dir: Option<std::path::PathBuf>,
    /// The chat-node binary; default: next to this executable, else on PATH.
    #[arg(long)]
    node_binary: Option<std::path::PathBuf>,
    /// Address of node 0; node i listens on this address + i [default: 127.0.0.10, or 127.0.0.1
    /// as with --single-ip where other loopback addresses are not usable].
    #[arg(long, value_name = "IPV4")]
    first_ip: Option<std::net::Ipv4Addr>,
    /// Client port of every node; the peer port is the next one, the admin port (`/metrics`,
    /// `/cluster`) the one after.
    #[arg(long, default_value_t = chat_operator::local::DEFAULT_BASE_PORT)]
    base_port: u16,
    /// Put every node on 127.0.0.1 with ports base + 3i (client), base + 3i + 1 (peer) and
    /// base + 3i + 2 (admin), with static peer lists instead of DNS (the fallback where other
    /// loopback addresses do not work).
    #[arg(long)]
    single_ip: bool,
    /// Milliseconds between checks of the manifest for changes.
    #[arg(long, default_value_t = 500)]
    poll_ms: u64,
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
    /// The Kubernetes cluster's DNS domain: the nodes find their peers at
    /// `<name>-peers.<namespace>.svc.<domain>`.
    #[arg(long, global = true, env = "CHAT_CLUSTER_DOMAIN", default_value = "cluster.local", value_parser = parse_domain)]
    cluster_domain: String,
}

/// A DNS domain such as `cluster.local`: dot-separated labels of letters, digits and '-'.
fn parse_domain(text: &str) -> Result<String, String> {
    let domain = text.trim_end_matches('.').to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    };
    if domain.len() > 200 || !domain.split('.').all(label_ok) {
        return Err(format!("{text:?} is not a DNS domain (labels of letters, digits and '-', separated by dots)"));
    }
    Ok(domain)
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
        Command::CrdReference => {
            print!("{}", reference::markdown().context("rendering the ChatCluster reference")?);
            Ok(())
        }
        Command::Run => run(cli.run).await,
        #[cfg(unix)]
        Command::Local(args) => local(&cli.run, args).await,
    }
}

#[cfg(unix)]
async fn local(run: &RunArgs, args: LocalArgs) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    // The DNS server logs every query at info: one line per node every discovery interval.
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("{},hickory_server=warn", run.log_filter)));
    // Logs go to stderr: stdout carries the URL table, for people and scripts.
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match run.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    let options = chat_operator::local::Options {
        manifest: args.manifest,
        cluster: args.cluster,
        secrets: args.secrets,
        state_dir: args.state_dir,
        node_binary: args.node_binary,
        first_ip: args.first_ip,
        base_port: args.base_port,
        single_ip: args.single_ip,
        poll_interval: Duration::from_millis(args.poll_ms.max(50)),
    };
    // A second Ctrl-C does not wait for the drains.
    let force = async {
        wait_for_signal().await;
        wait_for_signal().await;
    };
    // Awaited here rather than spawned: the nodes are tied to the thread that started them.
    Ok(chat_operator::local::run(options, wait_for_signal(), force).await?)
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

    let lease = (!args.no_leader_election).then(|| LeaseOptions {
        name: args.lease_name.clone(),
        namespace: args.lease_namespace.clone(),
        ttl: LEASE_TTL,
        renew: LEASE_RENEW,
    });
    let options = Options {
        namespace: args.namespace.clone(),
        lease,
        identity,
        cluster_domain: args.cluster_domain.clone(),
        probe: Arc::new(chat_operator::reconcile::balance::HttpProbe),
    };
    chat_operator::run::run(client, options, metrics, health, stop_rx).await?;
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

#[cfg(test)]
mod tests {
    use super::parse_domain;

    #[test]
    fn cluster_domains_are_dns_names() {
        assert_eq!(parse_domain("cluster.local").as_deref(), Ok("cluster.local"));
        assert_eq!(parse_domain("Corp.Internal.").as_deref(), Ok("corp.internal"));
        for bad in ["", "a..b", "-a.local", "a b", "ex_ample.local", "a/b"] {
            assert!(parse_domain(bad).is_err(), "{bad:?}");
        }
    }
}
