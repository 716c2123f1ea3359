//! bitmote-device: what runs on the microcontroller.
//!
//! `#![no_std]` with `alloc`. Canonical binary encoding of sensor readings,
//! BIP340 and P-256 signing, device-side batch roots, and the RFC 9162 Merkle
//! primitives that the gateway's log shares with every verifier.
#![no_std]
extern crate alloc;
#[cfg(feature = "std")]
extern crate std;
