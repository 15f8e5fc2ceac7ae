//! The edge gateway of `meshd demo`: the api-gateway sidecar also runs the gateway (HTTPS,
//! JWT) in front of payment, as in the reference topology. This module writes what it and
//! its clients need into the demo's `gateway/` folder: a self-signed certificate for
//! `localhost`, a signing key's JWKS, and one token a client can send. JSON clients are
//! served too: the gateway transcodes calls of the payment API from the demo's
//! `proto/payment.proto`, compiled at start.

use crate::demo::TRUST_DOMAIN;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

/// The issuer and audience of the demo's tokens.
pub const ISSUER: &str = "https://auth.jia.app";
pub const AUDIENCE: &str = "jia-api";

/// Why the demo gateway's files could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GatewayFilesError {
    /// The `gateway/` folder or one of its files could not be written.
    #[error("{path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// rcgen could not make the self-signed `localhost` certificate.
    #[error("gateway certificate: {0}")]
    Certificate(rcgen::Error),
    /// rcgen could not make the token signing key.
    #[error("gateway signing key: {0}")]
    SigningKey(rcgen::Error),
    /// The signing key's public key is not a P-256 point, so it has no JWKS.
    #[error("gateway signing key: not a P-256 point")]
    NotP256,
    /// jsonwebtoken refused the signing key's PEM.
    #[error("gateway signing key: {0}")]
    EncodingKey(jsonwebtoken::errors::Error),
    /// jsonwebtoken could not sign the demo token.
    #[error("demo token: {0}")]
    Token(jsonwebtoken::errors::Error),
}

/// The files of the demo gateway.
#[derive(Debug, Clone)]
pub struct GatewayFiles {
    /// The gateway's certificate (clients trust it with `-cacert`).
    pub cert: PathBuf,
    pub key: PathBuf,
    pub jwks: PathBuf,
    /// A JWT for `demo-client`, valid for a day.
    pub token: PathBuf,
    /// The payment API the gateway transcodes JSON calls of (written with the demo's
    /// other protos).
    pub proto: PathBuf,
}

/// Writes the certificate, the JWKS and a token into `dir/gateway`.
pub fn write_files(dir: &Path) -> Result<GatewayFiles, GatewayFilesError> {
    let folder = dir.join("gateway");
    let fail = |path: &Path, error| GatewayFilesError::Write {
        path: path.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(&folder).map_err(|e| fail(&folder, e))?;
    let files = GatewayFiles {
        cert: folder.join("tls.pem"),
        key: folder.join("tls-key.pem"),
        jwks: folder.join("jwks.json"),
        token: folder.join("token.jwt"),
        proto: dir.join("proto").join("payment.proto"),
    };
    let tls = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(GatewayFilesError::Certificate)?;
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .map_err(GatewayFilesError::SigningKey)?;
    let jwks = crate::gateway::p256_jwks(signing.public_key_raw(), "demo")
        .ok_or(GatewayFilesError::NotP256)?;
    let key = jsonwebtoken::EncodingKey::from_ec_pem(signing.serialize_pem().as_bytes())
        .map_err(GatewayFilesError::EncodingKey)?;
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("demo".into());
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let claims = serde_json::json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": format!("demo-client@{TRUST_DOMAIN}"),
        "iat": now, "exp": now + 86_400,
    });
    let token = jsonwebtoken::encode(&header, &claims, &key).map_err(GatewayFilesError::Token)?;
    for (path, text) in [
        (&files.cert, tls.cert.pem()),
        (&files.key, tls.signing_key.serialize_pem()),
        (&files.jwks, jwks),
        (&files.token, token),
    ] {
        std::fs::write(path, text).map_err(|e| fail(path, e))?;
    }
    Ok(files)
}

/// The `gateway:` section of the api-gateway sidecar's config: one route, payments, for
/// callers with a token, gRPC or JSON.
pub fn config_yaml(port: u16, files: &GatewayFiles) -> String {
    let q = |p: &Path| serde_json::to_string(&p.display().to_string()).unwrap_or_default();
    format!(
        "gateway:\n  listen: 127.0.0.1:{port}\n  tls: {{cert: {}, key: {}}}\n  \
         jwt: {{issuer: \"{ISSUER}\", audiences: [{AUDIENCE}], jwks: {}}}\n  routes:\n    \
         - {{name: payments, prefix: /payment.v1.PaymentService/, upstream: payment-service, auth: jwt}}\n  \
         transcoding: {{protos: [{}], services: [payment.v1.PaymentService]}}\n",
        q(&files.cert),
        q(&files.key),
        q(&files.jwks),
        q(&files.proto),
    )
}
