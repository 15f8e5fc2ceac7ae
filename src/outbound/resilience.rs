//! Keeping one bad replica from hurting the caller: passive outlier ejection, the
//! circuit breaker (limits on requests in progress and waiting for a connection), and
//! the retry rules (what is safe to retry, jittered back-off, the retry budget).
//!
//! Flow: the outbound listener asks [`Breaker::admit`] before anything else, picks an
//! endpoint among those [`EndpointHealth::eligible`], sends, classifies the outcome with
//! [`Outcome`], reports it to the endpoint's [`EndpointHealth`] (which may eject it,
//! within [`max_ejected`]), and when [`retry_allowed`] and the [`RetryBudget`] agree,
//! waits [`backoff`] and tries another endpoint. The decisions are plain functions with
//! table tests; time and randomness are handed in.

use crate::config::{LimitsConfig, OutlierConfig};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How one attempt ended, as far as retries and outlier detection care.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Response headers arrived and say nothing failed at the transport level.
    Answered,
    /// Response headers arrived with a 5xx status (not a gRPC UNAVAILABLE).
    ServerError,
    /// A trailers-only gRPC response with status 14 UNAVAILABLE: no message was sent.
    GrpcUnavailable,
    /// No response headers, and the request never reached the upstream's app: no
    /// connection could be made (connect, TLS or HTTP/2 handshake), or the upstream
    /// refused the stream (RST_STREAM REFUSED_STREAM, or a GOAWAY below its ID; RFC 9113
    /// §8.7 says such a stream was not processed).
    NotProcessed,
    /// No response headers: the stream was reset or its connection failed after it was
    /// sent, so the upstream may have processed it.
    NoResponse,
    /// The deadline passed before response headers.
    TimedOut,
}

impl Outcome {
    /// Whether outlier detection counts this as a failure of the endpoint.
    pub fn is_failure(self) -> bool {
        !matches!(self, Outcome::Answered)
    }
}

/// Whether an attempt that ended with `outcome` may be sent again: nothing of the
/// response reached the app, and the request is safe to repeat — any request the
/// upstream did not process (Envoy's `connect-failure` and `refused-stream`), any gRPC
/// call that got UNAVAILABLE or no response at all (per gRPC's retry design), or an HTTP
/// request with an idempotent method that got no response.
pub fn retry_allowed(outcome: Outcome, grpc: bool, method: &http::Method) -> bool {
    use http::Method;
    match outcome {
        Outcome::NotProcessed => true,
        Outcome::GrpcUnavailable => grpc,
        Outcome::NoResponse => {
            grpc || [
                Method::GET,
                Method::HEAD,
                Method::OPTIONS,
                Method::PUT,
                Method::DELETE,
                Method::TRACE,
            ]
            .contains(method)
        }
        Outcome::Answered | Outcome::ServerError | Outcome::TimedOut => false,
    }
}

/// The wait before retry number `attempt` (1 for the first retry): `base` doubling per
/// attempt, capped at `max`, scaled by `jitter` in [0, 1) ("full jitter").
pub fn backoff(attempt: u32, base: Duration, max: Duration, jitter: f64) -> Duration {
    let exp = base
        .checked_mul(1u32 << attempt.saturating_sub(1).min(16))
        .unwrap_or(max)
        .min(max);
    exp.mul_f64(jitter.clamp(0.0, 1.0))
}

/// How many of `total` endpoints may be ejected at once: `percent` of them, but at least
/// one (Envoy's rule), and never all of them unless `percent` is 100.
pub fn max_ejected(total: usize, percent: u32) -> usize {
    if percent == 0 || total == 0 {
        return 0;
    }
    let share = total * percent.min(100) as usize / 100;
    let cap = if percent >= 100 { total } else { total - 1 };
    share.max(1).min(cap.max(1))
}

/// The length of an endpoint's `times`-th ejection in a row (1 for the first):
/// `base * times`, at most `max` (Envoy's growing ejection).
pub fn ejection_time(cfg: &OutlierConfig, times: u32) -> Duration {
    cfg.base_ejection_time
        .checked_mul(times.max(1))
        .unwrap_or(cfg.max_ejection_time)
        .min(cfg.max_ejection_time)
}

/// What one endpoint's health is made of: passive outlier state and the active check's
/// verdict. Read on every pick, so the hot fields are atomics.
#[derive(Debug)]
pub struct EndpointHealth {
    /// The origin of the nanosecond timestamps below.
    born: Instant,
    /// Failed requests in a row.
    consecutive_failures: AtomicU32,
    /// Ejected until this many ns after `born` (0 = not ejected).
    ejected_until_ns: AtomicU64,
    /// Ejections in a row (reset after a whole `max_ejection_time` without one).
    ejections: AtomicU32,
    /// Whether active health checks currently fail this endpoint.
    unhealthy: AtomicBool,
}

impl Default for EndpointHealth {
    fn default() -> Self {
        EndpointHealth {
            born: Instant::now(),
            consecutive_failures: AtomicU32::new(0),
            ejected_until_ns: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            unhealthy: AtomicBool::new(false),
        }
    }
}

/// An endpoint's state as `/upstreams` and `meshd_upstream_endpoints` name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthState {
    Healthy,
    Ejected,
    Unhealthy,
}

impl HealthState {
    pub fn label(self) -> &'static str {
        match self {
            HealthState::Healthy => "healthy",
            HealthState::Ejected => "ejected",
            HealthState::Unhealthy => "unhealthy",
        }
    }
}

impl EndpointHealth {
    fn ns(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.born).as_nanos() as u64
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected(&self, now: Instant) -> bool {
        self.ns(now) < self.ejected_until_ns.load(Ordering::Relaxed)
    }

    /// Whether new requests may go here.
    pub fn eligible(&self, now: Instant) -> bool {
        !self.unhealthy.load(Ordering::Relaxed) && !self.is_ejected(now)
    }

    pub fn state(&self, now: Instant) -> HealthState {
        if self.unhealthy.load(Ordering::Relaxed) {
            HealthState::Unhealthy
        } else if self.is_ejected(now) {
            HealthState::Ejected
        } else {
            HealthState::Healthy
        }
    }

    /// The active checker's verdict.
    pub fn set_unhealthy(&self, unhealthy: bool) {
        self.unhealthy.store(unhealthy, Ordering::Relaxed);
    }

    /// Counts one request's outcome. Returns the ejection length when this failure
    /// ejects the endpoint; `may_eject` says whether the upstream's ejection cap allows
    /// one more (asked only at the threshold, as it counts the other endpoints).
    pub fn observe(
        &self,
        outcome: Outcome,
        cfg: &OutlierConfig,
        now: Instant,
        may_eject: impl FnOnce() -> bool,
    ) -> Option<Duration> {
        if !outcome.is_failure() {
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
            return None;
        }
        let n = self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if cfg.consecutive_failures == 0 || n < cfg.consecutive_failures || self.is_ejected(now) {
            return None;
        }
        if !may_eject() {
            return None;
        }
        let now_ns = self.ns(now);
        let until = self.ejected_until_ns.load(Ordering::Relaxed);
        let quiet = now_ns.saturating_sub(until) >= cfg.max_ejection_time.as_nanos() as u64;
        let times = if until == 0 || quiet {
            1
        } else {
            self.ejections.load(Ordering::Relaxed) + 1
        };
        self.ejections.store(times, Ordering::Relaxed);
        let len = ejection_time(cfg, times);
        self.ejected_until_ns
            .store(now_ns + len.as_nanos() as u64, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        Some(len)
    }
}

/// Which limit refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitHit {
    #[error("{0} requests in progress (limits.max_requests)")]
    Requests(u64),
    #[error("{0} requests waiting for a connection (limits.max_pending)")]
    Pending(u64),
}

/// The circuit breaker of one upstream: counts requests in progress and waiting for a
/// connection, refuses beyond the limits, and keeps `meshd_circuit_open{service}` at 1
/// exactly while a limit is reached.
#[derive(Debug)]
pub struct Breaker {
    /// The upstream's name, for the log line when the circuit opens.
    service: String,
    limits: LimitsConfig,
    active: AtomicU64,
    pending: AtomicU64,
    /// Whether the gauge says open; flipped only on changes.
    open: AtomicBool,
    /// `meshd_circuit_open{service}`.
    gauge: metrics::Gauge,
}

/// A request in progress; dropping it (at the end of the response) frees its place.
#[derive(Debug)]
pub struct Admission(Arc<Breaker>);

/// A request waiting for a connection; dropped once it has one.
#[derive(Debug)]
pub struct Waiting(Arc<Breaker>);

impl Breaker {
    pub fn new(service: &str, limits: LimitsConfig) -> Arc<Breaker> {
        let gauge = metrics::gauge!("meshd_circuit_open", "service" => service.to_string());
        gauge.set(0.0);
        Arc::new(Breaker {
            service: service.to_string(),
            limits,
            active: AtomicU64::new(0),
            pending: AtomicU64::new(0),
            open: AtomicBool::new(false),
            gauge,
        })
    }

    fn set_open(&self, open: bool) {
        if self.open.swap(open, Ordering::Relaxed) != open {
            self.gauge.set(if open { 1.0 } else { 0.0 });
            if open {
                tracing::warn!(upstream = %self.service, "circuit open: a limit is reached");
            }
        }
    }

    fn at_limit(&self) -> bool {
        self.active.load(Ordering::Relaxed) >= self.limits.max_requests
            || self.pending.load(Ordering::Relaxed) >= self.limits.max_pending
    }

    /// Lets one more request in, or says which limit is reached.
    pub fn admit(self: &Arc<Self>) -> Result<Admission, LimitHit> {
        let limit = self.limits.max_requests;
        if !self.take(&self.active, limit) {
            return Err(LimitHit::Requests(limit));
        }
        Ok(Admission(self.clone()))
    }

    /// Counts a request waiting for a connection, or refuses it.
    pub fn wait_for_connection(self: &Arc<Self>) -> Result<Waiting, LimitHit> {
        let limit = self.limits.max_pending;
        if !self.take(&self.pending, limit) {
            return Err(LimitHit::Pending(limit));
        }
        Ok(Waiting(self.clone()))
    }

    /// Takes one of `limit` slots counted by `counter`, or none when all are taken; the
    /// circuit is open while the last slot is in use (the counterpart of `release`).
    fn take(&self, counter: &AtomicU64, limit: u64) -> bool {
        let n = counter.fetch_add(1, Ordering::Relaxed) + 1;
        if n > limit {
            counter.fetch_sub(1, Ordering::Relaxed);
            self.set_open(true);
            return false;
        }
        if n == limit {
            self.set_open(true);
        }
        true
    }

    /// (requests in progress, waiting for a connection), for `/upstreams`.
    pub fn load(&self) -> (u64, u64) {
        (
            self.active.load(Ordering::Relaxed),
            self.pending.load(Ordering::Relaxed),
        )
    }
}

impl Breaker {
    /// Gives back one place counted in `counter`; closes the circuit below the limits.
    fn release(&self, counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
        if !self.at_limit() {
            self.set_open(false);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        self.0.release(&self.0.active);
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.release(&self.0.pending);
    }
}

/// The width of one bucket of the retry budget's window.
const BUCKET: Duration = Duration::from_secs(1);
/// Buckets in the window (10 s, as Linkerd's and Finagle's budgets).
const BUCKETS: usize = 10;

/// Bounds retries to `percent` of the requests over the last 10 s, plus `min_per_second`
/// (Finagle / Linkerd retry budget), so a failing upstream is not stormed.
#[derive(Debug)]
pub struct RetryBudget {
    percent: u32,
    min_per_second: u32,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    /// The start of bucket 0's period.
    origin: Instant,
    /// The period the newest bucket belongs to (counted in `BUCKET`s from `origin`).
    current: u64,
    /// (requests, retries) per period, indexed by period modulo `BUCKETS`.
    buckets: [(u64, u64); BUCKETS],
}

impl Window {
    fn roll(&mut self, now: Instant) {
        let period =
            (now.saturating_duration_since(self.origin).as_nanos() / BUCKET.as_nanos()) as u64;
        if period > self.current {
            let stale = (period - self.current).min(BUCKETS as u64);
            for k in 1..=stale {
                self.buckets[((self.current + k) % BUCKETS as u64) as usize] = (0, 0);
            }
            self.current = period;
        }
    }

    fn slot(&mut self) -> &mut (u64, u64) {
        &mut self.buckets[(self.current % BUCKETS as u64) as usize]
    }

    fn totals(&self) -> (u64, u64) {
        self.buckets
            .iter()
            .fold((0, 0), |(r, t), (a, b)| (r + a, t + b))
    }
}

impl RetryBudget {
    pub fn new(percent: u32, min_per_second: u32, now: Instant) -> RetryBudget {
        RetryBudget {
            percent,
            min_per_second,
            window: Mutex::new(Window {
                origin: now,
                current: 0,
                buckets: [(0, 0); BUCKETS],
            }),
        }
    }

    /// Counts one request (first attempts only).
    pub fn deposit(&self, now: Instant) {
        if let Ok(mut w) = self.window.lock() {
            w.roll(now);
            w.slot().0 += 1;
        }
    }

    /// Takes one retry from the budget, or says there is none left.
    pub fn try_withdraw(&self, now: Instant) -> bool {
        let Ok(mut w) = self.window.lock() else {
            return false;
        };
        w.roll(now);
        let (requests, retries) = w.totals();
        let allowed = requests * u64::from(self.percent) / 100
            + u64::from(self.min_per_second) * BUCKETS as u64;
        if retries >= allowed {
            return false;
        }
        w.slot().1 += 1;
        true
    }
}

#[cfg(test)]
mod tests;
