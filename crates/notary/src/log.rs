//! The append-only RFC 9162 Merkle log, stored in SQLite.
//!
//! Every complete, aligned subtree (level `k`, index `i`, covering leaves
//! `[i·2^k, (i+1)·2^k)`) has its hash in `nodes`, written as leaves are appended
//! (each append writes the leaf and the subtrees it completes: amortised 2 rows).
//! Any root, inclusion proof or consistency proof, for the current or any earlier
//! tree size, decomposes into O(log n) such subtrees, so nothing ever scans the log:
//! proofs cost the same at a billion leaves as at a thousand.

use std::cell::Cell;

use bitmote_device::merkle::{self, node_hash, split_point, Hash};
use rusqlite::{params, Connection, OptionalExtension};

/// Errors of the log.
#[derive(Debug, thiserror::Error)]
pub enum LogError {
    #[error("leaf index {index} is not in a tree of size {size}")]
    IndexOutOfRange { index: u64, size: u64 },
    #[error("tree size {size} is larger than the log ({log_size})")]
    SizeOutOfRange { size: u64, log_size: u64 },
    #[error("no consistency proof from tree size {old} to {new}")]
    BadSizes { old: u64, new: u64 },
    #[error("log storage: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("log storage is inconsistent: missing subtree ({level}, {index})")]
    Missing { level: u32, index: u64 },
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

pub(crate) const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS log_nodes (
    level INTEGER NOT NULL,
    idx INTEGER NOT NULL,
    hash BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS log_meta (
    k TEXT PRIMARY KEY,
    v INTEGER NOT NULL
);
INSERT OR IGNORE INTO log_meta (k, v) VALUES ('size', 0);
";

/// Read and append operations on the log tables of a connection (or transaction).
pub struct MerkleLog<'c> {
    conn: &'c Connection,
    reads: Cell<u64>,
}

impl<'c> MerkleLog<'c> {
    /// The log in `conn` (whose schema [`crate::registry::open_db`] created).
    pub fn new(conn: &'c Connection) -> Self {
        MerkleLog { conn, reads: Cell::new(0) }
    }

    /// Subtree rows read so far (to show proofs touch O(log n) rows).
    pub fn rows_read(&self) -> u64 {
        self.reads.get()
    }

    pub fn size(&self) -> Result<u64> {
        Ok(self.conn.query_row("SELECT v FROM log_meta WHERE k = 'size'", [], |r| r.get(0))?)
    }

    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        self.reads.set(self.reads.get() + 1);
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT hash FROM log_nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(params![level, index as i64], |r| r.get(0))
            .optional()?;
        h.and_then(|v| v.try_into().ok()).ok_or(LogError::Missing { level, index })
    }

    /// Append leaf hashes (already `leaf_hash`ed) at the end; returns the first index.
    /// Run it inside the caller's transaction so readings and log commit together.
    pub fn append(&self, leaf_hashes: &[Hash]) -> Result<u64> {
        let first = self.size()?;
        let mut ins = self.conn.prepare_cached("INSERT INTO log_nodes (level, idx, hash) VALUES (?1, ?2, ?3)")?;
        // The right edge of the tree: for each set bit of the size, the perfect subtree
        // it stands for (read once, O(log n)); new parents are computed in memory.
        let mut edge: Vec<(u32, Hash)> = vec![];
        for level in (0..64u32).rev() {
            if first >> level & 1 == 1 {
                edge.push((level, self.node(level, (first >> level) - 1)?));
            }
        }
        for (i, leaf) in leaf_hashes.iter().enumerate() {
            let (mut level, mut idx, mut h) = (0u32, first + i as u64, *leaf);
            ins.execute(params![level, idx as i64, &h[..]])?;
            // Each odd index completes its parent with the subtree to its left.
            while idx % 2 == 1 {
                let (l, left) = edge.pop().ok_or(LogError::Missing { level, index: idx - 1 })?;
                debug_assert_eq!(l, level);
                h = node_hash(&left, &h);
                level += 1;
                idx /= 2;
                ins.execute(params![level, idx as i64, &h[..]])?;
            }
            edge.push((level, h));
        }
        self.conn.execute(
            "UPDATE log_meta SET v = ?1 WHERE k = 'size'",
            [(first + leaf_hashes.len() as u64) as i64],
        )?;
        Ok(first)
    }

    /// Leaf hash at `index`.
    pub fn leaf_hash(&self, index: u64) -> Result<Hash> {
        let size = self.size()?;
        if index >= size {
            return Err(LogError::IndexOutOfRange { index, size });
        }
        self.node(0, index)
    }

    /// MTH of leaves `[start, end)`; every perfect part is an aligned stored subtree.
    fn range_root(&self, start: u64, end: u64) -> Result<Hash> {
        let n = end - start;
        if n == 0 {
            return Ok(merkle::empty_root());
        }
        if n.is_power_of_two() && start % n == 0 {
            return self.node(n.trailing_zeros(), start / n);
        }
        let k = split_point(n);
        Ok(node_hash(&self.range_root(start, start + k)?, &self.range_root(start + k, end)?))
    }

    fn check_size(&self, size: u64) -> Result<()> {
        let log_size = self.size()?;
        if size > log_size {
            return Err(LogError::SizeOutOfRange { size, log_size });
        }
        Ok(())
    }

    /// Root of the tree of the first `size` leaves.
    pub fn root_at(&self, size: u64) -> Result<Hash> {
        self.check_size(size)?;
        self.range_root(0, size)
    }

    /// Inclusion proof of leaf `index` in the tree of size `size`.
    pub fn inclusion_proof(&self, index: u64, size: u64) -> Result<Vec<Hash>> {
        self.check_size(size)?;
        if index >= size {
            return Err(LogError::IndexOutOfRange { index, size });
        }
        let mut out = vec![];
        self.path(index, 0, size, &mut out)?;
        Ok(out)
    }

    fn path(&self, m: u64, start: u64, end: u64, out: &mut Vec<Hash>) -> Result<()> {
        let n = end - start;
        if n <= 1 {
            return Ok(());
        }
        let k = split_point(n);
        if m < k {
            self.path(m, start, start + k, out)?;
            out.push(self.range_root(start + k, end)?);
        } else {
            self.path(m - k, start + k, end, out)?;
            out.push(self.range_root(start, start + k)?);
        }
        Ok(())
    }

    /// Consistency proof between tree sizes `old` and `new`.
    pub fn consistency_proof(&self, old: u64, new: u64) -> Result<Vec<Hash>> {
        self.check_size(new)?;
        if old == 0 || old > new {
            return Err(LogError::BadSizes { old, new });
        }
        let mut out = vec![];
        self.subproof(old, 0, new, true, &mut out)?;
        Ok(out)
    }

    fn subproof(&self, m: u64, start: u64, end: u64, complete: bool, out: &mut Vec<Hash>) -> Result<()> {
        let n = end - start;
        if m == n {
            if !complete {
                out.push(self.range_root(start, end)?);
            }
            return Ok(());
        }
        let k = split_point(n);
        if m <= k {
            self.subproof(m, start, start + k, complete, out)?;
            out.push(self.range_root(start + k, end)?);
        } else {
            self.subproof(m - k, start + k, end, false, out)?;
            out.push(self.range_root(start, start + k)?);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bitmote_device::merkle::{leaf_hash, verify_consistency, verify_inclusion};

    fn db() -> Connection {
        let c = Connection::open_in_memory().unwrap();
        c.execute_batch(SCHEMA).unwrap();
        c
    }

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&(i as u64).to_be_bytes())).collect()
    }

    #[test]
    fn matches_the_reference_for_every_size_index_and_old_size() {
        let c = db();
        let log = MerkleLog::new(&c);
        let all = leaves(100);
        // Appends in uneven chunks.
        let mut at = 0;
        for chunk in [1usize, 2, 3, 10, 17, 30, 37] {
            assert_eq!(log.append(&all[at..at + chunk]).unwrap(), at as u64);
            at += chunk;
        }
        assert_eq!(log.size().unwrap(), 100);
        for size in 1..=100u64 {
            let l = &all[..size as usize];
            let root = merkle::root(l);
            assert_eq!(log.root_at(size).unwrap(), root);
            for i in 0..size {
                let p = log.inclusion_proof(i, size).unwrap();
                assert_eq!(p, merkle::inclusion_proof(l, i).unwrap());
                verify_inclusion(i, size, &l[i as usize], &p, &root).unwrap();
            }
            for old in 1..=size {
                let p = log.consistency_proof(old, size).unwrap();
                assert_eq!(p, merkle::consistency_proof(l, old).unwrap());
                verify_consistency(old, size, &merkle::root(&all[..old as usize]), &root, &p).unwrap();
            }
        }
        assert!(matches!(log.inclusion_proof(100, 100), Err(LogError::IndexOutOfRange { .. })));
        assert!(matches!(log.root_at(101), Err(LogError::SizeOutOfRange { .. })));
        assert!(matches!(log.consistency_proof(0, 5), Err(LogError::BadSizes { .. })));
        assert!(matches!(log.consistency_proof(6, 5), Err(LogError::BadSizes { .. })));
        assert_eq!(log.root_at(0).unwrap(), merkle::empty_root());
    }

    #[test]
    fn proofs_in_a_large_log_read_only_logarithmically_many_rows() {
        let c = db();
        let log = MerkleLog::new(&c);
        let n = 1_000_003u64;
        let tx = c.unchecked_transaction().unwrap();
        let mut f = merkle::MerkleFrontier::new();
        let mut batch = Vec::with_capacity(10_000);
        for i in 0..n {
            let h = leaf_hash(&i.to_be_bytes());
            f.push(h);
            batch.push(h);
            if batch.len() == 10_000 {
                log.append(&batch).unwrap();
                batch.clear();
            }
        }
        log.append(&batch).unwrap();
        tx.commit().unwrap();
        assert_eq!(log.root_at(n).unwrap(), f.root());
        let before = log.rows_read();
        let index = 777_777;
        let p = log.inclusion_proof(index, n).unwrap();
        let read = log.rows_read() - before;
        verify_inclusion(index, n, &leaf_hash(&index.to_be_bytes()), &p, &f.root()).unwrap();
        // log2(1e6) = 20: a proof touches a few dozen rows, not a million.
        assert!(read <= 2 * 20 * 2, "{read} rows read for one proof");
        let before = log.rows_read();
        log.consistency_proof(500_000, n).unwrap();
        assert!(log.rows_read() - before <= 80);
    }
}
