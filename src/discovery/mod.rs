//! Discovery: where each upstream runs. One resolver task per upstream publishes its
//! current endpoint set on a `watch` channel; the outbound listener follows it.
//!
//! Flow: [`start`] parses nothing itself (the config layer already turned `endpoints`
//! into an [`EndpointsSpec`]); it spawns [`run`], which loops: resolve once (static
//! list, `dns:///` A/AAAA, `dns+srv:///` SRV, or a `file:///` list), publish the set
//! when it changed, then wait for the answer's TTL bounded by `min_refresh` /
//! `max_refresh` (or for the file to change). A failure, or an empty answer, keeps the
//! last good set (stale but serving), is logged once per change of reason and counted in
//! `meshd_discovery_errors_total{service,reason}`, and is retried with backoff. Until
//! the first good answer the upstream is not ready, and [`UpstreamDiscovery::not_ready_reason`]
//! says why.

mod dns;
mod file;

#[cfg(test)]
mod fuzz;
pub use dns::Dns;
pub use file::EndpointFileError;

use crate::config::{EndpointsSpec, HostPort};
use crate::identity::SpiffeId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// One place an upstream runs.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiscoveredEndpoint {
    pub addr: SocketAddr,
    /// Relative share of traffic (SRV weight, file `weight`); 1 when not given.
    pub weight: u32,
    /// The SPIFFE ID this endpoint must present instead of the upstream's `server_id`.
    pub server_id: Option<SpiffeId>,
    /// Locality, shown in `/upstreams` (not used for routing yet).
    pub zone: Option<String>,
}

impl DiscoveredEndpoint {
    /// An endpoint with weight 1 and no overrides.
    pub fn plain(addr: SocketAddr) -> DiscoveredEndpoint {
        DiscoveredEndpoint {
            addr,
            weight: 1,
            server_id: None,
            zone: None,
        }
    }
}

/// The endpoints of one upstream at one moment, sorted and without duplicate addresses.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EndpointSet {
    pub endpoints: Vec<DiscoveredEndpoint>,
}

impl EndpointSet {
    /// Sorts and drops repeated addresses (the first entry for an address wins).
    pub fn new(mut endpoints: Vec<DiscoveredEndpoint>) -> EndpointSet {
        endpoints.sort_by_key(|e| e.addr);
        endpoints.dedup_by_key(|e| e.addr);
        EndpointSet { endpoints }
    }
}

/// Why a resolution produced no endpoints.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DiscoveryError {
    /// The DNS resolver could not be built (bad nameserver config, unreadable resolv.conf).
    #[error("cannot build the DNS resolver: {0}")]
    Resolver(String),
    /// The name does not exist (NXDOMAIN) or has no records of the asked type.
    #[error("{name}: no {kind} records")]
    NoRecords { name: String, kind: &'static str },
    /// The lookup failed (timeout, refused, network).
    #[error("lookup of {name} failed: {reason}")]
    Lookup { name: String, reason: String },
    /// Every SRV target failed to resolve or had a bad port.
    #[error("{name}: no SRV target resolved ({reason})")]
    SrvTargets { name: String, reason: String },
    /// The endpoint file cannot be read or parsed, or one entry in it is invalid.
    #[error("endpoint file {path}: {reason}")]
    BadFile {
        path: PathBuf,
        reason: EndpointFileError,
    },
}

impl DiscoveryError {
    /// The bounded `reason` label of `meshd_discovery_errors_total`.
    pub fn label(&self) -> &'static str {
        match self {
            DiscoveryError::Resolver(_) => "resolver",
            DiscoveryError::NoRecords { .. } => "no_records",
            DiscoveryError::Lookup { .. } => "lookup",
            DiscoveryError::SrvTargets { .. } => "srv_targets",
            DiscoveryError::BadFile { .. } => "bad_file",
        }
    }
}

/// How often names are looked up again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RefreshBounds {
    pub min: Duration,
    pub max: Duration,
}

/// When to look again after a good answer: its TTL within the bounds; `max` when the
/// answer has no TTL (IP literals, files).
pub fn next_refresh(ttl: Option<Duration>, b: RefreshBounds) -> Duration {
    ttl.unwrap_or(b.max).clamp(b.min, b.max.max(b.min))
}

/// When to retry after `failures` failed attempts in a row: `min` doubling, capped at
/// `max` (and at 5 s so that a first lookup that failed is retried soon).
pub fn retry_after(failures: u32, b: RefreshBounds) -> Duration {
    let cap = b.max.min(Duration::from_secs(5)).max(b.min);
    b.min
        .checked_mul(1u32 << failures.saturating_sub(1).min(16))
        .unwrap_or(cap)
        .min(cap)
}

/// What is known about an upstream's resolution, for readiness and `/upstreams`.
#[derive(Debug, Clone, Default)]
pub struct ResolveStatus {
    /// Whether any non-empty endpoint set was ever published.
    pub resolved: bool,
    /// The last failure, while failing (cleared by a good answer).
    pub last_error: Option<String>,
    /// Failed resolutions since start.
    pub failures: u64,
    /// When the current set was last confirmed by a good answer.
    pub last_good: Option<SystemTime>,
}

/// The discovery side of one upstream: its published endpoint set and status.
#[derive(Debug)]
pub struct UpstreamDiscovery {
    /// The upstream's name (`outbound[].name`).
    pub name: String,
    /// The `endpoints` value as written (a list joined by commas), for messages.
    pub source: String,
    /// The current endpoint set; empty until the first good answer.
    pub endpoints: watch::Receiver<Arc<EndpointSet>>,
    /// Resolution status, updated by the resolver task.
    status: Mutex<ResolveStatus>,
}

impl UpstreamDiscovery {
    pub fn status(&self) -> ResolveStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    /// Why this upstream is not ready: it never resolved to any endpoint.
    pub fn not_ready_reason(&self) -> Option<String> {
        let s = self.status();
        if s.resolved {
            return None;
        }
        let why = s
            .last_error
            .unwrap_or_else(|| "first lookup in progress".into());
        Some(format!(
            "upstream {} has no endpoints yet ({}): {why}",
            self.name, self.source
        ))
    }
}

/// Starts the resolver task of one upstream.
pub fn start(
    name: &str,
    spec: EndpointsSpec,
    dns: Arc<Dns>,
    bounds: RefreshBounds,
    stop: CancellationToken,
) -> Arc<UpstreamDiscovery> {
    let (tx, rx) = watch::channel(Arc::new(EndpointSet::default()));
    let up = Arc::new(UpstreamDiscovery {
        name: name.to_string(),
        source: spec.to_string(),
        endpoints: rx,
        status: Mutex::new(ResolveStatus::default()),
    });
    tokio::spawn(run(up.clone(), spec, dns, bounds, tx, stop));
    up
}

/// Resolves static `host:port` entries: IP literals as they are, names by A/AAAA.
/// Returns the endpoints and the shortest TTL among the names.
pub async fn resolve_host_ports(
    dns: &Dns,
    list: &[HostPort],
) -> Result<(Vec<DiscoveredEndpoint>, Option<Duration>), DiscoveryError> {
    let mut out = Vec::new();
    let mut ttl: Option<Duration> = None;
    for hp in list {
        if let Ok(ip) = hp.host.parse() {
            out.push(DiscoveredEndpoint::plain(SocketAddr::new(ip, hp.port)));
            continue;
        }
        let (ips, t) = dns.lookup_ip(&hp.host).await?;
        ttl = Some(ttl.map_or(t, |x| x.min(t)));
        out.extend(
            ips.into_iter()
                .map(|ip| DiscoveredEndpoint::plain(SocketAddr::new(ip, hp.port))),
        );
    }
    Ok((out, ttl))
}

async fn resolve_once(
    spec: &EndpointsSpec,
    dns: &Dns,
) -> Result<(Vec<DiscoveredEndpoint>, Option<Duration>), DiscoveryError> {
    match spec {
        EndpointsSpec::Static(list) => resolve_host_ports(dns, list).await,
        EndpointsSpec::Dns { host, port } => {
            resolve_host_ports(
                dns,
                &[HostPort {
                    host: host.clone(),
                    port: *port,
                }],
            )
            .await
        }
        EndpointsSpec::DnsSrv { name } => dns.lookup_srv(name).await,
        EndpointsSpec::File(path) => crate::discovery::file::load(path, dns).await,
    }
}

/// The resolver loop of one upstream (see the module docs).
async fn run(
    up: Arc<UpstreamDiscovery>,
    spec: EndpointsSpec,
    dns: Arc<Dns>,
    bounds: RefreshBounds,
    tx: watch::Sender<Arc<EndpointSet>>,
    stop: CancellationToken,
) {
    let file_changed = Arc::new(Notify::new());
    let _watcher = match &spec {
        EndpointsSpec::File(path) => {
            crate::discovery::file::watch(path, file_changed.clone(), &up.name)
        }
        _ => None,
    };
    let mut failures = 0u32;
    loop {
        let wait = match resolve_once(&spec, &dns).await {
            Ok((eps, ttl)) if !eps.is_empty() => {
                failures = 0;
                let set = EndpointSet::new(eps);
                if **tx.borrow() != set {
                    tracing::info!(
                        upstream = %up.name,
                        "endpoints: {}",
                        set.endpoints
                            .iter()
                            .map(|e| e.addr.to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    );
                    tx.send_replace(Arc::new(set));
                }
                if let Ok(mut s) = up.status.lock() {
                    if s.last_error.take().is_some() {
                        tracing::info!(upstream = %up.name, "discovery recovered");
                    }
                    s.resolved = true;
                    s.last_good = Some(SystemTime::now());
                }
                next_refresh(ttl, bounds)
            }
            outcome => {
                let err = match outcome {
                    Err(e) => e,
                    Ok(_) => DiscoveryError::NoRecords {
                        name: up.source.clone(),
                        kind: "endpoint",
                    },
                };
                failures = failures.saturating_add(1);
                degrade(&up, &err, tx.borrow().endpoints.len());
                retry_after(failures, bounds)
            }
        };
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
            _ = file_changed.notified() => {
                // Let the writer finish (editors write in several steps).
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// Records a failed resolution: counted always, logged when the reason changes.
fn degrade(up: &UpstreamDiscovery, err: &DiscoveryError, serving: usize) {
    metrics::counter!("meshd_discovery_errors_total", "service" => up.name.clone(), "reason" => err.label())
        .increment(1);
    let msg = err.to_string();
    let Ok(mut s) = up.status.lock() else { return };
    s.failures += 1;
    if s.last_error.as_deref() != Some(msg.as_str()) {
        if s.resolved {
            tracing::warn!(upstream = %up.name, "discovery failed, keeping the last {serving} endpoint(s): {msg}");
        } else {
            tracing::warn!(upstream = %up.name, "discovery failed, upstream not ready: {msg}");
        }
    }
    s.last_error = Some(msg);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refresh_follows_ttl_within_bounds() {
        let b = RefreshBounds {
            min: Duration::from_secs(1),
            max: Duration::from_secs(60),
        };
        let s = Duration::from_secs;
        let table = [
            (Some(s(0)), s(1)),
            (Some(s(5)), s(5)),
            (Some(s(3600)), s(60)),
            (None, s(60)),
        ];
        for (ttl, want) in table {
            assert_eq!(next_refresh(ttl, b), want, "{ttl:?}");
        }
    }

    #[test]
    fn retries_back_off_to_a_cap() {
        let b = RefreshBounds {
            min: Duration::from_millis(500),
            max: Duration::from_secs(60),
        };
        let ms = Duration::from_millis;
        let table = [
            (1, ms(500)),
            (2, ms(1000)),
            (3, ms(2000)),
            (4, ms(4000)),
            (5, ms(5000)),
            (40, ms(5000)),
        ];
        for (n, want) in table {
            assert_eq!(retry_after(n, b), want, "{n}");
        }
    }

    #[test]
    fn sets_are_sorted_and_deduplicated() {
        let a: SocketAddr = "127.0.0.3:1".parse().unwrap();
        let b: SocketAddr = "127.0.0.2:1".parse().unwrap();
        let mut heavy = DiscoveredEndpoint::plain(a);
        heavy.weight = 5;
        let set = EndpointSet::new(vec![
            heavy.clone(),
            DiscoveredEndpoint::plain(b),
            DiscoveredEndpoint::plain(a),
        ]);
        assert_eq!(set.endpoints, vec![DiscoveredEndpoint::plain(b), heavy]);
    }
}
