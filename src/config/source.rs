//! Where a config problem is: the config file's text and the environment overrides,
//! turning a key path such as `outbound[1].server_id` into `file:line:column` (or
//! `env:VARIABLE`).
//!
//! Flow: `env::apply` records in [`Overrides`] which key paths the environment set;
//! `check::validate` and the checks it calls hand each problem with its key path to
//! [`Source::problem`], which positions it.
//!
//! Locating a key path: the source text is walked a second time with a serde visitor
//! (`Seek`) that skips everything off the path and, at the target, fails with a marker
//! error; serde_yaml_ng stamps that error with the position of the node being read, so
//! positions are exact for block and flow style, quoting and anchors alike. A scalar is
//! reported at its value, a mapping or list at its key. A path the file does not contain
//! (a default) falls back to its nearest ancestor that it does contain, else to no
//! position; a path set by an environment variable is reported as `env:VARIABLE`.

use crate::config::{ConfigError, ConfigProblem};
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, SeqAccess, Visitor};
use std::collections::BTreeMap;
use std::fmt;
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
    /// Problems located so far: each lookup reads the whole file again, so past
    /// [`MAX_LOCATED`] the rest are reported without a position (a 250 KB file with
    /// thousands of errors took minutes to check).
    located: std::cell::Cell<usize>,
}

/// How many problems of one file get a line and column.
const MAX_LOCATED: usize = 200;

impl<'a> Source<'a> {
    pub(crate) fn new(path: &'a Path, text: &'a str, overrides: &'a Overrides) -> Source<'a> {
        Source {
            path,
            text,
            overrides,
            located: std::cell::Cell::new(0),
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
    pub(crate) fn in_file(&self, key_path: &str, error: ConfigError) -> ConfigProblem {
        let severity = error.severity();
        let located = self.located.get();
        self.located.set(located + 1);
        let (line, column) = if located < MAX_LOCATED {
            locate(self.text, key_path).unwrap_or((0, 0))
        } else {
            (0, 0)
        };
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
