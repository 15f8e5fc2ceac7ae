//! The `meshd.yaml` configuration: its types, loading from a file plus the environment
//! overrides of DESIGN.md §2, and validation whose errors name `file:line:column`.
//!
//! Flow: `Config::load(path, env)` reads the file, deserializes it (unknown keys are
//! errors), applies environment overrides, then `validate` collects every semantic
//! problem. Nothing else in the crate reads the environment: `main` hands `Env` in.

use serde::{Deserialize, Serialize};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// The whole configuration of one meshd process (sidecar or gateway).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The service this sidecar fronts, e.g. `payment-service`; used in logs and metrics.
    pub service: String,
    #[serde(default)]
    pub identity: IdentityConfig,
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
}

/// Where the sidecar's own identity comes from.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct IdentityConfig {
    /// SPIFFE Workload API address (`unix:///path` or `unix:/path`); default
    /// `$SPIFFE_ENDPOINT_SOCKET`, else `unix:///run/spire/sockets/agent.sock`.
    #[serde(default)]
    pub workload_api: Option<String>,
    /// File-based identity instead of the Workload API.
    #[serde(default)]
    pub files: Option<IdentityFiles>,
    /// The SPIFFE ID this sidecar must have; another ID never becomes ready.
    #[serde(default)]
    pub expect: Option<String>,
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
}

/// One upstream service the app calls through a local plaintext listener.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    pub name: String,
    pub listen: SocketAddr,
    #[serde(default)]
    pub protocol: Protocol,
    pub endpoints: Endpoints,
    /// The SPIFFE ID the upstream must present; any other ID is refused.
    pub server_id: String,
    #[serde(default = "default_timeout", with = "duration_str")]
    pub timeout: Duration,
    #[serde(default)]
    pub retries: RetryConfig,
}

/// `endpoints:` is either a static list of `host:port` or one resolver URI.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum Endpoints {
    Static(Vec<String>),
    Uri(String),
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default)]
    pub attempts: u32,
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 0,
            budget_percent: default_budget_percent(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: default_admin_listen(),
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

/// Which requests get an access-log line.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    #[default]
    Deny,
    All,
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
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_drain() -> Duration {
    Duration::from_secs(10)
}
fn default_budget_percent() -> u32 {
    20
}
fn default_workers() -> usize {
    2
}
fn default_level() -> String {
    "info".to_string()
}

/// Durations written as `250ms`, `5s`, `1m`.
pub mod duration_str {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&humantime::format_duration(*d).to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(d)?;
        super::parse_duration(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses `250ms`, `5s`, `1m`, `1h` (a number and a unit, nothing else).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration `{text}` needs a unit: ms, s, m or h"))?;
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration `{text}` must start with a whole number"))?;
    match unit {
        "ms" => Ok(Duration::from_millis(n)),
        "s" => Ok(Duration::from_secs(n)),
        "m" => Ok(Duration::from_secs(n * 60)),
        "h" => Ok(Duration::from_secs(n * 3600)),
        _ => Err(format!(
            "duration `{text}` has unknown unit `{unit}` (use ms, s, m or h)"
        )),
    }
}
