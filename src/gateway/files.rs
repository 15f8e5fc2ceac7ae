//! The gateway's files: its certificate and key, the client CA, the JWKS and the API
//! keys file, read into what a handshake and `authenticate` use.
//!
//! Flow: [`load_tls`] (certificate, key, and the client certificate check when
//! `gateway.tls.client_ca` is set) and [`load_credentials`] (JWKS, API keys file plus
//! `API_GATEWAY_KEY`, beside the JWT-SVID verifier, which follows the Workload API and
//! not a file) run at start and whenever [`modified`] sees a file change;
//! [`check_files`] reads the same files for `meshd check`, one line each.

use crate::config::GatewayConfig;
use crate::gateway::auth::{ApiKeys, AuthError, Credentials, JwtKeys};
use crate::gateway::{client_cert, GatewayError};
use crate::proxy::JwtSvidVerifier;
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

pub(super) fn load_credentials(
    config: &GatewayConfig,
    jwt_svid: Option<&Arc<JwtSvidVerifier>>,
) -> Result<Credentials, AuthError> {
    let mut api_keys = config.api_keys.as_deref().map(ApiKeys::load).transpose()?;
    if let Some(digest) = &config.env_api_key {
        api_keys
            .get_or_insert_with(ApiKeys::default)
            .add_env_key(digest);
    }
    Ok(Credentials {
        jwt: config.jwt.as_ref().map(JwtKeys::load).transpose()?,
        api_keys,
        jwt_svid: jwt_svid.cloned(),
    })
}

/// The TLS server config: the certificate, and the client certificate check when
/// `gateway.tls.client_ca` is set.
pub(super) fn load_tls(config: &GatewayConfig) -> Result<rustls::ServerConfig, GatewayError> {
    let clients = match (&config.tls.client_ca, config.tls.client_auth()) {
        (Some(ca), Some(mode)) => Some(client_cert::verifier(ca, mode)?),
        _ => None,
    };
    server_tls(config, clients)
}

fn server_tls(
    config: &GatewayConfig,
    clients: Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>,
) -> Result<rustls::ServerConfig, GatewayError> {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    let (cert, key) = (&config.tls.cert, &config.tls.key);
    let bad = |path: &Path, reason: String| GatewayError::Tls {
        path: path.to_path_buf(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no certificate in the file".into()));
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| bad(key, e.to_string()))?;
    let builder = rustls::ServerConfig::builder_with_provider(crate::identity::crypto_provider())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| bad(cert, e.to_string()))?;
    let builder = match clients {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut server = builder
        .with_single_cert(chain, key_der)
        .map_err(|e| bad(key, format!("{e} (certificate {})", cert.display())))?;
    server.alpn_protocols = vec![crate::tls::ALPN_H2.to_vec(), b"http/1.1".to_vec()];
    Ok(server)
}

/// `meshd check`: the gateway's certificate, client CA, JWKS and API keys file, read as `meshd run`
/// would read them. One line per file: `ok`, or the error naming the file.
pub fn check_files(config: &GatewayConfig) -> (Vec<String>, bool) {
    let mut lines = Vec::new();
    let mut good = true;
    let mut report = |what: String, result: Result<(), GatewayError>| {
        good &= result.is_ok();
        lines.push(match result {
            Ok(()) => format!("{what}: ok"),
            Err(e) => e.to_string(),
        });
    };
    report(
        format!("{} (gateway.tls)", config.tls.cert.display()),
        server_tls(config, None).map(|_| ()),
    );
    if let (Some(ca), Some(mode)) = (&config.tls.client_ca, config.tls.client_auth()) {
        report(
            format!("{} (gateway.tls.client_ca)", ca.display()),
            client_cert::verifier(ca, mode)
                .map(|_| ())
                .map_err(GatewayError::from),
        );
    }
    if let Some(jwt) = &config.jwt {
        report(
            format!("{} (gateway.jwt.jwks)", jwt.jwks.display()),
            JwtKeys::load(jwt).map(|_| ()).map_err(GatewayError::Jwks),
        );
    }
    if let Some(keys) = &config.api_keys {
        report(
            format!("{} (gateway.api_keys)", keys.display()),
            ApiKeys::load(keys)
                .map(|_| ())
                .map_err(GatewayError::ApiKeys),
        );
    }
    if let Some(t) = &config.transcoding {
        // The protos and services are checked with the config; the REST rules here.
        if let Err(e @ super::TranscodeError::Rule(_)) = super::transcode::Transcoder::new(t) {
            report("gateway.transcoding".into(), Err(e.into()));
        }
    }
    (lines, good)
}

pub(super) fn modified(paths: &[&Path]) -> Vec<Option<SystemTime>> {
    paths
        .iter()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}
