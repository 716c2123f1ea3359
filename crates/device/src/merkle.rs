//! RFC 9162 (Certificate Transparency 2.0) Merkle trees over SHA-256, shared by the
//! device (batch roots), the gateway's log and every verifier.
//!
//! `leaf_hash(d) = SHA-256(0x00 || d)`, `node_hash(l, r) = SHA-256(0x01 || l || r)`;
//! the root of `n` leaves splits at the largest power of two smaller than `n`.
//! Proof generation here works over an in-memory slice of leaf hashes (devices and
//! tests); the gateway's store computes the same proofs from stored subtrees.

use alloc::vec::Vec;
use core::fmt;
use sha2::{Digest, Sha256};

/// A SHA-256 hash.
pub type Hash = [u8; 32];

/// Why a Merkle computation or verification failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MerkleError {
    /// The leaf index is not below the tree size.
    IndexOutOfRange { index: u64, size: u64 },
    /// Consistency needs `0 < old_size <= new_size`.
    BadSizes { old_size: u64, new_size: u64 },
    /// The proof has the wrong number of hashes for this index and size.
    WrongProofLength { expected: usize, got: usize },
    /// The proof does not lead to the expected root.
    RootMismatch,
}

impl fmt::Display for MerkleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MerkleError::IndexOutOfRange { index, size } => write!(f, "leaf index {index} is not in a tree of size {size}"),
            MerkleError::BadSizes { old_size, new_size } => {
                write!(f, "no consistency proof from tree size {old_size} to {new_size}")
            }
            MerkleError::WrongProofLength { expected, got } => {
                write!(f, "proof has {got} hashes, expected {expected}")
            }
            MerkleError::RootMismatch => write!(f, "proof does not lead to the expected root"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for MerkleError {}

/// `SHA-256(0x00 || data)`.
pub fn leaf_hash(data: &[u8]) -> Hash {
    let mut h = Sha256::new();
    h.update([0u8]);
    h.update(data);
    h.finalize().into()
}

/// `SHA-256(0x01 || left || right)`.
pub fn node_hash(left: &Hash, right: &Hash) -> Hash {
    let mut h = Sha256::new();
    h.update([1u8]);
    h.update(left);
    h.update(right);
    h.finalize().into()
}

/// Root of the empty tree: SHA-256 of the empty string.
pub fn empty_root() -> Hash {
    Sha256::digest([]).into()
}

/// Largest power of two strictly smaller than `n` (`n >= 2`).
pub fn split_point(n: u64) -> u64 {
    debug_assert!(n >= 2);
    1u64 << (63 - (n - 1).leading_zeros())
}

/// RFC 9162 root of a list of leaf hashes.
pub fn root(leaves: &[Hash]) -> Hash {
    match leaves.len() {
        0 => empty_root(),
        1 => leaves[0],
        n => {
            let k = split_point(n as u64) as usize;
            node_hash(&root(&leaves[..k]), &root(&leaves[k..]))
        }
    }
}

/// Inclusion proof (audit path) of leaf `index` in the tree of all `leaves`.
pub fn inclusion_proof(leaves: &[Hash], index: u64) -> Result<Vec<Hash>, MerkleError> {
    let size = leaves.len() as u64;
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let mut out = Vec::new();
    path(leaves, index as usize, &mut out);
    Ok(out)
}

fn path(leaves: &[Hash], m: usize, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if n <= 1 {
        return;
    }
    let k = split_point(n as u64) as usize;
    if m < k {
        path(&leaves[..k], m, out);
        out.push(root(&leaves[k..]));
    } else {
        path(&leaves[k..], m - k, out);
        out.push(root(&leaves[..k]));
    }
}

/// Consistency proof between the first `old_size` leaves and all `leaves` (RFC 9162 §2.1.4).
pub fn consistency_proof(leaves: &[Hash], old_size: u64) -> Result<Vec<Hash>, MerkleError> {
    let new_size = leaves.len() as u64;
    if old_size == 0 || old_size > new_size {
        return Err(MerkleError::BadSizes { old_size, new_size });
    }
    let mut out = Vec::new();
    subproof(old_size as usize, leaves, true, &mut out);
    Ok(out)
}

fn subproof(m: usize, leaves: &[Hash], complete: bool, out: &mut Vec<Hash>) {
    let n = leaves.len();
    if m == n {
        if !complete {
            out.push(root(leaves));
        }
        return;
    }
    let k = split_point(n as u64) as usize;
    if m <= k {
        subproof(m, &leaves[..k], complete, out);
        out.push(root(&leaves[k..]));
    } else {
        subproof(m - k, &leaves[k..], false, out);
        out.push(root(&leaves[..k]));
    }
}

/// Number of hashes in the inclusion proof of `index` in a tree of `size`.
pub fn inclusion_proof_len(index: u64, size: u64) -> usize {
    if index >= size {
        return 0;
    }
    // The RFC 9162 §2.1.3.2 verification loop, counting the hashes it consumes.
    let (mut fnode, mut snode, mut len) = (index, size - 1, 0usize);
    while snode > 0 {
        if fnode % 2 == 0 && fnode == snode {
            while fnode % 2 == 0 && fnode != 0 {
                fnode >>= 1;
                snode >>= 1;
            }
        }
        len += 1;
        fnode >>= 1;
        snode >>= 1;
    }
    len
}

/// For each hash of an inclusion proof, whether the sibling is on the left
/// (`true`: the running hash becomes `node_hash(sibling, running)`), following the
/// verification algorithm of RFC 9162 §2.1.3.2. Errors if `proof_len` is wrong.
pub fn inclusion_sides(index: u64, size: u64, proof_len: usize) -> Result<Vec<bool>, MerkleError> {
    if index >= size {
        return Err(MerkleError::IndexOutOfRange { index, size });
    }
    let (mut fnode, mut snode) = (index, size - 1);
    let mut sides = Vec::with_capacity(proof_len);
    for _ in 0..proof_len {
        if snode == 0 {
            return Err(MerkleError::WrongProofLength { expected: sides.len(), got: proof_len });
        }
        if fnode % 2 == 1 || fnode == snode {
            sides.push(true);
            if fnode % 2 == 0 {
                while fnode % 2 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sides.push(false);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(MerkleError::WrongProofLength { expected: inclusion_proof_len(index, size), got: proof_len });
    }
    Ok(sides)
}

/// Root implied by an inclusion proof (RFC 9162 §2.1.3.2).
pub fn root_from_inclusion_proof(index: u64, size: u64, leaf: &Hash, proof: &[Hash]) -> Result<Hash, MerkleError> {
    let sides = inclusion_sides(index, size, proof.len())?;
    let mut r = *leaf;
    for (p, left) in proof.iter().zip(sides) {
        r = if left { node_hash(p, &r) } else { node_hash(&r, p) };
    }
    Ok(r)
}

/// Check that `leaf` (a leaf hash) is at `index` in the tree of `size` with `root`.
pub fn verify_inclusion(index: u64, size: u64, leaf: &Hash, proof: &[Hash], root: &Hash) -> Result<(), MerkleError> {
    if root_from_inclusion_proof(index, size, leaf, proof)? == *root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch)
    }
}

/// Check a consistency proof from (`old_size`, `old_root`) to (`new_size`, `new_root`) (RFC 9162 §2.1.4.2).
pub fn verify_consistency(
    old_size: u64,
    new_size: u64,
    old_root: &Hash,
    new_root: &Hash,
    proof: &[Hash],
) -> Result<(), MerkleError> {
    if old_size == 0 || old_size > new_size {
        return Err(MerkleError::BadSizes { old_size, new_size });
    }
    if old_size == new_size {
        return if proof.is_empty() && old_root == new_root {
            Ok(())
        } else if !proof.is_empty() {
            Err(MerkleError::WrongProofLength { expected: 0, got: proof.len() })
        } else {
            Err(MerkleError::RootMismatch)
        };
    }
    // If old_size is a power of two, the old root is the first node of the path.
    let mut path: Vec<Hash> = Vec::with_capacity(proof.len() + 1);
    if old_size.is_power_of_two() {
        path.push(*old_root);
    }
    path.extend_from_slice(proof);
    let Some((first, rest)) = path.split_first() else {
        return Err(MerkleError::WrongProofLength { expected: 1, got: 0 });
    };
    let (mut fnode, mut snode) = (old_size - 1, new_size - 1);
    while fnode % 2 == 1 {
        fnode >>= 1;
        snode >>= 1;
    }
    let (mut fr, mut sr) = (*first, *first);
    for c in rest {
        if snode == 0 {
            return Err(MerkleError::WrongProofLength { expected: path.len() - 1, got: proof.len() });
        }
        if fnode % 2 == 1 || fnode == snode {
            fr = node_hash(c, &fr);
            sr = node_hash(c, &sr);
            if fnode % 2 == 0 {
                while fnode % 2 == 0 && fnode != 0 {
                    fnode >>= 1;
                    snode >>= 1;
                }
            }
        } else {
            sr = node_hash(&sr, c);
        }
        fnode >>= 1;
        snode >>= 1;
    }
    if snode != 0 {
        return Err(MerkleError::WrongProofLength { expected: proof.len() + 1, got: proof.len() });
    }
    if fr == *old_root && sr == *new_root {
        Ok(())
    } else {
        Err(MerkleError::RootMismatch)
    }
}

/// Root of a growing tree in O(log n) memory: the hashes of its perfect subtrees
/// ("compact range" from the left edge).
#[derive(Clone, Debug, Default)]
pub struct MerkleFrontier {
    size: u64,
    /// Perfect subtree roots, largest first; their sizes are the set bits of `size`.
    stack: Vec<Hash>,
}

impl MerkleFrontier {
    pub fn new() -> Self {
        Self::default()
    }

    /// Append a leaf hash.
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        while s & 1 == 1 {
            // The last stack entry is a perfect subtree of the same height: merge.
            let left = self.stack.pop().expect("a set bit has a subtree");
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.stack.push(h);
        self.size += 1;
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    /// The perfect subtree roots, largest (leftmost) first.
    pub fn subtrees(&self) -> &[Hash] {
        &self.stack
    }

    /// RFC 9162 root of all leaves pushed so far.
    pub fn root(&self) -> Hash {
        let mut it = self.stack.iter().rev();
        let Some(last) = it.next() else { return empty_root() };
        it.fold(*last, |acc, left| node_hash(left, &acc))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn leaves(n: usize) -> Vec<Hash> {
        (0..n).map(|i| leaf_hash(&(i as u32).to_be_bytes())).collect()
    }

    /// RFC 9162 MTH written as literally as possible, as the reference.
    fn mth(d: &[Hash]) -> Hash {
        if d.is_empty() {
            return empty_root();
        }
        if d.len() == 1 {
            return d[0];
        }
        let mut k = 1;
        while k * 2 < d.len() {
            k *= 2;
        }
        node_hash(&mth(&d[..k]), &mth(&d[k..]))
    }

    #[test]
    fn known_answers() {
        // SHA-256("") and the RFC 6962 test leaf hash of the empty leaf.
        assert_eq!(empty_root()[..4], [0xe3, 0xb0, 0xc4, 0x42]);
        assert_eq!(leaf_hash(&[])[..4], [0x6e, 0x34, 0x0b, 0x9c]);
    }

    #[test]
    fn roots_proofs_and_frontier_agree_with_the_reference_for_all_small_trees() {
        for n in 1..=70usize {
            let l = leaves(n);
            let r = mth(&l);
            assert_eq!(root(&l), r, "root of {n}");
            let mut f = MerkleFrontier::new();
            for x in &l {
                f.push(*x);
            }
            assert_eq!(f.root(), r, "frontier of {n}");
            assert_eq!(f.subtrees().len(), (n as u64).count_ones() as usize);
            for i in 0..n as u64 {
                let p = inclusion_proof(&l, i).unwrap();
                assert_eq!(p.len(), inclusion_proof_len(i, n as u64), "len {i}/{n}");
                verify_inclusion(i, n as u64, &l[i as usize], &p, &r).unwrap();
                // Wrong index, wrong leaf, tampered hash, truncated or extended proof all fail.
                if n > 1 {
                    let j = (i + 1) % n as u64;
                    assert!(verify_inclusion(j, n as u64, &l[i as usize], &p, &r).is_err());
                    assert!(verify_inclusion(i, n as u64, &l[j as usize], &p, &r).is_err());
                    let mut t = p.clone();
                    t[0][0] ^= 1;
                    assert!(verify_inclusion(i, n as u64, &l[i as usize], &t, &r).is_err());
                    assert!(verify_inclusion(i, n as u64, &l[i as usize], &p[..p.len() - 1], &r).is_err());
                }
                let mut longer = p.clone();
                longer.push([0; 32]);
                assert!(verify_inclusion(i, n as u64, &l[i as usize], &longer, &r).is_err());
            }
            assert!(inclusion_proof(&l, n as u64).is_err());
            assert!(verify_inclusion(n as u64, n as u64, &l[0], &[], &r).is_err());
            for m in 1..=n as u64 {
                let p = consistency_proof(&l, m).unwrap();
                let old = mth(&l[..m as usize]);
                verify_consistency(m, n as u64, &old, &r, &p).unwrap();
                if m < n as u64 {
                    let mut t = p.clone();
                    let last = t.len() - 1;
                    t[last][31] ^= 1;
                    assert!(verify_consistency(m, n as u64, &old, &r, &t).is_err());
                    assert!(verify_consistency(m, n as u64, &r, &r, &p).is_err());
                    assert!(verify_consistency(m, n as u64, &old, &r, &p[..p.len() - 1]).is_err());
                }
            }
            assert!(consistency_proof(&l, 0).is_err());
            assert!(verify_consistency(0, n as u64, &r, &r, &[]).is_err());
            assert!(verify_consistency(n as u64 + 1, n as u64, &r, &r, &[]).is_err());
        }
    }

    #[test]
    fn garbage_never_panics() {
        let junk = vec![[7u8; 32]; 70];
        for size in [0u64, 1, 2, 3, 1 << 40, u64::MAX] {
            for index in [0u64, 1, size.saturating_sub(1), size, u64::MAX] {
                for len in [0usize, 1, 5, 64, 70] {
                    let _ = verify_inclusion(index, size, &junk[0], &junk[..len], &junk[1]);
                    let _ = verify_consistency(index, size, &junk[0], &junk[1], &junk[..len]);
                }
            }
        }
    }
}
