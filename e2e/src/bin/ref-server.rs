//! Reference server for the benchmarks: a bare tokio-tungstenite broadcast server with no chat
//! logic. Every text frame a client sends goes to every connected client (the sender included),
//! as one shared `Utf8Bytes` pushed into a bounded per-client queue drained by a writer task.
//! There is no auth, no rooms, no JSON: it is what the WebSocket library itself can do on this
//! machine, the yardstick `chat-bench` compares the node with.
//!
//! It uses the same `WebSocketConfig` buffer sizes as the node's defaults
//! (`limits.ws_read_buffer_bytes` and `limits.ws_write_buffer_bytes`, taken from the node's config defaults), sets
//! `TCP_NODELAY` like a chat server should, and flushes whenever its queue runs empty (as the
//! node does). A client whose queue overflows is dropped (the node closes it with 4001).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::Context as _;
use clap::Parser;
use futures_util::{SinkExt as _, StreamExt as _};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

#[derive(Parser, Debug)]
#[command(about = "Bare tokio-tungstenite broadcast server (benchmark reference)")]
struct Args {
    /// Address to listen on (loopback only is sensible).
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// tungstenite read buffer per connection (default: the node's).
    #[arg(long, default_value_t = chat_node::config::LimitsConfig::default().ws_read_buffer_bytes)]
    read_buffer: usize,
    /// tungstenite write buffer per connection (default: the node's).
    #[arg(long, default_value_t = chat_node::config::LimitsConfig::default().ws_write_buffer_bytes)]
    write_buffer: usize,
    /// Frames queued per client before it is dropped as a slow consumer.
    #[arg(long, default_value_t = 65_536)]
    queue: usize,
    /// Runtime worker threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

type Clients = RwLock<HashMap<u64, mpsc::Sender<Utf8Bytes>>>;

struct Shared {
    clients: Clients,
    next_id: AtomicU64,
    dropped: AtomicU64,
    queue: usize,
    config: WebSocketConfig,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    chat_e2e::raise_nofile();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all();
    if let Some(n) = args.threads {
        rt.worker_threads(n.max(1));
    }
    rt.build().context("building the runtime")?.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let listener = TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let config = WebSocketConfig::default().read_buffer_size(args.read_buffer).write_buffer_size(args.write_buffer);
    let shared = Arc::new(Shared {
        clients: RwLock::new(HashMap::new()),
        next_id: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        queue: args.queue.max(1),
        config,
    });
    println!(
        "listening on {} (read_buffer_size {}, write_buffer_size {}, queue {} frames)",
        listener.local_addr()?,
        args.read_buffer,
        args.write_buffer,
        args.queue
    );
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                eprintln!("accept: {e}");
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                continue;
            }
        };
        let shared = shared.clone();
        tokio::spawn(async move {
            let _ = serve(stream, shared).await;
        });
    }
}

async fn serve(stream: TcpStream, shared: Arc<Shared>) -> anyhow::Result<()> {
    stream.set_nodelay(true)?;
    let ws = tokio_tungstenite::accept_async_with_config(stream, Some(shared.config)).await?;
    let (mut sink, mut source) = ws.split();
    let (tx, mut rx) = mpsc::channel::<Utf8Bytes>(shared.queue);
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    write_clients(&shared.clients).insert(id, tx);

    let writer = tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            sink.feed(Message::Text(text)).await?;
            while let Ok(text) = rx.try_recv() {
                sink.feed(Message::Text(text)).await?;
            }
            sink.flush().await?;
        }
        anyhow::Ok(())
    });

    while let Some(msg) = source.next().await {
        match msg {
            Ok(Message::Text(text)) => broadcast(&shared, text),
            Ok(Message::Close(_)) | Err(_) => break,
            Ok(_) => {}
        }
    }
    write_clients(&shared.clients).remove(&id);
    writer.abort();
    Ok(())
}

fn write_clients(clients: &Clients) -> std::sync::RwLockWriteGuard<'_, HashMap<u64, mpsc::Sender<Utf8Bytes>>> {
    clients.write().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn broadcast(shared: &Shared, text: Utf8Bytes) {
    let mut slow = Vec::new();
    {
        let clients = shared.clients.read().unwrap_or_else(|poisoned| poisoned.into_inner());
        for (id, tx) in clients.iter() {
            match tx.try_send(text.clone()) {
                Ok(()) => {}
                // Its reader will remove it in a moment.
                Err(mpsc::error::TrySendError::Closed(_)) => {}
                Err(mpsc::error::TrySendError::Full(_)) => slow.push(*id),
            }
        }
    }
    if !slow.is_empty() {
        let n = slow.len() as u64;
        let total = shared.dropped.fetch_add(n, Ordering::Relaxed) + n;
        eprintln!("dropped {n} slow client(s) whose queue was full ({total} so far)");
        let mut clients = write_clients(&shared.clients);
        for id in slow {
            clients.remove(&id);
        }
    }
}
