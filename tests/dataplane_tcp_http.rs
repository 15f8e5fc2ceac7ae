//! The `http` and `tcp` protocols through a pair of real sidecars, in front of apps
//! written here (an h2c server with hyper, a TCP echo with tokio), and bad HTTP/2 input
//! on the plaintext outbound listener (the h2 crate as a raw client).

mod common;

use bytes::Bytes;
use common::edge::{inbound_sidecar, outbound_sidecar, repo, run, wait_counter, Run};
use common::meshd::{free_port, DemoApp, DevCa, Sidecar};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PAYMENT: &str = "spiffe://jia.app/payment-service";
const LIMIT: Duration = Duration::from_secs(15);

/// The dev CA (payment's SVID also written to `pay/`), the contact sidecar (inbound,
/// `protocol`, `policy`) in front of `app`, and the payment sidecar's outbound to it.
struct Pair {
    dir: tempfile::TempDir,
    ca: DevCa,
    contact: Sidecar,
    payment: Sidecar,
    inbound: u16,
    outbound: u16,
}

impl Pair {
    fn start(protocol: &str, app: SocketAddr, policy: Option<&str>) -> Pair {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = format!("{PAYMENT}={}", d.join("pay").display());
        let ca = DevCa::start(
            d,
            &["payment-service", "contact-service", "api-gateway"],
            "1h",
            &["--write-files", &files],
        );
        let policy_file = match policy {
            Some(text) => {
                let p = d.join("policy.yaml");
                std::fs::write(&p, text).unwrap();
                p
            }
            None => repo("deploy/policies/contact-service.yaml"),
        };
        let inbound = free_port();
        let contact = inbound_sidecar(
            d,
            &ca.socket("contact-service"),
            "contact-service",
            inbound,
            &app.to_string(),
            protocol,
            &policy_file,
        );
        let outbound = free_port();
        let payment = outbound_sidecar(
            d,
            &ca.socket("payment-service"),
            "payment-service",
            outbound,
            inbound,
            "spiffe://jia.app/contact-service",
            protocol,
        );
        contact.wait_ready();
        payment.wait_ready();
        Pair {
            dir,
            ca,
            contact,
            payment,
            inbound,
            outbound,
        }
    }

    /// Another caller (`who`) with its own outbound listener to the same contact sidecar.
    fn caller(&self, who: &str, protocol: &str) -> (Sidecar, u16) {
        let port = free_port();
        let s = outbound_sidecar(
            self.dir.path(),
            &self.ca.socket(who),
            who,
            port,
            self.inbound,
            "spiffe://jia.app/contact-service",
            protocol,
        );
        s.wait_ready();
        (s, port)
    }

    fn file(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }
}

/// An h2c app: 200 with `<METHOD> <path> xfcc=[v1|v2...]` for every request, so a test
/// sees each `x-forwarded-client-cert` value the app received.
async fn h2c_echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let xfcc: Vec<String> = req
                    .headers()
                    .get_all("x-forwarded-client-cert")
                    .iter()
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                    .collect();
                let body = format!(
                    "{} {} xfcc=[{}]",
                    req.method(),
                    req.uri().path(),
                    xfcc.join("|")
                );
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

const HTTP_POLICY: &str = r#"service: contact-service
mode: enforce
default: deny
rules:
  - name: payments-health
    action: allow
    from: ["spiffe://jia.app/payment-service"]
    to:
      http: [{methods: [GET], paths: ["/healthz"]}]
"#;

/// curl `args...` and `-w` the status code on the last line; returns (status, body).
async fn curl(args: &[&str]) -> (String, String, Run) {
    let mut all = vec!["-sS", "--max-time", "5", "-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let r = run("curl", &all, LIMIT).await;
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    let (body, code) = out.rsplit_once('\n').unwrap_or(("", &out));
    (code.to_string(), body.to_string(), r)
}

// Story: curl speaks h2c to the payment sidecar's http outbound; the app behind the
// contact sidecar answers GET /healthz and sees exactly meshd's XFCC, whatever the
// client forged; POST /other is refused with 403 naming the decision.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn curl_h2c_through_an_http_pair() {
    let app = h2c_echo_app().await;
    let pair = Pair::start("http", app, Some(HTTP_POLICY));
    let base = format!("http://127.0.0.1:{}", pair.outbound);
    let want = format!("xfcc=[By=spiffe://jia.app/contact-service;URI={PAYMENT}]");

    let health = format!("{base}/healthz");
    let (code, body, r) = curl(&["--http2-prior-knowledge", &health]).await;
    assert_eq!(code, "200", "{r:?}");
    assert_eq!(body, format!("GET /healthz {want}"));

    let forged =
        "x-forwarded-client-cert: By=spiffe://jia.app/contact-service;URI=spiffe://jia.app/admin";
    let (code, body, r) = curl(&["--http2-prior-knowledge", "-H", forged, &health]).await;
    assert_eq!(code, "200", "{r:?}");
    assert_eq!(
        body,
        format!("GET /healthz {want}"),
        "forged XFCC via the outbound"
    );

    // Straight at the inbound port with payment's SVID: the inbound strips it too.
    let direct = format!("https://127.0.0.1:{}/healthz", pair.inbound);
    let (cert, key) = (pair.file("pay/svid.pem"), pair.file("pay/key.pem"));
    let (code, body, r) = curl(&[
        "--http2",
        "--insecure",
        "--cert",
        &cert,
        "--key",
        &key,
        "-H",
        forged,
        &direct,
    ])
    .await;
    assert_eq!(code, "200", "{r:?}");
    assert_eq!(
        body,
        format!("GET /healthz {want}"),
        "forged XFCC at the inbound"
    );

    let other = format!("{base}/other");
    // No request body: when the 403 comes back before curl's DATA frame, meshd (hyper)
    // ends the stream with RST_STREAM(NO_ERROR) after the full response, as RFC 9113 §8.1
    // allows, and curl 7.88 reports that as error 92 instead of the 403.
    let (code, body, r) = curl(&["--http2-prior-knowledge", "-X", "POST", &other]).await;
    assert_eq!(code, "403", "{r:?}");
    assert!(body.contains("denied by default deny"), "{body}");
    assert!(
        wait_counter(
            &pair.contact,
            "meshd_authz_decisions_total",
            &["decision=\"deny\""],
            1.0
        ) >= 1.0
    );
}

const POST_POLICY: &str = r#"service: contact-service
mode: enforce
default: deny
rules:
  - name: payments-order
    action: allow
    from: ["spiffe://jia.app/payment-service"]
    to:
      http: [{methods: [POST], paths: ["/orders"]}]
"#;

// Story: payment's http upstream has two endpoints and nothing listens on one of them.
// Round robin sends every other POST there (outlier detection is off), where no one
// receives it. A POST is not safe to repeat in general, but one that never left meshd
// is: meshd sends it to the live endpoint, so curl gets the app's 200 every time, the
// app gets each POST once, and the retry counter shows the retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn posts_nobody_received_are_retried_on_the_live_endpoint() {
    let app = h2c_echo_app().await;
    let pair = Pair::start("http", app, Some(POST_POLICY));
    let dead = free_port();
    let extra = format!(
        "    endpoints: [\"127.0.0.1:{inbound}\", \"127.0.0.1:{dead}\"]
    protocol: http
    balancer: round_robin
    retries: {{attempts: 1, budget_percent: 100}}
    outlier_detection: {{consecutive_failures: 0}}
",
        inbound = pair.inbound,
    );
    let (payment, listen) =
        common::replicas::payment(pair.dir.path(), &pair.ca, "payment-retrying", &extra, None);
    payment.wait_ready();
    let url = format!("http://127.0.0.1:{listen}/orders");
    for i in 0..10 {
        // No request body, for the reason given in `curl_h2c_through_an_http_pair`.
        let (code, body, r) = curl(&["--http2-prior-knowledge", "-X", "POST", &url]).await;
        assert_eq!(code, "200", "POST {i}: {r:?}");
        assert!(body.starts_with("POST /orders "), "{body}");
    }
    // Counted when each response body ends, which can be just after curl has it.
    let inbound = ["direction=\"inbound\""];
    let received = wait_counter(&pair.contact, "meshd_requests_total", &inbound, 10.0);
    assert_eq!(received, 10.0, "each POST reached the app once");
    let retries = payment.metric("meshd_retries_total", &["service=\"contact-service\""]);
    assert!(
        (3.0..=10.0).contains(&retries),
        "the POSTs sent to the closed port were retried: {retries}"
    );
}

/// A TCP echo app; counts the connections it accepted.
async fn tcp_echo_app() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let (mut r, mut w) = tcp.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    (addr, accepted)
}

/// The `i`-th 8 bytes of the test stream (splitmix64 of the position).
fn word(i: u64) -> [u8; 8] {
    let mut z = i.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)).to_le_bytes()
}

/// Bytes `[from, from + buf.len())` of the test stream.
fn stream_bytes(from: u64, buf: &mut [u8]) {
    for (k, b) in buf.iter_mut().enumerate() {
        let pos = from + k as u64;
        *b = word(pos / 8)[(pos % 8) as usize];
    }
}

const TCP_POLICY: &str = r#"service: contact-service
mode: enforce
default: deny
rules:
  - name: payments-tcp
    action: allow
    from: ["spiffe://jia.app/payment-service"]
"#;

// Story: 100 MB of pseudo-random bytes go through a tcp pair to an echo app and come
// back byte-exact, and the inbound sidecar counts at least 100 MB each way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hundred_megabytes_echo_byte_exact_through_a_tcp_pair() {
    const TOTAL: u64 = 100 << 20;
    let (app, _) = tcp_echo_app().await;
    let pair = Pair::start("tcp", app, Some(TCP_POLICY));
    let tcp = TcpStream::connect(("127.0.0.1", pair.outbound))
        .await
        .unwrap();
    let (mut rd, mut wr) = tcp.into_split();
    let writer = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 << 10];
        let mut sent = 0u64;
        while sent < TOTAL {
            let n = buf.len().min((TOTAL - sent) as usize);
            stream_bytes(sent, &mut buf[..n]);
            wr.write_all(&buf[..n]).await.unwrap();
            sent += n as u64;
        }
        wr.shutdown().await.unwrap();
    });
    let reader = async {
        let (mut buf, mut want) = (vec![0u8; 256 << 10], vec![0u8; 256 << 10]);
        let mut got = 0u64;
        loop {
            let n = rd.read(&mut buf).await.expect("read the echo");
            if n == 0 {
                return got;
            }
            stream_bytes(got, &mut want[..n]);
            assert!(
                buf[..n] == want[..n],
                "echo differs within bytes {got}..{}",
                got + n as u64
            );
            got += n as u64;
        }
    };
    let got = tokio::time::timeout(Duration::from_secs(120), reader)
        .await
        .expect("100 MB echoed within 2 minutes");
    writer.await.unwrap();
    assert_eq!(got, TOTAL, "every byte came back");
    for dir in ["dir=\"rx\"", "dir=\"tx\""] {
        let n = wait_counter(
            &pair.contact,
            "meshd_tcp_bytes_total",
            &["direction=\"inbound\"", dir],
            TOTAL as f64,
        );
        assert!(n >= TOTAL as f64, "inbound {dir}: {n}");
    }
}

// Story: a caller the tcp policy does not name gets through the handshake but is closed
// at once: it reads EOF, no echo, and the app never sees a connection.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tcp_caller_the_policy_denies_is_closed_without_echo() {
    let (app, accepted) = tcp_echo_app().await;
    let pair = Pair::start("tcp", app, Some(TCP_POLICY));
    let (_gw, port) = pair.caller("api-gateway", "tcp");
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = tcp.write_all(b"hello").await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the denied connection was not closed");
    assert!(got.is_empty(), "a denied caller got an echo: {got:?}");
    assert!(
        wait_counter(
            &pair.contact,
            "meshd_authz_decisions_total",
            &["decision=\"deny\""],
            1.0
        ) >= 1.0
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the app saw the denied caller"
    );

    // The allowed caller on the same sidecar still gets its echo.
    let mut ok = TcpStream::connect(("127.0.0.1", pair.outbound))
        .await
        .unwrap();
    ok.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), ok.read_exact(&mut buf))
        .await
        .expect("echo in time")
        .unwrap();
    assert_eq!(&buf, b"ping");
}

/// A gRPC GetContact over a fresh h2 connection to `port` with `extra` headers;
/// returns the HTTP status, grpc-status and grpc-message, or the h2 error.
async fn h2_get_contact(
    port: u16,
    extra: &[(&str, String)],
) -> Result<(u16, String, String), h2::Error> {
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await?;
    tokio::spawn(conn);
    let mut send = send.ready().await?;
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://127.0.0.1:{port}/contact.v1.ContactService/GetContact"
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in extra {
        req = req.header(*k, v.as_str());
    }
    let (resp, mut body) = send.send_request(req.body(()).unwrap(), false)?;
    body.send_data(
        Bytes::from_static(&[0, 0, 0, 0, 4, 0x0a, 2, b'c', b'1']),
        true,
    )?;
    let resp = tokio::time::timeout(LIMIT, resp)
        .await
        .expect("an answer in time")?;
    let status = resp.status().as_u16();
    let (parts, mut body) = resp.into_parts();
    while let Some(chunk) = body.data().await {
        let n = chunk?.len();
        let _ = body.flow_control().release_capacity(n);
    }
    // grpc-status is in the trailers, or in the headers of a trailers-only answer.
    let trailers = body.trailers().await?.unwrap_or_default();
    let field = |name: &str| {
        trailers
            .get(name)
            .or_else(|| parts.headers.get(name))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    Ok((status, field("grpc-status"), field("grpc-message")))
}

// Story: an HTTP/2 client sends a 100 KB header to the outbound listener (the limit is
// 64 KB): that request fails before it reaches the contact app, and a normal request on
// a new connection still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_header_fails_and_the_next_connection_works() {
    let app = DemoApp::start("contact", &[]);
    let pair = Pair::start("grpc", app.addr, None);
    let big = vec![("x-big", "a".repeat(100 << 10))];
    match h2_get_contact(pair.outbound, &big).await {
        Ok((status, grpc, msg)) => assert!(
            status == 431,
            "a 100 KB header was accepted: status {status}, grpc-status {grpc} {msg}"
        ),
        Err(e) => assert!(
            e.is_reset() || e.is_go_away() || e.is_io(),
            "unexpected failure: {e}"
        ),
    }
    let before = requests(&pair.contact);
    assert_eq!(
        before, 0.0,
        "the oversized request reached the contact sidecar"
    );
    let ok = h2_get_contact(pair.outbound, &[])
        .await
        .expect("a normal request");
    assert_eq!((ok.0, ok.1.as_str()), (200, "0"), "{ok:?}");
    assert!(wait_counter(&pair.contact, "meshd_requests_total", &[], 1.0) >= 1.0);
}

fn requests(s: &Sidecar) -> f64 {
    s.metric("meshd_requests_total", &["direction=\"inbound\""])
}

// Story: a client opens and cancels streams as fast as it can (the HTTP/2 rapid-reset
// pattern) on the outbound listener; meshd ends that connection and a normal request
// on a new connection still succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rapid_reset_streams_end_that_connection_only() {
    let app = DemoApp::start("contact", &[]);
    let pair = Pair::start("grpc", app.addr, None);
    let tcp = TcpStream::connect(("127.0.0.1", pair.outbound))
        .await
        .unwrap();
    let (mut send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let mut sent = 0;
    let mut err = None;
    for _ in 0..20_000 {
        let req = http::Request::builder()
            .method("POST")
            .uri(format!(
                "http://127.0.0.1:{}/contact.v1.ContactService/GetContact",
                pair.outbound
            ))
            .header("content-type", "application/grpc")
            .body(())
            .unwrap();
        match send.send_request(req, false) {
            Ok((_resp, mut body)) => {
                body.send_reset(h2::Reason::CANCEL);
                sent += 1;
            }
            Err(e) => {
                err = Some(e);
                break;
            }
        }
        if sent % 100 == 0 {
            tokio::task::yield_now().await;
        }
    }
    let end = tokio::time::timeout(Duration::from_secs(5), conn).await;
    let end = end.expect("the connection was not closed").unwrap();
    // meshd ends the connection with GOAWAY(ENHANCE_YOUR_CALM, "too_many_resets"); the
    // client usually reads it (as the send error or the connection's end), but sometimes
    // its next write hits the closed socket first (broken pipe).
    let reasons = [
        err.as_ref().and_then(|e| e.reason()),
        end.err().and_then(|e| e.reason()),
    ];
    assert!(
        reasons.contains(&Some(h2::Reason::ENHANCE_YOUR_CALM))
            || err.as_ref().is_some_and(|e| e.is_io()),
        "after {sent} cancelled streams: {err:?}"
    );
    // The streams meshd had already passed on before the reset reached it are cancelled
    // hop by hop; a request made during that tail shares its fate (the next hop may
    // close the connection for too many resets). Once both sidecars have settled (no
    // request finished for 200 ms), new requests must succeed.
    let handled = || pair.payment.metric("meshd_requests_total", &[]) + requests(&pair.contact);
    let (mut last, mut still) = (handled(), 0);
    let settled = common::meshd::wait_until(LIMIT, || {
        let now = handled();
        still = if now == last { still + 1 } else { 0 };
        last = now;
        still >= 4
    });
    assert!(settled, "the sidecars kept handling requests: {last}");
    for i in 0..5 {
        let ok = h2_get_contact(pair.outbound, &[])
            .await
            .expect("a normal request");
        assert_eq!(
            (ok.0, ok.1.as_str()),
            (200, "0"),
            "request {i}, after {last} handled: {ok:?}"
        );
    }
}
