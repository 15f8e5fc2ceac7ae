//! The `x-forwarded-client-cert` header: how the app learns who called (Envoy's format).
//!
//! Flow: the inbound listener builds the value once per connection from its own and the
//! peer's SPIFFE IDs ([`xfcc_value`]) -> each request's header is replaced with it
//! ([`set_xfcc`]), so a caller cannot pass one of its own; outbound strips it.

use http::{HeaderMap, HeaderName, HeaderValue};

/// The header that tells the app who called (Envoy's format).
pub const XFCC: &str = "x-forwarded-client-cert";

/// [`XFCC`] as a header name, made at compile time (a `&str` key is parsed per use).
pub const XFCC_NAME: HeaderName = HeaderName::from_static(XFCC);

/// Replaces whatever `x-forwarded-client-cert` the caller sent with ours (`None`: removes
/// it). One `insert` drops every earlier value of the header.
pub fn set_xfcc(headers: &mut HeaderMap, value: Option<&HeaderValue>) {
    match value {
        Some(v) => {
            headers.insert(XFCC_NAME, v.clone());
        }
        None => {
            headers.remove(XFCC_NAME);
        }
    }
}

/// Builds the XFCC value the app receives: `By=<own id>;URI=<peer id>`.
pub fn xfcc_value(own: &str, peer: &str) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("By={own};URI={peer}")).ok()
}
