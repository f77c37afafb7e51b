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
    if let Some(path) = std::env::var_os("CHAT_NODE_BIN") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("the test knows its own path");
    // target/<profile>/deps/test-xxxx → target/<profile>/chat-node
    let mut dir = exe.parent().expect("test binary has a folder").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("chat-node");
    assert!(bin.exists(), "{} is missing: run `cargo build -p chat-node` first", bin.display());
    bin
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests on one machine).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("bound socket has an address").port()
}

/// A running `chat-node`; killed when dropped.
pub struct NodeProcess {
    child: Child,
    addr: SocketAddr,
    log: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl NodeProcess {
    /// Starts a node with this config (which must set `listen`) and waits for `/readyz`.
    pub async fn start(toml: &str) -> anyhow::Result<NodeProcess> {
        let parsed: chat_node::config::NodeConfig = toml::from_str(toml).context("test config")?;
        let addr = parsed.listen;
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("node.toml");
        std::fs::write(&path, toml)?;
        let mut child = Command::new(node_binary())
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn chat-node")?;
        let log = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            collect(out, log.clone());
        }
        if let Some(err) = child.stderr.take() {
            collect(err, log.clone());
        }
        let mut node = NodeProcess { child, addr, log, _dir: dir };
        node.wait_ready(Duration::from_secs(20)).await?;
        Ok(node)
    }

    async fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("chat-node exited with {status} before it was ready:\n{}", self.output());
            }
            if http_status(self.addr, "/readyz").await.ok() == Some(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        bail!("chat-node not ready within {timeout:?}:\n{}", self.output())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
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

fn collect(stream: impl AsyncRead + Unpin + Send + 'static, log: Arc<Mutex<String>>) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            if std::env::var_os("E2E_ECHO").is_some() {
                eprintln!("[node] {line}");
            }
            if let Ok(mut log) = log.lock() {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
}

/// Status code of a plain `GET path` on `addr` (no HTTP client crate needed for this).
pub async fn http_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    Ok(crate::client::http_get(addr, path).await?.0)
}
