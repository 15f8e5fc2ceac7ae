//! Fuzzed config parsers: SPIFFE IDs, Workload API addresses, durations, byte sizes,
//! `host:port` (static endpoints, `dns:///` targets, `intercept`, endpoint files), the
//! `endpoints` URIs, and whole `meshd.yaml` files with environment overrides.
//!
//! Properties: none panics or hangs, whatever the input (valid values mutated:
//! truncated, bytes flipped, hostile tokens, huge, unicode); what parses prints back to
//! text that parses to the same value (SPIFFE ID, `host:port`, `endpoints` URI,
//! duration as `/config` shows it, byte size); valid values generated from the grammar
//! always parse; and a config either loads or names each problem as `file:line:column`
//! or `env:VARIABLE`.

use crate::config::endpoints::parse_endpoints;
use crate::config::gateway::byte_size;
use crate::config::raw::Endpoints;
use crate::config::{
    duration_str, parse_duration, parse_host_port, parse_spiffe_id, parse_workload_api_address,
    Config, EndpointsSpec, Env,
};
use crate::telemetry::fuzz_budget::{config, mutated, watchdog};
use proptest::prelude::*;
use std::path::Path;
use std::time::Duration;

const IDS: &[&str] = &[
    "spiffe://jia.app/payment-service",
    "spiffe://jia.app",
    "spiffe://td/ns/default/sa/payment",
    "spiffe://a-b.c_d.example/x.y/z-1",
];

/// A SPIFFE ID made from the standard's grammar: lowercase trust domain, path segments
/// of letters, digits, `.`, `-`, `_` (not `.` or `..`).
fn valid_id() -> impl Strategy<Value = String> {
    (
        "[a-z0-9][a-z0-9._-]{0,20}",
        proptest::collection::vec("[A-Za-z0-9_-][A-Za-z0-9._-]{0,12}", 0..5),
    )
        .prop_map(|(td, path)| {
            let mut id = format!("spiffe://{td}");
            for seg in path {
                id.push('/');
                id.push_str(&seg);
            }
            id
        })
}

/// The text `/config` shows for a duration, read back.
fn printed(d: Duration) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    duration_str::serialize(&d, &mut ser).expect("a duration serializes");
    serde_json::from_slice::<String>(&out).expect("a string")
}

const HOST_PORTS: &[&str] = &[
    "127.0.0.1:8081",
    "[::1]:15006",
    "contact-service.default.svc.cluster.local:15006",
    "a:1",
    "[fe80::1]:65535",
];

const URIS: &[&str] = &[
    "dns:///contact-service.default.svc.cluster.local:15006",
    "dns:///[::1]:80",
    "dns+srv:///_grpc._tcp.payments",
    "file:///etc/meshd/endpoints.yaml",
    "127.0.0.1:8081",
];

const EXAMPLE: &str = include_str!("../../deploy/examples/meshd.yaml");
const BAD: &str = include_str!("../../tests/data/config/bad.yaml");
const GATEWAY: &str = "service: api-gateway
identity: {files: {cert: c.pem, key: k.pem, bundle: b.pem}}
outbound:
  - name: p
    endpoints: [\"127.0.0.1:1\", \"[::1]:2\"]
    server_id: spiffe://td/p
    intercept: [\"10.96.0.12:8081\", \"payments:80\"]
transparent: {listen: 127.0.0.1:15001, unmatched: passthrough}
gateway:
  tls: {cert: c.pem, key: k.pem, client_ca: ca.pem, client_auth: optional}
  api_keys: keys.yaml
  jwt: {issuer: https://auth.jia.app, audiences: [api], jwks: jwks.json, leeway: 5s}
  rate_limit: {per_second: 10, burst: 20}
  routes:
    - {name: r, prefix: /, upstream: p, auth: any, request_timeout: 300ms}
lifecycle: {drain_timeout: 1m}
";

/// Environment variables meshd reads, for overrides with mutated values.
const ENV_NAMES: &[&str] = &[
    "SERVICE_MESH_SPIFFE_ID",
    "SPIFFE_ENDPOINT_SOCKET",
    "MTLS_CERT_FILE",
    "MTLS_KEY_FILE",
    "MTLS_CA_FILE",
    "GRPC_ADDRESS",
    "API_GATEWAY_ADDRESS",
    "API_GATEWAY_KEY",
    "API_GATEWAY_ENABLE_TLS",
    "MESHD_INBOUND_LISTEN",
    "MESHD_INBOUND_PROTOCOL",
    "MESHD_LIFECYCLE_DRAIN_TIMEOUT",
    "MESHD_IDENTITY_WORKLOAD_API",
    "MESHD_RUNTIME_WORKER_THREADS",
    "MESHD_LOG_ACCESS",
];

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn spiffe_ids_round_trip_or_are_refused(
        text in prop_oneof![mutated(IDS), valid_id(), "\\PC{0,40}"],
    ) {
        let _w = watchdog("parse_spiffe_id");
        if let Ok(id) = parse_spiffe_id(&text) {
            prop_assert_eq!(id.to_string(), text.clone());
            prop_assert_eq!(parse_spiffe_id(&id.to_string()), Ok(id));
            prop_assert!(text.starts_with("spiffe://"));
        }
    }

    #[test]
    fn ids_from_the_grammar_parse(text in valid_id()) {
        let got = parse_spiffe_id(&text).map(|id| id.to_string());
        prop_assert_eq!(got, Ok(text));
    }

    #[test]
    fn workload_api_addresses_are_idempotent(
        text in mutated(&["unix:///run/spire/sockets/agent.sock", "unix:/tmp/a.sock"]),
    ) {
        let _w = watchdog("parse_workload_api_address");
        if let Ok(addr) = parse_workload_api_address(&text) {
            prop_assert!(addr.starts_with("unix:///"), "{}", addr);
            prop_assert_eq!(parse_workload_api_address(&addr), Ok(addr.clone()));
        }
    }

    #[test]
    fn durations_never_panic_and_print_back(
        text in prop_oneof![
            mutated(&["250ms", "5s", "1m", "2h", " 0s ", "90s", "1500ms"]),
            (any::<u64>(), prop::sample::select(vec!["ms", "s", "m", "h", "", "d"]))
                .prop_map(|(n, u)| format!("{n}{u}")),
        ],
    ) {
        let _w = watchdog("parse_duration");
        if let Ok(d) = parse_duration(&text) {
            let shown = printed(d);
            prop_assert_eq!(parse_duration(&shown), Ok(d), "{} shown as {}", text, shown);
        }
    }

    #[test]
    fn byte_sizes_never_panic_and_read_their_unit(
        text in mutated(&["4MiB", "64KiB", "512B", "512", "1 MiB", "3K", "7M"]),
        n in 0u64..(1 << 44),
        unit in prop::sample::select(vec![("", 1u64), ("B", 1), ("KiB", 1 << 10), ("MiB", 1 << 20)]),
    ) {
        let _w = watchdog("byte_size::parse");
        let _ = byte_size::parse(&text);
        prop_assert_eq!(byte_size::parse(&format!("{n}{}", unit.0)), Some(n * unit.1));
    }

    #[test]
    fn host_ports_round_trip(text in mutated(HOST_PORTS)) {
        let _w = watchdog("parse_host_port");
        if let Ok(hp) = parse_host_port(&text) {
            prop_assert!(hp.port > 0);
            prop_assert_eq!(parse_host_port(&hp.to_string()), Ok(hp));
        }
    }

    #[test]
    fn endpoints_uris_round_trip(
        uri in mutated(URIS),
        list in proptest::collection::vec(mutated(HOST_PORTS), 0..4),
    ) {
        let _w = watchdog("parse_endpoints");
        if let Ok(spec) = parse_endpoints(&Endpoints::Uri(uri.clone())) {
            prop_assert!(!matches!(spec, EndpointsSpec::Static(_)));
            let again = parse_endpoints(&Endpoints::Uri(spec.to_string()));
            prop_assert_eq!(again, Ok(spec));
        }
        if let Ok(EndpointsSpec::Static(parsed)) = parse_endpoints(&Endpoints::Static(list.clone())) {
            prop_assert_eq!(parsed.len(), list.len());
            prop_assert!(!parsed.is_empty());
        }
    }

    #[test]
    fn configs_load_or_name_each_problem(
        text in mutated(&[EXAMPLE, BAD, GATEWAY]),
        env in proptest::collection::vec(
            (prop::sample::select(ENV_NAMES), mutated(&["spiffe://jia.app/x", "127.0.0.1:8081",
                "unix:///tmp/a.sock", "250ms", "true", "grpc", "deny", "/tmp/c.pem", "4"])),
            0..3,
        ),
    ) {
        let _w = watchdog("Config::from_text");
        let env: Env = env.into_iter().map(|(k, v)| (k.to_string(), v)).collect();
        match Config::from_text(Path::new("m.yaml"), &text, &env) {
            Ok((config, _)) => {
                let _ = config.redacted();
            }
            Err(errors) => {
                prop_assert!(!errors.0.is_empty());
                for p in &errors.0 {
                    let shown = p.to_string();
                    prop_assert!(
                        shown.starts_with("m.yaml:") || shown.starts_with("env:"),
                        "{}", shown
                    );
                }
            }
        }
    }
}

/// Found by `durations_never_panic_and_print_back`: a number of minutes or hours whose
/// seconds overflow 64 bits panicked in a debug build (and wrapped to a short timeout in
/// a release build); now refused like a number too long for 64 bits.
#[test]
fn durations_too_long_for_64_bits_are_refused() {
    for text in [
        "307445734561825861m",
        "5124095576030432h",
        "18446744073709551616s",
    ] {
        assert_eq!(
            parse_duration(text).map_err(|e| e.to_string()),
            Err(format!("duration `{text}` must start with a whole number")),
        );
    }
    assert_eq!(
        parse_duration("307445734561825860m"),
        Ok(Duration::from_secs(307445734561825860 * 60))
    );
}

/// Found by `durations_never_panic_and_print_back`: `/config` showed 90 s as `1m 30s`,
/// which a config file cannot hold; each duration is now shown in one unit.
#[test]
fn durations_show_as_config_writes_them() {
    let table = [
        (Duration::from_secs(90), "90s"),
        (Duration::from_millis(1500), "1500ms"),
        (Duration::from_secs(5), "5s"),
        (Duration::from_millis(250), "250ms"),
        (Duration::from_secs(120), "2m"),
        (Duration::from_secs(7200), "2h"),
        (Duration::ZERO, "0s"),
    ];
    for (d, want) in table {
        assert_eq!(printed(d), want, "{d:?}");
        assert_eq!(parse_duration(want), Ok(d));
    }
}
