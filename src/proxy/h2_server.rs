//! The HTTP/2 server side of both listeners (the client side is `h2_pool`), on the `h2`
//! crate directly.
//!
//! Flow: [`serve_h2`] handshakes with meshd's server settings -> each stream the caller
//! opens becomes a request with an [`H2Body`], answered by the listener's handler in a
//! task of its own (`Answer`): the response headers once the handler gives them, then
//! the body through a `BodyPipe`. A stream the caller resets ends its task, which drops
//! (cancels) the call it made. On drain the connection sends GOAWAY and lets in-flight
//! streams finish.

use crate::proxy::connections::{ConnectionGate, Limit};
use crate::proxy::control_frames::FrameWatch;
use crate::proxy::h2_body::BodyPipe;
use crate::proxy::{H2Body, ProxyBody};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use std::future::Future;
use std::task::Poll;
use std::time::Duration;
use tokio::time::Instant;

/// The HTTP/2 server settings of both listeners.
fn h2_server() -> h2::server::Builder {
    let mut b = h2::server::Builder::new();
    b.max_concurrent_streams(4096)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_header_list_size(64 << 10)
        .max_send_buffer_size(400 << 10)
        .max_pending_accept_reset_streams(200)
        .max_local_error_reset_streams(Some(1024));
    b
}

/// Who watches a served connection's limits: its listener's gate (the limits, and where
/// a hit is counted) and the peer, for the one log line per cause.
#[derive(Clone, Copy)]
pub struct Watched<'a> {
    pub gate: &'a ConnectionGate,
    pub remote: std::net::SocketAddr,
}

/// Serves one HTTP/2 connection until it ends: each stream is answered by `handle` in a
/// task of its own. On drain it sends GOAWAY and lets in-flight streams finish.
///
/// With `watched` limits: the preface, SETTINGS and first request's headers must come
/// within `header_timeout`; a connection with no stream open for `idle_timeout` gets
/// GOAWAY (checked when the timer fires, so a long stream's end can add up to one more
/// `idle_timeout`); a PING every `keepalive_interval` must be answered within
/// `keepalive_timeout`.
pub fn serve_h2<'a, I, H, F>(
    io: I,
    handle: H,
    stop: tokio_util::sync::CancellationToken,
    watched: Option<Watched<'a>>,
) -> impl Future<Output = ()> + 'a
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'a,
    H: Fn(Request<H2Body>) -> F + 'a,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    // The stream goes straight into the boxed handshake. An async fn keeps each argument
    // in its state for its whole life, so a TLS stream (1.2 KB) taken by the serving
    // future stayed there beside the connection made of it (optimisation log, 2026-12-07
    // evening).
    let handshake = Box::pin(h2_server().handshake::<_, Bytes>(FrameWatch::new(io, watched)));
    serve_handshake(handshake, handle, stop, watched)
}

/// The HTTP/2 handshake in progress, boxed: its 2.5 KB would otherwise stay in the
/// serving future's state for the connection's whole life.
type Handshake<'a, I> = std::pin::Pin<Box<h2::server::Handshake<FrameWatch<'a, I>, Bytes>>>;

/// [`serve_h2`] once the handshake is started.
async fn serve_handshake<I, H, F>(
    handshake: Handshake<'_, I>,
    handle: H,
    stop: tokio_util::sync::CancellationToken,
    watched: Option<Watched<'_>>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(Request<H2Body>) -> F,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let limits = watched.and_then(|w| w.gate.limits().copied());
    let hit = |limit: Limit| {
        if let Some(w) = watched {
            w.gate.hit(limit, w.remote);
        }
    };
    let header_deadline = limits.map(|l| Instant::now() + l.header_timeout);
    // One expression: the handshake's result (a whole connection, 2.5 KB) is a temporary
    // gone at the end of this statement. Bound to a name, it kept its room in the state
    // beside `conn` until the function returned.
    let mut conn = match match header_deadline {
        Some(deadline) => tokio::time::timeout_at(deadline, handshake).await,
        None => Ok(handshake.await),
    } {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!("HTTP/2 handshake failed: {e}");
            return;
        }
        Err(_) => {
            hit(Limit::HeaderTimeout);
            return;
        }
    };
    let idle = limits.map(|l| l.idle_timeout).filter(|d| !d.is_zero());
    let keepalive = limits
        .filter(|l| !l.keepalive_interval.is_zero())
        .map(|l| (l.keepalive_interval, l.keepalive_timeout));
    let mut ping_pong = keepalive.and_then(|_| conn.ping_pong());
    let mut awaiting_pong = false;
    // Until the first stream: the header deadline; then the idle check.
    let mut first_stream = false;
    let mut last_stream = Instant::now();
    let deadline = tokio::time::sleep_until(header_deadline.unwrap_or_else(far_future));
    let mut deadline = std::pin::pin!(deadline);
    let mut deadline_armed = header_deadline.is_some();
    let ping_at = keepalive.map_or_else(far_future, |(every, _)| Instant::now() + every);
    let mut ping_timer = std::pin::pin!(tokio::time::sleep_until(ping_at));
    let mut stopping = std::pin::pin!(stop.cancelled());
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = conn.accept() => accepted,
            () = &mut deadline, if deadline_armed => {
                let now = Instant::now();
                if !first_stream {
                    hit(Limit::HeaderTimeout);
                    return;
                }
                let Some(idle) = idle else {
                    deadline_armed = false;
                    continue;
                };
                if conn.has_streams() {
                    last_stream = now;
                }
                if now >= last_stream + idle && !draining {
                    hit(Limit::IdleTimeout);
                    conn.graceful_shutdown();
                    draining = true;
                    deadline_armed = false;
                } else {
                    deadline.as_mut().reset(last_stream + idle);
                }
                continue;
            }
            () = &mut ping_timer, if ping_pong.is_some() => {
                let (every, timeout) = keepalive.unwrap_or_default();
                if awaiting_pong {
                    hit(Limit::KeepaliveTimeout);
                    return;
                }
                if let Some(pp) = ping_pong.as_mut() {
                    awaiting_pong = pp.send_ping(h2::Ping::opaque()).is_ok();
                }
                let next = if awaiting_pong { timeout } else { every };
                ping_timer.as_mut().reset(Instant::now() + next);
                continue;
            }
            pong = std::future::poll_fn(|cx| match ping_pong.as_mut() {
                Some(pp) => pp.poll_pong(cx),
                None => Poll::Pending,
            }), if awaiting_pong => {
                awaiting_pong = false;
                if pong.is_err() {
                    ping_pong = None;
                }
                let (every, _) = keepalive.unwrap_or_default();
                ping_timer.as_mut().reset(Instant::now() + every);
                continue;
            }
            () = &mut stopping, if !draining => {
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            Some(Ok((req, respond))) => {
                if !first_stream {
                    first_stream = true;
                    last_stream = Instant::now();
                    match idle {
                        Some(idle) => deadline.as_mut().reset(last_stream + idle),
                        None => deadline_armed = false,
                    }
                } else if idle.is_some() {
                    last_stream = Instant::now();
                }
                // Boxed: the service future is kilobytes, and the task spawn and its
                // completion each copy the whole task state.
                let handled = Box::pin(handle(req.map(H2Body::new)));
                tokio::spawn(Answer::new(handled, respond));
            }
            Some(Err(e)) => {
                tracing::debug!("HTTP/2 connection ended: {e}");
                return;
            }
            None => return,
        }
    }
}

/// A deadline that never comes, for timers that are off.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

pin_project_lite::pin_project! {
    /// The task answering one stream: the response headers once `handled` gives them,
    /// then the body. If the caller resets the stream first, the task ends and drops
    /// `handled`, which cancels the call it made. A hand-written state machine rather
    /// than an `async fn`: that one kept the multi-kilobyte `handled` future twice in
    /// its state, and every task spawn and completion copies the whole state.
    #[project = AnswerState]
    enum Answer<F> {
        Handling {
            #[pin]
            handled: F,
            respond: Option<h2::server::SendResponse<Bytes>>,
            // Not polled yet: a stream the caller reset before its task first ran (the
            // HTTP/2 rapid-reset pattern) is dropped without calling upstream, so meshd
            // does not pass a flood of opened-and-cancelled streams on to the next hop.
            fresh: bool,
        },
        Sending {
            pipe: BodyPipe<ProxyBody>,
        },
    }
}

impl<F> Answer<F> {
    fn new(handled: F, respond: h2::server::SendResponse<Bytes>) -> Answer<F> {
        Answer::Handling {
            handled,
            respond: Some(respond),
            fresh: true,
        }
    }
}

impl<F> Future for Answer<F>
where
    F: Future<Output = Response<ProxyBody>>,
{
    type Output = ();

    fn poll(mut self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let pipe = match self.as_mut().project() {
            AnswerState::Sending { pipe } => return std::pin::Pin::new(pipe).poll(cx),
            AnswerState::Handling {
                handled,
                respond,
                fresh,
            } => {
                // Checked once per poll: before the first call, after the others.
                let checked = std::mem::take(fresh);
                if checked && caller_reset(respond, cx) {
                    return Poll::Ready(());
                }
                let resp = match handled.poll(cx) {
                    Poll::Ready(resp) => resp,
                    Poll::Pending if !checked && caller_reset(respond, cx) => {
                        return Poll::Ready(())
                    }
                    Poll::Pending => return Poll::Pending,
                };
                let Some(mut respond) = respond.take() else {
                    return Poll::Ready(());
                };
                let (head, body) = resp.into_parts();
                let eos = body.is_end_stream();
                match respond.send_response(Response::from_parts(head, ()), eos) {
                    Ok(stream) if !eos => BodyPipe::new(body, stream),
                    Ok(_) => return Poll::Ready(()),
                    Err(e) => {
                        tracing::debug!("response not sent: {e}");
                        return Poll::Ready(());
                    }
                }
            }
        };
        self.set(Answer::Sending { pipe });
        self.poll(cx)
    }
}

/// Whether the caller has reset the stream (or it is gone); otherwise wakes the task
/// when it does.
fn caller_reset(
    respond: &mut Option<h2::server::SendResponse<Bytes>>,
    cx: &mut std::task::Context<'_>,
) -> bool {
    !matches!(
        respond.as_mut().map(|r| r.poll_reset(cx)),
        Some(Poll::Pending)
    )
}
