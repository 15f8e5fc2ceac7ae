//! Scale curve 2 (issue 23): how meshd's policy cost grows with the number of rules.
//!
//! Flow: for each size (10 to 100,000 rules) and shape (exact IDs, trust-domain and path
//! prefixes, gRPC methods, a mix of all four) `main` generates the policy as YAML text,
//! writes it to a file and loads it through the [`PolicyStore`] meshd uses (read, parse,
//! validate, compile, swap), timing the load and counting the heap bytes the loaded
//! policy holds (a counting global allocator). It checks that a set of allowed and
//! denied probe callers get the decision the generator meant (so the timings measure the
//! right thing), then times `authorize` per call over a mix of them and reports p50/p99
//! from the samples. Last, a reload of the same file runs on another thread while this
//! one keeps deciding (`PolicyStore::decide`, the per-request call): the worst decision
//! seen during the reload is reported beside the p99 and the worst of an equally long
//! window without one. A markdown table is printed at the end; a criterion group of
//! `authorize` (mixed shape) runs after it.
//!
//! `MESHD_SCALE_QUICK=1` (the CI smoke), or any run without `--bench` (`cargo test`):
//! sizes 10 and 1,000, few samples. `cargo bench --bench NAME` runs the full curve.
//! `MESHD_SCALE_SIZES=10,100`: other sizes; `MESHD_SCALE_SHAPES=exact,prefix,grpc,mixed`:
//! some shapes only.

mod common;

use criterion::Criterion;
use meshd::config::parse_spiffe_id;
use meshd::identity::SpiffeId;
use meshd::policy::{PolicyStore, Request, Target};
use mimalloc::MiMalloc;
use std::alloc::{GlobalAlloc, Layout};
use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Counts allocations and the bytes live, so a loaded policy's heap is measured, over
/// mimalloc, the allocator meshd runs with (glibc's malloc made a 100k-rule reload 20-30 %
/// slower than meshd's).
struct Counting;

static ALLOCATIONS: AtomicU64 = AtomicU64::new(0);
static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// What the rules of one policy look like.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// One workload ID per rule (every tenth a deny).
    Exact,
    /// Half whole trust domains (`spiffe://tdN.example/*`), half path prefixes.
    Prefix,
    /// A caller with ten rules of one gRPC method each.
    Grpc,
    /// The three above interleaved.
    Mixed,
}

impl Shape {
    /// The name `MESHD_SCALE_SHAPES` uses.
    fn key(self) -> &'static str {
        match self {
            Shape::Exact => "exact",
            Shape::Prefix => "prefix",
            Shape::Grpc => "grpc",
            Shape::Mixed => "mixed",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Shape::Exact => "exact IDs",
            Shape::Prefix => "prefixes",
            Shape::Grpc => "gRPC methods",
            Shape::Mixed => "mixed",
        }
    }
}

/// A caller and request whose decision the generator knows.
struct Probe {
    peer: SpiffeId,
    target: Target<'static>,
    allow: bool,
}

fn leak(s: String) -> &'static str {
    Box::leak(s.into_boxed_str())
}

fn probe(id: String, service: &'static str, method: String, allow: bool) -> Probe {
    Probe {
        peer: parse_spiffe_id(&id).unwrap_or_else(|e| panic!("probe id {id}: {e:?}")),
        target: Target {
            port: 15006,
            request: Request::Grpc {
                service,
                method: leak(method),
            },
        },
        allow,
    }
}

/// Rule `i` of a policy of `shape` as one YAML line, with an allowed-or-denied probe
/// that this rule decides and a probe that no rule matches (default deny).
fn rule(shape: Shape, i: usize) -> (String, Probe, Probe) {
    let kind = match shape {
        Shape::Exact => 0,
        Shape::Prefix => 1 + (i % 2) * 2,
        Shape::Grpc => 2,
        Shape::Mixed => i % 4,
    };
    let svc = "payment.v1.Payments";
    match kind {
        0 => {
            let deny = i.is_multiple_of(10);
            let action = if deny { ", action: deny" } else { "" };
            (
                format!("  - {{name: r{i}{action}, from: [\"spiffe://jia.app/sa/{i}\"]}}\n"),
                probe(format!("spiffe://jia.app/sa/{i}"), svc, "Get".into(), !deny),
                probe(
                    format!("spiffe://jia.app/sa/{i}/x"),
                    svc,
                    "Get".into(),
                    false,
                ),
            )
        }
        1 => (
            format!("  - {{name: r{i}, from: [\"spiffe://jia.app/ns/{i}/*\"]}}\n"),
            probe(
                format!("spiffe://jia.app/ns/{i}/sa/w"),
                svc,
                "Get".into(),
                true,
            ),
            probe(
                format!("spiffe://jia.app/ns/{i}x/sa/w"),
                svc,
                "Get".into(),
                false,
            ),
        ),
        2 => {
            let service = leak(format!("p{}.v1.S", i % 10));
            let caller = format!("spiffe://jia.app/g/{}", i / 10);
            (
                format!(
                    "  - {{name: r{i}, from: [\"{caller}\"], to: {{grpc: [\"{service}/M{i}\"]}}}}\n"
                ),
                probe(caller.clone(), service, format!("M{i}"), true),
                probe(caller, service, format!("N{i}"), false),
            )
        }
        _ => (
            format!("  - {{name: r{i}, from: [\"spiffe://td{i}.example/*\"]}}\n"),
            probe(format!("spiffe://td{i}.example/w"), svc, "Get".into(), true),
            probe(
                format!("spiffe://tx{i}.example/w"),
                svc,
                "Get".into(),
                false,
            ),
        ),
    }
}

/// The policy text and up to 128 probes spread evenly over its rules.
fn generate(shape: Shape, n: usize) -> (String, Vec<Probe>) {
    let mut text = String::with_capacity(n * 90 + 64);
    text.push_str("service: payment-service\ndefault: deny\nrules:\n");
    let step = (n / 64).max(1);
    let mut probes = Vec::new();
    for i in 0..n {
        let (line, a, b) = rule(shape, i);
        text.push_str(&line);
        if i.is_multiple_of(step) && probes.len() < 128 {
            probes.push(a);
            probes.push(b);
        }
    }
    (text, probes)
}

/// Percentile `q` of sorted samples.
fn pct(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * q) as usize]
}

/// How much work each measurement does.
struct Effort {
    /// Rounds over all probes for the per-call latency samples.
    rounds: usize,
    /// Loads timed per size (the median is reported); large sizes load once.
    loads: usize,
}

/// One row of the table.
struct Row {
    shape: Shape,
    rules: usize,
    file_bytes: usize,
    heap_bytes: i64,
    load: Duration,
    authorize_p50: u64,
    authorize_p99: u64,
    decide_p99: u64,
    decide_worst_idle: u64,
    reload: Duration,
    decide_worst_reload: u64,
    decide_p99_reload: u64,
}

fn measure(shape: Shape, n: usize, effort: &Effort, dir: &std::path::Path) -> Row {
    let (text, probes) = generate(shape, n);
    let path = dir.join(format!("policy-{n}.yaml"));
    std::fs::write(&path, &text).expect("write the policy file");
    let file_bytes = text.len();
    drop(text);

    // Load: file -> ready policy, through the store meshd uses. The heap the loaded
    // policy holds is what the first load leaves allocated.
    let mut loads = Vec::new();
    let mut store = None;
    let mut heap_bytes = 0;
    for _ in 0..effort.loads.max(1) {
        drop(store.take());
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let s = PolicyStore::new(&path);
        let t = Instant::now();
        if let Err(problems) = s.reload() {
            let shown: Vec<String> = problems.iter().take(3).map(|p| p.to_string()).collect();
            panic!(
                "{} policy of {n} rules does not load: {shown:?}",
                shape.name()
            );
        }
        loads.push(t.elapsed());
        heap_bytes = LIVE_BYTES.load(Ordering::Relaxed) - before;
        store = Some(s);
    }
    loads.sort_unstable();
    let load = loads[loads.len() / 2];
    let store = Arc::new(store.expect("loaded once at least"));
    let policy = store.snapshot().expect("the policy is loaded");

    // The probes get the decisions the generator meant.
    for p in &probes {
        let d = policy.authorize(&p.peer, &p.target);
        assert_eq!(
            d.allowed,
            p.allow,
            "{} policy of {n} rules: {} calling {:?} was meant to be {}",
            shape.name(),
            p.peer,
            p.target.request,
            if p.allow { "allowed" } else { "denied" }
        );
    }

    // authorize, per call.
    let mut samples: Vec<u64> = Vec::with_capacity(effort.rounds * probes.len());
    for _ in 0..effort.rounds {
        for p in &probes {
            let t = Instant::now();
            black_box(policy.authorize(black_box(&p.peer), black_box(&p.target)));
            samples.push(t.elapsed().as_nanos() as u64);
        }
    }
    samples.sort_unstable();
    let (authorize_p50, authorize_p99) = (pct(&samples, 0.5), pct(&samples, 0.99));
    drop(policy);

    // decide without a reload, for as long as a reload takes (50 ms to 2 s).
    let window = load.clamp(Duration::from_millis(50), Duration::from_secs(2));
    let (idle, decide_worst_idle) = decide_for(&store, &probes, window, None);
    let decide_p99 = pct(&idle, 0.99);

    // decide while another thread reloads the same file.
    let reloading = Arc::new(AtomicBool::new(true));
    let reloader = {
        let (store, reloading) = (store.clone(), reloading.clone());
        std::thread::spawn(move || {
            let t = Instant::now();
            let ok = store.reload().is_ok();
            let took = t.elapsed();
            reloading.store(false, Ordering::Release);
            (ok, took)
        })
    };
    let (during, decide_worst_reload) =
        decide_for(&store, &probes, Duration::MAX, Some(&reloading));
    let (ok, reload) = reloader.join().expect("the reload thread");
    assert!(ok, "the reload of {n} rules failed");
    Row {
        shape,
        rules: n,
        file_bytes,
        heap_bytes,
        load,
        authorize_p50,
        authorize_p99,
        decide_p99,
        decide_worst_idle,
        reload,
        decide_worst_reload,
        decide_p99_reload: pct(&during, 0.99),
    }
}

/// The most latency samples kept; later ones overwrite the oldest (the worst is kept
/// apart), so a reload of many seconds does not fill the memory.
const MAX_SAMPLES: usize = 1 << 23;

/// Per-call `decide` latencies (sorted; the last [`MAX_SAMPLES`]) and the worst of all,
/// for `window` or while `until` stays true.
fn decide_for(
    store: &PolicyStore,
    probes: &[Probe],
    window: Duration,
    until: Option<&AtomicBool>,
) -> (Vec<u64>, u64) {
    let start = Instant::now();
    let mut samples = Vec::with_capacity(1 << 20);
    let (mut worst, mut calls) = (0, 0usize);
    'outer: loop {
        for p in probes {
            let t = Instant::now();
            black_box(store.decide(black_box(&p.peer), black_box(&p.target)));
            let took = t.elapsed().as_nanos() as u64;
            worst = worst.max(took);
            if samples.len() < MAX_SAMPLES {
                samples.push(took);
            } else {
                samples[calls % MAX_SAMPLES] = took;
            }
            calls += 1;
        }
        let done = match until {
            Some(flag) => !flag.load(Ordering::Acquire),
            None => start.elapsed() >= window,
        };
        if done {
            break 'outer;
        }
    }
    samples.sort_unstable();
    (samples, worst)
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e3)
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from(
        "| shape | rules | file | heap | load, ms | authorize p50 / p99, ns | decide p99 / worst idle, ns | reload, ms | decide p99 / worst during reload, ns |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            t,
            "| {} | {} | {:.1} KB | {:.1} KB | {} | {} / {} | {} / {} | {} | {} / {} |",
            r.shape.name(),
            r.rules,
            r.file_bytes as f64 / 1e3,
            r.heap_bytes as f64 / 1e3,
            ms(r.load),
            r.authorize_p50,
            r.authorize_p99,
            r.decide_p99,
            r.decide_worst_idle,
            ms(r.reload),
            r.decide_p99_reload,
            r.decide_worst_reload,
        );
    }
    t
}

fn criterion_authorize(c: &mut Criterion, sizes: &[usize]) {
    for &n in sizes {
        let (text, probes) = generate(Shape::Mixed, n);
        let (policy, _) = meshd::policy::parse_policy(&text, std::path::Path::new("b.yaml"), 1)
            .unwrap_or_else(|_| panic!("mixed policy of {n} rules"));
        let mut i = 0;
        c.bench_function(&format!("policy_scale/authorize_mixed/{n}_rules"), |b| {
            b.iter(|| {
                i = (i + 1) % probes.len();
                let p = &probes[i];
                black_box(policy.authorize(black_box(&p.peer), black_box(&p.target)))
            })
        });
    }
}

fn main() {
    let common::ScaleArgs { quick, sizes } =
        common::ScaleArgs::from_env(&[10, 100, 1_000, 10_000, 100_000]);
    let shapes: Vec<Shape> = [Shape::Exact, Shape::Prefix, Shape::Grpc, Shape::Mixed]
        .into_iter()
        .filter(|s| {
            std::env::var("MESHD_SCALE_SHAPES")
                .map_or(true, |only| only.split(',').any(|o| o.trim() == s.key()))
        })
        .collect();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let started = Instant::now();
    let mut rows = Vec::new();
    for &n in &sizes {
        for shape in shapes.iter().copied() {
            let effort = Effort {
                rounds: if quick { 20 } else { 4_000 },
                loads: if quick || n >= 10_000 { 1 } else { 5 },
            };
            let row = measure(shape, n, &effort, dir.path());
            eprintln!(
                "policy_scale: {} x {n} done at {:.1} s (load {} ms)",
                shape.name(),
                started.elapsed().as_secs_f64(),
                ms(row.load)
            );
            rows.push(row);
        }
    }
    println!("\n## policy scale (authorize over 128 probes, half allowed; times per call incl. ~20-40 ns of timer)\n");
    println!("{}", table(&rows));
    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300));
    }
    criterion_authorize(&mut c, &sizes);
    c.final_summary();
}
