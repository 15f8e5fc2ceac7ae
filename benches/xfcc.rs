//! Header work on the inbound path: building the x-forwarded-client-cert value
//! (`proxy::xfcc_value`, once per connection) and putting it into each request's headers
//! in place of a forged one.
//!
//! `main` first checks the value has the documented shape `By=<own id>;URI=<peer id>`.

use criterion::{criterion_group, BatchSize, Criterion};
use http::{HeaderMap, HeaderValue};
use meshd::proxy::{set_xfcc, xfcc_value};
use std::hint::black_box;

const OWN: &str = "spiffe://jia.app/bench-server";
const PEER: &str = "spiffe://jia.app/bench-client";
const LONG_PEER: &str = "spiffe://cluster.prod.jia.app/ns/payments/sa/payment-service-v2";

/// A request header set as h2load and gRPC clients send it, with a forged XFCC.
fn headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in [
        ("user-agent", "h2load nghttp2/1.52.0"),
        ("accept", "*/*"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", "5S"),
        ("x-request-id", "3f8e0a5c-0d7e-4a8a-9c43-3c1f0b7b2a11"),
        (
            "x-forwarded-client-cert",
            "By=spiffe://evil/x;URI=spiffe://evil/y",
        ),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("xfcc");
    g.bench_function("value_short", |b| {
        b.iter(|| xfcc_value(black_box(OWN), black_box(PEER)))
    });
    g.bench_function("value_long", |b| {
        b.iter(|| xfcc_value(black_box(OWN), black_box(LONG_PEER)))
    });
    // What the inbound does per request: the value is built once per connection, then
    // each request's forged header is replaced by the prepared value (`proxy::set_xfcc`).
    let prepared = xfcc_value(OWN, PEER);
    g.bench_function("replace_forged_in_headers", |b| {
        b.iter_batched_ref(
            headers,
            |h| set_xfcc(h, prepared.as_ref()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn prove_shape() {
    let v = xfcc_value(OWN, PEER).expect("valid header value");
    assert_eq!(v.to_str().expect("ascii"), format!("By={OWN};URI={PEER}"));
    let mut h = headers();
    set_xfcc(&mut h, Some(&v));
    let all: Vec<_> = h.get_all("x-forwarded-client-cert").iter().collect();
    assert_eq!(all, [&v], "the forged value is gone, ours is the only one");
    println!("xfcc: {}", v.to_str().expect("ascii"));
}

criterion_group!(benches, bench);

fn main() {
    prove_shape();
    benches();
    Criterion::default().configure_from_args().final_summary();
}
