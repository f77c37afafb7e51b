//! Spawning the servers under test and reading their (and our own) resource use.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Node,
    Ref,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Node => "node",
            Kind::Ref => "reference",
        }
    }
}

/// A server process under test; killed when dropped.
pub struct Server {
    pub kind: Kind,
    pub addr: SocketAddr,
    pub pid: u32,
    pub log: PathBuf,
    child: Child,
    _dir: tempfile::TempDir,
}

/// Limits and queues of the node's config for a benchmark.
pub struct NodeTuning {
    /// Raise the outbound queue (frames, bytes) for the broadcast runs; `None` keeps defaults.
    pub big_queues: bool,
    /// Extra TOML lines for the `[limits]` section (experiments; later keys win).
    pub extra_limits: String,
}

pub fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

pub fn node_config(port: u16, admin_port: u16, secret: &str, tuning: &NodeTuning) -> String {
    let queues =
        if tuning.big_queues { "outbound_queue_frames = 65536\noutbound_queue_bytes = 67108864\n" } else { "" };
    let extra = if tuning.extra_limits.is_empty() { String::new() } else { format!("{}\n", tuning.extra_limits) };
    format!(
        "node_id = \"bench\"\nlisten = \"127.0.0.1:{port}\"\n\n[limits]\nmax_connections = 20000\n\
         publish_rate_per_sec = 1000000\npublish_burst = 1000000\nrate_limit_strikes = 1000000\n\
         ping_interval_secs = 3600\nidle_timeout_secs = 7200\n{queues}{extra}\n[auth]\nmode = \"jwt\"\n\
         jwt_secret = \"{secret}\"\n\n[admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n[log]\nfilter = \"warn\"\n"
    )
}

impl Server {
    pub async fn spawn_node(bin: &Path, secret: &str, tuning: &NodeTuning) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let cfg = dir.path().join("node.toml");
        std::fs::write(&cfg, node_config(port, free_port()?, secret, tuning))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&cfg);
        Self::start(Kind::Node, cmd, dir, SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    /// A node with a config of the caller's, listening at `addr`, started but not waited for
    /// (a cluster node is ready only once a majority of the cluster runs: start them all, then
    /// [`Server::wait_ready`] on each). Its output goes to `log` when given, else to a file in
    /// its own temporary directory.
    pub fn launch_node(bin: &Path, toml: &str, addr: SocketAddr, log: Option<PathBuf>) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let cfg = dir.path().join("node.toml");
        std::fs::write(&cfg, toml)?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&cfg);
        let log = log.unwrap_or_else(|| dir.path().join("server.log"));
        Self::launch(Kind::Node, cmd, dir, addr, log)
    }

    pub async fn spawn_ref(bin: &Path) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.arg("--listen").arg(format!("127.0.0.1:{port}"));
        Self::start(Kind::Ref, cmd, dir, SocketAddr::from(([127, 0, 0, 1], port))).await
    }

    async fn start(kind: Kind, cmd: Command, dir: tempfile::TempDir, addr: SocketAddr) -> anyhow::Result<Self> {
        let log = dir.path().join("server.log");
        let mut server = Self::launch(kind, cmd, dir, addr, log)?;
        server.wait_ready(Duration::from_secs(30)).await?;
        Ok(server)
    }

    fn launch(
        kind: Kind,
        mut cmd: Command,
        dir: tempfile::TempDir,
        addr: SocketAddr,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let out = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let err = out.try_clone()?;
        cmd.stdin(Stdio::null()).stdout(out).stderr(err).kill_on_drop(true);
        let child = cmd.spawn().with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id().context("server pid")?;
        Ok(Server { kind, addr, pid, log, child, _dir: dir })
    }

    /// Waits until the server answers (the node: `/readyz` is 200), at most `limit`.
    pub async fn wait_ready(&mut self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited at start ({status}): {}", self.kind.name(), self.log_tail());
            }
            let ready = match self.kind {
                Kind::Node => http_get_status(self.addr, "/readyz").await.ok() == Some(200),
                Kind::Ref => TcpStream::connect(self.addr).await.is_ok(),
            };
            if ready {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} at {} not ready after {limit:?}: {}", self.kind.name(), self.addr, self.log_tail());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `Some(status)` if the process has exited (a crash, during a benchmark).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        vm_rss_kib(self.pid)
    }

    pub fn cpu_secs(&self) -> anyhow::Result<f64> {
        proc_cpu_secs(self.pid)
    }

    /// Sends `signal` (e.g. `libc::SIGKILL`, `libc::SIGTERM`) to the process.
    pub fn signal(&self, signal: libc::c_int) -> anyhow::Result<()> {
        // SAFETY: kill(2) with our own child's pid; the child is not reaped before `wait_exit`.
        let rc = unsafe { libc::kill(self.pid as libc::pid_t, signal) };
        if rc != 0 {
            bail!("kill({}, {signal}): {}", self.pid, std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits for the process to exit, at most `limit`; its exit status, if it did.
    pub async fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait()).await.ok().and_then(Result::ok)
    }

    pub async fn stop(mut self) -> anyhow::Result<()> {
        let _ = self.child.start_kill();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        Ok(())
    }
}

/// The body of a GET (the whole response after the headers).
pub async fn http_get_body(addr: SocketAddr, path: &str) -> anyhow::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut raw)).await??;
    let text = String::from_utf8_lossy(&raw);
    Ok(text.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default())
}

pub async fn http_get_status(addr: SocketAddr, path: &str) -> anyhow::Result<u16> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes()).await?;
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await??;
    let line = std::str::from_utf8(&buf[..n]).unwrap_or("");
    let code = line.split(' ').nth(1).context("no status")?;
    Ok(code.parse()?)
}

pub fn vm_rss_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).context("no VmRSS")?;
    let kib = line.split_whitespace().nth(1).context("bad VmRSS line")?;
    Ok(kib.parse()?)
}

/// The most RSS the process ever had (`VmHWM`).
pub fn vm_hwm_kib(pid: u32) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("no VmHWM")?;
    let kib = line.split_whitespace().nth(1).context("bad VmHWM line")?;
    Ok(kib.parse()?)
}

/// User + system CPU seconds of a process, from `/proc/PID/stat`.
pub fn proc_cpu_secs(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit_once(") ").context("bad stat")?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = f.get(11).context("no utime")?.parse()?;
    let stime: f64 = f.get(12).context("no stime")?.parse()?;
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    Ok((utime + stime) / tck)
}

/// User + system CPU seconds of this process (getrusage).
pub fn self_cpu_secs() -> f64 {
    // SAFETY: getrusage writes into the zeroed struct we own.
    let ru = unsafe {
        let mut ru: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

pub use chat_e2e::raise_nofile;

/// CPU use of the bench and a server over an interval.
pub struct CpuMeter {
    t0: Instant,
    me0: f64,
    srv0: f64,
    all0: (f64, f64, f64),
    pid: u32,
}

#[derive(Debug, Clone, Copy, Default)]
pub struct CpuUse {
    pub wall: f64,
    pub bench_secs: f64,
    pub server_secs: f64,
    /// CPU used by other processes (user + system time not charged to the two of us).
    pub other_secs: f64,
    /// irq + softirq time of the machine: mostly loopback TCP work of the server and the load
    /// tool, which the kernel charges to neither process.
    pub softirq_secs: f64,
    /// Time the hypervisor gave this machine's vCPUs to someone else.
    pub steal_secs: f64,
}

impl CpuUse {
    pub fn bench_pct(&self) -> f64 {
        100.0 * self.bench_secs / self.wall.max(1e-9)
    }
    pub fn server_pct(&self) -> f64 {
        100.0 * self.server_secs / self.wall.max(1e-9)
    }
    pub fn other_pct(&self) -> f64 {
        100.0 * self.other_secs / self.wall.max(1e-9)
    }
    pub fn steal_pct(&self) -> f64 {
        100.0 * self.steal_secs / self.wall.max(1e-9)
    }
    pub fn softirq_pct(&self) -> f64 {
        100.0 * self.softirq_secs / self.wall.max(1e-9)
    }
}

impl CpuMeter {
    pub fn start(server: &Server) -> Self {
        CpuMeter {
            t0: Instant::now(),
            me0: self_cpu_secs(),
            srv0: server.cpu_secs().unwrap_or(0.0),
            all0: machine_busy_secs(),
            pid: server.pid,
        }
    }
    pub fn read(&self) -> CpuUse {
        let bench_secs = self_cpu_secs() - self.me0;
        let server_secs = proc_cpu_secs(self.pid).unwrap_or(self.srv0) - self.srv0;
        let (task, irq, steal) = machine_busy_secs();
        CpuUse {
            wall: self.t0.elapsed().as_secs_f64(),
            bench_secs,
            server_secs,
            other_secs: (task - self.all0.0 - bench_secs - server_secs).max(0.0),
            softirq_secs: irq - self.all0.1,
            steal_secs: steal - self.all0.2,
        }
    }
}

/// Busy CPU seconds of the whole machine (all cores), from `/proc/stat`: (user + nice +
/// system, irq + softirq, steal).
pub fn machine_busy_secs() -> (f64, f64, f64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else { return (0.0, 0.0, 0.0) };
    let Some(line) = stat.lines().next() else { return (0.0, 0.0, 0.0) };
    let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    let at = |i: usize| v.get(i).copied().unwrap_or(0.0);
    // user nice system idle iowait irq softirq steal ...
    let task = at(0) + at(1) + at(2);
    let irq = at(5) + at(6);
    let steal = at(7);
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (task / tck, irq / tck, steal / tck)
}
