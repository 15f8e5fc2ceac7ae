//! Active health checks of an upstream's endpoints: the standard
//! `grpc.health.v1.Health/Check` over the endpoint's own mTLS connection for a gRPC
//! upstream, a TCP connect otherwise.
//!
//! Flow: the outbound listener starts one [`run`] task per endpoint; every `interval`
//! (with a little jitter so checks of many endpoints spread out) it checks once within
//! `timeout`, feeds the result to [`Thresholds::record`] — a plain function with table
//! tests — and, when the verdict flips, marks the endpoint (un)healthy and logs it. The
//! task ends when the endpoint is gone (discovery removed it and its last request ended)
//! or meshd drains.

use crate::config::HealthCheckConfig;
use crate::outbound::resilience::EndpointHealth;
use crate::proxy::H2Pool;
use crate::proxy::ReplayBody;
use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Request};
use http_body_util::BodyExt;
use prost::Message;
use std::net::SocketAddr;
use std::sync::Weak;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tonic_health::pb::{
    health_check_response::ServingStatus, HealthCheckRequest, HealthCheckResponse,
};

/// What one endpoint offers a checker.
pub trait Checked: Send + Sync + 'static {
    fn addr(&self) -> SocketAddr;
    fn pool(&self) -> &H2Pool;
    fn health(&self) -> &EndpointHealth;
}

/// Which check an upstream gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// `grpc.health.v1.Health/Check` asking about this service name ("" = the server).
    Grpc { service: String },
    /// A TCP connect to the endpoint's address.
    Tcp,
}

/// Why one check failed (logged when the verdict flips).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Connect(String),
    #[error("HTTP status {0}")]
    HttpStatus(u16),
    #[error("grpc-status {0}")]
    GrpcStatus(String),
    #[error("answered {0:?}, not SERVING")]
    NotServing(i32),
    #[error("malformed health response: {0}")]
    Malformed(String),
}

/// Consecutive results and the current verdict of one endpoint.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Thresholds {
    passes: u32,
    fails: u32,
    unhealthy: bool,
}

impl Thresholds {
    /// Counts one result; returns the new verdict (`true` = unhealthy) when it flips.
    /// Endpoints start healthy, so traffic flows before the first check.
    pub fn record(&mut self, ok: bool, cfg: &HealthCheckConfig) -> Option<bool> {
        if ok {
            self.fails = 0;
            self.passes = self.passes.saturating_add(1);
            if self.unhealthy && self.passes >= cfg.healthy_threshold {
                self.unhealthy = false;
                return Some(false);
            }
        } else {
            self.passes = 0;
            self.fails = self.fails.saturating_add(1);
            if !self.unhealthy && self.fails >= cfg.unhealthy_threshold {
                self.unhealthy = true;
                return Some(true);
            }
        }
        None
    }
}

/// The gRPC request body: one length-prefixed `HealthCheckRequest`.
fn grpc_request_body(service: &str) -> Bytes {
    let msg = HealthCheckRequest {
        service: service.to_string(),
    }
    .encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + msg.len());
    b.put_u8(0);
    b.put_u32(msg.len() as u32);
    b.put_slice(&msg);
    b.freeze()
}

/// Reads the serving status out of a gRPC response body (one uncompressed message).
pub fn parse_grpc_response(body: &[u8]) -> Result<i32, CheckError> {
    if body.len() < 5 {
        return Err(CheckError::Malformed(format!("{} bytes", body.len())));
    }
    if body[0] != 0 {
        return Err(CheckError::Malformed("compressed message".into()));
    }
    let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
    let msg = body
        .get(5..5 + len)
        .ok_or_else(|| CheckError::Malformed(format!("message of {len} bytes is cut short")))?;
    HealthCheckResponse::decode(msg)
        .map(|r| r.status)
        .map_err(|e| CheckError::Malformed(e.to_string()))
}

async fn check_grpc(ep: &dyn Checked, service: &str) -> Result<(), CheckError> {
    let req = Request::post(format!("http://{}/grpc.health.v1.Health/Check", ep.addr()))
        .header(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        )
        .header(http::header::TE, HeaderValue::from_static("trailers"))
        .body(ReplayBody::fixed(grpc_request_body(service)))
        .map_err(|e| CheckError::Malformed(e.to_string()))?;
    let resp = ep
        .pool()
        .send(req)
        .await
        .map_err(|e| CheckError::Connect(e.to_string()))?;
    if resp.status() != http::StatusCode::OK {
        return Err(CheckError::HttpStatus(resp.status().as_u16()));
    }
    let head_status = resp.headers().get("grpc-status").cloned();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CheckError::Connect(e.to_string()))?;
    let status = head_status.or_else(|| {
        collected
            .trailers()
            .and_then(|t| t.get("grpc-status").cloned())
    });
    match status.as_ref().map(|v| v.as_bytes()) {
        Some(b"0") => {}
        Some(other) => {
            return Err(CheckError::GrpcStatus(
                String::from_utf8_lossy(other).into_owned(),
            ))
        }
        None => return Err(CheckError::GrpcStatus("missing".into())),
    }
    match parse_grpc_response(&collected.to_bytes())? {
        s if s == ServingStatus::Serving as i32 => Ok(()),
        s => Err(CheckError::NotServing(s)),
    }
}

async fn check_tcp(addr: SocketAddr) -> Result<(), CheckError> {
    tokio::net::TcpStream::connect(addr)
        .await
        .map(drop)
        .map_err(|e| CheckError::Connect(format!("connect {addr}: {e}")))
}

/// Checks one endpoint once, within `timeout`.
pub async fn check_once(
    ep: &dyn Checked,
    kind: &CheckKind,
    timeout: Duration,
) -> Result<(), CheckError> {
    let check = async {
        match kind {
            CheckKind::Grpc { service } => check_grpc(ep, service).await,
            CheckKind::Tcp => check_tcp(ep.addr()).await,
        }
    };
    tokio::time::timeout(timeout, check)
        .await
        .unwrap_or(Err(CheckError::Timeout(timeout)))
}

/// Checks `endpoint` every `cfg.interval` until it is gone or `stop` (see module docs).
pub async fn run<E: Checked>(
    endpoint: Weak<E>,
    upstream: String,
    kind: CheckKind,
    cfg: HealthCheckConfig,
    stop: CancellationToken,
) {
    let mut thresholds = Thresholds::default();
    loop {
        let jitter = cfg.interval.mul_f64(rand::random::<f64>() * 0.1);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(cfg.interval + jitter) => {}
        }
        let Some(ep) = endpoint.upgrade() else { return };
        let result = check_once(&*ep, &kind, cfg.timeout).await;
        if let Some(unhealthy) = thresholds.record(result.is_ok(), &cfg) {
            ep.health().set_unhealthy(unhealthy);
            match result {
                Err(e) => {
                    tracing::warn!(upstream = %upstream, endpoint = %ep.addr(), "endpoint unhealthy: {e}")
                }
                Ok(()) => {
                    tracing::info!(upstream = %upstream, endpoint = %ep.addr(), "endpoint healthy again")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdict_flips_at_the_thresholds() {
        let cfg = HealthCheckConfig {
            unhealthy_threshold: 2,
            healthy_threshold: 3,
            ..Default::default()
        };
        let mut t = Thresholds::default();
        // (result, flip)
        let table = [
            (false, None),
            (true, None),
            (false, None),
            (false, Some(true)),
            (false, None),
            (true, None),
            (true, None),
            (false, None),
            (true, None),
            (true, None),
            (true, Some(false)),
            (true, None),
        ];
        for (i, (ok, want)) in table.into_iter().enumerate() {
            assert_eq!(t.record(ok, &cfg), want, "step {i}");
        }
    }

    #[test]
    fn grpc_bodies_round_trip() {
        let body = grpc_request_body("contact.v1.ContactService");
        assert_eq!(body[0], 0);
        assert_eq!(usize::from(body[4]), body.len() - 5);
        let resp = HealthCheckResponse {
            status: ServingStatus::Serving as i32,
        }
        .encode_to_vec();
        let mut framed = vec![0, 0, 0, 0, resp.len() as u8];
        framed.extend_from_slice(&resp);
        assert_eq!(parse_grpc_response(&framed), Ok(1));
        // (body, error prefix)
        let bad: [(&[u8], &str); 3] = [
            (&[0, 0], "malformed health response: 2 bytes"),
            (&[1, 0, 0, 0, 0], "malformed health response: compressed"),
            (
                &[0, 0, 0, 0, 9, 8],
                "malformed health response: message of 9",
            ),
        ];
        for (b, want) in bad {
            let e = parse_grpc_response(b).unwrap_err().to_string();
            assert!(e.starts_with(want), "{e}");
        }
    }
}
