//! One request (or TCP connection) from the app to an upstream, with its attempts: free
//! functions over an [`Outbound`], whose own methods all live in `outbound/mod.rs`.
//!
//! Flow: admit the request (circuit breaker) -> compute its deadline (the upstream's
//! `timeout`, or the app's shorter `grpc-timeout`) -> attempt: pick an endpoint, wait for
//! its connection (counted against `limits.max_pending`), send with the time left (the
//! `grpc-timeout` sent upstream shrinks accordingly) -> classify the outcome, report it
//! to the endpoint's statistics and outlier detection -> when the outcome is safe to
//! retry, attempts remain, the body can be replayed and the budget allows, wait a
//! jittered back-off and attempt again on another endpoint; otherwise answer the app.
//! A request may carry [`CallTimeouts`] (the edge gateway's route sets them): its request
//! timeout then replaces the upstream's `timeout`, and its connect timeout bounds each
//! attempt's wait for a connection (a pooled connection is shared, so this bounds the
//! wait, not the dial of others). An upstream with `jwt_svid` puts its JWT-SVID in
//! `authorization` before the first attempt (within the deadline), or answers UNAVAILABLE
//! / 503 naming why there is none. A TCP connection ([`forward_tcp`]) is one mTLS connect, tried again on another
//! endpoint when it fails and retries are on, then a byte pipe.

use crate::config::Protocol;
use crate::outbound::balancer::InFlight;
use crate::outbound::resilience::{self, Admission, LimitHit, Outcome};
use crate::outbound::{Endpoint, Outbound};
use crate::proxy::H2Body;
use crate::proxy::SendError;
use crate::proxy::{self, ProxyBody, ProxyError, XFCC};
use crate::proxy::{ReplayBody, Replayable};
use crate::telemetry::{self, RequestRecord};
use http::{Request, Response};
use http_body_util::Either;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Timeouts a caller sets on one request (a request extension): the edge gateway's
/// route `connect_timeout` and `request_timeout`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallTimeouts {
    /// The longest wait for a connection to the endpoint, per attempt.
    pub connect: Duration,
    /// The longest wait for the answer's headers, all attempts included, instead of
    /// the upstream's `timeout`.
    pub request: Duration,
}

/// Why an attempt produced no response headers.
#[derive(Debug)]
enum AttemptError {
    /// Connect, TLS, HTTP/2 or stream failure before headers.
    Send(SendError),
    /// The deadline passed first.
    Timeout,
    /// Too many requests already wait for a connection.
    Limit(LimitHit),
    /// meshd has no valid SVID: it fails closed and calls no one.
    NoIdentity,
}

impl AttemptError {
    /// The outcome of an attempt that ended without response headers, for retries.
    fn outcome(&self) -> Outcome {
        match self {
            AttemptError::Send(SendError::NotProcessed(_)) => Outcome::NotProcessed,
            AttemptError::Timeout => Outcome::TimedOut,
            // A limit hit or a missing SVID sent nothing either, but another attempt would
            // most likely meet the same: only the requests safe to repeat anyway try again.
            AttemptError::Send(SendError::Failed(_))
            | AttemptError::Limit(_)
            | AttemptError::NoIdentity => Outcome::NoResponse,
        }
    }
}

/// What an attempt's response headers say about the attempt.
fn classify(resp: &Response<H2Body>, grpc: bool) -> Outcome {
    let status = resp.status();
    if grpc && status == http::StatusCode::OK {
        // A trailers-only answer carries grpc-status in the headers.
        return match resp.headers().get("grpc-status").map(|v| v.as_bytes()) {
            Some(b"14") => Outcome::GrpcUnavailable,
            _ => Outcome::Answered,
        };
    }
    if status.is_server_error() {
        Outcome::ServerError
    } else {
        Outcome::Answered
    }
}

/// The request line and headers, kept to build each attempt.
struct Head {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    headers: http::HeaderMap,
}

impl Head {
    fn request(&self, body: ReplayBody) -> Request<ReplayBody> {
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = self.uri.clone();
        *req.version_mut() = self.version;
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Proxies one request from the app to the upstream.
pub async fn forward(ob: &Outbound, req: Request<H2Body>) -> Response<ProxyBody> {
    forward_as(ob, req, None).await
}

/// Proxies one request to the upstream, for the app or (with `gateway`) for a caller
/// of the edge gateway, whose record then also feeds the `gateway_*` metrics.
pub async fn forward_as(
    ob: &Outbound,
    mut req: Request<H2Body>,
    gateway: Option<Box<telemetry::GatewayCall>>,
) -> Response<ProxyBody> {
    let grpc = proxy::is_grpc(&req);
    let (method_label, grpc_method) = match proxy::grpc_path(req.uri().path()) {
        Some((svc, m)) if grpc => (ob.labels.method_label(svc, m), Some(format!("{svc}/{m}"))),
        _ => (telemetry::OTHER, None),
    };
    let mut record = RequestRecord::new(
        if gateway.is_some() {
            "gateway"
        } else {
            "outbound"
        },
        ob.labels.peer(&ob.server_id_text),
        ob.server_id_text.clone(),
        method_label,
        grpc_method,
        telemetry::method_name(req.method()),
        metrics::SharedString::const_str(""),
        Some(ob.log.clone()),
    );
    record.gateway = gateway;
    let protocol = if grpc { Protocol::Grpc } else { Protocol::Http };
    let admission = match ob.breaker.admit() {
        Ok(a) => a,
        Err(hit) => {
            let msg = format!("upstream {}: circuit open: {hit}", ob.name);
            return fail(ob, record, protocol, ProxyError::Unavailable(msg));
        }
    };
    let started = Instant::now();
    let timeouts = req.extensions_mut().remove::<CallTimeouts>();
    let configured = timeouts.map_or(ob.config.timeout, |t| t.request);
    let connect = timeouts.map(|t| t.connect);
    let deadline = proxy::request_deadline(configured, req.headers());
    req.headers_mut().remove(XFCC);
    if let Some(jwt) = &ob.jwt {
        // The JWT-SVID replaces any authorization the app sent; no token, no request.
        let within = deadline.saturating_sub(started.elapsed());
        match jwt.authorization(within).await {
            Ok(value) => {
                req.headers_mut().insert(http::header::AUTHORIZATION, value);
            }
            Err(e) => {
                let err = ProxyError::Unavailable(format!("upstream {}: {e}", ob.name));
                return fail(ob, record, protocol, err);
            }
        }
    }
    if ob.config.retries.attempts == 0 {
        // No retries: the request goes out as it came, with no copies.
        let (ep, result) = match ob.pick(&[]) {
            Some(ep) => {
                let req = req.map(ReplayBody::direct);
                let result = attempt(ob, &ep, req, started + deadline, connect).await;
                (ep, result)
            }
            None => {
                let err = ProxyError::Unavailable(ob.no_endpoints());
                return fail(ob, record, protocol, err);
            }
        };
        return answer(ob, record, protocol, admission, ep, result, grpc, deadline);
    }
    // Boxed: the retry loop's state stays out of the per-stream task of calls
    // without retries.
    Box::pin(with_retries(
        ob, req, record, protocol, admission, started, deadline, connect,
    ))
    .await
}

/// The attempts of one request with retries on (see the module docs).
#[allow(clippy::too_many_arguments)]
async fn with_retries(
    ob: &Outbound,
    req: Request<H2Body>,
    record: RequestRecord,
    protocol: Protocol,
    admission: Admission,
    started: Instant,
    deadline: Duration,
    connect: Option<Duration>,
) -> Response<ProxyBody> {
    let grpc = protocol == Protocol::Grpc;
    ob.budget.deposit(started);
    let (parts, body) = req.into_parts();
    let head = Head {
        method: parts.method,
        uri: parts.uri,
        version: parts.version,
        headers: parts.headers,
    };
    let replay = Replayable::new(body);
    let mut tried: Vec<SocketAddr> = Vec::new();
    loop {
        let body = replay.attempt();
        let Some(body) = body else {
            // Cannot happen: a retry is only decided when the body can be replayed.
            let err = ProxyError::Unavailable(format!("upstream {}: retry impossible", ob.name));
            return fail(ob, record, protocol, err);
        };
        let Some(ep) = ob.pick(&tried) else {
            let err = ProxyError::Unavailable(ob.no_endpoints());
            return fail(ob, record, protocol, err);
        };
        let result = attempt(ob, &ep, head.request(body), started + deadline, connect).await;
        let outcome = match &result {
            Ok(resp) => classify(resp, grpc),
            Err(e) => e.outcome(),
        };
        let n = tried.len() as u32 + 1;
        let pause = resilience::backoff(
            n,
            ob.config.retries.backoff,
            ob.config.retries.max_backoff,
            rand::random(),
        );
        let retry = n <= ob.config.retries.attempts
            && resilience::retry_allowed(outcome, grpc, &head.method)
            && replay.attempt_possible()
            && Instant::now() + pause < started + deadline
            && ob.budget.try_withdraw(Instant::now());
        if !retry {
            return answer(ob, record, protocol, admission, ep, result, grpc, deadline);
        }
        tried.push(ep.endpoint.meta.addr);
        tracing::debug!(upstream = %ob.name, endpoint = %ep.endpoint.meta.addr, "retrying after {outcome:?}");
        ob.observe(ep, outcome);
        ob.retries_total.increment(1);
        tokio::time::sleep(pause).await;
    }
}

/// One attempt on `ep`, bounded by `deadline_at`; its wait for a connection by `connect`.
async fn attempt(
    ob: &Outbound,
    ep: &InFlight<Endpoint>,
    mut req: Request<ReplayBody>,
    deadline_at: Instant,
    connect: Option<Duration>,
) -> Result<Response<H2Body>, AttemptError> {
    if ep.endpoint.tls.config.load().is_none() {
        return Err(AttemptError::NoIdentity);
    }
    let pool = &ep.endpoint.pool;
    let remaining = deadline_at.saturating_duration_since(Instant::now());
    if req.headers().contains_key("grpc-timeout") {
        req.headers_mut()
            .insert("grpc-timeout", proxy::encode_grpc_timeout(remaining));
    }
    let send = async {
        let sender = match pool.ready_sender() {
            Some(sender) => sender,
            None => {
                let _waiting = ob
                    .breaker
                    .wait_for_connection()
                    .map_err(AttemptError::Limit)?;
                let dial = pool.sender();
                match connect {
                    Some(limit) => match tokio::time::timeout(limit, dial).await {
                        Ok(r) => r,
                        Err(_) => {
                            return Err(AttemptError::Send(SendError::NotProcessed(format!(
                                "no connection within {} ms (connect_timeout)",
                                limit.as_millis()
                            ))))
                        }
                    },
                    None => dial.await,
                }
                .map_err(|e| AttemptError::Send(e.into()))?
            }
        };
        pool.send_via(sender, req).await.map_err(AttemptError::Send)
    };
    match tokio::time::timeout(remaining, send).await {
        // A trailers-only gRPC answer that came after the deadline (the upstream's
        // own timer, started later, fired first): the deadline was exceeded, and
        // the app hears so from meshd, as its own client would report it.
        Ok(Ok(resp))
            if Instant::now() >= deadline_at && resp.headers().contains_key("grpc-status") =>
        {
            Err(AttemptError::Timeout)
        }
        Ok(r) => r,
        Err(_) => Err(AttemptError::Timeout),
    }
}

/// Answers the app with the last attempt's result.
#[allow(clippy::too_many_arguments)]
fn answer(
    ob: &Outbound,
    mut record: RequestRecord,
    protocol: Protocol,
    admission: Admission,
    ep: InFlight<Endpoint>,
    result: Result<Response<H2Body>, AttemptError>,
    grpc: bool,
    deadline: Duration,
) -> Response<ProxyBody> {
    let addr = ep.endpoint.meta.addr;
    record.upstream = ep.endpoint.addr_text.clone();
    let outcome = match &result {
        Ok(resp) => classify(resp, grpc),
        // meshd answered these itself; the endpoint did nothing wrong.
        Err(AttemptError::Limit(_) | AttemptError::NoIdentity) => Outcome::Answered,
        Err(e) => e.outcome(),
    };
    ob.observe(ep, outcome);
    let err = match result {
        Ok(resp) => {
            return proxy::respond_upstream(record, resp).map(|b| match b {
                Either::Left(m) => Either::Left(m.holding(Box::new(admission))),
                local => local,
            })
        }
        Err(AttemptError::NoIdentity) => ProxyError::NoIdentity(format!(
            "meshd has no valid SVID; not calling upstream {}",
            ob.name
        )),
        Err(AttemptError::Send(e)) => {
            ProxyError::Unavailable(format!("upstream {} unavailable ({addr}): {e}", ob.name))
        }
        Err(AttemptError::Limit(hit)) => {
            ProxyError::Unavailable(format!("upstream {}: circuit open: {hit}", ob.name))
        }
        Err(AttemptError::Timeout) => ProxyError::DeadlineExceeded(format!(
            "upstream {} did not answer within {} ms",
            ob.name,
            deadline.as_millis()
        )),
    };
    fail(ob, record, protocol, err)
}

/// Answers the app locally with `err` (logged at debug, naming the upstream).
fn fail(
    ob: &Outbound,
    record: RequestRecord,
    protocol: Protocol,
    err: ProxyError,
) -> Response<ProxyBody> {
    tracing::debug!("outbound {}: {err}", ob.name);
    proxy::respond_locally(record, protocol, err)
}

/// Connects the app's TCP connection to an endpoint; a failed connect is retried on
/// another endpoint (nothing was sent yet) when retries are on.
pub async fn forward_tcp(ob: &Outbound, mut app: tokio::net::TcpStream) {
    let mut tried = Vec::new();
    let now = Instant::now();
    ob.budget.deposit(now);
    loop {
        let Some(ep) = ob.pick(&tried) else {
            tracing::warn!("outbound {}", ob.no_endpoints());
            return;
        };
        let addr = ep.endpoint.meta.addr;
        match proxy::tls_connect(addr, &ep.endpoint.tls).await {
            Ok(mut up) => {
                ep.record(true);
                proxy::pipe(&mut app, &mut up, "outbound").await;
                return;
            }
            Err(e) => {
                ob.observe(ep, Outcome::NotProcessed);
                tracing::warn!("outbound {}: {e}", ob.name);
                tried.push(addr);
                if tried.len() > ob.config.retries.attempts as usize
                    || !ob.budget.try_withdraw(Instant::now())
                {
                    return;
                }
                ob.retries_total.increment(1);
            }
        }
    }
}
