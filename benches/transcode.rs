//! The gateway's JSON transcoding of the design's CreatePayment, without the network:
//! `to_grpc` (the JSON body read, checked and made one framed gRPC message) and
//! `to_json` (the app's framed Payment made the JSON a web client reads), then both.
//!
//! `main` first checks the round trip gives the JSON the demo's tour shows.

use bytes::Bytes;
use criterion::{criterion_group, Criterion};
use http::{Method, Request, Response};
use http_body_util::{BodyExt, Either, Full};
use meshd::config::TranscodingConfig;
use meshd::gateway::Transcoder;
use meshd::pb::payment::{Payment, PaymentStatus};
use meshd::proxy::{H2Body, ProxyBody};
use prost::Message;
use std::hint::black_box;
use std::path::PathBuf;

/// The design's request body, verbatim.
const DESIGN_BODY: &str = r#"{"amount": 2999, "currency": "usd", "payment_method": "credit_card", "customer_id": "user_123"}"#;
const PATH: &str = "/payment.v1.PaymentService/CreatePayment";

/// The demo's gateway transcoder: payment.proto compiled in-process.
fn transcoder() -> Transcoder {
    let proto = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("proto/payment.proto");
    let yaml = format!(
        "{{protos: [{}], services: [payment.v1.PaymentService]}}",
        proto.display()
    );
    let config: TranscodingConfig = serde_yaml_ng::from_str(&yaml).expect("transcoding config");
    Transcoder::new(&config).expect("payment.proto compiles")
}

/// A web client's POST of the design's body.
fn json_request() -> Request<H2Body> {
    Request::builder()
        .method(Method::POST)
        .uri(PATH)
        .header("content-type", "application/json")
        .body(H2Body::fixed(Bytes::from_static(DESIGN_BODY.as_bytes())))
        .expect("request")
}

/// The payment app's answer: one framed Payment with grpc-status 0.
fn app_answer(framed: &Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(framed.clone())));
    resp.headers_mut().insert("grpc-status", 0.into());
    resp
}

fn framed_payment() -> Bytes {
    let p = Payment {
        payment_id: "pay-c85fc70404fab49d".into(),
        amount_cents: 2999,
        currency: "usd".into(),
        contact_name: "Contact user_123".into(),
        identity_chain: vec![
            "spiffe://jia.app/api-gateway".into(),
            "spiffe://jia.app/payment-service".into(),
            "spiffe://jia.app/payment-service".into(),
            "spiffe://jia.app/payment-service".into(),
        ],
        payment_method: "credit_card".into(),
        customer_id: "user_123".into(),
        status: PaymentStatus::Created.into(),
        created_at: Some(prost_types::Timestamp {
            seconds: 1_796_000_000,
            nanos: 438_242_698,
        }),
        ..Default::default()
    };
    let msg = p.encode_to_vec();
    let mut framed = vec![0u8];
    framed.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    framed.extend_from_slice(&msg);
    Bytes::from(framed)
}

async fn round_trip(t: &Transcoder, framed: &Bytes) -> Bytes {
    let found = t.lookup(&Method::POST, PATH).expect("an exposed method");
    let (grpc, call) = t.to_grpc(found, json_request()).await.expect("to_grpc");
    black_box(grpc);
    let resp = t.to_json(&call, app_answer(framed)).await;
    resp.into_body().collect().await.expect("body").to_bytes()
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let t = transcoder();
    let framed = framed_payment();
    c.bench_function("transcode/CreatePayment JSON -> gRPC", |b| {
        b.iter(|| {
            rt.block_on(async {
                let found = t.lookup(&Method::POST, PATH).expect("an exposed method");
                black_box(t.to_grpc(found, json_request()).await.expect("to_grpc"))
            })
        })
    });
    let found = t.lookup(&Method::POST, PATH).expect("an exposed method");
    let (_, call) = rt
        .block_on(t.to_grpc(found, json_request()))
        .expect("to_grpc");
    c.bench_function("transcode/Payment gRPC -> JSON", |b| {
        b.iter(|| {
            rt.block_on(async {
                let resp = t.to_json(&call, app_answer(&framed)).await;
                black_box(resp.into_body().collect().await.expect("body").to_bytes())
            })
        })
    });
    c.bench_function("transcode/CreatePayment round trip", |b| {
        b.iter(|| rt.block_on(round_trip(&t, &framed)))
    });
}

criterion_group!(benches, bench);

fn main() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let json = rt.block_on(round_trip(&transcoder(), &framed_payment()));
    let v: serde_json::Value = serde_json::from_slice(&json).expect("JSON");
    assert_eq!(v["amountCents"], "2999", "{v}");
    assert_eq!(v["customerId"], "user_123", "{v}");
    assert_eq!(v["status"], "PAYMENT_STATUS_CREATED", "{v}");
    assert_eq!(v["createdAt"], "2026-11-30T00:53:20.438242698Z", "{v}");
    benches();
    Criterion::default().configure_from_args().final_summary();
}
