//! JSON clients at the edge gateway: curl over HTTPS (HTTP/2 and HTTP/1.1) with a JWT
//! calls `/payment.v1.PaymentService/...` in JSON; the gateway, configured with
//! `gateway.transcoding` from proto/payment.proto, makes each call a gRPC call to the
//! payment app (over mTLS, through its sidecar) and answers in JSON. Bad input is refused
//! by the gateway and never reaches the app; gRPC clients keep working on the same port.

mod common;

use common::edge::{gateway_payment_sidecar, repo, tool, write_gateway_cert};
use common::meshd::{free_port, wait_until, DemoApp, DevCa, Sidecar};
use serde_json::{json, Value};
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const ISSUER: &str = "https://auth.jia.app";

/// The payment app (with its contact, family and document apps) behind its sidecar, the
/// gateway in front with transcoding on, and a JWT a client holds.
struct Edge {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _apps: Vec<DemoApp>,
    payment: Sidecar,
    gateway: Sidecar,
    port: u16,
    token: String,
}

impl Edge {
    fn start() -> Edge {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = DevCa::start(d, &["payment-service", "api-gateway"], "1h", &[]);
        // CreatePayment asks the three others directly (plaintext, no sidecars here).
        let (contact, family, document) = (
            DemoApp::start("contact", &[]),
            DemoApp::start("family", &[]),
            DemoApp::start("document", &[]),
        );
        let url = |a: &DemoApp| format!("http://{}", a.addr);
        let app = DemoApp::start(
            "payment",
            &[
                "--contact",
                &url(&contact),
                "--family",
                &url(&family),
                "--document",
                &url(&document),
            ],
        );
        let (payment, inbound) = gateway_payment_sidecar(d, &ca, app.addr);

        write_gateway_cert(d);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let jwks = meshd::gateway::p256_jwks(key.public_key_raw(), "k1").unwrap();
        std::fs::write(d.join("jwks.json"), jwks).unwrap();
        let signer =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        let exp = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 600;
        let claims = json!({"iss": ISSUER, "aud": "jia-api", "sub": "alice", "exp": exp});
        let token = jsonwebtoken::encode(&header, &claims, &signer).unwrap();

        let (port, admin) = (free_port(), free_port());
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
  listen: 127.0.0.1:{port}
  tls: {{cert: {dir}/gw.pem, key: {dir}/gw-key.pem}}
  jwt: {{issuer: "{ISSUER}", audiences: [jia-api], jwks: {dir}/jwks.json}}
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment-service
  transcoding:
    protos: [{proto}]
    services: [payment.v1.PaymentService]
    max_body: 1KiB
admin:
  listen: 127.0.0.1:{admin}
"#,
            socket = ca.socket("api-gateway"),
            dir = d.display(),
            proto = repo("proto/payment.proto").display(),
        );
        let config = d.join("gateway.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let check = Command::new(common::meshd::meshd_bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stdout)
        );
        let gateway = Sidecar::start("gateway", d, &yaml, admin);
        gateway.wait_ready();
        Edge {
            dir,
            _ca: ca,
            _apps: vec![contact, family, document, app],
            payment,
            gateway,
            port,
            token,
        }
    }

    /// curl to the gateway: `method` on `path` with `extra` arguments and the JWT; the
    /// HTTP status, the body (JSON when it parses, else a string) and the HTTP version.
    fn curl(&self, version: &str, path: &str, extra: &[&str]) -> (u16, Value, String) {
        let auth = format!("authorization: Bearer {}", self.token);
        self.curl_as(Some(&auth), version, path, extra)
    }

    /// `curl` with the `auth` header given, or none.
    fn curl_as(
        &self,
        auth: Option<&str>,
        version: &str,
        path: &str,
        extra: &[&str],
    ) -> (u16, Value, String) {
        let ca = self.dir.path().join("gw.pem");
        let resolve = format!("localhost:{}:127.0.0.1", self.port);
        let url = format!("https://localhost:{}{path}", self.port);
        let auth: Vec<&str> = auth.map(|a| vec!["-H", a]).unwrap_or_default();
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", version, "--cacert"])
            .arg(&ca)
            .args(["--resolve", &resolve])
            .args(auth)
            .args(extra)
            .args(["-w", "\n%{http_code} %{http_version}", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "curl {version} {path} {extra:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let (body, tail) = text.rsplit_once('\n').unwrap();
        let (code, http) = tail.split_once(' ').unwrap();
        let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.into()));
        (code.parse().unwrap(), body, http.to_string())
    }

    /// A JSON POST of `body` to `method` of the payment service.
    fn post(&self, version: &str, method: &str, body: &str) -> (u16, Value) {
        let path = format!("/payment.v1.PaymentService/{method}");
        let (code, json, _) = self.curl(
            version,
            &path,
            &["-H", "content-type: application/json", "-d", body],
        );
        (code, json)
    }

    /// Calls the payment sidecar let in so far (what the app saw).
    fn app_calls(&self) -> f64 {
        self.payment
            .metric("meshd_requests_total", &["direction=\"inbound\""])
    }
}

// Story: a web client creates a payment with a JSON POST (over HTTP/2, then HTTP/1.1),
// reads it back with a GET and a query parameter, lists the pricing zones with a bare GET,
// and gets the app's own errors as HTTP statuses with a JSON body. A gRPC client on the
// same port still gets its gRPC answer.
#[test]
fn json_clients_call_the_payment_service() {
    let e = Edge::start();
    let body = r#"{"contact_id": "c-1", "familyId": "f-1", "document_id": "d-1", "amount_cents": 2999, "currency": "usd"}"#;
    let (code, created) = e.post("--http2", "CreatePayment", body);
    assert_eq!(code, 200, "{created}");
    assert_eq!(created["amountCents"], json!("2999"), "{created}");
    assert_eq!(created["currency"], json!("usd"), "{created}");
    assert_eq!(created["contactName"], json!("Contact c-1"), "{created}");
    let id = created["paymentId"].as_str().unwrap().to_string();
    assert!(id.starts_with("pay-"), "{created}");

    let (code, again) = e.post(
        "--http1.1",
        "CreatePayment",
        r#"{"contactId": "c-2", "amountCents": "15", "currency": "eur"}"#,
    );
    assert_eq!(code, 200, "{again}");
    assert_eq!(again["amountCents"], json!("15"), "{again}");

    let path = format!("/payment.v1.PaymentService/GetPayment?payment_id={id}");
    for version in ["--http2", "--http1.1"] {
        let (code, got, http) = e.curl(version, &path, &[]);
        assert_eq!((code, &got), (200, &created), "{version} {http}");
    }
    let (_, _, http) = e.curl("--http1.1", &path, &[]);
    assert_eq!(http, "1.1");

    let (code, zones, _) = e.curl(
        "--http2",
        "/payment.v1.PaymentService/ListPricingZones",
        &[],
    );
    assert_eq!(code, 200, "{zones}");
    assert!(
        zones["zones"].as_array().is_some_and(|z| !z.is_empty()),
        "{zones}"
    );

    let (code, missing, _) = e.curl(
        "--http2",
        "/payment.v1.PaymentService/GetPayment?payment_id=nope",
        &[],
    );
    assert_eq!(
        (code, missing),
        (404, json!({"code": 5, "message": "no payment nope"}))
    );
    let (code, invalid) = e.post("--http2", "CreatePayment", r#"{"amount_cents": 0}"#);
    assert_eq!(
        (code, invalid),
        (
            400,
            json!({"code": 3, "message": "amount_cents must be positive"})
        )
    );

    // grpcurl, on the same port and route, sees gRPC as before.
    let proto_dir = repo("proto").display().to_string();
    let ca = e.dir.path().join("gw.pem").display().to_string();
    let auth = format!("authorization: Bearer {}", e.token);
    let addr = format!("127.0.0.1:{}", e.port);
    let request = format!("{{\"payment_id\": \"{id}\"}}");
    let out = Command::new(tool("grpcurl"))
        .args([
            "-max-time",
            "5",
            "-import-path",
            &proto_dir,
            "-proto",
            "payment.proto",
        ])
        .args([
            "-cacert",
            &ca,
            "-servername",
            "localhost",
            "-H",
            &auth,
            "-d",
            &request,
        ])
        .args([addr.as_str(), "payment.v1.PaymentService/GetPayment"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got["paymentId"], json!(id), "{text}");

    // The gateway counts the status each client saw: the HTTP status for JSON clients
    // (NOT_FOUND answered 404, INVALID_ARGUMENT 400), the gRPC status for gRPC clients.
    let count = |protocol: &str, status: &str| {
        let (p, s) = (
            format!("protocol=\"{protocol}\""),
            format!("status=\"{status}\""),
        );
        e.gateway
            .metric("gateway_requests_total", &[p.as_str(), s.as_str()])
    };
    let settled = wait_until(Duration::from_secs(5), || {
        count("json", "404") == 1.0 && count("json", "400") == 1.0 && count("grpc", "0") == 1.0
    });
    assert!(
        settled,
        "json 404: {}, json 400: {}, grpc 0: {}, json 200: {}",
        count("json", "404"),
        count("json", "400"),
        count("grpc", "0"),
        count("json", "200")
    );
    assert_eq!(count("json", "200"), 6.0);
}

// Story: a client sends broken JSON, a field the message does not have, a field of the
// wrong type, a body in another content type, a method the service does not have and a
// body over the gateway's 1 KiB limit, or no valid token: each gets its 4xx with a JSON
// message saying what is wrong, and the payment app never sees any of them.
#[test]
fn bad_json_is_refused_before_the_app() {
    let e = Edge::start();
    // One good call first, so the count of calls the app saw is settled and non-zero.
    let (code, _) = e.post("--http2", "CreatePayment", r#"{"amount_cents": 1}"#);
    assert_eq!(code, 200);
    assert!(wait_until(Duration::from_secs(5), || e.app_calls() >= 1.0));
    let seen = e.app_calls();

    let message = |v: &Value| v["message"].as_str().unwrap_or_default().to_string();
    for version in ["--http2", "--http1.1"] {
        let (code, err) = e.post(version, "CreatePayment", r#"{"amount_cents": 1,"#);
        assert_eq!(code, 400, "{err}");
        assert!(
            message(&err).starts_with("malformed JSON: ")
                && message(&err).contains("line 1 column"),
            "{err}"
        );
    }
    let (code, err) = e.post("--http2", "CreatePayment", r#"{"amount_in_cents": 2999}"#);
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["code"], json!(3));
    assert!(
        message(&err).starts_with("amount_in_cents: unrecognized field name"),
        "{err}"
    );
    let (code, err) = e.post("--http2", "CreatePayment", r#"{"amount_cents": "lots"}"#);
    assert_eq!(code, 400, "{err}");
    assert!(
        message(&err).starts_with("amount_cents: expected an integer"),
        "{err}"
    );
    let (code, err, _) = e.curl(
        "--http2",
        "/payment.v1.PaymentService/GetPayment?nope=1",
        &[],
    );
    assert_eq!(code, 400, "{err}");
    assert_eq!(message(&err), "query parameter nope: no field `nope`");

    let (code, err, _) = e.curl(
        "--http2",
        "/payment.v1.PaymentService/CreatePayment",
        &["-H", "content-type: text/plain", "-d", "amount=1"],
    );
    assert_eq!(code, 415, "{err}");
    assert_eq!(
        message(&err),
        "content type `text/plain` is neither application/json nor application/grpc"
    );
    let (code, err) = e.post("--http2", "RefundAll", "{}");
    assert_eq!(code, 404, "{err}");
    assert_eq!(
        message(&err),
        "payment.v1.PaymentService has no method RefundAll"
    );
    let big = format!("{{\"currency\": \"{}\"}}", "x".repeat(2048));
    for version in ["--http2", "--http1.1"] {
        let (code, err) = e.post(version, "CreatePayment", &big);
        assert_eq!(code, 413, "{err}");
        assert_eq!(
            message(&err),
            "the request body is over the limit of 1024 bytes"
        );
    }

    // The gateway's own refusals come back to a JSON client as JSON too.
    let json_body = ["-H", "content-type: application/json", "-d", "{}"];
    let path = "/payment.v1.PaymentService/CreatePayment";
    for auth in [None, Some("authorization: Bearer not-a-jwt")] {
        let (code, err, _) = e.curl_as(auth, "--http2", path, &json_body);
        assert_eq!(code, 401, "{err}");
        assert_eq!(err["code"], json!(16), "{err}");
    }
    let (_, err, _) = e.curl_as(None, "--http1.1", path, &json_body);
    assert!(message(&err).starts_with("credentials required"), "{err}");

    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(e.app_calls(), seen, "a refused call reached the app");
    let refused = e
        .gateway
        .metric("gateway_requests_failed_total", &["reason=\"bad_request\""]);
    assert_eq!(refused, 9.0);
}

// Story: a web client uses the REST surface payment.proto declares with google.api.http:
// it creates payments with the design's body verbatim (POST /v1/payments, HTTP/2 and
// HTTP/1.1), reads one back by its path, lists the pricing zones by the additional
// binding, refunds part of a payment (the body is the Refund), and lists a customer's
// payments, a server stream, as a JSON array and as NDJSON. Timestamps come back as RFC
// 3339 and a Struct round-trips. A path variable that does not read and an unknown REST
// path are refused by the gateway (400, JSON 404) and never reach the app; grpcurl reads
// the same stream over gRPC.
#[test]
fn rest_clients_call_the_paths_the_protos_declare() {
    let e = Edge::start();
    let json_body = |body: &'static str| ["-H", "content-type: application/json", "-d", body];
    let design = r#"{"amount": 2999, "currency": "usd", "payment_method": "credit_card", "customer_id": "user_123"}"#;
    let mut created = Vec::new();
    for version in ["--http2", "--http1.1"] {
        let (code, p, http) = e.curl(version, "/v1/payments", &json_body(design));
        assert_eq!(code, 200, "{version} {http}: {p}");
        assert_eq!(p["amountCents"], json!("2999"), "{p}");
        assert_eq!(p["currency"], json!("usd"), "{p}");
        assert_eq!(p["paymentMethod"], json!("credit_card"), "{p}");
        assert_eq!(p["customerId"], json!("user_123"), "{p}");
        assert_eq!(p["status"], json!("PAYMENT_STATUS_CREATED"), "{p}");
        let at = p["createdAt"].as_str().unwrap_or_default();
        assert!(humantime::parse_rfc3339(at).is_ok(), "{p}");
        created.push(p);
    }
    let with_metadata = r#"{"amount": 5, "customer_id": "user_123", "metadata": {"order": "o-1", "items": [1, "two", {"gift": true}], "note": null}}"#;
    let (code, p, _) = e.curl("--http2", "/v1/payments", &json_body(with_metadata));
    assert_eq!(code, 200, "{p}");
    assert_eq!(
        p["metadata"],
        json!({"order": "o-1", "items": [1.0, "two", {"gift": true}], "note": null}),
        "{p}"
    );
    created.push(p);
    let id = created[0]["paymentId"].as_str().unwrap().to_string();

    for version in ["--http2", "--http1.1"] {
        let (code, got, _) = e.curl(version, &format!("/v1/payments/{id}"), &[]);
        assert_eq!((code, &got), (200, &created[0]), "{version}");
    }
    for path in ["/v1/zones", "/v1/pricing-zones"] {
        let (code, zones, _) = e.curl("--http2", path, &[]);
        assert_eq!(code, 200, "{path}: {zones}");
        assert!(
            zones["zones"].as_array().is_some_and(|z| z.len() == 3),
            "{zones}"
        );
    }

    let refund = format!("/v1/payments/{id}:refund");
    let (code, p, _) = e.curl(
        "--http2",
        &refund,
        &json_body(r#"{"amount_cents": 999, "reason": "damaged"}"#),
    );
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["refundedCents"], json!("999"), "{p}");
    let (code, p, _) = e.curl("--http1.1", &refund, &json_body("{}"));
    assert_eq!(code, 200, "{p}");
    assert_eq!(p["refundedCents"], json!("2999"), "{p}");
    assert_eq!(p["status"], json!("PAYMENT_STATUS_REFUNDED"), "{p}");
    // Nothing left: the app's FAILED_PRECONDITION carries the refund asked for in
    // grpc-status-details-bin, which comes back as `details` in JSON.
    let (code, err, _) = e.curl(
        "--http2",
        &refund,
        &json_body(r#"{"amount_cents": 5, "reason": "again"}"#),
    );
    assert_eq!(code, 400, "{err}");
    assert_eq!(err["code"], json!(9), "{err}");
    assert_eq!(
        err["details"],
        json!([{"@type": "type.googleapis.com/payment.v1.Refund", "amountCents": "5", "reason": "again"}]),
        "{err}"
    );
    let (code, err, _) = e.curl("--http2", "/v1/payments/nope:refund", &json_body("{}"));
    assert_eq!(
        (code, err),
        (404, json!({"code": 5, "message": "no payment nope"}))
    );

    // The stream: each payment created, oldest first, as they come.
    let ids: Vec<Value> = created.iter().map(|p| p["paymentId"].clone()).collect();
    let list = "/v1/customers/user_123/payments";
    for version in ["--http2", "--http1.1"] {
        let (code, all, _) = e.curl(version, list, &[]);
        assert_eq!(code, 200, "{version}: {all}");
        let got: Vec<Value> = all
            .as_array()
            .unwrap_or_else(|| panic!("{all}"))
            .iter()
            .map(|p| p["paymentId"].clone())
            .collect();
        assert_eq!(got, ids, "{version}");
    }
    let (code, lines, _) = e.curl(
        "--http2",
        &format!("{list}?page_size=2"),
        &["-H", "accept: application/x-ndjson"],
    );
    assert_eq!(code, 200, "{lines}");
    let text = lines
        .as_str()
        .unwrap_or_else(|| panic!("not NDJSON: {lines}"));
    let got: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["paymentId"].clone())
        .collect();
    assert_eq!(got, ids[..2], "{text}");
    let (code, none, _) = e.curl("--http2", "/v1/customers/nobody/payments", &[]);
    assert_eq!((code, none), (200, json!([])));

    // Refused at the gateway: the app never sees these.
    assert!(wait_until(Duration::from_secs(5), || e.app_calls() >= 1.0));
    std::thread::sleep(Duration::from_millis(300));
    let seen = e.app_calls();
    let (code, err, _) = e.curl("--http2", "/v1/payments/%FF", &[]);
    assert_eq!(code, 400, "{err}");
    assert_eq!(
        err["message"],
        json!("path variable payment_id: not UTF-8 once percent-decoded")
    );
    let (code, err, _) = e.curl("--http2", "/v1/payments/p-1?amount=1", &[]);
    assert_eq!(code, 400, "{err}");
    assert_eq!(
        err["message"],
        json!("query parameter amount: no field `amount`")
    );
    let (code, err, _) = e.curl(
        "--http1.1",
        "/v1/nothing",
        &["-H", "accept: application/json"],
    );
    assert_eq!(code, 404, "{err}");
    assert_eq!(
        err["message"],
        json!("no gateway route for /v1/nothing"),
        "{err}"
    );
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(e.app_calls(), seen, "a refused call reached the app");

    // grpcurl reads the same stream over gRPC, on the same port and route.
    let proto_dir = repo("proto").display().to_string();
    let ca = e.dir.path().join("gw.pem").display().to_string();
    let auth = format!("authorization: Bearer {}", e.token);
    let addr = format!("127.0.0.1:{}", e.port);
    let out = Command::new(tool("grpcurl"))
        .args([
            "-max-time",
            "5",
            "-import-path",
            &proto_dir,
            "-proto",
            "payment.proto",
        ])
        .args(["-cacert", &ca, "-servername", "localhost", "-H", &auth])
        .args(["-d", r#"{"parent": "customers/user_123"}"#])
        .args([addr.as_str(), "payment.v1.PaymentService/ListPayments"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(text.matches("\"paymentId\"").count(), ids.len(), "{text}");
}

// Story: an operator lists a service the protos do not define, next to one they do;
// `meshd check` names it with the file, line and column, and fails.
#[test]
fn check_names_a_service_missing_from_the_protos() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let yaml = format!(
        "service: api-gateway\noutbound:\n  - name: p\n    endpoints: [\"127.0.0.1:1\"]\n    server_id: spiffe://jia.app/p\ngateway:\n  tls: {{cert: {d}/none.pem, key: {d}/none-key.pem}}\n  api_keys: {d}/keys.yaml\n  routes: [{{name: r, prefix: /, upstream: p}}]\n  transcoding:\n    protos: [{proto}]\n    services:\n      - payment.v1.PaymentService\n      - payment.v1.RefundService\n",
        d = d.display(),
        proto = repo("proto/payment.proto").display(),
    );
    let config = d.join("gw.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(common::meshd::meshd_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let want = format!(
        "{}:14:9: gateway.transcoding.services[1]: no service `payment.v1.RefundService` in the protos",
        config.display()
    );
    assert!(report.contains(&want), "{want} not in:\n{report}");
}

// Story: an operator declares a REST path with a typo in its template; `meshd check`
// names the proto position, the method and the template, and fails.
#[test]
fn check_names_a_bad_rest_template() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    std::fs::create_dir_all(d.join("google/api")).unwrap();
    for f in ["annotations.proto", "http.proto"] {
        std::fs::copy(
            repo("proto/google/api").join(f),
            d.join("google/api").join(f),
        )
        .unwrap();
    }
    std::fs::write(
        d.join("shop.proto"),
        "syntax = \"proto3\";\npackage shop.v1;\nimport \"google/api/annotations.proto\";\nservice Shop {\n  rpc Get(M) returns (M) { option (google.api.http) = {get: \"/v1/{name\"}; }\n}\nmessage M { string name = 1; }\n",
    )
    .unwrap();
    let yaml = format!(
        "service: api-gateway\noutbound:\n  - name: p\n    endpoints: [\"127.0.0.1:1\"]\n    server_id: spiffe://jia.app/p\ngateway:\n  tls: {{cert: {d}/none.pem, key: {d}/none-key.pem}}\n  api_keys: {d}/keys.yaml\n  routes: [{{name: r, prefix: /, upstream: p}}]\n  transcoding:\n    protos: [{d}/shop.proto]\n    services: [shop.v1.Shop]\n",
        d = d.display(),
    );
    let config = d.join("gw.yaml");
    std::fs::write(&config, yaml).unwrap();
    let out = Command::new(common::meshd::meshd_bin())
        .args(["check", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{report}");
    let want = "gateway.transcoding: shop.proto:5:3: shop.v1.Shop.Get: google.api.http `/v1/{name`: a `{` is not closed";
    assert!(report.contains(want), "{want} not in:\n{report}");
}
