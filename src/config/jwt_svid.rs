//! `inbound.jwt_svid:` — the inbound checks a JWT-SVID bearer token on every request,
//! beside the caller's mTLS SVID: `{audience: STRING, require: true|false, forward:
//! true|false}`.
//!
//! Flow: serde reads [`InboundJwtSvid`] as part of the inbound (unknown keys and bad
//! types are errors at the parser's position), then [`check`] refuses what cannot work
//! (an empty audience, a `tcp` inbound that has no requests to carry a header), each at
//! its key's `line:column`.

use crate::config::raw::RawConfig;
use crate::config::source::Source;
use crate::config::{ConfigError, ConfigProblem, Protocol};
use serde::{Deserialize, Serialize};

/// How the inbound checks JWT-SVIDs (`inbound.jwt_svid`).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InboundJwtSvid {
    /// The audience a token must name in `aud` to be accepted here (e.g. the service's
    /// own SPIFFE ID or name); tokens minted for another service are refused.
    pub audience: String,
    /// A request without `authorization: Bearer` is refused (UNAUTHENTICATED / 401).
    /// When false it passes to the policy without a token subject, so rules naming the
    /// token (`via: jwt` or `both`) do not match it; a token that is present is always
    /// checked, and a bad one is always refused.
    #[serde(default = "yes")]
    pub require: bool,
    /// Hand the `authorization` header on to the app (it is stripped otherwise).
    #[serde(default)]
    pub forward: bool,
}

fn yes() -> bool {
    true
}

/// Problems of `inbound.jwt_svid`, each at its key.
pub(crate) fn check(config: &RawConfig, src: &Source, out: &mut Vec<ConfigProblem>) {
    let Some(inbound) = &config.inbound else {
        return;
    };
    let Some(jwt) = &inbound.jwt_svid else {
        return;
    };
    if jwt.audience.trim().is_empty() {
        out.push(src.problem(
            "inbound.jwt_svid.audience",
            ConfigError::JwtSvidEmptyAudience,
        ));
    }
    if inbound.protocol == Protocol::Tcp {
        out.push(src.problem("inbound.jwt_svid", ConfigError::JwtSvidOnTcp));
    }
}

#[cfg(test)]
mod tests;
