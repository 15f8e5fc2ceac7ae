//! The edge gateway, the config side (DESIGN.md §1, §2: `0.0.0.0:8080`, edge mode only):
//! the HTTPS listener clients call, how they authenticate (JWT against a JWKS file, API
//! keys against a file of their SHA-256 hashes), rate limits, and routes from a path prefix
//! to an `outbound` entry, which carries the call over mTLS like any other.
//!
//! Flow: serde reads these with the rest of the config; `env` overrides some of them
//! with the design's variables (`API_GATEWAY_*`, `GATEWAY_*_FILE`); [`check`] adds a
//! problem per bad value to the config report (`file:line:column: message`); `app`
//! builds the `gateway` from them.

use crate::config::duration_str;
use crate::config::error::{ConfigError, ConfigProblem};
use crate::config::raw::RawConfig;
use crate::config::source::Source;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// `gateway:` — meshd as the edge gateway.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The HTTPS (HTTP/2) listener clients call.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The server certificate clients see (not an SVID: clients outside the mesh check
    /// it against the web PKI or their own CA).
    pub tls: GatewayTls,
    /// Bearer tokens: JWTs signed by a key of the JWKS file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt: Option<JwtConfig>,
    /// Bearer tokens that are JWT-SVIDs of machine clients, checked against the Workload
    /// API's JWT bundles; the user is the caller's SPIFFE ID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jwt_svid: Option<crate::config::GatewayJwtSvid>,
    /// `x-api-key` values, checked against the SHA-256 hashes in this file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_keys: Option<PathBuf>,
    /// The limit per caller (user, else client IP) on every route without its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Path prefixes to upstreams; the longest matching prefix wins.
    pub routes: Vec<RouteConfig>,
    /// JSON clients: calls of these gRPC services in JSON become gRPC calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transcoding: Option<TranscodingConfig>,
    /// Timeouts, keepalive and the connection cap for clients on the internet.
    #[serde(default)]
    pub connections: crate::config::ConnectionLimits,
    /// The largest request body a client may send (bytes, or `64KiB`, `16MiB`), streamed
    /// or not: a declared larger one gets 413 / RESOURCE_EXHAUSTED before the upstream is
    /// called, one that grows past it is cut off there.
    #[serde(default = "default_max_request_body", with = "byte_size")]
    pub max_request_body: u64,
    /// `API_GATEWAY_KEY`: one more API key, given in the environment and held only as its
    /// SHA-256 (never read from the file; `/config` shows `"<redacted>"`).
    #[serde(
        rename = "api_key",
        skip_deserializing,
        skip_serializing_if = "Option::is_none",
        serialize_with = "redacted"
    )]
    pub env_api_key: Option<ApiKeyDigest>,
}

/// The user an `API_GATEWAY_KEY` caller is (logs, rate limits, `x-user-id`).
pub const ENV_API_KEY_USER: &str = "api-gateway-key";

/// The SHA-256 of an API key, as the API keys file holds them: the key itself is dropped
/// as soon as it is hashed, and no `Debug` or `Serialize` shows even the hash.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKeyDigest(pub [u8; 32]);

impl ApiKeyDigest {
    /// SHA-256 of `key`.
    pub fn of(key: &str) -> ApiKeyDigest {
        let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(digest.as_ref());
        ApiKeyDigest(out)
    }
}

impl std::fmt::Debug for ApiKeyDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("ApiKeyDigest(<redacted>)")
    }
}

fn redacted<S: serde::Serializer>(_: &Option<ApiKeyDigest>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str("<redacted>")
}

/// `gateway.transcoding:` — gRPC-JSON transcoding, from the API's own protos: a JSON (or
/// GET) request to `/pkg.Service/Method` of a listed service becomes that gRPC call, and
/// its answer comes back as JSON.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TranscodingConfig {
    /// `.proto` files, compiled in-process at start (no `protoc`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protos: Vec<PathBuf>,
    /// Where the protos' imports are found; the protos' own folders when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub import_paths: Vec<PathBuf>,
    /// A `FileDescriptorSet` (`protoc --include_imports -o api.pb`), instead of `protos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub descriptor_set: Option<PathBuf>,
    /// The fully qualified services JSON clients may call, e.g. `payment.v1.PaymentService`.
    pub services: Vec<String>,
    /// Fields the message does not have are ignored instead of refused with 400.
    #[serde(default)]
    pub ignore_unknown_fields: bool,
    /// Answers carry fields at their default value (0, "", []) instead of leaving them out.
    #[serde(default)]
    pub emit_defaults: bool,
    /// Answers name fields as the proto does (`payment_id`), not in lowerCamelCase.
    #[serde(default)]
    pub preserve_proto_field_names: bool,
    /// The largest JSON body accepted (bytes, or `64KiB`, `4MiB`); larger ones get 413.
    #[serde(default = "default_max_body", with = "byte_size")]
    pub max_body: u64,
}

fn default_max_body() -> u64 {
    4 << 20
}

fn default_max_request_body() -> u64 {
    16 << 20
}

/// Why the protos of `gateway.transcoding` do not give a descriptor pool.
#[derive(Debug, thiserror::Error)]
pub enum DescriptorError {
    /// A proto does not compile (the message names the file and position).
    #[error("{0}")]
    Compile(#[from] Box<protox::Error>),
    /// The descriptor set file cannot be read.
    #[error("{path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The descriptor set file is not a valid `FileDescriptorSet`.
    #[error("{path}: {source}")]
    Decode {
        path: PathBuf,
        source: prost_reflect::DescriptorError,
    },
}

impl TranscodingConfig {
    /// The API's messages and services: the protos compiled, or the descriptor set read.
    pub fn descriptors(&self) -> Result<prost_reflect::DescriptorPool, DescriptorError> {
        if let Some(path) = &self.descriptor_set {
            let bytes = std::fs::read(path).map_err(|source| DescriptorError::Read {
                path: path.clone(),
                source,
            })?;
            return prost_reflect::DescriptorPool::decode(bytes.as_slice()).map_err(|source| {
                DescriptorError::Decode {
                    path: path.clone(),
                    source,
                }
            });
        }
        let mut includes = self.import_paths.clone();
        if includes.is_empty() {
            for p in &self.protos {
                let dir = p.parent().map_or_else(|| PathBuf::from("."), PathBuf::from);
                let dir = if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir
                };
                if !includes.contains(&dir) {
                    includes.push(dir);
                }
            }
        }
        let mut compiler = protox::Compiler::new(&includes).map_err(Box::new)?;
        compiler.include_imports(true);
        compiler.open_files(&self.protos).map_err(Box::new)?;
        Ok(compiler.descriptor_pool())
    }
}

/// A size in bytes, written as a number or with a unit (`KiB`, `MiB`).
pub(super) mod byte_size {
    use serde::{Deserialize, Deserializer, Serializer};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Written {
        Bytes(u64),
        Text(String),
    }

    pub fn serialize<S: Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(*value)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        match Written::deserialize(d)? {
            Written::Bytes(n) => Ok(n),
            Written::Text(t) => parse(&t).ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "size `{t}` must be a number of bytes, KiB or MiB, e.g. 4MiB"
                ))
            }),
        }
    }

    /// `4MiB`, `64KiB`, `512`: the number of bytes.
    pub fn parse(text: &str) -> Option<u64> {
        let text = text.trim();
        let split = text
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(text.len());
        let (digits, unit) = text.split_at(split);
        let n: u64 = digits.parse().ok()?;
        let scale = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "KB" | "K" => 1 << 10,
            "MiB" | "MB" | "M" => 1 << 20,
            _ => return None,
        };
        n.checked_mul(scale)
    }
}

#[cfg(test)]
#[test]
fn sizes_read_with_their_unit() {
    let table = [
        ("4MiB", Some(4 << 20)),
        ("64KiB", Some(64 << 10)),
        ("512B", Some(512)),
        ("512", Some(512)),
        ("1 MiB", Some(1 << 20)),
        ("MiB", None),
        ("4GiB", None),
    ];
    for (text, want) in table {
        assert_eq!(byte_size::parse(text), want, "{text}");
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8080))
}

/// The gateway's own certificate chain and key (PEM), and the CA of client
/// certificates; all reloaded when they change.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayTls {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// Client certificates signed by these CAs (PEM) are verified, and name the user:
    /// partners call with mutual TLS instead of a token. None: no client certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
    /// Whether a client must present a certificate (`optional` when `client_ca` is set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<ClientAuth>,
}

impl GatewayTls {
    /// The effective client certificate mode: none without `client_ca`.
    pub fn client_auth(&self) -> Option<ClientAuth> {
        self.client_ca
            .as_ref()
            .map(|_| self.client_auth.unwrap_or_default())
    }
}

/// `gateway.tls.client_auth:` — whether the TLS handshake asks for a client certificate
/// or demands one.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum ClientAuth {
    /// A client may present a certificate (it must then verify); tokens still work.
    #[default]
    Optional,
    /// A handshake without a valid client certificate is refused.
    Required,
}

/// `gateway.jwt:` — which tokens are accepted.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct JwtConfig {
    /// The `iss` every token must carry.
    pub issuer: String,
    /// A token's `aud` must contain one of these.
    pub audiences: Vec<String>,
    /// The issuer's public keys, a JWKS document (`{"keys": [...]}`), reloaded when it
    /// changes.
    pub jwks: PathBuf,
    /// Clock skew allowed on `exp` and `nbf`.
    #[serde(default = "default_leeway", with = "duration_str")]
    pub leeway: Duration,
    /// The claim that names the user (for logs, rate limits and `x-user-id`).
    #[serde(default = "default_user_claim")]
    pub user_claim: String,
}

fn default_leeway() -> Duration {
    Duration::from_secs(30)
}

fn default_user_claim() -> String {
    "sub".into()
}

/// A token bucket: `per_second` on average, up to `burst` at once.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub per_second: u32,
    pub burst: u32,
}

/// Which credentials a route accepts.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "snake_case")]
pub enum RouteAuth {
    /// A valid JWT, JWT-SVID or API key, whichever the gateway has configured, or else a
    /// verified client certificate.
    #[default]
    Any,
    /// A valid end-user JWT (`gateway.jwt`) only.
    Jwt,
    /// A valid JWT-SVID (`gateway.jwt_svid`) only: machine clients.
    JwtSvid,
    /// A valid API key only.
    ApiKey,
    /// A verified client certificate only (`gateway.tls.client_ca`).
    Mtls,
    /// No credentials needed (public routes; rate-limited per client IP).
    None,
}

/// One route: requests whose path starts with `prefix` go to `upstream`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The `service` label of the gateway metrics.
    pub name: String,
    /// e.g. `/payment.v1.PaymentService/` for a gRPC service.
    pub prefix: String,
    /// The `outbound` entry (by name) that carries the request.
    pub upstream: String,
    #[serde(default)]
    pub auth: RouteAuth,
    /// This route's own limit, instead of the gateway's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// The longest wait for a connection to the upstream (the design's dial timeout).
    #[serde(default = "default_route_timeout", with = "duration_str")]
    pub connect_timeout: Duration,
    /// The longest wait for the upstream's answer (its headers), instead of the outbound's
    /// `timeout`; then 504 / DEADLINE_EXCEEDED. A client's shorter `grpc-timeout` wins.
    #[serde(default = "default_route_timeout", with = "duration_str")]
    pub request_timeout: Duration,
}

/// The design's dial and request timeouts.
fn default_route_timeout() -> Duration {
    Duration::from_secs(30)
}

/// The gateway's rules: routes exist, have unique names and a prefix starting with `/`,
/// name an outbound, and ask only for credentials the gateway checks; limits are not 0.
pub(crate) fn check(
    config: &RawConfig,
    src: &Source,
    out: &mut Vec<ConfigProblem>,
    listeners: &mut Vec<(String, SocketAddr)>,
) {
    let Some(g) = &config.gateway else {
        return;
    };
    listeners.push(("gateway.listen".into(), g.listen));
    if g.routes.is_empty() {
        out.push(src.problem("gateway.routes", ConfigError::NoRoutes));
    }
    if g.max_request_body == 0 {
        let field = "gateway.max_request_body".to_string();
        out.push(src.problem(
            &field,
            ConfigError::ZeroTimeout {
                field: field.clone(),
            },
        ));
    }
    let limits = std::iter::once(("gateway.rate_limit".to_string(), g.rate_limit)).chain(
        g.routes
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("gateway.routes[{i}].rate_limit"), r.rate_limit)),
    );
    for (field, limit) in limits {
        if let Some(l) = limit {
            if l.per_second == 0 || l.burst == 0 {
                let error = ConfigError::ZeroTimeout {
                    field: format!("{field}.per_second and burst"),
                };
                out.push(src.problem(&field, error));
            }
        }
    }
    let outbounds: HashSet<&str> = config.outbound.iter().map(|o| o.name.as_str()).collect();
    let mut names = HashSet::new();
    for (i, r) in g.routes.iter().enumerate() {
        let at = |key: &str| format!("gateway.routes[{i}].{key}");
        if !names.insert(r.name.as_str()) {
            let error = ConfigError::DuplicateRoute {
                name: r.name.clone(),
            };
            out.push(src.problem(&at("name"), error));
        }
        if !r.prefix.starts_with('/') {
            let error = ConfigError::BadPrefix {
                field: at("prefix"),
                prefix: r.prefix.clone(),
            };
            out.push(src.problem(&at("prefix"), error));
        }
        if !outbounds.contains(r.upstream.as_str()) {
            let error = ConfigError::UnknownUpstream {
                field: at("upstream"),
                upstream: r.upstream.clone(),
            };
            out.push(src.problem(&at("upstream"), error));
        }
        let keys = g.api_keys.is_some() || g.env_api_key.is_some();
        let certs = g.tls.client_ca.is_some();
        let missing = match r.auth {
            RouteAuth::Jwt if g.jwt.is_none() => Some("gateway.jwt"),
            RouteAuth::JwtSvid if g.jwt_svid.is_none() => Some("gateway.jwt_svid"),
            RouteAuth::ApiKey if !keys => Some("gateway.api_keys"),
            RouteAuth::Mtls if !certs => Some("gateway.tls.client_ca"),
            RouteAuth::Any if g.jwt.is_none() && g.jwt_svid.is_none() && !keys && !certs => {
                Some("gateway.jwt, gateway.jwt_svid or gateway.api_keys")
            }
            _ => None,
        };
        if let Some(needs) = missing {
            let error = ConfigError::AuthWithoutCredentials {
                field: at("auth"),
                needs,
            };
            out.push(src.problem(&at("auth"), error));
        }
        for (key, value) in [
            ("connect_timeout", r.connect_timeout),
            ("request_timeout", r.request_timeout),
        ] {
            if value.is_zero() {
                let error = ConfigError::ZeroTimeout { field: at(key) };
                out.push(src.problem(&at(key), error));
            }
        }
    }
    if g.tls.client_auth.is_some() && g.tls.client_ca.is_none() {
        let error = ConfigError::AuthWithoutCredentials {
            field: "gateway.tls.client_auth".into(),
            needs: "gateway.tls.client_ca",
        };
        out.push(src.problem("gateway.tls.client_auth", error));
    }
    if let Some(t) = &g.transcoding {
        check_transcoding(t, src, out);
    }
}

/// The transcoding protos load and define every listed service.
fn check_transcoding(t: &TranscodingConfig, src: &Source, out: &mut Vec<ConfigProblem>) {
    if t.protos.is_empty() == t.descriptor_set.is_none() {
        out.push(src.problem("gateway.transcoding", ConfigError::TranscodingSource));
        return;
    }
    let field = if t.protos.is_empty() {
        "gateway.transcoding.descriptor_set"
    } else {
        "gateway.transcoding.protos"
    };
    let pool = match t.descriptors() {
        Ok(pool) => pool,
        Err(e) => {
            let error = ConfigError::TranscodingProtos {
                field: field.into(),
                reason: e.to_string(),
            };
            out.push(src.problem(field, error));
            return;
        }
    };
    for (i, service) in t.services.iter().enumerate() {
        if pool.get_service_by_name(service).is_none() {
            let field = format!("gateway.transcoding.services[{i}]");
            let error = ConfigError::UnknownService {
                field: field.clone(),
                service: service.clone(),
            };
            out.push(src.problem(&field, error));
        }
    }
}
