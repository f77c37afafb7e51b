//! Fuzz targets for what strangers send the node: client frames, the peer handshake and sealed
//! peer frames, the replication frames an authenticated peer sends, and the config loader (the
//! `/ws` handshake's headers, query and token are fuzzed in `http::upgrade`). Each target runs
//! its committed seeds (`node/fuzz/<target>/`) as they are, then inputs bolero generates: raw
//! bytes, or a seed with generated edits (bit flips, inserted and deleted bytes, JSON tokens,
//! repeated slices), for `FUZZ_SECS` seconds (default 15). Every input must leave the code
//! without a panic and without any single allocation over `MAX_ALLOCATION`.
//!
//! Coverage-guided runs need a nightly toolchain (`cargo bolero test`, libFuzzer); `cargo test`
//! on stable runs the same targets with bolero's random engine.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::time::Duration;

/// The largest single allocation any input may cause: far above every legitimate buffer of
/// these code paths (frames are at most 16 MiB, the default is 16 KiB), far below what a
/// length taken from the input would ask for.
pub const MAX_ALLOCATION: usize = 32 << 20;

/// Counts the largest allocation per thread, so concurrent tests do not blur the figure.
struct Tracking;

thread_local! {
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

fn note(size: usize) {
    // `try_with`: allocations during thread teardown happen after the slot is gone.
    let _ = LARGEST.try_with(|largest| largest.set(largest.get().max(size)));
}

// SAFETY: every call is forwarded unchanged to the system allocator.
unsafe impl GlobalAlloc for Tracking {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOCATOR: Tracking = Tracking;

/// One generated change to a seed.
#[derive(Debug, Clone, bolero::TypeGenerator)]
pub struct Edit {
    at: u16,
    kind: u8,
    byte: u8,
}

/// Tokens that reach parser corners random bytes rarely do.
const TOKENS: &[&str] = &[
    "\"",
    "\\",
    "{",
    "}",
    "[",
    "]",
    ",",
    ":",
    "null",
    "true",
    "-1",
    "0",
    "1e999",
    "-0.0",
    "18446744073709551616",
    "\"\\u0000\"",
    "\"\\ud800\"",
    "9007199254740993",
    "\"type\"",
    "\"room\"",
    "\"since\"",
    "\"offset\"",
    "=",
    "\n",
    "[[",
    "]]",
    "'''",
    "\"\"\"",
    "%00",
    "%",
    "&",
    "Bearer ",
    ".",
    "..",
    "eyJ",
    "\u{feff}",
    "\u{10ffff}",
];

/// The seed with the first `count` edits applied: few edits keep most inputs close enough to
/// valid to get past the first parser.
fn apply(seed: &[u8], edits: &[Edit], count: usize) -> Vec<u8> {
    let mut input = seed.to_vec();
    for edit in edits.iter().take(count) {
        let at = if input.is_empty() { 0 } else { usize::from(edit.at) % (input.len() + 1) };
        match edit.kind % 7 {
            0 if at < input.len() => input[at] ^= 1 << (edit.byte % 8),
            1 => input.insert(at, edit.byte),
            2 if at < input.len() => {
                input.remove(at);
            }
            3 if at < input.len() => input[at] = edit.byte,
            4 => {
                let token = TOKENS[usize::from(edit.byte) % TOKENS.len()].as_bytes();
                input.splice(at..at, token.iter().copied());
            }
            5 => {
                // Repeat a slice: deep nesting, long strings, many fields.
                let end = (at + usize::from(edit.byte % 16) + 1).min(input.len());
                let slice = input[at.min(end)..end].to_vec();
                for _ in 0..(edit.byte / 16).min(64) {
                    input.splice(at..at, slice.iter().copied());
                }
            }
            _ => input.truncate(at),
        }
        if input.len() > 256 * 1024 {
            input.truncate(256 * 1024);
        }
    }
    input
}

/// The committed seeds of `target`.
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz").join(target);
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("seed corpus {}: {e}", dir.display()))
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    paths.sort();
    let seeds: Vec<Vec<u8>> = paths.iter().filter_map(|p| std::fs::read(p).ok()).collect();
    assert!(!seeds.is_empty(), "no seeds in {}", dir.display());
    seeds
}

fn budget() -> Duration {
    let secs = std::env::var("FUZZ_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    Duration::from_secs(secs)
}

/// Runs `check` on one input and fails if it allocated more than `MAX_ALLOCATION` at once.
fn guarded(check: &AssertUnwindSafe<impl Fn(&[u8])>, input: &[u8]) {
    LARGEST.with(|largest| largest.set(0));
    (check.0)(input);
    let largest = LARGEST.with(Cell::get);
    assert!(
        largest <= MAX_ALLOCATION,
        "one allocation of {largest} bytes for a {}-byte input: {:?}",
        input.len(),
        String::from_utf8_lossy(&input[..input.len().min(256)])
    );
}

/// Runs `check` on every seed of `target`, then on generated inputs for the time budget.
pub fn run(target: &str, check: impl Fn(&[u8])) {
    // A failing input fails the test either way; bolero only needs to catch the panic.
    let check = AssertUnwindSafe(check);
    let seeds = seeds(target);
    for seed in &seeds {
        guarded(&check, seed);
    }
    let (inputs, started) = (std::sync::atomic::AtomicU64::new(0), std::time::Instant::now());
    bolero::check!()
        .with_test_time(budget())
        .with_iterations(usize::MAX)
        .with_type::<(bool, u16, Vec<Edit>, Vec<u8>)>()
        .for_each(|(raw, pick, edits, bytes)| {
            inputs.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if *raw {
                guarded(&check, bytes);
            } else {
                let seed = &seeds[usize::from(*pick) % seeds.len()];
                let count = [1, 1, 2, 2, 3, 4, 8, 32][usize::from(*pick >> 13)];
                guarded(&check, &apply(seed, edits, count));
            }
        });
    let inputs = inputs.into_inner();
    println!("fuzz target {target}: {} seeds, {inputs} generated inputs in {:.1?}", seeds.len(), started.elapsed());
}

mod targets {
    use std::sync::Arc;
    use std::time::Duration;

    use bytes::Bytes;

    use crate::auth::Identity;
    use crate::cluster::seal::{Exchange, Transcript};
    use crate::cluster::wire::PeerFrame;
    use crate::config::{AuthMode, NodeConfig};
    use crate::hub::Hub;
    use crate::metrics::Metrics;
    use crate::protocol::UserInfo;
    use crate::replication::wire::ReplicaFrame;
    use crate::transport::Inbound;
    use crate::transport::memory::{ToClient, pair};

    /// Each input is one text frame on a fresh connection to one hub, followed by a ping: the
    /// hub answers the ping or closes with a documented code, and its session task ends
    /// without a panic.
    #[test]
    fn client_frames() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let mut config = NodeConfig::default();
        config.auth.mode = AuthMode::Anonymous;
        let hub = Hub::new("fuzz".into(), config, Arc::new(Metrics::new()), None).unwrap();
        let check = |input: &[u8]| {
            runtime.block_on(async {
                let (conn, mut client) = pair(8);
                let permit = hub.admit(None).expect("one connection at a time fits");
                let identity = Identity {
                    user: UserInfo { id: "fuzz".into(), name: "Fuzz".into() },
                    roles: vec![],
                    expires_at: None,
                };
                let session = tokio::spawn(hub.clone().serve(conn, identity, None, permit));
                let _ = client.inbound.send(Inbound::Text(Bytes::copy_from_slice(input))).await;
                let _ = client.send_text(r#"{"type":"ping","id":"fuzz-probe"}"#).await;
                let answered = tokio::time::timeout(Duration::from_secs(5), async {
                    while let Some(item) = client.outbound.recv().await {
                        match item {
                            ToClient::Frame(frame) if frame.contains("\"fuzz-probe\"") => return Ok(()),
                            ToClient::Close(code, reason) => {
                                return if matches!(code, 1007 | 1008 | 1009 | 4000..=4999) {
                                    Ok(())
                                } else {
                                    Err(format!("close {code} {reason}"))
                                };
                            }
                            _ => {}
                        }
                    }
                    Err("the connection ended without an answer or a close".to_owned())
                })
                .await;
                drop(client);
                let ended = tokio::time::timeout(Duration::from_secs(5), session).await;
                assert!(matches!(ended, Ok(Ok(()))), "the session task did not end cleanly: {ended:?}");
                match answered {
                    Ok(Ok(())) => {}
                    Ok(Err(why)) => panic!("{why}"),
                    Err(_) => panic!("no answer to the ping within 5 s"),
                }
            });
        };
        super::run("client_frames", check);
    }

    /// What reaches a peer port before and after authentication: handshake frames, sealed
    /// frames (which never open unless the peer sealed them), and the replication frames an
    /// authenticated peer sends.
    #[test]
    fn peer_frames() {
        let (dialer, acceptor) = (Exchange::new().unwrap(), Exchange::new().unwrap());
        let transcript = Transcript { dialer_id: "a", acceptor_id: "b", dialer_nonce: "1", acceptor_nonce: "2" };
        let acceptor_public = acceptor.public_hex();
        let link =
            std::sync::Mutex::new(dialer.finish(&acceptor_public, b"0123456789abcdef", &transcript, true).unwrap());
        let check = |input: &[u8]| {
            let _ = serde_json::from_slice::<PeerFrame>(input);
            if let Ok(text) = std::str::from_utf8(input) {
                let _ = serde_json::from_str::<ReplicaFrame>(text);
            }
            let mut link = link.lock().unwrap_or_else(|p| p.into_inner());
            assert!(link.receive.open(input).is_err(), "a frame the peer never sealed opened");
        };
        super::run("peer_frames", check);
    }

    /// Config files: loaded and validated, or refused with an error naming the field.
    #[test]
    fn config_loader() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let check = |input: &[u8]| {
            std::fs::write(&path, input).unwrap();
            match crate::config::load::load(Some(&path), &crate::config::load::Overrides::default()) {
                Ok(config) => {
                    assert!(config.validate().is_ok(), "load returned a config that does not validate");
                    let again = toml::to_string(&config).expect("a loaded config serializes");
                    let parsed: NodeConfig = toml::from_str(&again).expect("and parses back");
                    assert_eq!(parsed, config, "the round trip changes nothing");
                }
                Err(err) => assert!(!err.to_string().is_empty()),
            }
        };
        super::run("config_loader", check);
    }
}
