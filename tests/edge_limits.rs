//! The edge faces the internet: what meshd's `connections:` limits do to clients that
//! misbehave, and what they leave for clients that do not.
//!
//! - At the gateway, 10,000 TCP connections that never start TLS and 1,000 slowloris
//!   clients (HTTP/1.1 headers a byte a second; HTTP/2 with PINGs but no request) sit
//!   beside a well-behaved gRPC client, whose p99 stays within 2x its unloaded p99. Each
//!   idle connection costs meshd about 300 bytes (at most 512); meshd closes them all at their
//!   timeout, counts each in `meshd_connection_limits_total`, logs each cause once, and
//!   its RSS stays bounded.
//! - `connections.max` closes the connection over the cap at accept.
//! - At the inbound, a peer with a valid SVID that sends nothing, one that goes quiet
//!   after a call, and one that stops answering PINGs are each closed by their limit.
//! - HTTP/2 CONTINUATION, SETTINGS and PING floods end at their limits too.
//! - Request bodies over `gateway.max_request_body` get 413 / RESOURCE_EXHAUSTED.

mod common;

use bytes::Bytes;
use common::edge::{gateway_payment_sidecar, inbound_sidecar, repo, write_gateway_cert};
use common::meshd::{free_port, wait_until, DemoApp, DevCa, Sidecar};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

const ZONES: &str = "/payment.v1.PaymentService/ListPricingZones";

/// The latency test runs alone (it holds this for writing): the other tests of this file
/// load the same two cores with floods of their own.
static ALONE: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

/// A gateway with a public route to the payment app behind its sidecar.
struct Gateway {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _app: DemoApp,
    _payment: Sidecar,
    gw: Sidecar,
    port: u16,
}

impl Gateway {
    fn start(connections: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = DevCa::start(d, &["payment-service", "api-gateway"], "1h", &[]);
        let nowhere = "http://127.0.0.1:9";
        let app = DemoApp::start(
            "payment",
            &[
                "--contact",
                nowhere,
                "--family",
                nowhere,
                "--document",
                nowhere,
            ],
        );
        let (payment, inbound) = gateway_payment_sidecar(d, &ca, app.addr);
        write_gateway_cert(d);
        let (port, admin) = (free_port(), free_port());
        let yaml = format!(
            r#"service: api-gateway
identity:
  workload_api: {socket}
outbound:
  - name: payment-service
    protocol: grpc
    endpoints: ["127.0.0.1:{inbound}"]
    server_id: spiffe://jia.app/payment-service
gateway:
  listen: 127.0.0.1:{port}
  tls: {{cert: {d}/gw.pem, key: {d}/gw-key.pem}}
  connections: {connections}
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment-service
      auth: none
admin:
  listen: 127.0.0.1:{admin}
"#,
            socket = ca.socket("api-gateway"),
            d = d.display(),
        );
        let gw = Sidecar::start("gateway", d, &yaml, admin);
        gw.wait_ready();
        Gateway {
            dir,
            _ca: ca,
            _app: app,
            _payment: payment,
            gw,
            port,
        }
    }

    fn open(&self) -> f64 {
        self.gw
            .metric("meshd_connections_open", &["direction=\"gateway\""])
    }

    fn limit(&self, limit: &str) -> f64 {
        let l = format!("limit=\"{limit}\"");
        self.gw.metric(
            "meshd_connection_limits_total",
            &["direction=\"gateway\"", &l],
        )
    }
}

/// meshd's resident memory in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A TLS client config trusting the gateway's certificate, offering `alpn`.
fn gateway_tls(dir: &Path, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(dir.join("gw.pem")).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS client config with the SVID `dev-ca --write-files` wrote into `dir`.
fn svid_tls(dir: &Path) -> tokio_rustls::TlsConnector {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read("bundle.pem").as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls_pemfile::certs(&mut read("svid.pem").as_slice())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut read("key.pem").as_slice())
        .unwrap()
        .unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    // SVIDs carry no DNS name: accept the chain by the bundle alone (this client only
    // needs to get in; the inbound's identity is tested elsewhere).
    let verifier = NoNameCheck(verifier.build().unwrap());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Verifies a server chain against the roots but ignores the name.
#[derive(Debug)]
struct NoNameCheck(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for NoNameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An h2 connection over TLS to `port`; the connection is driven by its own task.
async fn h2_connect<IO>(io: IO) -> h2::client::SendRequest<Bytes>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One gRPC call of `path` with an empty message; its grpc-status (or the error).
async fn grpc_call(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> Result<String, h2::Error> {
    let mut ready = send.clone().ready().await?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = ready.send_request(req, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let resp = resp.await?;
    let (parts, mut body) = resp.into_parts();
    while let Some(chunk) = body.data().await {
        let n = chunk?.len();
        let _ = body.flow_control().release_capacity(n);
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .or_else(|| parts.headers.get("grpc-status"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    Ok(status)
}

/// The p99 latency of `n` sequential calls on one connection (all must succeed).
async fn p99(send: &mut h2::client::SendRequest<Bytes>, n: usize) -> Duration {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let start = Instant::now();
        let status = grpc_call(send, ZONES)
            .await
            .expect("the good client's call");
        assert_eq!(status, "0", "call {i}");
        took.push(start.elapsed());
    }
    took.sort();
    took[n * 99 / 100]
}

/// A slowloris over HTTP/1.1: TLS, then a request's headers one byte a second, until
/// meshd closes the connection. Returns how long it was held.
async fn slow_http1(tls: tokio_rustls::TlsConnector, port: u16) -> Option<Duration> {
    let start = Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tls.connect(name, tcp).await.ok()?;
    s.write_all(b"GET /payment.v1.PaymentService/ListPricingZones HTTP/1.1\r\nHost: localhost\r\n")
        .await
        .ok()?;
    let mut buf = [0u8; 256];
    for byte in b"X-Slow: ".iter().cycle() {
        tokio::select! {
            read = s.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) { break },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if s.write_all(&[*byte]).await.is_err() || s.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    Some(start.elapsed())
}

/// HTTP/2 frame bytes: a 9-byte header and the payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A slowloris over HTTP/2: the preface and SETTINGS, then a PING a second and never a
/// request, until meshd closes the connection. Returns how long it was held.
async fn slow_h2(tls: tokio_rustls::TlsConnector, port: u16) -> Option<Duration> {
    let start = Instant::now();
    let tcp = TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let mut s = tls.connect(name, tcp).await.ok()?;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    s.write_all(&hello).await.ok()?;
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = s.read(&mut buf) => if !matches!(read, Ok(n) if n > 0) { break },
            () = tokio::time::sleep(Duration::from_secs(1)) => {
                if s.write_all(&frame(6, 0, 0, &[0; 8])).await.is_err() || s.flush().await.is_err() {
                    break;
                }
            }
        }
    }
    Some(start.elapsed())
}

/// The process logged `text` once (its output is read by a thread: wait for the line).
fn assert_logged_once(s: &Sidecar, text: &str) {
    wait_until(Duration::from_secs(5), || lines_with(s, text) >= 1);
    assert_eq!(lines_with(s, text), 1, "lines with {text:?}");
}

/// Lines of the process output that contain `text`.
fn lines_with(s: &Sidecar, text: &str) -> usize {
    s.proc.dump().lines().filter(|l| l.contains(text)).count()
}

// Story: an attacker holds 10,000 TCP connections that never start TLS and 1,000
// slowloris clients against the gateway. A partner's gRPC client keeps calling on its
// own connection with its p99 within 2x of before; each idle connection costs meshd about
// a kilobyte; meshd closes every attacking connection at its timeout, counts them, logs
// each cause once, and its memory stays bounded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_floods_leave_a_good_client_its_latency() {
    let _alone = ALONE.write().await;
    let _ = rlimit::increase_nofile_limit(u64::MAX);
    let g = Gateway::start("{handshake_timeout: 15s, header_timeout: 15s}");
    let d = g.dir.path();
    let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = gateway_tls(d, b"h2").connect(name, tcp).await.unwrap();
    let mut good = h2_connect(tls).await;
    p99(&mut good, 300).await; // warm up
    let unloaded = p99(&mut good, 1000).await;
    let rss_before = rss_kib(g.gw.proc.pid());

    // 10,000 connections that send nothing.
    let opening = Instant::now();
    let port = g.port;
    let openers: Vec<_> = (0..8)
        .map(|_| {
            std::thread::spawn(move || {
                (0..1250)
                    .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut idle: Vec<_> = openers
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    println!("10,000 idle connections opened in {:?}", opening.elapsed());
    assert!(
        wait_until(Duration::from_secs(10), || g.open() >= 10_001.0),
        "meshd holds {} connections: {}",
        g.open(),
        g.gw.proc
            .dump()
            .lines()
            .rev()
            .take(5)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let rss_idle = rss_kib(g.gw.proc.pid());
    let per_idle = (rss_idle.saturating_sub(rss_before)) * 1024 / 10_000;

    // 500 + 500 slowloris clients.
    let mut slow = Vec::new();
    for i in 0..1000 {
        slow.push(if i % 2 == 0 {
            tokio::spawn(slow_http1(gateway_tls(d, b"http/1.1"), g.port))
        } else {
            tokio::spawn(slow_h2(gateway_tls(d, b"h2"), g.port))
        });
    }
    assert!(
        wait_until(Duration::from_secs(10), || g.open() >= 11_001.0),
        "meshd holds {} connections",
        g.open()
    );
    let loaded = p99(&mut good, 1000).await;
    let rss_loaded = rss_kib(g.gw.proc.pid());
    println!(
        "good client p99: {unloaded:?} unloaded, {loaded:?} beside 11,000 bad connections; \
         RSS {rss_before} KiB -> {rss_idle} KiB with 10,000 idle ({per_idle} B each) -> {rss_loaded} KiB with the slowloris clients too"
    );
    // Within 2x, plus 2 ms for the scheduling noise of a shared 2-core CI machine.
    assert!(
        loaded <= unloaded * 2 + Duration::from_millis(2),
        "p99 {loaded:?} beside the flood, {unloaded:?} without"
    );
    assert!(per_idle <= 512, "{per_idle} bytes per idle connection");
    assert!(
        rss_loaded <= rss_before + 64 * 1024,
        "RSS grew from {rss_before} to {rss_loaded} KiB"
    );

    // meshd closes them all at their timeouts: the idle ones get EOF.
    for handle in slow {
        let held = handle.await.unwrap().expect("a slowloris client connected");
        assert!(
            held >= Duration::from_secs(12) && held <= Duration::from_secs(40),
            "a slowloris client was held {held:?}"
        );
    }
    assert!(
        wait_until(Duration::from_secs(30), || g.open() <= 1.0),
        "{} connections still open",
        g.open()
    );
    let mut eof = 0;
    for mut s in idle.drain(..100) {
        let mut buf = [0u8; 1];
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        if matches!(std::io::Read::read(&mut s, &mut buf), Ok(0)) {
            eof += 1;
        }
    }
    drop(idle);
    assert_eq!(eof, 100, "meshd closed the idle connections");
    assert!(g.limit("handshake_timeout") >= 10_000.0);
    assert!(g.limit("header_timeout") >= 1_000.0);
    assert_logged_once(&g.gw, "connections.handshake_timeout");
    assert_logged_once(&g.gw, "connections.header_timeout");
    // The memory stays bounded once they are gone (mimalloc keeps the freed pages for
    // the next connections rather than returning them all), and the good client still
    // gets answers.
    let rss_after = rss_kib(g.gw.proc.pid());
    println!("RSS after the flood: {rss_after} KiB");
    assert!(
        rss_after <= rss_loaded + 4 * 1024,
        "RSS {rss_after} KiB after, {rss_before} before, {rss_loaded} at the peak"
    );
    assert_eq!(grpc_call(&mut good, ZONES).await.unwrap(), "0");
}

// Story: the operator caps the gateway at 20 connections; the 21st is closed at once
// (counted and logged once), and when the 20 go, new clients get answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_over_the_cap_is_closed_at_accept() {
    let _shared = ALONE.read().await;
    let g = Gateway::start("{max: 20}");
    let mut held = Vec::new();
    for _ in 0..20 {
        held.push(TcpStream::connect(("127.0.0.1", g.port)).await.unwrap());
    }
    assert!(wait_until(Duration::from_secs(5), || g.open() >= 20.0));
    for _ in 0..3 {
        let mut over = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
        let mut buf = [0u8; 1];
        let read = tokio::time::timeout(Duration::from_secs(3), over.read(&mut buf)).await;
        assert!(
            matches!(read, Ok(Ok(0)) | Ok(Err(_))),
            "the connection over the cap was not closed: {read:?}"
        );
    }
    assert!(g.limit("max_connections") >= 3.0);
    assert_logged_once(&g.gw, "connections.max reached");
    drop(held);
    assert!(wait_until(Duration::from_secs(5), || g.open() == 0.0));
    let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = gateway_tls(g.dir.path(), b"h2")
        .connect(name, tcp)
        .await
        .unwrap();
    let mut send = h2_connect(tls).await;
    assert_eq!(grpc_call(&mut send, ZONES).await.unwrap(), "0");
    let opened = g.gw.metric(
        "meshd_tcp_connections_opened_total",
        &["direction=\"gateway\""],
    );
    assert!(opened >= 21.0, "opened {opened}");
}

/// An I/O that can be frozen: reads and writes then never complete (a peer whose host
/// died without a FIN).
struct Freezable<IO> {
    io: IO,
    frozen: Arc<AtomicBool>,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Freezable<IO> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.frozen.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Freezable<IO> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        if self.frozen.load(Ordering::Relaxed) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

// Story: three peers with valid SVIDs misbehave at a sidecar's inbound. One finishes its
// handshake and sends nothing; one makes a call and then goes quiet; one makes a call
// and then stops answering (its host died). meshd closes each by its own limit
// (header, idle, keepalive timeout) and counts it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inbound_closes_silent_idle_and_dead_peers() {
    let _shared = ALONE.read().await;
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let files = format!(
        "spiffe://jia.app/payment-service={}",
        d.join("pay").display()
    );
    let ca = DevCa::start(
        d,
        &["contact-service", "payment-service"],
        "1h",
        &["--write-files", &files],
    );
    let app = DemoApp::start("contact", &[]);
    let inbound = free_port();
    // The inbound with short limits (the `connections:` block rides on `protocol:`).
    let contact = inbound_sidecar(
        d,
        &ca.socket("contact-service"),
        "contact-service",
        inbound,
        &app.addr.to_string(),
        "grpc\n  connections: {header_timeout: 2s, idle_timeout: 3s, keepalive_interval: 1s, keepalive_timeout: 1s}",
        &repo("deploy/policies/contact-service.yaml"),
    );
    contact.wait_ready();
    let limit = |name: &str| {
        let l = format!("limit=\"{name}\"");
        contact.metric(
            "meshd_connection_limits_total",
            &["direction=\"inbound\"", &l],
        )
    };
    let tls = svid_tls(&d.join("pay"));
    let connect = || async {
        let tcp = TcpStream::connect(("127.0.0.1", inbound)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("contact-service").unwrap();
        tls.connect(name, tcp)
            .await
            .expect("mTLS with a valid SVID")
    };

    // Silent: closed after the header timeout.
    let mut silent = connect().await;
    let start = Instant::now();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), silent.read_to_end(&mut buf)).await;
    let held = start.elapsed();
    assert!(
        held >= Duration::from_millis(1500) && held < Duration::from_secs(8),
        "the silent peer was held {held:?}"
    );
    assert_eq!(limit("header_timeout"), 1.0);

    // Quiet after a call: it answers PINGs, and is closed after the idle timeout.
    let (send, conn) = h2::client::handshake(connect().await).await.unwrap();
    let ended = tokio::spawn(async move {
        let _ = conn.await;
        Instant::now()
    });
    let mut send = send;
    let health = "/grpc.health.v1.Health/Check";
    assert_eq!(grpc_call(&mut send, health).await.unwrap(), "0");
    let called = Instant::now();
    let ended = tokio::time::timeout(Duration::from_secs(15), ended)
        .await
        .expect("the idle connection was closed")
        .unwrap();
    let idle_for = ended - called;
    assert!(
        idle_for >= Duration::from_millis(2500),
        "closed after {idle_for:?} idle"
    );
    assert_eq!(limit("idle_timeout"), 1.0);
    assert_eq!(limit("keepalive_timeout"), 0.0);

    // Dead after a call: PINGs go unanswered, closed after the keepalive timeout.
    let frozen = Arc::new(AtomicBool::new(false));
    let io = Freezable {
        io: connect().await,
        frozen: frozen.clone(),
    };
    let mut send = h2_connect(io).await;
    assert_eq!(grpc_call(&mut send, health).await.unwrap(), "0");
    frozen.store(true, Ordering::Relaxed);
    assert!(
        wait_until(Duration::from_secs(10), || limit("keepalive_timeout")
            == 1.0),
        "keepalive_timeout {}",
        limit("keepalive_timeout")
    );
    assert_logged_once(&contact, "connections.keepalive_timeout");
    let open = contact.metric("meshd_connections_open", &["direction=\"inbound\""]);
    assert_eq!(open, 0.0, "connections still open");
}

// Story: a client floods CONTINUATION frames after a HEADERS frame that never ends; meshd
// ends that connection with GOAWAY(ENHANCE_YOUR_CALM) long before it has read a megabyte.
// Another floods SETTINGS frames without reading the ACKs, a third floods PING and
// SETTINGS frames and reads every ACK: both are closed after 200 control frames with no
// request between them, counted as `control_frame_flood`. None grows meshd's memory, and
// a normal client is answered throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuation_and_settings_floods_end_at_their_limits() {
    let _shared = ALONE.read().await;
    let g = Gateway::start("{header_timeout: 4s}");
    let d = g.dir.path();
    let rss_before = rss_kib(g.gw.proc.pid());
    let connect = || async {
        let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
        gateway_tls(d, b"h2").connect(name, tcp).await.unwrap()
    };

    // CONTINUATION flood: HEADERS without END_HEADERS, then 16 KB CONTINUATIONs.
    let mut s = connect().await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    // :method POST, :scheme https, :path / (static table), then a literal header.
    hello.extend(frame(1, 0, 1, &[0x83, 0x87, 0x84, 0x00, 1, b'a', 1, b'b']));
    s.write_all(&hello).await.unwrap();
    let mut block = Vec::new();
    while block.len() < 16_000 {
        block.extend_from_slice(&[0x00, 3, b'x', b'-', b'a', 1, b'b']);
    }
    let continuation = frame(9, 0, 1, &block);
    let mut sent = 0usize;
    let (mut rd, mut wr) = tokio::io::split(s);
    let writer = tokio::spawn(async move {
        while sent < 64 << 20 {
            if wr.write_all(&continuation).await.is_err() {
                break;
            }
            sent += continuation.len();
        }
        sent
    });
    let mut got = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), rd.read_to_end(&mut got)).await;
    let sent = tokio::time::timeout(Duration::from_secs(10), writer)
        .await
        .expect("the flood was cut off")
        .unwrap();
    assert!(sent < 8 << 20, "meshd read {sent} bytes of CONTINUATION");
    // A GOAWAY frame (type 7) with ENHANCE_YOUR_CALM (0xb) is in what meshd wrote.
    let goaway = got
        .windows(9 + 8)
        .any(|w| w[3] == 7 && w[9 + 4..9 + 8] == [0, 0, 0, 0xb]);
    assert!(
        goaway,
        "no GOAWAY(ENHANCE_YOUR_CALM) in {} bytes",
        got.len()
    );

    // SETTINGS flood without reading.
    let mut s = connect().await;
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    s.write_all(&hello).await.unwrap();
    let settings = frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]).repeat(1000);
    let start = Instant::now();
    let mut written = 0usize;
    let stalled = loop {
        match tokio::time::timeout(Duration::from_secs(2), s.write_all(&settings)).await {
            Ok(Ok(())) => written += settings.len(),
            Ok(Err(_)) => break false,
            Err(_) => break true,
        }
        if written > 256 << 20 {
            panic!("meshd read 256 MB of SETTINGS frames");
        }
    };
    println!(
        "SETTINGS flood: meshd stopped reading after {written} bytes (stalled: {stalled}) in {:?}",
        start.elapsed()
    );
    let mut tail = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut tail)).await;
    assert!(
        wait_until(Duration::from_secs(10), || g.limit("control_frame_flood")
            >= 1.0),
        "the SETTINGS flood was not closed as a control_frame_flood"
    );

    // PING and SETTINGS flood from a client that reads every ACK: closed after the
    // budget of 200 control frames without a request.
    let s = connect().await;
    let (mut rd, mut wr) = tokio::io::split(s);
    let reader = tokio::spawn(async move {
        let mut got = 0usize;
        let mut buf = vec![0u8; 64 << 10];
        while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(10), rd.read(&mut buf)).await
        {
            if n == 0 {
                break;
            }
            got += n;
        }
        got
    });
    let mut hello = PREFACE.to_vec();
    hello.extend(frame(4, 0, 0, &[]));
    wr.write_all(&hello).await.unwrap();
    let flood = [
        frame(6, 0, 0, &[1; 8]),
        frame(4, 0, 0, &[0, 3, 0, 0, 0, 100]),
    ]
    .concat();
    let mut sent_frames = 0usize;
    while sent_frames < 1_000_000 {
        if wr.write_all(&flood).await.is_err() || wr.flush().await.is_err() {
            break;
        }
        sent_frames += 2;
    }
    let acked = tokio::time::timeout(Duration::from_secs(15), reader)
        .await
        .expect("meshd kept the flooding connection open")
        .unwrap();
    println!(
        "PING/SETTINGS flood: closed after {sent_frames} frames sent, {acked} bytes of ACKs read"
    );
    assert!(
        sent_frames < 1_000_000,
        "meshd answered a million control frames"
    );
    assert!(
        wait_until(Duration::from_secs(10), || g.limit("control_frame_flood")
            >= 2.0),
        "the flood was not counted as control_frame_flood"
    );
    assert_logged_once(&g.gw, "SETTINGS/PING frames without a request");

    let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = gateway_tls(d, b"h2").connect(name, tcp).await.unwrap();
    let mut send = h2_connect(tls).await;
    assert_eq!(grpc_call(&mut send, ZONES).await.unwrap(), "0");
    let rss_after = rss_kib(g.gw.proc.pid());
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS {rss_before} -> {rss_after} KiB"
    );
}

/// A gRPC call of `path` carrying one message of `len` bytes, sent in 16 KB data frames,
/// with or without a content-length; its grpc-status and grpc-message.
async fn grpc_call_with_body(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    len: usize,
    declare: bool,
) -> (String, String) {
    let mut ready = send.clone().ready().await.unwrap();
    let mut req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    if declare {
        req = req.header("content-length", len + 5);
    }
    let (resp, mut body) = ready.send_request(req.body(()).unwrap(), false).unwrap();
    let mut message = vec![0u8; 5];
    message[1..5].copy_from_slice(&(len as u32).to_be_bytes());
    message.resize(len + 5, b'x');
    let sender = tokio::spawn(async move {
        for chunk in message.chunks(16 << 10) {
            body.reserve_capacity(chunk.len());
            let _ = std::future::poll_fn(|cx| body.poll_capacity(cx)).await;
            if body
                .send_data(Bytes::copy_from_slice(chunk), false)
                .is_err()
            {
                return;
            }
        }
        let _ = body.send_data(Bytes::new(), true);
    });
    let resp = resp.await.unwrap();
    let (parts, mut body) = resp.into_parts();
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { break };
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let trailers = body.trailers().await.ok().flatten().unwrap_or_default();
    sender.abort();
    let get = |name: &str| {
        (trailers.get(name).or_else(|| parts.headers.get(name)))
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
            .unwrap_or_default()
    };
    (get("grpc-status"), get("grpc-message"))
}

/// curl's HTTP status for a POST of `len` bytes to the gateway: over HTTP/1.1 with a
/// content-length, or (`streamed`) over HTTP/2 from a pipe, with no length declared.
fn curl_post(port: u16, len: usize, streamed: bool) -> String {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sSk",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--data-binary",
        "@-",
    ])
    .arg(format!(
        "https://localhost:{port}/payment.v1.PaymentService/ListPricingZones"
    ))
    .args(["--resolve", &format!("localhost:{port}:127.0.0.1")])
    .arg(if streamed { "--http2" } else { "--http1.1" })
    .stdin(Stdio::piped())
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    if !streamed {
        cmd.args(["-H", &format!("content-length: {len}")]);
    }
    let mut child = cmd
        .spawn()
        .expect("curl (Debian package curl) must be installed");
    let mut stdin = child.stdin.take().unwrap();
    let body = vec![b'x'; len];
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&body);
    });
    let out = child.wait_with_output().unwrap();
    let _ = writer.join();
    let code = String::from_utf8_lossy(&out.stdout).into_owned();
    if code != "413" && code != "200" {
        println!("curl: {code}: {}", String::from_utf8_lossy(&out.stderr));
    }
    code
}

// Story: the gateway allows 64 KiB of request body. A gRPC client sending a 1 MB message
// gets RESOURCE_EXHAUSTED naming the limit, whether its content-length said so (refused
// before the app is called) or not (cut off on the way); curl posting 256 KiB gets 413
// both ways (HTTP/1.1 with a content-length, HTTP/2 streamed from a pipe); calls under the limit go through, each refusal is counted as
// `too_large`, and the connection that was refused still works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_over_max_request_body_are_refused_with_413_or_resource_exhausted() {
    let _shared = ALONE.read().await;
    let g = Gateway::start("{}\n  max_request_body: 64KiB");
    let d = g.dir.path();
    let tcp = TcpStream::connect(("127.0.0.1", g.port)).await.unwrap();
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let tls = gateway_tls(d, b"h2").connect(name, tcp).await.unwrap();
    let mut send = h2_connect(tls).await;

    for declare in [true, false] {
        let (status, message) = grpc_call_with_body(&mut send, ZONES, 1 << 20, declare).await;
        assert_eq!(
            status, "8",
            "1 MB, content-length declared: {declare}: {message}"
        );
        assert!(
            message.contains("max_request_body of 65536 bytes"),
            "{message}"
        );
    }
    // Under the limit the body reaches the app: 1 KB of 'x' is not a valid message, so
    // the app's own answer (not the gateway's 8) proves it got through.
    let (status, message) = grpc_call_with_body(&mut send, ZONES, 1 << 10, false).await;
    println!("1 KB of 'x' to the app: grpc-status {status} ({message})");
    assert!(
        !message.contains("max_request_body"),
        "1 KB was refused: {message}"
    );
    assert_eq!(grpc_call(&mut send, ZONES).await.unwrap(), "0");

    // 256 KiB: over the limit, and under the 1 MiB the gateway reads of a refused
    // body so that curl, still sending, gets the answer rather than a reset.
    assert_eq!(curl_post(g.port, 256 << 10, false), "413");
    assert_eq!(curl_post(g.port, 256 << 10, true), "413");
    let small = curl_post(g.port, 1 << 10, true);
    println!("curl, 1 KB streamed: HTTP {small}");
    assert_ne!(small, "413", "a 1 KB POST was refused");
    let too_large = g.gw.metric(
        "gateway_requests_failed_total",
        &["service=\"payments\"", "reason=\"too_large\""],
    );
    assert_eq!(too_large, 4.0, "too_large refusals counted");
}
