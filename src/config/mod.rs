//! The `meshd.yaml` configuration: its types, loading from a file plus the environment
//! overrides of DESIGN.md §2, and validation whose errors name `file:line:column`.
//!
//! Flow: [`Config::load`] reads the file and deserializes it with `serde_yaml_ng` into
//! its raw form (`raw::RawConfig`; unknown keys and bad types are errors carrying the
//! parser's line and column), applies the environment overrides ([`Env`]; the
//! environment wins over the file), fills the identity default, then `check::validate`
//! collects EVERY semantic problem, locates each one in the source text, and parses
//! the values with a grammar of their own (SPIFFE IDs, `endpoints`, `intercept`) into
//! the typed fields of [`Config`]: nothing downstream parses them again. Nothing else in the crate reads the environment:
//! `main` builds [`Env`] from `std::env::vars()` and hands it in. `meshd check` is
//! [`check_report`].

mod check;
mod connections;
mod endpoints;
mod env;
mod error;
mod gateway;
mod intercept;
mod jwt_svid;
mod raw;
mod resilience;
mod source;
mod spiffe_id;
mod upstream_auth;

#[cfg(test)]
mod fuzz;

use crate::telemetry::AccessLog;
use raw::RawConfig;
use serde::{Deserialize, Serialize};
use source::{Overrides, Source};
use spiffe::SpiffeId;
pub use spiffe_id::{parse_spiffe_id, parse_workload_api_address, AddressError, SpiffeIdError};
use std::collections::HashMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

/// The default SPIFFE Workload API address when neither the file nor the environment
/// names one and no file-based identity is configured (DESIGN.md §2).
pub const DEFAULT_WORKLOAD_API: &str = "unix:///run/spire/sockets/agent.sock";

/// The whole configuration of one meshd process (sidecar or gateway), validated: built
/// only by [`Config::load`] and friends (serialized for the admin `/config` endpoint).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Config {
    /// The service this sidecar fronts, e.g. `payment-service`; used in logs and metrics.
    pub service: String,
    pub identity: IdentityConfig,
    pub inbound: Option<InboundConfig>,
    pub outbound: Vec<OutboundConfig>,
    /// The edge gateway (JWT, API keys, rate limits); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gateway: Option<GatewayConfig>,
    /// The transparent outbound listener (iptables REDIRECT target); off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transparent: Option<TransparentConfig>,
    pub admin: AdminConfig,
    pub discovery: DiscoveryConfig,
    pub runtime: RuntimeConfig,
    pub log: LogConfig,
    pub lifecycle: LifecycleConfig,
}

/// Where the sidecar's own identity comes from. Exactly one of `workload_api` and
/// `files` is set.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct IdentityConfig {
    /// SPIFFE Workload API address in its `unix:///path` form (`unix:/path` is accepted
    /// in the file); default `$SPIFFE_ENDPOINT_SOCKET`, else
    /// `unix:///run/spire/sockets/agent.sock`.
    pub workload_api: Option<String>,
    /// File-based identity instead of the Workload API.
    pub files: Option<IdentityFiles>,
    /// The SPIFFE ID this sidecar must have; another ID never becomes ready.
    #[serde(serialize_with = "as_text::optional")]
    pub expect: Option<SpiffeId>,
}

/// PEM files for a file-based identity, reloaded when any of them changes.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub bundle: PathBuf,
}

/// Declared application protocol of a listener; never sniffed.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    #[default]
    Grpc,
    Http,
    Tcp,
}

impl Protocol {
    /// Whether requests are proxied as HTTP/2 (gRPC and HTTP) rather than as bytes.
    pub fn is_http(self) -> bool {
        !matches!(self, Protocol::Tcp)
    }
}

/// The mTLS listener that fronts the local app.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    #[serde(default = "default_inbound_listen")]
    pub listen: SocketAddr,
    #[serde(default = "default_inbound_forward")]
    pub forward: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    /// The authorization policy file for this service.
    #[serde(default)]
    pub policy: Option<PathBuf>,
    /// Timeouts, keepalive and the connection cap for callers that misbehave.
    #[serde(default)]
    pub connections: ConnectionLimits,
    /// Check a JWT-SVID bearer token on every request (http and grpc only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_svid: Option<InboundJwtSvid>,
}

impl Default for InboundConfig {
    /// The §2 defaults: `0.0.0.0:15006` forwarding gRPC to `127.0.0.1:8081`, no policy.
    fn default() -> Self {
        InboundConfig {
            listen: default_inbound_listen(),
            forward: default_inbound_forward(),
            protocol: Protocol::default(),
            policy: None,
            connections: ConnectionLimits::default(),
            jwt_svid: None,
        }
    }
}

/// One upstream service the app calls through a local plaintext listener.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboundConfig {
    pub name: String,
    /// The plaintext listener the app dials for this upstream; may be left out when the
    /// app's connections reach it by `intercept` instead.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Original destinations (the service addresses the app dials: `ip:port`, or
    /// `host:port` whose A/AAAA records are followed, e.g. a Service's name for its
    /// ClusterIP) whose intercepted connections the transparent listener hands to this
    /// upstream. Each is a concrete destination (no unspecified IP), claimed once.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub intercept: Vec<HostPort>,
    pub protocol: Protocol,
    /// Where the upstream runs: a static list or a resolver to follow.
    pub endpoints: EndpointsSpec,
    /// The SPIFFE ID the upstream must present (`tls.mode: mtls`); any other ID is
    /// refused. None with `server_only`, where the certificate's name is checked.
    #[serde(serialize_with = "as_text::optional")]
    pub server_id: Option<SpiffeId>,
    /// Mutual TLS (default) or server-only TLS to an upstream outside the mesh.
    pub tls: UpstreamTlsConfig,
    /// A JWT-SVID put on every request; off when absent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jwt_svid: Option<JwtSvidAttach>,
    #[serde(with = "duration_str")]
    pub timeout: Duration,
    /// Which failed requests are sent again, and the budget that bounds them.
    pub retries: RetryConfig,
    /// Active health checks of every endpoint; off when absent.
    pub health_check: Option<HealthCheckConfig>,
    /// Passive ejection of endpoints whose requests keep failing.
    pub outlier_detection: OutlierConfig,
    /// Circuit-breaking limits on requests in progress and waiting for a connection.
    pub limits: LimitsConfig,
    /// How requests (or TCP connections) are spread over the endpoints.
    pub balancer: BalancerPolicy,
    /// Shortest wait between two DNS lookups (a record's TTL below it is raised to it).
    #[serde(with = "duration_str")]
    pub min_refresh: Duration,
    /// Longest wait between two lookups (a longer TTL is cut to it; static and file
    /// endpoints with host names are re-resolved at this period).
    #[serde(with = "duration_str")]
    pub max_refresh: Duration,
}

/// Load-balancing policy of an upstream.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum BalancerPolicy {
    /// Power of two choices over peak-EWMA latency times in-flight requests (linkerd2).
    #[default]
    P2cEwma,
    /// Weighted round robin.
    RoundRobin,
    /// Power of two choices over in-flight requests per weight (Envoy's least_request).
    LeastRequest,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The whole admin API (`/config`, `/shutdown`, ...): loopback by default.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// A second listener serving only `/metrics`, `/ready` and `/live`, so Prometheus
    /// (and kubelet) can reach a pod's metrics while the admin API stays on loopback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<SocketAddr>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
            metrics_listen: None,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// DNS servers as `ip:port`; default: the system's resolv.conf.
    #[serde(default)]
    pub nameservers: Vec<SocketAddr>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Tokio worker threads; 1 for a one-core sidecar.
    #[serde(default = "default_workers")]
    pub worker_threads: usize,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            worker_threads: default_workers(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub access: AccessLog,
    /// The level of meshd's own logs at start (`info`, `debug`, an EnvFilter directive).
    #[serde(default = "default_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            access: AccessLog::default(),
            level: default_level(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LifecycleConfig {
    /// How long in-flight requests may finish after SIGTERM or `POST /shutdown`.
    #[serde(default = "default_drain", with = "duration_str")]
    pub drain_timeout: Duration,
    /// Drain and exit when this process exits (Kubernetes Jobs).
    #[serde(default)]
    pub exit_with_app: Option<u32>,
}

impl Default for LifecycleConfig {
    fn default() -> Self {
        LifecycleConfig {
            drain_timeout: default_drain(),
            exit_with_app: None,
        }
    }
}

fn default_inbound_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15006))
}
fn default_inbound_forward() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8081))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15000))
}
pub(crate) fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
pub(crate) fn default_min_refresh() -> Duration {
    Duration::from_secs(1)
}
pub(crate) fn default_max_refresh() -> Duration {
    Duration::from_secs(60)
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_workers() -> usize {
    2
}
fn default_level() -> String {
    "info".to_string()
}

/// Durations written as `250ms`, `5s`, `1m`.
pub mod duration_str {
    use serde::{Deserializer, Serializer};
    use std::time::Duration;

    /// In the largest of h, m, s, ms that holds it whole (`90s`, not `1m 30s`), so the
    /// text `/config` shows reads back in a config file.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        let ms = d.as_millis();
        if !d.subsec_nanos().is_multiple_of(1_000_000) {
            return s.serialize_str(&humantime::format_duration(*d).to_string());
        }
        let text = match ms {
            0 => "0s".to_string(),
            _ if ms.is_multiple_of(3_600_000) => format!("{}h", ms / 3_600_000),
            _ if ms.is_multiple_of(60_000) => format!("{}m", ms / 60_000),
            _ if ms.is_multiple_of(1000) => format!("{}s", ms / 1000),
            _ => format!("{ms}ms"),
        };
        s.serialize_str(&text)
    }

    /// Parses inside the visitor so a bad value is reported at the value's position.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        struct DurationVisitor;
        impl serde::de::Visitor<'_> for DurationVisitor {
            type Value = Duration;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a duration such as 250ms, 5s, 1m")
            }
            fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<Duration, E> {
                super::parse_duration(text).map_err(E::custom)
            }
        }
        d.deserialize_str(DurationVisitor)
    }
}

/// Values shown as their text (`Display`) in `/config`: SPIFFE IDs.
mod as_text {
    use serde::Serializer;
    use std::fmt::Display;

    pub fn optional<S: Serializer, T: Display>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match value {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }
}

/// Parses `250ms`, `5s`, `1m`, `1h` (a number and a unit, nothing else).
pub fn parse_duration(text: &str) -> Result<Duration, ValueError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| ValueError::DurationUnitMissing(text.to_string()))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| ValueError::DurationNotWhole(text.to_string()))?;
    // Minutes or hours whose seconds overflow 64 bits read like a number too long for them.
    let secs = |scale: u64| {
        n.checked_mul(scale)
            .map(Duration::from_secs)
            .ok_or_else(|| ValueError::DurationNotWhole(text.to_string()))
    };
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => secs(60),
        "h" => secs(3600),
        _ => Err(ValueError::DurationUnit {
            text: text.to_string(),
            unit: unit.to_string(),
        }),
    }
}

pub use crate::config::check::check_report;
pub use crate::config::connections::ConnectionLimits;
pub use crate::config::endpoints::{
    parse_host_port, EndpointsError, EndpointsSpec, HostPort, HostPortError,
};
pub use crate::config::error::{ConfigError, ConfigErrors, ConfigProblem, Severity, ValueError};
pub use crate::config::gateway::{
    ApiKeyDigest, ClientAuth, DescriptorError, GatewayConfig, GatewayTls, JwtConfig, RateLimit,
    RouteAuth, RouteConfig, TranscodingConfig, ENV_API_KEY_USER,
};
pub use crate::config::intercept::{TransparentConfig, Unmatched};
pub use crate::config::jwt_svid::{GatewayJwtSvid, InboundJwtSvid};
pub use crate::config::resilience::{HealthCheckConfig, LimitsConfig, OutlierConfig, RetryConfig};
pub use crate::config::upstream_auth::{
    JwtSvidAttach, TlsMode, UpstreamAuthError, UpstreamTlsConfig,
};

/// The process environment, captured once by `main` (`std::env::vars().collect()`).
/// Empty values count as unset, as Kubernetes manifests often template them empty.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Env(pub HashMap<String, String>);

impl Env {
    /// The value of `name`, or `None` when it is unset or empty.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(String::as_str)
            .filter(|v| !v.is_empty())
    }
}

impl FromIterator<(String, String)> for Env {
    fn from_iter<I: IntoIterator<Item = (String, String)>>(iter: I) -> Env {
        Env(iter.into_iter().collect())
    }
}

impl Config {
    /// Loads `path` with `env` overrides and validates it; warnings are logged.
    pub fn load(path: &Path, env: &Env) -> Result<Config, ConfigErrors> {
        let (config, warnings) = Config::load_checked(path, env)?;
        for w in &warnings {
            tracing::warn!("{w}");
        }
        Ok(config)
    }

    /// Like [`Config::load`] but hands the warnings back instead of logging them.
    pub fn load_checked(
        path: &Path,
        env: &Env,
    ) -> Result<(Config, Vec<ConfigProblem>), ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigErrors(vec![ConfigProblem {
                file: path.to_path_buf(),
                line: 0,
                column: 0,
                severity: Severity::Error,
                error: ConfigError::Read(e.to_string()),
            }])
        })?;
        Config::from_text(path, &text, env)
    }

    /// Parses, overrides and validates `text` as if read from `path` (for tests and
    /// callers that already hold the text). Returns the config and its warnings.
    pub fn from_text(
        path: &Path,
        text: &str,
        env: &Env,
    ) -> Result<(Config, Vec<ConfigProblem>), ConfigErrors> {
        let mut config: RawConfig = serde_yaml_ng::from_str(text).map_err(|e| {
            let (line, column) = e.location().map_or((0, 0), |l| (l.line(), l.column()));
            ConfigErrors(vec![ConfigProblem {
                file: path.to_path_buf(),
                line,
                column,
                severity: Severity::Error,
                error: ConfigError::Syntax(strip_position(&e.to_string())),
            }])
        })?;
        let file_conflict =
            config.identity.files.is_some() && config.identity.workload_api.is_some();
        let mut overrides = Overrides::default();
        let mut problems = crate::config::env::apply(&mut config, env, &mut overrides);
        if config.identity.files.is_none() && config.identity.workload_api.is_none() {
            config.identity.workload_api = Some(DEFAULT_WORKLOAD_API.to_string());
        }
        let source = Source::new(path, text, &overrides);
        let (config, found) = check::validate(config, file_conflict, &source);
        problems.extend(found);
        problems.sort_by_key(|p| (p.line, p.column));
        match config {
            Some(config) if !problems.iter().any(|p| p.severity == Severity::Error) => {
                Ok((config, problems))
            }
            _ => Err(ConfigErrors(problems)),
        }
    }

    /// The effective config as JSON for the admin `/config` endpoint. File paths stay;
    /// any key named in [`SECRET_KEYS`] (at any depth) becomes `"<redacted>"`, so secret
    /// fields added later (gateway API keys, JWT secrets) are covered by naming them there.
    pub fn redacted(&self) -> serde_json::Value {
        let mut value = serde_json::to_value(self).unwrap_or_else(
            |e| serde_json::json!({ "error": format!("cannot render config: {e}") }),
        );
        redact(&mut value);
        value
    }
}

/// Config keys whose values are secrets and never leave the process.
pub const SECRET_KEYS: &[&str] = &[
    "api_key",
    "api_keys",
    "secret",
    "password",
    "token",
    "jwt_secret",
];

fn redact(value: &mut serde_json::Value) {
    match value {
        serde_json::Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if SECRET_KEYS.contains(&key.as_str()) {
                    *v = serde_json::Value::String("<redacted>".into());
                } else {
                    redact(v);
                }
            }
        }
        serde_json::Value::Array(items) => items.iter_mut().for_each(redact),
        _ => {}
    }
}

/// Drops serde_yaml_ng's own ` at line L column C…` suffix; the position is reported separately.
fn strip_position(message: &str) -> String {
    match message.find(" at line ") {
        Some(i) => message[..i].to_string(),
        None => message.to_string(),
    }
}

impl FromStr for Protocol {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<Protocol, ValueError> {
        match s {
            "grpc" => Ok(Protocol::Grpc),
            "http" => Ok(Protocol::Http),
            "tcp" => Ok(Protocol::Tcp),
            _ => Err(ValueError::Protocol),
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(match self {
            Protocol::Grpc => "grpc",
            Protocol::Http => "http",
            Protocol::Tcp => "tcp",
        })
    }
}

impl FromStr for AccessLog {
    type Err = ValueError;
    fn from_str(s: &str) -> Result<AccessLog, ValueError> {
        match s {
            "off" => Ok(AccessLog::Off),
            "deny" => Ok(AccessLog::Deny),
            "all" => Ok(AccessLog::All),
            _ => Err(ValueError::AccessLog),
        }
    }
}

#[cfg(test)]
mod tests;
