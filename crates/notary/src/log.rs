//! The append-only RFC 9162 Merkle log, stored in SQLite.
//!
//! A leaf is the 32-byte SHA-256 digest of a reading's encoding; the tree hashes it
//! as `merkle::leaf_hash(leaf)`. Every complete, aligned subtree (level `k`, index
//! `i`, covering leaves `[i·2^k, (i+1)·2^k)`) has its hash in `log_nodes`, written as
//! leaves are appended (each leaf writes itself and the subtrees it completes:
//! amortised 2 rows; parents come from the in-memory right edge, never a read-back).
//! Any root, inclusion proof or consistency proof, for the current or any earlier
//! tree size, decomposes into O(log n) such subtrees, so nothing ever scans the log:
//! a proof costs the same at a billion leaves as at a thousand.
//!
//! [`MerkleLog`] is a view over a connection or transaction (the database, its
//! schema and pragmas belong to [`crate::store`]); an append runs inside a
//! savepoint, so it is atomic on its own and commits together with the caller's
//! transaction when there is one (ingest's group commit).

use std::cell::Cell;

use bitmote_device::merkle::{self, node_hash, split_point, Hash};
use rusqlite::{params, Connection, OptionalExtension, Transaction};

/// Errors of the log. Out-of-range arguments are errors, never panics.
#[derive(Debug, thiserror::Error, PartialEq)]
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
    #[error("log storage is inconsistent: {0}")]
    Corrupt(String),
}

pub type Result<T, E = LogError> = std::result::Result<T, E>;

/// A log leaf: SHA-256 of a reading's canonical encoding.
pub type Leaf = [u8; 32];

/// Largest tree size the log accepts (SQLite integers are signed 64-bit).
const MAX_SIZE: u64 = i64::MAX as u64;

/// Read and append operations on the log tables of a connection (or transaction).
pub struct MerkleLog<'c> {
    conn: &'c Connection,
    reads: Cell<u64>,
}

impl<'c> MerkleLog<'c> {
    /// The log in `conn` (whose schema [`crate::store`] created).
    /// A `&Transaction` works too: it dereferences to its connection.
    pub fn new(conn: &'c Connection) -> Self {
        MerkleLog { conn, reads: Cell::new(0) }
    }

    /// Subtree rows read so far by this view (to show proofs touch O(log n) rows).
    pub fn rows_read(&self) -> u64 {
        self.reads.get()
    }

    /// Number of leaves.
    pub fn size(&self) -> Result<u64> {
        let v: i64 = self.conn.prepare_cached("SELECT v FROM log_meta WHERE k = 'size'")?.query_row([], |r| r.get(0))?;
        u64::try_from(v).map_err(|_| LogError::Corrupt(format!("negative log size {v}")))
    }

    /// Current size and root, read in one snapshot.
    pub fn head(&self) -> Result<(u64, Hash)> {
        let size = self.size()?;
        // Stored subtrees never change, so the root of `size` is the same in any later
        // snapshot: no transaction needed.
        Ok((size, self.range_root(0, size)?))
    }

    /// Root of the current tree.
    pub fn root(&self) -> Result<Hash> {
        Ok(self.head()?.1)
    }

    fn node(&self, level: u32, index: u64) -> Result<Hash> {
        self.reads.set(self.reads.get() + 1);
        let idx = i64::try_from(index).map_err(|_| LogError::Missing { level, index })?;
        let h: Option<Vec<u8>> = self
            .conn
            .prepare_cached("SELECT hash FROM log_nodes WHERE level = ?1 AND idx = ?2")?
            .query_row(params![level, idx], |r| r.get(0))
            .optional()?;
        h.and_then(|v| v.try_into().ok()).ok_or(LogError::Missing { level, index })
    }

    /// Append leaves (SHA-256 digests of reading encodings) at the end; returns the
    /// index of the first. Atomic (a savepoint); inside the caller's transaction it
    /// commits or rolls back with it.
    pub fn append(&self, leaves: &[Leaf]) -> Result<u64> {
        let hashes: Vec<Hash> = leaves.iter().map(|l| merkle::leaf_hash(l)).collect();
        self.append_leaf_hashes(&hashes)
    }

    /// [`append`](Self::append) inside `tx` (the group commit of ingest).
    pub fn append_batch(tx: &Transaction<'_>, leaves: &[Leaf]) -> Result<u64> {
        MerkleLog::new(tx).append(leaves)
    }

    /// Append leaf hashes (already `merkle::leaf_hash`ed); returns the first index.
    pub fn append_leaf_hashes(&self, leaf_hashes: &[Hash]) -> Result<u64> {
        self.conn.execute_batch("SAVEPOINT log_append")?;
        match self.append_inner(leaf_hashes) {
            Ok(first) => {
                self.conn.execute_batch("RELEASE log_append")?;
                Ok(first)
            }
            Err(e) => {
                // Undo the partial append; keep the first error.
                let _ = self.conn.execute_batch("ROLLBACK TO log_append; RELEASE log_append");
                Err(e)
            }
        }
    }

    fn append_inner(&self, leaf_hashes: &[Hash]) -> Result<u64> {
        let first = self.size()?;
        let end = first
            .checked_add(leaf_hashes.len() as u64)
            .filter(|&e| e <= MAX_SIZE)
            .ok_or(LogError::SizeOutOfRange { size: u64::MAX, log_size: first })?;
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
                if l != level {
                    return Err(LogError::Corrupt(format!("right edge has level {l} where {level} was expected")));
                }
                h = node_hash(&left, &h);
                level += 1;
                idx /= 2;
                ins.execute(params![level, idx as i64, &h[..]])?;
            }
            edge.push((level, h));
        }
        self.conn.prepare_cached("UPDATE log_meta SET v = ?1 WHERE k = 'size'")?.execute([end as i64])?;
        Ok(first)
    }

    /// Leaf hash (`merkle::leaf_hash` of the leaf) at `index`. The leaf itself is the
    /// SHA-256 of the stored reading ([`crate::ingest::reading_at`]).
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
        if n.is_power_of_two() && start.is_multiple_of(n) {
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

    /// Root of the tree of the first `size` leaves (any size up to the current one).
    pub fn root_at(&self, size: u64) -> Result<Hash> {
        self.check_size(size)?;
        self.range_root(0, size)
    }

    /// Inclusion proof of leaf `index` in the tree of size `size` (RFC 9162 §2.1.3.1).
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

    /// Consistency proof between tree sizes `old` and `new`, `0 < old <= new`
    /// (RFC 9162 §2.1.4.1; empty when `old == new`).
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

    /// Full integrity check (O(n): for maintenance and tests, never on a request path):
    /// every level holds exactly the subtrees the size implies, and every stored parent
    /// is the hash of its two children.
    pub fn audit(&self) -> Result<()> {
        let size = self.size()?;
        let levels = if size == 0 { 0 } else { 64 - size.leading_zeros() };
        let shape = self
            .conn
            .prepare("SELECT level, COUNT(*), MIN(idx), MAX(idx) FROM log_nodes GROUP BY level ORDER BY level")?
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?, r.get::<_, i64>(3)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let expected: Vec<(i64, i64, i64, i64)> = (0..levels)
            .map(|l| {
                let n = (size >> l) as i64;
                (l as i64, n, 0, n - 1)
            })
            .collect();
        if shape != expected {
            return Err(LogError::Corrupt(format!("stored subtrees (level, count, min, max) {shape:?} do not fit a log of {size} leaves")));
        }
        fn blob(row: Option<&rusqlite::Row<'_>>, level: u32) -> Result<Hash> {
            let row = row.ok_or_else(|| LogError::Corrupt(format!("level {level} ends early")))?;
            let v: Vec<u8> = row.get(0)?;
            v.try_into().map_err(|_| LogError::Corrupt(format!("a hash at level {level} is not 32 bytes")))
        }
        // Each parent against its two children, streaming both levels in index order.
        let mut kids = self.conn.prepare("SELECT hash FROM log_nodes WHERE level = ?1 ORDER BY idx")?;
        let mut pars = self.conn.prepare("SELECT hash FROM log_nodes WHERE level = ?1 ORDER BY idx")?;
        for level in 1..levels {
            let mut k = kids.query([level - 1])?;
            let mut p = pars.query([level])?;
            let mut idx = 0u64;
            while let Some(row) = p.next()? {
                let parent = blob(Some(row), level)?;
                let left = blob(k.next()?, level - 1)?;
                let right = blob(k.next()?, level - 1)?;
                if parent != node_hash(&left, &right) {
                    return Err(LogError::Corrupt(format!("subtree ({level}, {idx}) is not the hash of its children")));
                }
                idx += 1;
            }
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
        crate::store::migrate(&c, &crate::store::NOTARY).unwrap();
        c
    }

    fn leaves(n: usize) -> Vec<Leaf> {
        (0..n).map(|i| bitmote_device::sha256(&(i as u64).to_be_bytes())).collect()
    }

    fn hashes(l: &[Leaf]) -> Vec<Hash> {
        l.iter().map(|x| leaf_hash(x)).collect()
    }

    #[test]
    fn matches_the_reference_for_every_size_index_and_old_size() {
        let c = db();
        let log = MerkleLog::new(&c);
        let all = leaves(100);
        let h = hashes(&all);
        assert_eq!(log.root_at(0).unwrap(), merkle::empty_root());
        assert_eq!(log.head().unwrap(), (0, merkle::empty_root()));
        // Appends in uneven chunks, checking the head after each.
        let mut at = 0;
        for chunk in [1usize, 2, 3, 10, 17, 30, 37] {
            assert_eq!(log.append(&all[at..at + chunk]).unwrap(), at as u64);
            at += chunk;
            assert_eq!(log.head().unwrap(), (at as u64, merkle::root(&h[..at])));
        }
        assert_eq!(log.size().unwrap(), 100);
        log.audit().unwrap();
        for size in 1..=100u64 {
            let l = &h[..size as usize];
            let root = merkle::root(l);
            assert_eq!(log.root_at(size).unwrap(), root);
            for i in 0..size {
                let p = log.inclusion_proof(i, size).unwrap();
                assert_eq!(p, merkle::inclusion_proof(l, i).unwrap());
                verify_inclusion(i, size, &l[i as usize], &p, &root).unwrap();
                assert_eq!(merkle::root_from_inclusion_proof(i, size, &log.leaf_hash(i).unwrap(), &p).unwrap(), root);
            }
            for old in 1..=size {
                let p = log.consistency_proof(old, size).unwrap();
                assert_eq!(p, merkle::consistency_proof(l, old).unwrap());
                verify_consistency(old, size, &merkle::root(&h[..old as usize]), &root, &p).unwrap();
            }
        }
    }

    #[test]
    fn out_of_range_arguments_are_errors() {
        let c = db();
        let log = MerkleLog::new(&c);
        assert!(matches!(log.inclusion_proof(0, 0), Err(LogError::IndexOutOfRange { .. })));
        assert!(matches!(log.leaf_hash(0), Err(LogError::IndexOutOfRange { index: 0, size: 0 })));
        log.append(&leaves(5)).unwrap();
        assert!(matches!(log.inclusion_proof(5, 5), Err(LogError::IndexOutOfRange { .. })));
        assert!(matches!(log.inclusion_proof(u64::MAX, 5), Err(LogError::IndexOutOfRange { .. })));
        assert!(matches!(log.inclusion_proof(0, 6), Err(LogError::SizeOutOfRange { size: 6, log_size: 5 })));
        assert!(matches!(log.root_at(6), Err(LogError::SizeOutOfRange { .. })));
        assert!(matches!(log.root_at(u64::MAX), Err(LogError::SizeOutOfRange { .. })));
        assert!(matches!(log.consistency_proof(0, 5), Err(LogError::BadSizes { .. })));
        assert!(matches!(log.consistency_proof(4, 3), Err(LogError::BadSizes { .. })));
        assert!(matches!(log.consistency_proof(1, 6), Err(LogError::SizeOutOfRange { .. })));
        assert!(matches!(log.leaf_hash(5), Err(LogError::IndexOutOfRange { .. })));
        assert_eq!(log.consistency_proof(5, 5).unwrap(), Vec::<Hash>::new());
        assert_eq!(log.append(&[]).unwrap(), 5);
        assert_eq!(log.size().unwrap(), 5);
    }

    #[test]
    fn a_failed_append_leaves_the_log_as_it_was() {
        let c = db();
        let log = MerkleLog::new(&c);
        log.append(&leaves(3)).unwrap();
        let before = log.head().unwrap();
        // A stray row where the 5th leaf goes makes the next append fail midway.
        c.execute("INSERT INTO log_nodes (level, idx, hash) VALUES (0, 4, x'00')", []).unwrap();
        assert!(matches!(log.append(&leaves(4)), Err(LogError::Db(_))));
        c.execute("DELETE FROM log_nodes WHERE level = 0 AND idx = 4", []).unwrap();
        assert_eq!(log.head().unwrap(), before);
        log.audit().unwrap();
        // And it goes on normally.
        let all: Vec<Leaf> = leaves(3).into_iter().chain(leaves(4)).collect();
        assert_eq!(log.append(&leaves(4)).unwrap(), 3);
        assert_eq!(log.root().unwrap(), merkle::root(&hashes(&all)));
    }

    #[test]
    fn append_batch_commits_and_rolls_back_with_the_callers_transaction() {
        let mut c = db();
        let tx = c.transaction().unwrap();
        assert_eq!(MerkleLog::append_batch(&tx, &leaves(7)).unwrap(), 0);
        drop(tx); // rolled back
        assert_eq!(MerkleLog::new(&c).size().unwrap(), 0);
        let tx = c.transaction().unwrap();
        MerkleLog::append_batch(&tx, &leaves(7)).unwrap();
        tx.commit().unwrap();
        let log = MerkleLog::new(&c);
        assert_eq!(log.head().unwrap(), (7, merkle::root(&hashes(&leaves(7)))));
        log.audit().unwrap();
    }

    #[test]
    fn the_log_survives_close_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.sqlite");
        let all = leaves(77);
        {
            let c = crate::registry::open_db(&path).unwrap();
            let log = MerkleLog::new(&c);
            log.append(&all[..40]).unwrap();
            log.append(&all[40..]).unwrap();
        }
        let c = crate::registry::open_db(&path).unwrap();
        let log = MerkleLog::new(&c);
        let h = hashes(&all);
        assert_eq!(log.head().unwrap(), (77, merkle::root(&h)));
        for size in [1u64, 40, 64, 77] {
            assert_eq!(log.root_at(size).unwrap(), merkle::root(&h[..size as usize]));
            assert_eq!(log.inclusion_proof(size - 1, size).unwrap(), merkle::inclusion_proof(&h[..size as usize], size - 1).unwrap());
        }
        log.audit().unwrap();
        // Appending after the reopen continues the same tree.
        log.append(&leaves(3)).unwrap();
        let h2: Vec<Hash> = h.iter().copied().chain(hashes(&leaves(3))).collect();
        assert_eq!(log.root().unwrap(), merkle::root(&h2));
    }

    #[test]
    fn audit_finds_a_corrupted_subtree() {
        let c = db();
        let log = MerkleLog::new(&c);
        log.append(&leaves(13)).unwrap();
        log.audit().unwrap();
        c.execute("UPDATE log_nodes SET hash = zeroblob(32) WHERE level = 2 AND idx = 1", []).unwrap();
        assert!(matches!(log.audit(), Err(LogError::Corrupt(_))));
        // (The root of 13 leaves is made of subtrees (3, 0), (2, 2) and (0, 12).)
        c.execute("DELETE FROM log_nodes WHERE level = 2 AND idx = 2", []).unwrap();
        assert!(matches!(log.audit(), Err(LogError::Corrupt(_))));
        assert!(matches!(log.root(), Err(LogError::Missing { level: 2, index: 2 })));
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
                log.append_leaf_hashes(&batch).unwrap();
                batch.clear();
            }
        }
        log.append_leaf_hashes(&batch).unwrap();
        tx.commit().unwrap();
        assert_eq!(log.root_at(n).unwrap(), f.root());
        // log2(1e6) = 20: a proof touches a few dozen rows, not a million.
        for index in [0u64, 777_777, 999_999, n - 1] {
            let before = log.rows_read();
            let p = log.inclusion_proof(index, n).unwrap();
            let read = log.rows_read() - before;
            verify_inclusion(index, n, &leaf_hash(&index.to_be_bytes()), &p, &f.root()).unwrap();
            assert!(read <= 2 * 20, "{read} rows read for the proof of {index}");
        }
        // A historical size too.
        let old = 500_001u64;
        let before = log.rows_read();
        let old_root = log.root_at(old).unwrap();
        let p = log.consistency_proof(old, n).unwrap();
        assert!(log.rows_read() - before <= 3 * 20, "{} rows", log.rows_read() - before);
        verify_consistency(old, n, &old_root, &f.root(), &p).unwrap();
        let before = log.rows_read();
        log.inclusion_proof(123_456, old).unwrap();
        assert!(log.rows_read() - before <= 2 * 20);
    }
}
