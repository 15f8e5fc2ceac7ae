//! `connections:` — the limits of a listener that faces callers meshd does not control
//! (`inbound` and `gateway`): how long a caller may take at each step, how long an idle
//! connection is kept, how dead peers are found, and how many connections are held.
//!
//! Every limit has a default, so a config without the block is protected; `0s` turns a
//! timeout off where that makes sense (`keepalive_interval`, `idle_timeout`).

use crate::config::duration_str;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The connection limits of one listener.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConnectionLimits {
    /// Open connections held at once; beyond it a new connection is closed as soon as it
    /// is accepted (counted), so a flood costs neither memory nor file descriptors
    /// without bound.
    #[serde(default = "default_max")]
    pub max: usize,
    /// From accept to the end of the TLS handshake, including the wait for the first byte.
    #[serde(default = "default_handshake_timeout", with = "duration_str")]
    pub handshake_timeout: Duration,
    /// From the end of the handshake to the first request's headers (HTTP/2: the
    /// preface, SETTINGS and a HEADERS frame; HTTP/1.1: every request's headers).
    #[serde(default = "default_header_timeout", with = "duration_str")]
    pub header_timeout: Duration,
    /// A connection with no request in flight for this long is closed (GOAWAY first);
    /// `0s` keeps idle connections for ever.
    #[serde(default = "default_idle_timeout", with = "duration_str")]
    pub idle_timeout: Duration,
    /// An HTTP/2 PING is sent this often to find peers that went away without a FIN
    /// (a host that died, a dropped NAT entry); `0s` sends none.
    #[serde(default = "default_keepalive_interval", with = "duration_str")]
    pub keepalive_interval: Duration,
    /// A PING not acknowledged within this closes the connection.
    #[serde(default = "default_keepalive_timeout", with = "duration_str")]
    pub keepalive_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max: default_max(),
            handshake_timeout: default_handshake_timeout(),
            header_timeout: default_header_timeout(),
            idle_timeout: default_idle_timeout(),
            keepalive_interval: default_keepalive_interval(),
            keepalive_timeout: default_keepalive_timeout(),
        }
    }
}

impl ConnectionLimits {
    /// The keys (under `connections.`) that are 0 but must not be.
    pub fn zero_keys(&self) -> Vec<&'static str> {
        let mut keys = Vec::new();
        if self.max == 0 {
            keys.push("max");
        }
        if self.handshake_timeout.is_zero() {
            keys.push("handshake_timeout");
        }
        if self.header_timeout.is_zero() {
            keys.push("header_timeout");
        }
        if !self.keepalive_interval.is_zero() && self.keepalive_timeout.is_zero() {
            keys.push("keepalive_timeout");
        }
        keys
    }
}

fn default_max() -> usize {
    20_000
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_header_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(600)
}
fn default_keepalive_interval() -> Duration {
    Duration::from_secs(30)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(10)
}
