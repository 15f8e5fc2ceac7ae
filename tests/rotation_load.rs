//! SVIDs rotating every two seconds under steady load: no request may fail. Runs alone
//! in its own test binary so the load is not shared with other tests.

mod common;

use common::meshd::{free_port, DemoApp, DevCa, Sidecar};
use meshd::pb::contact::contact_service_client::ContactServiceClient;
use meshd::pb::contact::GetContactRequest;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tonic::transport::Channel;

fn client_sidecar(dir: &Path, ca: &DevCa, name: &str, outbound: u16, inbound: u16) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        "service: payment-service\nidentity:\n  workload_api: {}\noutbound:\n  - name: contact-service\n    listen: 127.0.0.1:{outbound}\n    endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: spiffe://jia.app/contact-service\nadmin:\n  listen: 127.0.0.1:{admin}\nruntime:\n  worker_threads: 1\n",
        ca.socket("payment-service")
    );
    Sidecar::start(name, dir, &yaml, admin)
}

async fn load(port: u16, until: Instant, ok: Arc<AtomicU64>, failed: Arc<AtomicU64>) {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = ContactServiceClient::new(ch);
    while Instant::now() < until {
        let r = c
            .get_contact(GetContactRequest {
                contact_id: "r".into(),
                payload: vec![0; 32],
            })
            .await;
        match r {
            Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
            Err(e) => {
                eprintln!("failed request: {e:?}");
                failed.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

// Story: for 30 s, with both sidecars' SVIDs rotating every 2 s, at least 1,000 requests
// per second flow payment -> contact; a second payment sidecar joins halfway (its new
// handshakes meet the rotated SVIDs); not one request fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotation_under_load_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(
        dir.path(),
        &["payment-service", "contact-service"],
        "4s",
        &[],
    );
    let app = DemoApp::start("contact", &[]);
    let inbound = free_port();
    let admin = free_port();
    let policy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies/contact-service.yaml");
    let yaml = format!(
        "service: contact-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {}\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\nruntime:\n  worker_threads: 1\n",
        ca.socket("contact-service"),
        app.addr,
        policy.display()
    );
    let contact = Sidecar::start("contact-sidecar", dir.path(), &yaml, admin);
    let out1 = free_port();
    let p1 = client_sidecar(dir.path(), &ca, "payment-1", out1, inbound);
    contact.wait_ready();
    p1.wait_ready();

    let ok = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let until = start + Duration::from_secs(30);
    let mut tasks = Vec::new();
    for _ in 0..16 {
        tasks.push(tokio::spawn(load(out1, until, ok.clone(), failed.clone())));
    }
    tokio::time::sleep(Duration::from_secs(15)).await;
    let out2 = free_port();
    let dir2 = dir.path().to_path_buf();
    let p2 = tokio::task::block_in_place(|| {
        let p2 = client_sidecar(&dir2, &ca, "payment-2", out2, inbound);
        p2.wait_ready();
        p2
    });
    for _ in 0..8 {
        tasks.push(tokio::spawn(load(out2, until, ok.clone(), failed.clone())));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    let ok = ok.load(Ordering::Relaxed);
    let failed = failed.load(Ordering::Relaxed);
    let rotations = contact.metric("meshd_svid_rotations_total", &[]);
    eprintln!(
        "{ok} ok, {failed} failed in {secs:.1} s ({:.0}/s), {rotations} rotations",
        ok as f64 / secs
    );
    assert_eq!(failed, 0, "requests failed during rotation");
    assert!(
        ok as f64 / secs >= 1000.0,
        "load below 1,000 requests per second"
    );
    assert!(rotations >= 10.0, "SVIDs rotated only {rotations} times");
    assert!(p2.metric("meshd_requests_total", &["status=\"0\""]) > 0.0);
}
