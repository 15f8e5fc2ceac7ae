//! A gRPC error as the JSON client reads it: `{"code", "message"}` with the HTTP status
//! of the code, plus `details` when the app sent `grpc-status-details-bin` (a base64
//! `google.rpc.Status`): each `google.protobuf.Any` in proto3 JSON with its `@type` when
//! the protos know its type, else `{"@type": url, "value": base64}`.

use super::{json_response, rules, Transcoder};
use crate::proxy::ProxyBody;
use base64::Engine;
use http::{HeaderMap, Response};
use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::{json, Map, Value};

/// `google.rpc.Status`, as `grpc-status-details-bin` carries it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RpcStatus {
    #[prost(int32, tag = "1")]
    pub code: i32,
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(message, repeated, tag = "3")]
    pub details: Vec<prost_types::Any>,
}

impl Transcoder {
    /// The JSON error answer for gRPC status `code`, its message and details read from
    /// the trailers (or, for a trailers-only answer, the headers).
    pub(super) fn grpc_error(
        &self,
        code: u32,
        trailers: &HeaderMap,
        headers: &HeaderMap,
    ) -> Response<ProxyBody> {
        let pool = &self.compiled.load().pool;
        let body = error_value(code, trailers, headers, pool, &self.write);
        json_response(
            rules::http_status(code),
            bytes::Bytes::from(body.to_string()),
        )
    }
}

/// `{"code", "message"[, "details"]}` for gRPC status `code`, read from the trailers or
/// else the headers.
pub fn error_value(
    code: u32,
    trailers: &HeaderMap,
    headers: &HeaderMap,
    pool: &DescriptorPool,
    write: &SerializeOptions,
) -> Value {
    let get = |name: &str| trailers.get(name).or_else(|| headers.get(name));
    let message = get("grpc-message")
        .map(|v| rules::grpc_message_decode(v.as_bytes()))
        .unwrap_or_default();
    let mut body = json!({"code": code, "message": message});
    if let Some(details) =
        get("grpc-status-details-bin").and_then(|v| details(v.as_bytes(), pool, write))
    {
        body["details"] = Value::Array(details);
    }
    body
}

/// The `details` of a `grpc-status-details-bin` value; none if it does not decode.
pub fn details(
    value: &[u8],
    pool: &DescriptorPool,
    write: &SerializeOptions,
) -> Option<Vec<Value>> {
    let text = std::str::from_utf8(value).ok()?.trim_end_matches('=');
    let bytes = base64::engine::general_purpose::STANDARD_NO_PAD
        .decode(text)
        .ok()?;
    let status = <RpcStatus as prost::Message>::decode(bytes.as_slice()).ok()?;
    Some(
        status
            .details
            .iter()
            .map(|any| any_json(any, pool, write))
            .collect(),
    )
}

/// One `Any` as proto3 JSON: its fields beside `@type` (a well-known type's own JSON
/// form under `value`), or its bytes in base64 when the type is not in the protos.
pub fn any_json(any: &prost_types::Any, pool: &DescriptorPool, write: &SerializeOptions) -> Value {
    let name = any.type_url.rsplit('/').next().unwrap_or_default();
    let read = pool
        .get_message_by_name(name)
        .and_then(|desc| DynamicMessage::decode(desc, any.value.as_slice()).ok())
        .and_then(|m| {
            m.serialize_with_options(serde_json::value::Serializer, write)
                .ok()
        });
    let mut out = Map::new();
    out.insert("@type".into(), Value::String(any.type_url.clone()));
    // Well-known types (but Empty) have a JSON form of their own: it goes in `value`.
    let special = name.starts_with("google.protobuf.") && name != "google.protobuf.Empty";
    match read {
        Some(Value::Object(fields)) if !special => out.extend(fields),
        Some(other) => {
            out.insert("value".into(), other);
        }
        None => {
            let b64 = base64::engine::general_purpose::STANDARD.encode(&any.value);
            out.insert("value".into(), Value::String(b64));
        }
    }
    Value::Object(out)
}
