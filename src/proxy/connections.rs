//! The connections of one listener: counted, capped, and every limit they hit counted and
//! logged once per cause.
//!
//! Flow: the listener asks its [`ConnectionGate`] to [`admit`](ConnectionGate::admit)
//! each accepted socket -> over `connections.max` the socket is closed at once and
//! counted; otherwise the caller holds an [`OpenConnection`] until the connection ends
//! (opened/closed counters and the open gauge follow it) -> `lobby` holds a connection
//! that has sent nothing for a few dozen bytes (no TLS state, no task) -> the TLS
//! handshake, HTTP/2 (`h2_server`) and HTTP/1.1 report a timeout to
//! [`ConnectionGate::hit`].

use crate::config::ConnectionLimits;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

/// A limit a connection ran into (the `limit` label of `meshd_connection_limits_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `connections.max` open already: closed at accept.
    MaxConnections,
    /// The TLS handshake (or the first byte) did not come within `handshake_timeout`.
    HandshakeTimeout,
    /// Request headers did not come within `header_timeout`.
    HeaderTimeout,
    /// No request in flight for `idle_timeout`: closed with GOAWAY.
    IdleTimeout,
    /// A keepalive PING went unacknowledged for `keepalive_timeout`: the peer is gone.
    KeepaliveTimeout,
    /// An HTTP/2 client sent SETTINGS or PING frames without requests, past the budget
    /// of `control_frames`: closed.
    ControlFrameFlood,
}

impl Limit {
    /// Every limit, in the order of [`Limit::index`].
    pub const ALL: [Limit; 6] = [
        Limit::MaxConnections,
        Limit::HandshakeTimeout,
        Limit::HeaderTimeout,
        Limit::IdleTimeout,
        Limit::KeepaliveTimeout,
        Limit::ControlFrameFlood,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::HeaderTimeout => "header_timeout",
            Limit::IdleTimeout => "idle_timeout",
            Limit::KeepaliveTimeout => "keepalive_timeout",
            Limit::ControlFrameFlood => "control_frame_flood",
        }
    }

    fn index(self) -> usize {
        self as usize
    }

    /// The line logged the first time a listener hits this limit.
    fn explain(self) -> &'static str {
        match self {
            Limit::MaxConnections => "connections.max reached: new connections are closed at accept",
            Limit::HandshakeTimeout => {
                "a client did not finish its TLS handshake within connections.handshake_timeout: closed"
            }
            Limit::HeaderTimeout => {
                "a client sent no complete request headers within connections.header_timeout: closed"
            }
            Limit::IdleTimeout => {
                "a connection had no request for connections.idle_timeout: closed with GOAWAY"
            }
            Limit::KeepaliveTimeout => {
                "a peer did not answer a keepalive PING within connections.keepalive_timeout: closed"
            }
            Limit::ControlFrameFlood => {
                "an HTTP/2 client sent over 200 SETTINGS/PING frames without a request: closed"
            }
        }
    }
}

/// One listener's connections: how many are open, and the limits they live under.
#[derive(Debug)]
pub struct ConnectionGate {
    /// The `direction` label (inbound, outbound, gateway, transparent).
    direction: &'static str,
    /// `None` for listeners that only count (the app-facing outbound ones).
    limits: Option<ConnectionLimits>,
    /// Connections admitted and not yet closed, checked against `limits.max`.
    open: AtomicUsize,
    /// Whether each limit was logged already: a flood gets one line, then only counts.
    logged: [AtomicBool; Limit::ALL.len()],
}

impl ConnectionGate {
    /// A gate for a listener; its series start at 0 so dashboards see them before the
    /// first connection.
    pub fn new(direction: &'static str, limits: Option<ConnectionLimits>) -> Arc<ConnectionGate> {
        let d = direction;
        // `increment(0)` registers a series without resetting one that exists.
        metrics::counter!("meshd_tcp_connections_opened_total", "direction" => d).increment(0);
        metrics::counter!("meshd_tcp_connections_closed_total", "direction" => d).increment(0);
        metrics::gauge!("meshd_connections_open", "direction" => d).increment(0.0);
        if limits.is_some() {
            for limit in Limit::ALL {
                metrics::counter!("meshd_connection_limits_total", "direction" => d, "limit" => limit.as_str())
                    .increment(0);
            }
            for reason in crate::tls::FAILURE_REASONS {
                metrics::counter!("meshd_tls_handshake_failures_total", "direction" => d, "reason" => reason)
                    .increment(0);
            }
        }
        Arc::new(ConnectionGate {
            direction,
            limits,
            open: AtomicUsize::new(0),
            logged: Default::default(),
        })
    }

    /// The listener's limits (`None`: count only).
    pub fn limits(&self) -> Option<&ConnectionLimits> {
        self.limits.as_ref()
    }

    /// A new connection, or `None` (counted, logged once) when `connections.max` are
    /// open already; the caller then drops the socket.
    pub fn admit(self: &Arc<Self>, remote: SocketAddr) -> Option<OpenConnection> {
        let max = self.limits.map_or(usize::MAX, |l| l.max);
        let admitted = self
            .open
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .is_ok();
        if !admitted {
            self.hit(Limit::MaxConnections, remote);
            return None;
        }
        let d = self.direction;
        metrics::counter!("meshd_tcp_connections_opened_total", "direction" => d).increment(1);
        metrics::gauge!("meshd_connections_open", "direction" => d).increment(1.0);
        Some(OpenConnection { gate: self.clone() })
    }

    /// A TLS handshake (or the wait for its first byte) ran out of `handshake_timeout`:
    /// counted as a handshake failure (`reason="timeout"`) and as the limit.
    pub fn handshake_timed_out(&self, remote: SocketAddr) {
        metrics::counter!("meshd_tls_handshake_failures_total", "direction" => self.direction, "reason" => "timeout")
            .increment(1);
        self.hit(Limit::HandshakeTimeout, remote);
    }

    /// Counts a limit hit; the first one of each kind on this listener is logged.
    pub fn hit(&self, limit: Limit, remote: SocketAddr) {
        metrics::counter!("meshd_connection_limits_total", "direction" => self.direction, "limit" => limit.as_str())
            .increment(1);
        if !self.logged[limit.index()].swap(true, Ordering::Relaxed) {
            tracing::warn!(
                direction = self.direction,
                limit = limit.as_str(),
                %remote,
                "{}; further ones are only counted in meshd_connection_limits_total",
                limit.explain()
            );
        }
    }
}

/// An admitted connection: while held it counts in `meshd_connections_open`; dropping it
/// counts the connection closed.
#[derive(Debug)]
pub struct OpenConnection {
    gate: Arc<ConnectionGate>,
}

impl OpenConnection {
    /// The gate this connection was admitted by.
    pub fn gate(&self) -> &ConnectionGate {
        &self.gate
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.gate.open.fetch_sub(1, Ordering::AcqRel);
        let d = self.gate.direction;
        metrics::counter!("meshd_tcp_connections_closed_total", "direction" => d).increment(1);
        metrics::gauge!("meshd_connections_open", "direction" => d).decrement(1.0);
    }
}
