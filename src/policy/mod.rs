//! Authorization policy: the compiled model and the decision function (DESIGN.md §4).
//!
//! Flow: `policy_parse` turns a YAML file into a [`Policy`] (rules plus an index built
//! once); the proxy asks [`Policy::authorize`] for every connection or request, a plain
//! function with no I/O and no allocation; `policy_store` holds the current policy,
//! swaps it atomically on reload and counts decisions. [`explain`] renders a decision for
//! people (`meshd policy explain`, admin `/authz`).
//!
//! Semantics: a rule matches when the peer matches one `from` entry and the request
//! matches `to`. Any matching deny wins; otherwise the first matching allow; otherwise
//! the default. In audit mode every request is allowed and `would_deny` says what
//! enforce mode would have done.

mod cli;
mod file;
mod parse;
mod store;
pub use cli::{check_file, explain_cli, ExplainError};
pub use store::PolicyStore;

use crate::config::parse_spiffe_id;
use crate::identity::SpiffeId;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use crate::policy::parse::{
    load_policy, parse_policy, PolicyError, PolicyProblem, Severity, MAX_POLICY_BYTES,
};

/// The port a target gets when the caller names none (the inbound listener, DESIGN §2).
pub const DEFAULT_INBOUND_PORT: u16 = 15006;

/// What a rule (or the default) does with a request it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    #[default]
    Allow,
    Deny,
}

impl Action {
    /// The lowercase word used in files, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// Whether decisions are enforced or only observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    /// Decide, log and count, but allow: for rolling out a policy safely.
    Audit,
}

impl Mode {
    /// The lowercase word used in files, metrics and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Enforce => "enforce",
            Mode::Audit => "audit",
        }
    }
}

/// One entry of a rule's `from` list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdMatcher {
    /// `spiffe://td/path`: exactly this workload.
    Exact { trust_domain: String, path: String },
    /// `spiffe://td/some/path/*`: every ID strictly under `/some/path`.
    Prefix {
        trust_domain: String,
        prefix: String,
    },
    /// `spiffe://td/*`: every ID in the trust domain.
    Domain { trust_domain: String },
}

impl IdMatcher {
    /// The trust domain this matcher is confined to.
    pub fn trust_domain(&self) -> &str {
        match self {
            IdMatcher::Exact { trust_domain, .. }
            | IdMatcher::Prefix { trust_domain, .. }
            | IdMatcher::Domain { trust_domain } => trust_domain,
        }
    }

    /// Whether every ID matched by `other` is also matched by `self`.
    pub fn covers(&self, other: &IdMatcher) -> bool {
        if self.trust_domain() != other.trust_domain() {
            return false;
        }
        let under = |p: &str, q: &str| {
            q.len() > p.len() && q.starts_with(p) && q[p.len()..].starts_with('/')
        };
        match (self, other) {
            (IdMatcher::Domain { .. }, _) => true,
            (IdMatcher::Prefix { prefix, .. }, IdMatcher::Exact { path, .. }) => {
                under(prefix, path)
            }
            (IdMatcher::Prefix { prefix: a, .. }, IdMatcher::Prefix { prefix: b, .. }) => {
                a == b || under(a, b)
            }
            (IdMatcher::Exact { path: a, .. }, IdMatcher::Exact { path: b, .. }) => a == b,
            _ => false,
        }
    }
}

impl fmt::Display for IdMatcher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IdMatcher::Exact { trust_domain, path } => write!(f, "spiffe://{trust_domain}{path}"),
            IdMatcher::Prefix {
                trust_domain,
                prefix,
            } => {
                write!(f, "spiffe://{trust_domain}{prefix}/*")
            }
            IdMatcher::Domain { trust_domain } => write!(f, "spiffe://{trust_domain}/*"),
        }
    }
}

/// A gRPC target: `pkg.Service/Method`, or `pkg.Service/*` for every method.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcTarget {
    pub service: String,
    /// `None` means any method.
    pub method: Option<String>,
}

impl GrpcTarget {
    fn matches(&self, service: &str, method: &str) -> bool {
        self.service == service && self.method.as_deref().is_none_or(|m| m == method)
    }

    fn covers(&self, other: &GrpcTarget) -> bool {
        self.service == other.service && (self.method.is_none() || self.method == other.method)
    }
}

impl fmt::Display for GrpcTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}",
            self.service,
            self.method.as_deref().unwrap_or("*")
        )
    }
}

/// An HTTP path matcher: exact, or `/prefix/*` for everything under `/prefix/`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Stored with its trailing slash (`/api/`); `/*` is stored as `/` and matches all.
    Prefix(String),
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(p) => p == path,
            PathMatch::Prefix(p) => path.starts_with(p.as_str()),
        }
    }

    fn covers(&self, other: &PathMatch) -> bool {
        match (self, other) {
            (PathMatch::Prefix(a), PathMatch::Prefix(b) | PathMatch::Exact(b)) => {
                b.starts_with(a.as_str())
            }
            (PathMatch::Exact(a), PathMatch::Exact(b)) => a == b,
            (PathMatch::Exact(_), PathMatch::Prefix(_)) => false,
        }
    }
}

impl fmt::Display for PathMatch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PathMatch::Exact(p) => f.write_str(p),
            PathMatch::Prefix(p) => write!(f, "{p}*"),
        }
    }
}

/// An HTTP target: any of `methods` (all when empty) on any of `paths` (all when empty).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpTarget {
    /// Uppercase method names.
    pub methods: Vec<String>,
    pub paths: Vec<PathMatch>,
}

impl HttpTarget {
    fn matches(&self, method: &str, path: &str) -> bool {
        let path = path.split_once('?').map_or(path, |(p, _)| p);
        (self.methods.is_empty() || self.methods.iter().any(|m| m == method))
            && (self.paths.is_empty() || self.paths.iter().any(|p| p.matches(path)))
    }

    fn covers(&self, other: &HttpTarget) -> bool {
        let methods = self.methods.is_empty()
            || (!other.methods.is_empty()
                && other.methods.iter().all(|m| self.methods.contains(m)));
        let paths = self.paths.is_empty()
            || (!other.paths.is_empty()
                && other
                    .paths
                    .iter()
                    .all(|o| self.paths.iter().any(|s| s.covers(o))));
        methods && paths
    }
}

/// What a rule applies to; a rule without `to` applies to everything from its peers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct To {
    pub grpc: Vec<GrpcTarget>,
    pub http: Vec<HttpTarget>,
    /// Local ports; empty means any port.
    pub ports: Vec<u16>,
}

impl To {
    fn has_targets(&self) -> bool {
        !self.grpc.is_empty() || !self.http.is_empty()
    }

    fn matches(&self, target: &Target<'_>) -> bool {
        if !self.ports.is_empty() && !self.ports.contains(&target.port) {
            return false;
        }
        match target.request {
            // TCP is decided by `from` and `ports` alone.
            Request::Tcp => !self.has_targets() || !self.ports.is_empty(),
            Request::Grpc { service, method } => {
                !self.has_targets() || self.grpc.iter().any(|g| g.matches(service, method))
            }
            Request::Http { method, path } => {
                !self.has_targets() || self.http.iter().any(|h| h.matches(method, path))
            }
        }
    }

    /// Whether every target matched by `other` is matched by `self` (for shadow warnings).
    fn covers(&self, other: &To) -> bool {
        let ports = self.ports.is_empty()
            || (!other.ports.is_empty() && other.ports.iter().all(|p| self.ports.contains(p)));
        if !ports {
            return false;
        }
        if !self.has_targets() {
            return true;
        }
        // `other` matching TCP (targets + ports) is beyond a target-only `self`.
        if !other.has_targets() || (!other.ports.is_empty() && self.ports.is_empty()) {
            return false;
        }
        other
            .grpc
            .iter()
            .all(|o| self.grpc.iter().any(|s| s.covers(o)))
            && other
                .http
                .iter()
                .all(|o| self.http.iter().any(|s| s.covers(o)))
    }
}

/// One rule of a policy, as written (after validation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Unique within the policy; shown in denials, metrics and `/policy`.
    pub name: Arc<str>,
    pub action: Action,
    /// Never empty.
    pub from: Vec<IdMatcher>,
    pub to: Option<To>,
}

impl Rule {
    fn matches_target(&self, target: &Target<'_>) -> bool {
        self.to.as_ref().is_none_or(|to| to.matches(target))
    }

    /// Whether every (peer, request) this rule matches is matched by `by` too.
    pub fn is_covered_by(&self, by: &Rule) -> bool {
        let from = self
            .from
            .iter()
            .all(|o| by.from.iter().any(|s| s.covers(o)));
        let to = match (&by.to, &self.to) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(b), Some(s)) => b.covers(s),
        };
        from && to
    }
}

/// What is being asked for: a request (or connection) on a local port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target<'a> {
    pub port: u16,
    pub request: Request<'a>,
}

/// The request kind as declared by the listener's protocol (never sniffed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request<'a> {
    Grpc { service: &'a str, method: &'a str },
    Http { method: &'a str, path: &'a str },
    Tcp,
}

/// Splits a gRPC request path `/pkg.Service/Method` into service and method.
pub fn grpc_target(path: &str) -> Option<(&str, &str)> {
    let (service, method) = path.strip_prefix('/')?.split_once('/')?;
    if service.is_empty() || method.is_empty() || method.contains('/') {
        return None;
    }
    Some((service, method))
}

/// Which rule decided.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RuleRef {
    /// Index into [`Policy::rules`].
    Named(usize),
    /// No rule matched; the policy's `default` decided.
    Default,
}

/// The outcome of [`Policy::authorize`]; `Copy`, allocation-free.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Whether the request may proceed (always true in audit mode).
    pub allowed: bool,
    /// The action of the rule (or default) that decided, as enforce mode would apply it.
    pub action: Action,
    pub rule: RuleRef,
    pub mode: Mode,
    /// Audit mode only: enforce mode would have denied this request.
    pub would_deny: bool,
}

impl Decision {
    /// `allow`, `deny` or `would_deny`: the `decision` label of `meshd_authz_decisions_total`.
    pub fn label(&self) -> &'static str {
        match (self.allowed, self.would_deny) {
            (false, _) => "deny",
            (true, true) => "would_deny",
            (true, false) => "allow",
        }
    }

    /// The name of the deciding rule, or `default`.
    pub fn rule_name<'p>(&self, policy: &'p Policy) -> &'p str {
        match self.rule {
            RuleRef::Named(i) => policy.rules.get(i).map_or("default", |r| &r.name),
            RuleRef::Default => "default",
        }
    }

    /// A one-line reason for people: grpc-message of PERMISSION_DENIED, the 403 body, logs.
    pub fn message(&self, policy: &Policy) -> String {
        if !policy.loaded {
            return "denied: no policy loaded".to_string();
        }
        let by = match self.rule {
            RuleRef::Named(_) => format!("rule \"{}\"", self.rule_name(policy)),
            RuleRef::Default => format!("default {}", self.action.as_str()),
        };
        match (self.allowed, self.would_deny) {
            (false, _) => format!("denied by {by}"),
            (true, true) => format!("allowed in audit mode; would be denied by {by}"),
            (true, false) => format!("allowed by {by}"),
        }
    }
}

/// Rules that may apply to one group of peers, split by action, ascending rule index.
#[derive(Debug, Default)]
struct Bucket {
    denies: Vec<u32>,
    allows: Vec<u32>,
}

impl Bucket {
    fn push(&mut self, index: u32, action: Action) {
        let list = match action {
            Action::Allow => &mut self.allows,
            Action::Deny => &mut self.denies,
        };
        if list.last() != Some(&index) {
            list.push(index);
        }
    }
}

/// Per-trust-domain index: exact paths and path prefixes are hash lookups, so a decision
/// never scans rules written for other peers.
#[derive(Debug, Default)]
struct DomainIndex {
    exact: HashMap<String, Bucket>,
    /// Keyed by the prefix path without `/*`, e.g. `/ns/ops`.
    prefix: HashMap<String, Bucket>,
    /// The longest key in `prefix`: deeper ancestors of a peer's path need no lookup.
    max_prefix_len: usize,
    whole: Bucket,
}

/// A compiled, immutable policy. Swapped whole on reload, so a request sees one version.
#[derive(Debug)]
pub struct Policy {
    /// The service this policy protects (informational).
    pub service: String,
    pub mode: Mode,
    pub default: Action,
    pub rules: Vec<Rule>,
    /// Increases with every successful load by the store; shown at `/policy`.
    pub version: u64,
    /// The file this policy came from; empty for the fail-closed placeholder.
    pub source: PathBuf,
    /// False only for the placeholder that stands in when no policy could be loaded.
    pub loaded: bool,
    index: HashMap<String, DomainIndex>,
    /// Hits per rule, then one for the default; reset with each new version.
    hits: Vec<AtomicU64>,
}

impl Policy {
    /// Compiles rules into a policy with its lookup index. Rules must already be valid.
    pub fn new(
        service: String,
        mode: Mode,
        default: Action,
        rules: Vec<Rule>,
        version: u64,
        source: PathBuf,
    ) -> Policy {
        let mut index: HashMap<String, DomainIndex> = HashMap::new();
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            for m in &rule.from {
                let domain = index.entry(m.trust_domain().to_string()).or_default();
                let bucket = match m {
                    IdMatcher::Exact { path, .. } => domain.exact.entry(path.clone()).or_default(),
                    IdMatcher::Prefix { prefix, .. } => {
                        domain.max_prefix_len = domain.max_prefix_len.max(prefix.len());
                        domain.prefix.entry(prefix.clone()).or_default()
                    }
                    IdMatcher::Domain { .. } => &mut domain.whole,
                };
                bucket.push(i, rule.action);
            }
        }
        let hits = (0..=rules.len()).map(|_| AtomicU64::new(0)).collect();
        Policy {
            service,
            mode,
            default,
            rules,
            version,
            source,
            loaded: true,
            index,
            hits,
        }
    }

    /// The stand-in when nothing is loaded: no rules, default deny (fail closed).
    pub fn fail_closed() -> Policy {
        let mut p = Policy::new(
            String::new(),
            Mode::Enforce,
            Action::Deny,
            Vec::new(),
            0,
            PathBuf::new(),
        );
        p.loaded = false;
        p
    }

    /// Decides one connection or request. No I/O, no allocation.
    pub fn authorize(&self, peer: &SpiffeId, target: &Target<'_>) -> Decision {
        let mut deny: Option<u32> = None;
        let mut allow: Option<u32> = None;
        if let Some(domain) = self.index.get(peer.trust_domain_name()) {
            let path = peer.path();
            if let Some(b) = domain.exact.get(path) {
                self.scan(b, target, &mut deny, &mut allow);
            }
            for (at, _) in path.match_indices('/').skip(1) {
                if at > domain.max_prefix_len {
                    break;
                }
                if let Some(b) = domain.prefix.get(&path[..at]) {
                    self.scan(b, target, &mut deny, &mut allow);
                }
            }
            self.scan(&domain.whole, target, &mut deny, &mut allow);
        }
        let (enforce_allows, rule, action) = match (deny, allow) {
            (Some(d), _) => (false, RuleRef::Named(d as usize), Action::Deny),
            (None, Some(a)) => (true, RuleRef::Named(a as usize), Action::Allow),
            (None, None) => (
                self.default == Action::Allow,
                RuleRef::Default,
                self.default,
            ),
        };
        match self.mode {
            Mode::Enforce => Decision {
                allowed: enforce_allows,
                action,
                rule,
                mode: self.mode,
                would_deny: false,
            },
            Mode::Audit => Decision {
                allowed: true,
                action,
                rule,
                mode: self.mode,
                would_deny: !enforce_allows,
            },
        }
    }

    /// Finds the lowest-index matching deny and allow in a bucket, improving on earlier finds.
    fn scan(
        &self,
        bucket: &Bucket,
        target: &Target<'_>,
        deny: &mut Option<u32>,
        allow: &mut Option<u32>,
    ) {
        let first = |list: &[u32], best: Option<u32>| {
            list.iter()
                .take_while(|&&i| best.is_none_or(|b| i < b))
                .find(|&&i| self.rules[i as usize].matches_target(target))
                .copied()
        };
        if let Some(d) = first(&bucket.denies, *deny) {
            *deny = Some(d);
        }
        if deny.is_none() {
            if let Some(a) = first(&bucket.allows, *allow) {
                *allow = Some(a);
            }
        }
    }

    /// Counts a decision against its rule (for `/policy`).
    pub fn record_hit(&self, decision: &Decision) {
        let slot = match decision.rule {
            RuleRef::Named(i) => i,
            RuleRef::Default => self.rules.len(),
        };
        if let Some(h) = self.hits.get(slot) {
            h.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Decisions made by rule `index` (or by the default when `index == rules.len()`).
    pub fn hits(&self, index: usize) -> u64 {
        self.hits
            .get(index)
            .map_or(0, |h| h.load(Ordering::Relaxed))
    }
}

/// Renders a decision for people: `ALLOW  rule=NAME  mode=enforce`,
/// `DENY  rule=default deny  mode=enforce`, `ALLOW (audit: would deny)  rule=..  mode=audit`.
pub fn explain(policy: &Policy, peer: &str, target: &Target<'_>) -> String {
    let id = match parse_spiffe_id(peer) {
        Ok(id) => id,
        Err(reason) => return format!("DENY  peer `{peer}` is not a valid SPIFFE ID: {reason}"),
    };
    let d = policy.authorize(&id, target);
    let verdict = match (d.allowed, d.would_deny) {
        (false, _) => "DENY",
        (true, true) => "ALLOW (audit: would deny)",
        (true, false) => "ALLOW",
    };
    let rule = match d.rule {
        RuleRef::Named(_) => d.rule_name(policy).to_string(),
        RuleRef::Default if !policy.loaded => "no policy loaded".to_string(),
        RuleRef::Default => format!("default {}", d.action.as_str()),
    };
    format!("{verdict}  rule={rule}  mode={}", d.mode.as_str())
}

#[cfg(test)]
mod tests;
