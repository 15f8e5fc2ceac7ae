//! Fuzzed admin query strings: `parse_query` and `/authz?from=&grpc=&method=&path=&port=`
//! answered from a loaded policy and from a store with none.
//!
//! Properties: nothing panics or hangs on any query (valid ones mutated: broken and
//! multi-byte escapes, `+`, repeated keys, huge, unicode); a query that parses holds
//! only UTF-8 keys and values; `/authz` answers 200, 400 or 404 and says ALLOW only for
//! what the policy allows (the gateway calling the payment API); with no policy loaded
//! it never says ALLOW.

use crate::admin::{authz, parse_query, AdminState};
use crate::identity::IdentityStatus;
use crate::policy::PolicyStore;
use crate::telemetry::fuzz_budget::{config, mutated, watchdog};
use http::StatusCode;
use http_body_util::BodyExt;
use proptest::prelude::*;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

const QUERIES: &[&str] = &[
    "from=spiffe%3A%2F%2Fjia.app%2Fapi-gateway&grpc=payment.v1.PaymentService/CreatePayment",
    "from=spiffe://jia.app/api-gateway&method=GET&path=/healthz&port=15006",
    "from=spiffe://other.td/x&grpc=a.B/C&port=99999",
    "level=debug&from=%E2%28&grpc=%zz",
];

const POLICY: &str = "service: payment-service\ndefault: deny\nrules:\n  - name: gw\n    from: [\"spiffe://jia.app/api-gateway\"]\n    to: {grpc: [\"payment.v1.PaymentService/*\"]}\n";

fn state(policy: Option<&str>, dir: &std::path::Path) -> AdminState {
    let path = dir.join("policy.yaml");
    std::fs::write(&path, policy.unwrap_or("not: [a policy")).expect("policy written");
    let store = PolicyStore::new(&path);
    let _ = store.reload();
    let (_tx, identity) = tokio::sync::watch::channel(IdentityStatus::Waiting {
        reason: "fuzz".into(),
    });
    let (_tx, jwt_bundles) =
        tokio::sync::watch::channel(crate::identity::JwtBundlesStatus::off("fuzz"));
    AdminState {
        identity,
        jwt_bundles,
        policy: Some(Arc::new(store)),
        inbound_port: 15006,
        metrics: None,
        config: serde_json::Value::Null,
        listeners_bound: AtomicBool::new(true),
        shutdown: Default::default(),
        log_reload: None,
        upstreams: None,
    }
}

/// The answer's status and body text.
fn answer(
    query: &std::collections::HashMap<String, String>,
    state: &AdminState,
) -> (StatusCode, String) {
    let resp = authz(query, state);
    let status = resp.status();
    let body = futures::executor::block_on(resp.into_body().collect())
        .map(|c| String::from_utf8_lossy(&c.to_bytes()).into_owned())
        .unwrap_or_default();
    (status, body)
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn authz_queries_allow_only_what_the_policy_allows(query in mutated(QUERIES)) {
        let _w = watchdog("/authz query");
        let Some(q) = parse_query(&query) else { return Ok(()) };
        let dir = tempfile::tempdir().expect("a temporary folder");
        for loaded in [true, false] {
            let state = state(loaded.then_some(POLICY), dir.path());
            let (status, body) = answer(&q, &state);
            prop_assert!([StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::NOT_FOUND].contains(&status));
            if body.starts_with("ALLOW") {
                prop_assert!(loaded, "no policy, yet: {}", body);
                prop_assert_eq!(q.get("from").map(String::as_str), Some("spiffe://jia.app/api-gateway"));
                prop_assert!(q.get("grpc").is_some_and(|g| g.starts_with("payment.v1.PaymentService/")), "{:?}", q);
            }
        }
    }
}
