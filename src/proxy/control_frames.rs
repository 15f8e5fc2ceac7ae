//! HTTP/2 control-frame floods from a client that reads its ACKs.
//!
//! The `h2` crate stops reading a client that does not read the ACKs it owes (its send
//! buffer fills), but a client that sends SETTINGS or PING frames as fast as it can and
//! reads every ACK makes meshd answer each one forever, for the cost of nine bytes. No
//! real client does that: gRPC keepalive pings every few seconds at most, and the pings a
//! gRPC client sends to measure bandwidth come with data. So, like gRPC's own servers
//! ("too many pings"), meshd counts the SETTINGS and PING frames a client sends while it
//! sends no request: past [`BURST`] of them (less [`LEAK_PER_SEC`] per second that
//! passes), the connection is closed and counted as `control_frame_flood`.
//!
//! Flow: [`FrameWatch`] wraps the connection under `h2_server` -> every byte read passes
//! through [`ControlFrames::observe`], which follows the frame headers (9 bytes: length,
//! type, flags, stream) without copying a payload -> a flood turns the read into an
//! error, which ends the connection.

use crate::proxy::connections::Limit;
use crate::proxy::h2_server::Watched;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

/// Control frames a client may send in a row without a request.
pub const BURST: f64 = 200.0;
/// How fast the count falls back when no request comes (a keepalive PING every few
/// seconds never reaches [`BURST`]).
pub const LEAK_PER_SEC: f64 = 10.0;

/// The client preface every HTTP/2 connection starts with.
const PREFACE_LEN: usize = 24;
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// Where the reader is in the client's byte stream, and how many control frames it has
/// counted.
#[derive(Debug)]
pub struct ControlFrames {
    /// Bytes of the preface still to skip.
    preface: usize,
    /// The frame header being read (up to 9 bytes, a read can split it).
    header: [u8; 9],
    header_len: usize,
    /// Payload bytes of the current frame still to skip.
    payload: usize,
    /// Control frames counted, less what leaked away since `last`.
    level: f64,
    last: Option<Instant>,
}

impl Default for ControlFrames {
    fn default() -> Self {
        ControlFrames {
            preface: PREFACE_LEN,
            header: [0; 9],
            header_len: 0,
            payload: 0,
            level: 0.0,
            last: None,
        }
    }
}

impl ControlFrames {
    /// Follows `bytes`, the next ones the client sent. `true` once the client has sent
    /// more control frames without a request than [`BURST`] allows.
    pub fn observe(&mut self, mut bytes: &[u8], now: Instant) -> bool {
        while !bytes.is_empty() {
            if self.preface > 0 {
                let n = self.preface.min(bytes.len());
                self.preface -= n;
                bytes = &bytes[n..];
            } else if self.payload > 0 {
                let n = self.payload.min(bytes.len());
                self.payload -= n;
                bytes = &bytes[n..];
            } else {
                let n = (9 - self.header_len).min(bytes.len());
                self.header[self.header_len..self.header_len + n].copy_from_slice(&bytes[..n]);
                self.header_len += n;
                bytes = &bytes[n..];
                if self.header_len == 9 {
                    self.header_len = 0;
                    let h = self.header;
                    self.payload =
                        usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
                    if self.frame(h[3], h[4], now) {
                        return true;
                    }
                }
            }
        }
        false
    }

    /// Counts one frame of `kind` with `flags`; `true` past the budget.
    fn frame(&mut self, kind: u8, flags: u8, now: Instant) -> bool {
        match kind {
            HEADERS | DATA => {
                self.level = 0.0;
                false
            }
            SETTINGS | PING if flags & ACK == 0 => {
                if let Some(last) = self.last {
                    let leaked = now.saturating_duration_since(last).as_secs_f64() * LEAK_PER_SEC;
                    self.level = (self.level - leaked).max(0.0);
                }
                self.last = Some(now);
                self.level += 1.0;
                self.level > BURST
            }
            _ => false,
        }
    }
}

/// A served HTTP/2 connection's I/O, watched for control-frame floods (unless `watched`
/// is `None`: the app-facing listeners, where the caller is the app).
pub struct FrameWatch<'a, I> {
    io: I,
    frames: ControlFrames,
    watched: Option<Watched<'a>>,
}

impl<'a, I> FrameWatch<'a, I> {
    pub fn new(io: I, watched: Option<Watched<'a>>) -> FrameWatch<'a, I> {
        FrameWatch {
            io,
            frames: ControlFrames::default(),
            watched,
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FrameWatch<'_, I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let read = Pin::new(&mut this.io).poll_read(cx, buf);
        if let (Poll::Ready(Ok(())), Some(w)) = (&read, this.watched) {
            if this.frames.observe(&buf.filled()[before..], Instant::now()) {
                w.gate.hit(Limit::ControlFrameFlood, w.remote);
                return Poll::Ready(Err(std::io::Error::other(
                    "HTTP/2 control-frame flood: closed",
                )));
            }
        }
        read
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FrameWatch<'_, I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    //! A client's byte stream, cut anywhere, is followed frame by frame: floods of
    //! SETTINGS or PING without requests end the connection; keepalive pings, ACKs and
    //! pings that come with requests never do.
    use super::*;
    use std::time::Duration;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        f.extend([0, 0, 0, 0]);
        f.extend_from_slice(payload);
        f
    }

    fn stream(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut s = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        for f in frames {
            s.extend(f);
        }
        s
    }

    /// `frames`, in turn, `n` times over.
    fn rep(frames: &[&Vec<u8>], n: usize) -> Vec<Vec<u8>> {
        (0..n)
            .flat_map(|_| frames.iter().map(|f| f.to_vec()))
            .collect()
    }

    /// Feeds `bytes` in pieces of `cut` bytes at one instant; whether it flooded.
    fn floods(bytes: &[u8], cut: usize) -> bool {
        let mut c = ControlFrames::default();
        let now = Instant::now();
        bytes.chunks(cut).any(|piece| c.observe(piece, now))
    }

    #[test]
    fn floods_are_told_from_normal_clients_however_the_bytes_are_cut() {
        let settings = frame(SETTINGS, 0, &[0, 3, 0, 0, 0, 100]);
        let ping = frame(PING, 0, &[7; 8]);
        let ack = frame(PING, ACK, &[7; 8]);
        let settings_ack = frame(SETTINGS, ACK, &[]);
        let headers = frame(HEADERS, 0x4, &[0x83, 0x87, 0x84]);
        let data = frame(DATA, 0, &[1; 100]);
        let over = BURST as usize + 1;
        let cases: Vec<(&str, Vec<Vec<u8>>, bool)> = vec![
            ("a SETTINGS flood", vec![settings.clone(); over], true),
            ("a PING flood", vec![ping.clone(); over], true),
            (
                "SETTINGS and PINGs mixed",
                rep(&[&settings, &ping], over / 2 + 1),
                true,
            ),
            (
                "just under the burst",
                vec![ping.clone(); BURST as usize],
                false,
            ),
            ("ACKs are not counted", vec![ack.clone(); 5 * over], false),
            ("SETTINGS ACKs", vec![settings_ack; 5 * over], false),
            (
                "pings that come with requests",
                rep(&[&ping, &headers], 5 * over),
                false,
            ),
            (
                "pings between data (gRPC's bandwidth probes)",
                rep(&[&data, &ping], 5 * over),
                false,
            ),
            (
                "a ping-like payload inside DATA is not a frame",
                vec![frame(DATA, 0, &ping.repeat(over))],
                false,
            ),
        ];
        for (name, frames, want) in cases {
            let bytes = stream(&frames);
            for cut in [1, 2, 9, 10, 17, 4096] {
                assert_eq!(floods(&bytes, cut), want, "{name}, cut every {cut} bytes");
            }
        }
    }

    #[test]
    fn keepalive_pings_leak_away_with_time() {
        let mut c = ControlFrames::default();
        let start = Instant::now();
        assert!(!c.observe(&stream(&[]), start));
        let ping = frame(PING, 0, &[0; 8]);
        // A ping a second for an hour with no request: never a flood.
        for s in 0..3600 {
            assert!(!c.observe(&ping, start + Duration::from_secs(s)), "at {s}s");
        }
        // The same number at once is.
        let mut c = ControlFrames::default();
        assert!(!c.observe(&stream(&[]), start));
        assert!((0..3600).any(|_| c.observe(&ping, start)));
    }
}
