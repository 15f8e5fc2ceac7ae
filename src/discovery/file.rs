//! `file:///path` endpoints: a YAML (or JSON) list, watched and applied on change.
//!
//! Flow: [`load`] reads and parses the whole file, checks every entry (address with a
//! port in 1..=65535, weight, SPIFFE ID), and resolves host names by A/AAAA; any problem
//! rejects the whole file so the resolver task keeps the last good set. [`watch`] wakes
//! the task when the file (or its folder entry, for editors and atomic renames) changes.
//!
//! ```yaml
//! - 10.0.0.7:15006                       # just an address
//! - address: 10.0.0.8:15006
//!   weight: 3                            # optional, default 1
//!   server_id: spiffe://jia.app/canary   # optional: this endpoint must present this ID
//!   zone: eu-west-1a                     # optional
//! ```

use crate::config::{parse_host_port, parse_spiffe_id, HostPortError, SpiffeIdError};
use crate::discovery::dns::Dns;
use crate::discovery::{resolve_host_ports, DiscoveredEndpoint, DiscoveryError};
use notify::{RecursiveMode, Watcher};
use serde::Deserialize;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;

/// One entry of the file: a bare address or the long form.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Entry {
    Short(String),
    Long(LongEntry),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct LongEntry {
    address: String,
    #[serde(default)]
    weight: Option<u32>,
    #[serde(default)]
    server_id: Option<String>,
    #[serde(default)]
    zone: Option<String>,
}

/// The largest weight accepted (keeps weighted sums far from overflow).
const MAX_WEIGHT: u32 = 10_000;

/// Why an endpoint file is rejected (the whole file: the last good set stays).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointFileError {
    /// The file cannot be read, as the OS says.
    #[error("{0}")]
    Read(String),
    /// Not a YAML list of addresses or long entries, as the parser says.
    #[error("expected a list of addresses or {{address, weight, server_id, zone}}: {0}")]
    NotAList(String),
    /// An empty list: no endpoint at all.
    #[error("the list is empty")]
    Empty,
    /// An entry's address is not `host:port`.
    #[error("entry {index} (`{address}`): endpoint `{address}`: {reason}")]
    BadAddress {
        index: usize,
        address: String,
        reason: HostPortError,
    },
    /// An entry's weight is 0 or above [`MAX_WEIGHT`].
    #[error("entry {index} (`{address}`): weight {weight} is not in 1..={MAX_WEIGHT}")]
    BadWeight {
        index: usize,
        address: String,
        weight: u32,
    },
    /// An entry's `server_id` is not a SPIFFE ID.
    #[error("entry {index} (`{address}`): server_id: {reason}")]
    BadServerId {
        index: usize,
        address: String,
        reason: SpiffeIdError,
    },
}

/// A checked entry, before its host is resolved.
#[derive(Debug, PartialEq)]
pub(super) struct Checked {
    pub(super) host_port: crate::config::HostPort,
    template: DiscoveredEndpoint,
}

pub(super) fn check(text: &str) -> Result<Vec<Checked>, EndpointFileError> {
    let entries: Vec<Entry> =
        serde_yaml_ng::from_str(text).map_err(|e| EndpointFileError::NotAList(e.to_string()))?;
    if entries.is_empty() {
        return Err(EndpointFileError::Empty);
    }
    let mut out = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        let long = match entry {
            Entry::Short(address) => LongEntry {
                address,
                weight: None,
                server_id: None,
                zone: None,
            },
            Entry::Long(l) => l,
        };
        let address = || long.address.clone();
        let host_port =
            parse_host_port(&long.address).map_err(|reason| EndpointFileError::BadAddress {
                index: i,
                address: address(),
                reason,
            })?;
        let weight = long.weight.unwrap_or(1);
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(EndpointFileError::BadWeight {
                index: i,
                address: address(),
                weight,
            });
        }
        let server_id = long
            .server_id
            .as_deref()
            .map(parse_spiffe_id)
            .transpose()
            .map_err(|reason| EndpointFileError::BadServerId {
                index: i,
                address: address(),
                reason,
            })?;
        out.push(Checked {
            host_port,
            template: DiscoveredEndpoint {
                addr: ([0, 0, 0, 0], 0).into(),
                weight,
                server_id,
                zone: long.zone,
            },
        });
    }
    Ok(out)
}

/// Reads, checks and resolves the file; the shortest TTL of its host names, if any.
pub async fn load(
    path: &Path,
    dns: &Dns,
) -> Result<(Vec<DiscoveredEndpoint>, Option<Duration>), DiscoveryError> {
    let bad = |reason: EndpointFileError| DiscoveryError::BadFile {
        path: path.to_path_buf(),
        reason,
    };
    let text = tokio::fs::read_to_string(path)
        .await
        .map_err(|e| bad(EndpointFileError::Read(e.to_string())))?;
    let checked = check(&text).map_err(bad)?;
    let mut out = Vec::new();
    let mut ttl: Option<Duration> = None;
    for c in checked {
        let (eps, t) = resolve_host_ports(dns, std::slice::from_ref(&c.host_port)).await?;
        if let Some(t) = t {
            ttl = Some(ttl.map_or(t, |x| x.min(t)));
        }
        out.extend(eps.into_iter().map(|e| DiscoveredEndpoint {
            addr: e.addr,
            ..c.template.clone()
        }));
    }
    Ok((out, ttl))
}

/// Watches the file's folder and notifies `changed` when the file is touched. `None`
/// (with a warning) when the watch cannot be set up; the file is then re-read at
/// `max_refresh`.
pub fn watch(
    path: &Path,
    changed: Arc<Notify>,
    upstream: &str,
) -> Option<notify::RecommendedWatcher> {
    let name = path.file_name()?.to_os_string();
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty())?;
    let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
        if let Ok(ev) = ev {
            if ev.paths.iter().any(|p| p.file_name() == Some(&name)) {
                changed.notify_one();
            }
        }
    })
    .map_err(|e| tracing::warn!(upstream, "cannot watch {}: {e}", path.display()))
    .ok()?;
    if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
        tracing::warn!(upstream, "cannot watch {}: {e}", dir.display());
        return None;
    }
    Some(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_parse_or_say_why() {
        let ok = [
            ("- 127.0.0.2:8080\n- 127.0.0.3:8080\n", 2),
            ("[\"127.0.0.2:8080\", {\"address\": \"[::1]:9\", \"weight\": 3}]", 2),
            (
                "- address: 127.0.0.2:1\n  weight: 2\n  server_id: spiffe://jia.app/x\n  zone: z1\n",
                1,
            ),
            ("- localhost:80\n", 1),
        ];
        for (text, n) in ok {
            let got = check(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(got.len(), n, "{text}");
        }
        let bad = [
            ("", "empty"),
            ("[]", "empty"),
            ("{address: 1.2.3.4:5}", "expected a list"),
            ("- 127.0.0.1:70000\n", "port `70000` is not in 1..=65535"),
            ("- 127.0.0.1:0\n", "not in 1..=65535"),
            ("- 127.0.0.1\n", "host:port"),
            ("- address: 127.0.0.1:1\n  weight: 0\n", "weight 0"),
            (
                "- address: 127.0.0.1:1\n  server_id: http://x\n",
                "server_id",
            ),
            ("- address: 127.0.0.1:1\n  colour: red\n", "expected a list"),
            ("- [1, 2]\n", "expected a list"),
        ];
        for (text, want) in bad {
            match check(text) {
                Ok(v) => panic!("{text:?} parsed: {v:?}"),
                Err(e) => assert!(e.to_string().contains(want), "{text:?}: {e}"),
            }
        }
    }

    #[test]
    fn long_entries_keep_their_overrides() {
        let got = check(
            "- address: 127.0.0.2:1\n  weight: 2\n  server_id: spiffe://jia.app/x\n  zone: z1\n",
        )
        .unwrap();
        let t = &got[0].template;
        assert_eq!(t.weight, 2);
        assert_eq!(t.zone.as_deref(), Some("z1"));
        assert_eq!(
            t.server_id.as_ref().map(|s| s.to_string()).as_deref(),
            Some("spiffe://jia.app/x")
        );
    }
}
