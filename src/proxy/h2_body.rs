//! Bodies on HTTP/2 streams, for both listeners' server side and the pool's client side.
//!
//! Flow: a body read from a stream is an [`H2Body`] (the app's request on a listener, a
//! peer's response in the pool), which gives each data frame's bytes back to the peer's
//! flow-control window as it is read. A body to write into a stream goes through a
//! [`BodyPipe`] (a request body upstream, a response body back to the caller), which
//! waits for the peer's window before each data frame and resets the stream with the
//! body's own reason when it fails.

use bytes::Bytes;
use futures::channel::oneshot;
use h2::{Reason, RecvStream, SendStream};
use http_body::{Body, Frame};
use std::error::Error as StdError;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};

/// Tells a body pipe running in its own task to reset the stream when the caller gave
/// up before the response came (deadline, the app went away); dropped unsent once the
/// response is there.
pub struct ResetUnlessAnswered(Option<oneshot::Sender<()>>);

impl ResetUnlessAnswered {
    /// The response came: the body goes on to its end.
    pub fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for ResetUnlessAnswered {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

/// Why a body was not sent to its end (logged at debug).
#[derive(Debug, thiserror::Error)]
enum BodyPipeError {
    /// The peer reset the stream.
    #[error("peer reset the stream: {0}")]
    PeerReset(Reason),
    /// The stream or its connection failed.
    #[error("{0}")]
    Stream(#[from] h2::Error),
    /// h2 closed the stream before the body was sent.
    #[error("stream closed while sending")]
    Closed,
    /// The body itself failed (the stream was reset with its reason).
    #[error("{0}")]
    Body(Box<dyn StdError + Send + Sync>),
}

/// The largest first data frame handed to h2 without waiting for send capacity.
const FIRST_FRAME_EAGER: usize = 16 << 10;

/// Copies a body into its HTTP/2 stream, frame by frame, waiting for the peer's
/// flow-control window before each data frame (as hyper's `PipeToSendStream`), except a
/// small first one (see [`FIRST_FRAME_EAGER`] and `pump`).
pub struct BodyPipe<B> {
    body: B,
    stream: SendStream<Bytes>,
    /// A data frame read from the body, waiting for send capacity; with its end flag.
    waiting: Option<(Bytes, bool)>,
    /// Whether a data frame was sent already: only the first may skip the wait.
    sent_data: bool,
    /// Fires when the caller stopped waiting for the response (see [`ResetUnlessAnswered`]).
    cancel: Option<oneshot::Receiver<()>>,
}

impl<B> BodyPipe<B> {
    pub fn new(body: B, stream: SendStream<Bytes>) -> BodyPipe<B> {
        BodyPipe {
            body,
            stream,
            waiting: None,
            sent_data: false,
            cancel: None,
        }
    }

    /// For a pipe about to run in its own task: it resets its stream if the returned
    /// guard is dropped before [`ResetUnlessAnswered::answered`].
    pub fn reset_unless_answered(&mut self) -> ResetUnlessAnswered {
        let (tx, rx) = oneshot::channel();
        self.cancel = Some(rx);
        ResetUnlessAnswered(Some(tx))
    }
}

impl<B> BodyPipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<Box<dyn StdError + Send + Sync>>,
{
    fn pump(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BodyPipeError>> {
        loop {
            // Registered first, so that a reset wakes the task while it waits below.
            if let Poll::Ready(reason) = self.stream.poll_reset(cx) {
                return Poll::Ready(Err(match reason {
                    Ok(reason) => BodyPipeError::PeerReset(reason),
                    Err(e) => BodyPipeError::Stream(e),
                }));
            }
            if self.waiting.is_some() {
                while self.stream.capacity() == 0 {
                    match ready!(self.stream.poll_capacity(cx)) {
                        Some(Ok(0)) => {}
                        Some(Ok(_)) => break,
                        Some(Err(e)) => return Poll::Ready(Err(e.into())),
                        None => return Poll::Ready(Err(BodyPipeError::Closed)),
                    }
                }
                let Some((data, eos)) = self.waiting.take() else {
                    continue;
                };
                self.sent_data = true;
                self.stream.send_data(data, eos)?;
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
                        // A small first frame (a unary gRPC message) goes to h2 at once,
                        // which buffers it until the stream has capacity. h2 gives none
                        // to a client stream whose HEADERS are still queued, so waiting
                        // here sent the headers and the data in two flushes: two TLS
                        // records, two writes, and a second wake-up of the peer. The
                        // frame is held either way, and the next one waits as usual.
                        let eager = !self.sent_data && data.len() <= FIRST_FRAME_EAGER;
                        if data.is_empty() || eager {
                            self.sent_data |= eager;
                            self.stream.send_data(data, eos)?;
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
                            self.stream.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: Box<dyn StdError + Send + Sync> = e.into();
                    self.stream.send_reset(reset_reason(&*e));
                    return Poll::Ready(Err(BodyPipeError::Body(e)));
                }
                None => {
                    self.stream.send_data(Bytes::new(), true)?;
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

/// A body read from an HTTP/2 stream: data frames, then trailers; each data frame read
/// gives its bytes back to the peer's flow-control window.
#[derive(Debug)]
pub struct H2Body {
    /// The stream read from; none for a body made in-process.
    recv: Option<RecvStream>,
    /// A body made in-process (the gateway's transcoded JSON call), sent as one frame.
    fixed: Option<Bytes>,
    /// A body made in-process frame by frame (the gateway's streamed JSON answer); it
    /// ends when the sender is dropped.
    piped: Option<tokio::sync::mpsc::Receiver<Frame<Bytes>>>,
    /// All data frames were read; trailers come next.
    data_done: bool,
    /// The gateway's `max_request_body`: the bytes still allowed, and where to tell that
    /// the body went past them.
    cap: Option<(u64, Arc<AtomicBool>)>,
}

impl H2Body {
    pub fn new(recv: RecvStream) -> H2Body {
        H2Body {
            recv: Some(recv),
            fixed: None,
            piped: None,
            data_done: false,
            cap: None,
        }
    }

    /// A body of these bytes, then the end (no trailers).
    pub fn fixed(bytes: Bytes) -> H2Body {
        H2Body {
            recv: None,
            fixed: Some(bytes),
            piped: None,
            data_done: false,
            cap: None,
        }
    }

    /// A body of the frames sent on `frames`, ending when its sender is dropped.
    pub fn channel(frames: tokio::sync::mpsc::Receiver<Frame<Bytes>>) -> H2Body {
        H2Body {
            recv: None,
            fixed: None,
            piped: Some(frames),
            data_done: false,
            cap: None,
        }
    }
}

impl H2Body {
    /// Allows `max` bytes of data: past them the body fails (with CANCEL, so the stream
    /// it is sent on is reset) and `cut` is set.
    pub fn cap(&mut self, max: u64, cut: Arc<AtomicBool>) {
        self.cap = Some((max, cut));
    }
}

/// The most of a cut-off body read (and dropped) after the cut, and for how long.
const DRAIN_BYTES: usize = 4 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);

/// Reads and drops the rest of a body that was cut off, so the client still sending it
/// gets its answer: an HTTP/1.1 connection closed with unread bytes is reset, and the
/// reset can take the answer with it.
async fn drain(mut recv: RecvStream) {
    let read = async {
        let mut seen = 0;
        while let Some(Ok(data)) = recv.data().await {
            seen += data.len();
            let _ = recv.flow_control().release_capacity(data.len());
            if seen > DRAIN_BYTES {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(DRAIN_TIME, read).await;
}

/// A reset with NO_ERROR ends the body early but cleanly (RFC 9113 §8.1).
fn ended_cleanly(e: &h2::Error) -> bool {
    e.reason() == Some(Reason::NO_ERROR)
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let frame = this.poll_uncapped(cx);
        let Some((left, hit)) = this.cap.as_mut() else {
            return frame;
        };
        if let Poll::Ready(Some(Ok(f))) = &frame {
            let len = f.data_ref().map_or(0, |d| d.len() as u64);
            if len > *left {
                hit.store(true, Ordering::Release);
                if let Some(recv) = this.recv.take() {
                    tokio::spawn(drain(recv));
                }
                return Poll::Ready(Some(Err(h2::Error::from(Reason::CANCEL))));
            }
            *left -= len;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.recv.as_ref().map_or(
            self.fixed.is_none() && self.piped.is_none(),
            RecvStream::is_end_stream,
        )
    }
}

impl H2Body {
    /// The next frame, without the cap.
    fn poll_uncapped(
        &mut self,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self;
        if let Some(frames) = this.piped.as_mut() {
            return frames.poll_recv(cx).map(|f| f.map(Ok));
        }
        let Some(recv) = this.recv.as_mut() else {
            return Poll::Ready(this.fixed.take().map(|b| Ok(Frame::data(b))));
        };
        if !this.data_done {
            match ready!(recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(e)) if ended_cleanly(&e) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if ended_cleanly(&e) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
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
