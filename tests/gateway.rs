//! The edge gateway with real clients: grpcurl over HTTPS to meshd in gateway mode, which
//! checks JWTs (ES256, against a JWKS file) and API keys (against their SHA-256 hashes),
//! rate-limits, and carries allowed calls over mTLS (as spiffe://jia.app/api-gateway) to
//! the payment service's sidecar, whose policy admits the gateway.

mod common;

use common::edge::{gateway_payment_sidecar, repo, tool, write_gateway_cert};
use common::meshd::{free_port, wait_until, DemoApp, DevCa, Sidecar};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://auth.jia.app";
const API_KEY: &str = "k-alice-5bd0c1a2";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// The payment app behind its sidecar, the gateway in front, and what clients hold: the
/// gateway's CA certificate, a signing key the JWKS trusts, and an API key.
struct Edge {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _app: DemoApp,
    _payment: Sidecar,
    gateway: Sidecar,
    addr: String,
    signer: jsonwebtoken::EncodingKey,
}

impl Edge {
    fn start() -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = DevCa::start(d, &["payment-service", "api-gateway"], "1h", &[]);
        // GetPayment and ListPricingZones call no downstream: nothing listens on these.
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

        // The gateway's certificate (for "localhost"), the JWKS and the API keys file.
        write_gateway_cert(d);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = key.public_key_raw();
        assert_eq!(point.len(), 65, "an uncompressed P-256 point");
        let jwks = meshd::gateway::p256_jwks(point, "k1").unwrap();
        std::fs::write(d.join("jwks.json"), jwks).unwrap();
        let signer =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let digest = ring::digest::digest(&ring::digest::SHA256, API_KEY.as_bytes());
        let hex: String = digest.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        std::fs::write(
            d.join("api-keys.yaml"),
            format!("- user: alice-service\n  sha256: {hex}\n"),
        )
        .unwrap();

        let (listen, admin) = (free_port(), free_port());
        let yaml = format!(
            r#"service: api-gateway
identity:
  workload_api: {socket}
  expect: spiffe://jia.app/api-gateway
outbound:
  - name: payment-service
    protocol: grpc
    endpoints: ["127.0.0.1:{inbound}"]
    server_id: spiffe://jia.app/payment-service
gateway:
  listen: 127.0.0.1:{listen}
  tls: {{cert: {dir}/gw.pem, key: {dir}/gw-key.pem}}
  jwt: {{issuer: "{ISSUER}", audiences: [jia-api], jwks: {dir}/jwks.json}}
  api_keys: {dir}/api-keys.yaml
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment-service
    - name: pricing
      prefix: /payment.v1.PaymentService/ListPricingZones
      upstream: payment-service
      auth: none
      rate_limit: {{per_second: 1, burst: 3}}
admin:
  listen: 127.0.0.1:{admin}
log:
  access: all
"#,
            socket = ca.socket("api-gateway"),
            dir = d.display(),
        );
        let check = Command::new(common::meshd::meshd_bin())
            .args(["check", "--config"])
            .arg(write(d, "gateway.yaml", &yaml))
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(check.status.success(), "{report}");
        for file in [
            "(gateway.tls): ok",
            "(gateway.jwt.jwks): ok",
            "(gateway.api_keys): ok",
        ] {
            assert!(report.contains(file), "{file} not in {report}");
        }
        let gateway = Sidecar::start("gateway", d, &yaml, admin);
        gateway.wait_ready();
        Edge {
            dir,
            _ca: ca,
            _app: app,
            _payment: payment,
            gateway,
            addr: format!("127.0.0.1:{listen}"),
            signer,
        }
    }

    fn token(&self, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        jsonwebtoken::encode(&header, &claims, &self.signer).unwrap()
    }

    fn good_claims(&self) -> serde_json::Value {
        serde_json::json!({"iss": ISSUER, "aud": "jia-api", "sub": "alice", "exp": now() + 300})
    }

    /// grpcurl over TLS (trusting the gateway's certificate) with extra headers.
    fn call(&self, method: &str, body: &str, headers: &[String]) -> (bool, String) {
        let ca = self.dir.path().join("gw.pem").display().to_string();
        let mut flags = vec!["-cacert", &ca, "-servername", "localhost"];
        for h in headers {
            flags.extend(["-H", h.as_str()]);
        }
        let target = format!("payment.v1.PaymentService/{method}");
        self.grpcurl(&flags, "payment.proto", body, &target)
    }

    /// grpcurl to the gateway with connection `flags`, one call of `target`.
    fn grpcurl(&self, flags: &[&str], proto: &str, body: &str, target: &str) -> (bool, String) {
        let dir = repo("proto").display().to_string();
        let mut args = vec![
            "-max-time",
            "5",
            "-import-path",
            &dir,
            "-proto",
            proto,
            "-d",
            body,
        ];
        args.extend(flags);
        args.extend([self.addr.as_str(), target]);
        let out = Command::new(tool("grpcurl")).args(&args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    fn get_payment(&self, headers: &[String]) -> String {
        self.call("GetPayment", r#"{"payment_id":"p-1"}"#, headers)
            .1
    }

    fn metric(&self, name: &str, parts: &[&str]) -> f64 {
        self.gateway.metric(name, parts)
    }

    /// The metric once it reaches `want` (a request is recorded when its response body
    /// ends, which may be just after the client has its answer), or its last value.
    fn settled(&self, name: &str, parts: &[&str], want: f64) -> f64 {
        wait_until(Duration::from_secs(5), || self.metric(name, parts) >= want);
        self.metric(name, parts)
    }
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn bearer(token: &str) -> Vec<String> {
    vec![format!("authorization: Bearer {token}")]
}

// Story: a call without credentials, with a bad token of each kind, or with an unknown API
// key is refused as UNAUTHENTICATED by the gateway itself; a valid JWT or API key gets
// through to the payment app (whose NotFound answer proves it was reached), and the
// gateway's metrics and access log say who called. No token or key is ever logged.
#[test]
fn only_valid_credentials_reach_the_service() {
    let e = Edge::start();
    let refused = |text: &str, why: &str| {
        assert!(text.contains("Code: Unauthenticated"), "{text}");
        assert!(text.contains(why), "{why} not in {text}");
    };
    refused(&e.get_payment(&[]), "credentials required");
    let expired = e.token(
        serde_json::json!({"iss": ISSUER, "aud": "jia-api", "sub": "alice", "exp": now() - 3600}),
    );
    refused(&e.get_payment(&bearer(&expired)), "ExpiredSignature");
    let wrong_aud = e.token(
        serde_json::json!({"iss": ISSUER, "aud": "other", "sub": "alice", "exp": now() + 300}),
    );
    refused(&e.get_payment(&bearer(&wrong_aud)), "InvalidAudience");
    let wrong_iss = e.token(serde_json::json!({"iss": "https://evil", "aud": "jia-api", "sub": "alice", "exp": now() + 300}));
    refused(&e.get_payment(&bearer(&wrong_iss)), "InvalidIssuer");
    let good = e.token(e.good_claims());
    // The same claims and kid, signed by a key the JWKS does not hold.
    let other = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let other = jsonwebtoken::EncodingKey::from_ec_pem(other.serialize_pem().as_bytes()).unwrap();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some("k1".into());
    let forged = jsonwebtoken::encode(&header, &e.good_claims(), &other).unwrap();
    refused(&e.get_payment(&bearer(&forged)), "InvalidSignature");
    refused(
        &e.get_payment(&["x-api-key: k-nobody".to_string()]),
        "unknown API key",
    );
    let unauthenticated = e.settled(
        "gateway_requests_failed_total",
        &["service=\"payments\"", "reason=\"unauthenticated\""],
        6.0,
    );
    assert_eq!(unauthenticated, 6.0);

    let text = e.get_payment(&bearer(&good));
    assert!(
        text.contains("Code: NotFound") && text.contains("no payment p-1"),
        "{text}"
    );
    let text = e.get_payment(&[format!("x-api-key: {API_KEY}")]);
    assert!(text.contains("no payment p-1"), "{text}");
    assert_eq!(
        e.settled(
            "gateway_requests_total",
            &["service=\"payments\"", "status=\"5\""],
            2.0
        ),
        2.0
    );
    assert_eq!(
        e.settled("gateway_requests_total", &["service=\"payments\""], 8.0),
        8.0
    );

    let logged = wait_until(Duration::from_secs(5), || {
        e.gateway
            .proc
            .dump()
            .contains("\"user_id\":\"alice-service\"")
    });
    assert!(logged, "{}", e.gateway.proc.dump());
    let out = e.gateway.proc.dump();
    let line = out
        .lines()
        .find(|l| l.contains("\"user_id\":\"alice\""))
        .unwrap_or_else(|| panic!("no access-log line for alice:\n{out}"));
    for field in [
        "\"direction\":\"gateway\"",
        "\"ip\":\"127.0.0.1\"",
        "\"user_agent\":\"grpcurl",
        "\"service\":\"payments\"",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    for secret in [good.as_str(), API_KEY, expired.as_str()] {
        assert!(!out.contains(secret), "a credential was logged");
    }
}

// Story: the public pricing route needs no credentials but allows 3 calls at once and 1
// per second after: of 6 quick calls, at least 2 are refused as RESOURCE_EXHAUSTED and
// counted; calls with a user are limited per user, apart from the anonymous ones.
#[test]
fn a_public_route_is_rate_limited_per_caller() {
    let e = Edge::start();
    let mut ok = 0;
    let mut limited = 0;
    for _ in 0..6 {
        let (success, text) = e.call("ListPricingZones", "{}", &[]);
        if success {
            assert!(text.contains("zones"), "{text}");
            ok += 1;
        } else {
            assert!(
                text.contains("Code: ResourceExhausted") && text.contains("retry in"),
                "{text}"
            );
            limited += 1;
        }
    }
    assert!(ok >= 3 && limited >= 2, "ok {ok}, limited {limited}");
    let hits = e.metric("gateway_rate_limit_hits_total", &["service=\"pricing\""]);
    assert_eq!(hits, f64::from(limited));
    // alice has a bucket of her own.
    let good = e.token(e.good_claims());
    let (success, text) = e.call("ListPricingZones", "{}", &bearer(&good));
    assert!(success, "{text}");
}

// Story: the gateway speaks only TLS: a plaintext client gets nothing, and a path no
// route names is UNIMPLEMENTED.
#[test]
fn plaintext_and_unrouted_calls_get_nowhere() {
    let e = Edge::start();
    let listing = "payment.v1.PaymentService/ListPricingZones";
    let (ok, _) = e.grpcurl(&["-plaintext"], "payment.proto", "{}", listing);
    assert!(!ok);
    let counted = wait_until(Duration::from_secs(5), || {
        e.metric(
            "meshd_tls_handshake_failures_total",
            &["direction=\"gateway\"", "reason=\"not_tls\""],
        ) >= 1.0
    });
    assert!(
        counted,
        "the plaintext client's failed handshake was not counted"
    );
    let ca = e.dir.path().join("gw.pem").display().to_string();
    let flags = ["-cacert", ca.as_str(), "-servername", "localhost"];
    let (_, text) = e.grpcurl(
        &flags,
        "contact.proto",
        "{}",
        "contact.v1.ContactService/GetContact",
    );
    assert!(
        text.contains("Code: Unimplemented") && text.contains("no gateway route"),
        "{text}"
    );
    assert_eq!(
        e.metric("gateway_requests_failed_total", &["reason=\"no_route\""]),
        1.0
    );
}

// Story: `meshd check` reads the gateway's files as `meshd run` would: a missing
// certificate, a JWKS that is not one and an API keys entry without a proper hash are each
// reported with the file, and the exit status is 1.
#[test]
fn check_names_each_bad_gateway_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "jwks.json", r#"{"keys": "none"}"#);
    write(d, "keys.yaml", "- {user: a, sha256: 1234}\n");
    let yaml = format!(
        "service: api-gateway\noutbound:\n  - name: p\n    endpoints: [\"127.0.0.1:1\"]\n    server_id: spiffe://jia.app/p\ngateway:\n  tls: {{cert: {d}/none.pem, key: {d}/none-key.pem}}\n  jwt: {{issuer: i, audiences: [a], jwks: {d}/jwks.json}}\n  api_keys: {d}/keys.yaml\n  routes: [{{name: r, prefix: /, upstream: p}}]\n",
        d = d.display()
    );
    let out = Command::new(common::meshd::meshd_bin())
        .args(["check", "--config"])
        .arg(write(d, "gw.yaml", &yaml))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    for want in [
        format!("gateway.tls: {}/none.pem", d.display()),
        format!(
            "gateway.jwt.jwks: {}/jwks.json: not a JWKS document",
            d.display()
        ),
        format!(
            "gateway.api_keys: {}/keys.yaml: [0] (a): sha256 must be 64 hex digits",
            d.display()
        ),
    ] {
        assert!(report.contains(&want), "{want} not in:\n{report}");
    }
}

// Story: a client that speaks only HTTP/1.1 (curl --http1.1) gets the same gateway: no
// token is 401 with WWW-Authenticate; with a token, a gRPC-framed POST reaches the payment
// app, whose NotFound comes back in the grpc-status header.
#[test]
fn an_http1_client_gets_the_same_checks() {
    let e = Edge::start();
    let port = e.addr.rsplit(':').next().unwrap().to_string();
    let ca = e.dir.path().join("gw.pem").display().to_string();
    let url = format!("https://localhost:{port}/payment.v1.PaymentService/GetPayment");
    let resolve = format!("localhost:{port}:127.0.0.1");
    // GetPaymentRequest{payment_id: "p-1"} in a gRPC frame.
    let frame = e.dir.path().join("frame.bin");
    std::fs::write(&frame, [0, 0, 0, 0, 5, 0x0a, 3, b'p', b'-', b'1']).unwrap();
    let curl = |extra: &[&str]| {
        let mut args = vec![
            "-s",
            "-i",
            "--http1.1",
            "-m",
            "5",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
        ];
        args.extend(extra);
        args.push(&url);
        let out = Command::new("curl").args(&args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_lowercase()
    };
    let text = curl(&[]);
    assert!(text.starts_with("http/1.1 401"), "{text}");
    assert!(text.contains("www-authenticate: bearer"), "{text}");
    let auth = format!("authorization: Bearer {}", e.token(e.good_claims()));
    let data = format!("@{}", frame.display());
    let text = curl(&[
        "-X",
        "POST",
        "-H",
        "content-type: application/grpc",
        "-H",
        "te: trailers",
        "-H",
        &auth,
        "--data-binary",
        &data,
    ]);
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("grpc-status: 5"), "{text}");
    assert!(
        text.contains("no payment p-1") || text.contains("no%20payment%20p-1"),
        "{text}"
    );
}
