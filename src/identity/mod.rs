//! The sidecar's own identity: SPIFFE IDs, X.509-SVIDs and trust bundles.
//!
//! Flow: a source (`workload_api` for SPIRE or the development CA, `identity_files` for
//! PEM files) turns what it receives into an immutable [`IdentitySnapshot`] with
//! [`Svid::from_der`] and [`BundleSet`], and publishes an [`IdentityStatus`] on a
//! `watch` channel. `tls` builds its configs from each published snapshot; nothing on a
//! request path ever waits on a source.
//!
//! The JWT side (`jwt/`) runs beside it: the Workload API's JWT bundles are published on a
//! `watch` channel of their own as a [`JwtBundlesStatus`] (X.509 readiness never waits on
//! them), [`JwtSvidSource`] fetches and caches JWT-SVIDs per audience, and
//! [`validate_jwt_svid`] checks a token by the JWT-SVID rules against [`JwtBundles`].

mod files;
mod jwt;
mod os_random;
mod workload_api;

#[cfg(test)]
pub(crate) mod fuzz;
pub use files::{follow_files, FilesError};
pub use jwt::{
    follow_jwt_bundles, jwt_bundles_from_set, retry_decision, validate_jwt_svid, JwtAlg,
    JwtApiError, JwtBundle, JwtBundleError, JwtBundles, JwtBundlesStatus, JwtKey, JwtStreamState,
    JwtSvidRejection, JwtSvidSource, JwtSvidToken, RetryDecision, ValidJwtSvid, MAX_TOKEN_LEN,
};
pub use workload_api::{follow_workload_api, snapshot_from_context, ContextError};

use crate::config::{parse_spiffe_id, SpiffeIdError};
use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use x509_parser::prelude::*;

pub use spiffe::{SpiffeId, TrustDomain};

/// Why a certificate, key or bundle could not become part of an identity.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IdentityError {
    /// The SVID chain was empty.
    #[error("SVID has no certificates")]
    EmptyChain,
    /// A certificate could not be parsed as X.509 DER.
    #[error("{what} is not a valid X.509 certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    /// The leaf has zero or several URI SANs.
    #[error("SVID must have exactly one URI SAN, found {0}")]
    UriSanCount(usize),
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("SVID URI SAN `{uri}` is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId { uri: String, reason: SpiffeIdError },
    /// The leaf is a CA certificate.
    #[error("SVID leaf certificate must not be a CA")]
    LeafIsCa,
    /// The leaf lacks the digitalSignature key usage.
    #[error("SVID leaf certificate lacks the digitalSignature key usage")]
    NoDigitalSignature,
    /// The certificate is past its not-after time.
    #[error("SVID for {id} expired at {not_after}")]
    Expired { id: String, not_after: String },
    /// The private key is unparsable or does not belong to the leaf.
    #[error("private key: {0}")]
    BadKey(String),
    /// The bundle has no CA certificate.
    #[error("trust bundle for {0} holds no CA certificate")]
    EmptyBundle(String),
}

/// One X.509-SVID: the own SPIFFE ID with its chain and key, ready for rustls.
pub struct Svid {
    /// The identity this SVID proves.
    pub id: SpiffeId,
    /// Chain and signing key prepared once, handed to every handshake.
    pub certified_key: Arc<CertifiedKey>,
    /// Leaf serial number, lowercase hex (shown at `/identity`, used to see rotations).
    pub serial: String,
    /// Leaf not-after: after it, no new handshake uses this SVID.
    pub not_after: SystemTime,
}

impl fmt::Debug for Svid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id.to_string())
            .field("serial", &self.serial)
            .field("not_after", &unix_seconds(self.not_after))
            .finish_non_exhaustive()
    }
}

/// Facts read from a leaf certificate that claims to be an X.509-SVID.
#[derive(Debug, Clone, PartialEq)]
pub struct LeafFacts {
    pub id: SpiffeId,
    pub serial: String,
    pub not_after: SystemTime,
}

/// Checks a leaf against the X.509-SVID standard (one URI SAN with a valid SPIFFE ID,
/// not a CA, digitalSignature when key usage is present) and returns what it says.
pub fn parse_svid_leaf(der: &[u8]) -> Result<LeafFacts, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| IdentityError::BadCertificate {
        what: "SVID leaf".into(),
        reason: e.to_string(),
    })?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name {
                uris.push(*u);
            }
        }
    }
    if uris.len() != 1 {
        return Err(IdentityError::UriSanCount(uris.len()));
    }
    let id = parse_spiffe_id(uris[0]).map_err(|reason| IdentityError::BadSpiffeId {
        uri: uris[0].to_string(),
        reason,
    })?;
    if cert.is_ca() {
        return Err(IdentityError::LeafIsCa);
    }
    if let Ok(Some(ku)) = cert.key_usage() {
        if !ku.value.digital_signature() {
            return Err(IdentityError::NoDigitalSignature);
        }
    }
    let not_after =
        UNIX_EPOCH + Duration::from_secs(cert.validity().not_after.timestamp().max(0) as u64);
    Ok(LeafFacts {
        id,
        serial: hex(cert.raw_serial()),
        not_after,
    })
}

impl Svid {
    /// Builds an SVID from a DER chain (leaf first) and a PKCS#8/SEC1 key, checking the
    /// leaf against the standard and the key against the leaf.
    pub fn from_der(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        provider: &CryptoProvider,
    ) -> Result<Svid, IdentityError> {
        let leaf = chain.first().ok_or(IdentityError::EmptyChain)?;
        let facts = parse_svid_leaf(leaf)?;
        if facts.not_after <= SystemTime::now() {
            return Err(IdentityError::Expired {
                id: facts.id.to_string(),
                not_after: humantime::format_rfc3339_seconds(facts.not_after).to_string(),
            });
        }
        let certified_key = CertifiedKey::from_der(chain, key, provider)
            .map_err(|e| IdentityError::BadKey(describe_key_error(&e)))?;
        Ok(Svid {
            id: facts.id,
            certified_key: Arc::new(certified_key),
            serial: facts.serial,
            not_after: facts.not_after,
        })
    }
}

fn describe_key_error(e: &rustls::Error) -> String {
    match e {
        rustls::Error::InconsistentKeys(_) => {
            "the private key does not match the SVID certificate".into()
        }
        other => other.to_string(),
    }
}

/// Trust bundles by trust domain: the own domain's and every federated one.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BundleSet {
    /// CA certificates (DER) that may sign SVIDs of each trust domain.
    pub domains: BTreeMap<String, Vec<CertificateDer<'static>>>,
}

impl BundleSet {
    /// Adds a trust domain's CA certificates; an empty list is an error.
    pub fn insert(
        &mut self,
        trust_domain: &str,
        cas: Vec<CertificateDer<'static>>,
    ) -> Result<(), IdentityError> {
        if cas.is_empty() {
            return Err(IdentityError::EmptyBundle(trust_domain.to_string()));
        }
        for (i, ca) in cas.iter().enumerate() {
            X509Certificate::from_der(ca).map_err(|e| IdentityError::BadCertificate {
                what: format!("CA #{} of the {trust_domain} bundle", i + 1),
                reason: e.to_string(),
            })?;
        }
        self.domains.insert(trust_domain.to_string(), cas);
        Ok(())
    }

    /// The CA certificates for a trust domain, if it is trusted at all.
    pub fn for_domain(&self, trust_domain: &str) -> Option<&[CertificateDer<'static>]> {
        self.domains.get(trust_domain).map(Vec::as_slice)
    }

    /// Trust domain names, sorted.
    pub fn trust_domains(&self) -> Vec<String> {
        self.domains.keys().cloned().collect()
    }
}

/// What a source publishes at each rotation: immutable, shared by `Arc`.
#[derive(Debug)]
pub struct IdentitySnapshot {
    pub svid: Svid,
    pub bundles: BundleSet,
    /// Counts published snapshots; the first is 1.
    pub generation: u64,
}

/// Announces an identity change: the one place that does. It sets the identity gauges
/// first and then publishes the status, so whoever sees a new SVID (the TLS store,
/// `/ready`, a scrape that follows them) also sees its expiry and bundle metrics.
pub fn publish(status: &watch::Sender<IdentityStatus>, next: IdentityStatus) {
    if let IdentityStatus::Ready(s) = &next {
        metrics::gauge!("meshd_svid_expiry_timestamp_seconds")
            .set(unix_seconds(s.svid.not_after) as f64);
        metrics::gauge!("meshd_bundle_trust_domains").set(s.bundles.domains.len() as f64);
    }
    status.send_replace(next);
}

/// The identity as the rest of the program sees it.
#[derive(Debug, Clone)]
pub enum IdentityStatus {
    /// No usable SVID yet (agent unreachable, no identity issued, files unreadable).
    Waiting { reason: String },
    /// A valid SVID and bundle: handshakes may proceed.
    Ready(Arc<IdentitySnapshot>),
    /// The last SVID expired with no replacement: fail closed.
    Expired { reason: String },
    /// The SVID has another ID than `identity.expect`: never ready.
    Mismatch { reason: String },
}

impl IdentityStatus {
    /// The current snapshot when handshakes may use it.
    pub fn snapshot(&self) -> Option<&Arc<IdentitySnapshot>> {
        match self {
            IdentityStatus::Ready(s) => Some(s),
            _ => None,
        }
    }

    /// One line for `/ready` and logs when not ready.
    pub fn reason(&self) -> Option<&str> {
        match self {
            IdentityStatus::Ready(_) => None,
            IdentityStatus::Waiting { reason }
            | IdentityStatus::Expired { reason }
            | IdentityStatus::Mismatch { reason } => Some(reason),
        }
    }
}

/// An SVID whose ID is not the one `identity.expect` names: the sidecar must never
/// become ready with it (the source publishes [`IdentityStatus::Mismatch`]).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("SVID has SPIFFE ID {svid} but identity.expect is {want}; refusing to become ready")]
pub struct ExpectMismatch {
    /// The ID the SVID has.
    pub svid: SpiffeId,
    /// The ID `identity.expect` names.
    pub want: SpiffeId,
}

/// Checks the SVID's ID against `identity.expect`.
pub fn check_expected(svid: &SpiffeId, expect: Option<&SpiffeId>) -> Result<(), ExpectMismatch> {
    match expect {
        Some(want) if want != svid => Err(ExpectMismatch {
            svid: svid.clone(),
            want: want.clone(),
        }),
        _ => Ok(()),
    }
}

/// Seconds since the Unix epoch (for metrics and `/identity`).
pub fn unix_seconds(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// The one crypto provider of meshd (ring), built once: it loads SVID keys here
/// ([`Svid::from_der`]) and builds every TLS config (`tls`, the gateway). Its policy:
/// TLS 1.3 suites; TLS 1.2 only with ECDHE AES-GCM; key exchange X25519, P-256, P-384;
/// rustls's random bytes from a per-thread pool of kernel randomness (`os_random`).
/// It is not installed as the process default: every rustls config names it.
pub fn crypto_provider() -> Arc<CryptoProvider> {
    use rustls::crypto::ring::{cipher_suite as cs, default_provider, kx_group};
    static PROVIDER: std::sync::OnceLock<Arc<CryptoProvider>> = std::sync::OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            Arc::new(CryptoProvider {
                cipher_suites: vec![
                    cs::TLS13_AES_128_GCM_SHA256,
                    cs::TLS13_AES_256_GCM_SHA384,
                    cs::TLS13_CHACHA20_POLY1305_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    cs::TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                ],
                kx_groups: vec![kx_group::X25519, kx_group::SECP256R1, kx_group::SECP384R1],
                secure_random: &os_random::OsRandom,
                ..default_provider()
            })
        })
        .clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expect_mismatch_names_both_ids() {
        let a = parse_spiffe_id("spiffe://jia.app/a").unwrap();
        let b = parse_spiffe_id("spiffe://jia.app/b").unwrap();
        let msg = check_expected(&a, Some(&b)).unwrap_err().to_string();
        assert!(msg.contains("spiffe://jia.app/a") && msg.contains("spiffe://jia.app/b"));
        assert!(check_expected(&a, Some(&a)).is_ok());
        assert!(check_expected(&a, None).is_ok());
    }
}
