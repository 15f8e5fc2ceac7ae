//! Authorization through real meshd processes: enforcement, the explain CLI and admin
//! `/authz` agree on a table of cases; a reload under load flips decisions atomically; a
//! bad edit keeps the last good policy; audit mode lets calls pass and counts them.

mod common;

use common::meshd::{free_port, http, wait_until, DemoApp, DevCa, Sidecar};
use meshd::pb::contact::contact_service_client::ContactServiceClient;
use meshd::pb::contact::{Contact, GetContactRequest, ListContactsRequest};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;

const POLICY: &str = r#"service: contact-service
mode: enforce
default: deny
rules:
  - name: payments-call-contact
    from: ["spiffe://jia.app/payment-service"]
    to:
      grpc: ["contact.v1.ContactService/*"]
  - name: ops-may-read
    from: ["spiffe://jia.app/ns/ops/*"]
    to:
      grpc: ["contact.v1.ContactService/GetContact", "contact.v1.ContactService/ListContacts"]
  - name: no-bob
    action: deny
    from: ["spiffe://jia.app/ns/ops/bob"]
  - name: health-from-mesh
    from: ["spiffe://jia.app/*"]
    to:
      grpc: ["grpc.health.v1.Health/Check"]
"#;

const IDS: [&str; 6] = [
    "payment-service",
    "api-gateway",
    "ns/ops/alice",
    "ns/ops/bob",
    "family-service",
    "contact-service",
];

const METHODS: [&str; 5] = [
    "contact.v1.ContactService/GetContact",
    "contact.v1.ContactService/ListContacts",
    "contact.v1.ContactService/UploadContacts",
    "contact.v1.ContactService/SyncContacts",
    "grpc.health.v1.Health/Check",
];

/// A contact sidecar with `policy_text`, and one caller sidecar per identity.
struct Mesh {
    dir: tempfile::TempDir,
    _ca: DevCa,
    _app: DemoApp,
    contact: Sidecar,
    policy: PathBuf,
    inbound: u16,
    /// (identity, outbound port, its sidecar)
    callers: Vec<(String, u16, Sidecar)>,
}

fn mesh(policy_text: &str, callers: &[&str]) -> Mesh {
    let dir = tempfile::tempdir().unwrap();
    let mut ids: Vec<&str> = callers.to_vec();
    if !ids.contains(&"contact-service") {
        ids.push("contact-service");
    }
    let ca = DevCa::start(dir.path(), &ids, "1h", &[]);
    let app = DemoApp::start("contact", &[]);
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, policy_text).unwrap();
    let inbound = free_port();
    let admin = free_port();
    let yaml = format!(
        "service: contact-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {}\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        ca.socket("contact-service"),
        app.addr,
        policy.display()
    );
    let contact = Sidecar::start("contact-sidecar", dir.path(), &yaml, admin);
    let mut out = Vec::new();
    for id in callers {
        let port = free_port();
        let admin = free_port();
        let yaml = format!(
            "service: caller\nidentity:\n  workload_api: {}\noutbound:\n  - name: contact-service\n    listen: 127.0.0.1:{port}\n    endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: spiffe://jia.app/contact-service\nadmin:\n  listen: 127.0.0.1:{admin}\n",
            ca.socket(id)
        );
        let name = id.replace('/', "-");
        out.push((
            id.to_string(),
            port,
            Sidecar::start(&name, dir.path(), &yaml, admin),
        ));
    }
    contact.wait_ready();
    for (_, _, s) in &out {
        s.wait_ready();
    }
    Mesh {
        dir,
        _ca: ca,
        _app: app,
        contact,
        policy,
        inbound,
        callers: out,
    }
}

async fn channel(port: u16) -> Channel {
    Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Calls `method` through the outbound port; Ok or the gRPC status.
async fn call(port: u16, method: &str) -> Result<(), tonic::Status> {
    let ch = channel(port).await;
    let mut c = ContactServiceClient::new(ch.clone());
    let one = || Contact::default();
    match method.rsplit('/').next().unwrap() {
        "GetContact" => c
            .get_contact(GetContactRequest::default())
            .await
            .map(|_| ()),
        "ListContacts" => {
            let mut s = c
                .list_contacts(ListContactsRequest {
                    count: 1,
                    payload_size: 1,
                })
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
        "UploadContacts" => c
            .upload_contacts(tokio_stream::iter(vec![one()]))
            .await
            .map(|_| ()),
        "SyncContacts" => {
            let mut s = c
                .sync_contacts(tokio_stream::iter(vec![one()]))
                .await?
                .into_inner();
            while s.message().await?.is_some() {}
            Ok(())
        }
        "Check" => tonic_health::pb::health_client::HealthClient::new(ch)
            .check(tonic_health::pb::HealthCheckRequest {
                service: String::new(),
            })
            .await
            .map(|_| ()),
        other => panic!("unknown method {other}"),
    }
}

fn explain_cli(policy: &Path, from: &str, grpc: &str) -> String {
    let out = Command::new(common::meshd::meshd_bin())
        .args(["policy", "explain", "--policy"])
        .arg(policy)
        .args(["--from", from, "--grpc", grpc])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// Story: 6 callers x 5 methods = 30 cases; what the sidecar enforces, what the CLI
// explains and what admin /authz answers agree on every one, deny beats allow, and a
// denied call names its rule.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enforcement_cli_and_admin_agree() {
    let m = mesh(POLICY, &IDS);
    let mut cases = 0;
    for (id, port, _) in &m.callers {
        let from = format!("spiffe://jia.app/{id}");
        for method in METHODS {
            let enforced = call(*port, method).await;
            let cli = explain_cli(&m.policy, &from, method);
            let (_, admin) = http(
                m.contact.admin,
                "GET",
                &format!("/authz?from={from}&grpc={method}&port={}", m.inbound),
            )
            .unwrap();
            let admin = admin.trim().to_string();
            match &enforced {
                Ok(()) => assert!(cli.starts_with("ALLOW"), "{from} {method}: {cli}"),
                Err(s) => {
                    assert_eq!(
                        s.code(),
                        tonic::Code::PermissionDenied,
                        "{from} {method}: {s:?}"
                    );
                    assert!(cli.starts_with("DENY"), "{from} {method}: {cli}");
                    let rule = cli
                        .split("rule=")
                        .nth(1)
                        .unwrap()
                        .split("  ")
                        .next()
                        .unwrap();
                    assert!(
                        s.message().contains(rule),
                        "{from} {method}: {} vs {cli}",
                        s.message()
                    );
                }
            }
            assert_eq!(cli, admin, "{from} {method}");
            cases += 1;
        }
    }
    assert_eq!(cases, 30);
    // Deny beats allow: bob is under ns/ops/* (allowed to read) but no-bob denies him.
    let bob = m.callers.iter().find(|c| c.0 == "ns/ops/bob").unwrap().1;
    let err = call(bob, METHODS[0]).await.unwrap_err();
    assert!(err.message().contains("no-bob"), "{}", err.message());
}

// Story: under steady load, the policy file is replaced to deny the caller: every
// request is decided by exactly the old or the new policy (OK, or denied by the new rule),
// none fails otherwise, and once a caller is denied it is never allowed again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_flips_atomically() {
    let m = mesh(POLICY, &["payment-service"]);
    let port = m.callers[0].1;
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (ok, denied) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut workers = Vec::new();
    for _ in 0..8 {
        let (stop, ok, denied) = (stop.clone(), ok.clone(), denied.clone());
        workers.push(tokio::spawn(async move {
            let mut c = ContactServiceClient::new(channel(port).await);
            let mut seen_deny = false;
            while !stop.load(Ordering::Relaxed) {
                match c.get_contact(GetContactRequest::default()).await {
                    Ok(_) => {
                        assert!(!seen_deny, "allowed again after the new policy denied");
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(s) => {
                        assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
                        assert!(s.message().contains("freeze"), "{}", s.message());
                        seen_deny = true;
                        denied.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    assert!(wait_until(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        > 200));
    let frozen = POLICY.replace(
        "rules:\n",
        "rules:\n  - name: freeze\n    action: deny\n    from: [\"spiffe://jia.app/payment-service\"]\n",
    );
    let tmp = m.dir.path().join("policy.yaml.new");
    std::fs::write(&tmp, frozen).unwrap();
    std::fs::rename(&tmp, &m.policy).unwrap();
    assert!(wait_until(Duration::from_secs(10), || denied
        .load(Ordering::Relaxed)
        > 200));
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        w.await.unwrap();
    }
}

// Story: an invalid edit is rejected (counted, logged with file:line:column) and the last
// good policy keeps enforcing; readiness is unchanged. SIGHUP re-reads the file too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_edit_keeps_the_last_good_policy() {
    let m = mesh(POLICY, &["payment-service"]);
    let port = m.callers[0].1;
    call(port, METHODS[0]).await.unwrap();
    std::fs::write(
        &m.policy,
        "service: contact-service\nrules:\n  - name: x\n    from: [\"spiffe://JIA.app/*\"]\n",
    )
    .unwrap();
    m.contact.proc.signal("HUP");
    assert!(wait_until(Duration::from_secs(10), || m
        .contact
        .metric("meshd_policy_reload_failures_total", &[])
        >= 1.0));
    assert!(
        m.contact
            .proc
            .wait_output("policy.yaml:4:", Duration::from_secs(5)),
        "{}",
        m.contact.proc.dump()
    );
    call(port, METHODS[0]).await.unwrap();
    assert_eq!(m.contact.get("/ready").0, 200);
}

// Story: in audit mode a call the policy would deny passes, and is logged and counted as
// would_deny.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_mode_passes_and_counts() {
    let m = mesh(
        &POLICY.replace("mode: enforce", "mode: audit"),
        &["api-gateway"],
    );
    call(m.callers[0].1, METHODS[0]).await.unwrap();
    assert!(
        m.contact.metric(
            "meshd_authz_decisions_total",
            &["decision=\"would_deny\"", "mode=\"audit\""]
        ) >= 1.0
    );
    assert!(m
        .contact
        .proc
        .wait_output("would_deny", Duration::from_secs(5)));
}
