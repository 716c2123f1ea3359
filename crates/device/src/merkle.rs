//! RFC 9162 (Certificate Transparency 2.0) Merkle trees over SHA-256, shared by the
//! device (batch roots), the gateway's log and every verifier.
//!
//! `leaf_hash(d) = SHA-256(0x00 || d)`, `node_hash(l, r) = SHA-256(0x01 || l || r)`;
//! the root of `n` leaves splits at the largest power of two smaller than `n`.
//! Proof generation here works over an in-memory slice of leaf hashes (devices and
//! tests); the gateway's store computes the same proofs from stored subtrees.
//! [`MerkleFrontier`] computes the same root in O(log n) memory without the leaves.
//!
//! The verifiers follow RFC 9162 §2.1.3.2 (inclusion) and §2.1.4.2 (consistency)
//! step by step and return an error, never panic, on any input. As in the RFC, a
//! proof authenticates a leaf against a (size, root) pair: the size is only as
//! trustworthy as whatever signed the root with it (a checkpoint, a batch signature
//! that covers the count), since some proofs are valid for more than one size when
//! paired with a root that is not that size's.

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
    /// A frontier needs one subtree root per set bit of its size.
    BadFrontier { size: u64, subtrees: usize },
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
            MerkleError::BadFrontier { size, subtrees } => {
                write!(f, "a frontier of {size} leaves cannot have {subtrees} subtrees")
            }
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

/// Largest power of two strictly smaller than `n`, where RFC 9162 splits a tree of
/// `n >= 2` leaves; `0` for `n < 2` (such trees do not split).
pub fn split_point(n: u64) -> u64 {
    if n < 2 {
        return 0;
    }
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
pub fn verify_consistency(old_size: u64, new_size: u64, old_root: &Hash, new_root: &Hash, proof: &[Hash]) -> Result<(), MerkleError> {
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

    /// Resume a frontier from its size and perfect subtree roots (largest first),
    /// e.g. as persisted by a device across deep sleep. Errors unless there is exactly
    /// one subtree per set bit of `size`.
    pub fn from_parts(size: u64, subtrees: Vec<Hash>) -> Result<Self, MerkleError> {
        if subtrees.len() != size.count_ones() as usize {
            return Err(MerkleError::BadFrontier { size, subtrees: subtrees.len() });
        }
        Ok(MerkleFrontier { size, stack: subtrees })
    }

    /// Append a leaf hash (`leaf_hash` of the leaf data). O(log n) hashing at worst,
    /// amortised O(1).
    pub fn push(&mut self, leaf: Hash) {
        let mut h = leaf;
        let mut s = self.size;
        // Each set low bit of the size is a perfect subtree of the height being built
        // at the end of the stack: merge it into the new one.
        while s & 1 == 1 {
            let Some(left) = self.stack.pop() else { break };
            h = node_hash(&left, &h);
            s >>= 1;
        }
        self.stack.push(h);
        self.size = self.size.wrapping_add(1);
    }

    /// Number of leaves pushed.
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

    fn hex32(s: &str) -> Hash {
        let v = crate::hex_decode(s).unwrap();
        v.try_into().unwrap()
    }

    // The reference: RFC 9162 §2.1.1, §2.1.3.1 and §2.1.4.1 written as literally as
    // possible (recursive, with its own split computation).
    fn ref_k(n: usize) -> usize {
        let mut k = 1;
        while k * 2 < n {
            k *= 2;
        }
        k
    }

    fn mth(d: &[Hash]) -> Hash {
        match d.len() {
            0 => Sha256::digest([]).into(),
            1 => d[0],
            n => node_hash(&mth(&d[..ref_k(n)]), &mth(&d[ref_k(n)..])),
        }
    }

    fn ref_path(m: usize, d: &[Hash]) -> Vec<Hash> {
        let n = d.len();
        if n == 1 {
            return vec![];
        }
        let k = ref_k(n);
        let mut p;
        if m < k {
            p = ref_path(m, &d[..k]);
            p.push(mth(&d[k..]));
        } else {
            p = ref_path(m - k, &d[k..]);
            p.push(mth(&d[..k]));
        }
        p
    }

    fn ref_subproof(m: usize, d: &[Hash], b: bool) -> Vec<Hash> {
        let n = d.len();
        if m == n {
            return if b { vec![] } else { vec![mth(d)] };
        }
        let k = ref_k(n);
        let mut p;
        if m <= k {
            p = ref_subproof(m, &d[..k], b);
            p.push(mth(&d[k..]));
        } else {
            p = ref_subproof(m - k, &d[k..], false);
            p.push(mth(&d[..k]));
        }
        p
    }

    #[test]
    fn known_answers() {
        assert_eq!(empty_root(), hex32("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"));
        // The RFC 6962 / Certificate Transparency test leaves and their roots.
        let data: [&[u8]; 8] = [
            b"",
            b"\x00",
            b"\x10",
            b"\x20\x21",
            b"\x30\x31",
            b"\x40\x41\x42\x43",
            b"\x50\x51\x52\x53\x54\x55\x56\x57",
            b"\x60\x61\x62\x63\x64\x65\x66\x67\x68\x69\x6a\x6b\x6c\x6d\x6e\x6f",
        ];
        let roots = [
            "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
            "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
            "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
            "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
            "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
            "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
            "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
            "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
        ];
        let l: Vec<Hash> = data.iter().map(|d| leaf_hash(d)).collect();
        for (n, want) in roots.iter().enumerate() {
            assert_eq!(root(&l[..n + 1]), hex32(want), "root of {}", n + 1);
        }
        assert_eq!(split_point(0), 0);
        assert_eq!(split_point(1), 0);
        assert_eq!(split_point(2), 1);
        assert_eq!(split_point(8), 4);
        assert_eq!(split_point(9), 8);
        assert_eq!(split_point(u64::MAX), 1 << 63);
    }

    #[test]
    fn roots_proofs_and_frontier_agree_with_the_reference_for_all_small_trees() {
        assert_eq!(root(&[]), empty_root());
        assert_eq!(MerkleFrontier::new().root(), empty_root());
        let all = leaves(72);
        let prefix_roots: Vec<Hash> = (0..=72).map(|k| mth(&all[..k])).collect();
        for n in 1..=70usize {
            let l = leaves(n);
            let size = n as u64;
            let r = mth(&l);
            assert_eq!(root(&l), r, "root of {n}");
            let mut f = MerkleFrontier::new();
            for (i, x) in l.iter().enumerate() {
                f.push(*x);
                assert_eq!(f.size(), i as u64 + 1);
                assert_eq!(f.root(), prefix_roots[i + 1], "frontier of {}", i + 1);
            }
            assert_eq!(f.subtrees().len(), size.count_ones() as usize);
            let resumed = MerkleFrontier::from_parts(f.size(), f.subtrees().to_vec()).unwrap();
            assert_eq!(resumed.root(), r);

            for i in 0..size {
                let leaf = &l[i as usize];
                let p = inclusion_proof(&l, i).unwrap();
                assert_eq!(p, ref_path(i as usize, &l), "path {i}/{n}");
                assert_eq!(p.len(), inclusion_proof_len(i, size), "len {i}/{n}");
                assert_eq!(root_from_inclusion_proof(i, size, leaf, &p), Ok(r));
                verify_inclusion(i, size, leaf, &p, &r).unwrap();
                // Wrong index, wrong leaf, wrong root, tampered hash, truncated or
                // extended proofs all fail, with an error.
                for j in 0..size {
                    if j != i {
                        assert!(verify_inclusion(j, size, leaf, &p, &r).is_err(), "index {j} for {i}/{n}");
                        assert!(verify_inclusion(i, size, &l[j as usize], &p, &r).is_err());
                    }
                }
                // A proof for another size fails against that tree's root; and against
                // any root if the shape differs (the size itself is bound by whoever
                // signs the root, see the module doc).
                for other in 0..=size + 2 {
                    if other == size {
                        continue;
                    }
                    let other_root = &prefix_roots[other as usize];
                    assert!(verify_inclusion(i, other, leaf, &p, other_root).is_err(), "size {other} for {i}/{n}");
                    if i >= other || inclusion_proof_len(i, other) != p.len() {
                        assert!(verify_inclusion(i, other, leaf, &p, &r).is_err(), "size {other} for {i}/{n}");
                    }
                }
                assert_eq!(verify_inclusion(i, size, leaf, &p, &leaf_hash(b"x")), Err(MerkleError::RootMismatch));
                for k in 0..p.len() {
                    let mut t = p.clone();
                    t[k][k % 32] ^= 1;
                    assert_eq!(verify_inclusion(i, size, leaf, &t, &r), Err(MerkleError::RootMismatch));
                    assert!(matches!(verify_inclusion(i, size, leaf, &p[..k], &r), Err(MerkleError::WrongProofLength { .. })));
                }
                let mut longer = p.clone();
                longer.push([0; 32]);
                assert!(matches!(verify_inclusion(i, size, leaf, &longer, &r), Err(MerkleError::WrongProofLength { .. })));
            }
            assert_eq!(inclusion_proof(&l, size), Err(MerkleError::IndexOutOfRange { index: size, size }));
            assert_eq!(verify_inclusion(size, size, &l[0], &[], &r), Err(MerkleError::IndexOutOfRange { index: size, size }));
            assert_eq!(inclusion_proof_len(size, size), 0);

            for m in 1..=size {
                let old = prefix_roots[m as usize];
                let p = consistency_proof(&l, m).unwrap();
                assert_eq!(p, ref_subproof(m as usize, &l, true), "consistency {m}/{n}");
                verify_consistency(m, size, &old, &r, &p).unwrap();
                if m == size {
                    assert!(p.is_empty());
                    assert_eq!(verify_consistency(m, size, &old, &leaf_hash(b"x"), &p), Err(MerkleError::RootMismatch));
                    assert!(verify_consistency(m, size, &old, &r, &[r]).is_err());
                    continue;
                }
                assert!(verify_consistency(m, size, &r, &r, &p).is_err(), "wrong old root");
                assert!(verify_consistency(m, size, &old, &old, &p).is_err(), "wrong new root");
                for k in 0..p.len() {
                    let mut t = p.clone();
                    t[k][31 - k % 32] ^= 1;
                    assert!(verify_consistency(m, size, &old, &r, &t).is_err(), "tampered {k} {m}/{n}");
                    assert!(verify_consistency(m, size, &old, &r, &p[..k]).is_err(), "short {k} {m}/{n}");
                }
                let mut longer = p.clone();
                longer.push(r);
                assert!(verify_consistency(m, size, &old, &r, &longer).is_err());
                // The proof does not pass for other sizes with those trees' roots.
                for a in [0, 1, m - 1, m, m + 1, size] {
                    for b in [m, m + 1, size - 1, size, size + 1, size + 2] {
                        if (a, b) != (m, size) {
                            let (ra, rb) = (&prefix_roots[a as usize], &prefix_roots[b as usize]);
                            assert!(verify_consistency(a, b, ra, rb, &p).is_err(), "sizes {a},{b} for {m}/{n}");
                        }
                    }
                }
            }
            assert_eq!(consistency_proof(&l, 0), Err(MerkleError::BadSizes { old_size: 0, new_size: size }));
            assert!(consistency_proof(&l, size + 1).is_err());
            assert_eq!(verify_consistency(0, size, &r, &r, &[]), Err(MerkleError::BadSizes { old_size: 0, new_size: size }));
            assert!(verify_consistency(size + 1, size, &r, &r, &[]).is_err());
        }
    }

    #[test]
    fn frontier_from_parts_checks_the_shape() {
        assert!(MerkleFrontier::from_parts(0, vec![]).is_ok());
        assert_eq!(MerkleFrontier::from_parts(3, vec![[0; 32]]).unwrap_err(), MerkleError::BadFrontier { size: 3, subtrees: 1 });
        assert!(MerkleFrontier::from_parts(4, vec![[0; 32], [1; 32]]).is_err());
        // A resumed frontier keeps growing like the original.
        let l = leaves(37);
        let mut f = MerkleFrontier::new();
        for x in &l[..21] {
            f.push(*x);
        }
        let mut g = MerkleFrontier::from_parts(21, f.subtrees().to_vec()).unwrap();
        for x in &l[21..] {
            g.push(*x);
        }
        assert_eq!(g.root(), root(&l));
    }

    #[test]
    fn garbage_never_panics() {
        let junk = vec![[7u8; 32]; 70];
        let sizes = [0u64, 1, 2, 3, 7, 8, 9, 1 << 40, (1 << 63) + 1, u64::MAX - 1, u64::MAX];
        for size in sizes {
            let _ = split_point(size);
            for index in [0u64, 1, size / 2, size.saturating_sub(1), size, u64::MAX] {
                let _ = inclusion_proof_len(index, size);
                for len in [0usize, 1, 2, 5, 63, 64, 65, 70] {
                    let _ = verify_inclusion(index, size, &junk[0], &junk[..len], &junk[1]);
                    let _ = verify_consistency(index, size, &junk[0], &junk[1], &junk[..len]);
                    let _ = verify_consistency(size, index, &junk[0], &junk[1], &junk[..len]);
                }
            }
        }
        assert!(verify_inclusion(0, 0, &junk[0], &[], &junk[0]).is_err());
        assert!(verify_consistency(0, 0, &junk[0], &junk[0], &[]).is_err());
        assert!(inclusion_proof(&[], 0).is_err());
        assert!(consistency_proof(&[], 0).is_err());
    }
}
