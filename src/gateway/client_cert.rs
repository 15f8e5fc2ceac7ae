//! Client certificates at the edge (`gateway.tls.client_ca`): partners call with mutual
//! TLS instead of a token.
//!
//! Flow: [`verifier`] builds the handshake's client certificate check from the CA file
//! (`optional`: a client may send none, but one it sends must verify; `required`: a
//! handshake without a valid one is refused) -> after the handshake, [`user_of`] names
//! the user of the verified leaf certificate -> each request of the connection carries it
//! as a [`ClientCertUser`] extension, which `authenticate` takes as a credential where
//! the route accepts one.

use crate::config::ClientAuth;
use rustls::server::danger::ClientCertVerifier;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// The user named by the connection's verified client certificate, set on each request.
#[derive(Debug, Clone)]
pub struct ClientCertUser(pub Arc<str>);

/// Why the client CA file gives no verifier.
#[derive(Debug, thiserror::Error)]
pub enum ClientCaError {
    /// The file is missing or not PEM certificates.
    #[error("gateway.tls.client_ca: {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// A certificate of the file is not a usable trust anchor, or there is none.
    #[error("gateway.tls.client_ca: {path}: {reason}")]
    Anchors { path: PathBuf, reason: String },
}

/// The client certificate check of the handshake: certificates chaining to a CA of
/// `path` (PEM, one or more), asked for (`optional`) or demanded (`required`).
pub fn verifier(
    path: &Path,
    mode: ClientAuth,
) -> Result<Arc<dyn ClientCertVerifier>, ClientCaError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::CertificateDer;
    let read = |reason: String| ClientCaError::Read {
        path: path.to_path_buf(),
        reason,
    };
    let anchors = |reason: String| ClientCaError::Anchors {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| read(e.to_string()))?;
    if certs.is_empty() {
        return Err(read("no certificate in the file".into()));
    }
    let mut roots = rustls::RootCertStore::empty();
    for (i, cert) in certs.into_iter().enumerate() {
        roots
            .add(cert)
            .map_err(|e| anchors(format!("certificate {i}: {e}")))?;
    }
    let builder = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        crate::identity::crypto_provider(),
    );
    let builder = match mode {
        ClientAuth::Optional => builder.allow_unauthenticated(),
        ClientAuth::Required => builder,
    };
    builder.build().map_err(|e| anchors(e.to_string()))
}

/// The user a verified client certificate names: its SPIFFE ID (a `spiffe://` URI SAN)
/// if it has one, else its first DNS SAN, else its subject's common name; none when
/// the certificate has none of them (the connection then carries no user).
pub fn user_of(cert_der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(cert_der).ok()?;
    let names: Vec<GeneralName> = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .map(|san| san.value.general_names.clone())
        .unwrap_or_default();
    let spiffe = names.iter().find_map(|n| match n {
        GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
        _ => None,
    });
    let dns = || {
        names.iter().find_map(|n| match n {
            GeneralName::DNSName(d) if !d.is_empty() => Some(d.to_string()),
            _ => None,
        })
    };
    let common_name = || {
        cert.subject()
            .iter_common_name()
            .next()
            .and_then(|cn| cn.as_str().ok())
            .filter(|cn| !cn.is_empty())
            .map(str::to_string)
    };
    spiffe.or_else(dns).or_else(common_name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{CertificateParams, DistinguishedName, DnType, KeyPair, SanType};

    fn cert(cn: Option<&str>, sans: Vec<SanType>) -> Vec<u8> {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        if let Some(cn) = cn {
            dn.push(DnType::CommonName, cn);
        }
        dn.push(DnType::OrganizationName, "Partner Inc");
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn the_user_is_the_spiffe_id_else_the_dns_name_else_the_common_name() {
        let uri = |u: &str| SanType::URI(u.try_into().unwrap());
        let dns = |d: &str| SanType::DnsName(d.try_into().unwrap());
        let table = [
            (
                Some("billing"),
                vec![
                    dns("billing.partner.test"),
                    uri("spiffe://partner.test/billing"),
                ],
                Some("spiffe://partner.test/billing"),
            ),
            (
                Some("billing"),
                vec![
                    uri("https://partner.test/x"),
                    dns("billing.partner.test"),
                    dns("b2"),
                ],
                Some("billing.partner.test"),
            ),
            (Some("billing"), vec![], Some("billing")),
            (None, vec![uri("https://partner.test/x")], None),
            (None, vec![], None),
        ];
        for (cn, sans, want) in table {
            let what = format!("{cn:?} {sans:?}");
            assert_eq!(user_of(&cert(cn, sans)).as_deref(), want, "{what}");
        }
        assert_eq!(user_of(b"not a certificate"), None);
    }

    #[test]
    fn a_bad_ca_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("missing.pem");
        let e = verifier(&missing, ClientAuth::Optional).err().unwrap();
        assert!(e.to_string().starts_with("gateway.tls.client_ca: "), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = verifier(&empty, ClientAuth::Required).err().unwrap();
        assert!(e.to_string().ends_with("no certificate in the file"), "{e}");
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = params.self_signed(&key).unwrap();
        let good = dir.path().join("ca.pem");
        std::fs::write(&good, ca.pem()).unwrap();
        assert!(verifier(&good, ClientAuth::Required).is_ok());
    }
}
