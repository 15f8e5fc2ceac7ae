use super::*;
use crate::policy::cli::{check_file, explain_cli, ExplainError};
use std::io::Write;
use std::time::Instant;

fn errors(yaml: &str) -> Vec<String> {
    match parse_policy(yaml, Path::new("p.yaml"), 1) {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(problems) => problems.iter().map(ToString::to_string).collect(),
    }
}

fn one_error(yaml: &str) -> String {
    let e = errors(yaml);
    assert_eq!(e.len(), 1, "{e:?}");
    e.into_iter().next().unwrap_or_default()
}

fn warnings(yaml: &str) -> Vec<String> {
    match parse_policy(yaml, Path::new("p.yaml"), 1) {
        Ok((_, w)) => w.iter().map(ToString::to_string).collect(),
        Err(e) => panic!("unexpected errors: {e:?}"),
    }
}

const HEAD: &str = "service: s\nrules:\n";

// Text that is not YAML at all is reported at the offending character.
#[test]
fn not_yaml() {
    let e = one_error("service: s\n- x\n");
    assert_eq!(e, "p.yaml:2:1: did not find expected key");
}

// A number where a list of rules belongs: a type error with the position of the value.
#[test]
fn wrong_type() {
    let e = one_error("service: s\nrules: 7\n");
    assert!(
        e.starts_with("p.yaml:2:8: rules: invalid type: integer `7`"),
        "{e}"
    );
}

// A misspelt key is an unknown field, not silently ignored.
#[test]
fn unknown_field() {
    let e = one_error(&format!(
        "{HEAD}  - name: a\n    from: [\"spiffe://td/x\"]\n    too: {{ports: [1]}}\n"
    ));
    assert!(
        e.starts_with("p.yaml:5:5: rules[0]: unknown field `too`"),
        "{e}"
    );
}

// An unknown action word names the allowed ones.
#[test]
fn unknown_action() {
    let e = one_error(&format!(
        "{HEAD}  - name: a\n    action: permit\n    from: [\"spiffe://td/x\"]\n"
    ));
    assert!(
        e.starts_with("p.yaml:4:13: rules[0].action: unknown variant `permit`"),
        "{e}"
    );
}

// An uppercase trust domain is not a valid SPIFFE ID; the error points at the string.
#[test]
fn uppercase_trust_domain() {
    let e = one_error(&format!(
        "{HEAD}  - name: a\n    from: [\"spiffe://Jia.app/x\"]\n"
    ));
    assert!(
        e.starts_with(
            "p.yaml:4:12: rules[0].from[0]: `spiffe://Jia.app/x` is not a valid SPIFFE ID"
        ),
        "{e}"
    );
}

// `*` in the middle of an ID is refused; only a trailing `/*` is a wildcard.
#[test]
fn wildcard_mid_id() {
    for bad in [
        "spiffe://jia.app/*/x",
        "spiffe://jia.app/ns*",
        "spiffe://*.app/x",
        "spiffe://jia.app/a*/*",
    ] {
        let e = one_error(&format!(
            "{HEAD}  - name: a\n    from:\n      - \"{bad}\"\n"
        ));
        assert!(e.starts_with("p.yaml:5:9: rules[0].from[0]: "), "{e}");
        assert!(e.contains("only allowed as a trailing `/*`"), "{e}");
    }
}

// IDs breaking the SPIFFE-ID standard: dot segments, empty segments, bad chars, query,
// port, userinfo, wrong scheme, no path.
#[test]
fn invalid_spiffe_ids() {
    for bad in [
        "spiffe://td/a/../b",
        "spiffe://td/./b",
        "spiffe://td//b",
        "spiffe://td/a b",
        "spiffe://td/a?x=1",
        "spiffe://td:8443/a",
        "spiffe://user@td/a",
        "https://td/a",
        "spiffe://td",
        "spiffe://td/a/",
    ] {
        let e = one_error(&format!("{HEAD}  - name: a\n    from: ['{bad}']\n"));
        assert!(
            e.starts_with("p.yaml:4:12: rules[0].from[0]: "),
            "{bad}: {e}"
        );
        assert!(e.contains("is not a valid SPIFFE ID"), "{bad}: {e}");
    }
}

// Bad targets, paths, methods and ports are located exactly.
#[test]
fn bad_targets() {
    let cases = [
        (
            "grpc: [\"payment.v1.PaymentService\"]",
            "rules[0].to.grpc[0]: `payment.v1.PaymentService` is not a gRPC target",
        ),
        ("grpc: [\"svc/Get*\"]", "is not a gRPC target"),
        (
            "http: [{paths: [\"healthz\"]}]",
            "rules[0].to.http[0].paths[0]: `healthz` is not an HTTP path",
        ),
        ("http: [{paths: [\"/a/*/b\"]}]", "is not an HTTP path"),
        (
            "http: [{methods: [\"G-T\"]}]",
            "`G-T` is not an HTTP method",
        ),
        ("ports: [0]", "rules[0].to.ports[0]: port 0 is out of range"),
        ("ports: [70000]", "port 70000 is out of range"),
    ];
    for (to, want) in cases {
        let e = one_error(&format!(
            "{HEAD}  - name: a\n    from: [\"spiffe://td/x\"]\n    to: {{{to}}}\n"
        ));
        assert!(e.starts_with("p.yaml:5:"), "{e}");
        assert!(e.contains(want), "{e}");
    }
}

// A rule with an empty `from` would match nobody: refused at the list.
#[test]
fn empty_from() {
    let e = one_error(&format!("{HEAD}  - name: a\n    from: []\n"));
    assert!(
        e.starts_with("p.yaml:4:11: rules[0].from: `from` must not be empty"),
        "{e}"
    );
}

// Written empty, a list under `to` would read as "any" (the key left out), the opposite
// of what it says; an empty `to` (`{}`, `~` or nothing) would match every request. Each is
// refused where it is written.
#[test]
fn empty_lists_under_to_are_refused() {
    let rule = format!("{HEAD}  - name: a\n    from: [\"spiffe://td/x\"]\n");
    let table = [
        ("to: {grpc: []}", "5:16: rules[0].to.grpc: `grpc` must not be empty: list targets, or leave the key out"),
        ("to: {http: []}", "5:16: rules[0].to.http: `http` must not be empty: list targets, or leave the key out"),
        ("to: {ports: []}", "5:17: rules[0].to.ports: `ports` must not be empty: list ports, or leave the key out for any port"),
        ("to: {http: [{methods: []}]}", "5:27: rules[0].to.http[0].methods: `methods` must not be empty: list methods, or leave the key out for any method"),
        ("to: {http: [{paths: []}]}", "5:25: rules[0].to.http[0].paths: `paths` must not be empty: list paths, or leave the key out for any path"),
        ("to: {}", "3:5: rules[0]: `to` names no `grpc`, `http` or `ports`: leave `to` out to match every request"),
        ("to: ~", "3:5: rules[0]: `to` names no `grpc`, `http` or `ports`: leave `to` out to match every request"),
        ("to:", "3:5: rules[0]: `to` names no `grpc`, `http` or `ports`: leave `to` out to match every request"),
        ("to: 5", "5:9: rules[0].to: invalid type: integer `5`, expected a map of `grpc`, `http` and `ports`"),
    ];
    for (to, want) in table {
        let e = one_error(&format!("{rule}    {to}\n"));
        assert_eq!(e, format!("p.yaml:{want}"), "{to}");
    }
    // What they stand for when left out still parses.
    let left_out = format!("{rule}    to: {{http: [{{}}], ports: [80]}}\n");
    assert!(parse_policy(&left_out, Path::new("p.yaml"), 1).is_ok());
}

// Missing required fields are named.
#[test]
fn missing_fields() {
    assert!(one_error("rules: []\n").contains("missing field `service`"));
    assert!(one_error(&format!("{HEAD}  - from: [\"spiffe://td/x\"]\n"))
        .contains("missing field `name`"));
}

// Rule names label metrics and denials: empty or spaced names are refused where written.
#[test]
fn bad_rule_names() {
    let e = one_error(&format!(
        "{HEAD}  - name: \"\"\n    from: [\"spiffe://td/x\"]\n"
    ));
    assert!(
        e.starts_with("p.yaml:3:11: rules[0].name: rule name `` must be non-empty"),
        "{e}"
    );
    let e = one_error(&format!(
        "{HEAD}  - name: two words\n    from: [\"spiffe://td/x\"]\n"
    ));
    assert!(
        e.starts_with("p.yaml:3:11: rules[0].name: rule name `two words`"),
        "{e}"
    );
}

// Two rules with one name: an error at the second, naming the first's line.
#[test]
fn duplicate_names() {
    let yaml = format!(
        "{HEAD}  - name: same\n    from: [\"spiffe://td/x\"]\n  - name: \"same\"\n    from: [\"spiffe://td/y\"]\n"
    );
    let e = one_error(&yaml);
    assert_eq!(
        e,
        "p.yaml:5:11: duplicate rule name \"same\" (first used on line 3)"
    );
}

// Names that are prefixes of one another are not mistaken for each other when locating.
#[test]
fn duplicate_names_located_past_similar_names() {
    let yaml = format!(
        "{HEAD}  - {{name: ab, from: [\"spiffe://td/x\"]}}\n  - {{name: a, from: [\"spiffe://td/x\"]}}\n  - {{name: a, from: [\"spiffe://td/x\"]}}\n"
    );
    assert_eq!(
        one_error(&yaml),
        "p.yaml:5:12: duplicate rule name \"a\" (first used on line 4)"
    );
}

// An allow fully covered by a deny can never allow anything: a warning at the allow.
#[test]
fn shadowed_allow_warns() {
    let yaml = format!(
        "{HEAD}  - name: block-ops\n    action: deny\n    from: [\"spiffe://td/ops/*\"]\n  - name: ops-read\n    from: [\"spiffe://td/ops/a\", \"spiffe://td/ops/b/*\"]\n    to: {{grpc: [\"x.Y/Get\"]}}\n"
    );
    let w = warnings(&yaml);
    assert_eq!(w, vec!["p.yaml:6:11: warning: allow rule \"ops-read\" is fully shadowed by deny rule \"block-ops\" (a matching deny always wins)".to_string()]);
}

// An allow only partly covered (another peer, other methods, other ports) is fine.
#[test]
fn partial_overlap_does_not_warn() {
    let partial = [
        (
            "[\"spiffe://td/ops/*\"]",
            "{grpc: [\"x.Y/Get\"]}",
            "[\"spiffe://td/ops/a\", \"spiffe://td/dev/a\"]",
            "{grpc: [\"x.Y/Get\"]}",
        ),
        (
            "[\"spiffe://td/*\"]",
            "{grpc: [\"x.Y/Get\"]}",
            "[\"spiffe://td/a\"]",
            "{grpc: [\"x.Y/*\"]}",
        ),
        (
            "[\"spiffe://td/*\"]",
            "{ports: [1]}",
            "[\"spiffe://td/a\"]",
            "{ports: [1, 2]}",
        ),
        (
            "[\"spiffe://td/*\"]",
            "{http: [{methods: [POST]}]}",
            "[\"spiffe://td/a\"]",
            "{http: [{paths: [\"/x\"]}]}",
        ),
    ];
    for (dfrom, dto, afrom, ato) in partial {
        let yaml = format!("{HEAD}  - {{name: d, action: deny, from: {dfrom}, to: {dto}}}\n  - {{name: a, from: {afrom}, to: {ato}}}\n");
        assert_eq!(warnings(&yaml), Vec::<String>::new(), "{yaml}");
    }
}

// Empty and comment-only files are errors, not an empty (deny-all or allow-all) policy.
#[test]
fn empty_file() {
    assert_eq!(one_error(""), "p.yaml:1:1: policy file is empty");
    assert_eq!(
        one_error("\n  # nothing here\n"),
        "p.yaml:1:1: policy file is empty"
    );
}

// A 50 MB file is refused by size before any parsing, quickly.
#[test]
fn huge_file_rejected_quickly() {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    let line = format!("# {}\n", "x".repeat(1021));
    for _ in 0..(50 * 1024) {
        f.write_all(line.as_bytes()).expect("write");
    }
    let started = Instant::now();
    let e = load_policy(f.path(), 1).expect_err("must be refused");
    assert!(
        started.elapsed().as_millis() < 500,
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(e.len(), 1);
    assert_eq!(
        e[0].error,
        PolicyError::TooLarge {
            size: 50 * 1024 * 1024,
            limit: MAX_POLICY_BYTES
        }
    );
    assert!(
        e[0].to_string()
            .contains(":1:1: policy file is 52428800 bytes"),
        "{}",
        e[0]
    );
}

// Invalid UTF-8 is located at the first bad byte.
#[test]
fn not_utf8() {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(b"service: s\nrules: [\xff]\n").expect("write");
    let e = load_policy(f.path(), 1).expect_err("must be refused");
    assert_eq!(
        (e[0].position, &e[0].error),
        (Some((2, 9)), &PolicyError::NotUtf8)
    );
}

// A missing file is an error without a position.
#[test]
fn missing_file() {
    let e = load_policy(Path::new("/nonexistent/policy.yaml"), 1).expect_err("must fail");
    assert!(
        e[0].to_string()
            .starts_with("/nonexistent/policy.yaml: cannot read policy file"),
        "{}",
        e[0]
    );
}

// The reference policies parse without warnings and say what the issue asks.
#[test]
fn reference_policies_parse_cleanly() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/policies");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).expect("deploy/policies") {
        let path = entry.expect("entry").path();
        let (lines, ok) = check_file(&path);
        assert!(ok && lines.len() == 1, "{lines:?}");
        seen += 1;
    }
    assert_eq!(seen, 4);
    let pay = dir.join("payment-service.yaml");
    let ask =
        |from: &str, grpc: &str| explain_cli(&pay, from, Some(grpc), None, None).expect("explain");
    assert!(ask(
        "spiffe://jia.app/api-gateway",
        "payment.v1.PaymentService/CreatePayment"
    )
    .starts_with("ALLOW  rule=gateway-calls-payments"));
    assert!(ask(
        "spiffe://jia.app/contact-service",
        "payment.v1.PaymentService/CreatePayment"
    )
    .starts_with("DENY  rule=default deny"));
    assert!(ask(
        "spiffe://jia.app/contact-service",
        "/grpc.health.v1.Health/Check"
    )
    .starts_with("ALLOW  rule=health-from-mesh"));
    assert!(ask(
        "spiffe://evil.example/api-gateway",
        "grpc.health.v1.Health/Check"
    )
    .starts_with("DENY"));
    for svc in ["contact", "family", "document"] {
        let file = dir.join(format!("{svc}-service.yaml"));
        let upper = format!("{}{}", svc[..1].to_uppercase(), &svc[1..]);
        let api = format!("{svc}.v1.{upper}Service/Get");
        let ask = |from: &str| explain_cli(&file, from, Some(&api), None, None).expect("explain");
        assert!(
            ask("spiffe://jia.app/payment-service").starts_with("ALLOW"),
            "{svc}"
        );
        assert!(
            ask("spiffe://jia.app/api-gateway").starts_with("DENY"),
            "{svc}"
        );
    }
}

// explain_cli: HTTP and TCP targets, ports, and input errors.
#[test]
fn explain_cli_targets_and_errors() {
    let mut f = tempfile::NamedTempFile::new().expect("temp file");
    f.write_all(b"service: s\nrules:\n  - name: web\n    from: [\"spiffe://td/*\"]\n    to: {http: [{methods: [GET], paths: [\"/api/*\"]}]}\n  - name: tcp\n    from: [\"spiffe://td/db\"]\n    to: {ports: [5432]}\n").expect("write");
    let p = f.path();
    assert_eq!(
        explain_cli(p, "spiffe://td/a", None, Some(("GET", "/api/v1")), None).unwrap(),
        "ALLOW  rule=web  mode=enforce"
    );
    assert_eq!(
        explain_cli(p, "spiffe://td/db", None, None, Some(5432)).unwrap(),
        "ALLOW  rule=tcp  mode=enforce"
    );
    assert_eq!(
        explain_cli(p, "spiffe://td/db", None, None, None).unwrap(),
        "DENY  rule=default deny  mode=enforce"
    );
    assert!(matches!(
        explain_cli(p, "spiffe://TD/a", None, None, None),
        Err(ExplainError::BadCaller { .. })
    ));
    assert!(matches!(
        explain_cli(p, "spiffe://td/a", Some("nomethod"), None, None),
        Err(ExplainError::BadGrpcTarget(_))
    ));
    assert!(explain_cli(
        Path::new("/nonexistent.yaml"),
        "spiffe://td/a",
        None,
        None,
        None
    )
    .is_err());
}

// The deny index finds, for every allow, the same first covering deny as holding each
// allow against every deny would: matchers of every kind, nested prefixes, two trust
// domains, several `from` entries, with and without `to`.
#[test]
fn deny_index_agrees_with_every_pair() {
    let froms = [
        "spiffe://td/*",
        "spiffe://td/ns/*",
        "spiffe://td/ns/a/*",
        "spiffe://td/ns/a",
        "spiffe://td/ns/a/b",
        "spiffe://td/ns/ab",
        "spiffe://td/nsx/a",
        "spiffe://other/ns/a",
        "spiffe://other/*",
    ];
    let tos = [
        "",
        ", to: {grpc: [\"x.Y/Get\"]}",
        ", to: {grpc: [\"x.Y/*\"]}",
    ];
    let mut yaml = HEAD.to_string();
    let mut n = 0;
    for (i, from) in froms.iter().enumerate() {
        for (j, to) in tos.iter().enumerate() {
            let second = froms[(i * 7 + j) % froms.len()];
            for (action, list) in [
                ("allow", format!("[\"{from}\"]")),
                ("deny", format!("[\"{from}\"]")),
                ("allow", format!("[\"{from}\", \"{second}\"]")),
            ] {
                if action == "deny" && (i + j) % 3 == 0 {
                    continue;
                }
                yaml.push_str(&format!(
                    "  - {{name: r{n}, action: {action}, from: {list}{to}}}\n"
                ));
                n += 1;
            }
        }
    }
    let (policy, _) = parse_policy(&yaml, Path::new("p.yaml"), 1).expect("a valid policy");
    let rules = &policy.rules;
    let index = crate::policy::shadow::DenyIndex::new(rules);
    let mut shadowed = 0;
    for allow in rules.iter().filter(|r| r.action == Action::Allow) {
        let pairwise = rules
            .iter()
            .find(|d| d.action == Action::Deny && allow.is_covered_by(d));
        let indexed = index.shadowing(allow);
        assert_eq!(
            indexed.map(|d| &d.name),
            pairwise.map(|d| &d.name),
            "allow {}",
            allow.name
        );
        shadowed += usize::from(pairwise.is_some());
    }
    assert!(
        shadowed > 10,
        "the table shadows too few allows: {shadowed}"
    );
}

// A file with hundreds of duplicate names reports every one; the first ones carry their
// line and column, the rest only the file name (each position is a search of the file).
#[test]
fn many_problems_are_all_reported_the_first_located() {
    let mut yaml = HEAD.to_string();
    for _ in 0..300 {
        yaml.push_str("  - {name: same, from: [\"spiffe://td/x\"]}\n");
    }
    let e = errors(&yaml);
    assert_eq!(e.len(), 299);
    assert_eq!(
        e[0],
        "p.yaml:4:12: duplicate rule name \"same\" (first used on line 3)"
    );
    assert_eq!(
        e[298],
        "p.yaml: duplicate rule name \"same\" (first used on line 3)"
    );
}
