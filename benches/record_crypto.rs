//! What TLS record crypto alone costs per GB on this CPU: the part of a `tcp` sidecar's
//! CPU that a plain relay does not have, so the floor under meshd's TCP rows.
//!
//! Story: a TLS 1.3 connection with AES-128-GCM (the suite meshd's inbound picks first)
//! seals every 16 KiB record on the sending sidecar and opens it on the receiving one.
//! This times ring (meshd's rustls provider) doing exactly that, record after record, with
//! TLS 1.3's nonce and additional data, and prints CPU seconds per GB of plaintext, the
//! unit of `run.sh`'s TCP rows: `seal_s_per_gb <v>` and `open_s_per_gb <v>`. `run.sh` adds
//! them to the relay's CPU per GB to show how low the TCP rows can go in user space.
//!
//! `cargo bench --bench record_crypto` (2 GB, best of 5); any run without `--bench`
//! (`cargo test --all-targets`) or with `MESHD_SCALE_QUICK=1` moves 64 MB once.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_128_GCM};
use std::time::Instant;

/// A full TLS record's plaintext: 16 KiB of data and the inner content type.
const RECORD: usize = (16 << 10) + 1;

/// Seconds per GB for sealing then opening `bytes` of plaintext in full records: the best
/// of `reps` passes (the least disturbed by whatever else the machine runs).
fn time_records(bytes: usize, reps: usize) -> (f64, f64) {
    let key = LessSafeKey::new(UnboundKey::new(&AES_128_GCM, &[0x42; 16]).expect("a key"));
    let records = bytes / RECORD;
    let mut sealed: Vec<Vec<u8>> = (0..records).map(|_| vec![0u8; RECORD + 16]).collect();
    let (mut seal_best, mut open_best) = (f64::MAX, f64::MAX);
    for _ in 0..reps {
        let t = Instant::now();
        for (seq, rec) in sealed.iter_mut().enumerate() {
            let tag = key
                .seal_in_place_separate_tag(nonce(seq), aad(), &mut rec[..RECORD])
                .expect("seal");
            rec[RECORD..].copy_from_slice(tag.as_ref());
        }
        seal_best = seal_best.min(t.elapsed().as_secs_f64());
        let t = Instant::now();
        for (seq, rec) in sealed.iter_mut().enumerate() {
            // Opened in place: the plaintext is where it was, ready to seal again.
            key.open_in_place(nonce(seq), aad(), rec).expect("open");
        }
        open_best = open_best.min(t.elapsed().as_secs_f64());
    }
    let gb = (records * RECORD) as f64 / 1e9;
    (seal_best / gb, open_best / gb)
}

/// TLS 1.3's per-record nonce: the sequence number into a fixed IV.
fn nonce(seq: usize) -> Nonce {
    let mut n = [0x24u8; 12];
    for (b, s) in n[4..].iter_mut().zip((seq as u64).to_be_bytes()) {
        *b ^= s;
    }
    Nonce::assume_unique_for_key(n)
}

/// TLS 1.3's additional data: the record header of a full application-data record.
fn aad() -> Aad<[u8; 5]> {
    let len = (RECORD + 16) as u16;
    Aad::from([0x17, 0x03, 0x03, (len >> 8) as u8, len as u8])
}

fn main() {
    let quick = std::env::var_os("MESHD_SCALE_QUICK").is_some_and(|v| v != "0")
        || !std::env::args().any(|a| a == "--bench");
    let (bytes, reps) = if quick { (64 << 20, 1) } else { (2 << 30, 5) };
    // Open in place re-reads what seal wrote: the buffers are big enough (2 GB) that
    // neither pass runs from cache, as a sidecar's records do not.
    let (seal, open) = time_records(bytes, reps);
    println!("seal_s_per_gb {seal:.4}");
    println!("open_s_per_gb {open:.4}");
}
