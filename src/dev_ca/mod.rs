//! The development CA: a self-signed SPIFFE trust domain root kept in memory, which
//! issues X.509-SVIDs and (through `dev_ca/server.rs`) serves them over the real SPIFFE
//! Workload API.
//!
//! Flow: [`DevCa::new`] makes an EC P-256 root for `spiffe://<td>`. [`DevCa::issue_svid`]
//! signs a standard leaf for a SPIFFE ID; [`DevCa::issue_custom`] signs deliberately broken
//! leaves for tests. Control calls ([`DevCa::rotate_now`], [`DevCa::set_federated`],
//! [`DevCa::replace_ca`]) change the CA state and bump a `watch` channel; the per-identity
//! rotators of `dev_ca/server.rs` listen to it and stream fresh responses to every client.
//! The `meshd dev-ca` command line lives in `dev_ca/cli.rs` and is re-exported here.
//! Its JWT authority (signing JWT-SVIDs, JWT bundles, rotation) lives in `dev_ca/jwt.rs`.

mod cli;
mod jwt;
mod server;

use crate::dev_ca::jwt::JwtAuthority;
use crate::identity::{JwtBundle, SpiffeId};
use rand::RngCore;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;

pub use crate::dev_ca::cli::{main, DevCaArgs, DevCaCliError};
pub use crate::dev_ca::server::Serving;

/// How long a development root is valid.
const ROOT_LIFETIME: Duration = Duration::from_secs(365 * 24 * 3600);
/// Leaves start this far in the past, so small clock skew between peers does not matter.
const BACKDATE: Duration = Duration::from_secs(30);
/// The shortest SVID lifetime served: certificate times have whole-second precision.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Why the development CA could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum DevCaError {
    /// The trust domain name is not valid per the SPIFFE-ID standard.
    #[error("invalid trust domain `{name}`: {reason}")]
    BadTrustDomain { name: String, reason: String },
    /// rcgen refused to generate a key or certificate (e.g. a SAN that is not ASCII).
    #[error("could not create {what}: {reason}")]
    Certificate { what: String, reason: String },
    /// The SVID lifetime is too short to be served.
    #[error("SVID ttl {0:?} is too short: use at least 2s")]
    TtlTooShort(Duration),
    /// The same socket path was given for two identities.
    #[error("socket {0} is given for more than one identity")]
    DuplicateSocket(String),
    /// A unix socket could not be prepared or bound.
    #[error("cannot bind Workload API socket {path}: {reason}")]
    Bind { path: String, reason: String },
    /// Writing PEM files failed.
    #[error("cannot write {path}: {reason}")]
    WriteFile { path: String, reason: String },
}

/// One issued X.509-SVID, as the Workload API hands it out.
#[derive(Debug, Clone, PartialEq)]
pub struct IssuedSvid {
    /// The SPIFFE ID the SVID was issued for (its URI SAN for standard leaves).
    pub id: String,
    /// DER certificates, leaf first (the dev CA signs leaves directly with its root).
    pub chain_der: Vec<Vec<u8>>,
    /// The leaf's private key, PKCS#8 DER.
    pub key_pkcs8_der: Vec<u8>,
    /// Leaf serial number, lowercase hex as `identity::parse_svid_leaf` reports it.
    pub serial: String,
    /// Leaf not-after.
    pub not_after: SystemTime,
}

/// Every knob of a leaf, so tests can make SVIDs the standard forbids.
#[derive(Debug, Clone)]
pub struct LeafOptions {
    /// URI SANs, in order; a standard SVID has exactly one, its SPIFFE ID.
    pub uris: Vec<String>,
    /// Marks the leaf as a CA (forbidden for SVIDs).
    pub ca: bool,
    /// Sets the digitalSignature key usage (required for SVIDs).
    pub digital_signature: bool,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
}

impl LeafOptions {
    /// A standard X.509-SVID for `id`, valid from 30 s ago for `ttl`.
    pub fn standard(id: &SpiffeId, ttl: Duration) -> LeafOptions {
        let now = SystemTime::now();
        LeafOptions {
            uris: vec![id.to_string()],
            ca: false,
            digital_signature: true,
            not_before: now - BACKDATE,
            not_after: now + ttl,
        }
    }
}

/// One CA key pair with its self-signed certificate.
struct CaRoot {
    /// Signs leaves; carries the root's subject and key identifier.
    issuer: Issuer<'static, KeyPair>,
    /// The root certificate, the trust domain's whole bundle.
    cert_der: Vec<u8>,
}

/// What changes over the CA's life; read whole under the lock.
struct CaState {
    /// The current root; `replace_ca` swaps it.
    root: Arc<CaRoot>,
    /// Federated trust domains (name -> CA certificates, DER).
    federated: BTreeMap<String, Vec<Vec<u8>>>,
    /// The JWT signing keys (current and retired-but-needed).
    jwt: JwtAuthority,
    /// Federated trust domains' JWT bundles (name -> keys).
    federated_jwt: BTreeMap<String, JwtBundle>,
}

/// Counters the serving side watches: any change means "send a new response".
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Bumped when every identity must get a fresh SVID (rotate_now, replace_ca).
    pub reissue: u64,
    /// Bumped when only the bundles changed (set_federated).
    pub bundles: u64,
    /// Bumped when the JWT bundles changed (rotate_jwt_authority, set_federated_jwt).
    pub jwt: u64,
}

/// The development CA of one trust domain. Share it as `Arc<DevCa>`.
pub struct DevCa {
    /// The trust domain name, e.g. `jia.app`.
    trust_domain: String,
    state: Mutex<CaState>,
    /// Tells the per-identity rotators when to reissue or resend.
    changes: watch::Sender<Changes>,
}

impl std::fmt::Debug for DevCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevCa")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

impl DevCa {
    /// Creates a CA with a fresh self-signed root for `trust_domain` (e.g. `jia.app`).
    pub fn new(trust_domain: &str) -> Result<DevCa, DevCaError> {
        let td_id = crate::config::parse_spiffe_id(&format!("spiffe://{trust_domain}")).map_err(
            |reason| DevCaError::BadTrustDomain {
                name: trust_domain.to_string(),
                reason: reason.to_string(),
            },
        )?;
        if td_id.path() != "" {
            return Err(DevCaError::BadTrustDomain {
                name: trust_domain.to_string(),
                reason: "a trust domain name has no path".into(),
            });
        }
        let root = new_root(trust_domain)?;
        Ok(DevCa {
            trust_domain: trust_domain.to_string(),
            state: Mutex::new(CaState {
                root: Arc::new(root),
                federated: BTreeMap::new(),
                jwt: JwtAuthority::new()?,
                federated_jwt: BTreeMap::new(),
            }),
            changes: watch::channel(Changes::default()).0,
        })
    }

    /// The trust domain name, e.g. `jia.app`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The current root certificates of the own trust domain (DER).
    pub fn bundle_der(&self) -> Vec<Vec<u8>> {
        vec![self.lock().root.cert_der.clone()]
    }

    /// The federated trust domains and their CA certificates (DER).
    pub fn federated(&self) -> BTreeMap<String, Vec<Vec<u8>>> {
        self.lock().federated.clone()
    }

    /// Issues a standard X.509-SVID for `id`, valid for `ttl` (and 30 s back).
    pub fn issue_svid(&self, id: &SpiffeId, ttl: Duration) -> Result<IssuedSvid, DevCaError> {
        let mut svid = self.issue_custom(&LeafOptions::standard(id, ttl))?;
        svid.id = id.to_string();
        Ok(svid)
    }

    /// Issues a leaf exactly as `opts` says, standard or not (for tests of rejection).
    pub fn issue_custom(&self, opts: &LeafOptions) -> Result<IssuedSvid, DevCaError> {
        let root = self.lock().root.clone();
        let fail = |reason: rcgen::Error| DevCaError::Certificate {
            what: "SVID".into(),
            reason: reason.to_string(),
        };
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "meshd dev-ca");
        params.distinguished_name = dn;
        for uri in &opts.uris {
            let ia5 = uri.as_str().try_into().map_err(fail)?;
            params.subject_alt_names.push(SanType::URI(ia5));
        }
        params.is_ca = if opts.ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = if opts.digital_signature {
            vec![
                KeyUsagePurpose::DigitalSignature,
                KeyUsagePurpose::KeyEncipherment,
            ]
        } else {
            vec![KeyUsagePurpose::KeyEncipherment]
        };
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = opts.not_before.into();
        params.not_after = opts.not_after.into();
        let serial = random_serial();
        params.serial_number = Some(SerialNumber::from_slice(&serial));
        let cert = params.signed_by(&key, &root.issuer).map_err(fail)?;
        Ok(IssuedSvid {
            id: opts.uris.first().cloned().unwrap_or_default(),
            chain_der: vec![cert.der().to_vec()],
            key_pkcs8_der: key.serialize_der(),
            serial: hex(&serial),
            not_after: whole_second(opts.not_after),
        })
    }

    /// Makes every served identity get a fresh SVID now.
    pub fn rotate_now(&self) {
        self.changes.send_modify(|c| c.reissue += 1);
    }

    /// Trusts (or, with an empty list, stops trusting) a federated trust domain's CAs.
    pub fn set_federated(&self, trust_domain: &str, ca_der: Vec<Vec<u8>>) {
        {
            let mut state = self.lock();
            if ca_der.is_empty() {
                state.federated.remove(trust_domain);
            } else {
                state.federated.insert(trust_domain.to_string(), ca_der);
            }
        }
        self.changes.send_modify(|c| c.bundles += 1);
    }

    /// Replaces the root with a new one: the bundle holds only the new root from now on,
    /// and every served identity gets a new SVID signed by it.
    pub fn replace_ca(&self) -> Result<(), DevCaError> {
        let root = new_root(&self.trust_domain)?;
        self.lock().root = Arc::new(root);
        self.changes.send_modify(|c| c.reissue += 1);
        Ok(())
    }

    /// A receiver that sees every control change (for the serving side).
    pub fn subscribe(&self) -> watch::Receiver<Changes> {
        self.changes.subscribe()
    }

    /// The state lock; a panic elsewhere while holding it cannot corrupt these plain values.
    fn lock(&self) -> MutexGuard<'_, CaState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A fresh self-signed root for `trust_domain`.
fn new_root(trust_domain: &str) -> Result<CaRoot, DevCaError> {
    let fail = |reason: rcgen::Error| DevCaError::Certificate {
        what: format!("root CA for {trust_domain}"),
        reason: reason.to_string(),
    };
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail)?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "meshd dev-ca");
    dn.push(DnType::CommonName, format!("meshd dev CA {trust_domain}"));
    params.distinguished_name = dn;
    let uri = format!("spiffe://{trust_domain}");
    params
        .subject_alt_names
        .push(SanType::URI(uri.as_str().try_into().map_err(fail)?));
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
    let cert = params.self_signed(&key).map_err(fail)?;
    Ok(CaRoot {
        cert_der: cert.der().to_vec(),
        issuer: Issuer::new(params, key),
    })
}

/// 16 random bytes, positive and without a leading zero byte.
fn random_serial() -> [u8; 16] {
    let mut s = [0u8; 16];
    rand::rng().fill_bytes(&mut s);
    s[0] = (s[0] & 0x7f) | 0x40;
    s
}

/// Certificates keep whole seconds: report the not-after as the certificate says it.
fn whole_second(t: SystemTime) -> SystemTime {
    let secs = crate::identity::unix_seconds(t);
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Encodes DER as one PEM block (`label` e.g. `CERTIFICATE`, `PRIVATE KEY`).
pub fn pem_block(label: &str, der: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{parse_svid_leaf, IdentityError};
    use x509_parser::prelude::*;

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    #[test]
    fn root_is_a_spiffe_ca() {
        // A new dev CA has a P-256 root that names its trust domain and may sign certificates.
        let ca = DevCa::new("jia.app").unwrap();
        let der = ca.bundle_der().remove(0);
        let (_, cert) = X509Certificate::from_der(&der).unwrap();
        assert!(cert.is_ca());
        let ku = cert.key_usage().unwrap().unwrap().value;
        assert!(ku.key_cert_sign() && ku.crl_sign());
        let san = cert.subject_alternative_name().unwrap().unwrap();
        assert_eq!(
            san.value.general_names,
            vec![GeneralName::URI("spiffe://jia.app")]
        );
    }

    #[test]
    fn bad_trust_domains_are_refused() {
        // Someone types an uppercase or path-carrying trust domain: a clear error, no panic.
        for bad in ["JIA.app", "jia.app/x", "", "a b"] {
            assert!(
                matches!(DevCa::new(bad), Err(DevCaError::BadTrustDomain { .. })),
                "{bad}"
            );
        }
    }

    #[test]
    fn standard_svid_passes_meshd_checks() {
        // A payment SVID is a one-URI, non-CA, signing leaf that meshd's own parser accepts.
        let ca = DevCa::new("jia.app").unwrap();
        let want = id("spiffe://jia.app/payment-service");
        let svid = ca.issue_svid(&want, Duration::from_secs(60)).unwrap();
        let facts = parse_svid_leaf(&svid.chain_der[0]).unwrap();
        assert_eq!(facts.id, want);
        assert_eq!(facts.serial, svid.serial);
        assert_eq!(facts.not_after, svid.not_after);
        let (_, cert) = X509Certificate::from_der(&svid.chain_der[0]).unwrap();
        let eku = cert.extended_key_usage().unwrap().unwrap().value;
        assert!(eku.server_auth && eku.client_auth);
        let other = ca.issue_svid(&want, Duration::from_secs(60)).unwrap();
        assert_ne!(other.serial, svid.serial, "serials are random");
    }

    #[test]
    fn bad_leaves_are_rejected_by_identity() {
        // Tests need broken SVIDs; each one trips the matching IdentityError.
        let ca = DevCa::new("jia.app").unwrap();
        let base = LeafOptions::standard(&id("spiffe://jia.app/a"), Duration::from_secs(60));
        let two = LeafOptions {
            uris: vec!["spiffe://jia.app/a".into(), "spiffe://jia.app/b".into()],
            ..base.clone()
        };
        let none = LeafOptions {
            uris: vec![],
            ..base.clone()
        };
        let ca_leaf = LeafOptions {
            ca: true,
            ..base.clone()
        };
        let no_sig = LeafOptions {
            digital_signature: false,
            ..base.clone()
        };
        let table = [
            (two, IdentityError::UriSanCount(2)),
            (none, IdentityError::UriSanCount(0)),
            (ca_leaf, IdentityError::LeafIsCa),
            (no_sig, IdentityError::NoDigitalSignature),
        ];
        for (opts, want) in table {
            let leaf = ca.issue_custom(&opts).unwrap();
            assert_eq!(parse_svid_leaf(&leaf.chain_der[0]), Err(want));
        }
    }

    #[test]
    fn replace_ca_changes_the_bundle_and_signals() {
        // Replacing the root changes the bundle and tells the servers to reissue.
        let ca = DevCa::new("jia.app").unwrap();
        let rx = ca.subscribe();
        let before = ca.bundle_der();
        ca.replace_ca().unwrap();
        assert_ne!(ca.bundle_der(), before);
        assert_eq!(rx.borrow().reissue, 1);
        ca.set_federated("other.td", vec![before[0].clone()]);
        assert_eq!(rx.borrow().bundles, 1);
        assert_eq!(ca.federated().len(), 1);
        ca.set_federated("other.td", vec![]);
        assert!(ca.federated().is_empty());
    }

    #[test]
    fn pem_round_trips() {
        // PEM written by the dev CA reads back as the same DER.
        let ca = DevCa::new("jia.app").unwrap();
        for len in [0usize, 1, 2, 3] {
            let der = ca.bundle_der().remove(0);
            let der = &der[..der.len() - len];
            let pem = pem_block("CERTIFICATE", der);
            let mut r = pem.as_bytes();
            let got = rustls_pemfile::certs(&mut r).next().unwrap().unwrap();
            assert_eq!(got.as_ref(), der);
        }
    }
}
