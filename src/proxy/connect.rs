//! Connections meshd opens: plain TCP (to the app) and mutual TLS (to an upstream).
//!
//! Flow: [`tcp_connect`] opens the socket with Nagle off -> for an upstream,
//! [`tls_connect`] takes the current client config (none: no SVID, no connection) and
//! handshakes under the slot's server name (the fixed `tls::spiffe_server_name` for a SPIFFE
//! peer, whose verifier checks its SPIFFE ID; `sni` for a server-only upstream, checked
//! in its certificate), and a failed handshake is counted by reason. Every failure is a
//! [`ConnectError`] naming the address (the pool adds a failed HTTP/2 handshake).

use crate::tls::UpstreamTls;
use std::net::SocketAddr;
use tokio::net::TcpStream;

/// Opens a TCP connection with Nagle off.
pub async fn tcp_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Why no connection to a peer could be made.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// meshd has no valid SVID, so no client TLS config: it fails closed.
    #[error("no valid SVID to connect with")]
    NoSvid,
    /// The TCP connect failed (refused, unreachable, ...).
    #[error("connect {addr}: {error}")]
    Tcp {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The TLS handshake failed (counted in `meshd_tls_handshake_failures_total`).
    #[error("TLS handshake with {addr}: {error}")]
    Tls {
        addr: SocketAddr,
        error: std::io::Error,
    },
    /// The HTTP/2 handshake on a new pooled connection failed.
    #[error("HTTP/2 handshake with {addr}: {error}")]
    Http2 { addr: SocketAddr, error: h2::Error },
}

/// Opens an mTLS connection to an upstream endpoint with the current client config.
pub async fn tls_connect(
    addr: SocketAddr,
    tls: &UpstreamTls,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ConnectError> {
    let config = tls.config.load_full().ok_or(ConnectError::NoSvid)?;
    let tcp = tcp_connect(addr)
        .await
        .map_err(|error| ConnectError::Tcp { addr, error })?;
    let connector = tokio_rustls::TlsConnector::from(config);
    match connector.connect(tls.server_name.clone(), tcp).await {
        Ok(s) => Ok(s),
        Err(error) => {
            metrics::counter!("meshd_tls_handshake_failures_total", "direction" => "outbound", "reason" => crate::tls::failure_reason(&error)).increment(1);
            Err(ConnectError::Tls { addr, error })
        }
    }
}
