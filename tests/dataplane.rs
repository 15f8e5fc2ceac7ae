//! The mTLS data plane through two real meshd processes: the payment sidecar's outbound
//! listener carries the payment app's calls to the contact sidecar's inbound listener,
//! which forwards them to the contact app. Identities come from the development CA
//! served over the Workload API, exactly as from SPIRE.

mod common;

use common::edge::outbound_sidecar;

use common::replicas::client;

use common::meshd::{free_port, DemoApp, DevCa, Sidecar};
use meshd::pb::contact::contact_service_client::ContactServiceClient;
use meshd::pb::contact::{Contact, GetContactRequest, ListContactsRequest};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tonic::transport::Channel;

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The pair payment sidecar (outbound) -> contact sidecar (inbound) -> contact app.
struct Pair {
    _dir: tempfile::TempDir,
    ca: DevCa,
    _app: DemoApp,
    contact: Sidecar,
    payment: Sidecar,
    /// The payment sidecar's outbound listener for contact-service.
    outbound: u16,
    /// The contact sidecar's inbound listener.
    inbound: u16,
}

fn contact_sidecar(dir: &Path, ca: &DevCa, app: &DemoApp, inbound: u16, protocol: &str) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        r#"service: contact-service
identity:
  workload_api: {sock}
  expect: spiffe://jia.app/contact-service
inbound:
  listen: 127.0.0.1:{inbound}
  forward: {app}
  protocol: {protocol}
  policy: {policy}
admin:
  listen: 127.0.0.1:{admin}
log:
  access: all
"#,
        sock = ca.socket("contact-service"),
        app = app.addr,
        policy = repo("deploy/policies/contact-service.yaml").display(),
    );
    Sidecar::start("contact-sidecar", dir, &yaml, admin)
}

fn client_sidecar(
    dir: &Path,
    ca: &DevCa,
    who: &str,
    outbound: u16,
    inbound: u16,
    server_id: &str,
    protocol: &str,
) -> Sidecar {
    let socket = ca.socket(who);
    outbound_sidecar(dir, &socket, who, outbound, inbound, server_id, protocol)
}

impl Pair {
    fn start() -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::start(
            dir.path(),
            &["payment-service", "contact-service", "api-gateway"],
            "1h",
            &[],
        );
        let app = DemoApp::start("contact", &[]);
        let inbound = free_port();
        let contact = contact_sidecar(dir.path(), &ca, &app, inbound, "grpc");
        let outbound = free_port();
        let payment = client_sidecar(
            dir.path(),
            &ca,
            "payment-service",
            outbound,
            inbound,
            "spiffe://jia.app/contact-service",
            "grpc",
        );
        contact.wait_ready();
        payment.wait_ready();
        Pair {
            _dir: dir,
            ca,
            _app: app,
            contact,
            payment,
            outbound,
            inbound,
        }
    }
}

fn get(id: &str, payload: Vec<u8>) -> GetContactRequest {
    GetContactRequest {
        contact_id: id.into(),
        payload,
    }
}

// Story: the payment app calls contact through both sidecars with every gRPC call kind,
// the contact app sees the payment-service SPIFFE ID, and big messages pass intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn payment_calls_contact_with_every_call_kind() {
    let pair = Pair::start();
    let mut c = client(pair.outbound).await;

    let r = c
        .get_contact(get("c-1", b"hi".to_vec()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.seen_caller, "spiffe://jia.app/payment-service");
    assert_eq!(r.payload, b"hi");

    let mut stream = c
        .list_contacts(ListContactsRequest {
            count: 100,
            payload_size: 1000,
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.payload.len(), 1000);
        n += 1;
    }
    assert_eq!(n, 100, "server streaming delivers every message");

    let up: Vec<Contact> = (0..50)
        .map(|i| Contact {
            contact_id: i.to_string(),
            payload: vec![7; 100],
            ..Default::default()
        })
        .collect();
    let s = c
        .upload_contacts(tokio_stream::iter(up))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((s.count, s.bytes), (50, 5000), "client streaming");

    let msgs: Vec<Contact> = (0..20)
        .map(|i| Contact {
            contact_id: i.to_string(),
            ..Default::default()
        })
        .collect();
    let mut echo = c
        .sync_contacts(tokio_stream::iter(msgs))
        .await
        .unwrap()
        .into_inner();
    let mut ids = Vec::new();
    while let Some(m) = echo.message().await.unwrap() {
        ids.push(m.contact_id);
    }
    assert_eq!(ids.len(), 20, "bidirectional streaming echoes all");

    let big: Vec<u8> = (0..10 * 1024 * 1024).map(|i| (i % 251) as u8).collect();
    let r = c
        .get_contact(get("big", big.clone()))
        .await
        .unwrap()
        .into_inner();
    assert!(r.payload == big, "a 10 MB message passes intact");

    // Metrics saw the calls on both sides.
    assert!(
        pair.contact
            .metric("meshd_requests_total", &["direction=\"inbound\""])
            >= 5.0
    );
    assert!(
        pair.payment
            .metric("meshd_requests_total", &["direction=\"outbound\""])
            >= 5.0
    );
}

// Story: a thousand concurrent calls share the pooled connections and all succeed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_concurrent_streams() {
    let pair = Pair::start();
    let c = client(pair.outbound).await;
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let mut c = c.clone();
        tasks.push(tokio::spawn(async move {
            c.get_contact(get(&i.to_string(), vec![1; 64])).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        if t.await.unwrap().is_ok() {
            ok += 1;
        }
    }
    assert_eq!(ok, 1000);
}

// Story: the contact policy admits only payment-service; the api-gateway's call is
// refused with PERMISSION_DENIED naming the default deny, and the access log says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_caller_the_policy_does_not_allow_gets_permission_denied() {
    let pair = Pair::start();
    let port = free_port();
    let gw = client_sidecar(
        pair._dir.path(),
        &pair.ca,
        "api-gateway",
        port,
        pair.inbound,
        "spiffe://jia.app/contact-service",
        "grpc",
    );
    gw.wait_ready();
    let mut c = client(port).await;
    let err = c.get_contact(get("x", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(err.message().contains("default deny"), "{}", err.message());
    assert!(pair
        .contact
        .proc
        .wait_output("\"rule\":\"default\"", Duration::from_secs(5)));
    assert!(
        pair.contact
            .metric("meshd_authz_decisions_total", &["decision=\"deny\""])
            >= 1.0
    );
}

// Story: the inbound port speaks only mutual TLS: plaintext h2c is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plaintext_to_the_inbound_port_fails() {
    let pair = Pair::start();
    let ch = Channel::from_shared(format!("http://127.0.0.1:{}", pair.inbound))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    let mut c = ContactServiceClient::new(ch);
    assert!(c.get_contact(get("x", vec![])).await.is_err());
    assert!(
        pair.contact.metric(
            "meshd_tls_handshake_failures_total",
            &["direction=\"inbound\""]
        ) >= 1.0
    );
}

// Story: the upstream answers with a valid SVID of another service: the outbound side
// refuses it and the app gets UNAVAILABLE naming the upstream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_with_the_wrong_spiffe_id_is_refused() {
    let pair = Pair::start();
    let port = free_port();
    let wrong = client_sidecar(
        pair._dir.path(),
        &pair.ca,
        "api-gateway",
        port,
        pair.inbound,
        "spiffe://jia.app/family-service",
        "grpc",
    );
    wrong.wait_ready();
    let mut c = client(port).await;
    let err = c.get_contact(get("x", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("contact-service"),
        "{}",
        err.message()
    );
    assert!(
        wrong.metric(
            "meshd_tls_handshake_failures_total",
            &["reason=\"wrong_server_id\""]
        ) >= 1.0
    );
}

// Story: the contact sidecar goes away: calls fail fast with UNAVAILABLE; it comes back
// on the same port and calls succeed again without restarting the payment sidecar.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_down_then_back() {
    let mut pair = Pair::start();
    let mut c = client(pair.outbound).await;
    c.get_contact(get("a", vec![])).await.unwrap();
    pair.contact.proc.signal("KILL");
    pair.contact.proc.wait_exit(Duration::from_secs(5));
    let err = c.get_contact(get("b", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        err.message().contains("contact-service"),
        "{}",
        err.message()
    );

    pair.contact = contact_sidecar(pair._dir.path(), &pair.ca, &pair._app, pair.inbound, "grpc");
    pair.contact.wait_ready();
    let r = c.get_contact(get("c", vec![])).await.unwrap().into_inner();
    assert_eq!(r.seen_caller, "spiffe://jia.app/payment-service");
}

/// Resident memory of a process in MB (from /proc).
fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// Story: a 200 MB server stream passes intact, and while the client reads slowly neither
// sidecar buffers it: flow control holds the sender back and their memory stays small.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn big_streams_respect_flow_control() {
    let pair = Pair::start();
    let mut c = client(pair.outbound).await;
    let mut stream = c
        .list_contacts(ListContactsRequest {
            count: 200,
            payload_size: 1 << 20,
        })
        .await
        .unwrap()
        .into_inner();
    let mut total = 0usize;
    for _ in 0..3 {
        total += stream.message().await.unwrap().unwrap().payload.len();
    }
    // The reader stalls; the app keeps trying to send 200 MB.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (a, b) = (
        rss_mb(pair.contact.proc.pid()),
        rss_mb(pair.payment.proc.pid()),
    );
    assert!(
        a < 60.0 && b < 60.0,
        "sidecars buffered the stream: {a:.0} MB, {b:.0} MB"
    );
    while let Some(m) = stream.message().await.unwrap() {
        assert_eq!(m.payload.len(), 1 << 20);
        total += m.payload.len();
    }
    assert_eq!(total, 200 << 20, "every byte of the stream arrived");
}

// Story: the contact sidecar's trust bundle is rewritten to a CA that did not sign the
// payment sidecars: the established connection keeps working, but a new handshake from
// a second payment sidecar is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bundle_without_the_peers_ca_refuses_new_handshakes() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("contact-files");
    let other = dir.path().join("other-ca");
    std::fs::create_dir_all(&files).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service"],
        "1h",
        &[
            "--write-files",
            &format!("spiffe://jia.app/contact-service={}", files.display()),
        ],
    );
    let other_dir = dir.path().join("other");
    std::fs::create_dir_all(&other_dir).unwrap();
    let _other_ca = DevCa::start(
        &other_dir,
        &["api-gateway"],
        "1h",
        &["--write-ca-dir", &other.display().to_string()],
    );
    let app = DemoApp::start("contact", &[]);
    let inbound = free_port();
    let admin = free_port();
    let yaml = format!(
        "service: contact-service\nidentity:\n  files:\n    cert: {f}/svid.pem\n    key: {f}/key.pem\n    bundle: {f}/bundle.pem\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {}\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        app.addr,
        repo("deploy/policies/contact-service.yaml").display(),
        f = files.display()
    );
    let contact = Sidecar::start("contact-sidecar", dir.path(), &yaml, admin);
    contact.wait_ready();
    let out1 = free_port();
    let p1 = client_sidecar(
        dir.path(),
        &ca,
        "payment-service",
        out1,
        inbound,
        "spiffe://jia.app/contact-service",
        "grpc",
    );
    p1.wait_ready();
    let mut c1 = client(out1).await;
    c1.get_contact(get("a", vec![])).await.unwrap();

    // The bundle changes (the CA rewrites the files only at half of its 1 h TTL).
    let generation = |s: &Sidecar| {
        let v: serde_json::Value = serde_json::from_str(&s.get("/identity").1).unwrap_or_default();
        v["generation"].as_u64().unwrap_or(0)
    };
    let before = generation(&contact);
    std::fs::copy(other.join("ca.pem"), files.join("bundle.pem")).unwrap();
    assert!(common::meshd::wait_until(
        Duration::from_secs(10),
        || generation(&contact) > before
    ));

    c1.get_contact(get("b", vec![]))
        .await
        .expect("the established connection continues");
    // A second payment sidecar with an SVID from the same CA as the first.
    let out2 = free_port();
    let p2_dir = dir.path().join("p2");
    std::fs::create_dir_all(&p2_dir).unwrap();
    let p2 = client_sidecar(
        &p2_dir,
        &ca,
        "payment-service",
        out2,
        inbound,
        "spiffe://jia.app/contact-service",
        "grpc",
    );
    p2.wait_ready();
    let err = client(out2)
        .await
        .get_contact(get("c", vec![]))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(
        contact.metric(
            "meshd_tls_handshake_failures_total",
            &["direction=\"inbound\""]
        ) >= 1.0
    );
}

// Story: the contact app takes 1 s per call. With the upstream timeout at 500 ms the app
// gets DEADLINE_EXCEEDED naming the upstream; with a shorter grpc-timeout from the app
// (200 ms) meshd gives up at that deadline instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn timeouts_become_deadline_exceeded() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service", "contact-service"],
        "1h",
        &[],
    );
    let app = DemoApp::start("contact", &["--delay", "1s"]);
    let inbound = free_port();
    let contact = contact_sidecar(dir.path(), &ca, &app, inbound, "grpc");
    let outbound = free_port();
    let admin = free_port();
    let yaml = format!(
        "service: payment-service\nidentity:\n  workload_api: {}\noutbound:\n  - name: contact-service\n    listen: 127.0.0.1:{outbound}\n    endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: spiffe://jia.app/contact-service\n    timeout: 500ms\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        ca.socket("payment-service")
    );
    let payment = Sidecar::start("payment-sidecar", dir.path(), &yaml, admin);
    contact.wait_ready();
    payment.wait_ready();
    let mut c = client(outbound).await;

    let start = std::time::Instant::now();
    let err = c.get_contact(get("slow", vec![])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::DeadlineExceeded, "{err:?}");
    assert!(
        err.message().contains("contact-service"),
        "{}",
        err.message()
    );
    assert!(err.message().contains("500 ms"), "{}", err.message());
    assert!(start.elapsed() < Duration::from_millis(900));

    // A raw HTTP/2 gRPC call carrying grpc-timeout: 200m (tonic would also time out
    // locally on that header, hiding what meshd answers).
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", outbound))
        .await
        .unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    let req = http::Request::post(format!(
        "http://127.0.0.1:{outbound}/contact.v1.ContactService/GetContact"
    ))
    .header("content-type", "application/grpc")
    .header("te", "trailers")
    .header("grpc-timeout", "200m")
    .body(http_body_util::Full::new(bytes::Bytes::from_static(&[
        0, 0, 0, 0, 0,
    ])))
    .unwrap();
    let start = std::time::Instant::now();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.headers()["grpc-status"], "4", "{resp:?}");
    let msg = resp.headers()["grpc-message"].to_str().unwrap();
    assert!(msg.contains("200 ms"), "{msg}");
    assert!(start.elapsed() < Duration::from_millis(450));
}

// Story: an operator lets Prometheus scrape a pod without opening the admin API: with
// `admin.metrics_listen` on the pod network, that port answers /metrics, /ready and /live,
// and /config and /shutdown only on the loopback admin port.
#[test]
fn the_metrics_listener_serves_metrics_and_probes_only() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["contact-service"], "1h", &[]);
    let app = DemoApp::start("contact", &[]);
    let (inbound, admin, metrics) = (free_port(), free_port(), free_port());
    let yaml = format!(
        "service: contact-service\nidentity:\n  workload_api: {sock}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {app}\n  policy: {policy}\nadmin:\n  listen: 127.0.0.1:{admin}\n  metrics_listen: 127.0.0.1:{metrics}\n",
        sock = ca.socket("contact-service"),
        app = app.addr,
        policy = repo("deploy/policies/contact-service.yaml").display(),
    );
    let contact = Sidecar::start("contact-sidecar", dir.path(), &yaml, admin);
    contact.wait_ready();
    let at = ([127, 0, 0, 1], metrics).into();
    let get = |path| common::meshd::http(at, "GET", path).map(|(c, _)| c);
    assert_eq!(get("/ready"), Some(200), "{}", contact.proc.dump());
    assert_eq!(get("/live"), Some(200));
    let (code, body) = common::meshd::http(at, "GET", "/metrics").unwrap();
    assert_eq!(code, 200);
    assert!(
        body.contains("meshd_svid_expiry_timestamp_seconds"),
        "{body}"
    );
    for path in ["/config", "/identity", "/policy"] {
        assert_eq!(get(path), Some(404), "{path}");
    }
    let shutdown = common::meshd::http(at, "POST", "/shutdown").map(|(c, _)| c);
    assert_eq!(shutdown, Some(404));
    assert_eq!(contact.get("/config").0, 200);
}
