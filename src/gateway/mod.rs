//! The edge gateway: the one port clients outside the mesh call (HTTPS: HTTP/2 for gRPC
//! and h2 clients, HTTP/1.1 bridged onto the same HTTP/2 handling). It checks who is calling, limits how often, and hands the request to
//! an outbound, which carries it over mTLS with the gateway's SVID to the service's
//! sidecar, whose policy then decides on the gateway's SPIFFE ID.
//!
//! Flow per request: [`route`] (longest path prefix; a JSON call of a REST path that a
//! `google.api.http` rule declares is routed by the gRPC path it maps to; none: gRPC
//! UNIMPLEMENTED / 404, as JSON to a JSON client) ->
//! `gateway_auth::authenticate` (an end-user JWT, a machine client's JWT-SVID, an API
//! key or a client certificate, as the route takes; no valid credentials:
//! UNAUTHENTICATED / 401) -> the
//! route's rate limit, per user or, for anonymous calls, per client IP (spent:
//! RESOURCE_EXHAUSTED / 429, `gateway_rate_limit_hits_total`) -> a JSON client's call of
//! a `gateway.transcoding` service is made a gRPC call (`transcode`; bad input refused
//! there with 4xx) -> credentials stripped, `x-user-id` and `x-forwarded-for` set
//! (anything the client sent under those names is dropped) -> `outbound::forward_as`
//! (a transcoded call's answer made JSON). Every request, refused or proxied, ends in one
//! record: `gateway_requests_total`, `gateway_request_duration_seconds`,
//! `gateway_requests_failed_total{reason}` and an access-log line with user_id, ip and
//! user_agent.
//!
//! A client certificate (`gateway.tls.client_ca`, verified in the handshake) names the
//! user of its connection (`client_cert`), a credential where the route takes one. The
//! route's `connect_timeout` and `request_timeout` go with the request to the outbound
//! (an expired one answers 504 / DEADLINE_EXCEEDED, `reason="timeout"`).
//!
//! The certificate, the client CA, the JWKS and the API keys file are read again when
//! they change (checked every 2 s); a bad file keeps the last good one and is logged.

mod auth;
mod client_cert;
mod files;
mod http1;
mod transcode;

#[cfg(test)]
mod fuzz;
pub use auth::p256_jwks;
pub use client_cert::ClientCaError;
pub use files::check_files;
pub use transcode::{Call, TranscodeError, Transcoder};

use crate::config::{GatewayConfig, Protocol, RateLimit, RouteAuth};
use crate::gateway::auth::{authenticate, AuthError, Credentials};
use crate::gateway::client_cert::ClientCertUser;
use crate::gateway::files::{load_credentials, load_tls, modified};
use crate::identity::JwtBundlesStatus;
use crate::outbound::{self, CallTimeouts, Outbound};
use crate::proxy::H2Body;
use crate::proxy::{self, ConnectionGate, Drain, JwtSvidVerifier, ProxyBody};
use crate::proxy::{ProxyError, Watched};
use crate::telemetry::{self, AccessLogger, GatewayCall, RequestRecord};
use arc_swap::ArcSwap;
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use http::{HeaderValue, Request, Response, StatusCode};
use metrics::SharedString;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::time::Instant;

/// Why the gateway could not start, or what `meshd check` finds wrong with its files.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The certificate or key file is missing or malformed.
    #[error("gateway.tls: {path}: {reason}")]
    Tls { path: PathBuf, reason: String },
    /// The JWKS or the API keys file is missing or malformed.
    #[error("gateway: {0}")]
    Credentials(#[from] AuthError),
    /// `meshd check`: the JWKS is missing or malformed.
    #[error("gateway.jwt.jwks: {0}")]
    Jwks(AuthError),
    /// `meshd check`: the API keys file is missing or malformed.
    #[error("gateway.api_keys: {0}")]
    ApiKeys(AuthError),
    /// The client CA file (`gateway.tls.client_ca`) is missing or malformed.
    #[error("{0}")]
    ClientCa(#[from] ClientCaError),
    /// The transcoding protos do not load or miss a listed service.
    #[error("{0}")]
    Transcoding(#[from] TranscodeError),
    /// A route names an outbound that does not exist (`meshd check` says so first).
    #[error("gateway route {route}: no outbound is named {upstream}")]
    UnknownUpstream { route: String, upstream: String },
}

/// One route, ready to serve.
pub struct Route {
    /// The `service` label.
    pub name: SharedString,
    pub prefix: String,
    pub auth: RouteAuth,
    /// The outbound that carries the route's requests.
    pub upstream: Arc<Outbound>,
    /// The route's token buckets, keyed by user or `ip:ADDR`; none without a limit.
    pub limiter: Option<Arc<DefaultKeyedRateLimiter<String>>>,
    /// `connect_timeout` and `request_timeout`, handed to the outbound with each request.
    pub timeouts: CallTimeouts,
}

/// The route for a path: the longest matching prefix.
pub fn route<'a, R>(routes: &'a [R], prefix: impl Fn(&R) -> &str, path: &str) -> Option<&'a R> {
    routes
        .iter()
        .filter(|r| path.starts_with(prefix(r)))
        .max_by_key(|r| prefix(r).len())
}

fn limiter(limit: RateLimit) -> Option<Arc<DefaultKeyedRateLimiter<String>>> {
    let per_second = NonZeroU32::new(limit.per_second)?;
    let burst = NonZeroU32::new(limit.burst)?;
    Some(Arc::new(RateLimiter::keyed(
        Quota::per_second(per_second).allow_burst(burst),
    )))
}

/// The edge gateway's routes, credentials and certificate.
pub struct Gateway {
    routes: Vec<Route>,
    /// The current JWT keys and API keys, swapped when their files change (with the
    /// JWT-SVID verifier, which follows the Workload API itself).
    creds: ArcSwap<Credentials>,
    /// `gateway.jwt_svid`: machine clients' JWT-SVIDs against the followed JWT bundles.
    jwt_svid: Option<Arc<JwtSvidVerifier>>,
    /// The current TLS server config, swapped when the certificate changes.
    tls: ArcSwap<rustls::ServerConfig>,
    config: GatewayConfig,
    log: Arc<AccessLogger>,
    /// JSON clients' calls made gRPC calls; none without `gateway.transcoding`.
    transcoder: Option<transcode::Transcoder>,
    /// Counts the client connections and the limits (`gateway.connections`) they hit.
    gate: Arc<ConnectionGate>,
    /// Whether a body over `max_request_body` was logged already: a flood of them gets
    /// one line, then only counts.
    too_large_logged: AtomicBool,
}

/// The route's refusal series at 0, so dashboards and alerts see them from start.
fn start_at_zero(route: &str) {
    let service = route.to_string();
    metrics::counter!("gateway_rate_limit_hits_total", "service" => service.clone()).increment(0);
    let reasons = [
        "unauthenticated",
        "rate_limited",
        "bad_request",
        "too_large",
        "timeout",
        "upstream",
    ];
    for reason in reasons {
        metrics::counter!("gateway_requests_failed_total", "service" => service.clone(), "reason" => reason)
            .increment(0);
    }
}

fn handshake_failed(reason: &'static str) {
    metrics::counter!("meshd_tls_handshake_failures_total", "direction" => "gateway", "reason" => reason)
        .increment(1);
}

impl Gateway {
    /// Builds the gateway: reads the certificate and the credentials, and finds each
    /// route's outbound; `jwt_bundles` are the JWT bundles followed from the Workload API
    /// (used with `gateway.jwt_svid`).
    pub fn new(
        config: &GatewayConfig,
        outbounds: &HashMap<String, Arc<Outbound>>,
        log: Arc<AccessLogger>,
        jwt_bundles: watch::Receiver<JwtBundlesStatus>,
    ) -> Result<Gateway, GatewayError> {
        let tls = load_tls(config)?;
        let jwt_svid = (config.jwt_svid.as_ref()).map(|j| {
            let (audience, domains) = (j.audience.clone(), j.trust_domains.clone());
            Arc::new(JwtSvidVerifier::new(audience, domains, jwt_bundles))
        });
        let creds = load_credentials(config, jwt_svid.as_ref())?;
        let transcoder = config
            .transcoding
            .as_ref()
            .map(transcode::Transcoder::new)
            .transpose()?;
        let shared = config.rate_limit.and_then(limiter);
        let mut routes = Vec::new();
        for r in &config.routes {
            let upstream = outbounds.get(&r.upstream).cloned().ok_or_else(|| {
                GatewayError::UnknownUpstream {
                    route: r.name.clone(),
                    upstream: r.upstream.clone(),
                }
            })?;
            start_at_zero(&r.name);
            routes.push(Route {
                name: SharedString::from(r.name.clone()),
                prefix: r.prefix.clone(),
                auth: r.auth,
                upstream,
                limiter: r.rate_limit.map_or(shared.clone(), limiter),
                timeouts: CallTimeouts {
                    connect: r.connect_timeout,
                    request: r.request_timeout,
                },
            });
        }
        Ok(Gateway {
            routes,
            creds: ArcSwap::from_pointee(creds),
            jwt_svid,
            tls: ArcSwap::from_pointee(tls),
            config: config.clone(),
            log,
            transcoder,
            gate: ConnectionGate::new("gateway", Some(config.connections)),
            too_large_logged: AtomicBool::new(false),
        })
    }

    /// Reloads the certificate and the credentials when their files change (and the
    /// transcoding protos, see `Transcoder::follow`); forgets idle rate-limit keys.
    async fn follow_files(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut paths: Vec<&Path> = vec![&self.config.tls.cert, &self.config.tls.key];
        paths.extend(self.config.tls.client_ca.as_deref());
        paths.extend(self.config.jwt.as_ref().map(|j| j.jwks.as_path()));
        paths.extend(self.config.api_keys.as_deref());
        let mut seen = modified(&paths);
        let mut tick = tokio::time::interval(Duration::from_secs(2));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            for r in &self.routes {
                if let Some(l) = &r.limiter {
                    l.retain_recent();
                }
            }
            if let Some(t) = &self.transcoder {
                t.follow();
            }
            let now = modified(&paths);
            if now == seen {
                continue;
            }
            seen = now;
            match load_tls(&self.config) {
                Ok(tls) => self.tls.store(Arc::new(tls)),
                Err(e) => tracing::warn!("{e}; keeping the last good certificate"),
            }
            match load_credentials(&self.config, self.jwt_svid.as_ref()) {
                Ok(creds) => self.creds.store(Arc::new(creds)),
                Err(e) => tracing::warn!("gateway: {e}; keeping the last good credentials"),
            }
        }
    }

    /// Accepts client connections until drained. A connection is admitted by the gate
    /// (or closed at once over `connections.max`) and waits in the listener's lobby for
    /// its first byte (no task, no TLS state); only then does its task start.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        tokio::spawn(self.clone().follow_files(drain.stop.clone()));
        let timeout = self.config.connections.handshake_timeout;
        let connection =
            |tcp, remote, stop, deadline| self.clone().connection(tcp, remote, stop, deadline);
        let gate = self.gate.clone();
        proxy::accept_ready(
            &listener,
            &drain,
            &gate,
            timeout,
            "gateway",
            || true,
            connection,
        )
        .await;
    }

    /// One client connection: the TLS handshake by `deadline`, then HTTP/2 or HTTP/1.1.
    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        from: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
        deadline: Instant,
    ) {
        let acceptor = tokio_rustls::TlsAcceptor::from(self.tls.load_full());
        // Boxed, as the phases below: a connection's task then holds only the phase it
        // is in, not room for every phase (see `Inbound::connection`).
        let tls = match tokio::time::timeout_at(deadline, Box::pin(acceptor.accept(tcp))).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!("gateway handshake from {from}: {e}");
                handshake_failed(crate::tls::failure_reason(&e));
                return;
            }
            Err(_) => return self.gate.handshake_timed_out(from),
        };
        let ip = from.ip();
        // A client certificate got through the handshake only if it verified.
        let cert_user = (tls.get_ref().1.peer_certificates())
            .and_then(|chain| chain.first())
            .and_then(|leaf| client_cert::user_of(leaf))
            .map(|u| ClientCertUser(u.into()));
        let this = self.clone();
        let handle = move |mut req: Request<H2Body>| {
            let this = this.clone();
            if let Some(u) = &cert_user {
                req.extensions_mut().insert(u.clone());
            }
            async move { this.handle(req, ip).await }
        };
        let watched = Watched {
            gate: &self.gate,
            remote: from,
        };
        if tls.get_ref().1.alpn_protocol() == Some(crate::tls::ALPN_H2) {
            Box::pin(proxy::serve_h2(tls, handle, stop, Some(watched))).await;
        } else {
            Box::pin(http1::serve_http1(tls, handle, stop, watched)).await;
        }
    }

    /// One request from a client (see the module docs for the steps).
    async fn handle(&self, mut req: Request<H2Body>, ip: IpAddr) -> Response<ProxyBody> {
        let grpc = proxy::is_grpc(&req);
        let protocol = if grpc { Protocol::Grpc } else { Protocol::Http };
        let user_agent = req
            .headers()
            .get(http::header::USER_AGENT)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut call = Box::new(GatewayCall {
            service: telemetry::OTHER,
            user_id: None,
            ip: ip.to_string(),
            user_agent,
            protocol: if grpc { "grpc" } else { "http" },
            client_status: None,
            refused: None,
            body_cut: None,
        });
        let path = req.uri().path().to_string();
        // A JSON client's call of an exposed method, by its gRPC path or a REST path of
        // its `google.api.http` rule, is routed by the gRPC path.
        let found = match (&self.transcoder, grpc) {
            (Some(t), false) => t.lookup(req.method(), &path).map(|c| (t, c)),
            _ => None,
        };
        let grpc_path = match &found {
            Some((_, Ok(call))) => call.grpc_path(),
            _ => path.clone(),
        };
        if found.is_some() {
            call.protocol = "json";
            call.client_status = Some(transcode::client_status);
        }
        let Some(route) = route(&self.routes, |r| r.prefix.as_str(), &grpc_path) else {
            call.refused = Some("no_route");
            let err = ProxyError::NoRoute(format!("no gateway route for {path}"));
            return self.refuse(&mut req, protocol, call, err).await;
        };
        call.service = route.name.clone();
        let cert_user = req
            .extensions()
            .get::<ClientCertUser>()
            .map(|u| u.0.clone());
        let creds = &self.creds.load();
        let user = match authenticate(route.auth, creds, req.headers(), cert_user.as_deref()) {
            Ok(user) => user,
            Err(e) => {
                call.refused = Some("unauthenticated");
                return self
                    .refuse(
                        &mut req,
                        protocol,
                        call,
                        ProxyError::Unauthenticated(e.to_string()),
                    )
                    .await;
            }
        };
        call.user_id = user.clone();
        if let Some(limiter) = &route.limiter {
            let key = user.unwrap_or_else(|| format!("ip:{ip}"));
            if let Err(not_until) = limiter.check_key(&key) {
                use governor::clock::Clock;
                call.refused = Some("rate_limited");
                metrics::counter!("gateway_rate_limit_hits_total", "service" => route.name.clone())
                    .increment(1);
                let wait = not_until.wait_time_from(limiter.clock().now());
                // Whole seconds, rounded up: a client that waits that long gets a token.
                let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
                let err = ProxyError::RateLimited(format!(
                    "rate limit of route {} reached; retry in {}ms",
                    route.name,
                    wait.as_millis()
                ));
                let mut resp = self.refuse(&mut req, protocol, call, err).await;
                resp.headers_mut()
                    .insert(http::header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
                return resp;
            }
        }
        // The body limit: a declared larger body is refused here, one that grows past it
        // is cut off on its way up (the upstream sees CANCEL, the client 413 / 8).
        let max = self.config.max_request_body;
        let declared = (req.headers().get(http::header::CONTENT_LENGTH))
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if let Some(n) = declared.filter(|n| *n > max) {
            call.refused = Some("too_large");
            let err = ProxyError::TooLarge(self.too_large(Some(n), max));
            return self.refuse(&mut req, protocol, call, err).await;
        }
        let cut = Arc::new(AtomicBool::new(false));
        req.body_mut().cap(max, cut.clone());
        call.body_cut = Some(cut.clone());
        // A JSON client's call of an exposed service: checked and made a gRPC call here,
        // its answer made JSON; a refusal never reaches the app.
        let json_call = match found {
            None => None,
            Some((t, found)) => {
                let http_method = telemetry::method_name(req.method());
                match t.to_grpc(found, req).await {
                    Ok((grpc_req, call)) => {
                        req = grpc_req;
                        Some((t, call))
                    }
                    Err(e) => {
                        tracing::debug!("gateway refused {path} from {}: {e}", call.ip);
                        call.refused = Some("bad_request");
                        let mut record = self.refusal_record(http_method, None, call);
                        let (status, code, message) = if cut.load(Ordering::Acquire) {
                            (StatusCode::PAYLOAD_TOO_LARGE, 8, self.too_large(None, max))
                        } else {
                            let (status, code) = e.status();
                            (status, code, e.to_string())
                        };
                        record.http_status = status.as_u16();
                        record.finish();
                        return transcode::error_response(status, code, &message);
                    }
                }
            }
        };
        let headers = req.headers_mut();
        for name in ["authorization", "x-api-key", "x-user-id", "x-forwarded-for"] {
            headers.remove(name);
        }
        if let Some(v) = call
            .user_id
            .as_deref()
            .and_then(|u| HeaderValue::from_str(u).ok())
        {
            headers.insert("x-user-id", v);
        }
        if let Ok(v) = HeaderValue::from_str(&call.ip) {
            headers.insert("x-forwarded-for", v);
        }
        req.extensions_mut().insert(route.timeouts);
        let resp = outbound::forward_as(&route.upstream, req, Some(call)).await;
        if cut.load(Ordering::Acquire) {
            tracing::debug!("gateway cut off a request body to {path} from {ip} at {max} bytes");
            return ProxyError::TooLarge(self.too_large(None, max)).response(protocol);
        }
        match json_call {
            Some((t, call)) => t.to_json(&call, resp).await,
            None => resp,
        }
    }

    /// Answers a request the gateway refused itself, counted and logged as denied. An
    /// HTTP client's body is read first (up to a cap), so it gets the answer and not a
    /// reset stream.
    async fn refuse(
        &self,
        req: &mut Request<H2Body>,
        protocol: Protocol,
        call: Box<GatewayCall>,
        err: ProxyError,
    ) -> Response<ProxyBody> {
        if protocol == Protocol::Http {
            transcode::drain(req.body_mut()).await;
        }
        let grpc_method = proxy::grpc_path(req.uri().path())
            .filter(|_| protocol == Protocol::Grpc)
            .map(|(s, m)| format!("{s}/{m}"));
        tracing::debug!(
            "gateway refused {} from {}: {err}",
            req.uri().path(),
            call.ip
        );
        let unauthenticated = matches!(err, ProxyError::Unauthenticated(_));
        // A JSON client of a transcoded service reads its refusal as JSON too.
        let json_client = protocol == Protocol::Http
            && (self.transcoder.as_ref()).is_some_and(|t| {
                transcode::wants_json(req.headers())
                    || t.lookup(req.method(), req.uri().path()).is_some()
            });
        let json_error = json_client.then(|| (err.codes().0, err.to_string()));
        let record = self.refusal_record(telemetry::method_name(req.method()), grpc_method, call);
        let mut resp = proxy::respond_locally(record, protocol, err);
        if let Some((code, message)) = json_error {
            transcode::error_as_json(&mut resp, code, &message);
        }
        if unauthenticated && protocol == Protocol::Http {
            resp.headers_mut().insert(
                http::header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"meshd\""),
            );
        }
        resp
    }

    /// The message of a 413 / RESOURCE_EXHAUSTED for a body over `max` (`declared`: what
    /// its content-length said). The first one is logged.
    fn too_large(&self, declared: Option<u64>, max: u64) -> String {
        if !self.too_large_logged.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                max_request_body = max,
                "a request body over gateway.max_request_body was refused (413 / RESOURCE_EXHAUSTED); further ones are only counted in gateway_requests_failed_total{{reason=\"too_large\"}}"
            );
        }
        match declared {
            Some(n) => format!(
                "request body of {n} bytes is over the gateway's max_request_body of {max} bytes"
            ),
            None => format!("request body is over the gateway's max_request_body of {max} bytes"),
        }
    }

    /// The record of a request the gateway refused itself (counted and logged as denied).
    fn refusal_record(
        &self,
        http_method: SharedString,
        grpc_method: Option<String>,
        call: Box<GatewayCall>,
    ) -> RequestRecord {
        let mut record = RequestRecord::new(
            "gateway",
            telemetry::OTHER,
            SharedString::const_str(""),
            telemetry::OTHER,
            grpc_method,
            http_method,
            SharedString::const_str(""),
            Some(self.log.clone()),
        );
        record.denied = true;
        record.gateway = Some(call);
        record
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins() {
        let routes = [
            "/",
            "/payment.v1.PaymentService/",
            "/payment.v1.PaymentService/GetPayment",
        ];
        let table = [
            ("/payment.v1.PaymentService/GetPayment", Some(2)),
            ("/payment.v1.PaymentService/CreatePayment", Some(1)),
            ("/healthz", Some(0)),
        ];
        for (path, want) in table {
            let got =
                route(&routes, |r| r, path).map(|r| routes.iter().position(|x| x == r).unwrap());
            assert_eq!(got, want, "{path}");
        }
        let only = ["/payment.v1.PaymentService/"];
        assert_eq!(
            route(&only, |r| r, "/contact.v1.ContactService/GetContact"),
            None
        );
        assert_eq!(route(&only, |r| r, "/payment.v1.PaymentServiceX/Get"), None);
    }
}
