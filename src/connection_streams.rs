//! Runs the request streams of one served HTTP/2 connection inside that connection's own
//! task, instead of one tokio task per stream.
//!
//! hyper's HTTP/2 server hands each accepted stream (our service future plus the sending
//! of its response) to an executor. With `TokioExecutor` that is a `tokio::spawn` per
//! request: an aligned allocation, a lock on the runtime's task list, a copy of the
//! future into the task cell, and a scheduler round trip every time the stream wakes the
//! connection to flush. Here the executor pushes the stream into a queue that the
//! connection task drains into a `FuturesUnordered`, and the connection task polls the
//! streams first and the connection after them, so a response a stream just produced is
//! written in the same poll.
//!
//! Flow: `hyper` → `ConnectionStreams::execute` (queue) → `drive` polls queued and woken
//! streams, then the connection → repeat while the connection handed out new streams.

use futures::stream::{FuturesUnordered, StreamExt};
use futures::task::AtomicWaker;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::Poll;

type StreamFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

/// The executor given to one connection's HTTP/2 server (cloned inside hyper).
#[derive(Clone, Default)]
pub struct ConnectionStreams {
    shared: Arc<Shared>,
}

#[derive(Default)]
struct Shared {
    /// Streams hyper handed over since the connection task last looked.
    queue: Mutex<Vec<StreamFuture>>,
    /// The connection task, woken when a stream is queued from outside its own poll.
    task: AtomicWaker,
}

impl<F> hyper::rt::Executor<F> for ConnectionStreams
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, fut: F) {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::pin(fut));
        self.shared.task.wake();
    }
}

/// How many rounds of "poll streams, then the connection" one poll of `drive` makes
/// before yielding to other tasks.
const ROUNDS_PER_POLL: usize = 8;

impl ConnectionStreams {
    /// Drives `connection` and every stream it hands to this executor until the
    /// connection has ended and its last stream has finished.
    pub async fn drive<C: Future<Output = ()>>(self, connection: C) {
        let mut connection = std::pin::pin!(connection);
        let mut connection_done = false;
        let mut streams: FuturesUnordered<StreamFuture> = FuturesUnordered::new();
        std::future::poll_fn(|cx| {
            self.shared.task.register(cx.waker());
            for _ in 0..ROUNDS_PER_POLL {
                self.take_queued(&mut streams);
                // Streams first: responses they produce are flushed by the connection
                // poll right after.
                while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {}
                if !connection_done && connection.as_mut().poll(cx).is_ready() {
                    connection_done = true;
                }
                if self.queue_is_empty() {
                    return if connection_done && streams.is_empty() {
                        Poll::Ready(())
                    } else {
                        Poll::Pending
                    };
                }
            }
            cx.waker().wake_by_ref();
            Poll::Pending
        })
        .await
    }

    fn take_queued(&self, streams: &mut FuturesUnordered<StreamFuture>) {
        let mut queue = self.shared.queue.lock().unwrap_or_else(|e| e.into_inner());
        streams.extend(queue.drain(..));
    }

    fn queue_is_empty(&self) -> bool {
        self.shared
            .queue
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::rt::Executor;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A connection that hands out three streams, one of them only after a delay, and
    /// ends before the slow one finishes: `drive` returns once all three have run.
    #[tokio::test]
    async fn runs_every_stream_and_outlives_the_connection() {
        let exec = ConnectionStreams::default();
        let done = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let connection = {
            let exec = exec.clone();
            let done = done.clone();
            async move {
                for _ in 0..2 {
                    let done = done.clone();
                    exec.execute(async move {
                        tokio::task::yield_now().await;
                        done.fetch_add(1, Ordering::SeqCst);
                    });
                }
                let done = done.clone();
                exec.execute(async move {
                    rx.await.unwrap();
                    done.fetch_add(1, Ordering::SeqCst);
                });
            }
        };
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            tx.send(()).unwrap();
        });
        exec.drive(connection).await;
        assert_eq!(done.load(Ordering::SeqCst), 3);
    }

    /// A stream queued from outside the connection's poll (another task) still runs.
    #[tokio::test]
    async fn a_stream_queued_from_another_task_wakes_the_connection() {
        let exec = ConnectionStreams::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let outside = exec.clone();
        let ran2 = ran.clone();
        tokio::spawn(async move {
            tokio::task::yield_now().await;
            outside.execute(async move {
                ran2.fetch_add(1, Ordering::SeqCst);
                tx.send(()).unwrap();
            });
        });
        // The connection lives until the stream has run.
        exec.drive(async move {
            rx.await.unwrap();
        })
        .await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
