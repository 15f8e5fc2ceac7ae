//! Fuzzed identity inputs: Workload API `X509SVIDResponse`s (built with the prost types
//! of `pb`, then broken field by field or on the wire) and the PEM files of a file
//! identity (chain, key, bundle). Also the certificate fixtures the other folders'
//! fuzzers share ([`pki`]: root, intermediate, SVID, a foreign domain's root).
//!
//! Properties: nothing panics or hangs. Never a half-valid identity: a response or
//! set of files becomes a snapshot only if its SVID's ID is the leaf's one URI SAN (and
//! `expect` when given), its key signs what the leaf's public key verifies, it is not
//! expired, and the own trust domain has a bundle whose CAs all parse; a response whose
//! chain, key, own bundle or federated bundle is cut short, or whose key is another
//! SVID's, is rejected whole.

use crate::config::IdentityFiles;
use crate::identity::files::load;
use crate::identity::workload_api::snapshot_from_context;
use crate::identity::{parse_svid_leaf, IdentitySnapshot, SpiffeId};
use crate::pb::workload::{X509svid, X509svidResponse};
use crate::telemetry::fuzz_budget::{config, mutated_bytes, watchdog};
use proptest::prelude::*;
use prost::Message;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use spiffe::{TrustDomain, X509Bundle, X509BundleSet, X509Context, X509Svid};
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

/// The SPIFFE ID of the fixtures' SVID.
pub(crate) const SVID_ID: &str = "spiffe://jia.app/payment-service";

/// Certificates made once per test process (DER; keys PKCS#8).
pub(crate) struct Pki {
    pub root: Vec<u8>,
    pub intermediate: Vec<u8>,
    /// `SVID_ID`, signed by the intermediate.
    pub leaf: Vec<u8>,
    pub leaf_key: Vec<u8>,
    /// Another SVID's key: valid, but not the leaf's.
    pub other_key: Vec<u8>,
    /// The root of the federated trust domain `other.td`.
    pub foreign_root: Vec<u8>,
}

fn ca(td: &str, cn: &str) -> CertificateParams {
    let mut p = CertificateParams::default();
    p.distinguished_name.push(DnType::CommonName, cn);
    let uri = format!("spiffe://{td}");
    p.subject_alt_names
        .push(SanType::URI(uri.as_str().try_into().expect("IA5")));
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    p.not_before = (SystemTime::now() - Duration::from_secs(3600)).into();
    p.not_after = (SystemTime::now() + Duration::from_secs(86400 * 30)).into();
    p
}

/// The fixtures, made on first use.
pub(crate) fn pki() -> &'static Pki {
    static PKI: OnceLock<Pki> = OnceLock::new();
    PKI.get_or_init(|| {
        let key = || KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("P-256 key");
        let root_key = key();
        let root_params = ca("jia.app", "fuzz root");
        let root = root_params.self_signed(&root_key).expect("root");
        let root_issuer = Issuer::new(root_params, root_key);
        let mid_key = key();
        let mid_params = ca("jia.app", "fuzz intermediate");
        let mid = mid_params
            .signed_by(&mid_key, &root_issuer)
            .expect("intermediate");
        let mid_issuer = Issuer::new(mid_params, mid_key);
        let leaf_key = key();
        let mut leaf_params = CertificateParams::default();
        leaf_params
            .subject_alt_names
            .push(SanType::URI(SVID_ID.try_into().expect("IA5")));
        leaf_params.is_ca = IsCa::ExplicitNoCa;
        leaf_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        leaf_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        leaf_params.not_before = (SystemTime::now() - Duration::from_secs(60)).into();
        leaf_params.not_after = (SystemTime::now() + Duration::from_secs(86400)).into();
        let leaf = leaf_params.signed_by(&leaf_key, &mid_issuer).expect("leaf");
        let foreign_key = key();
        let foreign = ca("other.td", "foreign root")
            .self_signed(&foreign_key)
            .expect("foreign root");
        Pki {
            root: root.der().to_vec(),
            intermediate: mid.der().to_vec(),
            leaf: leaf.der().to_vec(),
            leaf_key: leaf_key.serialize_der(),
            other_key: key().serialize_der(),
            foreign_root: foreign.der().to_vec(),
        }
    })
}

/// The response a healthy agent sends.
fn good_response() -> X509svidResponse {
    let p = pki();
    X509svidResponse {
        svids: vec![X509svid {
            spiffe_id: SVID_ID.into(),
            x509_svid: [p.leaf.clone(), p.intermediate.clone()].concat(),
            x509_svid_key: p.leaf_key.clone(),
            bundle: p.root.clone(),
            hint: String::new(),
        }],
        crl: vec![],
        federated_bundles: HashMap::from([("spiffe://other.td".into(), p.foreign_root.clone())]),
    }
}

/// Why a response was refused, as text (the `spiffe` client's or meshd's).
type Refused = String;

/// The response as the `spiffe` crate's Workload API client reads it (its parsing is
/// private, so this repeats it with the crate's public parsers), then as meshd does.
fn identity_of(
    r: &X509svidResponse,
    expect: Option<&SpiffeId>,
) -> Result<IdentitySnapshot, Refused> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    if r.svids.is_empty()
        || r.svids.iter().any(|s| {
            s.bundle.is_empty()
                || s.spiffe_id.is_empty()
                || s.x509_svid.is_empty()
                || s.x509_svid_key.is_empty()
        })
    {
        return Err("missing required field".into());
    }
    let mut svids = Vec::new();
    let mut set = X509BundleSet::new();
    for s in &r.svids {
        let svid = X509Svid::parse_from_der(&s.x509_svid, &s.x509_svid_key).map_err(|x| e(&x))?;
        let td = svid.spiffe_id().trust_domain().clone();
        set.add_bundle(X509Bundle::parse_from_der(td, &s.bundle).map_err(|x| e(&x))?);
        svids.push(Arc::new(svid));
    }
    for (td, der) in &r.federated_bundles {
        let td = TrustDomain::try_from(td.as_str()).map_err(|x| e(&x))?;
        set.add_bundle(X509Bundle::parse_from_der(td, der).map_err(|x| e(&x))?);
    }
    let ctx = X509Context::new(svids, Arc::new(set));
    snapshot_from_context(&ctx, expect, 1).map_err(|x| e(&x))
}

/// One PEM block of `der`.
pub(crate) fn pem(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let lines: Vec<&str> = b64
        .as_bytes()
        .chunks(64)
        .map(|l| std::str::from_utf8(l).unwrap_or_default())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// What every accepted identity must be (see the module docs).
pub(crate) fn assert_whole(
    s: &IdentitySnapshot,
    expect: Option<&SpiffeId>,
) -> Result<(), TestCaseError> {
    let leaf = &s.svid.certified_key.cert[0];
    let facts = parse_svid_leaf(leaf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert_eq!(&facts.id, &s.svid.id);
    if let Some(want) = expect {
        prop_assert_eq!(want, &s.svid.id);
    }
    prop_assert!(s.svid.not_after > SystemTime::now());
    let signer = s
        .svid
        .certified_key
        .key
        .choose_scheme(&[rustls::SignatureScheme::ECDSA_NISTP256_SHA256])
        .ok_or_else(|| TestCaseError::fail("the key cannot sign ECDSA P-256"))?;
    let sig = signer
        .sign(b"fuzz")
        .map_err(|e| TestCaseError::fail(e.to_string()))?;
    let cert =
        webpki::EndEntityCert::try_from(leaf).map_err(|e| TestCaseError::fail(e.to_string()))?;
    prop_assert!(
        cert.verify_signature(webpki::ring::ECDSA_P256_SHA256, b"fuzz", &sig)
            .is_ok(),
        "the accepted key is not the leaf's"
    );
    let own = s.bundles.for_domain(s.svid.id.trust_domain_name());
    prop_assert!(own.is_some_and(|cas| !cas.is_empty()), "no own bundle");
    Ok(())
}

/// Which part of a response a case breaks.
fn part() -> impl Strategy<Value = u8> {
    0u8..6
}

fn field(r: &mut X509svidResponse, part: u8) -> &mut Vec<u8> {
    match part {
        0 => &mut r.svids[0].x509_svid,
        1 => &mut r.svids[0].x509_svid_key,
        2 => &mut r.svids[0].bundle,
        _ => r
            .federated_bundles
            .values_mut()
            .next()
            .expect("one federated bundle"),
    }
}

fn expect_of(n: u8) -> Option<SpiffeId> {
    match n {
        0 => None,
        1 => Some(SpiffeId::new(SVID_ID).expect("valid")),
        _ => Some(SpiffeId::new("spiffe://jia.app/contact-service").expect("valid")),
    }
}

proptest! {
    #![proptest_config(config(2))]

    #[test]
    fn broken_responses_are_never_half_valid(
        part in part(),
        edits in proptest::collection::vec(crate::telemetry::fuzz_budget::edit(), 1..4),
        expect in 0u8..3,
        spiffe_id in prop_oneof![Just(SVID_ID.to_string()), "\\PC{0,20}"],
    ) {
        let _w = watchdog("Workload API response");
        let mut r = good_response();
        if part == 4 {
            r.svids[0].spiffe_id = spiffe_id;
        } else if part == 5 {
            r.federated_bundles.insert(String::from_utf8_lossy(&crate::telemetry::fuzz_budget::apply(b"spiffe://other.td", &edits)).into_owned(), pki().foreign_root.clone());
        } else {
            let f = field(&mut r, part);
            *f = crate::telemetry::fuzz_budget::apply(f, &edits);
        }
        let expect = expect_of(expect);
        if let Ok(s) = identity_of(&r, expect.as_ref()) {
            assert_whole(&s, expect.as_ref())?;
        }
    }

    #[test]
    fn responses_cut_short_or_with_another_key_are_rejected(part in 0u8..4, cut in any::<usize>(), other_key in any::<bool>()) {
        let _w = watchdog("Workload API response");
        let mut r = good_response();
        let p = pki();
        if other_key {
            r.svids[0].x509_svid_key = p.other_key.clone();
        } else {
            let f = field(&mut r, part);
            let len = cut % f.len();
            // The leaf alone is a whole chain: not cut short.
            prop_assume!(!(part == 0 && len == p.leaf.len()));
            f.truncate(len);
        }
        prop_assert!(identity_of(&r, None).is_err(), "accepted part {} cut at {}", part, cut);
    }

    #[test]
    fn responses_mutated_on_the_wire_are_never_half_valid(
        wire in mutated_bytes(vec![good_response().encode_to_vec()]),
        expect in 0u8..3,
    ) {
        let _w = watchdog("Workload API response (wire)");
        if let Ok(r) = X509svidResponse::decode(wire.as_slice()) {
            let expect = expect_of(expect);
            if let Ok(s) = identity_of(&r, expect.as_ref()) {
                assert_whole(&s, expect.as_ref())?;
            }
        }
    }

    #[test]
    fn identity_files_are_never_half_valid(
        which in 0usize..3,
        broken in mutated_bytes(pem_seeds()),
        expect in 0u8..3,
    ) {
        let _w = watchdog("identity files");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let files = IdentityFiles {
            cert: dir.path().join("chain.pem"),
            key: dir.path().join("key.pem"),
            bundle: dir.path().join("bundle.pem"),
        };
        let p = pki();
        let pem_of = |label, der: &[u8]| pem(label, der);
        let mut texts = [
            pem_of("CERTIFICATE", &p.leaf) + &pem_of("CERTIFICATE", &p.intermediate),
            pem_of("PRIVATE KEY", &p.leaf_key),
            pem_of("CERTIFICATE", &p.root) + &pem_of("CERTIFICATE", &p.foreign_root),
        ]
        .map(String::into_bytes);
        texts[which] = broken;
        for (path, text) in [&files.cert, &files.key, &files.bundle].iter().zip(&texts) {
            std::fs::write(path, text).expect("file written");
        }
        let expect = expect_of(expect);
        if let Ok(s) = load(&files, expect.as_ref(), 1) {
            assert_whole(&s, expect.as_ref())?;
        }
    }
}

/// PEM texts of each kind the files hold, to mutate.
fn pem_seeds() -> Vec<Vec<u8>> {
    let p = pki();
    let pem_of = |label, der: &[u8]| pem(label, der);
    vec![
        (pem_of("CERTIFICATE", &p.leaf) + &pem_of("CERTIFICATE", &p.intermediate)).into_bytes(),
        pem_of("PRIVATE KEY", &p.leaf_key).into_bytes(),
        pem_of("PRIVATE KEY", &p.other_key).into_bytes(),
        pem_of("CERTIFICATE", &p.root).into_bytes(),
    ]
}

#[test]
fn the_fixture_response_is_accepted() {
    let want = SpiffeId::new(SVID_ID).expect("valid");
    let s = identity_of(&good_response(), Some(&want)).expect("a whole identity");
    assert_eq!(s.bundles.trust_domains(), vec!["jia.app", "other.td"]);
}
