//! Compiles the SPIFFE Workload API (served by the development CA) and the reference
//! services' protos (used by `meshd demo` and the tests) with protox, so no system
//! `protoc` is needed; and lays out the binary's hot code together (see `hot_code_first`).

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
    hot_code_first();
    Ok(())
}

/// The functions a sidecar runs (starting, serving requests and handshakes, idling; listed
/// in `link/meshd.order` by `benches/e2e/hot-order.sh`) are laid out first in the binary.
/// The kernel maps a binary's code 64 KB around each page touched, so code run by a
/// sidecar, when scattered over the 11 MB of `.text`, made most of it resident: this packs
/// it into a few MB (optimisation log, 2026-12-07). Names the binary no longer has are
/// skipped, so a stale list costs nothing but the gain. Only with rustc's default linker
/// on x86_64 Linux (rust-lld, which reads an order file).
fn hot_code_first() {
    println!("cargo:rerun-if-changed=link/meshd.order");
    let target = std::env::var("TARGET").unwrap_or_default();
    let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") else {
        return;
    };
    let order = std::path::Path::new(&dir).join("link/meshd.order");
    if target == "x86_64-unknown-linux-gnu" && order.exists() {
        println!(
            "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
    }
}
