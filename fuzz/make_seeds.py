#!/usr/bin/env python3
"""Write the seed corpora of the fuzz targets (fuzz/corpus/<target>/seed-*) from valid
inputs: encodings built by the formats' specifications (crates/device/src/reading.rs,
batch.rs, crates/pay/src/tick.rs, crates/actuator/src/command.rs), the README's rules, and
third-party vectors (OpenTimestamps .ots files, C2SP signed notes) from
/work/shared/vectors. Signatures are well-formed but not valid (decoders check form
only; the targets sign and verify what they decode themselves). Re-run after a format
change: `python3 fuzz/make_seeds.py [vectors-dir]`."""
import hashlib, json, os, shutil, struct, sys

ROOT = os.path.dirname(os.path.abspath(__file__))
VEC = sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "..", "..", "..", "shared", "vectors")
if not os.path.isdir(VEC):
    VEC = "/work/shared/vectors"
# BIP340 test vector 0's public key (secret key 3): a valid x-only key.
XONLY = bytes.fromhex("F9308A019258C31049344F85F89D5229B531C845836F99B08601F113BCE036F9")
PUBKEY = b"\x01" + XONLY


def tagged(tag, *parts):
    t = hashlib.sha256(tag).digest()
    return hashlib.sha256(t + t + b"".join(parts)).digest()


DEVICE = tagged(b"bitmote/device/v1", PUBKEY)
SIG = b"\x01" + bytes(range(64))
SIG_P256 = b"\x02" + bytes(64)


def reading(seq, value, sensor=1, unit=1, ts=1_700_000_000_000, device=DEVICE):
    head = b"\x01" + device + struct.pack(">QQHH", seq, ts, sensor, unit)
    kind, body = value
    if kind == "scaled":
        return head + b"\x01" + struct.pack(">qb", *body)
    if kind == "float":
        return head + b"\x02" + struct.pack(">d", body)
    return head + b"\x03" + struct.pack(">H", len(body)) + body


def signed(r, sig=SIG):
    return b"R" + struct.pack(">H", len(r)) + r + sig


def batch(rs, sig=SIG):
    return b"B" + struct.pack(">H", len(rs)) + b"".join(struct.pack(">H", len(r)) + r for r in rs) + sig


def write(target, name, data):
    d = os.path.join(ROOT, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "seed-" + name), "wb") as f:
        f.write(data if isinstance(data, bytes) else data.encode())


values = [("scaled", (2153, -2)), ("scaled", (-1, 127)), ("float", 21.5), ("float", -0.0), ("bytes", b""), ("bytes", b"hello"), ("bytes", bytes(1024))]
readings = [reading(i, v) for i, v in enumerate(values)]

# reading: first byte picks Reading / PublicKey / Signature / Evidence.
for i, r in enumerate(readings):
    write("reading", f"reading-{i}", b"\x00" + r)
write("reading", "key-schnorr", b"\x01" + PUBKEY)
write("reading", "key-p256", b"\x01" + b"\x02" + bytes.fromhex("036b17d1f2e12c4247f8bce6e563a440f277037d812deb33a0f4a13945d898c296"))
write("reading", "sig", b"\x02" + SIG)
write("reading", "evidence-single", b"\x03" + b"\x00" + SIG)
write("reading", "evidence-batch", b"\x03" + b"\x01" + struct.pack(">QIIB", 5, 4, 2, 2) + bytes(32) + bytes([1]) * 32 + SIG)

# submission: signed readings and batches (consecutive sequence numbers, one device).
for i, r in enumerate(readings[:4]):
    write("submission", f"reading-{i}", signed(r))
write("submission", "reading-p256sig", signed(readings[0], SIG_P256))
write("submission", "batch-1", batch(readings[:1]))
write("submission", "batch-7", batch(readings))
write("submission", "batch-33", batch([reading(100 + i, ("scaled", (i, 0))) for i in range(33)]))

# submission_json
def rjson(seq, value):
    return {"device": DEVICE.hex(), "seq": seq, "timestamp_ms": 1_700_000_000_000, "sensor": 1, "unit": 1, "value": value}
write("submission_json", "reading-scaled", json.dumps({"reading": rjson(1, {"scaled": [2153, -2]}), "signature": SIG.hex()}))
write("submission_json", "reading-float", json.dumps({"reading": rjson(2, {"float": 21.53}), "signature": SIG.hex()}))
write("submission_json", "reading-bytes", json.dumps({"reading": rjson(3, {"bytes": "00ff10"}), "signature": SIG.hex()}))
write("submission_json", "batch", json.dumps({"batch": [rjson(4, {"scaled": [1, 0]}), rjson(5, {"float": 1e-7}), rjson(6, {"bytes": ""})], "signature": SIG.hex()}))

# tick: a signed reading of sensor METER_TICK (8), unit Wh (5), 48-byte payload; then 9 bytes.
for i, (t, reg, amt, paid) in enumerate([(0, 0, 1, 1), (0, 1666, 417, 417), (3, 5000, 1250, 5000), (7, 2**40, 2**20, 2**33)]):
    payload = bytes(range(16)) + struct.pack(">QQQQ", t, reg, amt, paid)
    rec = signed(reading(40 + i, ("bytes", payload), sensor=8, unit=5))
    write("tick", f"record-{i}", rec + bytes([i]) + struct.pack(">Q", amt))

# command: 'BMC' 01 | seq | len | word | signature[64], as a raw OP_RETURN script (even
# first byte) or as the data of one push (odd first byte).
for i, (seq, word) in enumerate([(1, "unlock"), (5, "on"), (2**32 - 1, "*"), (7, "lock")]):
    p = b"BMC\x01" + struct.pack(">IB", seq, len(word)) + word.encode() + bytes(range(64))
    write("command", f"push-{i}", b"\x01" + p)
    write("command", f"script-{i}", b"\x00" + b"\x6a" + bytes([0x4c, len(p)]) + p)

# mqtt_front: first byte picks who is logged in (0 admin, 1 device by id, 2 named device).
def mqtt_str(s):
    s = s.encode()
    return struct.pack(">H", len(s)) + s

def remaining(n):
    out = b""
    while True:
        b, n = n % 128, n // 128
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out

def packet(kind, body):
    return bytes([kind]) + remaining(len(body)) + body

def connect(client_id, user, password, will=None):
    flags = 0x02 | 0xC0
    payload = mqtt_str(client_id)
    if will:
        flags |= 0x04 | 0x08
        payload += mqtt_str(will) + mqtt_str("offline")
    payload += mqtt_str(user) + mqtt_str(password)
    return packet(0x10, mqtt_str("MQTT") + bytes([4, flags]) + struct.pack(">H", 30) + payload)

def publish(topic, payload, qos=1, pid=1):
    body = mqtt_str(topic) + (struct.pack(">H", pid) if qos else b"") + payload
    return packet(0x30 | (qos << 1), body)

def subscribe(pid, *filters):
    return packet(0x82, struct.pack(">H", pid) + b"".join(mqtt_str(f) + b"\x01" for f in filters))

dev = DEVICE.hex()
write("mqtt_front", "admin", b"\x00" + connect("ops", "admin", "token") + subscribe(1, "bitmote/+/readings") + publish("bitmote/x/commands", b"{}"))
write("mqtt_front", "device", b"\x01" + connect("d", dev, "pw", will=f"bitmote/{dev}/presence") + publish(f"bitmote/{dev}/readings", signed(readings[0])) + subscribe(2, f"bitmote/{dev}/commands", f"bitmote/{dev}/#") + bytes([0xc0, 0]) + bytes([0x40, 2, 0, 1]))
write("mqtt_front", "named", b"\x02" + connect("", "pump", "pw") + publish("bitmote/pump/acks", b"ok", qos=0) + publish("bitmote/other/readings", b"x") + bytes([0xe0, 0]))

# rules (TOML, as README.md) and one rule as JSON.
toml_rules = f'''[[rule]]
id = "rental-7"
device = "lock-7"
trigger = {{ kind = "payment", address = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080", min_sat = 20000, confirmations = 1 }}
action = {{ command = "unlock" }}
revert = {{ command = "lock" }}
ttl_secs = 600

[[rule]]
id = "lease-end"
device = "relay-2"
trigger = {{ kind = "height", height = 900 }}
action = {{ command = "off", args = {{ level = 3, names = ["a", "b"] }} }}

[[rule]]
id = "remote"
device = "relay-2"
trigger = {{ kind = "command", key = "{PUBKEY.hex()}" }}
action = {{ command = "*" }}

[[rule]]
id = "coffee"
device = "lock-7"
trigger = {{ kind = "lightning", amount_msat = 50000, expiry_secs = 600 }}
action = {{ command = "unlock", webhook = {{ url = "http://127.0.0.1:9/hook", secret_file = "/etc/hostname", timeout_secs = 5 }} }}
ttl_secs = 600
'''
write("rules_toml", "readme", toml_rules)
for i, block in enumerate(toml_rules.split("\n\n")):
    write("rules_toml", f"rule-{i}", block + "\n")
rules_json = [
    {"id": "rental-7", "device": "lock-7", "trigger": {"kind": "payment", "address": "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080", "min_sat": 20000, "confirmations": 1}, "action": {"command": "unlock"}, "revert": {"command": "lock"}, "ttl_secs": 600},
    {"id": "lease-end", "device": "relay-2", "trigger": {"kind": "height", "height": 900}, "action": {"command": "off", "args": {"level": 3.5, "l": [1, "x", None, True]}}},
    {"id": "remote", "device": "relay-2", "trigger": {"kind": "command", "key": PUBKEY.hex(), "confirmations": 2}, "action": {"command": "*", "exec": {"program": "/bin/true", "args": ["-x"]}}},
    {"id": "coffee", "device": "lock-7", "trigger": {"kind": "lightning", "amount_msat": 50000}, "action": {"command": "unlock"}, "ttl_secs": 600},
]
for i, r in enumerate(rules_json):
    write("rules_json", f"rule-{i}", json.dumps(r))

# proof_bundle: even first byte = bundle JSON, odd = headers file.
anchor_pending = {"status": "pending", "message": "waiting for the next anchor"}
bundle = {
    "version": 1, "reading": readings[0].hex(), "reading_id": tagged(b"bitmote/reading/v1", readings[0]).hex(),
    "device_key": PUBKEY.hex(), "evidence": {"kind": "signature", "signature": SIG.hex()},
    "log": {"leaf_index": 0, "tree_size": 1, "root": bytes(32).hex(), "path": []},
    "anchor": anchor_pending,
}
write("proof_bundle", "bundle-pending", b"\x00" + json.dumps(bundle).encode())
hdr = "0100000000000000000000000000000000000000000000000000000000000000000000003ba3edfd7a7b12b27ac72c3e67768f617fc81bc3888a51323a9fb8aa4b1e5e4adae5494dffff7f2002000000"
write("proof_bundle", "headers", b"\x01" + f"# regtest genesis\n0 {hdr}\n".encode())

# ots: third-party .ots files (small ones).
ots_dir = os.path.join(VEC, "opentimestamps")
for dirpath, _, files in os.walk(ots_dir):
    for f in sorted(files):
        p = os.path.join(dirpath, f)
        if f.endswith(".ots") and os.path.getsize(p) <= 16384:
            write("ots", os.path.relpath(p, ots_dir).replace("/", "_"), open(p, "rb").read())

# checkpoint: first line a verifier key, then a note (C2SP signed notes, serverless-log checkpoints).
note_vec = json.load(open(os.path.join(VEC, "signed-note", "vectors.json")))
for n in note_vec["notes"][:20]:
    vkey = (n.get("vkeys") or ["x+00000000+AQ=="])[0]
    write("checkpoint", "note-" + n["id"], vkey.encode() + b"\n" + open(os.path.join(VEC, "signed-note", n["file"]), "rb").read())
for i, v in enumerate(note_vec["invalid_vkeys"][:4]):
    write("checkpoint", f"bad-vkey-{i}", v["vkey"] + "\n")
for i, b in enumerate(note_vec["checkpoint_bodies"][:12]):
    write("checkpoint", f"body-{i}", "x+00000000+AQ==\n" + b["body"])
log = os.path.join(VEC, "signed-note", "serverless-log", "testdata", "log")
for f in sorted(os.listdir(log)):
    if f.startswith("checkpoint"):
        write("checkpoint", f"serverless-{f}", "example.com/log+00000000+AQ==\n" + open(os.path.join(log, f)).read())
print("seeds written under", os.path.join(ROOT, "corpus"))
