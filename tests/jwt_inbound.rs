//! The inbound checks JWT-SVIDs (`inbound.jwt_svid`), with real sidecars and real callers.
//!
//! The story: the document service's sidecar wants, beside each caller's mTLS SVID, a
//! JWT-SVID for the audience `documents`. The payment service calls it through its own
//! sidecar's outbound with `authorization: Bearer <token>`: with a token fetched from the
//! dev CA's Workload API the call reaches the app, which never sees the header (unless the
//! inbound says `forward: true`). Every token that breaks a JWT-SVID rule (wrong audience,
//! expired, `alg: none`, HS256, signed by another trust domain's key, a `sub` that is not a
//! SPIFFE ID, an extra header field) and a missing one are refused with their reason: gRPC
//! UNAUTHENTICATED (16) in grpc-message, HTTP 401 with `www-authenticate`; and
//! `meshd_jwt_svid_validations_total{result}` counts each. Policy rules name the token's
//! subject with `via: jwt` (or both identities with `via: both`), and their denials name
//! the rule. With `require: false` a call without a token passes to the policy, where
//! rules naming the token do not match it. Then, against `meshd dev-ca` as a process, the
//! JWT authority rotates (SIGHUP) under a steady stream of calls, each with a token from
//! meshd's own Workload API client, and not one call fails; and a go-spiffe client
//! (`workloadapi.FetchJWTSVID`, then HTTPS with mTLS) is let through by its token.

mod common;
#[path = "jwt_inbound/harness.rs"]
mod harness;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use common::meshd::wait_until;
use common::meshd::DevCa as DevCaProc;
use harness::{caller_sidecar, compact, document_sidecar, echo_app, Caller};
use meshd::dev_ca::DevCa;
use meshd::identity::{JwtSvidSource, SpiffeId};
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio_util::sync::CancellationToken;

const TD: &str = "spiffe://jia.app";
const AUDIENCE: &str = "documents";

const POLICY: &str = r#"service: document-service
default: deny
rules:
  - name: payment-reads-by-mtls
    from: ["spiffe://jia.app/payment-service"]
    to: {http: [{paths: ["/read"]}], grpc: ["doc.v1.Docs/Get"]}
  - name: payment-writes-by-token
    via: jwt
    from: ["spiffe://jia.app/payment-service"]
    to: {http: [{paths: ["/write"]}]}
  - name: batch-purges-by-both
    via: both
    from: ["spiffe://jia.app/batch/*"]
    to: {http: [{paths: ["/purge"]}]}
  - name: no-intern-tokens
    action: deny
    via: jwt
    from: ["spiffe://jia.app/intern"]
"#;

fn id(path: &str) -> SpiffeId {
    meshd::config::parse_spiffe_id(&format!("{TD}/{path}")).unwrap()
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn every_broken_jwt_svid_is_refused_and_policy_names_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The dev CA in this process, so the test can sign tokens with its JWT key, and a
    // second trust domain whose JWT bundle jia.app trusts (federation).
    let ca = Arc::new(DevCa::new("jia.app").unwrap());
    let other = DevCa::new("other.example").unwrap();
    ca.set_federated_jwt("other.example", other.jwt_bundle());
    let sock = |name: &str| dir.path().join(format!("{}.sock", name.replace('/', "-")));
    let names = ["document-service", "payment-service", "batch/nightly"];
    let stop = CancellationToken::new();
    let identities = names.iter().map(|n| (id(n), sock(n))).collect();
    let serving = rt
        .block_on(
            ca.clone()
                .serve(identities, Duration::from_secs(300), stop.clone()),
        )
        .expect("dev CA serves");
    let socket = |name: &str| format!("unix://{}", sock(name).display());
    let app = rt.block_on(echo_app());

    let (strict, strict_port) = document_sidecar(
        dir.path(),
        "documents-strict",
        &socket("document-service"),
        app,
        &format!("{{audience: {AUDIENCE}}}"),
    );
    let (lenient, lenient_port) = document_sidecar(
        dir.path(),
        "documents-lenient",
        &socket("document-service"),
        app,
        &format!("{{audience: {AUDIENCE}, require: false, forward: true}}"),
    );
    let (_payment, payment_out) = caller_sidecar(
        dir.path(),
        "payment-service",
        &socket("payment-service"),
        &[strict_port, lenient_port],
    );
    let (_batch, batch_out) = caller_sidecar(
        dir.path(),
        "batch/nightly",
        &socket("batch/nightly"),
        &[strict_port],
    );

    // Every result series is there, at 0, with its HELP text, before the first call.
    let (_, metrics) = strict.get("/metrics");
    assert!(
        metrics.contains("# HELP meshd_jwt_svid_validations_total"),
        "{metrics}"
    );
    for result in [
        "ok",
        "missing",
        "audience",
        "expired",
        "algorithm",
        "unknown_key",
        "subject",
        "header_field",
        "bundles_unavailable",
    ] {
        let line = format!("meshd_jwt_svid_validations_total{{result=\"{result}\"}} 0");
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }

    rt.block_on(async {
        // A token from the dev CA's Workload API, fetched by meshd's own client.
        let source = JwtSvidSource::new(&socket("payment-service"), None, Duration::from_secs(10));
        let fetched = source.fetch(&[AUDIENCE.to_string()]).await.expect("fetch JWT-SVID");
        let good = fetched.token().to_string();
        let wrong_aud = source
            .fetch(&["contacts".to_string()])
            .await
            .expect("fetch JWT-SVID")
            .token()
            .to_string();
        let mut strict_caller = Caller::connect(([127, 0, 0, 1], payment_out[0]).into()).await;
        let mut lenient_caller = Caller::connect(([127, 0, 0, 1], payment_out[1]).into()).await;
        let mut batch_caller = Caller::connect(([127, 0, 0, 1], batch_out[0]).into()).await;

        // A valid token: the app answers, and never sees the header.
        let a = strict_caller.call("/write", Some(&good), false).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.body.starts_with("/write authorization=[] xfcc=["), "{a:?}");
        assert!(a.body.contains("payment-service"), "{a:?}");
        let mut counted: BTreeMap<&str, u64> = BTreeMap::from([("ok", 1)]);

        // Every JWT-SVID rule broken once: refused with its reason, over HTTP and gRPC.
        let payment = format!("{TD}/payment-service");
        let kid = ca.jwt_key_id();
        let std_header = json!({"alg": "ES256", "kid": kid, "typ": "JWT"});
        let claims = |sub: &str, exp: u64| json!({"sub": sub, "aud": [AUDIENCE], "exp": exp, "iat": now_secs()});
        let later = now_secs() + 300;
        let hs256 = {
            let header = json!({"alg": "HS256", "typ": "JWT"});
            let input = format!("{}.{}", B64.encode(header.to_string()), B64.encode(claims(&payment, later).to_string()));
            let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, kid.as_bytes());
            let tag = ring::hmac::sign(&key, input.as_bytes());
            format!("{input}.{}", B64.encode(tag.as_ref()))
        };
        let broken: Vec<(&str, Option<String>, &str)> = vec![
            ("missing", None, "JWT-SVID required"),
            ("audience", Some(wrong_aud.clone()), "does not contain `documents`"),
            (
                "expired",
                Some(ca.sign_jwt_custom(&std_header, &claims(&payment, now_secs() - 120)).unwrap()),
                "token expired",
            ),
            (
                "algorithm",
                Some(compact(&json!({"alg": "none", "typ": "JWT"}), &claims(&payment, later), b"")),
                "algorithm `none` is not allowed",
            ),
            ("algorithm", Some(hs256), "algorithm `HS256` is not allowed"),
            (
                "unknown_key",
                Some(
                    other
                        .sign_jwt_custom(
                            &json!({"alg": "ES256", "kid": other.jwt_key_id(), "typ": "JWT"}),
                            &claims(&payment, later),
                        )
                        .unwrap(),
                ),
                "in the JWT bundle of jia.app",
            ),
            (
                "subject",
                Some(ca.sign_jwt_custom(&std_header, &claims("payment-service", later)).unwrap()),
                "subject is not a SPIFFE ID",
            ),
            (
                "header_field",
                Some(
                    ca.sign_jwt_custom(
                        &json!({"alg": "ES256", "kid": kid, "typ": "JWT", "jku": "https://keys.example/"}),
                        &claims(&payment, later),
                    )
                    .unwrap(),
                ),
                "header field `jku` is not allowed",
            ),
        ];
        for (label, token, reason) in &broken {
            let a = strict_caller.call("/write", token.as_deref(), false).await;
            assert_eq!(a.status, 401, "{label}: {a:?}");
            assert!(a.body.contains(reason), "{label}: want {reason:?} in {a:?}");
            assert_eq!(a.www_authenticate, "Bearer error=\"invalid_token\"", "{label}");
            let g = strict_caller.call("/doc.v1.Docs/Get", token.as_deref(), true).await;
            assert_eq!(g.grpc_status.as_deref(), Some("16"), "{label}: {g:?}");
            assert!(g.grpc_message.contains(reason), "{label}: want {reason:?} in {g:?}");
            assert!(!g.grpc_message.contains("eyJ"), "the token is never echoed: {g:?}");
            *counted.entry(label).or_default() += 2;
        }
        // A bad token is refused even where tokens are optional.
        let a = lenient_caller.call("/read", Some(&wrong_aud), false).await;
        assert_eq!(a.status, 401, "{a:?}");

        // Policy: the token's subject, the peer, or each of them.
        let intern = ca.sign_jwt_svid(&id("intern"), &[AUDIENCE.into()], Duration::from_secs(300)).unwrap();
        let batch_token = ca.sign_jwt_svid(&id("batch/nightly"), &[AUDIENCE.into()], Duration::from_secs(300)).unwrap();
        let checks: [(&str, &str, &str, u16, &str); 7] = [
            // (caller, token, path, status, what the answer says)
            ("payment", "payment", "/read", 200, "/read authorization=[]"),
            ("payment", "batch", "/write", 403, "denied by default deny"),
            ("payment", "batch", "/purge", 403, "denied by default deny"),
            ("payment", "intern", "/read", 403, "denied by rule \"no-intern-tokens\""),
            ("batch", "batch", "/purge", 200, "/purge authorization=[]"),
            ("batch", "payment", "/purge", 403, "denied by default deny"),
            ("batch", "payment", "/write", 200, "/write authorization=[]"),
        ];
        for (who, token, path, status, says) in checks {
            let token = match token {
                "payment" => &good,
                "batch" => &batch_token,
                _ => &intern,
            };
            let caller = if who == "payment" { &mut strict_caller } else { &mut batch_caller };
            let a = caller.call(path, Some(token), false).await;
            assert_eq!(a.status, status, "{who} {path}: {a:?}");
            assert!(a.body.contains(says), "{who} {path}: want {says:?} in {a:?}");
            *counted.entry("ok").or_default() += 1;
        }
        let g = strict_caller.call("/doc.v1.Docs/Get", Some(&intern), true).await;
        assert_eq!(g.grpc_status.as_deref(), Some("7"), "{g:?}");
        assert_eq!(g.grpc_message, "denied by rule \"no-intern-tokens\"", "{g:?}");
        *counted.entry("ok").or_default() += 1;

        // require: false: no token passes to the policy, whose token rules do not match;
        // forward: true hands the header to the app.
        let a = lenient_caller.call("/read", None, false).await;
        assert_eq!(a.status, 200, "{a:?}");
        let a = lenient_caller.call("/write", None, false).await;
        assert_eq!((a.status, a.body.trim()), (403, "denied by default deny"), "{a:?}");
        let a = lenient_caller.call("/write", Some(&good), false).await;
        assert_eq!(a.status, 200, "{a:?}");
        assert!(a.body.starts_with(&format!("/write authorization=[Bearer {good}]")), "{a:?}");

        // The counters say exactly what happened.
        for result in ["ok", "missing", "audience", "expired", "algorithm", "unknown_key", "subject", "header_field", "signature"] {
            let want = counted.get(result).copied().unwrap_or(0) as f64;
            let got = strict.metric("meshd_jwt_svid_validations_total", &[&format!("result=\"{result}\"")]);
            assert_eq!(got, want, "strict {result}");
        }
        let lenient_counts = [("ok", 1.0), ("missing", 2.0), ("audience", 1.0)];
        for (result, want) in lenient_counts {
            let got = lenient.metric("meshd_jwt_svid_validations_total", &[&format!("result=\"{result}\"")]);
            assert_eq!(got, want, "lenient {result}");
        }
    });
    stop.cancel();
    rt.block_on(serving.finished());
}

/// Counts of a load run.
#[derive(Default)]
struct Tally {
    sent: AtomicU64,
    failed: AtomicU64,
}

#[test]
fn jwt_authority_rotation_under_load_and_a_go_spiffe_client() {
    let dir = tempfile::tempdir().unwrap();
    let peer = common::gospiffe::peer_bin();
    // `meshd dev-ca` as a process: SIGHUP rotates its JWT authority (and every SVID).
    let ca = DevCaProc::start(
        dir.path(),
        &["document-service", "payment-service"],
        "20s",
        &[],
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let app = rt.block_on(echo_app());
    let (documents, inbound) = document_sidecar(
        dir.path(),
        "documents",
        &ca.socket("document-service"),
        app,
        &format!("{{audience: {AUDIENCE}}}"),
    );
    let (_payment, outbound) = caller_sidecar(
        dir.path(),
        "payment-service",
        &ca.socket("payment-service"),
        &[inbound],
    );
    // The inbound's JWT keys of jia.app, as `/identity` shows them.
    let key_ids = || {
        let (_, body) = documents.get("/identity");
        let view: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        view["jwt_bundles"]["trust_domains"]["jia.app"].to_string()
    };

    // Two callers, each taking its token from meshd's Workload API client for every
    // call (cached until half its 20 s life, then fetched again), for 12 s, while the
    // JWT authority rotates three times.
    let tally = Arc::new(Tally::default());
    let source = Arc::new(JwtSvidSource::new(
        &ca.socket("payment-service"),
        None,
        Duration::from_secs(10),
    ));
    let kids = Arc::new(std::sync::Mutex::new(std::collections::BTreeSet::new()));
    let load_for = Duration::from_secs(12);
    let workers: Vec<_> = (0..2)
        .map(|_| {
            let (tally, source, kids) = (tally.clone(), source.clone(), kids.clone());
            let outbound = outbound[0];
            rt.spawn(async move {
                let mut caller = Caller::connect(([127, 0, 0, 1], outbound).into()).await;
                let start = Instant::now();
                while start.elapsed() < load_for {
                    let token = source
                        .fetch(&[AUDIENCE.to_string()])
                        .await
                        .expect("fetch JWT-SVID");
                    kids.lock().unwrap().insert(token.key_id().to_string());
                    let a = caller.call("/write", Some(token.token()), false).await;
                    tally.sent.fetch_add(1, Ordering::Relaxed);
                    if a.status != 200 {
                        tally.failed.fetch_add(1, Ordering::Relaxed);
                        eprintln!("failed call: {a:?}");
                    }
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    let mut seen = vec![key_ids()];
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(3));
        ca.proc.signal("HUP");
        let before = seen.last().unwrap().clone();
        let moved = wait_until(Duration::from_secs(5), || key_ids() != before);
        assert!(
            moved,
            "the sidecar never saw the rotated JWT bundle:\n{before}"
        );
        seen.push(key_ids());
    }
    for w in workers {
        rt.block_on(w).expect("load worker");
    }
    let (sent, failed) = (
        tally.sent.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed),
    );
    assert!(sent > 100, "only {sent} calls were made");
    assert_eq!(
        failed, 0,
        "{failed} of {sent} calls failed across the rotations"
    );
    let kids = kids.lock().unwrap().len();
    assert!(
        kids >= 2,
        "every token came from one key: the load never used a rotated key"
    );
    let ok = documents.metric("meshd_jwt_svid_validations_total", &["result=\"ok\""]);
    assert_eq!(ok, sent as f64, "every call's token validated once");
    eprintln!("rotation under load: {sent} calls, 0 failed, tokens from {kids} keys");

    // A go-spiffe client: FetchJWTSVID, then HTTPS with mTLS straight to the inbound.
    let run = |audience: &str| {
        let mut cmd = std::process::Command::new(&peer);
        cmd.args([
            "jwt-client",
            "-socket",
            &ca.socket("payment-service"),
            "-addr",
            &format!("127.0.0.1:{inbound}"),
            "-server-id",
            &format!("{TD}/document-service"),
            "-audience",
            audience,
            "-path",
            "/write",
        ])
        .env_remove("SPIFFE_ENDPOINT_SOCKET")
        .stdin(std::process::Stdio::null());
        let out = cmd.output().expect("run gospiffe-peer jwt-client");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let (ok, text) = run(AUDIENCE);
    assert!(ok, "go-spiffe client refused:\n{text}");
    assert!(
        text.contains(&format!("jwt-svid {TD}/payment-service documents")),
        "{text}"
    );
    assert!(text.contains("status 200 HTTP/2.0"), "{text}");
    assert!(text.contains("/write authorization=[] xfcc=["), "{text}");
    let (ok, text) = run("contacts");
    assert!(!ok, "a token for another audience got through:\n{text}");
    assert!(
        text.contains("status 401") && text.contains("does not contain `documents`"),
        "{text}"
    );
    drop(ca);
}
