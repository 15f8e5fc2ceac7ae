//! Helpers of the edge-case data plane tests: external tools (openssl, curl, grpcurl) run
//! with a time limit, and sidecar configs for one inbound or one outbound listener.
#![allow(dead_code)]

use super::meshd::{free_port, DevCa, Sidecar};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

/// The repository's own files (protos, policies).
pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// An external tool from PATH or `~/.cache/meshd/bin`; a missing one fails the test with
/// its name (a test never passes without its tools).
pub fn tool(name: &str) -> PathBuf {
    let mut dirs: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    if let Some(home) = std::env::var_os("HOME") {
        dirs.push(PathBuf::from(home).join(".cache/meshd/bin"));
    }
    dirs.into_iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("`{name}` is missing: run the tests through tests/run.sh, which installs it")
        })
}

/// What a finished (or timed-out) tool run left behind.
#[derive(Debug)]
pub struct Run {
    /// `None` when the tool was still running at the time limit (it is killed).
    pub status: Option<ExitStatus>,
    /// stdout then stderr, lossily decoded.
    pub text: String,
    /// stdout alone, raw.
    pub stdout: Vec<u8>,
}

impl Run {
    pub fn ok(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

/// Runs `tool` with `args` and stdin from /dev/null, killed after `limit`.
pub async fn run(tool_name: &str, args: &[&str], limit: Duration) -> Run {
    let mut cmd = tokio::process::Command::new(tool(tool_name));
    cmd.args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {tool_name}: {e}"));
    match tokio::time::timeout(limit, child.wait_with_output()).await {
        Ok(Ok(out)) => Run {
            status: Some(out.status),
            text: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
            stdout: out.stdout,
        },
        Ok(Err(e)) => panic!("{tool_name} failed to run: {e}"),
        Err(_) => Run {
            status: None,
            text: String::new(),
            stdout: Vec::new(),
        },
    }
}

/// The payment sidecar behind the edge gateway tests' gateway: gRPC inbound to `app`,
/// whose policy lets only `spiffe://jia.app/api-gateway` call PaymentService; ready.
/// Returns it and its inbound port.
pub fn gateway_payment_sidecar(
    dir: &Path,
    ca: &DevCa,
    app: impl std::fmt::Display,
) -> (Sidecar, u16) {
    let policy = dir.join("payment-policy.yaml");
    std::fs::write(
        &policy,
        "service: payment-service\ndefault: deny\nrules:\n  - name: gateway-calls-payments\n    from: [\"spiffe://jia.app/api-gateway\"]\n    to:\n      grpc: [\"payment.v1.PaymentService/*\"]\n",
    )
    .unwrap();
    let (inbound, admin) = (free_port(), free_port());
    let yaml = format!(
        "service: payment-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 127.0.0.1:{inbound}\n  forward: {app}\n  protocol: grpc\n  policy: {}\nadmin:\n  listen: 127.0.0.1:{admin}\n",
        ca.socket("payment-service"),
        policy.display()
    );
    let payment = Sidecar::start("payment-sidecar", dir, &yaml, admin);
    payment.wait_ready();
    (payment, inbound)
}

/// The gateway's self-signed certificate for `localhost`: `dir/gw.pem`, `dir/gw-key.pem`.
pub fn write_gateway_cert(dir: &Path) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    std::fs::write(dir.join("gw.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.join("gw-key.pem"), cert.signing_key.serialize_pem()).unwrap();
}

/// A sidecar with only an inbound listener on `inbound`, forwarding to `forward`.
pub fn inbound_sidecar(
    dir: &Path,
    socket: &str,
    service: &str,
    inbound: u16,
    forward: &str,
    protocol: &str,
    policy: &Path,
) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        r#"service: {service}
identity:
  workload_api: {socket}
  expect: spiffe://jia.app/{service}
inbound:
  listen: 127.0.0.1:{inbound}
  forward: {forward}
  protocol: {protocol}
  policy: {policy}
admin:
  listen: 127.0.0.1:{admin}
log:
  access: all
"#,
        policy = policy.display(),
    );
    Sidecar::start(&format!("{service}-sidecar"), dir, &yaml, admin)
}

/// A sidecar of `who` with one outbound listener on `outbound` to the contact sidecar
/// at `inbound`, which must present `server_id`.
pub fn outbound_sidecar(
    dir: &Path,
    socket: &str,
    who: &str,
    outbound: u16,
    inbound: u16,
    server_id: &str,
    protocol: &str,
) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        r#"service: {who}
identity:
  workload_api: {socket}
outbound:
  - name: contact-service
    listen: 127.0.0.1:{outbound}
    protocol: {protocol}
    endpoints: ["127.0.0.1:{inbound}"]
    server_id: {server_id}
    timeout: 5s
admin:
  listen: 127.0.0.1:{admin}
"#,
    );
    Sidecar::start(&format!("{who}-sidecar"), dir, &yaml, admin)
}

/// Waits (up to 5 s) until a counter on `s` reaches `at_least`; returns its last value.
pub fn wait_counter(s: &Sidecar, name: &str, parts: &[&str], at_least: f64) -> f64 {
    let mut last = 0.0;
    super::meshd::wait_until(Duration::from_secs(5), || {
        last = s.metric(name, parts);
        last >= at_least
    });
    last
}

/// A real dnsmasq answering for `mesh.test` only, from the hosts file `hosts` (TTL 1 s,
/// SIGHUP reloads it), on 127.0.0.1:`port`: its program and arguments. It prints a line
/// starting `read ` once the file is loaded.
pub fn dnsmasq_command(port: u16, hosts: &Path) -> (&'static str, Vec<String>) {
    let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("dnsmasq is missing: run the tests through tests/run.sh, which installs it");
    let mut args: Vec<String> = [
        "--keep-in-foreground",
        "--log-facility=-",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        "--listen-address=127.0.0.1",
        "--local=/mesh.test/",
        "--local-ttl=1",
        "--user=root",
    ]
    .map(String::from)
    .to_vec();
    args.push(format!("--port={port}"));
    args.push(format!("--addn-hosts={}", hosts.display()));
    (bin, args)
}

/// grpcurl's arguments for `GetContact(c1)` against `addr`, after connection `flags`.
pub fn get_contact_args(flags: &[&str], addr: &str) -> Vec<String> {
    let proto = repo("proto").display().to_string();
    let mut args: Vec<String> = ["-max-time", "5"].map(String::from).to_vec();
    args.extend(flags.iter().map(|f| f.to_string()));
    args.extend([
        "-import-path".into(),
        proto,
        "-proto".into(),
        "contact.proto".into(),
        "-d".into(),
        r#"{"contact_id":"c1"}"#.into(),
        addr.into(),
        "contact.v1.ContactService/GetContact".into(),
    ]);
    args
}
