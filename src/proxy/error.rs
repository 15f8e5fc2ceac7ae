//! Why a request could not be proxied, and what the caller hears about it.
//!
//! Flow: a listener that gives up on a request makes a [`ProxyError`] -> [`ProxyError::codes`]
//! maps it to one gRPC status and one HTTP status -> [`ProxyError::response`] builds the
//! local answer: trailers-only with `grpc-status` and a percent-encoded `grpc-message`
//! for gRPC, the status code and the message as text for HTTP.

use crate::config::Protocol;
use crate::proxy::ProxyBody;
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{Either, Full};

/// Why a request could not be proxied; each maps to one gRPC status and HTTP status.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The policy denied the request (message names the rule).
    #[error("{0}")]
    Denied(String),
    /// No connection to the upstream (or the app) could be made.
    #[error("{0}")]
    Unavailable(String),
    /// The upstream did not answer within the deadline.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// No valid identity: meshd fails closed.
    #[error("{0}")]
    NoIdentity(String),
    /// The gateway found no valid credentials.
    #[error("{0}")]
    Unauthenticated(String),
    /// The gateway's rate limit for this caller is spent.
    #[error("{0}")]
    RateLimited(String),
    /// No gateway route matches the path.
    #[error("{0}")]
    NoRoute(String),
    /// The request body is over the gateway's `max_request_body`.
    #[error("{0}")]
    TooLarge(String),
}

impl ProxyError {
    /// The gRPC status code and HTTP status for this error.
    pub fn codes(&self) -> (u32, StatusCode) {
        match self {
            ProxyError::Denied(_) => (7, StatusCode::FORBIDDEN),
            ProxyError::Unavailable(_) | ProxyError::NoIdentity(_) => {
                (14, StatusCode::SERVICE_UNAVAILABLE)
            }
            ProxyError::DeadlineExceeded(_) => (4, StatusCode::GATEWAY_TIMEOUT),
            ProxyError::Unauthenticated(_) => (16, StatusCode::UNAUTHORIZED),
            ProxyError::RateLimited(_) => (8, StatusCode::TOO_MANY_REQUESTS),
            ProxyError::NoRoute(_) => (12, StatusCode::NOT_FOUND),
            ProxyError::TooLarge(_) => (8, StatusCode::PAYLOAD_TOO_LARGE),
        }
    }

    /// The local response: a trailers-only gRPC status for gRPC, a status code and a text
    /// body for HTTP.
    pub fn response(&self, protocol: Protocol) -> Response<ProxyBody> {
        let (grpc, http) = self.codes();
        let msg = self.to_string();
        if protocol == Protocol::Grpc {
            let mut r = Response::new(Either::Right(Full::new(Bytes::new())));
            let h = r.headers_mut();
            h.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(grpc));
            if let Ok(v) = HeaderValue::from_str(&grpc_message_encode(&msg)) {
                h.insert("grpc-message", v);
            }
            r
        } else {
            let mut r = Response::new(Either::Right(Full::new(Bytes::from(msg + "\n"))));
            *r.status_mut() = http;
            r.headers_mut().insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            r
        }
    }
}

/// Percent-encodes a grpc-message value as the gRPC spec asks.
pub fn grpc_message_encode(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for b in msg.bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_codes() {
        let table = [
            (ProxyError::Denied("x".into()), 7, 403),
            (ProxyError::Unavailable("x".into()), 14, 503),
            (ProxyError::NoIdentity("x".into()), 14, 503),
            (ProxyError::DeadlineExceeded("x".into()), 4, 504),
            (ProxyError::Unauthenticated("x".into()), 16, 401),
            (ProxyError::RateLimited("x".into()), 8, 429),
            (ProxyError::NoRoute("x".into()), 12, 404),
        ];
        for (e, grpc, http) in table {
            assert_eq!(e.codes(), (grpc, StatusCode::from_u16(http).unwrap()));
            let r = e.response(Protocol::Grpc);
            assert_eq!(r.headers()["grpc-status"], grpc.to_string().as_str());
            assert_eq!(e.response(Protocol::Http).status().as_u16(), http);
        }
    }

    #[test]
    fn grpc_message_is_percent_encoded() {
        assert_eq!(
            grpc_message_encode("denied by rule \"a\""),
            "denied by rule \"a\""
        );
        assert_eq!(grpc_message_encode("100%\n"), "100%25%0A");
    }
}
