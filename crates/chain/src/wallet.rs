//! The gateway's own on-chain wallet: a BDK descriptor wallet (BIP84 P2WPKH),
//! persisted in SQLite, fed by the [`BlockStream`](crate::BlockStream) rather than by
//! a separate chain scanner, so it sees exactly the blocks every other consumer sees.
//!
//! Used to pay for anchors (OP_RETURN transactions, with RBF fee bumps) and to derive
//! fresh receive addresses. The seed lives in `wallet.seed` (mode 0600) next to
//! `wallet.sqlite`; back up the seed, everything else can be rebuilt from the chain.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bdk_wallet::bitcoin::bip32::Xpriv;
use bdk_wallet::bitcoin::script::PushBytesBuf;
use bdk_wallet::bitcoin::secp256k1::rand::{thread_rng, RngCore};
use bdk_wallet::chain::ChainPosition;
use bdk_wallet::rusqlite::Connection;
use bdk_wallet::{KeychainKind, PersistedWallet, SignOptions, Wallet};
use bitcoin::{Address, Amount, Block, FeeRate, Network, Transaction, Txid};

use crate::error::{ChainError, Rejection, Result, WalletError};
use crate::now_secs;
use crate::rpc::{BlockId, ChainClient};
use crate::stream::{BlockEvent, BlockStream, StreamConfig};

fn werr(context: impl Into<String>, e: impl std::error::Error + Send + Sync + 'static) -> ChainError {
    WalletError::Bdk { context: context.into(), source: Box::new(e) }.into()
}

/// A transaction BDK could not build: the wallet's coins too few is its own case.
fn create_err(context: &'static str, e: bdk_wallet::error::CreateTxError) -> ChainError {
    match e {
        bdk_wallet::error::CreateTxError::CoinSelection(f) => {
            WalletError::InsufficientFunds { context, needed: f.needed, available: f.available }.into()
        }
        e => werr(context, e),
    }
}

/// Where a wallet transaction stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TxStatus {
    /// Not known to the wallet (never built here, or dropped).
    Unknown,
    /// In the mempool (as far as the wallet knows).
    Unconfirmed,
    /// In the best chain at this block.
    Confirmed(BlockId),
}

/// What [`GatewayWallet::reconcile`] did with a transaction the node's mempool lacked.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reconciled {
    /// Sent again; the node took it back into its mempool.
    Rebroadcast { txid: Txid },
    /// The node refused it: forgotten, with the wallet transactions spending it
    /// (`with_descendants`, the transaction itself first).
    Forgotten { txid: Txid, rejection: Rejection, reason: String, with_descendants: Vec<Txid> },
}

/// A persisted BDK wallet that follows the chain through [`BlockStream`] events.
pub struct GatewayWallet {
    wallet: PersistedWallet<Connection>,
    db: Connection,
    network: Network,
}

impl std::fmt::Debug for GatewayWallet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatewayWallet").field("network", &self.network).finish()
    }
}

fn descriptors(seed: &[u8; 32], network: Network) -> Result<(String, String)> {
    let xprv = Xpriv::new_master(network, seed).map_err(|e| werr("deriving the master key", e))?;
    let coin = if network == Network::Bitcoin { 0 } else { 1 };
    Ok((format!("wpkh({xprv}/84'/{coin}'/0'/0/*)"), format!("wpkh({xprv}/84'/{coin}'/0'/1/*)")))
}

fn load_or_create_seed(path: &Path) -> Result<([u8; 32], bool)> {
    match fs::read_to_string(path) {
        Ok(text) => {
            let bytes =
                hex_decode(text.trim()).filter(|b| b.len() == 32).ok_or_else(|| WalletError::BadSeed { path: path.to_path_buf() })?;
            let mut seed = [0u8; 32];
            seed.copy_from_slice(&bytes);
            Ok((seed, false))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut seed = [0u8; 32];
            thread_rng().fill_bytes(&mut seed);
            let hex: String = seed.iter().map(|b| format!("{b:02x}")).collect();
            create_secret(path, hex.as_bytes())?;
            Ok((seed, true))
        }
        Err(e) => Err(ChainError::io(format!("reading {}", path.display()), e)),
    }
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// A fresh private temporary file beside `path` holding `bytes`, synced: created
/// exclusively (`O_EXCL`, mode 0600, a name no one else uses), so nothing another process
/// made or linked there is ever opened or truncated.
fn private_temp(path: &Path, bytes: &[u8]) -> std::io::Result<PathBuf> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut nonce = [0u8; 8];
    thread_rng().fill_bytes(&mut nonce);
    let tag: String = nonce.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = path.with_extension(format!("tmp.{}.{tag}", std::process::id()));
    let mut f = fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    if let Err(e) = f.write_all(bytes).and_then(|_| f.sync_all()) {
        let _ = fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(tmp)
}

fn sync_dir(path: &Path) {
    if let Some(d) = path.parent().and_then(|d| fs::File::open(if d.as_os_str().is_empty() { Path::new(".") } else { d }).ok()) {
        let _ = d.sync_all();
    }
}

/// Create a secret file readable by its owner only (0600), durably (file and directory
/// synced), and **never over an existing file**: if `path` exists (even one that cannot be
/// read), this fails with [`std::io::ErrorKind::AlreadyExists`]. The file appears whole or
/// not at all (written to a private temporary file, then hard-linked into place).
pub fn create_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = || format!("creating {}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| ChainError::io(ctx(), e))?;
    }
    let tmp = private_temp(path, bytes).map_err(|e| ChainError::io(ctx(), e))?;
    let linked = fs::hard_link(&tmp, path);
    let _ = fs::remove_file(&tmp);
    linked.map_err(|e| ChainError::io(ctx(), e))?;
    sync_dir(path);
    Ok(())
}

/// Write (or replace) a secret file readable by its owner only (0600), durably: a fresh
/// private temporary file, synced, renamed over `path`, the directory synced. For secrets
/// that are meant to be replaced (new credentials from a re-enrolment); a secret that
/// identifies its owner (a key, a seed, a token) is made with [`create_secret`].
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let ctx = || format!("writing {}", path.display());
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| ChainError::io(ctx(), e))?;
    }
    let tmp = private_temp(path, bytes).map_err(|e| ChainError::io(ctx(), e))?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(ChainError::io(ctx(), e));
    }
    sync_dir(path);
    Ok(())
}

#[cfg(test)]
mod secret_tests {
    use super::*;

    #[test]
    fn a_secret_is_created_private_once_and_never_over_an_existing_file() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub/key");
        create_secret(&p, b"one").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let e = create_secret(&p, b"two").unwrap_err().to_string();
        assert!(e.contains("exists"), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"one");
        // A path that exists but is no readable file (here a directory) is not replaced.
        let dir = d.path().join("dir");
        fs::create_dir(&dir).unwrap();
        assert!(create_secret(&dir, b"x").is_err());
        assert!(dir.is_dir());
        // No temporary file is left behind.
        let left: Vec<_> = fs::read_dir(d.path().join("sub")).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("key")]);
        write_secret(&p, b"three").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"three");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
    }
}

impl GatewayWallet {
    /// Open the wallet in `dir` (`wallet.seed`, `wallet.sqlite`), creating it on first use.
    /// A new wallet off regtest starts at the node's current tip (its birthday) instead of genesis.
    pub fn open(dir: &Path, client: &ChainClient) -> Result<Self> {
        let network = client.network();
        fs::create_dir_all(dir).map_err(|e| ChainError::io(format!("creating {}", dir.display()), e))?;
        let (seed, _new) = load_or_create_seed(&dir.join("wallet.seed"))?;
        let (ext, int) = descriptors(&seed, network)?;
        let mut db = Connection::open(dir.join("wallet.sqlite")).map_err(|e| werr("opening wallet.sqlite", e))?;
        let loaded = Wallet::load()
            .descriptor(KeychainKind::External, Some(ext.clone()))
            .descriptor(KeychainKind::Internal, Some(int.clone()))
            .extract_keys()
            .check_network(network)
            .load_wallet(&mut db)
            .map_err(|e| werr("loading the wallet (does wallet.seed match wallet.sqlite, and the network?)", e))?;
        let mut w = match loaded {
            Some(w) => GatewayWallet { wallet: w, db, network },
            None => {
                let wallet =
                    Wallet::create(ext, int).network(network).create_wallet(&mut db).map_err(|e| werr("creating the wallet", e))?;
                let mut w = GatewayWallet { wallet, db, network };
                if network != Network::Regtest {
                    let tip = client.tip()?;
                    let block = client.block(&tip.hash)?;
                    w.apply_connected(tip, &block)?;
                }
                w.persist()?;
                w
            }
        };
        w.persist()?;
        Ok(w)
    }

    pub fn network(&self) -> Network {
        self.network
    }

    /// The public descriptor (no private key) of the addresses payment orders are paid to:
    /// a light-client device pins it to accept any of them (`--pay-to-descriptor`).
    pub fn receive_descriptor(&self) -> String {
        self.wallet.public_descriptor(KeychainKind::External).to_string()
    }

    fn persist(&mut self) -> Result<()> {
        self.wallet.persist(&mut self.db).map_err(|e| werr("persisting the wallet", e))?;
        Ok(())
    }

    /// The last block the wallet has applied (its cursor in the chain).
    pub fn tip(&self) -> BlockId {
        let cp = self.wallet.latest_checkpoint();
        BlockId { height: cp.height(), hash: cp.hash() }
    }

    fn apply_connected(&mut self, id: BlockId, block: &Block) -> Result<()> {
        let connected_to = match id.height.checked_sub(1) {
            Some(h) => bdk_wallet::chain::BlockId { height: h, hash: block.header.prev_blockhash },
            None => bdk_wallet::chain::BlockId { height: 0, hash: id.hash },
        };
        self.wallet
            .apply_block_connected_to(block, id.height, connected_to)
            .map_err(|e| werr(format!("applying block {} at {}", id.hash, id.height), e))
    }

    /// Apply one stream event. Disconnections need no action: the connections of the new
    /// branch that follow replace the stale blocks in BDK's local chain.
    pub fn apply(&mut self, ev: &BlockEvent) -> Result<()> {
        if let BlockEvent::Connected { id, block } = ev {
            self.apply_connected(*id, block)?;
        }
        Ok(())
    }

    /// Where to follow the chain from: the wallet's most recent block that is still on the
    /// node's active chain. Usually its tip; lower when the node lost blocks the wallet
    /// applied (a crash before it flushed them) or a reorg happened while the wallet was
    /// not following. Blocks of the node's branch from there replace the stale ones.
    /// [`ChainError::CursorUnknown`] when none of the wallet's blocks is on the node's chain.
    pub fn resume_point(&self, client: &ChainClient) -> Result<BlockId> {
        let tip = self.tip();
        for cp in self.wallet.checkpoints() {
            if client.block_hash(cp.height())? == Some(cp.hash()) {
                if cp.height() != tip.height {
                    tracing::warn!(
                        wallet_tip = tip.height,
                        fork = cp.height(),
                        "the node no longer has the wallet's last blocks; following its chain from the fork point"
                    );
                }
                return Ok(BlockId { height: cp.height(), hash: cp.hash() });
            }
        }
        Err(ChainError::CursorUnknown { height: tip.height, hash: tip.hash.to_string() })
    }

    /// Catch up with the node: apply every block after the wallet's tip, then persist.
    /// Returns the number of events applied.
    pub fn sync(&mut self, client: &ChainClient) -> Result<usize> {
        let from = self.resume_point(client)?;
        let mut stream = BlockStream::from_cursor(client.fresh()?, Some(from), StreamConfig::default());
        let mut n = 0;
        while let Some(ev) = stream.next_event(Some(Duration::ZERO))? {
            self.apply(&ev)?;
            n += 1;
            if n % 500 == 0 {
                self.persist()?;
            }
        }
        self.persist()?;
        Ok(n)
    }

    /// A fresh receive address (persisted, so it is never handed out twice).
    pub fn new_address(&mut self) -> Result<Address> {
        let a = self.wallet.reveal_next_address(KeychainKind::External).address;
        self.persist()?;
        Ok(a)
    }

    /// Spendable now: confirmed, plus our own unconfirmed change.
    pub fn spendable(&self) -> Amount {
        let b = self.wallet.balance();
        b.confirmed + b.trusted_pending
    }

    /// Total balance including immature coinbase outputs.
    pub fn total(&self) -> Amount {
        self.wallet.balance().total()
    }

    /// Build and sign a transaction with one OP_RETURN output carrying `data` (≤ 80 bytes),
    /// change back to the wallet, RBF signalled. The wallet records it as unconfirmed;
    /// call [`GatewayWallet::forget`] if broadcasting fails.
    pub fn op_return_tx(&mut self, data: &[u8], fee_rate: FeeRate) -> Result<Transaction> {
        let push = PushBytesBuf::try_from(data.to_vec()).map_err(|e| werr("OP_RETURN data", e))?;
        let mut b = self.wallet.build_tx();
        b.add_data(&push).fee_rate(fee_rate);
        let psbt = b.finish().map_err(|e| create_err("building the anchor transaction", e))?;
        self.sign_and_record(psbt)
    }

    /// Build and sign a payment of `amount` to `address` (RBF signalled), recorded as unconfirmed;
    /// call [`GatewayWallet::forget`] if broadcasting fails.
    pub fn pay(&mut self, address: &Address, amount: Amount, fee_rate: FeeRate) -> Result<Transaction> {
        let mut b = self.wallet.build_tx();
        b.add_recipient(address.script_pubkey(), amount).fee_rate(fee_rate);
        let psbt = b.finish().map_err(|e| create_err("building the payment", e))?;
        self.sign_and_record(psbt)
    }

    /// Replace unconfirmed `txid` by a copy paying `fee_rate` (BIP125).
    pub fn bump_fee(&mut self, txid: Txid, fee_rate: FeeRate) -> Result<Transaction> {
        let mut b = self.wallet.build_fee_bump(txid).map_err(|e| werr("fee bump", e))?;
        b.fee_rate(fee_rate);
        let psbt = b.finish().map_err(|e| create_err("building the fee bump", e))?;
        self.sign_and_record(psbt)
    }

    fn sign_and_record(&mut self, mut psbt: bdk_wallet::bitcoin::Psbt) -> Result<Transaction> {
        let done = self.wallet.sign(&mut psbt, SignOptions::default()).map_err(|e| werr("signing", e))?;
        if !done {
            return Err(WalletError::Unsigned.into());
        }
        let tx = psbt.extract_tx().map_err(|e| werr("extracting the signed transaction", e))?;
        self.wallet.apply_unconfirmed_txs([(tx.clone(), now_secs())]);
        self.persist()?;
        Ok(tx)
    }

    /// Drop a transaction that did not make it to the network, or can no longer confirm,
    /// together with every wallet transaction spending its outputs: its inputs are the
    /// wallet's coins again and its outputs are no longer spendable.
    ///
    /// BDK's `cancel_tx` alone only frees the change address: the transaction stays in the
    /// wallet's graph, and one that left the chain in a reorg (or was never mined) stays
    /// "unconfirmed" there forever, its change selected for the next spend, which the node
    /// refuses (`bad-txns-inputs-missingorspent`). So it is marked evicted, which takes it
    /// out of the wallet's view until it is seen in a block again.
    pub fn forget(&mut self, tx: &Transaction) -> Result<()> {
        let dropped = self.evict(&[tx.compute_txid()]);
        self.wallet.cancel_tx(tx);
        self.persist()?;
        if !dropped.is_empty() {
            tracing::info!(?dropped, "the wallet forgot transactions that cannot confirm");
        }
        Ok(())
    }

    /// The wallet's unconfirmed transactions, parents before children.
    fn unconfirmed(&self) -> Vec<(Txid, Arc<Transaction>, u64)> {
        let mut left: Vec<(Txid, Arc<Transaction>, u64)> = self
            .wallet
            .transactions()
            .filter_map(|t| match t.chain_position {
                ChainPosition::Unconfirmed { last_seen, .. } => Some((t.tx_node.txid, t.tx_node.tx.clone(), last_seen.unwrap_or(0))),
                ChainPosition::Confirmed { .. } => None,
            })
            .collect();
        left.sort_by_key(|(txid, _, seen)| (*seen, *txid));
        let mut out: Vec<(Txid, Arc<Transaction>, u64)> = Vec::with_capacity(left.len());
        while !left.is_empty() {
            // The first one none of whose inputs is another one still left (a cycle cannot
            // happen between valid transactions; if it did, take the first anyway).
            let i = left
                .iter()
                .position(|(_, tx, _)| !tx.input.iter().any(|i| left.iter().any(|(t, _, _)| *t == i.previous_output.txid)))
                .unwrap_or(0);
            out.push(left.remove(i));
        }
        out
    }

    /// Mark `roots` and their unconfirmed descendants in the wallet as evicted (not persisted).
    /// Returns what was evicted, parents first.
    fn evict(&mut self, roots: &[Txid]) -> Vec<Txid> {
        let mut gone: Vec<Txid> = vec![];
        let mut at = now_secs();
        for (txid, tx, seen) in self.unconfirmed() {
            if roots.contains(&txid) || tx.input.iter().any(|i| gone.contains(&i.previous_output.txid)) {
                gone.push(txid);
                at = at.max(seen); // eviction counts only if not older than the last sighting
            }
        }
        if !gone.is_empty() {
            self.wallet.apply_evicted_txs(gone.iter().map(|t| (*t, at)));
        }
        gone
    }

    /// Record that the node accepted `tx` into its mempool just now (after a rebroadcast),
    /// so the wallet counts it again even if it had been evicted.
    pub fn mark_broadcast(&mut self, tx: &Transaction) -> Result<()> {
        let txid = tx.compute_txid();
        let seen = now_secs().max(self.wallet.tx_graph().get_last_evicted(txid).map_or(0, |e| e + 1));
        self.wallet.apply_unconfirmed_txs([(tx.clone(), seen)]);
        self.persist()
    }

    /// Make the wallet's unconfirmed transactions agree with the node. Each one the node's
    /// mempool does not hold (a node restarted without its mempool, a reorg whose new
    /// branch left it out) is sent again, parents first; one the node refuses because an
    /// input is gone or it can never be valid (-25, -26) is forgotten with its descendants,
    /// so their coins are not spent again. Returns what happened to each transaction the
    /// node did not hold. Call it when the wallet has applied every block of the node's
    /// chain, or a transaction mined in a block not applied yet may be forgotten until
    /// that block is (a block always brings a forgotten transaction back).
    pub fn reconcile(&mut self, client: &ChainClient) -> Result<Vec<Reconciled>> {
        let mut out = vec![];
        let mut gone: Vec<Txid> = vec![];
        for (txid, tx, _) in self.unconfirmed() {
            if gone.contains(&txid) || client.in_mempool(&txid)? {
                continue;
            }
            match client.broadcast(&tx) {
                Ok(_) => {
                    self.mark_broadcast(&tx)?;
                    out.push(Reconciled::Rebroadcast { txid });
                }
                Err(e) => match e.rejection() {
                    Some(Rejection::AlreadyInChain) => {}
                    Some(rejection @ (Rejection::MissingInputs | Rejection::Rejected)) => {
                        let dropped = self.evict(&[txid]);
                        self.wallet.cancel_tx(&tx);
                        let reason = e.to_string();
                        gone.extend(dropped.iter().copied());
                        out.push(Reconciled::Forgotten { txid, rejection, reason, with_descendants: dropped });
                    }
                    None => return Err(e),
                },
            }
        }
        self.persist()?;
        Ok(out)
    }

    /// Fee paid by a wallet transaction.
    pub fn fee(&self, tx: &Transaction) -> Result<Amount> {
        self.wallet.calculate_fee(tx).map_err(|e| werr("computing the fee", e))
    }

    /// Where a transaction stands in the wallet's view of the best chain.
    pub fn status(&self, txid: Txid) -> TxStatus {
        match self.wallet.get_tx(txid).map(|t| t.chain_position) {
            None => TxStatus::Unknown,
            Some(ChainPosition::Confirmed { anchor, .. }) => {
                TxStatus::Confirmed(BlockId { height: anchor.block_id.height, hash: anchor.block_id.hash })
            }
            Some(ChainPosition::Unconfirmed { .. }) => TxStatus::Unconfirmed,
        }
    }
}

#[cfg(test)]
mod error_tests {
    use super::*;
    use bdk_wallet::coin_selection::InsufficientFunds;
    use bdk_wallet::error::CreateTxError;

    /// BDK's insufficient-funds error stays typed (the anchorer asks for more coins on
    /// it); every other build failure keeps BDK's error as its source.
    #[test]
    fn insufficient_funds_is_a_variant_not_a_message() {
        let (needed, available) = (Amount::from_sat(1_000), Amount::from_sat(10));
        let e = create_err("building the anchor transaction", CreateTxError::CoinSelection(InsufficientFunds { needed, available }));
        let ChainError::Wallet(w) = &e else { panic!("{e:?}") };
        assert!(w.is_insufficient_funds());
        assert!(matches!(w, WalletError::InsufficientFunds { needed: n, available: a, .. } if *n == needed && *a == available));
        assert!(e.to_string().starts_with("wallet: building the anchor transaction: insufficient funds"), "{e}");

        let e = create_err("building the payment", CreateTxError::NoRecipients);
        let ChainError::Wallet(w) = &e else { panic!("{e:?}") };
        assert!(!w.is_insufficient_funds());
        let source = std::error::Error::source(w).expect("BDK's error is the source");
        assert!(source.downcast_ref::<CreateTxError>().is_some_and(|s| matches!(s, CreateTxError::NoRecipients)));
        assert!(!e.is_transient());
    }
}
