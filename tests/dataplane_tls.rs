//! The inbound mTLS port against real TLS clients (openssl s_client, curl, grpcurl) and
//! raw bytes: who gets in, who is refused and how each refusal is counted in
//! `meshd_tls_handshake_failures_total{direction="inbound",reason}`, and that nothing a
//! client sends stops the sidecar from serving the next caller.

mod common;

use common::edge::{
    get_contact_args, inbound_sidecar, outbound_sidecar, repo, run, wait_counter, Run,
};
use common::meshd::{free_port, DemoApp, DevCa, Proc, Sidecar};
use meshd::pb::contact::contact_service_client::ContactServiceClient;
use meshd::pb::contact::GetContactRequest;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const PAYMENT: &str = "spiffe://jia.app/payment-service";
const LIMIT: Duration = Duration::from_secs(15);

/// The dev CA (payment's SVID also written to files, a federated `partner.example`), a
/// second CA nobody federates with, the contact app behind its gRPC sidecar, and the
/// payment sidecar's outbound listener to it.
struct Mesh {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _stranger_ca: Proc,
    _app: DemoApp,
    contact: Sidecar,
    _payment: Sidecar,
    inbound: u16,
    outbound: u16,
}

impl Mesh {
    fn start() -> Mesh {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let files = format!("{PAYMENT}={}", d.join("pay").display());
        let ca_dir = d.join("ca").display().to_string();
        let ca = DevCa::start(
            d,
            &["payment-service", "contact-service"],
            "1h",
            &[
                "--federate",
                "partner.example",
                "--write-ca-dir",
                &ca_dir,
                "--write-files",
                &files,
            ],
        );
        let mut cmd = Command::new(common::meshd::meshd_bin());
        cmd.args(["dev-ca", "--federate", "stranger.example", "--write-ca-dir"])
            .arg(d.join("stranger"));
        let stranger_ca = Proc::spawn("stranger-ca", cmd, Some("dev-ca ready"));
        let app = DemoApp::start("contact", &[]);
        let inbound = free_port();
        let contact = inbound_sidecar(
            d,
            &ca.socket("contact-service"),
            "contact-service",
            inbound,
            &app.addr.to_string(),
            "grpc",
            &repo("deploy/policies/contact-service.yaml"),
        );
        let outbound = free_port();
        let payment = outbound_sidecar(
            d,
            &ca.socket("payment-service"),
            "payment-service",
            outbound,
            inbound,
            "spiffe://jia.app/contact-service",
            "grpc",
        );
        contact.wait_ready();
        payment.wait_ready();
        Mesh {
            dir,
            _ca: ca,
            _stranger_ca: stranger_ca,
            _app: app,
            contact,
            _payment: payment,
            inbound,
            outbound,
        }
    }

    /// A file written by the CAs, as a string argument.
    fn file(&self, rel: &str) -> String {
        self.dir.path().join(rel).display().to_string()
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.inbound)
    }

    /// `openssl s_client` against the inbound port with `extra` arguments.
    async fn s_client(&self, extra: &[&str]) -> Run {
        let addr = self.addr();
        let mut args = vec!["s_client", "-connect", &addr];
        args.extend_from_slice(extra);
        run("openssl", &args, LIMIT).await
    }

    /// The payment SVID as openssl/curl/grpcurl client-certificate options.
    fn payment_cert(&self) -> [String; 4] {
        [
            "-cert".into(),
            self.file("pay/svid.pem"),
            "-key".into(),
            self.file("pay/key.pem"),
        ]
    }

    /// Waits for `reason` to be counted at least `n` times; returns the count.
    fn failures(&self, reason: &str, n: f64) -> f64 {
        let r = format!("reason=\"{reason}\"");
        wait_counter(
            &self.contact,
            "meshd_tls_handshake_failures_total",
            &["direction=\"inbound\"", &r],
            n,
        )
    }

    /// A normal call through the payment sidecar still works and carries payment's ID.
    async fn still_serves(&self) {
        let ch =
            tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", self.outbound))
                .unwrap()
                .connect()
                .await
                .expect("connect to the outbound listener");
        let r = ContactServiceClient::new(ch)
            .get_contact(GetContactRequest {
                contact_id: "after".into(),
                payload: vec![],
            })
            .await
            .expect("a normal call right after still works")
            .into_inner();
        assert_eq!(r.seen_caller, PAYMENT);
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// Story: a TLS client without a client certificate gets no HTTP answer, and the refusal
// is counted as no_client_cert.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_without_a_certificate_is_refused() {
    let m = Mesh::start();
    let r = m.s_client(&["-ign_eof", "-alpn", "h2"]).await;
    assert!(
        r.text.contains("alert certificate required"),
        "openssl should see the server demand a certificate:\n{}",
        r.text
    );
    let url = format!("https://{}/contact.v1.ContactService/GetContact", m.addr());
    let c = run(
        "curl",
        &[
            "-sS",
            "--http2",
            "-k",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            &url,
        ],
        LIMIT,
    )
    .await;
    assert!(!c.ok(), "curl without a certificate got an answer: {c:?}");
    assert!(m.failures("no_client_cert", 2.0) >= 2.0);
    m.still_serves().await;
}

// Story: a valid SVID of a trust domain the mesh does not federate with is refused at
// the handshake (unknown_ca); a federated partner's SVID passes TLS but the contact
// policy denies it by name.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stranger_svid_is_refused_and_a_federated_one_meets_the_policy() {
    let m = Mesh::start();
    let (cert, key) = (
        m.file("stranger/stranger.example.svid.pem"),
        m.file("stranger/stranger.example.key.pem"),
    );
    let r = m
        .s_client(&["-ign_eof", "-alpn", "h2", "-cert", &cert, "-key", &key])
        .await;
    assert!(r.text.contains("alert unknown ca"), "{}", r.text);
    let url = format!("https://{}/contact.v1.ContactService/GetContact", m.addr());
    let c = run(
        "curl",
        &[
            "-sS",
            "--http2",
            "-k",
            "--cert",
            &cert,
            "--key",
            &key,
            "-o",
            "/dev/null",
            &url,
        ],
        LIMIT,
    )
    .await;
    assert!(!c.ok(), "the stranger got an answer: {c:?}");
    assert!(m.failures("unknown_ca", 2.0) >= 2.0);

    let g = grpcurl_get(
        &m.addr(),
        &[
            "-insecure",
            "-cert",
            &m.file("ca/partner.example.svid.pem"),
            "-key",
            &m.file("ca/partner.example.key.pem"),
        ],
    )
    .await;
    assert!(!g.ok(), "{g:?}");
    assert!(
        g.text.contains("PermissionDenied") && g.text.contains("denied by default deny"),
        "the federated partner is refused by the policy, not by TLS:\n{}",
        g.text
    );
    m.still_serves().await;
}

/// grpcurl's `GetContact(c1)` against `addr` with `extra` connection flags.
async fn grpcurl_get(addr: &str, extra: &[&str]) -> Run {
    let args = get_contact_args(extra, addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    run("grpcurl", &args, LIMIT).await
}

// Story: with payment's SVID, openssl completes the handshake (h2, chain valid to the
// bundle, server is contact-service) and curl and grpcurl get answers that the contact
// app attributes to payment-service.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_valid_svid_gets_in_with_openssl_curl_and_grpcurl() {
    let m = Mesh::start();
    let cert = m.payment_cert();
    let bundle = m.file("pay/bundle.pem");
    let mut args = vec!["-alpn", "h2", "-CAfile", &bundle];
    args.extend(strs(&cert));
    let r = m.s_client(&args).await;
    assert!(r.ok(), "{}", r.text);
    assert!(r.text.contains("ALPN protocol: h2"), "{}", r.text);
    assert!(r.text.contains("Verify return code: 0 (ok)"), "{}", r.text);
    let leaf = r
        .text
        .split_once("-----BEGIN CERTIFICATE-----")
        .and_then(|(_, rest)| rest.split_once("-----END CERTIFICATE-----"))
        .map(|(b64, _)| format!("-----BEGIN CERTIFICATE-----{b64}-----END CERTIFICATE-----\n"))
        .expect("s_client prints the server certificate");
    let leaf_file = m.file("server.pem");
    std::fs::write(&leaf_file, leaf).unwrap();
    let san = run(
        "openssl",
        &[
            "x509",
            "-in",
            &leaf_file,
            "-noout",
            "-ext",
            "subjectAltName",
        ],
        LIMIT,
    )
    .await;
    assert!(
        san.text.contains("URI:spiffe://jia.app/contact-service"),
        "{}",
        san.text
    );

    // A gRPC frame by hand: GetContactRequest{contact_id: "c1"}.
    let frame = m.file("get.bin");
    std::fs::write(&frame, [0, 0, 0, 0, 4, 0x0a, 2, b'c', b'1']).unwrap();
    let url = format!("https://{}/contact.v1.ContactService/GetContact", m.addr());
    let data = format!("@{frame}");
    let mut args = vec!["-sS", "--http2", "--insecure", "--max-time", "5"];
    let curl_cert = ["--cert", cert[1].as_str(), "--key", cert[3].as_str()];
    args.extend_from_slice(&curl_cert);
    args.extend_from_slice(&[
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "--data-binary",
        &data,
        "-o",
        "-",
        &url,
    ]);
    let c = run("curl", &args, LIMIT).await;
    assert!(c.ok(), "{}", c.text);
    assert!(
        String::from_utf8_lossy(&c.stdout).contains(PAYMENT),
        "the app saw the caller's SPIFFE ID: {}",
        c.text
    );

    let mut flags = vec!["-insecure"];
    flags.extend(strs(&cert));
    let g = grpcurl_get(&m.addr(), &flags).await;
    assert!(g.ok(), "{}", g.text);
    assert!(
        g.text.contains(&format!("\"seenCaller\": \"{PAYMENT}\"")),
        "{}",
        g.text
    );
}

// Story: a valid client that offers no ALPN (or only http/1.1) is closed right after the
// handshake and counted as no_alpn, while an h2 connection stays open and a normal call
// right after works.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_without_alpn_h2_is_closed_and_others_are_unaffected() {
    let m = Mesh::start();
    let cert = m.payment_cert();
    let mut args = vec!["-ign_eof"];
    args.extend(strs(&cert));
    let r = m.s_client(&args).await;
    assert!(
        r.status.is_some(),
        "the sidecar kept a no-ALPN connection open"
    );
    assert!(r.text.contains("No ALPN negotiated"), "{}", r.text);
    assert!(m.failures("no_alpn", 1.0) >= 1.0);

    // The same client with ALPN h2 is kept (openssl is still connected at the limit).
    args.extend(["-alpn", "h2"]);
    let addr = m.addr();
    let mut h2 = vec!["s_client", "-connect", &addr];
    h2.extend_from_slice(&args);
    let kept = run("openssl", &h2, Duration::from_secs(2)).await;
    assert!(kept.status.is_none(), "an h2 client was closed: {kept:?}");

    let url = format!("https://{}/", m.addr());
    let mut args = vec!["-sS", "--http1.1", "--insecure", "--max-time", "5"];
    args.extend_from_slice(&[
        "--cert",
        &cert[1],
        "--key",
        &cert[3],
        "-o",
        "/dev/null",
        &url,
    ]);
    let c = run("curl", &args, LIMIT).await;
    assert!(!c.ok(), "an HTTP/1.1 client got an answer: {c:?}");
    assert!(m.failures("no_alpn", 2.0) >= 2.0);
    m.still_serves().await;
}

/// Deterministic pseudo-random bytes (splitmix64).
fn noise(n: usize, seed: u64) -> Vec<u8> {
    let mut s = seed;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(n);
    out
}

/// The first bytes a real TLS client sends: a rustls ClientHello offering h2.
fn client_hello() -> Vec<u8> {
    let provider = meshd::identity::crypto_provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let name = rustls_pki_types::ServerName::try_from("contact.test").unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
    let mut hello = Vec::new();
    conn.write_tls(&mut hello).unwrap();
    hello
}

/// Writes `bytes`, half-closes, and reads until the sidecar closes (5 s at most).
async fn send_and_wait_close(port: u16, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let _ = s.shutdown().await;
    let mut got = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut got)).await;
    assert!(read.is_ok(), "the sidecar kept the connection open");
    got
}

// Story: 1 KB of random bytes, half a ClientHello, a bare connect-and-close and a
// stalled handshake neither answer with data nor disturb the sidecar: each is closed
// (garbage counted as not_tls) and a normal call still works, even while one stalls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn garbage_and_truncated_handshakes_do_not_hurt_the_sidecar() {
    let m = Mesh::start();
    let garbage = noise(1024, 7);
    let got = send_and_wait_close(m.inbound, &garbage).await;
    assert!(!got.windows(4).any(|w| w == b"HTTP"), "{got:?}");
    assert!(m.failures("not_tls", 1.0) >= 1.0);

    let hello = client_hello();
    assert!(
        hello.len() > 100 && hello[0] == 0x16,
        "a TLS handshake record"
    );
    send_and_wait_close(m.inbound, &hello[..50]).await;
    assert!(m.failures("truncated", 1.0) >= 1.0);
    send_and_wait_close(m.inbound, &[]).await;
    m.still_serves().await;

    // A client that stalls mid-handshake holds only its own connection.
    let mut stalled = TcpStream::connect(("127.0.0.1", m.inbound)).await.unwrap();
    stalled.write_all(&hello[..50]).await.unwrap();
    m.still_serves().await;
    drop(stalled);
}

// Story: openssl s_time opens mTLS connections as fast as it can and closes each as soon
// as its handshake is done, as a TLS probe would; the session tickets meshd sends after
// the handshake then meet a reset. Those clients were verified and finished: none is
// counted as a failed handshake (no `io`, no `truncated`). A client that resets before
// finishing still is, and the sidecar serves the next caller.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn clients_leaving_right_after_the_handshake_are_not_failures() {
    let m = Mesh::start();
    let (addr, cert, bundle) = (m.addr(), m.payment_cert(), m.file("pay/bundle.pem"));
    let mut args = vec!["s_time", "-connect", &addr, "-new", "-time", "2"];
    args.extend(strs(&cert));
    args.extend(["-CAfile", &bundle]);
    let r = run("openssl", &args, LIMIT).await;
    let done: u32 = r
        .text
        .split_once(" connections in ")
        .and_then(|(n, _)| n.rsplit(char::is_whitespace).next()?.parse().ok())
        .unwrap_or(0);
    assert!(done >= 20, "s_time finished {done} handshakes:\n{}", r.text);
    let failed = |reason: &str| {
        let r = format!("reason=\"{reason}\"");
        let parts = ["direction=\"inbound\"", r.as_str()];
        m.contact
            .metric("meshd_tls_handshake_failures_total", &parts)
    };
    assert_eq!(failed("io") + failed("truncated"), 0.0, "{done} handshakes");

    // Reset (SO_LINGER 0) after meshd's first flight, before the client's own.
    let mut s = TcpStream::connect(("127.0.0.1", m.inbound)).await.unwrap();
    s.write_all(&client_hello()).await.unwrap();
    let mut first = [0u8; 1];
    s.read_exact(&mut first).await.unwrap();
    s.set_zero_linger().unwrap();
    drop(s);
    assert!(
        m.failures("truncated", 1.0) >= 1.0,
        "a reset mid-handshake counts"
    );
    m.still_serves().await;
}

// Story: the TLS policy seen from openssl: TLS 1.2 only with ECDHE AES-GCM (ChaCha20 is
// refused), TLS 1.1 refused even when the client would allow it, TLS 1.3 by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_tls13_and_tls12_aes_gcm_are_accepted() {
    let m = Mesh::start();
    let cert = m.payment_cert();
    let with = |extra: &[&'static str]| {
        let mut v: Vec<String> = vec!["-alpn".into(), "h2".into()];
        v.extend(cert.iter().cloned());
        v.extend(extra.iter().map(|s| s.to_string()));
        v
    };
    let chacha = with(&["-tls1_2", "-cipher", "ECDHE-ECDSA-CHACHA20-POLY1305"]);
    let r = m.s_client(&strs(&chacha)).await;
    assert!(
        !r.ok() && r.text.contains("alert handshake failure"),
        "{}",
        r.text
    );

    let gcm = with(&["-tls1_2", "-cipher", "ECDHE-ECDSA-AES128-GCM-SHA256"]);
    let r = m.s_client(&strs(&gcm)).await;
    assert!(r.ok(), "{}", r.text);
    assert!(
        r.text
            .contains("New, TLSv1.2, Cipher is ECDHE-ECDSA-AES128-GCM-SHA256"),
        "{}",
        r.text
    );
    assert!(r.text.contains("ALPN protocol: h2"), "{}", r.text);

    // SECLEVEL=0 so that openssl really offers TLS 1.1 and the refusal is meshd's.
    let old = with(&["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    let r = m.s_client(&strs(&old)).await;
    assert!(
        !r.ok() && r.text.contains("alert handshake failure"),
        "{}",
        r.text
    );
    assert!(m.failures("incompatible", 2.0) >= 2.0);

    let r = m.s_client(&strs(&with(&[]))).await;
    assert!(r.ok() && r.text.contains("New, TLSv1.3"), "{}", r.text);
}

// Story: grpcurl, a real gRPC client, calls contact through the payment sidecar's
// plaintext outbound listener and the app sees payment-service; the same plaintext call
// straight at the contact sidecar's inbound port fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn grpcurl_through_the_outbound_works_and_plaintext_inbound_fails() {
    let m = Mesh::start();
    let out = format!("127.0.0.1:{}", m.outbound);
    let g = grpcurl_get(&out, &["-plaintext"]).await;
    assert!(g.ok(), "{}", g.text);
    assert!(
        g.text.contains(&format!("\"seenCaller\": \"{PAYMENT}\"")),
        "{}",
        g.text
    );
    let g = grpcurl_get(&m.addr(), &["-plaintext"]).await;
    assert!(
        !g.ok(),
        "plaintext gRPC got into the inbound port: {}",
        g.text
    );
    assert!(m.failures("not_tls", 1.0) >= 1.0);
}
