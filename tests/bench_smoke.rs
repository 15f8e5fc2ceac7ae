//! The end-to-end benchmark harness in smoke mode, so it cannot rot between benchmark runs.
//!
//! `benches/e2e/run.sh --smoke` starts nginx, a pair of plain socat relays (the floor), a
//! meshd pair, an Envoy pair and an HAProxy pair on loopback, and a stunnel pair for the TCP
//! rows (installing nginx, h2load, socat, HAProxy, stunnel and Envoy when missing), checks a
//! 200 through every HTTP chain and bytes through the stunnel chain, that the SPIFFE checks
//! refuse a wrong ID both ways on meshd and Envoy, and that HAProxy and stunnel refuse what
//! they can check instead of an ID (HAProxy's inbound a wrong client ID; both a peer whose
//! chain does not lead to the bundle they trust; stunnel a client without a certificate).
//! Then it runs tiny loads through the whole measurement and table code, the peers' rows
//! and the "meshd ahead of all of them" comparison included. No timing is judged here. A missing tool that cannot be installed fails the test with the
//! script's message naming it; it never passes without running.
//!
//! `scale_benches_quick` runs the policy-size and endpoint-count scale benches
//! (`benches/policy_scale.rs`, `benches/endpoint_scale.rs`) in their quick mode through
//! cargo, as a user would with `MESHD_SCALE_QUICK=1 cargo bench --bench NAME`, and checks
//! that each generated its cases, checked their decisions and printed its whole table.
//!
//! `scale_harness_smoke` runs `benches/e2e/scale.sh --smoke` (scale curves 1, 4 and 5 at
//! one tiny size each) and checks that their tables came out.
//!
//! `hot_order_smoke` runs `benches/e2e/hot-order.sh --smoke` (the sidecars under
//! callgrind, tiny loads; installs valgrind when missing) into a temporary file and checks
//! that the list it wrote names the functions a request and a handshake run, each one
//! defined in the binary.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

/// Removes what cargo set for this test process (not the user's settings) from `cmd`'s
/// environment: a cargo build under it (a quick bench, or `run.sh`'s record_crypto)
/// would see a changed environment and rebuild dependencies (ring's build script follows
/// CARGO_MANIFEST_DIR).
fn without_test_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy();
        let set_by_cargo = ["CARGO_PKG_", "CARGO_BIN_EXE_", "CARGO_CRATE_"]
            .iter()
            .any(|p| key.starts_with(p))
            || [
                "CARGO_MANIFEST_DIR",
                "CARGO_MANIFEST_PATH",
                "CARGO_PRIMARY_PACKAGE",
                "CARGO_TARGET_TMPDIR",
                "OUT_DIR",
            ]
            .contains(&key.as_ref());
        if set_by_cargo {
            cmd.env_remove(key.as_ref());
        }
    }
}

/// Runs `benches/e2e/SCRIPT --smoke` with the test build's meshd; fails naming the script
/// and showing its output (a missing tool is named in a FAIL line) unless it succeeds.
/// Returns stderr and stdout together.
fn smoke(script: &str, args: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let path = root.join("benches/e2e").join(script);
    assert!(path.exists(), "missing {}", path.display());
    let mut bash = Command::new("bash");
    without_test_env(&mut bash);
    let out = bash
        .arg(&path)
        .arg("--smoke")
        .args(args)
        .env("MESHD_BIN", env!("CARGO_BIN_EXE_meshd"))
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run bash {}: {e}", path.display()));
    let all = format!(
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        out.status.success(),
        "{script} --smoke failed ({}); its output (a missing tool is named in a FAIL line):\n{all}",
        out.status
    );
    all
}

#[test]
fn e2e_harness_smoke() {
    let started = Instant::now();
    let all = smoke("run.sh", &[]);
    for want in [
        "check: meshd chain: 200 (ok)",
        "check: envoy chain: 200 (ok)",
        "check: direct -> nginx: 200 (ok)",
        "check: relay chain: 200 (ok)",
        "chains returned 200: direct, relay, meshd, envoy",
        "because meshd_tls_handshake_failures_total{direction=\"outbound\",reason=\"wrong_server_id\"}",
        "because cluster.wrong-id.ssl.fail_verify_san",
        "reason: denied by default deny (ok)",
        "ssl.fail_verify_san",
        "wrong-ID checks refused: meshd and envoy",
        "check: haproxy chain: 200 (ok)",
        "check: haproxy chain XFCC at the backend",
        "check: haproxy inbound, client spiffe://jia.app/bench-impostor: refused",
        "because haproxy_frontend_denied_sessions_total{proxy=\"inbound\"}",
        "check: haproxy outbound trusting another CA: refused (503)",
        "check: haproxy handshake inbound, client spiffe://jia.app/bench-impostor refused: 1 (ok)",
        "check: stunnel chain: iperf3 received ",
        "check: stunnel_tin, no client certificate: refused",
        "check: stunnel outbound trusting another CA: because its log says certificate verify failed",
        "rep 1 haproxy: ",
        "rep 1 stunnel tcp -P 4: ",
        "rep 1 haproxy handshakes -new: ",
        "rep 1 stunnel handshakes -reuse: ",
        "| metric | direct | relay | meshd | envoy | haproxy | stunnel |",
        "meshd ahead of all of them on every row: not judged in smoke mode",
        "| throughput, req/s |",
        "| JSON→gRPC via gateway, req/s |",
        "record crypto alone: seal ",
    ] {
        assert!(all.contains(want), "run.sh --smoke output lacks `{want}`:\n{all}");
    }
    println!(
        "smoke harness passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// Runs one scale bench in quick mode (debug build, criterion's test mode) and returns
/// its standard output.
fn run_scale_bench(name: &str) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let started = Instant::now();
    let mut cargo = Command::new(env!("CARGO"));
    without_test_env(&mut cargo);
    let out = cargo
        .args(["test", "--quiet", "--bench", name])
        .env("MESHD_SCALE_QUICK", "1")
        .current_dir(root)
        .output()
        .unwrap_or_else(|e| panic!("cannot run cargo ({}): {e}", env!("CARGO")));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "MESHD_SCALE_QUICK=1 cargo test --bench {name} failed ({}):\n{stderr}\n{stdout}",
        out.status
    );
    println!(
        "{name} quick mode passed in {:.1} s:\n{stdout}",
        started.elapsed().as_secs_f64()
    );
    stdout
}

#[test]
fn scale_benches_quick() {
    let policy = run_scale_bench("policy_scale");
    assert!(
        policy.contains("## policy scale") && policy.contains("| shape | rules |"),
        "policy_scale printed no table:\n{policy}"
    );
    for shape in ["exact IDs", "prefixes", "gRPC methods", "mixed"] {
        for rules in [10, 1000] {
            let row = format!("| {shape} | {rules} |");
            assert!(
                policy.contains(&row),
                "policy_scale lacks the row `{row}`:\n{policy}"
            );
        }
    }
    let endpoints = run_scale_bench("endpoint_scale");
    assert!(
        endpoints.contains("## endpoint scale")
            && endpoints.contains("pick p2c_ewma p50 / p99, ns")
            && endpoints.contains("pick least_request p50 / p99, ns"),
        "endpoint_scale printed no table:\n{endpoints}"
    );
    for n in [10, 1000] {
        let row = format!("\n| {n} |");
        assert!(
            endpoints.contains(&row),
            "endpoint_scale lacks the row for {n} endpoints:\n{endpoints}"
        );
    }
}

// Scale curves 1, 4 and 5 in smoke mode: 20 mTLS connections held to a meshd and an Envoy
// inbound by connhold (built with go), a meshd with 5 outbound entries started until
// ready, and a meshd pair loaded with 1 and then 2 worker threads. The tables must come
// out whole, with a row per proxy and size; no figure judged.
#[test]
fn scale_harness_smoke() {
    let started = Instant::now();
    let all = smoke("scale.sh", &[]);
    for want in [
        "connections: meshd x 20: RSS",
        "connections: envoy x 20: RSS",
        "connections: floor x 20: RSS",
        "memory per connection at 20, meshd/envoy",
        "### Curve 1: held mTLS connections",
        "\n| 20 | ",
        "upstreams: 5 outbound entries: ready after",
        "### Curve 4: outbound entries in one config",
        "\n| 5 | ",
        "cores: worker_threads 1, rep 1:",
        "cores: worker_threads 2, rep 1:",
        "### Curve 5: worker threads",
        "\n| 2 | ",
    ] {
        assert!(
            all.contains(want),
            "scale.sh --smoke output lacks `{want}`:\n{all}"
        );
    }
    println!(
        "scale harness smoke passed in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// The script that writes `link/meshd.order` (the hot functions build.rs lays out first)
/// runs the test build's sidecars under callgrind and lists what they ran: the proxy's
/// request path and the TLS handshake must be in it.
#[test]
fn hot_order_smoke() {
    let started = Instant::now();
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("meshd.order");
    let all = smoke(
        "hot-order.sh",
        &["--out", out.to_str().expect("a UTF-8 path")],
    );
    assert!(
        all.contains("functions written to"),
        "hot-order.sh --smoke output:\n{all}"
    );
    let list = std::fs::read_to_string(&out).expect("the order file");
    let names: Vec<&str> = list.lines().collect();
    assert!(
        names.len() >= 500,
        "only {} functions listed:\n{all}",
        names.len()
    );
    for part in ["serve_h2", "h2_pool", "ServerConnection", "PolicyStore"] {
        assert!(
            names.iter().any(|n| n.contains(part)),
            "no function of `{part}` in the hot list ({} names)",
            names.len()
        );
    }
    println!(
        "hot-order smoke passed in {:.1} s: {} functions",
        started.elapsed().as_secs_f64(),
        names.len()
    );
}
