//! Reading and validating policy files, with `file:line:column` on every problem.
//!
//! Flow: [`load_policy`] checks the size (over [`MAX_POLICY_BYTES`] is refused before any
//! parsing), UTF-8 and emptiness, then [`parse_policy`] deserializes with
//! `serde_yaml_ng` (unknown fields are errors). Values are validated *while* they are
//! deserialized (SPIFFE ID matchers, gRPC targets, paths, methods, ports), so serde
//! reports their exact position. Whole-policy checks follow (duplicate names are
//! errors, allows shadowed by a deny are warnings) and locate the rule in the source by
//! searching for its `name:`. The command line uses it through `policy_cli`.

use crate::identity::parse_spiffe_id;
use crate::policy::{Action, GrpcTarget, HttpTarget, IdMatcher, Mode, PathMatch, Policy, Rule, To};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

/// Files above this size are refused before parsing: policies are small, and a huge
/// file is a mistake or an attack that must not stall a reload.
pub const MAX_POLICY_BYTES: u64 = 10 * 1024 * 1024;

/// Why a policy file (or one value in it) is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    /// The file could not be opened or read.
    #[error("cannot read policy file: {0}")]
    Read(String),
    /// The file exceeds [`MAX_POLICY_BYTES`].
    #[error("policy file is {size} bytes, over the {limit}-byte limit")]
    TooLarge { size: u64, limit: u64 },
    /// The file holds invalid UTF-8.
    #[error("policy file is not valid UTF-8")]
    NotUtf8,
    /// The file holds nothing but whitespace and comments.
    #[error("policy file is empty")]
    Empty,
    /// YAML syntax, wrong types, unknown or missing fields, or an invalid value
    /// (the message comes from the value's own check below, via serde).
    #[error("{0}")]
    Yaml(String),
    /// A `from` entry is not a valid SPIFFE ID (per the SPIFFE-ID standard).
    #[error("`{text}` is not a valid SPIFFE ID: {reason}")]
    InvalidSpiffeId { text: String, reason: String },
    /// `*` anywhere in a SPIFFE ID matcher but as a trailing `/*`.
    #[error("`{0}`: `*` is only allowed as a trailing `/*` (path prefix or whole trust domain)")]
    MisplacedWildcard(String),
    /// A gRPC target is not `package.Service/Method` or `package.Service/*`.
    #[error(
        "`{0}` is not a gRPC target: expected `package.Service/Method` or `package.Service/*`"
    )]
    BadGrpcTarget(String),
    /// An HTTP path is not `/exact` or `/prefix/*`.
    #[error("`{0}` is not an HTTP path: expected `/exact/path` or `/prefix/*`")]
    BadHttpPath(String),
    /// An HTTP method is not a token like `GET`.
    #[error("`{0}` is not an HTTP method")]
    BadHttpMethod(String),
    /// A port is 0 or above 65535.
    #[error("port {0} is out of range 1-65535")]
    BadPort(i128),
    /// A list that must name something is empty.
    #[error("{0} must not be empty")]
    EmptyList(&'static str),
    /// A rule name is empty or holds whitespace or control characters.
    #[error("rule name `{0}` must be non-empty, without spaces or control characters")]
    BadRuleName(String),
    /// Two rules share a name; names identify rules in denials, metrics and `/policy`.
    #[error("duplicate rule name \"{name}\" (first used on line {first_line})")]
    DuplicateName { name: String, first_line: usize },
    /// An allow rule that a deny rule fully covers; it can never allow anything.
    #[error("allow rule \"{allow}\" is fully shadowed by deny rule \"{deny}\" (a matching deny always wins)")]
    ShadowedAllow { allow: String, deny: String },
}

/// How serious a problem is: errors reject the file, warnings are reported only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem in one file, at a 1-based line and column when known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PolicyProblem {
    pub file: PathBuf,
    /// `None` for problems with the file as a whole (e.g. unreadable).
    pub position: Option<(usize, usize)>,
    pub severity: Severity,
    pub error: PolicyError,
}

impl fmt::Display for PolicyProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if self.severity == Severity::Warning {
            f.write_str(": warning")?;
        }
        write!(f, ": {}", self.error)
    }
}

/// Reads, parses and validates a policy file. On success returns the policy and its
/// warnings; on failure every error (and warning) found.
pub fn load_policy(
    path: &Path,
    version: u64,
) -> Result<(Policy, Vec<PolicyProblem>), Vec<PolicyProblem>> {
    let whole = |error| vec![problem(path, None, Severity::Error, error)];
    let file = std::fs::File::open(path).map_err(|e| whole(PolicyError::Read(e.to_string())))?;
    let size = file
        .metadata()
        .map_err(|e| whole(PolicyError::Read(e.to_string())))?
        .len();
    let too_large = |size| {
        vec![problem(
            path,
            Some((1, 1)),
            Severity::Error,
            PolicyError::TooLarge {
                size,
                limit: MAX_POLICY_BYTES,
            },
        )]
    };
    if size > MAX_POLICY_BYTES {
        return Err(too_large(size));
    }
    let mut bytes = Vec::with_capacity(size as usize);
    file.take(MAX_POLICY_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| whole(PolicyError::Read(e.to_string())))?;
    if bytes.len() as u64 > MAX_POLICY_BYTES {
        return Err(too_large(bytes.len() as u64));
    }
    let source = match std::str::from_utf8(&bytes) {
        Ok(s) => s,
        Err(e) => {
            let at = line_col(
                &String::from_utf8_lossy(&bytes[..e.valid_up_to()]),
                e.valid_up_to(),
            );
            return Err(vec![problem(
                path,
                Some(at),
                Severity::Error,
                PolicyError::NotUtf8,
            )]);
        }
    };
    parse_policy(source, path, version)
}

/// Parses and validates policy text; `path` only labels problems and the policy.
pub fn parse_policy(
    source: &str,
    path: &Path,
    version: u64,
) -> Result<(Policy, Vec<PolicyProblem>), Vec<PolicyProblem>> {
    if source
        .lines()
        .all(|l| l.trim().is_empty() || l.trim_start().starts_with('#'))
    {
        return Err(vec![problem(
            path,
            Some((1, 1)),
            Severity::Error,
            PolicyError::Empty,
        )]);
    }
    let raw: RawPolicy = serde_yaml_ng::from_str(source).map_err(|e| {
        let position = e.location().map(|l| (l.line(), l.column()));
        let text = e.to_string();
        let message = text.split(" at line ").next().unwrap_or(&text).to_string();
        vec![problem(
            path,
            position,
            Severity::Error,
            PolicyError::Yaml(message),
        )]
    })?;
    let mut problems = Vec::new();
    let mut first_line: HashMap<&str, usize> = HashMap::new();
    let mut count: HashMap<&str, usize> = HashMap::new();
    for rule in &raw.rules {
        let nth = count.entry(&rule.name.0).or_default();
        let at = locate_name(source, &rule.name.0, *nth);
        *nth += 1;
        match first_line.get(rule.name.0.as_str()) {
            Some(&first_line) => {
                let error = PolicyError::DuplicateName {
                    name: rule.name.0.clone(),
                    first_line,
                };
                problems.push(problem(path, at, Severity::Error, error));
            }
            None => {
                first_line.insert(&rule.name.0, at.map_or(0, |p| p.0));
            }
        }
    }
    let rules: Vec<Rule> = raw
        .rules
        .iter()
        .map(|r| Rule {
            name: Arc::from(r.name.0.as_str()),
            action: r.action,
            from: r.from.0.clone(),
            to: r.to.as_ref().map(|t| To {
                grpc: t.grpc.clone(),
                http: t
                    .http
                    .iter()
                    .map(|h| HttpTarget {
                        methods: h.methods.iter().map(|m| m.0.clone()).collect(),
                        paths: h.paths.clone(),
                    })
                    .collect(),
                ports: t.ports.iter().map(|p| p.0).collect(),
            }),
        })
        .collect();
    for (i, allow) in rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.action == Action::Allow)
    {
        if let Some(deny) = rules
            .iter()
            .find(|d| d.action == Action::Deny && allow.is_covered_by(d))
        {
            let nth = rules[..i].iter().filter(|r| r.name == allow.name).count();
            let error = PolicyError::ShadowedAllow {
                allow: allow.name.to_string(),
                deny: deny.name.to_string(),
            };
            problems.push(problem(
                path,
                locate_name(source, &allow.name, nth),
                Severity::Warning,
                error,
            ));
        }
    }
    if problems.iter().any(|p| p.severity == Severity::Error) {
        return Err(problems);
    }
    let policy = Policy::new(
        raw.service,
        raw.mode,
        raw.default,
        rules,
        version,
        path.to_path_buf(),
    );
    Ok((policy, problems))
}

fn problem(
    path: &Path,
    position: Option<(usize, usize)>,
    severity: Severity,
    error: PolicyError,
) -> PolicyProblem {
    PolicyProblem {
        file: path.to_path_buf(),
        position,
        severity,
        error,
    }
}

/// 1-based line and column (in characters) of byte offset `at` in `source`.
fn line_col(source: &str, at: usize) -> (usize, usize) {
    let before = &source[..at.min(source.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

/// Finds the `nth` (0-based) `name: VALUE` in the source (plain, single- or double-quoted,
/// block or flow style) and returns the position of the value.
fn locate_name(source: &str, name: &str, nth: usize) -> Option<(usize, usize)> {
    let mut found = 0;
    for (at, _) in source.match_indices(name) {
        let before = source[..at].trim_end_matches(['"', '\'']);
        let line_start = before.rfind('\n').map_or(0, |i| i + 1);
        let key = before[line_start..].trim_end();
        let Some(key) = key.strip_suffix(':') else {
            continue;
        };
        let key = key.trim_end().trim_end_matches(['"', '\'']);
        if !key.ends_with("name")
            || key[..key.len() - 4].ends_with(|c: char| c.is_alphanumeric() || c == '_')
        {
            continue;
        }
        let after = source[at + name.len()..].trim_start_matches(['"', '\'']);
        if !after.is_empty() && !after.starts_with([' ', '\t', '\r', '\n', ',', '}', '#']) {
            continue;
        }
        if found == nth {
            let quoted = source[..at].ends_with(['"', '\'']);
            return Some(line_col(source, if quoted { at - 1 } else { at }));
        }
        found += 1;
    }
    None
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    service: String,
    #[serde(default)]
    mode: Mode,
    #[serde(default = "deny")]
    default: Action,
    #[serde(default)]
    rules: Vec<RawRule>,
}

fn deny() -> Action {
    Action::Deny
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: RuleName,
    #[serde(default)]
    action: Action,
    from: NonEmpty<IdMatcher>,
    #[serde(default)]
    to: Option<RawTo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTo {
    #[serde(default)]
    grpc: Vec<GrpcTarget>,
    #[serde(default)]
    http: Vec<RawHttp>,
    #[serde(default)]
    ports: Vec<Port>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    #[serde(default)]
    methods: Vec<Method>,
    #[serde(default)]
    paths: Vec<PathMatch>,
}

/// A `from` list: validated non-empty inside the visitor so serde reports its position.
struct NonEmpty<T>(Vec<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for NonEmpty<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = NonEmpty<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-empty list of SPIFFE IDs")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    return Err(de::Error::custom(PolicyError::EmptyList("`from`")));
                }
                Ok(NonEmpty(items))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// Deserializes a string through `FromStr`, failing inside the visitor so serde
/// attaches the scalar's own line and column to the error.
fn from_str_value<'de, D: Deserializer<'de>, T: FromStr<Err = PolicyError>>(
    d: D,
    what: &'static str,
) -> Result<T, D::Error> {
    struct V<T>(&'static str, PhantomData<T>);
    impl<T: FromStr<Err = PolicyError>> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(V(what, PhantomData))
}

macro_rules! deserialize_via_from_str {
    ($t:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_str_value(d, $what)
            }
        }
    };
}

deserialize_via_from_str!(
    IdMatcher,
    "a SPIFFE ID, `spiffe://td/path/*` or `spiffe://td/*`"
);
deserialize_via_from_str!(GrpcTarget, "a gRPC target `package.Service/Method`");
deserialize_via_from_str!(PathMatch, "an HTTP path");
deserialize_via_from_str!(Method, "an HTTP method");
deserialize_via_from_str!(RuleName, "a rule name");

/// A rule name: it labels metrics and denials, so it must be a visible token.
struct RuleName(String);

impl FromStr for RuleName {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PolicyError::BadRuleName(text.to_string()));
        }
        Ok(RuleName(text.to_string()))
    }
}

impl FromStr for IdMatcher {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let (base, wildcard) = match text.strip_suffix("/*") {
            Some(base) => (base, true),
            None => (text, false),
        };
        if base.contains('*') {
            return Err(PolicyError::MisplacedWildcard(text.to_string()));
        }
        let invalid = |reason: String| PolicyError::InvalidSpiffeId {
            text: text.to_string(),
            reason,
        };
        let id = parse_spiffe_id(base).map_err(invalid)?;
        let trust_domain = id.trust_domain_name().to_string();
        let path = id.path().to_string();
        Ok(match (wildcard, path.is_empty()) {
            (true, true) => IdMatcher::Domain { trust_domain },
            (true, false) => IdMatcher::Prefix {
                trust_domain,
                prefix: path,
            },
            (false, false) => IdMatcher::Exact { trust_domain, path },
            (false, true) => {
                return Err(invalid(
                    "a workload ID needs a path; use `spiffe://td/*` for a whole trust domain"
                        .into(),
                ))
            }
        })
    }
}

impl FromStr for GrpcTarget {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadGrpcTarget(text.to_string());
        let (service, method) = text
            .trim_start_matches('/')
            .split_once('/')
            .ok_or_else(bad)?;
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        if !ident(service) || service.starts_with('.') || service.ends_with('.') {
            return Err(bad());
        }
        let method = match method {
            "*" => None,
            m if ident(m) && !m.contains('.') => Some(m.to_string()),
            _ => return Err(bad()),
        };
        Ok(GrpcTarget {
            service: service.to_string(),
            method,
        })
    }
}

impl FromStr for PathMatch {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadHttpPath(text.to_string());
        if !text.starts_with('/') || text.contains(['?', '#', ' ']) {
            return Err(bad());
        }
        match text.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') && !prefix.contains('*') => {
                Ok(PathMatch::Prefix(prefix.to_string()))
            }
            Some(_) => Err(bad()),
            None if text.contains('*') => Err(bad()),
            None => Ok(PathMatch::Exact(text.to_string())),
        }
    }
}

/// An HTTP method, stored uppercase.
struct Method(String);

impl FromStr for Method {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(PolicyError::BadHttpMethod(text.to_string()));
        }
        Ok(Method(text.to_ascii_uppercase()))
    }
}

/// A port, 1-65535, checked inside the visitor for an exact position.
struct Port(u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number 1-65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p != 0 => Ok(Port(p)),
                    _ => Err(E::custom(PolicyError::BadPort(v.into()))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(PolicyError::BadPort(v.into()))),
                }
            }
        }
        d.deserialize_u64(V)
    }
}

#[cfg(test)]
#[path = "policy_parse_tests.rs"]
mod tests;
