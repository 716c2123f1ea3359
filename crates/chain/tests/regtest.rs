//! Integration tests against a real regtest bitcoind (provisioned on first use:
//! `$BITCOIND_EXE`, PATH, the cache, or a ~9 minute build from source).

use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bitmote_chain::bitcoin::{Address, BlockHash, Network, ScriptBuf};
use bitmote_chain::{
    BlockEvent, BlockStream, ChainClient, ChainError, CursorStore, FileCursorStore, RpcAuth, RpcConfig, Start, StreamConfig,
};
use bitmote_regtest::provision::{ensure_bitcoind, InstallOptions, LogProgress};
use bitmote_regtest::{RegtestNode, RegtestOptions};

fn bitcoind() -> PathBuf {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let _ = tracing_subscriber::fmt().with_test_writer().try_init();
        ensure_bitcoind(&InstallOptions::default(), &mut LogProgress::new()).expect("bitcoind available").bitcoind
    })
    .clone()
}

fn node() -> RegtestNode {
    RegtestNode::start(RegtestOptions::new(bitcoind())).expect("regtest node starts")
}

/// Another address than the default one, so a replacement fork never repeats a block.
fn other_address() -> Address {
    Address::p2wsh(&ScriptBuf::from(vec![0x52]), Network::Regtest)
}

fn active_chain(c: &ChainClient) -> Vec<BlockHash> {
    let tip = c.tip().unwrap();
    (0..=tip.height).map(|h| c.block_hash(h).unwrap().unwrap()).collect()
}

/// Drain events until the stream has nothing new for `quiet`.
fn drain<S: bitmote_chain::BlockSource>(s: &mut BlockStream<S>, quiet: Duration) -> Vec<BlockEvent> {
    let mut out = vec![];
    while let Some(ev) = s.next_event(Some(quiet)).unwrap() {
        out.push(ev);
    }
    out
}

/// Apply events to a model of the chain, checking each one fits exactly.
fn apply(chain: &mut Vec<BlockHash>, ev: &BlockEvent) {
    let id = ev.id();
    match ev {
        BlockEvent::Connected { block, .. } => {
            assert_eq!(id.height as usize, chain.len(), "connected out of order");
            if let Some(prev) = chain.last() {
                assert_eq!(block.header.prev_blockhash, *prev, "connected block does not build on the model tip");
            }
            assert!(!chain.contains(&id.hash), "block {} delivered twice", id.hash);
            chain.push(id.hash);
        }
        BlockEvent::Disconnected { .. } => {
            assert_eq!(chain.last(), Some(&id.hash), "disconnected a block that is not the model tip");
            chain.pop();
        }
    }
}

#[test]
fn stream_delivers_every_block_once_in_order() {
    let node = node();
    node.mine(50).unwrap();
    let mut stream = BlockStream::starting_at(node.client().fresh().unwrap(), Start::Height(0), StreamConfig::default()).unwrap();
    let mut model = vec![];
    // Blocks mined while the consumer is reading, from another thread.
    let miner = {
        let c = node.client().fresh().unwrap();
        std::thread::spawn(move || {
            for _ in 0..30 {
                c.mine(1, &bitmote_regtest::op_true_address()).unwrap();
                std::thread::sleep(Duration::from_millis(5));
            }
        })
    };
    while model.len() < 81 {
        let ev = stream.next_event(Some(Duration::from_secs(30))).unwrap().expect("an event within 30 s");
        assert!(ev.is_connected(), "no reorg happened, yet got {ev:?}");
        apply(&mut model, &ev);
    }
    miner.join().unwrap();
    assert!(drain(&mut stream, Duration::from_millis(300)).is_empty(), "nothing beyond the tip");
    assert_eq!(model, active_chain(node.client()));
    assert_eq!(stream.cursor().unwrap().height, 80);
}

#[test]
fn invalidating_a_tip_three_deep_emits_three_disconnections_then_the_new_fork() {
    let node = node();
    let c = node.client();
    node.mine(110).unwrap();
    let mut stream = BlockStream::starting_at(c.fresh().unwrap(), Start::Tip, StreamConfig::default()).unwrap();
    let old: Vec<BlockHash> = node.mine(3).unwrap();
    let evs = drain(&mut stream, Duration::from_millis(300));
    assert_eq!(evs.iter().map(|e| e.id().hash).collect::<Vec<_>>(), old);

    c.invalidate_block(&old[0]).unwrap();
    let new = c.mine(4, &other_address()).unwrap();
    let evs = drain(&mut stream, Duration::from_millis(500));
    let got: Vec<(bool, u32, BlockHash)> = evs.iter().map(|e| (e.is_connected(), e.id().height, e.id().hash)).collect();
    let want: Vec<(bool, u32, BlockHash)> = vec![
        (false, 113, old[2]),
        (false, 112, old[1]),
        (false, 111, old[0]),
        (true, 111, new[0]),
        (true, 112, new[1]),
        (true, 113, new[2]),
        (true, 114, new[3]),
    ];
    assert_eq!(got, want);
    // Disconnected events carry the full block that left the chain.
    assert_eq!(evs[0].block().block_hash(), old[2]);
}

#[test]
fn a_consumer_restarted_from_its_cursor_misses_and_repeats_nothing() {
    let node = node();
    let c = node.client();
    node.mine(20).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut store = FileCursorStore::new(dir.path().join("cursor.json"));
    let mut model: Vec<BlockHash> = vec![];

    // Several consumer lifetimes; between them the chain grows and reorganises.
    for round in 0..6u32 {
        let stored = store.load().unwrap();
        let mut stream = BlockStream::resume(c.fresh().unwrap(), stored, Start::Height(0), StreamConfig::default()).unwrap();
        // Read a few events, persisting the cursor after each (as a consumer would after
        // processing), then "crash": drop the stream without a goodbye.
        for _ in 0..(7 + round) {
            match stream.next_event(Some(Duration::from_millis(200))).unwrap() {
                Some(ev) => {
                    apply(&mut model, &ev);
                    store.save(ev.cursor_after()).unwrap();
                }
                None => break,
            }
        }
        drop(stream);
        // While the consumer is down: more blocks, and every other round a reorg that may
        // remove blocks the consumer has already seen.
        if round % 2 == 1 {
            let tip = c.tip().unwrap();
            let victim = c.block_hash(tip.height - 2).unwrap().unwrap();
            c.invalidate_block(&victim).unwrap();
            c.mine(4, &other_address()).unwrap();
        } else {
            node.mine(3).unwrap();
        }
    }
    // Final consumer lifetime drains everything.
    let mut stream = BlockStream::resume(c.fresh().unwrap(), store.load().unwrap(), Start::Height(0), StreamConfig::default()).unwrap();
    for ev in drain(&mut stream, Duration::from_millis(300)) {
        apply(&mut model, &ev);
        store.save(ev.cursor_after()).unwrap();
    }
    assert_eq!(model, active_chain(c), "the consumer's view equals the node's active chain");
}

#[test]
fn the_stream_survives_a_node_killed_and_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RegtestOptions::new(bitcoind());
    opts.data_dir = Some(dir.path().join("node"));
    let mut node = RegtestNode::start(opts.clone()).unwrap();
    node.mine(10).unwrap();
    let mut stream = BlockStream::starting_at(node.client().fresh().unwrap(), Start::Height(0), StreamConfig::default()).unwrap();
    let mut model = vec![];
    for ev in drain(&mut stream, Duration::from_millis(200)) {
        apply(&mut model, &ev);
    }
    // SIGKILL, as a crash or power loss would.
    node.kill().unwrap();
    // Node down: a clear, transient error, not a panic.
    let err = stream.next_event(Some(Duration::from_millis(200))).unwrap_err();
    assert!(err.is_transient(), "{err}");
    assert!(err.to_string().contains("no Bitcoin node answers"), "{err}");
    // Node back on the same data dir and ports (a new cookie): the same stream resumes.
    let node = RegtestNode::start(opts).unwrap();
    node.mine(5).unwrap();
    for ev in drain(&mut stream, Duration::from_millis(300)) {
        apply(&mut model, &ev);
    }
    assert_eq!(model, active_chain(node.client()));
}

#[test]
fn bad_rpc_settings_get_errors_that_name_the_problem() {
    let node = node();
    let good = node.rpc_config().clone();

    // Nothing listening there.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let cfg = RpcConfig { url: format!("http://127.0.0.1:{port}"), ..good.clone() };
    let err = ChainClient::connect(cfg, Duration::ZERO).unwrap_err();
    assert!(matches!(err, ChainError::Unreachable { .. }), "{err:?}");

    // Wrong password.
    let cfg = RpcConfig { auth: RpcAuth::UserPass { user: "__cookie__".into(), password: "wrong".into() }, ..good.clone() };
    let err = ChainClient::connect(cfg, Duration::ZERO).unwrap_err();
    assert!(matches!(err, ChainError::Unauthorized { .. }), "{err:?}");
    assert!(err.to_string().contains("rejected the RPC credentials"));

    // Missing cookie file.
    let cfg = RpcConfig { auth: RpcAuth::Cookie("/nonexistent/.cookie".into()), ..good.clone() };
    let err = ChainClient::connect(cfg, Duration::ZERO).unwrap_err();
    assert!(matches!(err, ChainError::Cookie { .. }), "{err:?}");

    // Wrong network.
    let cfg = RpcConfig { network: Network::Signet, ..good.clone() };
    let err = ChainClient::connect(cfg, Duration::ZERO).unwrap_err();
    assert!(matches!(err, ChainError::WrongNetwork { ref actual, .. } if actual == "regtest"), "{err:?}");
    assert!(err.to_string().contains("configured for signet"));

    // Not a URL.
    let cfg = RpcConfig { url: "ht!tp://".into(), ..good.clone() };
    assert!(ChainClient::connect(cfg, Duration::ZERO).is_err());

    // Mining is refused off regtest, before anything is sent.
    let signet = ChainClient::unchecked(RpcConfig { network: Network::Signet, ..good.clone() }, Duration::from_secs(5)).unwrap();
    assert!(matches!(signet.mine(1, &other_address()), Err(ChainError::RegtestOnly(_))));

    // An RPC error is reported with its method and code.
    let err = node.client().raw::<serde_json::Value>("getblockheader", &[serde_json::json!("00")]).unwrap_err();
    assert!(matches!(err, ChainError::Rpc { ref method, .. } if method == "getblockheader"), "{err:?}");

    // A cursor this node never saw.
    let bogus =
        bitmote_chain::BlockId { height: 5, hash: "00000000000000000000000000000000000000000000000000000000000000ff".parse().unwrap() };
    let mut s = BlockStream::from_cursor(node.client().fresh().unwrap(), Some(bogus), StreamConfig::default());
    let err = s.next_event(Some(Duration::from_millis(100))).unwrap_err();
    assert!(matches!(err, ChainError::CursorUnknown { .. }), "{err:?}");
}

#[test]
fn a_node_still_starting_is_reported_as_such_and_waited_for() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = RegtestOptions::new(bitcoind());
    opts.data_dir = Some(dir.path().join("node"));
    let node = RegtestNode::start(opts.clone()).unwrap();
    node.mine(1500).unwrap();
    let rpc = node.rpc_config().clone();
    node.stop().unwrap();
    // Verifying every block at the highest level at startup keeps RPC in warm-up for a while.
    opts.extra_args = vec!["-checkblocks=0".into(), "-checklevel=4".into()];
    opts.startup_timeout = Duration::from_secs(120);
    let starting = std::thread::spawn(move || RegtestNode::start(opts));
    let mut saw_warmup = None;
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while std::time::Instant::now() < deadline {
        match ChainClient::connect(rpc.clone(), Duration::ZERO) {
            Err(e @ ChainError::Warmup { .. }) => {
                saw_warmup = Some(e);
                break;
            }
            Ok(_) => break,
            Err(_) => std::thread::sleep(Duration::from_millis(2)),
        }
    }
    let err = saw_warmup.expect("RPC answered 'still starting' at least once");
    assert!(err.to_string().contains("still starting"), "{err}");
    assert!(err.is_transient());
    // connect() with a startup allowance waits through the warm-up.
    let client = ChainClient::connect(rpc, Duration::from_secs(120)).unwrap();
    assert_eq!(client.tip().unwrap().height, 1500);
    starting.join().unwrap().unwrap().stop().unwrap();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let t = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &t);
        } else {
            std::fs::copy(e.path(), &t).unwrap();
        }
    }
}

#[test]
fn a_node_that_lost_its_last_blocks_is_followed_back_to_the_fork_point() {
    // The node's data as it was 6 blocks ago (what a crash before flushing leaves) is
    // simulated exactly: a copy of its data dir taken while stopped, restored later.
    let dir = tempfile::tempdir().unwrap();
    let node_dir = dir.path().join("node");
    let mut opts = RegtestOptions::new(bitcoind());
    opts.data_dir = Some(node_dir.clone());
    let node = RegtestNode::start(opts.clone()).unwrap();
    node.mine(20).unwrap();
    let history = dir.path().join("history.json");
    let mut store = FileCursorStore::new(dir.path().join("cursor.json"));
    let mut stream =
        BlockStream::resume(node.client().fresh().unwrap(), None, Start::Height(0), StreamConfig::with_history(&history)).unwrap();
    let mut model = vec![];
    for ev in drain(&mut stream, Duration::from_millis(200)) {
        apply(&mut model, &ev);
        store.save(ev.cursor_after()).unwrap();
    }
    node.stop().unwrap();
    copy_dir(&node_dir, &dir.path().join("older"));
    let node = RegtestNode::start(opts.clone()).unwrap();
    node.mine(6).unwrap();
    for ev in drain(&mut stream, Duration::from_millis(200)) {
        apply(&mut model, &ev);
        store.save(ev.cursor_after()).unwrap();
    }
    let lost: Vec<BlockHash> = model[21..].iter().rev().copied().collect();
    assert_eq!(lost.len(), 6);
    node.stop().unwrap();
    drop(stream); // the consumer stops too; only its cursor file and history remain

    std::fs::remove_dir_all(&node_dir).unwrap();
    std::fs::rename(dir.path().join("older"), &node_dir).unwrap();
    let node = RegtestNode::start(opts).unwrap();
    node.client().mine(2, &other_address()).unwrap();
    let c = node.client();
    assert!(c.header_state(&lost[0]).unwrap().is_none(), "the node does not know the lost blocks");
    let mut stream =
        BlockStream::resume(c.fresh().unwrap(), store.load().unwrap(), Start::Height(0), StreamConfig::with_history(&history)).unwrap();
    let evs = drain(&mut stream, Duration::from_millis(300));
    let disc: Vec<BlockHash> = evs.iter().take_while(|e| !e.is_connected()).map(|e| e.id().hash).collect();
    assert_eq!(disc, lost, "each lost block disconnected, newest first, down to the fork point");
    for ev in &evs {
        apply(&mut model, ev);
    }
    assert_eq!(model, active_chain(c), "then the node's branch connected");
}

/// Found by `bitmote drill` (a kill -9 right after a reorg): a node whose block filter index
/// is on another branch than its chain state refuses to start ("index may be corrupted"),
/// every time; so does one whose index names a block it does not know ("Please rebuild the
/// index"). Both simulated exactly, with the index of another node copied in while both are
/// stopped: the node starts anyway, having rebuilt its indexes, and serves its filters again.
#[test]
fn a_node_whose_filter_index_is_not_on_its_chain_starts_again_with_its_indexes_rebuilt() {
    use serde_json::{json, Value};
    let dir = tempfile::tempdir().unwrap();
    let opts_for = |name: &str| {
        let mut o = RegtestOptions::new(bitcoind());
        o.data_dir = Some(dir.path().join(name));
        o
    };
    let synced = |c: &ChainClient, height: u32| {
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let info: Value = c.raw("getindexinfo", &[json!("basic block filter index")]).unwrap();
            let idx = &info["basic block filter index"];
            if idx["synced"] == true && idx["best_block_height"] == height {
                return;
            }
            assert!(std::time::Instant::now() < deadline, "the filter index never caught up: {info}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    let filters = |n: &str| dir.path().join(n).join("regtest/indexes/blockfilter");
    let debug_log = |n: &str| std::fs::read_to_string(dir.path().join(n).join("regtest/debug.log")).unwrap();
    // The index of B, copied into A, then A started: it must come up with its own chain and
    // a rebuilt index, after bitcoind refused the first start with `refusal`.
    let swap_and_start = |a: &str, b: &str, tip: bitmote_chain::BlockId, refusal: &str| {
        std::fs::remove_dir_all(filters(a)).unwrap();
        copy_dir(&filters(b), &filters(a));
        let before = debug_log(a).len();
        let node = RegtestNode::start(opts_for(a)).unwrap();
        assert!(debug_log(a)[before..].contains(refusal), "the first start was refused with {refusal:?} (else this tests nothing)");
        assert_eq!(node.client().tip().unwrap(), tip, "the chain is as it was");
        synced(node.client(), tip.height);
        let f: Value = node.client().raw("getblockfilter", &[json!(tip.hash.to_string())]).unwrap();
        assert!(f["filter"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
        node
    };

    // 1. B's chain is its own: A does not know B's best block.
    let a = RegtestNode::start(opts_for("a")).unwrap();
    a.mine(20).unwrap();
    synced(a.client(), 20);
    let b = RegtestNode::start(opts_for("b")).unwrap();
    b.client().mine(25, &other_address()).unwrap();
    synced(b.client(), 25);
    let tip = a.client().tip().unwrap();
    a.stop().unwrap();
    b.stop().unwrap();
    let a = swap_and_start("a", "b", tip, "Please rebuild the index");

    // 2. The drill's case, as it happened: the chain state and the index flushed at the
    // tip (gettxoutsetinfo flushes), a reorg onto a longer branch (the index writes the new
    // branch's filters at once, its best block only at the next flush), then kill -9.
    let _: Value = a.client().raw("gettxoutsetinfo", &[json!("none")]).unwrap();
    let old = a.client().tip().unwrap();
    a.client().invalidate_block(&a.client().block_hash(16).unwrap().unwrap()).unwrap();
    a.client().mine(6, &other_address()).unwrap();
    synced(a.client(), 21);
    let mut a = a;
    a.kill().unwrap();
    let before = debug_log("a").len();
    let a = RegtestNode::start(opts_for("a")).unwrap();
    let log = &debug_log("a")[before..];
    eprintln!(
        "after the kill: tip {:?} (flushed tip {old:?}); refused: {}",
        a.client().tip().unwrap(),
        log.contains("index may be corrupted")
    );
    assert!(log.contains("index may be corrupted"), "the first start was refused (else this tests nothing)");
    let tip = a.client().tip().unwrap();
    synced(a.client(), tip.height);
    let f: Value = a.client().raw("getblockfilter", &[json!(tip.hash.to_string())]).unwrap();
    assert!(f["filter"].as_str().is_some_and(|s| !s.is_empty()), "{f}");
}
