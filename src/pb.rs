//! Generated protobuf and gRPC code: the SPIFFE Workload API (served by the development
//! CA) and the reference services of DESIGN.md §1 (used by the demo and the tests).
#![allow(clippy::all, missing_docs)]

/// The SPIFFE Workload API (`SpiffeWorkloadAPI`), package-less as in the SPIFFE spec.
pub mod workload {
    tonic::include_proto!("_");
}
pub mod payment {
    tonic::include_proto!("payment.v1");
}
pub mod contact {
    tonic::include_proto!("contact.v1");
}
pub mod family {
    tonic::include_proto!("family.v1");
}
pub mod document {
    tonic::include_proto!("document.v1");
}
