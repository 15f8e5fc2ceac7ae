//! deploy/k8s against a real kube-apiserver (v1.34.2, no cluster): every object of every
//! manifest there passes the server's strict schema validation in a server-side dry run
//! (namespaces are created for real first, as `kubectl apply` in order would), and so does
//! what `meshd inject` makes of the workload manifests. The monitoring config maps hold
//! deploy/grafana/meshd.json and deploy/prometheus/scrape.yaml exactly, and the services'
//! config maps hold the rules of deploy/policies.
//!
//! Needs etcd and kube-apiserver from `tests/tools/build-kube.sh` (tests/run.sh runs it).

mod common;

use common::edge::repo;
use common::kube::{yaml_documents, KubeApi};
use common::meshd::meshd_bin;
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// deploy/k8s's manifests, in the order they are applied (their names sort that way).
fn manifests() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(repo("deploy/k8s"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 9,
        "deploy/k8s has too few manifests: {files:?}"
    );
    files
}

fn name_of(object: &Value) -> String {
    format!(
        "{} {}/{}",
        object["kind"].as_str().unwrap_or("?"),
        object["metadata"]["namespace"].as_str().unwrap_or("-"),
        object["metadata"]["name"].as_str().unwrap_or("?")
    )
}

fn injected(file: &str) -> Vec<Value> {
    let out = Command::new(meshd_bin())
        .args(["inject", "-f", file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "meshd inject -f {file}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    yaml_documents(&String::from_utf8(out.stdout).unwrap())
}

/// Dry-runs each object with strict field validation; returns the failures, each naming
/// where the object came from.
fn dry_run(api: &KubeApi, source: &str, objects: &[Value]) -> Vec<String> {
    let mut failures = Vec::new();
    for object in objects {
        let path = format!(
            "{}?dryRun=All&fieldValidation=Strict",
            api.collection(object)
        );
        let (code, answer) = api.api("POST", &path, Some(object));
        if code != 200 && code != 201 {
            failures.push(format!(
                "{source}: {} -> {code}: {}",
                name_of(object),
                answer["message"].as_str().unwrap_or(&answer.to_string())
            ));
        }
    }
    failures
}

#[test]
fn every_manifest_passes_strict_server_side_dry_run() {
    let api = KubeApi::start();
    let files = manifests();
    let docs: Vec<(String, Vec<Value>)> = files
        .iter()
        .map(|f| {
            let name = f.strip_prefix(repo("")).unwrap_or(f).display().to_string();
            (name, yaml_documents(&std::fs::read_to_string(f).unwrap()))
        })
        .collect();

    // Namespaces for real, first: the namespaced objects' dry runs need them.
    let mut namespaces = 0;
    for (file, objects) in &docs {
        for ns in objects.iter().filter(|o| o["kind"] == "Namespace") {
            let (code, answer) = api.api(
                "POST",
                "/api/v1/namespaces?fieldValidation=Strict",
                Some(ns),
            );
            assert_eq!(code, 201, "{file}: creating {}: {answer}", name_of(ns));
            namespaces += 1;
        }
    }
    assert!(
        namespaces >= 2,
        "00-namespaces.yaml should create spire-system and monitoring"
    );

    let mut failures = Vec::new();
    let mut checked = 0;
    for (file, objects) in &docs {
        let rest: Vec<Value> = objects
            .iter()
            .filter(|o| o["kind"] != "Namespace")
            .cloned()
            .collect();
        checked += rest.len();
        failures.extend(dry_run(&api, file, &rest));
    }
    assert!(checked >= 40, "only {checked} objects in deploy/k8s");

    // What `meshd inject` makes of the workloads must pass the same validation.
    for file in [
        "deploy/k8s/payment-service.yaml",
        "deploy/k8s/60-services.yaml",
    ] {
        let objects = injected(&repo(file).display().to_string());
        let injected_pods = objects
            .iter()
            .filter(|o| o["kind"] == "Deployment")
            .filter(|o| {
                o["spec"]["template"]["spec"]["initContainers"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["name"] == "meshd"))
            })
            .count();
        assert!(
            injected_pods >= 1,
            "meshd inject -f {file} injected nothing"
        );
        failures.extend(dry_run(&api, &format!("meshd inject -f {file}"), &objects));
    }

    assert!(
        failures.is_empty(),
        "the API server refused {} object(s):\n{}",
        failures.len(),
        failures.join("\n")
    );
}

fn config_map(file: &str, name: &str) -> Value {
    let text = std::fs::read_to_string(repo(file)).unwrap();
    yaml_documents(&text)
        .into_iter()
        .find(|o| o["kind"] == "ConfigMap" && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{file} has no ConfigMap {name}"))
}

#[test]
fn monitoring_config_maps_are_the_files_in_deploy() {
    let dashboard = config_map("deploy/k8s/80-monitoring.yaml", "meshd-grafana-dashboard");
    let json = std::fs::read_to_string(repo("deploy/grafana/meshd.json")).unwrap();
    assert!(
        dashboard["data"]["meshd.json"] == json.as_str(),
        "the dashboard ConfigMap differs from deploy/grafana/meshd.json; regenerate it"
    );
    assert_eq!(dashboard["metadata"]["labels"]["grafana_dashboard"], "1");

    let scrape = config_map("deploy/k8s/80-monitoring.yaml", "meshd-prometheus-scrape");
    let yaml = std::fs::read_to_string(repo("deploy/prometheus/scrape.yaml")).unwrap();
    assert!(
        scrape["data"]["scrape.yaml"] == yaml.as_str(),
        "the scrape ConfigMap differs from deploy/prometheus/scrape.yaml; regenerate it"
    );
}

#[test]
fn services_config_maps_carry_the_policies_of_deploy_policies() {
    for service in ["contact-service", "family-service", "document-service"] {
        let map = config_map("deploy/k8s/60-services.yaml", &format!("{service}-meshd"));
        let inline = yaml_documents(map["data"]["policy.yaml"].as_str().unwrap());
        let file = std::fs::read_to_string(repo(&format!("deploy/policies/{service}.yaml")));
        assert_eq!(
            inline,
            yaml_documents(&file.unwrap()),
            "{service}'s policy in 60-services.yaml differs from deploy/policies/{service}.yaml"
        );
    }
}

/// Each service's config map, as mounted at /etc/meshd, passes `meshd check` without a
/// warning but the scraped admin's (the gateway's needs its certificate and keys, made by
/// the operator).
#[test]
fn services_config_maps_pass_meshd_check() {
    for (file, service) in [
        ("deploy/k8s/payment-service.yaml", "payment-service"),
        ("deploy/k8s/60-services.yaml", "contact-service"),
        ("deploy/k8s/60-services.yaml", "family-service"),
        ("deploy/k8s/60-services.yaml", "document-service"),
    ] {
        let map = config_map(file, &format!("{service}-meshd"));
        let dir = tempfile::tempdir().unwrap();
        let policy = dir.path().join("policy.yaml");
        std::fs::write(&policy, map["data"]["policy.yaml"].as_str().unwrap()).unwrap();
        let config = map["data"]["meshd.yaml"]
            .as_str()
            .unwrap()
            .replace("/etc/meshd/policy.yaml", &policy.display().to_string());
        let config_path = dir.path().join("meshd.yaml");
        std::fs::write(&config_path, config).unwrap();
        let out = Command::new(meshd_bin())
            .args(["check", "--config"])
            .arg(&config_path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{file} {service}: {report}");
        // The scraped services keep their admin API on loopback: Prometheus reads the
        // metrics-only listener, so meshd check has nothing to warn about.
        let unexpected: Vec<&str> = report.lines().filter(|l| l.contains("warning")).collect();
        assert!(unexpected.is_empty(), "{file} {service}: {report}");
    }
}
