//! A gateway with one public route, and the clients the edge tests speak to it with:
//! TLS trusting its certificate (or with an SVID, for an inbound), HTTP/2 over it, one
//! gRPC call, raw HTTP/2 frames, and what the process shows (RSS, log lines, metrics).
#![allow(dead_code)]

use crate::common::edge::{gateway_payment_sidecar, write_gateway_cert};
use crate::common::meshd::{free_port, wait_until, DemoApp, DevCa, Sidecar};
use bytes::Bytes;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

pub const ZONES: &str = "/payment.v1.PaymentService/ListPricingZones";

pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// A gateway with a public route to the payment app behind its sidecar.
pub struct Gateway {
    pub dir: tempfile::TempDir,
    _ca: DevCa,
    _app: DemoApp,
    _payment: Sidecar,
    pub gw: Sidecar,
    pub port: u16,
}

impl Gateway {
    pub fn start(connections: &str) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ca = DevCa::start(d, &["payment-service", "api-gateway"], "1h", &[]);
        let nowhere = "http://127.0.0.1:9";
        let app = DemoApp::start(
            "payment",
            &[
                "--contact",
                nowhere,
                "--family",
                nowhere,
                "--document",
                nowhere,
            ],
        );
        let (payment, inbound) = gateway_payment_sidecar(d, &ca, app.addr);
        write_gateway_cert(d);
        let (port, admin) = (free_port(), free_port());
        let yaml = format!(
            r#"service: api-gateway
identity:
  workload_api: {socket}
outbound:
  - name: payment-service
    protocol: grpc
    endpoints: ["127.0.0.1:{inbound}"]
    server_id: spiffe://jia.app/payment-service
gateway:
  listen: 127.0.0.1:{port}
  tls: {{cert: {d}/gw.pem, key: {d}/gw-key.pem}}
  connections: {connections}
  routes:
    - name: payments
      prefix: /payment.v1.PaymentService/
      upstream: payment-service
      auth: none
admin:
  listen: 127.0.0.1:{admin}
"#,
            socket = ca.socket("api-gateway"),
            d = d.display(),
        );
        let gw = Sidecar::start("gateway", d, &yaml, admin);
        gw.wait_ready();
        Gateway {
            dir,
            _ca: ca,
            _app: app,
            _payment: payment,
            gw,
            port,
        }
    }

    pub fn open(&self) -> f64 {
        self.gw
            .metric("meshd_connections_open", &["direction=\"gateway\""])
    }

    pub fn limit(&self, limit: &str) -> f64 {
        let l = format!("limit=\"{limit}\"");
        self.gw.metric(
            "meshd_connection_limits_total",
            &["direction=\"gateway\"", &l],
        )
    }
}

/// meshd's resident memory in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

/// A TLS client config trusting the gateway's certificate, offering `alpn`.
pub fn gateway_tls(dir: &Path, alpn: &[u8]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    let pem = std::fs::read(dir.join("gw.pem")).unwrap();
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = meshd::identity::crypto_provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![alpn.to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// A TLS client config with the SVID `dev-ca --write-files` wrote into `dir`.
pub fn svid_tls(dir: &Path) -> tokio_rustls::TlsConnector {
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut read("bundle.pem").as_slice()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let chain: Vec<_> = rustls_pemfile::certs(&mut read("svid.pem").as_slice())
        .map(Result::unwrap)
        .collect();
    let key = rustls_pemfile::private_key(&mut read("key.pem").as_slice())
        .unwrap()
        .unwrap();
    let provider = meshd::identity::crypto_provider();
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    );
    // SVIDs carry no DNS name: accept the chain by the bundle alone (this client only
    // needs to get in; the inbound's identity is tested elsewhere).
    let verifier = NoNameCheck(verifier.build().unwrap());
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_auth_cert(chain, key)
        .unwrap();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// Verifies a server chain against the roots but ignores the name.
#[derive(Debug)]
pub struct NoNameCheck(Arc<rustls::client::WebPkiServerVerifier>);

impl rustls::client::danger::ServerCertVerifier for NoNameCheck {
    fn verify_server_cert(
        &self,
        end_entity: &rustls_pki_types::CertificateDer<'_>,
        intermediates: &[rustls_pki_types::CertificateDer<'_>],
        server_name: &rustls_pki_types::ServerName<'_>,
        ocsp: &[u8],
        now: rustls_pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp, now)
        {
            Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidForName))
            | Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::NotValidForNameContext { .. },
            )) => Ok(rustls::client::danger::ServerCertVerified::assertion()),
            other => other,
        }
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls_pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// An h2 connection over TLS to `port`; the connection is driven by its own task.
pub async fn h2_connect<IO>(io: IO) -> h2::client::SendRequest<Bytes>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (send, conn) = h2::client::handshake(io).await.expect("h2 handshake");
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// One gRPC call of `path` with an empty message; its grpc-status (or the error).
pub async fn grpc_call(
    send: &mut h2::client::SendRequest<Bytes>,
    path: &str,
) -> Result<String, h2::Error> {
    let mut ready = send.clone().ready().await?;
    let req = http::Request::builder()
        .method("POST")
        .uri(format!("https://localhost{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (resp, mut body) = ready.send_request(req, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    let resp = resp.await?;
    let (parts, mut body) = resp.into_parts();
    while let Some(chunk) = body.data().await {
        let n = chunk?.len();
        let _ = body.flow_control().release_capacity(n);
    }
    let trailers = body.trailers().await?.unwrap_or_default();
    let status = trailers
        .get("grpc-status")
        .or_else(|| parts.headers.get("grpc-status"))
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned())
        .unwrap_or_default();
    Ok(status)
}

/// HTTP/2 frame bytes: a 9-byte header and the payload.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// The process logged `text` once (its output is read by a thread: wait for the line).
pub fn assert_logged_once(s: &Sidecar, text: &str) {
    wait_until(Duration::from_secs(5), || lines_with(s, text) >= 1);
    assert_eq!(lines_with(s, text), 1, "lines with {text:?}");
}

/// Lines of the process output that contain `text`.
pub fn lines_with(s: &Sidecar, text: &str) -> usize {
    s.proc.dump().lines().filter(|l| l.contains(text)).count()
}
