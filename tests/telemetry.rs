//! Telemetry and admin through real processes: the admin endpoints and their bad input,
//! readiness with a missing policy, the access log of a denied call, a real Prometheus
//! scraping two sidecars, promtool on a live scrape, and graceful drain.

mod common;

use common::replicas::client;

use common::meshd::{free_port, http, wait_until, DemoApp, DevCa, Proc, Sidecar};
use meshd::pb::contact::GetContactRequest;
use std::io::{Read, Write};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn repo(p: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(p)
        .display()
        .to_string()
}

/// A contact sidecar (inbound) and a caller sidecar (outbound) over the dev CA.
struct Pair {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _app: DemoApp,
    contact: Sidecar,
    caller: Sidecar,
    outbound: u16,
    inbound: u16,
}

fn pair(caller: &str, app_args: &[&str], policy: &str, drain: &str) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["contact-service", caller], "1h", &[]);
    let app = DemoApp::start("contact", app_args);
    let inbound = free_port();
    let admin = free_port();
    let yaml = format!(
        "service: contact-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {}\n  policy: {policy}\nadmin:\n  listen: 127.0.0.1:{admin}\nlog:\n  access: deny\nlifecycle:\n  drain_timeout: {drain}\n",
        ca.socket("contact-service"),
        app.addr
    );
    let contact = Sidecar::start("contact-sidecar", dir.path(), &yaml, admin);
    let outbound = free_port();
    let admin2 = free_port();
    let yaml = format!(
        "service: {caller}\nidentity:\n  workload_api: {}\noutbound:\n  - name: contact-service\n    listen: 127.0.0.1:{outbound}\n    endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: spiffe://jia.app/contact-service\n    timeout: 10s\nadmin:\n  listen: 127.0.0.1:{admin2}\n",
        ca.socket(caller)
    );
    let caller = Sidecar::start("caller-sidecar", dir.path(), &yaml, admin2);
    caller.wait_ready();
    Pair {
        dir,
        _ca: ca,
        _app: app,
        contact,
        caller,
        outbound,
        inbound,
    }
}

fn req() -> GetContactRequest {
    GetContactRequest {
        contact_id: "c".into(),
        payload: vec![],
    }
}

/// Sends raw bytes to the admin port and returns the status code.
fn raw_status(addr: std::net::SocketAddr, request: &[u8]) -> u16 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let _ = s.write_all(request);
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

// Story: the admin server answers its endpoints, and bad requests get 404/405/413/400
// without harming it; /authz explains like the CLI.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_endpoints_and_bad_input() {
    let p = pair(
        "payment-service",
        &[],
        &repo("deploy/policies/contact-service.yaml"),
        "10s",
    );
    p.contact.wait_ready();
    let a = p.contact.admin;
    assert_eq!(http(a, "GET", "/nope").unwrap().0, 404);
    assert_eq!(http(a, "POST", "/ready").unwrap().0, 405);
    assert_eq!(http(a, "GET", "/authz?from=%zz").unwrap().0, 400);
    let mut big =
        b"PUT /logging?level=info HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n".to_vec();
    big.extend(std::iter::repeat_n(b'x', 200_000));
    assert_eq!(raw_status(a, &big), 413);
    assert_eq!(http(a, "PUT", "/logging?level=debug").unwrap().0, 200);
    assert_eq!(
        http(a, "PUT", "/logging?level=not%20a%20level%3D%3D")
            .unwrap()
            .0,
        400
    );
    let (code, body) = http(a, "GET", "/config").unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("contact-service"), "{body}");
    let (_, body) = http(a, "GET", "/policy").unwrap();
    assert!(body.contains("\"version\""), "{body}");
    let (_, allow) = http(
        a,
        "GET",
        "/authz?from=spiffe://jia.app/payment-service&grpc=contact.v1.ContactService/GetContact",
    )
    .unwrap();
    assert!(allow.starts_with("ALLOW"), "{allow}");
    let (_, deny) = http(
        a,
        "GET",
        "/authz?from=spiffe://jia.app/api-gateway&grpc=contact.v1.ContactService/GetContact",
    )
    .unwrap();
    assert!(deny.starts_with("DENY"), "{deny}");
    let cli = Command::new(common::meshd::meshd_bin())
        .args(["policy", "explain", "--policy"])
        .arg(repo("deploy/policies/contact-service.yaml"))
        .args(["--from", "spiffe://jia.app/api-gateway"])
        .args(["--grpc", "contact.v1.ContactService/GetContact"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&cli.stdout).trim(), deny.trim());
    assert_eq!(http(a, "GET", "/live").unwrap().0, 200, "still alive");
}

// Story: the policy file is missing at start: not ready, and every call is denied
// (fail closed), never allowed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_policy_means_not_ready_and_deny_all() {
    let p = pair("payment-service", &[], "/nonexistent/policy.yaml", "10s");
    let (code, body) = p.contact.get("/ready");
    assert_eq!(code, 503);
    assert!(body.contains("policy"), "{body}");
    let mut c = client(p.outbound).await;
    let err = c.get_contact(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    assert!(
        err.message().contains("no policy loaded"),
        "{}",
        err.message()
    );
}

// Story: a denied call writes one JSON access-log line with the peer, the method,
// status 7 and the rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_access_log_line_of_a_denied_call() {
    let p = pair(
        "api-gateway",
        &[],
        &repo("deploy/policies/contact-service.yaml"),
        "10s",
    );
    p.contact.wait_ready();
    let mut c = client(p.outbound).await;
    let err = c.get_contact(req()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);
    let found = wait_until(Duration::from_secs(5), || {
        p.contact.proc.output.lock().unwrap().iter().any(|l| {
            let Ok(v) = serde_json::from_str::<serde_json::Value>(l) else {
                return false;
            };
            v["direction"] == "inbound"
                && v["peer_id"] == "spiffe://jia.app/api-gateway"
                && v["grpc_method"] == "contact.v1.ContactService/GetContact"
                && v["status"] == "7"
                && v["rule"] == "default"
        })
    });
    assert!(found, "{}", p.contact.proc.dump());
}

// Story: after traffic, promtool finds nothing wrong in a live /metrics scrape, and a
// real Prometheus scraping both sidecars counts exactly the requests the test sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_what_was_sent() {
    let p = pair(
        "payment-service",
        &[],
        &repo("deploy/policies/contact-service.yaml"),
        "10s",
    );
    p.contact.wait_ready();
    let mut c = client(p.outbound).await;
    const N: usize = 37;
    for _ in 0..N {
        c.get_contact(req()).await.unwrap();
    }
    let (_, metrics) = p.contact.get("/metrics");
    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package prometheus; tests/run.sh installs it)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(metrics.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{metrics}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let port = free_port();
    let cfg = p.dir.path().join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: meshd\n    static_configs:\n      - targets: ['{}', '{}']\n",
            p.contact.admin, p.caller.admin
        ),
    )
    .unwrap();
    let mut cmd = Command::new("prometheus");
    cmd.arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            p.dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"));
    let prom = Proc::spawn("prometheus", cmd, None);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let query = |q: &str| -> Option<f64> {
        let (_, body) = http(addr, "GET", &format!("/api/v1/query?query={q}"))?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    };
    let inbound_q = "sum(meshd_requests_total%7Bdirection%3D%22inbound%22%7D)";
    let outbound_q = "sum(meshd_requests_total%7Bdirection%3D%22outbound%22%7D)";
    let seen = wait_until(Duration::from_secs(30), || {
        query(inbound_q) == Some(N as f64) && query(outbound_q) == Some(N as f64)
    });
    assert!(
        seen,
        "prometheus saw inbound {:?}, outbound {:?}\n{}",
        query(inbound_q),
        query(outbound_q),
        prom.dump()
    );
}

// Story: 200 calls are in flight (each takes 1 s in the app) when the contact sidecar
// gets SIGTERM: none is lost, new connections are refused, and it exits 0 in time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_in_flight_requests() {
    let mut p = pair(
        "payment-service",
        &["--delay", "1s"],
        &repo("deploy/policies/contact-service.yaml"),
        "10s",
    );
    p.contact.wait_ready();
    let c = client(p.outbound).await;
    let mut calls = Vec::new();
    for _ in 0..200 {
        let mut c = c.clone();
        calls.push(tokio::spawn(async move { c.get_contact(req()).await }));
    }
    // Every call has reached the contact sidecar (it authorized all 200) before the signal;
    // each then waits 1 s in the app.
    let arrived = tokio::task::block_in_place(|| {
        wait_until(Duration::from_secs(20), || {
            p.contact
                .metric("meshd_authz_decisions_total", &["decision=\"allow\""])
                >= 200.0
        })
    });
    assert!(arrived, "the 200 calls did not reach the contact sidecar");
    let start = Instant::now();
    p.contact.proc.signal("TERM");
    let mut ok = 0;
    for call in calls {
        match call.await.unwrap() {
            Ok(_) => ok += 1,
            Err(e) => eprintln!("lost: {e:?}"),
        }
    }
    assert_eq!(ok, 200, "no in-flight request is lost");
    let status = p.contact.proc.wait_exit(Duration::from_secs(12));
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        p.contact.proc.dump()
    );
    assert!(start.elapsed() < Duration::from_secs(11));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", p.inbound)).is_err(),
        "no new connections after the drain"
    );
}

// Story: with --exit-with PID the sidecar drains and exits 0 when the app process exits
// (Kubernetes Jobs finish).
#[test]
fn exit_with_the_app() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["payment-service"], "1h", &[]);
    let mut app = Command::new("sleep").arg("600").spawn().unwrap();
    let admin = free_port();
    let cfg = dir.path().join("m.yaml");
    std::fs::write(
        &cfg,
        format!(
            "service: job\nidentity:\n  workload_api: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
            ca.socket("payment-service")
        ),
    )
    .unwrap();
    let mut cmd = Command::new(common::meshd::meshd_bin());
    cmd.args(["run", "--exit-with", &app.id().to_string(), "--config"])
        .arg(&cfg);
    let mut m = Proc::spawn("meshd", cmd, None);
    let addr: std::net::SocketAddr = format!("127.0.0.1:{admin}").parse().unwrap();
    assert!(wait_until(Duration::from_secs(10), || http(
        addr, "GET", "/ready"
    )
    .is_some_and(|(c, _)| c == 200)));
    app.kill().unwrap();
    app.wait().unwrap();
    let status = m.wait_exit(Duration::from_secs(10));
    assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", m.dump());
}
