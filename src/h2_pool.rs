//! The HTTP/2 client side of both listeners: one pooled connection per peer (the local
//! app inbound, an upstream endpoint outbound), on the `h2` crate directly.
//!
//! Flow: [`H2Pool::sender`] hands out a handle to the live connection, connecting once
//! (single-flight) when there is none or it stopped taking streams (GOAWAY, error) ->
//! [`H2Pool::send_via`] sends the request headers on it; a body that is not complete yet
//! is piped into the stream, in the caller's task when it is already there and in a task
//! of its own otherwise -> the caller awaits the response headers; the response body is
//! an [`UpstreamBody`] that returns flow-control credit as it is read. A task per
//! connection drives it and pings the peer every 30 s, closing the connection when no
//! answer comes within 10 s.
//!
//! Why not hyper's client: it hands each request to the connection's task over a
//! channel and spawns a task per request that waits for the response and passes it back
//! over a oneshot. That was about 9 % of a sidecar's instructions per request
//! (callgrind; `benches/e2e/README.md`, optimisation log).

use crate::tls::UpstreamTls;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use futures::channel::oneshot;
use h2::client::SendRequest;
use h2::{Reason, RecvStream, SendStream};
use http::{Request, Response};
use http_body::{Body, Frame};
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// How often an open connection pings its peer.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
/// How long a ping may go unanswered before the connection is closed.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// How a pooled connection reaches its peer.
#[derive(Debug, Clone)]
pub enum Connector {
    /// h2c to the local app.
    Plain(SocketAddr),
    /// mTLS + h2 to an upstream endpoint, verified against the upstream's `server_id`.
    Tls {
        addr: SocketAddr,
        tls: Arc<UpstreamTls>,
    },
}

impl Connector {
    fn addr(&self) -> SocketAddr {
        match self {
            Connector::Plain(addr) | Connector::Tls { addr, .. } => *addr,
        }
    }
}

/// One HTTP/2 connection, shared by all requests to one peer and re-made when it closes.
#[derive(Debug)]
pub struct H2Pool {
    /// How to (re)connect.
    connector: Connector,
    /// The live connection's handle; empty until first use or after it closed.
    sender: ArcSwapOption<SendRequest<Bytes>>,
    /// Single-flight for reconnects: one handshake at a time, requests wait for it.
    connecting: tokio::sync::Mutex<()>,
}

impl H2Pool {
    pub fn new(connector: Connector) -> H2Pool {
        H2Pool {
            connector,
            sender: ArcSwapOption::empty(),
            connecting: tokio::sync::Mutex::new(()),
        }
    }

    /// A handle to the live connection if it takes new streams: a request sent on it
    /// goes out at once, without waiting for a connection.
    pub fn ready_sender(&self) -> Option<SendRequest<Bytes>> {
        let current = self.sender.load();
        let mut sender = SendRequest::clone(current.as_deref()?);
        takes_streams(&mut sender).then_some(sender)
    }

    /// A handle to a connection that takes new streams, connecting if needed.
    pub async fn sender(&self) -> Result<SendRequest<Bytes>, String> {
        if let Some(s) = self.ready_sender() {
            return Ok(s);
        }
        let _one = self.connecting.lock().await;
        if let Some(s) = self.ready_sender() {
            return Ok(s);
        }
        // Boxed: the connect future is kilobytes and would otherwise sit in every request's.
        let s = Box::pin(connect(&self.connector)).await?;
        self.sender.store(Some(Arc::new(s.clone())));
        Ok(s)
    }

    /// Sends a request and waits for the response headers.
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<UpstreamBody>, String>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        let sender = self.sender().await?;
        self.send_via(sender, req).await
    }

    /// [`H2Pool::send`] on a handle already taken from [`H2Pool::sender`]. If that
    /// connection stopped taking streams in the meantime (GOAWAY, reset), the request
    /// has not left yet and goes out on a new one.
    pub async fn send_via<B>(
        &self,
        mut sender: SendRequest<Bytes>,
        req: Request<B>,
    ) -> Result<Response<UpstreamBody>, String>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        if !takes_streams(&mut sender) {
            self.sender.store(None);
            sender = self.sender().await?;
        }
        let (head, body) = req.into_parts();
        let eos = body.is_end_stream();
        let (response, stream) = sender
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(|e| e.to_string())?;
        drop(sender);
        let mut answered = ResetUnlessAnswered(None);
        if !eos {
            let mut pipe = BodyPipe {
                body,
                stream,
                waiting: None,
                cancel: None,
            };
            // Most bodies (a unary gRPC message) are already here: send them now,
            // without a task.
            let sent = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx)));
            if sent.await.is_pending() {
                let (tx, rx) = oneshot::channel();
                pipe.cancel = Some(rx);
                answered.0 = Some(tx);
                tokio::spawn(pipe);
            }
        }
        let resp = response.await.map_err(|e| e.to_string())?;
        answered.0 = None;
        Ok(resp.map(UpstreamBody::new))
    }
}

/// Whether the connection takes new streams: no GOAWAY, no error, not closed. A fresh
/// handle has no stream pending open, so h2 answers without waiting.
fn takes_streams(sender: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
}

/// Tells a body pipe running in its own task to reset the stream when the caller gave
/// up before the response came (deadline, the app went away); dropped unsent once the
/// response is there.
struct ResetUnlessAnswered(Option<oneshot::Sender<()>>);

impl Drop for ResetUnlessAnswered {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Copies a request body into its HTTP/2 stream, frame by frame, waiting for the
/// peer's flow-control window before each data frame (as hyper's `PipeToSendStream`).
struct BodyPipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A data frame read from the body, waiting for send capacity; with its end flag.
    waiting: Option<(Bytes, bool)>,
    /// Fires when the caller stopped waiting for the response (see [`ResetUnlessAnswered`]).
    cancel: Option<oneshot::Receiver<()>>,
}

impl<B> BodyPipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), String>> {
        loop {
            // Registered first, so that a reset wakes the task while it waits below.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(match reason {
                    Ok(reason) => format!("peer reset the stream: {reason}"),
                    Err(e) => e.to_string(),
                }));
            }
            if self.waiting.is_some() {
                while self.stream.capacity() == 0 {
                    match ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(e)) => return Poll::Ready(Err(e.to_string())),
                        None => return Poll::Ready(Err("stream closed while sending".into())),
                    }
                }
                let Some((data, eos)) = self.waiting.take() else {
                    continue;
                };
                self.stream
                    .send_data(data, eos)
                    .map_err(|e| e.to_string())?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame is read before any capacity is reserved: a claim made while
            // the body has nothing to send could hold the connection's window (hyper #4003).
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() {
                            self.stream
                                .send_data(data, eos)
                                .map_err(|e| e.to_string())?;
                            if eos {
                                return Poll::Ready(Ok(()));
                            }
                        } else {
                            // h2 raises the claim to the whole frame inside send_data.
                            self.stream.reserve_capacity(1);
                            self.waiting = Some((data, eos));
                        }
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.stream.reserve_capacity(0);
                            self.stream
                                .send_trailers(trailers)
                                .map_err(|e| e.to_string())?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: Box<dyn StdError + Send + Sync> = e.into();
                    self.stream.send_reset(reset_reason(&*e));
                    return Poll::Ready(Err(e.to_string()));
                }
                None => {
                    self.stream
                        .send_data(Bytes::new(), true)
                        .map_err(|e| e.to_string())?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<B> Future for BodyPipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(cancel) = &mut this.cancel {
            match Pin::new(cancel).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.stream.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                // Answered: the body goes on to its end.
                Poll::Ready(Err(oneshot::Canceled)) => this.cancel = None,
                Poll::Pending => {}
            }
        }
        this.pump(cx).map(|r| {
            if let Err(e) = r {
                tracing::debug!("request body not sent to the end: {e}");
            }
        })
    }
}

/// The reset reason for a body that failed: the app's own when it reset its stream
/// (a cancelled gRPC call stays cancelled upstream), INTERNAL_ERROR otherwise.
fn reset_reason(mut e: &(dyn StdError + 'static)) -> Reason {
    loop {
        if let Some(reason) = e.downcast_ref::<h2::Error>().and_then(h2::Error::reason) {
            return reason;
        }
        match e.source() {
            Some(next) => e = next,
            None => return Reason::INTERNAL_ERROR,
        }
    }
}

/// A response body from the peer: data frames, then trailers; each data frame read
/// gives its bytes back to the peer's flow-control window.
#[derive(Debug)]
pub struct UpstreamBody {
    recv: RecvStream,
    /// All data frames were read; trailers come next.
    data_done: bool,
}

impl UpstreamBody {
    fn new(recv: RecvStream) -> UpstreamBody {
        UpstreamBody {
            recv,
            data_done: false,
        }
    }
}

/// A reset with NO_ERROR ends the body early but cleanly (RFC 9113 §8.1).
fn ended_cleanly(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::NO_ERROR)
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) if ended_cleanly(&e) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if ended_cleanly(&e) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }
}

fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.initial_max_send_streams(100)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(1 << 16)
        .max_header_list_size(16 << 10)
        .max_send_buffer_size(1 << 20)
        .enable_push(false);
    b
}

async fn connect(connector: &Connector) -> Result<SendRequest<Bytes>, String> {
    let addr = connector.addr();
    match connector {
        Connector::Plain(_) => {
            let tcp = crate::proxy::tcp_connect(addr)
                .await
                .map_err(|e| format!("connect {addr}: {e}"))?;
            handshake(tcp, addr).await
        }
        Connector::Tls { tls, .. } => {
            let stream = crate::proxy::tls_connect(addr, tls).await?;
            handshake(stream, addr).await
        }
    }
}

async fn handshake<T>(io: T, addr: SocketAddr) -> Result<SendRequest<Bytes>, String>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = builder()
        .handshake(io)
        .await
        .map_err(|e| format!("HTTP/2 handshake with {addr}: {e}"))?;
    tokio::spawn(async move {
        if let Err(e) = drive(conn).await {
            tracing::debug!("HTTP/2 connection to {addr} closed: {e}");
        }
    });
    Ok(sender)
}

/// Runs a connection until it ends, pinging the peer every [`KEEPALIVE_INTERVAL`].
/// Returning drops the connection, which fails its open streams; the pool then
/// connects anew on the next request.
async fn drive<T>(mut conn: h2::client::Connection<T, Bytes>) -> Result<(), String>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mut pings) = conn.ping_pong() else {
        return conn.await.map_err(|e| e.to_string());
    };
    let mut conn = std::pin::pin!(conn);
    loop {
        tokio::select! {
            biased;
            r = &mut conn => return r.map_err(|e| e.to_string()),
            () = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        pings
            .send_ping(h2::Ping::opaque())
            .map_err(|e| e.to_string())?;
        let pong = std::future::poll_fn(|cx| pings.poll_pong(cx));
        tokio::select! {
            biased;
            r = &mut conn => return r.map_err(|e| e.to_string()),
            answer = tokio::time::timeout(KEEPALIVE_TIMEOUT, pong) => match answer {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.to_string()),
                Err(_) => return Err(format!("no answer to a PING within {KEEPALIVE_TIMEOUT:?}")),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("wrapped")]
    struct Wrapped(#[source] h2::Error);

    #[test]
    fn a_body_error_resets_with_the_apps_own_reason() {
        let cancelled = Wrapped(h2::Error::from(Reason::CANCEL));
        assert_eq!(reset_reason(&cancelled), Reason::CANCEL);
        let other = std::io::Error::other("disk on fire");
        assert_eq!(reset_reason(&other), Reason::INTERNAL_ERROR);
    }
}
