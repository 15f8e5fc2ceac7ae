//! The JWT-SVID an outbound with `jwt_svid` puts on every request: `authorization:
//! Bearer <JWT-SVID>` for the configured audience, replacing any the app sent.
//!
//! Flow: `call::forward_as` asks [`JwtAttach::authorization`] before the first attempt,
//! bounded by the request's deadline -> the shared `JwtSvidSource` answers from its
//! cache until half the token's lifetime, else fetches a new token from the Workload API
//! (retrying an unavailable agent for its patience) -> the header value is made once per
//! token (marked sensitive, so HPACK never indexes it) and set on the request. No token:
//! the request fails closed with UNAVAILABLE / 503 naming the reason and is never sent.
//! Each new token, and each request left without one, is counted in
//! `meshd_jwt_svid_fetches_total{outbound,result}`. The token itself is never logged:
//! `JwtSvidToken`'s `Debug` leaves it out and errors carry the Workload API's reason only.

use crate::identity::{JwtApiError, JwtSvidSource, JwtSvidToken};
use arc_swap::ArcSwapOption;
use std::sync::Arc;
use std::time::Duration;

/// The metric family counting JWT-SVID fetches per outbound.
pub const FETCHES: &str = "meshd_jwt_svid_fetches_total";

/// Why a request got no JWT-SVID (it is then not sent).
#[derive(Debug, thiserror::Error)]
pub enum JwtAttachError {
    /// The Workload API gave no token (refused, unavailable for the whole patience).
    #[error("no JWT-SVID for audience {audience:?}: {source}")]
    Fetch {
        audience: Vec<String>,
        source: JwtApiError,
    },
    /// The request's deadline passed while waiting for the Workload API.
    #[error("no JWT-SVID for audience {audience:?} within {} ms: the Workload API did not answer in time", waited.as_millis())]
    Timeout {
        audience: Vec<String>,
        waited: Duration,
    },
    /// The token holds bytes a header value cannot carry.
    #[error("the JWT-SVID for audience {audience:?} cannot be sent as a header value")]
    NotAHeader { audience: Vec<String> },
}

/// One outbound's JWT-SVID attachment.
pub struct JwtAttach {
    /// The Workload API's JWT-SVIDs, cached per audience; shared by all outbounds.
    source: Arc<JwtSvidSource>,
    /// `jwt_svid.audience` of this outbound.
    audience: Vec<String>,
    /// The last token handed out and its `Bearer` header value, made once per token.
    current: ArcSwapOption<(Arc<JwtSvidToken>, http::HeaderValue)>,
    /// `meshd_jwt_svid_fetches_total{outbound, result="ok"}`: new tokens taken.
    fetched: metrics::Counter,
    /// `meshd_jwt_svid_fetches_total{outbound, result="error"}`: requests left without.
    failed: metrics::Counter,
}

impl std::fmt::Debug for JwtAttach {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAttach")
            .field("audience", &self.audience)
            .finish_non_exhaustive()
    }
}

impl JwtAttach {
    /// The attachment of outbound `name`; its two series start at 0.
    pub fn new(name: &str, audience: Vec<String>, source: Arc<JwtSvidSource>) -> JwtAttach {
        metrics::describe_counter!(
            FETCHES,
            "JWT-SVIDs an outbound took from the Workload API for its requests (result=ok: a new token; result=error: a request failed closed without one), by outbound."
        );
        let fetched = metrics::counter!(FETCHES, "outbound" => name.to_string(), "result" => "ok");
        let failed =
            metrics::counter!(FETCHES, "outbound" => name.to_string(), "result" => "error");
        fetched.absolute(0);
        failed.absolute(0);
        JwtAttach {
            source,
            audience,
            current: ArcSwapOption::empty(),
            fetched,
            failed,
        }
    }

    /// The `authorization` value for one request: the cached token's, or a new one's,
    /// waiting at most `within` for the Workload API.
    pub async fn authorization(
        &self,
        within: Duration,
    ) -> Result<http::HeaderValue, JwtAttachError> {
        let got = tokio::time::timeout(within, self.source.fetch(&self.audience)).await;
        let token = match got {
            Ok(Ok(token)) => token,
            Ok(Err(source)) => {
                self.failed.increment(1);
                return Err(JwtAttachError::Fetch {
                    audience: self.audience.clone(),
                    source,
                });
            }
            Err(_) => {
                self.failed.increment(1);
                return Err(JwtAttachError::Timeout {
                    audience: self.audience.clone(),
                    waited: within,
                });
            }
        };
        if let Some(cur) = self.current.load().as_ref() {
            if Arc::ptr_eq(&cur.0, &token) {
                return Ok(cur.1.clone());
            }
        }
        let Some(value) = token.authorization() else {
            self.failed.increment(1);
            return Err(JwtAttachError::NotAHeader {
                audience: self.audience.clone(),
            });
        };
        self.fetched.increment(1);
        self.current.store(Some(Arc::new((token, value.clone()))));
        Ok(value)
    }
}
