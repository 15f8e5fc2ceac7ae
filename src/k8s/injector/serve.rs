//! The injector's HTTPS server: TLS from reloadable files, four routes, bounded requests.
//!
//! Flow: [`main`] loads the serving certificate (a bad one at start is an error), starts
//! the watcher that reloads it when either file's mtime changes (polled every 2 s, as the
//! gateway's files are; a bad file keeps the last good certificate), installs the
//! Prometheus recorder and accepts connections until SIGTERM or Ctrl-C. Each connection
//! gets a TLS handshake (bounded in time), then HTTP/1.1 with a header timeout; each
//! request [`route`]s: `POST /inject` (JSON only, at most [`MAX_BODY`], answered within
//! [`REQUEST_TIMEOUT`]), `GET /ready`, `/live`, `/metrics`. One log line per review.

use super::super::inject::SidecarOptions;
use super::review::review;
use crate::identity::crypto_provider;
use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// The largest AdmissionReview read (413 above): a pod is a few KiB; the API server's own
/// request limit is 3 MiB, for objects far bigger than pods.
pub const MAX_BODY: usize = 1024 * 1024;
/// The longest one request may take, body included (the webhook's timeoutSeconds is 5).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the certificate files' mtimes are read.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// The metric of every request, by `result`.
const REQUESTS: &str = "meshd_injector_requests_total";
/// The results counted, each shown from the start at 0.
const RESULTS: [&str; 4] = ["injected", "skipped", "error", "bad_request"];

/// The options of `meshd injector` (serving).
#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// The address to serve HTTPS on.
    #[arg(long, default_value = "0.0.0.0:9443")]
    pub listen: SocketAddr,
    /// The serving certificate chain (PEM); reloaded when it changes.
    #[arg(long, required = true)]
    pub tls_cert: Option<PathBuf>,
    /// The serving certificate's private key (PEM); reloaded when it changes.
    #[arg(long, required = true)]
    pub tls_key: Option<PathBuf>,
    /// What the sidecar is made of, as for `meshd inject`.
    #[command(flatten)]
    pub sidecar: SidecarOptions,
}

/// Why the injector could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// --tls-cert or --tls-key is missing.
    #[error("give --tls-cert FILE and --tls-key FILE")]
    NoCertificate,
    /// A certificate or key file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A file holds no PEM certificate or key.
    #[error("{path}: no PEM {what} in it")]
    NoPem { path: PathBuf, what: &'static str },
    /// rustls refused the key, or the key does not match the certificate.
    #[error("the serving certificate and key: {0}")]
    Key(rustls::Error),
    /// The runtime, the listener or the metrics recorder could not start.
    #[error("cannot start: {0}")]
    Start(String),
}

/// Reads the serving certificate and key into what rustls serves.
pub fn load_certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, ServeError> {
    let read = |path: &Path| {
        std::fs::read(path).map_err(|error| ServeError::Read {
            path: path.to_path_buf(),
            error,
        })
    };
    let (cert_pem, key_pem) = (read(cert)?, read(key)?);
    let chain: Vec<_> = rustls_pemfile::certs(&mut cert_pem.as_slice())
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(ServeError::NoPem {
            path: cert.to_path_buf(),
            what: "certificate",
        });
    }
    let Some(der) = rustls_pemfile::private_key(&mut key_pem.as_slice())
        .ok()
        .flatten()
    else {
        return Err(ServeError::NoPem {
            path: key.to_path_buf(),
            what: "private key",
        });
    };
    CertifiedKey::from_der(chain, der, &crypto_provider()).map_err(ServeError::Key)
}

/// The serving certificate of every handshake: the last good one loaded.
#[derive(Debug)]
struct Certificate {
    /// Swapped by the watcher on a good reload.
    current: ArcSwap<CertifiedKey>,
}

impl ResolvesServerCert for Certificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load_full())
    }
}

/// What every request needs.
struct Shared {
    /// The sidecar the pods get.
    sidecar: SidecarOptions,
    /// Renders /metrics.
    metrics: PrometheusHandle,
}

/// Serves until SIGTERM or Ctrl-C.
pub fn main(args: ServeArgs) -> Result<(), ServeError> {
    let (Some(cert), Some(key)) = (args.tls_cert.clone(), args.tls_key.clone()) else {
        return Err(ServeError::NoCertificate);
    };
    crate::telemetry::init_logging("info");
    let first = load_certified_key(&cert, &key)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| ServeError::Start(e.to_string()))?;
    let metrics =
        crate::telemetry::install_metrics().map_err(|e| ServeError::Start(e.to_string()))?;
    metrics::describe_counter!(
        REQUESTS,
        "Admission requests answered by meshd injector, by result."
    );
    for r in RESULTS {
        metrics::counter!(REQUESTS, "result" => r).absolute(0);
    }
    let shared = Arc::new(Shared {
        sidecar: args.sidecar,
        metrics,
    });
    runtime.block_on(async move {
        let resolver = Arc::new(Certificate {
            current: ArcSwap::from_pointee(first),
        });
        tokio::spawn(watch_files(resolver.clone(), cert, key));
        let mut tls = rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .map_err(ServeError::Key)?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .map_err(|e| ServeError::Start(format!("bind {}: {e}", args.listen)))?;
        let local = listener.local_addr().unwrap_or(args.listen);
        tracing::info!(listen = %local, "meshd injector serving /inject");
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .map_err(|e| ServeError::Start(e.to_string()))?;
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((tcp, _)) = accepted else { continue };
                    tokio::spawn(connection(acceptor.clone(), tcp, shared.clone()));
                }
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
            }
        }
        tracing::info!("meshd injector stopped");
        Ok(())
    })
}

/// Reloads the certificate when either file's mtime changes; keeps the last good one.
async fn watch_files(resolver: Arc<Certificate>, cert: PathBuf, key: PathBuf) {
    let mtimes = |c: &Path, k: &Path| -> [Option<SystemTime>; 2] {
        [c, k].map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
    };
    let mut seen = mtimes(&cert, &key);
    loop {
        tokio::time::sleep(RELOAD_EVERY).await;
        let now = mtimes(&cert, &key);
        if now == seen {
            continue;
        }
        seen = now;
        match load_certified_key(&cert, &key) {
            Ok(k) => {
                resolver.current.store(Arc::new(k));
                tracing::info!(cert = %cert.display(), "serving certificate reloaded");
            }
            Err(e) => {
                tracing::warn!(error = %e, "serving certificate not reloaded, keeping the last good one")
            }
        }
    }
}

/// One connection: the TLS handshake, then HTTP/1.1.
async fn connection(
    acceptor: tokio_rustls::TlsAcceptor,
    tcp: tokio::net::TcpStream,
    shared: Arc<Shared>,
) {
    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
        return;
    };
    let service = hyper::service::service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, &shared).await) }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HANDSHAKE_TIMEOUT)
        .serve_connection(TokioIo::new(tls), service)
        .await;
}

type Reply = Response<Full<Bytes>>;

fn reply(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Reply {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    if let Ok(v) = header::HeaderValue::from_str(content_type) {
        r.headers_mut().insert(header::CONTENT_TYPE, v);
    }
    r
}

/// Routes one request.
async fn route<B>(req: Request<B>, shared: &Shared) -> Reply
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let get = req.method() == Method::GET;
    match req.uri().path() {
        "/ready" | "/live" if get => reply(StatusCode::OK, "text/plain", "ok\n"),
        "/metrics" if get => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            shared.metrics.render(),
        ),
        "/inject" => match tokio::time::timeout(REQUEST_TIMEOUT, inject(req, shared)).await {
            Ok(r) => r,
            Err(_) => refused(StatusCode::REQUEST_TIMEOUT, "the request took too long"),
        },
        "/ready" | "/live" | "/metrics" => {
            let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
            r.headers_mut()
                .insert(header::ALLOW, header::HeaderValue::from_static("GET"));
            r
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    }
}

/// A request to /inject refused before any review: counted and logged as bad_request.
fn refused(status: StatusCode, why: &str) -> Reply {
    count_and_log("", "", "bad_request", why);
    let mut r = reply(status, "text/plain", format!("{why}\n"));
    if status == StatusCode::METHOD_NOT_ALLOWED {
        r.headers_mut()
            .insert(header::ALLOW, header::HeaderValue::from_static("POST"));
    }
    r
}

fn count_and_log(uid: &str, pod: &str, result: &'static str, reason: &str) {
    metrics::counter!(REQUESTS, "result" => result).increment(1);
    tracing::info!(uid, pod, result, reason, "admission review");
}

/// `POST /inject`: a JSON AdmissionReview in, one out.
async fn inject<B>(req: Request<B>, shared: &Shared) -> Reply
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    if req.method() != Method::POST {
        return refused(StatusCode::METHOD_NOT_ALLOWED, "POST an AdmissionReview");
    }
    let json = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
    if !json {
        return refused(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "the body must be application/json",
        );
    }
    let too_big = "the body is larger than 1 MiB";
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return refused(StatusCode::PAYLOAD_TOO_LARGE, too_big);
    }
    let body = match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return refused(StatusCode::PAYLOAD_TOO_LARGE, too_big)
        }
        Err(_) => return refused(StatusCode::BAD_REQUEST, "the body could not be read"),
    };
    match review(&body, &shared.sidecar) {
        Ok(answer) => {
            count_and_log(
                &answer.uid,
                &answer.pod,
                answer.verdict.as_str(),
                &answer.reason,
            );
            let bytes = serde_json::to_vec(&answer.review).unwrap_or_default();
            reply(StatusCode::OK, "application/json", bytes)
        }
        Err(e) => refused(StatusCode::BAD_REQUEST, &e.to_string()),
    }
}
