//! The eligible set as a user of a big upstream would see it: picks spread evenly (round
//! robin exactly by weight, the power of two choices roughly), an endpoint that is ejected
//! or fails its health check gets no request from the moment it does, comes back after
//! its return is noticed, and when every endpoint is out they all share the traffic. The
//! O(1) picks agree with the exact scan wherever the scan's choice is deterministic.

use super::*;
use crate::outbound::balancer::{EndpointStats, InFlight};
use std::sync::atomic::AtomicBool;
use BalancerPolicy::*;

/// A test endpoint: an address, a weight, statistics and an on/off eligibility switch.
#[derive(Debug)]
struct Fake {
    addr: SocketAddr,
    weight: u32,
    stats: EndpointStats,
    out: AtomicBool,
}

impl HasStats for Fake {
    fn stats(&self) -> &EndpointStats {
        &self.stats
    }
}

impl Pickable for Fake {
    fn addr(&self) -> SocketAddr {
        self.addr
    }
    fn weight(&self) -> u32 {
        self.weight
    }
    fn eligible(&self, _now: Instant) -> bool {
        !self.out.load(Ordering::Relaxed)
    }
}

fn fakes(weights: &[u32]) -> Arc<Vec<Arc<Fake>>> {
    Arc::new(
        weights
            .iter()
            .enumerate()
            .map(|(k, &weight)| {
                Arc::new(Fake {
                    addr: SocketAddr::from(([10, 0, (k >> 8) as u8, k as u8], 8443)),
                    weight,
                    stats: EndpointStats::default(),
                    out: AtomicBool::new(false),
                })
            })
            .collect(),
    )
}

fn uniform(n: usize) -> Arc<Vec<Arc<Fake>>> {
    fakes(&vec![1; n])
}

/// A fixed-seed xorshift: the same draws on every run, so no test is flaky.
fn rng(seed: u64) -> impl FnMut() -> u64 {
    let mut x = seed.max(1);
    move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    }
}

/// `picks` picks from `set` with nothing tried, as `Outbound::pick` makes them; counts per
/// endpoint index. With `hold`,
/// every picked request stays in flight until the end (as under load), so the power of
/// two choices see the load they made.
fn spread(set: &EligibleSet<Fake>, policy: BalancerPolicy, picks: u64, hold: bool) -> Vec<u64> {
    let now = Instant::now();
    let mut counts = vec![0; set.all().len()];
    let mut held = Vec::new();
    let mut rand = rng(7);
    for cursor in 0..picks {
        // as `Outbound::pick` does: the scan when the draws found nothing
        let i = match set.pick(policy, &[], now, cursor, &mut rand) {
            Drawn::Chosen(i) => i,
            Drawn::Scan => pick_scan(policy, set.all(), &[], now, cursor, [rand(), rand()])
                .expect("the scan finds one"),
            Drawn::Empty => panic!("pick {cursor}: empty"),
        };
        counts[i] += 1;
        if hold {
            held.push(InFlight::start(set.all()[i].clone()));
        }
    }
    counts
}

#[test]
fn build_splits_by_eligibility_and_weights() {
    let now = Instant::now();
    // (weights, ineligible indices) -> (pool, out, panic, cumulative)
    type Case = (Vec<u32>, Vec<usize>, Vec<u32>, Vec<u32>, bool, Vec<u64>);
    let table: Vec<Case> = vec![
        (vec![], vec![], vec![], vec![], false, vec![]),
        (vec![1, 1, 1], vec![], vec![0, 1, 2], vec![], false, vec![]),
        (vec![1, 1, 1], vec![1], vec![0, 2], vec![1], false, vec![]),
        // none eligible: every endpoint is pooled (panic routing), all are probed
        (vec![1, 1], vec![0, 1], vec![0, 1], vec![0, 1], true, vec![]),
        // differing weights get running totals; 0 counts as 1
        (
            vec![3, 0, 2],
            vec![],
            vec![0, 1, 2],
            vec![],
            false,
            vec![3, 4, 6],
        ),
        // the ineligible heavy one leaves the equal ones: no totals needed
        (vec![5, 2, 2], vec![0], vec![1, 2], vec![0], false, vec![]),
    ];
    for (i, (weights, ineligible, pool, out, panic, cumulative)) in table.into_iter().enumerate() {
        let all = fakes(&weights);
        for k in ineligible {
            all[k].out.store(true, Ordering::Relaxed);
        }
        let set = EligibleSet::build(all, now);
        assert_eq!(
            (
                set.pool.clone(),
                set.out.clone(),
                set.panic(),
                set.cumulative.clone()
            ),
            (pool, out, panic, cumulative),
            "case {i}"
        );
    }
}

#[test]
fn empty_set_picks_nothing() {
    let set = EligibleSet::build(uniform(0), Instant::now());
    for policy in [P2cEwma, RoundRobin, LeastRequest] {
        assert_eq!(
            set.pick(policy, &[], Instant::now(), 0, rng(1)),
            Drawn::Empty
        );
        assert_eq!(
            pick_scan(policy, set.all(), &[], Instant::now(), 0, [0, 0]),
            None
        );
    }
}

#[test]
fn round_robin_matches_the_scan_cursor_for_cursor() {
    let now = Instant::now();
    for weights in [vec![1; 7], vec![2; 5], vec![3, 1, 2], vec![0, 5, 1, 1, 9]] {
        let set = EligibleSet::build(fakes(&weights), now);
        for cursor in 0..500 {
            let fast = set.pick(RoundRobin, &[], now, cursor, rng(1));
            let scan = pick_scan(RoundRobin, set.all(), &[], now, cursor, [0, 0]);
            assert_eq!(
                fast,
                Drawn::Chosen(scan.unwrap()),
                "{weights:?} cursor {cursor}"
            );
        }
    }
}

#[test]
fn round_robin_shares_are_exact_over_10k_picks() {
    let set = EligibleSet::build(uniform(100), Instant::now());
    assert_eq!(spread(&set, RoundRobin, 10_000, false), vec![100; 100]);
    let set = EligibleSet::build(fakes(&[3, 1, 2, 4]), Instant::now());
    assert_eq!(
        spread(&set, RoundRobin, 10_000, false),
        vec![3_000, 1_000, 2_000, 4_000]
    );
}

#[test]
fn power_of_two_choices_spread_evenly_over_10k_picks() {
    // Idle endpoints with equal in-flight counts: the first draw wins, so shares follow
    // the (uniform) draws.
    let set = EligibleSet::build(uniform(10), Instant::now());
    let counts = spread(&set, LeastRequest, 10_000, false);
    assert!(
        counts.iter().all(|&c| (800..1200).contains(&c)),
        "{counts:?}"
    );
    for policy in [P2cEwma, LeastRequest] {
        // Requests kept in flight: each pick avoids the busier of two, so the load
        // evens out closely.
        let set = EligibleSet::build(uniform(10), Instant::now());
        let counts = spread(&set, policy, 10_000, true);
        assert!(
            counts.iter().all(|&c| (950..1050).contains(&c)),
            "{policy:?}: {counts:?}"
        );
        // weights 1 and 3: the heavier carries about three times the load
        let set = EligibleSet::build(fakes(&[1, 3, 1, 3]), Instant::now());
        let counts = spread(&set, policy, 10_000, true);
        assert!(
            counts[1] > 2 * counts[0] && counts[3] > 2 * counts[2],
            "{policy:?}: {counts:?}"
        );
    }
}

#[test]
fn two_choices_take_the_cheaper_endpoint() {
    let all = uniform(2);
    let busy: Vec<_> = (0..5).map(|_| InFlight::start(all[0].clone())).collect();
    let set = EligibleSet::build(all, Instant::now());
    // with two endpoints both are always drawn: the idle one always wins
    assert_eq!(spread(&set, LeastRequest, 1_000, false), vec![0, 1_000]);
    assert_eq!(spread(&set, P2cEwma, 1_000, false), vec![0, 1_000]);
    drop(busy);
    // once the other is busy, it wins instead
    let _busy = InFlight::start(set.all()[1].clone());
    assert_eq!(spread(&set, LeastRequest, 1_000, false), vec![1_000, 0]);
}

#[test]
fn an_endpoint_turned_ineligible_is_never_picked_and_marks_the_set_stale() {
    let all = uniform(1_000);
    let set = EligibleSet::build(all.clone(), Instant::now());
    for k in (0..1_000).step_by(10) {
        all[k].out.store(true, Ordering::Relaxed);
    }
    for policy in [P2cEwma, RoundRobin, LeastRequest] {
        let counts = spread(&set, policy, 10_000, true);
        let to_out: u64 = (0..1_000).step_by(10).map(|k| counts[k]).sum();
        assert_eq!(to_out, 0, "{policy:?}");
    }
    assert!(
        set.probe(0, Instant::now()),
        "drawing an ejected endpoint marks the set stale"
    );
    // the rebuilt set leaves them out and has nothing to notice
    let set = EligibleSet::build(all, Instant::now());
    assert_eq!((set.pool_len(), set.probe(0, Instant::now())), (900, false));
}

#[test]
fn a_returning_endpoint_is_noticed_within_as_many_picks_as_are_out() {
    let all = uniform(100);
    for k in 0..4 {
        all[k].out.store(true, Ordering::Relaxed);
    }
    let set = EligibleSet::build(all.clone(), Instant::now());
    let now = Instant::now();
    assert!(!(0..4).any(|cursor| set.probe(cursor, now)));
    all[2].out.store(false, Ordering::Relaxed);
    assert!((0..4).any(|cursor| set.probe(cursor, now)));
    let set = EligibleSet::build(all, now);
    assert_eq!(set.pool_len(), 97);
}

#[test]
fn when_every_endpoint_is_out_all_share_the_traffic() {
    let all = uniform(10);
    for e in all.iter() {
        e.out.store(true, Ordering::Relaxed);
    }
    let set = EligibleSet::build(all.clone(), Instant::now());
    assert!(set.panic());
    for policy in [P2cEwma, RoundRobin, LeastRequest] {
        let counts = spread(&set, policy, 10_000, true);
        assert!(counts.iter().all(|&c| c > 500), "{policy:?}: {counts:?}");
    }
    // as in the scan, tried endpoints are not passed over in panic routing
    let tried = [all[0].addr];
    let now = Instant::now();
    assert_eq!(
        set.pick(RoundRobin, &tried, now, 0, rng(3)),
        Drawn::Chosen(0)
    );
    assert_eq!(pick_scan(RoundRobin, &all, &tried, now, 0, [0, 0]), Some(0));
    // one comes back: the set is stale (rebuilt, it is the only one pooled)
    all[3].out.store(false, Ordering::Relaxed);
    assert!((0..10).any(|cursor| set.probe(cursor, Instant::now())));
    let set = EligibleSet::build(all, Instant::now());
    assert_eq!(spread(&set, P2cEwma, 100, false)[3], 100);
}

#[test]
fn tried_endpoints_are_passed_over_while_another_is_left() {
    let now = Instant::now();
    let all = uniform(1_000);
    let set = EligibleSet::build(all.clone(), now);
    let tried: Vec<_> = all.iter().step_by(10).map(|e| e.addr).collect();
    for policy in [P2cEwma, RoundRobin, LeastRequest] {
        let mut rand = rng(5);
        for cursor in 0..2_000 {
            let i = match set.pick(policy, &tried, now, cursor, &mut rand) {
                Drawn::Chosen(i) => i,
                Drawn::Scan => {
                    pick_scan(policy, &all, &tried, now, cursor, [rand(), rand()]).unwrap()
                }
                Drawn::Empty => panic!("empty"),
            };
            assert!(
                i % 10 != 0,
                "{policy:?} cursor {cursor}: picked tried endpoint {i}"
            );
        }
    }
    // two endpoints, one tried: the draws cannot find two, the scan gives the other
    let all = uniform(2);
    let set = EligibleSet::build(all.clone(), now);
    let tried = [all[0].addr];
    for policy in [P2cEwma, LeastRequest] {
        assert_eq!(set.pick(policy, &tried, now, 0, rng(9)), Drawn::Scan);
        assert_eq!(pick_scan(policy, &all, &tried, now, 0, [0, 0]), Some(1));
    }
    assert_eq!(
        set.pick(RoundRobin, &tried, now, 0, rng(9)),
        Drawn::Chosen(1)
    );
    // every endpoint tried: the scan reuses an eligible one rather than failing
    let tried = [all[0].addr, all[1].addr];
    assert_eq!(set.pick(P2cEwma, &tried, now, 0, rng(9)), Drawn::Scan);
    assert!(pick_scan(P2cEwma, &all, &tried, now, 0, [0, 0]).is_some());
}

#[test]
fn weighted_slots_follow_the_running_totals() {
    let set = EligibleSet::build(fakes(&[3, 1, 2]), Instant::now());
    let slots: Vec<_> = (0..8).map(|x| set.slot(x)).collect();
    assert_eq!(slots, [0, 0, 0, 1, 2, 2, 0, 0]);
    let set = EligibleSet::build(fakes(&[2, 2, 2]), Instant::now());
    let slots: Vec<_> = (0..8).map(|x| set.slot(x)).collect();
    assert_eq!(slots, [0, 0, 1, 1, 2, 2, 0, 0]);
    // u64::MAX does not overflow either form
    assert!(set.slot(u64::MAX) < 3);
    // the weights the costs divide by, read back from the set (0 counts as 1)
    for weights in [vec![3, 0, 2], vec![2, 2, 2], vec![1]] {
        let set = EligibleSet::build(fakes(&weights), Instant::now());
        let read: Vec<_> = (0..weights.len()).map(|k| set.weight(k)).collect();
        let want: Vec<_> = weights.iter().map(|w| (*w).max(1)).collect();
        assert_eq!(read, want);
    }
}
