//! Compiles the SPIFFE Workload API (served by the development CA) and the reference
//! services' protos (used by `meshd demo` and the tests) with protox, so no system
//! `protoc` is needed. The payment API's descriptor set (with its imports) is written to
//! `OUT_DIR/payment_api.pb` too: `meshd demo`'s gateway transcodes JSON calls from it.

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
    println!("cargo:rerun-if-changed=proto/google/api");
    let api = protox::compile(["proto/payment.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("payment_api.pb"),
        prost::Message::encode_to_vec(&api),
    )?;
    let fds = protox::compile(protos, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
