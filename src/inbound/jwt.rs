//! The inbound's JWT-SVID check (`inbound.jwt_svid`): every request's `authorization:
//! Bearer <token>` is validated by the JWT-SVID rules against the JWT bundles currently
//! followed from the Workload API, before the policy sees the request.
//!
//! Flow: [`JwtCheck::check`] takes the request's headers -> no `authorization` header:
//! refused when `require`, else no subject -> not exactly one `Bearer` token: refused ->
//! no JWT bundles yet: refused (fail closed, naming why) -> `validate_jwt_svid` with the
//! configured audience -> the subject (a SPIFFE ID) for the policy. The header is removed
//! unless `forward`. Each outcome is counted in `meshd_jwt_svid_validations_total{result}`;
//! the token itself is never logged or put in a message.

use crate::config::InboundJwtSvid;
use crate::identity::SpiffeId;
use crate::identity::{validate_jwt_svid, JwtBundlesStatus, JwtStreamState, JwtSvidRejection};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use std::time::SystemTime;
use tokio::sync::watch;

/// The metric counting each check's outcome.
const VALIDATIONS: &str = "meshd_jwt_svid_validations_total";

/// Every `result` label of [`VALIDATIONS`]: `ok`, `missing`, `bundles_unavailable`, and
/// each [`JwtSvidRejection::label`] (a `malformed` also stands for a header that is not
/// one `Bearer` token). All start at 0.
pub const RESULTS: &[&str] = &[
    "ok",
    "missing",
    "bundles_unavailable",
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
    /// `require: true` and no `authorization` header.
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
}

impl JwtRefusal {
    /// The `result` label of [`VALIDATIONS`].
    pub fn label(&self) -> &'static str {
        match self {
            JwtRefusal::Missing => "missing",
            JwtRefusal::NotBearer => "malformed",
            JwtRefusal::NoBundles(_) => "bundles_unavailable",
            JwtRefusal::Invalid(r) => r.label(),
        }
    }
}

/// The inbound's JWT-SVID check: its settings and the bundles it validates against.
pub struct JwtCheck {
    /// `inbound.jwt_svid` as configured.
    config: InboundJwtSvid,
    /// The JWT bundles followed from the Workload API (replaced whole at each update).
    bundles: watch::Receiver<JwtBundlesStatus>,
}

impl JwtCheck {
    /// A check for `config` against the followed `bundles`; puts every result series at 0
    /// with its HELP text (the metrics recorder must be installed by now).
    pub fn new(config: InboundJwtSvid, bundles: watch::Receiver<JwtBundlesStatus>) -> JwtCheck {
        metrics::describe_counter!(
            VALIDATIONS,
            "JWT-SVIDs checked on inbound requests, by result: ok, missing, bundles_unavailable, or the JWT-SVID rule the token broke."
        );
        for result in RESULTS {
            metrics::counter!(VALIDATIONS, "result" => *result).increment(0);
        }
        JwtCheck { config, bundles }
    }

    /// Checks the request's token and returns its subject (`None`: no token and none is
    /// required). Removes `authorization` unless `forward`. Counts the outcome.
    pub fn check(&self, headers: &mut HeaderMap) -> Result<Option<SpiffeId>, JwtRefusal> {
        let outcome = self.outcome(headers);
        if !self.config.forward {
            headers.remove(AUTHORIZATION);
        }
        let result = match &outcome {
            Ok(Some(_)) => "ok",
            Ok(None) => "missing",
            Err(refusal) => refusal.label(),
        };
        metrics::counter!(VALIDATIONS, "result" => result).increment(1);
        outcome
    }

    fn outcome(&self, headers: &HeaderMap) -> Result<Option<SpiffeId>, JwtRefusal> {
        let mut values = headers.get_all(AUTHORIZATION).iter();
        let Some(value) = values.next() else {
            return match self.config.require {
                true => Err(JwtRefusal::Missing),
                false => Ok(None),
            };
        };
        if values.next().is_some() {
            return Err(JwtRefusal::NotBearer);
        }
        let token = bearer_token(value.as_bytes()).ok_or(JwtRefusal::NotBearer)?;
        let status = self.bundles.borrow();
        let Some(bundles) = status.bundles.as_ref() else {
            return Err(JwtRefusal::NoBundles(waiting_reason(&status.state)));
        };
        validate_jwt_svid(token, &self.config.audience, bundles, SystemTime::now())
            .map(|valid| Some(valid.id))
            .map_err(JwtRefusal::Invalid)
    }
}

/// The token of `Bearer <token>` (the scheme case-insensitive, RFC 6750 §2.1).
fn bearer_token(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, token) = text.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && !token.contains(' '))
        .then_some(token)
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

#[cfg(test)]
mod tests;
