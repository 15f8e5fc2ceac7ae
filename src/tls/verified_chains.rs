//! Chains already verified against the current trust bundles, so that a peer reconnecting
//! with the same SVID does not pay for the chain's signature checks again (the P-256
//! verifications were a fifth of a full handshake's CPU in the benchmark).
//!
//! Flow: the TLS verifiers look a presented chain up by its exact DER bytes (and the key
//! usage asked for); a hit whose validity window holds `now` returns the SPIFFE ID
//! verified before. A miss runs the full verification and records the result with the
//! chain's validity window (latest not-before, earliest not-after of the leaf and
//! intermediates). All the cache saves is the re-verification of identical bytes: the
//! handshake signature (proof that the peer holds the leaf's key) is still checked on
//! every handshake, and a new bundle set builds new verifiers with an empty cache.

use crate::identity::SpiffeId;
use rustls_pki_types::{CertificateDer, UnixTime};
use std::collections::HashMap;
use std::sync::Mutex;
use x509_parser::prelude::{FromDer, X509Certificate};

/// At most this many chains are remembered; when full the cache starts over.
pub const CAPACITY: usize = 256;

/// One verified chain: who it names and while it is valid (Unix seconds, inclusive).
#[derive(Debug, Clone)]
struct Verified {
    id: SpiffeId,
    not_before: u64,
    not_after: u64,
}

/// Verified chains of one bundle set (see the module docs).
#[derive(Debug, Default)]
pub struct VerifiedChains {
    /// Keyed by usage tag + the DER of every certificate, length-prefixed.
    entries: Mutex<HashMap<Vec<u8>, Verified>>,
}

/// The lookup key of a chain presented for a usage (`b'c'` client, `b's'` server).
pub fn chain_key(usage: u8, end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Vec<u8> {
    let len = end_entity.len() + intermediates.iter().map(|c| c.len() + 4).sum::<usize>();
    let mut key = Vec::with_capacity(1 + 4 + len);
    key.push(usage);
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        key.extend_from_slice(&(der.len() as u32).to_be_bytes());
        key.extend_from_slice(der);
    }
    key
}

/// The window in which every certificate of the chain is valid, or `None` when one of
/// them cannot be parsed (then nothing is cached).
pub fn validity(end_entity: &[u8], intermediates: &[CertificateDer<'_>]) -> Option<(u64, u64)> {
    let mut window = (0u64, u64::MAX);
    for der in std::iter::once(end_entity).chain(intermediates.iter().map(|c| c.as_ref())) {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let v = cert.validity();
        let nb = u64::try_from(v.not_before.timestamp()).unwrap_or(0);
        let na = u64::try_from(v.not_after.timestamp()).ok()?;
        window = (window.0.max(nb), window.1.min(na));
    }
    Some(window)
}

impl VerifiedChains {
    /// The SPIFFE ID of a chain verified before and valid at `now`.
    pub fn get(&self, key: &[u8], now: UnixTime) -> Option<SpiffeId> {
        let entries = self.entries.lock().ok()?;
        let v = entries.get(key)?;
        let t = now.as_secs();
        (v.not_before <= t && t <= v.not_after).then(|| v.id.clone())
    }

    /// Remembers a chain that passed full verification.
    pub fn insert(&self, key: Vec<u8>, id: SpiffeId, window: (u64, u64)) {
        let Ok(mut entries) = self.entries.lock() else {
            return;
        };
        if entries.len() >= CAPACITY {
            entries.clear();
        }
        entries.insert(
            key,
            Verified {
                id,
                not_before: window.0,
                not_after: window.1,
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(path: &str) -> SpiffeId {
        crate::config::parse_spiffe_id(&format!("spiffe://jia.app/{path}")).unwrap()
    }

    fn at(secs: u64) -> UnixTime {
        UnixTime::since_unix_epoch(Duration::from_secs(secs))
    }

    #[test]
    fn hits_only_the_same_bytes_and_usage_within_the_window() {
        let cache = VerifiedChains::default();
        let inter = [CertificateDer::from(vec![9u8, 9])];
        let key = chain_key(b'c', b"leaf", &inter);
        cache.insert(key.clone(), id("a"), (100, 200));
        // (key, time, expected)
        let table = [
            (key.clone(), 150, Some(id("a"))),
            (key.clone(), 100, Some(id("a"))),
            (key.clone(), 200, Some(id("a"))),
            (key.clone(), 99, None),
            (key.clone(), 201, None),
            (chain_key(b's', b"leaf", &inter), 150, None),
            (chain_key(b'c', b"leaf", &[]), 150, None),
            (chain_key(b'c', b"leaX", &inter), 150, None),
            // the length prefixes keep a shifted split of the same bytes apart
            (
                chain_key(
                    b'c',
                    b"lea",
                    &[CertificateDer::from(b"f\x00\x00\x00\x02\x09\x09".to_vec())],
                ),
                150,
                None,
            ),
        ];
        for (i, (k, t, want)) in table.into_iter().enumerate() {
            assert_eq!(cache.get(&k, at(t)), want, "case {i}");
        }
    }

    #[test]
    fn a_full_cache_starts_over() {
        let cache = VerifiedChains::default();
        for n in 0..CAPACITY {
            cache.insert(
                chain_key(b'c', &n.to_be_bytes(), &[]),
                id("a"),
                (0, u64::MAX),
            );
        }
        let first = chain_key(b'c', &0usize.to_be_bytes(), &[]);
        assert!(cache.get(&first, at(1)).is_some());
        cache.insert(chain_key(b'c', b"one more", &[]), id("b"), (0, u64::MAX));
        assert!(cache.get(&first, at(1)).is_none());
        assert_eq!(
            cache.get(&chain_key(b'c', b"one more", &[]), at(1)),
            Some(id("b"))
        );
    }
}
