//! Compiles the SPIFFE Workload API (served by the development CA) and the reference
//! services' protos (used by `meshd demo` and the tests) with protox, so no system
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/workload.proto",
        "proto/payment.proto",
        "proto/contact.proto",
        "proto/family.proto",
        "proto/document.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
