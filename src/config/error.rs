//! The one error enum of the config module and how its problems are positioned and shown.
//! Re-exported from `crate::config`; see there for the loading flow.

use crate::config::{
    AddressError, EndpointsError, HostPortError, SpiffeIdError, UpstreamAuthError,
};
use std::fmt;
use std::net::{AddrParseError, SocketAddr};
use std::path::PathBuf;

/// Everything that can be wrong with a configuration, one variant per problem. Each
/// message names the offending key so it reads well after `file:line:column: `.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read (missing, permissions, not UTF-8).
    #[error("cannot read the config file: {0}")]
    Read(String),
    /// YAML syntax, a wrong type, a missing required key or an unknown key, as the
    /// parser words it (without its own position suffix).
    #[error("{0}")]
    Syntax(String),
    /// An environment override whose value does not parse.
    #[error("environment variable {var}=`{value}`: {reason}")]
    BadEnv {
        var: &'static str,
        value: String,
        reason: ValueError,
    },
    /// Some but not all of `MTLS_CERT_FILE`, `MTLS_KEY_FILE`, `MTLS_CA_FILE` are set.
    #[error("file-based identity needs MTLS_CERT_FILE, MTLS_KEY_FILE and MTLS_CA_FILE; missing: {missing}")]
    IncompleteMtlsEnv { missing: String },
    /// `MESHD_IDENTITY_WORKLOAD_API` and the `MTLS_*_FILE` variables pick different sources.
    #[error(
        "MESHD_IDENTITY_WORKLOAD_API and MTLS_*_FILE are both set: choose one identity source"
    )]
    EnvIdentityConflict,
    /// `service` is empty.
    #[error("service must not be empty")]
    EmptyService,
    /// `identity.workload_api` is not a `unix:` address with an absolute path.
    #[error("identity.workload_api: {0}")]
    WorkloadApi(AddressError),
    /// The file sets both `identity.files` and `identity.workload_api`.
    #[error("identity.files and identity.workload_api are both set: choose one identity source")]
    IdentityConflict,
    /// `identity.expect` or an `outbound[].server_id` is not a SPIFFE ID.
    #[error("{field}: `{value}` is not a valid SPIFFE ID: {reason}")]
    BadSpiffeId {
        field: String,
        value: String,
        reason: SpiffeIdError,
    },
    /// An outbound's `tls`, `server_id` or `jwt_svid` break a rule of `upstream_auth`.
    #[error("{0}")]
    UpstreamAuth(UpstreamAuthError),
    /// An outbound has an empty `name`.
    #[error("outbound[{index}].name must not be empty")]
    EmptyOutboundName { index: usize },
    /// Two outbounds share a name.
    #[error("outbound[{index}].name `{name}` is already used by outbound[{first}]")]
    DuplicateOutboundName {
        index: usize,
        name: String,
        first: usize,
    },
    /// Two listeners would bind the same port on overlapping addresses.
    #[error("{field}: {addr} collides with {other_field} ({other_addr})")]
    ListenCollision {
        field: String,
        addr: SocketAddr,
        other_field: String,
        other_addr: SocketAddr,
    },
    /// An `endpoints` value is neither a valid static list nor a known resolver URI.
    #[error("{field}: {reason}")]
    BadEndpoints {
        field: String,
        reason: EndpointsError,
    },
    /// A timeout, interval, threshold or limit of zero.
    #[error("{field} must be greater than 0")]
    ZeroTimeout { field: String },
    /// `min_refresh` of zero, or above `max_refresh`.
    #[error("{field}: min_refresh ({min}) must be greater than 0 and at most max_refresh ({max})")]
    BadRefreshBounds {
        field: String,
        min: String,
        max: String,
    },
    /// A percentage (retry budget, ejection share) over 100.
    #[error("{field} is {value}; it is a percentage, at most 100")]
    PercentOverHundred { field: String, value: u32 },
    /// A lower bound above its upper bound (back-off, ejection time).
    #[error("{field} ({low}) must be at most {high_field} ({high})")]
    BadOrder {
        field: String,
        low: String,
        high_field: String,
        high: String,
    },
    /// `runtime.worker_threads: 0`.
    #[error("runtime.worker_threads must be at least 1")]
    ZeroWorkers,
    /// `log.level` is not a tracing `EnvFilter` directive list.
    #[error("log.level `{value}`: {reason}")]
    BadLogLevel { value: String, reason: ValueError },
    /// (warning) The admin server listens beyond loopback.
    #[error("admin.listen {addr} is not loopback: /config and /shutdown are reachable from outside the pod")]
    AdminNotLoopback { addr: SocketAddr },
    /// An outbound with neither `listen` nor `intercept`: the app has no way to reach it.
    #[error("outbound[{index}] has neither listen nor intercept (nor a gateway route): nothing can reach it")]
    Unreachable { index: usize },
    /// An outbound with `intercept` addresses but no `transparent` listener to take them.
    #[error("outbound[{index}].intercept needs the transparent listener: add `transparent: {{listen: 127.0.0.1:15001}}`")]
    InterceptWithoutTransparent { index: usize },
    /// An `intercept` address with port 0 or an unspecified IP, which no connection has.
    #[error("{field}: {addr} is not a destination: give the IP and port the app dials")]
    VagueIntercept { field: String, addr: SocketAddr },
    /// Two outbounds claim the same `intercept` address.
    #[error("{field}: {addr} is already intercepted by outbound[{first}]")]
    DuplicateIntercept {
        field: String,
        addr: String,
        first: usize,
    },
    /// An `intercept` entry that is not `host:port`.
    #[error("{field}: `{value}`: {reason}")]
    BadIntercept {
        field: String,
        value: String,
        reason: HostPortError,
    },
    /// A gateway without routes.
    #[error("gateway.routes is empty: the gateway would answer every request with 404")]
    NoRoutes,
    /// Two gateway routes with one name.
    #[error("gateway route name `{name}` is used twice")]
    DuplicateRoute { name: String },
    /// A route prefix that is not a path.
    #[error("{field}: `{prefix}` must start with /")]
    BadPrefix { field: String, prefix: String },
    /// A route to an outbound that does not exist.
    #[error("{field}: no outbound is named `{upstream}`")]
    UnknownUpstream { field: String, upstream: String },
    /// A route asking for credentials the gateway has no way to check.
    #[error("{field} needs {needs} to be configured")]
    AuthWithoutCredentials { field: String, needs: &'static str },
    /// `gateway.transcoding` names both or neither of `protos` and `descriptor_set`.
    #[error("gateway.transcoding needs either protos or descriptor_set, not both")]
    TranscodingSource,
    /// The protos (or the descriptor set) of `gateway.transcoding` do not load.
    #[error("{field}: {reason}")]
    TranscodingProtos { field: String, reason: String },
    /// `gateway.transcoding.services` names a service the protos do not define.
    #[error("{field}: no service `{service}` in the protos")]
    UnknownService { field: String, service: String },
    /// `API_GATEWAY_ENABLE_TLS` says false: the edge has no plaintext listener to give.
    #[error("API_GATEWAY_ENABLE_TLS=`{value}`: the gateway serves HTTPS only (there is no plaintext edge); unset it or set it to true")]
    PlaintextEdge { value: String },
    /// (warning) A gateway variable is set but the config has no `gateway` section.
    #[error("{var} is set but the config has no gateway section: ignored")]
    GatewayEnvWithoutGateway { var: &'static str },
    /// (warning) An inbound without a policy file: it fails closed, so the sidecar can
    /// never serve a call.
    #[error("inbound.policy is not set: every call to the inbound is denied and /ready stays 503")]
    InboundWithoutPolicy,
    /// `inbound.jwt_svid.audience` is empty: every token would be refused.
    #[error("inbound.jwt_svid.audience must name the audience tokens are minted for")]
    JwtSvidEmptyAudience,
    /// `inbound.jwt_svid` on a `tcp` inbound, which has no requests to carry a token.
    #[error("inbound.jwt_svid needs protocol http or grpc: a tcp inbound has no request headers to carry a token")]
    JwtSvidOnTcp,
    /// `gateway.jwt_svid.audience` is empty: every token would be refused.
    #[error("{field} must name the audience machine clients fetch their JWT-SVIDs for")]
    EmptyAudience { field: &'static str },
    /// A `trust_domains` entry that is not a trust domain name (e.g. a SPIFFE ID).
    #[error(
        "{field}: `{value}` is not a trust domain name (e.g. jia.app, without spiffe:// or a path)"
    )]
    BadTrustDomain { field: String, value: String },
    /// `gateway.jwt_svid` with `identity.files`, which gives no JWT bundles.
    #[error(
        "gateway.jwt_svid: JWT bundles come from the Workload API, and identity.files has none"
    )]
    GatewayJwtSvidWithFiles,
}

impl ConfigError {
    /// Whether this problem stops the config from loading.
    pub fn severity(&self) -> Severity {
        match self {
            ConfigError::AdminNotLoopback { .. }
            | ConfigError::InboundWithoutPolicy
            | ConfigError::GatewayEnvWithoutGateway { .. } => Severity::Warning,
            ConfigError::UpstreamAuth(e) if e.is_warning() => Severity::Warning,
            _ => Severity::Error,
        }
    }
}

/// Why a value given as text (an environment variable, a duration, `log.level`) does
/// not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A duration without a unit, e.g. `5`.
    #[error("duration `{0}` needs a unit: ms, s, m or h")]
    DurationUnitMissing(String),
    /// A duration that does not start with a whole number, e.g. `s`.
    #[error("duration `{0}` must start with a whole number")]
    DurationNotWhole(String),
    /// A duration with a unit other than ms, s, m, h.
    #[error("duration `{text}` has unknown unit `{unit}` (use ms, s, m or h)")]
    DurationUnit { text: String, unit: String },
    /// Not a protocol name.
    #[error("expected grpc, http or tcp")]
    Protocol,
    /// Not an access-log mode.
    #[error("expected off, deny or all")]
    AccessLog,
    /// Not a number of worker threads.
    #[error("expected a whole number of threads")]
    Threads,
    /// Not a yes/no value (`true`, `false`, `1`, `0`).
    #[error("expected true or false")]
    Bool,
    /// Not `ip:port`.
    #[error("{0}")]
    SocketAddr(#[from] AddrParseError),
    /// Not a tracing `EnvFilter` directive list, as tracing words it.
    #[error("{0}")]
    LogFilter(String),
    /// A bare word in `log.level` that is no level (EnvFilter would take it as a target).
    #[error(
        "`{directive}` is neither a level (trace, debug, info, warn, error, off) nor target=level"
    )]
    NotALevel { directive: String },
}

/// Whether a problem stops the config from loading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Warning,
}

/// One problem and where it is. `line`/`column` are 1-based; `line == 0` means "no
/// position" (an unreadable file, or a value that came from the environment, in which
/// case `file` is `env:VARIABLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub severity: Severity,
    pub error: ConfigError,
}

impl ConfigProblem {
    /// The problem's message without its position.
    pub fn message(&self) -> String {
        self.error.to_string()
    }
}

impl fmt::Display for ConfigProblem {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if self.line > 0 {
            write!(f, "{}:{}:", self.line, self.column)?;
        }
        if self.severity == Severity::Warning {
            write!(f, " warning:")?;
        }
        write!(f, " {}", self.error)
    }
}

/// Every problem found in a config, one per line when displayed; contains at least one
/// [`Severity::Error`] when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigProblem>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{p}")?;
        }
        Ok(())
    }
}
