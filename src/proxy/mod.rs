//! What the inbound and outbound listeners share: response bodies, gRPC-aware error
//! responses, deadlines, the `x-forwarded-client-cert` header, TCP and mTLS connects,
//! accepting and draining, the HTTP/2 server side (the client side is `h2_pool`) and the
//! TCP byte pipe.
//!
//! Flow of a request through a listener, child by child: `listen` accepts the connection
//! (until `Drain`) -> `connect` opens the other side (TCP to the app, mTLS to an upstream)
//! -> `h2_server` serves the caller's streams, bodies read and written by `h2_body`,
//! requests sent on through `h2_pool` (with `replay_body` when a retry may resend one)
//! -> `grpc` and `grpc_timeout` read what the request says about gRPC and its deadline,
//! `xfcc` tells the app who called, `jwt_svid` checks a bearer JWT-SVID (the inbound's
//! and the gateway's) -> `respond` answers: the peer's response streamed
//! through `metered_body`, or a local answer for an `error`. A `tcp` listener runs
//! `pipe` instead of HTTP/2.
//!
//! Decisions (error mapping, deadlines) are plain functions with table tests; the I/O
//! around them is kept thin.

mod connect;
mod connections;
mod control_frames;
mod error;
mod grpc;
mod grpc_timeout;
mod h2_body;
mod h2_pool;
mod h2_server;
mod jwt_svid;
mod listen;
mod lobby;
mod metered_body;
mod pipe;
mod replay_body;
mod respond;
mod xfcc;

#[cfg(test)]
mod fuzz;
pub use connect::{tcp_connect, tls_connect, ConnectError};
pub use connections::{ConnectionGate, Limit, OpenConnection};
pub use error::{grpc_message_encode, ProxyError};
pub use grpc::{grpc_path, is_grpc, GRPC_STATUS};
pub use grpc_timeout::{encode_grpc_timeout, parse_grpc_timeout, request_deadline};
pub use h2_body::H2Body;
pub use h2_pool::{Connector, H2Pool, SendError};
pub use h2_server::{serve_h2, Watched};
pub use jwt_svid::{
    bearer, count as count_jwt_svid, JwtRefusal, JwtSvidVerifier, JWT_SVID_RESULTS,
};
pub use listen::{accept, Drain};
pub use lobby::accept_ready;
pub use pipe::pipe;
pub use replay_body::{ReplayBody, Replayable};
pub use respond::{respond_locally, respond_upstream, ProxyBody};
pub use xfcc::{set_xfcc, xfcc_value, XFCC, XFCC_NAME};
