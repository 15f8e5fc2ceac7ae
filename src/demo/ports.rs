//! Loopback ports for `meshd demo`: [`PortPicker::pick`] takes the DESIGN.md §2 default
//! of a listener when it is free, else a free loopback port outside the kernel's ephemeral
//! range, and notes the swap so the summary can say so.

use std::collections::HashSet;
use std::net::{Ipv4Addr, TcpListener as StdListener};

/// Why no port could be found for a listener.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Binding a free loopback port for `what` failed.
    #[error("cannot find a free loopback port for {what}: {error}")]
    Probe { what: String, error: std::io::Error },
    /// Every free port the system offered for `what` was already handed out.
    #[error("cannot find a free loopback port for {0}")]
    NoFreePort(String),
}

/// Chooses loopback ports: a default when it is free, else any free port (noted).
#[derive(Debug, Default)]
pub struct PortPicker {
    /// Ports handed out already, so one demo never uses a port twice.
    used: HashSet<u16>,
    /// "127.0.0.1:15000 is taken: payment admin uses 127.0.0.1:40123", one per fallback.
    pub notes: Vec<String>,
}

impl PortPicker {
    /// A port for `what`: `preferred` when it can be bound on 127.0.0.1, else a free one.
    pub fn pick(&mut self, what: &str, preferred: Option<u16>) -> Result<u16, PortError> {
        if let Some(p) = preferred {
            if !self.used.contains(&p) && StdListener::bind((Ipv4Addr::LOCALHOST, p)).is_ok() {
                self.used.insert(p);
                return Ok(p);
            }
        }
        let port = self.free_port().map_err(|error| PortError::Probe {
            what: what.to_string(),
            error,
        })?;
        if let Some(port) = port {
            if let Some(p) = preferred {
                self.notes.push(format!(
                    "127.0.0.1:{p} is taken: {what} uses 127.0.0.1:{port}"
                ));
            }
            return Ok(port);
        }
        Err(PortError::NoFreePort(what.to_string()))
    }
}

impl PortPicker {
    /// A free loopback port not handed out yet, taken outside the kernel's ephemeral range
    /// where it can be: a port from that range (what `bind(0)` gives) can be taken by
    /// another process's `connect()` as its source port before our listener binds it.
    fn free_port(&mut self) -> Result<Option<u16>, std::io::Error> {
        let (lo, hi) = ephemeral_range();
        let outside: Vec<u16> = (10_000..=u16::MAX).filter(|p| *p < lo || *p > hi).collect();
        // A start that differs between runs, so two demos side by side rarely collide.
        let seed = std::process::id() as usize * 7919
            + std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos() as usize);
        let n = outside.len();
        for i in 0..n {
            let port = outside[(seed + i) % n];
            if !self.used.contains(&port) && StdListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok()
            {
                self.used.insert(port);
                return Ok(Some(port));
            }
        }
        // The ephemeral range covers every port: take what the kernel hands out.
        for _ in 0..64 {
            let port = StdListener::bind((Ipv4Addr::LOCALHOST, 0))?
                .local_addr()?
                .port();
            if self.used.insert(port) {
                return Ok(Some(port));
            }
        }
        Ok(None)
    }
}

/// The kernel's ephemeral port range, `(32768, 60999)` where it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|v| v.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32768, 60999))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taken_defaults_are_replaced_and_noted() {
        // Another program holds a default port: the demo takes a free one and says so.
        let held = StdListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
        let taken = held.local_addr().unwrap().port();
        let mut picker = PortPicker::default();
        let got = picker.pick("the payment admin", Some(taken)).unwrap();
        assert_ne!(got, taken);
        assert_eq!(picker.notes.len(), 1);
        assert!(picker.notes[0].contains(&format!("127.0.0.1:{taken} is taken")));
        assert!(picker.notes[0].contains(&format!("uses 127.0.0.1:{got}")));
        // A port already handed out is never handed out again, and is not a "taken" note
        // for the caller that asked without a default.
        let again = picker.pick("x", Some(got)).unwrap();
        assert_ne!(again, got);
        let free = picker.pick("y", None).unwrap();
        assert!(![taken, got, again].contains(&free));
        assert_eq!(picker.notes.len(), 2);
    }
}
