//! The live policy: loaded from its file, swapped atomically on reload, consulted per
//! request.
//!
//! Flow: `app` builds a [`PolicyStore`] for the inbound policy file and calls
//! [`PolicyStore::reload`] once (a missing or bad file leaves the store unloaded, which
//! denies everything: fail closed). [`PolicyStore::watch`] reloads when the file changes
//! (watching the directory, so editors' rename-over writes are seen), and SIGHUP calls
//! `reload` too. A reload compiles a whole new [`Policy`] and publishes it with one
//! atomic pointer swap, so a request sees either the old or the new policy, never a mix;
//! a bad edit keeps the last good policy. [`PolicyStore::decide`] authorizes and counts.
//! The replaced policy is freed by a reload or the watcher's sweep once no request holds
//! it, never by a request.

use crate::identity::SpiffeId;
use crate::policy::{
    load_policy, Action, Caller, Decision, Mode, Policy, PolicyProblem, Severity, Target,
};
use arc_swap::ArcSwapOption;
use notify::{RecursiveMode, Watcher};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How long the watcher waits for a burst of file events to settle before reloading.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// How often the watcher frees replaced policies whose last request has finished.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Why the file watcher could not start; reload on SIGHUP still works without it.
#[derive(Debug, thiserror::Error)]
pub enum PolicyStoreError {
    /// The policy path has no parent directory to watch.
    #[error("policy path {0} has no parent directory to watch")]
    NoParent(PathBuf),
    /// The OS file-notification backend refused.
    #[error("cannot watch {path}: {source}")]
    Watch {
        path: PathBuf,
        source: notify::Error,
    },
}

/// Holds the current policy of one listener.
pub struct PolicyStore {
    /// The file reloads read.
    path: PathBuf,
    /// The current policy; `None` until one loads, which denies everything.
    current: ArcSwapOption<Policy>,
    /// Handed out with decisions while nothing is loaded, so callers always get a policy.
    fail_closed: Arc<Policy>,
    /// The version the next successful load gets.
    next_version: AtomicU64,
    /// Serializes reloads (watcher and SIGHUP) so versions only increase.
    reloading: Mutex<()>,
    /// Failed reloads since start, for tests and `/policy` (the metric is the public view).
    failures: AtomicU64,
    /// Policies a reload replaced, kept until no request holds them. Requests keep the
    /// policy that decided them (for messages and logs), so without this the last one to
    /// finish would free the old rules on its own thread: tens of milliseconds for a
    /// 100,000-rule policy, a stall in the middle of a request. Reloads and
    /// [`sweep`](Self::sweep) drop them instead.
    retired: Mutex<Vec<Arc<Policy>>>,
}

impl PolicyStore {
    /// A store for `path` with nothing loaded yet; call [`reload`](Self::reload).
    pub fn new(path: impl Into<PathBuf>) -> PolicyStore {
        PolicyStore {
            path: path.into(),
            current: ArcSwapOption::empty(),
            fail_closed: Arc::new(Policy::fail_closed()),
            next_version: AtomicU64::new(1),
            reloading: Mutex::new(()),
            failures: AtomicU64::new(0),
            retired: Mutex::new(Vec::new()),
        }
    }

    /// The policy file this store reads.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Re-reads the file. A valid file replaces the policy atomically (warnings are
    /// logged); an invalid one keeps the last good policy, logs each problem and counts
    /// `meshd_policy_reload_failures_total`.
    pub fn reload(&self) -> Result<(), Vec<PolicyProblem>> {
        let _one_at_a_time = self
            .reloading
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let version = self.next_version.load(Ordering::Relaxed);
        match load_policy(&self.path, version) {
            Ok((policy, warnings)) => {
                for w in &warnings {
                    tracing::warn!("{w}");
                }
                self.next_version.store(version + 1, Ordering::Relaxed);
                tracing::info!(path = %self.path.display(), version, rules = policy.rules.len(), mode = policy.mode.as_str(), "policy loaded");
                start_at_zero(&policy);
                if let Some(old) = self.current.swap(Some(Arc::new(policy))) {
                    self.lock_retired().push(old);
                }
                drop(self.sweep());
                Ok(())
            }
            Err(problems) => {
                for p in &problems {
                    tracing::warn!("{p}");
                }
                let keeping = if self.is_loaded() {
                    "keeping the last good policy"
                } else {
                    "denying all requests"
                };
                let errors = problems
                    .iter()
                    .filter(|p| p.severity == Severity::Error)
                    .count();
                tracing::warn!(path = %self.path.display(), errors, "policy reload failed; {keeping}");
                self.failures.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("meshd_policy_reload_failures_total").increment(1);
                Err(problems)
            }
        }
    }

    /// Takes the replaced policies no request holds any more, for the caller to drop
    /// where a pause does not matter (a reload thread, a blocking task).
    pub fn sweep(&self) -> Vec<Arc<Policy>> {
        let mut retired = self.lock_retired();
        let (unused, held) = retired.drain(..).partition(|p| Arc::strong_count(p) == 1);
        *retired = held;
        unused
    }

    /// Whether replaced policies are waiting for their last request to finish.
    pub fn has_retired(&self) -> bool {
        !self.lock_retired().is_empty()
    }

    fn lock_retired(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Policy>>> {
        self.retired
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// How many reloads failed since the store was made.
    pub fn reload_failures(&self) -> u64 {
        self.failures.load(Ordering::Relaxed)
    }

    /// Whether a policy has been loaded (feeds `/ready`).
    pub fn is_loaded(&self) -> bool {
        self.current.load().is_some()
    }

    /// The current policy, if any.
    pub fn snapshot(&self) -> Option<Arc<Policy>> {
        self.current.load_full()
    }

    /// Authorizes against the current policy (denying all when none is loaded), counts
    /// `meshd_authz_decisions_total{decision,rule,mode}` and the rule's hits, and returns
    /// the policy that decided so messages name the right rule.
    pub fn decide(&self, peer: &SpiffeId, target: &Target<'_>) -> (Decision, Arc<Policy>) {
        self.decide_caller(&Caller::mtls(peer), target)
    }

    /// [`decide`](Self::decide) for a caller that may also carry a checked JWT-SVID.
    pub fn decide_caller(
        &self,
        caller: &Caller<'_>,
        target: &Target<'_>,
    ) -> (Decision, Arc<Policy>) {
        let policy = self
            .current
            .load_full()
            .unwrap_or_else(|| self.fail_closed.clone());
        let decision = policy.authorize_caller(caller, target);
        policy.record_hit(&decision);
        let rule = decision.rule_name(&policy);
        crate::telemetry::increment(
            "meshd_authz_decisions_total",
            &[
                ("decision", decision.label()),
                ("rule", rule),
                ("mode", decision.mode.as_str()),
            ],
            1,
        );
        (decision, policy)
    }

    /// The loaded policy for admin `/policy`: service, mode, default, version, source and
    /// rules with their hit counts; `{"loaded": false}` when none is loaded.
    pub fn to_json(&self) -> serde_json::Value {
        let Some(p) = self.snapshot() else {
            return json!({
                "loaded": false,
                "path": self.path.display().to_string(),
                "reload_failures": self.reload_failures(),
            });
        };
        let rules: Vec<_> = p
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let to = r.to.as_ref().map(|t| {
                    json!({
                        "grpc": t.grpc.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "http": t.http.iter().map(|h| json!({
                            "methods": h.methods,
                            "paths": h.paths.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        })).collect::<Vec<_>>(),
                        "ports": t.ports,
                    })
                });
                json!({
                    "name": &*r.name,
                    "action": r.action.as_str(),
                    "from": r.from.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "to": to,
                    "hits": p.hits(i),
                })
            })
            .collect();
        json!({
            "loaded": true,
            "path": p.source.display().to_string(),
            "service": p.service,
            "mode": p.mode.as_str(),
            "default": p.default.as_str(),
            "version": p.version,
            "rules": rules,
            "default_hits": p.hits(p.rules.len()),
            "reload_failures": self.reload_failures(),
        })
    }

    /// Reloads whenever the policy file changes until `stop` fires. Watches the parent
    /// directory (rename-over writes replace the inode a file watch would follow) and
    /// debounces bursts of events by [`DEBOUNCE`].
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) -> Result<(), PolicyStoreError> {
        let dir = match self.path.parent() {
            Some(d) if d.as_os_str().is_empty() => Path::new("."),
            Some(d) => d,
            None => return Err(PolicyStoreError::NoParent(self.path.clone())),
        };
        let name = self.path.file_name().map(ToOwned::to_owned);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<()>();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let relevant = match event {
                    Ok(e) => {
                        !e.kind.is_access()
                            && e.paths.iter().any(|p| p.file_name() == name.as_deref())
                    }
                    Err(_) => true,
                };
                if relevant {
                    let _ = tx.send(());
                }
            })
            .map_err(|source| PolicyStoreError::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|source| PolicyStoreError::Watch {
                path: dir.to_path_buf(),
                source,
            })?;
        let mut sweep = tokio::time::interval(SWEEP_EVERY);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                got = rx.recv() => if got.is_none() { return Ok(()) },
                _ = sweep.tick(), if self.has_retired() => {
                    let store = self.clone();
                    let _ = tokio::task::spawn_blocking(move || drop(store.sweep())).await;
                    continue;
                }
            }
            // Debounce: wait until no event arrived for DEBOUNCE.
            loop {
                tokio::select! {
                    _ = stop.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(DEBOUNCE) => break,
                    got = rx.recv() => if got.is_none() { return Ok(()) },
                }
            }
            let store = self.clone();
            // Reading and compiling may take a while for big files; keep it off the reactor.
            let _ = tokio::task::spawn_blocking(move || store.reload()).await;
        }
    }
}

impl PolicyStore {
    /// The label values metrics admit under the current policy: the SPIFFE IDs its rules
    /// name exactly, and the gRPC `service/method`s they name (`service/*` for any
    /// method). Empty while no policy is loaded.
    pub fn label_bounds(&self) -> crate::telemetry::LabelBounds {
        let mut bounds = crate::telemetry::LabelBounds::default();
        if let Some(p) = self.snapshot() {
            for rule in &p.rules {
                for m in &rule.from {
                    if let crate::policy::IdMatcher::Exact { .. } = m {
                        bounds.peers.insert(m.to_string());
                    }
                }
                for g in rule.to.iter().flat_map(|t| t.grpc.iter()) {
                    let method = g.method.as_deref().unwrap_or("*");
                    bounds.methods.insert(format!("{}/{method}", g.service));
                }
            }
        }
        bounds
    }
}

#[cfg(test)]
mod tests;

/// Puts each rule's (and the default's) `meshd_authz_decisions_total` series at 0 when a
/// policy is loaded, so a dashboard or alert sees every rule before its first decision.
fn start_at_zero(policy: &Policy) {
    let decision = |action: Action| match (action, policy.mode) {
        (Action::Allow, _) => "allow",
        (Action::Deny, Mode::Enforce) => "deny",
        (Action::Deny, Mode::Audit) => "would_deny",
    };
    let rules = policy.rules.iter().map(|r| (&*r.name, r.action));
    for (rule, action) in rules.chain([("default", policy.default)]) {
        crate::telemetry::increment(
            "meshd_authz_decisions_total",
            &[
                ("decision", decision(action)),
                ("rule", rule),
                ("mode", policy.mode.as_str()),
            ],
            0,
        );
    }
}
