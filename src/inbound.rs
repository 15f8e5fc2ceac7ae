//! Inbound: the mTLS listener in front of the app. Only mutual TLS with a valid
//! X.509-SVID gets in; every request (or TCP connection) is authorized by the caller's
//! SPIFFE ID; the app gets the caller in `x-forwarded-client-cert` over one pooled h2c
//! connection (or a byte stream for `tcp`).
//!
//! Flow: accept -> TLS handshake with the current server config (none = no identity =
//! refuse) -> peer SPIFFE ID from the verified leaf -> per request: the JWT-SVID check
//! when `inbound.jwt_svid` is set (`jwt`: a bad or missing token is UNAUTHENTICATED / 401)
//! -> authorize the peer (and the token's subject) -> strip and set XFCC -> forward to
//! the app -> stream the response back, metered.

mod jwt;
pub use jwt::JwtCheck;

use crate::config::ConnectionLimits;
use crate::config::Protocol;
use crate::identity::SpiffeId;
use crate::policy::PolicyStore;
use crate::policy::{Caller, Request as AuthzRequest, Target};
use crate::proxy::H2Body;
use crate::proxy::H2Pool;
use crate::proxy::{self, ConnectionGate, Drain, JwtRefusal, ProxyBody, ProxyError, Watched};
use crate::telemetry::{self, AccessLogger, Labels, RequestRecord};
use crate::tls::HandshakeIo;
use crate::tls::{self, TlsStore};
use http::{HeaderValue, Request, Response};
use metrics::SharedString;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;

/// An accepted inbound connection after its TLS handshake.
type InboundTls = tokio_rustls::server::TlsStream<HandshakeIo<TcpStream>>;

/// The inbound listener's shared state.
pub struct Inbound {
    pub protocol: Protocol,
    /// The app's own address (loopback).
    pub forward: SocketAddr,
    /// The listener's port, for policy `ports`.
    pub port: u16,
    /// Our identity, for XFCC `By=` (read once per connection).
    pub identity: tokio::sync::watch::Receiver<crate::identity::IdentityStatus>,
    pub tls: Arc<TlsStore>,
    pub policy: Arc<PolicyStore>,
    /// The single pooled h2c connection to the app.
    pub app: H2Pool,
    pub labels: Arc<Labels>,
    pub log: Arc<AccessLogger>,
    /// `inbound.connections`: the timeouts and the cap a misbehaving peer meets.
    pub limits: ConnectionLimits,
    /// Counts the listener's connections and the limits they hit.
    pub gate: Arc<ConnectionGate>,
    /// `inbound.jwt_svid`: the bearer JWT-SVID every request must (or may) carry.
    pub jwt: Option<JwtCheck>,
}

/// Per-connection facts handed to each request.
#[derive(Debug)]
struct Peer {
    id: SpiffeId,
    /// The peer's SPIFFE ID as text, shared by its requests' records.
    id_text: SharedString,
    /// Where requests go (`forward`), as text for the access log; made once.
    upstream: SharedString,
    /// Built once per connection: `By=<own>;URI=<peer>`.
    xfcc: Option<HeaderValue>,
}

impl Inbound {
    /// Accepts connections until drained. A connection is admitted by the gate (or closed
    /// at once over `connections.max`) and waits in the listener's lobby for its first
    /// byte (no task, no TLS state); only then does its task start. Without an identity
    /// nothing can be handshaken: connections are refused at once instead.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        let timeout = self.limits.handshake_timeout;
        let serving = || self.tls.inbound().is_some();
        let connection =
            |tcp, remote, stop, deadline| self.clone().connection(tcp, remote, stop, deadline);
        let gate = self.gate.clone();
        proxy::accept_ready(
            &listener, &drain, &gate, timeout, "inbound", serving, connection,
        )
        .await;
    }

    async fn connection(
        self: Arc<Self>,
        tcp: TcpStream,
        remote: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
        deadline: Instant,
    ) {
        let Some(config) = self.tls.inbound() else {
            return no_identity(remote);
        };
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        // Each phase of a connection (TLS handshake, HTTP/2 or TCP) is boxed: an async
        // fn's state keeps room for every phase it awaits inline, which made each held
        // connection's task 21.9 KB; boxed, and with no moved value kept (below), this
        // future is 296 bytes plus the phase it is in (optimisation log, 2026-12-07).
        let handshake = Box::pin(acceptor.accept(HandshakeIo::new(tcp)));
        // In a block: the stream moves into the boxed phase that serves it, and an async
        // fn keeps a moved-from local's room (1.2 KB for a TLS stream) until its scope
        // ends, so `serving.await` below would have kept it for the connection's life.
        let serving = {
            let stream = match tokio::time::timeout_at(deadline, handshake).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => {
                    let reason = tls::failure_reason(&e);
                    metrics::counter!("meshd_tls_handshake_failures_total", "direction" => "inbound", "reason" => reason).increment(1);
                    if reason == "io" || reason == "truncated" {
                        // The peer went away (reset, EOF): counted, but not worth a line
                        // each (a port scan or a flood would fill the log).
                        tracing::debug!(%remote, reason, "inbound TLS handshake failed: {e}");
                    } else {
                        tracing::info!(%remote, reason, "inbound TLS handshake failed: {e}");
                    }
                    return;
                }
                Err(_) => return self.gate.handshake_timed_out(remote),
            };
            self.serving(stream, remote, stop)
        };
        if let Some(serving) = serving {
            serving.await;
        }
    }

    /// What follows a completed TLS handshake: the checks of the client (its SPIFFE ID,
    /// ALPN h2 when it speaks HTTP), then the boxed phase that serves it (HTTP/2 or TCP),
    /// or `None` when the connection ends here.
    fn serving(
        self: &Arc<Self>,
        mut stream: InboundTls,
        remote: SocketAddr,
        stop: tokio_util::sync::CancellationToken,
    ) -> Option<Pin<Box<dyn Future<Output = ()> + Send + '_>>> {
        let (io, _) = stream.get_mut();
        io.handshake_over();
        if io.peer_gone() {
            // A client that finished its handshake and closed before reading the
            // session tickets (a TLS probe): done, and not a failure.
            tracing::debug!(%remote, "client closed right after its TLS handshake");
            return None;
        }
        let (_, conn) = stream.get_ref();
        let Some(id) = tls::peer_id(conn.peer_certificates()) else {
            tracing::warn!(%remote, "peer certificate has no SPIFFE ID");
            return None;
        };
        if self.protocol.is_http() && conn.alpn_protocol() != Some(tls::ALPN_H2) {
            metrics::counter!("meshd_tls_handshake_failures_total", "direction" => "inbound", "reason" => "no_alpn").increment(1);
            tracing::info!(%remote, peer = %id, "closed: client did not negotiate ALPN h2");
            return None;
        }
        let id_text = SharedString::from(Arc::<str>::from(id.to_string()));
        let own_id = self
            .identity
            .borrow()
            .snapshot()
            .map(|s| s.svid.id.to_string())
            .unwrap_or_default();
        let peer = Arc::new(Peer {
            xfcc: proxy::xfcc_value(&own_id, &id_text),
            id,
            id_text,
            upstream: SharedString::from(Arc::<str>::from(self.forward.to_string())),
        });
        if self.protocol == Protocol::Tcp {
            return Some(Box::pin(self.tcp(stream, peer)));
        }
        let this = self.clone();
        let handle = move |req| {
            let this = this.clone();
            let peer = peer.clone();
            async move { this.handle(req, &peer).await }
        };
        let watched = Watched {
            gate: &self.gate,
            remote,
        };
        Some(Box::pin(proxy::serve_h2(
            stream,
            handle,
            stop,
            Some(watched),
        )))
    }

    async fn tcp(&self, mut stream: InboundTls, peer: Arc<Peer>) {
        let target = Target {
            port: self.port,
            request: AuthzRequest::Tcp,
        };
        let (decision, policy) = self.policy.decide(&peer.id, &target);
        let mut record = RequestRecord::new(
            "inbound",
            self.labels.peer(&peer.id_text),
            peer.id_text.clone(),
            telemetry::OTHER,
            None,
            SharedString::const_str("TCP"),
            peer.upstream.clone(),
            Some(self.log.clone()),
        );
        if !decision.allowed || decision.would_deny {
            log_denial(&peer.id_text, None, "tcp", &decision, &policy);
        }
        if !decision.allowed {
            record.denied = true;
            record.rule = Some(decision.rule_name(&policy).to_string());
            record.http_status = 403;
            return;
        }
        match proxy::tcp_connect(self.forward).await {
            Ok(mut app) => {
                let (rx, tx) = proxy::pipe(&mut stream, &mut app, "inbound").await;
                record.bytes = rx + tx;
                record.http_status = 200;
            }
            Err(e) => {
                record.http_status = 503;
                tracing::warn!("app at {} unavailable: {e}", self.forward)
            }
        }
    }

    async fn handle(&self, mut req: Request<H2Body>, peer: &Peer) -> Response<ProxyBody> {
        let grpc = self.protocol == Protocol::Grpc || proxy::is_grpc(&req);
        // Held aside while the request is checked (`path` borrows the request).
        let mut headers = std::mem::take(req.headers_mut());
        let path = req.uri().path();
        let grpc_parts = if grpc { proxy::grpc_path(path) } else { None };
        let (method_label, grpc_method) = match grpc_parts {
            Some((svc, m)) => (self.labels.method_label(svc, m), Some(format!("{svc}/{m}"))),
            None => (telemetry::OTHER, None),
        };
        let mut record = RequestRecord::new(
            "inbound",
            self.labels.peer(&peer.id_text),
            peer.id_text.clone(),
            method_label,
            grpc_method,
            telemetry::method_name(req.method()),
            peer.upstream.clone(),
            Some(self.log.clone()),
        );
        let request = match grpc_parts {
            Some((service, method)) => AuthzRequest::Grpc { service, method },
            None => AuthzRequest::Http {
                method: req.method().as_str(),
                path,
            },
        };
        let target = Target {
            port: self.port,
            request,
        };
        let protocol = if grpc { Protocol::Grpc } else { Protocol::Http };
        let subject = match self.jwt.as_ref().map(|j| j.check(&mut headers)) {
            None | Some(Ok(None)) => None,
            Some(Ok(Some(subject))) => Some(subject),
            Some(Err(refusal)) => return unauthenticated(record, protocol, &peer.id_text, refusal),
        };
        let caller = Caller {
            peer: &peer.id,
            jwt: subject.as_ref(),
        };
        let (decision, policy) = self.policy.decide_caller(&caller, &target);
        if !decision.allowed || decision.would_deny {
            log_denial(&peer.id_text, subject.as_ref(), path, &decision, &policy);
        }
        if !decision.allowed {
            record.denied = true;
            record.rule = Some(decision.rule_name(&policy).to_string());
            return proxy::respond_locally(
                record,
                protocol,
                ProxyError::Denied(decision.message(&policy)),
            );
        }
        *req.headers_mut() = headers;
        proxy::set_xfcc(req.headers_mut(), peer.xfcc.as_ref());
        match self.app.send(req).await {
            Ok(resp) => proxy::respond_upstream(record, resp),
            Err(e) => proxy::respond_locally(
                record,
                protocol,
                ProxyError::Unavailable(format!("app at {} unavailable: {e}", self.forward)),
            ),
        }
    }
}

/// A connection refused because meshd has no valid SVID to answer with.
fn no_identity(remote: SocketAddr) {
    metrics::counter!("meshd_tls_handshake_failures_total", "direction" => "inbound", "reason" => "no_identity").increment(1);
    tracing::warn!(%remote, "refused connection: meshd has no valid SVID");
}

/// The answer to a request whose JWT-SVID was refused: UNAUTHENTICATED (16) with the
/// reason in grpc-message, or 401 with the reason and `www-authenticate`.
fn unauthenticated(
    mut record: RequestRecord,
    protocol: Protocol,
    peer: &str,
    refusal: JwtRefusal,
) -> Response<ProxyBody> {
    tracing::info!(target: "meshd::authn", peer_id = peer, result = refusal.label(), "{refusal}");
    record.denied = true;
    record.rule = Some(format!("jwt_svid:{}", refusal.label()));
    let mut response = proxy::respond_locally(
        record,
        protocol,
        ProxyError::Unauthenticated(refusal.to_string()),
    );
    if protocol == Protocol::Http {
        response.headers_mut().insert(
            http::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer error=\"invalid_token\""),
        );
    }
    response
}

fn log_denial(
    peer: &str,
    token_subject: Option<&SpiffeId>,
    target: &str,
    decision: &crate::policy::Decision,
    policy: &crate::policy::Policy,
) {
    let line = serde_json::json!({
        "event": if decision.allowed { "would_deny" } else { "deny" },
        "peer_id": peer,
        "jwt_subject": token_subject.map(ToString::to_string),
        "target": target,
        "rule": decision.rule_name(policy),
        "mode": decision.mode.as_str(),
        "message": decision.message(policy),
    });
    tracing::info!(target: "meshd::authz", "{line}");
}
