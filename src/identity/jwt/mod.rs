//! JWT-SVIDs: the JWT bundles of each trust domain, and validation by the JWT-SVID rules.
//!
//! Flow: a JWT bundle arrives as a JWK Set (RFC 7517) per trust domain, from the Workload
//! API's `FetchJWTBundles` stream (`jwt/source.rs`) or from the development CA; [`JwtBundle::from_jwks`]
//! keeps the keys a JWT-SVID may be signed with (EC P-256/P-384 and RSA, by key ID), and
//! [`JwtBundles`] holds one bundle per trust domain, published whole at each update.
//! [`validate_jwt_svid`] checks a token against them with no I/O, by the rules of
//! spiffe/spiffe `standards/JWT-SVID.md`: only `alg`, `kid` and `typ` in the header, `alg`
//! one of RS/ES/PS 256/384/512, `typ` absent or `JWT`/`JOSE`, `sub` a SPIFFE ID, the key
//! taken only from the bundle of the subject's own trust domain, the signature, `aud`
//! containing the audience, `exp` present and not passed (`nbf`, when present, reached).
//! Each refusal is one [`JwtSvidRejection`] that names its reason and a metrics label.
//! Tokens are secrets: nothing here logs or formats one.

mod source;
#[cfg(test)]
mod tests;

pub use source::{
    follow_jwt_bundles, jwt_bundles_from_set, retry_decision, JwtApiError, JwtBundlesStatus,
    JwtStreamState, JwtSvidSource, JwtSvidToken, RetryDecision,
};

use crate::identity::SpiffeId;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// The longest token looked at; a JWT-SVID is well under 2 KiB.
pub const MAX_TOKEN_LEN: usize = 16 * 1024;

/// Why a JWK Set could not become a JWT bundle.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JwtBundleError {
    /// The document is not a JSON object with a `keys` array.
    #[error("JWT bundle for {trust_domain} is not a JWK Set: {reason}")]
    NotJwks {
        trust_domain: String,
        reason: String,
    },
    /// A key has no `kid`: JWT-SVID keys are found by key ID.
    #[error("JWT bundle for {trust_domain}: key #{index} has no kid")]
    NoKeyId { trust_domain: String, index: usize },
    /// A key of a supported type has broken parameters.
    #[error("JWT bundle for {trust_domain}: key {kid}: {reason}")]
    BadKey {
        trust_domain: String,
        kid: String,
        reason: String,
    },
}

/// The public key material of one JWT authority, ready to verify.
#[derive(Clone, PartialEq, Eq)]
enum KeyMaterial {
    /// An EC P-256 point, uncompressed (0x04 || x || y).
    P256(Vec<u8>),
    /// An EC P-384 point, uncompressed.
    P384(Vec<u8>),
    /// An RSA public key: big-endian modulus and exponent.
    Rsa { n: Vec<u8>, e: Vec<u8> },
}

/// One JWT authority: a public key that signs JWT-SVIDs of a trust domain.
#[derive(Clone, PartialEq, Eq)]
pub struct JwtKey {
    /// The key ID, matched against a token's `kid` header.
    pub kid: String,
    /// The algorithm the JWK pins (`alg`), when it pins one.
    pub alg: Option<String>,
    material: KeyMaterial,
}

impl std::fmt::Debug for JwtKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtKey")
            .field("kid", &self.kid)
            .field("kty", &self.kty())
            .finish_non_exhaustive()
    }
}

impl JwtKey {
    /// An EC P-256 key from its uncompressed point (what rcgen's `public_key_raw` gives).
    pub fn p256(kid: &str, point: &[u8]) -> JwtKey {
        JwtKey {
            kid: kid.to_string(),
            alg: None,
            material: KeyMaterial::P256(point.to_vec()),
        }
    }

    /// The JWK type and curve, for display: `EC P-256`, `EC P-384` or `RSA`.
    pub fn kty(&self) -> &'static str {
        match self.material {
            KeyMaterial::P256(_) => "EC P-256",
            KeyMaterial::P384(_) => "EC P-384",
            KeyMaterial::Rsa { .. } => "RSA",
        }
    }

    /// The key as a JWK of a SPIFFE JWT bundle (`use: jwt-svid`).
    pub fn to_jwk(&self) -> Value {
        let mut jwk = match &self.material {
            KeyMaterial::P256(p) | KeyMaterial::P384(p) => {
                let half = (p.len() - 1) / 2;
                let crv = if half == 32 { "P-256" } else { "P-384" };
                serde_json::json!({
                    "kty": "EC", "crv": crv,
                    "x": B64.encode(&p[1..1 + half]), "y": B64.encode(&p[1 + half..]),
                })
            }
            KeyMaterial::Rsa { n, e } => {
                serde_json::json!({"kty": "RSA", "n": B64.encode(n), "e": B64.encode(e)})
            }
        };
        jwk["kid"] = Value::from(self.kid.as_str());
        jwk["use"] = Value::from("jwt-svid");
        if let Some(alg) = &self.alg {
            jwk["alg"] = Value::from(alg.as_str());
        }
        jwk
    }

    /// Reads one JWK. `Ok(None)` for a key that is not for JWT-SVIDs (another `use`) or of
    /// a type no JWT-SVID algorithm uses (`oct`, `OKP`, P-521): such keys are left out.
    fn from_jwk(td: &str, index: usize, jwk: &Value) -> Result<Option<JwtKey>, JwtBundleError> {
        let field = |name: &str| jwk.get(name).and_then(Value::as_str);
        let kid = field("kid").ok_or_else(|| JwtBundleError::NoKeyId {
            trust_domain: td.to_string(),
            index,
        })?;
        if field("use").is_some_and(|u| u != "jwt-svid" && u != "sig") {
            return Ok(None);
        }
        let bad = |reason: &str| JwtBundleError::BadKey {
            trust_domain: td.to_string(),
            kid: kid.to_string(),
            reason: reason.to_string(),
        };
        let bytes = |name: &str| -> Result<Vec<u8>, JwtBundleError> {
            let text = field(name).ok_or_else(|| bad(&format!("no `{name}`")))?;
            B64.decode(text)
                .map_err(|_| bad(&format!("`{name}` is not base64url")))
        };
        let material = match (field("kty"), field("crv")) {
            (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => {
                let (x, y) = (bytes("x")?, bytes("y")?);
                let len = if crv == "P-256" { 32 } else { 48 };
                if x.len() != len || y.len() != len {
                    return Err(bad(&format!("{crv} coordinates must be {len} bytes")));
                }
                let point = [&[4u8][..], &x, &y].concat();
                if crv == "P-256" {
                    KeyMaterial::P256(point)
                } else {
                    KeyMaterial::P384(point)
                }
            }
            (Some("RSA"), _) => KeyMaterial::Rsa {
                n: bytes("n")?,
                e: bytes("e")?,
            },
            _ => return Ok(None),
        };
        Ok(Some(JwtKey {
            kid: kid.to_string(),
            alg: field("alg").map(str::to_string),
            material,
        }))
    }

    /// Whether this key can verify `alg` (the JWK's own `alg`, when set, must agree).
    fn fits(&self, alg: JwtAlg) -> bool {
        let family = matches!(
            (&self.material, alg),
            (KeyMaterial::P256(_), JwtAlg::Es256)
                | (KeyMaterial::P384(_), JwtAlg::Es384)
                | (
                    KeyMaterial::Rsa { .. },
                    JwtAlg::Rs256
                        | JwtAlg::Rs384
                        | JwtAlg::Rs512
                        | JwtAlg::Ps256
                        | JwtAlg::Ps384
                        | JwtAlg::Ps512
                )
        );
        family && self.alg.as_deref().is_none_or(|a| a == alg.name())
    }

    /// Checks `signature` over `message` (ring refuses RSA keys under 2048 bits).
    fn verifies(&self, alg: JwtAlg, message: &[u8], sig: &[u8]) -> bool {
        use signature as s;
        match &self.material {
            KeyMaterial::P256(p) => UnparsedPublicKey::new(&s::ECDSA_P256_SHA256_FIXED, p)
                .verify(message, sig)
                .is_ok(),
            KeyMaterial::P384(p) => UnparsedPublicKey::new(&s::ECDSA_P384_SHA384_FIXED, p)
                .verify(message, sig)
                .is_ok(),
            KeyMaterial::Rsa { n, e } => {
                let params: &s::RsaParameters = match alg {
                    JwtAlg::Rs256 => &s::RSA_PKCS1_2048_8192_SHA256,
                    JwtAlg::Rs384 => &s::RSA_PKCS1_2048_8192_SHA384,
                    JwtAlg::Rs512 => &s::RSA_PKCS1_2048_8192_SHA512,
                    JwtAlg::Ps256 => &s::RSA_PSS_2048_8192_SHA256,
                    JwtAlg::Ps384 => &s::RSA_PSS_2048_8192_SHA384,
                    JwtAlg::Ps512 => &s::RSA_PSS_2048_8192_SHA512,
                    _ => return false,
                };
                RsaPublicKeyComponents { n, e }
                    .verify(params, message, sig)
                    .is_ok()
            }
        }
    }
}

/// The JWT authorities of one trust domain, by key ID.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundle {
    /// The keys, by `kid`.
    pub keys: BTreeMap<String, JwtKey>,
}

impl JwtBundle {
    /// Reads a JWK Set (`{"keys": [...]}`) for `trust_domain`, keeping the JWT-SVID keys.
    pub fn from_jwks(trust_domain: &str, jwks: &[u8]) -> Result<JwtBundle, JwtBundleError> {
        let not_jwks = |reason: String| JwtBundleError::NotJwks {
            trust_domain: trust_domain.to_string(),
            reason,
        };
        let doc: Value = serde_json::from_slice(jwks).map_err(|e| not_jwks(e.to_string()))?;
        let keys = doc
            .get("keys")
            .and_then(Value::as_array)
            .ok_or_else(|| not_jwks("no `keys` array".into()))?;
        JwtBundle::from_jwk_values(trust_domain, keys)
    }

    /// Builds a bundle from single JWKs (as the `spiffe` crate hands them out), keeping
    /// the JWT-SVID keys.
    pub fn from_jwk_values<'a>(
        trust_domain: &str,
        jwks: impl IntoIterator<Item = &'a Value>,
    ) -> Result<JwtBundle, JwtBundleError> {
        let mut bundle = JwtBundle::default();
        for (i, jwk) in jwks.into_iter().enumerate() {
            if let Some(key) = JwtKey::from_jwk(trust_domain, i + 1, jwk)? {
                bundle.keys.insert(key.kid.clone(), key);
            }
        }
        Ok(bundle)
    }

    /// The bundle as a JWK Set document, the form `FetchJWTBundles` sends.
    pub fn to_jwks(&self) -> Vec<u8> {
        let keys: Vec<Value> = self.keys.values().map(JwtKey::to_jwk).collect();
        serde_json::to_vec(&serde_json::json!({ "keys": keys })).unwrap_or_default()
    }

    /// The key IDs, sorted.
    pub fn key_ids(&self) -> Vec<String> {
        self.keys.keys().cloned().collect()
    }
}

/// JWT bundles by trust domain: the own domain's and every federated one. Published
/// whole: each Workload API message replaces the previous set (a missing domain is
/// redacted, as the Workload API standard says).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JwtBundles {
    /// The bundle of each trust domain, keyed by its name (e.g. `jia.app`).
    pub domains: BTreeMap<String, JwtBundle>,
}

impl JwtBundles {
    /// The bundle of a trust domain, if it is trusted for JWT-SVIDs at all.
    pub fn for_domain(&self, trust_domain: &str) -> Option<&JwtBundle> {
        self.domains.get(trust_domain)
    }

    /// Trust domain names, sorted.
    pub fn trust_domains(&self) -> Vec<String> {
        self.domains.keys().cloned().collect()
    }
}

/// The signature algorithms the JWT-SVID standard allows (RFC 7518 3.3 to 3.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JwtAlg {
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Es512,
    Ps256,
    Ps384,
    Ps512,
}

impl JwtAlg {
    /// Reads an `alg` header; `None` for anything the standard does not allow.
    pub fn parse(name: &str) -> Option<JwtAlg> {
        Some(match name {
            "RS256" => JwtAlg::Rs256,
            "RS384" => JwtAlg::Rs384,
            "RS512" => JwtAlg::Rs512,
            "ES256" => JwtAlg::Es256,
            "ES384" => JwtAlg::Es384,
            "ES512" => JwtAlg::Es512,
            "PS256" => JwtAlg::Ps256,
            "PS384" => JwtAlg::Ps384,
            "PS512" => JwtAlg::Ps512,
            _ => return None,
        })
    }

    /// The `alg` header value.
    pub fn name(self) -> &'static str {
        match self {
            JwtAlg::Rs256 => "RS256",
            JwtAlg::Rs384 => "RS384",
            JwtAlg::Rs512 => "RS512",
            JwtAlg::Es256 => "ES256",
            JwtAlg::Es384 => "ES384",
            JwtAlg::Es512 => "ES512",
            JwtAlg::Ps256 => "PS256",
            JwtAlg::Ps384 => "PS384",
            JwtAlg::Ps512 => "PS512",
        }
    }
}

/// Why a token is not a valid JWT-SVID for this audience. The messages never contain
/// the token; [`JwtSvidRejection::label`] is a bounded metrics label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtSvidRejection {
    /// Not three base64url parts of JSON (or longer than [`MAX_TOKEN_LEN`]).
    #[error("malformed token: {0}")]
    Malformed(String),
    /// A header field other than `alg`, `kid` and `typ`.
    #[error("header field `{0}` is not allowed in a JWT-SVID")]
    HeaderField(String),
    /// `alg` missing or not one of RS/ES/PS 256/384/512 (`none`, `HS256`, ...).
    #[error("algorithm `{0}` is not allowed for a JWT-SVID")]
    Algorithm(String),
    /// An allowed algorithm meshd cannot verify (ES512: P-521 is not in ring).
    #[error("algorithm `{0}` is not supported by meshd")]
    UnsupportedAlgorithm(String),
    /// `typ` set to something other than `JWT` or `JOSE`.
    #[error("typ `{0}` is not JWT or JOSE")]
    Type(String),
    /// `sub` missing or not a SPIFFE ID.
    #[error("subject is not a SPIFFE ID: {0}")]
    Subject(String),
    /// No JWT bundle for the subject's trust domain: the token is untrusted.
    #[error("no JWT bundle for trust domain {0}")]
    NoBundle(String),
    /// The bundle of the subject's trust domain has no key with this `kid` (or none
    /// that fits the algorithm).
    #[error("no key `{kid}` for {alg} in the JWT bundle of {trust_domain}")]
    UnknownKey {
        trust_domain: String,
        kid: String,
        alg: &'static str,
    },
    /// The signature does not verify with the subject's trust domain's key.
    #[error("signature does not verify")]
    Signature,
    /// `aud` missing or empty.
    #[error("token has no audience")]
    NoAudience,
    /// `aud` does not contain the validator's audience.
    #[error("audience {got:?} does not contain `{want}`")]
    WrongAudience { want: String, got: Vec<String> },
    /// `exp` missing or not a number.
    #[error("token has no expiry (exp)")]
    NoExpiry,
    /// `exp` has passed.
    #[error("token expired {0}s ago")]
    Expired(u64),
    /// `nbf` is in the future.
    #[error("token is not valid for another {0}s (nbf)")]
    NotYetValid(u64),
}

impl JwtSvidRejection {
    /// A short label per reason, for `meshd_jwt_svid_validations_total{result}`.
    pub fn label(&self) -> &'static str {
        match self {
            JwtSvidRejection::Malformed(_) => "malformed",
            JwtSvidRejection::HeaderField(_) => "header_field",
            JwtSvidRejection::Algorithm(_) | JwtSvidRejection::UnsupportedAlgorithm(_) => {
                "algorithm"
            }
            JwtSvidRejection::Type(_) => "typ",
            JwtSvidRejection::Subject(_) => "subject",
            JwtSvidRejection::NoBundle(_) => "no_bundle",
            JwtSvidRejection::UnknownKey { .. } => "unknown_key",
            JwtSvidRejection::Signature => "signature",
            JwtSvidRejection::NoAudience | JwtSvidRejection::WrongAudience { .. } => "audience",
            JwtSvidRejection::NoExpiry | JwtSvidRejection::Expired(_) => "expired",
            JwtSvidRejection::NotYetValid(_) => "not_yet_valid",
        }
    }
}

/// A JWT-SVID that passed [`validate_jwt_svid`]: who it names and what it claims.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidJwtSvid {
    /// The subject: the caller's SPIFFE ID.
    pub id: SpiffeId,
    /// Every `aud` value (one of them is the validator's).
    pub audience: Vec<String>,
    /// `exp`.
    pub expiry: SystemTime,
    /// The key that signed it.
    pub key_id: String,
    /// Every claim of the payload (for `ValidateJWTSVID`'s response).
    pub claims: Map<String, Value>,
}

/// Validates `token` for `audience` against `bundles` at `now`, by the JWT-SVID rules.
pub fn validate_jwt_svid(
    token: &str,
    audience: &str,
    bundles: &JwtBundles,
    now: SystemTime,
) -> Result<ValidJwtSvid, JwtSvidRejection> {
    use JwtSvidRejection as R;
    if token.len() > MAX_TOKEN_LEN {
        return Err(R::Malformed(format!("longer than {MAX_TOKEN_LEN} bytes")));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(R::Malformed("not three dot-separated parts".into()));
    };
    let header = json_part(h, "header")?;
    if let Some(extra) = header
        .keys()
        .find(|k| !matches!(k.as_str(), "alg" | "kid" | "typ"))
    {
        return Err(R::HeaderField(extra.clone()));
    }
    let alg_name = header.get("alg").and_then(Value::as_str).unwrap_or("");
    let alg = JwtAlg::parse(alg_name).ok_or_else(|| R::Algorithm(alg_name.to_string()))?;
    if alg == JwtAlg::Es512 {
        return Err(R::UnsupportedAlgorithm(alg_name.to_string()));
    }
    match header.get("typ") {
        None => {}
        Some(Value::String(t)) if t == "JWT" || t == "JOSE" => {}
        Some(other) => return Err(R::Type(text_of(other))),
    }
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(k)) => Some(k.as_str()),
        Some(_) => return Err(R::Malformed("kid is not a string".into())),
    };
    let claims = json_part(p, "payload")?;
    let sub = claims.get("sub").and_then(Value::as_str).unwrap_or("");
    let id =
        crate::config::parse_spiffe_id(sub).map_err(|e| R::Subject(format!("`{sub}`: {e}")))?;
    let td = id.trust_domain_name().to_string();
    let bundle = bundles
        .for_domain(&td)
        .ok_or_else(|| R::NoBundle(td.clone()))?;
    let candidates: Vec<&JwtKey> = match kid {
        Some(k) => bundle.keys.get(k).into_iter().collect(),
        None => bundle.keys.values().collect(),
    };
    let candidates: Vec<&JwtKey> = candidates.into_iter().filter(|k| k.fits(alg)).collect();
    if candidates.is_empty() {
        return Err(R::UnknownKey {
            trust_domain: td,
            kid: kid.unwrap_or("(none)").to_string(),
            alg: alg.name(),
        });
    }
    let sig = B64
        .decode(s)
        .map_err(|_| R::Malformed("signature is not base64url".into()))?;
    let signed = &token.as_bytes()[..h.len() + 1 + p.len()];
    let key = candidates
        .into_iter()
        .find(|k| k.verifies(alg, signed, &sig))
        .ok_or(R::Signature)?;
    let aud: Vec<String> = match claims.get("aud") {
        Some(Value::String(a)) => vec![a.clone()],
        Some(Value::Array(list)) => list
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect(),
        _ => vec![],
    };
    if aud.is_empty() {
        return Err(R::NoAudience);
    }
    if !aud.iter().any(|a| a == audience) {
        return Err(R::WrongAudience {
            want: audience.to_string(),
            got: aud,
        });
    }
    let now_s = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let exp = claims
        .get("exp")
        .and_then(Value::as_f64)
        .ok_or(R::NoExpiry)?;
    if exp <= now_s {
        return Err(R::Expired((now_s - exp) as u64));
    }
    if let Some(nbf) = claims.get("nbf").and_then(Value::as_f64) {
        if nbf > now_s {
            return Err(R::NotYetValid((nbf - now_s).ceil() as u64));
        }
    }
    Ok(ValidJwtSvid {
        id,
        audience: aud,
        expiry: UNIX_EPOCH + Duration::from_secs(exp.max(0.0) as u64),
        key_id: key.kid.clone(),
        claims,
    })
}

/// Decodes one base64url JSON object part of a token.
fn json_part(part: &str, what: &str) -> Result<Map<String, Value>, JwtSvidRejection> {
    let bytes = B64
        .decode(part)
        .map_err(|_| JwtSvidRejection::Malformed(format!("{what} is not base64url")))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtSvidRejection::Malformed(format!(
            "{what} is not a JSON object"
        ))),
    }
}

/// A header value for a message: strings as they are, anything else as JSON.
fn text_of(v: &Value) -> String {
    v.as_str()
        .map(String::from)
        .unwrap_or_else(|| v.to_string())
}
