//! `Policy::authorize` cost at 10 and 1,000 rules.
//!
//! Before the criterion runs, `main` proves two claims of the design and fails loudly
//! otherwise: `authorize` never allocates (a counting global allocator sees zero
//! allocations over many calls), and its p99 latency for a 1,000-rule policy is under
//! 1 µs (measured per call, printed with p50/p99).

use criterion::{criterion_group, Criterion};
use meshd::config::parse_spiffe_id;
use meshd::identity::SpiffeId;
use meshd::policy::{parse_policy, Policy, Request, Target};
use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Counts allocations so the zero-allocation claim is checked, not assumed.
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// A policy of about `n` rules shaped like a big mesh: mostly exact workload IDs, some
/// namespace prefixes, a few denies and whole partner trust domains, plus health.
fn policy(n: usize) -> Policy {
    let mut y = String::from("service: payment-service\ndefault: deny\nrules:\n");
    for i in 0..n {
        let rule = match i % 20 {
            0 => format!("  - {{name: r{i}, action: deny, from: [\"spiffe://jia.app/bad-{i}\"]}}\n"),
            1 => format!("  - {{name: r{i}, from: [\"spiffe://jia.app/ns/team-{i}/*\"], to: {{grpc: [\"payment.v1.PaymentService/GetPayment\"]}}}}\n"),
            2 => format!("  - {{name: r{i}, from: [\"spiffe://partner-{i}.example/*\"], to: {{grpc: [\"grpc.health.v1.Health/Check\"]}}}}\n"),
            3 => format!("  - {{name: r{i}, from: [\"spiffe://jia.app/web-{i}\"], to: {{http: [{{methods: [GET, POST], paths: [\"/api/v1/*\", \"/healthz\"]}}], ports: [15006]}}}}\n"),
            _ => format!("  - {{name: r{i}, from: [\"spiffe://jia.app/svc-{i}\"], to: {{grpc: [\"svc{i}.v1.Service/*\", \"payment.v1.PaymentService/*\"]}}}}\n"),
        };
        y.push_str(&rule);
    }
    y.push_str("  - {name: health, from: [\"spiffe://jia.app/*\"], to: {grpc: [\"grpc.health.v1.Health/Check\"]}}\n");
    match parse_policy(&y, Path::new("bench.yaml"), 1) {
        Ok((p, _)) => p,
        Err(e) => panic!("bench policy: {e:?}"),
    }
}

/// (label, peer, target) cases: exact allow, prefix allow, deny, default deny, http.
fn cases(n: usize) -> Vec<(&'static str, SpiffeId, Target<'static>)> {
    let id = |s: String| parse_spiffe_id(&s).expect("bench id");
    let grpc = |service, method| Target {
        port: 15006,
        request: Request::Grpc { service, method },
    };
    let last = |k: usize| (0..n).rev().find(|i| i % 20 == k).unwrap_or(0);
    vec![
        (
            "exact_allow",
            id(format!("spiffe://jia.app/svc-{}", last(5))),
            grpc("payment.v1.PaymentService", "CreatePayment"),
        ),
        (
            "prefix_allow",
            id(format!("spiffe://jia.app/ns/team-{}/deep/sa", last(1))),
            grpc("payment.v1.PaymentService", "GetPayment"),
        ),
        (
            "exact_deny",
            id(format!("spiffe://jia.app/bad-{}", last(0))),
            grpc("grpc.health.v1.Health", "Check"),
        ),
        (
            "default_deny",
            id("spiffe://jia.app/ns/unknown/a/b/c".into()),
            grpc("payment.v1.PaymentService", "CreatePayment"),
        ),
        (
            "http_allow",
            id(format!("spiffe://jia.app/web-{}", last(3))),
            Target {
                port: 15006,
                request: Request::Http {
                    method: "POST",
                    path: "/api/v1/payments?x=1",
                },
            },
        ),
    ]
}

fn bench(c: &mut Criterion) {
    for n in [10, 1000] {
        let p = policy(n);
        let mut group = c.benchmark_group(format!("authorize/{n}_rules"));
        for (label, peer, target) in cases(n) {
            group.bench_function(label, |b| {
                b.iter(|| black_box(p.authorize(black_box(&peer), black_box(&target))))
            });
        }
        group.finish();
    }
}

/// Fails unless `authorize` is allocation-free and its p99 is under 1 µs at 1,000 rules.
fn prove_claims() {
    for n in [10, 1000] {
        let p = policy(n);
        let cases = cases(n);
        let before = ALLOCATIONS.load(Ordering::Relaxed);
        for _ in 0..10_000 {
            for (_, peer, target) in &cases {
                black_box(p.authorize(black_box(peer), black_box(target)));
            }
        }
        let allocated = ALLOCATIONS.load(Ordering::Relaxed) - before;
        assert_eq!(
            allocated, 0,
            "authorize allocated {allocated} times at {n} rules"
        );
        let mut samples: Vec<u64> = Vec::with_capacity(200_000);
        for _ in 0..40_000 {
            for (_, peer, target) in &cases {
                let t = Instant::now();
                black_box(p.authorize(black_box(peer), black_box(target)));
                samples.push(t.elapsed().as_nanos() as u64);
            }
        }
        samples.sort_unstable();
        let pct = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
        println!(
            "authorize {n} rules: 0 allocations in {} calls; per-call p50 {} ns, p99 {} ns, p99.9 {} ns (incl. ~timer overhead)",
            10_000 * cases.len(),
            pct(0.5),
            pct(0.99),
            pct(0.999)
        );
        assert!(
            pct(0.99) < 1_000,
            "p99 {} ns is over 1 µs at {n} rules",
            pct(0.99)
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    prove_claims();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
