//! The byte pipe of a `tcp` listener: once the connection is authorized (inbound) or
//! connected (outbound), bytes flow both ways untouched.
//!
//! Flow: count the connection opened -> copy both ways until either side ends -> count
//! the bytes each way and the connection closed (`meshd_tcp_*`).

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
