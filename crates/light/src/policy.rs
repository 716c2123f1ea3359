//! The device's own payment policy: what it accepts payments to and how much, whatever a
//! (possibly compromised) gateway claims. Addresses are pinned one by one, or as an output
//! descriptor (an xpub's addresses, e.g. the gateway wallet's receive descriptor from
//! `GET /v1/wallet`, whose fresh address per payment order is then accepted without
//! re-configuring the device).

use std::collections::HashSet;
use std::str::FromStr;

use bitcoin::{Address, Network, ScriptBuf};
use miniscript::descriptor::{Descriptor, DescriptorPublicKey};

/// Addresses a descriptor policy derives at most, by default (index 0 to this, exclusive).
pub const DEFAULT_MAX_INDEX: u32 = 10_000;

/// Why a policy cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error(
        "a light-client device needs its own payment policy: --pay-to ADDRESS or --pay-to-descriptor DESC \
         (where it is paid) and --min-sat N (N > 0); without them it would accept any amount to any address the gateway names"
    )]
    Missing,
    #[error("address {0}")]
    Address(String),
    #[error("descriptor {0}")]
    Descriptor(String),
}

/// See the module doc.
#[derive(Debug)]
pub struct PaymentPolicy {
    /// The least amount accepted, whatever a command claims.
    pub min_sat: u64,
    pinned: HashSet<ScriptBuf>,
    descriptors: Vec<Derived>,
}

#[derive(Debug)]
struct Derived {
    desc: Descriptor<DescriptorPublicKey>,
    /// Scripts derived so far (indexes `0..next`).
    known: HashSet<ScriptBuf>,
    next: u32,
    max: u32,
}

impl PaymentPolicy {
    /// A policy accepting `min_sat` or more to any of `addresses` (on `network`) or to the
    /// first `max_index` addresses of any of `descriptors` (public keys only; multipath
    /// `<0;1>` descriptors count each path).
    pub fn new(network: Network, addresses: &[String], descriptors: &[String], max_index: u32, min_sat: u64) -> Result<Self, PolicyError> {
        if min_sat == 0 || (addresses.is_empty() && descriptors.is_empty()) {
            return Err(PolicyError::Missing);
        }
        let pinned = addresses
            .iter()
            .map(|a| {
                let addr = Address::from_str(a).map_err(|e| PolicyError::Address(format!("{a}: {e}")))?;
                Ok(addr
                    .require_network(network)
                    .map_err(|_| PolicyError::Address(format!("{a} is not a {network} address")))?
                    .script_pubkey())
            })
            .collect::<Result<_, PolicyError>>()?;
        let mut derived = vec![];
        for d in descriptors {
            let desc = Descriptor::<DescriptorPublicKey>::from_str(d).map_err(|e| {
                if d.contains("prv") {
                    PolicyError::Descriptor("holds a private key: give the device the public descriptor only".into())
                } else {
                    PolicyError::Descriptor(format!("{d}: {e}"))
                }
            })?;
            let singles = desc.into_single_descriptors().map_err(|e| PolicyError::Descriptor(format!("{d}: {e}")))?;
            for desc in singles {
                let max = if desc.has_wildcard() { max_index.max(1) } else { 1 };
                derived.push(Derived { desc, known: HashSet::new(), next: 0, max });
            }
        }
        let mut p = PaymentPolicy { min_sat, pinned, descriptors: derived };
        // A descriptor that cannot derive its first address (hardened steps after a wildcard, …) is refused now.
        for d in &mut p.descriptors {
            d.derive_to(1).map_err(PolicyError::Descriptor)?;
        }
        Ok(p)
    }

    /// Whether a payment to `script` is one this device accepts (derives a descriptor's
    /// addresses as far as needed, once).
    pub fn accepts(&mut self, script: &ScriptBuf) -> bool {
        if self.pinned.contains(script) {
            return true;
        }
        self.descriptors.iter_mut().any(|d| d.known.contains(script) || d.find(script))
    }
}

impl Derived {
    fn derive_to(&mut self, end: u32) -> Result<(), String> {
        while self.next < end.min(self.max) {
            let s =
                self.desc.at_derivation_index(self.next).map_err(|e| format!("{}: index {}: {e}", self.desc, self.next))?.script_pubkey();
            self.known.insert(s);
            self.next += 1;
        }
        Ok(())
    }

    /// Derive on until `script` turns up or the range ends.
    fn find(&mut self, script: &ScriptBuf) -> bool {
        while self.next < self.max {
            let Ok(d) = self.desc.at_derivation_index(self.next) else { return false };
            let s = d.script_pubkey();
            self.next += 1;
            let hit = &s == script;
            self.known.insert(s);
            if hit {
                return true;
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // An account-level tpub (any valid one does: the test derives what it expects from it).
    const XPUB: &str = "tpubDC8msFGeGuwnKG9Upg7DM2b4DaRqg3CUZa5g8v2SRQ6K4NSkxUgd7HsL2XVWbVm39yBA4LAxysQAm397zwQSQoQgewGiYZqrA9DsP4zbQ1M";

    #[test]
    fn a_descriptor_accepts_its_addresses_within_the_range_and_nothing_else() {
        let desc = format!("wpkh([73c5da0a/84'/1'/0']{XPUB}/0/*)");
        let mut p = PaymentPolicy::new(Network::Regtest, &[], std::slice::from_ref(&desc), 50, 1_000).unwrap();
        let d = Descriptor::<DescriptorPublicKey>::from_str(&desc).unwrap();
        let at = |i| d.at_derivation_index(i).unwrap().script_pubkey();
        assert!(p.accepts(&at(0)) && p.accepts(&at(49)) && p.accepts(&at(7)));
        assert!(!p.accepts(&at(50)), "beyond the range");
        let change = Descriptor::<DescriptorPublicKey>::from_str(&format!("wpkh({XPUB}/1/*)")).unwrap();
        assert!(!p.accepts(&change.at_derivation_index(0).unwrap().script_pubkey()), "another path");
        // Multipath: both paths.
        let mut both = PaymentPolicy::new(Network::Regtest, &[], &[format!("wpkh({XPUB}/<0;1>/*)")], 5, 1).unwrap();
        assert!(both.accepts(&at(3)) && both.accepts(&change.at_derivation_index(3).unwrap().script_pubkey()));
    }

    #[test]
    fn a_policy_needs_a_destination_and_an_amount_and_takes_no_private_key() {
        let addr = "bcrt1qw508d6qejxtdg4y5r3zarvary0c5xw7kygt080".to_string();
        assert_eq!(PaymentPolicy::new(Network::Regtest, &[], &[], 10, 1_000).unwrap_err(), PolicyError::Missing);
        assert_eq!(PaymentPolicy::new(Network::Regtest, std::slice::from_ref(&addr), &[], 10, 0).unwrap_err(), PolicyError::Missing);
        let mut p = PaymentPolicy::new(Network::Regtest, std::slice::from_ref(&addr), &[], 10, 1_000).unwrap();
        assert!(p.accepts(&Address::from_str(&addr).unwrap().assume_checked().script_pubkey()));
        let e = PaymentPolicy::new(Network::Bitcoin, &[addr], &[], 10, 1_000).unwrap_err();
        assert!(matches!(&e, PolicyError::Address(m) if m.contains("not a bitcoin address")), "{e}");
        let xprv =
            "wpkh(tprv8ZgxMBicQKsPe5YMU9gHen4Ez3ApihUfykaqUorj9t6FDqy3nP6eoXiAo2ssvpAjoLroQxHqr3R5nE3a5dU3DHTjTgJDd7zrbniJr6nrCzd/0/*)";
        let e = PaymentPolicy::new(Network::Regtest, &[], &[xprv.into()], 10, 1_000).unwrap_err();
        assert!(matches!(&e, PolicyError::Descriptor(m) if m.contains("private key")), "{e}");
        assert!(PaymentPolicy::new(Network::Regtest, &[], &["wpkh(nonsense)".into()], 10, 1_000).is_err());
    }
}
