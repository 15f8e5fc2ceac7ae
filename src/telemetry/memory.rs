//! Memory given back after a burst of connections or requests.
//!
//! mimalloc keeps the pages a thread freed in that thread's heap, for the thread's next
//! allocations; it purges them to the OS only when the heap is used again. A worker that
//! goes quiet after a flood of connections therefore keeps tens of megabytes it no longer
//! uses. Flow: tokio calls [`on_park`] each time a worker runs out of work -> at most every
//! [`COLLECT_EVERY`] per thread, it asks mimalloc to collect that thread's heap (free its
//! empty pages and purge them).
//!
//! The interval is short so that the park which ends a burst collects what the burst
//! freed, rather than the first park after the next timer wakes the thread: with 2 s,
//! a sidecar was still holding 1 MB more than it needed right after a saturated run.
//! Shorter than 10 ms, the pages purged between parks are faulted in again under load
//! (mimalloc and page faults 2.6 % of a sidecar's CPU with 2 s, 3.1 % with 10 ms, 6.3 % with
//! 1 ms; optimisation log, 2026-12-07 evening).
#![allow(unsafe_code)]

use std::cell::Cell;
use std::time::{Duration, Instant};

/// The least time between two collections of one thread's heap.
pub const COLLECT_EVERY: Duration = Duration::from_millis(10);

thread_local! {
    /// When this thread's heap was last collected.
    static LAST: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// For `tokio::runtime::Builder::on_thread_park`.
pub fn on_park() {
    LAST.with(|last| {
        let now = Instant::now();
        if last
            .get()
            .is_some_and(|t| now.duration_since(t) < COLLECT_EVERY)
        {
            return;
        }
        last.set(Some(now));
        // SAFETY: `mi_collect` has no preconditions: it walks and trims the calling
        // thread's own heap (and frees pages abandoned by exited threads).
        unsafe { libmimalloc_sys::mi_collect(true) };
    });
}
