//! Identity from the SPIFFE Workload API (SPIRE agent or the development CA).
//!
//! Flow: `run` connects with the `spiffe` crate's client, streams X.509 contexts, turns
//! each into an [`IdentitySnapshot`] and publishes it. While the agent is unreachable or
//! has no identity for us it retries with capped exponential backoff, logging once per
//! state change. After the first SVID it keeps the cached one until its not-after, then
//! publishes `Expired` (fail closed) until a new SVID arrives.

use crate::identity::{
    check_expected, crypto_provider, publish, BundleSet, ExpectMismatch, IdentityError,
    IdentitySnapshot, IdentityStatus, SpiffeId, Svid,
};
use futures::StreamExt;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use spiffe::{WorkloadApiClient, WorkloadApiError, X509Context};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The backoff between attempts: doubles from 100 ms up to `cap`.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
    cap: Duration,
}

impl Backoff {
    pub fn new(cap: Duration) -> Self {
        Backoff {
            next: Duration::from_millis(100),
            cap,
        }
    }
    /// The delay to wait now; the following one is doubled (capped).
    pub fn next_delay(&mut self) -> Duration {
        let d = self.next;
        self.next = (self.next * 2).min(self.cap);
        d
    }
    pub fn reset(&mut self) {
        self.next = Duration::from_millis(100);
    }
}

/// The states the log reports once each, on change.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Condition {
    Unreachable,
    NoIdentity,
    Streaming,
    BadResponse,
}

fn classify(e: &WorkloadApiError) -> (Condition, String) {
    match e {
        WorkloadApiError::NoIdentityIssued | WorkloadApiError::PermissionDenied(_) => (
            Condition::NoIdentity,
            format!("Workload API issued no identity for this workload ({e}); is it registered?"),
        ),
        WorkloadApiError::Transport(t) => {
            let text = t.to_string();
            if text.contains("PermissionDenied") || text.contains("no identity issued") {
                (
                    Condition::NoIdentity,
                    format!("Workload API issued no identity for this workload ({text}); is it registered?"),
                )
            } else {
                (
                    Condition::Unreachable,
                    format!("Workload API unreachable: {text}"),
                )
            }
        }
        other => (
            Condition::BadResponse,
            format!("Workload API response rejected: {other}"),
        ),
    }
}

/// Why an X.509 context from the Workload API does not become a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    /// No SVID at all (or none that could be chosen).
    #[error("Workload API returned no SVID")]
    NoSvid,
    /// The SVID is not the one `identity.expect` names.
    #[error(transparent)]
    Mismatch(#[from] ExpectMismatch),
    /// The chosen SVID is not a usable X.509-SVID.
    #[error("SVID for {id} rejected: {source}")]
    BadSvid { id: SpiffeId, source: IdentityError },
    /// A trust bundle is unusable.
    #[error(transparent)]
    BadBundle(IdentityError),
    /// No bundle for the SVID's own trust domain.
    #[error("Workload API sent no bundle for our own trust domain {0}")]
    NoOwnBundle(String),
}

/// Turns one X.509 context into a snapshot: the SVID whose ID is `expect` (or the default
/// one), and every bundle (own and federated).
pub fn snapshot_from_context(
    ctx: &X509Context,
    expect: Option<&SpiffeId>,
    generation: u64,
) -> Result<IdentitySnapshot, ContextError> {
    let chosen = match expect {
        Some(want) => ctx
            .svids()
            .iter()
            .find(|s| s.spiffe_id() == want)
            .or_else(|| ctx.default_svid()),
        None => ctx.default_svid(),
    }
    .ok_or(ContextError::NoSvid)?;
    check_expected(chosen.spiffe_id(), expect)?;
    let chain: Vec<CertificateDer<'static>> = chosen
        .cert_chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        chosen.private_key().as_bytes().to_vec(),
    ));
    let svid =
        Svid::from_der(chain, key, &crypto_provider()).map_err(|source| ContextError::BadSvid {
            id: chosen.spiffe_id().clone(),
            source,
        })?;
    let mut bundles = BundleSet::default();
    for (td, bundle) in ctx.bundle_set().iter() {
        let cas = bundle
            .authorities()
            .iter()
            .map(|c| CertificateDer::from(c.as_bytes().to_vec()))
            .collect();
        bundles
            .insert(td.as_str(), cas)
            .map_err(ContextError::BadBundle)?;
    }
    if bundles.for_domain(svid.id.trust_domain_name()).is_none() {
        return Err(ContextError::NoOwnBundle(
            svid.id.trust_domain_name().to_string(),
        ));
    }
    Ok(IdentitySnapshot {
        svid,
        bundles,
        generation,
    })
}

/// Streams identities from `address` until `stop` is cancelled.
pub async fn follow_workload_api(
    address: String,
    expect: Option<SpiffeId>,
    status: watch::Sender<IdentityStatus>,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(Duration::from_secs(5));
    let mut condition: Option<Condition> = None;
    let mut generation = 0u64;
    let mut report = |c: Condition, msg: &str, cond: &mut Option<Condition>| {
        if cond.as_ref() != Some(&c) {
            match c {
                Condition::Streaming => tracing::info!(address = %address, "{msg}"),
                _ => tracing::warn!(address = %address, "{msg}"),
            }
            *cond = Some(c);
        }
    };
    loop {
        let result = tokio::select! {
            _ = stop.cancelled() => return,
            r = stream_once(&address, expect.as_ref(), &status, &mut generation, &mut backoff, &mut condition, &mut report) => r,
        };
        let (c, msg) = result;
        if !matches!(
            status.borrow().clone(),
            IdentityStatus::Ready(_)
                | IdentityStatus::Expired { .. }
                | IdentityStatus::Mismatch { .. }
        ) {
            publish(
                &status,
                IdentityStatus::Waiting {
                    reason: msg.clone(),
                },
            );
        }
        report(c, &msg, &mut condition);
        let delay = backoff.next_delay();
        let expiry = current_expiry(&status);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(delay) => {}
            _ = sleep_until_system(expiry) => expire(&status),
        }
    }
}

type Reporter<'a> = dyn FnMut(Condition, &str, &mut Option<Condition>) + Send + 'a;

/// One connection: streams contexts until the stream fails; returns why it ended.
async fn stream_once(
    address: &str,
    expect: Option<&SpiffeId>,
    status: &watch::Sender<IdentityStatus>,
    generation: &mut u64,
    backoff: &mut Backoff,
    condition: &mut Option<Condition>,
    report: &mut Reporter<'_>,
) -> (Condition, String) {
    let client = match WorkloadApiClient::connect_to(address).await {
        Ok(c) => c,
        Err(e) => return classify(&e),
    };
    let mut stream = match client.stream_x509_contexts().await {
        Ok(s) => s,
        Err(e) => return classify(&e),
    };
    loop {
        let expiry = current_expiry(status);
        let item = tokio::select! {
            item = stream.next() => item,
            _ = sleep_until_system(expiry) => { expire(status); continue; }
        };
        match item {
            None => {
                return (
                    Condition::Unreachable,
                    "Workload API closed the stream".to_string(),
                )
            }
            Some(Err(e)) => return classify(&e),
            Some(Ok(ctx)) => {
                backoff.reset();
                match snapshot_from_context(&ctx, expect, *generation + 1) {
                    Ok(snap) => {
                        *generation += 1;
                        let first = *generation == 1;
                        tracing::info!(
                            spiffe_id = %snap.svid.id,
                            serial = %snap.svid.serial,
                            trust_domains = ?snap.bundles.trust_domains(),
                            "{}", if first { "received X.509-SVID" } else { "X.509-SVID rotated" }
                        );
                        report(
                            Condition::Streaming,
                            "streaming identities from the Workload API",
                            condition,
                        );
                        metrics::counter!("meshd_svid_rotations_total")
                            .increment(u64::from(!first));
                        publish(status, IdentityStatus::Ready(Arc::new(snap)));
                    }
                    Err(e @ ContextError::Mismatch(_)) => {
                        let reason = e.to_string();
                        tracing::error!("{reason}");
                        publish(status, IdentityStatus::Mismatch { reason });
                    }
                    Err(e) => {
                        let reason = e.to_string();
                        tracing::warn!("keeping the previous identity: {reason}");
                        if matches!(*status.borrow(), IdentityStatus::Waiting { .. }) {
                            publish(status, IdentityStatus::Waiting { reason });
                        }
                    }
                }
            }
        }
    }
}

fn current_expiry(status: &watch::Sender<IdentityStatus>) -> Option<SystemTime> {
    status.borrow().snapshot().map(|s| s.svid.not_after)
}

/// Publishes `Expired` when the cached SVID has passed its not-after.
fn expire(status: &watch::Sender<IdentityStatus>) {
    let reason = match status.borrow().snapshot() {
        Some(s) if s.svid.not_after <= SystemTime::now() => format!(
            "SVID {} (serial {}) expired and the Workload API sent no new one; refusing new handshakes",
            s.svid.id, s.svid.serial
        ),
        _ => return,
    };
    tracing::error!("{reason}");
    publish(status, IdentityStatus::Expired { reason });
}

/// Sleeps until a wall-clock instant (an SVID's not-after); forever when there is none.
pub(crate) async fn sleep_until_system(at: Option<SystemTime>) {
    match at {
        Some(t) => {
            let wait = t
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await
        }
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let mut b = Backoff::new(Duration::from_millis(500));
        let seq: Vec<_> = (0..5).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(seq, vec![100, 200, 400, 500, 500]);
        b.reset();
        assert_eq!(b.next_delay().as_millis(), 100);
    }
}
