//! Fuzzed JSON transcoding against the demo's `proto/payment.proto` (compiled as the
//! gateway compiles it): request paths (gRPC and the REST templates), JSON bodies,
//! query strings, the `google.api.http` templates themselves, and what the app answers
//! (gRPC frames, messages, `grpc-message`, `grpc-status-details-bin`).
//!
//! Properties: nothing panics or hangs (bodies mutated from valid CreatePayment and
//! Refund JSON: truncated, bytes flipped, huge, deeply nested `metadata`, unicode;
//! queries with deep dotted names and broken escapes). A path found is a method of the
//! exposed service; a request message that reads encodes and decodes back to itself
//! and is written as JSON; an answer that decodes is written as JSON; an error answer
//! is always `{"code", "message"}` JSON, whatever its trailers hold.

use super::http_rule::{self, decode};
use super::status::{error_value, RpcStatus};
use super::{rules, Transcoder};
use crate::config::TranscodingConfig;
use crate::telemetry::fuzz_budget::{config, mutated, mutated_bytes, watchdog};
use http::{HeaderMap, HeaderValue, Method};
use proptest::prelude::*;
use prost::Message;
use prost_reflect::{DynamicMessage, ReflectMessage};
use std::path::Path;
use std::sync::OnceLock;

/// The demo's payment API, exposed as the demo gateway exposes it.
fn payment() -> &'static Transcoder {
    static T: OnceLock<Transcoder> = OnceLock::new();
    T.get_or_init(|| {
        let proto = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto");
        let config = TranscodingConfig {
            protos: vec![proto.join("payment.proto")],
            import_paths: vec![proto],
            descriptor_set: None,
            services: vec!["payment.v1.PaymentService".into()],
            ignore_unknown_fields: false,
            emit_defaults: false,
            preserve_proto_field_names: false,
            max_body: 1 << 20,
        };
        Transcoder::new(&config).expect("payment.proto transcodes")
    })
}

const PATHS: &[&str] = &[
    "/payment.v1.PaymentService/CreatePayment",
    "/payment.v1.PaymentService/GetPayment",
    "/v1/payments",
    "/v1/payments/p-1",
    "/v1/payments/p%2F1:refund",
    "/v1/customers/c-1/payments",
    "/v1/pricing-zones",
    "/v1/zones",
];

const BODIES: &[&str] = &[
    r#"{"contactId":"c-1","familyId":"f-1","documentId":"d-1","amountCents":"1250","currency":"EUR","metadata":{"a":{"b":[1,2,{"c":null}]},"d":"é🦀"}}"#,
    r#"{"amount": 100, "customer_id": "c", "payment_method": "card", "metadata": {}}"#,
    r#"{"amountCents": 5, "reason": "late"}"#,
    r#"{"payment_id": "p", "refund": {"amount_cents": "9223372036854775807"}}"#,
    "",
    "[]",
];

const QUERIES: &[&str] = &[
    "page_size=3&parent=customers/c",
    "amountCents=12&metadata.x=1",
    "payment_id=p%20x&refund.reason=a+b",
    "a.b.c.d.e.f.g=1&%zz=%",
];

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn json_requests_read_or_are_refused(
        method in prop::sample::select(vec![Method::GET, Method::POST, Method::PUT, Method::DELETE]),
        path in mutated(PATHS),
        body in mutated(BODIES),
        query in mutated(QUERIES),
    ) {
        let _w = watchdog("transcode request");
        let t = payment();
        let Some(found) = t.lookup(&method, &path) else { return Ok(()) };
        let Ok(call) = found else { return Ok(()) };
        let grpc = call.grpc_path();
        prop_assert!(grpc.starts_with("/payment.v1.PaymentService/"), "{}", grpc);
        for c in &call.captures {
            let _ = decode(c);
        }
        if let Ok(message) = t.call_message(&call, body.as_bytes(), &query) {
            let bytes = message.encode_to_vec();
            // Compared after one decode, not with `message`: proto3 does not tell a field
            // set to its default (a query `payment_id` with no value) from one left unset.
            // And not as bytes: a map (`metadata`, a Struct) is written in no fixed order.
            let back = DynamicMessage::decode(message.descriptor(), bytes.as_slice());
            prop_assert!(back.is_ok(), "the call's own bytes do not decode");
            let back = back.unwrap();
            let again = back.encode_to_vec();
            prop_assert_eq!(again.len(), bytes.len());
            let again = DynamicMessage::decode(message.descriptor(), again.as_slice()).ok();
            prop_assert_eq!(again, Some(back));
            prop_assert!(t.to_json_bytes(&message).is_ok());
        }
    }

    #[test]
    fn app_answers_are_written_as_json_or_refused(
        frame in mutated_bytes(vec![
            rules::frame(&payment_answer()).to_vec(),
            rules::frame(b"").to_vec(),
            vec![1, 0, 0, 0, 1, 7],
        ]),
        message in mutated_bytes(vec![payment_answer()]),
    ) {
        let _w = watchdog("transcode answer");
        let t = payment();
        let Some(Ok(call)) = t.lookup(&Method::GET, "/v1/payments/p-1") else {
            return Err(TestCaseError::fail("GetPayment is exposed"));
        };
        if let Ok(bytes) = rules::unframe(&frame) {
            prop_assert!(bytes.len() + 5 <= frame.len());
        }
        if let Ok(m) = t.decode(&call.method, &message) {
            let _ = t.to_json_bytes(&m);
        }
    }

    #[test]
    fn error_answers_are_always_code_and_message(
        code in any::<u32>(),
        grpc_message in mutated_bytes(vec![b"no%20such%20payment".to_vec(), b"%E2%9C%93 done".to_vec()]),
        details in mutated_bytes(vec![status_details()]),
        as_base64 in any::<bool>(),
    ) {
        let _w = watchdog("transcode error answer");
        let mut trailers = HeaderMap::new();
        if let Ok(v) = HeaderValue::from_bytes(&grpc_message) {
            trailers.insert("grpc-message", v);
        }
        let details = if as_base64 {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD.encode(&details).into_bytes()
        } else {
            details
        };
        if let Ok(v) = HeaderValue::from_bytes(&details) {
            trailers.insert("grpc-status-details-bin", v);
        }
        let t = payment();
        let pool = t.compiled.load().pool.clone();
        let body = error_value(code, &trailers, &HeaderMap::new(), &pool, &t.write);
        prop_assert_eq!(&body["code"], &serde_json::json!(code));
        prop_assert!(body["message"].is_string());
    }

    #[test]
    fn templates_parse_and_match_without_panic(
        template in mutated(&["/v1/{name=shelves/*/books/*}:archive", "/v1/{page=**}", "/v1/payments/{payment_id}:refund", "/v1/{parent=customers/*}/payments"]),
        path in mutated(PATHS),
    ) {
        let _w = watchdog("http_rule::parse");
        if let Ok(t) = http_rule::parse(&template) {
            if let Some(captures) = t.matches(&path) {
                prop_assert_eq!(captures.len(), t.variables.len());
                for c in &captures {
                    let _ = decode(c);
                }
            }
            let _ = t.rank();
        }
    }
}

/// A Payment as the app answers it.
fn payment_answer() -> Vec<u8> {
    let desc = payment()
        .compiled
        .load()
        .pool
        .get_message_by_name("payment.v1.Payment")
        .expect("Payment");
    let json = r#"{"paymentId":"p-1","amountCents":"1250","identityChain":["spiffe://jia.app/api-gateway"],"metadata":{"k":[1,{"n":null}]},"createdAt":"2024-01-01T00:00:00Z"}"#;
    let mut de = serde_json::Deserializer::from_str(json);
    DynamicMessage::deserialize(desc, &mut de)
        .expect("a Payment")
        .encode_to_vec()
}

/// A google.rpc.Status with a detail of a type in the protos and one that is not.
fn status_details() -> Vec<u8> {
    RpcStatus {
        code: 9,
        message: "refund over what is left".into(),
        details: vec![
            prost_types::Any {
                type_url: "type.googleapis.com/payment.v1.Payment".into(),
                value: payment_answer(),
            },
            prost_types::Any {
                type_url: "type.googleapis.com/nope.Nope".into(),
                value: vec![1, 2, 3],
            },
        ],
    }
    .encode_to_vec()
}
