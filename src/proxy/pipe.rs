//! The byte pipe of a `tcp` listener: once the connection is authorized (inbound) or
//! connected (outbound), bytes flow both ways untouched.
//!
//! Flow: copy both ways until either side ends -> count the bytes each way
//! (`meshd_tcp_bytes_total`; the listener's `ConnectionGate` counts the connection).

/// Copies bytes both ways, counting them in `meshd_tcp_bytes_total`.
pub async fn pipe<A, B>(mut a: A, mut b: B, direction: &'static str) -> (u64, u64)
where
    A: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    B: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let (rx, tx) = tokio::io::copy_bidirectional_with_sizes(&mut a, &mut b, 64 << 10, 64 << 10)
        .await
        .unwrap_or((0, 0));
    metrics::counter!("meshd_tcp_bytes_total", "direction" => direction, "dir" => "rx")
        .increment(rx);
    metrics::counter!("meshd_tcp_bytes_total", "direction" => direction, "dir" => "tx")
        .increment(tx);
    (rx, tx)
}
