//! Outbound: one plaintext listener per upstream the app calls. Requests (h2c/gRPC) or
//! TCP connections from the app leave as mutual TLS with the current SVID, to an endpoint
//! whose SVID must carry the upstream's `server_id` — or, for an upstream outside the mesh
//! (`tls.mode: server_only`), as TLS to a server whose certificate is valid for `sni`.
//! With `jwt_svid`, each request carries a JWT-SVID as the caller's proof (`jwt_attach`).
//!
//! Flow: accept from the app -> admit (circuit breaker) -> pick an eligible endpoint (not
//! ejected by outlier detection, not failing active health checks) -> pooled mTLS HTTP/2
//! connection (or a new mTLS stream for tcp) -> response streamed back, metered; a failed
//! attempt that is safe to repeat is retried on another endpoint within the retry budget
//! (`call`). Failures become gRPC UNAVAILABLE / DEADLINE_EXCEEDED (HTTP 503 / 504)
//! naming the upstream. Each endpoint has its own health-check task (`health_check`).
//! An upstream with `jwt_svid` first gets its token (no token: UNAVAILABLE / 503, the
//! request is not sent).
//!
//! Where things live: [`Outbound`] and all its methods (construction, the endpoint set
//! discovery keeps current, picking and observing endpoints, the listener) are here; the
//! forwarding of one request or TCP connection through it is `call`'s free functions
//! ([`forward_as`]), the endpoint set kept ready for O(1) picks is `endpoints`, the
//! balancing decisions are `balancer`, breaker, retries and outlier detection are
//! `resilience`.

mod balancer;
mod call;
mod endpoints;
mod health_check;
mod jwt_attach;
mod resilience;
mod transparent;

#[cfg(test)]
mod fuzz;
pub use balancer::{UpstreamView, Upstreams};
pub use call::{forward_as, CallTimeouts};
pub use jwt_attach::{JwtAttach, JwtAttachError};
pub use transparent::{Claim, Transparent};

use crate::config::{OutboundConfig, Protocol};
use crate::discovery::{DiscoveredEndpoint, EndpointSet, UpstreamDiscovery};
use crate::identity::{IdentityStatus, SpiffeId};
use crate::outbound::health_check::{CheckKind, Checked};
use crate::proxy::{self, ConnectionGate, Drain};
use crate::proxy::{Connector, H2Pool};
use crate::telemetry::{AccessLogger, Labels};
use crate::tls::UpstreamTls;
use arc_swap::ArcSwap;
use balancer::{EndpointStats, HasStats, InFlight};
use endpoints::{Drawn, EligibleSet, Pickable};
use futures::FutureExt;
use resilience::{Breaker, EndpointHealth, HealthState, Outcome, RetryBudget};
use std::collections::HashMap;
use std::net::SocketAddr;
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
    /// Outlier ejection and the active health check's verdict.
    pub health: EndpointHealth,
    /// The address as text, for access logs (made once, not per request).
    pub addr_text: metrics::SharedString,
}

impl Checked for Endpoint {
    fn addr(&self) -> SocketAddr {
        self.meta.addr
    }
    fn pool(&self) -> &H2Pool {
        &self.pool
    }
    fn health(&self) -> &EndpointHealth {
        &self.health
    }
}

impl HasStats for Endpoint {
    fn stats(&self) -> &EndpointStats {
        &self.stats
    }
}

impl Pickable for Endpoint {
    fn addr(&self) -> SocketAddr {
        self.meta.addr
    }
    fn weight(&self) -> u32 {
        self.meta.weight
    }
    fn eligible(&self, now: Instant) -> bool {
        self.health.eligible(now)
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
        let config = status
            .snapshot()
            .zip(slot.server_id.as_ref())
            .and_then(|(snap, id)| {
                crate::tls::client_config(snap, id, slot.alpn_h2)
                    .map_err(|e| tracing::error!("client TLS config for {id}: {e}"))
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
                    server_id: Some(id.clone()),
                    server_name: crate::tls::spiffe_server_name(),
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
    /// Its settings as configured (protocol, timeout, retries, health, limits).
    pub config: OutboundConfig,
    /// The client TLS config slot, swapped at rotation.
    pub tls: Arc<UpstreamTls>,
    /// `server_id` as text (a server-only upstream's `sni`), for metrics labels and
    /// access logs.
    pub(crate) server_id_text: metrics::SharedString,
    /// The JWT-SVID put on each request (`jwt_svid`); none without.
    pub(crate) jwt: Option<JwtAttach>,
    /// Where the upstream runs, as published by its resolver task.
    pub discovery: Arc<UpstreamDiscovery>,
    /// The endpoints requests are balanced over, split by eligibility; replaced when
    /// discovery publishes, when an endpoint is ejected and when a pick finds it stale.
    pub(crate) endpoints: ArcSwap<EligibleSet<Endpoint>>,
    /// Held while `endpoints` is rebuilt, so rebuilds never undo a newer one.
    rebuilding: Mutex<()>,
    /// TLS slots for endpoints with their own `server_id`.
    overrides: Arc<OverrideTls>,
    /// Round-robin cursor.
    next: AtomicU64,
    /// Limits on requests in progress and waiting for a connection.
    pub(crate) breaker: Arc<Breaker>,
    /// Bounds retries to a share of recent requests.
    pub(crate) budget: RetryBudget,
    /// `meshd_retries_total{service}`.
    pub(crate) retries_total: metrics::Counter,
    /// Ends the health-check tasks when meshd drains.
    stop: tokio_util::sync::CancellationToken,
    pub labels: Arc<Labels>,
    pub log: Arc<AccessLogger>,
    /// Counts the connections the app makes to this upstream's own listener.
    gate: Arc<ConnectionGate>,
}

impl Outbound {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        config: &OutboundConfig,
        tls: Arc<UpstreamTls>,
        jwt: Option<JwtAttach>,
        discovery: Arc<UpstreamDiscovery>,
        identity: watch::Receiver<IdentityStatus>,
        labels: Arc<Labels>,
        log: Arc<AccessLogger>,
        stop: tokio_util::sync::CancellationToken,
    ) -> Outbound {
        let overrides = Arc::new(OverrideTls {
            alpn_h2: tls.alpn_h2,
            identity,
            slots: Mutex::new(HashMap::new()),
        });
        let retries_total =
            metrics::counter!("meshd_retries_total", "service" => config.name.clone());
        retries_total.absolute(0);
        let ob = Outbound {
            name: config.name.clone(),
            config: config.clone(),
            server_id_text: metrics::SharedString::from(Arc::<str>::from(match &tls.server_id {
                Some(id) => id.to_string(),
                None => tls.server_name.to_str().into_owned(),
            })),
            jwt,
            tls,
            discovery,
            endpoints: ArcSwap::from_pointee(EligibleSet::build(
                Default::default(),
                Instant::now(),
            )),
            rebuilding: Mutex::new(()),
            overrides,
            next: AtomicU64::new(0),
            breaker: Breaker::new(&config.name, config.limits.clone()),
            budget: RetryBudget::new(
                config.retries.budget_percent,
                config.retries.min_per_second,
                Instant::now(),
            ),
            retries_total,
            stop,
            labels,
            log,
            gate: ConnectionGate::new("outbound", None),
        };
        let first = ob.discovery.endpoints.borrow().clone();
        ob.apply(&first);
        ob
    }

    /// Makes `set` the endpoints to balance over; endpoints still present (same address,
    /// weight, zone and `server_id`) keep their connection, statistics and health. Linear
    /// in the sizes of both sets.
    fn apply(&self, set: &EndpointSet) {
        let _one = self.rebuilding.lock().unwrap_or_else(|e| e.into_inner());
        let old = self.endpoints.load();
        let by_addr: HashMap<SocketAddr, &Arc<Endpoint>> =
            old.all().iter().map(|e| (e.meta.addr, e)).collect();
        let mut next = Vec::with_capacity(set.endpoints.len());
        for meta in &set.endpoints {
            if let Some(ep) = by_addr.get(&meta.addr).filter(|e| e.meta == *meta) {
                next.push(Arc::clone(ep));
                continue;
            }
            let tls = match &meta.server_id {
                Some(id) if Some(id) != self.tls.server_id.as_ref() => self.overrides.slot(id),
                _ => self.tls.clone(),
            };
            let ep = Arc::new(Endpoint {
                meta: meta.clone(),
                pool: H2Pool::new(Connector::Tls {
                    addr: meta.addr,
                    tls: tls.clone(),
                }),
                tls,
                stats: EndpointStats::default(),
                health: EndpointHealth::default(),
                addr_text: metrics::SharedString::from(Arc::<str>::from(meta.addr.to_string())),
            });
            if let Some(hc) = &self.config.health_check {
                let kind = match self.config.protocol {
                    Protocol::Grpc => CheckKind::Grpc {
                        service: hc.service.clone(),
                    },
                    _ => CheckKind::Tcp,
                };
                tokio::spawn(crate::outbound::health_check::run(
                    Arc::downgrade(&ep),
                    self.name.clone(),
                    kind,
                    hc.clone(),
                    self.stop.clone(),
                ));
            }
            next.push(ep);
        }
        drop(by_addr);
        let next = EligibleSet::build(Arc::new(next), Instant::now());
        self.endpoints.store(Arc::new(next));
        drop(_one);
        self.publish_states();
    }

    /// Splits the current endpoints by eligibility again (after an ejection, or when a
    /// pick saw an endpoint change). With `wait` false, gives way to a rebuild already
    /// under way (the pick that asked continues on the old set, checking live).
    fn rebuild(&self, wait: bool) {
        let _one = match self.rebuilding.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) if !wait => return,
            Err(std::sync::TryLockError::WouldBlock) => {
                self.rebuilding.lock().unwrap_or_else(|e| e.into_inner())
            }
        };
        let all = self.endpoints.load().all().clone();
        self.endpoints
            .store(Arc::new(EligibleSet::build(all, Instant::now())));
    }

    /// Sets `meshd_upstream_endpoints{service,state}` from the endpoints' states now.
    pub fn publish_states(&self) {
        let now = Instant::now();
        let mut counts = [0usize; 3];
        for e in self.endpoints.load().all().iter() {
            counts[e.health.state(now) as usize] += 1;
        }
        let states = [
            HealthState::Healthy,
            HealthState::Ejected,
            HealthState::Unhealthy,
        ];
        for (state, n) in states.into_iter().zip(counts) {
            metrics::gauge!("meshd_upstream_endpoints", "service" => self.name.clone(), "state" => state.label())
                .set(n as f64);
        }
    }

    /// [`apply`](Self::apply) for `benches/endpoint_scale.rs`, which times it at scale
    /// (not used by meshd itself).
    #[doc(hidden)]
    pub fn apply_for_bench(&self, set: &EndpointSet) {
        self.apply(set)
    }

    /// [`pick`](Self::pick) with nothing tried yet, for `benches/endpoint_scale.rs`; the
    /// pick's in-flight count ends at once (not used by meshd itself).
    #[doc(hidden)]
    pub fn pick_for_bench(&self) -> Option<SocketAddr> {
        self.pick(&[]).map(|f| f.endpoint.meta.addr)
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
    /// Ejected and unhealthy endpoints are passed over, and so are those in `tried`
    /// while another one is left; when every endpoint is out, all are used (Envoy's
    /// panic routing) rather than failing the request. Looks at one to three endpoints,
    /// whatever the upstream's size (see `endpoints`).
    pub(crate) fn pick(&self, tried: &[SocketAddr]) -> Option<InFlight<Endpoint>> {
        let now = Instant::now();
        let cursor = self.next.fetch_add(1, Ordering::Relaxed);
        let mut set = self.endpoints.load();
        if set.probe(cursor, now) {
            self.rebuild(false);
            set = self.endpoints.load();
        }
        let policy = self.config.balancer;
        let i = match set.pick(policy, tried, now, cursor, rand::random) {
            Drawn::Chosen(i) => i,
            Drawn::Empty => return None,
            Drawn::Scan => {
                endpoints::pick_scan(policy, set.all(), tried, now, cursor, rand::random())?
            }
        };
        Some(InFlight::start(set.all().get(i)?.clone()))
    }

    /// Counts one attempt's outcome for the endpoint's balancer statistics and outlier
    /// detection, ejecting it when it keeps failing (within `max_ejection_percent`).
    pub(crate) fn observe(&self, ep: InFlight<Endpoint>, outcome: Outcome) {
        let endpoint = ep.endpoint.clone();
        ep.finish(!outcome.is_failure());
        let cfg = &self.config.outlier_detection;
        let now = Instant::now();
        let may_eject = || {
            let set = self.endpoints.load();
            let eps = set.all();
            let ejected = eps.iter().filter(|e| e.health.is_ejected(now)).count();
            ejected < resilience::max_ejected(eps.len(), cfg.max_ejection_percent)
        };
        if let Some(len) = endpoint.health.observe(outcome, cfg, now, may_eject) {
            tracing::warn!(
                upstream = %self.name,
                endpoint = %endpoint.meta.addr,
                "endpoint ejected for {} ms after {} failures in a row",
                len.as_millis(),
                cfg.consecutive_failures
            );
            self.rebuild(true);
            self.publish_states();
        }
    }

    pub(crate) fn no_endpoints(&self) -> String {
        let why = self
            .discovery
            .status()
            .last_error
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        format!("upstream {} has no endpoints{why}", self.name)
    }

    /// Starts what the upstream runs whether or not connections arrive: following
    /// discovery and rotations, and refreshing the endpoint-state gauge. Called once,
    /// before any connection is handed to it.
    pub fn start(self: &Arc<Self>, drain: &Drain) {
        tokio::spawn(self.clone().follow(drain.stop.clone()));
        tokio::spawn(self.overrides.clone().follow());
        let states = self.clone();
        let stop = drain.stop.clone();
        tokio::spawn(async move {
            // Ejections end and health verdicts change on their own: refresh the gauge.
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tick.tick() => states.publish_states(),
                }
            }
        });
    }

    /// Accepts connections from the app on the upstream's own listener until drained.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        let what = format!("outbound {}", self.name);
        while let Some((tcp, from)) = proxy::accept(&listener, &drain.stop, &what).await {
            let Some(open) = self.gate.admit(from) else {
                continue;
            };
            let served = self.clone().serve_connection(tcp, drain.stop.clone());
            // `open` is let go when the connection ends (as in `proxy::accept_ready`).
            drain.tracker.spawn(served.map(move |()| drop(open)));
        }
    }

    /// Serves one connection from the app, from the upstream's listener or handed over
    /// by the transparent listener: HTTP/2 requests, or one TCP stream.
    pub async fn serve_connection(
        self: Arc<Self>,
        tcp: tokio::net::TcpStream,
        stop: tokio_util::sync::CancellationToken,
    ) {
        if self.config.protocol.is_http() {
            let this = self.clone();
            let handle = move |req| {
                let this = this.clone();
                async move { call::forward(&this, req).await }
            };
            Box::pin(proxy::serve_h2(tcp, handle, stop, None)).await;
        } else {
            Box::pin(call::forward_tcp(&self, tcp)).await;
        }
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
            .all()
            .iter()
            .map(|e| {
                let (requests, failures, in_flight, ewma_ms) = e.stats.snapshot();
                serde_json::json!({
                    "address": e.meta.addr.to_string(),
                    "weight": e.meta.weight,
                    "zone": e.meta.zone,
                    "server_id": e.tls.server_id.as_ref().map(ToString::to_string),
                    "server_name": e.tls.server_id.is_none().then(|| e.tls.server_name.to_str()),
                    "state": e.health.state(Instant::now()).label(),
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
            "balancer": self.config.balancer,
            "requests_in_progress": self.breaker.load().0,
            "requests_pending": self.breaker.load().1,
            "resolved": status.resolved,
            "last_error": status.last_error,
            "resolve_failures": status.failures,
            "last_good_unix": status.last_good.map(crate::identity::unix_seconds),
            "endpoints": endpoints,
        })
    }
}

#[cfg(test)]
mod tests;
