//! Helpers shared by the integration tests (`mod common;` in a tests/*.rs file).
pub mod edge;
pub mod edge_gateway;
pub mod envoy;
pub mod gospiffe;
pub mod injector;
pub mod kube;
pub mod meshd;
pub mod netns;
pub mod replicas;
pub mod soak;
pub mod spire;
