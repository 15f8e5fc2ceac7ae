//! The inbound's JWT-SVID check (`inbound.jwt_svid`): every request's `authorization:
//! Bearer <token>` is validated by the JWT-SVID rules against the JWT bundles currently
//! followed from the Workload API, before the policy sees the request.
//!
//! Flow: [`JwtCheck::check`] takes the request's headers -> no `authorization` header:
//! refused when `require`, else no subject -> not exactly one `Bearer` token: refused ->
//! the shared `proxy::JwtSvidVerifier` (no JWT bundles yet: refused naming why; else
//! `validate_jwt_svid` with the configured audience) -> the subject (a SPIFFE ID) for the
//! policy. The header is removed unless `forward`. Each outcome is counted in
//! `meshd_jwt_svid_validations_total{result}`; the token itself is never logged or put in
//! a message.

use crate::config::InboundJwtSvid;
use crate::identity::{JwtBundlesStatus, SpiffeId};
use crate::proxy::{bearer, count_jwt_svid, JwtRefusal, JwtSvidVerifier};
use http::header::AUTHORIZATION;
use http::HeaderMap;
use tokio::sync::watch;

/// The inbound's JWT-SVID check: its settings and the verifier of its audience.
pub struct JwtCheck {
    /// `inbound.jwt_svid` as configured.
    config: InboundJwtSvid,
    /// Validates tokens for the audience against the followed JWT bundles.
    verifier: JwtSvidVerifier,
}

impl JwtCheck {
    /// A check for `config` against the followed `bundles`; puts every result series at 0
    /// with its HELP text (the metrics recorder must be installed by now).
    pub fn new(config: InboundJwtSvid, bundles: watch::Receiver<JwtBundlesStatus>) -> JwtCheck {
        let verifier = JwtSvidVerifier::new(config.audience.clone(), Vec::new(), bundles);
        JwtCheck { config, verifier }
    }

    /// Checks the request's token and returns its subject (`None`: no token and none is
    /// required). Removes `authorization` unless `forward`. Counts the outcome.
    pub fn check(&self, headers: &mut HeaderMap) -> Result<Option<SpiffeId>, JwtRefusal> {
        let outcome = match bearer(headers) {
            Ok(Some(token)) => self.verifier.verify(token).map(Some),
            Ok(None) => {
                count_jwt_svid("missing");
                match self.config.require {
                    true => Err(JwtRefusal::Missing),
                    false => Ok(None),
                }
            }
            Err(refusal) => {
                count_jwt_svid(refusal.label());
                Err(refusal)
            }
        };
        if !self.config.forward {
            headers.remove(AUTHORIZATION);
        }
        outcome
    }
}

#[cfg(test)]
mod tests;
