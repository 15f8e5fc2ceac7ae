//! The decision: [`Policy`] compiles rules into a per-trust-domain index once, then
//! [`Policy::authorize`] decides each connection or request with no I/O and no
//! allocation, and [`explain`] renders a decision for people.

use crate::config::parse_spiffe_id;
use crate::identity::SpiffeId;
use crate::policy::model::{Action, Caller, IdMatcher, Mode, Rule, Target, Via};
// foldhash rather than SipHash: the keys come from the policy file, and every request
// hashes the caller's trust domain and path up to a few times.
use foldhash::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

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
    /// Rules whose `from` names the mTLS peer (`via: mtls` and `both`), by trust domain.
    index: HashMap<String, DomainIndex>,
    /// Rules whose `from` names only the JWT-SVID subject (`via: jwt`), by trust domain.
    jwt_index: HashMap<String, DomainIndex>,
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
        let mut index: HashMap<String, DomainIndex> = HashMap::default();
        let mut jwt_index: HashMap<String, DomainIndex> = HashMap::default();
        for (i, rule) in rules.iter().enumerate() {
            let i = u32::try_from(i).unwrap_or(u32::MAX);
            let index = match rule.via {
                Via::Mtls | Via::Both => &mut index,
                Via::Jwt => &mut jwt_index,
            };
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
            jwt_index,
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

    /// Decides one connection or request of a caller known by its mTLS peer alone.
    pub fn authorize(&self, peer: &SpiffeId, target: &Target<'_>) -> Decision {
        self.authorize_caller(&Caller::mtls(peer), target)
    }

    /// Decides one connection or request: rules naming the mTLS peer are looked up by
    /// its ID, rules naming the token by the JWT-SVID subject (none without a token).
    /// No I/O, no allocation.
    pub fn authorize_caller(&self, caller: &Caller<'_>, target: &Target<'_>) -> Decision {
        let mut deny: Option<u32> = None;
        let mut allow: Option<u32> = None;
        let found = [
            (&self.index, Some(caller.peer)),
            (&self.jwt_index, caller.jwt),
        ];
        for (index, id) in found {
            let Some(id) = id else { continue };
            if let Some(domain) = index.get(id.trust_domain_name()) {
                self.lookup(domain, id, caller, target, &mut deny, &mut allow);
            }
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

    /// Scans the buckets of one trust domain that may hold rules for `id`: its exact
    /// path, each of its ancestors' prefixes, the whole domain.
    fn lookup(
        &self,
        domain: &DomainIndex,
        id: &SpiffeId,
        caller: &Caller<'_>,
        target: &Target<'_>,
        deny: &mut Option<u32>,
        allow: &mut Option<u32>,
    ) {
        let path = id.path();
        if let Some(b) = domain.exact.get(path) {
            self.scan(b, caller, target, deny, allow);
        }
        for (at, _) in path.match_indices('/').skip(1) {
            if at > domain.max_prefix_len {
                break;
            }
            if let Some(b) = domain.prefix.get(&path[..at]) {
                self.scan(b, caller, target, deny, allow);
            }
        }
        self.scan(&domain.whole, caller, target, deny, allow);
    }

    /// Finds the lowest-index matching deny and allow in a bucket, improving on earlier finds.
    fn scan(
        &self,
        bucket: &Bucket,
        caller: &Caller<'_>,
        target: &Target<'_>,
        deny: &mut Option<u32>,
        allow: &mut Option<u32>,
    ) {
        let first = |list: &[u32], best: Option<u32>| {
            list.iter()
                .take_while(|&&i| best.is_none_or(|b| i < b))
                .find(|&&i| self.rules[i as usize].matches_rest(caller, target))
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
