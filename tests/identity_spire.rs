//! Identity from a real SPIRE server and agent (spire/up.sh): meshd runs as the uid a
//! registration entry selects and gets its X.509-SVID through the Workload API, follows
//! rotations and an agent restart, and refuses what it must refuse.

mod common;

use common::meshd::{free_port, wait_until, Sidecar};
use common::spire::Spire;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn sidecar(spire: &Spire, dir: &Path, name: &str, uid: u32, expect: Option<&str>) -> Sidecar {
    let admin = free_port();
    let expect = expect
        .map(|e| format!("\n  expect: {e}"))
        .unwrap_or_default();
    let yaml = format!(
        "service: {name}\nidentity:\n  workload_api: {}{expect}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        spire.agent_endpoint()
    );
    Sidecar::start_as(name, dir, &yaml, admin, Some(uid))
}

fn identity(s: &Sidecar) -> serde_json::Value {
    serde_json::from_str(&s.get("/identity").1).unwrap_or_default()
}

fn serial(s: &Sidecar) -> String {
    identity(s)["serial"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Polls until the serial differs from `old`, asserting `/ready` stays 200 meanwhile.
fn wait_rotation(s: &Sidecar, old: &str, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (code, body) = s.get("/ready");
        assert_eq!(code, 200, "not ready while waiting for a rotation: {body}");
        let now = serial(s);
        if !now.is_empty() && now != old {
            return now;
        }
        assert!(Instant::now() < deadline, "no rotation within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// Story: with 30 s SVIDs from SPIRE the sidecar turns ready, rotates with no moment
// without a valid SVID, survives the agent stopping (cached SVID) and picks up the next
// rotation once the agent is back.
#[test]
fn spire_svid_rotation_and_agent_restart() {
    let spire = Spire::up_with_svid_ttl(30);
    let dir = tempfile::tempdir().unwrap();
    let s = sidecar(&spire, dir.path(), "payment-service", 20001, None);
    s.wait_ready();
    assert_eq!(
        identity(&s)["spiffe_id"],
        "spiffe://jia.app/payment-service"
    );
    assert!(identity(&s)["trust_domains"]
        .to_string()
        .contains("jia.app"));
    let first = serial(&s);
    let second = wait_rotation(&s, &first, Duration::from_secs(40));

    spire.stop_agent();
    // The cached SVID keeps the sidecar ready while the agent is away.
    for _ in 0..20 {
        assert_eq!(s.get("/ready").0, 200);
        std::thread::sleep(Duration::from_millis(100));
    }
    spire.start_agent();
    let third = wait_rotation(&s, &second, Duration::from_secs(40));
    assert_ne!(third, first);
    assert!(s.metric("meshd_svid_rotations_total", &[]) >= 2.0);
}

// Story: a workload with no entry stays not ready and the reason says no identity was
// issued; an SVID with another ID than `expect` is refused naming both; a federated
// bundle set in SPIRE reaches the sidecar's bundle set.
#[test]
fn spire_no_entry_mismatch_and_federation() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();

    let nobody = sidecar(&spire, dir.path(), "nobody", 20099, None);
    let said = wait_until(Duration::from_secs(15), || {
        let (code, body) = nobody.get("/ready");
        code == 503 && body.contains("no identity")
    });
    assert!(said, "{:?}\n{}", nobody.get("/ready"), nobody.proc.dump());

    let wrong = sidecar(
        &spire,
        dir.path(),
        "contact-as-payment",
        20003,
        Some("spiffe://jia.app/payment-service"),
    );
    let named = wait_until(Duration::from_secs(15), || {
        let (code, body) = wrong.get("/ready");
        code == 503
            && body.contains("spiffe://jia.app/contact-service")
            && body.contains("spiffe://jia.app/payment-service")
    });
    assert!(named, "{:?}", wrong.get("/ready"));

    // A partner CA, federated with an entry of its own.
    let ca = dir.path().join("partner-ca.pem");
    let key = dir.path().join("partner-key.pem");
    let ok = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args(["-subj", "/CN=partner", "-days", "1"])
        .args(["-addext", "subjectAltName=URI:spiffe://partner.example"])
        .args(["-addext", "basicConstraints=critical,CA:TRUE"])
        .args(["-addext", "keyUsage=critical,keyCertSign,cRLSign"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&ca)
        .output()
        .expect("openssl is needed (Debian package openssl; tests/run.sh installs it)");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    spire.bundle_set("partner.example", &std::fs::read_to_string(&ca).unwrap());
    spire.server_cli(&[
        "entry",
        "create",
        "-parentID",
        spire.agent_id(),
        "-spiffeID",
        "spiffe://jia.app/federated-workload",
        "-selector",
        "unix:uid:20007",
        "-federatesWith",
        "spiffe://partner.example",
    ]);
    spire.wait_served(
        20007,
        "spiffe://jia.app/federated-workload",
        Duration::from_secs(30),
    );
    let fed = sidecar(&spire, dir.path(), "federated", 20007, None);
    fed.wait_ready();
    let tds = wait_until(Duration::from_secs(15), || {
        identity(&fed)["trust_domains"]
            .to_string()
            .contains("partner.example")
    });
    assert!(tds, "{}", identity(&fed));
}

// Story: both sidecars take their identities from SPIRE (run as the uids registered for
// payment-service and contact-service); the payment sidecar's call reaches the contact
// app over mTLS and the app sees the payment-service SPIFFE ID.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spire_identities_carry_a_call_through_two_sidecars() {
    use meshd::pb::contact::contact_service_client::ContactServiceClient;
    use meshd::pb::contact::GetContactRequest;
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let app = common::meshd::DemoApp::start("contact", &[]);
    let inbound = free_port();
    let admin = free_port();
    // A copy the sidecar's uid can read wherever the checkout is.
    let policy = dir.path().join("contact-policy.yaml");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/contact-service.yaml"),
        &policy,
    )
    .unwrap();
    let contact = Sidecar::start_as(
        "contact-sidecar",
        dir.path(),
        &format!(
            "service: contact-service\nidentity:\n  workload_api: {}\n  expect: spiffe://jia.app/contact-service\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {}\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
            spire.agent_endpoint(),
            app.addr,
            policy.display()
        ),
        admin,
        Some(20003),
    );
    let outbound = free_port();
    let admin2 = free_port();
    let payment = Sidecar::start_as(
        "payment-sidecar",
        dir.path(),
        &format!(
            "service: payment-service\nidentity:\n  workload_api: {}\noutbound:\n  - name: contact-service\n    listen: 127.0.0.1:{outbound}\n    endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: spiffe://jia.app/contact-service\nadmin:\n  listen: 127.0.0.1:{admin2}\n",
            spire.agent_endpoint()
        ),
        admin2,
        Some(20001),
    );
    contact.wait_ready();
    payment.wait_ready();
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{outbound}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let r = ContactServiceClient::new(ch)
        .get_contact(GetContactRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.seen_caller, "spiffe://jia.app/payment-service");
}
