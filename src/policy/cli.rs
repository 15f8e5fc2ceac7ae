//! The policy commands of the command line: `meshd check --policy F` and
//! `meshd policy explain`.
//!
//! Flow: both load the file through [`load_policy`] (so they report the same
//! `file:line:column` problems a reload would), then [`check_file`] summarises it and
//! [`explain_cli`] turns the command-line target into a [`Target`] and renders the
//! decision with [`explain`].

use crate::config::parse_spiffe_id;
use crate::policy::parse::{load_policy, PolicyProblem};
use crate::policy::{explain, Request, Target, DEFAULT_INBOUND_PORT};
use std::path::Path;

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
) -> Result<String, String> {
    let join = |ps: Vec<PolicyProblem>| {
        ps.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n")
    };
    let (policy, _warnings) = load_policy(policy_path, 0).map_err(join)?;
    parse_spiffe_id(from).map_err(|e| format!("--from `{from}` is not a valid SPIFFE ID: {e}"))?;
    let upper_method: String;
    let request = match (grpc, http) {
        (Some(_), Some(_)) => return Err("give either --grpc or --http, not both".into()),
        (Some(g), None) => {
            let (service, method) = g.trim_start_matches('/').split_once('/').filter(|(s, m)| !s.is_empty() && !m.is_empty())
                .ok_or_else(|| format!("--grpc `{g}`: expected SERVICE/METHOD, e.g. payment.v1.PaymentService/GetPayment"))?;
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
