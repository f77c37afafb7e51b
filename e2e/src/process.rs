//! Node processes for tests: spawn `chat-node` with a TOML config, wait for readiness, signal it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};

/// The `chat-node` binary next to the running test (`target/<profile>/chat-node`), or
/// `$CHAT_NODE_BIN`.
pub fn node_binary() -> PathBuf {
    workspace_binary("chat-node", "CHAT_NODE_BIN")
}

/// The `chat-bench` binary next to the running test, or `$CHAT_BENCH_BIN`.
pub fn bench_binary() -> PathBuf {
    workspace_binary("chat-bench", "CHAT_BENCH_BIN")
}

/// The `chat-operator` binary next to the running test, or `$CHAT_OPERATOR_BIN`.
pub fn operator_binary() -> PathBuf {
    workspace_binary("chat-operator", "CHAT_OPERATOR_BIN")
}

/// A binary of this workspace built next to the running test (`target/<profile>/<name>`), or
/// the path in `$<env>`.
fn workspace_binary(name: &str, env: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(env) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/test-xxxx → target/<profile>/<name>
    let mut dir = exe.parent().expect("test binary has a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join(name);
    assert!(bin.exists(), "{} is missing: run `cargo build --workspace --bins` first", bin.display());
    bin
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("bound socket has an address").port()
}

/// The config with an admin port of its own, on the client port's address, unless it names one:
/// the default (0.0.0.0:9090) would collide between the nodes of a test and between tests.
fn with_admin_port(toml: &str) -> anyhow::Result<String> {
    let mut table: toml::Table = toml::from_str(toml).context("test config")?;
    let default = chat_node::config::AdminConfig::default().listen.to_string();
    let admin = table.get("admin").and_then(|a| a.get("listen")).and_then(|l| l.as_str());
    if admin.is_some_and(|listen| listen != default) {
        return Ok(toml.to_owned());
    }
    let listen: chat_node::config::NodeConfig = toml::from_str(toml).context("test config")?;
    let ip = listen.listen.ip();
    let mut admin = toml::Table::new();
    admin.insert("listen".into(), SocketAddr::new(ip, free_port()).to_string().into());
    table.insert("admin".into(), admin.into());
    Ok(toml::to_string(&table)?)
}

/// A running `chat-node`; killed when dropped.
pub struct NodeProcess {
    child: Child,
    addr: SocketAddr,
    /// The admin port (`/metrics`, `/cluster`).
    admin: SocketAddr,
    /// The network namespace it runs in (`None`: the test's own).
    netns: Option<String>,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts a node with this config (which must set `listen`) and waits for `/readyz`.
    pub async fn start(toml: &str) -> anyhow::Result<NodeProcess> {
        NodeProcess::start_with_env(toml, &[]).await
    }

    /// Like [`NodeProcess::start`], with these environment variables set for the node.
    pub async fn start_with_env(toml: &str, env: &[(&str, &str)]) -> anyhow::Result<NodeProcess> {
        let node = NodeProcess::spawn(toml, None, env)?;
        node.ready_or_fail().await
    }

    /// Starts a node with this config but does not wait for `/readyz`.
    pub fn start_unready(toml: &str) -> anyhow::Result<NodeProcess> {
        NodeProcess::spawn(toml, None, &[])
    }

    /// Starts a node inside network namespace `netns` (`ip netns exec`, see [`crate::netns`]) and
    /// waits for `/readyz`, asked from inside the namespace (a wildcard `listen` is reached at
    /// 127.0.0.1 there).
    pub async fn start_in_netns(netns: &str, toml: &str) -> anyhow::Result<NodeProcess> {
        let node = NodeProcess::spawn(toml, Some(netns), &[])?;
        node.ready_or_fail().await
    }

    async fn ready_or_fail(mut self) -> anyhow::Result<NodeProcess> {
        self.wait_ready(Duration::from_secs(20)).await?;
        Ok(self)
    }

    fn spawn(toml: &str, netns: Option<&str>, env: &[(&str, &str)]) -> anyhow::Result<NodeProcess> {
        let toml = &with_admin_port(toml)?;
        let parsed: chat_node::config::NodeConfig = toml::from_str(toml).context("test config")?;
        let reachable = |mut addr: SocketAddr| {
            if addr.ip().is_unspecified() {
                addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            }
            addr
        };
        let (addr, admin) = (reachable(parsed.listen), reachable(parsed.admin.listen));
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.toml");
        std::fs::write(&path, toml)?;
        let mut command = match netns {
            None => Command::new(node_binary()),
            Some(ns) => {
                // `ip netns exec` execs the node in place: the child's pid is the node's.
                let mut command = Command::new(crate::netns::ip_binary()?);
                command.args(["netns", "exec", ns]).arg(node_binary());
                command
            }
        };
        let mut child = command
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn chat-node")?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, log.clone(), "node");
        }
        if let Some(err) = child.stderr.take() {
            collect(err, log.clone(), "node");
        }
        Ok(NodeProcess { child, addr, admin, netns: netns.map(str::to_owned), log, _dir: dir })
    }

    /// Replaces the node's config file; a running node re-reads `cluster.size` from it.
    pub fn rewrite_config(&self, toml: &str) -> anyhow::Result<()> {
        let path = self._dir.path().join("node.toml");
        let temp = self._dir.path().join("node.toml.new");
        let mut table: toml::Table = toml::from_str(toml).context("test config")?;
        let mut admin = toml::Table::new();
        admin.insert("listen".into(), self.admin.to_string().into());
        table.insert("admin".into(), admin.into());
        std::fs::write(&temp, toml::to_string(&table)?)?;
        std::fs::rename(&temp, &path)?;
        Ok(())
    }

    /// Waits until `/readyz` on the admin port answers 200 (fails early if the node exits).
    pub async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("chat-node exited with {status} before it was ready:\n{}", self.output());
            }
            // On the admin port, as a pod's probes: it never speaks TLS.
            if self.admin_get("/readyz").await.ok().map(|r| r.0) == Some(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("chat-node not ready within {timeout:?}:\n{}", self.output())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The network namespace it runs in, if not the test's own.
    pub fn netns(&self) -> Option<&str> {
        self.netns.as_deref()
    }

    /// A bare `GET path` on the client port (from inside its namespace if it has one): status
    /// and body.
    pub async fn http_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        match &self.netns {
            None => crate::client::http_get(self.addr, path).await,
            Some(ns) => crate::netns::http_get_in(ns, self.addr, path).await,
        }
    }

    /// A bare `GET path` on the admin port (`/metrics`, `/cluster`): status and body.
    pub async fn admin_get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        match &self.netns {
            None => crate::client::http_get(self.admin, path).await,
            Some(ns) => crate::netns::http_get_in(ns, self.admin, path).await,
        }
    }

    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
    }

    /// Whether the process has exited (without waiting).
    pub fn has_exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub fn http_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Everything the node printed so far.
    pub fn output(&self) -> String {
        self.log.lock().map(|l| l.clone()).unwrap_or_default()
    }

    pub fn terminate(&self) {
        self.signal(libc::SIGTERM);
    }

    pub fn kill(&self) {
        self.signal(libc::SIGKILL);
    }

    fn signal(&self, signal: libc::c_int) {
        if let Some(pid) = self.child.id() {
            // SAFETY: plain syscall on our own child's pid.
            unsafe {
                libc::kill(pid as libc::pid_t, signal);
            }
        }
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        tokio::time::timeout(timeout, self.child.wait())
            .await
            .with_context(|| format!("chat-node still running after {timeout:?}"))?
            .context("wait for chat-node")
    }
}

/// Appends a child's output to `log` line by line (echoed with `label` when `E2E_ECHO` is set).
pub(crate) fn collect(stream: impl AsyncRead + Unpin + Send + 'static, log: Arc<Mutex<String>>, label: &'static str) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("E2E_ECHO").is_some() {
                eprintln!("[{label}] {line}");
            }
            if let Ok(mut log) = log.lock() {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
}

/// Raises the soft open-files limit to the hard limit (10 000+ connections); returns the new
/// soft limit (0 if it cannot be read).
pub fn raise_nofile() -> u64 {
    // SAFETY: getrlimit/setrlimit on a valid, owned struct.
    unsafe {
        let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        lim.rlim_cur
    }
}
