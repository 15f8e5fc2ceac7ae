//! meshd: a SPIFFE-native sidecar proxy.
//!
//! Data flows one way (DESIGN.md §7):
//! `config -> identity -> tls -> policy -> discovery -> proxy -> admin -> app`,
//! with `telemetry` a leaf handed in by `app`.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod balancer;
pub mod config;
pub mod config_check;
mod config_env;
mod config_error;
pub mod config_gateway;
pub mod config_intercept;
pub mod config_resilience;
pub mod demo;
pub mod demo_apps;
mod demo_gateway;
mod demo_payment;
mod demo_sidecars;
mod demo_tour;
pub mod dev_ca;
mod dev_ca_cli;
mod dev_ca_server;
pub mod discovery;
pub mod discovery_dns;
pub mod discovery_file;
pub mod gateway;
pub mod gateway_auth;
pub mod h2_body;
pub mod h2_pool;
pub mod handshake_io;
pub mod health_check;
pub mod identity;
pub mod identity_files;
pub mod inbound;
pub mod inject;
pub mod intercept;
pub mod iptables;
pub mod metered_body;
pub mod metric_cache;
pub mod outbound;
mod outbound_call;
pub mod pb;
pub mod policy;
pub mod policy_cli;
mod policy_file;
pub mod policy_parse;
pub mod policy_store;
pub mod probe;
pub mod proxy;
pub mod replay_body;
pub mod resilience;
pub mod telemetry;
pub mod tls;
pub mod verified_chains;
pub mod workload_api;
