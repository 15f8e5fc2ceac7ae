//! Server-only TLS to an upstream outside the mesh (`outbound[].tls.mode: server_only`):
//! the server's certificate is checked by web-PKI rules for one name, and meshd presents
//! no client certificate (the caller's proof, if any, is the JWT-SVID on each request).
//!
//! Flow: at start, [`server_only_tls`] builds the slot once: roots from the `ca` PEM file
//! when given, else the compiled-in Mozilla roots (`webpki-roots`), and rustls' own
//! web-PKI verifier, which checks the chain and that the certificate is valid for `sni`;
//! the handshake sends `sni` as its server name. The slot never changes with the SVID:
//! nothing in it comes from the identity.

use crate::identity::crypto_provider;
use crate::tls::{UpstreamTls, ALPN_H2};
use arc_swap::ArcSwapOption;
use rustls::{ClientConfig, RootCertStore};
use rustls_pki_types::ServerName;
use std::path::{Path, PathBuf};

/// Why a server-only TLS slot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ServerOnlyError {
    /// The `ca` file could not be read.
    #[error("tls.ca {path}: {reason}")]
    ReadCa { path: PathBuf, reason: String },
    /// The `ca` file holds no certificate rustls accepts as a trust anchor.
    #[error("tls.ca {path}: no usable CA certificate in it ({reason})")]
    NoCa { path: PathBuf, reason: String },
    /// `sni` is neither a DNS name nor an IP address.
    #[error("tls.sni `{0}` is not a DNS name or IP address")]
    BadName(String),
    /// rustls refused the configuration.
    #[error("client TLS config: {0}")]
    Config(#[from] rustls::Error),
}

/// The client TLS slot of a server-only upstream: roots from `ca` (else web-PKI),
/// `sni` sent and checked, no client certificate.
pub fn server_only_tls(
    ca: Option<&Path>,
    sni: &str,
    alpn_h2: bool,
) -> Result<UpstreamTls, ServerOnlyError> {
    let server_name =
        ServerName::try_from(sni.to_string()).map_err(|_| ServerOnlyError::BadName(sni.into()))?;
    let roots = match ca {
        Some(path) => roots_from_pem(path)?,
        None => RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        },
    };
    let mut cfg = ClientConfig::builder_with_provider(crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    if alpn_h2 {
        cfg.alpn_protocols = vec![ALPN_H2.to_vec()];
    }
    Ok(UpstreamTls {
        server_id: None,
        server_name,
        alpn_h2,
        config: ArcSwapOption::from_pointee(cfg),
    })
}

/// Every certificate of a PEM file as a trust anchor; at least one.
fn roots_from_pem(path: &Path) -> Result<RootCertStore, ServerOnlyError> {
    let pem = std::fs::read(path).map_err(|e| ServerOnlyError::ReadCa {
        path: path.into(),
        reason: e.to_string(),
    })?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| ServerOnlyError::ReadCa {
            path: path.into(),
            reason: e.to_string(),
        })?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(ServerOnlyError::NoCa {
            path: path.into(),
            reason: "no PEM CERTIFICATE block parses as a CA certificate".into(),
        });
    }
    Ok(roots)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_is_built_from_web_pki_or_a_ca_file_and_bad_input_is_named() {
        // Web-PKI roots: a slot with the name and no SPIFFE ID; a bad name is named.
        let slot = server_only_tls(None, "api.example.com", true).expect("web-PKI slot");
        assert!(slot.server_id.is_none());
        assert_eq!(slot.server_name.to_str(), "api.example.com");
        assert!(slot.config.load().is_some());
        let err = server_only_tls(None, "not a name", false).unwrap_err();
        assert_eq!(
            err.to_string(),
            "tls.sni `not a name` is not a DNS name or IP address"
        );
        // A CA file: a real certificate loads; a missing file or one without a
        // certificate is refused naming the file.
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert!(server_only_tls(Some(&good), "127.0.0.1", false).is_ok());
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not pem").unwrap();
        let err = server_only_tls(Some(&empty), "x", false).unwrap_err();
        assert!(
            err.to_string().contains("no usable CA certificate"),
            "{err}"
        );
        let missing = dir.path().join("missing.pem");
        let err = server_only_tls(Some(&missing), "x", false).unwrap_err();
        assert!(err.to_string().starts_with("tls.ca "), "{err}");
    }
}
