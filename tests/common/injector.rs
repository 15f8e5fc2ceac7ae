//! `meshd injector` for tests against a real kube-apiserver (common/kube.rs): its serving
//! certificate from `meshd injector certs`, the injector on loopback, deploy/k8s/injector.yaml's
//! webhooks registered at it, and the checks on what the API server stored (injected exactly
//! once, or untouched). Shared by k8s_webhook.rs (pods created directly) and
//! k8s_deployments.rs (pods made by a real controller manager).
#![allow(dead_code)]

use super::edge::repo;
use super::kube::{yaml_documents, KubeApi};
use super::meshd::{meshd_bin, wait_until, Proc};
use base64::Engine;
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

/// Writes `meshd injector certs`'s CA and serving certificate (for 127.0.0.1 and localhost)
/// into `dir`.
pub fn injector_certs(dir: &Path) {
    let out = Command::new(meshd_bin())
        .args(["injector", "certs", "--out"])
        .arg(dir)
        .args(["--ip", "127.0.0.1", "--dns", "localhost"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshd injector certs: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Creates the namespace (with those labels) and the reference service accounts in it (made
/// by hand: no service account controller need run).
pub fn create_namespace(api: &KubeApi, ns: &str, labels: Value) {
    let body = json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns, "labels": labels}});
    let (code, answer) = api.api("POST", "/api/v1/namespaces", Some(&body));
    assert_eq!(code, 201, "namespace {ns}: {answer}");
    for sa in SERVICE_ACCOUNTS {
        let body = json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": sa}});
        let (code, answer) = api.api(
            "POST",
            &format!("/api/v1/namespaces/{ns}/serviceaccounts"),
            Some(&body),
        );
        // 409: a service account controller made `default` first.
        assert!(
            code == 201 || (code == 409 && sa == "default"),
            "service account {ns}/{sa}: {code} {answer}"
        );
    }
}

/// Registers deploy/k8s/injector.yaml's webhooks at `injector` on `port` (trusting the CA in
/// `certs`) and waits until a probe pod in `ns` (a labelled namespace) comes back injected:
/// the API server picks the configuration up asynchronously. Returns the configuration.
pub fn register_webhooks(
    api: &KubeApi,
    injector: &Proc,
    certs: &Path,
    port: u16,
    ns: &str,
) -> Value {
    let ca = std::fs::read(certs.join("ca.pem")).unwrap();
    let config = webhook_configuration(&format!("https://127.0.0.1:{port}/inject"), &ca);
    let (code, answer) = api.api(
        "POST",
        "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations?fieldValidation=Strict",
        Some(&config),
    );
    assert_eq!(code, 201, "registering the webhook: {answer}");
    let mut n = 0;
    let seen = wait_until(Duration::from_secs(30), || {
        n += 1;
        let pod = bare_pod(
            &format!("probe-{n}"),
            ns,
            json!({"app": "probe"}),
            json!({}),
        );
        has_sidecar(&create_pod(api, &pod))
    });
    assert!(seen, "no pod was injected in 30 s:\n{}", injector.dump());
    config
}

/// The service accounts the reference workloads run as (and `default`).
pub const SERVICE_ACCOUNTS: [&str; 6] = [
    "default",
    "payment-service",
    "contact-service",
    "family-service",
    "document-service",
    "api-gateway",
];

/// `meshd injector` on `127.0.0.1:port` with the serving certificate of `meshd injector certs`
/// in `certs`, waited on by `/ready`.
pub fn start_injector(certs: &Path, port: u16) -> Proc {
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
pub fn webhook_configuration(url: &str, ca: &[u8]) -> Value {
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
pub fn pod_from(workload: &Value, name: &str, namespace: &str) -> Value {
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

/// A pod with one `app` container.
pub fn bare_pod(name: &str, namespace: &str, labels: Value, annotations: Value) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace, "labels": labels, "annotations": annotations},
        "spec": {"containers": [{"name": "app", "image": "jia/app:1", "ports": [{"containerPort": 8081}]}]},
    })
}

/// Creates the pod and returns what the API server stored.
pub fn create_pod(api: &KubeApi, pod: &Value) -> Value {
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

/// The entries of a container or volume list with that name.
pub fn named<'a>(list: &'a Value, name: &str) -> Vec<&'a Value> {
    list.as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["name"] == name)
        .collect()
}

/// Whether the pod has a `meshd` container, native sidecar or not.
pub fn has_sidecar(pod: &Value) -> bool {
    !named(&pod["spec"]["initContainers"], "meshd").is_empty()
        || !named(&pod["spec"]["containers"], "meshd").is_empty()
}

/// The injection as README's Kubernetes section describes it, exactly once.
pub fn assert_injected_once(pod: &Value, what: &str) {
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

/// No sidecar and no `meshd-init`.
pub fn assert_untouched(pod: &Value, what: &str) {
    assert!(!has_sidecar(pod), "{what} was injected: {}", pod["spec"]);
    assert!(
        named(&pod["spec"]["initContainers"], "meshd-init").is_empty(),
        "{what}: {}",
        pod["spec"]
    );
}
