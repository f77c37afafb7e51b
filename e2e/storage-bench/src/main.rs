//! Storage-engine benchmark for ChatCluster's on-disk Raft log.
//!
//! Puts the access pattern of a multi-group Raft log on each candidate engine, each in a fresh
//! directory under the system temp dir (`/tmp`), and prints tables: appends (the engines taking
//! turns in rounds), the other log operations, then reopen time and size. Every write that the
//! Raft log would need to be durable is committed with an fsync before the call returns (redb
//! `Durability::Immediate`, fjall `PersistMode::SyncAll`). Every loop is bounded in count; the
//! whole run takes about a minute on a quiet machine. See README.md.
//!
//! `cargo run --release --manifest-path e2e/storage-bench/Cargo.toml -- --help`

use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

type Res<T> = Result<T, Box<dyn Error + Send + Sync>>;

/// Raft groups sharing one database.
const GROUPS: u32 = 8;
/// Size of one log entry's value.
const ENTRY_BYTES: usize = 200;
/// Entries in the database whose reopen time is measured.
const REOPEN_ENTRIES: u64 = 200_000;
/// Entries per durable commit while filling that database (the largest append batch).
const FILL_BATCH: u64 = 64;

// ---------------------------------------------------------------------------------------------
// Keys and values

/// (group u32, index u64), big-endian, so that byte order is (group, index) order.
fn key(group: u32, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

fn key_index(k: &[u8]) -> u64 {
    u64::from_be_bytes(k[4..12].try_into().unwrap())
}

/// Payloads shaped like a replicated chat message: JSON with ids and a body, ~200 bytes, partly
/// compressible (fjall compresses its tables with LZ4; redb stores values as they are).
struct Payloads(Vec<Vec<u8>>);

impl Payloads {
    fn new() -> Self {
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let words = [
            "hello", "see", "you", "at", "the", "standup", "ok", "deploy", "looks", "good", "lgtm", "ship", "it",
            "coffee", "later", "thanks", "why", "is", "ci", "red", "again",
        ];
        let v = (0..1024)
            .map(|_| {
                let mut s = format!(
                    r#"{{"room":"room-{}","from":"user-{}","id":"{:016x}{:016x}","ts":{},"body":""#,
                    next() % 5000,
                    next() % 100_000,
                    next(),
                    next(),
                    1_790_000_000_000u64 + next() % 10_000_000,
                );
                while s.len() < ENTRY_BYTES - 2 {
                    s.push_str(words[(next() % words.len() as u64) as usize]);
                    s.push(' ');
                }
                s.truncate(ENTRY_BYTES - 2);
                s.push_str("\"}");
                assert_eq!(s.len(), ENTRY_BYTES);
                s.into_bytes()
            })
            .collect();
        Payloads(v)
    }

    fn get(&self, group: u32, index: u64) -> &[u8] {
        &self.0[((index as usize).wrapping_mul(31) + group as usize) % self.0.len()]
    }
}

// ---------------------------------------------------------------------------------------------
// The engines behind one interface: what a Raft log storage needs

trait Log: Send + Sync {
    /// Writes the entries (possibly of several groups) in one atomic, durable commit.
    fn append(&self, entries: &[([u8; 12], &[u8])]) -> Res<()>;
    /// Saves a group's hard state (term + vote), durably.
    fn save_vote(&self, _group: u32, _vote: &[u8; 16]) -> Res<()> {
        Err("not supported".into())
    }
    /// Reads `count` entries from `from` on; returns the bytes read.
    fn read_range(&self, _group: u32, _from: u64, _count: u64) -> Res<usize> {
        Err("not supported".into())
    }
    /// Deletes the group's entries with index > `after`, durably.
    fn truncate_after(&self, _group: u32, _after: u64) -> Res<()> {
        Err("not supported".into())
    }
    /// Deletes the group's entries with index <= `upto`, durably.
    fn purge_upto(&self, _group: u32, _upto: u64) -> Res<()> {
        Err("not supported".into())
    }
    /// The group's last index, if any.
    fn last_index(&self, _group: u32) -> Res<Option<u64>> {
        Err("not supported".into())
    }
    /// Number of entries (full scan; used to check the reopened database).
    fn count(&self) -> Res<u64> {
        Err("not supported".into())
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    /// Not a database: appends written to one plain file and fsynced, the floor for appends.
    File,
    Redb4,
    Redb3,
    Fjall,
    Redb4QuickRepair,
}

impl Engine {
    const ALL: [Engine; 5] = [Engine::File, Engine::Redb4, Engine::Redb3, Engine::Fjall, Engine::Redb4QuickRepair];

    fn id(self) -> &'static str {
        match self {
            Engine::File => "file",
            Engine::Redb4 => "redb4",
            Engine::Redb3 => "redb3",
            Engine::Fjall => "fjall",
            Engine::Redb4QuickRepair => "redb4-qr",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Engine::File => "plain file (floor)",
            Engine::Redb4 => "redb 4.6.0",
            Engine::Redb3 => "redb 3.1.3",
            Engine::Fjall => "fjall 3.1.13",
            Engine::Redb4QuickRepair => "redb 4.6.0 quick-repair",
        }
    }

    fn from_id(s: &str) -> Option<Engine> {
        Engine::ALL.into_iter().find(|e| e.id() == s)
    }

    /// Whether it is a database (the plain file only appends).
    fn is_db(self) -> bool {
        self != Engine::File
    }

    /// Opens (or creates) the engine's database in `dir`.
    fn open(self, dir: &Path) -> Res<Box<dyn Log>> {
        Ok(match self {
            Engine::File => Box::new(FileLog::open(&dir.join("raft.log"))?),
            Engine::Redb4 => Box::new(redb4_log::RedbLog::open(&dir.join("raft.redb"), false)?),
            Engine::Redb3 => Box::new(redb3_log::RedbLog::open(&dir.join("raft.redb"), false)?),
            Engine::Fjall => Box::new(FjallLog::open(&dir.join("raft.fjall"))?),
            Engine::Redb4QuickRepair => Box::new(redb4_log::RedbLog::open(&dir.join("raft.redb"), true)?),
        })
    }
}

/// The floor: a bare write-ahead log. The file is pre-sized once (sparse, as fjall does with
/// its journal, so that appends do not change its size); each append is one positioned write of
/// the entries (key + value) after the previous ones, then fdatasync, under a mutex. No index,
/// no checksums, no recovery: about the least that one durable commit costs on this disk.
struct FileLog {
    file: std::sync::Mutex<(std::fs::File, u64)>,
}

impl FileLog {
    fn open(path: &Path) -> Res<Self> {
        let file = std::fs::OpenOptions::new().create(true).truncate(true).write(true).open(path)?;
        file.set_len(1 << 30)?;
        file.sync_all()?;
        Ok(FileLog { file: std::sync::Mutex::new((file, 0)) })
    }
}

impl Log for FileLog {
    fn append(&self, entries: &[([u8; 12], &[u8])]) -> Res<()> {
        use std::os::unix::fs::FileExt;
        let mut buf = Vec::with_capacity(entries.len() * (12 + ENTRY_BYTES));
        for (k, v) in entries {
            buf.extend_from_slice(k);
            buf.extend_from_slice(v);
        }
        let mut guard = self.file.lock().map_err(|_| "poisoned")?;
        let (f, offset) = &mut *guard;
        f.write_all_at(&buf, *offset)?;
        *offset += buf.len() as u64;
        f.sync_data()?;
        Ok(())
    }
}

/// Stands in for a database that has been closed.
struct Closed;

impl Log for Closed {
    fn append(&self, _: &[([u8; 12], &[u8])]) -> Res<()> {
        Err("closed".into())
    }
}

/// The same code for redb 4 and redb 3 (their API is the same for this).
macro_rules! redb_log {
    ($module:ident, $redb:ident) => {
        mod $module {
            use super::{Log, Res, key, key_index};
            use $redb::{Database, Durability, ReadableDatabase, ReadableTableMetadata, TableDefinition};

            const LOG: TableDefinition<[u8; 12], &[u8]> = TableDefinition::new("log");
            const VOTE: TableDefinition<u32, &[u8]> = TableDefinition::new("vote");

            pub struct RedbLog {
                db: Database,
                quick_repair: bool,
            }

            impl RedbLog {
                pub fn open(path: &std::path::Path, quick_repair: bool) -> Res<Self> {
                    let db = Database::create(path)?;
                    let log = RedbLog { db, quick_repair };
                    // Create the tables once, so that readers never find them missing.
                    let tx = log.begin()?;
                    tx.open_table(LOG)?;
                    tx.open_table(VOTE)?;
                    tx.commit()?;
                    Ok(log)
                }

                /// A write transaction that is durable (fsync) when commit() returns.
                fn begin(&self) -> Res<$redb::WriteTransaction> {
                    let mut tx = self.db.begin_write()?;
                    tx.set_durability(Durability::Immediate)?;
                    tx.set_quick_repair(self.quick_repair);
                    Ok(tx)
                }
            }

            impl Log for RedbLog {
                fn append(&self, entries: &[([u8; 12], &[u8])]) -> Res<()> {
                    let tx = self.begin()?;
                    {
                        let mut t = tx.open_table(LOG)?;
                        for (k, v) in entries {
                            t.insert(k, *v)?;
                        }
                    }
                    tx.commit()?;
                    Ok(())
                }

                fn save_vote(&self, group: u32, vote: &[u8; 16]) -> Res<()> {
                    let tx = self.begin()?;
                    tx.open_table(VOTE)?.insert(group, &vote[..])?;
                    tx.commit()?;
                    Ok(())
                }

                fn read_range(&self, group: u32, from: u64, count: u64) -> Res<usize> {
                    let rx = self.db.begin_read()?;
                    let t = rx.open_table(LOG)?;
                    let mut bytes = 0;
                    for r in t.range(key(group, from)..key(group, from + count))? {
                        let (_, v) = r?;
                        bytes += v.value().len();
                    }
                    Ok(bytes)
                }

                fn truncate_after(&self, group: u32, after: u64) -> Res<()> {
                    let tx = self.begin()?;
                    tx.open_table(LOG)?.retain_in(key(group, after + 1)..=key(group, u64::MAX), |_, _| false)?;
                    tx.commit()?;
                    Ok(())
                }

                fn purge_upto(&self, group: u32, upto: u64) -> Res<()> {
                    let tx = self.begin()?;
                    tx.open_table(LOG)?.retain_in(key(group, 0)..=key(group, upto), |_, _| false)?;
                    tx.commit()?;
                    Ok(())
                }

                fn last_index(&self, group: u32) -> Res<Option<u64>> {
                    let rx = self.db.begin_read()?;
                    let t = rx.open_table(LOG)?;
                    let last = t.range(key(group, 0)..=key(group, u64::MAX))?.next_back();
                    Ok(match last {
                        Some(r) => Some(key_index(&r?.0.value())),
                        None => None,
                    })
                }

                fn count(&self) -> Res<u64> {
                    let rx = self.db.begin_read()?;
                    Ok(rx.open_table(LOG)?.len()?)
                }
            }
        }
    };
}

redb_log!(redb4_log, redb);
redb_log!(redb3_log, redb3);

struct FjallLog {
    db: fjall::Database,
    log: fjall::Keyspace,
    vote: fjall::Keyspace,
}

impl FjallLog {
    fn open(path: &Path) -> Res<Self> {
        use fjall::{Database, KeyspaceCreateOptions};
        let db = Database::builder(path).open()?;
        let log = db.keyspace("log", KeyspaceCreateOptions::default)?;
        let vote = db.keyspace("vote", KeyspaceCreateOptions::default)?;
        Ok(FjallLog { db, log, vote })
    }

    /// A write batch that is atomic and fsynced (journal, `sync_all`) when commit() returns.
    fn batch(&self) -> fjall::OwnedWriteBatch {
        self.db.batch().durability(Some(fjall::PersistMode::SyncAll))
    }

    /// Deletes the keys in the range: fjall (an LSM tree) has no range delete, so one tombstone
    /// per key, found by a scan, in one atomic batch.
    fn delete_range(&self, lo: [u8; 12], hi: [u8; 12]) -> Res<()> {
        let mut b = self.batch();
        for g in self.log.range(lo..=hi) {
            b.remove(&self.log, g.key()?);
        }
        b.commit()?;
        Ok(())
    }
}

impl Log for FjallLog {
    fn append(&self, entries: &[([u8; 12], &[u8])]) -> Res<()> {
        let mut b = self.batch();
        for (k, v) in entries {
            b.insert(&self.log, &k[..], *v);
        }
        b.commit()?;
        Ok(())
    }

    fn save_vote(&self, group: u32, vote: &[u8; 16]) -> Res<()> {
        let mut b = self.batch();
        b.insert(&self.vote, &group.to_be_bytes()[..], &vote[..]);
        b.commit()?;
        Ok(())
    }

    fn read_range(&self, group: u32, from: u64, count: u64) -> Res<usize> {
        let mut bytes = 0;
        for g in self.log.range(key(group, from)..key(group, from + count)) {
            bytes += g.value()?.len();
        }
        Ok(bytes)
    }

    fn truncate_after(&self, group: u32, after: u64) -> Res<()> {
        self.delete_range(key(group, after + 1), key(group, u64::MAX))
    }

    fn purge_upto(&self, group: u32, upto: u64) -> Res<()> {
        self.delete_range(key(group, 0), key(group, upto))
    }

    fn last_index(&self, group: u32) -> Res<Option<u64>> {
        Ok(match self.log.prefix(group.to_be_bytes()).next_back() {
            Some(g) => Some(key_index(&g.key()?)),
            None => None,
        })
    }

    fn count(&self) -> Res<u64> {
        Ok(self.log.len()? as u64)
    }
}

// ---------------------------------------------------------------------------------------------
// Measuring

/// Sorted latencies of one case.
struct Lat(Vec<Duration>);

impl Lat {
    fn new(mut v: Vec<Duration>) -> Self {
        v.sort();
        Lat(v)
    }
    fn pct(&self, p: f64) -> Duration {
        if self.0.is_empty() {
            return Duration::ZERO;
        }
        let i = ((self.0.len() as f64 - 1.0) * p).round() as usize;
        self.0[i]
    }
}

fn us(d: Duration) -> String {
    let us = d.as_secs_f64() * 1e6;
    if us >= 100_000.0 {
        format!("{:.0} ms", us / 1000.0)
    } else if us >= 10_000.0 {
        format!("{:.1} ms", us / 1000.0)
    } else {
        format!("{us:.0} µs")
    }
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1e3)
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// CPU seconds used by the whole machine (busy, all cores), from /proc/stat.
fn machine_busy_secs() -> f64 {
    let Ok(s) = std::fs::read_to_string("/proc/stat") else {
        return 0.0;
    };
    let f: Vec<f64> =
        s.lines().next().unwrap_or("").split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal ...: busy = all but idle and iowait
    let busy: f64 = f.iter().take(8).sum::<f64>() - f.get(3).unwrap_or(&0.0) - f.get(4).unwrap_or(&0.0);
    busy / clock_ticks()
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
}

/// CPU seconds used by this process and its waited-for children.
fn own_cpu_secs() -> f64 {
    let mut total = 0.0;
    for who in [libc::RUSAGE_SELF, libc::RUSAGE_CHILDREN] {
        // SAFETY: getrusage writes into the struct we pass.
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        total += tv(ru.ru_utime) + tv(ru.ru_stime);
    }
    total
}

/// Apparent size and allocated size of everything under `dir`.
fn disk_usage(dir: &Path) -> (u64, u64) {
    use std::os::unix::fs::MetadataExt;
    let mut apparent = 0;
    let mut allocated = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            } else {
                apparent += m.len();
                allocated += m.blocks() * 512;
            }
        }
    }
    (apparent, allocated)
}

/// Drops this database's files from the page cache (fsync, then POSIX_FADV_DONTNEED), so that
/// a reopen reads from the disk. Touches no other file.
fn evict_from_page_cache(dir: &Path) {
    use std::os::fd::AsRawFd;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(f) = std::fs::File::open(&p) {
                let _ = f.sync_all();
                // SAFETY: a valid fd; the advice only drops clean cached pages.
                unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            }
        }
    }
}

fn time_each(n: usize, mut f: impl FnMut(usize) -> Res<()>) -> Res<Lat> {
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        f(i)?;
        lat.push(t.elapsed());
    }
    Ok(Lat::new(lat))
}

/// CPU that other processes used over a phase, in % of one core.
struct OthersCpu {
    t: Instant,
    busy: f64,
    own: f64,
}

impl OthersCpu {
    fn start() -> Self {
        OthersCpu { t: Instant::now(), busy: machine_busy_secs(), own: own_cpu_secs() }
    }
    fn pct(&self) -> f64 {
        let others = (machine_busy_secs() - self.busy) - (own_cpu_secs() - self.own);
        (others / self.t.elapsed().as_secs_f64() * 100.0).max(0.0)
    }
}

// ---------------------------------------------------------------------------------------------
// The run

/// (writers, entries per append)
const APPEND_CASES: [(u32, u64); 6] = [(1, 1), (GROUPS, 1), (1, 16), (GROUPS, 16), (1, 64), (GROUPS, 64)];

/// Append cases run in this many rounds, the engines taking turns within each round, so that
/// every engine sees the same machine (the disk's speed changes with what else runs on it).
const ROUNDS: usize = 4;

#[derive(Default)]
struct AppendRow {
    appends: usize,
    wall: Duration,
    lat: Vec<Duration>,
}

struct OpRow {
    name: &'static str,
    lat: Lat,
    extra: String,
}

/// One engine's database, its groups' next indexes and its results.
struct Bench {
    engine: Engine,
    tmp: tempfile::TempDir,
    log: Arc<dyn Log>,
    next: Vec<u64>,
    appends: Vec<AppendRow>,
    ops: Vec<OpRow>,
    reopen: Vec<(String, String)>,
}

impl Bench {
    fn new(engine: Engine) -> Res<Self> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!("storage-bench-{}-", engine.id()))
            .tempdir_in(std::env::temp_dir())?;
        let dir = tmp.path().join("ops");
        std::fs::create_dir_all(&dir)?;
        let log = Arc::from(engine.open(&dir)?);
        Ok(Bench {
            engine,
            tmp,
            log,
            next: vec![1; GROUPS as usize],
            appends: APPEND_CASES.iter().map(|_| AppendRow::default()).collect(),
            ops: Vec::new(),
            reopen: Vec::new(),
        })
    }

    /// The group's last index (the benchmark keeps track; the database is checked against it).
    fn last(&self, group: u32) -> u64 {
        self.next[group as usize] - 1
    }
}

fn build_batch(p: &Payloads, group: u32, first: u64, n: u64) -> Vec<([u8; 12], &[u8])> {
    (first..first + n).map(|i| (key(group, i), p.get(group, i))).collect()
}

/// One writer thread: `appends` appends of `batch` entries, round-robin over the groups.
fn append_single(b: &mut Bench, p: &Payloads, batch: u64, appends: usize, row: usize) -> Res<()> {
    let mut lat = Vec::with_capacity(appends);
    let start = Instant::now();
    for i in 0..appends {
        let group = (i % GROUPS as usize) as u32;
        let entries = build_batch(p, group, b.next[group as usize], batch);
        let t = Instant::now();
        b.log.append(&entries)?;
        lat.push(t.elapsed());
        b.next[group as usize] += batch;
    }
    let r = &mut b.appends[row];
    r.wall += start.elapsed();
    r.appends += appends;
    r.lat.extend(lat);
    Ok(())
}

/// One writer thread per group, `per` appends each, all released together.
fn append_concurrent(b: &mut Bench, p: &Arc<Payloads>, batch: u64, per: usize, row: usize) -> Res<()> {
    let barrier = Arc::new(Barrier::new(GROUPS as usize + 1));
    let handles: Vec<_> = (0..GROUPS)
        .map(|group| {
            let (log, p, barrier) = (b.log.clone(), p.clone(), barrier.clone());
            let mut next = b.next[group as usize];
            std::thread::spawn(move || -> Res<(Vec<Duration>, u64)> {
                let mut lat = Vec::with_capacity(per);
                barrier.wait();
                for _ in 0..per {
                    let entries = build_batch(&p, group, next, batch);
                    let t = Instant::now();
                    log.append(&entries)?;
                    lat.push(t.elapsed());
                    next += batch;
                }
                Ok((lat, next))
            })
        })
        .collect();
    barrier.wait();
    let start = Instant::now();
    let mut results = Vec::new();
    for h in handles {
        results.push(h.join().map_err(|_| "writer thread panicked")?);
    }
    let wall = start.elapsed();
    let r = &mut b.appends[row];
    r.wall += wall;
    for (group, res) in results.into_iter().enumerate() {
        let (lat, next) = res?;
        r.appends += lat.len();
        r.lat.extend(lat);
        b.next[group] = next;
    }
    Ok(())
}

fn phase_appends(benches: &mut [Bench], p: &Arc<Payloads>, appends: usize) -> Res<f64> {
    let cpu = OthersCpu::start();
    let per_round = appends / ROUNDS;
    for round in 0..ROUNDS {
        for (row, &(writers, batch)) in APPEND_CASES.iter().enumerate() {
            let n = benches.len();
            for k in 0..n {
                let b = &mut benches[(k + round + row) % n];
                if writers == 1 {
                    append_single(b, p, batch, per_round, row)?;
                } else {
                    append_concurrent(b, p, batch, per_round / GROUPS as usize, row)?;
                }
            }
        }
    }
    Ok(cpu.pct())
}

/// The other operations of a Raft log; each one runs on every database in turn.
fn phase_ops(benches: &mut [Bench], p: &Payloads, appends: usize) -> Res<f64> {
    let cpu = OthersCpu::start();

    // Application-level group commit: one durable commit carrying a 16-entry batch for each of
    // the 8 groups (what a node can do when several groups have appends waiting).
    let n = appends / GROUPS as usize;
    for b in benches.iter_mut() {
        let lat = time_each(n, |_| {
            let mut entries = Vec::with_capacity(16 * GROUPS as usize);
            for group in 0..GROUPS {
                entries.extend(build_batch(p, group, b.next[group as usize], 16));
                b.next[group as usize] += 16;
            }
            b.log.append(&entries)
        })?;
        let busy: Duration = lat.0.iter().sum();
        let extra = format!("{:.0} entries/s", (n * 16 * GROUPS as usize) as f64 / busy.as_secs_f64());
        b.ops.push(OpRow { name: "group commit: 8 groups × 16 entries, one commit", lat, extra });
    }

    // Vote: a tiny durable write.
    for b in benches.iter_mut() {
        let lat = time_each(500, |i| {
            let mut v = [0u8; 16];
            v[..8].copy_from_slice(&(i as u64 + 2).to_be_bytes());
            v[8..].copy_from_slice(&(i as u64 % 3).to_be_bytes());
            b.log.save_vote(i as u32 % GROUPS, &v)
        })?;
        b.ops.push(OpRow { name: "save vote (16 B, durable)", lat, extra: String::new() });
    }

    // Range reads of 1000 entries at spread-out positions (page cache warm: recently written).
    for b in benches.iter_mut() {
        let lat = time_each(200, |i| {
            let group = i as u32 % GROUPS;
            let from = 1 + (i as u64 * 7919) % (b.last(group) - 1000);
            let got = b.log.read_range(group, from, 1000)?;
            if got != 1000 * ENTRY_BYTES {
                return Err(format!("read {got} bytes, expected {}", 1000 * ENTRY_BYTES).into());
            }
            Ok(())
        })?;
        let secs: f64 = lat.0.iter().map(|d| d.as_secs_f64()).sum();
        let extra = format!("{:.2} M entries/s", 200_000.0 / secs / 1e6);
        b.ops.push(OpRow { name: "read 1000 entries (range)", lat, extra });
    }

    // Truncate the tail: the last 100 entries of a group (a conflicting suffix), durable.
    for b in benches.iter_mut() {
        let lat = time_each(80, |i| {
            let group = i as u32 % GROUPS;
            let after = b.last(group) - 100;
            b.log.truncate_after(group, after)?;
            b.next[group as usize] = after + 1;
            Ok(())
        })?;
        for group in 0..GROUPS {
            let got = b.log.last_index(group)?;
            if got != Some(b.last(group)) {
                return Err(format!("{}: group {group}: last index {got:?} after truncation", b.engine.id()).into());
            }
        }
        b.ops.push(OpRow { name: "truncate tail: last 100 entries", lat, extra: String::new() });
    }

    // Purge a prefix: the first 5000 entries of each group (after a snapshot), durable; then
    // reads that start right after the purged prefix (an LSM tree skips the tombstones).
    for b in benches.iter_mut() {
        let lat = time_each(GROUPS as usize, |i| b.log.purge_upto(i as u32, 5000))?;
        b.ops.push(OpRow { name: "purge prefix: first 5000 entries", lat, extra: String::new() });
        let lat = time_each(GROUPS as usize * 10, |i| {
            let got = b.log.read_range(i as u32 % GROUPS, 5001, 1000)?;
            if got != 1000 * ENTRY_BYTES {
                return Err(format!("read {got} bytes after the purge").into());
            }
            Ok(())
        })?;
        b.ops.push(OpRow { name: "read 1000 entries just after the purged prefix", lat, extra: String::new() });
        let want: u64 = (0..GROUPS).map(|g| b.last(g) - 5000).sum();
        let got = b.log.count()?;
        if got != want {
            return Err(format!("{}: {got} entries after the purge, expected {want}", b.engine.id()).into());
        }
        let (apparent, _) = disk_usage(&b.tmp.path().join("ops"));
        b.reopen.push((format!("on disk after all of the above ({got} entries left)"), mib(apparent)));
    }
    Ok(cpu.pct())
}

/// Reopen of a database holding 200 000 entries. A child process fills it and exits without
/// closing it (a crash: every commit of the fill was durable); then: reopen after the crash,
/// clean close, reopen after a clean close. "Ready" = open + the last index of every group.
fn phase_reopen(b: &mut Bench) -> Res<f64> {
    let cpu = OthersCpu::start();
    let engine = b.engine;
    let dir = b.tmp.path().join("reopen");
    std::fs::create_dir_all(&dir)?;
    let t = Instant::now();
    let status = Command::new(std::env::current_exe()?)
        .args(["fill", engine.id(), dir.to_str().ok_or("temp path is not UTF-8")?])
        .status()?;
    if !status.success() {
        return Err(format!("fill child failed: {status}").into());
    }
    let fill = t.elapsed();
    let out = &mut b.reopen;
    out.push((
        "fill: 200 000 entries, 64 per durable commit (child process)".into(),
        format!("{} ({:.0} commits/s)", ms(fill), (REOPEN_ENTRIES / FILL_BATCH) as f64 / fill.as_secs_f64()),
    ));
    out.push(("on disk after the crash, before reopen".into(), mib(disk_usage(&dir).0)));

    let ready = |cold: bool| -> Res<(Duration, Box<dyn Log>)> {
        if cold {
            evict_from_page_cache(&dir);
        }
        let t = Instant::now();
        let log = engine.open(&dir)?;
        for group in 0..GROUPS {
            let got = log.last_index(group)?;
            if got != Some(REOPEN_ENTRIES / GROUPS as u64) {
                return Err(format!("{}: group {group}: last index {got:?} after reopen", engine.id()).into());
            }
        }
        Ok((t.elapsed(), log))
    };
    let (d, log) = ready(true)?;
    out.push(("reopen after crash, page cache cold (ready)".into(), ms(d)));
    let n = log.count()?;
    if n != REOPEN_ENTRIES {
        return Err(format!("{}: {n} entries after reopen, expected {REOPEN_ENTRIES}", engine.id()).into());
    }
    let t = Instant::now();
    drop(log);
    out.push(("clean close".into(), ms(t.elapsed())));
    let (mut cold, mut warm) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        cold.push(ready(true)?.0);
        warm.push(ready(false)?.0);
    }
    cold.sort();
    warm.sort();
    out.push(("reopen after clean close, cold (median of 3)".into(), ms(cold[1])));
    out.push(("reopen after clean close, warm (median of 3)".into(), ms(warm[1])));
    let (apparent, allocated) = disk_usage(&dir);
    out.push((
        "on disk: 200 000 entries (42 MB of keys+values), clean".into(),
        format!("{} (allocated {})", mib(apparent), mib(allocated)),
    ));
    Ok(cpu.pct())
}

/// Child process: fills the reopen database and exits without closing it.
fn fill(engine: Engine, dir: &Path) -> Res<()> {
    let p = Payloads::new();
    let log = engine.open(dir)?;
    let per_group = REOPEN_ENTRIES / GROUPS as u64;
    let mut next = [1u64; GROUPS as usize];
    for i in 0.. {
        let group = i % GROUPS as usize;
        if next.iter().all(|&n| n > per_group) {
            break;
        }
        if next[group] > per_group {
            continue;
        }
        let n = FILL_BATCH.min(per_group - next[group] + 1);
        log.append(&build_batch(&p, group as u32, next[group], n))?;
        next[group] += n;
    }
    // Like a crash: no close, no destructors, no final flush.
    std::mem::forget(log);
    std::process::exit(0);
}

// ---------------------------------------------------------------------------------------------
// Output

fn print_appends(benches: &[Bench], cpu: f64) {
    println!();
    println!(
        "== appends: one durable commit per append; {ROUNDS} rounds, engines taking turns \
         (other processes used {cpu:.0} % of one core meanwhile)"
    );
    println!(
        "{:<24} {:>7} {:>5} {:>7} {:>10} {:>11} {:>9} {:>9} {:>9}",
        "engine", "writers", "batch", "appends", "appends/s", "entries/s", "p50", "p99", "max"
    );
    for b in benches {
        for (row, &(writers, batch)) in APPEND_CASES.iter().enumerate() {
            let r = &b.appends[row];
            let lat = Lat::new(r.lat.clone());
            let aps = r.appends as f64 / r.wall.as_secs_f64();
            println!(
                "{:<24} {:>7} {:>5} {:>7} {:>10.0} {:>11.0} {:>9} {:>9} {:>9}",
                if row == 0 { b.engine.label() } else { "" },
                writers,
                batch,
                r.appends,
                aps,
                aps * batch as f64,
                us(lat.pct(0.5)),
                us(lat.pct(0.99)),
                us(lat.pct(1.0)),
            );
        }
    }
    println!();
    println!("8 writers ÷ 1 writer, appends/s (about 1 = the engine serializes durable commits):");
    for b in benches {
        let rate = |row: usize| b.appends[row].appends as f64 / b.appends[row].wall.as_secs_f64();
        println!(
            "  {:<24} batch 1: {:.2}   batch 16: {:.2}   batch 64: {:.2}",
            b.engine.label(),
            rate(1) / rate(0),
            rate(3) / rate(2),
            rate(5) / rate(4)
        );
    }
}

fn print_ops(benches: &[Bench], cpu: f64) {
    println!();
    println!("== other operations, one database after the other (other processes used {cpu:.0} % of one core)");
    println!("{:<24} {:<48} {:>5} {:>9} {:>9} {:>9}", "engine", "operation", "n", "p50", "p99", "max");
    for b in benches.iter().filter(|b| b.engine.is_db()) {
        for (i, o) in b.ops.iter().enumerate() {
            println!(
                "{:<24} {:<48} {:>5} {:>9} {:>9} {:>9}  {}",
                if i == 0 { b.engine.label() } else { "" },
                o.name,
                o.lat.0.len(),
                us(o.lat.pct(0.5)),
                us(o.lat.pct(0.99)),
                us(o.lat.pct(1.0)),
                o.extra
            );
        }
    }
}

fn print_reopen(benches: &[Bench], cpu: &[f64]) {
    println!();
    println!("== reopen and size");
    for (b, cpu) in benches.iter().filter(|b| b.engine.is_db()).zip(cpu) {
        println!("{}  (other processes used {cpu:.0} % of one core)", b.engine.label());
        for (k, v) in &b.reopen {
            println!("  {k:<60} {v}");
        }
    }
}

fn usage() -> ! {
    eprintln!(
        "usage: storage-bench [--appends N] [--engines {}] [--keep]\n\
         \x20 --appends N   appends per append case (default 2000, at least 400; 8-writer cases split them)\n\
         \x20 --engines     comma-separated subset (default: all)\n\
         \x20 --keep        keep the temp directories",
        Engine::ALL.map(|e| e.id()).join(",")
    );
    std::process::exit(2);
}

fn main() -> Res<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("fill") {
        let engine = args.get(1).and_then(|s| Engine::from_id(s)).ok_or("fill: bad engine")?;
        let dir = PathBuf::from(args.get(2).ok_or("fill: no dir")?);
        return fill(engine, &dir);
    }
    let mut appends = 2000;
    let mut engines = Engine::ALL.to_vec();
    let mut keep = false;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--appends" => appends = it.next().and_then(|s| s.parse().ok()).unwrap_or_else(|| usage()),
            "--engines" => {
                engines = it
                    .next()
                    .unwrap_or_else(|| usage())
                    .split(',')
                    .map(|s| Engine::from_id(s).unwrap_or_else(|| usage()))
                    .collect()
            }
            "--keep" => keep = true,
            _ => usage(),
        }
    }
    // Enough entries per group for the range reads, the truncations and the 5000-entry purge.
    if appends < 400 {
        usage();
    }
    if cfg!(debug_assertions) {
        eprintln!("warning: a debug build; run with --release for real figures");
    }
    let started = Instant::now();
    println!(
        "storage-bench: {GROUPS} Raft groups in one database; entries of {ENTRY_BYTES} B under a 12-byte key \
         (group u32, index u64, big-endian);"
    );
    println!(
        "every write durable (fsync) before it returns; {appends} appends per case; temp dirs in {}",
        std::env::temp_dir().display()
    );
    let p = Arc::new(Payloads::new());
    let mut benches = engines.into_iter().map(Bench::new).collect::<Res<Vec<_>>>()?;

    let cpu = phase_appends(&mut benches, &p, appends)?;
    print_appends(&benches, cpu);

    let mut dbs: Vec<Bench> = Vec::new();
    for b in benches {
        if b.engine.is_db() {
            dbs.push(b);
        }
    }
    let cpu = phase_ops(&mut dbs, &p, appends)?;
    print_ops(&dbs, cpu);

    let mut cpus = Vec::new();
    for b in &mut dbs {
        // Close the ops database first, so that only one database is open at a time.
        b.log = Arc::new(Closed);
        cpus.push(phase_reopen(b)?);
    }
    print_reopen(&dbs, &cpus);

    if keep {
        for b in dbs {
            eprintln!("kept {}", b.tmp.keep().display());
        }
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
