//! The transparent outbound listener: where the pod's iptables rules (`meshd iptables
//! install`) REDIRECT the app's outbound TCP. The app dials a service's own address (say
//! `10.96.0.12:8081`) and never knows a sidecar is in the way.
//!
//! Flow: accept -> the connection's original destination (`SO_ORIGINAL_DST`, kept by the
//! kernel's NAT) -> [`route`] decides, as a plain function: the outbound whose `intercept`
//! names that destination serves it exactly as if the app had dialled its own listener
//! (mTLS, `server_id`, balancing, policy-free on this side); a destination nobody claims is
//! closed (`unmatched: deny`, the default) or relayed as plain TCP (`passthrough`); a
//! connection made straight to this listener, not redirected, is closed, since relaying it
//! would connect meshd to itself. Every outcome is counted in
//! `meshd_intercepted_connections_total{result}`.

use crate::config::{HostPort, Unmatched};
use crate::discovery::Dns;
use crate::discovery::RefreshBounds;
use crate::outbound::Outbound;
use crate::proxy::{self, ConnectionGate, Drain};
use arc_swap::ArcSwap;
use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// What to do with one intercepted connection.
#[derive(Debug, PartialEq, Eq)]
pub enum Route<T> {
    /// Hand it to this outbound.
    Outbound(T),
    /// Relay it, as plain TCP, to its original destination.
    Passthrough(SocketAddr),
    /// Close it; the reason is the metric's `result` label.
    Refuse(Refusal),
}

/// Why an intercepted connection was closed unserved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No outbound claims its destination, and `unmatched` is `deny`.
    Unmatched,
    /// It was made to the transparent listener itself, not redirected there.
    NotRedirected,
    /// The kernel kept no original destination (no NAT entry, or not IPv4).
    NoOriginalDestination,
    /// It is meshd's own passthrough connection, redirected back: the rules do not let
    /// meshd's uid through, and relaying it again would loop.
    Loop,
}

impl Refusal {
    /// The `result` label of `meshd_intercepted_connections_total`.
    pub fn label(self) -> &'static str {
        match self {
            Refusal::Unmatched => "unmatched",
            Refusal::NotRedirected => "not_redirected",
            Refusal::NoOriginalDestination => "no_original_destination",
            Refusal::Loop => "loop",
        }
    }
}

/// Decides where an intercepted connection goes, from whether it is meshd's own relayed
/// connection coming back, its original destination (`None` when the kernel kept none),
/// the transparent listener's own addresses, the table of claimed destinations and the
/// `unmatched` setting.
pub fn route<T: Clone>(
    from_self: bool,
    original: Option<SocketAddr>,
    own: &[SocketAddr],
    claimed: &HashMap<SocketAddr, T>,
    unmatched: Unmatched,
) -> Route<T> {
    if from_self {
        return Route::Refuse(Refusal::Loop);
    }
    let Some(dst) = original else {
        return Route::Refuse(Refusal::NoOriginalDestination);
    };
    let to_listener =
        |o: &SocketAddr| *o == dst || (o.port() == dst.port() && dst.ip().is_loopback());
    if own.iter().any(to_listener) {
        return Route::Refuse(Refusal::NotRedirected);
    }
    match (claimed.get(&dst), unmatched) {
        (Some(t), _) => Route::Outbound(t.clone()),
        (None, Unmatched::Passthrough) => Route::Passthrough(dst),
        (None, Unmatched::Deny) => Route::Refuse(Refusal::Unmatched),
    }
}

/// The destination the app asked for, before iptables REDIRECT rewrote it; without NAT
/// the kernel answers with the socket's own local address.
fn original_destination(tcp: &TcpStream) -> Option<SocketAddr> {
    let sock = socket2::SockRef::from(tcp);
    match tcp.local_addr().ok()? {
        SocketAddr::V4(_) => sock.original_dst_v4().ok()?.as_socket(),
        SocketAddr::V6(_) => sock.original_dst_v6().ok()?.as_socket(),
    }
}

/// One `intercept` entry: a destination and the outbound that claims it.
pub struct Claim {
    /// `ip:port`, or `host:port` whose A/AAAA records are followed.
    pub target: HostPort,
    pub outbound: Arc<Outbound>,
    /// How often a host name is looked up again (the outbound's `min_refresh` and
    /// `max_refresh` bound the records' TTL).
    pub refresh: RefreshBounds,
}

impl Claim {
    /// The claim's address when it is written as one; `None` for a host name.
    fn ip(&self) -> Option<IpAddr> {
        self.target.host.parse().ok()
    }
}

/// The transparent listener and what it hands connections to.
pub struct Transparent {
    /// The listeners' own addresses (IPv4 and IPv6 loopback), to tell a redirected
    /// connection from a direct one.
    own: Vec<SocketAddr>,
    /// Every `intercept` entry of every outbound, in config order (the first claim of
    /// an address wins).
    claims: Vec<Claim>,
    /// Destination -> the outbound that claimed it, rebuilt when a name resolves to new
    /// addresses.
    table: ArcSwap<HashMap<SocketAddr, Arc<Outbound>>>,
    /// What becomes of a destination nobody claims.
    unmatched: Unmatched,
    /// The resolver for host-name claims.
    dns: Arc<Dns>,
    /// The local ports of meshd's own passthrough connections while they are open.
    relaying: Mutex<HashSet<u16>>,
    /// Counts every intercepted connection (routed, passed through or refused).
    gate: Arc<ConnectionGate>,
}

fn count(result: &'static str) {
    count_by(result, 1);
}

fn count_by(result: &'static str, n: u64) {
    metrics::counter!("meshd_intercepted_connections_total", "result" => result).increment(n);
}

impl Transparent {
    pub fn new(
        own: Vec<SocketAddr>,
        claims: Vec<Claim>,
        unmatched: Unmatched,
        dns: Arc<Dns>,
    ) -> Transparent {
        Transparent {
            own,
            claims,
            table: ArcSwap::from_pointee(HashMap::new()),
            unmatched,
            dns,
            relaying: Mutex::default(),
            gate: ConnectionGate::new("transparent", None),
        }
        .counted_from_zero()
    }

    /// Every `meshd_intercepted_connections_total{result}` series at 0.
    fn counted_from_zero(self) -> Transparent {
        let results = ["routed", "passthrough", Refusal::Unmatched.label()];
        let refusals = [
            Refusal::NotRedirected,
            Refusal::NoOriginalDestination,
            Refusal::Loop,
        ];
        for result in results.into_iter().chain(refusals.map(Refusal::label)) {
            count_by(result, 0);
        }
        self
    }

    /// Connects to `dst` for a passthrough, from a port recorded in `relaying` before the
    /// SYN leaves, so that the connection is recognised if the rules send it back here.
    async fn relay_connect(&self, dst: SocketAddr) -> std::io::Result<(TcpStream, u16)> {
        let (socket, unspecified): (_, IpAddr) = match dst {
            SocketAddr::V4(_) => (
                tokio::net::TcpSocket::new_v4()?,
                std::net::Ipv4Addr::UNSPECIFIED.into(),
            ),
            SocketAddr::V6(_) => (
                tokio::net::TcpSocket::new_v6()?,
                std::net::Ipv6Addr::UNSPECIFIED.into(),
            ),
        };
        socket.set_nodelay(true)?;
        socket.bind(SocketAddr::new(unspecified, 0))?;
        let port = socket.local_addr()?.port();
        self.relaying_mut().insert(port);
        match socket.connect(dst).await {
            Ok(up) => Ok((up, port)),
            Err(e) => {
                self.relaying_mut().remove(&port);
                Err(e)
            }
        }
    }

    fn relaying_mut(&self) -> std::sync::MutexGuard<'_, HashSet<u16>> {
        self.relaying.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Looks up every host-name claim (keeping a name's last good addresses when a lookup
    /// fails), rebuilds the table, and returns how long until the next lookup.
    async fn resolve(&self, known: &mut HashMap<String, Vec<IpAddr>>) -> Duration {
        let mut next = Duration::from_secs(60);
        for c in self.claims.iter().filter(|c| c.ip().is_none()) {
            match self.dns.lookup_ip(&c.target.host).await {
                Ok((ips, ttl)) => {
                    known.insert(c.target.host.clone(), ips);
                    next = next.min(ttl.clamp(c.refresh.min, c.refresh.max));
                }
                Err(e) => {
                    tracing::warn!(
                        "intercept {} (outbound {}): {e}; keeping the last addresses",
                        c.target,
                        c.outbound.name
                    );
                    next = next.min(c.refresh.min);
                }
            }
        }
        let mut table = HashMap::new();
        for c in &self.claims {
            let ips = match c.ip() {
                Some(ip) => vec![ip],
                None => known.get(&c.target.host).cloned().unwrap_or_default(),
            };
            for ip in ips {
                table
                    .entry(SocketAddr::new(ip, c.target.port))
                    .or_insert_with(|| c.outbound.clone());
            }
        }
        let old = self.table.load();
        let same = old.len() == table.len()
            && table
                .iter()
                .all(|(k, v)| old.get(k).is_some_and(|o| Arc::ptr_eq(o, v)));
        if !same {
            tracing::info!(
                "transparent listener: {} intercepted destinations",
                table.len()
            );
            self.table.store(Arc::new(table));
        }
        next
    }

    /// Builds the table (looking up host-name claims) and follows the names from then on;
    /// awaited before the listeners take their first connection.
    pub async fn start(self: &Arc<Self>, drain: &Drain) {
        let mut known = HashMap::new();
        let mut wait = self.resolve(&mut known).await;
        if self.claims.iter().any(|c| c.ip().is_none()) {
            let this = self.clone();
            let stop = drain.stop.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(wait) => {}
                    }
                    wait = this.resolve(&mut known).await;
                }
            });
        }
    }

    /// Accepts intercepted connections on one listener until drained.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: Drain) {
        while let Some((mut tcp, from)) =
            proxy::accept(&listener, &drain.stop, "transparent listener").await
        {
            let Some(open) = self.gate.admit(from) else {
                continue;
            };
            let original = original_destination(&tcp);
            let table = self.table.load();
            let from_self = self.relaying_mut().contains(&from.port());
            match route(from_self, original, &self.own, &table, self.unmatched) {
                Route::Outbound(ob) => {
                    count("routed");
                    let served = ob.serve_connection(tcp, drain.stop.clone());
                    drain.tracker.spawn(async move {
                        let _open = open;
                        served.await
                    });
                }
                Route::Passthrough(dst) => {
                    count("passthrough");
                    let this = self.clone();
                    drain.tracker.spawn(async move {
                        let _open = open;
                        match this.relay_connect(dst).await {
                            Ok((mut up, port)) => {
                                proxy::pipe(&mut tcp, &mut up, "passthrough").await;
                                this.relaying_mut().remove(&port);
                            }
                            Err(e) => tracing::warn!("passthrough to {dst} (from {from}): {e}"),
                        }
                    });
                }
                Route::Refuse(why) => {
                    count(why.label());
                    let dst = original.map_or("none".to_string(), |d| d.to_string());
                    tracing::warn!(
                        "intercepted connection from {from} to {dst} closed: {}",
                        match why {
                            Refusal::Unmatched =>
                                "no outbound intercepts this destination (transparent.unmatched: deny)",
                            Refusal::NotRedirected =>
                                "made to the transparent listener itself, not redirected by iptables",
                            Refusal::NoOriginalDestination =>
                                "the kernel kept no original destination",
                            Refusal::Loop =>
                                "it is meshd's own passthrough connection, redirected back: run meshd as the uid given to `meshd iptables install --proxy-uid`",
                        }
                    );
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    /// The app dials service addresses; the table says which outbound claimed which, and
    /// each row is one intercepted connection with the route it must take.
    #[test]
    fn each_destination_takes_its_route() {
        let own = [addr("127.0.0.1:15001"), addr("[::1]:15001")];
        let claimed: HashMap<SocketAddr, &str> = [
            (addr("10.96.0.12:8081"), "contact"),
            (addr("10.96.0.13:8081"), "family"),
            (addr("[fd00::12]:8081"), "contact-v6"),
        ]
        .into_iter()
        .collect();
        use Route::*;
        let table = [
            (
                Some("10.96.0.12:8081"),
                Unmatched::Deny,
                Outbound("contact"),
            ),
            (
                Some("10.96.0.13:8081"),
                Unmatched::Passthrough,
                Outbound("family"),
            ),
            (
                Some("[fd00::12]:8081"),
                Unmatched::Deny,
                Outbound("contact-v6"),
            ),
            // Same IP, another port: not claimed.
            (
                Some("10.96.0.12:9090"),
                Unmatched::Deny,
                Refuse(Refusal::Unmatched),
            ),
            (
                Some("10.96.0.12:9090"),
                Unmatched::Passthrough,
                Passthrough(addr("10.96.0.12:9090")),
            ),
            (
                Some("93.184.216.34:443"),
                Unmatched::Deny,
                Refuse(Refusal::Unmatched),
            ),
            // Dialled directly: the kernel answers with the listener's own address.
            (
                Some("127.0.0.1:15001"),
                Unmatched::Passthrough,
                Refuse(Refusal::NotRedirected),
            ),
            (
                Some("127.0.0.2:15001"),
                Unmatched::Passthrough,
                Refuse(Refusal::NotRedirected),
            ),
            (
                Some("[::1]:15001"),
                Unmatched::Passthrough,
                Refuse(Refusal::NotRedirected),
            ),
            (
                None,
                Unmatched::Passthrough,
                Refuse(Refusal::NoOriginalDestination),
            ),
        ];
        for (dst, unmatched, want) in table {
            let got = route(false, dst.map(addr), &own, &claimed, unmatched);
            assert_eq!(got, want, "{dst:?} with {unmatched:?}");
        }
        // meshd's own relayed connection, back again: refused whatever its destination.
        for dst in ["10.96.0.12:8081", "93.184.216.34:443"] {
            let got = route(
                true,
                Some(addr(dst)),
                &own,
                &claimed,
                Unmatched::Passthrough,
            );
            assert_eq!(got, Refuse(Refusal::Loop), "{dst}");
        }
    }
}
