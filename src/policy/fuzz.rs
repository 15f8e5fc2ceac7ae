//! Fuzzed policy files: the reference policies of `deploy/policies` and files with YAML
//! anchors, aliases and merge keys, mutated (truncated, bytes flipped, hostile tokens,
//! huge, deeply nested, unicode), through `parse_policy` and through the reloading
//! store as a hot reload would read them.
//!
//! Properties: parsing never panics or hangs; each problem is located in the file (or
//! is about the file as a whole); a policy that parses decides any request without
//! panicking. Fail closed: a file that does not load leaves a new store denying every
//! request, and leaves a loaded store deciding exactly as before the bad edit: a broken
//! policy never yields an allow.

use crate::identity::SpiffeId;
use crate::policy::{parse_policy, PolicyStore, Request, Target};
use crate::telemetry::fuzz_budget::{config, mutated, watchdog};
use proptest::prelude::*;
use std::path::Path;

const POLICIES: &[&str] = &[
    include_str!("../../deploy/policies/payment-service.yaml"),
    include_str!("../../deploy/policies/contact-service.yaml"),
    include_str!("../../deploy/policies/family-service.yaml"),
    include_str!("../../deploy/policies/document-service.yaml"),
    ANCHORS,
];

/// Every shape of rule, with anchors and aliases (which a repeat turns into nesting).
const ANCHORS: &str = r#"service: s
mode: audit
default: allow
rules:
  - name: a
    action: deny
    from: &peers ["spiffe://jia.app/ns/*", "spiffe://other.td/*"]
    to: &to
      grpc: ["pkg.S/M", "pkg.T/*"]
      http: [{methods: [GET, POST], paths: ["/x", "/y/*"]}]
      ports: [15006, 8080]
  - name: b
    from: *peers
    to: *to
  - {name: c, action: allow, from: ["spiffe://jia.app/a"]}
"#;

/// The policy a loaded store holds before each bad edit: deny by default, one allow.
const BASELINE: &str = r#"service: payment-service
default: deny
rules:
  - name: gateway-calls-payments
    from: ["spiffe://jia.app/api-gateway"]
    to: {grpc: ["payment.v1.PaymentService/*"]}
"#;

fn peer() -> impl Strategy<Value = SpiffeId> {
    prop::sample::select(vec![
        "spiffe://jia.app/api-gateway",
        "spiffe://jia.app/payment-service",
        "spiffe://jia.app/ns/x",
        "spiffe://other.td/y",
        "spiffe://evil.example/api-gateway",
    ])
    .prop_map(|s| SpiffeId::new(s).expect("a valid ID"))
}

/// A request as text: (kind, service or method, method or path, port).
type Req = (u8, String, String, u16);

fn request() -> impl Strategy<Value = Req> {
    (
        0u8..3,
        prop_oneof![
            Just("payment.v1.PaymentService".to_string()),
            Just("GET".to_string()),
            "\\PC{0,12}"
        ],
        prop_oneof![
            Just("CreatePayment".to_string()),
            Just("/x".to_string()),
            "\\PC{0,12}"
        ],
        prop_oneof![Just(15006u16), any::<u16>()],
    )
}

fn target(r: &Req) -> Target<'_> {
    let request = match r.0 {
        0 => Request::Grpc {
            service: &r.1,
            method: &r.2,
        },
        1 => Request::Http {
            method: &r.1,
            path: &r.2,
        },
        _ => Request::Tcp,
    };
    Target { port: r.3, request }
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn policies_parse_or_locate_each_problem(
        text in mutated(POLICIES),
        peers in proptest::collection::vec(peer(), 1..4),
        reqs in proptest::collection::vec(request(), 1..4),
    ) {
        let _w = watchdog("parse_policy");
        match parse_policy(&text, Path::new("p.yaml"), 1) {
            Ok((policy, _)) => {
                for p in &peers {
                    for r in &reqs {
                        let _ = policy.authorize(p, &target(r));
                        let _ = crate::policy::explain(&policy, &p.to_string(), &target(r));
                    }
                }
            }
            Err(problems) => {
                prop_assert!(!problems.is_empty());
                for p in &problems {
                    prop_assert!(p.to_string().starts_with("p.yaml"), "{}", p);
                }
            }
        }
    }

    #[test]
    fn a_policy_that_does_not_load_never_allows(
        text in mutated(POLICIES),
        peers in proptest::collection::vec(peer(), 1..4),
        reqs in proptest::collection::vec(request(), 1..4),
    ) {
        let _w = watchdog("PolicyStore::reload");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("policy.yaml");
        // A new store: the file is all it has.
        std::fs::write(&path, &text).expect("policy written");
        let fresh = PolicyStore::new(&path);
        let fresh_loaded = fresh.reload().is_ok();
        // A store that holds the baseline, then sees the edit.
        std::fs::write(&path, BASELINE).expect("baseline written");
        let live = PolicyStore::new(&path);
        prop_assert!(live.reload().is_ok());
        let before: Vec<bool> = peers.iter().flat_map(|p| reqs.iter().map(|r| live.decide(p, &target(r)).0.allowed)).collect();
        std::fs::write(&path, &text).expect("edit written");
        let edit_loaded = live.reload().is_ok();
        prop_assert_eq!(fresh_loaded, edit_loaded);
        if !edit_loaded {
            prop_assert!(!fresh.is_loaded());
            for p in &peers {
                for r in &reqs {
                    let (d, _) = fresh.decide(p, &target(r));
                    prop_assert!(!d.allowed, "a store without a policy allowed {} {:?}", p, r);
                }
            }
            let after: Vec<bool> = peers.iter().flat_map(|p| reqs.iter().map(|r| live.decide(p, &target(r)).0.allowed)).collect();
            prop_assert_eq!(before, after, "a bad edit changed the decisions");
        }
    }
}

/// Aliases nested ten deep, each naming the one before nine times (a billion laughs):
/// refused quickly, not expanded.
#[test]
fn alias_bombs_are_refused_quickly() {
    let mut text = String::from("a0: &a0 [\"spiffe://jia.app/x\"]\n");
    for i in 1..10 {
        let prev = format!("*a{}", i - 1);
        let list = [prev.as_str(); 9].join(", ");
        text.push_str(&format!("a{i}: &a{i} [{list}]\n"));
    }
    text.push_str("service: s\nrules:\n  - name: r\n    from: *a9\n");
    let started = std::time::Instant::now();
    let result = parse_policy(&text, Path::new("p.yaml"), 1);
    assert!(result.is_err());
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
}
