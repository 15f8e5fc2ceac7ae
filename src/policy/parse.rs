//! Reading and validating policy files, with `file:line:column` on every problem.
//!
//! Flow: [`load_policy`] checks the size (over [`MAX_POLICY_BYTES`] is refused before any
//! parsing), UTF-8 and emptiness, then [`parse_policy`] deserializes with
//! `serde_yaml_ng` (unknown fields are errors). Values are validated *while* they are
//! deserialized (SPIFFE ID matchers, gRPC targets, paths, methods, ports), so serde
//! reports their exact position. Whole-policy checks follow (duplicate names are
//! errors, allows shadowed by a deny are warnings, found through `shadow`'s index of
//! denies) and locate the rule in the source by searching for its `name:`, only for the
//! first problems, so a load stays linear in the file's size. The command line uses it
//! through `policy/cli.rs`.

use crate::policy::file::{listed, RawPolicy};
use crate::policy::shadow::DenyIndex;
use crate::policy::{Action, HttpTarget, Policy, Rule, To};
use std::collections::HashMap;
use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
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
    /// A list that must name something is empty: an empty `from` would match nobody, and
    /// an empty list under `to` would read as "any", the opposite of what it says.
    #[error("{key} must not be empty{hint}")]
    EmptyList {
        key: &'static str,
        hint: &'static str,
    },
    /// `to` is given but names no target; it would match every request.
    #[error("`to` names no `grpc`, `http` or `ports`: leave `to` out to match every request")]
    EmptyTo,
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
    // Each rule's name is searched for in the source only when there is a problem to
    // report, and only for the first [`MAX_LOCATED`] of them: a search reads the whole
    // file, and doing it for every rule made a 100,000-rule load take minutes.
    let mut locator = Locator::new(source);
    let mut first_lines: HashMap<&str, usize> = HashMap::new();
    let mut nth_of = Vec::with_capacity(raw.rules.len());
    let mut count: HashMap<&str, usize> = HashMap::new();
    for rule in &raw.rules {
        let name = rule.name.0.as_str();
        let nth = count.entry(name).or_default();
        nth_of.push(*nth);
        *nth += 1;
        if *nth == 1 {
            continue;
        }
        let first_line = match first_lines.get(name) {
            Some(&line) => line,
            None => {
                let line = locator.find(name, 0).map_or(0, |p| p.0);
                first_lines.insert(name, line);
                line
            }
        };
        let at = locator.find(name, nth_of[nth_of.len() - 1]);
        let error = PolicyError::DuplicateName {
            name: name.to_string(),
            first_line,
        };
        problems.push(problem(path, at, Severity::Error, error));
    }
    let rules: Vec<Rule> = raw
        .rules
        .iter()
        .map(|r| Rule {
            name: Arc::from(r.name.0.as_str()),
            action: r.action,
            from: r.from.0.clone(),
            via: r.via,
            to: r.to.as_ref().map(|t| To {
                grpc: listed(&t.grpc).to_vec(),
                http: listed(&t.http)
                    .iter()
                    .map(|h| HttpTarget {
                        methods: listed(&h.methods).iter().map(|m| m.0.clone()).collect(),
                        paths: listed(&h.paths).to_vec(),
                    })
                    .collect(),
                ports: listed(&t.ports).iter().map(|p| p.0).collect(),
            }),
        })
        .collect();
    let denies = DenyIndex::new(&rules);
    for (i, allow) in rules
        .iter()
        .enumerate()
        .filter(|(_, r)| r.action == Action::Allow)
    {
        if let Some(deny) = denies.shadowing(allow) {
            let error = PolicyError::ShadowedAllow {
                allow: allow.name.to_string(),
                deny: deny.name.to_string(),
            };
            let at = locator.find(&allow.name, nth_of[i]);
            problems.push(problem(path, at, Severity::Warning, error));
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

/// The first problems of a file whose rule is looked for in the source; later ones are
/// reported without a position.
const MAX_LOCATED: usize = 200;

/// Finds rule names in the source for problems, at most [`MAX_LOCATED`] times.
struct Locator<'s> {
    source: &'s str,
    searches: usize,
}

impl<'s> Locator<'s> {
    fn new(source: &'s str) -> Locator<'s> {
        Locator {
            source,
            searches: 0,
        }
    }

    /// The line and column of the `nth` rule named `name`, unless the budget is spent.
    fn find(&mut self, name: &str, nth: usize) -> Option<(usize, usize)> {
        if self.searches >= MAX_LOCATED {
            return None;
        }
        self.searches += 1;
        locate_name(self.source, name, nth)
    }
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

#[cfg(test)]
mod tests;
