//! The resilience settings of one upstream (`outbound[]`): retries and their budget,
//! active health checks, passive outlier detection, and circuit-breaking limits, with
//! the defaults a user of Envoy or Linkerd would expect, and their checks.
//!
//! Flow: serde reads these with the rest of the config; [`check`] adds a problem per bad
//! value to the config report (`file:line:column: message`); the outbound listener hands
//! them to `resilience` and `health_check` unchanged.

use crate::config::duration_str;
use crate::config::error::{ConfigError, ConfigProblem};
use crate::config::source::Source;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// `retries:` — which failed requests are sent again, how soon, and how many in all.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Extra attempts per request (0 = no retries).
    #[serde(default)]
    pub attempts: u32,
    /// Retries may be at most this percentage of the requests over the last 10 s.
    #[serde(default = "default_budget_percent")]
    pub budget_percent: u32,
    /// Retries allowed per second on top of the percentage, so a quiet upstream can
    /// still retry (Linkerd's `min_retries_per_second`).
    #[serde(default = "default_min_per_second")]
    pub min_per_second: u32,
    /// First back-off before a retry; doubles per attempt, with full jitter.
    #[serde(default = "default_backoff", with = "duration_str")]
    pub backoff: Duration,
    /// The longest back-off.
    #[serde(default = "default_max_backoff", with = "duration_str")]
    pub max_backoff: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            attempts: 0,
            budget_percent: default_budget_percent(),
            min_per_second: default_min_per_second(),
            backoff: default_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

/// `health_check:` — active checks of every endpoint: `grpc.health.v1.Health/Check` for a
/// gRPC upstream, a TCP connect otherwise. Off when the key is absent.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between two checks of one endpoint.
    #[serde(default = "default_hc_interval", with = "duration_str")]
    pub interval: Duration,
    /// A check not answered within this time failed.
    #[serde(default = "default_hc_timeout", with = "duration_str")]
    pub timeout: Duration,
    /// Consecutive failed checks that make a healthy endpoint unhealthy.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Consecutive passed checks that make an unhealthy endpoint healthy again.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// The service name asked about in a gRPC check ("" = the whole server).
    #[serde(default)]
    pub service: String,
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        HealthCheckConfig {
            interval: default_hc_interval(),
            timeout: default_hc_timeout(),
            unhealthy_threshold: default_unhealthy_threshold(),
            healthy_threshold: default_healthy_threshold(),
            service: String::new(),
        }
    }
}

/// `outlier_detection:` — passive ejection of endpoints whose requests keep failing
/// (Envoy's consecutive-5xx detector; on by default with Envoy's values).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Failures in a row (connect errors, resets, 5xx, gRPC UNAVAILABLE) that eject an
    /// endpoint; 0 turns detection off.
    #[serde(default = "default_consecutive_failures")]
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th ejection in a row lasts n times this.
    #[serde(default = "default_base_ejection", with = "duration_str")]
    pub base_ejection_time: Duration,
    /// The longest ejection.
    #[serde(default = "default_max_ejection", with = "duration_str")]
    pub max_ejection_time: Duration,
    /// At most this percentage of the endpoints is ejected at once (at least one may be).
    #[serde(default = "default_max_ejection_percent")]
    pub max_ejection_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            consecutive_failures: default_consecutive_failures(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejection_percent: default_max_ejection_percent(),
        }
    }
}

/// `limits:` — the circuit breaker: beyond these, requests fail fast with UNAVAILABLE.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Requests in progress to this upstream (headers sent, response not yet ended).
    #[serde(default = "default_limit")]
    pub max_requests: u64,
    /// Requests waiting for a connection to their endpoint (connect, TLS handshake).
    #[serde(default = "default_limit")]
    pub max_pending: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_requests: default_limit(),
            max_pending: default_limit(),
        }
    }
}

fn default_budget_percent() -> u32 {
    20
}
fn default_min_per_second() -> u32 {
    10
}
fn default_backoff() -> Duration {
    Duration::from_millis(25)
}
fn default_max_backoff() -> Duration {
    Duration::from_millis(250)
}
fn default_hc_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_hc_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_healthy_threshold() -> u32 {
    2
}
fn default_consecutive_failures() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejection_percent() -> u32 {
    10
}
fn default_limit() -> u64 {
    1024
}

/// The resilience settings of `outbound[i]`, checked together.
pub struct Resilience<'a> {
    pub retries: &'a RetryConfig,
    pub health_check: Option<&'a HealthCheckConfig>,
    pub outlier: &'a OutlierConfig,
    pub limits: &'a LimitsConfig,
}

/// Adds a problem for each bad value of the upstream whose key path is `prefix`
/// (`outbound[1]`), placed in the file by `src`.
pub(crate) fn check(r: &Resilience, prefix: &str, src: &Source, out: &mut Vec<ConfigProblem>) {
    let at = |key: &str| format!("{prefix}.{key}");
    for (key, value) in [
        ("retries.budget_percent", r.retries.budget_percent),
        (
            "outlier_detection.max_ejection_percent",
            r.outlier.max_ejection_percent,
        ),
    ] {
        if value > 100 {
            let field = at(key);
            let error = ConfigError::PercentOverHundred {
                field: field.clone(),
                value,
            };
            out.push(src.problem(&field, error));
        }
    }
    let mut zeros: Vec<(&str, bool)> = vec![
        ("limits.max_requests", r.limits.max_requests == 0),
        ("limits.max_pending", r.limits.max_pending == 0),
        ("retries.backoff", r.retries.backoff.is_zero()),
        (
            "outlier_detection.base_ejection_time",
            r.outlier.base_ejection_time.is_zero(),
        ),
    ];
    if let Some(hc) = r.health_check {
        zeros.extend([
            ("health_check.interval", hc.interval.is_zero()),
            ("health_check.timeout", hc.timeout.is_zero()),
            (
                "health_check.unhealthy_threshold",
                hc.unhealthy_threshold == 0,
            ),
            ("health_check.healthy_threshold", hc.healthy_threshold == 0),
        ]);
    }
    for (key, zero) in zeros {
        if zero {
            let field = at(key);
            out.push(src.problem(&field, ConfigError::ZeroTimeout { field: at(key) }));
        }
    }
    for (low_key, low, high_key, high) in [
        (
            "retries.backoff",
            r.retries.backoff,
            "retries.max_backoff",
            r.retries.max_backoff,
        ),
        (
            "outlier_detection.base_ejection_time",
            r.outlier.base_ejection_time,
            "outlier_detection.max_ejection_time",
            r.outlier.max_ejection_time,
        ),
    ] {
        if low > high {
            let field = at(low_key);
            let error = ConfigError::BadOrder {
                field: field.clone(),
                low: humantime::format_duration(low).to_string(),
                high_field: at(high_key),
                high: humantime::format_duration(high).to_string(),
            };
            out.push(src.problem(&field, error));
        }
    }
}
