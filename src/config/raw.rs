//! The configuration as the file (then the environment) spells it: what serde reads,
//! before validation.
//!
//! Flow: `Config::from_text` deserializes a [`RawConfig`], `env::apply` overrides its
//! values, and `check::validate` checks it and turns it into a [`Config`]. It differs
//! from [`Config`] only where a value has a grammar of its own (SPIFFE IDs, the
//! Workload API address, `endpoints`, `intercept`): here those are still text, so that
//! validation can report EVERY bad one at its position instead of serde stopping at the
//! first. Field order and serde attributes mirror [`Config`]'s, since serde's messages
//! (`unknown field …, expected one of …`) list the fields in order.

use crate::config::{
    default_max_refresh, default_min_refresh, default_timeout, duration_str, AdminConfig,
    BalancerPolicy, Config, DiscoveryConfig, EndpointsSpec, GatewayConfig, HealthCheckConfig,
    HostPort, IdentityConfig, IdentityFiles, InboundConfig, JwtSvidAttach, LifecycleConfig,
    LimitsConfig, LogConfig, OutboundConfig, OutlierConfig, Protocol, RetryConfig, RuntimeConfig,
    TransparentConfig, UpstreamTlsConfig,
};
use serde::{Deserialize, Deserializer};
use spiffe::SpiffeId;
use std::fmt;
use std::net::SocketAddr;
use std::time::Duration;

/// [`Config`] as written; see there for what each field means.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub service: String,
    #[serde(default)]
    pub identity: RawIdentity,
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
    #[serde(default)]
    pub outbound: Vec<RawOutbound>,
    #[serde(default)]
    pub gateway: Option<GatewayConfig>,
    #[serde(default)]
    pub transparent: Option<TransparentConfig>,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub discovery: DiscoveryConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    #[serde(default)]
    pub log: LogConfig,
    #[serde(default)]
    pub lifecycle: LifecycleConfig,
}

/// [`IdentityConfig`] as written: the address and the expected ID still text.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawIdentity {
    #[serde(default)]
    pub workload_api: Option<String>,
    #[serde(default)]
    pub files: Option<IdentityFiles>,
    #[serde(default)]
    pub expect: Option<String>,
}

/// [`OutboundConfig`] as written: `intercept`, `endpoints` and `server_id` still text.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawOutbound {
    pub name: String,
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    #[serde(default)]
    pub intercept: Vec<String>,
    #[serde(default)]
    pub protocol: Protocol,
    pub endpoints: Endpoints,
    #[serde(default)]
    pub server_id: Option<String>,
    #[serde(default)]
    pub tls: UpstreamTlsConfig,
    #[serde(default)]
    pub jwt_svid: Option<JwtSvidAttach>,
    #[serde(default = "default_timeout", with = "duration_str")]
    pub timeout: Duration,
    #[serde(default)]
    pub retries: RetryConfig,
    #[serde(default)]
    pub health_check: Option<HealthCheckConfig>,
    #[serde(default)]
    pub outlier_detection: OutlierConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub balancer: BalancerPolicy,
    #[serde(default = "default_min_refresh", with = "duration_str")]
    pub min_refresh: Duration,
    #[serde(default = "default_max_refresh", with = "duration_str")]
    pub max_refresh: Duration,
}

/// `endpoints:` as written: either a static list of `host:port` or one resolver URI;
/// `parse_endpoints` turns it into an [`EndpointsSpec`].
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Endpoints {
    Static(Vec<String>),
    Uri(String),
}

impl<'de> Deserialize<'de> for Endpoints {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Endpoints, D::Error> {
        struct EndpointsVisitor;
        impl<'de> serde::de::Visitor<'de> for EndpointsVisitor {
            type Value = Endpoints;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a list of `host:port` strings or one URI string (dns:///, dns+srv:///, file:///)")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Endpoints, E> {
                Ok(Endpoints::Uri(v.to_string()))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Endpoints, A::Error> {
                let mut list = Vec::new();
                while let Some(item) = seq.next_element::<String>()? {
                    list.push(item);
                }
                Ok(Endpoints::Static(list))
            }
        }
        d.deserialize_any(EndpointsVisitor)
    }
}

/// The values of an outbound that validation parsed from its text.
#[derive(Debug)]
pub(crate) struct ParsedOutbound {
    pub server_id: Option<SpiffeId>,
    pub tls: UpstreamTlsConfig,
    pub endpoints: EndpointsSpec,
    pub intercept: Vec<HostPort>,
}

impl RawOutbound {
    /// The typed outbound, with the values validation parsed.
    fn into_config(self, parsed: ParsedOutbound) -> OutboundConfig {
        OutboundConfig {
            name: self.name,
            listen: self.listen,
            intercept: parsed.intercept,
            protocol: self.protocol,
            endpoints: parsed.endpoints,
            server_id: parsed.server_id,
            tls: parsed.tls,
            jwt_svid: self.jwt_svid,
            timeout: self.timeout,
            retries: self.retries,
            health_check: self.health_check,
            outlier_detection: self.outlier_detection,
            limits: self.limits,
            balancer: self.balancer,
            min_refresh: self.min_refresh,
            max_refresh: self.max_refresh,
        }
    }
}

impl RawConfig {
    /// The typed config, with the values validation parsed (`outbound` in order).
    pub(crate) fn into_config(
        self,
        workload_api: Option<String>,
        expect: Option<SpiffeId>,
        outbound: Vec<ParsedOutbound>,
    ) -> Config {
        Config {
            service: self.service,
            identity: IdentityConfig {
                workload_api,
                files: self.identity.files,
                expect,
            },
            inbound: self.inbound,
            outbound: (self.outbound.into_iter().zip(outbound))
                .map(|(raw, parsed)| raw.into_config(parsed))
                .collect(),
            gateway: self.gateway,
            transparent: self.transparent,
            admin: self.admin,
            discovery: self.discovery,
            runtime: self.runtime,
            log: self.log,
            lifecycle: self.lifecycle,
        }
    }
}
