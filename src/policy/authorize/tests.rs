//! Table tests for rules naming the JWT-SVID subject (`via: jwt | both`) beside the mTLS
//! peer: which identity each rule looks at, that a missing token never satisfies a rule
//! naming it, that deny still wins, and that files without `via` mean what they meant.
use crate::config::parse_spiffe_id;
use crate::identity::SpiffeId;
use crate::policy::{parse_policy, Caller, Policy, Request, Target};
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

const VIA: &str = r#"
service: document-service
default: deny
rules:
  - name: gateway-by-mtls
    from: ["spiffe://jia.app/api-gateway"]
    to: {grpc: ["doc.v1.Docs/Get"]}
  - name: payment-by-token
    via: jwt
    from: ["spiffe://jia.app/payment-service"]
    to: {grpc: ["doc.v1.Docs/Put"]}
  - name: batch-by-both
    via: both
    from: ["spiffe://jia.app/batch/*"]
    to: {grpc: ["doc.v1.Docs/Purge"]}
  - name: no-tokens-from-intern
    action: deny
    via: jwt
    from: ["spiffe://jia.app/intern"]
"#;

const GATEWAY: &str = "spiffe://jia.app/api-gateway";
const PAYMENT: &str = "spiffe://jia.app/payment-service";
const BATCH_A: &str = "spiffe://jia.app/batch/a";
const BATCH_B: &str = "spiffe://jia.app/batch/b";
const INTERN: &str = "spiffe://jia.app/intern";

#[test]
fn via_names_which_identity_a_rule_matches() {
    let p = policy(VIA);
    // (mTLS peer, token subject, method, allowed, deciding rule)
    let table: &[(&str, Option<&str>, &str, bool, &str)] = &[
        // via mtls (the default): the peer decides, a token changes nothing.
        (GATEWAY, None, "Get", true, "gateway-by-mtls"),
        (GATEWAY, Some(PAYMENT), "Get", true, "gateway-by-mtls"),
        (PAYMENT, Some(GATEWAY), "Get", false, "default"),
        // via jwt: the token's subject decides, whoever the mTLS peer is.
        (GATEWAY, Some(PAYMENT), "Put", true, "payment-by-token"),
        (PAYMENT, None, "Put", false, "default"),
        (PAYMENT, Some(GATEWAY), "Put", false, "default"),
        // via both: each identity must match `from` (not necessarily the same entry).
        (BATCH_A, Some(BATCH_A), "Purge", true, "batch-by-both"),
        (BATCH_A, Some(BATCH_B), "Purge", true, "batch-by-both"),
        (BATCH_A, None, "Purge", false, "default"),
        (BATCH_A, Some(PAYMENT), "Purge", false, "default"),
        (GATEWAY, Some(BATCH_A), "Purge", false, "default"),
        // a deny naming the token wins over an allow naming the peer.
        (GATEWAY, Some(INTERN), "Get", false, "no-tokens-from-intern"),
        // ... and does not apply to the same ID as mTLS peer.
        (INTERN, Some(PAYMENT), "Put", true, "payment-by-token"),
    ];
    for &(peer, jwt, method, allowed, rule) in table {
        let (peer_id, jwt_id) = (id(peer), jwt.map(id));
        let caller = Caller {
            peer: &peer_id,
            jwt: jwt_id.as_ref(),
        };
        let target = Target {
            port: 15006,
            request: Request::Grpc {
                service: "doc.v1.Docs",
                method,
            },
        };
        let d = p.authorize_caller(&caller, &target);
        let case = format!("peer {peer} token {jwt:?} {method}");
        assert_eq!(d.allowed, allowed, "{case}");
        assert_eq!(d.rule_name(&p), rule, "{case}");
        if !allowed {
            let want = if rule == "default" {
                "denied by default deny".to_string()
            } else {
                format!("denied by rule \"{rule}\"")
            };
            assert_eq!(d.message(&p), want, "{case}");
        }
    }
}

#[test]
fn authorize_without_a_token_never_matches_token_rules() {
    // The mTLS-only entry point (TCP, `meshd policy explain`, `/authz`) is a caller
    // without a token: rules naming the token never match, rules naming the peer do.
    let p = policy(VIA);
    let target = |method| Target {
        port: 15006,
        request: Request::Grpc {
            service: "doc.v1.Docs",
            method,
        },
    };
    assert!(p.authorize(&id(GATEWAY), &target("Get")).allowed);
    assert!(!p.authorize(&id(PAYMENT), &target("Put")).allowed);
    assert!(!p.authorize(&id(BATCH_A), &target("Purge")).allowed);
    assert!(p.authorize(&id(INTERN), &target("Get")).rule_name(&p) == "default");
}

#[test]
fn via_is_checked_where_written_and_shadowing_respects_it() {
    // A bad `via` is an error at its position; an allow is shadowed by a deny only when
    // the deny applies wherever the allow would (same or weaker identity requirement).
    let bad =
        "service: s\nrules:\n  - name: r\n    via: token\n    from: [\"spiffe://jia.app/a\"]\n";
    let problems = parse_policy(bad, Path::new("p.yaml"), 1).expect_err("bad via");
    let shown = problems[0].to_string();
    assert!(
        shown.starts_with("p.yaml:4:") && shown.contains("unknown variant `token`"),
        "{shown}"
    );
    let shadow = |deny_via: &str, allow_via: &str| {
        let text = format!(
            "service: s\nrules:\n  - name: no\n    action: deny\n    via: {deny_via}\n    from: [\"spiffe://jia.app/*\"]\n  - name: yes\n    via: {allow_via}\n    from: [\"spiffe://jia.app/a\"]\n"
        );
        let (_, warnings) = parse_policy(&text, Path::new("p.yaml"), 1).expect("valid");
        !warnings.is_empty()
    };
    let table = [
        ("mtls", "mtls", true),
        ("jwt", "jwt", true),
        ("mtls", "both", true),
        ("jwt", "both", true),
        ("both", "both", true),
        ("mtls", "jwt", false),
        ("jwt", "mtls", false),
        ("both", "mtls", false),
        ("both", "jwt", false),
    ];
    for (deny, allow, shadowed) in table {
        assert_eq!(
            shadow(deny, allow),
            shadowed,
            "deny via {deny}, allow via {allow}"
        );
    }
}
