//! The built-in web page in a real headless Chromium, driven over WebDriver (chromedriver):
//! two people chat through one node, and a page rides out a node restart by itself.
//!
//! Needs the Debian packages `chromium` and `chromium-driver` (`/usr/bin/chromium`,
//! `/usr/bin/chromedriver`; override with `CHROME_BIN` / `CHROMEDRIVER_BIN`). Without them these
//! tests fail, on purpose: CI installs them. `E2E_SCREENSHOT_DIR=/tmp` saves a screenshot.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use chat_e2e::{NodeProcess, free_port, mint_token};
use fantoccini::{Client as Browser, ClientBuilder, Locator};
use serde_json::{Value, json};

/// Bound for each wait on the page; reconnect backoff after a restart stays well inside it.
const WAIT: Duration = Duration::from_secs(20);

fn tool(env: &str, default: &str, package: &str) -> PathBuf {
    let path = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
    assert!(
        path.exists(),
        "{} not found: install the Debian package `{package}` (apt-get install -y chromium chromium-driver) \
         or set {env}; the browser tests need it and do not skip",
        path.display()
    );
    path
}

/// A chromedriver process in its own process group; the group (chromedriver and every browser
/// it started) is killed when this is dropped, even if the test panics.
struct ChromeDriver {
    child: Child,
    url: String,
    chrome: PathBuf,
    profiles: Vec<tempfile::TempDir>,
}

impl ChromeDriver {
    async fn start() -> anyhow::Result<ChromeDriver> {
        let chrome = tool("CHROME_BIN", "/usr/bin/chromium", "chromium");
        let driver = tool("CHROMEDRIVER_BIN", "/usr/bin/chromedriver", "chromium-driver");
        let port = free_port();
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new(&driver)
                .arg(format!("--port={port}"))
                .arg("--allowed-ips=127.0.0.1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .with_context(|| format!("start {}", driver.display()))?
        };
        let mut this = ChromeDriver { child, url: format!("http://127.0.0.1:{port}"), chrome, profiles: Vec::new() };
        let addr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + WAIT;
        loop {
            if driver_ready(addr).await {
                return Ok(this);
            }
            if let Some(status) = this.child.try_wait()? {
                bail!("chromedriver exited with {status} before it was ready");
            }
            if Instant::now() > deadline {
                bail!("chromedriver not ready on port {port} within {WAIT:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A new headless browser session with a fresh profile.
    async fn session(&mut self) -> anyhow::Result<Browser> {
        let profile = tempfile::tempdir()?;
        let args = [
            "--headless".to_owned(),
            "--no-sandbox".to_owned(),
            "--disable-gpu".to_owned(),
            "--disable-dev-shm-usage".to_owned(),
            "--disable-background-networking".to_owned(),
            "--no-first-run".to_owned(),
            "--disable-component-update".to_owned(),
            "--disable-sync".to_owned(),
            "--disable-quic".to_owned(),
            "--window-size=1000,700".to_owned(),
            format!("--user-data-dir={}", profile.path().display()),
        ];
        self.profiles.push(profile);
        let mut caps = serde_json::Map::new();
        caps.insert("browserName".into(), json!("chrome"));
        caps.insert("goog:chromeOptions".into(), json!({"binary": self.chrome, "args": args}));
        let browser = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .context("open a Chromium session through chromedriver")?;
        Ok(browser)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let pgid = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall; the group is the one this process created for chromedriver.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
        let _ = self.child.wait();
    }
}

/// Whether chromedriver's `/status` says it is ready (it keeps connections open, so the answer
/// is read only as far as needed).
async fn driver_ready(addr: std::net::SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let attempt = async {
        let mut tcp = tokio::net::TcpStream::connect(addr).await?;
        tcp.write_all(format!("GET /status HTTP/1.1\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut raw = Vec::new();
        let mut buf = [0u8; 1024];
        loop {
            let n = tcp.read(&mut buf).await?;
            raw.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&raw);
            if n == 0 || text.contains("\"ready\":true") || text.contains("\"ready\":false") {
                return anyhow::Ok(text.contains("\"ready\":true"));
            }
        }
    };
    matches!(tokio::time::timeout(Duration::from_secs(2), attempt).await, Ok(Ok(true)))
}

/// Polls a JavaScript expression (with `args`) until it is `true`.
async fn wait_js(page: &Browser, what: &str, script: &str, args: Vec<Value>) -> anyhow::Result<()> {
    let deadline = Instant::now() + WAIT;
    let mut last = Value::Null;
    while Instant::now() < deadline {
        last = page.execute(&format!("return ({script});"), args.clone()).await?;
        if last == Value::Bool(true) {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let status = page.execute("return document.getElementById('status').textContent", vec![]).await?;
    bail!("timed out after {WAIT:?} waiting for {what} (last: {last}; page status: {status})")
}

async fn open_page(page: &Browser, url: &str, name: &str, room: &str) -> anyhow::Result<()> {
    page.goto(url).await?;
    let field = page.find(Locator::Id("name")).await?;
    field.clear().await?;
    field.send_keys(name).await?;
    let room_field = page.find(Locator::Id("room")).await?;
    room_field.clear().await?;
    room_field.send_keys(room).await?;
    page.find(Locator::Id("join")).await?.click().await?;
    wait_joined(page).await
}

async fn wait_joined(page: &Browser) -> anyhow::Result<()> {
    wait_js(
        page,
        "the page to be connected and joined",
        "document.getElementById('status').dataset.state === 'online' && document.body.dataset.joined === 'true'",
        vec![],
    )
    .await
}

async fn send_message(page: &Browser, text: &str) -> anyhow::Result<()> {
    let input = page.find(Locator::Id("message")).await?;
    input.send_keys(text).await?;
    page.find(Locator::Id("send")).await?.click().await?;
    Ok(())
}

async fn wait_message(page: &Browser, sender: &str, body: &str) -> anyhow::Result<()> {
    wait_js(
        page,
        &format!("message {body:?} from {sender}"),
        "[...document.querySelectorAll('#messages li.message')].some(li => \
           li.querySelector('.body').textContent === arguments[1] && \
           li.querySelector('.sender').textContent === arguments[0])",
        vec![json!(sender), json!(body)],
    )
    .await
}

async fn wait_present(page: &Browser, name: &str) -> anyhow::Result<()> {
    wait_js(
        page,
        &format!("{name} in the presence list"),
        "[...document.querySelectorAll('#presence li')].some(li => li.firstChild.textContent === arguments[0])",
        vec![json!(name)],
    )
    .await
}

async fn session_id(page: &Browser) -> anyhow::Result<String> {
    let v = page.execute("return document.getElementById('status').dataset.session || ''", vec![]).await?;
    Ok(v.as_str().unwrap_or_default().to_owned())
}

async fn screenshot(page: &Browser, name: &str) -> anyhow::Result<()> {
    if let Some(dir) = std::env::var_os("E2E_SCREENSHOT_DIR") {
        let png = page.screenshot().await?;
        std::fs::write(Path::new(&dir).join(name), png)?;
    }
    Ok(())
}

fn node_toml(port: u16) -> String {
    format!(
        "listen = \"127.0.0.1:{port}\"\nnode_id = \"browser-node\"\n[auth]\nmode = \"anonymous\"\n[drain]\ndeadline_secs = 5\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pages_chat_through_one_node() -> anyhow::Result<()> {
    let node = NodeProcess::start(&node_toml(free_port())).await?;
    let mut driver = ChromeDriver::start().await?;
    let alice = driver.session().await?;
    let bob = driver.session().await?;
    let url = format!("{}/", node.http_url());

    open_page(&alice, &url, "alice", "lobby").await?;
    open_page(&bob, &url, "bob", "lobby").await?;
    wait_present(&alice, "bob").await?;
    wait_present(&bob, "alice").await?;
    wait_present(&alice, "alice").await?;

    send_message(&alice, "hello from alice").await?;
    wait_message(&bob, "alice", "hello from alice").await?;
    wait_message(&alice, "alice", "hello from alice").await?;
    send_message(&bob, "hi alice, bob here").await?;
    wait_message(&alice, "bob", "hi alice, bob here").await?;

    // The page has the pieces users see: the logo and the room title.
    let logo_ok = alice
        .execute("const i = document.getElementById('logo'); return i.complete && i.naturalWidth > 0", vec![])
        .await?;
    assert_eq!(logo_ok, Value::Bool(true), "the header logo loads");
    let title = alice.find(Locator::Id("room-title")).await?.text().await?;
    assert_eq!(title, "#lobby");
    screenshot(&alice, "chatcluster-alice.png").await?;

    // bob leaves: alice's presence list drops him.
    bob.close().await?;
    wait_js(
        &alice,
        "bob to leave the presence list",
        "![...document.querySelectorAll('#presence li')].some(li => li.firstChild.textContent === 'bob')",
        vec![],
    )
    .await?;
    alice.close().await?;
    Ok(())
}

/// A crowded room's presence comes in pages (here small ones: the page size follows
/// `limits.outbound_queue_bytes`); the page asks for every page and lists everyone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_lists_a_crowd_that_spans_several_presence_pages() -> anyhow::Result<()> {
    const CROWD: usize = 150;
    let port = free_port();
    let node = NodeProcess::start(&format!("{}[limits]\noutbound_queue_bytes = 8192\n", node_toml(port))).await?;
    let url = node.ws_url();
    let mut members = Vec::new();
    for i in 0..CROWD {
        let mut client = chat_e2e::client::Client::connect(&format!("{url}?name=crowd{i:03}"), None).await?;
        client.expect_type("welcome", WAIT).await?;
        client.send_json(json!({"type": "join", "room": "crowd", "id": "j"})).await?;
        client.recv_until("joined", WAIT).await?;
        // Reads (and drops) what the room sends, so nobody is closed as a slow consumer.
        members.push(tokio::spawn(async move { while client.recv_json(Duration::from_secs(60)).await.is_ok() {} }));
    }
    let mut driver = ChromeDriver::start().await?;
    let page = driver.session().await?;
    open_page(&page, &format!("{}/", node.http_url()), "zed", "crowd").await?;
    wait_js(
        &page,
        "every member of the crowd in the presence list",
        "document.querySelectorAll('#presence li').length === arguments[0] && \
           document.getElementById('presence-count').textContent === String(arguments[0])",
        vec![json!(CROWD + 1)],
    )
    .await?;
    wait_present(&page, "crowd000").await?;
    wait_present(&page, &format!("crowd{:03}", CROWD - 1)).await?;
    page.close().await?;
    for member in members {
        member.abort();
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_reconnects_and_resumes_after_node_restart() -> anyhow::Result<()> {
    let port = free_port();
    let toml = node_toml(port);
    let mut node = NodeProcess::start(&toml).await?;
    let mut driver = ChromeDriver::start().await?;
    let alice = driver.session().await?;
    let bob = driver.session().await?;
    let url = format!("{}/", node.http_url());

    open_page(&alice, &url, "alice", "resume").await?;
    open_page(&bob, &url, "bob", "resume").await?;
    send_message(&alice, "before restart").await?;
    wait_message(&bob, "alice", "before restart").await?;
    let (alice_session, bob_session) = (session_id(&alice).await?, session_id(&bob).await?);

    node.kill();
    node.wait_exit(Duration::from_secs(10)).await?;
    drop(node);
    for page in [&alice, &bob] {
        wait_js(
            page,
            "the page to notice the lost connection",
            "document.getElementById('status').dataset.state !== 'online'",
            vec![],
        )
        .await?;
    }
    screenshot(&bob, "chatcluster-reconnecting.png").await?;

    let _node = NodeProcess::start(&toml).await?;
    for (page, old) in [(&alice, &alice_session), (&bob, &bob_session)] {
        wait_js(
            page,
            "a new session on the restarted node",
            "document.getElementById('status').dataset.session !== arguments[0]",
            vec![json!(old)],
        )
        .await?;
        wait_joined(page).await?;
        // The new node has a new epoch: the page says some messages may be missing.
        wait_js(
            page,
            "the 'messages may be missing' notice",
            "[...document.querySelectorAll('#messages li.notice')].some(li => li.textContent.includes('missing'))",
            vec![],
        )
        .await?;
    }
    wait_present(&alice, "bob").await?;

    send_message(&alice, "after restart").await?;
    wait_message(&bob, "alice", "after restart").await?;
    send_message(&bob, "got it").await?;
    wait_message(&alice, "bob", "got it").await?;
    // What was shown before the restart is still there, once.
    let count = bob
        .execute(
            "return [...document.querySelectorAll('#messages li.message .body')].filter(b => b.textContent === 'before restart').length",
            vec![],
        )
        .await?;
    assert_eq!(count, json!(1));
    screenshot(&bob, "chatcluster-resumed.png").await?;
    alice.close().await?;
    bob.close().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn page_with_token_in_url_and_token_expiry() -> anyhow::Result<()> {
    let secret = "browser-test-secret-0123456789";
    let toml = format!(
        "listen = \"127.0.0.1:{}\"\n[auth]\nmode = \"jwt\"\njwt_secret = \"{secret}\"\nleeway_secs = 0\n\
         [limits]\nping_interval_secs = 1\nidle_timeout_secs = 5\n[drain]\ndeadline_secs = 5\n",
        free_port()
    );
    let node = NodeProcess::start(&toml).await?;
    let mut driver = ChromeDriver::start().await?;
    let tina = driver.session().await?;
    let sam = driver.session().await?;

    // A token in the page URL connects (and joins the room from the URL) by itself.
    let long = mint_token(secret, "tina", "Tina", &[], 3600);
    tina.goto(&format!("{}/?token={long}&room=staff", node.http_url())).await?;
    wait_joined(&tina).await?;
    wait_present(&tina, "Tina").await?;
    assert_eq!(tina.find(Locator::Id("room-title")).await?.text().await?, "#staff");
    let name = tina.execute("return document.getElementById('name').value", vec![]).await?;
    assert_eq!(name, json!("Tina"), "the name comes from the token");

    // A token that expires while connected (close 4500): the page stops and says so. The
    // lifetime leaves a loaded machine time to open the page and connect before `exp`.
    let short = mint_token(secret, "sam", "Sam", &[], 8);
    sam.goto(&format!("{}/?token={short}&room=staff", node.http_url())).await?;
    wait_js(
        &sam,
        "the page to stop on the expired token",
        "document.getElementById('status').dataset.state === 'offline' && \
         document.getElementById('status').textContent.includes('expired')",
        vec![],
    )
    .await?;
    let session = session_id(&sam).await?;
    assert!(!session.is_empty(), "the page had connected before the token expired");
    tina.close().await?;
    sam.close().await?;
    Ok(())
}
