//! `chat-node`: runs one chat node, prints its config schema, or mints a development token.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use chat_node::config::load::{LoadError, Overrides, load};
use chat_node::config::{LogFormat, json_schema};
use chat_node::server::Server;
use clap::{Parser, Subcommand, ValueEnum};

// Tens of thousands of connections allocate and free small buffers in bursts (presence events,
// resumes); jemalloc leaves less of that fragmented than glibc malloc (11.6 vs 14.4 KiB per idle
// connection in `chat-bench memory`).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(version, about = "ChatCluster node: a clustered WebSocket chat server")]
struct Cli {
    /// TOML config file (see `chat-node schema` and docs/configuration in the README).
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Client port address, e.g. 127.0.0.1:8080.
    #[arg(long)]
    listen: Option<String>,
    /// Admin port address (`/metrics`, `/cluster`, probes), e.g. 127.0.0.1:9090.
    #[arg(long)]
    admin_listen: Option<String>,
    #[arg(long)]
    node_id: Option<String>,
    /// Directory of static assets that override the built-in web page.
    #[arg(long)]
    assets_dir: Option<String>,
    /// Let anyone connect without a token (local development only).
    #[arg(long)]
    anonymous: bool,
    #[arg(long, value_enum)]
    log_format: Option<LogFormatArg>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormatArg {
    Human,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Print the JSON Schema of the config file.
    Schema,
    /// Print the configuration reference (Markdown) generated from the schema.
    ConfigReference,
    /// Validate the config and print the effective result as TOML.
    CheckConfig,
    /// Print an HS256 token signed with the configured key, for testing.
    Token {
        #[arg(long)]
        sub: String,
        #[arg(long)]
        name: Option<String>,
        #[arg(long, value_delimiter = ',')]
        roles: Vec<String>,
        #[arg(long, default_value_t = 3600)]
        ttl_secs: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let overrides = Overrides {
        listen: cli.listen.clone(),
        admin_listen: cli.admin_listen.clone(),
        node_id: cli.node_id.clone(),
        assets_dir: cli.assets_dir.clone(),
        anonymous: cli.anonymous,
        log_json: matches!(cli.log_format, Some(LogFormatArg::Json)),
    };
    match cli.command {
        Some(Command::Schema) => return print_out(&serde_json::to_string_pretty(&json_schema()).unwrap_or_default()),
        Some(Command::ConfigReference) => return print_out(&chat_node::config::reference::markdown()),
        _ => {}
    }
    let mut config = match load(cli.config.as_deref(), &overrides) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("{}", error_text(&err));
            return ExitCode::from(2);
        }
    };
    if matches!(cli.log_format, Some(LogFormatArg::Human)) {
        config.log.format = LogFormat::Human;
    }
    let result = match cli.command {
        Some(Command::CheckConfig) => {
            toml::to_string(&config.redacted()).map(|t| print!("{t}")).context("render config")
        }
        Some(Command::Token { sub, name, roles, ttl_secs }) => mint_token(&config, &sub, name, roles, ttl_secs),
        Some(Command::Schema | Command::ConfigReference) | None => run(config, cli.config.clone(), overrides),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// Writes to stdout; a closed pipe (`| head`) is not an error worth a panic.
fn print_out(text: &str) -> ExitCode {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{}", text.trim_end()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(_) => ExitCode::FAILURE,
    }
}

fn error_text(err: &LoadError) -> String {
    match err {
        LoadError::Parse(text) => text.clone(),
        LoadError::Invalid(invalid) => invalid.to_string(),
    }
}

fn run(config: chat_node::config::NodeConfig, path: Option<PathBuf>, overrides: Overrides) -> anyhow::Result<()> {
    chat_node::telemetry::init(&config.log);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("start runtime")?;
    runtime.block_on(async move {
        let server = Server::bind(config).await?;
        let addr = server.local_addr();
        let admin = server.admin_addr();
        let scheme = if server.is_tls() { "https" } else { "http" };
        let page = if addr.ip().is_unspecified() {
            format!("{scheme}://127.0.0.1:{}/", addr.port())
        } else {
            format!("{scheme}://{addr}/")
        };
        tracing::info!(node_id = server.hub().node_id(), "listening on {scheme}://{addr}, admin port http://{admin}");
        println!("chat-node {} listening on {scheme}://{addr} — web chat: {page}", server.hub().node_id());
        if let Some(log) = server.room_log() {
            tokio::spawn(follow_cluster_size(log, path, overrides));
        }
        server.run(shutdown_signal()).await?;
        Ok(())
    })
}

/// Re-reads `cluster.size` from the config file (the operator rewrites it on a scale, without
/// restarting the pod); every other field needs a restart. An unreadable edit changes nothing.
async fn follow_cluster_size(
    log: std::sync::Arc<chat_node::replication::ReplicatedLog>,
    path: Option<PathBuf>,
    overrides: Overrides,
) {
    let mut tick = tokio::time::interval(std::time::Duration::from_secs(2));
    loop {
        tick.tick().await;
        match load(path.as_deref(), &overrides) {
            Ok(config) => log.set_size(config.cluster.size),
            Err(err) => tracing::warn!(err = error_text(&err), "config file unreadable; keeping cluster.size"),
        }
    }
}

/// Resolves on SIGTERM (Kubernetes) or Ctrl-C.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = ctrl_c => {}
            }
        }
        Err(_) => {
            let _ = ctrl_c.await;
        }
    }
}

fn mint_token(
    config: &chat_node::config::NodeConfig,
    sub: &str,
    name: Option<String>,
    roles: Vec<String>,
    ttl_secs: u64,
) -> anyhow::Result<()> {
    // The same reader as the node's, so a minted token always verifies.
    let secret = match (&config.auth.jwt_secret_file, &config.auth.jwt_secret) {
        (Some(path), _) => chat_node::auth::read_secret("auth.jwt_secret_file", path)?,
        (None, Some(secret)) => secret.as_bytes().to_vec(),
        (None, None) => anyhow::bail!("no auth.jwt_secret_file or auth.jwt_secret configured"),
    };
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + ttl_secs;
    let claims =
        serde_json::json!({ "sub": sub, "name": name.unwrap_or_else(|| sub.to_owned()), "roles": roles, "exp": exp });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(&secret),
    )?;
    println!("{token}");
    Ok(())
}
