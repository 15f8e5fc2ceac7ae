//! JWT-SVIDs through the Workload API, with real peers. SPIRE's own client (`spire-agent
//! api fetch jwt`, `api validate jwt`) reads a JWT-SVID and the JWT bundles from `meshd
//! dev-ca`, and the token verifies against the printed bundle by the JWT-SVID rules; a
//! sidecar shows its JWT bundles (trust domains and key IDs) at `/identity` and follows a
//! rotation of the dev CA's JWT authority (SIGHUP); and against a real SPIRE, meshd's own
//! client fetches a JWT-SVID and follows the JWT bundles, and SPIRE's tokens validate with
//! meshd's validator against the keys meshd received.

mod common;

use common::meshd::{free_port, wait_until, DevCa, Sidecar};
use common::spire::Spire;
use meshd::identity::{
    follow_jwt_bundles, validate_jwt_svid, JwtBundle, JwtBundles, JwtBundlesStatus, JwtStreamState,
    JwtSvidSource, SpiffeId,
};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime};

const PAYMENT: &str = "spiffe://jia.app/payment-service";

/// What `spire-agent api fetch jwt` printed: tokens by SPIFFE ID, JWK Sets by trust domain ID.
#[derive(Debug, Default)]
struct Fetched {
    tokens: BTreeMap<String, String>,
    bundles: BTreeMap<String, String>,
}

/// Reads `token(<id>):\n\t<jwt>` and `bundle(<td id>):\n\t<jwks>` blocks.
fn parse_fetch_jwt(text: &str) -> Fetched {
    let mut out = Fetched::default();
    let mut current: Option<(bool, String, String)> = None;
    let flush = |c: Option<(bool, String, String)>, out: &mut Fetched| {
        if let Some((is_token, key, body)) = c {
            let body = body.trim().to_string();
            if is_token {
                out.tokens.insert(key, body);
            } else {
                out.bundles.insert(key, body);
            }
        }
    };
    for line in text.lines() {
        let head = |p: &str| {
            line.strip_prefix(p)
                .and_then(|r| r.strip_suffix("):"))
                .map(String::from)
        };
        if let Some(id) = head("token(") {
            flush(current.take(), &mut out);
            current = Some((true, id, String::new()));
        } else if let Some(td) = head("bundle(") {
            flush(current.take(), &mut out);
            current = Some((false, td, String::new()));
        } else if let Some((_, _, body)) = current.as_mut() {
            body.push_str(line);
            body.push('\n');
        }
    }
    flush(current.take(), &mut out);
    out
}

/// Runs `spire-agent api <args> -socketPath <socket>` (as `uid` when given).
fn spire_agent_api(socket: &Path, args: &[&str], uid: Option<u32>) -> (bool, String) {
    let agent = common::spire::installed_bin("spire-agent");
    let mut cmd = match uid {
        Some(uid) => {
            let mut c = Command::new("setpriv");
            let uid = uid.to_string();
            c.args(["--reuid", &uid, "--regid", &uid, "--clear-groups"])
                .arg(&agent);
            c
        }
        None => Command::new(&agent),
    };
    let out = cmd
        .arg("api")
        .args(args)
        .args(["-timeout", "10s", "-socketPath"])
        .arg(socket)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", agent.display()));
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The JWT bundles as printed, keyed by trust domain name.
fn bundles_of(f: &Fetched) -> JwtBundles {
    let mut all = JwtBundles::default();
    for (td_id, jwks) in &f.bundles {
        let td = td_id.trim_start_matches("spiffe://");
        let bundle = JwtBundle::from_jwks(td, jwks.as_bytes())
            .unwrap_or_else(|e| panic!("bundle {td_id} as printed: {e}\n{jwks}"));
        all.domains.insert(td.to_string(), bundle);
    }
    all
}

/// `/identity`'s `jwt_bundles.trust_domains`: key IDs per trust domain.
fn jwt_kids(s: &Sidecar) -> (String, BTreeMap<String, Vec<String>>) {
    let (_, body) = s.get("/identity");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    let j = &v["jwt_bundles"];
    let kids = serde_json::from_value(j["trust_domains"].clone()).unwrap_or_default();
    (j["state"].as_str().unwrap_or("").to_string(), kids)
}

fn sidecar(dir: &Path, socket: &str, uid: Option<u32>) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        "service: payment-service\nidentity:\n  workload_api: {socket}\n  expect: {PAYMENT}\nadmin:\n  listen: 127.0.0.1:{admin}\n"
    );
    Sidecar::start_as("payment-service", dir, &yaml, admin, uid)
}

// Story: SPIRE's own CLI asks the dev CA's payment socket for a JWT-SVID for `documents`:
// it gets one whose `sub` is the socket's identity, plus the JWT bundles of jia.app and the
// federated partner.example; the token verifies against the printed jia.app bundle, and
// SPIRE's `api validate jwt` has the dev CA accept it for `documents` and refuse it for
// `contacts`.
#[test]
fn spire_agent_fetches_and_validates_a_dev_ca_jwt_svid() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service"],
        "1h",
        &["--federate", "partner.example"],
    );
    let socket = ca.socket("payment-service");
    let socket = Path::new(socket.trim_start_matches("unix://"));
    let (ok, text) = spire_agent_api(socket, &["fetch", "jwt", "-audience", "documents"], None);
    assert!(ok, "spire-agent api fetch jwt: {text}");
    let fetched = parse_fetch_jwt(&text);
    let token = fetched
        .tokens
        .get(PAYMENT)
        .unwrap_or_else(|| panic!("no token for {PAYMENT}: {text}"));
    let ids: Vec<&String> = fetched.bundles.keys().collect();
    assert_eq!(
        ids,
        ["spiffe://jia.app", "spiffe://partner.example"],
        "{text}"
    );
    let bundles = bundles_of(&fetched);
    let jwks: serde_json::Value =
        serde_json::from_str(&fetched.bundles["spiffe://jia.app"]).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid", "{jwks}");
    let valid = validate_jwt_svid(token, "documents", &bundles, SystemTime::now())
        .unwrap_or_else(|e| panic!("the dev CA's token does not verify: {e}"));
    assert_eq!(valid.id.to_string(), PAYMENT);
    assert_eq!(valid.audience, ["documents"]);

    let (ok, text) = spire_agent_api(
        socket,
        &["validate", "jwt", "-audience", "documents", "-svid", token],
        None,
    );
    assert!(
        ok && text.contains("SVID is valid") && text.contains(PAYMENT),
        "{text}"
    );
    let (ok, text) = spire_agent_api(
        socket,
        &["validate", "jwt", "-audience", "contacts", "-svid", token],
        None,
    );
    assert!(
        !ok && text.contains("audience"),
        "a wrong audience must fail: {text}"
    );
}

// Story: a sidecar on the dev CA shows its JWT bundle at /identity (state following, the
// jia.app key ID). A token is issued, then the operator rotates with SIGHUP: /identity
// shows the new key ID beside the old one, which stays while its token is valid.
#[test]
fn identity_shows_jwt_bundles_and_follows_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["payment-service"], "1h", &[]);
    let s = sidecar(dir.path(), &ca.socket("payment-service"), None);
    s.wait_ready();
    let following = wait_until(Duration::from_secs(10), || jwt_kids(&s).0 == "following");
    assert!(following, "{:?}", s.get("/identity"));
    let (_, before) = jwt_kids(&s);
    let first = before.get("jia.app").cloned().unwrap_or_default();
    assert_eq!(first.len(), 1, "{before:?}");
    let socket = ca.socket("payment-service");
    let socket = Path::new(socket.trim_start_matches("unix://"));
    let (ok, text) = spire_agent_api(socket, &["fetch", "jwt", "-audience", "documents"], None);
    assert!(ok, "{text}");
    ca.proc.signal("HUP");
    let rotated = wait_until(Duration::from_secs(10), || {
        jwt_kids(&s).1.get("jia.app").is_some_and(|k| k.len() == 2)
    });
    let (_, after) = jwt_kids(&s);
    assert!(rotated, "no rotation seen: {after:?}");
    assert!(
        after["jia.app"].contains(&first[0]),
        "the old key is kept: {after:?}"
    );
    let (ok, text) = spire_agent_api(socket, &["fetch", "jwt", "-audience", "documents"], None);
    assert!(ok, "{text}");
    let new = bundles_of(&parse_fetch_jwt(&text));
    assert_eq!(
        new.domains["jia.app"].key_ids(),
        after["jia.app"],
        "meshd shows what the CA serves"
    );
}

// Story: against a real SPIRE, the payment sidecar (uid 20001) shows SPIRE's JWT key IDs
// at /identity, the same SPIRE's CLI prints; a JWT-SVID SPIRE issues to the payment uid
// validates with meshd's validator; and meshd's own client, registered as this test's
// uid, fetches a JWT-SVID (cached) and follows the JWT bundles, which verify it.
#[test]
fn real_spire_jwt_svids_and_bundles() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let s = sidecar(dir.path(), &spire.agent_endpoint(), Some(20001));
    s.wait_ready();
    let following = wait_until(Duration::from_secs(15), || jwt_kids(&s).0 == "following");
    assert!(following, "{:?}", s.get("/identity"));
    let (ok, text) = spire_agent_api(
        &spire.agent_socket(),
        &["fetch", "jwt", "-audience", "documents"],
        Some(20001),
    );
    assert!(ok, "spire-agent api fetch jwt as 20001: {text}");
    let fetched = parse_fetch_jwt(&text);
    let bundles = bundles_of(&fetched);
    assert_eq!(
        jwt_kids(&s).1.get("jia.app"),
        Some(&bundles.domains["jia.app"].key_ids()),
        "meshd's JWT key IDs are SPIRE's"
    );
    let token = &fetched.tokens[PAYMENT];
    let valid = validate_jwt_svid(token, "documents", &bundles, SystemTime::now()).unwrap();
    assert_eq!(valid.id.to_string(), PAYMENT);

    let me = format!("spiffe://jia.app/jwt-test-{}", std::process::id());
    let uid = unsafe_free_getuid();
    spire.create_entry(&me, uid, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let id = SpiffeId::new(&me).unwrap();
        let source = JwtSvidSource::new(
            &spire.agent_endpoint(),
            Some(id.clone()),
            Duration::from_secs(30),
        );
        let aud = vec!["documents".to_string()];
        let t1 = source
            .fetch(&aud)
            .await
            .expect("meshd fetches a JWT-SVID from SPIRE");
        assert_eq!(t1.spiffe_id(), &id);
        let t2 = source.fetch(&aud).await.unwrap();
        assert_eq!(t1.token(), t2.token(), "cached until half its lifetime");
        let (tx, mut rx) = tokio::sync::watch::channel(JwtBundlesStatus::waiting());
        let stop = tokio_util::sync::CancellationToken::new();
        tokio::spawn(follow_jwt_bundles(spire.agent_endpoint(), tx, stop.clone()));
        let status = tokio::time::timeout(
            Duration::from_secs(15),
            rx.wait_for(|s| s.state == JwtStreamState::Following),
        )
        .await
        .expect("JWT bundles from SPIRE in time")
        .unwrap()
        .clone();
        let received = status.bundles.expect("bundles");
        let v = validate_jwt_svid(t1.token(), "documents", &received, SystemTime::now()).unwrap();
        assert_eq!(v.id, id);
        let (sub, _) = source.validate("documents", t1.token()).await.unwrap();
        assert_eq!(sub, id, "SPIRE's ValidateJWTSVID agrees");
        stop.cancel();
    });
}

/// This process's uid, read from /proc (std has no getuid).
fn unsafe_free_getuid() -> u32 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|u| u.parse().ok())
        .expect("Uid in /proc/self/status")
}
