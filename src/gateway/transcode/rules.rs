//! The decisions of transcoding, as plain functions: which requests are JSON calls, how
//! query parameters fill the request message, how a message is framed for gRPC and read
//! back, and which HTTP status a gRPC status becomes.

use bytes::{BufMut, Bytes, BytesMut};
use http::StatusCode;
use prost_reflect::{Kind, MessageDescriptor};
use serde_json::{Map, Value};

/// What a request's content type makes of it at an exposed service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Payload {
    /// A JSON body (or none, e.g. a GET): transcode it.
    Json,
    /// Anything else: 415.
    Unsupported,
}

/// `application/json` (any parameters, e.g. `; charset=utf-8`) is JSON; no content type
/// is JSON too (a GET, or a POST with an empty body: the empty message).
pub fn payload(content_type: Option<&str>) -> Payload {
    let Some(ct) = content_type else {
        return Payload::Json;
    };
    let essence = ct.split(';').next().unwrap_or("").trim();
    if essence.eq_ignore_ascii_case("application/json") {
        Payload::Json
    } else {
        Payload::Unsupported
    }
}

/// The HTTP status for a gRPC status code (google.rpc's mapping, as grpc-gateway and
/// Envoy's transcoder use).
pub fn http_status(grpc_code: u32) -> StatusCode {
    match grpc_code {
        0 => StatusCode::OK,
        1 => StatusCode::from_u16(499).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        3 | 9 | 11 => StatusCode::BAD_REQUEST,
        4 => StatusCode::GATEWAY_TIMEOUT,
        5 => StatusCode::NOT_FOUND,
        6 | 10 => StatusCode::CONFLICT,
        7 => StatusCode::FORBIDDEN,
        8 => StatusCode::TOO_MANY_REQUESTS,
        12 => StatusCode::NOT_IMPLEMENTED,
        14 => StatusCode::SERVICE_UNAVAILABLE,
        16 => StatusCode::UNAUTHORIZED,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// One message in a gRPC frame: no compression, 4-byte big-endian length, the bytes.
pub fn frame(message: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(5 + message.len());
    out.put_u8(0);
    out.put_u32(message.len() as u32);
    out.put_slice(message);
    out.freeze()
}

/// Why a unary gRPC answer's body is not one message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// The body is shorter than its frame header says.
    #[error("the gRPC answer is cut short: {have} bytes of a {want}-byte message")]
    Short { have: usize, want: usize },
    /// The app compressed its answer, which the gateway did not offer to read.
    #[error("the gRPC answer is compressed")]
    Compressed,
    /// No message at all, with status OK.
    #[error("the gRPC answer has no message")]
    Empty,
}

/// The first message of a gRPC body.
pub fn unframe(body: &[u8]) -> Result<&[u8], FrameError> {
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let Some(header) = body.get(..5) else {
        return Err(FrameError::Short {
            have: body.len(),
            want: 5,
        });
    };
    if header[0] != 0 {
        return Err(FrameError::Compressed);
    }
    let want = u32::from_be_bytes([header[1], header[2], header[3], header[4]]) as usize;
    body.get(5..5 + want).ok_or(FrameError::Short {
        have: body.len() - 5,
        want,
    })
}

/// `grpc-message` is percent-encoded (gRPC over HTTP/2 spec); this is the text.
pub fn grpc_message_decode(value: &[u8]) -> String {
    let mut out = Vec::with_capacity(value.len());
    let mut i = 0;
    while i < value.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match value[i..] {
            [b'%', h, l, ..] if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap_or(0) * 16 + hex(l).unwrap_or(0)) as u8);
                i += 3;
            }
            _ => {
                out.push(value[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Why a query parameter does not fill the message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueryError {
    /// No field of that name (proto or JSON name) on the way.
    #[error("query parameter {param}: no field `{field}`")]
    UnknownField { param: String, field: String },
    /// A name with a dot through a field that is not a single message.
    #[error("query parameter {param}: `{field}` is not a message")]
    NotAMessage { param: String, field: String },
    /// A value that is not what the field holds.
    #[error("query parameter {param}: `{value}` is not a {expected}")]
    BadValue {
        param: String,
        value: String,
        expected: &'static str,
    },
}

/// The query string as JSON for `desc`'s message: `a.b=1` is `{"a": {"b": 1}}`, a
/// repeated field gathers every value of its key; values take the JSON type their field
/// reads (booleans, numbers for floats and enum numbers, strings for the rest, which the
/// proto3 JSON mapping accepts for 64-bit integers, enum names and well-known types).
/// Unknown names are an error unless `ignore_unknown`.
pub fn query_json(
    desc: &MessageDescriptor,
    query: &str,
    ignore_unknown: bool,
) -> Result<Map<String, Value>, QueryError> {
    let mut root = Map::new();
    'pairs: for (param, value) in form_urlencoded::parse(query.as_bytes()) {
        let segments: Vec<&str> = param.split('.').collect();
        let mut msg = desc.clone();
        let mut obj = &mut root;
        for (i, seg) in segments.iter().enumerate() {
            let field = msg
                .get_field_by_name(seg)
                .or_else(|| msg.get_field_by_json_name(seg));
            let Some(field) = field else {
                if ignore_unknown {
                    continue 'pairs;
                }
                return Err(QueryError::UnknownField {
                    param: param.to_string(),
                    field: seg.to_string(),
                });
            };
            if i + 1 < segments.len() {
                let Kind::Message(inner) = field.kind() else {
                    return Err(not_a_message(&param, seg));
                };
                if field.is_list() || field.is_map() {
                    return Err(not_a_message(&param, seg));
                }
                msg = inner;
                let entry = obj
                    .entry(seg.to_string())
                    .or_insert_with(|| Value::Object(Map::new()));
                obj = match entry {
                    Value::Object(o) => o,
                    _ => return Err(not_a_message(&param, seg)),
                };
                continue;
            }
            let v = scalar_json(&field.kind(), &value).ok_or_else(|| QueryError::BadValue {
                param: param.to_string(),
                value: value.to_string(),
                expected: expected(&field.kind()),
            })?;
            if field.is_list() {
                match obj
                    .entry(seg.to_string())
                    .or_insert_with(|| Value::Array(Vec::new()))
                {
                    Value::Array(items) => items.push(v),
                    other => *other = v,
                }
            } else {
                obj.insert(seg.to_string(), v);
            }
        }
    }
    Ok(root)
}

fn not_a_message(param: &str, field: &str) -> QueryError {
    QueryError::NotAMessage {
        param: param.to_string(),
        field: field.to_string(),
    }
}

pub fn expected(kind: &Kind) -> &'static str {
    match kind {
        Kind::Bool => "boolean (true or false)",
        _ => "number",
    }
}

/// What a field reads in JSON, for the client's error message.
pub fn expected_json(field: &prost_reflect::FieldDescriptor) -> String {
    let one = match field.kind() {
        Kind::Double | Kind::Float => "a number".to_string(),
        Kind::Bool => "a boolean".to_string(),
        Kind::String => "a string".to_string(),
        Kind::Bytes => "base64 bytes".to_string(),
        Kind::Message(m) => format!("a {} object", m.full_name()),
        Kind::Enum(e) => format!("a {} name or number", e.full_name()),
        _ => "an integer".to_string(),
    };
    if field.is_map() {
        "an object".to_string()
    } else if field.is_list() {
        format!("a list, each {one}")
    } else {
        one
    }
}

/// One query value or path variable as the JSON its field reads; none if it cannot be one.
pub fn scalar_json(kind: &Kind, text: &str) -> Option<Value> {
    match kind {
        Kind::Bool => match text {
            "true" => Some(Value::Bool(true)),
            "false" => Some(Value::Bool(false)),
            _ => None,
        },
        Kind::Float | Kind::Double => match text {
            "NaN" | "Infinity" | "-Infinity" => Some(Value::String(text.into())),
            _ => text
                .parse::<f64>()
                .ok()
                .and_then(serde_json::Number::from_f64)
                .map(Value::Number),
        },
        Kind::Enum(_) => Some(match text.parse::<i64>() {
            Ok(n) => Value::from(n),
            Err(_) => Value::String(text.into()),
        }),
        _ => Some(Value::String(text.into())),
    }
}

/// Fills `body` with the query's fields it does not set itself (the body wins; nested
/// objects merge).
pub fn merge_query(body: &mut Map<String, Value>, query: Map<String, Value>) {
    for (key, value) in query {
        match (body.get_mut(&key), value) {
            (Some(Value::Object(have)), Value::Object(more)) => merge_query(have, more),
            (Some(_), _) => {}
            (None, value) => {
                body.insert(key, value);
            }
        }
    }
}
