//! Load balancing decisions: which endpoint of an upstream takes the next request (or TCP
//! connection).
//!
//! Flow: the outbound listener draws endpoints from its `EligibleSet` (`endpoints`): one
//! from the round-robin cursor, or two at random whose [`EndpointStats`] it snapshots
//! into [`Candidate`]s and compares by [`cost`]; only when those draws find nothing
//! usable does it snapshot every endpoint and call [`choose`], a plain function with no
//! I/O (random numbers and the round-robin cursor are handed in). It then holds an
//! [`InFlight`] guard for the request and reports the time to response headers through
//! it. The default policy is
//! linkerd2-proxy's: power of two choices over peak-EWMA latency, where an endpoint's
//! cost is `rtt_estimate * (in_flight + 1) / weight` and the estimate jumps up to any
//! slower sample at once but decays towards faster ones (and towards zero while idle,
//! so a once-slow endpoint is probed again after a while).

use crate::config::BalancerPolicy;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The RTT a new endpoint is assumed to have (linkerd2-proxy's default).
pub const DEFAULT_RTT: Duration = Duration::from_millis(30);
/// The time constant of the EWMA decay (linkerd2-proxy's default).
pub const DECAY: Duration = Duration::from_secs(10);
/// The RTT recorded for a failed request: a failing endpoint must not look fast.
pub const FAILURE_PENALTY: Duration = Duration::from_secs(1);

/// What the decision sees of one endpoint.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// Relative share of traffic (SRV weight or file `weight`), at least 1.
    pub weight: u32,
    /// Requests sent and not yet answered with headers.
    pub in_flight: u64,
    /// Peak-EWMA latency estimate, in nanoseconds.
    pub rtt_ns: f64,
}

/// linkerd2-proxy's load: latency estimate times (in-flight + 1), per unit of weight.
pub fn ewma_cost(c: &Candidate) -> f64 {
    c.rtt_ns * (c.in_flight as f64 + 1.0) / f64::from(c.weight.max(1))
}

fn request_load(c: &Candidate) -> f64 {
    (c.in_flight as f64 + 1.0) / f64::from(c.weight.max(1))
}

/// What the power-of-two choices compare under `policy` (the lower wins): the peak-EWMA
/// cost, or requests in flight per unit of weight (round robin compares nothing: 0).
pub fn cost(policy: BalancerPolicy, c: &Candidate) -> f64 {
    match policy {
        BalancerPolicy::P2cEwma => ewma_cost(c),
        BalancerPolicy::LeastRequest => request_load(c),
        BalancerPolicy::RoundRobin => 0.0,
    }
}

/// The index whose cumulative weight range holds `x` (taken modulo the total), passing over
/// `skip`.
fn weighted_index(cands: &[Candidate], x: u64, skip: Option<usize>) -> usize {
    let total: u64 = cands
        .iter()
        .enumerate()
        .filter(|(i, _)| Some(*i) != skip)
        .map(|(_, c)| u64::from(c.weight.max(1)))
        .sum();
    let mut x = x % total.max(1);
    let mut last = 0;
    for (i, c) in cands.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        last = i;
        let w = u64::from(c.weight.max(1));
        if x < w {
            return i;
        }
        x -= w;
    }
    last
}

/// Picks an endpoint: `cursor` is the round-robin counter, `rand` two random numbers
/// (the power-of-two choices draw two distinct endpoints, weighted). `None` when empty.
pub fn choose(
    policy: BalancerPolicy,
    cands: &[Candidate],
    cursor: u64,
    rand: [u64; 2],
) -> Option<usize> {
    match cands.len() {
        0 => return None,
        1 => return Some(0),
        _ => {}
    }
    if policy == BalancerPolicy::RoundRobin {
        return Some(weighted_index(cands, cursor, None));
    }
    let a = weighted_index(cands, rand[0], None);
    let b = weighted_index(cands, rand[1], Some(a));
    Some(if cost(policy, &cands[b]) < cost(policy, &cands[a]) {
        b
    } else {
        a
    })
}

/// A peak-EWMA latency estimate (tower / linkerd2-proxy `PeakEwma`).
#[derive(Debug, Clone, Copy)]
pub struct RttEstimate {
    /// The estimate in nanoseconds.
    rtt_ns: f64,
    /// When the estimate was last updated (decay runs from here).
    at: Instant,
}

impl RttEstimate {
    pub fn new(initial: Duration, now: Instant) -> RttEstimate {
        RttEstimate {
            rtt_ns: initial.as_nanos() as f64,
            at: now,
        }
    }

    /// Takes one sample: a slower one replaces the estimate (peak); a faster one is
    /// blended in by how long ago the last update was.
    pub fn observe(&mut self, rtt: Duration, now: Instant, decay: Duration) -> f64 {
        let rtt = rtt.as_nanos() as f64;
        if rtt > self.rtt_ns {
            self.rtt_ns = rtt;
        } else {
            let elapsed = now.saturating_duration_since(self.at).as_nanos() as f64;
            let w = (-elapsed / decay.as_nanos().max(1) as f64).exp();
            self.rtt_ns = self.rtt_ns * w + rtt * (1.0 - w);
        }
        self.at = self.at.max(now);
        self.rtt_ns
    }

    /// The estimate decayed towards zero for the idle time since the last update.
    pub fn current(&mut self, now: Instant, decay: Duration) -> f64 {
        self.observe(Duration::ZERO, now, decay)
    }
}

/// Live statistics of one endpoint, shared by the requests that use it.
#[derive(Debug)]
pub struct EndpointStats {
    /// Requests sent and not yet answered with headers.
    in_flight: AtomicU64,
    /// Requests (or TCP connections) ever sent here.
    requests: AtomicU64,
    /// Of those, how many failed before response headers.
    failures: AtomicU64,
    /// The peak-EWMA latency estimate.
    rtt: Mutex<RttEstimate>,
}

impl Default for EndpointStats {
    fn default() -> Self {
        EndpointStats {
            in_flight: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            failures: AtomicU64::new(0),
            rtt: Mutex::new(RttEstimate::new(DEFAULT_RTT, Instant::now())),
        }
    }
}

impl EndpointStats {
    /// The decision's view of this endpoint now, as far as `policy` looks: the latency
    /// estimate (a lock and an `exp`) only for `p2c_ewma` (0 otherwise).
    pub fn candidate(&self, policy: BalancerPolicy, weight: u32, now: Instant) -> Candidate {
        let rtt_ns = match policy {
            BalancerPolicy::P2cEwma => self
                .rtt
                .lock()
                .map(|mut r| r.current(now, DECAY))
                .unwrap_or(DEFAULT_RTT.as_nanos() as f64),
            BalancerPolicy::RoundRobin | BalancerPolicy::LeastRequest => 0.0,
        };
        Candidate {
            weight,
            in_flight: self.in_flight.load(Ordering::Relaxed),
            rtt_ns,
        }
    }

    /// (requests, failures, in-flight, EWMA milliseconds), for `/upstreams`.
    pub fn snapshot(&self) -> (u64, u64, u64, f64) {
        let ewma = self
            .rtt
            .lock()
            .map(|mut r| r.current(Instant::now(), DECAY))
            .unwrap_or(0.0);
        (
            self.requests.load(Ordering::Relaxed),
            self.failures.load(Ordering::Relaxed),
            self.in_flight.load(Ordering::Relaxed),
            ewma / 1e6,
        )
    }
}

/// Something that carries [`EndpointStats`] (the outbound's endpoint).
pub trait HasStats {
    fn stats(&self) -> &EndpointStats;
}

/// One request in flight on an endpoint: counts it while alive, and keeps the endpoint
/// (and its connection pool) alive even after discovery removed it, so the request
/// finishes where it started.
#[derive(Debug)]
pub struct InFlight<E: HasStats> {
    /// The endpoint the request went to.
    pub endpoint: Arc<E>,
    /// When the request was sent.
    start: Instant,
}

impl<E: HasStats> InFlight<E> {
    pub fn start(endpoint: Arc<E>) -> InFlight<E> {
        let s = endpoint.stats();
        s.in_flight.fetch_add(1, Ordering::Relaxed);
        s.requests.fetch_add(1, Ordering::Relaxed);
        InFlight {
            endpoint,
            start: Instant::now(),
        }
    }

    /// Records the time to response headers (`ok`), or a failure penalty, and ends the
    /// request.
    pub fn finish(self, ok: bool) {
        self.record(ok);
    }

    /// Records the time to response headers or to a connection (`ok`), or a failure
    /// penalty, and keeps counting the request (a TCP connection stays in flight).
    pub fn record(&self, ok: bool) {
        let now = Instant::now();
        let s = self.endpoint.stats();
        let rtt = if ok {
            now.saturating_duration_since(self.start)
        } else {
            s.failures.fetch_add(1, Ordering::Relaxed);
            FAILURE_PENALTY
        };
        if let Ok(mut r) = s.rtt.lock() {
            r.observe(rtt, now, DECAY);
        }
    }
}

impl<E: HasStats> Drop for InFlight<E> {
    fn drop(&mut self) {
        self.endpoint
            .stats()
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
    }
}

/// One upstream as the admin server sees it.
pub trait UpstreamView: Send + Sync {
    /// Why this upstream makes meshd not ready (it never had an endpoint).
    fn not_ready_reason(&self) -> Option<String>;
    /// Endpoints, their stats and the resolver status, for `/upstreams`.
    fn view(&self) -> serde_json::Value;
}

/// Every upstream of this sidecar, for readiness and `GET /upstreams`.
#[derive(Default)]
pub struct Upstreams {
    /// In config order.
    pub list: Vec<Arc<dyn UpstreamView>>,
}

impl Upstreams {
    /// The first upstream's reason for not being ready.
    pub fn not_ready_reason(&self) -> Option<String> {
        self.list.iter().find_map(|u| u.not_ready_reason())
    }

    /// `{"upstreams": [...]}` with per-endpoint request counts (kept out of metric labels).
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({ "upstreams": self.list.iter().map(|u| u.view()).collect::<Vec<_>>() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use BalancerPolicy::*;

    fn c(weight: u32, in_flight: u64, rtt_ms: f64) -> Candidate {
        Candidate {
            weight,
            in_flight,
            rtt_ns: rtt_ms * 1e6,
        }
    }

    #[test]
    fn decisions() {
        let fast = c(1, 0, 1.0);
        let slow = c(1, 0, 50.0);
        let busy_fast = c(1, 60, 1.0);
        // (policy, candidates, cursor, rand, expected)
        type Case = (BalancerPolicy, Vec<Candidate>, u64, [u64; 2], Option<usize>);
        let table: Vec<Case> = vec![
            (P2cEwma, vec![], 0, [0, 0], None),
            (P2cEwma, vec![slow], 0, [0, 0], Some(0)),
            // the two draws are distinct: 0 then (of the rest) 1
            (P2cEwma, vec![slow, fast], 0, [0, 0], Some(1)),
            (P2cEwma, vec![fast, slow], 0, [0, 0], Some(0)),
            // a fast endpoint with 60 in flight costs more than an idle slow one
            (P2cEwma, vec![busy_fast, slow], 0, [0, 0], Some(1)),
            // three endpoints: draws 2 and (of 0,1) 1 -> the cheaper of those
            (P2cEwma, vec![fast, slow, slow], 0, [2, 1], Some(2)),
            (P2cEwma, vec![fast, fast, slow], 0, [2, 0], Some(0)),
            // weights divide the cost: weight 100 at 50 ms beats weight 1 at 1 ms
            (
                P2cEwma,
                vec![c(1, 0, 1.0), c(100, 0, 50.0)],
                0,
                [0, 0],
                Some(1),
            ),
            (LeastRequest, vec![busy_fast, slow], 0, [0, 0], Some(1)),
            (
                LeastRequest,
                vec![c(1, 3, 1.0), c(1, 2, 99.0)],
                0,
                [0, 0],
                Some(1),
            ),
            (RoundRobin, vec![fast, slow, fast], 0, [9, 9], Some(0)),
            (RoundRobin, vec![fast, slow, fast], 1, [9, 9], Some(1)),
            (RoundRobin, vec![fast, slow, fast], 5, [9, 9], Some(2)),
            // weighted: 3,1 -> cursor 0..2 go to 0, 3 to 1
            (
                RoundRobin,
                vec![c(3, 0, 1.0), c(1, 0, 1.0)],
                2,
                [0, 0],
                Some(0),
            ),
            (
                RoundRobin,
                vec![c(3, 0, 1.0), c(1, 0, 1.0)],
                3,
                [0, 0],
                Some(1),
            ),
            // weight 0 counts as 1, never divides by zero
            (
                RoundRobin,
                vec![c(0, 0, 1.0), c(0, 0, 1.0)],
                1,
                [0, 0],
                Some(1),
            ),
        ];
        for (i, (policy, cands, cursor, rand, want)) in table.into_iter().enumerate() {
            assert_eq!(choose(policy, &cands, cursor, rand), want, "case {i}");
        }
    }

    #[test]
    fn round_robin_shares_follow_weights() {
        let cands = [c(3, 0, 1.0), c(1, 0, 1.0), c(2, 0, 1.0)];
        let mut counts = [0; 3];
        for cursor in 0..600 {
            counts[choose(RoundRobin, &cands, cursor, [0, 0]).unwrap()] += 1;
        }
        assert_eq!(counts, [300, 100, 200]);
    }

    #[test]
    fn p2c_never_picks_the_dearest_of_three() {
        let cands = [c(1, 0, 1.0), c(1, 0, 2.0), c(1, 0, 50.0)];
        for a in 0..3 {
            for b in 0..2 {
                assert_ne!(choose(P2cEwma, &cands, 0, [a, b]), Some(2));
            }
        }
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let ms = |n: u64| Duration::from_millis(n);
        let mut e = RttEstimate::new(ms(30), t0);
        // a slower sample is taken at once
        assert_eq!(e.observe(ms(50), t0, DECAY), 50e6);
        // a faster sample right away barely moves it
        let v = e.observe(ms(1), t0 + ms(1), DECAY);
        assert!(v > 49e6 && v < 50e6, "{v}");
        // after one decay period, two thirds of the way to the sample
        let v = e.observe(ms(1), t0 + ms(1) + DECAY, DECAY);
        assert!((v - (1e6 + 49e6 / std::f64::consts::E)).abs() < 1e5, "{v}");
        // idle time decays towards zero
        let before = e.current(t0 + ms(1) + DECAY, DECAY);
        let after = e.current(t0 + ms(1) + DECAY * 4, DECAY);
        assert!(after < before / 10.0, "{before} {after}");
    }

    struct Ep(EndpointStats);
    impl HasStats for Ep {
        fn stats(&self) -> &EndpointStats {
            &self.0
        }
    }

    #[test]
    fn in_flight_guard_counts_and_records() {
        let ep = Arc::new(Ep(EndpointStats::default()));
        let a = InFlight::start(ep.clone());
        let b = InFlight::start(ep.clone());
        assert_eq!(ep.0.snapshot().2, 2);
        a.finish(true);
        b.finish(false);
        let (requests, failures, in_flight, ewma_ms) = ep.0.snapshot();
        assert_eq!((requests, failures, in_flight), (2, 1, 0));
        assert!(ewma_ms > 900.0, "a failure is penalised: {ewma_ms}");
    }
}
