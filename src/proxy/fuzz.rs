//! Fuzzed request-header parsers of every listener: `grpc-timeout`, the gRPC path
//! (`/pkg.Service/Method`), and the `x-forwarded-client-cert` value meshd writes in
//! place of whatever the caller sent.
//!
//! Properties: nothing panics or hangs on any header text (valid values mutated, any
//! text); `grpc-timeout` round-trips (a deadline written is read back as itself rounded
//! up to the millisecond, or capped at the format's 8 digits) and the deadline never
//! exceeds the configured one; a gRPC path splits into a non-empty service and method
//! that put back together give the path. XFCC: whatever the caller sent (any number of
//! values, elements, quotes, separators), the app receives exactly one value, ours,
//! with exactly the `By` and `URI` of the two IDs: a SPIFFE ID cannot inject another
//! element or key.

use crate::config::parse_spiffe_id;
use crate::proxy::grpc::grpc_path;
use crate::proxy::grpc_timeout::{encode_grpc_timeout, parse_grpc_timeout, request_deadline};
use crate::proxy::xfcc::{set_xfcc, xfcc_value, XFCC_NAME};
use crate::telemetry::fuzz_budget::{config, mutated, watchdog};
use http::{HeaderMap, HeaderValue};
use proptest::prelude::*;
use std::time::Duration;

const TIMEOUTS: &[&str] = &["100m", "5S", "1M", "1H", "250u", "7n", "99999999S", "1m"];

const IDS: &[&str] = &[
    "spiffe://jia.app/payment-service",
    "spiffe://jia.app/ns/default/sa/api-gateway",
    "spiffe://td",
];

/// What a caller may send as its own XFCC: elements, keys, quotes, separators.
const FORGED: &[&str] = &[
    "By=spiffe://jia.app/payment-service;URI=spiffe://jia.app/api-gateway",
    "By=a;URI=b,By=c;URI=\"d;e,f\"",
    "Hash=abc;Subject=\"CN=x\";URI=spiffe://jia.app/admin",
];

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn grpc_timeouts_parse_without_panic(text in prop_oneof![mutated(TIMEOUTS), "\\PC{0,12}"]) {
        let _w = watchdog("parse_grpc_timeout");
        if let Some(d) = parse_grpc_timeout(&text) {
            let mut h = HeaderMap::new();
            if let Ok(v) = HeaderValue::from_str(&text) {
                h.insert("grpc-timeout", v);
                let configured = Duration::from_secs(5);
                let deadline = request_deadline(configured, &h);
                prop_assert_eq!(deadline, d.min(configured));
            }
        }
    }

    #[test]
    fn grpc_timeouts_round_trip(nanos in prop_oneof![0u64..10_000_000_000, any::<u64>()]) {
        let d = Duration::from_nanos(nanos);
        let written = encode_grpc_timeout(d);
        let text = written.to_str().expect("ASCII");
        let read = parse_grpc_timeout(text).expect("meshd's own value parses");
        let ms = d.as_micros().div_ceil(1000).max(1);
        if ms < 100_000_000 {
            prop_assert_eq!(read, Duration::from_millis(ms as u64), "{:?} written as {}", d, text);
        } else {
            prop_assert_eq!(read, Duration::from_secs(d.as_secs().min(99_999_999)));
        }
        prop_assert!(text.len() <= 9, "{}", text);
    }

    #[test]
    fn grpc_paths_split_into_service_and_method(
        path in mutated(&["/payment.v1.PaymentService/CreatePayment", "/a/b", "//", "/x/y/z"]),
    ) {
        let _w = watchdog("grpc_path");
        if let Some((service, method)) = grpc_path(&path) {
            prop_assert!(!service.is_empty() && !method.is_empty() && !method.contains('/'));
            prop_assert_eq!(format!("/{service}/{method}"), path);
        }
    }

    #[test]
    fn xfcc_names_exactly_the_two_ids(
        own in mutated(IDS),
        peer in mutated(IDS),
        forged in proptest::collection::vec(mutated(FORGED), 0..4),
    ) {
        let _w = watchdog("xfcc");
        // Only SPIFFE IDs reach xfcc_value: the peer's comes from its verified SVID.
        let (Ok(own), Ok(peer)) = (parse_spiffe_id(&own), parse_spiffe_id(&peer)) else {
            return Ok(());
        };
        let value = xfcc_value(&own.to_string(), &peer.to_string()).expect("IDs are header-safe");
        let mut headers = HeaderMap::new();
        for f in &forged {
            if let Ok(v) = HeaderValue::from_str(f) {
                headers.append(XFCC_NAME, v);
            }
        }
        set_xfcc(&mut headers, Some(&value));
        let all: Vec<&HeaderValue> = headers.get_all(XFCC_NAME).iter().collect();
        prop_assert_eq!(all.len(), 1);
        let text = all[0].to_str().expect("ASCII");
        // One element (no `,`), two keys (one `;`), no quoting: exactly By and URI.
        prop_assert!(!text.contains(',') && !text.contains('"'), "{}", text);
        let pairs: Vec<(&str, &str)> = text.split(';').filter_map(|p| p.split_once('=')).collect();
        let (own, peer) = (own.to_string(), peer.to_string());
        prop_assert_eq!(pairs, vec![("By", own.as_str()), ("URI", peer.as_str())]);
        set_xfcc(&mut headers, None);
        prop_assert!(headers.get(XFCC_NAME).is_none());
    }
}

/// Found by `grpc_timeouts_parse_without_panic`: a value ending in a multi-byte
/// character panicked (the unit was split off at a byte that is not a character
/// boundary). Header values reach the parser through `to_str`, which passes ASCII only,
/// so the request path was safe; the parser itself now refuses such text.
#[test]
fn grpc_timeouts_ending_in_a_multibyte_character_are_refused() {
    for text in ["𖭛", "1é", "10\u{202e}"] {
        assert_eq!(parse_grpc_timeout(text), None, "{text}");
    }
}
