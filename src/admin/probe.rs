//! `meshd probe [/ready|/live]`: the kubelet's exec probe of an injected sidecar. The admin
//! server listens on loopback inside the pod, which an httpGet probe (sent to the pod's IP)
//! cannot reach, so the probe runs meshd inside the pod instead: one GET, exit 0 on 200.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// Why a probe failed; the message is what the kubelet records as the probe's output.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// The path is not one the admin server answers probes on.
    #[error("probe path `{0}`: use /ready or /live")]
    Path(String),
    /// No connection, or no complete answer within the time limit.
    #[error("admin {admin}: {error}")]
    Io {
        admin: SocketAddr,
        error: std::io::Error,
    },
    /// An answer other than 200; the body says why (e.g. the not-ready reason).
    #[error("{path}: {status}: {body}")]
    Status {
        path: String,
        status: String,
        body: String,
    },
}

/// GETs `path` from the admin server at `admin`; the body on 200.
pub fn probe(admin: SocketAddr, path: &str, limit: Duration) -> Result<String, ProbeError> {
    if !matches!(path, "/ready" | "/live") {
        return Err(ProbeError::Path(path.to_string()));
    }
    let io = |error| ProbeError::Io { admin, error };
    let mut conn = TcpStream::connect_timeout(&admin, limit).map_err(io)?;
    conn.set_read_timeout(Some(limit)).map_err(io)?;
    conn.set_write_timeout(Some(limit)).map_err(io)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n");
    conn.write_all(request.as_bytes()).map_err(io)?;
    let mut answer = Vec::new();
    conn.take(64 << 10).read_to_end(&mut answer).map_err(io)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head
        .lines()
        .next()
        .and_then(|l| l.split_once(' '))
        .map_or("", |(_, s)| s);
    if status.starts_with("200") {
        Ok(body.trim().to_string())
    } else {
        Err(ProbeError::Status {
            path: path.to_string(),
            status: if status.is_empty() {
                "no HTTP answer".into()
            } else {
                status.to_string()
            },
            body: body.trim().to_string(),
        })
    }
}
