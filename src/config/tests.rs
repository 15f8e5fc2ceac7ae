//! Table tests for loading, env overrides, located validation errors and endpoints.
use super::*;
use crate::config::endpoints::parse_endpoints;
use crate::config::raw::Endpoints;
use crate::config::source::locate;
use std::path::Path;

const EXAMPLE: &str = include_str!("../../deploy/examples/meshd.yaml");
const BAD: &str = include_str!("../../tests/data/config/bad.yaml");

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn load(text: &str, pairs: &[(&str, &str)]) -> Result<(Config, Vec<ConfigProblem>), ConfigErrors> {
    Config::from_text(Path::new("m.yaml"), text, &env(pairs))
}

/// All problems of `text` as displayed, one per element.
fn problems(text: &str, pairs: &[(&str, &str)]) -> Vec<String> {
    match load(text, pairs) {
        Ok((_, warnings)) => warnings.iter().map(ToString::to_string).collect(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn durations_parse_number_and_unit_only() {
    // Durations are a whole number and one of ms, s, m, h; anything else names the text.
    let table: &[(&str, Result<Duration, &str>)] = &[
        ("250ms", Ok(Duration::from_millis(250))),
        ("5s", Ok(Duration::from_secs(5))),
        ("1m", Ok(Duration::from_secs(60))),
        ("2h", Ok(Duration::from_secs(7200))),
        (" 0s ", Ok(Duration::ZERO)),
        ("5", Err("duration `5` needs a unit: ms, s, m or h")),
        ("s", Err("duration `s` must start with a whole number")),
        (
            "1.5s",
            Err("duration `1.5s` has unknown unit `.5s` (use ms, s, m or h)"),
        ),
        (
            "5d",
            Err("duration `5d` has unknown unit `d` (use ms, s, m or h)"),
        ),
    ];
    for (text, want) in table {
        let got = parse_duration(text).map_err(|e| e.to_string());
        assert_eq!(got, want.map_err(String::from), "{text}");
    }
}

#[test]
fn design_example_loads_with_its_values() {
    // The DESIGN.md §4 example is valid, warning-free, and means what it says.
    let (config, warnings) = load(EXAMPLE, &[]).expect("example is valid");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert_eq!(config.service, "payment-service");
    let inbound = config.inbound.as_ref().expect("inbound");
    assert_eq!(inbound.forward, "127.0.0.1:8081".parse().unwrap());
    assert_eq!(
        inbound.policy.as_deref(),
        Some(Path::new("/etc/meshd/policy.yaml"))
    );
    let contact = &config.outbound[0];
    assert_eq!(contact.timeout, Duration::from_secs(5));
    assert_eq!(
        (contact.retries.attempts, contact.retries.budget_percent),
        (2, 20)
    );
    let host = "contact-service.default.svc.cluster.local".to_string();
    assert_eq!(contact.endpoints, EndpointsSpec::Dns { host, port: 15006 });
    assert_eq!(
        config.discovery.nameservers,
        vec!["127.0.0.1:5353".parse().unwrap()]
    );
    assert_eq!(config.log.access, AccessLog::Deny);
}

#[test]
fn check_report_summarises_a_good_file_in_one_line() {
    // `meshd check` on the shipped example prints one ok line and succeeds.
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/meshd.yaml"
    ));
    let (report, ok) = check_report(path, &env(&[]));
    assert!(ok);
    assert_eq!(
        report,
        "ok: payment-service: inbound 0.0.0.0:15006 -> 127.0.0.1:8081 (grpc), 1 outbound, \
         identity from unix:///run/spire/sockets/agent.sock"
    );
}

#[test]
fn bad_file_reports_every_problem_with_its_position() {
    // tests/data/config/bad.yaml: all fourteen problems, in file order, each located.
    let path = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/config/bad.yaml"
    ));
    let (report, ok) = check_report(path, &env(&[]));
    assert!(!ok);
    let want = [
        "2:10: service must not be empty",
        "4:17: identity.workload_api: Workload API address `unix:run/agent.sock` must be unix:///absolute/path (or unix:/absolute/path)",
        "5:3: identity.files and identity.workload_api are both set: choose one identity source",
        "6:11: identity.expect: `spiffe://Jia.App/payment-service` is not a valid SPIFFE ID: trust domain must be lowercase",
        "7:1: warning: inbound.policy is not set: every call to the inbound is denied and /ready stays 503",
        "12:13: outbound[0].listen: 127.0.0.1:15006 collides with inbound.listen (0.0.0.0:15006)",
        "13:16: outbound[0].endpoints: endpoints `http://contact:15006`: expected a list of host:port, or dns:///host:port, dns+srv:///_svc._proto.name, file:///path",
        "15:14: outbound[0].timeout must be greater than 0",
        "16:11: outbound[1].name `contact-service` is already used by outbound[0]",
        "18:33: outbound[1].endpoints[1]: endpoint `[::1]:0`: port `0` is not in 1..=65535",
        "19:16: outbound[1].server_id: `contact-service` is not a valid SPIFFE ID: scheme is missing or invalid",
        "20:44: outbound[1].retries.budget_percent is 150; it is a percentage, at most 100",
        "22:11: warning: admin.listen 0.0.0.0:15000 is not loopback: /config and /shutdown are reachable from outside the pod",
        "24:19: runtime.worker_threads must be at least 1",
        "26:10: log.level `verbose`: `verbose` is neither a level (trace, debug, info, warn, error, off) nor target=level",
    ];
    let lines: Vec<&str> = report.lines().collect();
    assert_eq!(lines.len(), want.len(), "{report}");
    for (line, want) in lines.iter().zip(want) {
        assert_eq!(*line, format!("{}:{want}", path.display()));
    }
    assert_eq!(problems(BAD, &[]).len(), want.len());
}

#[test]
fn each_rule_reports_its_message_at_its_position() {
    // One broken key per row: the single problem's `line:column: message`.
    let base = "service: s\noutbound:\n  - name: a\n    listen: 127.0.0.1:15101\n    endpoints: [\"a:1\"]\n    server_id: spiffe://td/a\n";
    let table: &[(&str, &str)] = &[
        ("service: ' '\n", "m.yaml:1:10: service must not be empty"),
        ("service: s\nidentity: {workload_api: \"tcp://1.2.3.4:1\"}\n",
         "m.yaml:2:26: identity.workload_api: Workload API address `tcp://1.2.3.4:1` must be unix:///absolute/path (or unix:/absolute/path)"),
        ("service: s\nidentity:\n  workload_api: unix:/a\n  files: {cert: c, key: k, bundle: b}\n",
         "m.yaml:4:3: identity.files and identity.workload_api are both set: choose one identity source"),
        ("service: s\nidentity:\n  expect: spiffe://td/a/\n",
         "m.yaml:3:11: identity.expect: `spiffe://td/a/` is not a valid SPIFFE ID: path cannot have a trailing slash"),
        (&base.replace("name: a", "name: ''"), "m.yaml:3:11: outbound[0].name must not be empty"),
        (&base.replace("[\"a:1\"]", "file://rel/path"),
         "m.yaml:5:16: outbound[0].endpoints: endpoints `file://rel/path`: a file URI needs an absolute path: file:///path"),
        (&base.replace("[\"a:1\"]", "a:1"),
         "m.yaml:5:16: outbound[0].endpoints: endpoints `a:1`: not a resolver URI; a static endpoint goes in a list: [\"a:1\"]"),
        (&base.replace("[\"a:1\"]", "[]"), "m.yaml:5:5: outbound[0].endpoints: the endpoints list is empty"),
        (&base.replace("[\"a:1\"]", "[\":80\"]"), "m.yaml:5:17: outbound[0].endpoints[0]: endpoint `:80`: `` is not a host name or IP address"),
        (&base.replace("[\"a:1\"]", "[\"::1:80\"]"), "m.yaml:5:17: outbound[0].endpoints[0]: endpoint `::1:80`: an IPv6 endpoint is written [addr]:port"),
        (&base.replace("[\"a:1\"]", "dns+srv:///grpc.tcp.x"),
         "m.yaml:5:16: outbound[0].endpoints: endpoints `dns+srv:///grpc.tcp.x`: an SRV name looks like _service._proto.name (e.g. _grpc._tcp.payments)"),
        (&format!("{base}    timeout: 0ms\n"), "m.yaml:7:14: outbound[0].timeout must be greater than 0"),
        (&format!("{base}    retries:\n      budget_percent: 101\n"),
         "m.yaml:8:23: outbound[0].retries.budget_percent is 101; it is a percentage, at most 100"),
        (&format!("{base}    retries: {{backoff: 2s, max_backoff: 1s}}\n"),
         "m.yaml:7:24: outbound[0].retries.backoff (2s) must be at most outbound[0].retries.max_backoff (1s)"),
        (&format!("{base}    outlier_detection: {{max_ejection_percent: 150}}\n"),
         "m.yaml:7:47: outbound[0].outlier_detection.max_ejection_percent is 150; it is a percentage, at most 100"),
        (&format!("{base}    health_check: {{healthy_threshold: 0}}\n"),
         "m.yaml:7:39: outbound[0].health_check.healthy_threshold must be greater than 0"),
        (&format!("{base}    limits:\n      max_pending: 0\n"),
         "m.yaml:8:20: outbound[0].limits.max_pending must be greater than 0"),
        (&format!("{base}admin: {{listen: 127.0.0.1:15101}}\n"),
         "m.yaml:7:17: admin.listen: 127.0.0.1:15101 collides with outbound[0].listen (127.0.0.1:15101)"),
        (&base.replace("    listen: 127.0.0.1:15101\n", ""),
         "m.yaml:3:11: outbound[0] has neither listen nor intercept (nor a gateway route): nothing can reach it"),
        (&format!("{base}    intercept: [\"10.96.0.12:8081\"]\n"),
         "m.yaml:7:5: outbound[0].intercept needs the transparent listener: add `transparent: {listen: 127.0.0.1:15001}`"),
        (&format!("{base}    intercept: [\"0.0.0.0:8081\"]\ntransparent: {{}}\n"),
         "m.yaml:7:17: outbound[0].intercept[0]: 0.0.0.0:8081 is not a destination: give the IP and port the app dials"),
        (&format!("{base}    intercept: [\"10.0.0.1:80\", \"10.0.0.1:80\"]\ntransparent: {{}}\n"),
         "m.yaml:7:32: outbound[0].intercept[1]: 10.0.0.1:80 is already intercepted by outbound[0]"),
        (&format!("{base}    intercept: [\"contact:99999\"]\ntransparent: {{}}\n"), "m.yaml:7:17: outbound[0].intercept[0]: `contact:99999`: port `99999` is not in 1..=65535"),
        (&format!("{base}transparent: {{listen: 127.0.0.1:15101}}\n"),
         "m.yaml:7:23: transparent.listen: 127.0.0.1:15101 collides with outbound[0].listen (127.0.0.1:15101)"),
        (&format!("{base}gateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  routes: []\n"), "m.yaml:10:3: gateway.routes is empty: the gateway would answer every request with 404"),
        (&format!("{base}gateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  routes:\n    - {{name: p, prefix: /p/, upstream: nope}}\n"), "m.yaml:11:40: gateway.routes[0].upstream: no outbound is named `nope`"),
        (&format!("{base}gateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  routes:\n    - {{name: p, prefix: p/, upstream: a}}\n"), "m.yaml:11:25: gateway.routes[0].prefix: `p/` must start with /"),
        (&format!("{base}gateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  routes:\n    - {{name: p, prefix: /p/, upstream: a, auth: jwt}}\n"), "m.yaml:11:49: gateway.routes[0].auth needs gateway.jwt to be configured"),
        (&format!("{base}gateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  routes:\n    - {{name: p, prefix: /p/, upstream: a}}\n    - {{name: p, prefix: /q/, upstream: a}}\n"), "m.yaml:12:14: gateway route name `p` is used twice"),
        (&format!("{base}gateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  rate_limit: {{per_second: 0, burst: 5}}\n  routes:\n    - {{name: p, prefix: /p/, upstream: a}}\n"), "m.yaml:10:3: gateway.rate_limit.per_second and burst must be greater than 0"),
        ("service: s\nruntime:\n  worker_threads: 0\n", "m.yaml:3:19: runtime.worker_threads must be at least 1"),
        ("service: s\nlog: {level: \"meshd=loud\"}\n",
         "m.yaml:2:14: log.level `meshd=loud`: error parsing level filter: expected one of \"off\", \"error\", \"warn\", \"info\", \"debug\", \"trace\", or a number 0-5"),
        ("service: s\nadmin:\n  listen: \"[::]:15000\"\n",
         "m.yaml:3:11: warning: admin.listen [::]:15000 is not loopback: /config and /shutdown are reachable from outside the pod"),
        ("service: s\ninbound:\n  forward: 127.0.0.1:8081\n",
         "m.yaml:2:1: warning: inbound.policy is not set: every call to the inbound is denied and /ready stays 503"),
    ];
    for (text, want) in table {
        assert_eq!(problems(text, &[]), vec![want.to_string()], "{text}");
    }
}

#[test]
fn syntax_type_and_unknown_key_errors_carry_the_parser_position() {
    // Errors found while deserializing are positioned by serde_yaml_ng and stop there.
    let table: &[(&str, &str)] = &[
        ("service: s\nadmin:\n  listen: 127.0.0.1:15000\n  lisen: 1\n",
         "m.yaml:4:3: admin: unknown field `lisen`, expected `listen` or `metrics_listen`"),
        ("service: s\ninbound:\n  protocol: grpcx\n",
         "m.yaml:3:13: inbound.protocol: unknown variant `grpcx`, expected one of `grpc`, `http`, `tcp`"),
        ("identity: {}\n", "m.yaml:1:1: missing field `service`"),
        ("service: s\noutbound:\n  - name: a\n    listen: 127.0.0.1:1\n    endpoints: {a: 1}\n    server_id: spiffe://td/a\n",
         "m.yaml:5:16: outbound[0].endpoints: invalid type: map, expected a list of `host:port` strings or one URI string (dns:///, dns+srv:///, file:///)"),
        ("service: s\nlifecycle: {drain_timeout: 10}\n", "m.yaml:2:28: lifecycle.drain_timeout: duration `10` needs a unit: ms, s, m or h"),
    ];
    for (text, want) in table {
        assert_eq!(problems(text, &[]), vec![want.to_string()], "{text}");
    }
}

#[test]
fn environment_overrides_win_over_the_file() {
    // Each variable lands in its key; MESHD_* wins over the original design's names.
    type Check = fn(&Config) -> bool;
    let table: &[(&[(&str, &str)], Check)] = &[
        (&[("SPIFFE_ENDPOINT_SOCKET", "unix:/tmp/a.sock")], |c| {
            c.identity.workload_api.as_deref() == Some("unix:///tmp/a.sock")
        }),
        (
            &[
                ("SPIFFE_ENDPOINT_SOCKET", "unix:/a"),
                ("MESHD_IDENTITY_WORKLOAD_API", "unix:///b"),
            ],
            |c| c.identity.workload_api.as_deref() == Some("unix:///b"),
        ),
        (&[("SERVICE_MESH_SPIFFE_ID", "spiffe://jia.app/x")], |c| {
            c.identity
                .expect
                .as_ref()
                .map(ToString::to_string)
                .as_deref()
                == Some("spiffe://jia.app/x")
        }),
        (
            &[
                ("SERVICE_MESH_SPIFFE_ID", "spiffe://jia.app/x"),
                ("MESHD_IDENTITY_EXPECT", "spiffe://jia.app/y"),
            ],
            |c| {
                c.identity
                    .expect
                    .as_ref()
                    .map(ToString::to_string)
                    .as_deref()
                    == Some("spiffe://jia.app/y")
            },
        ),
        (
            &[
                ("MTLS_CERT_FILE", "/c"),
                ("MTLS_KEY_FILE", "/k"),
                ("MTLS_CA_FILE", "/b"),
            ],
            |c| {
                c.identity.workload_api.is_none()
                    && c.identity.files
                        == Some(IdentityFiles {
                            cert: "/c".into(),
                            key: "/k".into(),
                            bundle: "/b".into(),
                        })
            },
        ),
        (&[("GRPC_ADDRESS", "127.0.0.1:9000")], |c| {
            c.inbound.as_ref().map(|i| i.forward) == Some("127.0.0.1:9000".parse().unwrap())
        }),
        (
            &[
                ("GRPC_ADDRESS", "127.0.0.1:9000"),
                ("MESHD_INBOUND_FORWARD", "127.0.0.1:9001"),
            ],
            |c| c.inbound.as_ref().map(|i| i.forward.port()) == Some(9001),
        ),
        (&[("MESHD_INBOUND_LISTEN", "0.0.0.0:16000")], |c| {
            c.inbound.as_ref().map(|i| i.listen.port()) == Some(16000)
        }),
        (&[("MESHD_INBOUND_PROTOCOL", "tcp")], |c| {
            c.inbound.as_ref().map(|i| i.protocol) == Some(Protocol::Tcp)
        }),
        (&[("MESHD_INBOUND_POLICY", "/p.yaml")], |c| {
            c.inbound.as_ref().and_then(|i| i.policy.clone()) == Some("/p.yaml".into())
        }),
        (&[("MESHD_SERVICE", "other")], |c| c.service == "other"),
        (&[("MESHD_ADMIN_LISTEN", "127.0.0.1:9999")], |c| {
            c.admin.listen.port() == 9999
        }),
        (&[("MESHD_LOG_LEVEL", "debug,h2=warn")], |c| {
            c.log.level == "debug,h2=warn"
        }),
        (&[("MESHD_LOG_ACCESS", "all")], |c| {
            c.log.access == AccessLog::All
        }),
        (&[("MESHD_RUNTIME_WORKER_THREADS", "1")], |c| {
            c.runtime.worker_threads == 1
        }),
        (&[("MESHD_LIFECYCLE_DRAIN_TIMEOUT", "250ms")], |c| {
            c.lifecycle.drain_timeout == Duration::from_millis(250)
        }),
        (&[("MESHD_SERVICE", "")], |c| c.service == "payment-service"),
    ];
    for (pairs, check) in table {
        let (config, _) = load(EXAMPLE, pairs).unwrap_or_else(|e| panic!("{pairs:?}: {e}"));
        assert!(check(&config), "{pairs:?}: {config:?}");
    }
    // Without a file inbound section, GRPC_ADDRESS creates one with the §2 defaults.
    let (config, _) = load("service: s\n", &[("GRPC_ADDRESS", "127.0.0.1:9000")]).unwrap();
    let inbound = config.inbound.expect("created");
    assert_eq!(
        (inbound.listen.port(), inbound.forward.port()),
        (15006, 9000)
    );
    // Neither file nor env names an identity: the Workload API default; files suppress it.
    let (config, _) = load("service: s\n", &[]).unwrap();
    assert_eq!(
        config.identity.workload_api.as_deref(),
        Some(DEFAULT_WORKLOAD_API)
    );
    let files = "service: s\nidentity: {files: {cert: c, key: k, bundle: b}}\n";
    let (config, _) = load(files, &[("SPIFFE_ENDPOINT_SOCKET", "unix:///x")]).unwrap();
    assert_eq!(config.identity.workload_api, None);
}

/// Environment pairs and the problems they must produce.
type EnvCase<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

#[test]
fn bad_environment_values_name_the_variable_and_value() {
    // Env problems are reported as env:VAR, all of them, alongside file problems.
    let table: &[EnvCase] = &[
        (&[("MESHD_RUNTIME_WORKER_THREADS", "two")], &["env:MESHD_RUNTIME_WORKER_THREADS: environment variable MESHD_RUNTIME_WORKER_THREADS=`two`: expected a whole number of threads"]),
        (&[("MESHD_INBOUND_PROTOCOL", "udp"), ("MESHD_LOG_ACCESS", "some")], &[
            "env:MESHD_INBOUND_PROTOCOL: environment variable MESHD_INBOUND_PROTOCOL=`udp`: expected grpc, http or tcp",
            "env:MESHD_LOG_ACCESS: environment variable MESHD_LOG_ACCESS=`some`: expected off, deny or all",
        ]),
        (&[("GRPC_ADDRESS", "localhost")], &["env:GRPC_ADDRESS: environment variable GRPC_ADDRESS=`localhost`: invalid socket address syntax"]),
        (&[("MESHD_LIFECYCLE_DRAIN_TIMEOUT", "10")], &["env:MESHD_LIFECYCLE_DRAIN_TIMEOUT: environment variable MESHD_LIFECYCLE_DRAIN_TIMEOUT=`10`: duration `10` needs a unit: ms, s, m or h"]),
        (&[("MTLS_KEY_FILE", "/k")], &["env:MTLS_KEY_FILE: file-based identity needs MTLS_CERT_FILE, MTLS_KEY_FILE and MTLS_CA_FILE; missing: MTLS_CERT_FILE, MTLS_CA_FILE"]),
        (&[("MTLS_CERT_FILE", "/c"), ("MTLS_KEY_FILE", "/k"), ("MTLS_CA_FILE", "/b"), ("MESHD_IDENTITY_WORKLOAD_API", "unix:///a")],
         &["env:MESHD_IDENTITY_WORKLOAD_API: MESHD_IDENTITY_WORKLOAD_API and MTLS_*_FILE are both set: choose one identity source"]),
        // A value that parses but breaks a rule is reported against the variable, not the file.
        (&[("SERVICE_MESH_SPIFFE_ID", "https://jia.app/x")], &["env:SERVICE_MESH_SPIFFE_ID: identity.expect: `https://jia.app/x` is not a valid SPIFFE ID: scheme is missing or invalid"]),
        (&[("SPIFFE_ENDPOINT_SOCKET", "unix:agent.sock")], &["env:SPIFFE_ENDPOINT_SOCKET: identity.workload_api: Workload API address `unix:agent.sock` must be unix:///absolute/path (or unix:/absolute/path)"]),
    ];
    for (pairs, want) in table {
        assert_eq!(problems(EXAMPLE, pairs), want.to_vec(), "{pairs:?}");
    }
    // The file's own identity conflict stays an error at its place even when env chooses.
    let both =
        "service: s\nidentity:\n  workload_api: unix:///a\n  files: {cert: c, key: k, bundle: b}\n";
    let mtls = [
        ("MTLS_CERT_FILE", "/c"),
        ("MTLS_KEY_FILE", "/k"),
        ("MTLS_CA_FILE", "/b"),
    ];
    assert_eq!(
        problems(both, &mtls),
        ["m.yaml:4:3: identity.files and identity.workload_api are both set: choose one identity source"]
    );
}

#[test]
fn locate_points_at_values_and_at_keys_of_sections() {
    // Scalars are found at their value, sections at their key, defaults at an ancestor.
    let text = "a:\n  b: [x, {c: 1}]\n  d:\n    e: 2\nlist:\n  - k: v\n";
    let table: &[(&str, Option<(usize, usize)>)] = &[
        ("a.b[0]", Some((2, 7))),
        ("a.b[1].c", Some((2, 14))),
        ("a.d", Some((3, 3))),
        ("a.d.e", Some((4, 8))),
        ("a.d.missing", Some((3, 3))),
        ("list[0].k", Some((6, 8))),
        ("list[3].k", Some((5, 1))),
        ("nowhere.x", None),
    ];
    for (path, want) in table {
        assert_eq!(locate(text, path), *want, "{path}");
    }
}

#[test]
fn endpoints_grammar() {
    // Static host:port lists and the three resolver URIs; everything else is refused.
    let uri = |s: &str| parse_endpoints(&Endpoints::Uri(s.into())).map_err(|e| e.to_string());
    let list = |v: &[&str]| {
        parse_endpoints(&Endpoints::Static(
            v.iter().map(|s| s.to_string()).collect(),
        ))
        .map_err(|e| e.to_string())
    };
    let hp = |h: &str, p| HostPort {
        host: h.into(),
        port: p,
    };
    assert_eq!(
        list(&["a.b:80", "[::1]:443", "10.0.0.1:1"]),
        Ok(EndpointsSpec::Static(vec![
            hp("a.b", 80),
            hp("::1", 443),
            hp("10.0.0.1", 1)
        ]))
    );
    assert_eq!(hp("::1", 443).to_string(), "[::1]:443");
    assert_eq!(
        uri("dns+srv:///_grpc._tcp.payments"),
        Ok(EndpointsSpec::DnsSrv {
            name: "_grpc._tcp.payments".into()
        })
    );
    assert_eq!(
        uri("file:///etc/meshd/eps"),
        Ok(EndpointsSpec::File("/etc/meshd/eps".into()))
    );
    assert_eq!(
        uri("dns:///x:65536"),
        Err("endpoints `dns:///x:65536`: port `65536` is not in 1..=65535".into())
    );
    assert_eq!(
        list(&["a b:1"]),
        Err("endpoint `a b:1`: `a b` is not a host name or IP address".into())
    );
    assert_eq!(
        list(&["[zz]:1"]),
        Err("endpoint `[zz]:1`: `zz` is not an IPv6 address".into())
    );
    assert!(uri("tcp://a:1").is_err());
}

#[test]
fn redacted_keeps_paths_and_hides_secret_keys() {
    // /config shows file paths as they are; any key listed in SECRET_KEYS is hidden.
    let text = "service: s\nidentity: {files: {cert: /c.pem, key: /k.pem, bundle: /b.pem}}\n";
    let (config, _) = load(text, &[]).unwrap();
    let json = config.redacted();
    assert_eq!(json["identity"]["files"]["key"], "/k.pem");
    assert_eq!(json["outbound"], serde_json::json!([]));
    let mut future =
        serde_json::json!({"gateway": {"routes": [{"api_key": "s3cret", "path": "/x"}]}});
    redact(&mut future);
    assert_eq!(
        future,
        serde_json::json!({"gateway": {"routes": [{"api_key": "<redacted>", "path": "/x"}]}})
    );
}

#[test]
fn unreadable_file_is_one_problem_without_position() {
    // A missing file is reported by name with the OS reason, not as a panic.
    let (report, ok) = check_report(Path::new("/nonexistent/meshd.yaml"), &Env::default());
    assert!(!ok);
    assert_eq!(report, "/nonexistent/meshd.yaml: cannot read the config file: No such file or directory (os error 2)");
}

#[test]
fn balancer_and_refresh_bounds() {
    // The per-upstream discovery keys: defaults, values, and bounds that cannot work.
    let base = "service: s\noutbound:\n  - name: a\n    listen: 127.0.0.1:15101\n    endpoints: dns:///a.svc:1\n    server_id: spiffe://td/a\n";
    let (c, _) = load(base, &[]).unwrap();
    let o = &c.outbound[0];
    assert_eq!(o.balancer, BalancerPolicy::P2cEwma);
    assert_eq!(
        (o.min_refresh, o.max_refresh),
        (Duration::from_secs(1), Duration::from_secs(60))
    );
    let text = format!(
        "{base}    balancer: least_request\n    min_refresh: 250ms\n    max_refresh: 10s\n"
    );
    let (c, _) = load(&text, &[]).unwrap();
    let o = &c.outbound[0];
    assert_eq!(o.balancer, BalancerPolicy::LeastRequest);
    assert_eq!(
        (o.min_refresh, o.max_refresh),
        (Duration::from_millis(250), Duration::from_secs(10))
    );
    let table: &[(String, &str)] = &[
        (format!("{base}    min_refresh: 2m\n"),
         "m.yaml:7:18: outbound[0].min_refresh: min_refresh (2m) must be greater than 0 and at most max_refresh (1m)"),
        (format!("{base}    min_refresh: 0s\n"),
         "m.yaml:7:18: outbound[0].min_refresh: min_refresh (0s) must be greater than 0 and at most max_refresh (1m)"),
        (format!("{base}    balancer: random\n"),
         "m.yaml:7:15: outbound[0].balancer: unknown variant `random`, expected one of `p2c_ewma`, `round_robin`, `least_request`"),
    ];
    for (text, want) in table {
        assert_eq!(problems(text, &[]), vec![want.to_string()], "{text}");
    }
}

#[test]
fn parsed_values_read_back_as_written() {
    // Typed endpoints, server_id and intercept show in /config (and discovery's messages)
    // as the file wrote them.
    for text in [
        "dns:///contact.svc:15006",
        "dns:///[::1]:80",
        "dns+srv:///_grpc._tcp.payments",
        "file:///etc/meshd/eps",
    ] {
        let spec = parse_endpoints(&Endpoints::Uri(text.into())).unwrap();
        assert_eq!(spec.to_string(), text);
    }
    let list = parse_endpoints(&Endpoints::Static(vec![
        "a.b:80".into(),
        "[::1]:443".into(),
    ]));
    assert_eq!(list.unwrap().to_string(), "a.b:80,[::1]:443");
    let text = "service: s\ntransparent: {}\noutbound:\n  - name: a\n    intercept: [\"10.0.0.1:80\", \"contact:8081\"]\n    endpoints: [\"a:1\", \"[::1]:2\"]\n    server_id: spiffe://td/a\n";
    let (config, _) = load(text, &[("SERVICE_MESH_SPIFFE_ID", "spiffe://td/me")]).unwrap();
    let ob = &config.outbound[0];
    assert_eq!(ob.intercept[1].host, "contact");
    let json = config.redacted();
    assert_eq!(json["outbound"][0]["server_id"], "spiffe://td/a");
    assert_eq!(
        json["outbound"][0]["endpoints"],
        serde_json::json!(["a:1", "[::1]:2"])
    );
    assert_eq!(
        json["outbound"][0]["intercept"],
        serde_json::json!(["10.0.0.1:80", "contact:8081"])
    );
    assert_eq!(json["identity"]["expect"], "spiffe://td/me");
}

#[test]
fn transcoding_protos_must_define_the_listed_services() {
    // A gateway that transcodes JSON names its services; `meshd check` finds one the
    // protos do not define, and protos that do not load, at their position.
    let proto = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/payment.proto");
    let gateway = |transcoding: &str| {
        format!("service: s\noutbound:\n  - name: a\n    endpoints: [\"a:1\"]\n    server_id: spiffe://td/a\ngateway:\n  tls: {{cert: c, key: k}}\n  api_keys: keys.yaml\n  routes:\n    - {{name: p, prefix: /p/, upstream: a}}\n  transcoding:\n{transcoding}")
    };
    let table: &[(String, Vec<String>)] = &[
        (
            gateway(&format!("    protos: [{proto}]\n    services: [payment.v1.PaymentService]\n    max_body: 64KiB\n")),
            vec![],
        ),
        (
            gateway(&format!("    protos: [{proto}]\n    services:\n      - payment.v1.PaymentService\n      - payment.v1.Nope\n")),
            vec!["m.yaml:15:9: gateway.transcoding.services[1]: no service `payment.v1.Nope` in the protos".into()],
        ),
        (
            gateway("    services: [payment.v1.PaymentService]\n"),
            vec!["m.yaml:11:3: gateway.transcoding needs either protos or descriptor_set, not both".into()],
        ),
    ];
    for (text, want) in table {
        assert_eq!(&problems(text, &[]), want, "{text}");
    }
    let missing = gateway("    protos: [/nonexistent/api.proto]\n    services: [a.B]\n");
    let got = problems(&missing, &[]);
    assert_eq!(got.len(), 1, "{got:?}");
    assert!(
        got[0].starts_with("m.yaml:12:5: gateway.transcoding.protos: "),
        "{got:?}"
    );
}

#[test]
fn connection_limits_default_and_refuse_zero_where_zero_cannot_work() {
    // A config without `connections:` gets the defaults on both edge listeners; the keys
    // may be given one by one; a zero where zero means "never let anyone in" or "close at
    // once" is named at its position; 0s turns idle closing and keepalive off.
    let base = "service: s\ninbound:\n  policy: /p.yaml\n";
    let (config, _) = load(base, &[]).expect("valid");
    let limits = config.inbound.unwrap().connections;
    assert_eq!(limits, ConnectionLimits::default());
    assert_eq!(
        (limits.max, limits.handshake_timeout, limits.idle_timeout),
        (20_000, Duration::from_secs(10), Duration::from_secs(600))
    );
    let some =
        format!("{base}  connections: {{max: 50, idle_timeout: 0s, keepalive_interval: 0s}}\n");
    let (config, _) = load(&some, &[]).expect("valid");
    let limits = config.inbound.unwrap().connections;
    assert_eq!((limits.max, limits.idle_timeout), (50, Duration::ZERO));
    assert_eq!(limits.header_timeout, Duration::from_secs(10));
    let table: &[(&str, &str)] = &[
        ("{max: 0}", "inbound.connections.max must be greater than 0"),
        (
            "{header_timeout: 0s}",
            "inbound.connections.header_timeout must be greater than 0",
        ),
        (
            "{keepalive_timeout: 0s}",
            "inbound.connections.keepalive_timeout must be greater than 0",
        ),
        ("{idle: 5s}", "unknown field `idle`"),
    ];
    for (block, want) in table {
        let got = problems(&format!("{base}  connections: {block}\n"), &[]);
        let at_line = |p: &&String| p.starts_with("m.yaml:4:") && p.contains(want);
        assert!(got.iter().any(|p| at_line(&p)), "{block}: {got:?}");
    }
}
