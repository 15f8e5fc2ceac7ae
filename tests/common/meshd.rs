//! Test helpers for meshd processes: the development CA, demo apps and sidecars as real
//! child processes on free loopback ports, each stopped (by PID) when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The meshd binary under test.
pub fn meshd_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_meshd"))
}

/// A free loopback port, never the same one twice in a test process (a sidecar given one
/// port for two listeners refuses its config). It is bound and released, and it comes from
/// outside the kernel's ephemeral range: a port from `bind(0)` is inside it, and any
/// process's `connect()` can take it as a source port before the listener it was picked for
/// binds it.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Vec<u16>> = Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (lo, hi) = ephemeral_range();
    let candidates: Vec<u16> = (10_000..=u16::MAX).filter(|p| *p < lo || *p > hi).collect();
    // A start that differs between test processes and between calls; then walk the pool.
    let seed = std::process::id() as usize * 7919
        + std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos() as usize)
        + given.len() * 104_729;
    let picked = (0..candidates.len())
        .map(|i| candidates[(seed + i) % candidates.len()])
        .find(|p| !given.contains(p) && TcpListener::bind(("127.0.0.1", *p)).is_ok());
    let port = picked.unwrap_or_else(|| {
        // The ephemeral range covers every port: take what the kernel hands out.
        loop {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("bind 127.0.0.1:0");
            if !given.contains(&port) {
                break port;
            }
        }
    });
    given.push(port);
    port
}

/// The kernel's ephemeral port range, `(32768, 60999)` where it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

/// A child process killed and reaped on drop, with its output captured.
pub struct Proc {
    pub name: String,
    pub child: Child,
    /// Every line the process printed on stdout and stderr so far.
    pub output: Arc<Mutex<Vec<String>>>,
}

impl Proc {
    /// Spawns `cmd`, capturing output; waits until a stdout line contains `ready_marker`
    /// (if given) or the process exits.
    pub fn spawn(name: &str, mut cmd: Command, ready_marker: Option<&str>) -> Proc {
        cmd.stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .stdin(Stdio::null());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let output = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()) as Box<dyn Read + Send>,
        ] {
            let out = output.clone();
            let tx = tx.clone();
            let tag = name.to_string();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if std::env::var_os("MESHD_TEST_VERBOSE").is_some() {
                        eprintln!("[{tag}] {line}");
                    }
                    out.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        let mut p = Proc {
            name: name.to_string(),
            child,
            output,
        };
        if let Some(marker) = ready_marker {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                match rx.recv_timeout(Duration::from_millis(200)) {
                    Ok(line) if line.contains(marker) => break,
                    Ok(_) => {}
                    Err(_) => {
                        if let Ok(Some(status)) = p.child.try_wait() {
                            panic!("{name} exited ({status}) before `{marker}`:\n{}", p.dump());
                        }
                        if Instant::now() > deadline {
                            panic!("{name} did not print `{marker}` in 30 s:\n{}", p.dump());
                        }
                    }
                }
            }
        }
        p
    }

    /// All output so far, one line each.
    pub fn dump(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits until some output line contains `text`.
    pub fn wait_output(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.output.lock().unwrap().iter().any(|l| l.contains(text)) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal to the process (by PID).
    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }

    /// Waits for the process to exit, up to `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(s)) = self.child.try_wait() {
                return Some(s);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A plain HTTP/1.1 request to the admin server; returns (status, body).
pub fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let status = buf.split(' ').nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|x| x.1)
        .unwrap_or("")
        .to_string();
    Some((status, body))
}

/// Polls `cond` every 50 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// The development CA as a process, serving one socket per identity.
pub struct DevCa {
    pub proc: Proc,
    pub dir: PathBuf,
}

impl DevCa {
    /// Starts `meshd dev-ca` with `ids` (short names under spiffe://jia.app/) and a TTL.
    pub fn start(dir: &Path, ids: &[&str], ttl: &str, extra: &[&str]) -> DevCa {
        let mut cmd = Command::new(meshd_bin());
        cmd.arg("dev-ca").arg("--ttl").arg(ttl);
        for id in ids {
            cmd.arg("--identity").arg(format!(
                "spiffe://jia.app/{id}={}",
                dir.join(format!("{id}.sock")).display()
            ));
        }
        cmd.args(extra);
        DevCa {
            proc: Proc::spawn("dev-ca", cmd, Some("dev-ca ready")),
            dir: dir.to_path_buf(),
        }
    }

    /// The Workload API address for an identity.
    pub fn socket(&self, id: &str) -> String {
        format!("unix://{}", self.dir.join(format!("{id}.sock")).display())
    }
}

/// A demo gRPC app (`meshd demo-app`) on a free port.
pub struct DemoApp {
    pub proc: Proc,
    pub addr: SocketAddr,
}

impl DemoApp {
    pub fn start(service: &str, extra: &[&str]) -> DemoApp {
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        DemoApp::start_on(service, addr, extra)
    }

    /// Starts the app on a given address (e.g. again where a killed one was).
    pub fn start_on(service: &str, addr: SocketAddr, extra: &[&str]) -> DemoApp {
        let mut cmd = Command::new(meshd_bin());
        cmd.args([
            "demo-app",
            "--service",
            service,
            "--listen",
            &addr.to_string(),
        ]);
        cmd.args(extra);
        DemoApp {
            proc: Proc::spawn(&format!("{service}-app"), cmd, Some("demo-app ready")),
            addr,
        }
    }
}

/// A meshd sidecar process with its config file and admin address.
pub struct Sidecar {
    pub proc: Proc,
    pub admin: SocketAddr,
    pub config: PathBuf,
}

impl Sidecar {
    /// Writes `config_yaml` (which must use `admin_port`) and starts `meshd run`.
    pub fn start(name: &str, dir: &Path, config_yaml: &str, admin_port: u16) -> Sidecar {
        Sidecar::start_as(name, dir, config_yaml, admin_port, None)
    }

    /// Like `start`, but runs meshd as `uid` (via setpriv) so SPIRE's unix attestor
    /// gives it the identity registered for that uid.
    pub fn start_as(
        name: &str,
        dir: &Path,
        config_yaml: &str,
        admin_port: u16,
        uid: Option<u32>,
    ) -> Sidecar {
        let config = dir.join(format!("{name}.yaml"));
        std::fs::write(&config, config_yaml).expect("write config");
        let mut cmd = match uid {
            Some(uid) => {
                use std::os::unix::fs::PermissionsExt;
                let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
                // The checkout may sit where that uid cannot reach (e.g. under /root):
                // run a copy of the binary from the test's own world-readable folder.
                let bin = dir.join("meshd-for-uid");
                if !bin.exists() {
                    std::fs::copy(meshd_bin(), &bin).expect("copy the meshd binary");
                    let _ = std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755));
                }
                let mut c = Command::new("setpriv");
                c.args([
                    format!("--reuid={uid}"),
                    format!("--regid={uid}"),
                    "--clear-groups".to_string(),
                ]);
                c.arg(&bin);
                c
            }
            None => Command::new(meshd_bin()),
        };
        cmd.arg("run").arg("--config").arg(&config);
        cmd.env_remove("SPIFFE_ENDPOINT_SOCKET");
        let proc = Proc::spawn(name, cmd, None);
        let admin: SocketAddr = format!("127.0.0.1:{admin_port}").parse().unwrap();
        let s = Sidecar {
            proc,
            admin,
            config,
        };
        let up = wait_until(Duration::from_secs(20), || {
            http(s.admin, "GET", "/live").is_some_and(|(c, _)| c == 200)
        });
        assert!(up, "{name} admin never came up:\n{}", s.proc.dump());
        s
    }

    /// Waits until `/ready` answers 200.
    pub fn wait_ready(&self) {
        let ok = wait_until(Duration::from_secs(20), || {
            http(self.admin, "GET", "/ready").is_some_and(|(c, _)| c == 200)
        });
        let last = http(self.admin, "GET", "/ready");
        assert!(
            ok,
            "{} never became ready: {last:?}\n{}",
            self.proc.name,
            self.proc.dump()
        );
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        http(self.admin, "GET", path).unwrap_or((0, String::new()))
    }

    /// The value of a metric line `name{labels} value` whose text contains all `parts`.
    pub fn metric(&self, name: &str, parts: &[&str]) -> f64 {
        let (_, body) = self.get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}
