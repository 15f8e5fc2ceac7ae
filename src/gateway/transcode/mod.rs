//! gRPC-JSON transcoding at the gateway, from the API's own protos (as Envoy's
//! `grpc_json_transcoder`, without `protoc`): JSON clients call `/pkg.Service/Method`
//! of an exposed unary method and get JSON back; gRPC clients are not touched.
//!
//! Flow: [`Transcoder::new`] loads the descriptors (protos compiled with protox, or a
//! descriptor set) -> per request that is not gRPC, [`Transcoder::method`] says whether
//! its path is an exposed service (no: the request goes on as before) ->
//! [`Transcoder::to_grpc`] reads the body up to `max_body` (413; read even when refused,
//! so the client gets its answer, not a reset stream), checks the method (404) and the
//! content type (415), fills the request message from the JSON body and the query
//! (400 naming the position or the field) and makes it a gRPC request, which the gateway
//! sends like any other -> [`Transcoder::to_json`] reads the unary answer: its message as
//! JSON with 200, or `{"code", "message"}` with the HTTP status of its gRPC status.

mod rules;
#[cfg(test)]
mod tests;

use crate::config::{DescriptorError, TranscodingConfig};
use crate::proxy::{H2Body, ProxyBody, GRPC_STATUS};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, MessageDescriptor, MethodDescriptor,
    SerializeOptions,
};
use rules::Payload;
use serde_json::{Map, Value};
use std::collections::HashSet;

/// Why a JSON call was refused before reaching the app, or its answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The protos do not load.
    #[error("gateway.transcoding: {0}")]
    Descriptors(#[from] DescriptorError),
    /// A listed service is not in the protos (`meshd check` says so first).
    #[error("gateway.transcoding: no service `{0}` in the protos")]
    UnknownService(String),
    /// The content type is neither gRPC nor JSON (415).
    #[error("content type `{0}` is neither application/json nor application/grpc")]
    UnsupportedMediaType(String),
    /// The exposed service has no such method (404).
    #[error("{service} has no method {method}")]
    UnknownMethod { service: String, method: String },
    /// A streaming method, which this gateway does not transcode yet (501).
    #[error("{0} streams; only unary methods are transcoded")]
    Streaming(String),
    /// The body is over `max_body` (413).
    #[error("the request body is over the limit of {0} bytes")]
    TooLarge(u64),
    /// The body could not be read from the client.
    #[error("reading the request body: {0}")]
    BodyRead(Box<dyn std::error::Error + Send + Sync>),
    /// The body is not JSON (400; serde_json names line and column).
    #[error("malformed JSON: {0}")]
    MalformedJson(serde_json::Error),
    /// The body is JSON but not an object (400).
    #[error("the JSON body must be an object, not {0}")]
    NotAnObject(&'static str),
    /// A field that does not exist or holds the wrong type (400).
    #[error("{path}: {reason}")]
    BadField { path: String, reason: String },
    /// A query parameter that does not fill the message (400).
    #[error("{0}")]
    BadQuery(#[from] rules::QueryError),
    /// The app's answer could not be read.
    #[error("reading the answer: {0}")]
    ResponseBody(Box<dyn std::error::Error + Send + Sync>),
    /// The app's answer is not one gRPC message.
    #[error("{0}")]
    ResponseFrame(#[from] rules::FrameError),
    /// The app's message does not decode as the method's output type.
    #[error("the answer is not a {message}: {source}")]
    ResponseMessage {
        message: String,
        source: prost::DecodeError,
    },
    /// The app's message could not be written as JSON.
    #[error("writing the answer as JSON: {0}")]
    ResponseJson(serde_json::Error),
    /// The app did not answer in gRPC.
    #[error("the app answered HTTP {0} without a gRPC status")]
    NotGrpc(u16),
}

impl TranscodeError {
    /// The HTTP status and the gRPC code of the `{"code", "message"}` answer.
    pub fn status(&self) -> (StatusCode, u32) {
        use TranscodeError as E;
        match self {
            E::UnsupportedMediaType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, 3),
            E::UnknownMethod { .. } => (StatusCode::NOT_FOUND, 12),
            E::Streaming(_) => (StatusCode::NOT_IMPLEMENTED, 12),
            E::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, 8),
            E::BodyRead(_)
            | E::MalformedJson(_)
            | E::NotAnObject(_)
            | E::BadField { .. }
            | E::BadQuery(_) => (StatusCode::BAD_REQUEST, 3),
            E::ResponseBody(_)
            | E::ResponseFrame(_)
            | E::ResponseMessage { .. }
            | E::ResponseJson(_)
            | E::NotGrpc(_) => (StatusCode::BAD_GATEWAY, 13),
            E::Descriptors(_) | E::UnknownService(_) => (StatusCode::INTERNAL_SERVER_ERROR, 13),
        }
    }
}

/// A JSON answer `{"code": N, "message": "..."}` with `status`.
pub fn error_response(status: StatusCode, code: u32, message: &str) -> Response<ProxyBody> {
    json_response(status, error_body(code, message))
}

/// The gateway's own refusal (401, 429, ...) of a JSON client, its body made the JSON
/// error shape; status and headers stay.
pub fn error_as_json(resp: &mut Response<ProxyBody>, code: u32, message: &str) {
    *resp.body_mut() = Either::Right(Full::new(error_body(code, message)));
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
}

fn error_body(code: u32, message: &str) -> Bytes {
    Bytes::from(serde_json::json!({"code": code, "message": message}).to_string())
}

fn json_response(status: StatusCode, body: Bytes) -> Response<ProxyBody> {
    let mut resp = Response::new(Either::Right(Full::new(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

/// The exposed services' descriptors and the JSON options.
pub struct Transcoder {
    /// The API's messages and services.
    pool: DescriptorPool,
    /// The services JSON clients may call, fully qualified.
    services: HashSet<String>,
    /// How JSON bodies are read (unknown fields refused unless configured).
    read: DeserializeOptions,
    /// Unknown fields (in the body or the query) are ignored, not refused.
    ignore_unknown: bool,
    /// How answers are written (defaults, field names).
    write: SerializeOptions,
    /// The largest body read, in bytes.
    max_body: u64,
}

impl Transcoder {
    /// Loads the descriptors and checks that each listed service is in them.
    pub fn new(config: &TranscodingConfig) -> Result<Transcoder, TranscodeError> {
        let pool = config.descriptors()?;
        for s in &config.services {
            if pool.get_service_by_name(s).is_none() {
                return Err(TranscodeError::UnknownService(s.clone()));
            }
        }
        Ok(Transcoder {
            pool,
            services: config.services.iter().cloned().collect(),
            read: DeserializeOptions::new().deny_unknown_fields(!config.ignore_unknown_fields),
            ignore_unknown: config.ignore_unknown_fields,
            write: SerializeOptions::new()
                .skip_default_fields(!config.emit_defaults)
                .use_proto_field_name(config.preserve_proto_field_names),
            max_body: config.max_body,
        })
    }

    /// For a path of an exposed service: its method, or why not. None: not transcoded.
    pub fn method(&self, path: &str) -> Option<Result<MethodDescriptor, TranscodeError>> {
        let (service, method) = crate::proxy::grpc_path(path)?;
        if !self.services.contains(service) {
            return None;
        }
        let svc = self.pool.get_service_by_name(service)?;
        let found = svc.methods().find(|m| m.name() == method);
        Some(match found {
            None => Err(TranscodeError::UnknownMethod {
                service: service.into(),
                method: method.into(),
            }),
            Some(m) if m.is_client_streaming() || m.is_server_streaming() => {
                Err(TranscodeError::Streaming(format!("{service}/{method}")))
            }
            Some(m) => Ok(m),
        })
    }

    /// The JSON request as the gRPC call of `found` (see the module docs). The body is
    /// read first, refused or not, so that the client gets the answer and not a reset
    /// stream (an HTTP/2 stream dropped unread is reset).
    pub async fn to_grpc(
        &self,
        found: Result<MethodDescriptor, TranscodeError>,
        req: Request<H2Body>,
    ) -> Result<(Request<H2Body>, MethodDescriptor), TranscodeError> {
        let (mut parts, body) = req.into_parts();
        let bytes = read_body(body, self.max_body).await?;
        let method = found?;
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if rules::payload(content_type.as_deref()) == Payload::Unsupported {
            return Err(TranscodeError::UnsupportedMediaType(
                content_type.unwrap_or_default(),
            ));
        }
        let query = parts.uri.query().unwrap_or("");
        let message = self.request_message(&method.input(), &bytes, query)?;
        let mut uri = http::uri::Parts::from(parts.uri.clone());
        uri.path_and_query = Some(
            format!("/{}/{}", method.parent_service().full_name(), method.name())
                .parse()
                .map_err(|_| TranscodeError::UnknownMethod {
                    service: method.parent_service().full_name().into(),
                    method: method.name().into(),
                })?,
        );
        if let Ok(u) = http::Uri::from_parts(uri) {
            parts.uri = u;
        }
        parts.method = Method::POST;
        let h = &mut parts.headers;
        h.remove(http::header::CONTENT_LENGTH);
        h.remove(http::header::ACCEPT_ENCODING);
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc"),
        );
        h.insert(http::header::TE, HeaderValue::from_static("trailers"));
        let framed = rules::frame(&message.encode_to_vec());
        Ok((Request::from_parts(parts, H2Body::fixed(framed)), method))
    }

    /// The request message from the JSON body (empty: the empty message) and the query.
    fn request_message(
        &self,
        desc: &MessageDescriptor,
        body: &[u8],
        query: &str,
    ) -> Result<DynamicMessage, TranscodeError> {
        let mut object = if body.iter().all(u8::is_ascii_whitespace) {
            Map::new()
        } else {
            match serde_json::from_slice::<Value>(body).map_err(TranscodeError::MalformedJson)? {
                Value::Object(o) => o,
                other => return Err(TranscodeError::NotAnObject(json_kind(&other))),
            }
        };
        let query = rules::query_json(desc, query, self.ignore_unknown)?;
        rules::merge_query(&mut object, query);
        DynamicMessage::deserialize_with_options(
            desc.clone(),
            Value::Object(object.clone()),
            &self.read,
        )
        .map_err(|e| {
            let (path, reason) = self
                .locate(desc, &object)
                .unwrap_or_else(|| (desc.full_name().to_string(), e.to_string()));
            TranscodeError::BadField { path, reason }
        })
    }

    /// The field of `object` that `desc` does not read, with why: each field alone, and
    /// into nested messages, so the client sees `payment.amount_cents`, not just "error".
    fn locate(
        &self,
        desc: &MessageDescriptor,
        object: &Map<String, Value>,
    ) -> Option<(String, String)> {
        for (key, value) in object {
            let alone = Map::from_iter([(key.clone(), value.clone())]);
            let Err(e) = DynamicMessage::deserialize_with_options(
                desc.clone(),
                Value::Object(alone),
                &self.read,
            ) else {
                continue;
            };
            let field = desc
                .get_field_by_name(key)
                .or_else(|| desc.get_field_by_json_name(key));
            if let (Some(f), Value::Object(inner)) = (&field, value) {
                if let prost_reflect::Kind::Message(m) = f.kind() {
                    let wkt = m.full_name().starts_with("google.protobuf.");
                    if !f.is_list() && !f.is_map() && !wkt {
                        if let Some((path, reason)) = self.locate(&m, inner) {
                            return Some((format!("{key}.{path}"), reason));
                        }
                    }
                }
            }
            let reason = match field {
                Some(f) => format!("expected {} ({e})", rules::expected_json(&f)),
                None => e.to_string(),
            };
            return Some((key.clone(), reason));
        }
        None
    }

    /// The gRPC answer as JSON (see the module docs).
    pub async fn to_json(
        &self,
        method: &MethodDescriptor,
        resp: Response<ProxyBody>,
    ) -> Response<ProxyBody> {
        match self.answer(method, resp).await {
            Ok(resp) => resp,
            Err(e) => {
                let (status, code) = e.status();
                error_response(status, code, &e.to_string())
            }
        }
    }

    async fn answer(
        &self,
        method: &MethodDescriptor,
        resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, TranscodeError> {
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(TranscodeError::ResponseBody)?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let bytes = collected.to_bytes();
        let status_of = |h: &http::HeaderMap| {
            h.get(GRPC_STATUS)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u32>().ok())
        };
        let Some(code) = status_of(&trailers).or_else(|| status_of(&parts.headers)) else {
            return Err(TranscodeError::NotGrpc(parts.status.as_u16()));
        };
        if code != 0 {
            let message = trailers
                .get("grpc-message")
                .or_else(|| parts.headers.get("grpc-message"))
                .map(|v| rules::grpc_message_decode(v.as_bytes()))
                .unwrap_or_default();
            return Ok(error_response(rules::http_status(code), code, &message));
        }
        let output = method.output();
        let message =
            DynamicMessage::decode(output.clone(), rules::unframe(&bytes)?).map_err(|source| {
                TranscodeError::ResponseMessage {
                    message: output.full_name().into(),
                    source,
                }
            })?;
        let mut json = Vec::with_capacity(bytes.len() * 2);
        let mut ser = serde_json::Serializer::new(&mut json);
        message
            .serialize_with_options(&mut ser, &self.write)
            .map_err(TranscodeError::ResponseJson)?;
        Ok(json_response(StatusCode::OK, Bytes::from(json)))
    }
}

/// Past `max_body`, this much more of a body is still read (and dropped) so the client
/// gets its 413 instead of a reset stream; a body larger than that is reset.
const DRAIN_MIN: u64 = 1 << 20;

/// The request body, up to `max` bytes; over it, [`TranscodeError::TooLarge`] once the
/// client has sent it (up to 4 × `max`, at least 1 MiB).
async fn read_body(mut body: H2Body, max: u64) -> Result<Bytes, TranscodeError> {
    let mut kept = BytesMut::new();
    let mut seen: u64 = 0;
    let drain_to = max.saturating_mul(4).max(DRAIN_MIN);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| TranscodeError::BodyRead(e.into()))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len() as u64;
        if seen <= max {
            kept.extend_from_slice(&data);
        } else if seen > drain_to {
            break;
        }
    }
    if seen > max {
        return Err(TranscodeError::TooLarge(max));
    }
    Ok(kept.freeze())
}

/// Reads and drops what is left of a refused request's body, up to 1 MiB and 1 s: an
/// HTTP/2 stream dropped unread is reset, and the client would miss its answer.
pub async fn drain(body: &mut H2Body) {
    use http_body::Body;
    if body.is_end_stream() {
        return;
    }
    let read = async {
        let mut seen = 0u64;
        while let Some(Ok(frame)) = body.frame().await {
            seen += frame.data_ref().map_or(0, |d| d.len() as u64);
            if seen > DRAIN_MIN {
                break;
            }
        }
    };
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), read).await;
}

fn json_kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}
