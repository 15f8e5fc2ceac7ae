//! Semantic validation of a parsed [`Config`], the positions its problems are reported
//! at, the `endpoints` grammar, and the report `meshd check --config F` prints.
//!
//! Flow: `config::Config::from_text` calls [`validate`] after the environment overrides;
//! it checks every rule and collects every problem, and from the raw config builds the
//! typed [`Config`] (SPIFFE IDs, endpoints and intercept addresses parsed, here and only
//! here). Each problem is attached to a key path such as `outbound[1].server_id`, which
//! [`Source`] turns into `line:column`.
//!
//! Locating a key path: the source text is walked a second time with a serde visitor
//! (`Seek`) that skips everything off the path and, at the target, fails with a marker
//! error; serde_yaml_ng stamps that error with the position of the node being read, so
//! positions are exact for block and flow style, quoting and anchors alike. A scalar is
//! reported at its value, a mapping or list at its key. A path the file does not contain
//! (a default) falls back to its nearest ancestor that it does contain, else to no
//! position; a path set by an environment variable is reported as `env:VARIABLE`.

use crate::config::raw::{Endpoints, ParsedOutbound, RawConfig};
use crate::config::{
    parse_spiffe_id, parse_workload_api_address, Config, ConfigError, ConfigProblem, Env, Severity,
};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Serialize, Serializer};
use spiffe::SpiffeId;
use std::collections::BTreeMap;
use std::fmt;
use std::net::{Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};

/// Which key paths the environment set, and by which variable.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct Overrides(BTreeMap<&'static str, &'static str>);

impl Overrides {
    pub(crate) fn set(&mut self, key: &'static str, var: &'static str) {
        self.0.insert(key, var);
    }

    /// The variable that set `path` or one of its ancestors (`inbound` covers `inbound.listen`).
    fn origin(&self, path: &str) -> Option<&'static str> {
        self.0
            .iter()
            .find(|(key, _)| {
                path == **key
                    || path
                        .strip_prefix(**key)
                        .is_some_and(|r| r.starts_with(['.', '[']))
            })
            .map(|(_, var)| *var)
    }
}

/// The config file's text, for turning key paths into positions.
pub(crate) struct Source<'a> {
    path: &'a Path,
    text: &'a str,
    overrides: &'a Overrides,
}

impl<'a> Source<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str, overrides: &'a Overrides) -> Source<'a> {
        Source {
            path,
            text,
            overrides,
        }
    }

    /// `error` positioned at `key_path`, or at the variable that set it.
    pub(crate) fn problem(&self, key_path: &str, error: ConfigError) -> ConfigProblem {
        let severity = error.severity();
        if let Some(var) = self.overrides.origin(key_path) {
            let file = PathBuf::from(format!("env:{var}"));
            return ConfigProblem {
                file,
                line: 0,
                column: 0,
                severity,
                error,
            };
        }
        self.in_file(key_path, error)
    }

    /// `error` positioned at `key_path` in the file, whatever the environment did.
    fn in_file(&self, key_path: &str, error: ConfigError) -> ConfigProblem {
        let severity = error.severity();
        let (line, column) = locate(self.text, key_path).unwrap_or((0, 0));
        let file = self.path.to_path_buf();
        ConfigProblem {
            file,
            line,
            column,
            severity,
            error,
        }
    }
}

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
                let error = ConfigError::WorkloadApi(e.to_string());
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
        let server_id = check_spiffe_id(src, &at("server_id"), &ob.server_id, &mut out);
        let endpoints = check_endpoints(src, &at("endpoints"), &ob.endpoints, &mut out);
        parsed.push(server_id.zip(endpoints));
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
    listeners.push(("admin.listen".into(), config.admin.listen));
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
            let (server_id, endpoints) = ids?;
            Some(ParsedOutbound {
                server_id,
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
fn check_spiffe_id(
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
                reason: reason.to_string(),
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
                match parse_host_port(entry) {
                    Ok(hp) => good.push(hp),
                    Err(reason) => {
                        let field = format!("{field}[{j}]");
                        let reason = format!("endpoint `{entry}`: {reason}");
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

/// `log.level` must parse as an `EnvFilter`; a bare word must also be a level, since
/// EnvFilter would take a typo such as `verbose` as a target name and log nothing of ours.
fn check_log_level(level: &str) -> Result<(), String> {
    tracing_subscriber::EnvFilter::builder()
        .parse(level)
        .map_err(|e| e.to_string())?;
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for directive in level.split(',').map(str::trim).filter(|d| !d.is_empty()) {
        if !directive.contains(['=', '['])
            && !LEVELS.contains(&directive.to_ascii_lowercase().as_str())
        {
            return Err(format!(
                "`{directive}` is neither a level ({}) nor target=level",
                LEVELS.join(", ")
            ));
        }
    }
    Ok(())
}

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

/// Parses an `endpoints` value (DESIGN.md §4); the error names the offending value.
pub(crate) fn parse_endpoints(endpoints: &Endpoints) -> Result<EndpointsSpec, String> {
    match endpoints {
        Endpoints::Static(list) if list.is_empty() => Err("the endpoints list is empty".into()),
        Endpoints::Static(list) => list
            .iter()
            .map(|e| parse_host_port(e).map_err(|reason| format!("endpoint `{e}`: {reason}")))
            .collect::<Result<_, _>>()
            .map(EndpointsSpec::Static),
        Endpoints::Uri(uri) => {
            parse_uri(uri).map_err(|reason| format!("endpoints `{uri}`: {reason}"))
        }
    }
}

fn parse_uri(uri: &str) -> Result<EndpointsSpec, String> {
    if let Some(rest) = uri.strip_prefix("dns:///") {
        let HostPort { host, port } = parse_host_port(rest)?;
        Ok(EndpointsSpec::Dns { host, port })
    } else if let Some(name) = uri.strip_prefix("dns+srv:///") {
        let labels: Vec<&str> = name.split('.').collect();
        let ok = labels.len() >= 3
            && labels[..2]
                .iter()
                .all(|l| l.len() > 1 && l.starts_with('_'))
            && labels[2..].iter().all(|l| valid_dns_label(l));
        if !ok {
            return Err(
                "an SRV name looks like _service._proto.name (e.g. _grpc._tcp.payments)".into(),
            );
        }
        Ok(EndpointsSpec::DnsSrv {
            name: name.to_string(),
        })
    } else if let Some(path) = uri.strip_prefix("file://") {
        if !path.starts_with('/') || path.len() < 2 {
            return Err("a file URI needs an absolute path: file:///path".into());
        }
        Ok(EndpointsSpec::File(PathBuf::from(path)))
    } else if parse_host_port(uri).is_ok() {
        Err(format!(
            "not a resolver URI; a static endpoint goes in a list: [\"{uri}\"]"
        ))
    } else {
        Err("expected a list of host:port, or dns:///host:port, dns+srv:///_svc._proto.name, file:///path".into())
    }
}

pub fn parse_host_port(text: &str) -> Result<HostPort, String> {
    let (host, port) = if let Some(rest) = text.strip_prefix('[') {
        let (ip, port) = rest
            .split_once("]:")
            .ok_or("an IPv6 endpoint is written [addr]:port")?;
        ip.parse::<Ipv6Addr>()
            .map_err(|_| format!("`{ip}` is not an IPv6 address"))?;
        (ip, port)
    } else {
        let (host, port) = text.rsplit_once(':').ok_or("expected host:port")?;
        if host.contains(':') {
            return Err("an IPv6 endpoint is written [addr]:port".into());
        }
        if host.is_empty() || !host.split('.').all(valid_dns_label) {
            return Err(format!("`{host}` is not a host name or IP address"));
        }
        (host, port)
    };
    match port.parse::<u16>() {
        Ok(port) if port > 0 => Ok(HostPort {
            host: host.to_string(),
            port,
        }),
        _ => Err(format!("port `{port}` is not in 1..=65535")),
    }
}

fn valid_dns_label(label: &str) -> bool {
    !label.is_empty()
        && label.len() <= 63
        && label
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
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

/// The 1-based `(line, column)` of `key_path` in `text`, or of its nearest ancestor.
pub(crate) fn locate(text: &str, key_path: &str) -> Option<(usize, usize)> {
    let segments = parse_key_path(key_path)?;
    (1..=segments.len()).rev().find_map(|n| {
        let target = &segments[..n];
        match seek(text, target, false) {
            Sought::At(pos) => Some(pos),
            Sought::Container => match seek(text, target, true) {
                Sought::At(pos) => Some(pos),
                _ => None,
            },
            Sought::Missing => None,
        }
    })
}

#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Key(String),
    Index(usize),
}

/// `outbound[1].retries.budget_percent` -> `[Key(outbound), Index(1), Key(retries), …]`.
fn parse_key_path(path: &str) -> Option<Vec<Segment>> {
    let mut out = Vec::new();
    for part in path.split('.') {
        let (key, mut rest) = part.split_once('[').map_or((part, ""), |(k, r)| (k, r));
        out.push(Segment::Key(key.to_string()));
        while !rest.is_empty() {
            let (index, after) = rest.split_once(']')?;
            out.push(Segment::Index(index.parse().ok()?));
            rest = after.strip_prefix('[').unwrap_or(after);
        }
    }
    Some(out)
}

const MARKER: &str = "meshd-config-locate-marker";

enum Sought {
    At((usize, usize)),
    Container,
    Missing,
}

fn seek(text: &str, target: &[Segment], key_mode: bool) -> Sought {
    let de = serde_yaml_ng::Deserializer::from_str(text);
    match (Seek {
        rest: target,
        key_mode,
    })
    .deserialize(de)
    {
        Ok(true) => Sought::Container,
        Ok(false) => Sought::Missing,
        Err(e) if e.to_string().contains(MARKER) => match e.location() {
            Some(l) => Sought::At((l.line(), l.column())),
            None => Sought::Missing,
        },
        Err(_) => Sought::Missing,
    }
}

/// Walks to `rest`; fails with [`MARKER`] on the target scalar (or, in `key_mode`, on
/// the target's key). `Ok(true)`: the target is a mapping or list; `Ok(false)`: absent.
struct Seek<'p> {
    rest: &'p [Segment],
    key_mode: bool,
}

impl<'de> DeserializeSeed<'de> for Seek<'_> {
    type Value = bool;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<bool, D::Error> {
        d.deserialize_any(self)
    }
}

impl Seek<'_> {
    fn scalar<E: serde::de::Error>(self) -> Result<bool, E> {
        if self.rest.is_empty() && !self.key_mode {
            Err(E::custom(MARKER))
        } else {
            Ok(false)
        }
    }
}

impl<'de> Visitor<'de> for Seek<'_> {
    type Value = bool;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }
    fn visit_bool<E: serde::de::Error>(self, _: bool) -> Result<bool, E> {
        self.scalar()
    }
    fn visit_i64<E: serde::de::Error>(self, _: i64) -> Result<bool, E> {
        self.scalar()
    }
    fn visit_u64<E: serde::de::Error>(self, _: u64) -> Result<bool, E> {
        self.scalar()
    }
    fn visit_f64<E: serde::de::Error>(self, _: f64) -> Result<bool, E> {
        self.scalar()
    }
    fn visit_str<E: serde::de::Error>(self, _: &str) -> Result<bool, E> {
        self.scalar()
    }
    fn visit_unit<E: serde::de::Error>(self) -> Result<bool, E> {
        self.scalar()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<bool, A::Error> {
        let (found, mut index) = (self.rest.is_empty(), 0);
        let mut result = found;
        while let Some(hit) = match self.rest.first() {
            Some(Segment::Index(i)) if *i == index => {
                let seed = Seek {
                    rest: &self.rest[1..],
                    key_mode: self.key_mode,
                };
                seq.next_element_seed(seed)?
            }
            _ => seq.next_element::<IgnoredAny>()?.map(|_| false),
        } {
            result |= hit;
            index += 1;
        }
        Ok(result)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<bool, A::Error> {
        let mut result = self.rest.is_empty();
        let wanted = match self.rest.first() {
            Some(Segment::Key(k)) => Some(k.as_str()),
            _ => None,
        };
        let raise = self.key_mode && self.rest.len() == 1;
        while let Some(key) = map.next_key_seed(KeySeek { wanted, raise })? {
            if wanted == Some(key.as_str()) {
                result |= map.next_value_seed(Seek {
                    rest: &self.rest[1..],
                    key_mode: self.key_mode,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(result)
    }
}

/// Reads a mapping key as text; fails with [`MARKER`] on `wanted` when `raise`.
struct KeySeek<'p> {
    wanted: Option<&'p str>,
    raise: bool,
}

impl<'de> DeserializeSeed<'de> for KeySeek<'_> {
    type Value = String;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<String, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for KeySeek<'_> {
    type Value = String;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a scalar key")
    }
    fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<String, E> {
        if self.raise && self.wanted == Some(v) {
            return Err(E::custom(MARKER));
        }
        Ok(v.to_string())
    }
    fn visit_bool<E: serde::de::Error>(self, v: bool) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<String, E> {
        Ok(v.to_string())
    }
    fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<String, E> {
        Ok(v.to_string())
    }
}
