use super::rules::{self, FrameError, Payload, QueryError};
use super::{TranscodeError, Transcoder};
use crate::config::TranscodingConfig;
use crate::proxy::ProxyBody;
use http::StatusCode;
use serde_json::{json, Value};

const TEST_PROTO: &str = r#"syntax = "proto3";
package shop.v1;
import "google/protobuf/timestamp.proto";
service Shop {
  rpc Find(FindRequest) returns (FindResponse);
  rpc Watch(FindRequest) returns (stream FindResponse);
  rpc Upload(stream FindRequest) returns (FindResponse);
}
enum Color { COLOR_UNSPECIFIED = 0; RED = 1; }
message Filter { int32 min_price = 1; bool in_stock = 2; }
message FindRequest {
  string query_text = 1;
  repeated string tags = 2;
  Filter filter = 3;
  Color color = 4;
  int64 limit = 5;
  double ratio = 6;
  google.protobuf.Timestamp since = 7;
}
message FindResponse { repeated string ids = 1; int64 total = 2; }
"#;

/// A transcoder for `shop.v1.Shop` (the proto written to a temporary folder).
pub fn shop(tweak: impl FnOnce(&mut TranscodingConfig)) -> (Transcoder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("shop.proto");
    std::fs::write(&proto, TEST_PROTO).unwrap();
    let mut config = TranscodingConfig {
        protos: vec![proto],
        import_paths: vec![],
        descriptor_set: None,
        services: vec!["shop.v1.Shop".into()],
        ignore_unknown_fields: false,
        emit_defaults: false,
        preserve_proto_field_names: false,
        max_body: 1024,
    };
    tweak(&mut config);
    (Transcoder::new(&config).unwrap(), dir)
}

#[test]
fn content_types_that_are_json() {
    let table = [
        (None, Payload::Json),
        (Some("application/json"), Payload::Json),
        (Some("application/json; charset=utf-8"), Payload::Json),
        (Some("Application/JSON"), Payload::Json),
        (Some("text/plain"), Payload::Unsupported),
        (
            Some("application/x-www-form-urlencoded"),
            Payload::Unsupported,
        ),
    ];
    for (ct, want) in table {
        assert_eq!(rules::payload(ct), want, "{ct:?}");
    }
}

#[test]
fn grpc_codes_become_http_statuses() {
    let table = [
        (0, 200),
        (3, 400),
        (16, 401),
        (7, 403),
        (5, 404),
        (6, 409),
        (8, 429),
        (14, 503),
        (4, 504),
        (12, 501),
        (2, 500),
        (13, 500),
        (99, 500),
    ];
    for (code, want) in table {
        assert_eq!(rules::http_status(code).as_u16(), want, "grpc {code}");
    }
}

#[test]
fn frames_round_trip_and_bad_ones_are_named() {
    let framed = rules::frame(b"abc");
    assert_eq!(&framed[..], &[0, 0, 0, 0, 3, b'a', b'b', b'c']);
    assert_eq!(rules::unframe(&framed), Ok(&b"abc"[..]));
    assert_eq!(rules::unframe(&rules::frame(b"")), Ok(&b""[..]));
    let table: [(&[u8], FrameError); 4] = [
        (b"", FrameError::Empty),
        (&[0, 0, 0], FrameError::Short { have: 3, want: 5 }),
        (&[1, 0, 0, 0, 1, 7], FrameError::Compressed),
        (&[0, 0, 0, 0, 9, 7], FrameError::Short { have: 1, want: 9 }),
    ];
    for (body, want) in table {
        assert_eq!(rules::unframe(body), Err(want), "{body:?}");
    }
}

#[test]
fn grpc_messages_are_percent_decoded() {
    let table = [
        ("plain", "plain"),
        ("no%20such%20payment", "no such payment"),
        ("caf%C3%A9", "café"),
        ("100%", "100%"),
        ("%zz", "%zz"),
    ];
    for (raw, want) in table {
        assert_eq!(rules::grpc_message_decode(raw.as_bytes()), want, "{raw}");
    }
}

#[test]
fn query_parameters_fill_fields_by_their_type() {
    let (t, _dir) = shop(|_| {});
    let desc = t
        .compiled
        .load()
        .pool
        .get_message_by_name("shop.v1.FindRequest")
        .unwrap();
    let table = [
        ("", json!({})),
        ("query_text=red+shoes", json!({"query_text": "red shoes"})),
        ("queryText=a%26b", json!({"queryText": "a&b"})),
        ("tags=a&tags=b", json!({"tags": ["a", "b"]})),
        ("tags=a", json!({"tags": ["a"]})),
        (
            "filter.min_price=5&filter.inStock=true",
            json!({"filter": {"min_price": "5", "inStock": true}}),
        ),
        ("color=RED&limit=10", json!({"color": "RED", "limit": "10"})),
        ("color=1&ratio=0.5", json!({"color": 1, "ratio": 0.5})),
        (
            "since=2026-01-01T00:00:00Z",
            json!({"since": "2026-01-01T00:00:00Z"}),
        ),
    ];
    for (query, want) in table {
        let got = rules::query_json(&desc, query, false).unwrap();
        assert_eq!(Value::Object(got), want, "{query}");
    }
}

#[test]
fn bad_query_parameters_are_named() {
    let (t, _dir) = shop(|_| {});
    let desc = t
        .compiled
        .load()
        .pool
        .get_message_by_name("shop.v1.FindRequest")
        .unwrap();
    let table = [
        ("nope=1", "query parameter nope: no field `nope`"),
        (
            "filter.nope=1",
            "query parameter filter.nope: no field `nope`",
        ),
        (
            "tags.x=1",
            "query parameter tags.x: `tags` is not a message",
        ),
        (
            "filter.in_stock=yes",
            "query parameter filter.in_stock: `yes` is not a boolean (true or false)",
        ),
        (
            "ratio=half",
            "query parameter ratio: `half` is not a number",
        ),
    ];
    for (query, want) in table {
        let got: Result<_, QueryError> = rules::query_json(&desc, query, false);
        assert_eq!(got.unwrap_err().to_string(), want, "{query}");
    }
    assert!(rules::query_json(&desc, "nope=1", true).unwrap().is_empty());
}

#[test]
fn the_body_wins_over_the_query() {
    let table = [
        (json!({}), json!({"a": 1}), json!({"a": 1})),
        (json!({"a": 2}), json!({"a": 1}), json!({"a": 2})),
        (
            json!({"f": {"x": 1}}),
            json!({"f": {"y": 2}, "z": 3}),
            json!({"f": {"x": 1, "y": 2}, "z": 3}),
        ),
    ];
    for (body, query, want) in table {
        let (Value::Object(mut body), Value::Object(query)) = (body, query) else {
            unreachable!()
        };
        rules::merge_query(&mut body, query);
        assert_eq!(Value::Object(body), want);
    }
}

#[test]
fn methods_of_exposed_services_only() {
    let (t, _dir) = shop(|_| {});
    assert!(t.method("/shop.v1.Shop/Find").unwrap().is_ok());
    assert!(t.method("/other.v1.Other/Find").is_none());
    assert!(t.method("/healthz").is_none());
    let missing = t.method("/shop.v1.Shop/Nope").unwrap().unwrap_err();
    assert_eq!(missing.status().0, StatusCode::NOT_FOUND);
    assert_eq!(missing.to_string(), "shop.v1.Shop has no method Nope");
    // Server streams are transcoded (see `stream`); client streams are not.
    assert!(t.method("/shop.v1.Shop/Watch").unwrap().is_ok());
    let streaming = t.method("/shop.v1.Shop/Upload").unwrap().unwrap_err();
    assert_eq!(streaming.status().0, StatusCode::NOT_IMPLEMENTED);
}

/// The request message a body and query make, as JSON again (proto names), or the error.
fn read(t: &Transcoder, body: &str, query: &str) -> Result<Value, String> {
    let desc = t
        .compiled
        .load()
        .pool
        .get_message_by_name("shop.v1.FindRequest")
        .unwrap();
    let msg = t
        .request_message(&desc, body.as_bytes(), query)
        .map_err(|e: TranscodeError| e.to_string())?;
    let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    let mut out = Vec::new();
    msg.serialize_with_options(&mut serde_json::Serializer::new(&mut out), &opts)
        .unwrap();
    Ok(serde_json::from_slice(&out).unwrap())
}

#[test]
fn json_bodies_and_queries_fill_the_request() {
    let (t, _dir) = shop(|_| {});
    let table = [
        ("", "", json!({})),
        ("  ", "", json!({})),
        (
            r#"{"queryText": "shoes", "limit": "7"}"#,
            "",
            json!({"query_text": "shoes", "limit": "7"}),
        ),
        (
            r#"{"query_text": "shoes", "limit": 7, "color": "RED"}"#,
            "tags=x",
            json!({"query_text": "shoes", "limit": "7", "color": "RED", "tags": ["x"]}),
        ),
        (
            r#"{"filter": {"minPrice": 3}, "since": "2026-01-01T00:00:00Z"}"#,
            "filter.in_stock=true",
            json!({"filter": {"min_price": 3, "in_stock": true}, "since": "2026-01-01T00:00:00Z"}),
        ),
        ("", "color=1", json!({"color": "RED"})),
    ];
    for (body, query, want) in table {
        assert_eq!(read(&t, body, query), Ok(want), "{body} ? {query}");
    }
}

#[test]
fn bad_bodies_are_named_with_position_or_field() {
    let (t, _dir) = shop(|_| {});
    let table = [
        (
            r#"{"limit": 1"#,
            "malformed JSON: EOF while parsing an object at line 1 column 11",
        ),
        ("[1]", "the JSON body must be an object, not an array"),
        (r#"{"nope": 1}"#, "nope: unrecognized field name 'nope'"),
        (
            r#"{"limit": "many"}"#,
            "limit: expected an integer (invalid digit found in string)",
        ),
        (r#"{"tags": "x"}"#, "tags: expected a list, each a string ("),
        (
            r#"{"color": "BLUE"}"#,
            "color: expected a shop.v1.Color name or number (",
        ),
        (
            r#"{"filter": {"minPrice": "x"}}"#,
            "filter.minPrice: expected an integer",
        ),
    ];
    for (body, want) in table {
        let got = read(&t, body, "").unwrap_err();
        assert!(got.starts_with(want), "{body}: {got}");
    }
    let (lenient, _dir) = shop(|c| c.ignore_unknown_fields = true);
    assert_eq!(read(&lenient, r#"{"nope": 1}"#, "nope=2"), Ok(json!({})));
}

#[test]
fn a_service_missing_from_the_protos_stops_the_start() {
    let dir = tempfile::tempdir().unwrap();
    let proto = dir.path().join("shop.proto");
    std::fs::write(&proto, TEST_PROTO).unwrap();
    let config = TranscodingConfig {
        protos: vec![proto],
        import_paths: vec![],
        descriptor_set: None,
        services: vec!["shop.v1.Nope".into()],
        ignore_unknown_fields: false,
        emit_defaults: false,
        preserve_proto_field_names: false,
        max_body: 1024,
    };
    let err = Transcoder::new(&config).err().unwrap();
    assert_eq!(
        err.to_string(),
        "gateway.transcoding: no service `shop.v1.Nope` in the protos"
    );
}

#[test]
fn a_descriptor_set_serves_as_the_protos() {
    // `protoc --include_imports -o api.pb` output instead of the .proto files.
    let (t, dir) = shop(|_| {});
    let set = dir.path().join("api.pb");
    std::fs::write(&set, t.compiled.load().pool.encode_to_vec()).unwrap();
    let (from_set, _dir) = shop(|c| {
        c.protos.clear();
        c.descriptor_set = Some(set);
    });
    assert!(from_set.method("/shop.v1.Shop/Find").unwrap().is_ok());
    assert_eq!(
        read(&from_set, r#"{"limit": 3}"#, "tags=a"),
        Ok(json!({"limit": "3", "tags": ["a"]}))
    );
}

/// An app's unary answer: `grpc-status` (and `grpc-message`) in the headers, a body.
pub fn app_answer(status: u32, message: &str, body: bytes::Bytes) -> http::Response<ProxyBody> {
    let mut resp = http::Response::new(http_body_util::Either::Right(http_body_util::Full::new(
        body,
    )));
    let h = resp.headers_mut();
    h.insert("grpc-status", status.into());
    h.insert("grpc-message", message.parse().unwrap());
    resp
}

/// What a JSON client reads: status and body.
fn answered(t: &Transcoder, resp: http::Response<ProxyBody>) -> (u16, Value) {
    use http_body_util::BodyExt;
    let call = t
        .lookup(&http::Method::POST, "/shop.v1.Shop/Find")
        .unwrap()
        .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async {
        let resp = t.to_json(&call, resp).await;
        let ct = resp.headers()[http::header::CONTENT_TYPE].clone();
        assert_eq!(ct, "application/json");
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    })
}

#[test]
fn answers_come_back_as_json() {
    use prost::Message;
    let (t, _dir) = shop(|_| {});
    let desc = t
        .compiled
        .load()
        .pool
        .get_message_by_name("shop.v1.FindResponse")
        .unwrap();
    let message = prost_reflect::DynamicMessage::deserialize(desc, json!({"ids": ["a"]}))
        .unwrap()
        .encode_to_vec();
    let ok = || app_answer(0, "", rules::frame(&message));
    assert_eq!(answered(&t, ok()), (200, json!({"ids": ["a"]})));
    let (t_all, _dir) = shop(|c| {
        c.emit_defaults = true;
        c.preserve_proto_field_names = true;
    });
    assert_eq!(
        answered(&t_all, ok()),
        (200, json!({"ids": ["a"], "total": "0"}))
    );
    let table = [
        (5, "no%20such%20thing", 404, "no such thing"),
        (3, "bad", 400, "bad"),
        (16, "who", 401, "who"),
        (14, "down", 503, "down"),
        (13, "oops", 500, "oops"),
    ];
    for (code, raw, status, message) in table {
        let got = answered(&t, app_answer(code, raw, bytes::Bytes::new()));
        assert_eq!(
            got,
            (status, json!({"code": code, "message": message})),
            "{code}"
        );
    }
    let garbage = app_answer(0, "", bytes::Bytes::from_static(&[0, 0, 0, 0, 9, 1]));
    let (status, body) = answered(&t, garbage);
    assert_eq!(status, 502, "{body}");
    assert_eq!(
        body["message"],
        json!("the gRPC answer is cut short: 1 bytes of a 9-byte message")
    );
}
