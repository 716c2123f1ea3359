//! `bitmote bench notary`: the notary's throughput against this machine's limits,
//! measured in the same run (BIP340 verification and SHA-256 rates), on a real
//! durable database and a real regtest anchor.

use crate::Env;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bitmote_chain::now_ms;
use bitmote_device::merkle::{self, inclusion_proof_len};
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{Reading, SignedBatch, SignedReading, SigningKey, Value};
use bitmote_notary::anchor::{AnchorConfig, Anchorer, LogHead};
use bitmote_notary::ingest::{IngestConfig, Ingestor, Submission};
use bitmote_notary::log::MerkleLog;
use bitmote_notary::proof::assemble;
use bitmote_notary::registry::open_db;
use bitmote_notary::verify::{verify_bundle, HeadersFile, Policy};
use bitmote_regtest::{RegtestNode, RegtestOptions};
use serde_json::json;

const THREADS: usize = 2;

fn reading(k: &SigningKey, seq: u64) -> Reading {
    Reading {
        device: k.public_key().device_id(),
        seq,
        timestamp_ms: now_ms(),
        sensor: sensor::POWER,
        unit: unit::WATT,
        value: Value::Scaled { mantissa: 1000 + (seq % 977) as i64, exponent: 0 },
    }
}

/// Run `f(thread, i)` for `i` in a shared counter until `d` passes, on `threads` threads; ops/s.
fn rate(threads: usize, d: Duration, f: impl Fn(usize, u64) + Sync) -> f64 {
    let n = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|s| {
        for t in 0..threads {
            let (n, f) = (&n, &f);
            s.spawn(move || {
                let mut i = 0u64;
                while start.elapsed() < d {
                    for _ in 0..64 {
                        f(t, i);
                        i += 1;
                    }
                    n.fetch_add(64, Ordering::Relaxed);
                }
            });
        }
    });
    n.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// Ingest pre-signed submissions from `THREADS` threads without waiting in between
/// (as many devices would); returns readings/s once the last one is durable.
fn ingest_rate(ing: &Ingestor, subs: Vec<Vec<Submission>>) -> f64 {
    let total: usize = subs.iter().flatten().map(|s| s.len()).sum();
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    std::thread::scope(|s| {
        for part in subs {
            let (done, failed) = (done.clone(), failed.clone());
            s.spawn(move || {
                for sub in part {
                    let (done, failed) = (done.clone(), failed.clone());
                    ing.submit_with(sub, move |r| match r {
                        Ok(v) => {
                            done.fetch_add(v.len() as u64, Ordering::Relaxed);
                        }
                        Err(e) => {
                            eprintln!("ingest refused: {e}");
                            failed.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            });
        }
    });
    while done.load(Ordering::Relaxed) + failed.load(Ordering::Relaxed) < total as u64 && failed.load(Ordering::Relaxed) == 0 {
        std::thread::sleep(Duration::from_millis(1));
    }
    total as f64 / start.elapsed().as_secs_f64()
}

pub fn run(env: &Env, n_single: usize, n_batched: usize, batch_size: usize, json_out: bool) -> Result<()> {
    let batch_size = batch_size.clamp(1, bitmote_device::batch::MAX_BATCH);
    eprintln!("measuring the machine's limits …");
    // (a) Limits: BIP340 verification and SHA-256, on 1 and 2 threads.
    let keys: Vec<SigningKey> = (1..=8u8).map(|i| SigningKey::schnorr_from_secret(&[i; 32]).expect("valid secret")).collect();
    let sample: Vec<SignedReading> =
        (0..512).map(|i| SignedReading::sign(&keys[i % 8], reading(&keys[i % 8], i as u64 + 1)).expect("signs")).collect();
    let pks: Vec<_> = keys.iter().map(|k| k.public_key()).collect();
    let verify = |_t: usize, i: u64| {
        let s = &sample[(i % 512) as usize];
        std::hint::black_box(pks[(i % 512) as usize % 8].verify(&s.reading.id(), &s.signature)).ok();
    };
    let d = Duration::from_millis(1500);
    let sig1 = rate(1, d, verify);
    let sig2 = rate(THREADS, d, verify);
    let block = [7u8; 64];
    let sha1 = rate(1, d, |_, i| {
        std::hint::black_box(merkle::leaf_hash(&[&block[..56], &i.to_le_bytes()].concat()));
    });

    // (b) Individually signed readings, durable, from 2 submitting threads.
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("notary.sqlite");
    let ing = Ingestor::start(&db, IngestConfig::default())?;
    let batch_keys: Vec<SigningKey> = (101..=108u8).map(|i| SigningKey::schnorr_from_secret(&[i; 32]).expect("valid")).collect();
    for k in keys.iter().chain(&batch_keys) {
        ing.enroll(&k.public_key(), None)?;
    }
    eprintln!("signing {n_single} readings (device side, not timed) …");
    let mut parts: Vec<Vec<Submission>> = vec![vec![]; THREADS];
    for i in 0..n_single {
        let dev = i % 8;
        let k = &keys[dev];
        let seq = (i / 8) as u64 + 1;
        parts[dev % THREADS].push(Submission::Reading(SignedReading::sign(k, reading(k, seq)).expect("signs")));
    }
    eprintln!("ingesting …");
    let single = ingest_rate(&ing, parts);

    // (c) Device-signed batches.
    eprintln!("signing {n_batched} readings in batches of {batch_size} (device side, not timed) …");
    let mut parts: Vec<Vec<Submission>> = vec![vec![]; THREADS];
    let mut next_seq = [1u64; 8];
    let mut made = 0usize;
    let mut dev = 0usize;
    while made < n_batched {
        let n = batch_size.min(n_batched - made);
        let k = &batch_keys[dev];
        let rs: Vec<Reading> = (0..n as u64).map(|j| reading(k, next_seq[dev] + j)).collect();
        next_seq[dev] += n as u64;
        parts[dev % THREADS].push(Submission::Batch(SignedBatch::sign(k, rs).expect("signs")));
        made += n;
        dev = (dev + 1) % 8;
    }
    eprintln!("ingesting batches …");
    let batched = ingest_rate(&ing, parts);
    let stats = ing.stats();
    ing.shutdown();

    // (d) Proofs: anchor the log on a private regtest node, then generate and verify.
    eprintln!("anchoring on a private regtest node …");
    let node = RegtestNode::start(RegtestOptions::new(env.bitcoind.clone()))?;
    let c = node.client();
    let cfg = AnchorConfig { interval: Duration::ZERO, ..Default::default() };
    let signer = bitmote_notary::checkpoint::CheckpointSigner::from_seed("bitmote.bench/log", [1; 32]);
    let mut anchorer = Anchorer::open(&db, &dir.path().join("wallet"), c.fresh()?, cfg, signer)?;
    let addr = anchorer.wallet().new_address()?;
    c.mine(1, &addr)?;
    node.mine(100)?;
    let conn = open_db(&db)?;
    let log = MerkleLog::new(&conn);
    let size = log.size()?;
    let head = LogHead { size, root: log.root_at(size)? };
    anchorer.poll(None)?;
    anchorer.poll(Some(head))?;
    node.mine(1)?;
    anchorer.poll(Some(head))?;
    let anchor = anchorer.list()?.into_iter().next().context("no anchor")?;
    let fee = anchor.fee_sat;
    let height = anchor.block_height.context("anchor not confirmed")?;
    let mut headers = HeadersFile::default();
    headers.insert(height, c.header(&c.block_hash(height)?.context("block")?)?);
    let ids: Vec<[u8; 32]> = {
        let mut st = conn.prepare("SELECT id FROM readings WHERE idx % 997 = 0")?;
        let rows = st.query_map([], |r| r.get::<_, Vec<u8>>(0))?;
        rows.filter_map(|r| r.ok()?.try_into().ok()).collect()
    };
    let t = Instant::now();
    let bundles: Vec<_> = ids.iter().map(|id| assemble(&conn, c, id, None)).collect::<Result<_, _>>()?;
    let gen_rate = bundles.len() as f64 / t.elapsed().as_secs_f64();
    let t = Instant::now();
    for b in &bundles {
        verify_bundle(b, &headers, &Policy::default())?;
    }
    let verify_rate = bundles.len() as f64 / t.elapsed().as_secs_f64();
    let sizes_seen: Vec<usize> = bundles.iter().map(|b| serde_json::to_vec(b).map(|v| v.len()).unwrap_or(0)).collect();
    let ots_seen: Vec<usize> = bundles.iter().filter_map(|b| b.to_ots().ok()?.serialize().ok()).map(|v| v.len()).collect();
    node.stop()?;

    // (e) Proof sizes at 10^3, 10^6, 10^9 leaves: a real bundle from this run, with its log
    // path replaced by one of the length the larger log needs (worst-case index).
    let sample_bundle = bundles.last().context("no bundle")?.clone();
    let mut size_rows = vec![];
    for n in [1_000u64, 1_000_000, 1_000_000_000] {
        let worst = (0..n).step_by((n / 1000).max(1) as usize).map(|i| inclusion_proof_len(i, n)).max().unwrap_or(0);
        let mut b = sample_bundle.clone();
        b.log.path = vec!["00".repeat(32); worst];
        b.log.tree_size = n;
        let json_len = serde_json::to_vec(&b)?.len();
        // .ots: each level costs a prepend/append op with the sibling and a sha256 op.
        let ots_base = *ots_seen.last().unwrap_or(&0) as i64 - (sample_bundle.log.path.len() as i64) * 36;
        let ots_len = ots_base + worst as i64 * 36;
        size_rows.push(json!({ "leaves": n, "path_hashes": worst, "bundle_json_bytes": json_len, "ots_bytes_approx": ots_len }));
    }

    let report = json!({
        "bench": "notary", "threads": THREADS,
        "limit_bip340_verify_per_s": { "1_thread": sig1, "2_threads": sig2 },
        "limit_sha256_leaf_hashes_per_s_1_thread": sha1,
        "ingest_signed_readings_per_s": single, "ratio_signed_vs_verify_limit": single / sig2,
        "ingest_batched_readings_per_s": batched, "batch_size": batch_size,
        "groups": stats.groups, "mean_group": stats.mean_group,
        "log_size": size, "anchor_fee_sat": fee, "fee_per_reading_sat": fee as f64 / size as f64,
        "proof_generation_per_s": gen_rate, "proof_verification_per_s": verify_rate,
        "proof_bundle_bytes_seen": sizes_seen.iter().max(), "ots_bytes_seen": ots_seen.iter().max(),
        "proof_sizes": size_rows,
    });
    println!("notary benchmark ({} cores used, durable SQLite with synchronous=FULL)", THREADS);
    println!("  limit: BIP340 verify         {:>10.0}/s (1 thread)  {:>10.0}/s (2 threads)", sig1, sig2);
    println!("  limit: SHA-256 leaf hashes   {:>10.0}/s (1 thread)", sha1);
    println!("  (b) signed readings ingested {:>10.0}/s  = {:.0}% of the 2-thread verify limit", single, 100.0 * single / sig2);
    println!(
        "  (c) batched readings         {:>10.0}/s  (batches of {batch_size}, {} commits, mean group {:.0} readings)",
        batched, stats.groups, stats.mean_group
    );
    println!(
        "  (d) proof generation         {:>10.0}/s  (DB + RPC block fetch)   verification {:>10.0}/s (offline headers)",
        gen_rate, verify_rate
    );
    println!("      one anchor: {fee} sat for {size} readings = {:.6} sat/reading", fee as f64 / size as f64);
    for r in &size_rows {
        println!(
            "  (e) proof at {:>13} leaves: {:>2} log hashes, bundle {:>5} B JSON, .ots ~{:>5} B",
            r["leaves"], r["path_hashes"], r["bundle_json_bytes"], r["ots_bytes_approx"]
        );
    }
    if json_out {
        println!("{report}");
    }
    Ok(())
}
