//! TLS for meshd: rustls configs built from the current identity, SPIFFE peer
//! verification, and an atomic swap of prepared configs at every rotation.
//!
//! Flow: `TlsStore::run` watches the identity channel; for each published snapshot it
//! builds one server config (inbound) and one client config per upstream `server_id`
//! (outbound), then swaps them in. Handshakes `load` the current config: no config is
//! ever built on a request path, and without a valid identity there is no config, so
//! new handshakes fail closed.

mod handshake_io;
mod server_only;
mod verified_chains;

#[cfg(test)]
mod fuzz;
pub use handshake_io::HandshakeIo;
pub use server_only::{server_only_tls, ServerOnlyError};

use crate::identity::{
    crypto_provider, parse_svid_leaf, BundleSet, IdentitySnapshot, IdentityStatus, SpiffeId,
};
use crate::tls::verified_chains::VerifiedChains;
use arc_swap::ArcSwapOption;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, ServerConfig,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;
use webpki::{EndEntityCert, KeyUsage};

/// The ALPN id of HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// Trust anchors per trust domain, prepared once per bundle set.
#[derive(Debug)]
struct Anchors {
    by_domain: HashMap<String, Vec<rustls_pki_types::TrustAnchor<'static>>>,
}

impl Anchors {
    fn new(bundles: &BundleSet) -> Anchors {
        let mut by_domain = HashMap::new();
        for (td, cas) in &bundles.domains {
            let anchors: Vec<_> = cas
                .iter()
                .filter_map(|ca| webpki::anchor_from_trusted_cert(ca).ok())
                .map(|a| a.to_owned())
                .collect();
            by_domain.insert(td.clone(), anchors);
        }
        Anchors { by_domain }
    }

    /// Verifies an X.509-SVID chain to the bundle of the SVID's own trust domain and
    /// returns its SPIFFE ID.
    fn verify(
        &self,
        provider: &CryptoProvider,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: KeyUsage,
    ) -> Result<SpiffeId, Error> {
        let facts = parse_svid_leaf(end_entity).map_err(|e| {
            Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(e))))
        })?;
        let anchors = self
            .by_domain
            .get(facts.id.trust_domain_name())
            .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        let cert = EndEntityCert::try_from(end_entity)
            .map_err(|_| Error::InvalidCertificate(CertificateError::BadEncoding))?;
        cert.verify_for_usage(
            provider.signature_verification_algorithms.all,
            anchors,
            intermediates,
            now,
            usage,
            None,
            None,
        )
        .map_err(webpki_error)?;
        Ok(facts.id)
    }
}

fn webpki_error(e: webpki::Error) -> Error {
    use webpki::Error as W;
    Error::InvalidCertificate(match e {
        W::CertExpired { .. } => CertificateError::Expired,
        W::CertNotValidYet { .. } => CertificateError::NotValidYet,
        W::UnknownIssuer => CertificateError::UnknownIssuer,
        W::InvalidSignatureForPublicKey => CertificateError::BadSignature,
        _ => CertificateError::BadEncoding,
    })
}

/// Verifies client SVIDs on the inbound side: any SPIFFE ID of a trusted domain
/// (authorization by ID is the policy's job).
#[derive(Debug)]
struct SpiffeClientVerifier {
    chain: ChainCheck,
}

/// What both verifiers share: the trust anchors and the algorithms that check chains and
/// handshake signatures.
#[derive(Debug)]
struct ChainCheck {
    anchors: Anchors,
    provider: Arc<CryptoProvider>,
    /// Chains that passed `anchors` already (rebuilt with them at each rotation).
    verified: VerifiedChains,
}

impl ChainCheck {
    fn new(bundles: &BundleSet, provider: Arc<CryptoProvider>) -> ChainCheck {
        ChainCheck {
            anchors: Anchors::new(bundles),
            provider,
            verified: VerifiedChains::default(),
        }
    }

    /// Verifies a chain for `usage` (`b'c'` client auth, `b's'` server auth), or finds
    /// the same bytes verified before and still valid.
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
        usage: u8,
    ) -> Result<SpiffeId, Error> {
        let key = crate::tls::verified_chains::chain_key(usage, end_entity, intermediates);
        if let Some(id) = self.verified.get(&key, now) {
            return Ok(id);
        }
        let key_usage = if usage == b'c' {
            KeyUsage::client_auth()
        } else {
            KeyUsage::server_auth()
        };
        let id = self
            .anchors
            .verify(&self.provider, end_entity, intermediates, now, key_usage)?;
        if let Some(window) = crate::tls::verified_chains::validity(end_entity, intermediates) {
            self.verified.insert(key, id.clone(), window);
        }
        Ok(id)
    }
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.chain.verify(end_entity, intermediates, now, b'c')?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.schemes()
    }
}

/// Verifies the upstream's SVID on the outbound side and that its ID is `server_id`:
/// a valid chain with another ID is refused.
#[derive(Debug)]
struct SpiffeServerVerifier {
    chain: ChainCheck,
    server_id: SpiffeId,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let id = self.chain.verify(end_entity, intermediates, now, b's')?;
        if id != self.server_id {
            return Err(Error::InvalidCertificate(CertificateError::Other(
                rustls::OtherError(Arc::new(WrongServerId {
                    want: self.server_id.to_string(),
                    got: id.to_string(),
                })),
            )));
        }
        Ok(ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.tls12(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.chain.tls13(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.chain.schemes()
    }
}

/// The upstream answered with a valid SVID for another SPIFFE ID.
#[derive(Debug, thiserror::Error)]
#[error("upstream presented {got}, expected {want}")]
pub struct WrongServerId {
    pub want: String,
    pub got: String,
}

/// Always presents the snapshot's SVID.
#[derive(Debug)]
struct OwnSvid(Arc<CertifiedKey>);

impl ResolvesServerCert for OwnSvid {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

impl ResolvesClientCert for OwnSvid {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
    fn has_certs(&self) -> bool {
        true
    }
}

/// The inbound's client-certificate check for a bundle set: a chain to the bundle of the
/// client's own trust domain and an X.509-SVID leaf. `server_config` installs it; it is
/// public so the chain check can be measured alone (`benches/identity_tls.rs`).
pub fn client_verifier(bundles: &BundleSet) -> Arc<dyn ClientCertVerifier> {
    Arc::new(SpiffeClientVerifier {
        chain: ChainCheck::new(bundles, crypto_provider()),
    })
}

/// Builds the inbound server config for a snapshot.
pub fn server_config(snapshot: &IdentitySnapshot, alpn_h2: bool) -> Result<ServerConfig, Error> {
    let mut cfg = ServerConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_client_cert_verifier(client_verifier(&snapshot.bundles))
        .with_cert_resolver(Arc::new(OwnSvid(snapshot.svid.certified_key.clone())));
    // Our order, not the client's: AES-128-GCM with SHA-256 first, as BoringSSL does.
    // OpenSSL clients list AES-256/SHA-384 first; its SHA-384 key schedule was 7.7 % of
    // a full handshake here (SHA-256 has SHA-NI), and AES-256 records cost more.
    cfg.ignore_client_order = true;
    if alpn_h2 {
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    }
    Ok(cfg)
}

/// Builds an outbound client config that accepts only `server_id`.
pub fn client_config(
    snapshot: &IdentitySnapshot,
    server_id: &SpiffeId,
    alpn_h2: bool,
) -> Result<ClientConfig, Error> {
    let provider = crypto_provider();
    let verifier = SpiffeServerVerifier {
        chain: ChainCheck::new(&snapshot.bundles, provider.clone()),
        server_id: server_id.clone(),
    };
    let mut cfg = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(OwnSvid(snapshot.svid.certified_key.clone())));
    if alpn_h2 {
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    }
    Ok(cfg)
}

/// The SPIFFE ID of the peer of an established connection (its leaf was verified
/// during the handshake).
pub fn peer_id(certs: Option<&[CertificateDer<'static>]>) -> Option<SpiffeId> {
    certs
        .and_then(|c| c.first())
        .and_then(|leaf| parse_svid_leaf(leaf).ok())
        .map(|f| f.id)
}

/// A fixed server name: SPIFFE peers are verified by SPIFFE ID, never by hostname.
pub fn spiffe_server_name() -> ServerName<'static> {
    ServerName::try_from("meshd.spiffe.invalid").expect("static name is valid")
}

/// One upstream's prepared client config slot.
#[derive(Debug)]
pub struct UpstreamTls {
    /// The SPIFFE ID the upstream must present (mutual TLS); `None` for a server-only
    /// upstream, whose certificate is checked for `server_name` instead.
    pub server_id: Option<SpiffeId>,
    /// The name sent in SNI: a fixed one for SPIFFE peers (checked by ID, never by
    /// name), the configured `sni` for a server-only upstream.
    pub server_name: ServerName<'static>,
    pub alpn_h2: bool,
    /// Swapped at each rotation; empty while there is no valid identity.
    pub config: ArcSwapOption<ClientConfig>,
}

/// Prepared TLS configs, swapped atomically at every identity change.
#[derive(Debug)]
pub struct TlsStore {
    /// Whether the inbound listener speaks HTTP/2 (ALPN h2) or raw TCP.
    inbound_alpn_h2: bool,
    /// The inbound config; empty while there is no valid identity (fail closed).
    inbound: ArcSwapOption<ServerConfig>,
    /// One slot per outbound upstream, by upstream name.
    upstreams: HashMap<String, Arc<UpstreamTls>>,
}

impl TlsStore {
    pub fn new(inbound_alpn_h2: bool, upstreams: Vec<(String, SpiffeId, bool)>) -> TlsStore {
        TlsStore {
            inbound_alpn_h2,
            inbound: ArcSwapOption::empty(),
            upstreams: upstreams
                .into_iter()
                .map(|(name, server_id, alpn_h2)| {
                    (
                        name,
                        Arc::new(UpstreamTls {
                            server_id: Some(server_id),
                            server_name: spiffe_server_name(),
                            alpn_h2,
                            config: ArcSwapOption::empty(),
                        }),
                    )
                })
                .collect(),
        }
    }

    /// The current inbound config, if there is a valid identity.
    pub fn inbound(&self) -> Option<Arc<ServerConfig>> {
        self.inbound.load_full()
    }

    /// The slot of an upstream.
    pub fn upstream(&self, name: &str) -> Option<Arc<UpstreamTls>> {
        self.upstreams.get(name).cloned()
    }

    /// Applies an identity status: builds and swaps in new configs, or clears them.
    pub fn apply(&self, status: &IdentityStatus) {
        let Some(snapshot) = status.snapshot() else {
            self.inbound.store(None);
            for u in self.upstreams.values() {
                u.config.store(None);
            }
            return;
        };
        match server_config(snapshot, self.inbound_alpn_h2) {
            Ok(c) => self.inbound.store(Some(Arc::new(c))),
            Err(e) => {
                tracing::error!("cannot build the inbound TLS config: {e}");
                self.inbound.store(None);
            }
        }
        for u in self.upstreams.values() {
            let Some(server_id) = &u.server_id else {
                continue;
            };
            match client_config(snapshot, server_id, u.alpn_h2) {
                Ok(c) => u.config.store(Some(Arc::new(c))),
                Err(e) => {
                    tracing::error!("cannot build the client TLS config for {server_id}: {e}");
                    u.config.store(None);
                }
            }
        }
    }

    /// Follows the identity channel until it closes.
    pub async fn run(self: Arc<Self>, mut identity: watch::Receiver<IdentityStatus>) {
        loop {
            let status = identity.borrow_and_update().clone();
            self.apply(&status);
            if identity.changed().await.is_err() {
                return;
            }
        }
    }
}

/// Every value [`failure_reason`] gives (and `no_identity`, `timeout`), so each
/// listener's `meshd_tls_handshake_failures_total` series can start at 0.
pub const FAILURE_REASONS: [&str; 14] = [
    "no_identity",
    "timeout",
    "not_tls",
    "truncated",
    "io",
    "no_client_cert",
    "unknown_ca",
    "expired_cert",
    "wrong_server_id",
    "bad_cert",
    "no_alpn",
    "incompatible",
    "alert",
    "other",
];

/// A bounded label for a TLS handshake failure (`meshd_tls_handshake_failures_total`).
pub fn failure_reason(e: &std::io::Error) -> &'static str {
    let Some(inner) = e.get_ref().and_then(|i| i.downcast_ref::<Error>()) else {
        return match e.kind() {
            std::io::ErrorKind::InvalidData => "not_tls",
            std::io::ErrorKind::UnexpectedEof => "truncated",
            std::io::ErrorKind::TimedOut => "timeout",
            _ => "io",
        };
    };
    match inner {
        Error::NoCertificatesPresented => "no_client_cert",
        Error::InvalidCertificate(CertificateError::UnknownIssuer) => "unknown_ca",
        Error::InvalidCertificate(CertificateError::Expired) => "expired_cert",
        Error::InvalidCertificate(CertificateError::Other(o)) if o.0.is::<WrongServerId>() => {
            "wrong_server_id"
        }
        Error::InvalidCertificate(_) => "bad_cert",
        Error::NoApplicationProtocol => "no_alpn",
        Error::InvalidMessage(_) => "not_tls",
        Error::PeerIncompatible(_) => "incompatible",
        Error::AlertReceived(_) => "alert",
        _ => "other",
    }
}
