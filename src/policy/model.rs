//! The policy model: what a rule says (its action, the peers of `from`, the targets of
//! `to`) and what a request asks for ([`Target`]). Each matcher answers two questions as
//! plain functions: does it match a request (used by `authorize`), and does it cover
//! another matcher (used by the parser's shadowed-rule warnings).

use crate::identity::SpiffeId;
use serde::Deserialize;
use std::fmt;
use std::sync::Arc;

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

/// Which identity of the caller a rule's `from` names (`via:` beside `from`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The mTLS peer's SPIFFE ID (its X.509-SVID): what `from` always meant.
    #[default]
    Mtls,
    /// The subject of the JWT-SVID the caller sent (`inbound.jwt_svid`); a request
    /// without a valid token (or an inbound that checks none) never matches.
    Jwt,
    /// The mTLS peer AND the token's subject must each match an entry of `from`.
    Both,
}

impl Via {
    /// The lowercase word used in files and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Mtls => "mtls",
            Via::Jwt => "jwt",
            Via::Both => "both",
        }
    }

    /// Whether a rule naming `self` applies only where one naming `other` does too
    /// (`both` asks for more than either alone).
    fn implies(self, other: Via) -> bool {
        self == other || self == Via::Both
    }
}

/// Who is calling: the mTLS peer, and the subject of its JWT-SVID when one was checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Caller<'a> {
    /// The SPIFFE ID of the peer's verified X.509-SVID.
    pub peer: &'a SpiffeId,
    /// The subject of a JWT-SVID that passed validation; `None` without one.
    pub jwt: Option<&'a SpiffeId>,
}

impl<'a> Caller<'a> {
    /// A caller known only by its mTLS peer ID.
    pub fn mtls(peer: &'a SpiffeId) -> Caller<'a> {
        Caller { peer, jwt: None }
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

    /// Whether `id` is one of the IDs this matcher names.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        if id.trust_domain_name() != self.trust_domain() {
            return false;
        }
        let path = id.path();
        match self {
            IdMatcher::Exact { path: p, .. } => p == path,
            IdMatcher::Prefix { prefix, .. } => {
                path.len() > prefix.len()
                    && path.starts_with(prefix.as_str())
                    && path[prefix.len()..].starts_with('/')
            }
            IdMatcher::Domain { .. } => true,
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
    /// Which identity `from` names: the mTLS peer (default), the JWT-SVID subject, or both.
    pub via: Via,
    pub to: Option<To>,
}

impl Rule {
    /// Whether the rule matches a caller already found (by the index) under `from` for
    /// the identity the index was built from, and the request.
    pub(super) fn matches_rest(&self, caller: &Caller<'_>, target: &Target<'_>) -> bool {
        let token_too = match self.via {
            Via::Both => caller
                .jwt
                .is_some_and(|sub| self.from.iter().any(|m| m.matches(sub))),
            Via::Mtls | Via::Jwt => true,
        };
        token_too && self.to.as_ref().is_none_or(|to| to.matches(target))
    }

    /// Whether every (caller, request) this rule matches is matched by `by` too.
    pub fn is_covered_by(&self, by: &Rule) -> bool {
        if !self.via.implies(by.via) {
            return false;
        }
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
