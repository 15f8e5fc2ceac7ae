//! Transparent interception, the config side: the `transparent` listener that the pod's
//! iptables rules REDIRECT the app's outbound TCP to (DESIGN.md §2, `127.0.0.1:15001`),
//! what it does with a destination no outbound claims, and the `intercept` addresses by
//! which each outbound claims the connections the app opens to them.
//!
//! Flow: serde reads these with the rest of the config; [`check`] parses each outbound's
//! `intercept` addresses and adds a problem per bad value to the config report
//! (`file:line:column: message`); `app` builds the routing table of `intercept` from
//! the parsed addresses.

use crate::config::endpoints::parse_host_port;
use crate::config::error::{ConfigError, ConfigProblem};
use crate::config::raw::RawConfig;
use crate::config::source::Source;
use crate::config::HostPort;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// `transparent:` — the outbound listener that intercepted connections arrive on.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TransparentConfig {
    /// Where the iptables REDIRECT sends the app's outbound TCP (`--outbound-port`).
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Where the ip6tables REDIRECT sends it: IPv6 loopback, same port. Left unbound
    /// (and logged) when the pod has no IPv6 loopback.
    #[serde(default = "default_listen_v6")]
    pub listen_v6: SocketAddr,
    /// What happens to a connection whose original destination no outbound claims.
    #[serde(default)]
    pub unmatched: Unmatched,
}

impl Default for TransparentConfig {
    fn default() -> Self {
        TransparentConfig {
            listen: default_listen(),
            listen_v6: default_listen_v6(),
            unmatched: Unmatched::default(),
        }
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 15001))
}

fn default_listen_v6() -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 15001))
}

/// The fate of an intercepted connection to a destination no outbound's `intercept` names.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    /// Closed at once and counted (Istio's `REGISTRY_ONLY`): the app reaches only the
    /// services the config names.
    #[default]
    Deny,
    /// Connected, as plain TCP, to the destination the app asked for (Istio's
    /// `ALLOW_ANY`): no mTLS, no identity check.
    Passthrough,
}

/// The interception rules of a config: every outbound is reachable, by an explicit
/// `listen`, by `intercept` addresses, or both; `intercept` needs the `transparent`
/// listener; no address is claimed twice, and each is a `host:port` or a concrete
/// `ip:port`. Returns each outbound's parsed addresses, `None` for one with a bad address.
pub(crate) fn check(
    config: &RawConfig,
    src: &Source,
    out: &mut Vec<ConfigProblem>,
    listeners: &mut Vec<(String, SocketAddr)>,
) -> Vec<Option<Vec<HostPort>>> {
    if let Some(t) = &config.transparent {
        listeners.push(("transparent.listen".into(), t.listen));
        listeners.push(("transparent.listen_v6".into(), t.listen_v6));
    }
    let mut claimed: HashMap<String, usize> = HashMap::new();
    let mut parsed = Vec::with_capacity(config.outbound.len());
    for (i, ob) in config.outbound.iter().enumerate() {
        let at = |key: &str| format!("outbound[{i}].{key}");
        let routed = config
            .gateway
            .as_ref()
            .is_some_and(|g| g.routes.iter().any(|r| r.upstream == ob.name));
        if ob.listen.is_none() && ob.intercept.is_empty() && !routed {
            out.push(src.problem(&at("name"), ConfigError::Unreachable { index: i }));
        }
        if !ob.intercept.is_empty() && config.transparent.is_none() {
            let error = ConfigError::InterceptWithoutTransparent { index: i };
            out.push(src.problem(&at("intercept"), error));
        }
        let mut targets = Vec::with_capacity(ob.intercept.len());
        for (j, text) in ob.intercept.iter().enumerate() {
            let field = format!("outbound[{i}].intercept[{j}]");
            let target = match parse_host_port(text) {
                Ok(t) => t,
                Err(reason) => {
                    let error = ConfigError::BadIntercept {
                        field: field.clone(),
                        value: text.clone(),
                        reason,
                    };
                    out.push(src.problem(&field, error));
                    continue;
                }
            };
            if let Ok(ip) = target.host.parse::<IpAddr>() {
                if ip.is_unspecified() {
                    let error = ConfigError::VagueIntercept {
                        field: field.clone(),
                        addr: SocketAddr::new(ip, target.port),
                    };
                    out.push(src.problem(&field, error));
                    continue;
                }
            }
            let key = target.to_string().to_ascii_lowercase();
            if let Some(&first) = claimed.get(&key) {
                let error = ConfigError::DuplicateIntercept {
                    field: field.clone(),
                    addr: key,
                    first,
                };
                out.push(src.problem(&field, error));
            } else {
                claimed.insert(key, i);
            }
            targets.push(target);
        }
        parsed.push((targets.len() == ob.intercept.len()).then_some(targets));
    }
    parsed
}
