//! meshd: a SPIFFE-native sidecar proxy.
//!
//! Data flows one way (DESIGN.md §7):
//! `config -> identity -> tls -> policy -> discovery -> proxy -> admin -> app`,
//! with `telemetry` a leaf handed in by `app`.
#![forbid(unsafe_code)]

pub mod config;
pub mod config_check;
mod config_env;
mod config_error;
pub mod dev_ca;
pub mod identity;
pub mod pb;
pub mod policy;
pub mod workload_api;
