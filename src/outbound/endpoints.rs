//! The endpoints of one upstream as the balancer keeps them between requests, so that a
//! pick looks at two endpoints (or one) whatever the upstream's size.
//!
//! Flow: the outbound listener builds an [`EligibleSet`] from its endpoint list when
//! discovery publishes a new set and when it ejects an endpoint (rare events): the
//! endpoints eligible then (not ejected by outlier detection, not failing active health
//! checks) form the *pool*, with their running weight totals when weights differ. A pick
//! ([`EligibleSet::pick`]) draws from the pool — one slot from the round-robin cursor, or
//! two distinct random ones, weighted, compared by peak-EWMA cost or requests in flight —
//! and checks each drawn endpoint's eligibility live, so an endpoint that turned ineligible
//! since is never used; drawing it marks the set stale. Each pick also looks at one
//! endpoint left out of the pool ([`EligibleSet::probe`]), so one whose ejection ended or
//! whose health check passes again marks the set stale within a few picks; the listener
//! then rebuilds it. When the draws find nothing usable (a tiny pool, every pooled endpoint
//! tried by this request's earlier attempts), the pick falls back to [`pick_scan`], the
//! exact per-request scan over every endpoint. When no endpoint is eligible at all, the
//! pool is every endpoint (Envoy's panic routing), as in the scan.

use crate::config::BalancerPolicy;
use crate::outbound::balancer::{self, HasStats};
use smallvec::SmallVec;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// How many draws (random, or round-robin steps) look for a usable endpoint before the
/// pick falls back to the scan. Ineligible endpoints leave the pool at the next rebuild,
/// so in steady state only this request's tried endpoints are passed over.
const DRAWS: usize = 8;

/// What the balancer needs of one endpoint besides its statistics.
pub trait Pickable: HasStats {
    /// Where it listens (what a request's `tried` list names).
    fn addr(&self) -> SocketAddr;
    /// Its relative share of traffic (0 counts as 1).
    fn weight(&self) -> u32;
    /// Whether new requests may go to it now.
    fn eligible(&self, now: Instant) -> bool;
}

/// How a pick from the pool ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drawn {
    /// This index into [`EligibleSet::all`].
    Chosen(usize),
    /// There is no endpoint at all.
    Empty,
    /// The draws found nothing usable: scan every endpoint ([`pick_scan`]).
    Scan,
}

/// One upstream's endpoints, split into those requests are balanced over and those left
/// out, as of the last rebuild. Immutable but for the stale flag; replaced whole.
#[derive(Debug)]
pub struct EligibleSet<E> {
    /// Every endpoint, in the published (address) order.
    all: Arc<Vec<Arc<E>>>,
    /// Indices into `all` that picks draw from: the endpoints eligible at the rebuild, or
    /// every endpoint when none was (panic routing).
    pool: Vec<u32>,
    /// Running totals of the pool's weights (each at least 1), when they differ; empty
    /// when every pooled endpoint has the same weight.
    cumulative: Vec<u64>,
    /// The weight every pooled endpoint has when `cumulative` is empty.
    uniform_weight: u64,
    /// Indices into `all` of the endpoints not eligible at the rebuild; each pick looks at
    /// one of them to notice its return.
    out: Vec<u32>,
    /// Whether no endpoint was eligible at the rebuild (the pool is every endpoint).
    panic: bool,
    /// Set when a pick saw an endpoint whose eligibility changed since the rebuild.
    stale: AtomicBool,
}

impl<E: Pickable> EligibleSet<E> {
    /// Splits `all` by eligibility at `now` and sums the pool's weights: O(n), on rebuilds.
    pub fn build(all: Arc<Vec<Arc<E>>>, now: Instant) -> EligibleSet<E> {
        let (mut pool, mut out) = (Vec::with_capacity(all.len()), Vec::new());
        for (i, e) in all.iter().enumerate() {
            if e.eligible(now) {
                pool.push(i as u32);
            } else {
                out.push(i as u32);
            }
        }
        let panic = pool.is_empty() && !all.is_empty();
        if panic {
            pool = (0..all.len() as u32).collect();
        }
        let weight = |i: &u32| u64::from(all[*i as usize].weight().max(1));
        let uniform_weight = pool.first().map_or(1, weight);
        let cumulative = if pool.iter().all(|i| weight(i) == uniform_weight) {
            Vec::new()
        } else {
            pool.iter()
                .scan(0u64, |sum, i| {
                    *sum += weight(i);
                    Some(*sum)
                })
                .collect()
        };
        EligibleSet {
            all,
            pool,
            cumulative,
            uniform_weight,
            out,
            panic,
            stale: AtomicBool::new(false),
        }
    }

    /// Every endpoint, in the published order.
    pub fn all(&self) -> &Arc<Vec<Arc<E>>> {
        &self.all
    }

    /// How many endpoints picks draw from (every endpoint in panic routing).
    #[cfg(test)]
    pub fn pool_len(&self) -> usize {
        self.pool.len()
    }

    /// Whether no endpoint was eligible at the rebuild.
    #[cfg(test)]
    pub fn panic(&self) -> bool {
        self.panic
    }

    /// Looks at the `cursor`-th endpoint left out of the pool (one per pick, in turn):
    /// if it is eligible again, the set is stale. Returns whether the set is stale.
    pub fn probe(&self, cursor: u64, now: Instant) -> bool {
        if !self.out.is_empty() {
            let i = self.out[(cursor % self.out.len() as u64) as usize] as usize;
            if self.all[i].eligible(now) {
                self.stale.store(true, Ordering::Relaxed);
            }
        }
        self.stale.load(Ordering::Relaxed)
    }

    /// The pool slot whose weight range holds `x` (taken modulo the total weight), as
    /// `balancer::choose` counts: O(1) for equal weights, a binary search otherwise.
    fn slot(&self, x: u64) -> usize {
        let n = self.pool.len() as u64;
        match self.cumulative.last() {
            None => ((x % (n * self.uniform_weight)) / self.uniform_weight) as usize,
            Some(total) => {
                let x = x % total;
                self.cumulative.partition_point(|&c| c <= x)
            }
        }
    }

    /// The weight (at least 1) of the endpoint in pool slot `k`, from the set's own arrays
    /// (one memory access fewer per drawn endpoint).
    fn weight(&self, k: usize) -> u32 {
        if self.cumulative.is_empty() {
            return self.uniform_weight as u32;
        }
        let before = if k == 0 { 0 } else { self.cumulative[k - 1] };
        // One endpoint's weight: it came from a u32.
        (self.cumulative[k] - before) as u32
    }

    /// Whether the endpoint in pool slot `k` may take this request: eligible now (the
    /// set goes stale when not) and not in `tried`. In panic routing every endpoint may,
    /// tried or not, as in the scan.
    fn usable(&self, k: usize, tried: &[SocketAddr], now: Instant) -> bool {
        let e = &self.all[self.pool[k] as usize];
        let eligible = e.eligible(now);
        if eligible == self.panic {
            self.stale.store(true, Ordering::Relaxed);
        }
        self.panic || (eligible && (tried.is_empty() || !tried.contains(&e.addr())))
    }

    /// A weighted random pool slot that is usable and not `other`, within [`DRAWS`].
    fn draw(
        &self,
        tried: &[SocketAddr],
        now: Instant,
        other: Option<usize>,
        rand: &mut impl FnMut() -> u64,
    ) -> Option<usize> {
        (0..DRAWS)
            .map(|_| self.slot(rand()))
            .find(|&k| Some(k) != other && self.usable(k, tried, now))
    }

    /// Picks an endpoint for one request (see the module docs): `cursor` is the
    /// round-robin counter, `rand` yields random numbers. O(1) for equal weights,
    /// O(log n) otherwise.
    pub fn pick(
        &self,
        policy: BalancerPolicy,
        tried: &[SocketAddr],
        now: Instant,
        cursor: u64,
        mut rand: impl FnMut() -> u64,
    ) -> Drawn {
        let n = self.pool.len();
        if n == 0 {
            return Drawn::Empty;
        }
        let chosen = |k: usize| Drawn::Chosen(self.pool[k] as usize);
        if n == 1 {
            return if self.usable(0, tried, now) {
                chosen(0)
            } else {
                Drawn::Scan
            };
        }
        if policy == BalancerPolicy::RoundRobin {
            let start = self.slot(cursor);
            return (0..DRAWS.min(n))
                .map(|step| (start + step) % n)
                .find(|&k| self.usable(k, tried, now))
                .map_or(Drawn::Scan, chosen);
        }
        let Some(a) = self.draw(tried, now, None, &mut rand) else {
            return Drawn::Scan;
        };
        let Some(b) = self.draw(tried, now, Some(a), &mut rand) else {
            // Possibly the only usable one: the scan knows.
            return Drawn::Scan;
        };
        let cost = |k: usize| {
            let e = &self.all[self.pool[k] as usize];
            balancer::cost(policy, &e.stats().candidate(policy, self.weight(k), now))
        };
        chosen(if cost(b) < cost(a) { b } else { a })
    }
}

/// The exact pick by scanning every endpoint, for when the draws found nothing: those
/// eligible and not in `tried`; else those eligible; else all (panic routing); then
/// [`balancer::choose`] over them. O(n).
pub fn pick_scan<E: Pickable>(
    policy: BalancerPolicy,
    all: &[Arc<E>],
    tried: &[SocketAddr],
    now: Instant,
    cursor: u64,
    rand: [u64; 2],
) -> Option<usize> {
    let usable = |e: &E| e.eligible(now);
    let fresh = |e: &E| usable(e) && !tried.contains(&e.addr());
    let filter: &dyn Fn(&E) -> bool = if all.iter().any(|e| fresh(e)) {
        &fresh
    } else if all.iter().any(|e| usable(e)) {
        &usable
    } else {
        &|_| true
    };
    // On the stack for up to 16 endpoints: no allocation for small upstreams.
    let (idx, cands): (SmallVec<[usize; 16]>, SmallVec<[_; 16]>) = all
        .iter()
        .enumerate()
        .filter(|(_, e)| filter(e))
        .map(|(i, e)| (i, e.stats().candidate(policy, e.weight(), now)))
        .unzip();
    let i = balancer::choose(policy, &cands, cursor, rand)?;
    idx.get(i).copied()
}

#[cfg(test)]
mod tests;
