//! The JWT-SVID bearer check the listeners share: the inbound's (`inbound.jwt_svid`,
//! beside the caller's mTLS SVID) and the edge gateway's (`gateway.jwt_svid`, machine
//! clients outside the mesh). Both count in one family,
//! `meshd_jwt_svid_validations_total{result}`.
//!
//! Flow: [`bearer`] finds the request's one `authorization: Bearer <token>` (none, or not
//! exactly one bearer token: a refusal) -> [`JwtSvidVerifier::verify`]: no JWT bundles yet
//! from the Workload API: refused (fail closed, naming why) -> `validate_jwt_svid` with
//! the verifier's audience (the key only from the subject's own trust domain's bundle)
//! -> the subject's trust domain among those accepted -> the caller's SPIFFE ID. Each
//! outcome is counted with [`count`]; the token itself is never logged or put in a
//! message.

use crate::identity::SpiffeId;
use crate::identity::{validate_jwt_svid, JwtBundlesStatus, JwtStreamState, JwtSvidRejection};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use std::time::SystemTime;
use tokio::sync::watch;

/// The metric counting each check's outcome.
const VALIDATIONS: &str = "meshd_jwt_svid_validations_total";

/// Every `result` label of [`VALIDATIONS`]: `ok`, `missing`, `bundles_unavailable`,
/// `trust_domain`, and each [`JwtSvidRejection::label`] (a `malformed` also stands for a
/// header that is not one `Bearer` token). All start at 0.
pub const JWT_SVID_RESULTS: &[&str] = &[
    "ok",
    "missing",
    "bundles_unavailable",
    "trust_domain",
    "malformed",
    "header_field",
    "algorithm",
    "typ",
    "subject",
    "no_bundle",
    "unknown_key",
    "signature",
    "audience",
    "expired",
    "not_yet_valid",
];

/// Why a request's JWT-SVID was not accepted: the reason the caller reads in grpc-message
/// or the 401 body. Never holds the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtRefusal {
    /// A token is required and no `authorization` header was sent.
    #[error("JWT-SVID required: send `authorization: Bearer <JWT-SVID>`")]
    Missing,
    /// An `authorization` header that is not exactly one `Bearer <token>`.
    #[error("JWT-SVID refused: the authorization header must be one `Bearer <JWT-SVID>`")]
    NotBearer,
    /// No JWT bundles have arrived from the Workload API: nothing can be trusted yet.
    #[error("JWT-SVID cannot be checked: no JWT bundles yet ({0})")]
    NoBundles(String),
    /// The token breaks a JWT-SVID rule.
    #[error("JWT-SVID refused: {0}")]
    Invalid(JwtSvidRejection),
    /// A valid token of a trust domain this listener does not accept
    /// (`gateway.jwt_svid.trust_domains`).
    #[error("JWT-SVID refused: trust domain {0} is not accepted here")]
    TrustDomain(String),
}

impl JwtRefusal {
    /// The `result` label of [`VALIDATIONS`].
    pub fn label(&self) -> &'static str {
        match self {
            JwtRefusal::Missing => "missing",
            JwtRefusal::NotBearer => "malformed",
            JwtRefusal::NoBundles(_) => "bundles_unavailable",
            JwtRefusal::Invalid(r) => r.label(),
            JwtRefusal::TrustDomain(_) => "trust_domain",
        }
    }
}

/// Puts every result series at 0 with its HELP text (the metrics recorder must be
/// installed by now); harmless to call again.
pub fn count_from_zero() {
    metrics::describe_counter!(
        VALIDATIONS,
        "JWT-SVIDs checked on inbound and gateway requests, by result: ok, missing, bundles_unavailable, trust_domain, or the JWT-SVID rule the token broke."
    );
    for result in JWT_SVID_RESULTS {
        metrics::counter!(VALIDATIONS, "result" => *result).increment(0);
    }
}

/// Counts one check's outcome (`result`: one of [`JWT_SVID_RESULTS`]).
pub fn count(result: &'static str) {
    metrics::counter!(VALIDATIONS, "result" => result).increment(1);
}

/// The request's bearer token: `Ok(None)` without an `authorization` header, a refusal
/// when there are several or the one is not `Bearer <token>` (the scheme
/// case-insensitive, RFC 6750 §2.1).
pub fn bearer(headers: &HeaderMap) -> Result<Option<&str>, JwtRefusal> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err(JwtRefusal::NotBearer);
    }
    bearer_token(value.as_bytes())
        .map(Some)
        .ok_or(JwtRefusal::NotBearer)
}

/// The token of `Bearer <token>`.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
}

/// Validates JWT-SVIDs for one audience against the JWT bundles followed from the
/// Workload API.
pub struct JwtSvidVerifier {
    /// The audience a token must name in `aud`.
    audience: String,
    /// Accepted trust domains of the subject; empty: every one with a JWT bundle.
    trust_domains: Vec<String>,
    /// The JWT bundles followed from the Workload API (replaced whole at each update).
    bundles: watch::Receiver<JwtBundlesStatus>,
}

impl JwtSvidVerifier {
    /// A verifier for `audience`, accepting subjects of `trust_domains` (empty: all);
    /// puts the result series at 0.
    pub fn new(
        audience: String,
        trust_domains: Vec<String>,
        bundles: watch::Receiver<JwtBundlesStatus>,
    ) -> JwtSvidVerifier {
        count_from_zero();
        JwtSvidVerifier {
            audience,
            trust_domains,
            bundles,
        }
    }

    /// The caller's SPIFFE ID if `token` is a valid JWT-SVID for this audience, now.
    /// Counts the outcome.
    pub fn verify(&self, token: &str) -> Result<SpiffeId, JwtRefusal> {
        let outcome = self.outcome(token);
        count(match &outcome {
            Ok(_) => "ok",
            Err(refusal) => refusal.label(),
        });
        outcome
    }

    fn outcome(&self, token: &str) -> Result<SpiffeId, JwtRefusal> {
        let status = self.bundles.borrow();
        let Some(bundles) = status.bundles.as_ref() else {
            return Err(JwtRefusal::NoBundles(waiting_reason(&status.state)));
        };
        let valid = validate_jwt_svid(token, &self.audience, bundles, SystemTime::now())
            .map_err(JwtRefusal::Invalid)?;
        let td = valid.id.trust_domain_name();
        if !self.trust_domains.is_empty() && !self.trust_domains.iter().any(|t| t == td) {
            return Err(JwtRefusal::TrustDomain(td.to_string()));
        }
        Ok(valid.id)
    }
}

/// Why no bundles are there, in words for the refusal.
fn waiting_reason(state: &JwtStreamState) -> String {
    match state {
        JwtStreamState::Off { reason }
        | JwtStreamState::Connecting { reason }
        | JwtStreamState::GaveUp { reason } => reason.clone(),
        JwtStreamState::Following => "the Workload API sent none".to_string(),
    }
}
