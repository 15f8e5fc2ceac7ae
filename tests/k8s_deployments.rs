//! `meshd injector` and Deployments, with a real kube-controller-manager (v1.34.2, no cluster:
//! etcd, kube-apiserver and the controller manager's deployment, replicaset and garbage
//! collector controllers on loopback; no scheduler or kubelet, so pods are Pod objects that
//! never run). deploy/k8s/injector.yaml's webhooks point at an injector on loopback, as in
//! k8s_webhook.rs. In a namespace labelled `meshd.io/inject=enabled`, deploy/k8s/
//! payment-service.yaml is applied for real: the pods its ReplicaSet creates come back from the
//! API server with `meshd-init`, the native sidecar and the volumes exactly once. Its pod
//! template updated (an annotation), the new ReplicaSet's pods are injected exactly once; the
//! Deployment deleted (its ReplicaSets and pods collected) and created again, its new pods too.
//! Last, `meshd inject`'s output of the same file, applied in a second labelled namespace: its
//! pods carry the sidecar exactly once (the webhook does not inject it a second time).
//!
//! Needs etcd, kube-apiserver and kube-controller-manager from `tests/tools/build-kube.sh`
//! (tests/run.sh runs it).

mod common;

use common::edge::repo;
use common::injector::{
    assert_injected_once, create_namespace, injector_certs, register_webhooks, start_injector,
};
use common::kube::{yaml_documents, KubeApi};
use common::meshd::{free_port, meshd_bin, wait_until};
use serde_json::{json, Value};
use std::process::Command;
use std::time::Duration;

/// How long the controllers get to turn a Deployment change into pods (they react in well
/// under a second; the machine may be busy).
const SETTLE: Duration = Duration::from_secs(90);

/// Creates every object of a manifest in `ns`; returns the Deployment as sent.
fn apply(api: &KubeApi, objects: &[Value], ns: &str) -> Value {
    let mut deployment = None;
    for o in objects {
        let mut o = o.clone();
        o["metadata"]["namespace"] = json!(ns);
        let (code, answer) = api.api(
            "POST",
            &format!("{}?fieldValidation=Strict", api.collection(&o)),
            Some(&o),
        );
        assert_eq!(code, 201, "creating {} in {ns}: {answer}", o["kind"]);
        if o["kind"] == "Deployment" {
            deployment = Some(o);
        }
    }
    deployment.expect("the manifest has a Deployment")
}

/// The pods of the Deployment's current ReplicaSet (the one of its latest revision), once
/// that ReplicaSet has as many pods as it wants and the old ReplicaSets' pods are gone or
/// still wanted. `None` until the controllers have settled on the Deployment's generation.
fn current_pods(api: &KubeApi, ns: &str, name: &str) -> Option<(String, Vec<Value>)> {
    let (code, d) = api.api(
        "GET",
        &format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
        None,
    );
    if code != 200 || d["status"]["observedGeneration"] != d["metadata"]["generation"] {
        return None;
    }
    let revision = d["metadata"]["annotations"]["deployment.kubernetes.io/revision"].as_str()?;
    let (_, sets) = api.api(
        "GET",
        &format!("/apis/apps/v1/namespaces/{ns}/replicasets"),
        None,
    );
    let set = sets["items"].as_array()?.iter().find(|rs| {
        rs["metadata"]["annotations"]["deployment.kubernetes.io/revision"] == revision
            && rs["metadata"]["ownerReferences"][0]["uid"] == d["metadata"]["uid"]
    })?;
    let hash = set["metadata"]["labels"]["pod-template-hash"].as_str()?;
    let want = set["spec"]["replicas"].as_u64()?;
    let (_, pods) = api.api(
        "GET",
        &format!("/api/v1/namespaces/{ns}/pods?labelSelector=pod-template-hash%3D{hash}"),
        None,
    );
    let pods: Vec<Value> = pods["items"]
        .as_array()?
        .iter()
        .filter(|p| p["metadata"]["deletionTimestamp"].is_null())
        .cloned()
        .collect();
    (want > 0 && pods.len() as u64 == want).then(|| (hash.to_string(), pods))
}

/// Waits for the Deployment's current pods and checks each is injected exactly once.
/// Returns the current ReplicaSet's pod-template-hash.
fn assert_pods_injected_once(api: &KubeApi, ns: &str, name: &str, what: &str) -> String {
    let mut found = None;
    let settled = wait_until(SETTLE, || {
        found = current_pods(api, ns, name);
        found.is_some()
    });
    let (_, d) = api.api(
        "GET",
        &format!("/apis/apps/v1/namespaces/{ns}/deployments/{name}"),
        None,
    );
    assert!(
        settled,
        "{what}: the Deployment's pods did not appear in {SETTLE:?}; deployment status: {}",
        d["status"]
    );
    let (hash, pods) = found.unwrap();
    for pod in &pods {
        let pod_name = pod["metadata"]["name"].as_str().unwrap();
        assert_injected_once(pod, &format!("{what}: pod {ns}/{pod_name}"));
        eprintln!("{what}: pod {ns}/{pod_name} injected once");
    }
    hash
}

/// The pods in `ns` labelled `app=NAME`, not being deleted.
fn app_pods(api: &KubeApi, ns: &str, app: &str) -> usize {
    let (_, pods) = api.api(
        "GET",
        &format!("/api/v1/namespaces/{ns}/pods?labelSelector=app%3D{app}"),
        None,
    );
    pods["items"].as_array().map_or(usize::MAX, |a| a.len())
}

#[test]
fn deployments_pods_are_injected_once_through_a_real_controller_manager() {
    let mut api = KubeApi::start();
    api.start_controller_manager();
    let certs = tempfile::tempdir().unwrap();
    injector_certs(certs.path());
    let port = free_port();
    let injector = start_injector(certs.path(), port);
    create_namespace(&api, "mesh", json!({"meshd.io/inject": "enabled"}));
    create_namespace(&api, "premesh", json!({"meshd.io/inject": "enabled"}));
    register_webhooks(&api, &injector, certs.path(), port, "mesh");

    let file = repo("deploy/k8s/payment-service.yaml");
    let objects = yaml_documents(&std::fs::read_to_string(&file).unwrap());
    let deployments = "/apis/apps/v1/namespaces/mesh/deployments";

    // Created: the ReplicaSet's pods, injected once.
    let deployment = apply(&api, &objects, "mesh");
    let name = deployment["metadata"]["name"].as_str().unwrap().to_string();
    let first = assert_pods_injected_once(&api, "mesh", &name, "payment-service created");

    // Updated (a pod template annotation): a new ReplicaSet, its pods injected once.
    let (code, mut stored) = api.api("GET", &format!("{deployments}/{name}"), None);
    assert_eq!(code, 200, "{stored}");
    stored["spec"]["template"]["metadata"]["annotations"]["meshd.test/rollout"] = json!("2");
    let (code, answer) = api.api("PUT", &format!("{deployments}/{name}"), Some(&stored));
    assert_eq!(code, 200, "updating the Deployment: {answer}");
    let second = assert_pods_injected_once(&api, "mesh", &name, "payment-service updated");
    assert_ne!(first, second, "the update made a new ReplicaSet");

    // Deleted (dependents first) and created again: its new pods injected once.
    let delete =
        json!({"apiVersion": "v1", "kind": "DeleteOptions", "propagationPolicy": "Foreground"});
    let (code, answer) = api.api("DELETE", &format!("{deployments}/{name}"), Some(&delete));
    assert!(
        code == 200 || code == 202,
        "deleting the Deployment: {answer}"
    );
    let gone = wait_until(SETTLE, || {
        api.api("GET", &format!("{deployments}/{name}"), None).0 == 404
            && app_pods(&api, "mesh", &name) == 0
    });
    assert!(
        gone,
        "the Deployment and its pods were not collected in {SETTLE:?}"
    );
    let (code, answer) = api.api(
        "POST",
        &format!("{deployments}?fieldValidation=Strict"),
        Some(&deployment),
    );
    assert_eq!(code, 201, "creating the Deployment again: {answer}");
    assert_pods_injected_once(&api, "mesh", &name, "payment-service created again");

    // Injected already by `meshd inject`, applied for real: the sidecar once, not twice.
    let out = Command::new(meshd_bin())
        .args(["inject", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let injected = yaml_documents(&String::from_utf8(out.stdout).unwrap());
    apply(&api, &injected, "premesh");
    assert_pods_injected_once(
        &api,
        "premesh",
        &name,
        "`meshd inject`'s payment-service in a labelled namespace",
    );
    drop(injector);
}
