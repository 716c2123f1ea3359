//! What the Lightning node writes to disk, made to survive a full disk.
//!
//! LDK treats a failed write of a `ChannelMonitor` as unrecoverable (the `ChainMonitor`
//! panics and poisons its locks), and ldk-node panics when its background processor cannot
//! persist the channel manager, or when its file logger cannot append a line. So:
//!
//! * [`GuardedStore`] is ldk-node's own SQLite store (the same file and table that
//!   `Builder::build` opens, so existing nodes keep their state) whose writes and removals
//!   are retried when they fail, for up to [`GuardedStore::PATIENCE`], asking a
//!   [`MakeRoom`] (the gateway's disk reserve) to free space before each retry. SQLite
//!   rolls a failed transaction back, so a retry is a clean second attempt. Order is
//!   kept per key: a retry is not made once a later write or removal of the same key was
//!   issued (that one wins anyway, as LDK's `KVStore` contract asks).
//! * [`FileLog`] writes ldk-node's log file (same path and format as ldk-node's file
//!   logger) and never panics: a line the disk refuses is counted and dropped, and the
//!   log can be paused while space is short.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ldk_node::io::sqlite_store::{SqliteStore, KV_TABLE_NAME, SQLITE_DB_FILE_NAME};
use ldk_node::lightning::io;
use ldk_node::lightning::util::async_poll::AsyncResult;
use ldk_node::lightning::util::persist::{KVStore, KVStoreSync};
use ldk_node::logger::{LogLevel, LogRecord, LogWriter};

/// Something that can free disk space when a write was refused (the gateway's reserve).
pub trait MakeRoom: Send + Sync {
    /// Free some space if possible; `true` if it did.
    fn make_room(&self) -> bool;
}

/// ldk-node's SQLite store with writes retried (see the module doc).
pub struct GuardedStore {
    inner: SqliteStore,
    room: Option<Arc<dyn MakeRoom>>,
    /// Per key, the number of the latest write or removal issued.
    issued: Mutex<HashMap<String, u64>>,
    /// Writes that needed a retry, and writes given up (for status and tests).
    retried: AtomicU64,
    failed: AtomicU64,
}

fn key_of(p: &str, s: &str, k: &str) -> String {
    format!("{p}\u{0}{s}\u{0}{k}")
}

impl GuardedStore {
    /// How long a refused write is retried before the error goes to LDK.
    pub const PATIENCE: Duration = Duration::from_secs(120);

    /// Open the store under `dir` (ldk-node's storage directory).
    pub fn open(dir: &Path, room: Option<Arc<dyn MakeRoom>>) -> io::Result<Self> {
        let inner = SqliteStore::new(dir.to_path_buf(), Some(SQLITE_DB_FILE_NAME.to_string()), Some(KV_TABLE_NAME.to_string()))?;
        Ok(GuardedStore { inner, room, issued: Mutex::new(HashMap::new()), retried: AtomicU64::new(0), failed: AtomicU64::new(0) })
    }

    /// Writes (and removals) that failed at first and were retried.
    pub fn retried(&self) -> u64 {
        self.retried.load(Ordering::Relaxed)
    }

    /// Run `attempt` while holding the order lock, unless a later write of `key` was issued
    /// since `seq` (then `None`: superseded). The first attempt numbers the write.
    fn under_order<R>(&self, key: &str, seq: Option<u64>, attempt: impl FnOnce() -> R) -> (u64, Option<R>) {
        let mut m = self.issued.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(key.to_string()).or_insert(0);
        let seq = match seq {
            None => {
                *n += 1;
                *n
            }
            Some(s) if s != *n => return (s, None),
            Some(s) => s,
        };
        (seq, Some(attempt()))
    }

    /// After a failure: free space if we can; whether to try again, and how long to wait.
    fn after_failure(&self, what: &str, e: &io::Error, tries: u32, since: Instant) -> Option<Duration> {
        if since.elapsed() > Self::PATIENCE {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!("Lightning store: {what} still fails after {:?} ({e}); giving up", Self::PATIENCE);
            return None;
        }
        if tries == 1 {
            self.retried.fetch_add(1, Ordering::Relaxed);
            tracing::warn!("Lightning store: {what} failed ({e}); freeing space and retrying");
        }
        let freed = self.room.as_ref().is_some_and(|r| r.make_room());
        if freed {
            return Some(Duration::ZERO);
        }
        Some(Duration::from_millis((10u64 << tries.min(7)).min(1000)))
    }

    fn sync_retry(&self, what: &str, key: &str, mut op: impl FnMut() -> io::Result<()>) -> io::Result<()> {
        let since = Instant::now();
        let mut seq = None;
        let mut tries = 0;
        loop {
            let (s, r) = self.under_order(key, seq, &mut op);
            seq = Some(s);
            match r {
                None | Some(Ok(())) => {
                    if tries > 0 {
                        tracing::info!("Lightning store: {what} done after {tries} retries");
                    }
                    return Ok(());
                }
                Some(Err(e)) => {
                    tries += 1;
                    match self.after_failure(what, &e, tries, since) {
                        Some(wait) => std::thread::sleep(wait),
                        None => return Err(e),
                    }
                }
            }
        }
    }
}

impl KVStoreSync for GuardedStore {
    fn read(&self, p: &str, s: &str, k: &str) -> Result<Vec<u8>, io::Error> {
        KVStoreSync::read(&self.inner, p, s, k)
    }

    fn write(&self, p: &str, s: &str, k: &str, buf: Vec<u8>) -> Result<(), io::Error> {
        let what = format!("writing {p}/{s}/{k}");
        self.sync_retry(&what, &key_of(p, s, k), || KVStoreSync::write(&self.inner, p, s, k, buf.clone()))
    }

    fn remove(&self, p: &str, s: &str, k: &str, lazy: bool) -> Result<(), io::Error> {
        let what = format!("removing {p}/{s}/{k}");
        self.sync_retry(&what, &key_of(p, s, k), || KVStoreSync::remove(&self.inner, p, s, k, lazy))
    }

    fn list(&self, p: &str, s: &str) -> Result<Vec<String>, io::Error> {
        KVStoreSync::list(&self.inner, p, s)
    }
}

/// One asynchronous write or removal, retried (the store is shared by `Arc` in ldk-node,
/// but the trait hands out `'static` futures, so the retry loop holds its own handle).
struct AsyncOp {
    store: Arc<GuardedStore>,
    key: String,
    what: String,
    #[allow(clippy::type_complexity)] // one boxed write operation, named once here
    op: Box<dyn Fn(&SqliteStore) -> AsyncResult<'static, (), io::Error> + Send + Sync>,
}

impl AsyncOp {
    async fn run(self, first: AsyncResult<'static, (), io::Error>, seq: u64) -> Result<(), io::Error> {
        let since = Instant::now();
        let mut fut = first;
        let mut tries = 0;
        loop {
            match fut.await {
                Ok(()) => {
                    if tries > 0 {
                        tracing::info!("Lightning store: {} done after {tries} retries", self.what);
                    }
                    return Ok(());
                }
                Err(e) => {
                    tries += 1;
                    let wait = self.store.after_failure(&self.what, &e, tries, since).ok_or(e)?;
                    if !wait.is_zero() {
                        tokio::time::sleep(wait).await;
                    }
                    let (_, next) = self.store.under_order(&self.key, Some(seq), || (self.op)(&self.store.inner));
                    match next {
                        Some(f) => fut = f,
                        None => return Ok(()), // superseded by a later write of the key
                    }
                }
            }
        }
    }
}

/// The asynchronous side needs an owned handle to retry after the caller's borrow ends:
/// ldk-node holds the store in an `Arc`, and [`SharedStore`] is that `Arc`.
pub struct SharedStore(pub Arc<GuardedStore>);

impl SharedStore {
    fn async_op(
        &self,
        key: String,
        what: String,
        op: impl Fn(&SqliteStore) -> AsyncResult<'static, (), io::Error> + Send + Sync + 'static,
    ) -> AsyncResult<'static, (), io::Error> {
        let store = self.0.clone();
        let (seq, first) = store.under_order(&key, None, || op(&store.inner));
        let first = first.expect("a first attempt is never superseded");
        let job = AsyncOp { store, key, what, op: Box::new(op) };
        Box::pin(job.run(first, seq))
    }
}

impl KVStoreSync for SharedStore {
    fn read(&self, p: &str, s: &str, k: &str) -> Result<Vec<u8>, io::Error> {
        KVStoreSync::read(&*self.0, p, s, k)
    }
    fn write(&self, p: &str, s: &str, k: &str, buf: Vec<u8>) -> Result<(), io::Error> {
        KVStoreSync::write(&*self.0, p, s, k, buf)
    }
    fn remove(&self, p: &str, s: &str, k: &str, lazy: bool) -> Result<(), io::Error> {
        KVStoreSync::remove(&*self.0, p, s, k, lazy)
    }
    fn list(&self, p: &str, s: &str) -> Result<Vec<String>, io::Error> {
        KVStoreSync::list(&*self.0, p, s)
    }
}

impl KVStore for SharedStore {
    fn read(&self, p: &str, s: &str, k: &str) -> AsyncResult<'static, Vec<u8>, io::Error> {
        KVStore::read(&self.0.inner, p, s, k)
    }

    fn write(&self, p: &str, s: &str, k: &str, buf: Vec<u8>) -> AsyncResult<'static, (), io::Error> {
        let (pp, ss, kk) = (p.to_string(), s.to_string(), k.to_string());
        self.async_op(key_of(p, s, k), format!("writing {p}/{s}/{k}"), move |st| KVStore::write(st, &pp, &ss, &kk, buf.clone()))
    }

    fn remove(&self, p: &str, s: &str, k: &str, lazy: bool) -> AsyncResult<'static, (), io::Error> {
        let (pp, ss, kk) = (p.to_string(), s.to_string(), k.to_string());
        self.async_op(key_of(p, s, k), format!("removing {p}/{s}/{k}"), move |st| KVStore::remove(st, &pp, &ss, &kk, lazy))
    }

    fn list(&self, p: &str, s: &str) -> AsyncResult<'static, Vec<String>, io::Error> {
        KVStore::list(&self.0.inner, p, s)
    }
}

/// ldk-node's log file, written without ever panicking (see the module doc).
pub struct FileLog {
    path: PathBuf,
    level: LogLevel,
    paused: AtomicBool,
    dropped: AtomicU64,
    file: Mutex<Option<std::fs::File>>,
}

impl FileLog {
    pub fn new(path: impl Into<PathBuf>, level: LogLevel) -> Self {
        FileLog { path: path.into(), level, paused: AtomicBool::new(false), dropped: AtomicU64::new(0), file: Mutex::new(None) }
    }

    /// Stop (or resume) writing: lines logged meanwhile are counted and dropped.
    pub fn pause(&self, paused: bool) {
        let was = self.paused.swap(paused, Ordering::SeqCst);
        if was && !paused {
            let n = self.dropped.load(Ordering::Relaxed);
            if n > 0 {
                self.append(&format!("{} WARN  [bitmote] {n} log lines were dropped while the disk was short of space\n", timestamp()));
            }
        }
    }

    /// Lines not written (paused, or refused by the disk) since the start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    fn append(&self, line: &str) -> bool {
        let mut f = self.file.lock().unwrap_or_else(|p| p.into_inner());
        if f.is_none() {
            *f = std::fs::OpenOptions::new().create(true).append(true).open(&self.path).ok();
        }
        let ok = f.as_mut().is_some_and(|file| file.write_all(line.as_bytes()).is_ok());
        if !ok {
            // Reopen next time (the file may have been removed or rotated).
            *f = None;
        }
        ok
    }
}

impl LogWriter for FileLog {
    fn log<'a>(&self, record: LogRecord<'a>) {
        if record.level < self.level {
            return;
        }
        if self.paused.load(Ordering::Relaxed) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let line = format!("{} {:<5} [{}:{}] {}\n", timestamp(), record.level.to_string(), record.module_path, record.line, record.args);
        if !self.append(&line) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `YYYY-MM-DD HH:MM:SS.mmm` in UTC, as ldk-node's own logger writes it.
fn timestamp() -> String {
    let ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0);
    format_utc_ms(ms)
}

fn format_utc_ms(ms: u64) -> String {
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}.{milli:03}", rem / 3600, rem % 3600 / 60, rem % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_timestamps() {
        assert_eq!(format_utc_ms(0), "1970-01-01 00:00:00.000");
        // 2024-02-29 12:34:56.789 UTC
        assert_eq!(format_utc_ms(1_709_210_096_789), "2024-02-29 12:34:56.789");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29 00:00:00.000");
    }

    #[test]
    fn a_log_that_cannot_be_written_does_not_panic() {
        let log = FileLog::new("/nonexistent-dir/ldk_node.log", LogLevel::Info);
        assert!(!log.append("x\n"));
        log.pause(true);
        log.pause(false);
    }

    /// Writes go through, are ordered per key, and removals too.
    #[test]
    fn store_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = GuardedStore::open(dir.path(), None).unwrap();
        KVStoreSync::write(&s, "a", "", "k", vec![1]).unwrap();
        KVStoreSync::write(&s, "a", "", "k", vec![2]).unwrap();
        assert_eq!(KVStoreSync::read(&s, "a", "", "k").unwrap(), vec![2]);
        assert_eq!(KVStoreSync::list(&s, "a", "").unwrap(), vec!["k".to_string()]);
        KVStoreSync::remove(&s, "a", "", "k", false).unwrap();
        assert!(KVStoreSync::read(&s, "a", "", "k").is_err());
        assert_eq!(s.retried(), 0);
    }
}
