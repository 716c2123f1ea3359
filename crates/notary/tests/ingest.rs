//! Crash safety of ingest: a process that ingests under load is killed with SIGKILL,
//! several times; after each kill every reading it acknowledged is in the log and
//! provable, and the log, the readings and the registry agree with each other.
//!
//! The child is this test binary re-executed with `CHILD_ENV` set, running only
//! `crash_child`, which prints `ACK <leaf index> <reading id> <device> <seq>` for each
//! receipt (i.e. after the commit that made the reading durable).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bitmote_chain::now_ms;
use bitmote_device::merkle::{self, verify_inclusion};
use bitmote_device::reading::{sensor, unit};
use bitmote_device::{DeviceId, Reading, SignedBatch, SignedReading, SigningKey, Value};
use bitmote_notary::ingest::{self, IngestConfig, Ingestor};
use bitmote_notary::registry::Store;

const CHILD_ENV: &str = "BITMOTE_NOTARY_CRASH_CHILD_DB";
const DEVICES: u8 = 4;

fn key(i: u8) -> SigningKey {
    if i.is_multiple_of(2) { SigningKey::p256_from_secret(&[i + 40; 32]) } else { SigningKey::schnorr_from_secret(&[i + 40; 32]) }.unwrap()
}

fn reading(k: &SigningKey, seq: u64) -> Reading {
    Reading {
        device: k.public_key().device_id(),
        seq,
        timestamp_ms: now_ms(),
        sensor: sensor::POWER,
        unit: unit::WATT,
        value: Value::Scaled { mantissa: seq as i64 * 3, exponent: -1 },
    }
}

/// Child mode: ingest from several threads until killed (or 120 s, should the parent vanish).
#[test]
fn crash_child() {
    let Ok(db) = std::env::var(CHILD_ENV) else { return };
    let ing = Arc::new(Ingestor::start(Path::new(&db), IngestConfig::default()).unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    let threads: Vec<_> = (0..DEVICES)
        .map(|i| {
            let ing = ing.clone();
            std::thread::spawn(move || {
                let k = key(i);
                let id = k.public_key().device_id();
                let mut seq = ing.device(&id).and_then(|d| d.last_seq).unwrap_or(0) + 1;
                while Instant::now() < deadline {
                    // Mostly single readings, every 8th submission a batch of 5.
                    let receipts = if seq.is_multiple_of(8) {
                        let b = SignedBatch::sign(&k, (seq..seq + 5).map(|s| reading(&k, s)).collect()).unwrap();
                        ing.submit_batch(b).unwrap()
                    } else {
                        ing.submit_reading(SignedReading::sign(&k, reading(&k, seq)).unwrap()).unwrap()
                    };
                    for r in receipts {
                        println!("ACK {} {} {} {}", r.leaf_index, hex::encode(r.reading_id), id, seq);
                        seq += 1;
                    }
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
}

struct Ack {
    index: u64,
    id: [u8; 32],
    device: DeviceId,
    seq: u64,
}

fn parse_ack(line: &str) -> Option<Ack> {
    let mut w = line.strip_prefix("ACK ")?.split(' ');
    let index = w.next()?.parse().ok()?;
    let id = hex::decode(w.next()?).ok()?.try_into().ok()?;
    let device = w.next()?.parse().ok()?;
    let seq = w.next()?.parse().ok()?;
    Some(Ack { index, id, device, seq })
}

/// Run the child until it has acknowledged `min_acks` readings, SIGKILL it, and
/// return every acknowledgement it printed.
fn run_and_kill(db: &Path, min_acks: usize) -> Vec<Ack> {
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, db)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut acks = vec![];
    let start = Instant::now();
    while acks.len() < min_acks {
        match lines.next() {
            Some(Ok(l)) => acks.extend(parse_ack(&l)),
            _ => break,
        }
        assert!(start.elapsed() < Duration::from_secs(300), "child too slow: {} acks", acks.len());
    }
    assert!(acks.len() >= min_acks, "child ended early after {} acks", acks.len());
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // Whatever it printed before dying was acknowledged too.
    for l in lines.map_while(Result::ok) {
        acks.extend(parse_ack(&l));
    }
    acks
}

/// Everything acknowledged is there and provable; log, readings and registry agree.
fn check(db: &Path, acks: &[Ack]) -> u64 {
    let store = Store::open(db).unwrap();
    let log = store.log();
    log.audit().unwrap();
    let (size, root) = log.head().unwrap();
    // The root recomputed from the stored readings is the stored root.
    let mut leaves = Vec::with_capacity(size as usize);
    let mut last_seq: HashMap<DeviceId, u64> = HashMap::new();
    for i in 0..size {
        let r = ingest::reading_at(store.conn(), i).unwrap().unwrap_or_else(|| panic!("leaf {i} has no reading"));
        assert_eq!(r.leaf_index, i);
        leaves.push(merkle::leaf_hash(&r.leaf()));
        let s = last_seq.entry(r.reading.device).or_insert(0);
        assert!(r.reading.seq > *s, "sequence numbers of a device increase along the log");
        *s = r.reading.seq;
    }
    assert!(ingest::reading_at(store.conn(), size).unwrap().is_none(), "no reading beyond the log");
    assert_eq!(merkle::root(&leaves), root);
    // The registry's last sequence numbers are those of the log.
    for d in store.registry().list().unwrap() {
        assert_eq!(d.last_seq, last_seq.get(&d.id).copied(), "last_seq of {}", d.name);
    }
    // Every acknowledged reading: at its index, with its id, provable.
    for a in acks {
        assert!(a.index < size, "acknowledged leaf {} is beyond the log of {size}", a.index);
        let r = ingest::reading_at(store.conn(), a.index).unwrap().unwrap();
        assert_eq!((r.reading.id(), r.reading.device, r.reading.seq), (a.id, a.device, a.seq));
        let p = log.inclusion_proof(a.index, size).unwrap();
        verify_inclusion(a.index, size, &leaves[a.index as usize], &p, &root).unwrap();
        let key = store.registry().get(&a.device).unwrap().unwrap().pubkey;
        r.evidence.verify(&key, &r.reading).unwrap();
    }
    size
}

#[test]
fn acknowledged_readings_survive_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("notary.sqlite");
    {
        let store = Store::open(&db).unwrap();
        for i in 0..DEVICES {
            store.registry().enroll(&key(i).public_key(), None).unwrap();
        }
    }
    let mut all: Vec<Ack> = vec![];
    let mut size = 0;
    // Kill at a different point of the load each round.
    for (round, min_acks) in [300usize, 557, 1009].into_iter().enumerate() {
        let acks = run_and_kill(&db, min_acks);
        all.extend(acks);
        let new_size = check(&db, &all);
        assert!(new_size >= size + min_acks as u64, "round {round}: the log grew from {size} to {new_size}");
        size = new_size;
    }
    // The acknowledged indices are distinct (no leaf acknowledged twice).
    let mut idx: Vec<u64> = all.iter().map(|a| a.index).collect();
    idx.sort();
    idx.dedup();
    assert_eq!(idx.len(), all.len());
}
