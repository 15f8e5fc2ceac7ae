//! Interop both ways with go-spiffe v2, the Go SPIFFE library, as a real program
//! (`tests/peers/gospiffe`, built with Go on first use): a Go client calls meshd's inbound,
//! and meshd's outbound calls a Go server, with SVIDs from `meshd dev-ca` and from a real
//! SPIRE. The user sees the calls answered with the right IDs on both sides, and each side's
//! refusals in its own words: meshd's PERMISSION_DENIED naming the rule, go-spiffe's
//! `unexpected ID`, meshd's 503 naming the wrong server ID.

mod common;

use common::edge::{inbound_sidecar, tool, wait_counter};
use common::gospiffe::{client, ClientRun, GoServer};
use common::meshd::{free_port, DemoApp, DevCa, Sidecar};
use common::spire::Spire;
use std::path::{Path, PathBuf};
use std::process::Command;

const PAYMENT: &str = "spiffe://jia.app/payment-service";
const CONTACT: &str = "spiffe://jia.app/contact-service";
const FAMILY: &str = "spiffe://jia.app/family-service";
const DOCUMENT: &str = "spiffe://jia.app/document-service";
const GATEWAY: &str = "spiffe://jia.app/api-gateway";
const GET_CONTACT: [&str; 4] = [
    "-method",
    "/contact.v1.ContactService/GetContact",
    "-field",
    "1=c1",
];

/// contact-service's policy: `callers` may use the contact API, document-service is denied by
/// a named rule, everyone else by the default.
fn contact_policy(dir: &Path, callers: &[&str]) -> PathBuf {
    let path = dir.join("contact-policy.yaml");
    let from = callers
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    std::fs::write(
        &path,
        format!(
            "service: contact-service\ndefault: deny\nrules:\n  - name: callers-of-contacts\n    from: [{from}]\n    to:\n      grpc: [\"contact.v1.ContactService/*\"]\n  - name: no-documents-here\n    action: deny\n    from: [\"{DOCUMENT}\"]\n"
        ),
    )
    .unwrap();
    path
}

/// A sidecar with one outbound listener per `(name, protocol, go server, server_id)`; returns
/// it and the listeners' ports in that order.
fn outbound_sidecar(
    dir: &Path,
    socket: &str,
    upstreams: &[(&str, &str, &GoServer, &str)],
    uid: Option<u32>,
) -> (Sidecar, Vec<u16>) {
    let admin = free_port();
    let mut yaml =
        format!("service: payment-service\nidentity:\n  workload_api: {socket}\noutbound:\n");
    let mut ports = Vec::new();
    for (name, protocol, server, server_id) in upstreams {
        let port = free_port();
        ports.push(port);
        yaml += &format!(
            "  - name: {name}\n    listen: 127.0.0.1:{port}\n    protocol: {protocol}\n    endpoints: [\"{}\"]\n    server_id: {server_id}\n    timeout: 5s\n",
            server.addr
        );
    }
    yaml += &format!("admin:\n  listen: 127.0.0.1:{admin}\n");
    let s = Sidecar::start_as("payment-sidecar", dir, &yaml, admin, uid);
    s.wait_ready();
    (s, ports)
}

/// Runs a tool from PATH or the cache (grpcurl, curl) to the end; (exit ok, stdout + stderr).
fn run(name: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool(name))
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {name}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// grpcurl's Health/Check through a plaintext outbound listener, with response headers
/// (`-v`); the Go server serves reflection, so no protos are needed.
fn grpcurl_health(port: u16) -> (bool, String) {
    let addr = format!("127.0.0.1:{port}");
    run(
        "grpcurl",
        &[
            "-plaintext",
            "-v",
            "-max-time",
            "10",
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
}

/// curl's HTTP/2 (prior knowledge) GET through a plaintext outbound listener: (status, body).
fn curl_h2c(port: u16, path: &str) -> (String, String) {
    let url = format!("http://127.0.0.1:{port}{path}");
    let (ok, text) = run(
        "curl",
        &[
            "-sS",
            "-m",
            "10",
            "--http2-prior-knowledge",
            "-w",
            "\n%{http_code}",
            &url,
        ],
    );
    assert!(ok, "curl {url} failed: {text}");
    let (body, status) = text.trim_end().rsplit_once('\n').unwrap_or(("", &text));
    (status.to_string(), body.to_string())
}

fn assert_refused(run: &ClientRun, parts: &[&str]) {
    assert!(!run.ok(), "the call got through: {}", run.text);
    for part in parts {
        assert!(run.text.contains(part), "no `{part}` in:\n{}", run.text);
    }
}

// Story: a Go service built on go-spiffe calls the contact service through its meshd
// sidecar. As payment-service it gets the contact, which the app attributes to
// payment-service (meshd's x-forwarded-client-cert), and go-spiffe saw contact-service's
// SVID; as family-service it gets PERMISSION_DENIED (7) "denied by default deny"; as
// document-service the denial names the rule; and when it expects another server ID,
// go-spiffe itself refuses meshd's SVID.
#[test]
fn gospiffe_client_calls_meshd_inbound() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = DevCa::start(
        d,
        &[
            "contact-service",
            "payment-service",
            "family-service",
            "document-service",
        ],
        "1h",
        &[],
    );
    let app = DemoApp::start("contact", &[]);
    let inbound = free_port();
    let policy = contact_policy(d, &[PAYMENT]);
    let sidecar = inbound_sidecar(
        d,
        &ca.socket("contact-service"),
        "contact-service",
        inbound,
        &app.addr.to_string(),
        "grpc",
        &policy,
    );
    sidecar.wait_ready();
    let addr = format!("127.0.0.1:{inbound}");
    let call = |who: &str, server_id: &str| {
        client(d, &ca.socket(who), &addr, server_id, None, &GET_CONTACT)
    };

    let ok = call("payment-service", CONTACT);
    assert!(ok.ok(), "{}", ok.text);
    assert!(
        ok.text.contains(&format!("server {CONTACT}")),
        "{}",
        ok.text
    );
    // GetContact's answer: 1 contact_id, 2 name, 4 seen_caller (the app's view of XFCC).
    assert!(
        ok.text.contains("1:\"c1\"") && ok.text.contains(&format!("4:\"{PAYMENT}\"")),
        "the app did not see payment-service: {}",
        ok.text
    );

    let denied = call("family-service", CONTACT);
    assert_refused(
        &denied,
        &["PermissionDenied", "grpc code 7", "denied by default deny"],
    );
    let by_rule = call("document-service", CONTACT);
    assert_refused(
        &by_rule,
        &["PermissionDenied", "denied by rule \"no-documents-here\""],
    );
    let counted = wait_counter(
        &sidecar,
        "meshd_authz_decisions_total",
        &["decision=\"deny\"", "rule=\"no-documents-here\""],
        1.0,
    );
    assert_eq!(counted, 1.0, "the named rule's denial is counted once");

    let wrong_server = call("payment-service", FAMILY);
    assert_refused(
        &wrong_server,
        // grpc-go quotes go-spiffe's `unexpected ID "…"` once more.
        &[
            "authentication handshake failed",
            &format!(r#"unexpected ID \"{CONTACT}\""#),
        ],
    );
}

// Story: the payment app calls Go services through its sidecar's outbound listeners. grpcurl
// gets SERVING from the go-spiffe gRPC server, which saw payment-service; curl gets the Go
// HTTP answer naming both IDs. An outbound whose server_id is document-service refuses the
// Go server with 503 naming both IDs; a Go server that allows only api-gateway refuses
// meshd (go-spiffe logs `unexpected ID`), and the app gets UNAVAILABLE.
#[test]
fn meshd_outbound_calls_gospiffe_server() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = DevCa::start(d, &["payment-service", "family-service"], "1h", &[]);
    let family = ca.socket("family-service");
    let go = GoServer::start("go-family", d, &family, PAYMENT, None);
    let picky = GoServer::start("go-family-picky", d, &family, GATEWAY, None);
    let (_sidecar, ports) = outbound_sidecar(
        d,
        &ca.socket("payment-service"),
        &[
            ("family-grpc", "grpc", &go, FAMILY),
            ("family-http", "http", &go, FAMILY),
            ("family-as-document", "http", &go, DOCUMENT),
            ("family-picky", "grpc", &picky, FAMILY),
        ],
        None,
    );

    let (ok, text) = grpcurl_health(ports[0]);
    assert!(ok, "{text}");
    assert!(text.contains("\"status\": \"SERVING\""), "{text}");
    assert!(
        text.contains(&format!("spiffe-caller: {PAYMENT}")),
        "{text}"
    );

    let (status, body) = curl_h2c(ports[1], "/whoami");
    assert_eq!(status, "200", "{body}");
    assert!(
        body.contains(&format!("go-spiffe server {FAMILY}; caller {PAYMENT}")),
        "{body}"
    );

    let (status, body) = curl_h2c(ports[2], "/whoami");
    assert_eq!(status, "503", "{body}");
    assert!(
        body.contains("family-as-document") && body.contains(DOCUMENT) && body.contains(FAMILY),
        "meshd's 503 should name the upstream, the expected and the presented ID: {body}"
    );

    let (ok, text) = grpcurl_health(ports[3]);
    assert!(!ok, "the picky Go server answered: {text}");
    assert!(text.contains("Unavailable"), "{text}");
    assert!(
        picky.printed(&format!("unexpected ID \"{PAYMENT}\"")),
        "go-spiffe did not say why it refused meshd:\n{}",
        picky.proc.dump()
    );
}

// Story: with SVIDs from a real SPIRE, every workload runs as the uid its registration entry
// selects: a Go client (api-gateway) calls the contact app through meshd (contact-service),
// and grpcurl calls a Go server (document-service) through meshd (payment-service); both
// calls are answered and each side names the other's SPIRE-issued ID.
#[test]
fn spire_svids_carry_calls_both_ways() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let socket = spire.agent_endpoint();

    let app = DemoApp::start("contact", &[]);
    let inbound = free_port();
    let policy = contact_policy(d, &[GATEWAY]);
    let admin = free_port();
    let contact = Sidecar::start_as(
        "contact-sidecar",
        d,
        &format!(
            "service: contact-service\nidentity:\n  workload_api: {socket}\n  expect: {CONTACT}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {}\n  protocol: grpc\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
            app.addr,
            policy.display()
        ),
        admin,
        Some(20003),
    );
    contact.wait_ready();
    let addr = format!("127.0.0.1:{inbound}");
    let into_meshd = client(d, &socket, &addr, CONTACT, Some(20002), &GET_CONTACT);
    assert!(into_meshd.ok(), "{}", into_meshd.text);
    assert!(
        into_meshd.text.contains(&format!("server {CONTACT}"))
            && into_meshd.text.contains(&format!("4:\"{GATEWAY}\"")),
        "{}",
        into_meshd.text
    );

    let go = GoServer::start("go-document", d, &socket, PAYMENT, Some(20005));
    assert!(
        go.proc.dump().contains(&format!("as {DOCUMENT}")),
        "{}",
        go.proc.dump()
    );
    let (_payment, ports) = outbound_sidecar(
        d,
        &socket,
        &[("document-grpc", "grpc", &go, DOCUMENT)],
        Some(20001),
    );
    let (ok, text) = grpcurl_health(ports[0]);
    assert!(ok, "{text}");
    assert!(
        text.contains("\"status\": \"SERVING\"")
            && text.contains(&format!("spiffe-caller: {PAYMENT}")),
        "{text}"
    );
}
