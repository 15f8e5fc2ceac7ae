//! The HTTP/2 client side of both listeners: one pooled connection per peer (the local
//! app inbound, an upstream endpoint outbound), on the `h2` crate directly.
//!
//! Flow: [`H2Pool::sender`] hands out a handle to the live connection, connecting once
//! (single-flight) when there is none or it stopped taking streams (GOAWAY, error) ->
//! [`H2Pool::send_via`] sends the request headers on it; a body that is not complete yet
//! is piped into the stream, in the caller's task when it is already there and in a task
//! of its own otherwise -> the caller awaits the response headers; the response body is
//! an [`H2Body`] that returns flow-control credit as it is read. A task per
//! connection drives it and pings the peer every 30 s, closing the connection when no
//! answer comes within 10 s.
//!
//! Why not hyper's client: it hands each request to the connection's task over a
//! channel and spawns a task per request that waits for the response and passes it back
//! over a oneshot. That was about 9 % of a sidecar's instructions per request
//! (callgrind; `benches/e2e/README.md`, optimisation log).

use crate::proxy::h2_body::{BodyPipe, H2Body};
use crate::proxy::ConnectError;
use crate::tls::UpstreamTls;
use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use http::{Request, Response};
use http_body::Body;
use std::error::Error as StdError;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
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
    pub async fn sender(&self) -> Result<SendRequest<Bytes>, ConnectError> {
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
    pub async fn send<B>(&self, req: Request<B>) -> Result<Response<H2Body>, SendError>
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
    ) -> Result<Response<H2Body>, SendError>
    where
        B: Body<Data = Bytes> + Send + Unpin + 'static,
        B::Error: Into<Box<dyn StdError + Send + Sync>>,
    {
        if !takes_streams(&mut sender) {
            // `sender` connects anew unless another request already did.
            sender = self.sender().await?;
        }
        let (head, body) = req.into_parts();
        let eos = body.is_end_stream();
        // An error here means h2 did not open the stream: nothing was sent.
        let (response, stream) = sender
            .send_request(Request::from_parts(head, ()), eos)
            .map_err(|e| SendError::NotProcessed(e.to_string()))?;
        drop(sender);
        let mut unanswered = None;
        if !eos {
            let mut pipe = BodyPipe::new(body, stream);
            // Most bodies (a unary gRPC message) are already here: send them now,
            // without a task.
            let sent = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx)));
            if sent.await.is_pending() {
                unanswered = Some(pipe.reset_unless_answered());
                tokio::spawn(pipe);
            }
        }
        let resp = response.await.map_err(SendError::from_stream)?;
        if let Some(guard) = unanswered {
            guard.answered();
        }
        Ok(resp.map(H2Body::new))
    }
}

/// Why a request got no response headers.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// The request never reached the peer's application: no connection could be made,
    /// the stream was never opened, or the peer refused it (RST_STREAM REFUSED_STREAM, or
    /// a GOAWAY whose last stream ID is below it; RFC 9113 §8.7). Safe to send again,
    /// whatever the method.
    #[error("{0}")]
    NotProcessed(String),
    /// The stream failed after it was sent: the peer may have processed it.
    #[error("{0}")]
    Failed(String),
}

impl From<ConnectError> for SendError {
    /// A request that found no connection never left.
    fn from(e: ConnectError) -> SendError {
        SendError::NotProcessed(e.to_string())
    }
}

impl SendError {
    /// Classifies the error of a stream that h2 opened.
    fn from_stream(e: h2::Error) -> SendError {
        if not_processed(&e) {
            SendError::NotProcessed(e.to_string())
        } else {
            SendError::Failed(e.to_string())
        }
    }
}

/// Whether a stream error says the peer did not process the stream. h2 gives a remote
/// GOAWAY error only to the streams above the frame's last stream ID (and to streams
/// opened after it); streams below it that die with the connection get an I/O error.
fn not_processed(e: &h2::Error) -> bool {
    e.is_remote()
        && (e.is_go_away() || (e.is_reset() && e.reason() == Some(h2::Reason::REFUSED_STREAM)))
}

/// Whether the connection takes new streams: no GOAWAY, no error, not closed. A fresh
/// handle has no stream pending open, so h2 answers without waiting.
fn takes_streams(sender: &mut SendRequest<Bytes>) -> bool {
    let mut cx = Context::from_waker(std::task::Waker::noop());
    matches!(sender.poll_ready(&mut cx), Poll::Ready(Ok(())))
}

/// The client settings: the windows and frame size of meshd's server side, and the
/// defaults hyper's client used for the rest (no server push).
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

async fn connect(connector: &Connector) -> Result<SendRequest<Bytes>, ConnectError> {
    let addr = connector.addr();
    match connector {
        Connector::Plain(_) => {
            let tcp = crate::proxy::tcp_connect(addr)
                .await
                .map_err(|error| ConnectError::Tcp { addr, error })?;
            handshake(tcp, addr).await
        }
        Connector::Tls { tls, .. } => {
            let stream = crate::proxy::tls_connect(addr, tls).await?;
            handshake(stream, addr).await
        }
    }
}

async fn handshake<T>(io: T, addr: SocketAddr) -> Result<SendRequest<Bytes>, ConnectError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = builder()
        .handshake(io)
        .await
        .map_err(|error| ConnectError::Http2 { addr, error })?;
    tokio::spawn(async move {
        if let Err(e) = drive(conn).await {
            tracing::debug!("HTTP/2 connection to {addr} closed: {e}");
        }
    });
    Ok(sender)
}

/// Why a pooled connection ended (logged at debug).
#[derive(Debug, thiserror::Error)]
enum ConnectionEnded {
    /// The connection failed: I/O, a protocol error, a GOAWAY with an error code.
    #[error("{0}")]
    H2(#[from] h2::Error),
    /// The peer did not answer a keepalive PING within [`KEEPALIVE_TIMEOUT`].
    #[error("no answer to a PING within {:?}", KEEPALIVE_TIMEOUT)]
    PingUnanswered,
}

/// Runs a connection until it ends, pinging the peer every [`KEEPALIVE_INTERVAL`].
/// Returning drops the connection, which fails its open streams; the pool then
/// connects anew on the next request.
async fn drive<T>(mut conn: h2::client::Connection<T, Bytes>) -> Result<(), ConnectionEnded>
where
    T: AsyncRead + AsyncWrite + Unpin,
{
    let Some(mut pings) = conn.ping_pong() else {
        return Ok(conn.await?);
    };
    let mut conn = std::pin::pin!(conn);
    loop {
        tokio::select! {
            biased;
            r = &mut conn => return Ok(r?),
            () = tokio::time::sleep(KEEPALIVE_INTERVAL) => {}
        }
        pings.send_ping(h2::Ping::opaque())?;
        let pong = std::future::poll_fn(|cx| pings.poll_pong(cx));
        tokio::select! {
            biased;
            r = &mut conn => return Ok(r?),
            answer = tokio::time::timeout(KEEPALIVE_TIMEOUT, pong) => match answer {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(ConnectionEnded::PingUnanswered),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Empty;
    use tokio::net::TcpListener;

    /// An h2c peer on loopback answering its streams in turn: `Some(reason)` resets the
    /// stream with that reason, `None` (and any stream after the list) answers 200.
    async fn answering(answers: Vec<Option<h2::Reason>>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut conn = h2::server::handshake(tcp).await.unwrap();
            let mut answers = answers.into_iter();
            while let Some(Ok((_req, mut respond))) = conn.accept().await {
                match answers.next().flatten() {
                    Some(reason) => respond.send_reset(reason),
                    None => {
                        let _ = respond.send_response(Response::new(()), true);
                    }
                }
            }
        });
        addr
    }

    /// An h2c peer that says GOAWAY (last stream 0) on every connection, before it
    /// processes any stream.
    async fn going_away() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(mut conn) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    conn.abrupt_shutdown(h2::Reason::NO_ERROR);
                    while let Some(Ok(_)) = conn.accept().await {}
                });
            }
        });
        addr
    }

    fn post(addr: SocketAddr) -> Request<Empty<Bytes>> {
        Request::post(format!("http://{addr}/payment.v1.PaymentService/Pay"))
            .body(Empty::new())
            .unwrap()
    }

    // Story: a POST may be sent again only when the peer certainly did not process it.
    // A stream the peer refuses (REFUSED_STREAM), one sent to a peer going away, and one
    // for which no connection could be made were not processed; a stream reset for
    // another reason may have been, and a healthy stream is answered.
    #[tokio::test]
    async fn only_streams_the_peer_never_processed_are_not_processed() {
        let addr = answering(vec![
            Some(h2::Reason::REFUSED_STREAM),
            Some(h2::Reason::INTERNAL_ERROR),
        ])
        .await;
        let pool = H2Pool::new(Connector::Plain(addr));
        let refused = pool.send(post(addr)).await;
        assert!(
            matches!(refused, Err(SendError::NotProcessed(_))),
            "{refused:?}"
        );
        let reset = pool.send(post(addr)).await;
        assert!(matches!(reset, Err(SendError::Failed(_))), "{reset:?}");
        assert_eq!(pool.send(post(addr)).await.unwrap().status(), 200);

        let addr = going_away().await;
        let pool = H2Pool::new(Connector::Plain(addr));
        let gone = pool.send(post(addr)).await;
        assert!(matches!(gone, Err(SendError::NotProcessed(_))), "{gone:?}");

        let closed = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        let pool = H2Pool::new(Connector::Plain(addr));
        let unreachable = pool.send(post(addr)).await;
        assert!(
            matches!(unreachable, Err(SendError::NotProcessed(_))),
            "{unreachable:?}"
        );
    }
}
