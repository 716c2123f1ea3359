//! Firmware-shaped use of `bitmote-device` without std: sign a reading, encode it, decode
//! it back and verify it, and hash Merkle leaves. Exported as C functions so the linker
//! keeps them; see `Cargo.toml` for what the build proves.
#![no_std]

extern crate alloc;

use core::sync::atomic::{AtomicUsize, Ordering};

use bitmote_device::reading::{sensor, unit};
use bitmote_device::{merkle, DeviceId, Reading, SignedReading, SigningKey, Value};

/// A bump allocator over a static arena: enough for a firmware that signs one reading at a
/// time (nothing is ever freed).
struct Arena;

const ARENA: usize = 64 * 1024;
static mut HEAP: [u8; ARENA] = [0; ARENA];
static NEXT: AtomicUsize = AtomicUsize::new(0);

unsafe impl core::alloc::GlobalAlloc for Arena {
    unsafe fn alloc(&self, layout: core::alloc::Layout) -> *mut u8 {
        let mut start = 0;
        let claimed = NEXT.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |next| {
            start = next.next_multiple_of(layout.align());
            let end = start.checked_add(layout.size())?;
            (end <= ARENA).then_some(end)
        });
        match claimed {
            // SAFETY: `start..start + size` lies inside the arena and was handed out once.
            Ok(_) => unsafe { (&raw mut HEAP).cast::<u8>().add(start) },
            Err(_) => core::ptr::null_mut(),
        }
    }

    unsafe fn dealloc(&self, _: *mut u8, _: core::alloc::Layout) {}
}

#[global_allocator]
static ALLOCATOR: Arena = Arena;

#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {}
}

/// Sign a reading with the 32-byte secret at `secret`, round-trip its encoding, verify
/// it: 1 when all holds, 0 otherwise.
///
/// # Safety
/// `secret` points to 32 readable bytes.
#[no_mangle]
pub unsafe extern "C" fn bitmote_sign_and_verify(secret: *const u8, centi_celsius: i64) -> i32 {
    // SAFETY: the caller passes 32 readable bytes.
    let secret: &[u8; 32] = unsafe { &*(secret as *const [u8; 32]) };
    let Ok(key) = SigningKey::schnorr_from_secret(secret) else { return 0 };
    let device: DeviceId = key.public_key().device_id();
    let reading = Reading {
        device,
        seq: 1,
        timestamp_ms: 1_700_000_000_000,
        sensor: sensor::TEMPERATURE,
        unit: unit::CELSIUS,
        value: Value::Scaled { mantissa: centi_celsius, exponent: -2 },
    };
    let Ok(signed) = SignedReading::sign(&key, reading) else { return 0 };
    let bytes = signed.encode();
    match SignedReading::decode(&bytes) {
        Ok(back) => (back == signed && key.public_key().verify(&back.reading.id(), &back.signature).is_ok()) as i32,
        Err(_) => 0,
    }
}

/// The RFC 9162 leaf hash of `len` bytes at `data`, written to `out` (32 bytes).
///
/// # Safety
/// `data` points to `len` readable bytes and `out` to 32 writable ones.
#[no_mangle]
pub unsafe extern "C" fn bitmote_leaf_hash(data: *const u8, len: usize, out: *mut u8) {
    // SAFETY: as the caller promises.
    let (data, out) = unsafe { (core::slice::from_raw_parts(data, len), core::slice::from_raw_parts_mut(out, 32)) };
    out.copy_from_slice(&merkle::leaf_hash(data));
}
