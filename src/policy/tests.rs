use super::*;
use crate::config::parse_spiffe_id;
use crate::identity::SpiffeId;
use std::path::Path;

fn policy(yaml: &str) -> Policy {
    match parse_policy(yaml, Path::new("test.yaml"), 1) {
        Ok((p, _)) => p,
        Err(e) => panic!("test policy does not parse: {e:?}"),
    }
}

fn id(s: &str) -> SpiffeId {
    parse_spiffe_id(s).expect("test ID")
}

const GRPC: fn(&'static str, &'static str) -> Request<'static> =
    |service, method| Request::Grpc { service, method };
const HTTP: fn(&'static str, &'static str) -> Request<'static> =
    |method, path| Request::Http { method, path };

const MESH: &str = r#"
service: payment-service
default: deny
rules:
  - name: gateway-calls-payments
    from: ["spiffe://jia.app/api-gateway"]
    to: {grpc: ["payment.v1.PaymentService/*"]}
  - name: ops-may-read
    from: ["spiffe://jia.app/ns/ops/*"]
    to: {grpc: ["payment.v1.PaymentService/GetPayment", "payment.v1.PaymentService/ListPricingZones"]}
  - name: ops-intern-denied
    action: deny
    from: ["spiffe://jia.app/ns/ops/intern"]
  - name: partner-health
    from: ["spiffe://partner.example/*"]
    to: {grpc: ["grpc.health.v1.Health/Check"]}
  - name: health-from-mesh
    from: ["spiffe://jia.app/*"]
    to:
      grpc: ["grpc.health.v1.Health/Check"]
      http: [{methods: [GET], paths: ["/healthz", "/debug/*"]}]
  - name: admin-port
    from: ["spiffe://jia.app/admin"]
    to: {ports: [15000]}
  - name: tcp-from-db
    from: ["spiffe://jia.app/db"]
    to: {ports: [5432]}
  - name: grpc-no-port
    from: ["spiffe://jia.app/batch"]
    to: {grpc: ["batch.v1.Batch/*"]}
  - name: grpc-with-port
    from: ["spiffe://jia.app/cron"]
    to: {grpc: ["batch.v1.Batch/Run"], ports: [15006]}
  - name: quarantine
    action: deny
    from: ["spiffe://jia.app/ns/quarantine/*"]
  - name: everything-from-root
    from: ["spiffe://jia.app/root"]
"#;

// The table: every matching feature (exact, prefix, domain, ports, http, tcp, deny wins) against one policy.
#[test]
fn authorize_table() {
    let p = policy(MESH);
    let cases: &[(&str, u16, Request<'static>, bool, &str)] = &[
        (
            "spiffe://jia.app/api-gateway",
            15006,
            GRPC("payment.v1.PaymentService", "CreatePayment"),
            true,
            "gateway-calls-payments",
        ),
        (
            "spiffe://jia.app/api-gateway",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            true,
            "gateway-calls-payments",
        ),
        (
            "spiffe://jia.app/api-gateway",
            15006,
            GRPC("contact.v1.ContactService", "Get"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/api-gateway2",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/api-gateway/x",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "default",
        ),
        (
            "spiffe://other.app/api-gateway",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/ns/ops/alice",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            true,
            "ops-may-read",
        ),
        (
            "spiffe://jia.app/ns/ops/team/bob",
            15006,
            GRPC("payment.v1.PaymentService", "ListPricingZones"),
            true,
            "ops-may-read",
        ),
        (
            "spiffe://jia.app/ns/ops/alice",
            15006,
            GRPC("payment.v1.PaymentService", "CreatePayment"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/ns/ops",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/ns/opsx/alice",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/ns/ops/intern",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "ops-intern-denied",
        ),
        (
            "spiffe://jia.app/ns/ops/intern",
            15006,
            GRPC("grpc.health.v1.Health", "Check"),
            false,
            "ops-intern-denied",
        ),
        (
            "spiffe://partner.example/any/thing",
            15006,
            GRPC("grpc.health.v1.Health", "Check"),
            true,
            "partner-health",
        ),
        (
            "spiffe://partner.example/any/thing",
            15006,
            GRPC("grpc.health.v1.Health", "Watch"),
            false,
            "default",
        ),
        (
            "spiffe://partner.example/x",
            15006,
            GRPC("payment.v1.PaymentService", "GetPayment"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            GRPC("grpc.health.v1.Health", "Check"),
            true,
            "health-from-mesh",
        ),
        (
            "spiffe://jia.app/api-gateway",
            15006,
            GRPC("grpc.health.v1.Health", "Check"),
            true,
            "health-from-mesh",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            HTTP("GET", "/healthz"),
            true,
            "health-from-mesh",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            HTTP("GET", "/healthz?verbose=1"),
            true,
            "health-from-mesh",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            HTTP("POST", "/healthz"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            HTTP("GET", "/healthz/x"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            HTTP("GET", "/debug/pprof"),
            true,
            "health-from-mesh",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            HTTP("GET", "/debug"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/whoever",
            15006,
            Request::Tcp,
            false,
            "default",
        ),
        (
            "spiffe://jia.app/admin",
            15000,
            HTTP("DELETE", "/anything"),
            true,
            "admin-port",
        ),
        (
            "spiffe://jia.app/admin",
            15006,
            HTTP("GET", "/anything"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/admin",
            15000,
            Request::Tcp,
            true,
            "admin-port",
        ),
        (
            "spiffe://jia.app/db",
            5432,
            Request::Tcp,
            true,
            "tcp-from-db",
        ),
        ("spiffe://jia.app/db", 5433, Request::Tcp, false, "default"),
        (
            "spiffe://jia.app/batch",
            15006,
            GRPC("batch.v1.Batch", "Run"),
            true,
            "grpc-no-port",
        ),
        (
            "spiffe://jia.app/batch",
            15006,
            Request::Tcp,
            false,
            "default",
        ),
        (
            "spiffe://jia.app/cron",
            15006,
            Request::Tcp,
            true,
            "grpc-with-port",
        ),
        (
            "spiffe://jia.app/cron",
            15007,
            GRPC("batch.v1.Batch", "Run"),
            false,
            "default",
        ),
        (
            "spiffe://jia.app/ns/quarantine/a/b",
            15006,
            GRPC("grpc.health.v1.Health", "Check"),
            false,
            "quarantine",
        ),
        (
            "spiffe://jia.app/root",
            1,
            Request::Tcp,
            true,
            "everything-from-root",
        ),
        (
            "spiffe://jia.app/root",
            15006,
            HTTP("PATCH", "/x"),
            true,
            "everything-from-root",
        ),
    ];
    assert!(cases.len() >= 30);
    for (peer, port, request, allowed, rule) in cases {
        let target = Target {
            port: *port,
            request: *request,
        };
        let d = p.authorize(&id(peer), &target);
        assert_eq!(
            (d.allowed, d.rule_name(&p)),
            (*allowed, *rule),
            "{peer} port {port} {request:?}"
        );
        assert!(!d.would_deny);
    }
}

// A deny anywhere in the file beats an earlier allow for the same request.
#[test]
fn later_deny_wins_over_earlier_allow() {
    let p = policy(
        "service: s\nrules:\n  - {name: a, from: [\"spiffe://td/*\"]}\n  - {name: d, action: deny, from: [\"spiffe://td/bad\"]}\n",
    );
    let t = Target {
        port: 1,
        request: Request::Tcp,
    };
    assert_eq!(
        p.authorize(&id("spiffe://td/bad"), &t).rule,
        RuleRef::Named(1)
    );
    assert!(p.authorize(&id("spiffe://td/good"), &t).allowed);
}

// With several allows matching, the first in the file is the one reported.
#[test]
fn first_matching_allow_is_reported() {
    let p = policy("service: s\nrules:\n  - {name: dom, from: [\"spiffe://td/*\"]}\n  - {name: exact, from: [\"spiffe://td/x\"]}\n");
    let d = p.authorize(
        &id("spiffe://td/x"),
        &Target {
            port: 1,
            request: Request::Tcp,
        },
    );
    assert_eq!(d.rule_name(&p), "dom");
}

// default: allow lets unmatched requests through; default deny (implicit) blocks them.
#[test]
fn default_allow_and_default_deny() {
    let t = Target {
        port: 1,
        request: GRPC("a.B", "C"),
    };
    let allow = policy("service: s\ndefault: allow\n");
    let d = allow.authorize(&id("spiffe://td/x"), &t);
    assert_eq!(
        (d.allowed, d.action, d.rule),
        (true, Action::Allow, RuleRef::Default)
    );
    assert_eq!(d.message(&allow), "allowed by default allow");
    let deny = policy("service: s\n");
    let d = deny.authorize(&id("spiffe://td/x"), &t);
    assert_eq!((d.allowed, d.action), (false, Action::Deny));
    assert_eq!(d.message(&deny), "denied by default deny");
}

// Audit mode allows everything but marks what enforce would deny.
#[test]
fn audit_mode_allows_but_flags_would_deny() {
    let p = policy(&MESH.replace("default: deny", "default: deny\nmode: audit"));
    let t = Target {
        port: 15006,
        request: GRPC("payment.v1.PaymentService", "CreatePayment"),
    };
    let d = p.authorize(&id("spiffe://jia.app/ns/ops/intern"), &t);
    assert!(d.allowed && d.would_deny);
    assert_eq!(d.label(), "would_deny");
    assert_eq!(
        d.message(&p),
        "allowed in audit mode; would be denied by rule \"ops-intern-denied\""
    );
    let ok = p.authorize(&id("spiffe://jia.app/api-gateway"), &t);
    assert!(ok.allowed && !ok.would_deny);
    assert_eq!(ok.label(), "allow");
}

// Denial messages name the rule: they become grpc-message and the 403 body.
#[test]
fn messages_name_the_rule() {
    let p = policy(MESH);
    let t = Target {
        port: 15006,
        request: GRPC("payment.v1.PaymentService", "GetPayment"),
    };
    let d = p.authorize(&id("spiffe://jia.app/ns/ops/intern"), &t);
    assert_eq!(d.message(&p), "denied by rule \"ops-intern-denied\"");
    assert_eq!(d.label(), "deny");
    let fc = Policy::fail_closed();
    let d = fc.authorize(&id("spiffe://jia.app/api-gateway"), &t);
    assert!(!d.allowed);
    assert_eq!(d.message(&fc), "denied: no policy loaded");
}

// The gRPC path helper accepts only `/service/method`.
#[test]
fn grpc_path_parsing() {
    assert_eq!(
        grpc_target("/payment.v1.PaymentService/GetPayment"),
        Some(("payment.v1.PaymentService", "GetPayment"))
    );
    for bad in ["", "/", "//", "/svc", "/svc/", "svc/m", "//m", "/a/b/c"] {
        assert_eq!(grpc_target(bad), None, "{bad}");
    }
}

// explain prints the verdict word first, then rule and mode.
#[test]
fn explain_output() {
    let p = policy(MESH);
    let t = Target {
        port: 15006,
        request: GRPC("payment.v1.PaymentService", "GetPayment"),
    };
    assert_eq!(
        explain(&p, "spiffe://jia.app/api-gateway", &t),
        "ALLOW  rule=gateway-calls-payments  mode=enforce"
    );
    assert_eq!(
        explain(&p, "spiffe://jia.app/nobody", &t),
        "DENY  rule=default deny  mode=enforce"
    );
    assert!(explain(&p, "spiffe://JIA.app/x", &t).starts_with("DENY  peer"));
    let audit = policy("service: s\nmode: audit\n");
    assert_eq!(
        explain(&audit, "spiffe://td/x", &t),
        "ALLOW (audit: would deny)  rule=default deny  mode=audit"
    );
}

// Hit counters count per rule and for the default.
#[test]
fn hits_are_counted() {
    let p = policy(MESH);
    let t = Target {
        port: 15006,
        request: GRPC("payment.v1.PaymentService", "GetPayment"),
    };
    for _ in 0..3 {
        let d = p.authorize(&id("spiffe://jia.app/api-gateway"), &t);
        p.record_hit(&d);
    }
    p.record_hit(&p.authorize(&id("spiffe://x.y/z"), &t));
    assert_eq!(p.hits(0), 3);
    assert_eq!(p.hits(p.rules.len()), 1);
}
