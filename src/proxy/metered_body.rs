//! A response body that watches its own end: it reads `grpc-status` from the trailers,
//! counts bytes, and finishes the request's `RequestRecord` when the stream ends or is
//! dropped (so streams are measured to their last byte, not to their headers).

use crate::proxy::h2_body::H2Body;
use crate::telemetry::RequestRecord;
use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use std::pin::Pin;
use std::task::{Context, Poll};

/// Something held for as long as a response body lives and dropped with it; the body
/// knows nothing of it but its drop.
pub type BodyGuard = Box<dyn std::any::Any + Send + Sync>;

/// [`H2Body`] plus the record it completes.
#[derive(Debug)]
pub struct MeteredBody {
    /// The upstream's response stream, passed through frame by frame (no copies).
    inner: H2Body,
    /// Completed at the end of the stream; `Drop` completes it on cancellation.
    record: RequestRecord,
    /// Whatever the caller keeps alive until the response ends (the outbound's place
    /// under its upstream's `limits.max_requests`), dropped with the body.
    guard: Option<BodyGuard>,
}

impl MeteredBody {
    pub fn new(inner: H2Body, record: RequestRecord) -> MeteredBody {
        MeteredBody {
            inner,
            record,
            guard: None,
        }
    }

    /// Puts `inner` in place of the stream read so far and gives that back: the gateway
    /// reads the app's stream itself and sends the client what it makes of it, still
    /// measured here.
    pub fn replace_inner(&mut self, inner: H2Body) -> H2Body {
        std::mem::replace(&mut self.inner, inner)
    }

    /// Keeps `guard` alive until this body ends or is dropped (the request stays counted
    /// as in progress that long).
    pub fn holding(mut self, guard: BodyGuard) -> MeteredBody {
        self.guard = Some(guard);
        self
    }
}

impl Body for MeteredBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    this.record.bytes += data.len() as u64;
                } else if let Some(trailers) = frame.trailers_ref() {
                    this.record.grpc_status = trailers
                        .get(crate::proxy::GRPC_STATUS)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse().ok());
                }
            }
            Poll::Ready(None) => {
                if this.record.grpc_method.is_some() && this.record.grpc_status.is_none() {
                    // The stream ended without trailers: UNKNOWN per the gRPC spec.
                    this.record.grpc_status = Some(2);
                }
                this.record.finish()
            }
            Poll::Ready(Some(Err(_))) => {
                if this.record.grpc_method.is_some() && this.record.grpc_status.is_none() {
                    this.record.grpc_status = Some(14);
                }
                this.record.finish()
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
