//! DNS lookups for discovery, with hickory-resolver: A/AAAA for `dns:///host:port` and
//! names in static or file lists, SRV (then A/AAAA of each target) for `dns+srv:///`.
//!
//! Flow: one [`Dns`] is built at start from `discovery.nameservers` (or the system's
//! resolv.conf) and shared by every upstream's resolver task. Each lookup returns the
//! addresses and how long the answer stays valid, which the task uses as its refresh
//! period. A resolver that cannot be built is not fatal: only lookups fail (IP literals
//! never need it).

use crate::discovery::{DiscoveredEndpoint, DiscoveryError};
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::NetError;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::TokioResolver;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

/// The shared DNS client.
pub struct Dns {
    /// The resolver, or why it could not be built (a [`DiscoveryError::Resolver`]).
    resolver: Result<TokioResolver, DiscoveryError>,
}

impl std::fmt::Debug for Dns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dns")
            .field("ready", &self.resolver.is_ok())
            .finish()
    }
}

fn remaining(valid_until: Instant) -> Duration {
    valid_until.saturating_duration_since(Instant::now())
}

impl Dns {
    /// A client for `nameservers` (`ip:port`, UDP and TCP), or the system's config when
    /// the list is empty.
    pub fn new(nameservers: &[SocketAddr]) -> Dns {
        let mut opts = ResolverOpts::default();
        opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
        opts.timeout = Duration::from_secs(2);
        opts.attempts = 1;
        let builder = if nameservers.is_empty() {
            TokioResolver::builder_tokio()
                .map_err(|e| DiscoveryError::Resolver(format!("system DNS config: {e}")))
        } else {
            let servers = nameservers
                .iter()
                .map(|addr| {
                    let mut ns = NameServerConfig::udp_and_tcp(addr.ip());
                    for c in &mut ns.connections {
                        c.port = addr.port();
                    }
                    ns
                })
                .collect();
            Ok(TokioResolver::builder_with_config(
                ResolverConfig::from_name_servers(servers),
                TokioRuntimeProvider::default(),
            ))
        };
        let resolver = builder.and_then(|b| {
            b.with_options(opts)
                .build()
                .map_err(|e| DiscoveryError::Resolver(format!("DNS resolver: {e}")))
        });
        if let Err(DiscoveryError::Resolver(reason)) = &resolver {
            tracing::warn!("{reason}; DNS names in endpoints will not resolve");
        }
        Dns { resolver }
    }

    fn resolver(&self) -> Result<&TokioResolver, DiscoveryError> {
        self.resolver.as_ref().map_err(Clone::clone)
    }

    /// The A and AAAA addresses of `host` and how long they stay valid.
    pub async fn lookup_ip(&self, host: &str) -> Result<(Vec<IpAddr>, Duration), DiscoveryError> {
        let answer = self
            .resolver()?
            .lookup_ip(host)
            .await
            .map_err(|e| lookup_error(host, "A/AAAA", e))?;
        let ips: Vec<IpAddr> = answer.iter().collect();
        if ips.is_empty() {
            return Err(DiscoveryError::NoRecords {
                name: host.to_string(),
                kind: "A/AAAA",
            });
        }
        Ok((ips, remaining(answer.valid_until())))
    }

    /// SRV records of `name` (lowest priority only, as RFC 2782 says), each target
    /// resolved to its addresses with the record's port and weight. Targets that do not
    /// resolve, and records with port 0, are left out with a warning; when none is left
    /// the lookup fails.
    pub async fn lookup_srv(
        &self,
        name: &str,
    ) -> Result<(Vec<DiscoveredEndpoint>, Option<Duration>), DiscoveryError> {
        let answer = self
            .resolver()?
            .srv_lookup(name)
            .await
            .map_err(|e| lookup_error(name, "SRV", e))?;
        let mut ttl = remaining(answer.valid_until());
        let records: Vec<_> = answer
            .answers()
            .iter()
            .filter_map(|r| match &r.data {
                RData::SRV(srv) => Some(srv.clone()),
                _ => None,
            })
            .collect();
        let Some(best) = records.iter().map(|s| s.priority).min() else {
            return Err(DiscoveryError::NoRecords {
                name: name.to_string(),
                kind: "SRV",
            });
        };
        let mut out = Vec::new();
        let mut problems = Vec::new();
        for srv in records.iter().filter(|s| s.priority == best) {
            let target = srv.target.to_utf8();
            if srv.port == 0 || target == "." {
                problems.push(format!("{target}:{} is not a usable target", srv.port));
                continue;
            }
            match self.lookup_ip(&target).await {
                Ok((ips, t)) => {
                    ttl = ttl.min(t);
                    out.extend(ips.into_iter().map(|ip| DiscoveredEndpoint {
                        addr: SocketAddr::new(ip, srv.port),
                        // weight 0 means "rarely" in RFC 2782; it still gets a share of 1.
                        weight: u32::from(srv.weight.max(1)),
                        server_id: None,
                        zone: None,
                    }));
                }
                Err(e) => problems.push(e.to_string()),
            }
        }
        if !problems.is_empty() {
            tracing::warn!("SRV {name}: left out: {}", problems.join("; "));
        }
        if out.is_empty() {
            return Err(DiscoveryError::SrvTargets {
                name: name.to_string(),
                reason: problems.join("; "),
            });
        }
        Ok((out, Some(ttl)))
    }
}

fn lookup_error(name: &str, kind: &'static str, e: NetError) -> DiscoveryError {
    if e.is_no_records_found() || e.is_nx_domain() {
        DiscoveryError::NoRecords {
            name: name.to_string(),
            kind,
        }
    } else {
        DiscoveryError::Lookup {
            name: name.to_string(),
            reason: e.to_string(),
        }
    }
}
