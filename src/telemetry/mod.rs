//! Metrics and logs: the Prometheus recorder with every family described, bounded label
//! values, the per-request record that ends in metrics and an access-log line, and the
//! tracing subscriber whose level admin can change at runtime.
//!
//! Flow: `app` calls [`init_logging`] and [`install_metrics`] once; proxies create a
//! [`RequestRecord`] per request (or TCP connection) and it records itself, through the
//! handles of `metric_cache`, when finished or dropped.

mod memory;
mod metric_cache;
mod upkeep;

#[cfg(test)]
pub(crate) mod fuzz_budget;
pub use memory::on_park as collect_memory_on_park;
pub use metric_cache::increment;
pub use upkeep::keep_drained as keep_histograms_drained;

use arc_swap::ArcSwap;
use metrics::SharedString;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::sync::Arc;
use std::time::{Instant, SystemTime};

/// Which requests get an access-log line (`log.access`).
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum AccessLog {
    Off,
    #[default]
    Deny,
    All,
}

/// Histogram buckets in seconds, from 100 µs to 10 s.
pub const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// Why the recorder could not be installed.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// A recorder is already installed in this process or the buckets were refused.
    #[error("cannot install the metrics recorder: {0}")]
    Recorder(String),
}

/// Installs the Prometheus recorder (once per process) and describes every family.
pub fn install_metrics() -> Result<PrometheusHandle, TelemetryError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("duration_seconds".into()), DURATION_BUCKETS)
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?
        .install_recorder()
        .map_err(|e| TelemetryError::Recorder(e.to_string()))?;
    metric_cache::enable();
    describe();
    // Unlabelled counters exist from start, at 0.
    metrics::counter!("meshd_svid_rotations_total").increment(0);
    metrics::counter!("meshd_policy_reload_failures_total").increment(0);
    Ok(handle)
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "grpc_server_requests_total",
        "gRPC requests handled, by method."
    );
    describe_histogram!(
        "grpc_server_request_duration_seconds",
        Unit::Seconds,
        "gRPC request duration, by method."
    );
    describe_counter!(
        "grpc_server_requests_failed_total",
        "gRPC requests that ended with a non-OK status, by method and reason."
    );
    describe_counter!(
        "meshd_requests_total",
        "Requests proxied, by direction, peer SPIFFE ID, gRPC method and status."
    );
    describe_histogram!(
        "meshd_request_duration_seconds",
        Unit::Seconds,
        "Time from request headers to the end of the response, by direction."
    );
    describe_counter!(
        "meshd_tcp_connections_opened_total",
        "TCP connections opened, by direction."
    );
    describe_counter!(
        "meshd_tcp_connections_closed_total",
        "TCP connections closed, by direction."
    );
    describe_gauge!(
        "meshd_connections_open",
        "Connections open now, by listener (direction)."
    );
    describe_counter!(
        "meshd_connection_limits_total",
        "Connections closed or refused by a limit of `connections:`, by listener (direction) and limit (max_connections, handshake_timeout, header_timeout, idle_timeout, keepalive_timeout, control_frame_flood)."
    );
    describe_counter!(
        "gateway_requests_total",
        "Requests through the edge gateway, by route (service), the status the client saw (the HTTP status for JSON and HTTP clients, the gRPC status for gRPC clients) and protocol (grpc, json: transcoded, http)."
    );
    describe_histogram!(
        "gateway_request_duration_seconds",
        Unit::Seconds,
        "Time from request headers to the end of the response at the gateway, by route."
    );
    describe_counter!(
        "gateway_requests_failed_total",
        "Gateway requests that failed, by route and reason (unauthenticated, rate_limited, no_route, bad_request, timeout, upstream)."
    );
    describe_counter!(
        "gateway_rate_limit_hits_total",
        "Gateway requests refused by a rate limit, by route."
    );
    describe_counter!(
        "meshd_intercepted_connections_total",
        "Connections taken by the transparent listener, by result (routed, passthrough, unmatched, not_redirected, no_original_destination, loop)."
    );
    describe_counter!(
        "meshd_tcp_bytes_total",
        Unit::Bytes,
        "Bytes proxied in tcp mode, by direction and dir (rx from peer, tx to peer)."
    );
    describe_counter!(
        "meshd_tls_handshake_failures_total",
        "TLS handshakes that failed, by direction and reason."
    );
    describe_counter!(
        "meshd_authz_decisions_total",
        "Authorization decisions, by decision, rule and mode."
    );
    describe_counter!(
        "meshd_policy_reload_failures_total",
        "Policy reloads rejected (the previous policy stays in force)."
    );
    describe_gauge!(
        "meshd_svid_expiry_timestamp_seconds",
        Unit::Seconds,
        "Not-after of the current X.509-SVID, as a Unix timestamp."
    );
    describe_counter!(
        "meshd_svid_rotations_total",
        "X.509-SVID rotations received."
    );
    describe_gauge!(
        "meshd_bundle_trust_domains",
        "Trust domains in the current trust bundle set (own and federated)."
    );
    describe_gauge!(
        "meshd_upstream_endpoints",
        "Upstream endpoints, by service and state."
    );
    describe_gauge!(
        "meshd_circuit_open",
        "1 when the upstream's circuit breaker is open."
    );
    describe_counter!("meshd_retries_total", "Retries sent, by upstream service.");
}

/// The label values metrics may take: names from the policy and declared services,
/// everything else becomes `other`, so no label comes from unbounded input.
#[derive(Debug, Default)]
pub struct LabelBounds {
    /// SPIFFE IDs named exactly in the policy.
    pub peers: HashSet<String>,
    /// gRPC `service/method` names from the policy or declared services.
    pub methods: HashSet<String>,
}

/// [`LabelBounds`] with every admitted value made once as a shared label (cloning one per
/// request is a reference count, not a copy).
#[derive(Debug, Default)]
struct LabelSet {
    /// Looked up for every request (foldhash: the keys come from the policy).
    peers: foldhash::HashMap<String, SharedString>,
    methods: foldhash::HashMap<String, SharedString>,
}

/// The label value of everything not admitted.
pub const OTHER: SharedString = SharedString::const_str("other");

/// Shared, swappable label bounds (updated when the policy reloads).
#[derive(Debug, Default)]
pub struct Labels(ArcSwap<LabelSet>);

fn shared(s: &str) -> SharedString {
    SharedString::from(Arc::<str>::from(s))
}

impl Labels {
    pub fn set(&self, bounds: LabelBounds) {
        let set = LabelSet {
            peers: bounds
                .peers
                .into_iter()
                .map(|p| (p.clone(), shared(&p)))
                .collect(),
            methods: bounds
                .methods
                .into_iter()
                .map(|m| (m.clone(), shared(&m)))
                .collect(),
        };
        self.0.store(Arc::new(set));
    }
    /// The `peer_id` label for a peer.
    pub fn peer(&self, id: &str) -> SharedString {
        self.0.load().peers.get(id).cloned().unwrap_or(OTHER)
    }
    /// [`Labels::method_label`] as a `String`.
    pub fn method(&self, service: &str, method: &str) -> String {
        self.method_label(service, method).to_string()
    }
    /// The `grpc_method` label for `service/method`; a wildcard service entry
    /// (`svc/*`) admits its methods.
    pub fn method_label(&self, service: &str, method: &str) -> SharedString {
        let b = self.0.load();
        let full = format!("{service}/{method}");
        if let Some(label) = b.methods.get(&full) {
            label.clone()
        } else if b.methods.contains_key(&format!("{service}/*")) {
            SharedString::from(Arc::<str>::from(full))
        } else {
            OTHER
        }
    }
}

/// A label value for an HTTP method: static for the standard ones.
pub fn method_name(m: &http::Method) -> SharedString {
    use http::Method;
    let known = [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
        Method::OPTIONS,
        Method::PATCH,
        Method::CONNECT,
        Method::TRACE,
    ];
    const NAMES: [&str; 9] = [
        "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
    ];
    match known.iter().position(|k| k == m) {
        Some(i) => SharedString::const_str(NAMES[i]),
        None => shared(m.as_str()),
    }
}

/// Writes JSON access-log lines to stdout.
#[derive(Debug)]
pub struct AccessLogger {
    pub mode: AccessLog,
}

impl AccessLogger {
    /// Whether a request with this outcome gets a line.
    pub fn wants(&self, denied: bool) -> bool {
        match self.mode {
            AccessLog::Off => false,
            AccessLog::Deny => denied,
            AccessLog::All => true,
        }
    }

    pub fn write(&self, denied: bool, line: serde_json::Value) {
        if !self.wants(denied) {
            return;
        }
        let mut out = std::io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, &line);
        let _ = out.write_all(b"\n");
    }
}

/// One request (or TCP connection) in flight; records metrics and the access log
/// exactly once, when finished or dropped.
///
/// Labels are [`SharedString`]s (static or reference-counted), so making a record per
/// request copies no strings; the metric handles come from [`metric_cache`].
#[derive(Debug)]
pub struct RequestRecord {
    pub direction: &'static str,
    /// The bounded `peer_id` label ([`Labels::peer`]).
    pub peer_label: SharedString,
    /// The peer's full SPIFFE ID, for the access log.
    pub peer_id: SharedString,
    /// The bounded `grpc_method` label.
    pub method_label: SharedString,
    pub grpc_method: Option<String>,
    pub http_method: SharedString,
    /// The address the request went to, for the access log.
    pub upstream: SharedString,
    pub start: Instant,
    pub http_status: u16,
    pub grpc_status: Option<u32>,
    pub rule: Option<String>,
    pub bytes: u64,
    pub denied: bool,
    pub log: Option<Arc<AccessLogger>>,
    /// Set for a request that came in through the edge gateway: its `gateway_*` metrics
    /// and the access log's caller fields.
    pub gateway: Option<Box<GatewayCall>>,
    done: bool,
}

/// What the gateway knows of a request beyond what every proxied request has.
#[derive(Debug, Clone)]
pub struct GatewayCall {
    /// The route's name: the `service` label of the `gateway_*` metrics.
    pub service: SharedString,
    /// The authenticated user (JWT claim or API key owner); none on a public route.
    pub user_id: Option<String>,
    /// The client's IP address.
    pub ip: String,
    pub user_agent: Option<String>,
    /// How the client called: `grpc`, `json` (a call the gateway transcodes) or `http`;
    /// the `protocol` label of `gateway_requests_total`.
    pub protocol: &'static str,
    /// For a transcoded call: the HTTP status its gRPC status became for the JSON
    /// client, so that `gateway_requests_total` counts what the client saw.
    pub client_status: Option<fn(u32) -> u16>,
    /// Why the gateway refused the request itself (`unauthenticated`, `rate_limited`,
    /// `no_route`); none when it was proxied.
    pub refused: Option<&'static str>,
    /// Set when the request body went past `max_request_body` and was cut off on its way
    /// up: the call then counts as `too_large`, answered 413 / RESOURCE_EXHAUSTED.
    pub body_cut: Option<Arc<std::sync::atomic::AtomicBool>>,
}

impl GatewayCall {
    /// Whether the request body was cut off at `max_request_body`.
    pub fn body_cut(&self) -> bool {
        (self.body_cut.as_ref()).is_some_and(|c| c.load(std::sync::atomic::Ordering::Acquire))
    }
}

impl RequestRecord {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        direction: &'static str,
        peer_label: impl Into<SharedString>,
        peer_id: impl Into<SharedString>,
        method_label: impl Into<SharedString>,
        grpc_method: Option<String>,
        http_method: impl Into<SharedString>,
        upstream: impl Into<SharedString>,
        log: Option<Arc<AccessLogger>>,
    ) -> RequestRecord {
        RequestRecord {
            direction,
            peer_label: peer_label.into(),
            peer_id: peer_id.into(),
            method_label: method_label.into(),
            grpc_method,
            http_method: http_method.into(),
            upstream: upstream.into(),
            start: Instant::now(),
            http_status: 0,
            grpc_status: None,
            rule: None,
            bytes: 0,
            denied: false,
            log,
            gateway: None,
            done: false,
        }
    }

    /// The status label: the gRPC status for gRPC, else the HTTP status.
    fn status(&self) -> u32 {
        match (self.grpc_method.is_some(), self.grpc_status) {
            (true, Some(s)) => s,
            // A gRPC response that ended (or was dropped) without a grpc-status:
            // CANCELLED, never OK.
            (true, None) if self.http_status == 200 => 1,
            _ => u32::from(self.http_status),
        }
    }

    /// Records metrics and the access-log line (once).
    pub fn finish(&mut self) {
        if self.done {
            return;
        }
        self.done = true;
        if let Some(g) = self.gateway.as_mut().filter(|g| g.body_cut()) {
            g.refused = Some("too_large");
            let grpc = self.grpc_method.is_some();
            self.http_status = if grpc { 200 } else { 413 };
            self.grpc_status = grpc.then_some(8);
        }
        let secs = self.start.elapsed().as_secs_f64();
        let mut digits = Digits::default();
        let status = digits.format(self.status());
        metric_cache::increment(
            "meshd_requests_total",
            &[
                ("direction", self.direction),
                ("peer_id", &self.peer_label),
                ("grpc_method", &self.method_label),
                ("status", status),
            ],
            1,
        );
        metric_cache::record(
            "meshd_request_duration_seconds",
            &[("direction", self.direction)],
            secs,
        );
        if self.direction == "inbound" && self.grpc_method.is_some() {
            let m: &str = &self.method_label;
            metric_cache::increment("grpc_server_requests_total", &[("method", m)], 1);
            metric_cache::record(
                "grpc_server_request_duration_seconds",
                &[("method", m)],
                secs,
            );
            if status != "0" {
                let reason = if self.denied {
                    "permission_denied"
                } else {
                    "status"
                };
                metric_cache::increment(
                    "grpc_server_requests_failed_total",
                    &[("method", m), ("reason", reason)],
                    1,
                );
            }
        }
        if let Some(g) = &self.gateway {
            let service: &str = &g.service;
            let mut seen = Digits::default();
            let client_status = match (g.client_status, &self.grpc_method) {
                (Some(as_http), Some(_)) => seen.format(u32::from(as_http(self.status()))),
                _ => status,
            };
            metric_cache::increment(
                "gateway_requests_total",
                &[
                    ("service", service),
                    ("status", client_status),
                    ("protocol", g.protocol),
                ],
                1,
            );
            metric_cache::record(
                "gateway_request_duration_seconds",
                &[("service", service)],
                secs,
            );
            let failed = match self.grpc_method {
                Some(_) => status != "0",
                None => self.http_status >= 500,
            };
            // A call that ran out of time (the route's request_timeout, the client's
            // grpc-timeout, or the app's own DEADLINE_EXCEEDED) is a timeout, not an
            // upstream failure.
            let timed_out = match self.grpc_method {
                Some(_) => status == "4",
                None => self.http_status == 504,
            };
            let failure = if timed_out { "timeout" } else { "upstream" };
            if let Some(reason) = g.refused.or(failed.then_some(failure)) {
                metric_cache::increment(
                    "gateway_requests_failed_total",
                    &[("service", service), ("reason", reason)],
                    1,
                );
            }
        }
        if let Some(log) = &self.log {
            if log.wants(self.denied) {
                let mut line = serde_json::json!({
                    "timestamp": humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                    "direction": self.direction,
                    "peer_id": &*self.peer_id,
                    "method": &*self.http_method,
                    "grpc_method": self.grpc_method,
                    "status": status,
                    "duration_ms": secs * 1000.0,
                    "bytes": self.bytes,
                    "upstream": &*self.upstream,
                    "rule": self.rule,
                });
                if let (Some(g), Some(fields)) = (&self.gateway, line.as_object_mut()) {
                    fields.insert("user_id".into(), g.user_id.clone().into());
                    fields.insert("ip".into(), g.ip.clone().into());
                    fields.insert("user_agent".into(), g.user_agent.clone().into());
                    fields.insert("service".into(), (*g.service).into());
                }
                log.write(self.denied, line);
            }
        }
    }
}

/// A number written in decimal on the stack, so a status label costs no allocation.
#[derive(Debug, Default)]
struct Digits([u8; 10]);

impl Digits {
    fn format(&mut self, mut n: u32) -> &str {
        let mut at = self.0.len();
        loop {
            at -= 1;
            self.0[at] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        std::str::from_utf8(&self.0[at..]).unwrap_or("0")
    }
}

impl Drop for RequestRecord {
    fn drop(&mut self) {
        self.finish();
    }
}

/// A handle to change the log level at runtime (admin `PUT /logging?level=`).
pub type LogReload =
    tracing_subscriber::reload::Handle<tracing_subscriber::EnvFilter, tracing_subscriber::Registry>;

/// Installs the tracing subscriber (JSON lines on stderr) with a reloadable filter.
pub fn init_logging(level: &str) -> Option<LogReload> {
    use tracing_subscriber::prelude::*;
    let filter = tracing_subscriber::EnvFilter::try_new(level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let fmt = tracing_subscriber::fmt::layer()
        .json()
        .with_writer(std::io::stderr)
        .with_current_span(false);
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
        .ok()
        .map(|_| handle)
}
