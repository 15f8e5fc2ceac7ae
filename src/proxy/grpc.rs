//! What a request says about gRPC: whether it is gRPC, and which service and method it
//! calls.
//!
//! Flow: a listener checks [`is_grpc`] (the content-type) -> [`grpc_path`] splits the
//! path into the service and method that policy, metrics and logs name ->
//! [`GRPC_STATUS`] is read from the answer's headers (a trailers-only status).

use http::{HeaderName, Request};

/// `grpc-status` as a header name, made at compile time.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");

/// Splits a gRPC path `/pkg.Service/Method` into service and method.
pub fn grpc_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix('/')?;
    let (svc, method) = rest.split_once('/')?;
    (!svc.is_empty() && !method.is_empty() && !method.contains('/')).then_some((svc, method))
}

/// Whether a request is gRPC (by content-type).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}
