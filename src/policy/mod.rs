//! Authorization policy: the compiled model and the decision function (DESIGN.md §4).
//!
//! Flow: `parse` (with the file's raw shape in `file`) turns a YAML file into a
//! [`Policy`]: the rules of `model` plus an index built once (`authorize`); the proxy asks
//! [`Policy::authorize`] for every connection or request, a plain function with no I/O
//! and no allocation; `store` holds the current policy, swaps it atomically on reload
//! and counts decisions. [`explain`] renders a decision for people (`meshd policy
//! explain` through `cli`, admin `/authz`).
//!
//! Semantics: a rule matches when the caller matches one `from` entry and the request
//! matches `to`. The rule's `via` says which identity of the caller `from` names: the
//! mTLS peer (`mtls`, the default), the subject of its checked JWT-SVID (`jwt`), or each
//! of the two (`both`); without a checked token, rules naming it never match. Any matching deny wins; otherwise the first matching allow; otherwise
//! the default. In audit mode every request is allowed and `would_deny` says what
//! enforce mode would have done.

mod authorize;
mod cli;
mod file;
mod model;
mod parse;
mod shadow;
mod store;

#[cfg(test)]
mod fuzz;
pub use authorize::{explain, Decision, Policy, RuleRef};
pub use cli::{check_file, explain_cli, ExplainError};
pub use model::{
    grpc_target, Action, Caller, GrpcTarget, HttpTarget, IdMatcher, Mode, PathMatch, Request, Rule,
    Target, To, Via, DEFAULT_INBOUND_PORT,
};
pub use parse::{
    load_policy, parse_policy, PolicyError, PolicyProblem, Severity, MAX_POLICY_BYTES,
};
pub use store::PolicyStore;

#[cfg(test)]
mod tests;
