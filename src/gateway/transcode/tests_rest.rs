//! Tables for the REST surface: `google.api.http` templates, bindings, path variables.

use super::http_rule::{self, Capture, Segment, TemplateError};
use super::{Call, TranscodeError, Transcoder};
use crate::config::TranscodingConfig;
use http::Method;
use serde_json::{json, Value};
use std::path::Path;

pub(super) const BOOKS: &str = r#"syntax = "proto3";
package rest.v1;
import "google/api/annotations.proto";
import "google/protobuf/any.proto";
import "google/protobuf/duration.proto";
import "google/protobuf/field_mask.proto";
import "google/protobuf/struct.proto";
import "google/protobuf/timestamp.proto";
import "google/protobuf/wrappers.proto";
service Books {
  rpc GetBook(GetBookRequest) returns (Book) {
    option (google.api.http) = {get: "/v1/{name=shelves/*/books/*}"};
  }
  rpc ArchiveBook(GetBookRequest) returns (Book) {
    option (google.api.http) = {post: "/v1/{name=shelves/*/books/*}:archive"};
  }
  rpc UpdateBook(UpdateBookRequest) returns (Book) {
    option (google.api.http) = {patch: "/v1/{book.name=shelves/*/books/*}" body: "book"};
  }
  rpc CreateBook(CreateBookRequest) returns (Book) {
    option (google.api.http) = {
      post: "/v1/shelves/{shelf}/books" body: "*"
      additional_bindings {custom: {kind: "PUT" path: "/v1/books"} body: "book"}
    };
  }
  rpc ListBooks(ListBooksRequest) returns (stream Book) {
    option (google.api.http) = {
      get: "/v1/shelves/{shelf}/books"
      additional_bindings {get: "/v1/pages/{shelf}/{page=**}"}
    };
  }
  rpc Title(GetBookRequest) returns (Book) {
    option (google.api.http) = {get: "/v1/titles/{name}" response_body: "title"};
  }
}
enum Genre { GENRE_UNSPECIFIED = 0; NOVEL = 1; }
message Note { string text = 1; }
message Book {
  string name = 1;
  string title = 2;
  int64 pages = 3;
  Genre genre = 4;
  google.protobuf.Timestamp published = 5;
  google.protobuf.Duration read_time = 6;
  google.protobuf.Int32Value rating = 7;
  google.protobuf.Struct extra = 8;
  google.protobuf.FieldMask mask = 9;
  google.protobuf.Any note = 10;
  google.protobuf.StringValue subtitle = 11;
}
message GetBookRequest { string name = 1; }
message UpdateBookRequest { Book book = 1; google.protobuf.FieldMask update_mask = 2; }
message CreateBookRequest { int32 shelf = 1; Book book = 2; bool draft = 3; }
message ListBooksRequest { int32 shelf = 1; string page = 2; uint32 page_size = 3; }
"#;

/// Writes `proto` as `name` beside a copy of the repo's google/api protos.
pub(super) fn write_protos(dir: &Path, name: &str, proto: &str) -> std::path::PathBuf {
    let api = dir.join("google/api");
    std::fs::create_dir_all(&api).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/google/api");
    for f in ["annotations.proto", "http.proto"] {
        std::fs::copy(repo.join(f), api.join(f)).unwrap();
    }
    let path = dir.join(name);
    std::fs::write(&path, proto).unwrap();
    path
}

pub(super) fn config(proto: std::path::PathBuf, service: &str) -> TranscodingConfig {
    TranscodingConfig {
        protos: vec![proto],
        import_paths: vec![],
        descriptor_set: None,
        services: vec![service.into()],
        ignore_unknown_fields: false,
        emit_defaults: false,
        preserve_proto_field_names: false,
        max_body: 1024,
    }
}

pub(super) fn books() -> (Transcoder, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let proto = write_protos(dir.path(), "books.proto", BOOKS);
    (
        Transcoder::new(&config(proto, "rest.v1.Books")).unwrap(),
        dir,
    )
}

#[test]
fn templates_parse_into_segments_variables_and_verb() {
    use Segment::{Literal as L, One, Rest};
    let lit = |s: &str| L(s.into());
    /// The template, its segments, its variables (name, start, end) and its verb.
    type Case<'a> = (
        &'a str,
        Vec<Segment>,
        Vec<(&'a str, usize, usize)>,
        Option<&'a str>,
    );
    let table: [Case; 6] = [
        (
            "/v1/payments",
            vec![lit("v1"), lit("payments")],
            vec![],
            None,
        ),
        (
            "/v1/payments/{payment_id}",
            vec![lit("v1"), lit("payments"), One],
            vec![("payment_id", 2, 3)],
            None,
        ),
        (
            "/v1/payments/{payment_id}:refund",
            vec![lit("v1"), lit("payments"), One],
            vec![("payment_id", 2, 3)],
            Some("refund"),
        ),
        (
            "/v1/{parent=customers/*}/payments",
            vec![lit("v1"), lit("customers"), One, lit("payments")],
            vec![("parent", 1, 3)],
            None,
        ),
        (
            "/v1/{book.name=shelves/*/books/*}",
            vec![lit("v1"), lit("shelves"), One, lit("books"), One],
            vec![("book.name", 1, 5)],
            None,
        ),
        (
            "/files/*/{path=**}:get",
            vec![lit("files"), One, Rest],
            vec![("path", 2, 3)],
            Some("get"),
        ),
    ];
    for (text, segments, vars, verb) in table {
        let t = http_rule::parse(text).unwrap();
        assert_eq!(t.segments, segments, "{text}");
        let got: Vec<(String, usize, usize)> = t
            .variables
            .iter()
            .map(|v| (v.name(), v.start, v.end))
            .collect();
        let want: Vec<(String, usize, usize)> = vars
            .iter()
            .map(|(n, s, e)| (n.to_string(), *s, *e))
            .collect();
        assert_eq!(got, want, "{text}");
        assert_eq!(t.verb.as_deref(), verb, "{text}");
    }
}

#[test]
fn bad_templates_are_refused_with_the_reason() {
    let table = [
        ("v1/payments", TemplateError::NoLeadingSlash),
        ("/v1//payments", TemplateError::EmptySegment),
        ("/v1/payments/", TemplateError::EmptySegment),
        ("/v1/{name", TemplateError::Unclosed),
        ("/v1/{a={b}}", TemplateError::Braces(7)),
        ("/v1/x}", TemplateError::Braces(5)),
        ("/v1/x{id}", TemplateError::PartialVariable("x{id}".into())),
        ("/v1/**/x", TemplateError::RestNotLast),
        ("/v1/{1a}", TemplateError::BadFieldPath("1a".into())),
        ("/v1/{a.}", TemplateError::BadFieldPath("a.".into())),
        ("/{a}/{a}", TemplateError::Duplicate("a".into())),
        ("/v1/x:", TemplateError::EmptyVerb),
    ];
    for (text, want) in table {
        assert_eq!(http_rule::parse(text), Err(want), "{text}");
    }
}

#[test]
fn paths_match_templates_and_capture_their_variables() {
    let table: [(&str, &str, Option<Vec<&str>>); 12] = [
        ("/v1/payments", "/v1/payments", Some(vec![])),
        ("/v1/payments", "/v1/payments/x", None),
        ("/v1/payments/{id}", "/v1/payments/p-1", Some(vec!["p-1"])),
        ("/v1/payments/{id}", "/v1/payments/", None),
        ("/v1/payments/{id}", "/v1/payments/a/b", None),
        (
            "/v1/payments/{id}:refund",
            "/v1/payments/p-1:refund",
            Some(vec!["p-1"]),
        ),
        ("/v1/payments/{id}:refund", "/v1/payments/p-1", None),
        (
            "/v1/{parent=customers/*}/payments",
            "/v1/customers/u1/payments",
            Some(vec!["customers/u1"]),
        ),
        (
            "/v1/{parent=customers/*}/payments",
            "/v1/shops/u1/payments",
            None,
        ),
        ("/f/{path=**}", "/f/a/b/c", Some(vec!["a/b/c"])),
        ("/f/{path=**}", "/f", Some(vec![""])),
        ("/v1/*/x", "/v1/any/x", Some(vec![])),
    ];
    for (template, path, want) in table {
        let t = http_rule::parse(template).unwrap();
        let got = t
            .matches(path)
            .map(|c| c.into_iter().map(|c| c.raw).collect::<Vec<_>>());
        let want = want.map(|w| w.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(got, want, "{template} {path}");
    }
}

#[test]
fn captures_are_percent_decoded() {
    let cap = |raw: &str, multi| Capture {
        field: vec!["f".into()],
        raw: raw.into(),
        multi_segment: multi,
    };
    let table = [
        (cap("a%20b", false), Some("a b")),
        (cap("caf%C3%A9", false), Some("café")),
        (cap("a%2Fb", false), Some("a/b")),
        (cap("x/a%2Fb", true), Some("x/a%2Fb")),
        (cap("%FF", false), None),
        (cap("100%", false), Some("100%")),
    ];
    for (c, want) in table {
        assert_eq!(http_rule::decode(&c).as_deref(), want, "{}", c.raw);
    }
}

/// The gRPC method and the captured text a request finds, or none.
fn found(t: &Transcoder, method: Method, path: &str) -> Option<(String, Vec<String>)> {
    let call = t.lookup(&method, path)?.unwrap();
    let caps = call.captures.iter().map(|c| c.raw.clone()).collect();
    Some((call.method.name().to_string(), caps))
}

#[test]
fn rest_paths_find_their_methods() {
    let (t, _dir) = books();
    let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let table = [
        (
            Method::GET,
            "/v1/shelves/1/books/2",
            Some(("GetBook", s(&["shelves/1/books/2"]))),
        ),
        (
            Method::POST,
            "/v1/shelves/1/books/2:archive",
            Some(("ArchiveBook", s(&["shelves/1/books/2"]))),
        ),
        (
            Method::PATCH,
            "/v1/shelves/1/books/2",
            Some(("UpdateBook", s(&["shelves/1/books/2"]))),
        ),
        (
            Method::POST,
            "/v1/shelves/9/books",
            Some(("CreateBook", s(&["9"]))),
        ),
        (Method::PUT, "/v1/books", Some(("CreateBook", s(&[])))),
        (
            Method::GET,
            "/v1/shelves/9/books",
            Some(("ListBooks", s(&["9"]))),
        ),
        (
            Method::GET,
            "/v1/pages/9/a/b",
            Some(("ListBooks", s(&["9", "a/b"]))),
        ),
        (
            Method::GET,
            "/rest.v1.Books/GetBook",
            Some(("GetBook", s(&[]))),
        ),
        (Method::DELETE, "/v1/shelves/1/books/2", None),
        (Method::GET, "/v1/nothing", None),
    ];
    for (method, path, want) in table {
        let want = want.map(|(m, c)| (m.to_string(), c));
        assert_eq!(found(&t, method.clone(), path), want, "{method} {path}");
    }
    let call = t
        .lookup(&Method::GET, "/v1/shelves/1/books/2")
        .unwrap()
        .unwrap();
    assert_eq!(call.grpc_path(), "/rest.v1.Books/GetBook");
}

/// The request message a REST call makes, as JSON (proto names), or the error.
fn rest_request(t: &Transcoder, method: Method, path: &str, body: &str) -> Result<Value, String> {
    let (path, query) = path.split_once('?').unwrap_or((path, ""));
    let call: Call = t.lookup(&method, path).unwrap().unwrap();
    let msg = t
        .call_message(&call, body.as_bytes(), query)
        .map_err(|e: TranscodeError| e.to_string())?;
    let opts = prost_reflect::SerializeOptions::new().use_proto_field_name(true);
    Ok(msg
        .serialize_with_options(serde_json::value::Serializer, &opts)
        .unwrap())
}

#[test]
fn path_variables_body_and_query_fill_the_request() {
    let (t, _dir) = books();
    let table = [
        (
            Method::GET,
            "/v1/shelves/1/books/2",
            "",
            json!({"name": "shelves/1/books/2"}),
        ),
        (
            Method::PATCH,
            "/v1/shelves/1/books/2?update_mask=title",
            r#"{"title": "Dune", "name": "ignored"}"#,
            json!({"book": {"name": "shelves/1/books/2", "title": "Dune"}, "update_mask": "title"}),
        ),
        (
            Method::POST,
            "/v1/shelves/7/books?draft=true",
            r#"{"book": {"title": "Emma"}, "shelf": 3}"#,
            json!({"shelf": 7, "book": {"title": "Emma"}, "draft": true}),
        ),
        (
            Method::PUT,
            "/v1/books?shelf=4",
            r#"{"pages": 12}"#,
            json!({"shelf": 4, "book": {"pages": "12"}}),
        ),
        (
            Method::GET,
            "/v1/pages/5/a%20b/c?page_size=2",
            "",
            json!({"shelf": 5, "page": "a b/c", "page_size": 2}),
        ),
        (
            Method::GET,
            "/v1/titles/caf%C3%A9",
            "",
            json!({"name": "café"}),
        ),
    ];
    for (method, path, body, want) in table {
        assert_eq!(
            rest_request(&t, method.clone(), path, body),
            Ok(want),
            "{method} {path}"
        );
    }
    let bad = [
        (
            Method::GET,
            "/v1/shelves/x/books",
            "",
            "shelf: expected an integer",
        ),
        (
            Method::GET,
            "/v1/shelves/%FF/books",
            "",
            "path variable shelf: not UTF-8 once percent-decoded",
        ),
        (
            Method::GET,
            "/v1/shelves/1/books/2",
            "{}",
            "rest.v1.Books.GetBook takes no request body (its google.api.http rule has no `body`)",
        ),
        (
            Method::PATCH,
            "/v1/shelves/1/books/2",
            r#"{"pages": "many"}"#,
            "book.pages: expected an integer",
        ),
        (
            Method::GET,
            "/v1/shelves/1/books?nope=1",
            "",
            "query parameter nope: no field `nope`",
        ),
    ];
    for (method, path, body, want) in bad {
        let got = rest_request(&t, method.clone(), path, body).unwrap_err();
        assert!(got.starts_with(want), "{method} {path}: {got}");
    }
}

#[test]
fn bad_rules_name_the_method_and_the_template() {
    let table = [
        (r#"get: "/v1/{name""#, "bad.proto:5:3: rest.v1.Bad.Get: google.api.http `/v1/{name`: a `{` is not closed"),
        (
            r#"get: "/v1/{nope}""#,
            "bad.proto:5:3: rest.v1.Bad.Get: google.api.http `/v1/{nope}`: `nope` is not a field of the request",
        ),
        (
            r#"post: "/v1/x" body: "nope""#,
            "bad.proto:5:3: rest.v1.Bad.Get: google.api.http `/v1/x`: `nope` (body) is not a field of the request",
        ),
        (
            r#"get: "/v1/x" response_body: "nope""#,
            "bad.proto:5:3: rest.v1.Bad.Get: google.api.http `/v1/x`: response_body `nope` is not a field of the answer",
        ),
    ];
    for (rule, want) in table {
        let dir = tempfile::tempdir().unwrap();
        let proto = format!(
            "syntax = \"proto3\";\npackage rest.v1;\nimport \"google/api/annotations.proto\";\nservice Bad {{\n  rpc Get(M) returns (M) {{ option (google.api.http) = {{{rule}}}; }}\n}}\nmessage M {{ string name = 1; }}\n"
        );
        let path = write_protos(dir.path(), "bad.proto", &proto);
        let err = Transcoder::new(&config(path, "rest.v1.Bad")).err().unwrap();
        assert_eq!(
            err.to_string(),
            format!("gateway.transcoding: {want}"),
            "{rule}"
        );
    }
}
