use super::*;
use crate::config::parse_spiffe_id;
use crate::policy::{Request, RuleRef};
use metrics::{
    Counter, CounterFn, Gauge, Histogram, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

/// Counts every counter increment as `name{k=v,..}` so tests can read metrics back.
#[derive(Default)]
struct Counts(Arc<Mutex<Vec<(String, u64)>>>);

struct One(String, Arc<Mutex<Vec<(String, u64)>>>);

impl CounterFn for One {
    fn increment(&self, value: u64) {
        self.1.lock().expect("counts").push((self.0.clone(), value));
    }
    fn absolute(&self, _: u64) {}
}

impl Recorder for Counts {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let labels: Vec<String> = key
            .labels()
            .map(|l| format!("{}={}", l.key(), l.value()))
            .collect();
        let name = format!("{}{{{}}}", key.name(), labels.join(","));
        Counter::from_arc(Arc::new(One(name, self.0.clone())))
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, _: &Key, _: &Metadata<'_>) -> Histogram {
        Histogram::noop()
    }
}

impl Counts {
    fn total(&self, name: &str) -> u64 {
        self.0
            .lock()
            .expect("counts")
            .iter()
            .filter(|(n, _)| n == name)
            .map(|(_, v)| v)
            .sum()
    }
}

const GOOD: &str =
    "service: pay\nrules:\n  - name: gw\n    from: [\"spiffe://jia.app/api-gateway\"]\n";
const OTHER: &str = "service: pay\nrules:\n  - name: gw2\n    action: deny\n    from: [\"spiffe://jia.app/api-gateway\"]\n";
const BROKEN: &str = "service: pay\nrules:\n  - name: gw\n    from: [\"spiffe://jia.app/*/x\"]\n";

fn gateway() -> SpiffeId {
    parse_spiffe_id("spiffe://jia.app/api-gateway").expect("id")
}

fn target() -> Target<'static> {
    Target {
        port: 15006,
        request: Request::Grpc {
            service: "payment.v1.PaymentService",
            method: "GetPayment",
        },
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write policy");
}

/// Writes `text` to a temp file beside `path` and renames it over `path`, as editors and
/// Kubernetes ConfigMap updates do.
fn rename_over(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    write(&tmp, text);
    std::fs::rename(&tmp, path).expect("rename");
}

async fn wait_for(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// No policy file at start: the store denies everything (fail closed) and says why.
#[test]
fn missing_policy_denies_all() {
    let dir = tempfile::tempdir().expect("dir");
    let store = PolicyStore::new(dir.path().join("absent.yaml"));
    let counts = Counts::default();
    let result = metrics::with_local_recorder(&counts, || store.reload());
    assert!(result.is_err());
    assert!(!store.is_loaded() && store.snapshot().is_none());
    let (d, policy) = metrics::with_local_recorder(&counts, || store.decide(&gateway(), &target()));
    assert!(!d.allowed);
    assert_eq!(d.message(&policy), "denied: no policy loaded");
    assert_eq!(counts.total("meshd_policy_reload_failures_total{}"), 1);
    assert_eq!(
        counts.total("meshd_authz_decisions_total{decision=deny,rule=default,mode=enforce}"),
        1
    );
    assert_eq!(store.to_json()["loaded"], false);
}

// A bad edit keeps the last good policy, counts a failure; a good edit then applies with a new version.
#[test]
fn bad_edit_keeps_last_good_policy() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    write(&path, GOOD);
    let store = PolicyStore::new(&path);
    let counts = Counts::default();
    metrics::with_local_recorder(&counts, || {
        store.reload().expect("good policy");
        assert_eq!(store.snapshot().map(|p| p.version), Some(1));
        for bad in [BROKEN, "", "not: [yaml", "service: 3\nrules: {}\n"] {
            write(&path, bad);
            let problems = store.reload().expect_err("bad policy must fail");
            assert!(problems[0]
                .to_string()
                .starts_with(&path.display().to_string()));
            let (d, p) = store.decide(&gateway(), &target());
            assert!(d.allowed, "old policy still enforces");
            assert_eq!((d.rule_name(&p), p.version), ("gw", 1));
        }
        write(&path, OTHER);
        store.reload().expect("good edit");
        let (d, p) = store.decide(&gateway(), &target());
        assert!(!d.allowed);
        assert_eq!((d.rule_name(&p), p.version), ("gw2", 2));
    });
    assert_eq!(counts.total("meshd_policy_reload_failures_total{}"), 4);
    assert_eq!(
        counts.total("meshd_authz_decisions_total{decision=allow,rule=gw,mode=enforce}"),
        4
    );
    assert_eq!(
        counts.total("meshd_authz_decisions_total{decision=deny,rule=gw2,mode=enforce}"),
        1
    );
}

// /policy shows the loaded policy with per-rule hit counts.
#[test]
fn json_shows_rules_and_hits() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    write(&path, "service: pay\nmode: audit\nrules:\n  - name: gw\n    from: [\"spiffe://jia.app/api-gateway\"]\n    to: {grpc: [\"payment.v1.PaymentService/*\"], http: [{methods: [GET], paths: [\"/x/*\"]}], ports: [15006]}\n");
    let store = PolicyStore::new(&path);
    store.reload().expect("load");
    store.decide(&gateway(), &target());
    store.decide(&gateway(), &target());
    store.decide(
        &parse_spiffe_id("spiffe://jia.app/other").expect("id"),
        &target(),
    );
    let j = store.to_json();
    assert_eq!(
        (
            j["service"].as_str(),
            j["mode"].as_str(),
            j["default"].as_str(),
            j["version"].as_u64()
        ),
        (Some("pay"), Some("audit"), Some("deny"), Some(1))
    );
    let rule = &j["rules"][0];
    assert_eq!(rule["name"], "gw");
    assert_eq!(rule["hits"], 2);
    assert_eq!(rule["from"][0], "spiffe://jia.app/api-gateway");
    assert_eq!(rule["to"]["grpc"][0], "payment.v1.PaymentService/*");
    assert_eq!(rule["to"]["http"][0]["paths"][0], "/x/*");
    assert_eq!(rule["to"]["ports"][0], 15006);
    assert_eq!(j["default_hits"], 1);
}

// Readers racing a stream of reloads always see one whole policy: rule, verdict and version agree.
#[test]
fn reload_is_atomic_for_readers() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    write(&path, GOOD);
    let store = Arc::new(PolicyStore::new(&path));
    store.reload().expect("load");
    let done = Arc::new(AtomicBool::new(false));
    // The reloads start once every reader has read: on a busy machine a reader thread may
    // otherwise be scheduled only after the last reload.
    let all_reading = Arc::new(std::sync::Barrier::new(5));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let (store, done, all_reading) = (store.clone(), done.clone(), all_reading.clone());
            std::thread::spawn(move || {
                let mut seen = 0u64;
                loop {
                    let (d, p) = store.decide(&gateway(), &target());
                    let expect = if p.rules[0].name.as_ref() == "gw" {
                        (true, RuleRef::Named(0))
                    } else {
                        (false, RuleRef::Named(0))
                    };
                    seen += 1;
                    if seen == 1 {
                        all_reading.wait();
                    }
                    assert_eq!((d.allowed, d.rule), expect, "version {}", p.version);
                    if done.load(Ordering::Relaxed) {
                        break;
                    }
                }
                seen
            })
        })
        .collect();
    all_reading.wait();
    for i in 0..50 {
        rename_over(&path, if i % 2 == 0 { OTHER } else { GOOD });
        store.reload().expect("reload");
    }
    done.store(true, Ordering::Relaxed);
    for r in readers {
        assert!(r.join().expect("reader") > 0);
    }
    assert_eq!(store.snapshot().map(|p| p.version), Some(51));
}

// The watcher applies a rename-over edit and an in-place edit, and ignores a bad one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_picks_up_edits() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    write(&path, GOOD);
    let store = Arc::new(PolicyStore::new(&path));
    store.reload().expect("load");
    let stop = CancellationToken::new();
    let task = tokio::spawn(store.clone().watch(stop.clone()));
    // Give the watcher a moment to register; edits before that would be missed.
    let version = |s: &PolicyStore| s.snapshot().map_or(0, |p| p.version);
    let mut attempts = 0;
    while version(&store) < 2 {
        attempts += 1;
        assert!(attempts < 100, "watcher never applied the rename-over edit");
        rename_over(&path, OTHER);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        store.snapshot().map(|p| p.rules[0].name.to_string()),
        Some("gw2".into())
    );
    // A broken edit is refused, the good policy stays.
    write(&path, BROKEN);
    let s = store.clone();
    wait_for("the broken edit to be refused", move || {
        s.reload_failures() >= 1
    })
    .await;
    assert_eq!(
        store.snapshot().map(|p| p.rules[0].name.to_string()),
        Some("gw2".into())
    );
    // An in-place edit (same inode) applies.
    write(&path, GOOD);
    let s = store.clone();
    wait_for("in-place edit", move || {
        s.snapshot()
            .is_some_and(|p| p.rules[0].name.as_ref() == "gw")
    })
    .await;
    stop.cancel();
    task.await.expect("join").expect("watch ok");
}

// Label bounds: exact peers and named gRPC methods of the loaded policy; none without one.
#[test]
fn label_bounds_name_what_the_policy_names() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    let store = PolicyStore::new(&path);
    let empty = store.label_bounds();
    assert!(empty.peers.is_empty() && empty.methods.is_empty());
    let policy = "service: pay\nrules:\n  - name: a\n    from: [\"spiffe://jia.app/api-gateway\", \"spiffe://jia.app/*\"]\n    to:\n      grpc: [\"pay.v1.Pay/*\", \"grpc.health.v1.Health/Check\"]\n";
    write(&path, policy);
    metrics::with_local_recorder(&Counts::default(), || store.reload()).expect("good policy");
    let bounds = store.label_bounds();
    let mut peers: Vec<_> = bounds.peers.into_iter().collect();
    peers.sort();
    assert_eq!(peers, ["spiffe://jia.app/api-gateway"]);
    let mut methods: Vec<_> = bounds.methods.into_iter().collect();
    methods.sort();
    assert_eq!(methods, ["grpc.health.v1.Health/Check", "pay.v1.Pay/*"]);
}

// A request still holding the policy that decided it when a reload replaces it is never
// the one to free it: the store keeps the old policy until the request lets go, and the
// next sweep (or reload) frees it, off the request's thread.
#[test]
fn a_replaced_policy_is_freed_by_the_store_not_by_a_request() {
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("policy.yaml");
    write(&path, GOOD);
    let store = PolicyStore::new(&path);
    store.reload().expect("good policy");
    let (_, in_flight) = store.decide(&gateway(), &target());
    write(&path, OTHER);
    store.reload().expect("good edit");
    assert_eq!(in_flight.version, 1);
    assert!(
        store.has_retired(),
        "version 1 is kept while a request holds it"
    );
    assert!(store.sweep().is_empty(), "nothing to free while it is held");
    assert_eq!(
        Arc::strong_count(&in_flight),
        2,
        "the request's and the store's"
    );
    drop(in_flight);
    let freed = store.sweep();
    assert_eq!(freed.iter().map(|p| p.version).collect::<Vec<_>>(), [1]);
    assert!(!store.has_retired());
    // A replaced policy nobody holds is freed by the reload itself.
    write(&path, GOOD);
    store.reload().expect("good edit");
    assert!(!store.has_retired());
    assert_eq!(store.snapshot().map(|p| p.version), Some(3));
}
