//! Fuzzed Kubernetes inputs: the AdmissionReview the API server posts to `meshd
//! injector`, the manifests `meshd inject -f` reads, and the CIDRs of `meshd iptables
//! --exclude-outbound-cidrs`.
//!
//! Properties: nothing panics or hangs (valid documents mutated: truncated, bytes
//! flipped, huge, deeply nested, unicode); an answered review names the request's uid; a CIDR that parses prints back to itself with a
//! prefix no longer than its address.

use crate::k8s::inject::{inject_text, InjectArgs, SidecarOptions};
use crate::k8s::injector::review::review;
use crate::k8s::iptables::IpNet;
use crate::telemetry::fuzz_budget::{config, mutated, mutated_bytes, watchdog};
use proptest::prelude::*;
use std::path::PathBuf;

fn options() -> SidecarOptions {
    SidecarOptions {
        image: "meshd:test".into(),
        config_map: None,
        spire_host_path: None,
    }
}

const REVIEW: &str = r#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","request":{"uid":"705ab4f5-6393-11e8-b7cc-42010a800002","kind":{"group":"","version":"v1","kind":"Pod"},"resource":{"group":"","version":"v1","resource":"pods"},"namespace":"shop","operation":"CREATE","userInfo":{"username":"u"},"object":{"metadata":{"labels":{"app":"payment-service"},"annotations":{"meshd.io/service":"payment-service"}},"spec":{"containers":[{"name":"app","image":"a","ports":[{"containerPort":8081}]}],"volumes":[]}},"dryRun":false}}"#;

proptest! {
    #![proptest_config(config(2))]

    #[test]
    fn admission_reviews_are_answered_or_refused(body in mutated_bytes(vec![REVIEW.as_bytes().to_vec()])) {
        let _w = watchdog("injector review");
        if let Ok(answer) = review(&body, &options()) {
            // The answer speaks the review's own apiVersion and kind (even one it
            // cannot read, to carry its warning back) and names the request's uid.
            prop_assert!(answer.review["kind"].is_string());
            prop_assert_eq!(answer.review.pointer("/response/uid").and_then(|u| u.as_str()), Some(answer.uid.as_str()));
        }
    }

    #[test]
    fn manifests_inject_or_are_refused(text in mutated(&[
        include_str!("../../deploy/k8s/payment-service.yaml"),
        include_str!("../../deploy/k8s/50-api-gateway.yaml"),
    ])) {
        let _w = watchdog("meshd inject");
        let args = InjectArgs { file: PathBuf::from("m.yaml"), sidecar: options() };
        let _ = inject_text(&text, &PathBuf::from("m.yaml"), &args);
    }

    #[test]
    fn cidrs_print_back_to_themselves(text in mutated(&["10.0.0.0/8", "fd00::/8", "127.0.0.1", "::1/128", "0.0.0.0/0"])) {
        let _w = watchdog("IpNet");
        if let Ok(net) = text.parse::<IpNet>() {
            let max = if net.addr.is_ipv4() { 32 } else { 128 };
            prop_assert!(net.prefix <= max);
            prop_assert_eq!(net.to_string().parse::<IpNet>().ok(), Some(net));
        }
    }
}
