//! The HTTP/2 server side of both listeners (the client side is `h2_pool`), on the `h2`
//! crate directly.
//!
//! Flow: [`serve_h2`] handshakes with meshd's server settings -> each stream the caller
//! opens becomes a request with an [`H2Body`], answered by the listener's handler in a
//! task of its own (`Answer`): the response headers once the handler gives them, then
//! the body through a `BodyPipe`. A stream the caller resets ends its task, which drops
//! (cancels) the call it made. On drain the connection sends GOAWAY and lets in-flight
//! streams finish.

use crate::proxy::h2_body::BodyPipe;
use crate::proxy::{H2Body, ProxyBody};
use bytes::Bytes;
use http::{Request, Response};
use http_body::Body;
use std::future::Future;
use std::task::Poll;

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

/// Serves one HTTP/2 connection until it ends: each stream is answered by `handle` in a
/// task of its own. On drain it sends GOAWAY and lets in-flight streams finish.
pub async fn serve_h2<I, H, F>(io: I, handle: H, stop: tokio_util::sync::CancellationToken)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    H: Fn(Request<H2Body>) -> F,
    F: Future<Output = Response<ProxyBody>> + Send + 'static,
{
    let mut conn = match h2_server().handshake::<_, Bytes>(io).await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::debug!("HTTP/2 handshake failed: {e}");
            return;
        }
    };
    let mut stopping = std::pin::pin!(stop.cancelled());
    let mut draining = false;
    loop {
        let accepted = tokio::select! {
            biased;
            accepted = conn.accept() => accepted,
            () = &mut stopping, if !draining => {
                conn.graceful_shutdown();
                draining = true;
                continue;
            }
        };
        match accepted {
            Some(Ok((req, respond))) => {
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
