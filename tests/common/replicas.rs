//! A small mesh for discovery and resilience tests: contact replicas (a demo app behind
//! its own sidecar, each sidecar on its own loopback IP) counting the requests they let
//! in, and a payment sidecar whose `contact-service` upstream the test configures.
#![allow(dead_code)]

use super::meshd::{free_port, DemoApp, DevCa, Sidecar};
use meshd::pb::contact::contact_service_client::ContactServiceClient;
use meshd::pb::contact::GetContactRequest;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use tonic::transport::Channel;

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// One contact replica: a demo app behind its own sidecar listening on `addr`.
pub struct Replica {
    pub app: DemoApp,
    pub sidecar: Sidecar,
}

impl Replica {
    pub fn start(dir: &Path, ca: &DevCa, addr: SocketAddr, app_args: &[&str]) -> Replica {
        let app = DemoApp::start("contact", app_args);
        let admin = free_port();
        let yaml = format!(
            r#"service: contact-service
identity:
  workload_api: {sock}
inbound:
  listen: {addr}
  forward: {app}
  protocol: grpc
  policy: {policy}
admin:
  listen: 127.0.0.1:{admin}
"#,
            sock = ca.socket("contact-service"),
            app = app.addr,
            policy = repo("deploy/policies/contact-service.yaml").display(),
        );
        let name = format!("contact-{}", addr.ip()).replace('.', "-");
        let sidecar = Sidecar::start(&name, dir, &yaml, admin);
        sidecar.wait_ready();
        Replica { app, sidecar }
    }

    /// Kills the app (SIGKILL): the replica's sidecar stays and answers UNAVAILABLE.
    pub fn kill_app(&mut self) {
        self.app.proc.signal("KILL");
        let _ = self.app.proc.wait_exit(std::time::Duration::from_secs(5));
    }

    /// Starts the app again where it was.
    pub fn restart_app(&mut self) {
        self.app = DemoApp::start_on("contact", self.app.addr, &[]);
    }

    /// Calls to the contact API this replica's sidecar let in so far (health checks
    /// not counted).
    pub fn served_calls(&self) -> f64 {
        self.served()
            - self.sidecar.metric(
                "meshd_requests_total",
                &["direction=\"inbound\"", "grpc.health.v1.Health/Check"],
            )
    }

    /// Requests this replica's sidecar let in so far.
    pub fn served(&self) -> f64 {
        self.sidecar
            .metric("meshd_requests_total", &["direction=\"inbound\""])
    }
}

/// The payment sidecar with one outbound upstream `contact-service`; `outbound_extra`
/// holds more keys of that upstream (endpoints, balancer, ...), indented by four;
/// `protocol` is `grpc` unless `outbound_extra` sets it.
pub fn payment(
    dir: &Path,
    ca: &DevCa,
    name: &str,
    outbound_extra: &str,
    dns: Option<u16>,
) -> (Sidecar, u16) {
    let outbound = free_port();
    let admin = free_port();
    let discovery = dns
        .map(|p| format!("discovery:\n  nameservers: [\"127.0.0.1:{p}\"]\n"))
        .unwrap_or_default();
    let yaml = format!(
        r#"service: payment-service
identity:
  workload_api: {sock}
outbound:
  - name: contact-service
    listen: 127.0.0.1:{outbound}
    server_id: spiffe://jia.app/contact-service
    timeout: 5s
{outbound_extra}admin:
  listen: 127.0.0.1:{admin}
{discovery}"#,
        sock = ca.socket("payment-service"),
        outbound_extra = if outbound_extra.contains("    protocol:") {
            outbound_extra.to_string()
        } else {
            format!("    protocol: grpc\n{outbound_extra}")
        },
    );
    (Sidecar::start(name, dir, &yaml, admin), outbound)
}

/// The app's contact client on a sidecar's outbound listener (messages up to 64 MB).
pub async fn client(port: u16) -> ContactServiceClient<Channel> {
    let ch = Channel::from_shared(format!("http://127.0.0.1:{port}"))
        .unwrap()
        .connect()
        .await
        .expect("connect to the outbound listener");
    ContactServiceClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// Sends `n` GetContact calls over `workers` concurrent callers; returns how many failed.
pub async fn send(port: u16, n: usize, workers: usize) -> usize {
    let c = client(port).await;
    let mut tasks = Vec::new();
    for w in 0..workers {
        let mut c = c.clone();
        let count = n / workers + usize::from(w < n % workers);
        tasks.push(tokio::spawn(async move {
            let mut failed = 0;
            for i in 0..count {
                let req = GetContactRequest {
                    contact_id: format!("c-{w}-{i}"),
                    payload: Vec::new(),
                };
                if c.get_contact(req).await.is_err() {
                    failed += 1;
                }
            }
            failed
        }));
    }
    let mut failed = 0;
    for t in tasks {
        failed += t.await.unwrap();
    }
    failed
}

/// Contact replicas on `ips`, all on one free port, started in order.
pub fn start_replicas(dir: &Path, ca: &DevCa, ips: &[&str]) -> (u16, Vec<Replica>) {
    let port = free_port();
    let replicas = ips
        .iter()
        .map(|ip| Replica::start(dir, ca, addr(ip, port), &[]))
        .collect();
    (port, replicas)
}

pub fn ca(dir: &Path) -> DevCa {
    DevCa::start(dir, &["payment-service", "contact-service"], "1h", &[])
}

pub fn addr(ip: &str, port: u16) -> SocketAddr {
    format!("{ip}:{port}").parse().unwrap()
}

pub fn counts(replicas: &[Replica]) -> Vec<f64> {
    replicas.iter().map(Replica::served).collect()
}

pub fn delta(after: &[f64], before: &[f64]) -> Vec<f64> {
    after.iter().zip(before).map(|(a, b)| a - b).collect()
}

/// The requests each replica served since `before`, once they add up to `total` (a
/// request is counted when its response body ends, which can be just after the caller has
/// its answer), or as they stand after 5 s.
pub fn served_since(replicas: &[Replica], before: &[f64], total: f64) -> Vec<f64> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let d = delta(&counts(replicas), before);
        if d.iter().sum::<f64>() >= total || std::time::Instant::now() > deadline {
            return d;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}
