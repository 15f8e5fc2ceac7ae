//! The request body the outbound listener sends upstream: the app's stream passed
//! through, and, when retries are on, remembered (up to a cap) so that a retry can send
//! it again to another endpoint — as linkerd2-proxy's `ReplayBody` does.
//!
//! Flow: [`ReplayBody::new`] wraps the app's body; each attempt takes a body from
//! [`ReplayBody::attempt`]. An attempt's body first replays what earlier attempts already
//! read, then reads on from the app's stream, keeping copies (cheap `Bytes` clones) until
//! the cap is passed. Past the cap nothing more can be replayed and `attempt` says so.
//! Only the newest attempt may read; a stale one ends with an error.

use crate::proxy::h2_body::H2Body;
use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

/// Bodies larger than this are not kept for a retry (linkerd2-proxy's default).
pub const REPLAY_CAP: usize = 64 * 1024;

/// Why a request body could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// The app's stream failed.
    #[error("request body from the app: {0}")]
    Source(#[from] h2::Error),
    /// A newer attempt took over the body.
    #[error("request body taken over by a retry")]
    Superseded,
}

/// What an attempt sends as its request body.
#[derive(Debug)]
pub enum ReplayBody {
    /// The app's stream as it is (retries off: no copies, no lock).
    Direct(H2Body),
    /// One attempt's view of a shared, replayable stream.
    Replay(Attempt),
    /// A fixed body (health checks).
    Fixed(Option<Bytes>),
}

/// One attempt's position in the shared stream.
#[derive(Debug)]
pub struct Attempt {
    shared: Arc<Mutex<Shared>>,
    /// Which attempt this is; only the newest may read.
    generation: u64,
    /// Frames of `shared.frames` already sent by this attempt.
    pos: usize,
}

#[derive(Debug)]
enum Kept {
    Data(Bytes),
    Trailers(HeaderMap),
}

#[derive(Debug)]
struct Shared {
    /// The app's stream, read by the newest attempt.
    source: H2Body,
    /// What was read so far, while under the cap.
    frames: Vec<Kept>,
    /// Bytes in `frames`.
    kept: usize,
    /// The cap was passed: `frames` was dropped and no retry is possible.
    overflowed: bool,
    /// The app's stream ended.
    ended: bool,
    /// The newest attempt.
    generation: u64,
}

impl ReplayBody {
    /// A body for a request with retries off.
    pub fn direct(body: H2Body) -> ReplayBody {
        ReplayBody::Direct(body)
    }

    /// A small fixed body.
    pub fn fixed(bytes: Bytes) -> ReplayBody {
        ReplayBody::Fixed(Some(bytes))
    }
}

/// The app's body shared by every attempt of one request.
#[derive(Debug, Clone)]
pub struct Replayable(Arc<Mutex<Shared>>);

impl Replayable {
    pub fn new(source: H2Body) -> Replayable {
        Replayable(Arc::new(Mutex::new(Shared {
            source,
            frames: Vec::new(),
            kept: 0,
            overflowed: false,
            ended: false,
            generation: 0,
        })))
    }

    /// Whether another attempt could still send the whole body.
    pub fn attempt_possible(&self) -> bool {
        self.0.lock().is_ok_and(|s| !s.overflowed)
    }

    /// The body of the next attempt, or `None` when the body is too large to send again.
    pub fn attempt(&self) -> Option<ReplayBody> {
        let mut s = self.0.lock().ok()?;
        if s.overflowed {
            return None;
        }
        s.generation += 1;
        Some(ReplayBody::Replay(Attempt {
            shared: self.0.clone(),
            generation: s.generation,
            pos: 0,
        }))
    }
}

impl Kept {
    fn frame(&self) -> Frame<Bytes> {
        match self {
            Kept::Data(b) => Frame::data(b.clone()),
            Kept::Trailers(t) => Frame::trailers(t.clone()),
        }
    }
}

impl Attempt {
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        let Ok(mut s) = self.shared.lock() else {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        };
        if s.generation != self.generation {
            return Poll::Ready(Some(Err(ReplayError::Superseded)));
        }
        if let Some(kept) = s.frames.get(self.pos) {
            self.pos += 1;
            return Poll::Ready(Some(Ok(kept.frame())));
        }
        if s.ended {
            return Poll::Ready(None);
        }
        let polled = Pin::new(&mut s.source).poll_frame(cx);
        match polled {
            Poll::Ready(Some(Ok(frame))) => {
                if !s.overflowed {
                    let kept = if let Some(data) = frame.data_ref() {
                        s.kept += data.len();
                        Some(Kept::Data(data.clone()))
                    } else {
                        frame.trailers_ref().map(|t| Kept::Trailers(t.clone()))
                    };
                    if s.kept > REPLAY_CAP {
                        s.overflowed = true;
                        s.frames = Vec::new();
                    } else if let Some(k) = kept {
                        s.frames.push(k);
                        self.pos += 1;
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(None) => {
                s.ended = true;
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(ReplayError::Source(e)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        let Ok(s) = self.shared.lock() else {
            return true;
        };
        self.pos >= s.frames.len() && (s.ended || s.source.is_end_stream())
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = ReplayError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReplayError>>> {
        match self.get_mut() {
            ReplayBody::Direct(b) => Pin::new(b)
                .poll_frame(cx)
                .map(|o| o.map(|r| r.map_err(ReplayError::Source))),
            ReplayBody::Replay(a) => a.poll(cx),
            ReplayBody::Fixed(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReplayBody::Direct(b) => b.is_end_stream(),
            ReplayBody::Replay(a) => a.is_end_stream(),
            ReplayBody::Fixed(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReplayBody::Direct(b) => b.size_hint(),
            ReplayBody::Replay(_) => SizeHint::default(),
            ReplayBody::Fixed(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
        }
    }
}
