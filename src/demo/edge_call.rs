//! A JSON client of the demo's edge gateway, as a web or mobile client would be: HTTPS
//! (HTTP/1.1) trusting the gateway's own certificate, a bearer token, a JSON body. The
//! tour's JSON step makes the design's CreatePayment call with it.
//!
//! Flow: [`json_call`] dials the gateway, checks its certificate for `localhost` against
//! the demo's `gateway/tls.pem`, sends one request and reads the whole answer.

use crate::demo::gateway::GatewayFiles;
use crate::demo::tour::{short, Step};
use crate::demo::{spiffe_id, Topology};
use http_body_util::{BodyExt, Full};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// Why the JSON call got no answer.
#[derive(Debug, thiserror::Error)]
pub enum EdgeCallError {
    /// The gateway's certificate or the token could not be read.
    #[error("{path}: {error}")]
    Read {
        path: std::path::PathBuf,
        error: std::io::Error,
    },
    /// The gateway's certificate file holds no usable certificate.
    #[error("{0}: no certificate rustls accepts")]
    BadCertificate(std::path::PathBuf),
    /// TCP or TLS to the gateway failed.
    #[error("connecting to https://{addr}: {error}")]
    Connect {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP to https://{addr}: {error}")]
    Http {
        addr: SocketAddr,
        error: hyper::Error,
    },
    /// The request could not be built (a bad path or token).
    #[error("the request: {0}")]
    Request(#[from] http::Error),
    /// No answer in time.
    #[error("no answer from https://{0} in 5 s")]
    Timeout(SocketAddr),
}

/// What the gateway answered.
#[derive(Debug)]
pub struct JsonAnswer {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `method path` with the demo token and `body` as JSON (none when empty), over HTTPS.
pub async fn json_call(
    port: u16,
    files: &GatewayFiles,
    method: http::Method,
    path: &str,
    body: &str,
) -> Result<JsonAnswer, EdgeCallError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    tokio::time::timeout(
        Duration::from_secs(5),
        exchange(addr, files, method, path, body),
    )
    .await
    .map_err(|_| EdgeCallError::Timeout(addr))?
}

async fn exchange(
    addr: SocketAddr,
    files: &GatewayFiles,
    method: http::Method,
    path: &str,
    body: &str,
) -> Result<JsonAnswer, EdgeCallError> {
    use rustls_pki_types::pem::PemObject;
    let read = |path: &std::path::Path| {
        std::fs::read(path).map_err(|error| EdgeCallError::Read {
            path: path.to_path_buf(),
            error,
        })
    };
    let token = String::from_utf8_lossy(&read(&files.token)?)
        .trim()
        .to_string();
    let bad_cert = || EdgeCallError::BadCertificate(files.cert.clone());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pki_types::CertificateDer::pem_slice_iter(&read(&files.cert)?) {
        roots
            .add(cert.map_err(|_| bad_cert())?)
            .map_err(|_| bad_cert())?;
    }
    let config = rustls::ClientConfig::builder_with_provider(crate::identity::crypto_provider())
        .with_safe_default_protocol_versions()
        .map_err(|_| bad_cert())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connect = |error| EdgeCallError::Connect { addr, error };
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(connect)?;
    let name = rustls_pki_types::ServerName::try_from("localhost").map_err(|_| bad_cert())?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .map_err(connect)?;
    let http = |error| EdgeCallError::Http { addr, error };
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
            .await
            .map_err(http)?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header(http::header::HOST, format!("localhost:{}", addr.port()))
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"));
    if !body.is_empty() {
        req = req.header(http::header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(Full::new(bytes::Bytes::from(body.to_string())))?;
    let resp = sender.send_request(req).await.map_err(http)?;
    let status = resp.status().as_u16();
    let content_type = (resp.headers().get(http::header::CONTENT_TYPE))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let body = resp.into_body().collect().await.map_err(http)?.to_bytes();
    Ok(JsonAnswer {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The design's CreatePayment body, verbatim (DESIGN.md's curl command).
pub const DESIGN_BODY: &str = r#"{"amount": 2999, "currency": "usd", "payment_method": "credit_card", "customer_id": "user_123"}"#;

/// Step 6: a JSON client calls the edge gateway as the design does (its CreatePayment
/// body verbatim, then ListPricingZones as a GET); both come back as JSON.
pub async fn json_at_the_edge(t: &Topology) -> Step {
    const NAME: &str = "JSON at the edge";
    let (port, files) = &t.gateway;
    let create = "/payment.v1.PaymentService/CreatePayment";
    let mut detail = Vec::new();
    let mut passed = true;
    match json_call(*port, files, http::Method::POST, create, DESIGN_BODY).await {
        Ok(a) => {
            let payment: serde_json::Value = serde_json::from_str(&a.body).unwrap_or_default();
            let ok = a.status == 200
                && a.content_type == "application/json"
                && payment["amountCents"] == "2999"
                && payment["customerId"] == "user_123"
                && payment["identityChain"][0] == spiffe_id("api-gateway").as_str();
            passed &= ok;
            detail.push(format!(
                "POST {create} (the design's JSON): {} {}",
                a.status, a.content_type
            ));
            detail.push(format!("  {}", short(&a.body)));
        }
        Err(e) => {
            passed = false;
            detail.push(format!("POST {create}: {e}"));
        }
    }
    let zones = "/payment.v1.PaymentService/ListPricingZones";
    match json_call(*port, files, http::Method::GET, zones, "").await {
        Ok(a) => {
            passed &= a.status == 200 && a.body.contains("\"zones\"");
            detail.push(format!("GET {zones}: {} {}", a.status, short(&a.body)));
        }
        Err(e) => {
            passed = false;
            detail.push(format!("GET {zones}: {e}"));
        }
    }
    Step::new(NAME, passed, detail)
}
