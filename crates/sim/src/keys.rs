//! A device's files beside its key: the key itself (`schnorr:<hex>` or `p256:<hex>`,
//! 0600), its MQTT password (`<key>.mqtt`) and its next sequence number (`<key>.seq`);
//! and enrolment with the gateway, as `bitmote device enroll` and the fleet do it.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use bitmote_device::{PublicKey, SigningKey};
use bitmote_proto::client::Gateway;
use bitmote_proto::notary::Enrolment;

/// Key file: `schnorr:<hex secret>` or `p256:<hex secret>`.
pub fn read_key(path: &Path) -> Result<SigningKey> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading key {}", path.display()))?;
    let (kind, hex) = text.trim().split_once(':').context("key file must be `schnorr:<hex>` or `p256:<hex>`")?;
    let secret: [u8; 32] = hex::decode(hex).ok().and_then(|v| v.try_into().ok()).context("key secret must be 32 bytes of hex")?;
    match kind {
        "schnorr" => SigningKey::schnorr_from_secret(&secret),
        "p256" => SigningKey::p256_from_secret(&secret),
        other => bail!("unknown key type {other:?}"),
    }
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Write a new key file (0600), never over an existing one: a device key is its identity.
pub fn write_key(path: &Path, k: &SigningKey) -> Result<()> {
    let kind = match k {
        SigningKey::Schnorr(_) => "schnorr",
        SigningKey::P256(_) => "p256",
    };
    bitmote_chain::wallet::create_secret(path, format!("{kind}:{}\n", hex::encode(k.secret_bytes())).as_bytes())?;
    Ok(())
}

/// A fresh random device key (BIP340, or P-256).
pub fn new_key(p256: bool) -> Result<SigningKey> {
    loop {
        let mut s = [0u8; 32];
        getrandom::getrandom(&mut s)?;
        let k = if p256 { SigningKey::p256_from_secret(&s) } else { SigningKey::schnorr_from_secret(&s) };
        if let Ok(k) = k {
            return Ok(k);
        }
    }
}

/// Where `device enroll --key K` writes the MQTT password: beside the key, `K` with extension `.mqtt`.
pub fn mqtt_file(key: &Path) -> PathBuf {
    key.with_extension("mqtt")
}

/// The next sequence number is kept beside the key, so a restarted device never reuses one.
pub fn seq_file(key: &Path) -> PathBuf {
    key.with_extension("seq")
}

/// The device's MQTT password: from `file`, or else from beside its key if there is one.
pub fn mqtt_password(file: Option<&Path>, key: Option<&Path>) -> Result<Option<String>> {
    let path = match (file, key) {
        (Some(f), _) => f.to_path_buf(),
        (None, Some(k)) if mqtt_file(k).exists() => mqtt_file(k),
        _ => return Ok(None),
    };
    let p = std::fs::read_to_string(&path).with_context(|| format!("reading the MQTT password {}", path.display()))?;
    Ok(Some(p.trim().to_string()))
}

/// Enrol a device key with the gateway (admin): what `bitmote device enroll` and the
/// simulated fleet both do.
pub fn enroll(gw: &Gateway, pk: &PublicKey, name: Option<&str>) -> Result<Enrolment> {
    Ok(gw.enroll(&pk.to_string(), name)?)
}

/// Make sure the device key at `key` exists, is enrolled under `name` and has its MQTT
/// password beside it (`<key>.mqtt`): what the simulated fleet does for each member. Safe to
/// repeat after a crash at any point: enrolling a key again issues it a new password.
pub fn ensure_enrolled(gw: &Gateway, key: &Path, name: &str) -> Result<()> {
    if !key.exists() {
        write_key(key, &new_key(false)?)?;
    }
    let f = mqtt_file(key);
    if f.exists() {
        return Ok(());
    }
    let pk = read_key(key)?.public_key();
    let answer = enroll(gw, &pk, Some(name)).with_context(|| format!("enrolling {name}"))?;
    bitmote_chain::wallet::write_secret(&f, format!("{}\n", answer.mqtt.password).as_bytes())?;
    Ok(())
}

/// Why the broker refused a login, and what to do about it.
pub(crate) fn refused_login(code: rumqttc::ConnectReturnCode) -> String {
    format!(
        "the MQTT broker refused the login ({code:?}): enrol the device (`bitmote device enroll --key FILE --name NAME` writes \
         its password to FILE.mqtt) and give its password (--mqtt-password-file, or --key for actuators)"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_file_round_trips_and_is_never_overwritten() {
        let dir = std::env::temp_dir().join(format!("bitmote-sim-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for p256 in [false, true] {
            let path = dir.join(format!("k{p256}.key"));
            let k = new_key(p256).unwrap();
            write_key(&path, &k).unwrap();
            assert_eq!(read_key(&path).unwrap().public_key(), k.public_key());
            assert!(write_key(&path, &new_key(p256).unwrap()).is_err(), "an existing key is never overwritten");
            assert_eq!(read_key(&path).unwrap().public_key(), k.public_key());
        }
        std::fs::write(dir.join("bad.key"), "rsa:00").unwrap();
        assert!(read_key(&dir.join("bad.key")).is_err());
        assert_eq!(mqtt_password(None, Some(&dir.join("k.key"))).unwrap(), None);
        std::fs::write(dir.join("k.mqtt"), "pw\n").unwrap();
        assert_eq!(mqtt_password(None, Some(&dir.join("k.key"))).unwrap().as_deref(), Some("pw"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
