//! Scale curve 3 (issue 23): how meshd's cost grows with the endpoints of one upstream.
//!
//! Flow: for each size (10 to 10,000 endpoints) `main` writes a `file:///` endpoint list
//! and starts meshd's file discovery on it (`discovery::start`, the resolver task meshd
//! runs), timing the read/parse/check to the first published set. It builds one
//! `Outbound` per balancer policy the config offers (`p2c_ewma`, `round_robin`,
//! `least_request`) on that discovery, as `app` does, and times `pick` per call over
//! many calls (p50/p99 from the samples). Then it times the discovery -> balancer update
//! path for a new set: rewriting the file until the resolver publishes it (this includes
//! the watcher's fixed 100 ms settle wait, reported apart), and `Outbound::apply` of a set
//! with 10 % of its endpoints replaced and of an all-new set. Heap bytes (a counting
//! global allocator) of the published set and of the balancer's endpoint list are
//! counted. A markdown table is printed at the end; a criterion group of `pick` follows.
//!
//! DNS discovery (dnsmasq) is not measured here: the file path is.
//! `MESHD_SCALE_QUICK=1` (the CI smoke), or any run without `--bench` (`cargo test`):
//! sizes 10 and 1,000, few samples. `cargo bench --bench NAME` runs the full curve.
//! `MESHD_SCALE_SIZES=10,100`: other sizes.

mod common;

use criterion::Criterion;
use meshd::config::{BalancerPolicy, Config, Env};
use meshd::discovery::{self, DiscoveredEndpoint, Dns, EndpointSet, RefreshBounds};
use meshd::identity::IdentityStatus;
use meshd::outbound::Outbound;
use meshd::telemetry::{AccessLog, AccessLogger, Labels};
use meshd::tls::{spiffe_server_name, UpstreamTls};
use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::hint::black_box;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Counts the bytes live, so the endpoint lists' heap is measured.
struct Counting;

static LIVE_BYTES: AtomicI64 = AtomicI64::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as i64, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new_size as i64 - layout.size() as i64, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const POLICIES: [(BalancerPolicy, &str); 3] = [
    (BalancerPolicy::P2cEwma, "p2c_ewma"),
    (BalancerPolicy::RoundRobin, "round_robin"),
    (BalancerPolicy::LeastRequest, "least_request"),
];

/// The `k`-th address of generation `gen` (distinct for distinct pairs).
fn addr(gen: u32, k: usize) -> SocketAddr {
    let k = k as u32;
    SocketAddr::from((
        [10, gen as u8, (k >> 8) as u8, k as u8],
        8443 + (k >> 16) as u16,
    ))
}

/// `n` endpoints; those with `k % 10 == 0` come from generation `churn` (0: none churned).
fn endpoints(n: usize, churn: u32) -> Vec<DiscoveredEndpoint> {
    (0..n)
        .map(|k| {
            let gen = if churn > 0 && k.is_multiple_of(10) {
                churn
            } else {
                0
            };
            DiscoveredEndpoint::plain(addr(gen, k))
        })
        .collect()
}

fn write_file(path: &Path, eps: &[DiscoveredEndpoint]) {
    let mut text = String::new();
    for e in eps {
        let _ = writeln!(text, "- {}", e.addr);
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write the endpoint file");
    std::fs::rename(&tmp, path).expect("rename the endpoint file into place");
}

/// Percentile `q` of sorted samples.
fn pct(sorted: &[u64], q: f64) -> u64 {
    sorted[((sorted.len() as f64 - 1.0) * q) as usize]
}

fn median(mut d: Vec<Duration>) -> Duration {
    d.sort_unstable();
    d[d.len() / 2]
}

/// One upstream of `policy` on the file `path`, as meshd's config would have it.
fn outbound(
    path: &Path,
    policy: &str,
    found: Arc<discovery::UpstreamDiscovery>,
    stop: &CancellationToken,
) -> Outbound {
    let text = format!(
        "service: bench\noutbound:\n  - name: contact\n    listen: 127.0.0.1:15101\n    endpoints: file://{}\n    server_id: spiffe://jia.app/contact\n    balancer: {policy}\n",
        path.display()
    );
    let (config, _) = Config::from_text(Path::new("bench.yaml"), &text, &Env::default())
        .unwrap_or_else(|e| panic!("bench config: {e}"));
    let o = &config.outbound[0];
    let tls = Arc::new(UpstreamTls {
        server_id: o.server_id.clone(),
        server_name: spiffe_server_name(),
        alpn_h2: true,
        config: Default::default(),
    });
    let (_, identity) = watch::channel(IdentityStatus::Waiting {
        reason: "bench: no identity".into(),
    });
    Outbound::new(
        o,
        tls,
        None,
        found,
        identity,
        Arc::new(Labels::default()),
        Arc::new(AccessLogger {
            mode: AccessLog::Off,
        }),
        stop.clone(),
    )
}

/// One row of the table.
struct Row {
    endpoints: usize,
    /// Heap of the published `EndpointSet`.
    set_heap: i64,
    /// Heap of one outbound's endpoint list (pools, stats, address texts).
    balancer_heap: i64,
    /// File read, parse, check -> first published set.
    first_publish: Duration,
    /// File rewritten (10 % churn) -> new set published, minus the 100 ms settle wait.
    file_change: Duration,
    /// `apply` of a set with 10 % of its endpoints new.
    apply_churn: Duration,
    /// `apply` of an all-new set.
    apply_new: Duration,
    /// Per balancer policy: pick p50, p99 in ns.
    picks: Vec<(u64, u64)>,
}

async fn wait_for(rx: &mut watch::Receiver<Arc<EndpointSet>>, want: &[DiscoveredEndpoint]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while rx.borrow_and_update().endpoints != want {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.changed()).await {
            Ok(Ok(())) => {}
            _ => panic!("file discovery did not publish {} endpoints", want.len()),
        }
    }
}

async fn measure(n: usize, picks: usize, repeats: usize, dir: &Path) -> Row {
    let path = dir.join(format!("endpoints-{n}.yaml"));
    let base = EndpointSet::new(endpoints(n, 0)).endpoints;
    write_file(&path, &base);
    let stop = CancellationToken::new();
    let bounds = RefreshBounds {
        min: Duration::from_secs(1),
        max: Duration::from_secs(3600),
    };
    let spec = meshd::config::EndpointsSpec::File(path.clone());
    let t = Instant::now();
    let found = discovery::start(
        "contact",
        spec,
        Arc::new(Dns::new(&[])),
        bounds,
        stop.clone(),
    );
    let mut rx = found.endpoints.clone();
    wait_for(&mut rx, &base).await;
    let first_publish = t.elapsed();

    let before = LIVE_BYTES.load(Ordering::Relaxed);
    let copy = Arc::new(EndpointSet::new(base.clone()));
    let set_heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
    drop(copy);

    let mut outbounds = Vec::new();
    let mut balancer_heap = 0;
    for (_, name) in POLICIES {
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        outbounds.push(outbound(&path, name, found.clone(), &stop));
        balancer_heap = LIVE_BYTES.load(Ordering::Relaxed) - before;
    }

    // pick, per call, per balancer policy.
    let mut pick_rows = Vec::new();
    for ob in &outbounds {
        let mut samples = Vec::with_capacity(picks);
        for _ in 0..picks {
            let t = Instant::now();
            black_box(ob.pick_for_bench());
            samples.push(t.elapsed().as_nanos() as u64);
        }
        samples.sort_unstable();
        assert!(ob.pick_for_bench().is_some(), "pick found no endpoint");
        pick_rows.push((pct(&samples, 0.5), pct(&samples, 0.99)));
    }

    // File change -> published, alternating between two sets that differ in 10 %.
    let settle = Duration::from_millis(100);
    let mut file_changes = Vec::new();
    for r in 0..repeats {
        let next = EndpointSet::new(endpoints(n, if r % 2 == 0 { 1 } else { 0 })).endpoints;
        let t = Instant::now();
        write_file(&path, &next);
        wait_for(&mut rx, &next).await;
        file_changes.push(t.elapsed().saturating_sub(settle));
    }

    // apply, on one outbound: 10 % churn, then all new.
    let ob = &outbounds[0];
    let mut churn = Vec::new();
    let mut new = Vec::new();
    for r in 0..repeats {
        let set = EndpointSet::new(endpoints(n, 2 + (r % 2) as u32));
        let t = Instant::now();
        ob.apply_for_bench(&set);
        churn.push(t.elapsed());
        let fresh = EndpointSet::new(
            (0..n)
                .map(|k| DiscoveredEndpoint::plain(addr(100 + r as u32 % 100, k)))
                .collect(),
        );
        let t = Instant::now();
        ob.apply_for_bench(&fresh);
        new.push(t.elapsed());
    }
    stop.cancel();
    Row {
        endpoints: n,
        set_heap,
        balancer_heap,
        first_publish,
        file_change: median(file_changes),
        apply_churn: median(churn),
        apply_new: median(new),
        picks: pick_rows,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

fn table(rows: &[Row]) -> String {
    let mut t = String::from("| endpoints |");
    for (_, name) in POLICIES {
        let _ = write!(t, " pick {name} p50 / p99, ns |");
    }
    t.push_str(" file -> first set, ms | file change -> set (excl. 100 ms settle), ms | apply 10 % new, ms | apply all new, ms | set heap | balancer heap |\n|---:|");
    t.push_str(&"---:|".repeat(POLICIES.len() + 6));
    t.push('\n');
    for r in rows {
        let _ = write!(t, "| {} |", r.endpoints);
        for (p50, p99) in &r.picks {
            let _ = write!(t, " {p50} / {p99} |");
        }
        let _ = writeln!(
            t,
            " {} | {} | {} | {} | {:.1} KB | {:.1} KB |",
            ms(r.first_publish),
            ms(r.file_change),
            ms(r.apply_churn),
            ms(r.apply_new),
            r.set_heap as f64 / 1e3,
            r.balancer_heap as f64 / 1e3,
        );
    }
    t
}

fn criterion_pick(c: &mut Criterion, rt: &tokio::runtime::Runtime, sizes: &[usize], dir: &Path) {
    for &n in sizes {
        let path = dir.join(format!("criterion-{n}.yaml"));
        let eps = EndpointSet::new(endpoints(n, 0)).endpoints;
        write_file(&path, &eps);
        let stop = CancellationToken::new();
        let _guard = rt.enter();
        let spec = meshd::config::EndpointsSpec::File(path.clone());
        let bounds = RefreshBounds {
            min: Duration::from_secs(1),
            max: Duration::from_secs(3600),
        };
        let found = discovery::start(
            "contact",
            spec,
            Arc::new(Dns::new(&[])),
            bounds,
            stop.clone(),
        );
        let mut rx = found.endpoints.clone();
        rt.block_on(wait_for(&mut rx, &eps));
        let ob = outbound(&path, "p2c_ewma", found, &stop);
        c.bench_function(
            &format!("endpoint_scale/pick_p2c_ewma/{n}_endpoints"),
            |b| b.iter(|| black_box(ob.pick_for_bench())),
        );
        stop.cancel();
    }
}

fn main() {
    let common::ScaleArgs { quick, sizes } = common::ScaleArgs::from_env(&[10, 100, 1_000, 10_000]);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let (picks, repeats) = if quick { (200, 2) } else { (50_000, 7) };
    let started = Instant::now();
    let mut rows = Vec::new();
    for &n in &sizes {
        let row = rt.block_on(measure(n, picks, repeats, dir.path()));
        eprintln!(
            "endpoint_scale: {n} endpoints done at {:.1} s",
            started.elapsed().as_secs_f64()
        );
        rows.push(row);
    }
    println!("\n## endpoint scale (one upstream, file discovery; pick times per call incl. ~20-40 ns of timer)\n");
    println!("{}", table(&rows));
    let mut c = Criterion::default().configure_from_args();
    if quick {
        c = c
            .sample_size(10)
            .warm_up_time(Duration::from_millis(100))
            .measurement_time(Duration::from_millis(300));
    }
    criterion_pick(&mut c, &rt, &sizes, dir.path());
    c.final_summary();
}
