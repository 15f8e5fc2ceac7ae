//! Table tests for `inbound.jwt_svid`: defaults, each key read back, and every problem
//! named at its `file:line:column`.
use crate::config::{Config, ConfigErrors, ConfigProblem, Env, InboundJwtSvid};
use std::path::Path;

fn load(text: &str) -> Result<(Config, Vec<ConfigProblem>), ConfigErrors> {
    Config::from_text(Path::new("m.yaml"), text, &Env::default())
}

fn problems(text: &str) -> Vec<String> {
    match load(text) {
        Ok((_, warnings)) => warnings.iter().map(ToString::to_string).collect(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

const BASE: &str = "service: s\ninbound:\n  policy: /p.yaml\n";

#[test]
fn jwt_svid_defaults_require_and_strips_the_token() {
    // Without the block nothing is checked; with only an audience a token is required
    // and not forwarded; each key reads back as written.
    let (config, _) = load(BASE).expect("valid");
    assert_eq!(config.inbound.unwrap().jwt_svid, None);
    let table: &[(&str, InboundJwtSvid)] = &[
        (
            "{audience: payment}",
            InboundJwtSvid {
                audience: "payment".into(),
                require: true,
                forward: false,
            },
        ),
        (
            "{audience: 'spiffe://jia.app/payment-service', require: false, forward: true}",
            InboundJwtSvid {
                audience: "spiffe://jia.app/payment-service".into(),
                require: false,
                forward: true,
            },
        ),
    ];
    for (block, want) in table {
        let (config, warnings) = load(&format!("{BASE}  jwt_svid: {block}\n")).expect(block);
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(config.inbound.unwrap().jwt_svid.as_ref(), Some(want));
    }
}

#[test]
fn jwt_svid_problems_are_named_at_their_position() {
    // Each mistake is an error at the line of the key (or value) that holds it.
    let table: &[(&str, &str, &str)] = &[
        ("", "  jwt_svid: {audience: ''}\n", "m.yaml:4:"),
        ("", "  jwt_svid: {audience: '   '}\n", "m.yaml:4:"),
        ("", "  jwt_svid: {require: true}\n", "m.yaml:4:"),
        ("", "  jwt_svid: {audience: a, forwrd: true}\n", "m.yaml:4:"),
        (
            "",
            "  jwt_svid: {audience: a, require: maybe}\n",
            "m.yaml:4:",
        ),
        (
            "  protocol: tcp\n",
            "  jwt_svid:\n    audience: a\n",
            "m.yaml:5:",
        ),
    ];
    let wants = [
        "inbound.jwt_svid.audience must name the audience",
        "inbound.jwt_svid.audience must name the audience",
        "missing field `audience`",
        "unknown field `forwrd`",
        "invalid type",
        "inbound.jwt_svid needs protocol http or grpc",
    ];
    for ((before, block, at), want) in table.iter().zip(wants) {
        let text = format!("{BASE}{before}{block}");
        let got = problems(&text);
        assert!(
            got.iter().any(|p| p.starts_with(at) && p.contains(want)),
            "{text}: want {at} {want}; got {got:?}"
        );
        assert!(load(&text).is_err(), "{text} must not load");
    }
}
