//! The edge gateway takes JWT-SVIDs from machine clients outside the mesh
//! (`gateway.jwt_svid`), beside end-user JWTs from its JWKS (`gateway.jwt`).
//!
//! The story: a billing batch job runs outside the mesh but has a SPIFFE identity,
//! `spiffe://jia.app/billing`. It asks its Workload API for a JWT-SVID for the gateway's
//! audience `api.jia.app` with SPIRE's own CLI (`spire-agent api fetch jwt`) and calls the
//! gateway over plain HTTPS with `authorization: Bearer <JWT-SVID>`: grpcurl reaches the
//! payment app behind its sidecar (its NotFound answer proves it), curl reaches an app
//! that shows the headers it got: `x-user-id` is the caller's SPIFFE ID and the token is
//! gone. The gateway's access log names the same user. Every broken token is refused by
//! the gateway itself, UNAUTHENTICATED (16) or 401 with `www-authenticate`, naming why: a
//! token for another audience, an expired one, one whose jia.app subject is signed by
//! another (federated) trust domain's key, no token, an end-user JWT on the `jwt_svid`
//! route and a JWT-SVID on the end-user `jwt` route; `auth: any` takes both kinds, each
//! as its own user. `gateway_requests_failed_total{reason="unauthenticated"}` and
//! `meshd_jwt_svid_validations_total{result}` count exactly that, and no token is ever in
//! the gateway's output. First with `meshd dev-ca` (in the test, so it can sign broken
//! tokens), then with a real SPIRE: a workload registered by its uid fetches the token,
//! the gateway's own identity comes from the same SPIRE, and the user is that workload.

mod common;

use base64::Engine;
use bytes::Bytes;
use common::edge::{repo, tool, write_gateway_cert};
use common::meshd::{free_port, wait_until, DemoApp, Sidecar};
use common::spire::Spire;
use http_body_util::Full;
use meshd::config::parse_spiffe_id;
use meshd::dev_ca::DevCa;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const AUDIENCE: &str = "api.jia.app";
const BILLING: &str = "spiffe://jia.app/billing";
const ISSUER: &str = "https://auth.jia.app";
/// The unix uid SPIRE attests the billing job by (not one of `spire/up.sh`'s five).
const BILLING_UID: u32 = 20031;
const PAYMENT_UID: u32 = 20001;
const GATEWAY_UID: u32 = 20002;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// `spire-agent api fetch jwt -audience <audience>` against `socket` (as `uid` when
/// given, under setpriv): the one token it printed.
fn spire_fetch_jwt(agent: &Path, socket: &Path, audience: &str, uid: Option<u32>) -> String {
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            let uid = uid.to_string();
            c.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
                .arg(agent);
            c
        }
        None => Command::new(agent),
    };
    let out = cmd
        .args([
            "api",
            "fetch",
            "jwt",
            "-audience",
            audience,
            "-timeout",
            "10s",
        ])
        .arg("-socketPath")
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run spire-agent api fetch jwt");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "spire-agent api fetch jwt: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .skip_while(|l| !l.starts_with("token("))
        .nth(1)
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("no token printed: {text}"))
}

/// The `sub` of a JWT, read without verification (only to compare).
fn subject_of(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    let claims: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["sub"].as_str().unwrap_or_default().to_string()
}

/// An h2c app answering `x-user-id=[..] authorization=[..]`: what the gateway handed on.
async fn headers_app() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| {
                let all = |name: &str| -> String {
                    let values: Vec<String> = (req.headers().get_all(name).iter())
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect();
                    values.join("|")
                };
                let body = format!(
                    "x-user-id=[{}] authorization=[{}]",
                    all("x-user-id"),
                    all("authorization")
                );
                async move { Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body)))) }
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// A sidecar in front of `app` (`protocol` grpc or http) whose policy lets only the
/// gateway call; ready. Runs as `uid` when given. Returns it and its inbound port.
fn sidecar(
    dir: &Path,
    service: &str,
    socket: &str,
    app: SocketAddr,
    protocol: &str,
    uid: Option<u32>,
) -> (Sidecar, u16) {
    let policy = dir.join(format!("{service}-policy.yaml"));
    std::fs::write(
        &policy,
        format!("service: {service}\ndefault: deny\nrules:\n  - name: gateway-calls\n    from: [\"spiffe://jia.app/api-gateway\"]\n"),
    )
    .unwrap();
    let (inbound, admin) = (free_port(), free_port());
    let yaml = format!(
        "service: {service}\nidentity:\n  workload_api: {socket}\n  expect: spiffe://jia.app/{service}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {app}\n  protocol: {protocol}\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        policy.display()
    );
    let s = Sidecar::start_as(&format!("{service}-sidecar"), dir, &yaml, admin, uid);
    s.wait_ready();
    (s, inbound)
}

/// The payment demo app (GetPayment calls nothing downstream).
fn payment_app() -> DemoApp {
    let nowhere = "http://127.0.0.1:9";
    let args = [
        "--contact",
        nowhere,
        "--family",
        nowhere,
        "--document",
        nowhere,
    ];
    DemoApp::start("payment", &args)
}

/// The gateway: both bearer providers, the payments route (`auth: jwt_svid`) to the
/// payment sidecar at `payment`, and `extra` outbounds and routes; checked with
/// `meshd check`, started (as `uid` when given) and ready, its JWT bundles followed.
struct Gateway {
    sidecar: Sidecar,
    port: u16,
    /// Where `gw.pem`, the gateway's certificate, is.
    dir: PathBuf,
    /// Signs end-user JWTs the gateway's JWKS trusts.
    end_user: jsonwebtoken::EncodingKey,
}

impl Gateway {
    fn start(
        dir: &Path,
        socket: &str,
        payment: u16,
        extra: (&str, &str),
        uid: Option<u32>,
    ) -> Gateway {
        write_gateway_cert(dir);
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let jwks = meshd::gateway::p256_jwks(key.public_key_raw(), "k1").unwrap();
        std::fs::write(dir.join("jwks.json"), jwks).unwrap();
        let end_user =
            jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        let (port, admin) = (free_port(), free_port());
        let (outbounds, routes) = extra;
        let yaml = format!(
            r#"service: api-gateway
identity:
  workload_api: {socket}
  expect: spiffe://jia.app/api-gateway
outbound:
  - name: payment-service
    protocol: grpc
    endpoints: ["127.0.0.1:{payment}"]
    server_id: spiffe://jia.app/payment-service
{outbounds}gateway:
  listen: 127.0.0.1:{port}
  tls: {{cert: {d}/gw.pem, key: {d}/gw-key.pem}}
  jwt: {{issuer: "{ISSUER}", audiences: [jia-api], jwks: {d}/jwks.json}}
  jwt_svid: {{audience: {AUDIENCE}}}
  routes:
    - {{name: payments, prefix: /payment.v1.PaymentService/, upstream: payment-service, auth: jwt_svid}}
{routes}admin:
  listen: 127.0.0.1:{admin}
log:
  access: all
"#,
            d = dir.display(),
        );
        let config = dir.join("gateway-check.yaml");
        std::fs::write(&config, &yaml).unwrap();
        let check = Command::new(common::meshd::meshd_bin())
            .args(["check", "--config"])
            .arg(&config)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&check.stdout);
        assert!(check.status.success(), "meshd check: {report}");
        let sidecar = Sidecar::start_as("gateway", dir, &yaml, admin, uid);
        sidecar.wait_ready();
        // The readiness signal of the JWT side: the bundles have arrived.
        let following = wait_until(Duration::from_secs(15), || {
            let (_, body) = sidecar.get("/identity");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            v["jwt_bundles"]["state"] == "following"
                && v["jwt_bundles"]["trust_domains"]["jia.app"].is_array()
        });
        assert!(following, "no JWT bundles: {:?}", sidecar.get("/identity"));
        Gateway {
            sidecar,
            port,
            dir: dir.to_path_buf(),
            end_user,
        }
    }

    /// An end-user JWT for `alice` from the issuer of `gateway.jwt`.
    fn alice(&self) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k1".into());
        let claims = serde_json::json!({"iss": ISSUER, "aud": "jia-api", "sub": "alice", "exp": now() + 300});
        jsonwebtoken::encode(&header, &claims, &self.end_user).unwrap()
    }

    /// grpcurl over TLS: GetPayment(p-1) with the token, if any. Its whole output.
    fn get_payment(&self, token: Option<&str>) -> String {
        let (ca, protos) = (self.dir.join("gw.pem"), repo("proto"));
        let mut args: Vec<String> = ["-max-time", "10", "-cacert"].map(String::from).to_vec();
        args.push(ca.display().to_string());
        args.extend(["-servername", "localhost", "-import-path"].map(String::from));
        args.push(protos.display().to_string());
        args.extend(["-proto", "payment.proto", "-d", r#"{"payment_id":"p-1"}"#].map(String::from));
        if let Some(t) = token {
            args.extend(["-H".to_string(), format!("authorization: Bearer {t}")]);
        }
        args.push(format!("127.0.0.1:{}", self.port));
        args.push("payment.v1.PaymentService/GetPayment".into());
        let out = Command::new(tool("grpcurl")).args(&args).output().unwrap();
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// curl (HTTP/2 over TLS) GET `path` with the token: status line, headers and body.
    fn curl(&self, path: &str, token: &str) -> String {
        let ca = self.dir.join("gw.pem").display().to_string();
        let resolve = format!("localhost:{}:127.0.0.1", self.port);
        let url = format!("https://localhost:{}{path}", self.port);
        let auth = format!("authorization: Bearer {token}");
        let args = [
            "-s",
            "-i",
            "--http2",
            "-m",
            "10",
            "--cacert",
            &ca,
            "--resolve",
            &resolve,
            "-H",
            &auth,
            &url,
        ];
        let out = Command::new(tool("curl")).args(args).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// A counter of the gateway, once it reaches `want` (a request is recorded when its
    /// response ends, maybe just after the client has its answer), or its last value.
    fn settled(&self, name: &str, parts: &[&str], want: f64) -> f64 {
        wait_until(Duration::from_secs(5), || {
            self.sidecar.metric(name, parts) >= want
        });
        self.sidecar.metric(name, parts)
    }

    /// The access-log line of a call by `user`.
    fn logged(&self, user: &str) -> String {
        let field = format!("\"user_id\":\"{user}\"");
        wait_until(Duration::from_secs(5), || {
            self.sidecar.proc.dump().contains(&field)
        });
        let out = self.sidecar.proc.dump();
        out.lines()
            .find(|l| l.contains(&field))
            .unwrap_or_else(|| panic!("no access-log line for {user}:\n{out}"))
            .to_string()
    }
}

fn refused(text: &str, why: &str) {
    assert!(text.contains("Code: Unauthenticated"), "{text}");
    assert!(text.contains(why), "{why} not in {text}");
}

// Story: with the dev CA, the billing job's JWT-SVID gets it through to the payment app and
// to the header-showing app as spiffe://jia.app/billing; each broken token, no token and
// the wrong kind of token are refused with the reason and counted; `auth: any` takes an
// end-user JWT and a JWT-SVID, each as its own user.
#[test]
fn a_machine_client_calls_with_its_jwt_svid_and_broken_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    // The dev CA in this process (it signs the broken tokens), trusting the JWT keys of
    // a federated partner.example.
    let ca = Arc::new(DevCa::new("jia.app").unwrap());
    let partner = DevCa::new("partner.example").unwrap();
    ca.set_federated_jwt("partner.example", partner.jwt_bundle());
    let sock = |name: &str| d.join(format!("{name}.sock"));
    let names = [
        "api-gateway",
        "payment-service",
        "document-service",
        "billing",
    ];
    let identities = names
        .iter()
        .map(|n| {
            (
                parse_spiffe_id(&format!("spiffe://jia.app/{n}")).unwrap(),
                sock(n),
            )
        })
        .collect();
    let stop = CancellationToken::new();
    let serving = rt
        .block_on(
            ca.clone()
                .serve(identities, Duration::from_secs(600), stop.clone()),
        )
        .expect("the dev CA serves");
    let socket = |name: &str| format!("unix://{}", sock(name).display());

    let app = payment_app();
    let (_payment, payment_port) = sidecar(
        d,
        "payment-service",
        &socket("payment-service"),
        app.addr,
        "grpc",
        None,
    );
    let shown = rt.block_on(headers_app());
    let (_documents, shown_port) = sidecar(
        d,
        "document-service",
        &socket("document-service"),
        shown,
        "http",
        None,
    );
    let outbounds = format!("  - name: headers\n    protocol: http\n    endpoints: [\"127.0.0.1:{shown_port}\"]\n    server_id: spiffe://jia.app/document-service\n");
    let routes = "    - {name: machines, prefix: /machines/, upstream: headers, auth: jwt_svid}\n    - {name: users, prefix: /users/, upstream: headers, auth: jwt}\n    - {name: anyone, prefix: /anyone/, upstream: headers, auth: any}\n";
    let gw = Gateway::start(
        d,
        &socket("api-gateway"),
        payment_port,
        (&outbounds, routes),
        None,
    );

    // Every JWT-SVID result starts at 0.
    for result in [
        "ok",
        "missing",
        "audience",
        "expired",
        "unknown_key",
        "trust_domain",
    ] {
        let line = format!("meshd_jwt_svid_validations_total{{result=\"{result}\"}} 0");
        assert!(gw.sidecar.get("/metrics").1.contains(&line), "{line}");
    }

    // The billing job fetches its JWT-SVID with SPIRE's CLI from its Workload API.
    let agent = common::spire::installed_bin("spire-agent");
    let good = spire_fetch_jwt(&agent, &sock("billing"), AUDIENCE, None);
    assert_eq!(subject_of(&good), BILLING);
    let text = gw.get_payment(Some(&good));
    assert!(
        text.contains("Code: NotFound") && text.contains("no payment p-1"),
        "the app answers: {text}"
    );
    let line = gw.logged(BILLING);
    for field in [
        "\"direction\":\"gateway\"",
        "\"service\":\"payments\"",
        "\"user_agent\":\"grpcurl",
    ] {
        assert!(line.contains(field), "{field} not in {line}");
    }
    let text = gw.curl("/machines/whoami", &good);
    assert!(text.starts_with("HTTP/2 200"), "{text}");
    assert!(
        text.ends_with(&format!("x-user-id=[{BILLING}] authorization=[]")),
        "{text}"
    );

    // Broken tokens, no token, and an end-user JWT: refused by the gateway, with why.
    let wrong_audience = spire_fetch_jwt(&agent, &sock("billing"), "contacts.jia.app", None);
    let header = serde_json::json!({"alg": "ES256", "kid": ca.jwt_key_id(), "typ": "JWT"});
    let expired = ca
        .sign_jwt_custom(
            &header,
            &serde_json::json!({"sub": BILLING, "aud": [AUDIENCE], "exp": now() - 120}),
        )
        .unwrap();
    let partner_header =
        serde_json::json!({"alg": "ES256", "kid": partner.jwt_key_id(), "typ": "JWT"});
    let cross_domain = partner
        .sign_jwt_custom(
            &partner_header,
            &serde_json::json!({"sub": BILLING, "aud": [AUDIENCE], "exp": now() + 300}),
        )
        .unwrap();
    let alice = gw.alice();
    let table: [(Option<&str>, &str); 5] = [
        (
            Some(&wrong_audience),
            "JWT-SVID refused: audience [\"contacts.jia.app\"] does not contain `api.jia.app`",
        ),
        (Some(&expired), "JWT-SVID refused: token expired"),
        (Some(&cross_domain), "in the JWT bundle of jia.app"),
        (
            None,
            "credentials required (Authorization: Bearer <JWT-SVID>)",
        ),
        (Some(&alice), "this route accepts JWT-SVIDs only"),
    ];
    for (token, why) in table {
        refused(&gw.get_payment(token), why);
    }
    // Over HTTP: 401 with www-authenticate and the reason in the body.
    let text = gw.curl("/machines/whoami", &wrong_audience);
    assert!(text.starts_with("HTTP/2 401"), "{text}");
    assert!(text.contains("www-authenticate: Bearer"), "{text}");
    assert!(text.contains("does not contain `api.jia.app`"), "{text}");
    // The end-user route refuses the JWT-SVID and takes alice; `any` takes both.
    let text = gw.curl("/users/whoami", &good);
    assert!(
        text.starts_with("HTTP/2 401") && text.contains("this route accepts end-user JWTs only"),
        "{text}"
    );
    let text = gw.curl("/users/whoami", &alice);
    assert!(
        text.ends_with("x-user-id=[alice] authorization=[]"),
        "{text}"
    );
    let text = gw.curl("/anyone/whoami", &good);
    assert!(
        text.ends_with(&format!("x-user-id=[{BILLING}] authorization=[]")),
        "{text}"
    );
    let text = gw.curl("/anyone/whoami", &alice);
    assert!(
        text.ends_with("x-user-id=[alice] authorization=[]"),
        "{text}"
    );

    // Counted: 5 refusals on payments, 1 on machines, 1 on users; and per JWT-SVID result.
    for (service, want) in [
        ("payments", 5.0),
        ("machines", 1.0),
        ("users", 1.0),
        ("anyone", 0.0),
    ] {
        let parts = [
            &format!("service=\"{service}\"") as &str,
            "reason=\"unauthenticated\"",
        ];
        let got = gw.settled("gateway_requests_failed_total", &parts, want);
        assert_eq!(got, want, "{service}");
    }
    let results = [
        ("ok", 3.0),
        ("audience", 2.0),
        ("expired", 1.0),
        ("unknown_key", 1.0),
        ("missing", 1.0),
        ("trust_domain", 0.0),
    ];
    for (result, want) in results {
        let got = gw.sidecar.metric(
            "meshd_jwt_svid_validations_total",
            &[&format!("result=\"{result}\"")],
        );
        assert_eq!(
            got, want,
            "meshd_jwt_svid_validations_total{{result=\"{result}\"}}"
        );
    }
    let out = gw.sidecar.proc.dump();
    for token in [&good, &wrong_audience, &expired, &cross_domain, &alice] {
        assert!(
            !out.contains(token.as_str()),
            "a token is in the gateway's output"
        );
    }
    stop.cancel();
    rt.block_on(serving.finished());
}

// Story: with a real SPIRE, a workload registered by its uid gets a JWT-SVID from
// `spire-agent api fetch jwt -audience api.jia.app` and calls the gateway, whose own
// identity (api-gateway) and JWT bundles come from the same SPIRE: the payment app
// answers, and the gateway's user is that workload's SPIFFE ID, the token's `sub`.
#[test]
fn a_spire_workload_calls_with_its_jwt_svid() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    spire.create_entry(BILLING, BILLING_UID, None);
    spire.wait_served(BILLING_UID, BILLING, Duration::from_secs(30));
    let endpoint = spire.agent_endpoint();
    let app = payment_app();
    let (_payment, payment_port) = sidecar(
        d,
        "payment-service",
        &endpoint,
        app.addr,
        "grpc",
        Some(PAYMENT_UID),
    );
    let gw = Gateway::start(d, &endpoint, payment_port, ("", ""), Some(GATEWAY_UID));

    let token = spire_fetch_jwt(
        &spire.bin("spire-agent"),
        &spire.agent_socket(),
        AUDIENCE,
        Some(BILLING_UID),
    );
    assert_eq!(
        subject_of(&token),
        BILLING,
        "SPIRE names the registered workload"
    );
    let text = gw.get_payment(Some(&token));
    assert!(
        text.contains("Code: NotFound") && text.contains("no payment p-1"),
        "the app answers: {text}"
    );
    let line = gw.logged(BILLING);
    assert!(line.contains("\"service\":\"payments\""), "{line}");
    // A SPIRE token for another audience is refused by the same rules.
    let other = spire_fetch_jwt(
        &spire.bin("spire-agent"),
        &spire.agent_socket(),
        "contacts.jia.app",
        Some(BILLING_UID),
    );
    refused(
        &gw.get_payment(Some(&other)),
        "does not contain `api.jia.app`",
    );
    let ok = gw.settled("meshd_jwt_svid_validations_total", &["result=\"ok\""], 1.0);
    assert_eq!(ok, 1.0);
    assert_eq!(
        gw.sidecar
            .metric("meshd_jwt_svid_validations_total", &["result=\"audience\""]),
        1.0
    );
    assert!(
        !gw.sidecar.proc.dump().contains(&token),
        "the token is in the gateway's output"
    );
}
