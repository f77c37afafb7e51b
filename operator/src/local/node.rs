//! One `chat-node` process: started with its config file and environment, output appended to
//! its log file, `/readyz` probed in the background, stopped with the drain (SIGTERM) and, past
//! the grace period, SIGKILL — what the kubelet does with a pod.

use std::fs::OpenOptions;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chat_node::config::NodeConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::sync::{Notify, watch};

use super::plan::NodeAddr;

/// Between readiness probes (a pod's readiness probe runs every 5 s; local runs want quicker
/// feedback and probing loopback is cheap).
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// A probe that takes longer counts as failed, as with the pod's `timeoutSeconds: 2`.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// How to start one node.
pub struct Launch<'a> {
    pub binary: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub log: PathBuf,
}

pub struct Node {
    pub name: String,
    pub addr: NodeAddr,
    pub pid: u32,
    /// The pod template revision it was started with.
    pub revision: String,
    /// The config it was started with.
    pub config: NodeConfig,
    /// The `cluster.size` in its config file now (changed in place, re-read by the node).
    pub size: usize,
    pub started: Instant,
    child: Child,
    /// Since when `/readyz` has answered 200 (`None`: not ready).
    ready: watch::Receiver<Option<Instant>>,
    probe: tokio::task::JoinHandle<()>,
}

impl Node {
    /// Starts the process. `changed` is notified whenever its readiness flips, so the
    /// supervisor acts at once rather than at its next tick.
    pub fn spawn(
        launch: Launch<'_>,
        name: String,
        addr: NodeAddr,
        revision: String,
        config: NodeConfig,
        changed: Arc<Notify>,
    ) -> io::Result<Node> {
        let log = OpenOptions::new().create(true).append(true).open(&launch.log)?;
        let mut command = Command::new(launch.binary);
        command.args(&launch.args);
        // A pod sees only its template's environment: `CHAT_*` settings or `RUST_LOG` meant for
        // this shell must not override what the manifest says.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            if key.starts_with("CHAT_") || key == "RUST_LOG" || key.starts_with("POD_") {
                command.env_remove(key.as_ref());
            }
        }
        command.envs(launch.env.iter().map(|(k, v)| (k, v)));
        // The output goes to a file, where colour codes are noise.
        command.env("NO_COLOR", "1");
        command.stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log).kill_on_drop(true);
        // Ctrl-C in the terminal goes to the whole foreground process group; the nodes must
        // drain when *we* say so (one at a time on a rollout, all at once on exit), so they get
        // their own group.
        command.process_group(0);
        #[cfg(target_os = "linux")]
        // SAFETY: prctl is async-signal-safe and touches only the child being set up.
        unsafe {
            // Should local mode die without draining them, the nodes are told to drain too rather
            // than linger. The signal follows the *thread* that forked: nodes are spawned from the
            // task that runs on the main thread, which lives as long as the process.
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) == -1 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn()?;
        let pid = child.id().unwrap_or_default();
        let (ready_tx, ready) = watch::channel(None);
        // On the admin port, as the pod's probes.
        let probe = tokio::spawn(probe(addr.admin, name.clone(), ready_tx, changed));
        let size = config.cluster.size;
        Ok(Node { name, addr, pid, revision, config, size, started: Instant::now(), child, ready, probe })
    }

    pub fn ready_since(&self) -> Option<Instant> {
        *self.ready.borrow()
    }

    pub fn is_ready(&self) -> bool {
        self.ready_since().is_some()
    }

    /// The exit status if the process has ended.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    pub fn url(&self) -> String {
        let scheme = if self.config.tls.enabled() { "https" } else { "http" };
        format!("{scheme}://{}/", self.addr.client)
    }

    /// The admin port: `/metrics`, `/cluster`.
    pub fn admin_url(&self) -> String {
        format!("http://{}/", self.addr.admin)
    }

    fn signal(&self, signal: libc::c_int) {
        if self.pid != 0 {
            // SAFETY: a plain syscall on our own child, which we have not reaped yet (so the pid
            // cannot have been reused).
            unsafe {
                libc::kill(self.pid as libc::pid_t, signal);
            }
        }
    }

    /// Drains the node: SIGTERM, then waits up to `grace` for it to exit (it exits by its drain
    /// deadline), then SIGKILL — at once when `force` is (or becomes) true.
    pub async fn stop(mut self, grace: Duration, mut force: watch::Receiver<bool>) -> Option<ExitStatus> {
        self.probe.abort();
        if let Some(status) = self.exited() {
            return Some(status);
        }
        self.signal(libc::SIGTERM);
        tokio::select! {
            status = self.child.wait() => return status.ok(),
            _ = tokio::time::sleep(grace) => {
                tracing::warn!(node = %self.name, ?grace, "did not exit within its grace period; killing it");
            }
            _ = force.wait_for(|f| *f) => {}
        }
        let _ = self.child.start_kill();
        self.child.wait().await.ok()
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.probe.abort();
    }
}

/// Probes `/readyz` until aborted, publishing since when the node has been ready.
async fn probe(addr: SocketAddr, name: String, ready: watch::Sender<Option<Instant>>, changed: Arc<Notify>) {
    loop {
        let ok = matches!(tokio::time::timeout(PROBE_TIMEOUT, get_status(addr, "/readyz")).await, Ok(Ok(200)));
        let was = ready.borrow().is_some();
        if ok != was {
            ready.send_replace(ok.then(Instant::now));
            if ok {
                tracing::info!(node = %name, "ready");
            } else {
                tracing::info!(node = %name, "not ready");
            }
            changed.notify_one();
        }
        tokio::time::sleep(PROBE_INTERVAL).await;
    }
}

/// The status code of a bare HTTP/1.1 GET.
pub async fn get_status(addr: SocketAddr, path: &str) -> io::Result<u16> {
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await?;
    let mut head = [0u8; 32];
    let mut len = 0;
    // "HTTP/1.1 200" is all we need.
    while len < 12 {
        let n = stream.read(&mut head[len..]).await?;
        if n == 0 {
            break;
        }
        len += n;
    }
    let text = String::from_utf8_lossy(&head[..len]);
    text.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, format!("no HTTP status in {text:?}")))
}

/// The last `lines` lines of a log file, for reporting a crash.
pub fn log_tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
