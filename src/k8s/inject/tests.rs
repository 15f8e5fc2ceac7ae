//! Table tests of `meshd inject`: what each kind of document gets, and what it must not.

use super::*;

fn args() -> InjectArgs {
    InjectArgs {
        file: PathBuf::from("m.yaml"),
        sidecar: SidecarOptions {
            image: "meshd:test".into(),
            config_map: None,
            spire_host_path: None,
        },
    }
}

fn inject(text: &str) -> Vec<Value> {
    inject_with(text, &args())
}

fn inject_with(text: &str, a: &InjectArgs) -> Vec<Value> {
    let out = inject_text(text, Path::new("m.yaml"), a).unwrap();
    use serde::Deserialize;
    serde_yaml_ng::Deserializer::from_str(&out)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn names(list: Option<&Value>) -> Vec<&str> {
    list.and_then(Value::as_sequence)
        .map(|l| l.iter().filter_map(|c| text_at(c, &["name"])).collect())
        .unwrap_or_default()
}

fn pod_spec<'a>(doc: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(doc, |v, k| &v[*k])
}

const DEPLOYMENT: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: payments}
spec:
  template:
    metadata:
      labels: {app: payment-service}
      annotations: {meshd.io/exclude-outbound-ports: "5432, 6379", meshd.io/inbound-ports: "8081"}
    spec:
      initContainers: [{name: migrate, image: "m:1"}]
      containers: [{name: app, image: "p:1"}]
      volumes: [{name: data, emptyDir: {}}]
"#;

// Story: a Deployment's pod gets the iptables step and the sidecar in front of its own
// init container, the two volumes after its own; the config map is named after the app
// label, and the annotations become the init container's options.
#[test]
fn a_deployment_gets_the_init_step_the_sidecar_and_the_volumes() {
    let docs = inject(DEPLOYMENT);
    let spec = pod_spec(&docs[0], &["spec", "template", "spec"]);
    assert_eq!(
        names(spec.get("initContainers")),
        ["meshd-init", "meshd", "migrate"]
    );
    assert_eq!(names(spec.get("containers")), ["app"]);
    assert_eq!(
        names(spec.get("volumes")),
        ["data", "meshd-config", "spire-agent-socket"]
    );
    let init = &spec["initContainers"][0];
    let command: Vec<&str> = init["command"]
        .as_sequence()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(
        command,
        [
            "meshd",
            "iptables",
            "install",
            "--proxy-uid",
            "1337",
            "--inbound-ports",
            "8081",
            "--exclude-outbound-ports",
            "5432,6379"
        ]
    );
    let sidecar = &spec["initContainers"][1];
    assert_eq!(sidecar["restartPolicy"].as_str(), Some("Always"));
    assert_eq!(sidecar["securityContext"]["runAsUser"].as_u64(), Some(1337));
    assert_eq!(sidecar["image"].as_str(), Some("meshd:test"));
    assert_eq!(
        spec["volumes"][1]["configMap"]["name"].as_str(),
        Some("payment-service-meshd")
    );
    assert_eq!(
        spec["volumes"][2]["csi"]["driver"].as_str(),
        Some("csi.spiffe.io")
    );
}

// Story: each workload kind is found where its pod template lives; other kinds, opted-out
// pods and already injected ones come back exactly as they went in.
#[test]
fn each_kind_is_injected_at_its_template_or_left_alone() {
    let pod = "metadata: {name: n}\n  spec: {containers: [{name: app}]}";
    let table: &[(String, &[&str], bool)] = &[
        ("kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: app}]}".to_string(), &["spec"], true),
        (format!("kind: StatefulSet\nspec:\n template:\n  {pod}"), &["spec", "template", "spec"], true),
        (format!("kind: DaemonSet\nspec:\n template:\n  {pod}"), &["spec", "template", "spec"], true),
        (format!("kind: Job\nspec:\n template:\n  {pod}"), &["spec", "template", "spec"], true),
        (
            "kind: CronJob\nspec:\n jobTemplate:\n  spec:\n   template:\n    metadata: {name: n}\n    spec: {containers: [{name: app}]}".to_string(),
            &["spec", "jobTemplate", "spec", "template", "spec"],
            true,
        ),
        ("kind: List\nitems:\n- kind: Pod\n  metadata: {name: p}\n  spec: {containers: [{name: app}]}".to_string(), &["items"], true),
        ("kind: Service\nspec: {ports: [{port: 80}]}".to_string(), &["spec"], false),
        (
            "kind: Deployment\nspec:\n template:\n  metadata: {annotations: {meshd.io/inject: \"false\"}}\n  spec: {containers: [{name: app}]}".to_string(),
            &["spec", "template", "spec"],
            false,
        ),
        (
            "kind: Pod\nspec: {hostNetwork: true, containers: [{name: app}]}".to_string(),
            &["spec"],
            false,
        ),
        (
            "kind: Pod\nspec: {containers: [{name: app}], initContainers: [{name: meshd}]}".to_string(),
            &["spec"],
            false,
        ),
    ];
    for (text, path, injected) in table {
        let before: Value = serde_yaml_ng::from_str(text).unwrap();
        let after = &inject(text)[0];
        assert_eq!(after != &before, *injected, "{text}\n=> {after:?}");
        if *injected {
            let spec = if path == &["items"] {
                &after["items"][0]["spec"]
            } else {
                pod_spec(after, path)
            };
            assert_eq!(
                names(spec.get("initContainers")),
                ["meshd-init", "meshd"],
                "{text}"
            );
        }
    }
}

#[test]
fn injecting_twice_is_injecting_once() {
    let once = inject_text(DEPLOYMENT, Path::new("m.yaml"), &args()).unwrap();
    let twice = inject_text(&once, Path::new("m.yaml"), &args()).unwrap();
    assert_eq!(once, twice);
}

// Story: the options and the interception opt-out; a hostile annotation stays a string.
#[test]
fn options_and_annotations_shape_the_pod_but_never_its_structure() {
    let a = InjectArgs {
        sidecar: SidecarOptions {
            config_map: Some("shared-meshd".into()),
            spire_host_path: Some("/run/spire/sockets".into()),
            ..args().sidecar
        },
        ..args()
    };
    let text = "kind: Pod\nmetadata:\n  annotations:\n    meshd.io/interception: \"false\"\nspec: {containers: [{name: app}]}";
    let doc = &inject_with(text, &a)[0];
    assert_eq!(names(doc["spec"].get("initContainers")), ["meshd"]);
    assert_eq!(
        doc["spec"]["volumes"][0]["configMap"]["name"].as_str(),
        Some("shared-meshd")
    );
    assert_eq!(
        doc["spec"]["volumes"][1]["hostPath"]["path"].as_str(),
        Some("/run/spire/sockets")
    );

    let hostile = "kind: Pod\nmetadata:\n  annotations:\n    meshd.io/inbound-ports: \"1], privileged: true, x: [\"\nspec: {containers: [{name: app}]}";
    let doc = &inject(hostile)[0];
    let init = &doc["spec"]["initContainers"][0];
    assert!(init.get("privileged").is_none());
    assert_eq!(init["command"][6].as_str(), Some("1],privileged:true,x:["));
}

#[test]
fn bad_input_names_the_file_the_document_and_the_problem() {
    let table = [
        ("kind: Pod\nspec: {containers: [\n", "m.yaml: "),
        (
            "kind: Service\n---\nkind: Deployment\nmetadata: {name: web}\nspec: {replicas: 1}\n",
            "m.yaml: document 2 (Deployment web): no spec.template here",
        ),
        (
            "kind: Pod\nmetadata: {name: p}\nspec: {containers: 5}\n",
            "m.yaml: document 1 (Pod p): the pod spec has no containers list",
        ),
        (
            "kind: Pod\nmetadata: {name: p}\nspec: {containers: [{name: a}], volumes: {}}\n",
            "m.yaml: document 1 (Pod p): spec.volumes is not a list",
        ),
    ];
    for (text, want) in table {
        let e = inject_text(text, Path::new("m.yaml"), &args())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with(want), "{text}\n=> {e}");
    }
    let e = inject_text(
        "kind: Pod\nspec: {containers: [\n",
        Path::new("m.yaml"),
        &args(),
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("line"), "no position: {e}");
}

#[test]
fn every_template_parses() {
    let meta: Value = serde_yaml_ng::from_str("annotations: {}").unwrap();
    let add = pod_additions(&meta, "w", &args().sidecar).unwrap();
    for v in add.init_containers.iter().chain(&add.volumes) {
        assert!(v.is_mapping(), "{v:?}");
    }
}
