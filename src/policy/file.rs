//! The policy file as written: the serde model `policy/parse.rs` reads it into, and the
//! checks that run while each value is read.
//!
//! Flow: `serde_yaml_ng` fills [`RawPolicy`]; each scalar goes through its `FromStr`
//! (SPIFFE ID matchers, gRPC targets, paths, methods, rule names) or its own visitor
//! (ports, lists that must not be empty), so an error carries the value's own line and
//! column. `policy/parse.rs` then builds the `Policy` from the raw rules.

use crate::config::parse_spiffe_id;
use crate::policy::parse::PolicyError;
use crate::policy::{Action, GrpcTarget, IdMatcher, Mode, PathMatch, Via};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;
use std::fmt;
use std::marker::PhantomData;
use std::str::FromStr;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawPolicy {
    pub(crate) service: String,
    #[serde(default)]
    pub(crate) mode: Mode,
    #[serde(default = "deny")]
    pub(crate) default: Action,
    #[serde(default)]
    pub(crate) rules: Vec<RawRule>,
}

fn deny() -> Action {
    Action::Deny
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRule {
    pub(crate) name: RuleName,
    #[serde(default)]
    pub(crate) action: Action,
    pub(crate) from: NonEmpty<IdMatcher, FromKey>,
    #[serde(default)]
    pub(crate) via: Via,
    #[serde(default, deserialize_with = "naming_a_target")]
    pub(crate) to: Option<RawTo>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, expecting = "a map of `grpc`, `http` and `ports`")]
pub(crate) struct RawTo {
    #[serde(default)]
    pub(crate) grpc: Option<NonEmpty<GrpcTarget, GrpcKey>>,
    #[serde(default)]
    pub(crate) http: Option<NonEmpty<RawHttp, HttpKey>>,
    #[serde(default)]
    pub(crate) ports: Option<NonEmpty<Port, PortsKey>>,
}

/// A `to` that is written must name a target: `to: {}`, `to: ~` or a bare `to:` would
/// match every request, as if `to` were left out.
fn naming_a_target<'de, D: Deserializer<'de>>(d: D) -> Result<Option<RawTo>, D::Error> {
    match Option::<RawTo>::deserialize(d)? {
        Some(to) if to.grpc.is_some() || to.http.is_some() || to.ports.is_some() => Ok(Some(to)),
        _ => Err(de::Error::custom(PolicyError::EmptyTo)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawHttp {
    #[serde(default)]
    pub(crate) methods: Option<NonEmpty<Method, MethodsKey>>,
    #[serde(default)]
    pub(crate) paths: Option<NonEmpty<PathMatch, PathsKey>>,
}

/// The key a [`NonEmpty`] list sits under, and what to do instead of writing it empty.
trait ListKey {
    const KEY: &'static str;
    const HINT: &'static str;
}

macro_rules! list_keys {
    ($($name:ident: $key:literal, $hint:literal;)*) => {$(
        pub(crate) struct $name;
        impl ListKey for $name {
            const KEY: &'static str = $key;
            const HINT: &'static str = $hint;
        }
    )*};
}

list_keys! {
    FromKey: "`from`", "";
    GrpcKey: "`grpc`", ": list targets, or leave the key out";
    HttpKey: "`http`", ": list targets, or leave the key out";
    PortsKey: "`ports`", ": list ports, or leave the key out for any port";
    MethodsKey: "`methods`", ": list methods, or leave the key out for any method";
    PathsKey: "`paths`", ": list paths, or leave the key out for any path";
}

/// A list refused empty inside the visitor, so that serde reports its position.
pub(crate) struct NonEmpty<T, K>(pub(crate) Vec<T>, PhantomData<K>);

/// The items of a list that may be left out.
pub(crate) fn listed<T, K>(list: &Option<NonEmpty<T, K>>) -> &[T] {
    list.as_ref().map_or(&[], |l| &l.0)
}

impl<'de, T: Deserialize<'de>, K: ListKey> Deserialize<'de> for NonEmpty<T, K> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T, K>(PhantomData<(T, K)>);
        impl<'de, T: Deserialize<'de>, K: ListKey> Visitor<'de> for V<T, K> {
            type Value = NonEmpty<T, K>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                write!(f, "a non-empty list under {}", K::KEY)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element()? {
                    items.push(item);
                }
                if items.is_empty() {
                    let (key, hint) = (K::KEY, K::HINT);
                    return Err(de::Error::custom(PolicyError::EmptyList { key, hint }));
                }
                Ok(NonEmpty(items, PhantomData))
            }
        }
        d.deserialize_seq(V(PhantomData))
    }
}

/// Deserializes a string through `FromStr`, failing inside the visitor so serde
/// attaches the scalar's own line and column to the error.
fn from_str_value<'de, D: Deserializer<'de>, T: FromStr<Err = PolicyError>>(
    d: D,
    what: &'static str,
) -> Result<T, D::Error> {
    struct V<T>(&'static str, PhantomData<T>);
    impl<T: FromStr<Err = PolicyError>> Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str(self.0)
        }
        fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
            v.parse().map_err(E::custom)
        }
    }
    d.deserialize_str(V(what, PhantomData))
}

macro_rules! deserialize_via_from_str {
    ($t:ty, $what:literal) => {
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_str_value(d, $what)
            }
        }
    };
}

deserialize_via_from_str!(
    IdMatcher,
    "a SPIFFE ID, `spiffe://td/path/*` or `spiffe://td/*`"
);
deserialize_via_from_str!(GrpcTarget, "a gRPC target `package.Service/Method`");
deserialize_via_from_str!(PathMatch, "an HTTP path");
deserialize_via_from_str!(Method, "an HTTP method");
deserialize_via_from_str!(RuleName, "a rule name");

/// A rule name: it labels metrics and denials, so it must be a visible token.
pub(crate) struct RuleName(pub(crate) String);

impl FromStr for RuleName {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        if text.is_empty() || text.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(PolicyError::BadRuleName(text.to_string()));
        }
        Ok(RuleName(text.to_string()))
    }
}

impl FromStr for IdMatcher {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let (base, wildcard) = match text.strip_suffix("/*") {
            Some(base) => (base, true),
            None => (text, false),
        };
        if base.contains('*') {
            return Err(PolicyError::MisplacedWildcard(text.to_string()));
        }
        let invalid = |reason: String| PolicyError::InvalidSpiffeId {
            text: text.to_string(),
            reason,
        };
        let id = parse_spiffe_id(base).map_err(|e| invalid(e.to_string()))?;
        let trust_domain = id.trust_domain_name().to_string();
        let path = id.path().to_string();
        Ok(match (wildcard, path.is_empty()) {
            (true, true) => IdMatcher::Domain { trust_domain },
            (true, false) => IdMatcher::Prefix {
                trust_domain,
                prefix: path,
            },
            (false, false) => IdMatcher::Exact { trust_domain, path },
            (false, true) => {
                return Err(invalid(
                    "a workload ID needs a path; use `spiffe://td/*` for a whole trust domain"
                        .into(),
                ))
            }
        })
    }
}

impl FromStr for GrpcTarget {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadGrpcTarget(text.to_string());
        let (service, method) = text
            .trim_start_matches('/')
            .split_once('/')
            .ok_or_else(bad)?;
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        };
        if !ident(service) || service.starts_with('.') || service.ends_with('.') {
            return Err(bad());
        }
        let method = match method {
            "*" => None,
            m if ident(m) && !m.contains('.') => Some(m.to_string()),
            _ => return Err(bad()),
        };
        Ok(GrpcTarget {
            service: service.to_string(),
            method,
        })
    }
}

impl FromStr for PathMatch {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        let bad = || PolicyError::BadHttpPath(text.to_string());
        if !text.starts_with('/') || text.contains(['?', '#', ' ']) {
            return Err(bad());
        }
        match text.strip_suffix('*') {
            Some(prefix) if prefix.ends_with('/') && !prefix.contains('*') => {
                Ok(PathMatch::Prefix(prefix.to_string()))
            }
            Some(_) => Err(bad()),
            None if text.contains('*') => Err(bad()),
            None => Ok(PathMatch::Exact(text.to_string())),
        }
    }
}

/// An HTTP method, stored uppercase.
pub(crate) struct Method(pub(crate) String);

impl FromStr for Method {
    type Err = PolicyError;
    fn from_str(text: &str) -> Result<Self, PolicyError> {
        if text.is_empty() || !text.chars().all(|c| c.is_ascii_alphabetic()) {
            return Err(PolicyError::BadHttpMethod(text.to_string()));
        }
        Ok(Method(text.to_ascii_uppercase()))
    }
}

/// A port, 1-65535, checked inside the visitor for an exact position.
pub(crate) struct Port(pub(crate) u16);

impl<'de> Deserialize<'de> for Port {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Port;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a port number 1-65535")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Port, E> {
                match u16::try_from(v) {
                    Ok(p) if p != 0 => Ok(Port(p)),
                    _ => Err(E::custom(PolicyError::BadPort(v.into()))),
                }
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Port, E> {
                match u64::try_from(v) {
                    Ok(v) => self.visit_u64(v),
                    Err(_) => Err(E::custom(PolicyError::BadPort(v.into()))),
                }
            }
        }
        d.deserialize_u64(V)
    }
}
