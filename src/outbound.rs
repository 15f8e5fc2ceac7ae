//! Outbound: one plaintext listener per upstream the app calls. Requests (h2c/gRPC) or
//! TCP connections from the app leave as mutual TLS with the current SVID, to an endpoint
//! whose SVID must carry the upstream's `server_id`.
//!
//! Flow: accept from the app -> pick an endpoint -> pooled mTLS HTTP/2 connection (or a
//! new mTLS stream for tcp) -> response streamed back, metered. Failures become gRPC
//! UNAVAILABLE / DEADLINE_EXCEEDED (HTTP 503 / 504) naming the upstream.

use crate::balancer::{self, EndpointStats, HasStats, InFlight, UpstreamView};
use crate::config::{BalancerPolicy, Protocol};
use crate::discovery::{DiscoveredEndpoint, EndpointSet, UpstreamDiscovery};
use crate::identity::{IdentityStatus, SpiffeId};
use crate::proxy::{self, Connector, Drain, H2Pool, ProxyBody, ProxyError, XFCC};
use crate::telemetry::{AccessLogger, Labels, RequestRecord};
use crate::tls::UpstreamTls;
use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One endpoint of an upstream: its pooled connection and its balancer statistics.
/// Requests hold an `Arc` of it, so an endpoint that discovery removed finishes its
/// in-flight requests on its own connection.
#[derive(Debug)]
pub struct Endpoint {
    /// Address, weight, zone and `server_id` override, as discovered.
    pub meta: DiscoveredEndpoint,
    /// The client TLS slot this endpoint is verified with (the upstream's, or the
    /// override's for an endpoint with its own `server_id`).
    pub tls: Arc<UpstreamTls>,
    /// HTTP/2 connection(s) to this endpoint, shared by all requests.
    pub pool: H2Pool,
    /// In-flight count and latency estimate for the balancer.
    pub stats: EndpointStats,
}

impl HasStats for Endpoint {
    fn stats(&self) -> &EndpointStats {
        &self.stats
    }
}

/// Client TLS slots for endpoints whose `server_id` differs from the upstream's: built
/// with `tls::client_config` from the current identity on first use and rebuilt at each
/// rotation, so the handshake with such an endpoint accepts exactly its own ID.
#[derive(Debug)]
struct OverrideTls {
    /// Whether the upstream speaks HTTP/2 (ALPN h2).
    alpn_h2: bool,
    /// The identity channel the slots are built from.
    identity: watch::Receiver<IdentityStatus>,
    /// One slot per override ID.
    slots: Mutex<HashMap<SpiffeId, Arc<UpstreamTls>>>,
}

impl OverrideTls {
    fn build(&self, slot: &UpstreamTls) {
        let status = self.identity.borrow();
        let config = status.snapshot().and_then(|snap| {
            crate::tls::client_config(snap, &slot.server_id, slot.alpn_h2)
                .map_err(|e| tracing::error!("client TLS config for {}: {e}", slot.server_id))
                .ok()
        });
        slot.config.store(config.map(Arc::new));
    }

    fn slot(&self, id: &SpiffeId) -> Arc<UpstreamTls> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .entry(id.clone())
            .or_insert_with(|| {
                let slot = UpstreamTls {
                    server_id: id.clone(),
                    alpn_h2: self.alpn_h2,
                    config: Default::default(),
                };
                self.build(&slot);
                Arc::new(slot)
            })
            .clone()
    }

    async fn follow(self: Arc<Self>) {
        let mut rx = self.identity.clone();
        while rx.changed().await.is_ok() {
            let slots: Vec<_> = self
                .slots
                .lock()
                .map(|s| s.values().cloned().collect())
                .unwrap_or_default();
            for slot in slots {
                self.build(&slot);
            }
        }
    }
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
    /// How the next endpoint is chosen.
    pub balancer: BalancerPolicy,
    /// Where the upstream runs, as published by its resolver task.
    pub discovery: Arc<UpstreamDiscovery>,
    /// The endpoints requests are balanced over; replaced when discovery publishes.
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    /// TLS slots for endpoints with their own `server_id`.
    overrides: Arc<OverrideTls>,
    /// Round-robin cursor.
    next: AtomicU64,
    pub labels: Arc<Labels>,
    pub log: Arc<AccessLogger>,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: String,
        protocol: Protocol,
        timeout: Duration,
        tls: Arc<UpstreamTls>,
        balancer: BalancerPolicy,
        discovery: Arc<UpstreamDiscovery>,
        identity: watch::Receiver<IdentityStatus>,
        labels: Arc<Labels>,
        log: Arc<AccessLogger>,
    ) -> Outbound {
        let overrides = Arc::new(OverrideTls {
            alpn_h2: tls.alpn_h2,
            identity,
            slots: Mutex::new(HashMap::new()),
        });
        let ob = Outbound {
            name,
            protocol,
            timeout,
            tls,
            balancer,
            discovery,
            endpoints: ArcSwap::from_pointee(Vec::new()),
            overrides,
            next: AtomicU64::new(0),
            labels,
            log,
        };
        let first = ob.discovery.endpoints.borrow().clone();
        ob.apply(&first);
        ob
    }

    /// Makes `set` the endpoints to balance over; endpoints still present keep their
    /// connection and statistics.
    fn apply(&self, set: &EndpointSet) {
        let old = self.endpoints.load();
        let mut next = Vec::with_capacity(set.endpoints.len());
        for meta in &set.endpoints {
            if let Some(ep) = old.iter().find(|e| e.meta == *meta) {
                next.push(ep.clone());
                continue;
            }
            let tls = match &meta.server_id {
                Some(id) if *id != self.tls.server_id => self.overrides.slot(id),
                _ => self.tls.clone(),
            };
            next.push(Arc::new(Endpoint {
                meta: meta.clone(),
                pool: H2Pool::new(Connector::Tls {
                    addr: meta.addr,
                    tls: tls.clone(),
                }),
                tls,
                stats: EndpointStats::default(),
            }));
        }
        let service = self.name.clone();
        metrics::gauge!("meshd_upstream_endpoints", "service" => service.clone(), "state" => "healthy")
            .set(next.len() as f64);
        for state in ["ejected", "unhealthy"] {
            metrics::gauge!("meshd_upstream_endpoints", "service" => service.clone(), "state" => state)
                .set(0.0);
        }
        self.endpoints.store(Arc::new(next));
    }

    /// Follows the discovery channel until `stop`.
    async fn follow(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut rx = self.discovery.endpoints.clone();
        loop {
            let set = rx.borrow_and_update().clone();
            self.apply(&set);
            tokio::select! {
                _ = stop.cancelled() => return,
                r = rx.changed() => if r.is_err() { return },
            }
        }
    }

    /// Chooses an endpoint for one request (or TCP connection) and counts it in flight.
    fn pick(&self) -> Option<InFlight<Endpoint>> {
        let eps = self.endpoints.load();
        let now = Instant::now();
        let cands: Vec<_> = eps
            .iter()
            .map(|e| e.stats.candidate(e.meta.weight, now))
            .collect();
        let cursor = self.next.fetch_add(1, Ordering::Relaxed);
        let i = balancer::choose(self.balancer, &cands, cursor, rand::random())?;
        Some(InFlight::start(eps.get(i)?.clone()))
    }

    fn no_endpoints(&self) -> String {
        let why = self
            .discovery
            .status()
            .last_error
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        format!("upstream {} has no endpoints{why}", self.name)
    }

    /// Accepts connections from the app until drained.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        tokio::spawn(self.clone().follow(drain.stop.clone()));
        tokio::spawn(self.overrides.clone().follow());
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
            tracing::warn!("outbound {}", self.no_endpoints());
            return;
        };
        match proxy::tls_connect(ep.endpoint.meta.addr, &ep.endpoint.tls).await {
            Ok(up) => {
                ep.record(true);
                proxy::pipe(app, up, "outbound").await;
            }
            Err(e) => {
                ep.record(false);
                tracing::warn!("outbound {}: {e}", self.name)
            }
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
                ProxyError::Unavailable(self.no_endpoints()),
            );
        };
        let addr = ep.endpoint.meta.addr;
        record.upstream = addr.to_string().into();
        if ep.endpoint.tls.config.load().is_none() {
            return self.fail(
                record,
                protocol,
                ProxyError::NoIdentity(format!(
                    "meshd has no valid SVID; not calling upstream {}",
                    self.name
                )),
            );
        }
        let sent = tokio::time::timeout(deadline, ep.endpoint.pool.send(req)).await;
        ep.finish(matches!(sent, Ok(Ok(_))));
        match sent {
            Ok(Ok(resp)) => proxy::respond_upstream(record, resp),
            Ok(Err(e)) => self.fail(
                record,
                protocol,
                ProxyError::Unavailable(format!(
                    "upstream {} unavailable ({addr}): {e}",
                    self.name
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
        record: RequestRecord,
        protocol: Protocol,
        err: ProxyError,
    ) -> Response<ProxyBody> {
        tracing::debug!("outbound {}: {err}", self.name);
        proxy::respond_locally(record, protocol, err)
    }
}

impl UpstreamView for Outbound {
    fn not_ready_reason(&self) -> Option<String> {
        self.discovery.not_ready_reason()
    }

    fn view(&self) -> serde_json::Value {
        let status = self.discovery.status();
        let endpoints: Vec<_> = self
            .endpoints
            .load()
            .iter()
            .map(|e| {
                let (requests, failures, in_flight, ewma_ms) = e.stats.snapshot();
                serde_json::json!({
                    "address": e.meta.addr.to_string(),
                    "weight": e.meta.weight,
                    "zone": e.meta.zone,
                    "server_id": e.tls.server_id.to_string(),
                    "state": "healthy",
                    "requests": requests,
                    "failures": failures,
                    "in_flight": in_flight,
                    "ewma_ms": (ewma_ms * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        serde_json::json!({
            "name": self.name,
            "endpoints_source": self.discovery.source,
            "balancer": self.balancer,
            "resolved": status.resolved,
            "last_error": status.last_error,
            "resolve_failures": status.failures,
            "last_good_unix": status.last_good.map(crate::identity::unix_seconds),
            "endpoints": endpoints,
        })
    }
}
