//! Identity through the Workload API served by the development CA (and from files): a
//! sidecar becomes ready with its SVID, follows rotations without a gap, refuses an
//! unexpected ID, keeps its cached SVID when the source goes away and fails closed at
//! expiry.

mod common;

use common::meshd::{free_port, wait_until, DevCa, Sidecar};
use std::path::Path;
use std::time::Duration;

fn sidecar(dir: &Path, name: &str, identity_yaml: &str) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        "service: {name}\nidentity:\n{identity_yaml}\nadmin:\n  listen: 127.0.0.1:{admin}\n"
    );
    Sidecar::start(name, dir, &yaml, admin)
}

fn identity_field(s: &Sidecar, field: &str) -> String {
    let (_, body) = s.get("/identity");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    match &v[field] {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

// Story: with no Workload API yet the sidecar says why it is not ready; once the CA
// serves, it picks up the SVID by itself (retrying) and turns ready.
#[test]
fn not_ready_until_the_workload_api_serves_then_ready() {
    let dir = tempfile::tempdir().unwrap();
    let sock = format!("unix://{}/payment-service.sock", dir.path().display());
    let s = sidecar(
        dir.path(),
        "payment-service",
        &format!("  workload_api: {sock}"),
    );
    let (code, body) = s.get("/ready");
    assert_eq!(code, 503);
    assert!(body.contains("unreachable"), "{body}");
    let _ca = DevCa::start(dir.path(), &["payment-service"], "1h", &[]);
    s.wait_ready();
    assert_eq!(
        identity_field(&s, "spiffe_id"),
        "spiffe://jia.app/payment-service"
    );
    assert!(s.metric("meshd_svid_expiry_timestamp_seconds", &[]) > 1.0e9);
}

// Story: SVIDs with a 4 s TTL rotate every 2 s; the sidecar publishes each new serial and
// is never without a valid SVID in between.
#[test]
fn rotation_is_followed_without_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["payment-service"], "4s", &[]);
    let s = sidecar(
        dir.path(),
        "payment-service",
        &format!("  workload_api: {}", ca.socket("payment-service")),
    );
    s.wait_ready();
    let first = identity_field(&s, "serial");
    let mut serials = vec![first.clone()];
    let deadline = std::time::Instant::now() + Duration::from_secs(7);
    while std::time::Instant::now() < deadline {
        let (code, body) = s.get("/ready");
        assert_eq!(code, 200, "a gap during rotation: {body}");
        let serial = identity_field(&s, "serial");
        if serials.last() != Some(&serial) {
            serials.push(serial);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        serials.len() >= 3,
        "expected at least two rotations, saw {serials:?}"
    );
    assert!(s.metric("meshd_svid_rotations_total", &[]) >= 2.0);
}

// Story: the sidecar expects payment-service but the socket hands out contact-service:
// it never becomes ready, and says both IDs.
#[test]
fn an_unexpected_spiffe_id_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["contact-service"], "1h", &[]);
    let s = sidecar(
        dir.path(),
        "payment-service",
        &format!(
            "  workload_api: {}\n  expect: spiffe://jia.app/payment-service",
            ca.socket("contact-service")
        ),
    );
    let both = wait_until(Duration::from_secs(10), || {
        let (_, body) = s.get("/ready");
        body.contains("spiffe://jia.app/contact-service")
            && body.contains("spiffe://jia.app/payment-service")
    });
    assert!(both, "{:?}", s.get("/ready"));
    assert_eq!(s.get("/ready").0, 503);
}

// Story: the CA goes away after the first SVID; the sidecar keeps serving on the cached
// SVID, then fails closed (not ready, no handshakes) when it expires.
#[test]
fn cached_svid_until_expiry_then_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let mut ca = DevCa::start(dir.path(), &["payment-service"], "5s", &[]);
    let inbound = free_port();
    let admin = free_port();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/payment-service.yaml");
    let yaml = format!(
        "service: payment-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: 127.0.0.1:1\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        ca.socket("payment-service"),
        policy.display()
    );
    let s = Sidecar::start("payment-service", dir.path(), &yaml, admin);
    s.wait_ready();
    ca.proc.signal("KILL");
    ca.proc.wait_exit(Duration::from_secs(5));
    assert_eq!(s.get("/ready").0, 200, "still ready on the cached SVID");
    let expired = wait_until(Duration::from_secs(10), || {
        s.get("/ready").1.contains("expired")
    });
    assert!(expired, "{:?}", s.get("/ready"));
    assert_eq!(s.get("/ready").0, 503);
    // No handshake is accepted any more: the connection is closed at once.
    let refused = {
        use std::io::Read;
        let mut c = std::net::TcpStream::connect(("127.0.0.1", inbound)).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 16];
        matches!(c.read(&mut buf), Ok(0) | Err(_))
    };
    assert!(refused);
    assert!(
        s.metric(
            "meshd_tls_handshake_failures_total",
            &["reason=\"no_identity\""]
        ) >= 1.0
    );
}

// Story: a federated trust domain's bundle given to the CA reaches the sidecar's bundle set.
#[test]
fn federated_bundles_reach_the_bundle_set() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service"],
        "1h",
        &["--federate", "partner.example"],
    );
    let s = sidecar(
        dir.path(),
        "payment-service",
        &format!("  workload_api: {}", ca.socket("payment-service")),
    );
    s.wait_ready();
    let tds = identity_field(&s, "trust_domains");
    assert!(
        tds.contains("partner.example") && tds.contains("jia.app"),
        "{tds}"
    );
    assert_eq!(s.metric("meshd_bundle_trust_domains", &[]), 2.0);
}

// Story: a malformed Workload API address is refused at start with a clear message.
#[test]
fn a_malformed_workload_api_address_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("bad.yaml");
    std::fs::write(
        &cfg,
        "service: x\nidentity:\n  workload_api: unix:relative.sock\nadmin:\n  listen: 127.0.0.1:0\n",
    )
    .unwrap();
    let out = std::process::Command::new(common::meshd::meshd_bin())
        .args(["check", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("bad.yaml:3:") && text.contains("unix:relative.sock"),
        "{text}"
    );
}

// Story: identity from PEM files written by the CA: the sidecar loads them, follows each
// rewrite (rotation), keeps the previous identity when a key that does not match is
// written, and fails closed when the SVID expires with no replacement.
#[test]
fn identity_from_files_follows_rewrites_and_keeps_the_last_good() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    std::fs::create_dir_all(&files).unwrap();
    let mut ca = DevCa::start(
        dir.path(),
        &["api-gateway"],
        "6s",
        &[
            "--write-files",
            &format!("spiffe://jia.app/payment-service={}", files.display()),
        ],
    );
    let s = sidecar(
        dir.path(),
        "payment-service",
        &format!(
            "  files:\n    cert: {f}/svid.pem\n    key: {f}/key.pem\n    bundle: {f}/bundle.pem",
            f = files.display()
        ),
    );
    s.wait_ready();
    assert_eq!(
        identity_field(&s, "spiffe_id"),
        "spiffe://jia.app/payment-service"
    );
    let first = identity_field(&s, "serial");
    let rotated = wait_until(Duration::from_secs(8), || {
        identity_field(&s, "serial") != first
    });
    assert!(rotated, "a rewrite of the files is picked up");

    // The CA stops rewriting; a key that does not belong to the certificate is written.
    ca.proc.signal("KILL");
    ca.proc.wait_exit(Duration::from_secs(5));
    let current = identity_field(&s, "serial");
    let key = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
        ])
        .output()
        .expect("openssl is needed (Debian package openssl; tests/run.sh installs it)");
    std::fs::write(files.join("key.pem"), &key.stdout).unwrap();
    assert!(
        s.proc.wait_output("does not match", Duration::from_secs(5)),
        "the log says why the new files were refused:\n{}",
        s.proc.dump()
    );
    assert_eq!(
        identity_field(&s, "serial"),
        current,
        "the previous identity stays"
    );
    assert_eq!(s.get("/ready").0, 200);

    // No valid replacement before expiry: fail closed.
    let expired = wait_until(Duration::from_secs(10), || {
        s.get("/ready").1.contains("expired")
    });
    assert!(
        expired,
        "{:?} {:?}\n{}",
        s.get("/ready"),
        s.get("/identity"),
        s.proc.dump()
    );
}

// Story: a foreign Workload API client, SPIRE's own `spire-agent api fetch x509`, reads the
// development CA's socket: it names the SPIFFE ID, writes the SVID, its key and the bundle,
// the SVID's URI SAN is the identity, the key is the certificate's, and the bundle verifies
// the SVID (openssl verify).
#[test]
fn spire_agent_api_fetch_x509_reads_the_dev_ca() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["payment-service"], "1h", &[]);
    let out_dir = dir.path().join("fetched");
    std::fs::create_dir_all(&out_dir).unwrap();
    let socket = ca.socket("payment-service");
    let socket = socket.trim_start_matches("unix://");
    let agent = common::spire::installed_bin("spire-agent");
    let out = std::process::Command::new(&agent)
        .args([
            "api",
            "fetch",
            "x509",
            "-timeout",
            "10s",
            "-socketPath",
            socket,
            "-write",
        ])
        .arg(&out_dir)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", agent.display()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "spire-agent api fetch x509: {text}");
    assert!(
        text.contains("SPIFFE ID:") && text.contains("spiffe://jia.app/payment-service"),
        "{text}"
    );
    for file in ["svid.0.pem", "svid.0.key", "bundle.0.pem"] {
        let len = std::fs::metadata(out_dir.join(file)).map_or(0, |m| m.len());
        assert!(len > 0, "{file} not written (or empty): {text}");
    }
    let openssl = |args: &[&str]| {
        let out = std::process::Command::new("openssl")
            .args(args)
            .current_dir(&out_dir)
            .output()
            .expect("openssl is needed (Debian package openssl; tests/run.sh installs it)");
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        (out.status.success(), text)
    };
    let (ok, san) = openssl(&[
        "x509",
        "-in",
        "svid.0.pem",
        "-noout",
        "-ext",
        "subjectAltName",
    ]);
    assert!(ok, "{san}");
    let uris: Vec<&str> = san
        .split([',', '\n'])
        .filter_map(|s| s.trim().strip_prefix("URI:"))
        .collect();
    assert_eq!(uris, ["spiffe://jia.app/payment-service"], "{san}");
    let (ok, verify) = openssl(&["verify", "-CAfile", "bundle.0.pem", "svid.0.pem"]);
    assert!(ok && verify.contains("svid.0.pem: OK"), "{verify}");
    let (ok, from_key) = openssl(&["pkey", "-in", "svid.0.key", "-pubout"]);
    assert!(ok, "{from_key}");
    let (ok, from_cert) = openssl(&["x509", "-in", "svid.0.pem", "-noout", "-pubkey"]);
    assert!(ok, "{from_cert}");
    assert_eq!(from_key, from_cert, "the key written is the SVID's");
}
