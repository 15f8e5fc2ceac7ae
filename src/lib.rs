//! meshd: a SPIFFE-native sidecar proxy.
//!
//! # Layout
//!
//! One folder per concern; data flows one way (DESIGN.md §7), each layer using only the
//! ones before it:
//!
//! `config -> identity -> tls -> policy -> discovery -> proxy -> inbound, outbound -> gateway
//! -> admin -> app`, with `telemetry` (metrics, access log) and `pb` (generated gRPC types)
//! leaves that any layer may use.
//!
//! - `config/`: the `Config` types, parsed once from YAML and the environment into typed
//!   values, with line/column errors (`meshd check`).
//! - `identity/`: SVIDs and bundles, from the Workload API or from files.
//! - `tls/`: rustls configs built from the current identity; SPIFFE peer verification.
//! - `policy/`: the policy model, `authorize` with no I/O, parsing, the reloading store.
//! - `discovery/`: endpoint resolvers (static, DNS, file).
//! - `proxy/`: what every listener shares: HTTP/2 bodies and pool, connect, drain, accept.
//! - `inbound`: the mTLS listener in front of the app.
//! - `outbound/`: per-upstream and transparent listeners, balancing, resilience.
//! - `gateway/`: the edge (HTTPS, JWT, API keys, rate limits).
//! - `admin/`: the admin HTTP server and `meshd probe`.
//! - `app`: the composition root of `meshd run`.
//! - Beside the sidecar: `k8s/` (`meshd inject`, `meshd injector`, `meshd iptables`), `dev_ca/` (the development
//!   CA), `demo/` (`meshd demo` and the demo apps).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod demo;
pub mod dev_ca;
pub mod discovery;
pub mod gateway;
pub mod identity;
pub mod inbound;
pub mod k8s;
pub mod outbound;
pub mod pb;
pub mod policy;
pub mod proxy;
pub mod telemetry;
pub mod tls;
