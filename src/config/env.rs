//! Environment overrides for `meshd.yaml` (DESIGN.md §2); the environment wins over the file.
//!
//! Applied in two rounds so the specific name wins over the general one: first the
//! names of the original design (`MTLS_*_FILE`, `SPIFFE_ENDPOINT_SOCKET`,
//! `SERVICE_MESH_SPIFFE_ID`, `GRPC_ADDRESS`), then `MESHD_*`. Rules worth knowing:
//! - `MTLS_CERT_FILE`, `MTLS_KEY_FILE`, `MTLS_CA_FILE` select file identity only all
//!   together (else an error naming the missing ones) and then drop any `workload_api`.
//! - `SPIFFE_ENDPOINT_SOCKET` is ambient in SPIRE pods, so it sets `workload_api` only
//!   when no file identity is configured; `MESHD_IDENTITY_WORKLOAD_API` is explicit and
//!   replaces a file identity from the file (an error if `MTLS_*` are set too).
//! - `GRPC_ADDRESS` and `MESHD_INBOUND_*` create the `inbound` section with its defaults
//!   when the file has none: a sidecar told where its app is should front it.
//! - The gateway's variables of the design (`API_GATEWAY_ADDRESS`, `API_GATEWAY_KEY`,
//!   `API_GATEWAY_ENABLE_TLS`, `GATEWAY_CERT_FILE`, `GATEWAY_KEY_FILE`, `GATEWAY_CA_FILE`)
//!   override the `gateway` section ([`gateway`]); without one they are ignored with a
//!   warning (routes cannot come from the environment). `API_GATEWAY_KEY` is hashed at
//!   once and never recorded as text; `API_GATEWAY_ENABLE_TLS` false is an error.
//! - Empty values count as unset. Every key set here is recorded in [`Overrides`] so
//!   that a semantic problem with it is reported against `env:VARIABLE`, not the file.

use crate::config::raw::RawConfig;
use crate::config::source::Overrides;
use crate::config::{
    parse_duration, ApiKeyDigest, ConfigError, ConfigProblem, Env, IdentityFiles, InboundConfig,
    ValueError,
};
use std::path::PathBuf;
use std::str::FromStr;

/// Applies every override in `env` to `config`; returns the problems with env values.
pub(crate) fn apply(
    config: &mut RawConfig,
    env: &Env,
    overrides: &mut Overrides,
) -> Vec<ConfigProblem> {
    let mut round = Round {
        env,
        overrides,
        problems: Vec::new(),
    };
    let mtls_files = round.mtls_files();
    if let Some(files) = &mtls_files {
        config.identity.files = Some(files.clone());
        config.identity.workload_api = None;
    }
    if config.identity.files.is_none() {
        if let Some(v) = round.value(
            "SPIFFE_ENDPOINT_SOCKET",
            "identity.workload_api",
            parse_text,
        ) {
            config.identity.workload_api = Some(v);
        }
    }
    if let Some(v) = round.value(
        "MESHD_IDENTITY_WORKLOAD_API",
        "identity.workload_api",
        parse_text,
    ) {
        if mtls_files.is_some() {
            round.problem(
                "MESHD_IDENTITY_WORKLOAD_API",
                ConfigError::EnvIdentityConflict,
            );
        } else {
            config.identity.files = None;
            config.identity.workload_api = Some(v);
        }
    }
    for var in ["SERVICE_MESH_SPIFFE_ID", "MESHD_IDENTITY_EXPECT"] {
        if let Some(v) = round.value(var, "identity.expect", parse_text) {
            config.identity.expect = Some(v);
        }
    }
    if let Some(v) = round.value("MESHD_SERVICE", "service", parse_text) {
        config.service = v;
    }
    if let Some(v) = round.value("MESHD_ADMIN_LISTEN", "admin.listen", parse_from_str) {
        config.admin.listen = v;
    }
    for var in ["GRPC_ADDRESS", "MESHD_INBOUND_FORWARD"] {
        if let Some(v) = round.value(var, "inbound.forward", parse_from_str) {
            round.inbound(config, var).forward = v;
        }
    }
    if let Some(v) = round.value("MESHD_INBOUND_LISTEN", "inbound.listen", parse_from_str) {
        round.inbound(config, "MESHD_INBOUND_LISTEN").listen = v;
    }
    if let Some(v) = round.value("MESHD_INBOUND_PROTOCOL", "inbound.protocol", parse_from_str) {
        round.inbound(config, "MESHD_INBOUND_PROTOCOL").protocol = v;
    }
    if let Some(v) = round.value("MESHD_INBOUND_POLICY", "inbound.policy", parse_text) {
        round.inbound(config, "MESHD_INBOUND_POLICY").policy = Some(PathBuf::from(v));
    }
    if let Some(v) = round.value("MESHD_LOG_LEVEL", "log.level", parse_text) {
        config.log.level = v;
    }
    if let Some(v) = round.value("MESHD_LOG_ACCESS", "log.access", parse_from_str) {
        config.log.access = v;
    }
    if let Some(v) = round.value(
        "MESHD_RUNTIME_WORKER_THREADS",
        "runtime.worker_threads",
        |t| t.parse::<usize>().map_err(|_| ValueError::Threads),
    ) {
        config.runtime.worker_threads = v;
    }
    if let Some(v) = round.value(
        "MESHD_LIFECYCLE_DRAIN_TIMEOUT",
        "lifecycle.drain_timeout",
        parse_duration,
    ) {
        config.lifecycle.drain_timeout = v;
    }
    gateway(config, &mut round);
    round.problems
}

/// The design's gateway variables, as overrides of the `gateway` section.
const GATEWAY_VARS: [&str; 6] = [
    "API_GATEWAY_ADDRESS",
    "API_GATEWAY_KEY",
    "API_GATEWAY_ENABLE_TLS",
    "GATEWAY_CERT_FILE",
    "GATEWAY_KEY_FILE",
    "GATEWAY_CA_FILE",
];

/// Applies the design's gateway variables to `config.gateway` (see the module docs).
fn gateway(config: &mut RawConfig, round: &mut Round) {
    let Some(g) = config.gateway.as_mut() else {
        for var in GATEWAY_VARS {
            if round.env.get(var).is_some() {
                round.problem(var, ConfigError::GatewayEnvWithoutGateway { var });
            }
        }
        return;
    };
    if let Some(v) = round.value("API_GATEWAY_ADDRESS", "gateway.listen", parse_from_str) {
        g.listen = v;
    }
    // Hashed here, once: the key's text goes no further than this line.
    if let Some(v) = round.value("API_GATEWAY_KEY", "gateway.api_key", |t| {
        Ok(ApiKeyDigest::of(t))
    }) {
        g.env_api_key = Some(v);
    }
    // Read, not recorded as an override: it sets no key (and must not claim gateway.tls).
    if let Some(text) = round.env.get("API_GATEWAY_ENABLE_TLS") {
        let var = "API_GATEWAY_ENABLE_TLS";
        let value = text.to_string();
        match parse_bool(text) {
            Ok(true) => {}
            Ok(false) => round.problem(var, ConfigError::PlaintextEdge { value }),
            Err(reason) => round.problem(var, ConfigError::BadEnv { var, value, reason }),
        }
    }
    if let Some(v) = round.value("GATEWAY_CERT_FILE", "gateway.tls.cert", parse_text) {
        g.tls.cert = PathBuf::from(v);
    }
    if let Some(v) = round.value("GATEWAY_KEY_FILE", "gateway.tls.key", parse_text) {
        g.tls.key = PathBuf::from(v);
    }
    if let Some(v) = round.value("GATEWAY_CA_FILE", "gateway.tls.client_ca", parse_text) {
        g.tls.client_ca = Some(PathBuf::from(v));
    }
}

/// `true`/`false` as people write them in environments (`1`, `yes`, `on`, any case).
pub(crate) fn parse_bool(text: &str) -> Result<bool, ValueError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ValueError::Bool),
    }
}

/// One pass over the environment: reads variables, records overrides, collects problems.
struct Round<'a> {
    env: &'a Env,
    overrides: &'a mut Overrides,
    problems: Vec<ConfigProblem>,
}

impl Round<'_> {
    /// Parses `var` if set; records it as the origin of `key`, or a problem naming it.
    fn value<T>(
        &mut self,
        var: &'static str,
        key: &'static str,
        parse: impl Fn(&str) -> Result<T, ValueError>,
    ) -> Option<T> {
        let text = self.env.get(var)?;
        match parse(text) {
            Ok(v) => {
                self.overrides.set(key, var);
                Some(v)
            }
            Err(reason) => {
                let value = text.to_string();
                self.problem(var, ConfigError::BadEnv { var, value, reason });
                None
            }
        }
    }

    /// The `MTLS_*_FILE` triple, all or nothing.
    fn mtls_files(&mut self) -> Option<IdentityFiles> {
        let names = ["MTLS_CERT_FILE", "MTLS_KEY_FILE", "MTLS_CA_FILE"];
        let values = names.map(|n| self.env.get(n).map(PathBuf::from));
        match values {
            [Some(cert), Some(key), Some(bundle)] => {
                self.overrides.set("identity.files", "MTLS_CERT_FILE");
                Some(IdentityFiles { cert, key, bundle })
            }
            [None, None, None] => None,
            _ => {
                let missing: Vec<&str> = names
                    .iter()
                    .zip(&values)
                    .filter(|(_, v)| v.is_none())
                    .map(|(n, _)| *n)
                    .collect();
                let first_set = names
                    .iter()
                    .zip(&values)
                    .find(|(_, v)| v.is_some())
                    .map_or(names[0], |(n, _)| *n);
                let missing = missing.join(", ");
                self.problem(first_set, ConfigError::IncompleteMtlsEnv { missing });
                None
            }
        }
    }

    /// The inbound section, created with its defaults (and attributed to `var`) if absent.
    fn inbound<'c>(
        &mut self,
        config: &'c mut RawConfig,
        var: &'static str,
    ) -> &'c mut InboundConfig {
        if config.inbound.is_none() {
            self.overrides.set("inbound", var);
        }
        config.inbound.get_or_insert_with(InboundConfig::default)
    }

    fn problem(&mut self, var: &str, error: ConfigError) {
        self.problems.push(ConfigProblem {
            file: PathBuf::from(format!("env:{var}")),
            line: 0,
            column: 0,
            severity: error.severity(),
            error,
        });
    }
}

fn parse_text(text: &str) -> Result<String, ValueError> {
    Ok(text.to_string())
}

fn parse_from_str<T: FromStr>(text: &str) -> Result<T, ValueError>
where
    T::Err: Into<ValueError>,
{
    text.parse::<T>().map_err(Into::into)
}

#[cfg(test)]
mod tests;
