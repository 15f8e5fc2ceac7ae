//! `meshd injector` run for real: `meshd injector certs` makes the CA and serving
//! certificate, the webhook serves HTTPS on loopback, and curl (trusting only that CA)
//! posts AdmissionReviews as the API server would: pods come back with a JSON Patch that
//! gives them the sidecar once, opted-out, hostNetwork and injected pods get none, bad
//! requests are refused, /metrics counts it all, and a replaced certificate is served.

mod common;

use base64::Engine;
use common::meshd::{free_port, meshd_bin, wait_until, Proc};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Runs `meshd injector certs --out DIR --ip 127.0.0.1`; returns the printed line.
fn certs(dir: &Path) -> String {
    let out = Command::new(meshd_bin())
        .args(["injector", "certs", "--ip", "127.0.0.1", "--out"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A running `meshd injector` on a free loopback port.
struct Injector {
    proc: Proc,
    port: u16,
}

impl Injector {
    fn start(cert: &Path, key: &Path) -> Injector {
        let port = free_port();
        let mut cmd = Command::new(meshd_bin());
        cmd.args(["injector", "--listen", &format!("127.0.0.1:{port}")])
            .arg("--tls-cert")
            .arg(cert)
            .arg("--tls-key")
            .arg(key)
            .args(["--image", "meshd:test"]);
        let proc = Proc::spawn("injector", cmd, Some("serving /inject"));
        Injector { proc, port }
    }

    /// curl trusting only `ca`: (status, body); status 0 when the TLS handshake failed.
    fn curl(
        &self,
        ca: &Path,
        method: &str,
        path: &str,
        body: Option<(&str, &[u8])>,
    ) -> (u16, String) {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = Command::new("curl");
        cmd.args([
            "-sS",
            "--max-time",
            "10",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "-X",
            method,
        ])
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://127.0.0.1:{}{path}", self.port));
        if let Some((content_type, bytes)) = body {
            let file = dir.path().join("body");
            std::fs::write(&file, bytes).unwrap();
            cmd.args([
                "-H",
                &format!("Content-Type: {content_type}"),
                "--data-binary",
            ])
            .arg(format!("@{}", file.display()));
        }
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", text.as_str()));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Posts a pod's CREATE review; returns the response's `response` object.
    fn review(&self, ca: &Path, pod: &Value) -> Value {
        let body = serde_json::to_vec(&admission(pod)).unwrap();
        let (status, text) = self.curl(ca, "POST", "/inject", Some(("application/json", &body)));
        assert_eq!(status, 200, "{text}\n{}", self.proc.dump());
        let review: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(review["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(review["kind"], "AdmissionReview");
        assert_eq!(
            review["response"]["uid"],
            "e911857d-c318-11e8-bbad-025000000001"
        );
        assert_eq!(review["response"]["allowed"], true);
        review["response"].clone()
    }

    /// `meshd_injector_requests_total{result="..."}` from /metrics.
    fn count(&self, ca: &Path, result: &str) -> f64 {
        let (status, text) = self.curl(ca, "GET", "/metrics", None);
        assert_eq!(status, 200);
        let key = format!("meshd_injector_requests_total{{result=\"{result}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&key))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in\n{text}"))
    }
}

fn admission(pod: &Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "e911857d-c318-11e8-bbad-025000000001",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "namespace": "shop",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
        }
    })
}

fn pod(annotations: Value, spec_extra: Value) -> Value {
    let mut spec = json!({
        "containers": [{"name": "app", "image": "payments:1", "ports": [{"containerPort": 8081}]}],
    });
    for (k, v) in spec_extra.as_object().unwrap() {
        spec[k] = v.clone();
    }
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "payments-5d8f9c7b4-",
            "namespace": "shop",
            "labels": {"app": "payment-service", "pod-template-hash": "5d8f9c7b4"},
            "annotations": annotations,
        },
        "spec": spec,
    })
}

fn names(list: &Value) -> Vec<&str> {
    list.as_array()
        .map(|l| l.iter().filter_map(|c| c["name"].as_str()).collect())
        .unwrap_or_default()
}

fn patched(pod: &Value, response: &Value) -> Value {
    assert_eq!(response["patchType"], "JSONPatch");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().unwrap())
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&bytes).unwrap();
    let mut pod = pod.clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

// Story: the webhook as the API server sees it. A pod comes back with the init step, the
// native sidecar (with its probes) and the two volumes, exactly once, and the injected pod
// sent again gets no patch; opted-out and hostNetwork pods get none either; garbage is 400,
// GET 405, text 415, 2 MiB 413; /ready and /live are 200 and /metrics counts every result.
#[test]
fn the_webhook_injects_once_skips_and_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let line = certs(dir.path());
    assert!(line.starts_with("caBundle: "), "{line}");
    let ca = dir.path().join("ca.pem");
    let inj = Injector::start(&dir.path().join("tls.pem"), &dir.path().join("tls-key.pem"));
    for path in ["/ready", "/live"] {
        assert_eq!(inj.curl(&ca, "GET", path, None).0, 200, "{path}");
    }

    let original = pod(
        json!({"meshd.io/inject": "true"}),
        json!({"volumes": [{"name": "data", "emptyDir": {}}]}),
    );
    let response = inj.review(&ca, &original);
    let injected = patched(&original, &response);
    let spec = &injected["spec"];
    assert_eq!(names(&spec["initContainers"]), ["meshd-init", "meshd"]);
    assert_eq!(names(&spec["containers"]), ["app"]);
    assert_eq!(
        names(&spec["volumes"]),
        ["data", "meshd-config", "spire-agent-socket"]
    );
    let sidecar = &spec["initContainers"][1];
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], "meshd:test");
    for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
        assert!(
            sidecar[probe]["exec"]["command"][0] == "meshd",
            "{probe}: {sidecar}"
        );
    }
    assert_eq!(
        spec["volumes"][1]["configMap"]["name"],
        "payment-service-meshd"
    );

    // The injected pod again (a re-invocation, a re-created pod): left as it is.
    let again = inj.review(&ca, &injected);
    assert!(again.get("patch").is_none(), "{again}");
    let opted_out = inj.review(&ca, &pod(json!({"meshd.io/inject": "false"}), json!({})));
    assert!(opted_out.get("patch").is_none(), "{opted_out}");
    let host = inj.review(&ca, &pod(json!({}), json!({"hostNetwork": true})));
    assert!(host.get("patch").is_none(), "{host}");

    let json_body = Some(("application/json", b"{not json".as_slice()));
    assert_eq!(inj.curl(&ca, "POST", "/inject", json_body).0, 400);
    assert_eq!(inj.curl(&ca, "GET", "/inject", None).0, 405);
    let text = Some(("text/plain", b"{}".as_slice()));
    assert_eq!(inj.curl(&ca, "POST", "/inject", text).0, 415);
    let big = vec![b' '; 2 * 1024 * 1024];
    assert_eq!(
        inj.curl(&ca, "POST", "/inject", Some(("application/json", &big)))
            .0,
        413
    );

    assert_eq!(inj.count(&ca, "injected"), 1.0);
    assert_eq!(inj.count(&ca, "skipped"), 3.0);
    assert_eq!(inj.count(&ca, "bad_request"), 4.0);
    assert_eq!(inj.count(&ca, "error"), 0.0);
    assert!(
        inj.proc
            .wait_output("\"result\":\"injected\"", Duration::from_secs(2)),
        "{}",
        inj.proc.dump()
    );
}

fn copy_atomically(from: &Path, to: &Path) {
    let tmp: PathBuf = to.with_extension("new");
    std::fs::copy(from, &tmp).unwrap();
    std::fs::rename(&tmp, to).unwrap();
}

// Story: the serving certificate is replaced on disk (as a Secret update or cert-manager
// renewal does): within seconds the injector serves the new one (curl trusting the new CA
// succeeds, the old CA fails), and a broken file keeps the last good certificate.
#[test]
fn a_replaced_certificate_is_served_and_a_bad_one_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new, serving) = (
        dir.path().join("old"),
        dir.path().join("new"),
        dir.path().join("serving"),
    );
    certs(&old);
    certs(&new);
    std::fs::create_dir_all(&serving).unwrap();
    let (cert, key) = (serving.join("tls.pem"), serving.join("tls-key.pem"));
    copy_atomically(&old.join("tls.pem"), &cert);
    copy_atomically(&old.join("tls-key.pem"), &key);
    let inj = Injector::start(&cert, &key);
    let (old_ca, new_ca) = (old.join("ca.pem"), new.join("ca.pem"));
    assert_eq!(inj.curl(&old_ca, "GET", "/ready", None).0, 200);
    assert_eq!(inj.curl(&new_ca, "GET", "/ready", None).0, 0);

    copy_atomically(&new.join("tls-key.pem"), &key);
    copy_atomically(&new.join("tls.pem"), &cert);
    assert!(
        wait_until(Duration::from_secs(15), || inj
            .curl(&new_ca, "GET", "/ready", None)
            .0
            == 200),
        "{}",
        inj.proc.dump()
    );
    assert_eq!(inj.curl(&old_ca, "GET", "/ready", None).0, 0);

    let kept = || inj.proc.dump().matches("keeping the last good one").count();
    let before = kept();
    std::fs::write(&cert, "not a certificate").unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || kept() > before),
        "{}",
        inj.proc.dump()
    );
    assert_eq!(inj.curl(&new_ca, "GET", "/ready", None).0, 200);
}
