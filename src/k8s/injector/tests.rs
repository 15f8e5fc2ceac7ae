//! Table tests of the webhook: the decision (inject or skip, and why), the review's
//! answer, and that its JSON Patch makes of a pod exactly what `meshd inject` makes.

use super::super::inject::{
    inject_text, mutate_pod, Exemption, PodOutcome, PodShapeError, SidecarOptions,
};
use super::certs::serving_names;
use super::review::workload_name;
use super::serve::load_certified_key;
use super::*;
use base64::Engine;
use serde_json::{json, Value as Json};
use std::path::Path;

fn options() -> SidecarOptions {
    SidecarOptions {
        image: "meshd:test".into(),
        config_map: None,
        spire_host_path: None,
    }
}

fn yaml(text: &str) -> serde_yaml_ng::Value {
    serde_yaml_ng::from_str(text).unwrap()
}

fn admission(pod: Json, operation: &str) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop",
            "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "dryRun": false,
        }
    }))
    .unwrap()
}

fn patch_of(review: &Json) -> Option<json_patch::Patch> {
    let b64 = review.pointer("/response/patch")?.as_str()?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .unwrap();
    Some(serde_json::from_slice(&bytes).unwrap())
}

// Story: the decision, one pod per row: plain pods and pods that ask are injected; opt-outs,
// node-network pods and pods that already have the sidecar (as container or native sidecar)
// are left alone; a pod without containers or with a volumes map is a shape error.
#[test]
fn the_decision_injects_or_skips_and_says_why() {
    let rows: [(&str, Result<PodOutcome, PodShapeError>); 8] = [
        ("spec: {containers: [{name: app}]}", Ok(PodOutcome::Injected)),
        (
            "metadata: {annotations: {meshd.io/inject: \"true\"}}\nspec: {containers: [{name: app}]}",
            Ok(PodOutcome::Injected),
        ),
        (
            "metadata: {annotations: {meshd.io/inject: \"false\"}}\nspec: {containers: [{name: app}]}",
            Ok(PodOutcome::LeftAlone(Exemption::OptedOut)),
        ),
        (
            "spec: {hostNetwork: true, containers: [{name: app}]}",
            Ok(PodOutcome::LeftAlone(Exemption::HostNetwork)),
        ),
        (
            "spec: {containers: [{name: app}, {name: meshd}]}",
            Ok(PodOutcome::LeftAlone(Exemption::AlreadyInjected)),
        ),
        (
            "spec: {initContainers: [{name: meshd, restartPolicy: Always}], containers: [{name: app}]}",
            Ok(PodOutcome::LeftAlone(Exemption::AlreadyInjected)),
        ),
        ("spec: {}", Err(PodShapeError::NoContainers)),
        (
            "spec: {containers: [{name: app}], volumes: {a: b}}",
            Err(PodShapeError::NotAList("volumes")),
        ),
    ];
    for (pod, want) in rows {
        let mut v = yaml(pod);
        assert_eq!(mutate_pod(&mut v, "w", &options()), want, "{pod}");
    }
}

const POD: &str = r#"
apiVersion: v1
kind: Pod
metadata:
  generateName: payments-5d8f9c7b4-
  namespace: shop
  labels: {app: payment-service, pod-template-hash: 5d8f9c7b4}
  annotations: {meshd.io/inbound-ports: "8081"}
spec:
  initContainers: [{name: migrate, image: "m:1"}]
  containers:
    - name: app
      image: "p:1"
      ports: [{containerPort: 8081}]
  volumes: [{name: data, emptyDir: {}}]
"#;

// Story: one mutation, two front doors: the webhook's JSON Patch applied to the pod gives
// exactly the pod `meshd inject` prints, for a pod with its own init containers and
// volumes and for a bare one; the answer copies the uid and says JSONPatch.
#[test]
fn the_patch_makes_the_pod_meshd_inject_makes() {
    let bare = "apiVersion: v1\nkind: Pod\nmetadata: {name: bare}\nspec: {containers: [{name: app, image: \"a:1\"}]}\n";
    for pod_yaml in [POD, bare] {
        let pod: Json = serde_json::to_value(yaml(pod_yaml)).unwrap();
        let answer = review(&admission(pod.clone(), "CREATE"), &options()).unwrap();
        assert_eq!(answer.verdict, Verdict::Injected);
        let r = &answer.review;
        assert_eq!(r["apiVersion"], "admission.k8s.io/v1");
        assert_eq!(r["kind"], "AdmissionReview");
        assert_eq!(r["response"]["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(r["response"]["allowed"], true);
        assert_eq!(r["response"]["patchType"], "JSONPatch");
        let mut patched = pod.clone();
        json_patch::patch(&mut patched, &patch_of(r).unwrap()).unwrap();

        let args = crate::k8s::InjectArgs {
            file: "pod.yaml".into(),
            sidecar: options(),
        };
        let printed = inject_text(pod_yaml, Path::new("pod.yaml"), &args).unwrap();
        let want: Json = serde_json::to_value(yaml(&printed)).unwrap();
        assert_eq!(patched, want, "{pod_yaml}");
    }
}

// Story: the webhook's answers, one review per row: what is left alone gets no patch and no
// warning, a pod it cannot understand is admitted with a warning saying why.
#[test]
fn reviews_are_answered_allowed_with_a_patch_none_or_a_warning() {
    let pod = |text: &str| serde_json::to_value(yaml(text)).unwrap();
    let app = "metadata: {name: p}\nspec: {containers: [{name: app}]}";
    let rows = [
        (admission(pod(app), "CREATE"), Verdict::Injected, None),
        (admission(pod(app), "UPDATE"), Verdict::LeftAlone, None),
        (
            admission(
                pod("metadata: {name: p, annotations: {meshd.io/inject: \"false\"}}\nspec: {containers: [{name: app}]}"),
                "CREATE",
            ),
            Verdict::LeftAlone,
            None,
        ),
        (
            admission(pod("metadata: {name: p}\nspec: {hostNetwork: true, containers: [{name: app}]}"), "CREATE"),
            Verdict::LeftAlone,
            None,
        ),
        (
            admission(pod("metadata: {name: p}\nspec: {containers: [{name: app}, {name: meshd}]}"), "CREATE"),
            Verdict::LeftAlone,
            None,
        ),
        (
            admission(pod("metadata: {name: p}\nspec: {containers: 7}"), "CREATE"),
            Verdict::Error,
            Some("the pod spec has no containers list"),
        ),
        (
            admission(pod("metadata: {name: 7}\nspec: {containers: [{name: app}]}"), "CREATE"),
            Verdict::Error,
            Some("the AdmissionReview cannot be read"),
        ),
    ];
    for (i, (body, verdict, warning)) in rows.into_iter().enumerate() {
        let a = review(&body, &options()).unwrap();
        assert_eq!(a.verdict, verdict, "row {i}: {}", a.reason);
        let resp = &a.review["response"];
        assert_eq!(resp["allowed"], true, "row {i}");
        assert_eq!(
            resp["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002",
            "row {i}"
        );
        assert_eq!(
            resp.get("patch").is_some(),
            verdict == Verdict::Injected,
            "row {i}"
        );
        match warning {
            Some(w) => {
                let text = resp["warnings"][0].as_str().unwrap();
                assert!(
                    text.starts_with("meshd injector: pod admitted without the meshd sidecar: "),
                    "{text}"
                );
                assert!(text.contains(w), "row {i}: {text}");
            }
            None => assert!(resp.get("warnings").is_none(), "row {i}: {resp}"),
        }
    }
}

// Story: bodies that are not reviews are refused (the server answers 400); a review in
// another version is answered in that version.
#[test]
fn garbage_is_refused_and_the_version_asked_is_answered() {
    let bad: [(&[u8], &str); 3] = [
        (b"not json", "the body is not JSON"),
        (b"{}", "not an AdmissionReview"),
        (
            br#"{"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}"#,
            "the AdmissionReview has no request",
        ),
    ];
    for (body, want) in bad {
        let e = review(body, &options()).unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}");
    }
    let mut v: Json = serde_json::from_slice(&admission(
        json!({"metadata": {"name": "p"}, "spec": {"containers": []}}),
        "CREATE",
    ))
    .unwrap();
    v["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let a = review(&serde_json::to_vec(&v).unwrap(), &options()).unwrap();
    assert_eq!(a.review["apiVersion"], "admission.k8s.io/v1beta1");
    assert_eq!(a.pod, "shop/p");
}

// Story: a Deployment's pod (named by the API server) gets the Deployment's name as its
// workload, so its default config map is the one `meshd inject` names.
#[test]
fn the_workload_name_of_a_pod() {
    let rows = [
        ("metadata: {name: web-0, generateName: web-}", "web-0"),
        (
            "metadata: {generateName: payments-5d8f9c7b4-, labels: {pod-template-hash: 5d8f9c7b4}}",
            "payments",
        ),
        ("metadata: {generateName: job-x-}", "job-x"),
        ("metadata: {}", "<unnamed>"),
    ];
    for (pod, want) in rows {
        assert_eq!(workload_name(&yaml(pod)), want, "{pod}");
    }
}

// Story: `meshd injector certs` writes a CA and a serving certificate the server loads,
// for the Service's names and the extras, and prints the caBundle line.
#[test]
fn certs_are_written_for_the_service_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let args = CertsArgs {
        out: dir.path().join("certs"),
        service: "meshd-injector".into(),
        namespace: "meshd-system".into(),
        dns: vec!["injector.test".into(), "meshd-injector".into()],
        ip: vec!["127.0.0.1".parse().unwrap()],
    };
    assert_eq!(
        serving_names(&args),
        [
            "meshd-injector",
            "meshd-injector.meshd-system",
            "meshd-injector.meshd-system.svc",
            "meshd-injector.meshd-system.svc.cluster.local",
            "injector.test",
        ]
    );
    let line = write_certs(&args).unwrap();
    let ca = std::fs::read(args.out.join("ca.pem")).unwrap();
    let b64 = line.strip_prefix("caBundle: ").unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap(),
        ca
    );
    load_certified_key(&args.out.join("tls.pem"), &args.out.join("tls-key.pem")).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(args.out.join("tls-key.pem"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let e = load_certified_key(&args.out.join("ca.pem"), &args.out.join("ca.pem")).unwrap_err();
    assert!(e.to_string().contains("no PEM private key"), "{e}");
}
