//! What the inbound and outbound listeners share: response bodies, gRPC-aware error
//! responses, deadlines, the `x-forwarded-client-cert` header, TCP and mTLS connects,
//! and the HTTP/2 server side (the client side is `h2_pool`).
//!
//! Decisions (error mapping, deadlines) are plain functions with table tests; the I/O
//! around them is kept thin.

mod h2_body;
mod h2_pool;
mod metered_body;
mod replay_body;
pub use h2_body::H2Body;
pub use h2_pool::{Connector, H2Pool, SendError};
pub use replay_body::{ReplayBody, Replayable};

use crate::config::Protocol;
use crate::tls::UpstreamTls;
use bytes::Bytes;
use h2_body::BodyPipe;
use http::{HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body::Body;
use http_body_util::{Either, Full};
use std::future::Future;
use std::net::SocketAddr;
use std::task::Poll;
use std::time::Duration;
use tokio::net::TcpStream;

/// A response body: the upstream's stream (metered), or a small local answer.
pub type ProxyBody = Either<crate::proxy::metered_body::MeteredBody, Full<Bytes>>;

/// The header that tells the app who called (Envoy's format).
pub const XFCC: &str = "x-forwarded-client-cert";

/// Why a request could not be proxied; each maps to one gRPC status and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The policy denied the request (message names the rule).
    #[error("{0}")]
    Denied(String),
    /// No connection to the upstream (or the app) could be made.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream did not answer within the deadline.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// No valid identity: meshd fails closed.
    #[error("{0}")]
    NoIdentity(String),
    /// The gateway found no valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The gateway's rate limit for this caller is spent.
    #[error("{0}")]
    RateLimited(String),
    /// No gateway route matches the path.
    #[error("{0}")]
    NoRoute(String),
}

impl ProxyError {
    /// The gRPC status code and HTTP status for this error.
    pub fn codes(&self) -> (u32, StatusCode) {
        match self {
            ProxyError::Denied(_) => (7, StatusCode::FORBIDDEN),
            ProxyError::Unavailable(_) | ProxyError::NoIdentity(_) => {
                (14, StatusCode::SERVICE_UNAVAILABLE)
            }
            ProxyError::DeadlineExceeded(_) => (4, StatusCode::GATEWAY_TIMEOUT),
            ProxyError::Unauthenticated(_) => (16, StatusCode::UNAUTHORIZED),
            ProxyError::RateLimited(_) => (8, StatusCode::TOO_MANY_REQUESTS),
            ProxyError::NoRoute(_) => (12, StatusCode::NOT_FOUND),
        }
    }

    /// The local response: a trailers-only gRPC status for gRPC, a status code and a text
    /// body for HTTP.
    pub fn response(&self, protocol: Protocol) -> Response<ProxyBody> {
        let (grpc, http) = self.codes();
        let msg = self.to_string();
        if protocol == Protocol::Grpc {
            let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(grpc));
            if let Ok(v) = HeaderValue::from_str(&grpc_message_encode(&msg)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from(msg + "\n"))));
            *r.status_mut() = http;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            r
        }
    }
}

/// Answers locally with `err`, completing the request's record with what was sent.
pub fn respond_locally(
    mut record: crate::telemetry::RequestRecord,
    protocol: Protocol,
    err: ProxyError,
) -> Response<ProxyBody> {
    let (grpc, http) = err.codes();
    let is_grpc = protocol == Protocol::Grpc;
    record.http_status = if is_grpc { 200 } else { http.as_u16() };
    record.grpc_status = is_grpc.then_some(grpc);
    record.finish();
    err.response(protocol)
}

/// Hands a peer's response back: status from its headers (a trailers-only gRPC answer
/// carries grpc-status there), body streamed through and measured to its end.
pub fn respond_upstream(
    mut record: crate::telemetry::RequestRecord,
    resp: Response<H2Body>,
) -> Response<ProxyBody> {
    record.http_status = resp.status().as_u16();
    record.grpc_status = resp
        .headers()
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    resp.map(|b| Either::Left(crate::proxy::metered_body::MeteredBody::new(b, record)))
}

/// Percent-encodes a grpc-message value as the gRPC spec asks.
pub fn grpc_message_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Parses a `grpc-timeout` header value (`100m`, `5S`, ...).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    if v.len() < 2 || v.len() > 9 {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline of a request: the configured timeout, or the app's `grpc-timeout` when
/// it is shorter.
pub fn request_deadline(configured: Duration, headers: &HeaderMap) -> Duration {
    headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(configured, |app| app.min(configured))
}

/// `grpc-status` as a header name, made at compile time.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// [`XFCC`] as a header name, made at compile time (a `&str` key is parsed per use).
pub const XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// Replaces whatever `x-forwarded-client-cert` the caller sent with ours (`None`: removes
/// it). One `insert` drops every earlier value of the header.
pub fn set_xfcc(headers: &mut HeaderMap, value: Option<&HeaderValue>) {
    match value {
        Some(v) => {
            headers.insert(XFCC_NAME, v.clone());
        }
        None => {
            headers.remove(XFCC_NAME);
        }
    }
}

/// Builds the XFCC value the app receives: `By=<own id>;URI=<peer id>`.
pub fn xfcc_value(own: &str, peer: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("By={own};URI={peer}")).ok()
}

/// Splits a gRPC path `/pkg.Service/Method` into service and method.
pub fn grpc_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (svc, method) = rest.split_once('/')?;
    (!svc.is_empty() && !method.is_empty() && !method.contains('/')).then_some((svc, method))
}

/// Whether a request is gRPC (by content-type).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// Opens a TCP connection with Nagle off.
pub async fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// A fixed server name: peers are verified by SPIFFE ID, never by hostname.
pub fn spiffe_server_name() -> rustls_pki_types::ServerName<'static> {
    rustls_pki_types::ServerName::try_from("meshd.spiffe.invalid").expect("static name is valid")
}

/// Opens an mTLS connection to an upstream endpoint with the current client config.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: &UpstreamTls,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
    let config = tls
        .config
        .load_full()
        .ok_or_else(|| "no valid SVID to connect with".to_string())?;
    let tcp = tcp_connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match connector.connect(spiffe_server_name(), tcp).await {
        Ok(s) => Ok(s),
        Err(e) => {
            metrics::counter!("meshd_tls_handshake_failures_total", "direction" => "outbound", "reason" => crate::tls::failure_reason(&e)).increment(1);
            Err(format!("TLS handshake with {addr}: {e}"))
        }
    }
}

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

/// Copies bytes both ways, counting them in `meshd_tcp_bytes_total`.
pub async fn pipe<A, B>(mut a: A, mut b: B, direction: &'static str) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    metrics::counter!("meshd_tcp_connections_opened_total", "direction" => direction).increment(1);
    let (rx, tx) = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 << 10, 64 << 10)
        .await
        .unwrap_or((0, 0));
    metrics::counter!("meshd_tcp_bytes_total", "direction" => direction, "dir" => "rx")
        .increment(rx);
    metrics::counter!("meshd_tcp_bytes_total", "direction" => direction, "dir" => "tx")
        .increment(tx);
    metrics::counter!("meshd_tcp_connections_closed_total", "direction" => direction).increment(1);
    (rx, tx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let table = [
            ("100m", Some(Duration::from_millis(100))),
            ("5S", Some(Duration::from_secs(5))),
            ("1M", Some(Duration::from_secs(60))),
            ("1H", Some(Duration::from_secs(3600))),
            ("250u", Some(Duration::from_micros(250))),
            ("7n", Some(Duration::from_nanos(7))),
            ("S", None),
            ("12x", None),
            ("1234567890S", None),
            ("-1S", None),
        ];
        for (v, want) in table {
            assert_eq!(parse_grpc_timeout(v), want, "{v}");
        }
    }

    #[test]
    fn deadline_takes_the_shorter() {
        let mut h = HeaderMap::new();
        let five = Duration::from_secs(5);
        assert_eq!(request_deadline(five, &h), five);
        h.insert("grpc-timeout", HeaderValue::from_static("200m"));
        assert_eq!(request_deadline(five, &h), Duration::from_millis(200));
        h.insert("grpc-timeout", HeaderValue::from_static("60S"));
        assert_eq!(request_deadline(five, &h), five);
    }

    #[test]
    fn errors_map_to_codes() {
        let table = [
            (ProxyError::Denied("x".into()), 7, 403),
            (ProxyError::Unavailable("x".into()), 14, 503),
            (ProxyError::NoIdentity("x".into()), 14, 503),
            (ProxyError::DeadlineExceeded("x".into()), 4, 504),
            (ProxyError::Unauthenticated("x".into()), 16, 401),
            (ProxyError::RateLimited("x".into()), 8, 429),
            (ProxyError::NoRoute("x".into()), 12, 404),
        ];
        for (e, grpc, http) in table {
            assert_eq!(e.codes(), (grpc, StatusCode::from_u16(http).unwrap()));
            let r = e.response(Protocol::Grpc);
            assert_eq!(r.headers()["grpc-status"], grpc.to_string().as_str());
            assert_eq!(e.response(Protocol::Http).status().as_u16(), http);
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message_encode("denied by rule \"a\""),
            "denied by rule \"a\""
        );
        assert_eq!(grpc_message_encode("100%\n"), "100%25%0A");
    }
}
