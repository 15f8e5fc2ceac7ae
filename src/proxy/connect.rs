//! Connections meshd opens: plain TCP (to the app) and mutual TLS (to an upstream).
//!
//! Flow: [`tcp_connect`] opens the socket with Nagle off -> for an upstream,
//! [`tls_connect`] takes the current client config (none: no SVID, no connection) and
//! handshakes under the fixed [`spiffe_server_name`]; the verifier checks the peer's
//! SPIFFE ID, and a failed handshake is counted by reason.

use crate::tls::UpstreamTls;
use std::net::SocketAddr;
use tokio::net::TcpStream;

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
