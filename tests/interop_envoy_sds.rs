//! Envoy 1.40 fed by the real SPIRE agent's SDS API, interoperating with meshd both ways.
//!
//! The story: a team runs SPIRE, and some of its services have Envoy sidecars set up as
//! SPIRE's own Envoy guides do (a `spire_agent` cluster on the agent's Workload API socket,
//! gRPC over HTTP/2, keys and bundles by SDS, no `sds` block in the agent's config: its
//! defaults `default`, `ROOTCA` and `ALL` apply), while others run meshd. Envoy runs as uid
//! 20001 (`spiffe://jia.app/payment-service`), meshd as uid 20003
//! (`spiffe://jia.app/contact-service`); each gets its own SVID from the unix attestor.
//!
//! - Envoy calls meshd's inbound (gRPC over mTLS h2, meshd's ID pinned with
//!   `match_typed_subject_alt_names`, trust from SPIRE's SPIFFE validator config): the
//!   contact app answers and saw Envoy's ID; when meshd's policy no longer names Envoy's ID
//!   the call ends in PERMISSION_DENIED naming the default; Envoy pinning another ID refuses
//!   meshd's certificate (UNAVAILABLE; Envoy counts `ssl.fail_verify_san`).
//! - meshd's outbound calls Envoy's listener (client certificate required, meshd's ID
//!   pinned): the app answers and saw meshd's ID in Envoy's XFCC; meshd expecting another
//!   server ID refuses Envoy; an Envoy listener pinning another client ID refuses meshd.
//! - The same both ways over TCP (meshd `protocol: tcp`, Envoy `tcp_proxy`) with bytes echoed.
//! - Under a steady ghz load through Envoy -> meshd -> app, with SVIDs of a few seconds'
//!   TTL, both sides rotate at least twice (Envoy's `/certs` serial, meshd's `/identity`
//!   serial and `meshd_svid_rotations_total`) and not one request fails.
//!
//! A missing Envoy 1.40, ghz or grpcurl fails the test naming it.

mod common;

use common::edge::{repo, tool};
use common::envoy::Envoy;
use common::meshd::{free_port, wait_until, DemoApp, Sidecar};
use common::spire::Spire;
use serde_json::Value;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Envoy's identity: the reference payment service, uid 20001 in `spire/up.sh`.
const ENVOY_UID: u32 = 20001;
const ENVOY_ID: &str = "spiffe://jia.app/payment-service";
/// meshd's identity: the reference contact service, uid 20003.
const MESHD_UID: u32 = 20003;
const MESHD_ID: &str = "spiffe://jia.app/contact-service";
/// An ID that neither side has: pinning it must refuse every handshake.
const OTHER_ID: &str = "spiffe://jia.app/family-service";

// ------------------------------------------------------------------ Envoy's config

/// The loopback ports of one run (Envoy's admin and listeners, meshd's inbounds), by their
/// placeholder names in `tests/data/envoy-sds/envoy.yaml`.
struct Ports(std::collections::HashMap<&'static str, u16>);

impl Ports {
    fn new() -> Ports {
        let names = [
            "ADMIN",
            "OUT_GRPC",
            "OUT_GRPC_WRONG",
            "OUT_TCP",
            "OUT_TCP_WRONG",
            "IN_GRPC",
            "IN_GRPC_OTHER",
            "IN_TCP",
            "IN_TCP_OTHER",
            "MESHD_GRPC",
            "MESHD_TCP",
        ];
        Ports(names.into_iter().map(|n| (n, free_port())).collect())
    }

    /// The template filled in: these ports, the agent's socket, the apps behind Envoy
    /// (`app` h2c, `echo` TCP) and the three SPIFFE IDs.
    fn envoy_config(&self, socket: &Path, app: u16, echo: u16) -> String {
        let mut text = std::fs::read_to_string(repo("tests/data/envoy-sds/envoy.yaml"))
            .expect("read tests/data/envoy-sds/envoy.yaml");
        let mut fill: Vec<(&str, String)> =
            self.0.iter().map(|(k, v)| (*k, v.to_string())).collect();
        fill.extend([
            ("APP", app.to_string()),
            ("ECHO", echo.to_string()),
            ("SOCKET", socket.display().to_string()),
            ("ENVOY_ID", ENVOY_ID.to_string()),
            ("MESHD_ID", MESHD_ID.to_string()),
            ("OTHER_ID", OTHER_ID.to_string()),
        ]);
        for (key, value) in fill {
            text = text.replace(&format!("@{key}@"), &value);
        }
        let left = text.match_indices('@').map(|(i, _)| &text[i..]);
        let left: Vec<&str> = left
            .filter(|t| t[1..].starts_with(|c: char| c.is_ascii_uppercase()))
            .collect();
        assert!(
            left.is_empty(),
            "placeholders left in envoy.yaml: {left:.30?}"
        );
        text
    }
}

impl std::ops::Index<&str> for Ports {
    type Output = u16;
    fn index(&self, name: &str) -> &u16 {
        &self.0[name]
    }
}

// ------------------------------------------------------------------ processes

/// A TCP echo app on a free loopback port (a thread per connection).
fn echo_app() -> u16 {
    let port = free_port();
    let l = TcpListener::bind(("127.0.0.1", port)).expect("bind the echo app");
    std::thread::spawn(move || {
        for conn in l.incoming().flatten() {
            std::thread::spawn(move || {
                let mut w = conn.try_clone().unwrap();
                let _ = std::io::copy(&mut &conn, &mut w);
            });
        }
    });
    port
}

/// Sends 48 KiB of varied bytes to `port` and reads them back: Ok when every byte came
/// back in order, Err(what happened) when the connection closed or stalled first.
fn echo_round_trip(port: u16) -> Result<(), String> {
    let payload: Vec<u8> = (0..48 * 1024u32).map(|i| (i * 7 + i / 251) as u8).collect();
    let mut s = TcpStream::connect(("127.0.0.1", port)).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut w = s.try_clone().unwrap();
    let sent = payload.clone();
    let writer = std::thread::spawn(move || w.write_all(&sent));
    let mut got = vec![0u8; payload.len()];
    let mut at = 0;
    while at < got.len() {
        match s.read(&mut got[at..]) {
            Ok(0) => return Err(format!("closed after {at} bytes echoed")),
            Ok(n) => at += n,
            Err(e) => return Err(format!("{e} after {at} bytes echoed")),
        }
    }
    let _ = writer.join();
    (got == payload)
        .then_some(())
        .ok_or_else(|| "echo differs from what was sent".into())
}

/// Asserts the pipe on `port` is closed (not merely stalled) without echoing a byte.
fn assert_refused_tcp(port: u16, what: &str) {
    let err = echo_round_trip(port).expect_err(what);
    assert!(
        err.starts_with("closed after 0") || err.contains("reset"),
        "{what}: {err}"
    );
}

/// grpcurl's GetContact(c1) through the plaintext listener `port`: (ok, output).
fn get_contact(port: u16) -> (bool, String) {
    let out = Command::new(tool("grpcurl"))
        .args(["-plaintext", "-max-time", "10", "-import-path"])
        .arg(repo("proto"))
        .args(["-proto", "contact.proto", "-d", r#"{"contact_id":"c1"}"#])
        .arg(format!("127.0.0.1:{port}"))
        .arg("contact.v1.ContactService/GetContact")
        .output()
        .expect("run grpcurl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Writes a policy atomically (meshd watches its folder and reloads it).
fn write_policy(path: &Path, yaml: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, yaml).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// A policy of contact-service allowing only `from` (`rule` names the rule).
fn policy(rule: &str, from: &str, grpc: bool) -> String {
    let to = if grpc {
        "\n    to:\n      grpc: [\"contact.v1.ContactService/*\"]"
    } else {
        ""
    };
    format!("service: contact-service\nmode: enforce\ndefault: deny\nrules:\n  - name: {rule}\n    action: allow\n    from: [\"{from}\"]{to}\n")
}

/// A policy file in a folder of its own under `dir`.
fn policy_file(dir: &Path, name: &str, yaml: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let folder = dir.join(name);
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::set_permissions(&folder, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = folder.join("policy.yaml");
    write_policy(&path, yaml);
    path
}

/// Starts meshd as `MESHD_UID` with `body` (inbound/outbound sections) and waits for /ready.
fn meshd(spire: &Spire, dir: &Path, name: &str, body: &str) -> Sidecar {
    let admin = free_port();
    let yaml = format!(
        "service: contact-service\nidentity:\n  workload_api: {}\n  expect: {MESHD_ID}\n{body}admin:\n  listen: 127.0.0.1:{admin}\nruntime:\n  worker_threads: 1\n",
        spire.agent_endpoint()
    );
    let s = Sidecar::start_as(name, dir, &yaml, admin, Some(MESHD_UID));
    s.wait_ready();
    s
}

/// One meshd outbound entry to a loopback Envoy listener.
fn outbound(name: &str, listen: u16, protocol: &str, envoy_port: u16, server_id: &str) -> String {
    format!("  - name: {name}\n    listen: 127.0.0.1:{listen}\n    protocol: {protocol}\n    endpoints: [\"127.0.0.1:{envoy_port}\"]\n    server_id: {server_id}\n    timeout: 5s\n")
}

/// meshd's inbound section: `listen` on loopback to `forward`, with `policy`.
fn inbound(listen: u16, forward: &str, protocol: &str, policy: &Path) -> String {
    format!(
        "inbound:\n  listen: 127.0.0.1:{listen}\n  forward: {forward}\n  protocol: {protocol}\n  policy: {}\n",
        policy.display()
    )
}

fn ports<const N: usize>() -> [u16; N] {
    std::array::from_fn(|_| free_port())
}

// ------------------------------------------------------------------ the tests

// Story: with SPIRE's SDS as Envoy's only source of keys and trust, gRPC and TCP flow
// Envoy -> meshd and meshd -> Envoy, each side proving the other's SPIFFE ID; every wrong
// ID (a pin, a server_id, a policy) is refused where it is checked, with the reason visible.
#[test]
fn envoy_on_spire_sds_and_meshd_call_each_other_over_grpc_and_tcp() {
    let spire = Spire::up();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = DemoApp::start("contact", &[]);
    let echo = echo_app();
    let p = Ports::new();
    let [mo, mo_wrong, mo_other, mot, mot_wrong, mot_other] = ports();
    let grpc_policy = policy_file(d, "grpc-policy", &policy("payments-call", ENVOY_ID, true));
    let tcp_policy = policy_file(d, "tcp-policy", &policy("payments-pipe", ENVOY_ID, false));
    let outbounds = [
        outbound("envoy", mo, "grpc", p["IN_GRPC"], ENVOY_ID),
        outbound("envoy-wrong-id", mo_wrong, "grpc", p["IN_GRPC"], OTHER_ID),
        outbound(
            "envoy-other",
            mo_other,
            "grpc",
            p["IN_GRPC_OTHER"],
            ENVOY_ID,
        ),
        outbound("envoy-tcp", mot, "tcp", p["IN_TCP"], ENVOY_ID),
        outbound(
            "envoy-tcp-wrong-id",
            mot_wrong,
            "tcp",
            p["IN_TCP"],
            OTHER_ID,
        ),
        outbound(
            "envoy-tcp-other",
            mot_other,
            "tcp",
            p["IN_TCP_OTHER"],
            ENVOY_ID,
        ),
    ];
    let body = inbound(p["MESHD_GRPC"], &app.addr.to_string(), "grpc", &grpc_policy);
    let grpc_side = meshd(
        &spire,
        d,
        "contact-grpc",
        &format!("{body}outbound:\n{}", outbounds.concat()),
    );
    let body = inbound(
        p["MESHD_TCP"],
        &format!("127.0.0.1:{echo}"),
        "tcp",
        &tcp_policy,
    );
    let tcp_side = meshd(&spire, d, "contact-tcp", &body);
    let config = p.envoy_config(&spire.agent_socket(), app.addr.port(), echo);
    let envoy = Envoy::start_as(d, p["ADMIN"], &config, ENVOY_UID);
    let [out_grpc, out_grpc_wrong] = [p["OUT_GRPC"], p["OUT_GRPC_WRONG"]];
    let [out_tcp, out_tcp_wrong] = [p["OUT_TCP"], p["OUT_TCP_WRONG"]];

    // What SPIRE's SDS served: Envoy's SVID under both names it asked for, and each bundle
    // as a SPIFFE certificate validator config for trust domain jia.app (no plain CA list).
    let secrets = envoy.sds_secrets();
    let names: Vec<&str> = secrets.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        ["ALL", "default", "spiffe://jia.app", ENVOY_ID],
        "{secrets:#?}"
    );
    for svid in ["default", ENVOY_ID] {
        assert!(
            secrets[svid]["tls_certificate"]["certificate_chain"].is_object(),
            "{secrets:#?}"
        );
    }
    for bundle in ["ALL", "spiffe://jia.app"] {
        let v = &secrets[bundle]["validation_context"];
        let validator = &v["custom_validator_config"];
        assert_eq!(
            validator["name"], "envoy.tls.cert_validator.spiffe",
            "{bundle}: {v:#}"
        );
        assert_eq!(
            validator["typed_config"]["trust_domains"][0]["name"], "jia.app",
            "{v:#}"
        );
        assert!(v["trusted_ca"].is_null(), "{bundle}: {v:#}");
    }
    let own = envoy.own_certs();
    assert!(
        !own.is_empty() && own.iter().all(|(_, uri)| uri == ENVOY_ID),
        "{own:?}"
    );

    // gRPC, Envoy -> meshd: the app saw Envoy's ID (meshd's XFCC from the verified peer).
    let (ok, text) = get_contact(out_grpc);
    assert!(
        ok && text.contains("seenCaller") && text.contains(ENVOY_ID),
        "{text}"
    );
    // Envoy pinning an ID that meshd does not have refuses meshd's certificate: UNAVAILABLE
    // (Envoy's 503 "remote connection failure"), counted as a SAN verification failure.
    let (ok, text) = get_contact(out_grpc_wrong);
    assert!(!ok && text.contains("Unavailable"), "{text}");
    let san = envoy.stat("cluster.meshd_grpc_wrong_id.ssl.fail_verify_san");
    assert!(
        san >= 1.0,
        "{}",
        envoy
            .get("/stats?filter=meshd_grpc_wrong_id.ssl")
            .unwrap_or_default()
    );

    // gRPC, meshd -> Envoy: the app saw meshd's ID (Envoy's XFCC).
    let (ok, text) = get_contact(mo);
    assert!(
        ok && text.contains("seenCaller") && text.contains(MESHD_ID),
        "{text}"
    );
    // meshd expecting another server ID refuses Envoy's SVID.
    let wrong_server = ["direction=\"outbound\"", "reason=\"wrong_server_id\""];
    let (ok, text) = get_contact(mo_wrong);
    assert!(!ok, "meshd reached Envoy expecting {OTHER_ID}: {text}");
    let refusals = grpc_side.metric("meshd_tls_handshake_failures_total", &wrong_server);
    assert!(refusals >= 1.0, "{}", grpc_side.get("/metrics").1);
    // Envoy's listener that pins another client ID refuses meshd.
    let (ok, text) = get_contact(mo_other);
    assert!(
        !ok,
        "Envoy let {MESHD_ID} in where only {OTHER_ID} may come: {text}"
    );
    assert!(envoy.stat("listener.in_grpc_other_client.ssl.fail_verify_san") >= 1.0);

    // TCP both ways: every byte echoed; every wrong ID closes the pipe without an echo.
    echo_round_trip(out_tcp).expect("Envoy -> meshd tcp inbound -> echo");
    echo_round_trip(mot).expect("meshd tcp outbound -> Envoy tcp_proxy -> echo");
    assert_refused_tcp(out_tcp_wrong, "Envoy pinning another server ID over tcp");
    assert!(envoy.stat("cluster.meshd_tcp_wrong_id.ssl.fail_verify_san") >= 1.0);
    assert_refused_tcp(mot_wrong, "meshd tcp outbound expecting another server ID");
    let more = grpc_side.metric("meshd_tls_handshake_failures_total", &wrong_server);
    assert!(
        more > refusals,
        "the tcp refusal is not counted as wrong_server_id"
    );
    assert_refused_tcp(mot_other, "Envoy tcp listener pinning another client ID");
    assert!(envoy.stat("listener.in_tcp_other_client.ssl.fail_verify_san") >= 1.0);

    // meshd's policies stop naming Envoy's ID (hot reload): denied with the reason.
    write_policy(&grpc_policy, &policy("only-family", OTHER_ID, true));
    write_policy(&tcp_policy, &policy("only-family-pipe", OTHER_ID, false));
    for side in [&grpc_side, &tcp_side] {
        let reloaded = wait_until(Duration::from_secs(15), || {
            side.get("/policy").1.contains("only-family")
        });
        assert!(
            reloaded,
            "{} kept its policy: {}",
            side.proc.name,
            side.get("/policy").1
        );
    }
    let (ok, text) = get_contact(out_grpc);
    assert!(
        !ok && text.contains("PermissionDenied") && text.contains("default deny"),
        "{text}"
    );
    assert_refused_tcp(out_tcp, "meshd's tcp policy no longer names Envoy");
    drop(envoy);
}

/// Distinct values in the order first seen.
fn push_new(seen: &Mutex<Vec<String>>, value: Option<String>) {
    let mut seen = seen.lock().unwrap();
    if let Some(v) = value.filter(|v| !v.is_empty()) {
        if seen.last() != Some(&v) {
            seen.push(v);
        }
    }
}

// Story: SVIDs from SPIRE live 16 s; for 32 s ghz sends 150 GetContact calls a second
// through Envoy -> meshd inbound -> app, Envoy opening a new upstream connection every 100
// requests; both Envoy's and meshd's SVIDs rotate at least twice meanwhile, and every one of
// the calls is OK.
#[test]
fn rotation_under_load_through_envoy_and_meshd_loses_nothing() {
    const TTL_SECS: u32 = 16;
    const LOAD_SECS: u32 = 32;
    const RPS: u32 = 150;
    let spire = Spire::up_with_svid_ttl(TTL_SECS);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let app = DemoApp::start("contact", &[]);
    let p = Ports::new();
    let policy = policy_file(d, "policy", &policy("payments-call", ENVOY_ID, true));
    let body = inbound(p["MESHD_GRPC"], &app.addr.to_string(), "grpc", &policy);
    let side = meshd(&spire, d, "contact-grpc", &body);
    // The echo port is never dialled here: tcp listeners stay idle.
    let config = p.envoy_config(&spire.agent_socket(), app.addr.port(), free_port());
    let envoy = Envoy::start_as(d, p["ADMIN"], &config, ENVOY_UID);
    let out = p["OUT_GRPC"];
    let ghz = tool("ghz");

    let envoy_serials = Mutex::new(Vec::new());
    let meshd_serials = Mutex::new(Vec::new());
    let rotations_before = side.metric("meshd_svid_rotations_total", &[]);
    let stop = AtomicBool::new(false);
    let started = Instant::now();
    let report = std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                push_new(
                    &envoy_serials,
                    envoy.own_certs().first().map(|c| c.0.clone()),
                );
                let id: Value = serde_json::from_str(&side.get("/identity").1).unwrap_or_default();
                push_new(&meshd_serials, id["serial"].as_str().map(str::to_string));
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let out = Command::new(&ghz)
            .args(["--insecure", "--import-paths"])
            .arg(repo("proto"))
            .args([
                "--proto",
                "contact.proto",
                "--call",
                "contact.v1.ContactService/GetContact",
            ])
            .args(["-d", r#"{"contact_id":"c1"}"#, "--rps", &RPS.to_string()])
            // A count, not a duration: `-z` cuts off the calls in flight when it ends
            // ("use of closed network connection"), which would count as failures.
            .args([
                "-n",
                &(RPS * LOAD_SECS).to_string(),
                "-c",
                "4",
                "--connections",
                "2",
            ])
            .args([
                "--timeout",
                "10s",
                "--format",
                "json",
                &format!("127.0.0.1:{out}"),
            ])
            .output()
            .expect("run ghz");
        stop.store(true, Ordering::Relaxed);
        assert!(
            out.status.success(),
            "ghz failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).expect("ghz JSON report")
    });
    let secs = started.elapsed().as_secs_f64();
    let count = report["count"].as_u64().unwrap_or(0);
    let ok = report["statusCodeDistribution"]["OK"].as_u64().unwrap_or(0);
    let envoy_serials = envoy_serials.into_inner().unwrap();
    let meshd_serials = meshd_serials.into_inner().unwrap();
    let rotations = side.metric("meshd_svid_rotations_total", &[]) - rotations_before;
    let handshakes = envoy.stat("cluster.meshd_grpc.ssl.handshake");
    eprintln!(
        "{count} sent, {ok} OK in {secs:.1} s; Envoy SVIDs {envoy_serials:?}; meshd SVIDs \
         {meshd_serials:?} ({rotations} rotations counted); {handshakes} Envoy->meshd handshakes"
    );
    assert_eq!(
        ok, count,
        "calls failed during rotation: {:#}",
        report["errorDistribution"]
    );
    // Two thirds of the target at least: a busy CI machine may slow ghz, not stop it.
    assert!(
        count as f64 >= 2.0 / 3.0 * f64::from(RPS * LOAD_SECS),
        "the load was not steady: {count} calls"
    );
    assert!(
        envoy_serials.len() >= 3,
        "Envoy's SVID rotated fewer than twice: {envoy_serials:?}"
    );
    assert!(
        meshd_serials.len() >= 3,
        "meshd's SVID rotated fewer than twice: {meshd_serials:?}"
    );
    assert!(
        rotations >= 2.0,
        "meshd_svid_rotations_total rose by {rotations}"
    );
    assert!(
        handshakes >= (count / 100) as f64,
        "Envoy reused its upstream connections: {handshakes} handshakes for {count} calls"
    );
    let seen = BTreeSet::from_iter(envoy.own_certs().into_iter().map(|c| c.1));
    assert_eq!(seen, BTreeSet::from([ENVOY_ID.to_string()]));
}
