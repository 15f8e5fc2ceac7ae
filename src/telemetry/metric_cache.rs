//! Metric handles made once per label set instead of once per request.
//!
//! `metrics::counter!("name", "k" => v)` builds a `Key` (a `Vec` of labels, each value
//! copied), hashes it and looks it up in the recorder's registry on every call. On the
//! request path that cost more than the proxying around it. Here each thread keeps the
//! handles it has used, found by hashing the borrowed label values: a hit allocates
//! nothing; a miss registers through the ordinary macro once.
//!
//! Only after [`enable`] (called by `telemetry::install_metrics` once the global
//! Prometheus recorder is in place) are handles cached: before that, and in tests that use
//! `metrics::with_local_recorder`, every call goes to whatever recorder is current, as
//! the macros do. Label values are bounded by `telemetry::Labels`, so the caches stay
//! small; a cache that grows past [`MAX_ENTRIES`] anyway is emptied and refilled.

use foldhash::fast::FixedState;
use metrics::{Counter, Histogram, Label};
use std::cell::RefCell;
use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};

/// Entries per thread and kind beyond which a cache starts over.
pub const MAX_ENTRIES: usize = 4096;

/// Set once the global recorder is installed: from then on handles are cached.
static ENABLED: AtomicBool = AtomicBool::new(false);

/// Turns caching on; call after installing the global recorder.
pub fn enable() {
    ENABLED.store(true, Ordering::Release);
}

/// One cached handle and the exact name and label values it was registered with.
#[derive(Debug)]
struct Entry<H> {
    name: &'static str,
    labels: Box<[(&'static str, Box<str>)]>,
    handle: H,
}

/// Handles by the hash of name and label values (collisions kept side by side).
#[derive(Debug)]
struct Cache<H> {
    map: HashMap<u64, Vec<Entry<H>>, FixedState>,
    len: usize,
}

impl<H: Clone> Cache<H> {
    fn new() -> Cache<H> {
        Cache {
            map: HashMap::default(),
            len: 0,
        }
    }

    /// Calls `f` with the handle for `name{labels}`, registering it on first use.
    fn with<R>(
        &mut self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        register: impl FnOnce() -> H,
        f: impl FnOnce(&H) -> R,
    ) -> R {
        let hash = key_hash(name, labels);
        if let Some(found) = self.map.get(&hash).and_then(|entries| {
            entries.iter().find(|e| {
                same_static(e.name, name)
                    && e.labels.len() == labels.len()
                    && e.labels
                        .iter()
                        .zip(labels)
                        .all(|(a, b)| same_static(a.0, b.0) && *a.1 == *b.1)
            })
        }) {
            return f(&found.handle);
        }
        if self.len >= MAX_ENTRIES {
            self.map.clear();
            self.len = 0;
        }
        let handle = register();
        let out = f(&handle);
        self.map.entry(hash).or_default().push(Entry {
            name,
            labels: labels.iter().map(|(k, v)| (*k, Box::from(*v))).collect(),
            handle,
        });
        self.len += 1;
        out
    }

    #[cfg(test)]
    fn get_or_register(
        &mut self,
        name: &'static str,
        labels: &[(&'static str, &str)],
        register: impl FnOnce() -> H,
    ) -> H {
        self.with(name, labels, register, H::clone)
    }
}

/// Equal static strings: usually the same literal (one compare), else by content.
fn same_static(a: &'static str, b: &'static str) -> bool {
    (a.as_ptr() == b.as_ptr() && a.len() == b.len()) || a == b
}

/// Hashes names and label keys by address (they are `'static` literals) and values by
/// content. Two copies of one literal at different addresses only make a second entry for
/// the same metric, which the recorder resolves to the same series.
fn key_hash(name: &'static str, labels: &[(&'static str, &str)]) -> u64 {
    let mut h = FixedState::default().build_hasher();
    h.write_usize(name.as_ptr() as usize);
    for (k, v) in labels {
        h.write_usize(k.as_ptr() as usize);
        h.write(v.as_bytes());
        h.write_usize(v.len());
    }
    h.finish()
}

thread_local! {
    static COUNTERS: RefCell<Cache<Counter>> = RefCell::new(Cache::new());
    static HISTOGRAMS: RefCell<Cache<Histogram>> = RefCell::new(Cache::new());
}

fn owned_labels(labels: &[(&'static str, &str)]) -> Vec<Label> {
    labels
        .iter()
        .map(|(k, v)| Label::new(*k, v.to_string()))
        .collect()
}

/// Adds `by` to the counter `name{labels}` (no handle clone on the hot path).
pub fn increment(name: &'static str, labels: &[(&'static str, &str)], by: u64) {
    with_counter(name, labels, |c| c.increment(by))
}

/// Records `value` in the histogram `name{labels}`.
pub fn record(name: &'static str, labels: &[(&'static str, &str)], value: f64) {
    super::upkeep::sampled();
    let register = || metrics::histogram!(name, owned_labels(labels));
    let f = |h: &Histogram| h.record(value);
    if !ENABLED.load(Ordering::Acquire) {
        return f(&register());
    }
    // `try_with` fails only while the thread is exiting (its cache is gone).
    HISTOGRAMS
        .try_with(|c| c.borrow_mut().with(name, labels, register, f))
        .unwrap_or_else(|_| f(&register()))
}

fn with_counter<R>(
    name: &'static str,
    labels: &[(&'static str, &str)],
    f: impl FnOnce(&Counter) -> R + Copy,
) -> R {
    let register = || metrics::counter!(name, owned_labels(labels));
    if !ENABLED.load(Ordering::Acquire) {
        return f(&register());
    }
    COUNTERS
        .try_with(|c| c.borrow_mut().with(name, labels, register, f))
        .unwrap_or_else(|_| f(&register()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_labels_same_handle_other_labels_other_handle() {
        let mut made = 0;
        let mut cache: Cache<u32> = Cache::new();
        let mut get = |labels: &[(&'static str, &str)]| {
            cache.get_or_register("m", labels, || {
                made += 1;
                made
            })
        };
        assert_eq!(get(&[("a", "1"), ("b", "2")]), 1);
        assert_eq!(get(&[("a", "1"), ("b", "2")]), 1);
        assert_eq!(get(&[("a", "1"), ("b", "3")]), 2);
        assert_eq!(get(&[("a", "1")]), 3);
        assert_eq!(get(&[("b", "1"), ("b", "2")]), 4);
        assert_eq!(get(&[("a", "1"), ("b", "3")]), 2);
    }

    #[test]
    fn full_cache_starts_over() {
        let mut cache: Cache<usize> = Cache::new();
        for i in 0..MAX_ENTRIES + 10 {
            let v = i.to_string();
            assert_eq!(cache.get_or_register("m", &[("i", &v)], || i), i);
        }
        assert!(cache.len <= MAX_ENTRIES);
        assert_eq!(cache.get_or_register("m", &[("i", "0")], || 99), 99);
    }
}
