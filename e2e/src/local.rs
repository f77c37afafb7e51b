//! `chat-operator local` as a child process for tests: start it on a manifest, edit the manifest,
//! read `<state>/status.json`, kill its nodes, stop it and start it again on the same state
//! directory. Every wait is a bounded poll of an observable (the status file, `/readyz`,
//! `/cluster`). [`chat_cluster`] and [`manifest_yaml`] write the manifests.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use serde_json::{Value, json};
use tokio::process::{Child, Command};

use crate::client::http_get;
use crate::cluster::tail;
use crate::history::NodeTarget;
use crate::{free_port, operator_binary};

/// A ChatCluster `name` of `replicas` nodes that restarts quickly, as a manifest document: no
/// load-balancer grace, a 2 s drain deadline, discovery and failure detection in about a second.
/// `spec` adds to that spec key by key: `{"drain": {"terminationGracePeriodSeconds": 1}}` keeps
/// the rest of `drain`.
pub fn chat_cluster(name: &str, replicas: u32, spec: Value) -> Value {
    let mut doc = json!({
        "apiVersion": "chatcluster.dev/v1alpha1",
        "kind": "ChatCluster",
        "metadata": {"name": name},
        "spec": {
            "replicas": replicas,
            "config": {"cluster": {"discovery_interval_secs": 1, "heartbeat_ms": 100, "peer_timeout_ms": 600}},
            "drain": {"lbGraceSeconds": 0, "deadlineSeconds": 2},
        },
    });
    merge(&mut doc["spec"], spec);
    doc
}

/// `docs` as one manifest file, for [`LocalMode::start`] and [`LocalMode::edit`].
pub fn manifest_yaml(docs: &[Value]) -> String {
    let docs: Vec<String> =
        docs.iter().map(|doc| serde_norway::to_string(doc).expect("a JSON value is a YAML document")).collect();
    docs.join("---\n")
}

/// Objects merge key by key; anything else in `over` replaces what `base` has.
fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Object(base), Value::Object(over)) => {
            for (key, value) in over {
                merge(base.entry(key).or_insert(Value::Null), value);
            }
        }
        (base, over) => *base = over,
    }
}

/// A running `chat-operator local`; killed (with its nodes draining) when dropped.
pub struct LocalMode {
    child: Child,
    pid: u32,
    /// The ChatCluster's name (`metadata.name`): nodes are `<name>-<ordinal>`.
    pub name: String,
    pub first: Ipv4Addr,
    pub port: u16,
    pub manifest: PathBuf,
    pub state: PathBuf,
    output: Arc<Mutex<String>>,
}

impl LocalMode {
    /// Starts local mode on `dir/cluster.yaml` (written from `yaml`) with state in `dir/state`,
    /// nodes on `first`, `first + 1`, … and client port `port` (the peer port is `port + 1`).
    /// Starting again with the same `dir` reuses the state directory.
    pub fn start(dir: &Path, name: &str, first: Ipv4Addr, port: u16, yaml: &str) -> anyhow::Result<LocalMode> {
        let manifest = dir.join("cluster.yaml");
        std::fs::write(&manifest, yaml)?;
        let state = dir.join("state");
        let mut child = Command::new(operator_binary())
            .arg("local")
            .arg(&manifest)
            .arg("--state-dir")
            .arg(&state)
            .args(["--first-ip", &first.to_string(), "--base-port", &port.to_string(), "--poll-ms", "200"])
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawn chat-operator local")?;
        let pid = child.id().context("local mode has a pid")?;
        let output = Arc::new(Mutex::new(String::new()));
        if let Some(out) = child.stdout.take() {
            crate::process::collect(out, output.clone(), "local stdout");
        }
        if let Some(err) = child.stderr.take() {
            crate::process::collect(err, output.clone(), "local stderr");
        }
        Ok(LocalMode { child, pid, name: name.to_owned(), first, port, manifest, state, output })
    }

    /// A free client port whose two successors (the peer and admin ports) are free too.
    pub fn free_base_port() -> u16 {
        for _ in 0..50 {
            let port = free_port();
            let free = |next: u16| {
                port.checked_add(next).is_some_and(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
            };
            if free(1) && free(2) {
                return port;
            }
        }
        free_port()
    }

    /// Replaces the manifest the way editors save: a new file renamed over the old one.
    pub fn edit(&self, yaml: &str) -> anyhow::Result<()> {
        let tmp = self.manifest.with_extension("yaml.tmp");
        std::fs::write(&tmp, yaml)?;
        std::fs::rename(&tmp, &self.manifest)?;
        Ok(())
    }

    pub fn addr(&self, ordinal: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(u32::from(self.first) + ordinal), self.port))
    }

    /// Node `ordinal`'s admin port (`/metrics`, `/cluster`): two after the client port.
    pub fn admin_addr(&self, ordinal: u32) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::from(u32::from(self.first) + ordinal), self.port + 2))
    }

    pub fn node_name(&self, ordinal: u32) -> String {
        format!("{}-{ordinal}", self.name)
    }

    /// Node `ordinal` as a target for history-check clients.
    pub fn target(&self, ordinal: u32) -> NodeTarget {
        NodeTarget::loopback(&self.node_name(ordinal), self.addr(ordinal))
    }

    pub fn status(&self) -> anyhow::Result<Value> {
        let path = self.state.join("status.json");
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Ordinal → pid of every running node, from `status.json`.
    pub fn pids(&self) -> anyhow::Result<BTreeMap<u32, u32>> {
        let status = self.status()?;
        let nodes = status["nodes"].as_array().context("nodes")?;
        Ok(nodes.iter().filter_map(|n| Some((n["ordinal"].as_u64()? as u32, n["pid"].as_u64()? as u32))).collect())
    }

    pub fn output(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    pub fn node_log(&self, ordinal: u32) -> String {
        std::fs::read_to_string(self.state.join(format!("{}.log", self.node_name(ordinal)))).unwrap_or_default()
    }

    /// Local mode's output and the nodes' log tails, for failure messages.
    pub fn report(&self) -> String {
        let mut text = format!("--- local mode ---\n{}", tail(&self.output(), 60));
        for ordinal in 0..8 {
            let log = self.node_log(ordinal);
            if !log.is_empty() {
                text.push_str(&format!("\n--- {}.log ---\n{}", self.node_name(ordinal), tail(&log, 20)));
            }
        }
        text
    }

    /// Whether local mode has exited (without waiting).
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Polls `check` every 50 ms until it yields a value; the error carries the last reason and
    /// what local mode and the nodes printed.
    pub async fn wait_for<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl AsyncFnMut(&LocalMode) -> anyhow::Result<T>,
    ) -> anyhow::Result<T> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                bail!("local mode exited with {status} while waiting for {what}\n{}", self.report());
            }
            let last = match check(self).await {
                Ok(value) => return Ok(value),
                Err(err) => err,
            };
            if Instant::now() >= deadline {
                bail!("not {what} within {timeout:?}: {last:#}\n{}", self.report());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Exactly `n` nodes, all on the current revision and ready (as local mode and as the nodes'
    /// own `/readyz` say), and no manifest problem; returns ordinal → pid.
    pub async fn wait_ready(&mut self, n: u32, timeout: Duration) -> anyhow::Result<BTreeMap<u32, u32>> {
        self.wait_for(&format!("{n} ready nodes"), timeout, async |lm| {
            let status = lm.status()?;
            ensure!(status["manifest_problem"].is_null(), "manifest problem: {}", status["manifest_problem"]);
            lm.check_nodes(&status, n, false).await?;
            lm.pids()
        })
        .await
    }

    /// Exactly `n` nodes, all on the current revision and ready (as local mode and as the nodes'
    /// own `/readyz` say), each linked to the other `n − 1` in a ready cluster of `n` (as their
    /// `/cluster` says); returns ordinal → pid. Unlike [`LocalMode::wait_ready`] it does not look
    /// at the manifest: an invalid edit leaves the nodes as they were.
    pub async fn wait_linked(&mut self, n: u32, timeout: Duration) -> anyhow::Result<BTreeMap<u32, u32>> {
        self.wait_for(&format!("{n} ready, linked nodes"), timeout, async |lm| {
            lm.check_nodes(&lm.status()?, n, true).await?;
            lm.pids()
        })
        .await
    }

    async fn check_nodes(&self, status: &Value, n: u32, linked: bool) -> anyhow::Result<()> {
        let nodes = status["nodes"].as_array().context("nodes")?;
        ensure!(nodes.len() == n as usize, "{} nodes: {status:#}", nodes.len());
        for node in nodes {
            ensure!(node["ready"] == true && node["revision"] == status["revision"], "not ready: {node}");
        }
        for ordinal in 0..n {
            if linked {
                let (code, body) = http_get(self.admin_addr(ordinal), "/cluster").await?;
                ensure!(code == 200, "{} /cluster answered {code}", self.node_name(ordinal));
                let cluster: Value = serde_json::from_str(&body)?;
                let links = cluster["links"].as_array().map_or(0, Vec::len);
                ensure!(
                    links + 1 == n as usize && cluster["size"] == n && cluster["ready"] == true,
                    "{}: {links} links, size {}, ready {}",
                    self.node_name(ordinal),
                    cluster["size"],
                    cluster["ready"]
                );
            }
            let code = http_get(self.admin_addr(ordinal), "/readyz").await.map(|r| r.0).unwrap_or(0);
            ensure!(code == 200, "{} /readyz answered {code}", self.node_name(ordinal));
        }
        Ok(())
    }

    pub fn signal(&self, signal: libc::c_int) {
        // SAFETY: plain syscall on our own child's pid.
        unsafe {
            libc::kill(self.pid as libc::pid_t, signal);
        }
    }

    /// `kill -9` of node `ordinal` (a grandchild this test started through local mode); returns
    /// the pid killed.
    pub fn kill_node(&self, ordinal: u32) -> anyhow::Result<u32> {
        let pid = *self.pids()?.get(&ordinal).with_context(|| format!("{} is not running", self.node_name(ordinal)))?;
        // SAFETY: plain syscall on a pid local mode reported for its own child.
        let rc = unsafe { libc::kill(pid as libc::pid_t, libc::SIGKILL) };
        ensure!(rc == 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
        Ok(pid)
    }

    pub async fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<ExitStatus> {
        match tokio::time::timeout(timeout, self.child.wait()).await {
            Ok(status) => Ok(status?),
            Err(_) => bail!("local mode still running after {timeout:?}\n{}", self.report()),
        }
    }

    /// Ctrl-C: every node drains, then local mode exits; fails unless it exits 0 in time.
    pub async fn stop(mut self, timeout: Duration) -> anyhow::Result<()> {
        self.signal(libc::SIGINT);
        let status = self.wait_exit(timeout).await?;
        ensure!(status.success(), "local mode exited with {status}\n{}", self.report());
        Ok(())
    }
}
