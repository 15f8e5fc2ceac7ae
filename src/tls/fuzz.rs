//! Fuzzed peer certificate chains, as a TLS handshake hands them to meshd's SPIFFE
//! verifiers (inbound client SVIDs, outbound server SVIDs) and to `peer_id` and the
//! verified-chain cache's `validity`: the fixtures of `identity::fuzz` (root ->
//! intermediate -> SVID), each certificate mutated in DER (truncated, bytes flipped,
//! hostile bytes, huge), intermediates dropped, repeated or swapped for a foreign root.
//!
//! Properties: nothing panics or hangs. Fail closed: a chain verifies only if its leaf
//! is byte for byte the SVID the CA signed, and then names that SVID's ID; the
//! outbound verifier refuses every chain for another `server_id`; a mutated chain is
//! never verified, even right after the good chain was (and cached).

use crate::identity::fuzz::{pki, SVID_ID};
use crate::identity::{crypto_provider, BundleSet, SpiffeId};
use crate::telemetry::fuzz_budget::{apply, config, edit, watchdog, Edit};
use crate::tls::verified_chains::validity;
use crate::tls::{peer_id, ChainCheck, SpiffeServerVerifier};
use proptest::prelude::*;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

fn bundles() -> BundleSet {
    let p = pki();
    let mut b = BundleSet::default();
    b.insert("jia.app", vec![CertificateDer::from(p.root.clone())])
        .expect("root parses");
    b.insert(
        "other.td",
        vec![CertificateDer::from(p.foreign_root.clone())],
    )
    .expect("foreign root parses");
    b
}

/// A chain from the fixtures: the leaf edited by `leaf_edits`, then the intermediates
/// as `shape` says (0: the intermediate, 1: none, 2: it twice, 3: the foreign root, 4:
/// the intermediate edited by `mid_edits`).
fn chain(
    leaf_edits: &[Edit],
    shape: u8,
    mid_edits: &[Edit],
) -> (Vec<u8>, Vec<CertificateDer<'static>>) {
    let p = pki();
    let mid = CertificateDer::from(p.intermediate.clone());
    let intermediates = match shape {
        0 => vec![mid],
        1 => vec![],
        2 => vec![mid.clone(), mid],
        3 => vec![CertificateDer::from(p.foreign_root.clone())],
        _ => vec![CertificateDer::from(apply(&p.intermediate, mid_edits))],
    };
    (apply(&p.leaf, leaf_edits), intermediates)
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn only_the_signed_svid_verifies(
        leaf_edits in proptest::collection::vec(edit(), 0..3),
        shape in 0u8..5,
        mid_edits in proptest::collection::vec(edit(), 1..3),
        server_id in prop::sample::select(vec![SVID_ID, "spiffe://jia.app/contact-service"]),
    ) {
        let _w = watchdog("SPIFFE chain verification");
        let p = pki();
        let check = ChainCheck::new(&bundles(), crypto_provider());
        let now = UnixTime::now();
        // The good chain first, so the cache holds it.
        let good = CertificateDer::from(p.leaf.clone());
        let good_mid = [CertificateDer::from(p.intermediate.clone())];
        let id = check.verify(&good, &good_mid, now, b'c').expect("the fixture chain verifies");
        prop_assert_eq!(id.to_string(), SVID_ID);

        let (leaf, intermediates) = chain(&leaf_edits, shape, &mid_edits);
        let leaf = CertificateDer::from(leaf);
        let _ = peer_id(Some(std::slice::from_ref(&leaf)));
        let _ = validity(&leaf, &intermediates);
        for usage in [b'c', b's'] {
            if let Ok(id) = check.verify(&leaf, &intermediates, now, usage) {
                prop_assert_eq!(leaf.as_ref(), p.leaf.as_slice(), "a mutated leaf verified");
                prop_assert_eq!(id.to_string(), SVID_ID);
            }
        }
        let verifier = SpiffeServerVerifier {
            chain: ChainCheck::new(&bundles(), crypto_provider()),
            server_id: SpiffeId::new(server_id).expect("valid"),
        };
        let name = ServerName::try_from("meshd").expect("a name");
        if verifier.verify_server_cert(&leaf, &intermediates, &name, &[], now).is_ok() {
            prop_assert_eq!(server_id, SVID_ID, "another server_id was accepted");
            prop_assert_eq!(leaf.as_ref(), p.leaf.as_slice(), "a mutated leaf verified");
        }
    }
}
