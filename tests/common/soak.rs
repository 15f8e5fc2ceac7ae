//! The pieces of the faults-under-load soak (`soak_faults.rs`): a real dnsmasq whose record
//! set the test changes, contact replicas whose sidecars run as SPIRE's contact uid, the
//! payment sidecar's and the gateway's configs, ghz through the gateway with its JSON report
//! counted per phase, and a process's resident memory and open descriptors.
#![allow(dead_code)]

use super::edge::{dnsmasq_command, repo, tool};
use super::meshd::{free_port, DemoApp, Proc, Sidecar};
use super::spire::Spire;
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

/// The uids `spire/up.sh` registered for the three identities of the chain.
pub const PAYMENT_UID: u32 = 20001;
pub const GATEWAY_UID: u32 = 20002;
pub const CONTACT_UID: u32 = 20003;

/// Writes `text` to `path` as an editor or a config map update does: a new file renamed
/// over the old one.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A real dnsmasq answering `contact.mesh.test` from a hosts file (TTL 1 s).
pub struct Dnsmasq {
    proc: Proc,
    pub port: u16,
    /// The hosts file it reads again on SIGHUP.
    hosts: PathBuf,
}

impl Dnsmasq {
    pub fn start(dir: &Path, ips: &[&str]) -> Dnsmasq {
        let port = free_port();
        let hosts = dir.join("dns-hosts");
        std::fs::write(&hosts, hosts_text(ips)).unwrap();
        let (bin, args) = dnsmasq_command(port, &hosts);
        let mut cmd = Command::new(bin);
        cmd.args(args);
        let proc = Proc::spawn("dnsmasq", cmd, Some("read "));
        Dnsmasq { proc, port, hosts }
    }

    /// Replaces the record set and makes dnsmasq read it (SIGHUP).
    pub fn set(&self, ips: &[&str]) {
        replace_file(&self.hosts, &hosts_text(ips));
        self.proc.signal("HUP");
    }
}

fn hosts_text(ips: &[&str]) -> String {
    ips.iter()
        .map(|ip| format!("{ip} contact.mesh.test\n"))
        .collect()
}

/// One contact replica: a demo app behind its own sidecar (as uid 20003) on `addr`.
pub struct Contact {
    pub app: DemoApp,
    pub sidecar: Sidecar,
    pub addr: SocketAddr,
    /// The policy file its sidecars load (shared by the replicas).
    policy: PathBuf,
    /// Sidecars started for this replica so far (names their config files).
    starts: u32,
}

impl Contact {
    pub fn start(spire: &Spire, dir: &Path, addr: SocketAddr, policy: &Path) -> Contact {
        let app = DemoApp::start("contact", &[]);
        let sidecar = contact_sidecar(spire, dir, addr, app.addr, policy, 0);
        Contact {
            app,
            sidecar,
            addr,
            policy: policy.to_path_buf(),
            starts: 1,
        }
    }

    /// SIGKILLs the sidecar (the app stays), waits `down`, and starts a new one on the
    /// same address (with a new admin port: the old one may sit in TIME_WAIT).
    pub fn kill_and_restart_sidecar(&mut self, spire: &Spire, dir: &Path, down: Duration) {
        self.sidecar.proc.signal("KILL");
        let killed = self.sidecar.proc.wait_exit(Duration::from_secs(5));
        assert!(
            killed.is_some(),
            "{} outlived SIGKILL",
            self.sidecar.proc.name
        );
        std::thread::sleep(down);
        let (addr, app) = (self.addr, self.app.addr);
        self.sidecar = contact_sidecar(spire, dir, addr, app, &self.policy, self.starts);
        self.starts += 1;
    }

    /// Contact API calls this replica's sidecar let in (health checks not counted).
    pub fn served_calls(&self) -> f64 {
        let s = &self.sidecar;
        s.metric("meshd_requests_total", &["direction=\"inbound\""])
            - s.metric(
                "meshd_requests_total",
                &["direction=\"inbound\"", "grpc.health.v1.Health/Check"],
            )
    }
}

/// A ready contact sidecar on `addr` in front of `app`, as uid 20003.
fn contact_sidecar(
    spire: &Spire,
    dir: &Path,
    addr: SocketAddr,
    app: SocketAddr,
    policy: &Path,
    start: u32,
) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        "service: contact-service\nidentity:\n  workload_api: {}\n  expect: spiffe://jia.app/contact-service\ninbound:\n  listen: {addr}\n  forward: {app}\n  protocol: grpc\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        spire.agent_endpoint(),
        policy.display()
    );
    let name = format!("contact-{}-{start}", addr.ip()).replace('.', "-");
    let s = Sidecar::start_as(&name, dir, &yaml, admin, Some(CONTACT_UID));
    s.wait_ready();
    s
}

/// What the payment sidecar (and its replacement) is configured with.
pub struct PaymentPorts {
    pub inbound: u16,
    pub outbound: u16,
    pub app: SocketAddr,
    /// The contact replicas' port (their addresses come from DNS).
    pub contact: u16,
    pub dns: u16,
    pub policy: PathBuf,
}

/// The payment sidecar's config: inbound to the app, and the contact upstream found in
/// DNS with round robin (each replica gets its share until it is ejected), two retries,
/// outlier detection and gRPC health checks every second.
pub fn payment_yaml(spire: &Spire, ports: &PaymentPorts, admin: u16) -> String {
    format!(
        r#"service: payment-service
identity:
  workload_api: {socket}
  expect: spiffe://jia.app/payment-service
inbound:
  listen: 127.0.0.1:{inbound}
  forward: {app}
  protocol: grpc
  policy: {policy}
outbound:
  - name: contact-service
    listen: 127.0.0.1:{outbound}
    protocol: grpc
    endpoints: dns:///contact.mesh.test:{contact}
    server_id: spiffe://jia.app/contact-service
    balancer: round_robin
    min_refresh: 1s
    retries: {{attempts: 2}}
    outlier_detection: {{consecutive_failures: 3, base_ejection_time: 2s, max_ejection_percent: 50}}
    health_check: {{interval: 1s, timeout: 500ms, unhealthy_threshold: 2, healthy_threshold: 1}}
admin:
  listen: 127.0.0.1:{admin}
discovery:
  nameservers: ["127.0.0.1:{dns}"]
"#,
        socket = spire.agent_endpoint(),
        inbound = ports.inbound,
        app = ports.app,
        policy = ports.policy.display(),
        outbound = ports.outbound,
        contact = ports.contact,
        dns = ports.dns,
    )
}

/// The edge gateway: HTTPS on `listen` with `dir/gw.pem`, one public route to payment,
/// whose sidecar it reaches over mTLS with retries (a refused connection or a
/// trailers-only UNAVAILABLE is tried again, up to 8 times, backing off up to 1 s each:
/// up to 5.5 s in all).
pub fn gateway_yaml(spire: &Spire, dir: &Path, listen: u16, payment: u16, admin: u16) -> String {
    format!(
        r#"service: api-gateway
identity:
  workload_api: {socket}
  expect: spiffe://jia.app/api-gateway
outbound:
  - name: payment-service
    protocol: grpc
    endpoints: ["127.0.0.1:{payment}"]
    server_id: spiffe://jia.app/payment-service
    retries: {{attempts: 8, backoff: 100ms, max_backoff: 1s}}
gateway:
  listen: 127.0.0.1:{listen}
  tls: {{cert: {dir}/gw.pem, key: {dir}/gw-key.pem}}
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment-service
      auth: none
admin:
  listen: 127.0.0.1:{admin}
"#,
        socket = spire.agent_endpoint(),
        dir = dir.display(),
    )
}

/// ghz calling CreatePayment through the gateway on `gateway` at `rps` (8 workers over 2
/// connections, JSON report with every request, timestamps in UTC), then `extra`.
pub fn ghz(dir: &Path, gateway: u16, rps: u32, extra: &[&str]) -> Command {
    let mut cmd = Command::new(tool("ghz"));
    cmd.env("TZ", "UTC")
        .arg("--cacert")
        .arg(dir.join("gw.pem"))
        .args(["--cname", "localhost", "-i"])
        .arg(repo("proto"))
        .args(["--proto", "payment.proto"])
        .args(["--call", "payment.v1.PaymentService/CreatePayment"])
        .args([
            "-d",
            r#"{"contact_id":"c-42","family_id":"f-7","document_id":"d-3","amount_cents":1250,"currency":"EUR"}"#,
        ])
        .args(["--rps", &rps.to_string(), "-c", "8", "--connections", "2"])
        .args(["--timeout", "20s", "-O", "json"])
        .args(extra)
        .arg(format!("127.0.0.1:{gateway}"));
    cmd
}

/// The JSON report in a finished ghz's output.
pub fn report(lines: &str) -> Value {
    let line = lines
        .lines()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON report from ghz:\n{lines}"));
    serde_json::from_str(line).expect("ghz JSON report")
}

/// Requests of one phase: sent, OK, and the others by ghz's status and error text.
#[derive(Default)]
pub struct Tally {
    pub sent: u64,
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
}

/// The cause given to calls still in flight when the test stopped ghz.
const CUT_OFF: &str = "(cut off by the end of the load)";

impl Tally {
    /// Failed requests, those cut off by the end of the load not counted.
    pub fn failures(&self) -> u64 {
        self.failed
            .iter()
            .filter(|(cause, _)| *cause != CUT_OFF)
            .map(|(_, n)| n)
            .sum()
    }
}

/// Counts every request of ghz's report in the phase it started in (`starts`: each
/// phase's start, in order). A call that ended as ghz was stopped (at `stopped`) by its
/// own cancellation or closed connection is counted apart, as cut off.
pub fn tally(report: &Value, starts: &[SystemTime], stopped: SystemTime) -> Vec<Tally> {
    let mut tallies: Vec<Tally> = starts.iter().map(|_| Tally::default()).collect();
    let details = report["details"].as_array().expect("ghz details");
    for d in details {
        let started = humantime::parse_rfc3339_weak(d["timestamp"].as_str().unwrap_or(""))
            .unwrap_or_else(|e| panic!("ghz timestamp {}: {e}", d["timestamp"]));
        let i = starts.iter().rposition(|at| *at <= started).unwrap_or(0);
        let t = &mut tallies[i];
        t.sent += 1;
        let status = d["status"].as_str().unwrap_or("");
        let error = d["error"].as_str().unwrap_or("");
        let ended = started + Duration::from_nanos(d["latency"].as_u64().unwrap_or(0));
        let cause = if status == "OK" {
            t.ok += 1;
            continue;
        } else if ended + Duration::from_millis(50) >= stopped
            && (status == "Canceled"
                || error.contains("use of closed network connection")
                || (status == "Unavailable" && error.ends_with("EOF")))
        {
            // ghz closes its own connections when stopped (Go's "use of closed network
            // connection"); grpc-go's client also says goodbye with a GOAWAY first, and
            // the gateway then closing the connection can reach a call still in flight
            // as "error reading from server: EOF". Not a failure of the mesh.
            CUT_OFF.to_string()
        } else {
            let to_stop = |at: SystemTime| match stopped.duration_since(at) {
                Ok(d) => format!("{} ms before", d.as_millis()),
                Err(e) => format!("{} ms after", e.duration().as_millis()),
            };
            eprintln!(
                "failed call: started {} the stop, ended {} it: {status}: {error}",
                to_stop(started),
                to_stop(ended)
            );
            format!("{status}: {error}")
        };
        *t.failed.entry(cause).or_default() += 1;
    }
    tallies
}

/// A process's resident memory (kB) and open file descriptors.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub rss_kb: u64,
    pub fds: usize,
}

pub fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS");
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count();
    Usage { rss_kb, fds }
}

/// A field of the sidecar's admin JSON at `path`.
fn admin_json(s: &Sidecar, path: &str, field: &str) -> Value {
    let body: Value = serde_json::from_str(&s.get(path).1).unwrap_or_default();
    body[field].clone()
}

/// The serial of the sidecar's SVID ("" when it has none).
pub fn serial(s: &Sidecar) -> String {
    let v = admin_json(s, "/identity", "serial");
    v.as_str().unwrap_or_default().to_string()
}

pub fn seconds_to_expiry(s: &Sidecar) -> i64 {
    admin_json(s, "/identity", "seconds_to_expiry")
        .as_i64()
        .unwrap_or(0)
}

pub fn policy_version(s: &Sidecar) -> u64 {
    admin_json(s, "/policy", "version").as_u64().unwrap_or(0)
}

/// True once loopback `port` can be bound again (its listener is closed).
pub fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}
