//! Delivery of actions that do not go over MQTT: signed webhooks and local programs.
//! Each call is one attempt; `Ok` means acknowledged, `Err` says why not (it is retried).
//!
//! A webhook is `POST <url>` with the action JSON (see
//! [`OutboxItem::payload`](bitmote_actuator::OutboxItem::payload)) and the headers
//! `X-Bitmote-Event: <event id>`, `X-Bitmote-Timestamp: <unix seconds>` and
//! `X-Bitmote-Signature: sha256=<hex HMAC-SHA256(secret, timestamp "." body)>`. A receiver
//! checks the signature, refuses stale timestamps, and acts once per event id: the same
//! id comes on every retry. Any 2xx answer acknowledges; redirects are not followed.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use bitmote_actuator::{Exec, Webhook};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// The `X-Bitmote-Signature` value of `body` sent at `timestamp`.
pub fn signature(secret: &[u8], timestamp: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).expect("HMAC accepts keys of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// One webhook attempt.
pub fn webhook(w: &Webhook, event_id: &str, payload: &bitmote_proto::Command) -> Result<(), String> {
    let secret = w.secret()?;
    let body = bitmote_proto::encode(payload);
    let ts = (bitmote_chain::now_ms() / 1000).to_string();
    let agent = ureq::AgentBuilder::new().timeout(w.timeout()).redirects(0).build();
    let sent = agent
        .post(&w.url)
        .set("Content-Type", "application/json")
        .set("X-Bitmote-Event", event_id)
        .set("X-Bitmote-Timestamp", &ts)
        .set("X-Bitmote-Signature", &signature(&secret, &ts, &body))
        .send_bytes(&body);
    match sent {
        Ok(r) if (200..300).contains(&r.status()) => Ok(()),
        Ok(r) => Err(format!("{} answered HTTP {}", w.url, r.status())),
        Err(ureq::Error::Status(code, _)) => Err(format!("{} answered HTTP {code}", w.url)),
        Err(e) => Err(format!("{}: {e}", w.url)),
    }
}

/// One run of the program, killed after its timeout.
pub fn exec(e: &Exec, event_id: &str, payload: &bitmote_proto::Command) -> Result<(), String> {
    let name = e.program.display();
    let mut child = Command::new(&e.program)
        .args(&e.args)
        .env("BITMOTE_EVENT_ID", event_id)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .map_err(|err| format!("starting {name}: {err}"))?;
    // A writer thread, so a program that does not read its input cannot block us past the timeout.
    if let Some(mut stdin) = child.stdin.take() {
        let body = bitmote_proto::encode(payload);
        std::thread::spawn(move || stdin.write_all(&body));
    }
    let deadline = Instant::now() + e.timeout();
    loop {
        match child.try_wait() {
            Ok(Some(s)) if s.success() => return Ok(()),
            Ok(Some(s)) => return Err(format!("{name} failed ({s})")),
            Ok(None) if Instant::now() >= deadline => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{name} did not finish within {:?}; killed", e.timeout()));
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => return Err(format!("waiting for {name}: {err}")),
        }
    }
}
