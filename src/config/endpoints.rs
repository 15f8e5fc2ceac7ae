//! The `endpoints` and `intercept` grammar (DESIGN.md §4): `host:port`, a list of them,
//! or a resolver URI (`dns:///host:port`, `dns+srv:///_svc._proto.name`,
//! `file:///path`).
//!
//! Flow: `check::validate` parses each outbound's values here into [`HostPort`] and
//! [`EndpointsSpec`], once, at load; discovery takes the spec (and parses the lines of
//! an endpoint file with [`parse_host_port`]). Both types read back as written, for
//! `/config` and messages.

use crate::config::raw::Endpoints;
use serde::{Serialize, Serializer};
use std::fmt;
use std::net::Ipv6Addr;
use std::path::PathBuf;

/// A static endpoint. `host` is a DNS name or IP literal, IPv6 without its brackets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    pub host: String,
    pub port: u16,
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Shown as `host:port` in `/config`.
impl Serialize for HostPort {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// What an outbound's `endpoints` asks the discovery layer to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointsSpec {
    /// A fixed list of `host:port`.
    Static(Vec<HostPort>),
    /// `dns:///host:port`: A/AAAA records of `host`, re-resolved at their TTL.
    Dns { host: String, port: u16 },
    /// `dns+srv:///_svc._proto.name`: SRV records give hosts and ports.
    DnsSrv { name: String },
    /// `file:///abs/path`: a watched file with one `host:port` per line.
    File(PathBuf),
}

/// The value as written in the config: the URI, or the list joined by commas.
impl fmt::Display for EndpointsSpec {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            EndpointsSpec::Static(list) => {
                for (i, hp) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{hp}")?;
                }
                Ok(())
            }
            EndpointsSpec::Dns { host, port } => write!(
                f,
                "dns:///{}",
                HostPort {
                    host: host.clone(),
                    port: *port
                }
            ),
            EndpointsSpec::DnsSrv { name } => write!(f, "dns+srv:///{name}"),
            EndpointsSpec::File(path) => write!(f, "file://{}", path.display()),
        }
    }
}

/// Shown as in the file in `/config`: a list of `host:port`, or the resolver URI.
impl Serialize for EndpointsSpec {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            EndpointsSpec::Static(list) => s.collect_seq(list),
            _ => s.collect_str(self),
        }
    }
}

/// Why a `host:port` (a static endpoint, a `dns:///` target, an `intercept` address, a
/// line of an endpoint file) is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostPortError {
    /// An IPv6 address without its brackets, or brackets without `:port`.
    #[error("an IPv6 endpoint is written [addr]:port")]
    Ipv6Brackets,
    /// Brackets around something that is not an IPv6 address.
    #[error("`{0}` is not an IPv6 address")]
    NotIpv6(String),
    /// No `:port` at all.
    #[error("expected host:port")]
    NoPort,
    /// A host that is neither a DNS name nor an IP address.
    #[error("`{0}` is not a host name or IP address")]
    BadHost(String),
    /// A port that is not a number in 1..=65535.
    #[error("port `{0}` is not in 1..=65535")]
    BadPort(String),
}

/// Why an `endpoints` value is refused; each message names the offending value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointsError {
    /// `endpoints: []`.
    #[error("the endpoints list is empty")]
    EmptyList,
    /// An entry of a static list that is not `host:port`.
    #[error("endpoint `{entry}`: {reason}")]
    BadEntry {
        entry: String,
        reason: HostPortError,
    },
    /// A `dns:///` URI whose target is not `host:port`.
    #[error("endpoints `{uri}`: {reason}")]
    BadDnsTarget { uri: String, reason: HostPortError },
    /// A `dns+srv:///` URI whose name is not `_service._proto.name`.
    #[error(
        "endpoints `{uri}`: an SRV name looks like _service._proto.name (e.g. _grpc._tcp.payments)"
    )]
    BadSrvName { uri: String },
    /// A `file://` URI with a relative (or no) path.
    #[error("endpoints `{uri}`: a file URI needs an absolute path: file:///path")]
    RelativeFile { uri: String },
    /// A lone `host:port` where a list or a resolver URI belongs.
    #[error(
        "endpoints `{uri}`: not a resolver URI; a static endpoint goes in a list: [\"{uri}\"]"
    )]
    StaticAsUri { uri: String },
    /// Any other string.
    #[error("endpoints `{uri}`: expected a list of host:port, or dns:///host:port, dns+srv:///_svc._proto.name, file:///path")]
    UnknownUri { uri: String },
}

/// Parses an `endpoints` value (DESIGN.md §4).
pub(crate) fn parse_endpoints(endpoints: &Endpoints) -> Result<EndpointsSpec, EndpointsError> {
    match endpoints {
        Endpoints::Static(list) if list.is_empty() => Err(EndpointsError::EmptyList),
        Endpoints::Static(list) => list
            .iter()
            .map(|e| parse_entry(e))
            .collect::<Result<_, _>>()
            .map(EndpointsSpec::Static),
        Endpoints::Uri(uri) => parse_uri(uri),
    }
}

/// One entry of a static list.
pub(crate) fn parse_entry(entry: &str) -> Result<HostPort, EndpointsError> {
    parse_host_port(entry).map_err(|reason| EndpointsError::BadEntry {
        entry: entry.to_string(),
        reason,
    })
}

fn parse_uri(uri: &str) -> Result<EndpointsSpec, EndpointsError> {
    let uri_owned = || uri.to_string();
    if let Some(rest) = uri.strip_prefix("dns:///") {
        let HostPort { host, port } =
            parse_host_port(rest).map_err(|reason| EndpointsError::BadDnsTarget {
                uri: uri_owned(),
                reason,
            })?;
        Ok(EndpointsSpec::Dns { host, port })
    } else if let Some(name) = uri.strip_prefix("dns+srv:///") {
        let labels: Vec<&str> = name.split('.').collect();
        let ok = labels.len() >= 3
            && labels[..2]
                .iter()
                .all(|l| l.len() > 1 && l.starts_with('_'))
            && labels[2..].iter().all(|l| valid_dns_label(l));
        if !ok {
            return Err(EndpointsError::BadSrvName { uri: uri_owned() });
        }
        Ok(EndpointsSpec::DnsSrv {
            name: name.to_string(),
        })
    } else if let Some(path) = uri.strip_prefix("file://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err(EndpointsError::RelativeFile { uri: uri_owned() });
        }
        Ok(EndpointsSpec::File(PathBuf::from(path)))
    } else if parse_host_port(uri).is_ok() {
        Err(EndpointsError::StaticAsUri { uri: uri_owned() })
    } else {
        Err(EndpointsError::UnknownUri { uri: uri_owned() })
    }
}

/// Parses `host:port` or `[ipv6]:port` (port 1..=65535).
pub fn parse_host_port(text: &str) -> Result<HostPort, HostPortError> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip, port) = rest.split_once("]:").ok_or(HostPortError::Ipv6Brackets)?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| HostPortError::NotIpv6(ip.to_string()))?;
        (ip, port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or(HostPortError::NoPort)?;
        if host.contains(':') {
            return Err(HostPortError::Ipv6Brackets);
        }
        if host.is_empty() || !host.split('.').all(valid_dns_label) {
            return Err(HostPortError::BadHost(host.to_string()));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(HostPort {
            host: host.to_string(),
            port,
        }),
        _ => Err(HostPortError::BadPort(port.to_string())),
    }
}

fn valid_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}
