//! Tables for the well-known types, error details, server streams and proto reloads.

use super::status::RpcStatus;
use super::stream::{self, Deframer, Framing};
use super::tests_rest::{books, config, write_protos, BOOKS};
use super::{rules, Transcoder};
use http::Method;
use serde_json::{json, Value};

#[test]
fn well_known_types_and_mappings_read_and_write_as_proto3_json() {
    let (t, _dir) = books();
    let table = [
        (
            json!({"published": "2026-01-02T03:04:05Z"}),
            json!({"published": "2026-01-02T03:04:05Z"}),
        ),
        (
            json!({"published": "2026-01-02T04:04:05.5+01:00"}),
            json!({"published": "2026-01-02T03:04:05.500Z"}),
        ),
        (json!({"read_time": "1.5s"}), json!({"readTime": "1.500s"})),
        (json!({"readTime": "-2s"}), json!({"readTime": "-2s"})),
        (
            json!({"rating": 5, "subtitle": "x"}),
            json!({"rating": 5, "subtitle": "x"}),
        ),
        (json!({"rating": null}), json!({})),
        (
            json!({"extra": {"a": [1, "x", null, {"b": true}]}}),
            json!({"extra": {"a": [1.0, "x", null, {"b": true}]}}),
        ),
        (
            json!({"mask": "title,readTime"}),
            json!({"mask": "title,readTime"}),
        ),
        (
            json!({"note": {"@type": "type.googleapis.com/rest.v1.Note", "text": "hi"}}),
            json!({"note": {"@type": "type.googleapis.com/rest.v1.Note", "text": "hi"}}),
        ),
        (json!({"pages": "7"}), json!({"pages": "7"})),
        (json!({"pages": 7}), json!({"pages": "7"})),
        (json!({"genre": "NOVEL"}), json!({"genre": "NOVEL"})),
        (json!({"genre": 1}), json!({"genre": "NOVEL"})),
    ];
    let call = t.lookup(&Method::PUT, "/v1/books").unwrap().unwrap();
    for (book, want) in table {
        let msg = t
            .call_message(&call, book.to_string().as_bytes(), "")
            .unwrap();
        let book_msg = msg
            .get_field_by_name("book")
            .unwrap()
            .as_message()
            .unwrap()
            .clone();
        let got: Value = serde_json::from_slice(&t.to_json_bytes(&book_msg).unwrap()).unwrap();
        assert_eq!(got, want, "{book}");
    }
    let bad = [
        (
            json!({"published": "yesterday"}),
            "book.published: expected a google.protobuf.Timestamp object",
        ),
        (
            json!({"readTime": "5m"}),
            "book.readTime: expected a google.protobuf.Duration object",
        ),
        (
            json!({"note": {"@type": "type.googleapis.com/rest.v1.Nope"}}),
            "book.note: expected a google.protobuf.Any object",
        ),
    ];
    for (book, want) in bad {
        let err = t
            .call_message(&call, book.to_string().as_bytes(), "")
            .unwrap_err();
        assert!(err.to_string().starts_with(want), "{book}: {err}");
    }
}

#[test]
fn status_details_become_json_details() {
    use base64::Engine;
    use prost::Message;
    let (t, _dir) = books();
    let note = prost_types::Any {
        type_url: "type.googleapis.com/rest.v1.Note".into(),
        value: vec![0x0a, 2, b'h', b'i'],
    };
    let unknown = prost_types::Any {
        type_url: "type.googleapis.com/other.Thing".into(),
        value: vec![1, 2, 3],
    };
    let status = RpcStatus {
        code: 5,
        message: "gone".into(),
        details: vec![note, unknown],
    };
    for engine in [
        base64::engine::general_purpose::STANDARD,
        base64::engine::general_purpose::STANDARD_NO_PAD,
    ] {
        let mut trailers = http::HeaderMap::new();
        trailers.insert("grpc-status", "5".parse().unwrap());
        trailers.insert("grpc-message", "gone".parse().unwrap());
        let b64 = engine.encode(status.encode_to_vec());
        trailers.insert("grpc-status-details-bin", b64.parse().unwrap());
        let resp = t.grpc_error(5, &trailers, &http::HeaderMap::new());
        assert_eq!(resp.status(), 404);
        let body = body_json(resp);
        assert_eq!(
            body,
            json!({"code": 5, "message": "gone", "details": [
                {"@type": "type.googleapis.com/rest.v1.Note", "text": "hi"},
                {"@type": "type.googleapis.com/other.Thing", "value": "AQID"},
            ]})
        );
    }
    let mut garbage = http::HeaderMap::new();
    garbage.insert("grpc-status-details-bin", "!!".parse().unwrap());
    let body = body_json(t.grpc_error(13, &garbage, &http::HeaderMap::new()));
    assert_eq!(body, json!({"code": 13, "message": ""}));
}

fn body_json(resp: http::Response<crate::proxy::ProxyBody>) -> Value {
    use http_body_util::BodyExt;
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let bytes = rt.block_on(resp.into_body().collect()).unwrap().to_bytes();
    serde_json::from_slice(&bytes).unwrap()
}

#[test]
fn accept_picks_the_stream_framing() {
    let table = [
        (None, Framing::Array),
        (Some("application/json"), Framing::Array),
        (Some("application/x-ndjson"), Framing::Lines),
        (
            Some("text/html, application/x-ndjson;q=0.9"),
            Framing::Lines,
        ),
        (Some("*/*"), Framing::Array),
    ];
    for (accept, want) in table {
        let v = accept.map(|a| http::HeaderValue::from_str(a).unwrap());
        assert_eq!(stream::framing(v.as_ref()), want, "{accept:?}");
    }
}

#[test]
fn the_deframer_finds_messages_across_chunks() {
    let a = rules::frame(b"abc");
    let b = rules::frame(b"");
    let c = rules::frame(b"hello");
    let all: Vec<u8> = [&a[..], &b[..], &c[..]].concat();
    for split in [1, 3, 5, 7, all.len()] {
        let mut d = Deframer::default();
        let mut got = Vec::new();
        for chunk in all.chunks(split) {
            d.push(chunk);
            while let Some(m) = d.next_message().unwrap() {
                got.push(m.to_vec());
            }
        }
        assert_eq!(
            got,
            vec![b"abc".to_vec(), vec![], b"hello".to_vec()],
            "{split}"
        );
        assert_eq!(d.leftover(), 0);
    }
    let mut d = Deframer::default();
    d.push(&[1, 0, 0, 0, 0]);
    assert_eq!(d.next_message(), Err(rules::FrameError::Compressed));
}

#[test]
fn streams_are_written_element_by_element_with_a_trailing_error() {
    use http_body::Frame;
    let (t, _dir) = books();
    let call = t
        .lookup(&Method::GET, "/v1/shelves/1/books")
        .unwrap()
        .unwrap();
    let book = |title: &str| {
        let desc = call.method.output();
        let m = prost_reflect::DynamicMessage::deserialize(desc, json!({"title": title})).unwrap();
        rules::frame(&prost::Message::encode_to_vec(&m))
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ok = |code: &str| {
        let mut t = http::HeaderMap::new();
        t.insert("grpc-status", code.parse().unwrap());
        t.insert("grpc-message", "no%20more".parse().unwrap());
        t
    };
    let table = [
        (Framing::Array, "0", r#",{"title":"b"},{"title":"c"}]"#),
        (Framing::Lines, "0", "{\"title\":\"b\"}\n{\"title\":\"c\"}\n"),
        (
            Framing::Array,
            "8",
            r#",{"title":"b"},{"title":"c"},{"error":{"code":8,"message":"no more"}}]"#,
        ),
        (
            Framing::Lines,
            "8",
            "{\"title\":\"b\"}\n{\"title\":\"c\"}\n{\"error\":{\"code\":8,\"message\":\"no more\"}}\n",
        ),
    ];
    for (framing, code, want) in table {
        let (app_tx, app_rx) = tokio::sync::mpsc::channel(8);
        let two = [&book("b")[..], &book("c")[..]].concat();
        // The second message split across two data frames.
        app_tx
            .try_send(Frame::data(bytes::Bytes::copy_from_slice(&two[..9])))
            .unwrap();
        app_tx
            .try_send(Frame::data(bytes::Bytes::copy_from_slice(&two[9..])))
            .unwrap();
        app_tx.try_send(Frame::trailers(ok(code))).unwrap();
        drop(app_tx);
        let (text, trailers) = rt.block_on(t.write_rest(&call, framing, app_rx));
        assert_eq!(text, want, "{framing:?} {code}");
        assert_eq!(trailers.unwrap()["grpc-status"], code);
    }
}

#[test]
fn changed_protos_are_loaded_again_and_bad_ones_keep_the_last_good() {
    let dir = tempfile::tempdir().unwrap();
    let proto = write_protos(dir.path(), "books.proto", BOOKS);
    let t = Transcoder::new(&config(proto.clone(), "rest.v1.Books")).unwrap();
    let files = t.files();
    assert!(files.contains(&proto), "{files:?}");
    assert!(
        files.iter().any(|f| f.ends_with("google/api/http.proto")),
        "{files:?}"
    );
    assert!(t.lookup(&Method::GET, "/v2/titles/x").is_none());

    let touch = |secs: u64| {
        let f = std::fs::File::options().write(true).open(&proto).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(secs))
            .unwrap();
    };
    std::fs::write(
        &proto,
        BOOKS.replace("/v1/titles/{name}", "/v2/titles/{name}"),
    )
    .unwrap();
    touch(10);
    t.follow();
    assert!(t.lookup(&Method::GET, "/v2/titles/x").is_some());
    assert!(t.lookup(&Method::GET, "/v1/titles/x").is_none());

    std::fs::write(&proto, "syntax = \"proto3\"; message {").unwrap();
    touch(20);
    t.follow();
    assert!(t.reload().is_err());
    assert!(
        t.lookup(&Method::GET, "/v2/titles/x").is_some(),
        "the last good protos stay"
    );
}
