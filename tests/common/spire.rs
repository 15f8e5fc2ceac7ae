//! A real SPIRE (server + agent, trust domain `jia.app`) for integration tests, driven through
//! the scripts in `spire/` so tests and people start it the same way.
//!
//! `Spire::up()` runs `spire/up.sh` into a fresh temporary folder; the five reference identities
//! of DESIGN.md §1 are registered by unix uid and already served when it returns:
//!
//! | SPIFFE ID | uid |
//! |---|---|
//! | `spiffe://jia.app/payment-service` | 20001 |
//! | `spiffe://jia.app/api-gateway` | 20002 |
//! | `spiffe://jia.app/contact-service` | 20003 |
//! | `spiffe://jia.app/family-service` | 20004 |
//! | `spiffe://jia.app/document-service` | 20005 |
//!
//! Run a workload as its uid (e.g. with `setpriv --reuid 20001 --regid 20001 --clear-groups`) and
//! point it at `agent_socket()`. Dropping the value runs `spire/down.sh`; after a failed test the
//! run folder and the tails of both logs are kept and printed.
//!
//! Missing SPIRE binaries fail the test with a message naming `spire/install.sh`; a test never
//! passes without SPIRE. Only std is used, so any test file can include this module.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// The trust domain `spire/up.sh` configures.
pub const TRUST_DOMAIN: &str = "jia.app";

/// The reference identities registered by `spire/up.sh`: (service name, unix uid).
pub const IDENTITIES: [(&str, u32); 5] = [
    ("payment-service", 20001),
    ("api-gateway", 20002),
    ("contact-service", 20003),
    ("family-service", 20004),
    ("document-service", 20005),
];

/// A running SPIRE server and agent, stopped on drop.
pub struct Spire {
    /// The run folder (configs, data, sockets, logs, `env`); removed on a clean drop.
    run_dir: PathBuf,
    /// The `KEY=value` lines `spire/up.sh` wrote to `RUN_DIR/env`, as read right after start.
    env: HashMap<String, String>,
    /// The repository root, to find `spire/*.sh`.
    repo: PathBuf,
}

impl Spire {
    /// Starts SPIRE with the server's default SVID TTL (1h).
    pub fn up() -> Spire {
        Self::start(None)
    }

    /// Starts SPIRE with the reference entries' X.509-SVID TTL set to `ttl_secs` (rotation tests).
    pub fn up_with_svid_ttl(ttl_secs: u32) -> Spire {
        Self::start(Some(ttl_secs))
    }

    fn start(ttl_secs: Option<u32>) -> Spire {
        let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        check_binaries();
        let run_dir = fresh_run_dir();
        let mut cmd = Command::new(repo.join("spire/up.sh"));
        cmd.arg(&run_dir);
        if let Some(ttl) = ttl_secs {
            cmd.env("SPIRE_SVID_TTL", ttl.to_string());
        }
        let out = run(&mut cmd);
        if !out.status.success() {
            panic!(
                "spire/up.sh {} failed ({}):\n{}",
                run_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let env = read_env(&run_dir);
        Spire { run_dir, env, repo }
    }

    /// The run folder (`SPIRE_RUN_DIR`).
    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// One value of `RUN_DIR/env` as read at start (e.g. `SPIRE_SERVER_PORT`).
    pub fn env(&self, key: &str) -> &str {
        self.env
            .get(key)
            .unwrap_or_else(|| panic!("{key} missing from {}/env", self.run_dir.display()))
    }

    /// The agent's Workload API socket path (reachable by any uid).
    pub fn agent_socket(&self) -> PathBuf {
        PathBuf::from(self.env("SPIRE_AGENT_SOCKET"))
    }

    /// The agent's Workload API as a `SPIFFE_ENDPOINT_SOCKET` value: `unix:///…/api.sock`.
    pub fn agent_endpoint(&self) -> String {
        format!("unix://{}", self.env("SPIRE_AGENT_SOCKET"))
    }

    /// The server's admin API socket path (root only).
    pub fn server_socket(&self) -> PathBuf {
        PathBuf::from(self.env("SPIRE_SERVER_SOCKET"))
    }

    /// The agent's SPIFFE ID, `spiffe://jia.app/spire/agent/join_token/<token>`.
    pub fn agent_id(&self) -> &str {
        self.env("SPIRE_AGENT_ID")
    }

    /// `spire-server` or `spire-agent`, as a path that any uid may execute.
    pub fn bin(&self, name: &str) -> PathBuf {
        PathBuf::from(self.env("SPIRE_RUN_BIN")).join(name)
    }

    /// Runs `spire-server ARGS -socketPath <server socket>`; panics on failure, returns stdout.
    pub fn server_cli(&self, args: &[&str]) -> String {
        let mut cmd = Command::new(self.bin("spire-server"));
        cmd.args(args).arg("-socketPath").arg(self.server_socket());
        let out = run(&mut cmd);
        if !out.status.success() {
            panic!(
                "spire-server {} failed ({}):\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Registers `spiffe_id` for workloads running as `uid` under this agent, with an optional
    /// X.509-SVID TTL. Returns the entry ID (for `delete_entry`). The agent serves it after its
    /// next sync (a few seconds); use `wait_served` when that matters.
    pub fn create_entry(&self, spiffe_id: &str, uid: u32, ttl_secs: Option<u32>) -> String {
        let selector = format!("unix:uid:{uid}");
        let ttl = ttl_secs.map(|t| t.to_string());
        let mut args = vec![
            "entry",
            "create",
            "-parentID",
            self.agent_id(),
            "-spiffeID",
            spiffe_id,
            "-selector",
            &selector,
        ];
        if let Some(ttl) = &ttl {
            args.extend(["-x509SVIDTTL", ttl.as_str()]);
        }
        let out = self.server_cli(&args);
        out.lines()
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                (k.trim() == "Entry ID").then(|| v.trim().to_string())
            })
            .unwrap_or_else(|| {
                panic!("no \"Entry ID\" in spire-server entry create output:\n{out}")
            })
    }

    /// Deletes a registration entry by the ID `create_entry` returned.
    pub fn delete_entry(&self, entry_id: &str) {
        self.server_cli(&["entry", "delete", "-entryID", entry_id]);
    }

    /// Sets (creates or replaces) the federated bundle of trust domain `td` (e.g. `other.test`)
    /// from PEM CA certificates; the agent hands it to workloads that federate with `td`.
    pub fn bundle_set(&self, td: &str, pem: &str) {
        let path = self.run_dir.join(format!("bundle-{td}.pem"));
        std::fs::write(&path, pem).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        let id = format!("spiffe://{td}");
        let path = path.to_string_lossy().into_owned();
        self.server_cli(&[
            "bundle", "set", "-format", "pem", "-id", &id, "-path", &path,
        ]);
    }

    /// Stops only the agent (`spire/agent-down.sh`): its socket goes away, the server stays.
    pub fn stop_agent(&self) {
        self.script("agent-down.sh");
    }

    /// Starts the agent again (`spire/agent-up.sh`) with the node identity it kept on disk;
    /// returns once its healthcheck passes.
    pub fn start_agent(&self) {
        self.script("agent-up.sh");
    }

    /// Fetches X.509-SVIDs from the agent as `uid` (`spire-agent api fetch x509` under
    /// setpriv). Ok(stdout) on success, Err(stdout + stderr) otherwise.
    pub fn fetch_x509_as(&self, uid: u32) -> Result<String, String> {
        let out = run(Command::new("setpriv")
            .args([
                "--reuid",
                &uid.to_string(),
                "--regid",
                &uid.to_string(),
                "--clear-groups",
            ])
            .arg(self.bin("spire-agent"))
            .args(["api", "fetch", "x509", "-timeout", "2s", "-socketPath"])
            .arg(self.agent_socket()));
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if out.status.success() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    /// Polls `fetch_x509_as(uid)` until the answer names `spiffe_id`; panics after `timeout`.
    pub fn wait_served(&self, uid: u32, spiffe_id: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.fetch_x509_as(uid);
            match &last {
                Ok(out) if out.contains(spiffe_id) => return out.clone(),
                _ if Instant::now() >= deadline => {
                    panic!("uid {uid} not served {spiffe_id} within {timeout:?}; last: {last:?}")
                }
                _ => std::thread::sleep(Duration::from_millis(250)),
            }
        }
    }

    /// Polls `fetch_x509_as(uid)` until the agent stops serving `spiffe_id` to that uid.
    pub fn wait_not_served(&self, uid: u32, spiffe_id: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let last = self.fetch_x509_as(uid);
            match &last {
                Ok(out) if out.contains(spiffe_id) && Instant::now() >= deadline => {
                    panic!("uid {uid} still served {spiffe_id} after {timeout:?}")
                }
                Ok(out) if out.contains(spiffe_id) => {
                    std::thread::sleep(Duration::from_millis(250))
                }
                _ => return,
            }
        }
    }

    fn script(&self, name: &str) {
        let out = run(Command::new(self.repo.join("spire").join(name)).arg(&self.run_dir));
        if !out.status.success() {
            panic!(
                "spire/{name} {} failed ({}):\n{}",
                self.run_dir.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    fn log_tail(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.run_dir.join(name)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Spire {
    fn drop(&mut self) {
        // Never panic here: a panic while unwinding aborts the test binary.
        let down = Command::new(self.repo.join("spire/down.sh"))
            .arg(&self.run_dir)
            .stdin(std::process::Stdio::null())
            .output();
        let stopped = matches!(&down, Ok(o) if o.status.success());
        if !stopped {
            eprintln!("spire/down.sh {} failed: {down:?}", self.run_dir.display());
        }
        if std::thread::panicking() || !stopped {
            eprintln!(
                "SPIRE run folder kept: {}\n--- server.log (tail) ---\n{}\n--- agent.log (tail) ---\n{}",
                self.run_dir.display(),
                self.log_tail("server.log"),
                self.log_tail("agent.log")
            );
        } else {
            let _ = std::fs::remove_dir_all(&self.run_dir);
        }
    }
}

/// `spire-server` or `spire-agent` from `MESHD_SPIRE_BIN`, for tests that run a SPIRE command
/// without starting SPIRE (e.g. `spire-agent api fetch` against another Workload API).
pub fn installed_bin(name: &str) -> PathBuf {
    check_binaries();
    PathBuf::from(std::env::var_os("MESHD_SPIRE_BIN").unwrap_or_default()).join(name)
}

/// Fails the test, naming the fix, when `MESHD_SPIRE_BIN` or the binaries are missing.
fn check_binaries() {
    let Some(dir) = std::env::var_os("MESHD_SPIRE_BIN") else {
        panic!(
            "MESHD_SPIRE_BIN is not set: run the tests with tests/run.sh, or build SPIRE with \
             spire/install.sh and export MESHD_SPIRE_BIN=<the folder it prints>"
        );
    };
    for name in ["spire-server", "spire-agent"] {
        let path = Path::new(&dir).join(name);
        if !path.is_file() {
            panic!(
                "{} not found (MESHD_SPIRE_BIN={}): run spire/install.sh",
                path.display(),
                Path::new(&dir).display()
            );
        }
    }
}

/// A new, empty folder under the system temp dir with a short path (unix socket paths are
/// limited to 107 bytes).
fn fresh_run_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "meshd-spire-{}-{}-{nanos:x}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
    dir
}

/// Parses `RUN_DIR/env` (`KEY=value` lines, unquoted).
fn read_env(run_dir: &Path) -> HashMap<String, String> {
    let path = run_dir.join("env");
    let text =
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// Runs a command to completion with stdin closed, capturing stdout and stderr.
fn run(cmd: &mut Command) -> Output {
    cmd.stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"))
}
