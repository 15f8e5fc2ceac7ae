//! meshd's outbound attaches a JWT-SVID, checked by a real go-spiffe server
//! (`gospiffe-peer jwt-server`, which validates with `jwtsvid.ParseAndValidate` against the
//! Workload API's JWT bundles). The app sends a plain request (even with its own
//! `authorization`); the server sees meshd's SPIFFE ID as the token's subject — over mesh
//! mTLS with `meshd dev-ca` and with a real SPIRE (the same subject SPIRE's own CLI gets),
//! and over server-only TLS to a server with a web-PKI style certificate from a CA the test
//! makes, where the token is the caller's only proof. What the user sees going wrong: a
//! server that refuses the audience answers 401 in go-spiffe's words; a server the CA did
//! not sign, or whose name is not `sni`, is refused with 503 naming why; with the Workload
//! API gone before a token was fetched, the request gets 503 naming the reason and is never
//! sent. The token never appears in meshd's output, even at debug level.

mod common;

use base64::Engine;
use common::edge::tool;
use common::gospiffe::peer_bin;
use common::meshd::{free_port, DevCa, Proc, Sidecar};
use common::spire::Spire;
use std::path::{Path, PathBuf};
use std::process::Command;

const PAYMENT: &str = "spiffe://jia.app/payment-service";
const DOCUMENT: &str = "spiffe://jia.app/document-service";
/// SPIRE's uids for payment-service and document-service (`spire/up.sh`).
const PAYMENT_UID: u32 = 20001;
const DOCUMENT_UID: u32 = 20005;

/// A running `gospiffe-peer jwt-server`.
struct JwtServer {
    proc: Proc,
    /// `127.0.0.1:PORT`.
    addr: String,
}

impl JwtServer {
    /// Starts it with its bundles (and, without `cert`, its X.509-SVID) from `socket`,
    /// accepting tokens for `audience`; `cert` is a PEM chain and key for plain TLS. Runs
    /// as `uid` (SPIRE's unix attestor) from a copy of the peer in `dir` when given.
    fn start(
        dir: &Path,
        socket: &str,
        audience: &str,
        cert: Option<(&Path, &Path)>,
        uid: Option<u32>,
    ) -> JwtServer {
        let addr = format!("127.0.0.1:{}", free_port());
        let mut cmd = match uid {
            None => Command::new(peer_bin()),
            Some(uid) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
                let copy = dir.join("gospiffe-peer-jwt");
                std::fs::copy(peer_bin(), &copy).expect("copy the gospiffe peer");
                let _ = std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755));
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".into(),
                ])
                .arg(copy);
                c
            }
        };
        cmd.args([
            "jwt-server",
            "-socket",
            socket,
            "-listen",
            &addr,
            "-audience",
            audience,
        ]);
        if let Some((chain, key)) = cert {
            cmd.arg("-cert").arg(chain).arg("-key").arg(key);
        }
        cmd.env_remove("SPIFFE_ENDPOINT_SOCKET");
        let proc = Proc::spawn("jwt-server", cmd, Some("gospiffe-peer jwt-server ready"));
        JwtServer { proc, addr }
    }
}

/// One outbound of the test sidecar: its name, endpoint and the lines after `endpoints`.
struct Upstream<'a> {
    name: &'a str,
    endpoint: &'a str,
    extra: String,
}

/// A payment sidecar (debug logs, every request in the access log) with one HTTP outbound
/// per upstream; returns it and the listeners' ports in that order.
fn sidecar(
    dir: &Path,
    socket: &str,
    upstreams: &[Upstream],
    uid: Option<u32>,
) -> (Sidecar, Vec<u16>) {
    let admin = free_port();
    let mut yaml = format!(
        "service: payment-service\nidentity:\n  workload_api: {socket}\n  expect: {PAYMENT}\nlog:\n  access: all\n  level: debug\noutbound:\n"
    );
    let mut ports = Vec::new();
    for u in upstreams {
        let port = free_port();
        ports.push(port);
        yaml += &format!(
            "  - name: {}\n    listen: 127.0.0.1:{port}\n    protocol: http\n    endpoints: [\"{}\"]\n    timeout: 5s\n",
            u.name, u.endpoint
        );
        for line in u.extra.lines() {
            yaml += &format!("    {line}\n");
        }
    }
    yaml += &format!("admin:\n  listen: 127.0.0.1:{admin}\n");
    let s = Sidecar::start_as("payment-sidecar", dir, &yaml, admin, uid);
    s.wait_ready();
    (s, ports)
}

/// curl's HTTP/2 (prior knowledge) GET through an outbound listener, as the app would send
/// it, with its own `authorization`: (status, body).
fn app_get(port: u16) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}/documents/d1");
    let out = Command::new(tool("curl"))
        .args([
            "-sS",
            "-m",
            "15",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_code}",
        ])
        .args(["-H", "authorization: Bearer the-apps-own-token"])
        .arg(&url)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run curl: {e}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "curl {url} failed: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (body, status) = text.trim_end().rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.trim_end().to_string())
}

/// Asserts meshd's output holds no JWT: every JWT starts `eyJ` (base64 of `{"`).
fn assert_no_token_logged(s: &Sidecar) {
    let out = s.proc.dump();
    assert!(
        out.contains("\"direction\":\"outbound\""),
        "the access log should show the requests:\n{out}"
    );
    assert!(
        !out.contains("eyJ"),
        "a token reached meshd's output:\n{out}"
    );
}

/// `meshd_jwt_svid_fetches_total{outbound=NAME,result=RESULT}`.
fn fetches(s: &Sidecar, outbound: &str, result: &str) -> f64 {
    let name = format!("outbound=\"{outbound}\"");
    let result = format!("result=\"{result}\"");
    s.metric("meshd_jwt_svid_fetches_total", &[&name, &result])
}

/// `promtool check metrics` on a scrape: no problem reported.
fn promtool_finds_nothing(metrics: &str) {
    use std::io::Write;
    let mut promtool = Command::new(tool("promtool"))
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("promtool is needed (Debian package prometheus; tests/run.sh installs it)");
    let mut stdin = promtool.stdin.take().unwrap();
    stdin.write_all(metrics.as_bytes()).unwrap();
    drop(stdin);
    let out = promtool.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && text.trim().is_empty(),
        "promtool check metrics: {text}"
    );
}

/// The go-spiffe server's answer for a token of `PAYMENT` with audience `aud`.
fn subject_line(aud: &str, mtls_caller: &str) -> String {
    format!("jwt-svid subject {PAYMENT}; audience {aud}; mtls caller {mtls_caller}")
}

// Story: with meshd dev-ca, the payment app calls the document service (a go-spiffe server
// that checks JWT-SVIDs for `documents`) through its sidecar, sending its own bearer token.
// The server sees a valid JWT-SVID whose subject is payment-service, over mTLS from
// payment-service: meshd replaced the app's token. A second call reuses the cached token
// (one fetch counted). Through an outbound asking for audience `contacts`, the server's 401
// with go-spiffe's audience error reaches the app. Then the Workload API goes away: an
// outbound that never had a token answers 503 naming why, counted as an error, and the
// server is not reached. meshd never printed a token.
#[test]
fn dev_ca_jwt_svid_reaches_a_gospiffe_server_over_mtls() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service", "document-service"],
        "1h",
        &[],
    );
    let server = JwtServer::start(
        dir.path(),
        &ca.socket("document-service"),
        "documents",
        None,
        None,
    );
    let mtls = |aud: &str| format!("server_id: {DOCUMENT}\njwt_svid: {{audience: [{aud}]}}");
    let upstreams = [
        Upstream {
            name: "documents",
            endpoint: &server.addr,
            extra: mtls("documents"),
        },
        Upstream {
            name: "wrong-audience",
            endpoint: &server.addr,
            extra: mtls("contacts"),
        },
        Upstream {
            name: "archive",
            endpoint: &server.addr,
            extra: mtls("archive"),
        },
    ];
    let (s, ports) = sidecar(dir.path(), &ca.socket("payment-service"), &upstreams, None);
    for name in ["documents", "wrong-audience", "archive"] {
        assert_eq!(fetches(&s, name, "ok"), 0.0, "series from start");
        assert_eq!(fetches(&s, name, "error"), 0.0, "series from start");
    }
    let (_, metrics) = s.get("/metrics");
    assert!(
        metrics.contains("# HELP meshd_jwt_svid_fetches_total "),
        "the family has HELP text"
    );
    promtool_finds_nothing(&metrics);

    for _ in 0..2 {
        let (status, body) = app_get(ports[0]);
        assert_eq!(status, "200", "{body}");
        assert_eq!(body, subject_line("documents", PAYMENT));
    }
    assert_eq!(
        fetches(&s, "documents", "ok"),
        1.0,
        "the second call reused the token"
    );

    let (status, body) = app_get(ports[1]);
    assert_eq!(status, "401", "{body}");
    assert!(
        body.starts_with("go-spiffe: ") && body.contains("audience") && body.contains("documents"),
        "go-spiffe's own refusal reaches the app: {body}"
    );

    let mut ca = ca;
    ca.proc.signal("KILL");
    ca.proc.wait_exit(std::time::Duration::from_secs(10));
    let (status, body) = app_get(ports[2]);
    assert_eq!(status, "503", "{body}");
    assert!(
        body.contains("upstream archive: no JWT-SVID for audience [\"archive\"]: FetchJWTSVID"),
        "the reason is named: {body}"
    );
    assert_eq!(fetches(&s, "archive", "error"), 1.0);
    assert_eq!(fetches(&s, "archive", "ok"), 0.0);
    assert_no_token_logged(&s);
    drop(server);
}

/// A CA the test makes and a server certificate it signs for `name` (a web-PKI style
/// certificate: a DNS name, no SPIFFE ID). Returns (ca.pem, chain.pem, key.pem).
fn web_pki_certs(dir: &Path, tag: &str, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, format!("{tag} test CA"));
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join(format!("{tag}-ca.pem")),
        dir.join(format!("{tag}-chain.pem")),
        dir.join(format!("{tag}-key.pem")),
    );
    std::fs::write(&paths.0, ca_cert.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

// Story: the document service runs outside the mesh behind a plain TLS certificate for
// docs.example.test from the company's CA. The payment sidecar calls it with
// `tls: {mode: server_only, ca, sni}` and a JWT-SVID: the call succeeds, the server saw no
// client certificate and the token says payment-service. Trusting another CA instead, or
// expecting another name, the sidecar refuses the server: 503 naming the unknown issuer or
// the name; no token is printed.
#[test]
fn server_only_tls_carries_the_jwt_svid_to_a_server_outside_the_mesh() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service", "document-service"],
        "1h",
        &[],
    );
    let (company_ca, chain, key) = web_pki_certs(dir.path(), "company", "docs.example.test");
    let (other_ca, _, _) = web_pki_certs(dir.path(), "other", "docs.example.test");
    let server = JwtServer::start(
        dir.path(),
        &ca.socket("document-service"),
        "documents",
        Some((&chain, &key)),
        None,
    );
    let server_only = |ca: &Path, sni: &str| {
        format!(
            "tls: {{mode: server_only, ca: {}, sni: {sni}}}\njwt_svid: {{audience: [documents]}}",
            ca.display()
        )
    };
    let upstreams = [
        Upstream {
            name: "docs",
            endpoint: &server.addr,
            extra: server_only(&company_ca, "docs.example.test"),
        },
        Upstream {
            name: "docs-other-ca",
            endpoint: &server.addr,
            extra: server_only(&other_ca, "docs.example.test"),
        },
        Upstream {
            name: "docs-other-name",
            endpoint: &server.addr,
            extra: server_only(&company_ca, "files.example.test"),
        },
    ];
    let (s, ports) = sidecar(dir.path(), &ca.socket("payment-service"), &upstreams, None);

    let (status, body) = app_get(ports[0]);
    assert_eq!(status, "200", "{body}");
    assert_eq!(body, subject_line("documents", "none"));

    let (status, body) = app_get(ports[1]);
    assert_eq!(status, "503", "{body}");
    assert!(
        body.contains("upstream docs-other-ca unavailable") && body.contains("UnknownIssuer"),
        "a server the CA did not sign is refused, naming why: {body}"
    );
    let (status, body) = app_get(ports[2]);
    assert_eq!(status, "503", "{body}");
    assert!(
        body.contains("upstream docs-other-name unavailable")
            && body.contains("not valid for name")
            && body.contains("files.example.test"),
        "a certificate for another name is refused, naming it: {body}"
    );
    assert_no_token_logged(&s);
}

/// The `sub` of a JWT, read from its payload (no verification: only to compare).
fn jwt_subject(token: &str) -> String {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url payload");
    let claims: serde_json::Value = serde_json::from_slice(&bytes).expect("JSON claims");
    claims["sub"].as_str().unwrap_or_default().to_string()
}

// Story: with a real SPIRE, the payment sidecar (payment uid) calls the go-spiffe document
// server (document uid, its SVID and JWT bundles from SPIRE) with a JWT-SVID for
// `documents`: the server validates SPIRE's token against SPIRE's bundles and sees
// payment-service, the same subject `spire-agent api fetch jwt -audience documents` gets
// for the payment uid.
#[test]
fn real_spire_jwt_svid_reaches_a_gospiffe_server() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let endpoint = spire.agent_endpoint();
    let server = JwtServer::start(dir.path(), &endpoint, "documents", None, Some(DOCUMENT_UID));
    let upstreams = [Upstream {
        name: "documents",
        endpoint: &server.addr,
        extra: format!("server_id: {DOCUMENT}\njwt_svid: {{audience: [documents]}}"),
    }];
    let (s, ports) = sidecar(dir.path(), &endpoint, &upstreams, Some(PAYMENT_UID));
    let (status, body) = app_get(ports[0]);
    assert_eq!(status, "200", "{body}\n{}", server.proc.dump());
    assert_eq!(body, subject_line("documents", PAYMENT));

    let uid = PAYMENT_UID.to_string();
    let out = Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
        .arg(spire.bin("spire-agent"))
        .args([
            "api",
            "fetch",
            "jwt",
            "-audience",
            "documents",
            "-timeout",
            "10s",
        ])
        .arg("-socketPath")
        .arg(spire.agent_socket())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run spire-agent api fetch jwt");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.status.success(), "spire-agent api fetch jwt: {text}");
    let token = text
        .lines()
        .skip_while(|l| !l.starts_with("token("))
        .nth(1)
        .map(str::trim)
        .unwrap_or_else(|| panic!("no token printed: {text}"));
    assert_eq!(
        jwt_subject(token),
        PAYMENT,
        "SPIRE's CLI gets the subject the go-spiffe server saw"
    );
    assert_no_token_logged(&s);
}
