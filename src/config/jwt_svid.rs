//! `inbound.jwt_svid:` — the inbound checks a JWT-SVID bearer token on every request,
//! beside the caller's mTLS SVID: `{audience: STRING, require: true|false, forward:
//! true|false}`; and `gateway.jwt_svid:` — the edge gateway takes JWT-SVIDs from machine
//! clients outside the mesh as a bearer credential: `{audience: STRING, trust_domains:
//! [..]}`.
//!
//! Flow: serde reads [`InboundJwtSvid`] as part of the inbound and [`GatewayJwtSvid`] as
//! part of the gateway (unknown keys and bad types are errors at the parser's position),
//! then [`check`] refuses what cannot work (an empty audience, a `tcp` inbound that has no
//! requests to carry a header, a trust domain that is not one, JWT-SVIDs at the gateway
//! without the Workload API), each at its key's `line:column`.

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

/// How the edge gateway checks JWT-SVIDs (`gateway.jwt_svid`): a second bearer provider
/// beside `gateway.jwt`, whose keys are the Workload API's JWT bundles, not a file.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct GatewayJwtSvid {
    /// The audience machine clients fetch their JWT-SVID for (e.g. `api.jia.app`); a
    /// token whose `aud` does not contain it is refused.
    pub audience: String,
    /// Only subjects of these trust domains are accepted. Empty (the default): every
    /// trust domain meshd has a JWT bundle for (its own and the federated ones).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub trust_domains: Vec<String>,
}

fn yes() -> bool {
    true
}

/// Problems of `inbound.jwt_svid` and `gateway.jwt_svid`, each at its key.
pub(crate) fn check(config: &RawConfig, src: &Source, out: &mut Vec<ConfigProblem>) {
    check_gateway(config, src, out);
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

/// `gateway.jwt_svid`: an audience, trust domains that are names of one, and the
/// Workload API as identity source (the only source of JWT bundles).
fn check_gateway(config: &RawConfig, src: &Source, out: &mut Vec<ConfigProblem>) {
    let Some(jwt) = config.gateway.as_ref().and_then(|g| g.jwt_svid.as_ref()) else {
        return;
    };
    if jwt.audience.trim().is_empty() {
        let field = "gateway.jwt_svid.audience";
        out.push(src.problem(field, ConfigError::EmptyAudience { field }));
    }
    for (i, td) in jwt.trust_domains.iter().enumerate() {
        let field = format!("gateway.jwt_svid.trust_domains[{i}]");
        let parsed = crate::config::parse_spiffe_id(&format!("spiffe://{td}"));
        if td.contains('/') || td.contains(':') || parsed.is_err() {
            let error = ConfigError::BadTrustDomain {
                field: field.clone(),
                value: td.clone(),
            };
            out.push(src.problem(&field, error));
        }
    }
    if config.identity.files.is_some() {
        out.push(src.problem("gateway.jwt_svid", ConfigError::GatewayJwtSvidWithFiles));
    }
}

#[cfg(test)]
mod tests;
