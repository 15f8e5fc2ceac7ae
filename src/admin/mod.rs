//! The admin HTTP server (loopback by default): probes, metrics, and read-only views of
//! identity, policy and config; `POST /shutdown` starts a drain; `PUT /logging` changes
//! the log level.
//!
//! Flow: one small HTTP/1.1 server; each path is a plain function over read-only handles.

mod probe;
pub use probe::probe;

#[cfg(test)]
mod fuzz;

use crate::identity::{unix_seconds, IdentityStatus, JwtBundlesStatus, JwtStreamState};
use crate::policy::PolicyStore;
use crate::policy::{Request as AuthzRequest, Target};
use crate::telemetry::LogReload;
use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Largest admin request body accepted.
const MAX_BODY: usize = 64 << 10;

/// Read-only handles the admin server answers from.
pub struct AdminState {
    pub identity: watch::Receiver<IdentityStatus>,
    /// The JWT bundles from the Workload API (shown at `/identity`).
    pub jwt_bundles: watch::Receiver<JwtBundlesStatus>,
    pub policy: Option<Arc<PolicyStore>>,
    /// The inbound listener's port (for `/authz` without `port=`).
    pub inbound_port: u16,
    pub metrics: Option<PrometheusHandle>,
    /// The effective config, redacted.
    pub config: serde_json::Value,
    /// Set once every listener is bound.
    pub listeners_bound: AtomicBool,
    /// Cancelled by `POST /shutdown` to start the drain.
    pub shutdown: CancellationToken,
    pub log_reload: Option<LogReload>,
    /// Every outbound upstream: readiness (each must have resolved once) and `/upstreams`.
    pub upstreams: Option<Arc<crate::outbound::Upstreams>>,
}

impl AdminState {
    /// Why meshd is not ready, or `None` when it is.
    pub fn not_ready_reason(&self) -> Option<String> {
        if let Some(r) = self.identity.borrow().reason() {
            return Some(r.to_string());
        }
        if let Some(p) = &self.policy {
            if !p.is_loaded() {
                return Some(format!(
                    "no authorization policy loaded from {} (denying all)",
                    p.path().display()
                ));
            }
        }
        if let Some(r) = self.upstreams.as_ref().and_then(|u| u.not_ready_reason()) {
            return Some(r);
        }
        if !self.listeners_bound.load(Ordering::Acquire) {
            return Some("listeners not bound yet".into());
        }
        if self.shutdown.is_cancelled() {
            return Some("draining".into());
        }
        None
    }
}

/// What a listener of the admin server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdminScope {
    /// Every endpoint (`admin.listen`, loopback by default).
    Full,
    /// `/metrics`, `/ready` and `/live` only (`admin.metrics_listen`, for Prometheus and
    /// kubelet on the pod network); the rest is 404 there.
    MetricsOnly,
}

/// The endpoints a metrics-only listener serves.
const METRICS_ONLY: [&str; 3] = ["/metrics", "/ready", "/live"];

/// Serves admin requests until `stop` is cancelled.
pub async fn serve(
    listener: TcpListener,
    state: Arc<AdminState>,
    scope: AdminScope,
    stop: CancellationToken,
) {
    loop {
        let (tcp, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(c) => c, Err(_) => continue },
        };
        let state = state.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let state = state.clone();
                async move { Ok::<_, Infallible>(handle(req, &state, scope).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json(value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(
        serde_json::to_string_pretty(value).unwrap_or_default() + "\n",
    )));
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// Parses `a=b&c=d` with percent-decoding; `None` when malformed.
pub fn parse_query(q: &str) -> Option<HashMap<String, String>> {
    let mut out = HashMap::new();
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        out.insert(percent_decode(k)?, percent_decode(v)?);
    }
    Some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            b => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

async fn handle(
    req: Request<Incoming>,
    state: &AdminState,
    scope: AdminScope,
) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    if scope == AdminScope::MetricsOnly && !METRICS_ONLY.contains(&path.as_str()) {
        return text(
            StatusCode::NOT_FOUND,
            format!("no endpoint {path} on the metrics listener (only /metrics, /ready, /live)\n"),
        );
    }
    let query = match parse_query(req.uri().query().unwrap_or("")) {
        Some(q) => q,
        None => return text(StatusCode::BAD_REQUEST, "malformed query string\n"),
    };
    let method = req.method().clone();
    let allowed: &[Method] = match path.as_str() {
        "/live" | "/ready" | "/metrics" | "/config" | "/identity" | "/policy" | "/authz"
        | "/upstreams" => &[Method::GET, Method::HEAD],
        "/shutdown" => &[Method::POST],
        "/logging" => &[Method::PUT, Method::POST],
        _ => return text(StatusCode::NOT_FOUND, format!("no admin endpoint {path}\n")),
    };
    if !allowed.contains(&method) {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("{method} not allowed on {path}\n"),
        );
    }
    if Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .is_err()
    {
        return text(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    }
    match path.as_str() {
        "/live" => text(StatusCode::OK, "live\n"),
        "/ready" => match state.not_ready_reason() {
            None => text(StatusCode::OK, "ready\n"),
            Some(r) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {r}\n")),
        },
        "/metrics" => match &state.metrics {
            Some(h) => {
                let mut r = text(StatusCode::OK, h.render());
                r.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    http::HeaderValue::from_static("text/plain; version=0.0.4"),
                );
                r
            }
            None => text(
                StatusCode::SERVICE_UNAVAILABLE,
                "metrics recorder not installed\n",
            ),
        },
        "/config" => json(&state.config),
        "/identity" => {
            let mut view = identity_json(&state.identity.borrow());
            view["jwt_bundles"] = jwt_bundles_json(&state.jwt_bundles.borrow());
            json(&view)
        }
        "/policy" => match &state.policy {
            Some(p) => json(&p.to_json()),
            None => json(&serde_json::json!({"loaded": false, "reason": "no policy configured"})),
        },
        "/authz" => authz(&query, state),
        "/upstreams" => match &state.upstreams {
            Some(u) => json(&u.to_json()),
            None => json(&serde_json::json!({ "upstreams": [] })),
        },
        "/shutdown" => {
            state.shutdown.cancel();
            text(StatusCode::OK, "draining\n")
        }
        "/logging" => set_level(&query, state),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

fn set_level(query: &HashMap<String, String>, state: &AdminState) -> Response<Full<Bytes>> {
    let Some(level) = query.get("level") else {
        return text(StatusCode::BAD_REQUEST, "missing ?level=\n");
    };
    let Ok(filter) = tracing_subscriber::EnvFilter::try_new(level) else {
        return text(
            StatusCode::BAD_REQUEST,
            format!("invalid level `{level}`\n"),
        );
    };
    match &state.log_reload {
        Some(h) if h.reload(filter).is_ok() => text(StatusCode::OK, format!("log level {level}\n")),
        _ => text(
            StatusCode::SERVICE_UNAVAILABLE,
            "log level cannot be changed\n",
        ),
    }
}

fn authz(query: &HashMap<String, String>, state: &AdminState) -> Response<Full<Bytes>> {
    let Some(store) = &state.policy else {
        return text(StatusCode::NOT_FOUND, "no policy configured\n");
    };
    let Some(from) = query.get("from") else {
        return text(StatusCode::BAD_REQUEST, "missing ?from=SPIFFE_ID\n");
    };
    let peer = match crate::config::parse_spiffe_id(from) {
        Ok(p) => p,
        Err(e) => {
            return text(
                StatusCode::BAD_REQUEST,
                format!("invalid SPIFFE ID `{from}`: {e}\n"),
            )
        }
    };
    let port = match query.get("port").map(|p| p.parse::<u16>()) {
        None => state.inbound_port,
        Some(Ok(p)) => p,
        Some(Err(_)) => return text(StatusCode::BAD_REQUEST, "port must be 0..65535\n"),
    };
    let request = if let Some(g) = query.get("grpc") {
        match g.split_once('/') {
            Some((service, method)) => AuthzRequest::Grpc { service, method },
            None => return text(StatusCode::BAD_REQUEST, "grpc must be SERVICE/METHOD\n"),
        }
    } else if let (Some(method), Some(path)) = (query.get("method"), query.get("path")) {
        AuthzRequest::Http { method, path }
    } else {
        AuthzRequest::Tcp
    };
    let Some(policy) = store.snapshot() else {
        return text(
            StatusCode::OK,
            "DENY  rule=no policy loaded  mode=enforce\n",
        );
    };
    let target = Target { port, request };
    text(
        StatusCode::OK,
        crate::policy::explain(&policy, &peer.to_string(), &target) + "\n",
    )
}

/// The `/identity` view.
pub fn identity_json(status: &IdentityStatus) -> serde_json::Value {
    match status {
        IdentityStatus::Ready(s) => {
            let now = unix_seconds(SystemTime::now()) as i64;
            let exp = unix_seconds(s.svid.not_after) as i64;
            serde_json::json!({
                "state": "ready",
                "spiffe_id": s.svid.id.to_string(),
                "serial": s.svid.serial,
                "not_after": humantime::format_rfc3339_seconds(s.svid.not_after).to_string(),
                "seconds_to_expiry": exp - now,
                "trust_domains": s.bundles.trust_domains(),
                "generation": s.generation,
            })
        }
        other => serde_json::json!({
            "state": match other {
                IdentityStatus::Waiting { .. } => "waiting",
                IdentityStatus::Expired { .. } => "expired",
                _ => "mismatch",
            },
            "reason": other.reason(),
        }),
    }
}

/// The `jwt_bundles` part of `/identity`: the stream's state and, per trust domain, the
/// key IDs of its JWT bundle (never key material).
pub fn jwt_bundles_json(status: &JwtBundlesStatus) -> serde_json::Value {
    let (state, reason) = match &status.state {
        JwtStreamState::Off { reason } => ("off", Some(reason)),
        JwtStreamState::Connecting { reason } => ("connecting", Some(reason)),
        JwtStreamState::Following => ("following", None),
        JwtStreamState::GaveUp { reason } => ("gave_up", Some(reason)),
    };
    let domains: serde_json::Map<String, serde_json::Value> = status
        .bundles
        .iter()
        .flat_map(|b| b.domains.iter())
        .map(|(td, b)| (td.clone(), serde_json::json!(b.key_ids())))
        .collect();
    serde_json::json!({
        "state": state,
        "reason": reason,
        "generation": status.generation,
        "trust_domains": domains,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries() {
        let q = parse_query("from=spiffe%3A%2F%2Fjia.app%2Fa&grpc=a.B/C").unwrap();
        assert_eq!(q["from"], "spiffe://jia.app/a");
        assert_eq!(q["grpc"], "a.B/C");
        assert!(parse_query("a=%zz").is_none());
        assert!(parse_query("a=%e2%28").is_none());
        assert!(parse_query("").unwrap().is_empty());
    }
}
