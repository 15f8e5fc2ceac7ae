//! gRPC-JSON transcoding at the gateway, from the API's own protos (as Envoy's
//! `grpc_json_transcoder`, without `protoc`): JSON clients call `/pkg.Service/Method`
//! of an exposed method, or a REST path its `google.api.http` rule declares, and get
//! JSON back; gRPC clients are not touched.
//!
//! Flow: [`Transcoder::new`] loads the descriptors (protos compiled with protox, or a
//! descriptor set) and parses every `google.api.http` template once into a table ->
//! per request that is not gRPC, [`Transcoder::lookup`] says whether its path is an
//! exposed method, by its gRPC path or by a REST binding (no: the request goes on as
//! before); the gateway routes it by the gRPC path ([`Call::grpc_path`]) ->
//! [`Transcoder::to_grpc`] reads the body up to `max_body` (413; read even when refused,
//! so the client gets its answer, not a reset stream), checks the method (404) and the
//! content type (415), fills the request message from the JSON body (all of it, or one
//! field per the rule's `body`), the path variables and the query (400 naming the
//! position or the field) and makes it a gRPC request, which the gateway sends like any
//! other -> [`Transcoder::to_json`] reads the answer: a unary message as JSON with 200, a
//! server stream as a JSON array or NDJSON written as messages arrive (`stream`), or
//! `{"code", "message", "details"}` with the HTTP status of its gRPC status (`status`).
//! When the protos change, [`Transcoder::follow`] compiles them again and swaps them in
//! (`reload`).

mod bindings;
mod http_rule;
mod reload;
mod request;
mod rules;
mod status;
mod stream;

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_rest;
#[cfg(test)]
mod tests_wkt;

use crate::config::{DescriptorError, TranscodingConfig};
use crate::proxy::{H2Body, ProxyBody, GRPC_STATUS};
use arc_swap::ArcSwap;
use bindings::{Binding, BodyRule};
use bytes::{Bytes, BytesMut};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use prost::Message;
use prost_reflect::{
    DescriptorPool, DeserializeOptions, DynamicMessage, FieldDescriptor, MethodDescriptor,
    SerializeOptions,
};
use rules::Payload;
use serde_json::Value;
use std::collections::HashSet;

pub use bindings::BindingError;

/// Why a JSON call was refused before reaching the app, or its answer could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TranscodeError {
    /// The protos do not load.
    #[error("gateway.transcoding: {0}")]
    Descriptors(#[from] DescriptorError),
    /// A listed service is not in the protos (`meshd check` says so first).
    #[error("gateway.transcoding: no service `{0}` in the protos")]
    UnknownService(String),
    /// A `google.api.http` rule that cannot be served (bad template, unknown field).
    #[error("gateway.transcoding: {0}")]
    Rule(#[from] BindingError),
    /// The content type is neither gRPC nor JSON (415).
    #[error("content type `{0}` is neither application/json nor application/grpc")]
    UnsupportedMediaType(String),
    /// The exposed service has no such method (404).
    #[error("{service} has no method {method}")]
    UnknownMethod { service: String, method: String },
    /// A client- or bidi-streaming method, which this gateway does not transcode (501).
    #[error("{0} streams from the client; only unary and server-streaming methods are transcoded")]
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
    /// A body sent to a REST binding without `body` (400): it would be ignored.
    #[error("{0} takes no request body (its google.api.http rule has no `body`)")]
    UnexpectedBody(String),
    /// A path variable that is not text after percent-decoding (400).
    #[error("path variable {0}: not UTF-8 once percent-decoded")]
    PathNotUtf8(String),
    /// A path variable that is not a value of its field (400).
    #[error("path variable {field}: `{value}` is not a {expected}")]
    BadPathValue {
        field: String,
        value: String,
        expected: &'static str,
    },
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
            | E::UnexpectedBody(_)
            | E::PathNotUtf8(_)
            | E::BadPathValue { .. }
            | E::BadField { .. }
            | E::BadQuery(_) => (StatusCode::BAD_REQUEST, 3),
            E::ResponseBody(_)
            | E::ResponseFrame(_)
            | E::ResponseMessage { .. }
            | E::ResponseJson(_)
            | E::NotGrpc(_) => (StatusCode::BAD_GATEWAY, 13),
            E::Descriptors(_) | E::UnknownService(_) | E::Rule(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, 13)
            }
        }
    }
}

/// The HTTP status a JSON client sees for a gRPC status (google.rpc's mapping): the
/// `status` a transcoded call counts with in `gateway_requests_total`.
pub fn client_status(grpc_code: u32) -> u16 {
    rules::http_status(grpc_code).as_u16()
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

/// What the protos give, compiled once and swapped whole when they change.
pub struct Compiled {
    /// The API's messages and services.
    pool: DescriptorPool,
    /// The services JSON clients may call, fully qualified.
    services: HashSet<String>,
    /// The REST surface of the exposed methods, most specific first.
    bindings: Vec<Binding>,
}

impl Compiled {
    /// Loads the descriptors, checks that each listed service is in them and parses the
    /// `google.api.http` rules of their methods.
    fn load(config: &TranscodingConfig) -> Result<Compiled, TranscodeError> {
        let pool = config.descriptors()?;
        for s in &config.services {
            if pool.get_service_by_name(s).is_none() {
                return Err(TranscodeError::UnknownService(s.clone()));
            }
        }
        let bindings = bindings::bindings(&pool, &config.services)?;
        Ok(Compiled {
            pool,
            services: config.services.iter().cloned().collect(),
            bindings,
        })
    }
}

/// The exposed services' descriptors and the JSON options.
pub struct Transcoder {
    /// The current protos, swapped by [`Transcoder::follow`] when their files change.
    compiled: ArcSwap<Compiled>,
    /// Where the protos come from, to compile them again.
    config: TranscodingConfig,
    /// The proto files last loaded, with their modification times, and the last failed
    /// reload's message (logged once).
    watch: std::sync::Mutex<reload::Watch>,
    /// How JSON bodies are read (unknown fields refused unless configured).
    read: DeserializeOptions,
    /// Unknown fields (in the body or the query) are ignored, not refused.
    ignore_unknown: bool,
    /// How answers are written (defaults, field names).
    write: SerializeOptions,
    /// The largest body read, in bytes.
    max_body: u64,
}

/// A JSON call found: the gRPC method and how the request maps onto it.
#[derive(Debug, Clone)]
pub struct Call {
    pub method: MethodDescriptor,
    /// Where the body goes (the `/pkg.Service/Method` form: the whole message).
    body: BodyRule,
    /// The path variables' captures (REST bindings only).
    captures: Vec<http_rule::Capture>,
    /// `response_body`: only this field of the answer is sent.
    response_body: Option<FieldDescriptor>,
    /// How a server stream is written, from the client's `Accept`.
    framing: stream::Framing,
}

impl Call {
    /// `/pkg.Service/Method`: what the gateway routes by and sends upstream.
    pub fn grpc_path(&self) -> String {
        format!(
            "/{}/{}",
            self.method.parent_service().full_name(),
            self.method.name()
        )
    }
}

impl Transcoder {
    /// Loads the descriptors and checks that each listed service is in them; parses the
    /// `google.api.http` rules.
    pub fn new(config: &TranscodingConfig) -> Result<Transcoder, TranscodeError> {
        let compiled = Compiled::load(config)?;
        let watch = reload::Watch::new(config, &compiled.pool);
        Ok(Transcoder {
            compiled: ArcSwap::from_pointee(compiled),
            config: config.clone(),
            watch: std::sync::Mutex::new(watch),
            read: DeserializeOptions::new().deny_unknown_fields(!config.ignore_unknown_fields),
            ignore_unknown: config.ignore_unknown_fields,
            write: SerializeOptions::new()
                .skip_default_fields(!config.emit_defaults)
                .use_proto_field_name(config.preserve_proto_field_names),
            max_body: config.max_body,
        })
    }

    /// For a path of an exposed service (`/pkg.Service/Method`): its method, or why not.
    /// None: not transcoded.
    pub fn method(&self, path: &str) -> Option<Result<MethodDescriptor, TranscodeError>> {
        let (service, method) = crate::proxy::grpc_path(path)?;
        let compiled = self.compiled.load();
        if !compiled.services.contains(service) {
            return None;
        }
        let svc = compiled.pool.get_service_by_name(service)?;
        let found = svc.methods().find(|m| m.name() == method);
        Some(match found {
            None => Err(TranscodeError::UnknownMethod {
                service: service.into(),
                method: method.into(),
            }),
            Some(m) if m.is_client_streaming() => {
                Err(TranscodeError::Streaming(format!("{service}/{method}")))
            }
            Some(m) => Ok(m),
        })
    }

    /// The call a JSON request makes: by its gRPC path, else by the first REST binding
    /// whose method and template match. None: not transcoded.
    pub fn lookup(&self, http: &Method, path: &str) -> Option<Result<Call, TranscodeError>> {
        if let Some(found) = self.method(path) {
            return Some(found.map(|method| Call {
                method,
                body: BodyRule::Whole,
                captures: Vec::new(),
                response_body: None,
                framing: stream::Framing::Array,
            }));
        }
        let compiled = self.compiled.load();
        compiled.bindings.iter().find_map(|b| {
            if b.http != *http {
                return None;
            }
            let captures = b.template.matches(path)?;
            Some(Ok(Call {
                method: b.method.clone(),
                body: b.body.clone(),
                captures,
                response_body: b.response_body.clone(),
                framing: stream::Framing::Array,
            }))
        })
    }

    /// The JSON request as the gRPC call of `found` (see the module docs). The body is
    /// read first, refused or not, so that the client gets the answer and not a reset
    /// stream (an HTTP/2 stream dropped unread is reset).
    pub async fn to_grpc(
        &self,
        found: Result<Call, TranscodeError>,
        req: Request<H2Body>,
    ) -> Result<(Request<H2Body>, Call), TranscodeError> {
        let (mut parts, body) = req.into_parts();
        let bytes = read_body(body, self.max_body).await?;
        let mut call = found?;
        let content_type = parts
            .headers
            .get(http::header::CONTENT_TYPE)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if rules::payload(content_type.as_deref()) == Payload::Unsupported {
            return Err(TranscodeError::UnsupportedMediaType(
                content_type.unwrap_or_default(),
            ));
        }
        call.framing = stream::framing(parts.headers.get(http::header::ACCEPT));
        let query = parts.uri.query().unwrap_or("");
        let message = self.call_message(&call, &bytes, query)?;
        let mut uri = http::uri::Parts::from(parts.uri.clone());
        uri.path_and_query =
            Some(
                call.grpc_path()
                    .parse()
                    .map_err(|_| TranscodeError::UnknownMethod {
                        service: call.method.parent_service().full_name().into(),
                        method: call.method.name().into(),
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
        Ok((Request::from_parts(parts, H2Body::fixed(framed)), call))
    }

    /// The gRPC answer as JSON (see the module docs).
    pub async fn to_json(&self, call: &Call, resp: Response<ProxyBody>) -> Response<ProxyBody> {
        let answered = if call.method.is_server_streaming() {
            self.stream_answer(call, resp).await
        } else {
            self.answer(call, resp).await
        };
        match answered {
            Ok(resp) => resp,
            Err(e) => {
                let (status, code) = e.status();
                error_response(status, code, &e.to_string())
            }
        }
    }

    async fn answer(
        &self,
        call: &Call,
        resp: Response<ProxyBody>,
    ) -> Result<Response<ProxyBody>, TranscodeError> {
        let (parts, body) = resp.into_parts();
        let collected = body.collect().await.map_err(TranscodeError::ResponseBody)?;
        let trailers = collected.trailers().cloned().unwrap_or_default();
        let bytes = collected.to_bytes();
        let Some(code) = grpc_status(&trailers).or_else(|| grpc_status(&parts.headers)) else {
            return Err(TranscodeError::NotGrpc(parts.status.as_u16()));
        };
        if code != 0 {
            return Ok(self.grpc_error(code, &trailers, &parts.headers));
        }
        let message = self.decode(&call.method, rules::unframe(&bytes)?)?;
        let json = match &call.response_body {
            None => self.to_json_bytes(&message)?,
            Some(field) => self.field_json(&message, field)?,
        };
        Ok(json_response(StatusCode::OK, json))
    }

    /// A message of the method's output type, from its bytes.
    fn decode(
        &self,
        method: &MethodDescriptor,
        bytes: &[u8],
    ) -> Result<DynamicMessage, TranscodeError> {
        let output = method.output();
        DynamicMessage::decode(output.clone(), bytes).map_err(|source| {
            TranscodeError::ResponseMessage {
                message: output.full_name().into(),
                source,
            }
        })
    }

    fn to_json_bytes(&self, message: &DynamicMessage) -> Result<Bytes, TranscodeError> {
        let mut json = Vec::with_capacity(message.encoded_len() * 2);
        let mut ser = serde_json::Serializer::new(&mut json);
        message
            .serialize_with_options(&mut ser, &self.write)
            .map_err(TranscodeError::ResponseJson)?;
        Ok(Bytes::from(json))
    }

    /// `response_body`: one field of the answer, its default value included.
    fn field_json(
        &self,
        message: &DynamicMessage,
        field: &FieldDescriptor,
    ) -> Result<Bytes, TranscodeError> {
        let opts = self.write.clone().skip_default_fields(false);
        let whole = message
            .serialize_with_options(serde_json::value::Serializer, &opts)
            .map_err(TranscodeError::ResponseJson)?;
        let name = if self.config.preserve_proto_field_names {
            field.name()
        } else {
            field.json_name()
        };
        let value = whole.get(name).cloned().unwrap_or(Value::Null);
        Ok(Bytes::from(value.to_string()))
    }
}

/// The `grpc-status` in `h`, if any.
fn grpc_status(h: &http::HeaderMap) -> Option<u32> {
    h.get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok())
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

/// A JSON client: it sent JSON or asks for it (`Accept: application/json` or NDJSON).
pub fn wants_json(headers: &http::HeaderMap) -> bool {
    let has = |name, what: &str| {
        headers
            .get_all(name)
            .iter()
            .any(|v| String::from_utf8_lossy(v.as_bytes()).contains(what))
    };
    has(http::header::CONTENT_TYPE, "application/json")
        || has(http::header::ACCEPT, "application/json")
        || has(http::header::ACCEPT, "application/x-ndjson")
}
