//! The policy commands of the command line: `meshd check --policy F` and
//! `meshd policy explain`.
//!
//! Flow: both load the file through [`load_policy`] (so they report the same
//! `file:line:column` problems a reload would), then [`check_file`] summarises it and
//! [`explain_cli`] turns the command-line target into a [`Target`] and renders the
//! decision with [`explain`].

use crate::config::{parse_spiffe_id, SpiffeIdError};
use crate::policy::parse::{load_policy, PolicyProblem};
use crate::policy::{explain, Request, Target, DEFAULT_INBOUND_PORT};
use std::path::Path;

/// Why `meshd policy explain` could not explain a decision.
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// The policy file did not load: its `file:line:column` problems, one per line.
    #[error("{}", lines(.0))]
    Policy(Vec<PolicyProblem>),
    /// `--from` is not a SPIFFE ID.
    #[error("--from `{from}` is not a valid SPIFFE ID: {reason}")]
    BadCaller { from: String, reason: SpiffeIdError },
    /// Both `--grpc` and `--http` were given (clap refuses this too).
    #[error("give either --grpc or --http, not both")]
    TwoTargets,
    /// `--grpc` is not `SERVICE/METHOD`.
    #[error("--grpc `{0}`: expected SERVICE/METHOD, e.g. payment.v1.PaymentService/GetPayment")]
    BadGrpcTarget(String),
}

/// The problems of a policy file, one per line.
fn lines(problems: &[PolicyProblem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// `meshd check --policy F`: one line per problem (or an `ok` line), and whether the
/// file is acceptable (warnings do not fail it).
pub fn check_file(path: &Path) -> (Vec<String>, bool) {
    match load_policy(path, 0) {
        Ok((policy, warnings)) => {
            let mut lines: Vec<String> = warnings.iter().map(ToString::to_string).collect();
            lines.push(format!(
                "{}: ok ({} rules, mode {}, default {})",
                path.display(),
                policy.rules.len(),
                policy.mode.as_str(),
                policy.default.as_str()
            ));
            (lines, true)
        }
        Err(problems) => (problems.iter().map(ToString::to_string).collect(), false),
    }
}

/// `meshd policy explain`: loads the policy and explains one decision. The target is
/// gRPC (`SVC/METHOD`, leading `/` optional), HTTP (`METHOD`, `PATH`), or else TCP;
/// the port defaults to 15006.
pub fn explain_cli(
    policy_path: &Path,
    from: &str,
    grpc: Option<&str>,
    http: Option<(&str, &str)>,
    port: Option<u16>,
) -> Result<String, ExplainError> {
    let (policy, _warnings) = load_policy(policy_path, 0).map_err(ExplainError::Policy)?;
    parse_spiffe_id(from).map_err(|reason| ExplainError::BadCaller {
        from: from.to_string(),
        reason,
    })?;
    let upper_method: String;
    let request = match (grpc, http) {
        (Some(_), Some(_)) => return Err(ExplainError::TwoTargets),
        (Some(g), None) => {
            let (service, method) = g
                .trim_start_matches('/')
                .split_once('/')
                .filter(|(s, m)| !s.is_empty() && !m.is_empty())
                .ok_or_else(|| ExplainError::BadGrpcTarget(g.to_string()))?;
            Request::Grpc { service, method }
        }
        (None, Some((method, path))) => {
            upper_method = method.to_ascii_uppercase();
            Request::Http {
                method: &upper_method,
                path,
            }
        }
        (None, None) => Request::Tcp,
    };
    let target = Target {
        port: port.unwrap_or(DEFAULT_INBOUND_PORT),
        request,
    };
    Ok(explain(&policy, from, &target))
}
