//! meshd: a SPIFFE-native sidecar proxy.
//!
//! Data flows one way (DESIGN.md §7):
//! `config -> identity -> tls -> policy -> discovery -> proxy -> admin -> app`,
//! with `telemetry` a leaf handed in by `app`.
#![forbid(unsafe_code)]

pub mod config;
pub mod demo_apps;
mod demo_payment;
pub mod dev_ca;
mod dev_ca_cli;
mod dev_ca_server;
pub mod identity;
pub mod pb;
pub mod policy;
pub mod workload_api;
