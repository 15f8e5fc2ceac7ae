//! What every folder's `fuzz.rs` shares: the budget of a run, a watchdog that turns a
//! hang into a failure, and the structure-aware mutator that makes hostile inputs from
//! valid ones.
//!
//! Flow: each property runs [`config`]`()` cases (`MESHD_FUZZ_CASES`, default
//! [`DEFAULT_CASES`] so `cargo test --lib` stays fast; `tests/run.sh` sets more in
//! release, and by hand: `MESHD_FUZZ_CASES=100000 cargo test --release --lib fuzz`). A
//! case holds a [`watchdog`] guard while it parses: a case still running after
//! [`case_limit`] ends the test process with its name (proptest cannot interrupt a
//! hung case, so this is what makes "never hangs" a property that can fail). Inputs
//! come from valid seeds through [`mutated`]: truncated, bytes flipped, hostile tokens
//! inserted (escapes, wildcards, brackets, YAML anchors, huge numbers, unicode),
//! slices repeated (huge, deeply nested). A failing case is shrunk and saved under
//! `proptest-regressions/` (committed), so it runs first in every later run.

use proptest::prelude::*;
use proptest::test_runner::Config;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

/// Cases per property unless `MESHD_FUZZ_CASES` says otherwise: the whole fuzz set then
/// takes a few seconds of a debug `cargo test --lib`.
pub(crate) const DEFAULT_CASES: u32 = 48;

/// Cases per property: `MESHD_FUZZ_CASES`, else [`DEFAULT_CASES`].
pub(crate) fn cases() -> u32 {
    std::env::var("MESHD_FUZZ_CASES")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(DEFAULT_CASES)
}

/// The proptest config of a property: [`cases`] divided by `cost` (at least 1), for
/// properties whose cases are dearer (certificates signed, files written); shrinking is
/// bounded so a failure is reported in seconds.
pub(crate) fn config(cost: u32) -> Config {
    Config {
        cases: (cases() / cost.max(1)).max(1),
        max_shrink_iters: 2048,
        max_shrink_time: 30_000,
        ..Config::default()
    }
}

/// How long one case may run before it counts as a hang (`MESHD_FUZZ_CASE_SECS`,
/// default 120 s). Most cases take microseconds, but the largest inputs (256 KiB) take a
/// few seconds in some parsers, and on two busy cores such a case went past 30 s twice on
/// 2026-12-07 (a policy reload in CI beside a benchmark, an endpoint file beside two CPU
/// hogs): a stall of that kind is not a hang, and an endless loop still trips this.
pub(crate) fn case_limit() -> Duration {
    let secs = std::env::var("MESHD_FUZZ_CASE_SECS")
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(120);
    Duration::from_secs(secs)
}

/// Armed cases: (id, deadline, what runs).
static ARMED: Mutex<Vec<(u64, Instant, &'static str)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(0);
static WATCHER: Once = Once::new();

/// Disarms its case when dropped.
pub(crate) struct Watchdog(u64);

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Ok(mut armed) = ARMED.lock() {
            armed.retain(|(id, _, _)| *id != self.0);
        }
    }
}

/// Arms the watchdog for one case of `what`; the test process exits (101, naming it)
/// if the case still runs after [`case_limit`].
pub(crate) fn watchdog(what: &'static str) -> Watchdog {
    WATCHER.call_once(|| {
        std::thread::spawn(|| loop {
            std::thread::sleep(Duration::from_millis(200));
            let now = Instant::now();
            let late = ARMED.lock().ok().and_then(|armed| {
                armed
                    .iter()
                    .find(|(_, deadline, _)| *deadline < now)
                    .map(|(_, _, what)| *what)
            });
            if let Some(what) = late {
                // Straight to stderr: `eprintln!` in a test's thread is captured, and
                // the exit would lose it.
                let line = format!(
                    "fuzz: a case of `{what}` ran over {:?}: a hang (MESHD_FUZZ_CASE_SECS)\n",
                    case_limit()
                );
                let _ = std::io::Write::write_all(&mut std::io::stderr(), line.as_bytes());
                std::process::exit(101);
            }
        });
    });
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    if let Ok(mut armed) = ARMED.lock() {
        armed.push((id, Instant::now() + case_limit(), what));
    }
    Watchdog(id)
}

/// The longest input the mutator makes: large enough for "huge", small enough that a
/// case stays in the microseconds-to-milliseconds range.
pub(crate) const MAX_INPUT: usize = 256 << 10;

/// Tokens that break parsers: escapes, wildcards, separators, brackets, YAML and JSON
/// structure, numbers at and past their limits, control and odd unicode characters.
const TOKENS: &[&str] = &[
    "",
    "%",
    "%2",
    "%zz",
    "%2F",
    "%2f",
    "%00",
    "%+5",
    "%C3%28",
    "*",
    "/*",
    "**",
    "//",
    "..",
    "/../",
    ":",
    "::",
    "[",
    "]",
    "[::1]",
    "{",
    "}",
    "{{",
    "}}",
    "(",
    "\0",
    "\n",
    "\r\n",
    "\t",
    " ",
    "é",
    "\u{202e}",
    "🦀",
    "\u{FFFF}",
    "\u{10FFFF}",
    "-",
    "+",
    "=",
    "&",
    ";",
    ",",
    "\"",
    "'",
    "\\",
    "`",
    "#",
    "?",
    "@",
    "|",
    ">",
    "---",
    "- ",
    ": ",
    "!!binary ",
    "!!str ",
    "&a ",
    "*a",
    "<<: *a",
    "? ",
    "~",
    "null",
    "true",
    "0",
    "-1",
    "1e308",
    "-0",
    "0x10",
    "4294967296",
    "18446744073709551615",
    "18446744073709551616",
    "99999999999999999999999999999999",
    "spiffe://",
    "spiffe://jia.app",
    "unix://",
    "dns:///",
    "file://",
    "Bearer ",
    "eyJ",
    "=",
    "==",
    "..",
    ".",
];

/// One edit of an input.
#[derive(Debug, Clone)]
pub(crate) enum Edit {
    /// Cut the input at a point.
    Truncate(usize),
    /// XOR one byte with a non-zero mask.
    Flip(usize, u8),
    /// Insert one of [`TOKENS`].
    Token(usize, usize),
    /// Insert arbitrary text (unicode included).
    Text(usize, String),
    /// Remove a slice.
    Delete(usize, usize),
    /// Repeat a slice up to this many times (huge inputs, deep nesting).
    Repeat(usize, usize, u16),
}

/// Edits: mostly small ones, sometimes a repeat that grows the input.
pub(crate) fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        2 => any::<usize>().prop_map(Edit::Truncate),
        4 => (any::<usize>(), 1u8..).prop_map(|(i, m)| Edit::Flip(i, m)),
        4 => (any::<usize>(), any::<usize>()).prop_map(|(i, t)| Edit::Token(i, t)),
        2 => (any::<usize>(), "\\PC{0,6}").prop_map(|(i, s)| Edit::Text(i, s)),
        2 => (any::<usize>(), any::<usize>()).prop_map(|(i, j)| Edit::Delete(i, j)),
        1 => (any::<usize>(), any::<usize>(), 1u16..2000).prop_map(|(i, j, n)| Edit::Repeat(i, j, n)),
    ]
}

/// Applies `edits` to `seed` in order; the result is at most [`MAX_INPUT`] bytes.
pub(crate) fn apply(seed: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for e in edits {
        let at = |i: &usize, len: usize| i % (len + 1);
        match e {
            Edit::Truncate(i) => out.truncate(at(i, out.len())),
            Edit::Flip(i, mask) if !out.is_empty() => {
                let i = i % out.len();
                out[i] ^= mask;
            }
            Edit::Flip(..) => {}
            Edit::Token(i, t) => {
                let p = at(i, out.len());
                let token = TOKENS[t % TOKENS.len()].as_bytes();
                out.splice(p..p, token.iter().copied());
            }
            Edit::Text(i, s) => {
                let p = at(i, out.len());
                out.splice(p..p, s.bytes());
            }
            Edit::Delete(i, j) => {
                let (a, b) = (at(i, out.len()), at(j, out.len()));
                out.drain(a.min(b)..a.max(b));
            }
            Edit::Repeat(i, j, n) => {
                let (a, b) = (at(i, out.len()), at(j, out.len()));
                let slice = out[a.min(b)..a.max(b)].to_vec();
                if !slice.is_empty() {
                    let n = (*n as usize).min(MAX_INPUT / slice.len());
                    let p = a.max(b);
                    out.splice(p..p, slice.iter().copied().cycle().take(slice.len() * n));
                }
            }
        }
        out.truncate(MAX_INPUT);
    }
    out
}

/// A valid seed, then 0 to 4 edits: bytes.
pub(crate) fn mutated_bytes(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    (
        proptest::sample::select(seeds),
        proptest::collection::vec(edit(), 0..5),
    )
        .prop_map(|(seed, edits)| apply(&seed, &edits))
}

/// A valid seed, then 0 to 4 edits: text (invalid UTF-8 replaced by U+FFFD).
pub(crate) fn mutated(seeds: &[&str]) -> impl Strategy<Value = String> {
    let seeds: Vec<Vec<u8>> = seeds.iter().map(|s| s.as_bytes().to_vec()).collect();
    mutated_bytes(seeds).prop_map(|b| String::from_utf8_lossy(&b).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn edits_do_what_they_say() {
        let seed = b"abcdef";
        assert_eq!(apply(seed, &[]), seed.to_vec());
        assert_eq!(apply(seed, &[Edit::Truncate(2)]), b"ab".to_vec());
        assert_eq!(apply(seed, &[Edit::Flip(0, 1)]), b"`bcdef".to_vec());
        assert_eq!(apply(seed, &[Edit::Delete(1, 3)]), b"adef".to_vec());
        assert_eq!(
            apply(seed, &[Edit::Repeat(0, 2, 2)]),
            b"abababcdef".to_vec()
        );
        let huge = apply(seed, &[Edit::Repeat(0, 6, u16::MAX)]);
        assert!(huge.len() <= MAX_INPUT, "{}", huge.len());
        assert!(huge.len() > 300_000.min(MAX_INPUT) - 6, "{}", huge.len());
    }
}
