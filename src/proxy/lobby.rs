//! Where a listener's connections wait for their first byte, for a few dozen bytes each.
//!
//! A connection that has sent nothing yet has no use for a task, a timer, TLS state or
//! buffers, and on the internet thousands of them can come at once (scanners, idle
//! floods). So the accept loop keeps them in a lobby: the socket in the lobby's own epoll
//! set and an entry in a map, and one timer for the whole lobby.
//!
//! Flow: [`accept_ready`] accepts (and admits through the listener's gate) each
//! connection -> one whose first byte is already there (most real clients: the TLS
//! ClientHello comes with the handshake's last ACK) goes straight to `start`; the others
//! wait in the [`Lobby`] -> when the lobby's epoll says a socket is readable (or closed),
//! the connection leaves for `start`, with its deadline -> one still silent at its
//! deadline (`handshake_timeout` after accept) is closed and counted as a handshake
//! timeout -> on drain, the lobby is dropped and every waiting socket closed.

use crate::proxy::connections::{ConnectionGate, OpenConnection};
use crate::proxy::Drain;
use futures::FutureExt;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::unix::AsyncFd;
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A connection that has sent its first byte (or closed): what the listener starts with.
struct Arrival {
    tcp: TcpStream,
    remote: SocketAddr,
    /// Counts the connection open until it ends.
    open: OpenConnection,
    /// When the TLS handshake must be done (`handshake_timeout` after accept).
    deadline: Instant,
}

/// One waiting connection.
struct Waiting {
    tcp: mio::net::TcpStream,
    remote: SocketAddr,
    open: OpenConnection,
    deadline: Instant,
}

/// The waiting connections of one listener.
struct Lobby {
    /// The lobby's epoll set, itself watched by tokio.
    poll: AsyncFd<mio::Poll>,
    events: mio::Events,
    /// Waiting connections by token.
    waiting: HashMap<usize, Waiting>,
    /// Tokens in order of their deadlines (every connection gets the same timeout, so
    /// arrival order is deadline order); entries that left already are passed over.
    deadlines: VecDeque<(Instant, usize)>,
    next_token: usize,
}

impl Lobby {
    fn new() -> std::io::Result<Lobby> {
        // `AsyncFd::new` is deprecated for `register`, which is `unsafe` because a generic
        // owner could swap its descriptor; `mio::Poll` owns its epoll descriptor from
        // creation to drop and always returns that one, and this crate forbids `unsafe`.
        #[allow(deprecated)]
        let poll = AsyncFd::new(mio::Poll::new()?)?;
        Ok(Lobby {
            poll,
            events: mio::Events::with_capacity(256),
            waiting: HashMap::new(),
            deadlines: VecDeque::new(),
            next_token: 0,
        })
    }

    /// Puts a silent connection in the lobby; `Err` gives it back (it starts at once).
    fn wait(&mut self, arrival: Arrival) -> Result<(), Arrival> {
        let Arrival {
            tcp,
            remote,
            open,
            deadline,
        } = arrival;
        let std = match tcp.into_std() {
            Ok(std) => std,
            Err(e) => {
                tracing::debug!("lobby: {remote}: {e}");
                return Ok(());
            }
        };
        let mut tcp = mio::net::TcpStream::from_std(std);
        let token = self.next_token;
        self.next_token = self.next_token.wrapping_add(1);
        let registry = self.poll.get_ref().registry();
        if let Err(e) = registry.register(&mut tcp, mio::Token(token), mio::Interest::READABLE) {
            tracing::debug!("lobby: {remote}: {e}");
            let tcp = TcpStream::from_std(tcp.into());
            return match tcp {
                Ok(tcp) => Err(Arrival {
                    tcp,
                    remote,
                    open,
                    deadline,
                }),
                Err(_) => Ok(()),
            };
        }
        self.waiting.insert(
            token,
            Waiting {
                tcp,
                remote,
                open,
                deadline,
            },
        );
        self.deadlines.push_back((deadline, token));
        Ok(())
    }

    /// Takes connection `token` out of the lobby, back into tokio.
    fn leave(&mut self, token: usize) -> Option<Arrival> {
        let mut w = self.waiting.remove(&token)?;
        let _ = self.poll.get_ref().registry().deregister(&mut w.tcp);
        let tcp = TcpStream::from_std(w.tcp.into()).ok()?;
        Some(Arrival {
            tcp,
            remote: w.remote,
            open: w.open,
            deadline: w.deadline,
        })
    }

    /// Waits until some waiting connection is readable; gives every one that is.
    async fn readable(&mut self, out: &mut Vec<Arrival>) {
        loop {
            let tokens: Vec<usize> = {
                let Ok(mut guard) = self.poll.readable_mut().await else {
                    // The epoll set itself failed: nothing will ever be ready.
                    return std::future::pending().await;
                };
                let _ = guard
                    .get_inner_mut()
                    .poll(&mut self.events, Some(Duration::ZERO));
                if self.events.is_empty() {
                    guard.clear_ready();
                    continue;
                }
                self.events.iter().map(|e| e.token().0).collect()
            };
            out.extend(tokens.into_iter().filter_map(|t| self.leave(t)));
            return;
        }
    }

    /// The earliest deadline of a connection still waiting.
    fn next_deadline(&mut self) -> Option<Instant> {
        while let Some((deadline, token)) = self.deadlines.front().copied() {
            if self.waiting.contains_key(&token) {
                return Some(deadline);
            }
            self.deadlines.pop_front();
        }
        None
    }

    /// Closes every connection whose deadline has passed; each counted on `gate`.
    fn expire(&mut self, now: Instant, gate: &ConnectionGate) {
        while let Some((deadline, token)) = self.deadlines.front().copied() {
            if deadline > now {
                return;
            }
            self.deadlines.pop_front();
            if let Some(mut w) = self.waiting.remove(&token) {
                let _ = self.poll.get_ref().registry().deregister(&mut w.tcp);
                gate.handshake_timed_out(w.remote);
            }
        }
    }
}

/// Whether the caller has sent something (or closed) already, without waiting.
fn has_spoken(tcp: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    match socket2::SockRef::from(tcp).peek(&mut byte) {
        Ok(_) => true,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    }
}

/// Accepts connections on `listener` until drained. Each one is admitted by `gate` (or
/// closed at once over `connections.max`); each that has sent its first byte within
/// `handshake_timeout` gets a task on the drain's tracker running
/// `connection(tcp, remote, stop, deadline)` (and counted open until it ends); the
/// others are closed at that timeout. While `serving()` is false (the inbound without an
/// SVID) every connection starts at once, and `connection` refuses it, rather than wait.
pub async fn accept_ready<C, F>(
    listener: &TcpListener,
    drain: &Drain,
    gate: &Arc<ConnectionGate>,
    handshake_timeout: Duration,
    what: &'static str,
    serving: impl Fn() -> bool,
    connection: C,
) where
    C: Fn(TcpStream, SocketAddr, CancellationToken, Instant) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    let start = |arrival: Arrival| {
        let Arrival {
            tcp,
            remote,
            open,
            deadline,
        } = arrival;
        let served = connection(tcp, remote, drain.stop.clone(), deadline);
        // `open` is let go when the connection ends. Not `async move { served.await }`:
        // that block keeps `served` twice in its state, as its capture and as the future
        // it awaits (1.6 KB each for an inbound connection).
        drain.tracker.spawn(served.map(move |()| drop(open)));
    };
    let mut lobby = match Lobby::new() {
        Ok(lobby) => Some(lobby),
        Err(e) => {
            tracing::warn!("{what}: no lobby for silent connections ({e}); each waits in a task");
            None
        }
    };
    let mut ready = Vec::new();
    loop {
        let next = lobby.as_mut().and_then(Lobby::next_deadline);
        tokio::select! {
            biased;
            () = drain.stop.cancelled() => return,
            accepted = crate::proxy::accept(listener, &drain.stop, what) => {
                let Some((tcp, remote)) = accepted else { return };
                let Some(open) = gate.admit(remote) else { continue };
                let deadline = Instant::now() + handshake_timeout;
                let arrival = Arrival { tcp, remote, open, deadline };
                match lobby.as_mut() {
                    Some(lobby) if serving() && !has_spoken(&arrival.tcp) => {
                        if let Err(arrival) = lobby.wait(arrival) {
                            start(arrival);
                        }
                    }
                    _ => start(arrival),
                }
            }
            () = async {
                match lobby.as_mut() {
                    Some(lobby) => lobby.readable(&mut ready).await,
                    None => std::future::pending().await,
                }
            } => {
                for arrival in ready.drain(..) {
                    start(arrival);
                }
            }
            () = tokio::time::sleep_until(next.unwrap_or_else(Instant::now)), if next.is_some() => {
                if let Some(lobby) = lobby.as_mut() {
                    lobby.expire(Instant::now(), gate);
                }
            }
        }
    }
}
