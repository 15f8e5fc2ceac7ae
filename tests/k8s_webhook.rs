//! `meshd injector` behind a real kube-apiserver (v1.34.2, no cluster): the webhooks of
//! deploy/k8s/injector.yaml are registered pointing at an injector on loopback
//! (`clientConfig.url`, `caBundle` from `meshd injector certs`), pods are created through the
//! API server, and what it stored is read back: the reference workloads' pods and a bare pod
//! in a namespace labelled `meshd.io/inject=enabled`, and a pod labelled
//! `meshd.io/inject=true` elsewhere, have the init container, the native sidecar (with its
//! probes) and the volumes exactly once; an opted-out pod, a `hostNetwork` pod, a pod in an
//! unlabelled namespace and a pod `meshd inject` already injected are left as they are. With
//! the injector stopped, `failurePolicy: Fail` refuses pod creation with the webhook's name
//! in the error, and `Ignore` lets the pod through.
//!
//! Needs etcd and kube-apiserver from `tests/tools/build-kube.sh` (tests/run.sh runs it).

mod common;

use common::edge::repo;
use common::injector::{
    assert_injected_once, assert_untouched, bare_pod, create_namespace, create_pod, has_sidecar,
    injector_certs, named, pod_from, register_webhooks, start_injector,
};
use common::kube::{yaml_documents, KubeApi};
use common::meshd::{free_port, meshd_bin, wait_until};
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[test]
fn injector_mutates_pods_created_through_a_real_api_server() {
    let api = KubeApi::start();
    let certs = tempfile::tempdir().unwrap();
    injector_certs(certs.path());
    let port = free_port();
    let injector = start_injector(certs.path(), port);

    // Namespaces: one labelled for injection, one not; service accounts made by hand (no
    // controller manager runs here to make them).
    create_namespace(&api, "mesh", json!({"meshd.io/inject": "enabled"}));
    create_namespace(&api, "plain", json!({}));

    let config = register_webhooks(&api, &injector, certs.path(), port, "mesh");
    let hooks: Vec<String> = config["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    let configs = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
    let config_name = config["metadata"]["name"].as_str().unwrap().to_string();

    // The reference workloads' pods, in the labelled namespace.
    let mut workloads = Vec::new();
    for file in [
        "deploy/k8s/payment-service.yaml",
        "deploy/k8s/60-services.yaml",
        "deploy/k8s/50-api-gateway.yaml",
    ] {
        let text = std::fs::read_to_string(repo(file)).unwrap();
        for o in yaml_documents(&text)
            .into_iter()
            .filter(|o| o["kind"] == "Deployment")
        {
            workloads.push((file, o));
        }
    }
    assert!(workloads.len() >= 5, "{}", workloads.len());
    for (file, deployment) in &workloads {
        let name = deployment["metadata"]["name"].as_str().unwrap();
        let pod = create_pod(&api, &pod_from(deployment, &format!("{name}-0"), "mesh"));
        let what = format!("{file}'s {name} in a labelled namespace");
        if name == "api-gateway" {
            // meshd itself (annotated meshd.io/inject: "false"): no second meshd.
            assert!(
                named(&pod["spec"]["initContainers"], "meshd").is_empty(),
                "{what}"
            );
            assert!(
                named(&pod["spec"]["initContainers"], "meshd-init").is_empty(),
                "{what}"
            );
        } else {
            assert_injected_once(&pod, &what);
        }
    }

    // A bare pod in the labelled namespace.
    let pod = create_pod(
        &api,
        &bare_pod("bare", "mesh", json!({"app": "bare"}), json!({})),
    );
    assert_injected_once(&pod, "a bare pod in a labelled namespace");

    // Opted out, by label (the API server skips it) and by annotation (the injector does).
    let pod = create_pod(
        &api,
        &bare_pod(
            "opted-out",
            "mesh",
            json!({"app": "x", "meshd.io/inject": "false"}),
            json!({}),
        ),
    );
    assert_untouched(&pod, "a pod labelled meshd.io/inject=false");
    let pod = create_pod(
        &api,
        &bare_pod(
            "annotated-out",
            "mesh",
            json!({"app": "x"}),
            json!({"meshd.io/inject": "false"}),
        ),
    );
    assert_untouched(&pod, "a pod annotated meshd.io/inject: \"false\"");

    // hostNetwork: its iptables would be the node's.
    let mut host = bare_pod("host-network", "mesh", json!({"app": "x"}), json!({}));
    host["spec"]["hostNetwork"] = json!(true);
    assert_untouched(&create_pod(&api, &host), "a hostNetwork pod");

    // Injected already by `meshd inject`: not injected twice.
    let out = Command::new(meshd_bin())
        .args(["inject", "-f"])
        .arg(repo("deploy/k8s/payment-service.yaml"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pre = yaml_documents(&String::from_utf8(out.stdout).unwrap())
        .into_iter()
        .find(|o| o["kind"] == "Deployment")
        .unwrap();
    let pod = create_pod(&api, &pod_from(&pre, "pre-injected", "mesh"));
    assert_injected_once(&pod, "a pod `meshd inject` had injected");

    // An unlabelled namespace: untouched, unless the pod asks.
    let pod = create_pod(
        &api,
        &bare_pod("plain", "plain", json!({"app": "x"}), json!({})),
    );
    assert_untouched(&pod, "a pod in an unlabelled namespace");
    let pod = create_pod(
        &api,
        &bare_pod(
            "asks",
            "plain",
            json!({"app": "asks", "meshd.io/inject": "true"}),
            json!({}),
        ),
    );
    assert_injected_once(
        &pod,
        "a pod labelled meshd.io/inject=true in an unlabelled namespace",
    );

    // The injector down: failurePolicy Fail refuses pods, naming the webhook...
    drop(injector);
    let pod = bare_pod("while-down", "mesh", json!({"app": "x"}), json!({}));
    let (code, answer) = api.api("POST", "/api/v1/namespaces/mesh/pods", Some(&pod));
    let message = answer["message"].as_str().unwrap_or_default().to_string();
    assert!(
        code >= 400 && hooks.iter().any(|h| message.contains(h.as_str())),
        "with the injector down, pod creation should fail naming the webhook: {code} {answer}"
    );

    // ...and Ignore lets them through, as they are.
    let (code, mut stored) = api.api("GET", &format!("{configs}/{config_name}"), None);
    assert_eq!(code, 200, "{stored}");
    for hook in stored["webhooks"].as_array_mut().unwrap() {
        hook["failurePolicy"] = json!("Ignore");
    }
    let (code, answer) = api.api("PUT", &format!("{configs}/{config_name}"), Some(&stored));
    assert_eq!(code, 200, "{answer}");
    let mut n = 0;
    let through = wait_until(Duration::from_secs(30), || {
        n += 1;
        let pod = bare_pod(
            &format!("ignored-{n}"),
            "mesh",
            json!({"app": "x"}),
            json!({}),
        );
        let (code, stored) = api.api("POST", "/api/v1/namespaces/mesh/pods", Some(&pod));
        code == 201 && !has_sidecar(&stored)
    });
    assert!(
        through,
        "with failurePolicy Ignore a pod should be created, uninjected"
    );
}
