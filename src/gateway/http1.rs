//! HTTP/1.1 clients at the gateway: each connection's requests go, over an in-memory
//! pipe, to the same HTTP/2 handling an h2 client gets.
//!
//! Flow: hyper's HTTP/1.1 server reads a request (within `connections.header_timeout`)
//! -> hop-by-hop headers dropped, the Host made the authority -> sent on an HTTP/2
//! client connection over a duplex pipe to `proxy::serve_h2` -> the answer back.

use crate::proxy::{self, H2Body, Limit, ProxyBody, Watched};
use http::{Request, Response};

/// Headers of HTTP/1.1 that mean nothing (or are forbidden) in HTTP/2.
const HOP_BY_HOP: [&str; 6] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "host",
];

/// Serves an HTTP/1.1 client (one that did not offer `h2`): its requests are sent, over
/// an in-memory pipe, to the same HTTP/2 handling an h2 client gets, so every check and
/// the outbound see one kind of request. Costs a copy of each body; edge clients only.
pub(super) async fn serve_http1<I, H, F>(
    io: I,
    handle: H,
    stop: tokio_util::sync::CancellationToken,
    watched: Watched<'_>,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: Fn(Request<H2Body>) -> F + Send + 'static,
    F: std::future::Future<Output = Response<ProxyBody>> + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
    let (near, far) = tokio::io::duplex(64 << 10);
    tokio::spawn(proxy::serve_h2(far, handle, stop.clone(), None));
    let handshake = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, hyper::body::Incoming>(TokioIo::new(near))
        .await;
    let (sender, conn) = match handshake {
        Ok(pair) => pair,
        Err(e) => {
            tracing::warn!("gateway: HTTP/1.1 bridge: {e}");
            return;
        }
    };
    tokio::spawn(conn);
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        let mut sender = sender.clone();
        async move {
            // HTTP/2 wants the authority in the URI; HTTP/1.1 sends it as Host.
            let host = req
                .headers()
                .get(http::header::HOST)
                .and_then(|h| h.to_str().ok())
                .unwrap_or("localhost")
                .to_string();
            let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
            if let Ok(uri) = format!("https://{host}{path}").parse() {
                *req.uri_mut() = uri;
            }
            let headers = req.headers_mut();
            for name in HOP_BY_HOP {
                headers.remove(name);
            }
            if headers
                .get(http::header::TE)
                .is_some_and(|v| v != "trailers")
            {
                headers.remove(http::header::TE);
            }
            sender.send_request(req).await
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    if let Some(limits) = watched.gate.limits() {
        // hyper runs this timer whenever it waits for a request's headers, the next
        // request on a kept-alive connection included: a slow or idle client is closed.
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_timeout);
    }
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        ended = conn.as_mut() => ended,
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if ended.is_err_and(|e| e.is_timeout()) {
        watched.gate.hit(Limit::HeaderTimeout, watched.remote);
    }
}
