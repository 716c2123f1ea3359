//! The gateway's guard against a full disk.
//!
//! Another process can fill the file system of the gateway's data directory at any
//! moment; what must not happen then is an acknowledgement of something the gateway
//! cannot keep, or a refused write of the Lightning node's state (LDK stops for good on
//! one). So the gateway keeps a **reserve**: a few files of real, allocated blocks under
//! `<data>/disk-reserve/` (32 MiB in 4 pieces by default), made at start. A thread looks
//! at the free space (`statvfs`) every 100 ms:
//!
//! * below `min_free` (32 MiB by default), or while any piece of the reserve is given
//!   back, ingest refuses new readings (HTTP 507, MQTT error `disk_full`) and the Lightning
//!   node's log file is paused; readings already acknowledged are untouched;
//! * below a quarter of a piece (2 MiB by default) a piece of the reserve is deleted, so
//!   the SQLite commits in flight and the Lightning node's writes find room. The Lightning
//!   node's store also asks for a piece directly ([`MakeRoom`]) when a write of it is
//!   refused, and retries: a filler that took the space in between cannot make it fail;
//! * when the free space is back above `min_free` plus a piece, the pieces are made again,
//!   one per look, and once the reserve is whole and `min_free` is free, ingest accepts
//!   again. No restart is needed.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use bitmote_pay::ldk_store::{FileLog, MakeRoom};

/// Pieces of the reserve.
const PIECES: u64 = 4;

/// How the gateway guards its disk.
#[derive(Clone, Debug)]
pub struct DiskConfig {
    /// Size of the reserve (0 = none). Default 32 MiB.
    pub reserve_bytes: u64,
    /// Free space below which ingest refuses new readings. Default 32 MiB.
    pub min_free_bytes: u64,
    /// How often the free space is looked at. Default 100 ms.
    pub poll: Duration,
}

impl Default for DiskConfig {
    fn default() -> Self {
        DiskConfig { reserve_bytes: 32 << 20, min_free_bytes: 32 << 20, poll: Duration::from_millis(100) }
    }
}

/// What the guard last saw (`GET /v1/status` → `disk`).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct DiskStatus {
    /// `ok`, `low` (ingest refused, reserve whole) or `reserve` (ingest refused, part of
    /// the reserve given back to the file system).
    pub state: &'static str,
    pub free_bytes: u64,
    pub reserve_bytes: u64,
    pub reserve_held_bytes: u64,
    pub min_free_bytes: u64,
    /// Pieces of the reserve given back since the start.
    pub releases: u64,
}

/// The guard of one data directory.
pub struct DiskGuard {
    dir: PathBuf,
    reserve_dir: PathBuf,
    cfg: DiskConfig,
    /// Set while ingest must refuse.
    refusing: AtomicBool,
    status: Mutex<DiskStatus>,
    /// Serialises releases and re-creations of pieces.
    pieces: Mutex<()>,
    log: Mutex<Option<Arc<FileLog>>>,
    stop: AtomicBool,
}

/// Free bytes for unprivileged writers of the file system holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
    // SAFETY: statvfs is plain old data, for which all zeroes is a valid value.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized, writable struct.
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

impl DiskGuard {
    /// The guard of `dir`, with its reserve made (as much of it as fits).
    pub fn new(dir: &Path, cfg: DiskConfig) -> Arc<DiskGuard> {
        let g = Arc::new(DiskGuard {
            dir: dir.to_path_buf(),
            reserve_dir: dir.join("disk-reserve"),
            cfg,
            refusing: AtomicBool::new(false),
            status: Mutex::new(DiskStatus { state: "ok", ..Default::default() }),
            pieces: Mutex::new(()),
            log: Mutex::new(None),
            stop: AtomicBool::new(false),
        });
        if g.cfg.reserve_bytes > 0 {
            let _ = fs::create_dir_all(&g.reserve_dir);
            // The whole reserve before the gateway starts (as much as fits), before the
            // first look, so a start with room to spare logs no refusal.
            for i in 0..PIECES {
                let whole = fs::metadata(g.piece(i)).is_ok_and(|m| m.len() == g.piece_size());
                let room = free_bytes(&g.dir).is_ok_and(|f| f >= g.cfg.min_free_bytes + g.piece_size());
                if !whole && room {
                    if let Err(e) = g.make_piece(i) {
                        tracing::debug!("making the disk reserve: {e}");
                    }
                }
            }
        }
        // One piece per look for what did not fit.
        for _ in 0..PIECES.max(1) {
            g.look();
        }
        g
    }

    /// Pause the Lightning node's log while space is short.
    pub fn set_log(&self, log: Arc<FileLog>) {
        *self.log.lock().unwrap_or_else(|p| p.into_inner()) = Some(log);
    }

    fn piece_size(&self) -> u64 {
        self.cfg.reserve_bytes / PIECES
    }

    fn piece(&self, i: u64) -> PathBuf {
        self.reserve_dir.join(format!("piece-{i}"))
    }

    /// Pieces that are whole.
    fn held(&self) -> u64 {
        if self.piece_size() == 0 {
            return 0;
        }
        (0..PIECES).filter(|i| fs::metadata(self.piece(*i)).is_ok_and(|m| m.len() == self.piece_size())).count() as u64
    }

    /// Why ingest refuses now, if it does.
    pub fn refusal(&self) -> Option<String> {
        if !self.refusing.load(Ordering::SeqCst) {
            return None;
        }
        let s = self.status();
        Some(format!(
            "the gateway's disk is full ({} MiB free, {} MiB needed{}); readings already acknowledged are kept; try again when space is freed",
            s.free_bytes >> 20,
            s.min_free_bytes >> 20,
            if s.reserve_held_bytes < s.reserve_bytes { ", the reserve is in use" } else { "" }
        ))
    }

    pub fn status(&self) -> DiskStatus {
        self.status.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Give one piece of the reserve back to the file system; `true` if there was one.
    fn release_one(&self) -> bool {
        let _g = self.pieces.lock().unwrap_or_else(|p| p.into_inner());
        for i in (0..PIECES).rev() {
            let p = self.piece(i);
            if fs::metadata(&p).is_ok() && fs::remove_file(&p).is_ok() {
                self.refusing.store(true, Ordering::SeqCst);
                let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
                s.releases += 1;
                s.state = "reserve";
                s.reserve_held_bytes = s.reserve_held_bytes.saturating_sub(self.piece_size());
                tracing::warn!("disk full: gave {} MiB of the reserve back to the file system so the gateway's writes can complete; ingest refuses until space is freed", self.piece_size() >> 20);
                return true;
            }
        }
        false
    }

    /// Make piece `i` (real blocks: `fallocate`, or written out where that is unsupported).
    fn make_piece(&self, i: u64) -> std::io::Result<()> {
        let _g = self.pieces.lock().unwrap_or_else(|p| p.into_inner());
        let p = self.piece(i);
        let tmp = p.with_extension("new");
        let r = (|| {
            let f = fs::File::create(&tmp)?;
            let size = self.piece_size();
            use std::os::unix::io::AsRawFd;
            // SAFETY: a valid open descriptor and a non-negative range.
            let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, size as libc::off_t) };
            if rc != 0 {
                if rc == libc::ENOSPC {
                    return Err(std::io::Error::from_raw_os_error(rc));
                }
                // Not supported here: write it out (not zeros, which some file systems compress away).
                let mut w = std::io::BufWriter::new(&f);
                let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut block = vec![0u8; 1 << 16];
                let mut left = size;
                while left > 0 {
                    for b in block.chunks_mut(8) {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
                    }
                    let n = left.min(block.len() as u64) as usize;
                    w.write_all(&block[..n])?;
                    left -= n as u64;
                }
                w.flush()?;
            }
            f.sync_all()?;
            fs::rename(&tmp, &p)
        })();
        if r.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        r
    }

    /// One look at the free space: release, re-create, refuse or accept.
    fn look(&self) {
        let free = match free_bytes(&self.dir) {
            Ok(f) => f,
            Err(e) => {
                tracing::debug!("statvfs {}: {e}", self.dir.display());
                return;
            }
        };
        let piece = self.piece_size();
        let mut free = free;
        if piece > 0 && free < (piece / 4).max(1 << 20) && self.release_one() {
            free = free_bytes(&self.dir).unwrap_or(free);
        }
        let mut held = self.held();
        if piece > 0 && held < PIECES && free >= self.cfg.min_free_bytes + piece {
            if let Some(i) = (0..PIECES).find(|i| !fs::metadata(self.piece(*i)).is_ok_and(|m| m.len() == piece)) {
                match self.make_piece(i) {
                    Ok(()) => {
                        held += 1;
                        free = free_bytes(&self.dir).unwrap_or(free.saturating_sub(piece));
                        if held == PIECES {
                            tracing::info!("disk: the {} MiB reserve is whole again", self.cfg.reserve_bytes >> 20);
                        }
                    }
                    Err(e) => tracing::debug!("making the disk reserve: {e}"),
                }
            }
        }
        let low = free < self.cfg.min_free_bytes;
        let refuse = low || held < PIECES && piece > 0;
        let was = self.refusing.swap(refuse, Ordering::SeqCst);
        match (was, refuse) {
            (false, true) if low => tracing::warn!(
                "disk: {} MiB free in {} (under {} MiB): ingest refuses new readings until space is freed",
                free >> 20,
                self.dir.display(),
                self.cfg.min_free_bytes >> 20
            ),
            (false, true) => tracing::warn!(
                "disk: {} MiB of the {} MiB reserve in {} missing: ingest refuses new readings until it can be made again",
                ((PIECES - held) * piece) >> 20,
                self.cfg.reserve_bytes >> 20,
                self.dir.display()
            ),
            (true, false) => tracing::info!("disk: {} MiB free again: ingest accepts readings", free >> 20),
            _ => {}
        }
        if let Some(l) = self.log.lock().unwrap_or_else(|p| p.into_inner()).as_ref() {
            l.pause(refuse);
        }
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.free_bytes = free;
        s.reserve_bytes = piece * PIECES;
        s.reserve_held_bytes = held * piece;
        s.min_free_bytes = self.cfg.min_free_bytes;
        s.state = if held < PIECES && piece > 0 {
            "reserve"
        } else if low {
            "low"
        } else {
            "ok"
        };
    }

    /// Look every `poll` until [`DiskGuard::stop`].
    pub fn start(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let g = self.clone();
        std::thread::Builder::new().name("disk-guard".into()).spawn(move || {
            while !g.stop.load(Ordering::SeqCst) {
                g.look();
                std::thread::sleep(g.cfg.poll);
            }
        })
    }
}

impl DiskGuard {
    /// End the thread of [`DiskGuard::start`] (after its next look).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

impl MakeRoom for DiskGuard {
    fn make_room(&self) -> bool {
        self.release_one()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_space_of_a_directory() {
        let d = tempfile::tempdir().unwrap();
        assert!(free_bytes(d.path()).unwrap() > 0);
        assert!(free_bytes(Path::new("/nonexistent/dir")).is_err());
    }

    /// On a roomy file system the reserve is made whole, ingest accepts, and a release
    /// refuses until the piece is made again.
    #[test]
    fn reserve_is_made_released_and_remade() {
        let d = tempfile::tempdir().unwrap();
        let cfg = DiskConfig { reserve_bytes: 4 << 20, min_free_bytes: 1 << 20, poll: Duration::from_millis(10) };
        if free_bytes(d.path()).unwrap() < 64 << 20 {
            eprintln!("skipped: less than 64 MiB free in the temp dir");
            return;
        }
        let g = DiskGuard::new(d.path(), cfg);
        for _ in 0..PIECES {
            g.look();
        }
        assert_eq!(g.status().reserve_held_bytes, 4 << 20, "{:?}", g.status());
        assert_eq!(g.refusal(), None);
        assert!(g.make_room());
        assert!(g.refusal().unwrap().contains("disk is full"));
        g.look();
        assert_eq!(g.refusal(), None, "{:?}", g.status());
        assert_eq!(g.status().releases, 1);
    }
}
