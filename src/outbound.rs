//! Outbound: one plaintext listener per upstream the app calls. Requests (h2c/gRPC) or
//! TCP connections from the app leave as mutual TLS with the current SVID, to an endpoint
//! whose SVID must carry the upstream's `server_id`.
//!
//! Flow: accept from the app -> pick an endpoint -> pooled mTLS HTTP/2 connection (or a
//! new mTLS stream for tcp) -> response streamed back, metered. Failures become gRPC
//! UNAVAILABLE / DEADLINE_EXCEEDED (HTTP 503 / 504) naming the upstream.

use crate::config::Protocol;
use crate::metered_body::MeteredBody;
use crate::proxy::{self, Connector, Drain, H2Pool, ProxyBody, ProxyError, XFCC};
use crate::telemetry::{AccessLogger, Labels, RequestRecord};
use crate::tls::UpstreamTls;
use http::{Request, Response};
use http_body_util::Either;
use hyper::body::Incoming;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

/// One endpoint of an upstream, with its pooled connection.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// HTTP/2 connection(s) to this endpoint, shared by all requests.
    pub pool: H2Pool,
}

/// One upstream service and its listener's behaviour.
#[derive(Debug)]
pub struct Outbound {
    /// The upstream's name, used in errors and metrics.
    pub name: String,
    pub protocol: Protocol,
    /// The per-request deadline (the app's `grpc-timeout` wins when shorter).
    pub timeout: Duration,
    /// The client TLS config slot, swapped at rotation.
    pub tls: Arc<UpstreamTls>,
    /// Where the upstream runs (static for now).
    pub endpoints: Vec<Endpoint>,
    /// Round-robin cursor.
    next: AtomicUsize,
    pub labels: Arc<Labels>,
    pub log: Arc<AccessLogger>,
}

impl Outbound {
    pub fn new(
        name: String,
        protocol: Protocol,
        timeout: Duration,
        tls: Arc<UpstreamTls>,
        addrs: Vec<SocketAddr>,
        labels: Arc<Labels>,
        log: Arc<AccessLogger>,
    ) -> Outbound {
        let endpoints = addrs
            .into_iter()
            .map(|addr| Endpoint {
                addr,
                pool: H2Pool::new(Connector::Tls {
                    addr,
                    tls: tls.clone(),
                }),
            })
            .collect();
        Outbound {
            name,
            protocol,
            timeout,
            tls,
            endpoints,
            next: AtomicUsize::new(0),
            labels,
            log,
        }
    }

    fn pick(&self) -> Option<&Endpoint> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    /// Accepts connections from the app until drained.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        loop {
            let (tcp, _) = tokio::select! {
                _ = drain.stop.cancelled() => return,
                r = listener.accept() => match r {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("outbound {} accept: {e}", self.name);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let _ = tcp.set_nodelay(true);
            let this = self.clone();
            let stop = drain.stop.clone();
            drain.tracker.spawn(async move {
                if this.protocol.is_http() {
                    let svc_this = this.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let this = svc_this.clone();
                        async move { Ok::<_, Infallible>(this.handle(req).await) }
                    });
                    proxy::serve_h2(tcp, svc, stop).await;
                } else {
                    this.forward_tcp(tcp).await;
                }
            });
        }
    }

    async fn forward_tcp(&self, app: tokio::net::TcpStream) {
        let Some(ep) = self.pick() else {
            tracing::warn!("outbound {}: no endpoints", self.name);
            return;
        };
        match proxy::tls_connect(ep.addr, &self.tls).await {
            Ok(up) => {
                proxy::pipe(app, up, "outbound").await;
            }
            Err(e) => tracing::warn!("outbound {}: {e}", self.name),
        }
    }

    /// Proxies one request to the upstream.
    pub async fn handle(&self, mut req: Request<Incoming>) -> Response<ProxyBody> {
        let grpc = proxy::is_grpc(&req);
        let (method_label, grpc_method) = match proxy::grpc_path(req.uri().path()) {
            Some((svc, m)) if grpc => (self.labels.method(svc, m), Some(format!("{svc}/{m}"))),
            _ => ("other".to_string(), None),
        };
        let server_id = self.tls.server_id.to_string();
        let mut record = RequestRecord::new(
            "outbound",
            self.labels.peer(&server_id),
            server_id,
            method_label,
            grpc_method,
            req.method().to_string(),
            String::new(),
            Some(self.log.clone()),
        );
        let protocol = if grpc { Protocol::Grpc } else { Protocol::Http };
        let deadline = proxy::request_deadline(self.timeout, req.headers());
        req.headers_mut().remove(XFCC);
        let Some(ep) = self.pick() else {
            return self.fail(
                record,
                protocol,
                ProxyError::Unavailable(format!("upstream {} has no endpoints", self.name)),
            );
        };
        record.upstream = ep.addr.to_string();
        if self.tls.config.load().is_none() {
            return self.fail(
                record,
                protocol,
                ProxyError::NoIdentity(format!(
                    "meshd has no valid SVID; not calling upstream {}",
                    self.name
                )),
            );
        }
        match tokio::time::timeout(deadline, ep.pool.send(req)).await {
            Ok(Ok(resp)) => {
                record.http_status = resp.status().as_u16();
                record.grpc_status = resp
                    .headers()
                    .get("grpc-status")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok());
                resp.map(|b| Either::Left(MeteredBody::new(b, record)))
            }
            Ok(Err(e)) => self.fail(
                record,
                protocol,
                ProxyError::Unavailable(format!(
                    "upstream {} unavailable ({}): {e}",
                    self.name, ep.addr
                )),
            ),
            Err(_) => self.fail(
                record,
                protocol,
                ProxyError::DeadlineExceeded(format!(
                    "upstream {} did not answer within {} ms",
                    self.name,
                    deadline.as_millis()
                )),
            ),
        }
    }

    fn fail(
        &self,
        mut record: RequestRecord,
        protocol: Protocol,
        err: ProxyError,
    ) -> Response<ProxyBody> {
        let (grpc, http) = err.codes();
        record.http_status = if protocol == Protocol::Grpc {
            200
        } else {
            http.as_u16()
        };
        record.grpc_status = (protocol == Protocol::Grpc).then_some(grpc);
        tracing::debug!("outbound {}: {err}", self.name);
        record.finish();
        err.response(protocol)
    }
}
