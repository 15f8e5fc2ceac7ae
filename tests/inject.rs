//! `meshd inject` and what it puts into a pod, run for real: the example manifest's
//! config map passes `meshd check`; the init container's command, taken from the injected
//! manifest, installs its rules with real iptables in a network namespace; and the
//! sidecar's exec probe (`meshd probe`) tells a ready sidecar from one that is not.

mod common;

use common::edge::repo;
use common::meshd::{free_port, meshd_bin, DevCa, Sidecar};
use common::netns::pair;
use serde_yaml_ng::Value;
use std::process::Command;

fn inject(file: &str) -> Vec<Value> {
    let out = Command::new(meshd_bin())
        .args(["inject", "-f", file])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    use serde::Deserialize;
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap())
        .collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

// Story: the example manifest, injected: its config map's meshd.yaml and policy pass
// `meshd check` as they are mounted (/etc/meshd), and the Deployment's pod runs the init
// step and the sidecar with that config.
#[test]
fn the_example_manifest_injects_and_its_config_checks() {
    let manifest = repo("deploy/k8s/payment-service.yaml");
    let docs = inject(&manifest.display().to_string());
    assert_eq!(docs.len(), 3);
    let dir = tempfile::tempdir().unwrap();
    let data = &docs[0]["data"];
    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, data["policy.yaml"].as_str().unwrap()).unwrap();
    let config = data["meshd.yaml"]
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
    assert!(out.status.success(), "{report}");
    assert!(!report.contains("warning"), "{report}");

    let spec = &docs[2]["spec"]["template"]["spec"];
    let inits = spec["initContainers"].as_sequence().unwrap();
    assert_eq!(inits[0]["name"].as_str(), Some("meshd-init"));
    assert_eq!(
        strings(&inits[1]["args"]),
        ["run", "--config", "/etc/meshd/meshd.yaml"]
    );
    assert_eq!(
        spec["volumes"][0]["configMap"]["name"].as_str(),
        docs[0]["metadata"]["name"].as_str()
    );
}

// Story: the init container's command, exactly as injected (its `meshd` is this build),
// runs in a fresh network namespace and leaves the rules the annotations asked for.
#[test]
fn the_injected_init_command_installs_its_rules() {
    let manifest = repo("deploy/k8s/payment-service.yaml");
    let docs = inject(&manifest.display().to_string());
    let init = &docs[2]["spec"]["template"]["spec"]["initContainers"][0];
    let command = strings(&init["command"]);
    assert_eq!(command[0], "meshd");
    let (a, _b, _, _) = pair();
    let args: Vec<&str> = command[1..].iter().map(String::as_str).collect();
    a.must(&meshd_bin().display().to_string(), &args);
    let rules = a.must("iptables", &["-w", "-t", "nat", "-S"]);
    for line in [
        "-A MESHD_OUTPUT -m owner --uid-owner 1337 -j RETURN",
        "-A MESHD_OUTPUT -p tcp -m tcp --dport 5432 -j RETURN",
        "-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001",
        "-A OUTPUT -p tcp -j MESHD_OUTPUT",
    ] {
        assert!(rules.contains(line), "{line} missing:\n{rules}");
    }
}

// Story: `meshd probe` against a sidecar that cannot be ready (its inbound has no policy)
// exits 1 and prints the reason, /live still passes; against a ready one /ready passes.
#[test]
fn the_probe_tells_ready_from_not_ready() {
    let dir = tempfile::tempdir().unwrap();
    let ca = DevCa::start(dir.path(), &["contact-service"], "1h", &[]);
    let probe = |admin: u16, path: &str| {
        let out = Command::new(meshd_bin())
            .args(["probe", path, "--admin", &format!("127.0.0.1:{admin}")])
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let config = |admin: u16, policy: &str| {
        format!(
            "service: contact-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 127.0.0.1:{}\n  forward: 127.0.0.1:{}\n{policy}admin:\n  listen: 127.0.0.1:{admin}\n",
            ca.socket("contact-service"),
            free_port(),
            free_port()
        )
    };
    let admin = free_port();
    let unready = Sidecar::start("unready", dir.path(), &config(admin, ""), admin);
    let (ok, text) = probe(admin, "/ready");
    assert!(!ok, "{text}");
    assert!(
        text.contains("/ready: 503") && text.contains("policy"),
        "{text}"
    );
    assert!(probe(admin, "/live").0);
    drop(unready);

    let policy = dir.path().join("policy.yaml");
    std::fs::write(&policy, "service: contact-service\ndefault: deny\n").unwrap();
    let admin = free_port();
    let line = format!("  policy: {}\n", policy.display());
    let ready = Sidecar::start("ready", dir.path(), &config(admin, &line), admin);
    ready.wait_ready();
    let (ok, text) = probe(admin, "/ready");
    assert!(ok, "{text}");
    let (ok, text) = probe(free_port(), "/ready");
    assert!(!ok && text.contains("admin 127.0.0.1:"), "{text}");
    let (ok, text) = probe(admin, "/metrics");
    assert!(!ok && text.contains("use /ready or /live"), "{text}");
}
