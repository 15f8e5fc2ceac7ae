//! The pieces of `tests/jwt_inbound.rs`: an h2c app that reports the headers it got, an
//! h2c caller of an outbound listener that reads gRPC and HTTP answers, the document
//! sidecar (an `http` inbound with `jwt_svid`) and a caller's sidecar, and a token
//! assembled by hand (for `alg: none`).

use super::common::meshd::{free_port, Sidecar};
use super::{POLICY, TD};
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;
use tokio::net::TcpListener;

/// An h2c app answering `<path> authorization=[..] xfcc=[..]`, so a test sees the headers
/// the sidecar handed on.
pub async fn echo_app() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let svc = hyper::service::service_fn(|req: http::Request<Incoming>| async move {
                let all = |name: &str| -> String {
                    let values: Vec<String> = req
                        .headers()
                        .get_all(name)
                        .iter()
                        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
                        .collect();
                    values.join("|")
                };
                let body = format!(
                    "{} authorization=[{}] xfcc=[{}]",
                    req.uri().path(),
                    all("authorization"),
                    all("x-forwarded-client-cert")
                );
                Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(body))))
            });
            tokio::spawn(
                hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc),
            );
        }
    });
    addr
}

/// What a call got back: status, grpc-status and grpc-message, www-authenticate, body.
#[derive(Debug, Default)]
pub struct Answer {
    pub status: u16,
    pub grpc_status: Option<String>,
    pub grpc_message: String,
    pub www_authenticate: String,
    pub body: String,
}

/// An h2c client of an outbound listener (the caller's sidecar adds its mTLS identity).
#[derive(Clone)]
pub struct Caller {
    send: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
}

impl Caller {
    pub async fn connect(addr: SocketAddr) -> Caller {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("h2c handshake");
        tokio::spawn(conn);
        Caller { send }
    }

    /// GET `path` (or, `grpc`, a gRPC-shaped POST) with `authorization: Bearer token`.
    pub async fn call(&mut self, path: &str, token: Option<&str>, grpc: bool) -> Answer {
        let mut req = http::Request::builder().uri(format!("http://documents{path}"));
        req = if grpc {
            req.method("POST")
                .header("content-type", "application/grpc")
                .header("te", "trailers")
        } else {
            req.method("GET")
        };
        if let Some(t) = token {
            req = req.header("authorization", format!("Bearer {t}"));
        }
        let body = if grpc {
            Bytes::from_static(&[0, 0, 0, 0, 0])
        } else {
            Bytes::new()
        };
        let resp = self
            .send
            .send_request(req.body(Full::new(body)).unwrap())
            .await
            .expect("request");
        let header = |h: &http::HeaderMap, name: &str| {
            h.get(name)
                .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        };
        let mut answer = Answer {
            status: resp.status().as_u16(),
            grpc_status: header(resp.headers(), "grpc-status"),
            grpc_message: header(resp.headers(), "grpc-message").unwrap_or_default(),
            www_authenticate: header(resp.headers(), "www-authenticate").unwrap_or_default(),
            body: String::new(),
        };
        let collected = resp.into_body().collect().await.expect("body");
        if let Some(t) = collected.trailers() {
            answer.grpc_status = answer.grpc_status.or(header(t, "grpc-status"));
        }
        answer.body = String::from_utf8_lossy(&collected.to_bytes()).into_owned();
        answer.grpc_message = percent_decode(&answer.grpc_message);
        answer
    }
}

fn percent_decode(text: &str) -> String {
    let mut out = Vec::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let Ok(b) = u8::from_str_radix(&text[i + 1..i + 3], 16) {
                out.push(b);
                i += 3;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// The document sidecar: an `http` inbound with `jwt_svid` (the given YAML flow map).
pub fn document_sidecar(
    dir: &Path,
    name: &str,
    socket: &str,
    app: SocketAddr,
    jwt_svid: &str,
) -> (Sidecar, u16) {
    let (admin, inbound) = (free_port(), free_port());
    let policy = dir.join("policy.yaml");
    std::fs::write(&policy, POLICY).unwrap();
    let yaml = format!(
        r#"service: document-service
identity:
  workload_api: {socket}
  expect: {TD}/document-service
inbound:
  listen: 127.0.0.1:{inbound}
  forward: {app}
  protocol: http
  policy: {policy}
  jwt_svid: {jwt_svid}
admin:
  listen: 127.0.0.1:{admin}
log:
  access: deny
"#,
        policy = policy.display(),
    );
    let sidecar = Sidecar::start(name, dir, &yaml, admin);
    sidecar.wait_ready();
    (sidecar, inbound)
}

/// A caller's sidecar with one `http` outbound per document inbound; returns the
/// outbound ports in the same order.
pub fn caller_sidecar(
    dir: &Path,
    who: &str,
    socket: &str,
    inbounds: &[u16],
) -> (Sidecar, Vec<u16>) {
    let admin = free_port();
    let mut outbound = String::new();
    let mut ports = Vec::new();
    for (i, inbound) in inbounds.iter().enumerate() {
        let port = free_port();
        ports.push(port);
        outbound.push_str(&format!(
            "  - name: documents-{i}\n    listen: 127.0.0.1:{port}\n    protocol: http\n    endpoints: [\"127.0.0.1:{inbound}\"]\n    server_id: {TD}/document-service\n    timeout: 5s\n"
        ));
    }
    let yaml = format!(
        "service: {who}\nidentity:\n  workload_api: {socket}\noutbound:\n{outbound}admin:\n  listen: 127.0.0.1:{admin}\n",
    );
    let sidecar = Sidecar::start(
        &format!("{}-sidecar", who.replace('/', "-")),
        dir,
        &yaml,
        admin,
    );
    sidecar.wait_ready();
    (sidecar, ports)
}

/// An unsigned-looking token: base64url(header).base64url(claims).signature.
pub fn compact(header: &serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
    format!(
        "{}.{}.{}",
        B64.encode(header.to_string()),
        B64.encode(claims.to_string()),
        B64.encode(signature)
    )
}
