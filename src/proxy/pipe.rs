//! The byte pipe of a `tcp` listener: once the connection is authorized (inbound) or
//! connected (outbound), bytes flow both ways untouched.
//!
//! Flow, each direction on its own: read what the reader has (into a buffer allocated
//! for the read, not zeroed, the bytes half a page in) -> write it all to the writer ->
//! read again until the reader has nothing -> flush the writer and give the buffer back
//! -> at the reader's end, flush and shut the writer down (a half-close is passed on)
//! -> when both directions are done, or either fails, count the bytes each way
//! (`meshd_tcp_bytes_total`; the listener's `ConnectionGate` counts the connection).
//!
//! A direction holds a buffer only while it has bytes on the way: an idle connection
//! holds none. tokio's `copy_bidirectional` allocated and zeroed both directions' 64 KiB
//! at the start and kept them for the connection's life: 128 KiB per held connection,
//! and 32 pages faulted in again for each new one once the worker had given them back
//! (90 % of a tcp inbound's page faults per handshake; optimisation log, 2026-12-07,
//! night).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite};

/// The most one read takes in, and the buffer a direction holds while bytes are on
/// the way (256 KiB).
///
/// Each write to a loopback socket costs the kernel a delivery and a wake-up of the
/// reader, whatever its size; a TLS reader hands out a full buffer's worth of records per
/// read when they are there. With 64 KiB, a tcp inbound spent 10-16 % more CPU per GB
/// and moved 12-16 % fewer bytes a second (optimisation log, 2026-12-08). The buffer is
/// held only while bytes flow, so an idle connection still holds none; Envoy's default
/// per-connection buffer limit is 1 MiB.
pub const READ_LEN: usize = 256 << 10;

/// Where a direction's bytes start in its buffer: 2 KiB in, half a page away from where
/// the allocator put the buffer.
///
/// rustls copies the plaintext into a record buffer of its own (allocated for the
/// record, 5 header bytes in) before sealing it, and the inbound copies out of one.
/// On AMD Zen, glibc's `memcpy` (`rep movsb` for copies over 4 KiB) runs at 2 GB/s
/// instead of 50 when the destination sits 1-63 bytes after the source modulo 4 KiB,
/// and mimalloc puts both buffers at the same offset in a page: every 16 KiB record's
/// copy was that slow case, a third of a tcp outbound's CPU. Half a page away, neither
/// direction's copy is near it (optimisation log, 2026-12-07, late).
const START: usize = 2 << 10;

/// Copies bytes both ways, counting them in `meshd_tcp_bytes_total`.
///
/// Borrows both streams: the caller's future owns them once. Taken by value, each
/// stream would sit twice in a held connection's task, once as the caller's moved-from
/// local and once in this future (1.2 KB for a TLS stream).
pub async fn pipe<A, B>(a: &mut A, b: &mut B, direction: &'static str) -> (u64, u64)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let mut a_to_b = Half::default();
    let mut b_to_a = Half::default();
    // An error in either direction ends both (the connection is torn down); the bytes
    // moved until then are counted.
    let _ = std::future::poll_fn(|cx| {
        let there = a_to_b.poll_copy(cx, &mut *a, &mut *b)?;
        let back = b_to_a.poll_copy(cx, &mut *b, &mut *a)?;
        match (there, back) {
            (Poll::Ready(()), Poll::Ready(())) => Poll::Ready(Ok::<(), io::Error>(())),
            _ => Poll::Pending,
        }
    })
    .await;
    let (rx, tx) = (a_to_b.moved, b_to_a.moved);
    metrics::counter!("meshd_tcp_bytes_total", "direction" => direction, "dir" => "rx")
        .increment(rx);
    metrics::counter!("meshd_tcp_bytes_total", "direction" => direction, "dir" => "tx")
        .increment(tx);
    (rx, tx)
}

/// One direction of the pipe.
#[derive(Debug, Default)]
struct Half {
    /// Bytes read and not written yet are `buf[at..]`; no allocation while the reader is
    /// idle. While allocated, `buf` holds [`START`] zeroed bytes and then up to
    /// [`READ_LEN`] read ones, so the bytes always start at the same place.
    buf: Vec<u8>,
    /// Where the bytes not written yet start in `buf`.
    at: usize,
    /// Bytes written to the writer.
    moved: u64,
    /// Whether bytes were written since the last flush.
    unflushed: bool,
    /// The reader has ended: what is left is to write, flush and shut down.
    read_done: bool,
    /// The writer is shut down: this direction is over.
    finished: bool,
}

impl Half {
    fn poll_copy<R, W>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        w: &mut W,
    ) -> Poll<io::Result<()>>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        if self.finished {
            return Poll::Ready(Ok(()));
        }
        loop {
            while self.at < self.buf.len() {
                let n = ready!(Pin::new(&mut *w).poll_write(cx, &self.buf[self.at..]))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.at += n;
                self.moved += n as u64;
                self.unflushed = true;
            }
            if self.read_done {
                ready!(self.poll_flush(cx, w))?;
                ready!(Pin::new(&mut *w).poll_shutdown(cx))?;
                self.give_back();
                self.finished = true;
                return Poll::Ready(Ok(()));
            }
            if self.buf.capacity() == 0 {
                self.buf.reserve_exact(START + READ_LEN);
            }
            self.buf.resize(START, 0);
            self.at = START;
            match tokio_util::io::poll_read_buf(Pin::new(&mut *r), cx, &mut self.buf) {
                Poll::Pending => {
                    // Nothing on the way: the buffer goes back until the reader has more.
                    self.give_back();
                    ready!(self.poll_flush(cx, w))?;
                    return Poll::Pending;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(0)) => self.read_done = true,
                Poll::Ready(Ok(_)) => {}
            }
        }
    }

    /// Frees the buffer; the next read allocates one again.
    fn give_back(&mut self) {
        self.buf = Vec::new();
        self.at = 0;
    }

    fn poll_flush<W: AsyncWrite + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        w: &mut W,
    ) -> Poll<io::Result<()>> {
        if self.unflushed {
            ready!(Pin::new(&mut *w).poll_flush(cx))?;
            self.unflushed = false;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt};

    // A client and a server on either side of the pipe talk in turn and each closes its
    // side: every byte arrives, each close is passed on, and the counts are right.
    #[tokio::test]
    async fn bytes_and_half_closes_pass_both_ways() {
        let (mut client, mut a) = duplex(1 << 16);
        let (mut b, mut server) = duplex(1 << 16);
        let piping = tokio::spawn(async move { pipe(&mut a, &mut b, "test").await });
        client.write_all(b"hello").await.unwrap();
        client.shutdown().await.unwrap();
        let mut got = Vec::new();
        server.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, b"hello");
        server.write_all(b"world!").await.unwrap();
        server.shutdown().await.unwrap();
        let mut back = Vec::new();
        client.read_to_end(&mut back).await.unwrap();
        assert_eq!(back, b"world!");
        assert_eq!(piping.await.unwrap(), (5, 6));
    }

    // Megabytes both ways at once through small socket buffers: the writer is often
    // full, the bytes wait in the pipe's buffer, and none is lost or reordered.
    #[tokio::test]
    async fn backpressure_loses_nothing() {
        let (client, mut a) = duplex(997);
        let (mut b, server) = duplex(1500);
        let piping = tokio::spawn(async move { pipe(&mut a, &mut b, "test").await });
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let (mut cr, cw) = tokio::io::split(client);
        let (mut sr, sw) = tokio::io::split(server);
        let send = |mut w: tokio::io::WriteHalf<tokio::io::DuplexStream>| {
            let data = data.clone();
            tokio::spawn(async move {
                w.write_all(&data).await.unwrap();
                w.shutdown().await.unwrap();
            })
        };
        let (c_send, s_send) = (send(cw), send(sw));
        let mut at_server = Vec::new();
        let mut at_client = Vec::new();
        let (r1, r2) = tokio::join!(
            sr.read_to_end(&mut at_server),
            cr.read_to_end(&mut at_client)
        );
        r1.unwrap();
        r2.unwrap();
        c_send.await.unwrap();
        s_send.await.unwrap();
        assert!(at_server == data, "client -> server bytes differ");
        assert!(at_client == data, "server -> client bytes differ");
        let n = data.len() as u64;
        assert_eq!(piping.await.unwrap(), (n, n));
    }

    // A direction whose reader has nothing holds no buffer; one with bytes its writer
    // cannot take yet keeps them.
    #[tokio::test]
    async fn an_idle_direction_holds_no_buffer() {
        let (_client, mut a) = duplex(64);
        let (mut b, _server) = duplex(8);
        let mut half = Half::default();
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(half.poll_copy(cx, &mut a, &mut b))).await;
        assert!(polled.is_pending());
        assert_eq!(half.buf.capacity(), 0);
        let (mut client, mut a) = duplex(64);
        client.write_all(&[7u8; 40]).await.unwrap();
        let polled =
            std::future::poll_fn(|cx| Poll::Ready(half.poll_copy(cx, &mut a, &mut b))).await;
        assert!(polled.is_pending());
        assert_eq!((half.buf.len() - half.at, half.moved), (32, 8));
        // The bytes were read half a page into the buffer (see START); 8 are written.
        assert_eq!(half.at, START + 8);
    }
}
