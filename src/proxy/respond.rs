//! How a listener answers its caller: the peer's response, or a local one.
//!
//! Flow: the peer answered -> [`respond_upstream`] takes the status (and a trailers-only
//! `grpc-status`) from its headers into the request's record and streams the body back
//! through a [`MeteredBody`], which finishes the record at the body's end. The request
//! failed -> [`respond_locally`] finishes the record with what is sent and answers with
//! the [`ProxyError`]'s response.

use crate::config::Protocol;
use crate::proxy::metered_body::MeteredBody;
use crate::proxy::{H2Body, ProxyError, GRPC_STATUS};
use bytes::Bytes;
use http::Response;
use http_body_util::{Either, Full};

/// A response body: the upstream's stream (metered), or a small local answer.
pub type ProxyBody = Either<MeteredBody, Full<Bytes>>;

/// Answers locally with `err`, completing the request's record with what was sent.
pub fn respond_locally(
    mut record: crate::telemetry::RequestRecord,
    protocol: Protocol,
    err: ProxyError,
) -> Response<ProxyBody> {
    let (grpc, http) = err.codes();
    let is_grpc = protocol == Protocol::Grpc;
    record.http_status = if is_grpc { 200 } else { http.as_u16() };
    record.grpc_status = is_grpc.then_some(grpc);
    record.finish();
    err.response(protocol)
}

/// Hands a peer's response back: status from its headers (a trailers-only gRPC answer
/// carries grpc-status there), body streamed through and measured to its end.
pub fn respond_upstream(
    mut record: crate::telemetry::RequestRecord,
    resp: Response<H2Body>,
) -> Response<ProxyBody> {
    record.http_status = resp.status().as_u16();
    record.grpc_status = resp
        .headers()
        .get(GRPC_STATUS)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    resp.map(|b| Either::Left(MeteredBody::new(b, record)))
}
