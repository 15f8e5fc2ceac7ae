//! How an upstream and meshd prove who they are to each other (`outbound[]`): `tls`
//! (mutual TLS with SPIFFE IDs, or server-only TLS checked by a certificate's name) and
//! `jwt_svid` (a JWT-SVID in `authorization` on every request).
//!
//! Flow: serde reads `tls` and `jwt_svid` with the rest of the outbound; `check::validate`
//! calls [`check`] for each outbound, which adds a located problem per rule broken and
//! returns the parsed `server_id` (none for `server_only`) and the `tls` block with its
//! `sni` filled in (default: the one host the endpoints name). The outbound builds its
//! client TLS config and its token source from these unchanged.
//!
//! The rules: `mtls` (the default) needs `server_id`; `server_only` refuses one (the
//! server is checked by its certificate's name, which is not a SPIFFE ID) and is the
//! only mode where `ca` and `sni` mean something; `jwt_svid.audience` is a non-empty list
//! of non-empty strings, on a `grpc` or `http` upstream (a `tcp` one has no requests to
//! put a header on), with the Workload API as identity source (`identity.files` has no
//! JWT-SVIDs). `server_only` without `jwt_svid` loads, with a warning: the upstream then
//! has no proof of who calls.

use crate::config::endpoints::EndpointsSpec;
use crate::config::error::{ConfigError, ConfigProblem};
use crate::config::raw::RawOutbound;
use crate::config::source::Source;
use crate::config::Protocol;
use serde::{Deserialize, Serialize};
use spiffe::SpiffeId;
use std::path::PathBuf;

/// `jwt_svid:` — a JWT-SVID for these audiences goes in `authorization: Bearer ...` on
/// every request to the upstream (replacing any the app sent).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct JwtSvidAttach {
    /// The `aud` values asked for: what the upstream checks the token against.
    pub audience: Vec<String>,
}

/// How the upstream's TLS is checked.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum TlsMode {
    /// Mutual TLS: both sides present X.509-SVIDs; the upstream must be `server_id`.
    #[default]
    Mtls,
    /// Plain TLS to a server outside the mesh: its certificate is checked by web-PKI
    /// roots (or `ca`) for the name `sni`; meshd sends no client certificate.
    ServerOnly,
}

/// `tls:` of an outbound.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// `mtls` (default) or `server_only`.
    #[serde(default)]
    pub mode: TlsMode,
    /// `server_only`: a PEM file of the CA certificates to trust instead of the
    /// built-in web-PKI roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// `server_only`: the name sent in SNI and checked in the server's certificate;
    /// filled in at load with the endpoints' host when not written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sni: Option<String>,
}

/// What is wrong with an outbound's `tls`, `server_id` or `jwt_svid`. Each message names
/// the key, to read well after `file:line:column: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamAuthError {
    /// `mtls` without `server_id`: nothing to check the upstream's SVID against.
    #[error("{field} is required with tls.mode mtls (the default): the SPIFFE ID the upstream must present")]
    MissingServerId { field: String },
    /// `server_only` with a `server_id`: a web-PKI certificate carries no SPIFFE ID.
    #[error("{field}: not used with tls.mode server_only (the server is checked by its certificate's name, tls.sni); remove it")]
    ServerIdWithServerOnly { field: String },
    /// `ca` or `sni` under `mtls`, where peers are checked by SPIFFE ID and trust bundle.
    #[error("{field} is only for tls.mode server_only (mtls checks the upstream's SPIFFE ID against the trust bundle)")]
    OnlyForServerOnly { field: String },
    /// `sni` that is neither a DNS name nor an IP address.
    #[error("{field}: `{value}` is not a DNS name or IP address")]
    BadSni { field: String, value: String },
    /// `server_only` without `sni` whose endpoints name no single host to default to.
    #[error(
        "{field}: the endpoints name no single host to check the certificate against; set tls.sni"
    )]
    NoSniHost { field: String },
    /// `jwt_svid.audience` is empty.
    #[error("{field} must list at least one audience")]
    NoAudience { field: String },
    /// One of `jwt_svid.audience` is empty or blank.
    #[error("{field} must not be empty")]
    EmptyAudience { field: String },
    /// `jwt_svid` on a `tcp` upstream.
    #[error(
        "{field}: a tcp upstream has no requests to put a token on; use protocol grpc or http"
    )]
    JwtOnTcp { field: String },
    /// `jwt_svid` with `identity.files`.
    #[error("{field}: JWT-SVIDs come from the Workload API, and identity.files has none")]
    JwtWithoutWorkloadApi { field: String },
    /// (warning) `server_only` without `jwt_svid`.
    #[error("{field}: server_only without jwt_svid: the upstream gets no proof of who calls")]
    ServerOnlyWithoutProof { field: String },
}

impl UpstreamAuthError {
    /// Whether the config still loads with this problem.
    pub fn is_warning(&self) -> bool {
        matches!(self, UpstreamAuthError::ServerOnlyWithoutProof { .. })
    }
}

/// Outbound `index`'s `server_id` (parsed; none for `server_only`) and `tls` (with `sni`
/// filled in), or `None` after adding its problems to `out`. `endpoints` is the parsed
/// value when it parsed; `files_identity`: `identity.files` is the identity source.
pub(crate) fn check(
    index: usize,
    ob: &RawOutbound,
    endpoints: Option<&EndpointsSpec>,
    files_identity: bool,
    src: &Source,
    out: &mut Vec<ConfigProblem>,
) -> Option<(Option<SpiffeId>, UpstreamTlsConfig)> {
    let at = |key: &str| format!("outbound[{index}].{key}");
    let errors_before = errors(out);
    let mut push = |key: &str, error: UpstreamAuthError| {
        out.push(src.problem(&at(key), ConfigError::UpstreamAuth(error)));
    };
    let mut tls = ob.tls.clone();
    let mut server_id_text = None;
    match tls.mode {
        TlsMode::Mtls => {
            match &ob.server_id {
                Some(id) => server_id_text = Some(id.as_str()),
                // Absent: reported where the outbound starts (its name).
                None => push(
                    "name",
                    UpstreamAuthError::MissingServerId {
                        field: at("server_id"),
                    },
                ),
            }
            for (key, set) in [("tls.ca", tls.ca.is_some()), ("tls.sni", tls.sni.is_some())] {
                if set {
                    push(key, UpstreamAuthError::OnlyForServerOnly { field: at(key) });
                }
            }
        }
        TlsMode::ServerOnly => {
            if ob.server_id.is_some() {
                let field = at("server_id");
                push(
                    "server_id",
                    UpstreamAuthError::ServerIdWithServerOnly { field },
                );
            }
            match &tls.sni {
                Some(name) if !valid_server_name(name) => push(
                    "tls.sni",
                    UpstreamAuthError::BadSni {
                        field: at("tls.sni"),
                        value: name.clone(),
                    },
                ),
                Some(_) => {}
                None => match endpoints.map(single_host) {
                    Some(Some(host)) => tls.sni = Some(host),
                    Some(None) => push(
                        "tls",
                        UpstreamAuthError::NoSniHost {
                            field: at("tls.sni"),
                        },
                    ),
                    // The endpoints' own problem is reported already.
                    None => {}
                },
            }
            if ob.jwt_svid.is_none() {
                let field = at("tls");
                push("tls", UpstreamAuthError::ServerOnlyWithoutProof { field });
            }
        }
    }
    if let Some(jwt) = &ob.jwt_svid {
        if ob.protocol == Protocol::Tcp {
            let field = at("jwt_svid");
            push("jwt_svid", UpstreamAuthError::JwtOnTcp { field });
        }
        if files_identity {
            let field = at("jwt_svid");
            push(
                "jwt_svid",
                UpstreamAuthError::JwtWithoutWorkloadApi { field },
            );
        }
        if jwt.audience.is_empty() {
            let field = at("jwt_svid.audience");
            push("jwt_svid.audience", UpstreamAuthError::NoAudience { field });
        }
        for (j, aud) in jwt.audience.iter().enumerate() {
            if aud.trim().is_empty() {
                let key = format!("jwt_svid.audience[{j}]");
                push(&key, UpstreamAuthError::EmptyAudience { field: at(&key) });
            }
        }
    }
    let server_id = match server_id_text {
        Some(text) => Some(crate::config::check::check_spiffe_id(
            src,
            &at("server_id"),
            text,
            out,
        )?),
        None => None,
    };
    (errors(out) == errors_before).then_some((server_id, tls))
}

/// How many of `out` are errors (warnings do not stop the outbound from parsing).
fn errors(out: &[ConfigProblem]) -> usize {
    out.iter()
        .filter(|p| p.severity == crate::config::Severity::Error)
        .count()
}

/// Whether `name` can be sent in SNI and checked in a certificate.
fn valid_server_name(name: &str) -> bool {
    rustls_pki_types::ServerName::try_from(name).is_ok()
}

/// The one host `endpoints` names (the default `sni`), if there is exactly one.
fn single_host(endpoints: &EndpointsSpec) -> Option<String> {
    match endpoints {
        EndpointsSpec::Static(list) => {
            let first = list.first()?;
            list.iter()
                .all(|hp| hp.host == first.host)
                .then(|| first.host.clone())
        }
        EndpointsSpec::Dns { host, .. } => Some(host.clone()),
        EndpointsSpec::DnsSrv { .. } | EndpointsSpec::File(_) => None,
    }
}

#[cfg(test)]
mod tests;
