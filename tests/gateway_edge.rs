//! The design's own gateway settings with real clients: meshd in gateway mode configured
//! by `API_GATEWAY_ADDRESS`, `API_GATEWAY_KEY`, `API_GATEWAY_ENABLE_TLS`,
//! `GATEWAY_CERT_FILE`, `GATEWAY_KEY_FILE` and `GATEWAY_CA_FILE` over a file that says
//! otherwise; partners calling with client certificates made by the openssl CLI (curl
//! `--cert`, grpcurl `-cert`); and a route's `request_timeout` answering 504 to a JSON
//! client and DEADLINE_EXCEEDED to a gRPC client, in front of a payment app that takes
//! a second to answer.

mod common;

use common::edge::{gateway_payment_sidecar, repo, tool, write_gateway_cert};
use common::meshd::{free_port, meshd_bin, wait_until, DemoApp, DevCa, Proc, Sidecar};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const ENV_KEY: &str = "k-env-7f3a9c2e51";
const PARTNER: &str = "spiffe://partner.test/billing";

/// Runs openssl with `args` in `dir`; panics with its output on failure.
fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name`.pem/.key and a client certificate `client`.pem/.key it signs, whose SAN is
/// the SPIFFE ID `PARTNER`.
fn client_ca_and_cert(dir: &Path, name: &str, client: &str) {
    let (ca_key, ca_pem) = (format!("{name}.key"), format!("{name}.pem"));
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca_pem,
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    );
    let (key, csr, pem) = (
        format!("{client}.key"),
        format!("{client}.csr"),
        format!("{client}.pem"),
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=billing",
        ],
    );
    let ext = format!("{client}.ext");
    std::fs::write(
        dir.join(&ext),
        format!("subjectAltName=URI:{PARTNER}\nextendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\nbasicConstraints=CA:FALSE\n"),
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &pem,
            "-days",
            "1",
            "-extfile",
            &ext,
        ],
    );
}

/// The payment app (one second per answer) behind its sidecar, and what a gateway needs:
/// its server certificate, the partners' CA with a partner's certificate, and a certificate
/// of another CA.
struct Edge {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _app: DemoApp,
    _payment: Sidecar,
    inbound: u16,
    socket: String,
    /// An upstream that accepts connections and never answers a handshake.
    stuck: std::net::TcpListener,
}

impl Edge {
    fn start() -> Edge {
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
                "--delay",
                "1s",
            ],
        );
        let (payment, inbound) = gateway_payment_sidecar(d, &ca, app.addr);
        write_gateway_cert(d);
        client_ca_and_cert(d, "partners-ca", "partner");
        client_ca_and_cert(d, "rogue-ca", "rogue");
        let stuck = std::net::TcpListener::bind(("127.0.0.1", free_port())).unwrap();
        Edge {
            stuck,
            socket: ca.socket("api-gateway"),
            dir,
            _ca: ca,
            _app: app,
            _payment: payment,
            inbound,
        }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// The gateway's config file: listen, certificate and key the environment replaces
    /// (`file_listen`, missing files), no API keys file, routes for each way in.
    fn gateway_yaml(&self, file_listen: u16, admin: u16, client_auth: &str) -> String {
        format!(
            r#"service: api-gateway
identity:
  workload_api: {socket}
  expect: spiffe://jia.app/api-gateway
outbound:
  - name: payment-service
    protocol: grpc
    endpoints: ["127.0.0.1:{inbound}"]
    server_id: spiffe://jia.app/payment-service
  - name: stuck
    protocol: grpc
    endpoints: ["{stuck}"]
    server_id: spiffe://jia.app/stuck
gateway:
  listen: 127.0.0.1:{file_listen}
  tls: {{cert: {d}/not-there.pem, key: {d}/not-there-key.pem, client_auth: {client_auth}}}
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment-service
    - name: zones
      prefix: /payment.v1.PaymentService/ListPricingZones
      upstream: payment-service
      auth: mtls
    - name: create
      prefix: /payment.v1.PaymentService/CreatePayment
      upstream: payment-service
      request_timeout: 300ms
      connect_timeout: 2s
    - name: stuck
      prefix: /contact.v1.ContactService/
      upstream: stuck
      connect_timeout: 200ms
  transcoding:
    protos: [{proto}]
    services: [payment.v1.PaymentService]
admin:
  listen: 127.0.0.1:{admin}
log:
  access: all
"#,
            socket = self.socket,
            inbound = self.inbound,
            stuck = self.stuck.local_addr().unwrap(),
            d = self.dir.path().display(),
            proto = repo("proto/payment.proto").display(),
        )
    }

    /// The design's variables: where to listen, the key, TLS on, the files.
    fn design_env(&self, listen: u16) -> Vec<(String, String)> {
        [
            ("API_GATEWAY_ADDRESS", format!("127.0.0.1:{listen}")),
            ("API_GATEWAY_KEY", ENV_KEY.to_string()),
            ("API_GATEWAY_ENABLE_TLS", "true".to_string()),
            ("GATEWAY_CERT_FILE", self.path("gw.pem")),
            ("GATEWAY_KEY_FILE", self.path("gw-key.pem")),
            ("GATEWAY_CA_FILE", self.path("partners-ca.pem")),
        ]
        .map(|(k, v)| (k.to_string(), v))
        .to_vec()
    }

    /// Starts `meshd run` on `yaml` with `env`, ready.
    fn gateway(&self, name: &str, yaml: &str, admin: u16, env: &[(String, String)]) -> Sidecar {
        let config = self.dir.path().join(format!("{name}.yaml"));
        std::fs::write(&config, yaml).unwrap();
        let mut check = Command::new(meshd_bin());
        check.args(["check", "--config"]).arg(&config);
        check.envs(env.iter().map(|(k, v)| (k, v)));
        let out = check.output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{report}");
        assert!(report.contains("(gateway.tls.client_ca): ok"), "{report}");
        let mut cmd = Command::new(meshd_bin());
        cmd.arg("run").arg("--config").arg(&config);
        cmd.env_remove("SPIFFE_ENDPOINT_SOCKET");
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let proc = Proc::spawn(name, cmd, None);
        let admin = format!("127.0.0.1:{admin}").parse().unwrap();
        let s = Sidecar {
            proc,
            admin,
            config,
        };
        s.wait_ready();
        s
    }

    /// curl to the gateway on `port` (HTTP/1.1, JSON `body`), with `extra` arguments: the
    /// exit status, the HTTP status (0 when none) and the body.
    fn curl(&self, port: u16, path: &str, body: &str, extra: &[&str]) -> (bool, u16, String) {
        let resolve = format!("localhost:{port}:127.0.0.1");
        let url = format!("https://localhost:{port}{path}");
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "5", "--http1.1", "--cacert"])
            .arg(self.path("gw.pem"))
            .args(["--resolve", &resolve])
            .args(["-H", "content-type: application/json", "-d", body])
            .args(extra)
            .args(["-w", "\n%{http_code}", &url])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        let err = String::from_utf8_lossy(&out.stderr);
        (
            out.status.success(),
            code.trim().parse().unwrap_or(0),
            format!("{body}{err}"),
        )
    }

    /// The client certificate arguments of curl for `who` (partner, rogue).
    fn cert(&self, who: &str) -> [String; 4] {
        [
            "--cert".into(),
            self.path(&format!("{who}.pem")),
            "--key".into(),
            self.path(&format!("{who}.key")),
        ]
    }

    /// grpcurl to the gateway on `port`, one call of `method` with `flags`.
    fn grpcurl(&self, port: u16, method: &str, body: &str, flags: &[&str]) -> (bool, String) {
        let ca = self.path("gw.pem");
        let dir = repo("proto").display().to_string();
        let mut args = vec![
            "-max-time",
            "5",
            "-import-path",
            &dir,
            "-proto",
            "payment.proto",
            "-d",
            body,
            "-cacert",
            &ca,
            "-servername",
            "localhost",
        ];
        args.extend(flags);
        let addr = format!("127.0.0.1:{port}");
        let target = format!("payment.v1.PaymentService/{method}");
        args.extend([addr.as_str(), target.as_str()]);
        let out = Command::new(tool("grpcurl")).args(&args).output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

// Story: the file says port X, missing certificate files and no API keys; the design's
// variables say port Y, the real files, a key and the partners' CA. The gateway listens
// on Y only, with the real certificate; the env key gets in as `api-gateway-key` and is
// nowhere in /config or the logs; a partner's certificate gets in as its SPIFFE ID on an
// `mtls` route and on an `any` route without a token; a rogue CA's certificate is refused
// in the handshake; the create route's 300 ms request_timeout answers 504 to curl (JSON)
// and DEADLINE_EXCEEDED to grpcurl, counted as reason="timeout".
#[test]
fn the_design_variables_configure_the_gateway() {
    let e = Edge::start();
    let (file_listen, listen, admin) = (free_port(), free_port(), free_port());
    let yaml = e.gateway_yaml(file_listen, admin, "optional");
    let gw = e.gateway("gateway", &yaml, admin, &e.design_env(listen));
    assert!(
        std::net::TcpStream::connect(("127.0.0.1", file_listen)).is_err(),
        "the file's listen address must not be bound"
    );

    // The env key: accepted (the app's NotFound proves the call reached it).
    let key = format!("x-api-key: {ENV_KEY}");
    let (ok, text) = e.grpcurl(
        listen,
        "GetPayment",
        r#"{"payment_id":"p-1"}"#,
        &["-H", &key],
    );
    assert!(!ok && text.contains("no payment p-1"), "{text}");
    let (ok, text) = e.grpcurl(
        listen,
        "GetPayment",
        r#"{"payment_id":"p-1"}"#,
        &["-H", "x-api-key: k-wrong"],
    );
    assert!(!ok && text.contains("Unauthenticated"), "{text}");
    let (status, config) = gw.get("/config");
    assert_eq!(status, 200);
    let config: Value = serde_json::from_str(&config).unwrap();
    assert_eq!(config["gateway"]["api_key"], "<redacted>", "{config}");
    assert_eq!(config["gateway"]["listen"], format!("127.0.0.1:{listen}"));
    assert_eq!(
        config["gateway"]["tls"]["client_ca"],
        e.path("partners-ca.pem")
    );

    // A partner's certificate: the user on an mtls route and on an any route.
    let cert = e.cert("partner");
    let (ok, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/ListPricingZones",
        "{}",
        &strs(&cert),
    );
    assert!(ok && code == 200 && body.contains("zones"), "{code} {body}");
    let (ok, text) = e.grpcurl(
        listen,
        "GetPayment",
        r#"{"payment_id":"p-2"}"#,
        &[
            "-cert",
            &e.path("partner.pem"),
            "-key",
            &e.path("partner.key"),
        ],
    );
    assert!(!ok && text.contains("no payment p-2"), "{text}");
    // Without a certificate the mtls route refuses, even with the key.
    let (_, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/ListPricingZones",
        "{}",
        &[],
    );
    assert_eq!(code, 401, "{body}");
    let (_, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/ListPricingZones",
        "{}",
        &["-H", &key],
    );
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("client certificates only"), "{body}");
    // Another CA's certificate never completes the handshake.
    let rogue = e.cert("rogue");
    let (ok, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/ListPricingZones",
        "{}",
        &strs(&rogue),
    );
    assert!(!ok && code == 0, "{code} {body}");

    // The request timeout: 504 for JSON, DEADLINE_EXCEEDED for gRPC, well before the app's 1 s.
    let create = r#"{"contact_id":"c1","family_id":"f1","document_id":"d1","amount_cents":100}"#;
    let started = Instant::now();
    let (_, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/CreatePayment",
        create,
        &["-H", &key],
    );
    assert_eq!(code, 504, "{body}");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "{:?}",
        started.elapsed()
    );
    let (ok, text) = e.grpcurl(listen, "CreatePayment", create, &["-H", &key]);
    assert!(!ok && text.contains("DeadlineExceeded"), "{text}");
    let timeouts = |gw: &Sidecar| {
        gw.metric(
            "gateway_requests_failed_total",
            &["service=\"create\"", "reason=\"timeout\""],
        )
    };
    wait_until(Duration::from_secs(5), || timeouts(&gw) >= 2.0);
    assert_eq!(timeouts(&gw), 2.0);

    // The connect timeout: an upstream that never finishes a handshake is given up on.
    let started = Instant::now();
    let (_, code, body) = e.curl(
        listen,
        "/contact.v1.ContactService/GetContact",
        "{}",
        &["-H", &key],
    );
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("(connect_timeout)"), "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );

    // Who called, as the access log says; the key itself is nowhere.
    let log = gw.proc.dump();
    for user in [
        "\"user_id\":\"api-gateway-key\"",
        &format!("\"user_id\":\"{PARTNER}\""),
    ] {
        assert!(log.contains(user), "{user} not in the log:\n{log}");
    }
    assert!(!log.contains(ENV_KEY), "the key is in the log");
    assert!(!gw.get("/config").1.contains(ENV_KEY));
}

// Story: with client_auth required, curl without a certificate is refused in the
// handshake (no HTTP status at all), while the partner's certificate gets in.
#[test]
fn a_required_client_certificate_is_checked_in_the_handshake() {
    let e = Edge::start();
    let (file_listen, listen, admin) = (free_port(), free_port(), free_port());
    let yaml = e.gateway_yaml(file_listen, admin, "required");
    let gw = e.gateway("gateway-required", &yaml, admin, &e.design_env(listen));
    let (ok, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/ListPricingZones",
        "{}",
        &[],
    );
    assert!(!ok && code == 0, "{code} {body}");
    let key = format!("x-api-key: {ENV_KEY}");
    let (ok, text) = e.grpcurl(
        listen,
        "GetPayment",
        r#"{"payment_id":"p-1"}"#,
        &["-H", &key],
    );
    assert!(!ok && !text.contains("no payment"), "{text}");
    let cert = e.cert("partner");
    let (ok, code, body) = e.curl(
        listen,
        "/payment.v1.PaymentService/ListPricingZones",
        "{}",
        &strs(&cert),
    );
    assert!(ok && code == 200 && body.contains("zones"), "{code} {body}");
    let failures = gw.metric(
        "meshd_tls_handshake_failures_total",
        &["direction=\"gateway\""],
    );
    assert!(failures >= 1.0, "{failures}");
}

// Story: API_GATEWAY_ENABLE_TLS=false stops meshd at start with the reason; a bad
// API_GATEWAY_ADDRESS is named with its value; a client CA file that is not PEM is named
// by `meshd check`.
#[test]
fn bad_design_variables_stop_the_gateway_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let yaml = format!(
        "service: api-gateway\nidentity:\n  workload_api: unix:///nowhere.sock\noutbound:\n  - name: p\n    endpoints: [\"127.0.0.1:1\"]\n    server_id: spiffe://jia.app/p\ngateway:\n  tls: {{cert: {d}/c.pem, key: {d}/k.pem}}\n  routes: [{{name: r, prefix: /, upstream: p, auth: mtls}}]\nadmin:\n  listen: 127.0.0.1:{}\n",
        free_port(),
        d = d.display()
    );
    let config = d.join("gateway.yaml");
    std::fs::write(&config, yaml).unwrap();
    let run = |env: &[(&str, &str)]| -> (Option<i32>, String) {
        let mut child = Command::new(meshd_bin())
            .arg("run")
            .arg("--config")
            .arg(&config)
            .env("GATEWAY_CA_FILE", d.join("ca.pem"))
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let exited = wait_until(Duration::from_secs(10), || {
            child.try_wait().ok().flatten().is_some()
        });
        if !exited {
            let _ = child.kill();
        }
        let out = child.wait_with_output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.code(), text)
    };
    let (code, text) = run(&[("API_GATEWAY_ENABLE_TLS", "false")]);
    assert!(code.is_some_and(|c| c != 0), "{code:?} {text}");
    assert!(
        text.contains("env:API_GATEWAY_ENABLE_TLS: API_GATEWAY_ENABLE_TLS=`false`: the gateway serves HTTPS only (there is no plaintext edge)"),
        "{text}"
    );
    let (code, text) = run(&[("API_GATEWAY_ADDRESS", "api-gateway:8080")]);
    assert!(code.is_some_and(|c| c != 0), "{code:?} {text}");
    assert!(
        text.contains("environment variable API_GATEWAY_ADDRESS=`api-gateway:8080`"),
        "{text}"
    );
    // meshd check reads the CA file as meshd run would.
    std::fs::write(d.join("ca.pem"), "not a certificate\n").unwrap();
    let out = Command::new(meshd_bin())
        .args(["check", "--config"])
        .arg(&config)
        .env("GATEWAY_CA_FILE", d.join("ca.pem"))
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(!out.status.success(), "{report}");
    let want = format!(
        "gateway.tls.client_ca: {}: no certificate in the file",
        d.join("ca.pem").display()
    );
    assert!(report.contains(&want), "{want} not in {report}");
}
