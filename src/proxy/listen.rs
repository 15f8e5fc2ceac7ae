//! A listener's life: accept connections until meshd drains.
//!
//! Flow: [`accept`] hands out each new connection (Nagle off), retrying after an accept
//! error -> the listener spawns the connection's task on [`Drain::tracker`] -> SIGTERM
//! cancels [`Drain::stop`]: `accept` returns `None`, HTTP/2 connections send GOAWAY, and
//! the drain waits on the tracker for in-flight work to finish.

use tokio::net::TcpStream;

/// Stops listeners and lets in-flight work finish (DESIGN: drain on SIGTERM).
#[derive(Debug, Clone, Default)]
pub struct Drain {
    /// Cancelled when meshd starts draining: listeners stop accepting, HTTP/2
    /// connections send GOAWAY.
    pub stop: tokio_util::sync::CancellationToken,
    /// Every connection task, so the drain can wait for them.
    pub tracker: tokio_util::task::TaskTracker,
}

/// The next connection on `listener` (Nagle off), or `None` once draining starts. An
/// accept error (e.g. out of file descriptors) is logged and retried after 50 ms.
pub async fn accept(
    listener: &tokio::net::TcpListener,
    stop: &tokio_util::sync::CancellationToken,
    what: &str,
) -> Option<(TcpStream, std::net::SocketAddr)> {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return None,
            r = listener.accept() => match r {
                Ok((tcp, from)) => {
                    let _ = tcp.set_nodelay(true);
                    return Some((tcp, from));
                }
                Err(e) => {
                    tracing::warn!("{what} accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
        }
    }
}
