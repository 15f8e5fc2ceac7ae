//! The sidecars of `meshd demo` as child processes: each one's config is generated from a
//! [`SidecarSpec`] (everything on loopback, identity from the dev CA's socket, the embedded
//! policy), started as `meshd run --config F --exit-with <demo pid>` with its output in
//! `logs/<name>-sidecar.log`, awaited on its admin `/ready`, and stopped with `POST
//! /shutdown` (killed when it does not drain in time). A separate process per sidecar,
//! because `meshd run` installs process-wide metrics and logging.

use crate::demo::gateway::GatewayFiles;
use crate::demo::{log_path, socket_path, spiffe_id};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long every sidecar gets to become ready.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a sidecar may drain after `POST /shutdown` before it is killed.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Environment variables that would override the generated sidecar configs.
const OVERRIDES: [&str; 6] = [
    "SPIFFE_ENDPOINT_SOCKET",
    "SERVICE_MESH_SPIFFE_ID",
    "MTLS_CERT_FILE",
    "MTLS_KEY_FILE",
    "MTLS_CA_FILE",
    "GRPC_ADDRESS",
];

/// Why a sidecar could not be started or did not become ready.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// Its config file or log file could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
    /// The running executable, which the sidecars run as, cannot be found.
    #[error("cannot find the meshd executable to start sidecars: {0}")]
    NoExecutable(std::io::Error),
    /// The child process could not be started.
    #[error("cannot start the {name} sidecar: {error}")]
    Spawn { name: String, error: std::io::Error },
    /// The sidecar exited before its `/ready` said 200; `tail` is the end of its log.
    #[error("the {name} sidecar exited ({status}) before it was ready; the end of {log}:\n{tail}")]
    Exited {
        name: String,
        status: ExitStatus,
        log: PathBuf,
        tail: String,
    },
    /// `/ready` did not say 200 in time; `last` is what it said last.
    #[error("the {name} sidecar was not ready in {secs}s ({last}); the end of {log}:\n{tail}")]
    NotReady {
        name: String,
        secs: u64,
        last: String,
        log: PathBuf,
        tail: String,
    },
}

/// One outbound of a sidecar: the listener its app dials and the sidecar it calls.
#[derive(Debug, Clone)]
pub struct Upstream {
    /// The service called, e.g. `document-service` (also the path of its SPIFFE ID).
    pub name: String,
    /// The loopback port the app dials.
    pub listen: u16,
    /// The inbound port of the called service's sidecar.
    pub sidecar: u16,
    /// The audience of the JWT-SVID sent with every call (`outbound[].jwt_svid`), when
    /// the called sidecar requires one.
    pub jwt_audience: Option<String>,
}

/// One sidecar's shape, from which its config file is written.
#[derive(Debug, Clone)]
pub struct SidecarSpec {
    /// Short name, e.g. `payment`, `api-gateway`.
    pub name: String,
    /// The identity path and service name, e.g. `payment-service`.
    pub id: String,
    pub admin: u16,
    /// Inbound listen port and the app it forwards to; the policy is `policies/<id>.yaml`.
    pub inbound: Option<(u16, SocketAddr)>,
    /// The audience of the JWT-SVID its inbound requires of every caller, beside the
    /// caller's mTLS SVID (`inbound.jwt_svid`); none: mTLS alone.
    pub inbound_jwt_audience: Option<String>,
    /// The services it calls, one outbound listener each.
    pub outbound: Vec<Upstream>,
    /// The edge gateway's port and files (the api-gateway sidecar only).
    pub gateway: Option<(u16, GatewayFiles)>,
}

impl SidecarSpec {
    /// The `meshd.yaml` of this sidecar, everything on loopback.
    pub fn yaml(&self, dir: &Path) -> String {
        let q = |t: String| serde_json::to_string(&t).unwrap_or(t);
        let mut y = format!(
            "service: {id}\nidentity:\n  workload_api: {sock}\n  expect: {sid}\n",
            id = self.id,
            sock = q(format!("unix://{}", socket_path(dir, &self.id).display())),
            sid = spiffe_id(&self.id),
        );
        if let Some((listen, forward)) = self.inbound {
            let policy = dir.join("policies").join(format!("{}.yaml", self.id));
            y += &format!(
                "inbound:\n  listen: 127.0.0.1:{listen}\n  forward: {forward}\n  \
                 protocol: grpc\n  policy: {}\n",
                q(policy.display().to_string())
            );
            if let Some(audience) = &self.inbound_jwt_audience {
                y += &format!("  jwt_svid: {{audience: {}}}\n", q(audience.clone()));
            }
        }
        if !self.outbound.is_empty() {
            y += "outbound:\n";
            for u in &self.outbound {
                y += &format!(
                    "  - name: {name}\n    listen: 127.0.0.1:{listen}\n    protocol: grpc\n    \
                     endpoints: [\"127.0.0.1:{sidecar}\"]\n    server_id: {sid}\n    \
                     timeout: 5s\n",
                    name = u.name,
                    listen = u.listen,
                    sidecar = u.sidecar,
                    sid = spiffe_id(&u.name)
                );
                if let Some(audience) = &u.jwt_audience {
                    y += &format!("    jwt_svid: {{audience: [{}]}}\n", q(audience.clone()));
                }
            }
        }
        if let Some((port, files)) = &self.gateway {
            y += &crate::demo::gateway::config_yaml(*port, files);
        }
        y += &format!(
            "admin:\n  listen: 127.0.0.1:{}\nruntime:\n  worker_threads: 1\n\
             log:\n  access: deny\n  level: warn\nlifecycle:\n  drain_timeout: 2s\n",
            self.admin
        );
        y
    }

    /// The summary lines of its listeners.
    pub fn listeners(&self) -> Vec<String> {
        let mut lines = Vec::new();
        if let Some((listen, forward)) = self.inbound {
            let mut line = format!("inbound  127.0.0.1:{listen} -> app {forward}");
            if let Some(audience) = &self.inbound_jwt_audience {
                line += &format!(" (mTLS + JWT-SVID for {audience})");
            }
            lines.push(line);
        }
        for u in &self.outbound {
            let short = u.name.trim_end_matches("-service");
            let auth = if u.jwt_audience.is_some() {
                "mTLS + JWT-SVID"
            } else {
                "mTLS"
            };
            lines.push(format!(
                "outbound 127.0.0.1:{} -> {short} sidecar 127.0.0.1:{} ({auth})",
                u.listen, u.sidecar
            ));
        }
        if let Some((port, _)) = &self.gateway {
            lines.push(format!(
                "gateway  127.0.0.1:{port} (HTTPS, JWT) -> payment sidecar (mTLS)"
            ));
        }
        lines
    }
}

/// A sidecar child process.
pub struct Child {
    pub spec: SidecarSpec,
    pub process: tokio::process::Child,
    pub pid: u32,
}

/// Writes the sidecar's config and starts `meshd run` with its output in a log file.
pub fn spawn_sidecar(dir: &Path, spec: SidecarSpec) -> Result<Child, SidecarError> {
    let config = dir
        .join("config")
        .join(format!("{}-sidecar.yaml", spec.name));
    let log = log_path(dir, &spec.name);
    let fail = |path: &Path, error| SidecarError::Write {
        path: path.to_path_buf(),
        error,
    };
    std::fs::create_dir_all(dir.join("config")).map_err(|e| fail(dir, e))?;
    std::fs::write(&config, spec.yaml(dir)).map_err(|e| fail(&config, e))?;
    let out = std::fs::File::create(&log).map_err(|e| fail(&log, e))?;
    let err = out.try_clone().map_err(|e| fail(&log, e))?;
    let exe = std::env::current_exe().map_err(SidecarError::NoExecutable)?;
    let mut cmd = tokio::process::Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .arg("--exit-with")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    for (key, _) in std::env::vars_os() {
        let k = key.to_string_lossy();
        if k.starts_with("MESHD_") || OVERRIDES.contains(&k.as_ref()) {
            cmd.env_remove(&key);
        }
    }
    let process = cmd.spawn().map_err(|error| SidecarError::Spawn {
        name: spec.name.clone(),
        error,
    })?;
    let pid = process.id().unwrap_or(0);
    Ok(Child { spec, process, pid })
}

/// Waits until the sidecar's `/ready` answers 200; on failure says why, with its log.
pub async fn wait_ready(
    dir: &Path,
    child: &mut Child,
    deadline: Instant,
) -> Result<(), SidecarError> {
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, child.spec.admin));
    let name = child.spec.name.clone();
    let log = log_path(dir, &name);
    let mut last = String::from("no answer from its admin server");
    loop {
        if let Ok(Some(status)) = child.process.try_wait() {
            let tail = log_tail(&log, 15);
            return Err(SidecarError::Exited {
                name,
                status,
                log,
                tail,
            });
        }
        match http(admin, "GET", "/ready").await {
            Some((200, _)) => return Ok(()),
            Some((code, body)) => last = format!("/ready said {code} {}", body.trim()),
            None => {}
        }
        if Instant::now() > deadline {
            let tail = log_tail(&log, 15);
            return Err(SidecarError::NotReady {
                name,
                secs: READY_TIMEOUT.as_secs(),
                last,
                log,
                tail,
            });
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Asks a sidecar to drain (`POST /shutdown`); kills it after [`STOP_GRACE`].
pub async fn stop_sidecar(child: &mut Child) -> Option<String> {
    if let Ok(Some(_)) = child.process.try_wait() {
        return None;
    }
    let admin = SocketAddr::from((Ipv4Addr::LOCALHOST, child.spec.admin));
    let _ = http(admin, "POST", "/shutdown").await;
    match tokio::time::timeout(STOP_GRACE, child.process.wait()).await {
        Ok(_) => None,
        Err(_) => {
            let _ = child.process.kill().await;
            Some(format!(
                "the {} sidecar (pid {}) did not drain in 5 s and was killed",
                child.spec.name, child.pid
            ))
        }
    }
}

/// The last `n` lines of a file (or why it cannot be read).
pub fn log_tail(path: &Path, n: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(n)..];
            if tail.is_empty() {
                "  (empty)".into()
            } else {
                tail.iter().map(|l| format!("  {l}\n")).collect()
            }
        }
        Err(e) => format!("  (cannot read it: {e})"),
    }
}

/// A plain HTTP/1.1 request to an admin server; `(status, body)`, or `None` when it does
/// not answer within 5 s.
pub async fn http(addr: SocketAddr, method: &str, path: &str) -> Option<(u16, String)> {
    let exchange = async {
        let mut s = TcpStream::connect(addr).await.ok()?;
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\n\
             Connection: close\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.ok()?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.ok()?;
        let text = String::from_utf8_lossy(&buf);
        let status = text.split(' ').nth(1)?.parse().ok()?;
        let body = text.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("");
        Some((status, body.to_string()))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange)
        .await
        .ok()
        .flatten()
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, Env};

    #[test]
    fn generated_configs_pass_meshd_check() {
        // Every generated sidecar config is one `meshd run` accepts, loopback only.
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in crate::demo::PROTOS {
            let path = dir.path().join("proto").join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, text).unwrap();
        }
        let upstream = |name: &str, listen, sidecar, jwt_audience: Option<&str>| Upstream {
            name: name.into(),
            listen,
            sidecar,
            jwt_audience: jwt_audience.map(Into::into),
        };
        let specs = [
            SidecarSpec {
                name: "payment".into(),
                id: "payment-service".into(),
                admin: 15000,
                inbound: Some((15006, "127.0.0.1:8081".parse().unwrap())),
                inbound_jwt_audience: None,
                outbound: vec![
                    upstream("contact-service", 15101, 40001, None),
                    upstream("document-service", 15103, 40004, Some("document-service")),
                ],
                gateway: None,
            },
            SidecarSpec {
                name: "document".into(),
                id: "document-service".into(),
                admin: 40005,
                inbound: Some((40004, "127.0.0.1:40006".parse().unwrap())),
                inbound_jwt_audience: Some("document-service".into()),
                outbound: vec![],
                gateway: None,
            },
            SidecarSpec {
                name: "api-gateway".into(),
                id: "api-gateway".into(),
                admin: 40002,
                inbound: None,
                inbound_jwt_audience: None,
                outbound: vec![upstream("payment-service", 15100, 15006, None)],
                gateway: Some((
                    40003,
                    crate::demo::gateway::write_files(dir.path()).unwrap(),
                )),
            },
        ];
        for spec in specs {
            let path = dir.path().join(format!("{}.yaml", spec.name));
            std::fs::write(&path, spec.yaml(dir.path())).unwrap();
            let cfg = Config::load(&path, &Env::default()).unwrap();
            assert!(cfg.admin.listen.ip().is_loopback());
            if let Some(ib) = &cfg.inbound {
                assert!(ib.listen.ip().is_loopback());
                // The document sidecar requires a JWT-SVID for its own name, and keeps it
                // from the app; the others ask for none.
                let wanted = ib
                    .jwt_svid
                    .as_ref()
                    .map(|j| (j.audience.as_str(), j.forward));
                let expected = spec.inbound_jwt_audience.as_deref().map(|a| (a, false));
                assert_eq!(wanted, expected, "{}", spec.name);
            }
            // Payment sends one to document only.
            let sent: Vec<(&str, Vec<String>)> = cfg
                .outbound
                .iter()
                .filter_map(|o| Some((o.name.as_str(), o.jwt_svid.as_ref()?.audience.clone())))
                .collect();
            let expected: Vec<(&str, Vec<String>)> = spec
                .outbound
                .iter()
                .filter_map(|u| Some((u.name.as_str(), vec![u.jwt_audience.clone()?])))
                .collect();
            assert_eq!(sent, expected, "{}", spec.name);
            assert!(cfg
                .outbound
                .iter()
                .all(|o| o.listen.is_some_and(|l| l.ip().is_loopback())));
            assert_eq!(
                cfg.identity
                    .expect
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref(),
                Some(spiffe_id(&spec.id).as_str())
            );
            if let Some(g) = cfg.gateway {
                assert!(g.listen.ip().is_loopback());
                let (report, ok) = crate::config::check_report(&path, &Env::default());
                assert!(ok && !report.contains("warning"), "{report}");
            }
        }
    }
}
