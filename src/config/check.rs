//! Semantic validation of a parsed config and the report `meshd check --config F` prints.
//!
//! Flow: `config::Config::from_text` calls [`validate`] after the environment overrides;
//! it checks every rule and collects every problem, and from the raw config builds the
//! typed [`Config`] (SPIFFE IDs, endpoints and intercept addresses parsed, here and only
//! here). Each problem is attached to a key path such as `outbound[1].server_id`, which
//! [`Source`] turns into `line:column`.

use crate::config::endpoints::{parse_endpoints, parse_entry, EndpointsSpec};
use crate::config::raw::{Endpoints, ParsedOutbound, RawConfig};
use crate::config::source::Source;
use crate::config::upstream_auth;
use crate::config::{
    parse_spiffe_id, parse_workload_api_address, Config, ConfigError, ConfigProblem, Env, Severity,
    ValueError,
};
use spiffe::SpiffeId;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// Every semantic problem in `raw`, and the typed [`Config`] when none is an error.
/// `file_conflict`: the file itself set both `identity.files` and
/// `identity.workload_api` (the environment may since have chosen).
pub(crate) fn validate(
    raw: RawConfig,
    file_conflict: bool,
    src: &Source,
) -> (Option<Config>, Vec<ConfigProblem>) {
    let mut out = Vec::new();
    let config = &raw;
    if config.service.trim().is_empty() {
        out.push(src.problem("service", ConfigError::EmptyService));
    }
    if file_conflict {
        out.push(src.in_file("identity.files", ConfigError::IdentityConflict));
    }
    let workload_api = match config.identity.workload_api.as_deref() {
        None => Some(None),
        Some(addr) => match parse_workload_api_address(addr) {
            Ok(canonical) => Some(Some(canonical)),
            Err(e) => {
                let error = ConfigError::WorkloadApi(e);
                out.push(src.problem("identity.workload_api", error));
                None
            }
        },
    };
    let expect = match config.identity.expect.as_deref() {
        None => Some(None),
        Some(id) => check_spiffe_id(src, "identity.expect", id, &mut out).map(Some),
    };
    let mut listeners: Vec<(String, SocketAddr)> = Vec::new();
    if let Some(inbound) = &config.inbound {
        listeners.push(("inbound.listen".into(), inbound.listen));
    }
    let mut names: BTreeMap<&str, usize> = BTreeMap::new();
    let mut parsed = Vec::with_capacity(config.outbound.len());
    for (i, ob) in config.outbound.iter().enumerate() {
        let at = |key: &str| format!("outbound[{i}].{key}");
        if ob.name.trim().is_empty() {
            out.push(src.problem(&at("name"), ConfigError::EmptyOutboundName { index: i }));
        } else if let Some(&first) = names.get(ob.name.as_str()) {
            let error = ConfigError::DuplicateOutboundName {
                index: i,
                name: ob.name.clone(),
                first,
            };
            out.push(src.problem(&at("name"), error));
        } else {
            names.insert(&ob.name, i);
        }
        if let Some(listen) = ob.listen {
            listeners.push((at("listen"), listen));
        }
        let endpoints = check_endpoints(src, &at("endpoints"), &ob.endpoints, &mut out);
        let files = config.identity.files.is_some();
        let auth = upstream_auth::check(i, ob, endpoints.as_ref(), files, src, &mut out);
        parsed.push(auth.zip(endpoints));
        if ob.timeout.is_zero() {
            out.push(src.problem(
                &at("timeout"),
                ConfigError::ZeroTimeout {
                    field: at("timeout"),
                },
            ));
        }
        if ob.min_refresh.is_zero() || ob.min_refresh > ob.max_refresh {
            let error = ConfigError::BadRefreshBounds {
                field: at("min_refresh"),
                min: humantime::format_duration(ob.min_refresh).to_string(),
                max: humantime::format_duration(ob.max_refresh).to_string(),
            };
            out.push(src.problem(&at("min_refresh"), error));
        }
        let resilience = crate::config::resilience::Resilience {
            retries: &ob.retries,
            health_check: ob.health_check.as_ref(),
            outlier: &ob.outlier_detection,
            limits: &ob.limits,
        };
        crate::config::resilience::check(&resilience, &format!("outbound[{i}]"), src, &mut out);
    }
    let intercepts = crate::config::intercept::check(config, src, &mut out, &mut listeners);
    crate::config::gateway::check(config, src, &mut out, &mut listeners);
    crate::config::jwt_svid::check(config, src, &mut out);
    listeners.push(("admin.listen".into(), config.admin.listen));
    if let Some(addr) = config.admin.metrics_listen {
        listeners.push(("admin.metrics_listen".into(), addr));
    }
    for (j, (field, addr)) in listeners.iter().enumerate() {
        if let Some((other_field, other_addr)) =
            listeners[..j].iter().find(|(_, a)| collide(*a, *addr))
        {
            let error = ConfigError::ListenCollision {
                field: field.clone(),
                addr: *addr,
                other_field: other_field.clone(),
                other_addr: *other_addr,
            };
            out.push(src.problem(field, error));
        }
    }
    let limits = [
        ("inbound", config.inbound.as_ref().map(|i| &i.connections)),
        ("gateway", config.gateway.as_ref().map(|g| &g.connections)),
    ];
    for (listener, limits) in limits {
        for key in limits.map(|l| l.zero_keys()).unwrap_or_default() {
            let field = format!("{listener}.connections.{key}");
            out.push(src.problem(
                &field,
                ConfigError::ZeroTimeout {
                    field: field.clone(),
                },
            ));
        }
    }
    if config.runtime.worker_threads == 0 {
        out.push(src.problem("runtime.worker_threads", ConfigError::ZeroWorkers));
    }
    if let Err(reason) = check_log_level(&config.log.level) {
        let error = ConfigError::BadLogLevel {
            value: config.log.level.clone(),
            reason,
        };
        out.push(src.problem("log.level", error));
    }
    if !config.admin.listen.ip().is_loopback() {
        out.push(src.problem(
            "admin.listen",
            ConfigError::AdminNotLoopback {
                addr: config.admin.listen,
            },
        ));
    }
    if config.inbound.as_ref().is_some_and(|i| i.policy.is_none()) {
        out.push(src.problem("inbound", ConfigError::InboundWithoutPolicy));
    }
    if out.iter().any(|p| p.severity == Severity::Error) {
        return (None, out);
    }
    let outbound: Option<Vec<_>> = parsed
        .into_iter()
        .zip(intercepts)
        .map(|(ids, intercept)| {
            let ((server_id, tls), endpoints) = ids?;
            Some(ParsedOutbound {
                server_id,
                tls,
                endpoints,
                intercept: intercept?,
            })
        })
        .collect();
    let (Some(workload_api), Some(expect), Some(outbound)) = (workload_api, expect, outbound)
    else {
        return (None, out);
    };
    (Some(raw.into_config(workload_api, expect, outbound)), out)
}

/// `id` as a SPIFFE ID, or a problem at `field`.
pub(crate) fn check_spiffe_id(
    src: &Source,
    field: &str,
    id: &str,
    out: &mut Vec<ConfigProblem>,
) -> Option<SpiffeId> {
    match parse_spiffe_id(id) {
        Ok(id) => Some(id),
        Err(reason) => {
            let error = ConfigError::BadSpiffeId {
                field: field.into(),
                value: id.into(),
                reason,
            };
            out.push(src.problem(field, error));
            None
        }
    }
}

/// `endpoints` parsed, or a problem per bad entry of a static list (at the entry), or
/// one at `field`.
fn check_endpoints(
    src: &Source,
    field: &str,
    endpoints: &Endpoints,
    out: &mut Vec<ConfigProblem>,
) -> Option<EndpointsSpec> {
    match endpoints {
        Endpoints::Static(list) if !list.is_empty() => {
            let mut good = Vec::with_capacity(list.len());
            for (j, entry) in list.iter().enumerate() {
                match parse_entry(entry) {
                    Ok(hp) => good.push(hp),
                    Err(reason) => {
                        let field = format!("{field}[{j}]");
                        out.push(src.problem(
                            &field,
                            ConfigError::BadEndpoints {
                                field: field.clone(),
                                reason,
                            },
                        ));
                    }
                }
            }
            (good.len() == list.len()).then_some(EndpointsSpec::Static(good))
        }
        _ => match parse_endpoints(endpoints) {
            Ok(spec) => Some(spec),
            Err(reason) => {
                out.push(src.problem(
                    field,
                    ConfigError::BadEndpoints {
                        field: field.into(),
                        reason,
                    },
                ));
                None
            }
        },
    }
}

/// Two listeners collide when they share a (non-zero) port and one address covers the other.
fn collide(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() == b.port()
        && a.port() != 0
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

/// The bare words `log.level` accepts.
const LOG_LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];

/// `log.level` must parse as an `EnvFilter`; a bare word must also be a level, since
/// EnvFilter would take a typo such as `verbose` as a target name and log nothing of ours.
fn check_log_level(level: &str) -> Result<(), ValueError> {
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map_err(|e| ValueError::LogFilter(e.to_string()))?;
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '['])
            && !LOG_LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(ValueError::NotALevel {
                directive: directive.to_string(),
            });
        }
    }
    Ok(())
}

/// What `meshd check --config F` prints, and whether the config is usable: every
/// problem one per line, or any warnings then a one-line `ok: …` summary.
pub fn check_report(path: &Path, env: &Env) -> (String, bool) {
    // Hook: the policy file named by `inbound.policy` is checked by the policy module's
    // own check (main runs it after this one); its problems use the same line format.
    match Config::load_checked(path, env) {
        Err(errors) => (errors.to_string(), false),
        Ok((config, warnings)) => {
            let mut lines: Vec<String> = warnings.iter().map(ToString::to_string).collect();
            lines.push(summary(&config));
            (lines.join("\n"), true)
        }
    }
}

fn summary(config: &Config) -> String {
    let inbound = match &config.inbound {
        Some(i) => format!("inbound {} -> {} ({})", i.listen, i.forward, i.protocol),
        None => "no inbound".to_string(),
    };
    let identity = match (&config.identity.files, &config.identity.workload_api) {
        (Some(files), _) => format!("identity from files {}", files.cert.display()),
        (None, Some(api)) => format!("identity from {api}"),
        (None, None) => "no identity source".to_string(),
    };
    format!(
        "ok: {}: {inbound}, {} outbound, {identity}",
        config.service,
        config.outbound.len()
    )
}
