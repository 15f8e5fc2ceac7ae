//! JWT-SVIDs issued by a real SPIRE, end to end through meshd, with workloads attested by
//! unix uid.
//!
//! The story: the payment app calls the document service through its sidecar. The payment
//! sidecar's outbound (`jwt_svid: {audience: [document]}`) fetches a JWT-SVID from the
//! SPIRE agent and sends it beside its mTLS SVID; the document sidecar (`inbound.jwt_svid:
//! {audience: document}`) checks it against SPIRE's JWT bundle, and its policy lets
//! payment-service in only `via: both` identities. The app sees the call and not the token
//! (unless its sidecar says `forward: true`, and then it is the very token `spire-agent api
//! fetch jwt -audience document` prints for the payment uid). The contact service, whose
//! SPIRE token names another subject, is denied with PERMISSION_DENIED (7) / 403 naming the
//! rule that names it. A go-spiffe workload (`workloadapi.FetchJWTSVID` with its SPIRE
//! identity, then HTTPS with mTLS) is let through by the same inbound, and a token for
//! another audience is refused with the reason. (meshd's outbound with a SPIRE token to a
//! go-spiffe `jwtsvid.ParseAndValidate` server is tests/jwt_outbound.rs's
//! `real_spire_jwt_svid_reaches_a_gospiffe_server`.) Last, with 30-second JWT-SVIDs under a
//! steady load for longer than two token lifetimes, while SPIRE's JWT authority is rotated
//! (`spire-server localauthority jwt prepare`, then `activate` once the document sidecar
//! has the new key): not one call fails, and the app saw several tokens, from both keys.

mod common;
#[allow(dead_code)]
#[path = "jwt_inbound/harness.rs"]
mod harness;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use common::meshd::{free_port, wait_until, Sidecar};
use common::spire::Spire;
use harness::{echo_app, Caller};
use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The trust domain, as a SPIFFE ID prefix (the harness names it too).
const TD: &str = "spiffe://jia.app";
const PAYMENT: &str = "spiffe://jia.app/payment-service";
const CONTACT: &str = "spiffe://jia.app/contact-service";
const DOCUMENT: &str = "spiffe://jia.app/document-service";
/// SPIRE's uids (`spire/up.sh`).
const PAYMENT_UID: u32 = 20001;
const CONTACT_UID: u32 = 20003;
const DOCUMENT_UID: u32 = 20005;
/// The audience callers ask SPIRE for, and the document inbound wants.
const AUDIENCE: &str = "document";

/// The document service's policy: payment-service with its mTLS SVID and its JWT-SVID
/// both; a contact-service token is refused by a rule of its own.
const POLICY: &str = r#"service: document-service
mode: enforce
default: deny
rules:
  - name: payment-reads-documents
    via: both
    from: ["spiffe://jia.app/payment-service"]
    to:
      http: [{paths: ["/documents/*"]}]
      grpc: ["document.v1.DocumentService/*"]
  - name: no-contact-tokens
    action: deny
    via: jwt
    from: ["spiffe://jia.app/contact-service"]
"#;

/// A document sidecar run as the document uid: an `http` inbound in front of `app` with
/// `inbound.jwt_svid` set to the given YAML flow map and [`POLICY`]. Returns it once it is
/// ready and follows SPIRE's JWT bundles, with its inbound port.
fn document_sidecar(
    dir: &Path,
    name: &str,
    spire: &Spire,
    app: SocketAddr,
    jwt_svid: &str,
) -> (Sidecar, u16) {
    let (admin, inbound) = (free_port(), free_port());
    let policy = dir.join("document-policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let yaml = format!(
        "service: document-service\nidentity:\n  workload_api: {socket}\n  expect: {DOCUMENT}\n\
         inbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {app}\n  protocol: http\n  \
         policy: {policy}\n  jwt_svid: {jwt_svid}\nadmin:\n  listen: 127.0.0.1:{admin}\n\
         log:\n  access: deny\n",
        socket = spire.agent_endpoint(),
        policy = policy.display(),
    );
    let sidecar = Sidecar::start_as(name, dir, &yaml, admin, Some(DOCUMENT_UID));
    sidecar.wait_ready();
    let following = wait_until(Duration::from_secs(20), || {
        jwt_bundles(&sidecar).0 == "following"
    });
    assert!(
        following,
        "{name}: no JWT bundles: {:?}",
        sidecar.get("/identity")
    );
    (sidecar, inbound)
}

/// A caller's sidecar run as `uid`, with one `http` outbound per document inbound, each
/// attaching a JWT-SVID for [`AUDIENCE`]; returns the outbound ports in the same order
/// (outbounds are named `documents-<i>`).
fn caller_sidecar(
    dir: &Path,
    service: &str,
    uid: u32,
    spire: &Spire,
    inbounds: &[u16],
) -> (Sidecar, Vec<u16>) {
    let admin = free_port();
    let mut yaml = format!(
        "service: {service}\nidentity:\n  workload_api: {}\n  expect: {TD}/{service}\noutbound:\n",
        spire.agent_endpoint()
    );
    let mut ports = Vec::new();
    for (i, inbound) in inbounds.iter().enumerate() {
        let port = free_port();
        ports.push(port);
        yaml += &format!(
            "  - name: documents-{i}\n    listen: 127.0.0.1:{port}\n    protocol: http\n    \
             endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: {DOCUMENT}\n    timeout: 5s\n    \
             jwt_svid: {{audience: [{AUDIENCE}]}}\n"
        );
    }
    yaml += &format!("admin:\n  listen: 127.0.0.1:{admin}\n");
    let sidecar = Sidecar::start_as(&format!("{service}-sidecar"), dir, &yaml, admin, Some(uid));
    sidecar.wait_ready();
    (sidecar, ports)
}

/// `/identity`'s `jwt_bundles`: its state and the key IDs of jia.app.
fn jwt_bundles(s: &Sidecar) -> (String, BTreeSet<String>) {
    let (_, body) = s.get("/identity");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let j = &v["jwt_bundles"];
    let kids = serde_json::from_value(j["trust_domains"]["jia.app"].clone()).unwrap_or_default();
    (j["state"].as_str().unwrap_or("").to_string(), kids)
}

/// The header and claims of a JWT, decoded without verification (only to compare).
fn decode(token: &str) -> (serde_json::Value, serde_json::Value) {
    let part = |i: usize| -> serde_json::Value {
        let text = token.split('.').nth(i).expect("a JWT has three parts");
        let bytes = B64.decode(text).expect("base64url");
        serde_json::from_slice(&bytes).expect("JSON")
    };
    (part(0), part(1))
}

/// The bearer token the echo app reports in `authorization=[Bearer …]`, if any.
fn forwarded_token(body: &str) -> Option<String> {
    let rest = body.split("authorization=[Bearer ").nth(1)?;
    Some(rest.split(']').next()?.to_string())
}

/// `spire-agent api fetch jwt -audience AUD` as `uid`: the JWT-SVID SPIRE hands that uid.
fn spire_agent_token(spire: &Spire, uid: u32, audience: &str) -> String {
    let uid = uid.to_string();
    let out = Command::new("setpriv")
        .args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
        .arg(spire.bin("spire-agent"))
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
        .arg(spire.agent_socket())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run spire-agent api fetch jwt");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "spire-agent api fetch jwt as {uid}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .skip_while(|l| !l.starts_with("token("))
        .nth(1)
        .map(|l| l.trim().to_string())
        .unwrap_or_else(|| panic!("no token printed: {text}"))
}

/// `meshd_jwt_svid_validations_total{result=RESULT}` of an inbound.
fn validations(s: &Sidecar, result: &str) -> f64 {
    s.metric(
        "meshd_jwt_svid_validations_total",
        &[&format!("result=\"{result}\"")],
    )
}

/// `meshd_jwt_svid_fetches_total{outbound=NAME,result="ok"}` of a caller.
fn fetches_ok(s: &Sidecar, outbound: &str) -> f64 {
    s.metric(
        "meshd_jwt_svid_fetches_total",
        &[&format!("outbound=\"{outbound}\""), "result=\"ok\""],
    )
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

// Story: payment's sidecar sends SPIRE's JWT-SVID for `document` with each call; the
// document sidecar checks it and its `via: both` rule lets payment in: the app answers
// and never sees the token; a second call reuses the token (one fetch). Behind a sidecar
// with `forward: true` the app gets the token, and it is the one SPIRE's CLI gets for the
// payment uid (sub payment-service, signed by a key the document sidecar holds). The
// contact service's SPIRE token is refused by the rule naming it: 7 over gRPC, 403 over
// HTTP, both naming `no-contact-tokens`. The counters say what happened.
#[test]
fn spire_jwt_svid_travels_from_payment_to_document() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let app = rt.block_on(echo_app());
    let jwt = format!("{{audience: {AUDIENCE}}}");
    let (document, strict) = document_sidecar(dir.path(), "document-sidecar", &spire, app, &jwt);
    let jwt = format!("{{audience: {AUDIENCE}, forward: true}}");
    let (forwarding, lenient) =
        document_sidecar(dir.path(), "document-fwd-sidecar", &spire, app, &jwt);
    let (payment, payment_out) = caller_sidecar(
        dir.path(),
        "payment-service",
        PAYMENT_UID,
        &spire,
        &[strict, lenient],
    );
    let (_contact, contact_out) = caller_sidecar(
        dir.path(),
        "contact-service",
        CONTACT_UID,
        &spire,
        &[strict],
    );

    let forwarded = rt.block_on(async {
        let mut to_document = Caller::connect(([127, 0, 0, 1], payment_out[0]).into()).await;
        for _ in 0..2 {
            let a = to_document.call("/documents/d1", None, false).await;
            assert_eq!(a.status, 200, "{a:?}");
            assert!(
                a.body.starts_with("/documents/d1 authorization=[] xfcc=[")
                    && a.body.contains("payment-service"),
                "the app sees payment's call and not the token: {a:?}"
            );
        }
        let mut to_forwarding = Caller::connect(([127, 0, 0, 1], payment_out[1]).into()).await;
        let a = to_forwarding.call("/documents/d2", None, false).await;
        assert_eq!(a.status, 200, "{a:?}");
        let token = forwarded_token(&a.body)
            .unwrap_or_else(|| panic!("forward: true hands the token to the app: {a:?}"));

        let mut contact = Caller::connect(([127, 0, 0, 1], contact_out[0]).into()).await;
        let g = contact
            .call("/document.v1.DocumentService/GetDocument", None, true)
            .await;
        assert_eq!(g.grpc_status.as_deref(), Some("7"), "{g:?}");
        assert_eq!(
            g.grpc_message, "denied by rule \"no-contact-tokens\"",
            "{g:?}"
        );
        let a = contact.call("/documents/d1", None, false).await;
        assert_eq!(a.status, 403, "{a:?}");
        assert!(
            a.body.contains("denied by rule \"no-contact-tokens\""),
            "{a:?}"
        );
        token
    });

    let spire_token = spire_agent_token(&spire, PAYMENT_UID, AUDIENCE);
    let (header, claims) = decode(&forwarded);
    assert_eq!(claims["sub"], PAYMENT, "{claims}");
    assert_eq!(claims["aud"], serde_json::json!([AUDIENCE]), "{claims}");
    assert_eq!(
        decode(&spire_token).1["sub"],
        claims["sub"],
        "SPIRE's CLI gets the subject the app saw"
    );
    assert_eq!(
        forwarded, spire_token,
        "the token is SPIRE's own (the agent hands both the one it cached)"
    );
    let kid = header["kid"].as_str().unwrap_or_default().to_string();
    assert!(
        jwt_bundles(&document).1.contains(&kid),
        "signed by a key of SPIRE's JWT bundle ({kid}): {:?}",
        document.get("/identity")
    );

    assert_eq!(validations(&document, "ok"), 4.0, "2 payment + 2 contact");
    assert_eq!(validations(&document, "missing"), 0.0);
    assert_eq!(validations(&forwarding, "ok"), 1.0);
    assert_eq!(
        fetches_ok(&payment, "documents-0"),
        1.0,
        "the token was reused"
    );
    assert_eq!(fetches_ok(&payment, "documents-1"), 1.0);
}

/// `gospiffe-peer jwt-client` as `uid`, from a copy of the peer in `dir` (the build cache
/// may sit where that uid cannot read): (exit ok, stdout + stderr).
fn gospiffe_jwt_client(
    dir: &Path,
    spire: &Spire,
    uid: u32,
    inbound: u16,
    audience: &str,
) -> (bool, String) {
    use std::os::unix::fs::PermissionsExt;
    let copy: PathBuf = dir.join("gospiffe-peer-jwt-client");
    if !copy.exists() {
        std::fs::copy(common::gospiffe::peer_bin(), &copy).expect("copy the gospiffe peer");
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = Command::new("setpriv")
        .args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".into(),
        ])
        .arg(&copy)
        .args(["jwt-client", "-socket", &spire.agent_endpoint()])
        .args(["-addr", &format!("127.0.0.1:{inbound}")])
        .args(["-server-id", DOCUMENT, "-audience", audience])
        .args(["-path", "/documents/d7"])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(std::process::Stdio::null())
        .output()
        .expect("run gospiffe-peer jwt-client");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

// Story: a Go service built on go-spiffe, attested by SPIRE as payment-service, fetches a
// JWT-SVID for `document` (`workloadapi.FetchJWTSVID`) and calls the document sidecar over
// HTTPS with mTLS: it gets 200 and the app's answer (no token in it). The same program as
// contact-service is denied 403 by the rule naming it, and payment's token for another
// audience is refused 401 naming the audience the inbound wants.
#[test]
fn gospiffe_client_with_a_spire_jwt_svid_reaches_the_document_sidecar() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let app = rt.block_on(echo_app());
    let jwt = format!("{{audience: {AUDIENCE}}}");
    let (document, inbound) = document_sidecar(dir.path(), "document-sidecar", &spire, app, &jwt);

    let (ok, text) = gospiffe_jwt_client(dir.path(), &spire, PAYMENT_UID, inbound, AUDIENCE);
    assert!(ok, "go-spiffe client refused:\n{text}");
    assert!(
        text.contains(&format!("jwt-svid {PAYMENT} {AUDIENCE}")),
        "{text}"
    );
    assert!(text.contains("status 200 HTTP/2.0"), "{text}");
    assert!(
        text.contains("/documents/d7 authorization=[] xfcc=["),
        "{text}"
    );

    let (ok, text) = gospiffe_jwt_client(dir.path(), &spire, CONTACT_UID, inbound, AUDIENCE);
    assert!(!ok, "contact-service got through:\n{text}");
    assert!(
        text.contains(&format!("jwt-svid {CONTACT} {AUDIENCE}")),
        "{text}"
    );
    assert!(
        text.contains("status 403") && text.contains("denied by rule \"no-contact-tokens\""),
        "{text}"
    );

    let (ok, text) = gospiffe_jwt_client(dir.path(), &spire, PAYMENT_UID, inbound, "contact");
    assert!(!ok, "a token for another audience got through:\n{text}");
    assert!(
        text.contains("status 401") && text.contains("does not contain `document`"),
        "{text}"
    );
    assert_eq!(validations(&document, "ok"), 2.0);
    assert_eq!(validations(&document, "audience"), 1.0);
}

/// Sets the JWT-SVID TTL of a reference entry (`spire-server entry update`), then waits
/// until the agent hands `uid` tokens of that lifetime.
fn set_jwt_svid_ttl(spire: &Spire, name: &str, uid: u32, secs: u64) {
    let id = format!("{TD}/{name}");
    let shown = spire.server_cli(&["entry", "show", "-spiffeID", &id, "-output", "json"]);
    let shown: serde_json::Value = serde_json::from_str(&shown).expect("entry show JSON");
    let entry = shown["entries"][0]["id"]
        .as_str()
        .unwrap_or_else(|| panic!("no entry for {id}: {shown}"))
        .to_string();
    let selector = format!("unix:uid:{uid}");
    let ttl = secs.to_string();
    spire.server_cli(&[
        "entry",
        "update",
        "-entryID",
        &entry,
        "-parentID",
        spire.agent_id(),
        "-spiffeID",
        &id,
        "-selector",
        &selector,
        "-jwtSVIDTTL",
        &ttl,
    ]);
    // A new audience each time: the agent answers a known one from its cache.
    let mut probe = 0;
    let served = wait_until(Duration::from_secs(30), || {
        probe += 1;
        let (_, claims) = decode(&spire_agent_token(
            spire,
            uid,
            &format!("ttl-probe-{probe}"),
        ));
        let life = claims["exp"]
            .as_u64()
            .unwrap_or(0)
            .saturating_sub(claims["iat"].as_u64().unwrap_or(0));
        life == secs
    });
    assert!(served, "the agent never issued {secs} s JWT-SVIDs to {uid}");
}

/// What the load saw.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
    /// Every distinct token the app was handed.
    tokens: Mutex<BTreeSet<String>>,
    /// The key ID of each of them.
    kids: Mutex<BTreeSet<String>>,
    /// Set when the load is over.
    stop: AtomicBool,
}

// Story: the payment entry's JWT-SVIDs live 30 s. Two callers send a steady ~35 calls a
// second through payment's sidecar to the document sidecar (`forward: true`, so the app
// sees each token) for 70 s, more than two token lifetimes. Meanwhile SPIRE's JWT
// authority is rotated: a new key is prepared, the document sidecar receives it in its
// bundle, then it is activated. Not one call fails; the app saw several tokens, signed by
// the old key and by the new one; the payment sidecar fetched more than once; the document
// sidecar validated every call.
#[test]
fn spire_jwt_svids_and_authority_rotate_under_load() {
    let spire = Spire::up();
    set_jwt_svid_ttl(&spire, "payment-service", PAYMENT_UID, 30);
    let dir = tempfile::tempdir().unwrap();
    let rt = runtime();
    let app = rt.block_on(echo_app());
    let jwt = format!("{{audience: {AUDIENCE}, forward: true}}");
    let (document, inbound) = document_sidecar(dir.path(), "document-sidecar", &spire, app, &jwt);
    let (payment, outbound) = caller_sidecar(
        dir.path(),
        "payment-service",
        PAYMENT_UID,
        &spire,
        &[inbound],
    );
    let (_, old_kids) = jwt_bundles(&document);

    let tally = Arc::new(Tally::default());
    // The load runs for 70 s and until a token of the new key went through (at most 150 s).
    let load_for = Duration::from_secs(70);
    let load_start = Instant::now();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let tally = tally.clone();
            let port = outbound[0];
            rt.spawn(async move {
                let mut caller = Caller::connect(([127, 0, 0, 1], port).into()).await;
                while !tally.stop.load(Ordering::Relaxed)
                    && load_start.elapsed() < Duration::from_secs(150)
                {
                    let a = caller.call("/documents/d1", None, false).await;
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    match forwarded_token(&a.body) {
                        Some(token) if a.status == 200 => {
                            let kid = decode(&token).0["kid"].as_str().unwrap_or("").to_string();
                            tally.kids.lock().unwrap().insert(kid);
                            tally.tokens.lock().unwrap().insert(token);
                        }
                        _ => {
                            tally.failed.fetch_add(1, Ordering::Relaxed);
                            eprintln!("failed call: {a:?}");
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect();

    // Rotate once the load has run on the first token for a while.
    let started = wait_until(Duration::from_secs(30), || {
        tally.sent.load(Ordering::Relaxed) > 200
    });
    assert!(started, "the load did not get going");
    let prepared = spire.server_cli(&["localauthority", "jwt", "prepare", "-output", "json"]);
    let prepared: serde_json::Value = serde_json::from_str(&prepared).expect("prepare JSON");
    let new_kid = prepared["prepared_authority"]["authority_id"]
        .as_str()
        .unwrap_or_else(|| panic!("no prepared authority: {prepared}"))
        .to_string();
    assert!(!old_kids.contains(&new_kid), "{new_kid} was there already");
    let published = wait_until(Duration::from_secs(30), || {
        jwt_bundles(&document).1.contains(&new_kid)
    });
    assert!(
        published,
        "the document sidecar never received the prepared key {new_kid}: {:?}",
        document.get("/identity")
    );
    spire.server_cli(&[
        "localauthority",
        "jwt",
        "activate",
        "-authorityID",
        &new_kid,
    ]);
    // The callers' token is refreshed at half its life: within 15 s one of the new key.
    let rotated = wait_until(Duration::from_secs(60), || {
        tally.kids.lock().unwrap().contains(&new_kid)
    });
    // Hold the load for its whole duration (more than two token lifetimes).
    std::thread::sleep(load_for.saturating_sub(load_start.elapsed()));
    tally.stop.store(true, Ordering::Relaxed);
    for w in workers {
        rt.block_on(w).expect("load worker");
    }
    let took = load_start.elapsed();

    let sent = tally.sent.load(Ordering::Relaxed);
    let failed = tally.failed.load(Ordering::Relaxed);
    let tokens = tally.tokens.lock().unwrap().len();
    let kids = tally.kids.lock().unwrap().clone();
    eprintln!(
        "rotation under load: {sent} calls in {took:?}, {failed} failed, {tokens} tokens, \
         keys {kids:?}"
    );
    assert_eq!(failed, 0, "{failed} of {sent} calls failed");
    assert!(
        rotated,
        "no token of the activated key {new_kid} in 60 s: {kids:?}"
    );
    assert!(sent > 500, "only {sent} calls were made");
    assert!(
        tokens >= 3,
        "70 s of 30 s tokens (refreshed at half their life) used only {tokens} token(s)"
    );
    assert!(
        kids.contains(&new_kid) && kids.iter().any(|k| old_kids.contains(k)),
        "tokens from the old key and the activated {new_kid} were used: {kids:?}"
    );
    assert!(
        fetches_ok(&payment, "documents-0") >= tokens as f64,
        "each token was a fetch"
    );
    assert_eq!(
        validations(&document, "ok"),
        sent as f64,
        "every call's token validated once"
    );
}
