//! The `grpc-timeout` header and the deadline of a request.
//!
//! Flow: the app's `grpc-timeout` is parsed ([`parse_grpc_timeout`]) -> the request's
//! deadline is the configured timeout or that value when shorter ([`request_deadline`])
//! -> each attempt upstream carries the time left, written back in the header's format
//! ([`encode_grpc_timeout`]).

use http::{HeaderMap, HeaderValue};
use std::time::Duration;

/// Parses a `grpc-timeout` header value (`100m`, `5S`, ...).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    // ASCII only: the unit is split off as the last byte.
    if v.len() < 2 || v.len() > 9 || !v.is_ascii() {
        return None;
    }
    let (num, unit) = v.split_at(v.len() - 1);
    let n: u64 = num.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n.checked_mul(3600)?),
        "M" => Duration::from_secs(n.checked_mul(60)?),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

/// The deadline of a request: the configured timeout, or the app's `grpc-timeout` when
/// it is shorter.
pub fn request_deadline(configured: Duration, headers: &HeaderMap) -> Duration {
    headers
        .get("grpc-timeout")
        .and_then(|v| v.to_str().ok())
        .and_then(parse_grpc_timeout)
        .map_or(configured, |app| app.min(configured))
}

/// Formats a `grpc-timeout` value (at most 8 digits, as the spec asks), rounded up to
/// the millisecond so the upstream's deadline never fires before meshd's own (which
/// answers the app with DEADLINE_EXCEEDED naming the upstream).
pub fn encode_grpc_timeout(d: Duration) -> HeaderValue {
    let ms = d.as_micros().div_ceil(1000);
    let text = if ms < 100_000_000 {
        format!("{}m", ms.max(1))
    } else {
        format!("{}S", d.as_secs().min(99_999_999))
    };
    HeaderValue::from_str(&text).unwrap_or_else(|_| HeaderValue::from_static("1m"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts() {
        let table = [
            ("100m", Some(Duration::from_millis(100))),
            ("5S", Some(Duration::from_secs(5))),
            ("1M", Some(Duration::from_secs(60))),
            ("1H", Some(Duration::from_secs(3600))),
            ("250u", Some(Duration::from_micros(250))),
            ("7n", Some(Duration::from_nanos(7))),
            ("S", None),
            ("12x", None),
            ("1234567890S", None),
            ("-1S", None),
        ];
        for (v, want) in table {
            assert_eq!(parse_grpc_timeout(v), want, "{v}");
        }
    }

    #[test]
    fn deadline_takes_the_shorter() {
        let mut h = HeaderMap::new();
        let five = Duration::from_secs(5);
        assert_eq!(request_deadline(five, &h), five);
        h.insert("grpc-timeout", HeaderValue::from_static("200m"));
        assert_eq!(request_deadline(five, &h), Duration::from_millis(200));
        h.insert("grpc-timeout", HeaderValue::from_static("60S"));
        assert_eq!(request_deadline(five, &h), five);
    }

    #[test]
    fn grpc_timeouts_are_written_in_milliseconds() {
        let table = [
            (Duration::from_millis(250), "250m"),
            (Duration::from_micros(199_001), "200m"),
            (Duration::from_micros(10), "1m"),
            (Duration::from_secs(5), "5000m"),
            (Duration::from_secs(200_000), "200000S"),
        ];
        for (d, want) in table {
            assert_eq!(encode_grpc_timeout(d), want, "{d:?}");
        }
    }
}
