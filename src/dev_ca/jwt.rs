//! The development CA's JWT authority: it signs JWT-SVIDs and serves the JWT side of the
//! Workload API (`FetchJWTSVID`, `FetchJWTBundles`, `ValidateJWTSVID`) for `dev_ca/server.rs`.
//!
//! Flow: the CA holds one EC P-256 signing key with a random key ID ([`JwtAuthority`]).
//! [`DevCa::sign_jwt_svid`] signs a token for the socket's SPIFFE ID (`sub`), the requested
//! `aud`, `iat` = now and `exp` = now + the TTL, with header `alg: ES256`, `kid`, `typ: JWT`.
//! [`DevCa::rotate_jwt_authority`] (SIGHUP, and every half TTL while serving) makes a new
//! key current and keeps the old ones in the bundle until every token they signed has
//! expired; each rotation, and each change of a federated JWT bundle, bumps the `jwt`
//! counter of [`Changes`](crate::dev_ca::Changes), and every `FetchJWTBundles` stream then
//! sends the JWK Sets (`use: jwt-svid`) of the own and federated trust domains again.
//! `ValidateJWTSVID` checks a token with `identity::validate_jwt_svid` against those bundles.

use crate::dev_ca::{DevCa, DevCaError};
use crate::identity::{validate_jwt_svid, JwtBundle, JwtBundles, JwtKey, SpiffeId, ValidJwtSvid};
use crate::pb::workload::{
    JwtBundlesResponse, Jwtsvid, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse,
};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use futures::{Stream, StreamExt};
use rand::Rng;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_stream::wrappers::WatchStream;
use tokio_util::sync::CancellationToken;

#[cfg(test)]
mod tests;

/// One signing key of the authority.
struct SigningKey {
    /// The private key (P-256).
    pair: EcdsaKeyPair,
    /// Its public half as a JWK, with the key ID.
    public: JwtKey,
    /// The latest `exp` of a token it signed: a retired key stays in the bundle until then.
    last_exp: SystemTime,
}

/// The JWT signing keys of the CA: the current one and those retired but still needed.
pub(crate) struct JwtAuthority {
    /// Signs every new token.
    current: SigningKey,
    /// Keys rotated out whose tokens may still be in use.
    retired: Vec<SigningKey>,
    /// Entropy for keys and ECDSA signatures.
    rng: SystemRandom,
}

impl JwtAuthority {
    pub(crate) fn new() -> Result<JwtAuthority, DevCaError> {
        let rng = SystemRandom::new();
        Ok(JwtAuthority {
            current: new_key(&rng)?,
            retired: Vec::new(),
            rng,
        })
    }

    /// The own trust domain's JWT bundle: the current key and the retired ones still needed.
    pub(crate) fn bundle(&self) -> JwtBundle {
        let mut bundle = JwtBundle::default();
        for k in std::iter::once(&self.current).chain(&self.retired) {
            bundle.keys.insert(k.public.kid.clone(), k.public.clone());
        }
        bundle
    }

    /// Makes a fresh key current; drops retired keys whose tokens have all expired.
    fn rotate(&mut self) -> Result<(), DevCaError> {
        let next = new_key(&self.rng)?;
        let old = std::mem::replace(&mut self.current, next);
        let now = SystemTime::now();
        self.retired.push(old);
        self.retired.retain(|k| k.last_exp > now);
        Ok(())
    }

    /// Signs `header.claims` (both JSON) with the current key; `exp` extends its retention.
    fn sign(
        &mut self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, DevCaError> {
        let fail = |reason: String| DevCaError::Certificate {
            what: "JWT-SVID".into(),
            reason,
        };
        let encode = |v: &serde_json::Value| {
            serde_json::to_vec(v)
                .map(|b| B64.encode(b))
                .map_err(|e| fail(e.to_string()))
        };
        let signed = format!("{}.{}", encode(header)?, encode(claims)?);
        let sig = self
            .current
            .pair
            .sign(&self.rng, signed.as_bytes())
            .map_err(|_| fail("ECDSA signing failed".into()))?;
        if let Some(exp) = claims.get("exp").and_then(serde_json::Value::as_u64) {
            let exp = UNIX_EPOCH + Duration::from_secs(exp);
            self.current.last_exp = self.current.last_exp.max(exp);
        }
        Ok(format!("{signed}.{}", B64.encode(sig.as_ref())))
    }
}

/// A new P-256 key with a random 32-character key ID (SPIRE's style).
fn new_key(rng: &SystemRandom) -> Result<SigningKey, DevCaError> {
    let fail = |_| DevCaError::Certificate {
        what: "JWT authority key".into(),
        reason: "ring could not generate a P-256 key".into(),
    };
    let pkcs8 =
        EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, rng).map_err(fail)?;
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), rng)
        .map_err(|_| DevCaError::Certificate {
            what: "JWT authority key".into(),
            reason: "ring refused its own key".into(),
        })?;
    let kid: String = rand::rng()
        .sample_iter(rand::distr::Alphanumeric)
        .take(32)
        .map(char::from)
        .collect();
    let public = JwtKey::p256(&kid, pair.public_key().as_ref());
    Ok(SigningKey {
        pair,
        public,
        last_exp: SystemTime::now(),
    })
}

impl DevCa {
    /// Signs a standard JWT-SVID for `id` and `audience`, valid for `ttl` from now.
    pub fn sign_jwt_svid(
        &self,
        id: &SpiffeId,
        audience: &[String],
        ttl: Duration,
    ) -> Result<String, DevCaError> {
        let now = SystemTime::now();
        let secs = |t: SystemTime| crate::identity::unix_seconds(t);
        let claims = serde_json::json!({
            "sub": id.to_string(),
            "aud": audience,
            "iat": secs(now),
            "exp": secs(now + ttl),
        });
        let mut state = self.lock();
        let header = serde_json::json!({
            "alg": "ES256",
            "kid": state.jwt.current.public.kid,
            "typ": "JWT",
        });
        state.jwt.sign(&header, &claims)
    }

    /// Signs any header and claims with the current JWT authority key, standard or not
    /// (for tests of rejection). The header is taken as given: set `kid` yourself.
    pub fn sign_jwt_custom(
        &self,
        header: &serde_json::Value,
        claims: &serde_json::Value,
    ) -> Result<String, DevCaError> {
        self.lock().jwt.sign(header, claims)
    }

    /// The key ID the next token is signed with.
    pub fn jwt_key_id(&self) -> String {
        self.lock().jwt.current.public.kid.clone()
    }

    /// The own trust domain's JWT bundle (current and still-needed retired keys).
    pub fn jwt_bundle(&self) -> JwtBundle {
        self.lock().jwt.bundle()
    }

    /// Every JWT bundle the CA serves: its own and the federated ones.
    pub fn jwt_bundles(&self) -> JwtBundles {
        let state = self.lock();
        let mut domains = state.federated_jwt.clone();
        domains.insert(self.trust_domain().to_string(), state.jwt.bundle());
        JwtBundles { domains }
    }

    /// Makes a new JWT signing key current, keeping the old one in the bundle until the
    /// tokens it signed expire, and tells every `FetchJWTBundles` stream.
    pub fn rotate_jwt_authority(&self) -> Result<(), DevCaError> {
        self.lock().jwt.rotate()?;
        self.changes.send_modify(|c| c.jwt += 1);
        Ok(())
    }

    /// Trusts (or, with an empty bundle, stops trusting) a federated domain's JWT keys.
    pub fn set_federated_jwt(&self, trust_domain: &str, bundle: JwtBundle) {
        {
            let mut state = self.lock();
            if bundle.keys.is_empty() {
                state.federated_jwt.remove(trust_domain);
            } else {
                state.federated_jwt.insert(trust_domain.to_string(), bundle);
            }
        }
        self.changes.send_modify(|c| c.jwt += 1);
    }

    /// The `FetchJWTBundles` message: every JWT bundle, keyed `spiffe://<td>`.
    fn jwt_bundles_response(&self) -> JwtBundlesResponse {
        let bundles = self
            .jwt_bundles()
            .domains
            .iter()
            .map(|(td, b)| (format!("spiffe://{td}"), b.to_jwks()))
            .collect();
        JwtBundlesResponse { bundles }
    }
}

/// `FetchJWTSVID` for the identity `id` bound to a socket.
pub(crate) fn fetch_jwt_svid(
    ca: &DevCa,
    id: &SpiffeId,
    ttl: Duration,
    request: JwtsvidRequest,
) -> Result<JwtsvidResponse, tonic::Status> {
    if request.audience.iter().all(String::is_empty) {
        return Err(tonic::Status::invalid_argument(
            "audience must be specified",
        ));
    }
    if !request.spiffe_id.is_empty() && request.spiffe_id != id.to_string() {
        return Err(tonic::Status::permission_denied(format!(
            "no identity issued: this socket serves {id}, not {}",
            request.spiffe_id
        )));
    }
    let token = ca
        .sign_jwt_svid(id, &request.audience, ttl)
        .map_err(|e| tonic::Status::internal(e.to_string()))?;
    Ok(JwtsvidResponse {
        svids: vec![Jwtsvid {
            spiffe_id: id.to_string(),
            svid: token,
            hint: String::new(),
        }],
    })
}

/// `FetchJWTBundles`: the bundles now, then again at each JWT change, until `stop`.
pub(crate) fn jwt_bundles_stream(
    ca: Arc<DevCa>,
    stop: CancellationToken,
) -> impl Stream<Item = Result<JwtBundlesResponse, tonic::Status>> + Send + 'static {
    let mut last: Option<JwtBundlesResponse> = None;
    WatchStream::new(ca.subscribe())
        .take_until(stop.cancelled_owned())
        .filter_map(move |_| {
            let resp = ca.jwt_bundles_response();
            let fresh = last.as_ref() != Some(&resp);
            last = Some(resp.clone());
            std::future::ready(fresh.then_some(Ok(resp)))
        })
}

/// `ValidateJWTSVID`: the token checked by the JWT-SVID rules against every bundle.
pub(crate) fn validate(
    ca: &DevCa,
    request: ValidateJwtsvidRequest,
) -> Result<ValidateJwtsvidResponse, tonic::Status> {
    if request.audience.is_empty() {
        return Err(tonic::Status::invalid_argument(
            "audience must be specified",
        ));
    }
    if request.svid.is_empty() {
        return Err(tonic::Status::invalid_argument("svid must be specified"));
    }
    let valid: ValidJwtSvid = validate_jwt_svid(
        &request.svid,
        &request.audience,
        &ca.jwt_bundles(),
        SystemTime::now(),
    )
    .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let fields = valid
        .claims
        .into_iter()
        .map(|(k, v)| (k, proto_value(v)))
        .collect();
    Ok(ValidateJwtsvidResponse {
        spiffe_id: valid.id.to_string(),
        claims: Some(prost_types::Struct { fields }),
    })
}

/// JSON as a `google.protobuf.Value`.
fn proto_value(v: serde_json::Value) -> prost_types::Value {
    use prost_types::value::Kind;
    use serde_json::Value as J;
    let kind = match v {
        J::Null => Kind::NullValue(0),
        J::Bool(b) => Kind::BoolValue(b),
        J::Number(n) => Kind::NumberValue(n.as_f64().unwrap_or(0.0)),
        J::String(s) => Kind::StringValue(s),
        J::Array(a) => Kind::ListValue(prost_types::ListValue {
            values: a.into_iter().map(proto_value).collect(),
        }),
        J::Object(m) => Kind::StructValue(prost_types::Struct {
            fields: m.into_iter().map(|(k, v)| (k, proto_value(v))).collect(),
        }),
    };
    prost_types::Value { kind: Some(kind) }
}

/// Rotates the JWT authority every `period` until `stop`.
pub(crate) async fn rotate_periodically(ca: Arc<DevCa>, period: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(period) => {}
        }
        match ca.rotate_jwt_authority() {
            Ok(()) => tracing::debug!(kid = %ca.jwt_key_id(), "dev-ca rotated its JWT authority"),
            Err(e) => tracing::error!("dev-ca could not rotate its JWT authority: {e}"),
        }
    }
}
