//! The random bytes rustls asks for, read from the kernel a kilobyte at a time.
//!
//! A full TLS 1.3 handshake makes rustls ask for random bytes seven times (the server
//! random, and for each of the two session tickets its nonce, its age offset and its
//! session ID), and ring's `SystemRandom` makes one `getrandom` system call for each. In
//! this VM a system call costs about 2 µs, and those were seven of the inbound's 23-25
//! system calls per handshake (optimisation log, 2026-12-07, night).
//!
//! Flow: [`OsRandom::fill`] serves a request from the calling thread's pool -> a pool
//! with too few bytes left is refilled from the kernel first (ring's `SystemRandom`, one
//! call for [`POOL_LEN`] bytes) -> the bytes handed out are zeroed in the pool, so none
//! is handed out twice or kept after use. A request of more than a quarter of the pool
//! goes to the kernel directly. Every byte is the kernel's: nothing is derived or
//! stretched here. The key exchange and signing keys ring makes itself still read the
//! kernel directly.

use ring::rand::{SecureRandom as _, SystemRandom};
use rustls::crypto::{GetRandomFailed, SecureRandom};
use std::cell::RefCell;

/// Bytes read from the kernel per refill of a thread's pool.
pub const POOL_LEN: usize = 1024;

/// rustls's source of random bytes in meshd's provider (see the module docs).
#[derive(Debug)]
pub struct OsRandom;

/// One thread's unused kernel random bytes: `bytes[used..]`.
struct Pool {
    bytes: [u8; POOL_LEN],
    /// How many bytes from the start were handed out (and zeroed).
    used: usize,
}

thread_local! {
    /// Starts empty: the first request refills it.
    static POOL: RefCell<Pool> = const { RefCell::new(Pool { bytes: [0; POOL_LEN], used: POOL_LEN }) };
}

impl Pool {
    fn take(&mut self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        if POOL_LEN - self.used < buf.len() {
            SystemRandom::new()
                .fill(&mut self.bytes)
                .map_err(|_| GetRandomFailed)?;
            self.used = 0;
        }
        let out = &mut self.bytes[self.used..self.used + buf.len()];
        buf.copy_from_slice(out);
        out.fill(0);
        self.used += buf.len();
        Ok(())
    }
}

impl SecureRandom for OsRandom {
    fn fill(&self, buf: &mut [u8]) -> Result<(), GetRandomFailed> {
        if buf.len() > POOL_LEN / 4 {
            return SystemRandom::new().fill(buf).map_err(|_| GetRandomFailed);
        }
        POOL.with_borrow_mut(|pool| pool.take(buf))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    // A handshake's worth of requests, over and over: every request gets fresh bytes,
    // across several refills of the pool.
    #[test]
    fn no_bytes_are_handed_out_twice() {
        let mut seen = HashSet::new();
        for n in 0..4 * POOL_LEN / 32 {
            let mut buf = [0u8; 32];
            OsRandom.fill(&mut buf).unwrap();
            assert!(seen.insert(buf), "request {n} repeated earlier bytes");
        }
        let mut small = [0u8; 4];
        OsRandom.fill(&mut small).unwrap();
        let mut big = [0u8; POOL_LEN];
        OsRandom.fill(&mut big).unwrap();
        assert!(big.iter().any(|&b| b != 0), "a large request was left zero");
    }

    // What was handed out does not stay in the pool.
    #[test]
    fn handed_out_bytes_are_zeroed_in_the_pool() {
        let mut pool = Pool {
            bytes: [0; POOL_LEN],
            used: POOL_LEN,
        };
        let mut buf = [0u8; 48];
        pool.take(&mut buf).unwrap();
        assert_eq!(pool.used, 48);
        assert!(pool.bytes[..48].iter().all(|&b| b == 0));
        assert!(pool.bytes[48..].iter().any(|&b| b != 0));
        assert!(buf.iter().any(|&b| b != 0));
        // A request larger than what is left refills first.
        let mut rest = vec![0u8; POOL_LEN - 40];
        pool.take(&mut rest).unwrap();
        assert_eq!(pool.used, POOL_LEN - 40);
    }
}
