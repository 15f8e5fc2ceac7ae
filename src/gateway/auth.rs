//! The gateway's credentials: bearer end-user JWTs checked against the issuer's JWKS file,
//! bearer JWT-SVIDs of machine clients checked against the Workload API's JWT bundles
//! (`gateway.jwt_svid`), and API keys checked against a file of their SHA-256 hashes (the
//! keys themselves are never stored, logged or forwarded).
//!
//! Flow: `files::load_credentials` reads both files (at start, and again when either
//! changes; a bad file keeps the last good set) and adds the JWT-SVID verifier; per
//! request, [`authenticate`] is a plain function of the route's `auth`, the credentials
//! and the request headers: the user, or why not. A bearer token goes to one provider
//! only ([`provider_of`]): its `iss` is the end-user issuer -> the JWKS; else a
//! `spiffe://` subject -> the JWT bundles; each provider checks with its own keys only.

use crate::config::{ApiKeyDigest, JwtConfig, RouteAuth, ENV_API_KEY_USER};
use crate::proxy::{count_jwt_svid, JwtRefusal, JwtSvidVerifier};
use base64::Engine;
use http::HeaderMap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a request is not authenticated, or why a credentials file was refused. No message
/// carries a token or a key.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Neither `Authorization: Bearer` nor `x-api-key` was sent.
    #[error("credentials required ({0})")]
    Missing(&'static str),
    /// The route does not take the kind of credential that was sent.
    #[error("this route accepts {0} only")]
    WrongKind(&'static str),
    /// The token did not verify: signature, issuer, audience, expiry, unknown key.
    #[error("invalid token: {0}")]
    BadToken(String),
    /// The JWT-SVID did not pass the JWT-SVID rules (the reason names the rule).
    #[error("{0}")]
    JwtSvid(#[from] JwtRefusal),
    /// The API key is not in the keys file.
    #[error("unknown API key")]
    UnknownKey,
    /// A credentials file could not be read.
    #[error("{path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A credentials file is malformed; the reason names the entry.
    #[error("{path}: {reason}")]
    BadFile { path: PathBuf, reason: String },
}

/// One verification key of the JWKS.
struct JwtKey {
    kid: Option<String>,
    key: DecodingKey,
    algorithm: Algorithm,
}

/// The JWT settings with the keys of the JWKS file.
pub struct JwtKeys {
    keys: Vec<JwtKey>,
    config: JwtConfig,
}

impl JwtKeys {
    /// Reads the JWKS; every key must be an EC (P-256, P-384), RSA or Ed25519 public key.
    pub fn load(config: &JwtConfig) -> Result<JwtKeys, AuthError> {
        let path = &config.jwks;
        let bad = |reason: String| AuthError::BadFile {
            path: path.clone(),
            reason,
        };
        let text = read(path)?;
        let set: JwkSet =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a JWKS document ({e})")))?;
        if set.keys.is_empty() {
            return Err(bad("the JWKS has no keys".into()));
        }
        let mut keys = Vec::new();
        for (i, jwk) in set.keys.iter().enumerate() {
            let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
                (AlgorithmParameters::OctetKey(_), _) => {
                    return Err(bad(format!(
                        "keys[{i}]: a symmetric key does not belong in a JWKS"
                    )))
                }
                (_, Some(ka)) => ka.to_string().parse::<Algorithm>().map_err(|_| {
                    bad(format!("keys[{i}]: alg {ka} is not a signature algorithm"))
                })?,
                (AlgorithmParameters::EllipticCurve(ec), None) => match ec.curve {
                    EllipticCurve::P256 => Algorithm::ES256,
                    EllipticCurve::P384 => Algorithm::ES384,
                    _ => return Err(bad(format!("keys[{i}]: unsupported curve"))),
                },
                (AlgorithmParameters::RSA(_), None) => Algorithm::RS256,
                (AlgorithmParameters::OctetKeyPair(_), None) => Algorithm::EdDSA,
            };
            if matches!(
                algorithm,
                Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512
            ) {
                return Err(bad(format!("keys[{i}]: HMAC algorithms are refused")));
            }
            let key = DecodingKey::from_jwk(jwk).map_err(|e| bad(format!("keys[{i}]: {e}")))?;
            keys.push(JwtKey {
                kid: jwk.common.key_id.clone(),
                key,
                algorithm,
            });
        }
        Ok(JwtKeys {
            keys,
            config: config.clone(),
        })
    }

    /// The `iss` every end-user token carries.
    pub fn issuer(&self) -> &str {
        &self.config.issuer
    }

    /// Verifies a compact JWT; the user is its `user_claim`.
    pub fn verify(&self, token: &str) -> Result<String, AuthError> {
        let bad = |m: String| AuthError::BadToken(m);
        let header = jsonwebtoken::decode_header(token).map_err(|e| bad(e.to_string()))?;
        let key = match &header.kid {
            Some(kid) => self.keys.iter().find(|k| k.kid.as_deref() == Some(kid)),
            None if self.keys.len() == 1 => self.keys.first(),
            None => None,
        }
        .ok_or_else(|| bad("no key of the JWKS has the token's kid".into()))?;
        let mut v = Validation::new(key.algorithm);
        v.set_issuer(&[&self.config.issuer]);
        v.set_audience(&self.config.audiences);
        v.leeway = self.config.leeway.as_secs();
        v.validate_nbf = true;
        v.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &key.key, &v)
            .map_err(|e| bad(e.to_string()))?;
        match data.claims.get(&self.config.user_claim) {
            Some(serde_json::Value::String(u)) if !u.is_empty() => Ok(u.clone()),
            _ => Err(bad(format!("no `{}` claim", self.config.user_claim))),
        }
    }
}

/// API keys by the SHA-256 of the key.
#[derive(Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], String>,
}

/// One entry of the keys file.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyEntry {
    user: String,
    /// Lower- or upper-case hex of SHA-256(key).
    sha256: String,
}

impl ApiKeys {
    /// Reads a YAML list of `{user, sha256}`.
    pub fn load(path: &Path) -> Result<ApiKeys, AuthError> {
        let bad = |reason: String| AuthError::BadFile {
            path: path.to_path_buf(),
            reason,
        };
        let entries: Vec<ApiKeyEntry> =
            serde_yaml_ng::from_str(&read(path)?).map_err(|e| bad(e.to_string()))?;
        let mut by_hash = HashMap::new();
        for (i, e) in entries.into_iter().enumerate() {
            let hash = parse_sha256(&e.sha256)
                .ok_or_else(|| bad(format!("[{i}] ({}): sha256 must be 64 hex digits", e.user)))?;
            if e.user.is_empty() {
                return Err(bad(format!("[{i}]: user must not be empty")));
            }
            if by_hash.insert(hash, e.user.clone()).is_some() {
                return Err(bad(format!(
                    "[{i}] ({}): the same key is listed twice",
                    e.user
                )));
            }
        }
        Ok(ApiKeys { by_hash })
    }

    /// Adds the key of `API_GATEWAY_KEY` (its hash) as user [`ENV_API_KEY_USER`]; a key
    /// the file lists too keeps the file's user.
    pub fn add_env_key(&mut self, digest: &ApiKeyDigest) {
        self.by_hash
            .entry(digest.0)
            .or_insert_with(|| ENV_API_KEY_USER.to_string());
    }

    /// The user a key belongs to. The key is hashed first, so the lookup's timing says
    /// nothing about the keys.
    pub fn user(&self, key: &str) -> Option<&str> {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let hash: [u8; 32] = digest.as_ref().try_into().ok()?;
        self.by_hash.get(&hash).map(String::as_str)
    }
}

/// base64url without padding, as JWKS key coordinates are written (RFC 7518).
pub fn base64url(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk.iter().fold(0u32, |n, b| (n << 8) | u32::from(*b)) << (8 * (3 - chunk.len()));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// The JWKS document (one key, `kid`) of a P-256 public key given as its uncompressed
/// point (`04 || x || y`, 65 bytes); `None` for anything else.
pub fn p256_jwks(point: &[u8], kid: &str) -> Option<String> {
    if point.len() != 65 || point[0] != 4 {
        return None;
    }
    let key = serde_json::json!({
        "kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": kid,
        "x": base64url(&point[1..33]), "y": base64url(&point[33..]),
    });
    Some(serde_json::json!({ "keys": [key] }).to_string())
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    let hex = hex.trim();
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn read(path: &Path) -> Result<String, AuthError> {
    std::fs::read_to_string(path).map_err(|error| AuthError::Read {
        path: path.to_path_buf(),
        error,
    })
}

/// The gateway's current credentials.
pub struct Credentials {
    /// End-user JWTs: the JWKS file's keys (`gateway.jwt`).
    pub jwt: Option<JwtKeys>,
    /// The API keys file and `API_GATEWAY_KEY`.
    pub api_keys: Option<ApiKeys>,
    /// Machine clients' JWT-SVIDs, against the followed JWT bundles (`gateway.jwt_svid`).
    pub jwt_svid: Option<Arc<JwtSvidVerifier>>,
}

/// Which of the two bearer providers checks a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    /// The end-user issuer's JWKS (`gateway.jwt`).
    EndUser,
    /// The Workload API's JWT bundles (`gateway.jwt_svid`).
    JwtSvid,
}

/// The provider a bearer token goes to, from its unverified claims (only to choose: the
/// chosen provider then checks the token with its own keys alone, so neither provider's
/// keys can pass the other's tokens). `iss` equal to the end-user issuer -> end user;
/// else a `sub` that is a `spiffe://` ID -> JWT-SVID; anything else goes to the end-user
/// provider, or to JWT-SVID when it is the only one.
pub fn provider_of(token: &str, creds: &Credentials) -> Provider {
    let issuer = match (&creds.jwt, &creds.jwt_svid) {
        (_, None) => return Provider::EndUser,
        (None, Some(_)) => return Provider::JwtSvid,
        (Some(keys), Some(_)) => keys.issuer(),
    };
    let claims = unverified_claims(token);
    let claim = |name: &str| claims.as_ref()?.get(name)?.as_str();
    if claim("iss") == Some(issuer) {
        Provider::EndUser
    } else if claim("sub").is_some_and(|s| s.starts_with("spiffe://")) {
        Provider::JwtSvid
    } else {
        Provider::EndUser
    }
}

/// The payload of a compact JWT, not verified: only to choose a provider.
fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    let payload = token.split('.').nth(1)?;
    if payload.len() > crate::identity::MAX_TOKEN_LEN {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// A bearer token's user, by the provider the route and the token call for: `jwt` routes
/// take end-user JWTs only, `jwt_svid` routes JWT-SVIDs only (a token that carries the
/// end-user issuer is refused as the wrong kind; any other is checked by the JWT-SVID
/// rules), `any` and `none` routes either.
fn bearer_user(auth: RouteAuth, creds: &Credentials, token: &str) -> Result<String, AuthError> {
    let provider = provider_of(token, creds);
    let wrong_kind = match auth {
        RouteAuth::Jwt => (provider == Provider::JwtSvid).then_some("end-user JWTs"),
        RouteAuth::JwtSvid => {
            let issuer = creds.jwt.as_ref().map(JwtKeys::issuer);
            let iss =
                unverified_claims(token).and_then(|c| c.get("iss")?.as_str().map(String::from));
            (iss.is_some() && iss.as_deref() == issuer).then_some("JWT-SVIDs")
        }
        _ => None,
    };
    if let Some(kind) = wrong_kind {
        return Err(AuthError::WrongKind(kind));
    }
    let provider = match auth {
        RouteAuth::JwtSvid => Provider::JwtSvid,
        _ => provider,
    };
    match (provider, &creds.jwt, &creds.jwt_svid) {
        (Provider::JwtSvid, _, Some(verifier)) => Ok(verifier.verify(token)?.to_string()),
        (Provider::EndUser, Some(keys), _) => keys.verify(token),
        (Provider::JwtSvid, _, None) => {
            Err(AuthError::BadToken("the gateway takes no JWT-SVIDs".into()))
        }
        (Provider::EndUser, None, _) => {
            Err(AuthError::BadToken("the gateway takes no JWTs".into()))
        }
    }
}

/// Decides who is calling: `Ok(Some(user))`, `Ok(None)` on a public route (`auth: none`)
/// without credentials, or why the request is refused. Credentials sent to a public
/// route are still checked: a bad token is refused rather than ignored.
///
/// `client_cert` is the user of the connection's verified client certificate, if any.
/// An `mtls` route takes only that; `any` and `none` routes take it when no token or key
/// was sent (a sent one names the caller: e.g. a partner's end user over the partner's
/// mutual TLS); `jwt`, `jwt_svid` and `api_key` routes ignore it, as they ask for their
/// kind only.
pub fn authenticate(
    auth: RouteAuth,
    creds: &Credentials,
    headers: &HeaderMap,
    client_cert: Option<&str>,
) -> Result<Option<String>, AuthError> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(str::trim);
    let api_key = headers.get("x-api-key").and_then(|v| v.to_str().ok());
    if auth == RouteAuth::Mtls {
        return match (client_cert, bearer.is_some() || api_key.is_some()) {
            (Some(user), _) => Ok(Some(user.to_string())),
            (None, true) => Err(AuthError::WrongKind("client certificates")),
            (None, false) => Err(AuthError::Missing("a client certificate")),
        };
    }
    let bearer_ok = matches!(
        auth,
        RouteAuth::Any | RouteAuth::Jwt | RouteAuth::JwtSvid | RouteAuth::None
    );
    let key_ok = matches!(auth, RouteAuth::Any | RouteAuth::ApiKey | RouteAuth::None);
    match (bearer, api_key) {
        (Some(token), _) if bearer_ok => bearer_user(auth, creds, token).map(Some),
        (_, Some(key)) if key_ok => match &creds.api_keys {
            Some(keys) => keys
                .user(key)
                .map(|u| Some(u.to_string()))
                .ok_or(AuthError::UnknownKey),
            None => Err(AuthError::UnknownKey),
        },
        (Some(_), _) => Err(AuthError::WrongKind("API keys")),
        (_, Some(_)) if auth == RouteAuth::JwtSvid => Err(AuthError::WrongKind("JWT-SVIDs")),
        (_, Some(_)) => Err(AuthError::WrongKind("JWTs")),
        (None, None) => match (auth, client_cert) {
            (RouteAuth::Any | RouteAuth::None, Some(user)) => Ok(Some(user.to_string())),
            (RouteAuth::None, None) => Ok(None),
            (RouteAuth::Jwt, _) => Err(AuthError::Missing("Authorization: Bearer <JWT>")),
            (RouteAuth::JwtSvid, _) => {
                count_jwt_svid("missing");
                Err(AuthError::Missing("Authorization: Bearer <JWT-SVID>"))
            }
            (RouteAuth::ApiKey, _) => Err(AuthError::Missing("x-api-key")),
            (RouteAuth::Any | RouteAuth::Mtls, _) => Err(AuthError::Missing(
                "Authorization: Bearer <JWT> or x-api-key",
            )),
        },
    }
}

#[cfg(test)]
mod tests;
