//! The inbound's TCP stream as its TLS handshake sees it.
//!
//! A client may finish its handshake and close at once (a TLS probe, `openssl s_time
//! -new`). The TLS 1.3 session tickets rustls sends after the client's Finished then meet
//! the client's reset, and tokio-rustls turns that into an error of the whole accept:
//! counted as a failed handshake (reason `io`) although the client was verified and done.
//!
//! Flow: while the handshake runs, a peer reset (ECONNRESET, EPIPE) is recorded; a write
//! that meets it is reported as written and a read as the end of the stream. If the client
//! had finished, the accept completes and the inbound sees [`HandshakeIo::peer_gone`]; if
//! it had not, rustls meets the end of the stream and the handshake fails as `truncated`.
//! [`HandshakeIo::handshake_over`] ends this: from then on every error reaches the caller.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// A stream whose peer may reset it while the TLS handshake runs (see the module docs).
#[derive(Debug)]
pub struct HandshakeIo<T> {
    /// The accepted TCP stream.
    io: T,
    /// Whether a reset is still recorded rather than returned: until the handshake is over.
    in_handshake: bool,
    /// Whether the peer reset the stream during the handshake.
    peer_gone: bool,
}

impl<T> HandshakeIo<T> {
    pub fn new(io: T) -> HandshakeIo<T> {
        HandshakeIo {
            io,
            in_handshake: true,
            peer_gone: false,
        }
    }

    /// Whether the peer reset the stream while the handshake ran.
    pub fn peer_gone(&self) -> bool {
        self.peer_gone
    }

    /// Ends the handshake's leniency: later errors reach the caller as they are.
    pub fn handshake_over(&mut self) {
        self.in_handshake = false;
    }

    /// Whether `r` is a reset to record rather than return.
    fn absorbs<R>(&mut self, r: &Poll<io::Result<R>>) -> bool {
        let reset = matches!(r, Poll::Ready(Err(e)) if is_reset(e));
        if reset && self.in_handshake {
            self.peer_gone = true;
            return true;
        }
        false
    }
}

/// Whether an I/O error says the peer reset the connection.
fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

impl<T: AsyncRead + Unpin> AsyncRead for HandshakeIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.absorbs(&r) {
            return Poll::Ready(Ok(())); // nothing read: the end of the stream
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HandshakeIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write(cx, buf);
        if this.absorbs(&r) {
            return Poll::Ready(Ok(buf.len()));
        }
        r
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        if this.absorbs(&r) {
            return Poll::Ready(Ok(bufs.iter().map(|b| b.len()).sum()));
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let r = Pin::new(&mut this.io).poll_flush(cx);
        if this.absorbs(&r) {
            return Poll::Ready(Ok(()));
        }
        r
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A connected pair whose far end has reset the connection (SO_LINGER 0, closed).
    async fn reset_by_peer() -> TcpStream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let near = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (far, _) = listener.accept().await.unwrap();
        far.set_zero_linger().unwrap();
        drop(far);
        near
    }

    // Story: during the handshake a peer's reset is recorded, writes look written and
    // reads see the end of the stream; once the handshake is over the same reset is an
    // error again, so a TCP pipe or HTTP/2 connection sees its peer go away.
    #[tokio::test]
    async fn a_reset_is_absorbed_only_while_the_handshake_runs() {
        let mut io = HandshakeIo::new(reset_by_peer().await);
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
        assert_eq!(io.write(b"tickets").await.unwrap(), 7);
        assert!(io.peer_gone());

        let mut io = HandshakeIo::new(reset_by_peer().await);
        io.handshake_over();
        assert!(
            io.read(&mut buf).await.is_err(),
            "the reset reaches the caller"
        );
        assert!(io.write(b"data").await.is_err());
        assert!(!io.peer_gone());
    }
}
