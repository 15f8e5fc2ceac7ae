//! The monitoring files in `deploy/` checked by the real `promtool`: the alert rules load and
//! their unit tests pass, the scrape config is a valid Prometheus config, and every dashboard
//! and alert query parses and names a metric family that meshd actually exports.
//!
//! Needs `promtool` (Debian package `prometheus`; `tests/run.sh` installs it). The scrape
//! config check needs a promtool with Kubernetes service discovery, which Debian's lacks:
//! `tests/run.sh` builds upstream promtool into `$MESHD_CACHE/bin`, ahead on PATH. Std only.

use std::path::{Path, PathBuf};
use std::process::Command;

const ALERTS: &str = "deploy/prometheus/alerts.yaml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yaml";
const SCRAPE: &str = "deploy/prometheus/scrape.yaml";
const WRAPPER: &str = "tests/data/prometheus/prometheus.yml";
const DASHBOARD: &str = "deploy/grafana/meshd.json";
const TELEMETRY: &str = "src/telemetry/mod.rs";

fn repo(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(repo(rel)).unwrap_or_else(|e| panic!("cannot read {rel}: {e}"))
}

/// A scratch folder for this test, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join("prometheus_rules")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create scratch folder");
    dir
}

/// Runs `promtool ARGS` from the repository root and panics with its output unless it
/// succeeds. A missing promtool is a failure, never a skip.
fn promtool(args: &[&str]) -> String {
    let out = match Command::new("promtool")
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
    {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => panic!(
            "promtool is not installed (it comes with the Debian package `prometheus`): \
             run the suite with tests/run.sh, which installs it, or \
             `apt-get install --no-install-recommends prometheus`"
        ),
        Err(e) => panic!("cannot run promtool: {e}"),
    };
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "promtool {} failed ({}):\n{text}",
        args.join(" "),
        out.status
    );
    text
}

// Story: an operator loads deploy/prometheus/alerts.yaml into Prometheus; it must load as is
// (valid YAML, valid PromQL, valid templates), or Prometheus refuses the whole rule file.
#[test]
fn alert_rules_load() {
    let out = promtool(&["check", "rules", ALERTS]);
    assert!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
}

// Story: the alerts fire when they should and stay quiet when they should not: an SVID about
// to expire pages (one with days left, or rotated in time, does not), an open circuit fires
// after a minute (a flapping one does not), an unreachable or SVID-less sidecar is not
// ready, a deny spike fires and a steady deny rate does not.
#[test]
fn alert_rules_unit_tests_pass() {
    let out = promtool(&["test", "rules", ALERTS_TEST]);
    assert!(
        out.contains("SUCCESS"),
        "unexpected promtool output:\n{out}"
    );
}

// Story: an operator pastes deploy/prometheus/scrape.yaml into a minimal prometheus.yml next
// to the alert rules; Prometheus must accept the config (relabel rules, kubernetes_sd, rule
// files). promtool checks this offline: nothing talks to a Kubernetes API server.
#[test]
fn scrape_config_is_a_valid_prometheus_config() {
    let dir = scratch("config");
    let config = format!(
        "{}\nrule_files:\n  - {}\n\n{}",
        read(WRAPPER),
        repo(ALERTS).display(),
        read(SCRAPE)
    );
    let path = dir.join("prometheus.yml");
    std::fs::write(&path, &config).expect("write prometheus.yml");
    let path = path.to_str().expect("utf-8 path");
    // Debian's prometheus package is built without Kubernetes service discovery, so its
    // promtool rejects any kubernetes_sd_configs; say so rather than blame scrape.yaml.
    let probe = Command::new("promtool")
        .args(["check", "config", path])
        .output();
    if let Ok(probe) = probe {
        let text = String::from_utf8_lossy(&probe.stdout).to_string()
            + &String::from_utf8_lossy(&probe.stderr);
        assert!(
            !text.contains("field kubernetes_sd_configs not found"),
            "this promtool was built without Kubernetes service discovery (Debian's package \
             `prometheus` is), so it cannot check deploy/prometheus/scrape.yaml. Run the suite \
             with tests/run.sh, which builds upstream promtool into $MESHD_CACHE/bin, or put an \
             upstream promtool first on PATH.\n{text}"
        );
    }
    let out = promtool(&["check", "config", path]);
    assert!(
        out.contains("SUCCESS") && !out.contains("FAILED"),
        "unexpected promtool output:\n{out}\nconfig:\n{config}"
    );
}

// Story: someone edits the dashboard by hand or renames a metric in src/telemetry/mod.rs; a
// typo in a panel query, or a panel left pointing at a name meshd no longer exports, would
// only show up as an empty panel. Every dashboard query must parse as PromQL (checked by
// promtool as recording rules, with Grafana's variables filled in) and every meshd metric
// named in the dashboard or the alerts must be a family described in src/telemetry/mod.rs.
#[test]
fn dashboard_and_alert_queries_parse_and_name_exported_metrics() {
    let dashboard = read(DASHBOARD);
    let exprs = json_string_values(&dashboard, "expr");
    assert!(
        exprs.len() >= 10,
        "found only {} queries in {DASHBOARD}",
        exprs.len()
    );

    // The queries as recording rules, so promtool parses each of them.
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, expr) in exprs.iter().enumerate() {
        let filled = expr
            .replace("$__rate_interval", "1m")
            .replace("$__range", "1h")
            .replace("$service", "meshd/x")
            .replace("$pod", "x");
        assert!(
            !filled.contains('$'),
            "unknown variable in dashboard query: {expr}"
        );
        rules.push_str(&format!(
            "      - record: dashboard_query_{i}\n        expr: |\n"
        ));
        for line in filled.lines() {
            rules.push_str(&format!("          {line}\n"));
        }
    }
    let path = scratch("dashboard").join("queries.yaml");
    std::fs::write(&path, &rules).expect("write queries.yaml");
    promtool(&["check", "rules", path.to_str().expect("utf-8 path")]);

    let families = described_families(&read(TELEMETRY));
    assert!(
        families.len() >= 17,
        "found only {families:?} in {TELEMETRY}"
    );
    let mut unknown = Vec::new();
    let alerts = read(ALERTS);
    for (file, text) in [(DASHBOARD, exprs.join("\n")), (ALERTS, alerts)] {
        for name in metric_names(&text) {
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .filter(|b| families.iter().any(|f| f == b))
                .unwrap_or(&name);
            if !families.iter().any(|f| f == base) {
                unknown.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        unknown.is_empty(),
        "metrics not described in {TELEMETRY}:\n{}",
        unknown.join("\n")
    );
}

/// The values of every `"key": "..."` string in a JSON text, unescaped (enough JSON for
/// Grafana's queries: escapes \" \\ \/ \n \t and \uXXXX).
fn json_string_values(json: &str, key: &str) -> Vec<String> {
    let needle = format!("\"{key}\":");
    let mut values = Vec::new();
    let mut rest = json;
    while let Some(at) = rest.find(&needle) {
        rest = rest[at + needle.len()..].trim_start();
        let Some(body) = rest.strip_prefix('"') else {
            continue;
        };
        let mut value = String::new();
        let mut chars = body.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next().map(|(_, c)| c) {
                    Some('n') => value.push('\n'),
                    Some('t') => value.push('\t'),
                    Some('u') => {
                        let hex: String = (0..4)
                            .filter_map(|_| chars.next().map(|(_, c)| c))
                            .collect();
                        let code = u32::from_str_radix(&hex, 16).expect("\\u escape");
                        value.push(char::from_u32(code).expect("\\u escape"));
                    }
                    Some(c) => value.push(c),
                    None => panic!("unterminated string in JSON"),
                },
                Some((_, c)) => value.push(c),
                None => panic!("unterminated string in JSON"),
            }
        };
        values.push(value);
        rest = &body[end + 1..];
    }
    values
}

/// Metric family names given to `describe_counter!`/`describe_gauge!`/`describe_histogram!`.
fn described_families(source: &str) -> Vec<String> {
    let mut names = Vec::new();
    for macro_name in [
        "describe_counter!(",
        "describe_gauge!(",
        "describe_histogram!(",
    ] {
        for (at, _) in source.match_indices(macro_name) {
            let after = &source[at + macro_name.len()..];
            let start = after.find('"').expect("metric name") + 1;
            let len = after[start..].find('"').expect("metric name end");
            names.push(after[start..start + len].to_string());
        }
    }
    names
}

/// Names in a query text that look like meshd's metrics (`meshd_*`, `grpc_server_*`).
fn metric_names(text: &str) -> Vec<String> {
    let mut names: Vec<String> = text
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("meshd_") || w.starts_with("grpc_server_"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}
