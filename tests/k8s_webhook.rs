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

use base64::Engine;
use common::edge::repo;
use common::kube::{yaml_documents, KubeApi};
use common::meshd::{free_port, meshd_bin, wait_until, Proc};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SERVICE_ACCOUNTS: [&str; 6] = [
    "default",
    "payment-service",
    "contact-service",
    "family-service",
    "document-service",
    "api-gateway",
];

fn start_injector(certs: &Path, port: u16) -> Proc {
    let mut cmd = Command::new(meshd_bin());
    cmd.arg("injector")
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--tls-cert")
        .arg(certs.join("tls.pem"))
        .arg("--tls-key")
        .arg(certs.join("tls-key.pem"));
    let mut proc = Proc::spawn("injector", cmd, None);
    let ready = wait_until(Duration::from_secs(20), || {
        Command::new("curl")
            .args(["-sf", "--max-time", "2", "--cacert"])
            .arg(certs.join("ca.pem"))
            .arg(format!("https://127.0.0.1:{port}/ready"))
            .output()
            .is_ok_and(|o| o.status.success())
    });
    if !ready {
        let exited = proc.child.try_wait().ok().flatten();
        panic!(
            "meshd injector not ready in 20 s (exit {exited:?}):\n{}",
            proc.dump()
        );
    }
    proc
}

/// deploy/k8s/injector.yaml's MutatingWebhookConfiguration, sent to `url` instead of the
/// in-cluster Service, trusting `ca`.
fn webhook_configuration(url: &str, ca: &[u8]) -> Value {
    let file = repo("deploy/k8s/injector.yaml");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (the injector's manifest, from the `meshd injector` work)",
            file.display()
        )
    });
    let mut config = yaml_documents(&text)
        .into_iter()
        .find(|o| o["kind"] == "MutatingWebhookConfiguration")
        .expect("injector.yaml has a MutatingWebhookConfiguration");
    let ca = base64::engine::general_purpose::STANDARD.encode(ca);
    for hook in config["webhooks"].as_array_mut().unwrap() {
        hook["clientConfig"] = json!({"url": url, "caBundle": ca});
    }
    config
}

/// A pod with a workload's pod template (labels, annotations, spec).
fn pod_from(workload: &Value, name: &str, namespace: &str) -> Value {
    let template = &workload["spec"]["template"];
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": template["metadata"]["labels"],
            "annotations": template["metadata"]["annotations"],
        },
        "spec": template["spec"],
    })
}

fn bare_pod(name: &str, namespace: &str, labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "jia/app:1", "ports": [{"containerPort": 8081}]}]},
    })
}

/// Creates the pod and returns what the API server stored.
fn create_pod(api: &KubeApi, pod: &Value) -> Value {
    let ns = pod["metadata"]["namespace"].as_str().unwrap();
    let (code, stored) = api.api(
        "POST",
        &format!("/api/v1/namespaces/{ns}/pods?fieldValidation=Strict"),
        Some(pod),
    );
    assert_eq!(
        code, 201,
        "creating pod {ns}/{}: {stored}",
        pod["metadata"]["name"]
    );
    let name = stored["metadata"]["name"].as_str().unwrap();
    let (code, read) = api.api("GET", &format!("/api/v1/namespaces/{ns}/pods/{name}"), None);
    assert_eq!(code, 200, "{read}");
    read
}

fn named<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == name)
        .collect()
}

fn has_sidecar(pod: &Value) -> bool {
    !named(&pod["spec"]["initContainers"], "meshd").is_empty()
        || !named(&pod["spec"]["containers"], "meshd").is_empty()
}

/// The injection as README's Kubernetes section describes it, exactly once.
fn assert_injected_once(pod: &Value, what: &str) {
    let spec = &pod["spec"];
    let init = &spec["initContainers"];
    assert_eq!(
        named(init, "meshd-init").len(),
        1,
        "{what}: meshd-init once: {spec}"
    );
    let sidecar = named(init, "meshd");
    assert_eq!(sidecar.len(), 1, "{what}: the meshd sidecar once: {spec}");
    assert!(
        named(&spec["containers"], "meshd").is_empty(),
        "{what}: {spec}"
    );
    let sidecar = sidecar[0];
    assert_eq!(
        sidecar["restartPolicy"], "Always",
        "{what}: a native sidecar"
    );
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(
            sidecar[probe]["exec"]["command"][0] == "meshd",
            "{what}: {probe} is `meshd probe`: {sidecar}"
        );
    }
    assert_eq!(
        named(&spec["volumes"], "meshd-config").len(),
        1,
        "{what}: {spec}"
    );
    let socket = named(&spec["volumes"], "spire-agent-socket");
    assert_eq!(socket.len(), 1, "{what}: {spec}");
    assert_eq!(socket[0]["csi"]["driver"], "csi.spiffe.io", "{what}");
    // The app's own containers are still there.
    assert!(
        !named(&spec["containers"], "app").is_empty(),
        "{what}: {spec}"
    );
}

fn assert_untouched(pod: &Value, what: &str) {
    assert!(!has_sidecar(pod), "{what} was injected: {}", pod["spec"]);
    assert!(
        named(&pod["spec"]["initContainers"], "meshd-init").is_empty(),
        "{what}: {}",
        pod["spec"]
    );
}

#[test]
fn injector_mutates_pods_created_through_a_real_api_server() {
    let api = KubeApi::start();
    let certs = tempfile::tempdir().unwrap();
    let out = Command::new(meshd_bin())
        .args(["injector", "certs", "--out"])
        .arg(certs.path())
        .args(["--ip", "127.0.0.1", "--dns", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshd injector certs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port = free_port();
    let injector = start_injector(certs.path(), port);

    // Namespaces: one labelled for injection, one not; service accounts made by hand (no
    // controller manager runs here to make them).
    for (ns, labels) in [
        ("mesh", json!({"meshd.io/inject": "enabled"})),
        ("plain", json!({})),
    ] {
        let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}});
        let (code, answer) = api.api("POST", "/api/v1/namespaces", Some(&body));
        assert_eq!(code, 201, "namespace {ns}: {answer}");
        for sa in SERVICE_ACCOUNTS {
            let body =
                json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}});
            let (code, answer) = api.api(
                "POST",
                &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
                Some(&body),
            );
            assert_eq!(code, 201, "service account {ns}/{sa}: {answer}");
        }
    }

    let ca = std::fs::read(certs.path().join("ca.pem")).unwrap();
    let config = webhook_configuration(&format!("https://127.0.0.1:{port}/inject"), &ca);
    let hooks: Vec<String> = config["webhooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["name"].as_str().unwrap().to_string())
        .collect();
    let configs = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations";
    let (code, answer) = api.api(
        "POST",
        &format!("{configs}?fieldValidation=Strict"),
        Some(&config),
    );
    assert_eq!(code, 201, "registering the webhook: {answer}");
    let config_name = config["metadata"]["name"].as_str().unwrap().to_string();

    // The API server picks the configuration up asynchronously: wait until a probe pod in
    // the labelled namespace comes back injected.
    let mut probe_n = 0;
    let seen = wait_until(Duration::from_secs(30), || {
        probe_n += 1;
        let pod = bare_pod(
            &format!("probe-{probe_n}"),
            "mesh",
            json!({"app": "probe"}),
            json!({}),
        );
        has_sidecar(&create_pod(&api, &pod))
    });
    assert!(seen, "no pod was injected in 30 s:\n{}", injector.dump());

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
