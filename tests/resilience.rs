//! Resilience through real processes: contact replicas (demo app + sidecar each, on
//! their own loopback IPs) that the tests break and mend by killing and restarting
//! processes, and a payment sidecar whose `contact-service` upstream has retries,
//! outlier detection, health checks or limits configured. The app's view is a tonic
//! client on the payment sidecar's outbound listener.

mod common;

use common::meshd::{free_port, wait_until, Sidecar};
use common::replicas::{addr, ca, client, counts, delta, payment, send, start_replicas, Replica};
use meshd::pb::contact::{Contact, GetContactRequest};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// Calls GetContact over `workers` callers until `stop`; returns (calls, failures).
fn keep_calling(
    port: u16,
    workers: usize,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, usize)> {
    tokio::spawn(async move {
        let c = client(port).await;
        let calls = Arc::new(AtomicUsize::new(0));
        let failed = Arc::new(AtomicUsize::new(0));
        let mut tasks = Vec::new();
        for w in 0..workers {
            let (mut c, stop, calls, failed) =
                (c.clone(), stop.clone(), calls.clone(), failed.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let req = GetContactRequest {
                        contact_id: format!("c-{w}"),
                        payload: Vec::new(),
                    };
                    calls.fetch_add(1, Ordering::Relaxed);
                    if let Err(status) = c.get_contact(req).await {
                        if failed.fetch_add(1, Ordering::Relaxed) < 5 {
                            eprintln!("call failed: {status:?}");
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        (
            calls.load(Ordering::Relaxed),
            failed.load(Ordering::Relaxed),
        )
    })
}

/// Contact API calls each replica let in (health checks not counted).
fn calls(replicas: &[Replica]) -> Vec<f64> {
    replicas.iter().map(Replica::served_calls).collect()
}

fn endpoint_state(pay: &Sidecar, state: &str) -> f64 {
    pay.metric(
        "meshd_upstream_endpoints",
        &["service=\"contact-service\"", &format!("state=\"{state}\"")],
    )
}

/// Waits for `cond` without starving the runtime's other tasks (the load keeps going).
fn eventually(secs: u64, cond: impl FnMut() -> bool) -> bool {
    tokio::task::block_in_place(|| wait_until(Duration::from_secs(secs), cond))
}

// Story: under steady load one of three contact replicas starts failing (its app dies,
// its sidecar answers UNAVAILABLE). Round robin keeps sending it its share (P2C-EWMA
// would shun it by itself), so within a few failures the payment sidecar ejects it,
// and with retries on the payment app sees no failed call at all. When the app comes
// back, the replica gets traffic again once its ejection ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failing_replica_is_ejected_without_failed_calls_and_returns() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (port, mut replicas) =
        start_replicas(dir.path(), &ca, &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    let extra = format!(
        "    endpoints: [\"127.0.0.2:{port}\", \"127.0.0.3:{port}\", \"127.0.0.4:{port}\"]
    balancer: round_robin
    retries: {{attempts: 2, budget_percent: 20}}
    outlier_detection: {{consecutive_failures: 3, base_ejection_time: 2s, max_ejection_percent: 50}}
"
    );
    let (pay, out) = payment(dir.path(), &ca, "payment", &extra, None);
    let pay = Arc::new(pay);
    pay.wait_ready();

    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_calling(out, 4, stop.clone());
    let p = pay.clone();
    assert!(eventually(10, move || p
        .metric("meshd_requests_total", &["direction=\"outbound\""])
        > 50.0));

    replicas[2].kill_app();
    let p = pay.clone();
    let ejected = eventually(10, move || endpoint_state(&p, "ejected") == 1.0);
    assert!(ejected, "never ejected: {}", pay.get("/upstreams").1);
    let (_, view) = pay.get("/upstreams");
    assert!(view.contains("\"ejected\""), "{view}");
    // The dead replica's sidecar answered UNAVAILABLE at most the threshold plus what
    // was in flight at once (4 callers) before the ejection.
    let refused = replicas[2].sidecar.metric(
        "meshd_requests_total",
        &["direction=\"inbound\"", "status=\"14\""],
    );
    assert!(
        refused <= 3.0 + 4.0,
        "{refused} calls reached the failing replica"
    );
    let retries = pay.metric("meshd_retries_total", &["service=\"contact-service\""]);
    assert!(retries >= 1.0, "failures were retried: {retries}");

    // Mend it: after its ejection ends it serves calls again.
    replicas[2].restart_app();
    let before = replicas[2].served_calls();
    let back = eventually(20, || {
        replicas[2].sidecar.metric(
            "meshd_requests_total",
            &["direction=\"inbound\"", "ContactService", "status=\"0\""],
        ) > 0.0
            && replicas[2].served_calls() > before
    });
    assert!(
        back,
        "the mended replica got no traffic: {}",
        pay.get("/upstreams").1
    );
    stop.store(true, Ordering::Relaxed);
    let (calls, failed) = load.await.unwrap();
    eprintln!(
        "{calls} calls, {failed} failed; replicas {:?}",
        counts(&replicas)
    );
    assert!(calls > 100, "{calls}");
    assert_eq!(failed, 0, "the app saw failures");
}

// Story: active health checks (grpc.health.v1) find a replica whose app died before any
// call does: it turns unhealthy, calls go only to the others (no retries needed), and
// it turns healthy again once the app is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_checks_take_a_dead_replica_out_and_back() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (port, mut replicas) = start_replicas(dir.path(), &ca, &["127.0.0.2", "127.0.0.3"]);
    let extra = format!(
        "    endpoints: [\"127.0.0.2:{port}\", \"127.0.0.3:{port}\"]
    health_check: {{interval: 200ms, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 2}}
    outlier_detection: {{consecutive_failures: 0}}
"
    );
    let (pay, out) = payment(dir.path(), &ca, "payment", &extra, None);
    let pay = Arc::new(pay);
    pay.wait_ready();
    let checked = wait_until(Duration::from_secs(5), || {
        replicas[1].served() - replicas[1].served_calls() >= 2.0
    });
    assert!(checked, "no health checks reached the replica");

    replicas[1].kill_app();
    let p = pay.clone();
    assert!(
        eventually(10, move || endpoint_state(&p, "unhealthy") == 1.0),
        "{}",
        pay.get("/upstreams").1
    );
    assert!(pay.get("/upstreams").1.contains("\"unhealthy\""));
    let before = calls(&replicas);
    assert_eq!(
        send(out, 30, 2).await,
        0,
        "calls avoid the unhealthy replica"
    );
    let d = delta(&calls(&replicas), &before);
    assert_eq!(d[0], 30.0, "{d:?}");

    replicas[1].restart_app();
    let p = pay.clone();
    assert!(
        eventually(10, move || endpoint_state(&p, "healthy") == 2.0),
        "{}",
        pay.get("/upstreams").1
    );
    let before = calls(&replicas);
    assert_eq!(send(out, 20, 1).await, 0);
    let d = delta(&calls(&replicas), &before);
    assert!(d[1] > 0.0, "the healthy-again replica gets calls: {d:?}");
}

// Story: an upstream that is not gRPC gets TCP connect checks: of two endpoints, the one
// where nothing listens turns unhealthy, the live one stays healthy, with no traffic.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tcp_health_checks_find_a_dead_port() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let port = free_port();
    let _live = Replica::start(dir.path(), &ca, addr("127.0.0.2", port), &[]);
    let dead = free_port();
    let extra = format!(
        "    endpoints: [\"127.0.0.2:{port}\", \"127.0.0.1:{dead}\"]
    protocol: http
    health_check: {{interval: 100ms, timeout: 500ms, unhealthy_threshold: 2}}
"
    );
    let (pay, _) = payment(dir.path(), &ca, "payment", &extra, None);
    let pay = Arc::new(pay);
    pay.wait_ready();
    let p = pay.clone();
    assert!(
        eventually(10, move || endpoint_state(&p, "unhealthy") == 1.0
            && endpoint_state(&p, "healthy") == 1.0),
        "{}",
        pay.get("/upstreams").1
    );
    let (_, view) = pay.get("/upstreams");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    let states: Vec<_> = view["upstreams"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_string(),
                e["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert!(
        states.contains(&(format!("127.0.0.1:{dead}"), "unhealthy".into())),
        "{states:?}"
    );
}

// Story: every replica is down; each call wants three retries, but the budget (20% of
// calls, no per-second floor) lets only a fifth of that through, so a failing upstream
// is not stormed.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn retry_budget_caps_retries_when_everything_fails() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (a, b) = (free_port(), free_port());
    let extra = format!(
        "    endpoints: [\"127.0.0.1:{a}\", \"127.0.0.1:{b}\"]
    retries: {{attempts: 3, budget_percent: 20, min_per_second: 0, backoff: 1ms, max_backoff: 2ms}}
    outlier_detection: {{consecutive_failures: 0}}
"
    );
    let (pay, out) = payment(dir.path(), &ca, "payment", &extra, None);
    pay.wait_ready();
    let n = 200;
    assert_eq!(send(out, n, 2).await, n, "every call fails");
    let retries = pay.metric("meshd_retries_total", &["service=\"contact-service\""]);
    let ratio = retries / n as f64;
    eprintln!("{retries} retries for {n} calls (ratio {ratio:.3})");
    assert!(
        (0.15..=0.21).contains(&ratio),
        "retries/calls = {ratio:.3}, want about 0.20"
    );
}

// Story: contact answers slowly and the upstream allows 4 requests in progress: a fifth
// concurrent call fails at once with UNAVAILABLE naming the upstream and the limit, the
// circuit gauge reads 1 while the limit is reached and 0 again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn circuit_opens_at_the_limit_and_closes_again() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let port = free_port();
    let _slow = Replica::start(dir.path(), &ca, addr("127.0.0.2", port), &["--delay", "2s"]);
    let extra = format!(
        "    endpoints: [\"127.0.0.2:{port}\"]
    limits: {{max_requests: 4}}
"
    );
    let (pay, out) = payment(dir.path(), &ca, "payment", &extra, None);
    let pay = Arc::new(pay);
    pay.wait_ready();
    let open = || pay.metric("meshd_circuit_open", &["service=\"contact-service\""]);
    assert_eq!(open(), 0.0);

    let c = client(out).await;
    let held: Vec<_> = (0..4)
        .map(|i| {
            let mut c = c.clone();
            tokio::spawn(async move {
                c.get_contact(GetContactRequest {
                    contact_id: format!("held-{i}"),
                    payload: Vec::new(),
                })
                .await
            })
        })
        .collect();
    let p = pay.clone();
    assert!(
        eventually(5, move || p
            .metric("meshd_circuit_open", &["service=\"contact-service\""])
            == 1.0),
        "circuit never opened"
    );
    let started = std::time::Instant::now();
    let refused = c
        .clone()
        .get_contact(GetContactRequest {
            contact_id: "fifth".into(),
            payload: Vec::new(),
        })
        .await
        .expect_err("the fifth call is refused");
    assert!(started.elapsed() < Duration::from_secs(1), "refused fast");
    assert_eq!(refused.code(), tonic::Code::Unavailable);
    let msg = refused.message();
    assert!(
        msg.contains("contact-service") && msg.contains("limits.max_requests") && msg.contains('4'),
        "{msg}"
    );
    for h in held {
        assert!(h.await.unwrap().is_ok(), "held calls complete");
    }
    let p = pay.clone();
    assert!(
        eventually(5, move || p
            .metric("meshd_circuit_open", &["service=\"contact-service\""])
            == 0.0),
        "circuit never closed"
    );
    assert_eq!(send(out, 2, 1).await, 0, "calls pass again");
}

// Story: a bidirectional stream is open to one replica when that replica is killed
// (app and sidecar): the stream ends with an error promptly instead of hanging, and
// the calls that follow go to the other replica without failing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replica_killed_mid_stream_fails_cleanly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (port, mut replicas) = start_replicas(dir.path(), &ca, &["127.0.0.2", "127.0.0.3"]);
    let extra = format!(
        "    endpoints: [\"127.0.0.2:{port}\", \"127.0.0.3:{port}\"]
    retries: {{attempts: 2}}
"
    );
    let (pay, out) = payment(dir.path(), &ca, "payment", &extra, None);
    pay.wait_ready();

    let mut c = client(out).await;
    let (tx, rx) = tokio::sync::mpsc::channel::<Contact>(4);
    let mut stream = c
        .sync_contacts(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("stream opens")
        .into_inner();
    let contact = Contact {
        contact_id: "s1".into(),
        name: "first".into(),
        payload: Vec::new(),
        seen_caller: String::new(),
    };
    tx.send(contact.clone()).await.unwrap();
    let echo = stream.message().await.expect("echo").expect("one message");
    assert_eq!(echo.contact_id, "s1");
    // The stream is still open, so no replica has counted it yet: ask the payment
    // sidecar which endpoint it went to.
    let (_, view) = pay.get("/upstreams");
    let view: serde_json::Value = serde_json::from_str(&view).unwrap();
    let endpoints = view["upstreams"][0]["endpoints"].as_array().unwrap();
    let used = endpoints
        .iter()
        .find(|e| e["requests"] == 1)
        .expect("one endpoint took the stream");
    let victim = usize::from(used["address"] != format!("127.0.0.2:{port}").as_str());
    let other = 1 - victim;

    replicas[victim].sidecar.proc.signal("KILL");
    replicas[victim].kill_app();
    let ended = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.message().await {
                Ok(Some(_)) => continue,
                Ok(None) => return Ok(()),
                Err(status) => return Err(status),
            }
        }
    })
    .await
    .expect("the stream hung after its replica died");
    let status = ended.expect_err("the stream ends with an error, not as if complete");
    eprintln!("stream ended with {status:?}");
    drop(tx);

    let before = replicas[other].served_calls();
    assert_eq!(send(out, 20, 2).await, 0, "new calls go elsewhere");
    // Counted when each response body ends, which can be just after the caller has it.
    wait_until(Duration::from_secs(5), || {
        replicas[other].served_calls() - before >= 20.0
    });
    assert_eq!(replicas[other].served_calls() - before, 20.0);
}
