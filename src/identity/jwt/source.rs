//! The JWT side of the Workload API client: the JWT bundles stream, JWT-SVIDs for an
//! audience, and validation by the agent. Every call carries the `workload.spiffe.io:
//! true` metadata (the `spiffe` crate's client adds it).
//!
//! Flow: [`follow_jwt_bundles`] streams `FetchJWTBundles` and publishes each message whole
//! as a [`JwtBundlesStatus`] on a `watch` channel; it reconnects with capped backoff while
//! the agent is unavailable (keeping the last bundles) or says PermissionDenied (dropping
//! them: the standard says redacted bundles are no longer used), and stops for good on
//! InvalidArgument or Unimplemented, which a retry cannot fix ([`retry_decision`]).
//! [`JwtSvidSource`] fetches a JWT-SVID per audience set (`FetchJWTSVID`), caches it and
//! fetches a new one once half its lifetime has passed; while the agent is down it keeps
//! serving the cached token until it expires. [`JwtSvidSource::validate`] asks the agent
//! (`ValidateJWTSVID`). The same errors decide retries there, bounded by a patience.

use crate::identity::jwt::{JwtBundle, JwtBundleError, JwtBundles};
use crate::identity::workload_api::Backoff;
use crate::identity::SpiffeId;
use futures::StreamExt;
use spiffe::transport::{GrpcStatusCode, TransportError};
use spiffe::{JwtBundleSet, JwtSvid, WorkloadApiClient, WorkloadApiError};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The longest wait between reconnection attempts.
const BACKOFF_CAP: Duration = Duration::from_secs(5);
/// How long a refresh that failed waits before the next caller tries again.
const REFRESH_RETRY: Duration = Duration::from_secs(1);

/// What to do after a Workload API error (the SPIFFE Workload Endpoint standard,
/// appendix A).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// InvalidArgument, Unimplemented, a bad address or a malformed answer: report it,
    /// do not retry (the same call would fail the same way).
    Report,
    /// Unavailable, PermissionDenied (the identity may not be provisioned yet),
    /// unreachable or any other transient failure: back off and retry.
    BackOff,
}

/// Decides whether a failed Workload API call is worth retrying.
pub fn retry_decision(e: &WorkloadApiError) -> RetryDecision {
    match e {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_) => {
            RetryDecision::BackOff
        }
        WorkloadApiError::Transport(TransportError::Status(s)) => match s.code() {
            GrpcStatusCode::InvalidArgument | GrpcStatusCode::Unimplemented => {
                RetryDecision::Report
            }
            _ => RetryDecision::BackOff,
        },
        WorkloadApiError::Transport(TransportError::Connect(_)) => RetryDecision::BackOff,
        _ => RetryDecision::Report,
    }
}

/// Whether the agent said this workload may not have what it asked for.
fn is_permission_denied(e: &WorkloadApiError) -> bool {
    matches!(
        e,
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_)
    )
}

/// Why a JWT-side Workload API call gave no answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtApiError {
    /// A JWT-SVID was asked for with no audience (the Workload API requires one).
    #[error("a JWT-SVID needs at least one audience")]
    NoAudience,
    /// The agent refused for good (InvalidArgument, Unimplemented) or answered something
    /// malformed: not retried. For `ValidateJWTSVID` this is how an invalid token ends.
    #[error("{rpc} refused: {reason}")]
    Refused { rpc: &'static str, reason: String },
    /// The agent stayed unreachable, unavailable or without an identity for us for the
    /// whole patience.
    #[error("{rpc} failed for {waited:?}: {reason}")]
    Unavailable {
        rpc: &'static str,
        reason: String,
        waited: Duration,
    },
}

/// How the JWT bundles stream is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwtStreamState {
    /// The identity source has no JWT side (`identity.files`).
    Off { reason: String },
    /// Not (or no longer) streaming; retrying with backoff.
    Connecting { reason: String },
    /// Streaming: the bundles follow the agent.
    Following,
    /// The agent refused for good (InvalidArgument, Unimplemented): not retried.
    GaveUp { reason: String },
}

/// The JWT bundles as the rest of the program sees them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtBundlesStatus {
    /// The last bundles received: kept while the agent is unreachable (JWT bundles do not
    /// expire), dropped when it says PermissionDenied.
    pub bundles: Option<Arc<JwtBundles>>,
    /// The stream's state, shown at `/identity`.
    pub state: JwtStreamState,
    /// Counts bundle messages received; the first is 1.
    pub generation: u64,
}

impl JwtBundlesStatus {
    /// The status before the first message.
    pub fn waiting() -> JwtBundlesStatus {
        JwtBundlesStatus {
            bundles: None,
            state: JwtStreamState::Connecting {
                reason: "waiting for the first JWT bundles".into(),
            },
            generation: 0,
        }
    }

    /// The status of an identity source without JWT bundles.
    pub fn off(reason: &str) -> JwtBundlesStatus {
        JwtBundlesStatus {
            bundles: None,
            state: JwtStreamState::Off {
                reason: reason.to_string(),
            },
            generation: 0,
        }
    }
}

/// Turns one `FetchJWTBundles` message (as the `spiffe` crate parsed it) into bundles.
pub fn jwt_bundles_from_set(set: &JwtBundleSet) -> Result<JwtBundles, JwtBundleError> {
    let mut out = JwtBundles::default();
    for (td, bundle) in set.iter() {
        let jwks: Vec<serde_json::Value> = bundle
            .jwt_authorities()
            .filter_map(|a| serde_json::from_slice(a.jwk_json()).ok())
            .collect();
        let parsed = JwtBundle::from_jwk_values(td.as_str(), &jwks)?;
        out.domains.insert(td.as_str().to_string(), parsed);
    }
    Ok(out)
}

/// Streams JWT bundles from `address` into `status` until `stop`.
pub async fn follow_jwt_bundles(
    address: String,
    status: watch::Sender<JwtBundlesStatus>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(BACKOFF_CAP);
    let mut last_reason = String::new();
    loop {
        let ended = tokio::select! {
            _ = stop.cancelled() => return,
            e = stream_once(&address, &status, &mut backoff) => e,
        };
        let reason = format!("JWT bundles from the Workload API: {ended}");
        if retry_decision(&ended) == RetryDecision::Report {
            tracing::error!(address = %address, "{reason}; not retrying");
            status.send_modify(|s| s.state = JwtStreamState::GaveUp { reason });
            return;
        }
        if reason != last_reason {
            tracing::warn!(address = %address, "{reason}; retrying");
            last_reason = reason.clone();
        }
        let drop_bundles = is_permission_denied(&ended);
        status.send_modify(|s| {
            s.state = JwtStreamState::Connecting { reason };
            if drop_bundles {
                s.bundles = None;
            }
        });
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}

/// One connection: publishes every message until the stream fails; returns why.
async fn stream_once(
    address: &str,
    status: &watch::Sender<JwtBundlesStatus>,
    backoff: &mut Backoff,
) -> WorkloadApiError {
    let client = match WorkloadApiClient::connect_to(address).await {
        Ok(c) => c,
        Err(e) => return e,
    };
    let mut stream = match client.stream_jwt_bundles().await {
        Ok(s) => Box::pin(s),
        Err(e) => return e,
    };
    loop {
        let set = match stream.next().await {
            None => {
                return WorkloadApiError::Transport(TransportError::status(
                    GrpcStatusCode::Unavailable,
                    "the Workload API closed the JWT bundles stream",
                ))
            }
            Some(Ok(set)) => set,
            Some(Err(e)) if retry_decision(&e) == RetryDecision::Report && !is_status(&e) => {
                // A malformed message: discard it and keep the previous bundles.
                tracing::warn!("discarding a JWT bundles message: {e}");
                continue;
            }
            Some(Err(e)) => return e,
        };
        backoff.reset();
        match jwt_bundles_from_set(&set) {
            Ok(bundles) => {
                let mut first = false;
                status.send_modify(|s| {
                    s.generation += 1;
                    first = s.generation == 1;
                    s.bundles = Some(Arc::new(bundles.clone()));
                    s.state = JwtStreamState::Following;
                });
                let keys: Vec<String> = bundles
                    .domains
                    .iter()
                    .map(|(td, b)| format!("{td}: {}", b.key_ids().join(",")))
                    .collect();
                tracing::info!(
                    keys = ?keys,
                    "{}", if first { "received JWT bundles" } else { "JWT bundles updated" }
                );
            }
            Err(e) => tracing::warn!("discarding a JWT bundles message: {e}"),
        }
    }
}

/// Whether an error is a gRPC status or transport failure (as opposed to a bad message).
fn is_status(e: &WorkloadApiError) -> bool {
    matches!(
        e,
        WorkloadApiError::Transport(_)
            | WorkloadApiError::NoIdentityIssued
            | WorkloadApiError::PermissionDenied(_)
    )
}

/// A JWT-SVID fetched for an audience. `Debug` never shows the token.
#[derive(Clone)]
pub struct JwtSvidToken {
    /// The parsed JWT-SVID; its token is zeroized on drop.
    svid: JwtSvid,
    /// When meshd fetched it: the start of its lifetime as meshd sees it.
    pub fetched_at: SystemTime,
    /// `exp`.
    pub expiry: SystemTime,
    /// When the next caller should fetch a new one (half its lifetime, or soon after a
    /// failed refresh).
    pub refresh_at: SystemTime,
}

impl std::fmt::Debug for JwtSvidToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvidToken")
            .field("spiffe_id", &self.spiffe_id().to_string())
            .field("audience", &self.audience())
            .field("expiry", &crate::identity::unix_seconds(self.expiry))
            .finish_non_exhaustive()
    }
}

impl JwtSvidToken {
    pub(super) fn new(svid: JwtSvid, fetched_at: SystemTime) -> JwtSvidToken {
        let expiry = UNIX_EPOCH + Duration::from_secs(svid.claims().exp().max(0) as u64);
        let life = expiry.duration_since(fetched_at).unwrap_or_default();
        JwtSvidToken {
            svid,
            fetched_at,
            expiry,
            refresh_at: fetched_at + life / 2,
        }
    }

    /// The serialized token: a secret, for an `authorization` header only.
    pub fn token(&self) -> &str {
        self.svid.token()
    }

    /// `Bearer <token>` as a header value marked sensitive (HPACK never indexes it).
    pub fn authorization(&self) -> Option<http::HeaderValue> {
        let mut v = http::HeaderValue::try_from(format!("Bearer {}", self.token())).ok()?;
        v.set_sensitive(true);
        Some(v)
    }

    /// The subject: our own SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        self.svid.spiffe_id()
    }

    /// The `aud` values.
    pub fn audience(&self) -> &[String] {
        self.svid.audience()
    }

    /// The `kid` header.
    pub fn key_id(&self) -> &str {
        self.svid.key_id()
    }
}

/// JWT-SVIDs from the Workload API, cached per audience set. Share it as `Arc`.
pub struct JwtSvidSource {
    /// The Workload API address, e.g. `unix:///run/spire/sockets/agent.sock`.
    address: String,
    /// The SPIFFE ID to ask for (`identity.expect`); `None` takes the default identity.
    spiffe_id: Option<SpiffeId>,
    /// How long one call may keep retrying an unavailable agent.
    patience: Duration,
    /// The connected client; dropped after a failure so the next call reconnects.
    client: tokio::sync::Mutex<Option<WorkloadApiClient>>,
    /// Tokens by audience set (sorted, without duplicates).
    cache: Mutex<HashMap<Vec<String>, Arc<JwtSvidToken>>>,
    /// One fetch at a time: concurrent callers for an expired token make one call.
    fetching: tokio::sync::Mutex<()>,
    /// The JWT bundles meshd follows, when given: a cached token whose key has left its
    /// trust domain's bundle (the authority was revoked) is fetched again at once, since
    /// every validator would now refuse it.
    bundles: Option<watch::Receiver<JwtBundlesStatus>>,
}

impl std::fmt::Debug for JwtSvidSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtSvidSource")
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// The cache key of an audience list: sorted, without duplicates or empty values.
fn audience_key(audience: &[String]) -> Vec<String> {
    let mut key: Vec<String> = audience.iter().filter(|a| !a.is_empty()).cloned().collect();
    key.sort();
    key.dedup();
    key
}

impl JwtSvidSource {
    /// A source for the Workload API at `address`; calls retry an unavailable agent for
    /// up to `patience`.
    pub fn new(address: &str, spiffe_id: Option<SpiffeId>, patience: Duration) -> JwtSvidSource {
        JwtSvidSource {
            address: address.to_string(),
            spiffe_id,
            patience,
            client: tokio::sync::Mutex::new(None),
            cache: Mutex::new(HashMap::new()),
            fetching: tokio::sync::Mutex::new(()),
            bundles: None,
        }
    }

    /// Checks cached tokens against the followed JWT `bundles` (see the field).
    pub fn following(mut self, bundles: watch::Receiver<JwtBundlesStatus>) -> JwtSvidSource {
        self.bundles = Some(bundles);
        self
    }

    /// Whether `token`'s key is gone from its trust domain's bundle. A domain without a
    /// bundle (none received yet, or the stream is off) says nothing.
    fn key_retired(&self, token: &JwtSvidToken) -> bool {
        let Some(bundles) = &self.bundles else {
            return false;
        };
        let status = bundles.borrow();
        let own = (status.bundles.as_ref())
            .and_then(|b| b.for_domain(token.spiffe_id().trust_domain_name()));
        own.is_some_and(|bundle| !bundle.keys.contains_key(token.key_id()))
    }

    fn cached(&self, key: &[String]) -> Option<Arc<JwtSvidToken>> {
        let cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.get(key).cloned()
    }

    pub(super) fn store(&self, key: Vec<String>, token: Arc<JwtSvidToken>) {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        cache.insert(key, token);
    }

    /// A JWT-SVID for `audience`: the cached one until half its lifetime, then a new one.
    /// While the agent cannot give a new one, the cached token serves until it expires.
    pub async fn fetch(&self, audience: &[String]) -> Result<Arc<JwtSvidToken>, JwtApiError> {
        let key = audience_key(audience);
        if key.is_empty() {
            return Err(JwtApiError::NoAudience);
        }
        let fresh =
            |t: &Arc<JwtSvidToken>| SystemTime::now() < t.refresh_at && !self.key_retired(t);
        if let Some(t) = self.cached(&key).filter(fresh) {
            return Ok(t);
        }
        let _one = self.fetching.lock().await;
        if let Some(t) = self.cached(&key).filter(fresh) {
            return Ok(t);
        }
        // A cached token still before its expiry serves if this one attempt fails.
        let stale =
            (self.cached(&key)).filter(|t| SystemTime::now() < t.expiry && !self.key_retired(t));
        let id = self.spiffe_id.clone();
        let result = self
            .call("FetchJWTSVID", stale.is_some(), |c| {
                let key = key.clone();
                let id = id.clone();
                async move { c.fetch_jwt_svid(&key, id.as_ref()).await }
            })
            .await;
        match (result, stale) {
            (Ok(svid), _) => {
                let token = Arc::new(JwtSvidToken::new(svid, SystemTime::now()));
                tracing::debug!(audience = ?key, expiry = crate::identity::unix_seconds(token.expiry), "fetched a JWT-SVID");
                self.store(key, token.clone());
                Ok(token)
            }
            (Err(e), Some(old)) if SystemTime::now() < old.expiry => {
                tracing::warn!(audience = ?key, "keeping the cached JWT-SVID until it expires: {e}");
                let mut kept = (*old).clone();
                kept.refresh_at = SystemTime::now() + REFRESH_RETRY;
                let kept = Arc::new(kept);
                self.store(key, kept.clone());
                Ok(kept)
            }
            (Err(e), _) => Err(e),
        }
    }

    /// Asks the agent to validate `token` for `audience`; returns the subject and the
    /// token's `aud`. An invalid token is [`JwtApiError::Refused`].
    pub async fn validate(
        &self,
        audience: &str,
        token: &str,
    ) -> Result<(SpiffeId, Vec<String>), JwtApiError> {
        let svid = self
            .call("ValidateJWTSVID", false, |c| {
                let audience = audience.to_string();
                let token = token.to_string();
                async move { c.validate_jwt_token(&audience, &token).await }
            })
            .await?;
        Ok((svid.spiffe_id().clone(), svid.audience().to_vec()))
    }

    /// Runs one RPC, retrying by [`retry_decision`] for up to the patience (once only
    /// when `once`: a caller with a usable cached answer does not wait).
    async fn call<T, F, Fut>(&self, rpc: &'static str, once: bool, f: F) -> Result<T, JwtApiError>
    where
        F: Fn(WorkloadApiClient) -> Fut,
        Fut: std::future::Future<Output = Result<T, WorkloadApiError>>,
    {
        let start = tokio::time::Instant::now();
        let deadline = start + self.patience;
        let mut backoff = Backoff::new(BACKOFF_CAP);
        loop {
            let attempt = async {
                let client = self.client().await?;
                f(client).await
            };
            let error = match tokio::time::timeout_at(deadline, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => e,
                Err(_) => WorkloadApiError::Transport(TransportError::status(
                    GrpcStatusCode::DeadlineExceeded,
                    "no answer in time",
                )),
            };
            if retry_decision(&error) == RetryDecision::Report {
                return Err(JwtApiError::Refused {
                    rpc,
                    reason: error.to_string(),
                });
            }
            *self.client.lock().await = None;
            let delay = backoff.next_delay();
            if once || tokio::time::Instant::now() + delay >= deadline {
                return Err(JwtApiError::Unavailable {
                    rpc,
                    reason: error.to_string(),
                    waited: start.elapsed(),
                });
            }
            tokio::time::sleep(delay).await;
        }
    }

    async fn client(&self) -> Result<WorkloadApiClient, WorkloadApiError> {
        let mut slot = self.client.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        let c = WorkloadApiClient::connect_to(&self.address).await?;
        *slot = Some(c.clone());
        Ok(c)
    }
}
