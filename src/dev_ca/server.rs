//! The development CA's SPIFFE Workload API server: one unix socket per identity, no
//! attestation (the socket a workload dials decides which SVID it gets).
//!
//! Flow: [`DevCa::serve`] binds every socket first (so a caller can announce readiness),
//! then spawns per identity a rotator and a tonic server. The rotator issues an SVID,
//! publishes it with the current bundles on a `watch` channel, and issues again at half the
//! TTL or when `rotate_now`/`replace_ca` say so (`set_federated` only republishes). Every
//! `FetchX509SVID`/`FetchX509Bundles` stream follows that channel until `stop`; then the
//! servers shut down and remove their sockets. The JWT RPCs are answered by `dev_ca/jwt.rs`
//! for the socket's identity; one more task rotates the JWT authority at half the TTL.

use crate::dev_ca::{DevCa, DevCaError, IssuedSvid, MIN_TTL};
use crate::identity::SpiffeId;
use crate::pb::workload::spiffe_workload_api_server::{SpiffeWorkloadApi, SpiffeWorkloadApiServer};
use crate::pb::workload::{
    JwtBundlesRequest, JwtBundlesResponse, JwtsvidRequest, JwtsvidResponse, ValidateJwtsvidRequest,
    ValidateJwtsvidResponse, X509BundlesRequest, X509BundlesResponse, X509svid, X509svidRequest,
    X509svidResponse,
};
use futures::{Stream, StreamExt};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::UnixListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_stream::wrappers::{UnixListenerStream, WatchStream};
use tokio_util::sync::CancellationToken;

/// The header SPIRE requires on every Workload API call (a guard against SSRF).
const SECURITY_HEADER: &str = "workload.spiffe.io";
/// How long to wait before retrying a failed issuance.
const RETRY: Duration = Duration::from_secs(1);

/// What one identity's clients are currently told.
#[derive(Debug, Clone, PartialEq)]
struct Published {
    svid: IssuedSvid,
    /// The own trust domain's CA certificates, concatenated DER.
    bundle: Vec<u8>,
    /// Federated bundles keyed `spiffe://<td>` (as SPIRE sends them), concatenated DER.
    federated: HashMap<String, Vec<u8>>,
}

impl Published {
    fn x509_svid_response(&self) -> X509svidResponse {
        X509svidResponse {
            svids: vec![X509svid {
                spiffe_id: self.svid.id.clone(),
                x509_svid: self.svid.chain_der.concat(),
                x509_svid_key: self.svid.key_pkcs8_der.clone(),
                bundle: self.bundle.clone(),
                hint: String::new(),
            }],
            crl: vec![],
            federated_bundles: self.federated.clone(),
        }
    }

    fn bundles_response(&self, trust_domain: &str) -> X509BundlesResponse {
        let mut bundles = self.federated.clone();
        bundles.insert(format!("spiffe://{trust_domain}"), self.bundle.clone());
        X509BundlesResponse {
            crl: vec![],
            bundles,
        }
    }
}

/// Sockets being served; await [`Serving::finished`] after cancelling the stop token.
#[derive(Debug)]
pub struct Serving {
    /// The socket paths, in the order given.
    pub sockets: Vec<PathBuf>,
    /// Rotators and servers; each server removes its socket when it ends.
    tasks: JoinSet<()>,
}

impl Serving {
    /// Waits until every server and rotator has ended (after `stop`).
    pub async fn finished(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

impl DevCa {
    /// Binds one Workload API socket per identity and serves them until `stop`, rotating
    /// SVIDs at half of `ttl`. Returns once every socket is bound.
    pub async fn serve(
        self: Arc<Self>,
        identities: Vec<(SpiffeId, PathBuf)>,
        ttl: Duration,
        stop: CancellationToken,
    ) -> Result<Serving, DevCaError> {
        if ttl < MIN_TTL {
            return Err(DevCaError::TtlTooShort(ttl));
        }
        let mut seen = HashSet::new();
        for (_, path) in &identities {
            if !seen.insert(path.clone()) {
                return Err(DevCaError::DuplicateSocket(path.display().to_string()));
            }
        }
        let mut listeners = Vec::new();
        for (id, path) in identities {
            let listener = bind(&path)?;
            listeners.push((id, path, listener));
        }
        let mut tasks = JoinSet::new();
        let mut sockets = Vec::new();
        tasks.spawn(crate::dev_ca::jwt::rotate_periodically(
            self.clone(),
            ttl / 2,
            stop.clone(),
        ));
        for (id, path, listener) in listeners {
            // Issue the first SVID now so a client never waits on an empty channel.
            let first = self.publish(&id, ttl)?;
            let (tx, rx) = watch::channel(Arc::new(first));
            tasks.spawn(rotate(self.clone(), id.clone(), ttl, tx, stop.clone()));
            let service = WorkloadService {
                trust_domain: self.trust_domain().to_string(),
                current: rx,
                stop: stop.clone(),
                ca: self.clone(),
                id: id.clone(),
                ttl,
            };
            tasks.spawn(run_server(service, listener, path.clone(), stop.clone()));
            sockets.push(path);
        }
        Ok(Serving { sockets, tasks })
    }

    /// Issues an SVID for `id` and pairs it with the current bundles.
    fn publish(&self, id: &SpiffeId, ttl: Duration) -> Result<Published, DevCaError> {
        let svid = self.issue_svid(id, ttl)?;
        Ok(self.with_bundles(svid))
    }

    fn with_bundles(&self, svid: IssuedSvid) -> Published {
        let federated = self
            .federated()
            .into_iter()
            .map(|(td, cas)| (format!("spiffe://{td}"), cas.concat()))
            .collect::<BTreeMap<_, _>>();
        Published {
            svid,
            bundle: self.bundle_der().concat(),
            federated: federated.into_iter().collect(),
        }
    }
}

/// Prepares a socket path: parent directory, stale socket removed, then bound.
fn bind(path: &Path) -> Result<UnixListener, DevCaError> {
    let fail = |reason: String| DevCaError::Bind {
        path: path.display().to_string(),
        reason,
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| fail(e.to_string()))?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(fail(format!("cannot remove the stale socket: {e}"))),
    }
    UnixListener::bind(path).map_err(|e| fail(e.to_string()))
}

/// Keeps one identity's published SVID fresh until `stop`.
async fn rotate(
    ca: Arc<DevCa>,
    id: SpiffeId,
    ttl: Duration,
    tx: watch::Sender<Arc<Published>>,
    stop: CancellationToken,
) {
    let mut changes = ca.subscribe();
    let mut seen = *changes.borrow_and_update();
    let mut next = tokio::time::Instant::now() + ttl / 2;
    loop {
        let reissue = tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep_until(next) => true,
            r = changes.changed() => {
                if r.is_err() { return; }
                let now = *changes.borrow_and_update();
                let reissue = now.reissue != seen.reissue;
                let x509_bundles = now.bundles != seen.bundles;
                seen = now;
                // A JWT-only change (the JWT authority) is not news for X.509 clients.
                if !reissue && !x509_bundles {
                    continue;
                }
                reissue
            }
        };
        let published = if reissue {
            match ca.publish(&id, ttl) {
                Ok(p) => {
                    next = tokio::time::Instant::now() + ttl / 2;
                    p
                }
                Err(e) => {
                    tracing::error!(spiffe_id = %id, "dev-ca could not issue an SVID: {e}");
                    next = tokio::time::Instant::now() + RETRY;
                    continue;
                }
            }
        } else {
            ca.with_bundles(tx.borrow().svid.clone())
        };
        tracing::debug!(spiffe_id = %id, serial = %published.svid.serial, "dev-ca publishes");
        tx.send_replace(Arc::new(published));
    }
}

/// Serves one socket until `stop`, then removes it.
async fn run_server(
    service: WorkloadService,
    listener: UnixListener,
    path: PathBuf,
    stop: CancellationToken,
) {
    let result = tonic::transport::Server::builder()
        .add_service(SpiffeWorkloadApiServer::new(service))
        .serve_with_incoming_shutdown(UnixListenerStream::new(listener), stop.cancelled())
        .await;
    if let Err(e) = result {
        tracing::error!(socket = %path.display(), "dev-ca Workload API server failed: {e}");
    }
    let _ = std::fs::remove_file(&path);
}

/// The Workload API for the one identity bound to a socket.
struct WorkloadService {
    /// The trust domain name, the key of the own bundle in `FetchX509Bundles`.
    trust_domain: String,
    /// The identity's current SVID and bundles, kept fresh by its rotator.
    current: watch::Receiver<Arc<Published>>,
    /// Ends open streams, so the server's graceful shutdown completes.
    stop: CancellationToken,
    /// Signs JWT-SVIDs and holds the JWT bundles.
    ca: Arc<DevCa>,
    /// The identity this socket serves: the `sub` of its JWT-SVIDs.
    id: SpiffeId,
    /// The lifetime of its JWT-SVIDs (the CA's TTL).
    ttl: Duration,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, tonic::Status>> + Send>>;

impl WorkloadService {
    /// The current state, then every change, until `stop`.
    fn updates(&self) -> impl Stream<Item = Arc<Published>> + Send + 'static {
        WatchStream::new(self.current.clone()).take_until(self.stop.clone().cancelled_owned())
    }
}

/// Refuses calls without `workload.spiffe.io: true`, as SPIRE does.
fn check_header<T>(request: &tonic::Request<T>) -> Result<(), tonic::Status> {
    match request.metadata().get(SECURITY_HEADER) {
        Some(v) if v.as_bytes() == b"true" => Ok(()),
        _ => Err(tonic::Status::invalid_argument(
            "security header missing from request",
        )),
    }
}

#[tonic::async_trait]
impl SpiffeWorkloadApi for WorkloadService {
    type FetchX509SVIDStream = ResponseStream<X509svidResponse>;
    type FetchX509BundlesStream = ResponseStream<X509BundlesResponse>;
    type FetchJWTBundlesStream = ResponseStream<JwtBundlesResponse>;

    async fn fetch_x509svid(
        &self,
        request: tonic::Request<X509svidRequest>,
    ) -> Result<tonic::Response<Self::FetchX509SVIDStream>, tonic::Status> {
        check_header(&request)?;
        let stream = self.updates().map(|p| Ok(p.x509_svid_response()));
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn fetch_x509_bundles(
        &self,
        request: tonic::Request<X509BundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchX509BundlesStream>, tonic::Status> {
        check_header(&request)?;
        let td = self.trust_domain.clone();
        let mut last: Option<X509BundlesResponse> = None;
        // Only bundle changes matter here: an SVID rotation alone sends nothing.
        let stream = self.updates().filter_map(move |p| {
            let resp = p.bundles_response(&td);
            let fresh = last.as_ref() != Some(&resp);
            last = Some(resp.clone());
            std::future::ready(fresh.then_some(Ok(resp)))
        });
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn fetch_jwtsvid(
        &self,
        request: tonic::Request<JwtsvidRequest>,
    ) -> Result<tonic::Response<JwtsvidResponse>, tonic::Status> {
        check_header(&request)?;
        let response =
            crate::dev_ca::jwt::fetch_jwt_svid(&self.ca, &self.id, self.ttl, request.into_inner())?;
        Ok(tonic::Response::new(response))
    }

    async fn fetch_jwt_bundles(
        &self,
        request: tonic::Request<JwtBundlesRequest>,
    ) -> Result<tonic::Response<Self::FetchJWTBundlesStream>, tonic::Status> {
        check_header(&request)?;
        let stream = crate::dev_ca::jwt::jwt_bundles_stream(self.ca.clone(), self.stop.clone());
        Ok(tonic::Response::new(Box::pin(stream)))
    }

    async fn validate_jwtsvid(
        &self,
        request: tonic::Request<ValidateJwtsvidRequest>,
    ) -> Result<tonic::Response<ValidateJwtsvidResponse>, tonic::Status> {
        check_header(&request)?;
        let response = crate::dev_ca::jwt::validate(&self.ca, request.into_inner())?;
        Ok(tonic::Response::new(response))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::snapshot_from_context;
    use spiffe::{WorkloadApiClient, X509Context};

    const STEP: Duration = Duration::from_secs(10);

    fn id(s: &str) -> SpiffeId {
        SpiffeId::new(s).unwrap()
    }

    async fn next_ctx(
        stream: &mut (impl Stream<Item = Result<X509Context, spiffe::WorkloadApiError>> + Unpin),
    ) -> X509Context {
        tokio::time::timeout(STEP, stream.next())
            .await
            .expect("no Workload API update in time")
            .expect("stream ended")
            .expect("bad Workload API response")
    }

    async fn start(
        ca: &Arc<DevCa>,
        ids: &[&str],
        ttl: Duration,
    ) -> (tempfile::TempDir, Vec<String>, CancellationToken, Serving) {
        let dir = tempfile::tempdir().unwrap();
        let stop = CancellationToken::new();
        let identities: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, s)| (id(s), dir.path().join(format!("w{i}.sock"))))
            .collect();
        let serving = ca
            .clone()
            .serve(identities, ttl, stop.clone())
            .await
            .unwrap();
        let addrs = serving
            .sockets
            .iter()
            .map(|p| format!("unix://{}", p.display()))
            .collect();
        (dir, addrs, stop, serving)
    }

    #[tokio::test]
    async fn socket_decides_identity_and_meshd_accepts_it() {
        // Two workloads dial two sockets and each gets its own SVID, which meshd accepts.
        let ca = Arc::new(DevCa::new("jia.app").unwrap());
        let ids = [
            "spiffe://jia.app/payment-service",
            "spiffe://jia.app/contact-service",
        ];
        let (_dir, addrs, stop, serving) = start(&ca, &ids, Duration::from_secs(60)).await;
        for (addr, want) in addrs.iter().zip(ids) {
            let client = WorkloadApiClient::connect_to(addr).await.unwrap();
            let mut stream = client.stream_x509_contexts().await.unwrap();
            let ctx = next_ctx(&mut stream).await;
            let snap = snapshot_from_context(&ctx, Some(&id(want)), 1).unwrap();
            assert_eq!(snap.svid.id.to_string(), want);
            assert_eq!(snap.bundles.trust_domains(), vec!["jia.app".to_string()]);
        }
        stop.cancel();
        tokio::time::timeout(STEP, serving.finished())
            .await
            .expect("servers did not stop");
        for a in &addrs {
            let path = a.trim_start_matches("unix://");
            assert!(!Path::new(path).exists(), "socket {path} left behind");
        }
    }

    #[tokio::test]
    async fn rotate_now_and_half_ttl_send_new_serials() {
        // An operator forces a rotation, then the 2 s TTL rotates again on its own.
        let ca = Arc::new(DevCa::new("jia.app").unwrap());
        let (_dir, addrs, stop, _serving) =
            start(&ca, &["spiffe://jia.app/payment-service"], MIN_TTL).await;
        let client = WorkloadApiClient::connect_to(&addrs[0]).await.unwrap();
        let mut stream = client.stream_x509_contexts().await.unwrap();
        let serial = |ctx: &X509Context| snapshot_from_context(ctx, None, 1).unwrap().svid.serial;
        let first = serial(&next_ctx(&mut stream).await);
        ca.rotate_now();
        let second = serial(&next_ctx(&mut stream).await);
        assert_ne!(first, second);
        let third = serial(&next_ctx(&mut stream).await);
        assert_ne!(second, third, "half-TTL rotation");
        stop.cancel();
    }

    #[tokio::test]
    async fn federation_and_new_root_reach_the_client() {
        // The mesh federates with other.td, then replaces its root: clients see both changes.
        let ca = Arc::new(DevCa::new("jia.app").unwrap());
        let other = DevCa::new("other.td").unwrap();
        let (_dir, addrs, stop, _serving) = start(
            &ca,
            &["spiffe://jia.app/payment-service"],
            Duration::from_secs(60),
        )
        .await;
        let client = WorkloadApiClient::connect_to(&addrs[0]).await.unwrap();
        let mut stream = client.stream_x509_contexts().await.unwrap();
        let old_root = next_ctx(&mut stream).await;
        ca.set_federated("other.td", other.bundle_der());
        let ctx = next_ctx(&mut stream).await;
        let snap = snapshot_from_context(&ctx, None, 2).unwrap();
        assert_eq!(snap.bundles.trust_domains(), vec!["jia.app", "other.td"]);
        assert_eq!(
            snap.bundles.for_domain("other.td").unwrap()[0].as_ref(),
            other.bundle_der()[0].as_slice()
        );
        ca.replace_ca().unwrap();
        let ctx = next_ctx(&mut stream).await;
        let snap = snapshot_from_context(&ctx, None, 3).unwrap();
        let td = spiffe::TrustDomain::new("jia.app").unwrap();
        let before = old_root.bundle_set().get(&td).unwrap().authorities()[0].clone();
        let after = snap.bundles.for_domain("jia.app").unwrap()[0].clone();
        assert_ne!(before.as_bytes(), after.as_ref());
        assert_eq!(after.as_ref(), ca.bundle_der()[0].as_slice());
        stop.cancel();
    }

    #[tokio::test]
    async fn bundles_stream_and_header_and_jwt() {
        // A bundle-only client sees federation; a client without the SPIFFE header is refused.
        let ca = Arc::new(DevCa::new("jia.app").unwrap());
        let (_dir, addrs, stop, _serving) = start(
            &ca,
            &["spiffe://jia.app/payment-service"],
            Duration::from_secs(60),
        )
        .await;
        let client = WorkloadApiClient::connect_to(&addrs[0]).await.unwrap();
        let mut bundles = client.stream_x509_bundles().await.unwrap();
        let first = tokio::time::timeout(STEP, bundles.next()).await.unwrap();
        assert_eq!(first.unwrap().unwrap().iter().count(), 1);
        ca.set_federated("other.td", DevCa::new("other.td").unwrap().bundle_der());
        let second = tokio::time::timeout(STEP, bundles.next()).await.unwrap();
        assert_eq!(second.unwrap().unwrap().iter().count(), 2);

        use crate::pb::workload::spiffe_workload_api_client::SpiffeWorkloadApiClient;
        let path = PathBuf::from(addrs[0].trim_start_matches("unix://"));
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(UnixConnector(path))
            .await
            .unwrap();
        let mut raw = SpiffeWorkloadApiClient::new(channel);
        let err = match raw.fetch_x509svid(X509svidRequest {}).await {
            Ok(_) => panic!("a call without the security header must fail"),
            Err(e) => e,
        };
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        let mut req = tonic::Request::new(JwtsvidRequest::default());
        req.metadata_mut()
            .insert(SECURITY_HEADER, "true".parse().unwrap());
        let err = raw.fetch_jwtsvid(req).await.err().unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "no audience");
        let err = raw
            .fetch_jwtsvid(JwtsvidRequest {
                audience: vec!["x".into()],
                spiffe_id: String::new(),
            })
            .await
            .err()
            .unwrap();
        assert_eq!(err.code(), tonic::Code::InvalidArgument, "no header");
        stop.cancel();
    }

    #[tokio::test]
    async fn bad_input_is_an_error() {
        // A too-short TTL or one socket for two identities is refused before binding.
        let ca = Arc::new(DevCa::new("jia.app").unwrap());
        let stop = CancellationToken::new();
        let p = PathBuf::from("/tmp/meshd-never-bound.sock");
        let a = id("spiffe://jia.app/a");
        let short = ca
            .clone()
            .serve(
                vec![(a.clone(), p.clone())],
                Duration::from_millis(500),
                stop.clone(),
            )
            .await;
        assert!(matches!(short, Err(DevCaError::TtlTooShort(_))));
        let dup = ca
            .clone()
            .serve(vec![(a.clone(), p.clone()), (a, p)], MIN_TTL, stop)
            .await;
        assert!(matches!(dup, Err(DevCaError::DuplicateSocket(_))));
    }

    /// Dials one unix socket for a raw tonic channel (a client that omits the header).
    #[derive(Clone)]
    struct UnixConnector(PathBuf);

    type Dialed = hyper_util::rt::TokioIo<tokio::net::UnixStream>;

    impl tonic::codegen::Service<http::Uri> for UnixConnector {
        type Response = Dialed;
        type Error = std::io::Error;
        type Future = Pin<Box<dyn std::future::Future<Output = std::io::Result<Dialed>> + Send>>;

        fn poll_ready(
            &mut self,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Result<(), Self::Error>> {
            std::task::Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Uri) -> Self::Future {
            let path = self.0.clone();
            Box::pin(async move {
                tokio::net::UnixStream::connect(path)
                    .await
                    .map(hyper_util::rt::TokioIo::new)
            })
        }
    }
}
