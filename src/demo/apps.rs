//! The reference services of DESIGN.md §1 as small gRPC apps, the workloads meshd fronts.
//!
//! Flow: [`bind`] checks the options and binds a loopback TCP port (plaintext h2c: the
//! sidecar in front terminates mTLS); [`DemoApp::run`] mounts the chosen service plus
//! `grpc.health.v1.Health` (SERVING) and serves until `stop`, finishing in-flight calls.
//! Every handler reports the caller it saw in `x-forwarded-client-cert`. Payment, the
//! one app with downstreams, lives in `demo/payment.rs`; it calls contact, family and
//! document through the URLs it is given (its sidecar's outbound listeners).

/// The largest gRPC message the demo apps accept or send.
const MAX_MESSAGE: usize = 64 << 20;

use crate::config::parse_duration;
use crate::pb::contact::contact_service_server::{ContactService, ContactServiceServer};
use crate::pb::contact::{Contact, GetContactRequest, ListContactsRequest, UploadSummary};
use crate::pb::document::document_service_server::{DocumentService, DocumentServiceServer};
use crate::pb::document::{Document, GetDocumentRequest};
use crate::pb::family::family_service_server::{FamilyService, FamilyServiceServer};
use crate::pb::family::{Family, GetFamilyRequest};
use futures::{Stream, StreamExt};
use std::io::Write;
use std::net::SocketAddr;
use std::pin::Pin;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

pub use crate::demo::payment::PaymentApp;

/// The header a sidecar sets with the verified peer identity (Envoy's format).
pub const XFCC_HEADER: &str = "x-forwarded-client-cert";
/// The most messages one ListContacts call streams.
const MAX_LIST_COUNT: u32 = 100_000;
/// The largest payload ListContacts generates per message.
const MAX_PAYLOAD: u32 = 4 * 1024 * 1024;

/// Why a demo app could not start or serve.
#[derive(Debug, thiserror::Error)]
pub enum DemoAppError {
    /// Apps listen on loopback only: their sidecar is the only way in.
    #[error("demo app must listen on a loopback address, not {0}")]
    NotLoopback(SocketAddr),
    /// The listen address could not be bound.
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: SocketAddr, reason: String },
    /// Payment was started without the URL of a service it calls.
    #[error("payment needs --{0} (the URL of its sidecar's outbound listener for it)")]
    MissingDownstream(&'static str),
    /// A downstream URL is not `http://host:port` (plaintext h2c to the local sidecar).
    #[error("--{flag} `{url}` must be http://host:port: {reason}")]
    BadDownstreamUrl {
        flag: &'static str,
        url: String,
        reason: String,
    },
    /// The gRPC server failed while serving.
    #[error("demo app server failed: {0}")]
    Serve(String),
    /// `meshd demo-app` could not build its tokio runtime.
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// `meshd demo-app` could not listen for SIGINT or SIGTERM.
    #[error("{0}")]
    Signal(std::io::Error),
    /// `meshd demo-app` could not print its `demo-app ready` line.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Which reference service to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DemoService {
    Payment,
    Contact,
    Family,
    Document,
}

impl DemoService {
    /// The fully qualified gRPC service name, as health checks and policies name it.
    pub fn grpc_name(self) -> &'static str {
        match self {
            DemoService::Payment => "payment.v1.PaymentService",
            DemoService::Contact => "contact.v1.ContactService",
            DemoService::Family => "family.v1.FamilyService",
            DemoService::Document => "document.v1.DocumentService",
        }
    }
}

/// Options of a demo app.
#[derive(Debug, Clone, Default)]
pub struct DemoOptions {
    /// Added before answering every call (for drain tests).
    pub delay: Duration,
    /// Payment only: where to reach contact, e.g. `http://127.0.0.1:15101`.
    pub contact: Option<String>,
    /// Payment only: where to reach family.
    pub family: Option<String>,
    /// Payment only: where to reach document.
    pub document: Option<String>,
}

/// A bound, not yet serving, demo app.
pub struct DemoApp {
    listener: TcpListener,
    addr: SocketAddr,
    /// The service, built at bind time so bad downstream URLs fail before `ready`.
    handler: Handler,
}

/// The service a demo app mounts.
enum Handler {
    Payment(Box<PaymentApp>),
    Contact(Leaf),
    Family(Leaf),
    Document(Leaf),
}

/// Binds `listen` (loopback only) for the app `kind`; port 0 picks a free port.
pub async fn bind(
    kind: DemoService,
    listen: SocketAddr,
    opts: DemoOptions,
) -> Result<DemoApp, DemoAppError> {
    if !listen.ip().is_loopback() {
        return Err(DemoAppError::NotLoopback(listen));
    }
    let delay = opts.delay;
    let handler = match kind {
        DemoService::Payment => Handler::Payment(Box::new(PaymentApp::new(&opts)?)),
        DemoService::Contact => Handler::Contact(Leaf { delay }),
        DemoService::Family => Handler::Family(Leaf { delay }),
        DemoService::Document => Handler::Document(Leaf { delay }),
    };
    let fail = |e: std::io::Error| DemoAppError::Bind {
        addr: listen,
        reason: e.to_string(),
    };
    let listener = TcpListener::bind(listen).await.map_err(fail)?;
    let addr = listener.local_addr().map_err(fail)?;
    Ok(DemoApp {
        listener,
        addr,
        handler,
    })
}

/// Binds and serves in a spawned task until `stop`; returns the bound address.
pub async fn serve(
    kind: DemoService,
    listen: SocketAddr,
    opts: DemoOptions,
    stop: CancellationToken,
) -> Result<SocketAddr, DemoAppError> {
    let app = bind(kind, listen, opts).await?;
    let addr = app.addr();
    tokio::spawn(async move {
        if let Err(e) = app.run(stop).await {
            tracing::error!(%addr, "{e}");
        }
    });
    Ok(addr)
}

impl DemoApp {
    /// The bound address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Which service this app serves.
    pub fn kind(&self) -> DemoService {
        match self.handler {
            Handler::Payment(_) => DemoService::Payment,
            Handler::Contact(_) => DemoService::Contact,
            Handler::Family(_) => DemoService::Family,
            Handler::Document(_) => DemoService::Document,
        }
    }

    /// Serves until `stop`, then lets in-flight calls finish.
    pub async fn run(self, stop: CancellationToken) -> Result<(), DemoAppError> {
        let (reporter, health) = tonic_health::server::health_reporter();
        reporter
            .set_service_status(
                self.kind().grpc_name(),
                tonic_health::ServingStatus::Serving,
            )
            .await;
        let router = tonic::transport::Server::builder().add_service(health);
        let router = match self.handler {
            Handler::Payment(app) => router.add_service(app.into_server()),
            // Tests send 10 MB messages through the mesh; tonic's default cap is 4 MB.
            Handler::Contact(leaf) => router.add_service(
                ContactServiceServer::new(leaf)
                    .max_decoding_message_size(MAX_MESSAGE)
                    .max_encoding_message_size(MAX_MESSAGE),
            ),
            Handler::Family(leaf) => router.add_service(FamilyServiceServer::new(leaf)),
            Handler::Document(leaf) => router.add_service(DocumentServiceServer::new(leaf)),
        };
        // TCP_NODELAY, as tonic's own `serve` sets it: without it, a response written in
        // two pieces waits for the caller's delayed ACK (40 ms) when called directly.
        let incoming = TcpIncoming::from(self.listener).with_nodelay(Some(true));
        router
            .serve_with_incoming_shutdown(incoming, stop.cancelled())
            .await
            .map_err(|e| DemoAppError::Serve(e.to_string()))
    }
}

/// The caller's SPIFFE ID from the last element of an XFCC header (`By=..;URI=..`);
/// `None` when there is no `URI` key.
pub fn xfcc_uri(header: &str) -> Option<String> {
    let last = split_unquoted(header, ',').pop()?;
    split_unquoted(&last, ';').into_iter().find_map(|pair| {
        let (key, value) = pair.split_once('=')?;
        if !key.trim().eq_ignore_ascii_case("uri") {
            return None;
        }
        let v = value.trim();
        let v = match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
            Some(inner) => inner.replace("\\\"", "\""),
            None => v.to_string(),
        };
        Some(v)
    })
}

/// Splits on `sep` outside double quotes (XFCC quotes values holding `,`, `;` or `=`).
fn split_unquoted(text: &str, sep: char) -> Vec<String> {
    let mut parts = Vec::new();
    let mut part = String::new();
    let mut quoted = false;
    let mut escaped = false;
    for c in text.chars() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(std::mem::take(&mut part));
                continue;
            }
            _ => {}
        }
        part.push(c);
    }
    parts.push(part);
    parts
}

/// What a demo handler reports as its caller: the XFCC `URI`, or empty.
pub fn seen_caller<T>(request: &tonic::Request<T>) -> String {
    request
        .metadata()
        .get(XFCC_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(xfcc_uri)
        .unwrap_or_default()
}

/// Sleeps for the configured per-request delay.
pub(crate) async fn pause(delay: Duration) {
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
}

/// Contact, family and document: answers from nothing but the request.
struct Leaf {
    /// Added before each answer (drain tests).
    delay: Duration,
}

type Streamed<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl ContactService for Leaf {
    type ListContactsStream = Streamed<Contact>;
    type SyncContactsStream = Streamed<Contact>;

    async fn get_contact(
        &self,
        request: tonic::Request<GetContactRequest>,
    ) -> Result<tonic::Response<Contact>, tonic::Status> {
        pause(self.delay).await;
        let seen_caller = seen_caller(&request);
        let r = request.into_inner();
        Ok(tonic::Response::new(Contact {
            name: format!("Contact {}", r.contact_id),
            contact_id: r.contact_id,
            payload: r.payload,
            seen_caller,
        }))
    }

    async fn list_contacts(
        &self,
        request: tonic::Request<ListContactsRequest>,
    ) -> Result<tonic::Response<Self::ListContactsStream>, tonic::Status> {
        pause(self.delay).await;
        let seen_caller = seen_caller(&request);
        let r = request.into_inner();
        if r.count > MAX_LIST_COUNT || r.payload_size > MAX_PAYLOAD {
            return Err(tonic::Status::invalid_argument(format!(
                "count is at most {MAX_LIST_COUNT} and payload_size at most {MAX_PAYLOAD}"
            )));
        }
        let size = r.payload_size as usize;
        let stream = futures::stream::iter(0..r.count).map(move |i| {
            Ok(Contact {
                contact_id: format!("c{i}"),
                name: format!("Contact c{i}"),
                payload: vec![b'x'; size],
                seen_caller: seen_caller.clone(),
            })
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn upload_contacts(
        &self,
        request: tonic::Request<tonic::Streaming<Contact>>,
    ) -> Result<tonic::Response<UploadSummary>, tonic::Status> {
        pause(self.delay).await;
        let mut stream = request.into_inner();
        let mut summary = UploadSummary::default();
        while let Some(contact) = stream.message().await? {
            summary.count += 1;
            summary.bytes += contact.payload.len() as u64;
        }
        Ok(tonic::Response::new(summary))
    }

    async fn sync_contacts(
        &self,
        request: tonic::Request<tonic::Streaming<Contact>>,
    ) -> Result<tonic::Response<Self::SyncContactsStream>, tonic::Status> {
        pause(self.delay).await;
        let seen_caller = seen_caller(&request);
        let stream = request.into_inner().map(move |item| {
            item.map(|c| Contact {
                seen_caller: seen_caller.clone(),
                ..c
            })
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }
}

#[tonic::async_trait]
impl FamilyService for Leaf {
    async fn get_family(
        &self,
        request: tonic::Request<GetFamilyRequest>,
    ) -> Result<tonic::Response<Family>, tonic::Status> {
        pause(self.delay).await;
        let seen_caller = seen_caller(&request);
        let id = request.into_inner().family_id;
        Ok(tonic::Response::new(Family {
            name: format!("Family {id}"),
            family_id: id,
            seen_caller,
        }))
    }
}

#[tonic::async_trait]
impl DocumentService for Leaf {
    async fn get_document(
        &self,
        request: tonic::Request<GetDocumentRequest>,
    ) -> Result<tonic::Response<Document>, tonic::Status> {
        pause(self.delay).await;
        let seen_caller = seen_caller(&request);
        let id = request.into_inner().document_id;
        Ok(tonic::Response::new(Document {
            title: format!("Document {id}"),
            document_id: id,
            seen_caller,
        }))
    }
}

/// Arguments of `meshd demo-app`.
#[derive(clap::Args, Debug)]
pub struct DemoAppArgs {
    /// Which reference service to run.
    #[arg(long, value_enum)]
    pub service: DemoService,
    /// Loopback address to listen on (plaintext h2c).
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: SocketAddr,
    /// Payment only: URL of the contact service (its sidecar's outbound listener).
    #[arg(long)]
    pub contact: Option<String>,
    /// Payment only: URL of the family service.
    #[arg(long)]
    pub family: Option<String>,
    /// Payment only: URL of the document service.
    #[arg(long)]
    pub document: Option<String>,
    /// Delay added to every call, e.g. `500ms`.
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub delay: Duration,
}

/// Runs one demo app until SIGINT/SIGTERM, printing `demo-app ready <addr>` once bound.
pub fn demo_app_main(args: DemoAppArgs) -> Result<(), DemoAppError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DemoAppError::Runtime)?;
    runtime.block_on(async move {
        let opts = DemoOptions {
            delay: args.delay,
            contact: args.contact,
            family: args.family,
            document: args.document,
        };
        let app = bind(args.service, args.listen, opts).await?;
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt()).map_err(DemoAppError::Signal)?;
        let mut term = signal(SignalKind::terminate()).map_err(DemoAppError::Signal)?;
        let mut out = std::io::stdout().lock();
        writeln!(out, "demo-app ready {}", app.addr())
            .and_then(|_| out.flush())
            .map_err(DemoAppError::Stdout)?;
        drop(out);
        let stop = CancellationToken::new();
        let trigger = stop.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            trigger.cancel();
        });
        app.run(stop).await
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pb::contact::contact_service_client::ContactServiceClient;

    #[test]
    fn xfcc_parsing() {
        // Sidecars write Envoy-style XFCC; the apps read the last hop's URI.
        let table = [
            (
                "By=spiffe://jia.app/contact-service;URI=spiffe://jia.app/payment-service",
                Some("spiffe://jia.app/payment-service"),
            ),
            ("uri=spiffe://a/b", Some("spiffe://a/b")),
            (
                "URI=spiffe://a/first,By=x;URI=spiffe://a/last",
                Some("spiffe://a/last"),
            ),
            (
                "By=\"spiffe://a/x;y\";URI=\"spiffe://a/q\"",
                Some("spiffe://a/q"),
            ),
            (
                "Hash=abc;Subject=\"CN=a,O=b\";URI=spiffe://a/s",
                Some("spiffe://a/s"),
            ),
            ("By=spiffe://a/x", None),
            ("", None),
        ];
        for (header, want) in table {
            assert_eq!(xfcc_uri(header).as_deref(), want, "{header}");
        }
    }

    #[tokio::test]
    async fn refuses_non_loopback_and_missing_downstreams() {
        // Apps are only reachable through their sidecar, and payment needs its downstreams.
        let any: SocketAddr = "0.0.0.0:0".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let opts = DemoOptions::default();
        assert!(matches!(
            bind(DemoService::Contact, any, opts.clone()).await,
            Err(DemoAppError::NotLoopback(_))
        ));
        assert!(matches!(
            bind(DemoService::Payment, local, opts).await,
            Err(DemoAppError::MissingDownstream("contact"))
        ));
    }

    #[tokio::test]
    async fn contact_speaks_all_four_call_kinds() {
        // A data-plane test drives unary, server, client and bidi streams through contact.
        let stop = CancellationToken::new();
        let addr = serve(
            DemoService::Contact,
            "127.0.0.1:0".parse().unwrap(),
            DemoOptions::default(),
            stop.clone(),
        )
        .await
        .unwrap();
        let mut client = ContactServiceClient::connect(format!("http://{addr}"))
            .await
            .unwrap();
        let mut req = tonic::Request::new(GetContactRequest {
            contact_id: "c1".into(),
            payload: vec![7; 100_000],
        });
        req.metadata_mut().insert(
            XFCC_HEADER,
            "By=spiffe://jia.app/contact-service;URI=spiffe://jia.app/payment-service"
                .parse()
                .unwrap(),
        );
        let got = client.get_contact(req).await.unwrap().into_inner();
        assert_eq!(got.payload.len(), 100_000);
        assert_eq!(got.seen_caller, "spiffe://jia.app/payment-service");

        let listed: Vec<_> = client
            .list_contacts(ListContactsRequest {
                count: 5,
                payload_size: 10,
            })
            .await
            .unwrap()
            .into_inner()
            .collect()
            .await;
        assert_eq!(listed.len(), 5);
        assert!(listed
            .iter()
            .all(|c| c.as_ref().unwrap().payload.len() == 10));

        let contacts = |n: usize| {
            futures::stream::iter((0..n).map(|i| Contact {
                contact_id: format!("u{i}"),
                payload: vec![1; 3],
                ..Default::default()
            }))
        };
        let summary = client
            .upload_contacts(contacts(4))
            .await
            .unwrap()
            .into_inner();
        assert_eq!((summary.count, summary.bytes), (4, 12));
        let echoed: Vec<_> = client
            .sync_contacts(contacts(3))
            .await
            .unwrap()
            .into_inner()
            .map(|c| c.unwrap().contact_id)
            .collect()
            .await;
        assert_eq!(echoed, vec!["u0", "u1", "u2"]);

        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "contact.v1.ContactService".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
        stop.cancel();
    }
}
