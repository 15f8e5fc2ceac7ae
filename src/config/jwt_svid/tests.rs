//! Table tests for `inbound.jwt_svid` and `gateway.jwt_svid`: defaults, each key read back,
//! and every problem named at its `file:line:column`.
use crate::config::{Config, ConfigErrors, ConfigProblem, Env, GatewayJwtSvid, InboundJwtSvid};
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

/// A gateway with one route to outbound `a`, its identity from `identity`, and `extra`
/// lines under `gateway:` and on the route.
fn gateway(identity: &str, extra: &str, route: &str) -> String {
    format!("service: api-gateway\n{identity}outbound:\n  - name: a\n    endpoints: [\"a:1\"]\n    server_id: spiffe://jia.app/a\ngateway:\n  tls: {{cert: c, key: k}}\n{extra}  routes:\n    - {{name: p, prefix: /p/, upstream: a{route}}}\n")
}

#[test]
fn gateway_jwt_svid_reads_back_and_a_route_may_require_it() {
    // With only an audience every trust domain with a JWT bundle is accepted (an empty
    // list); `auth: jwt_svid` and `auth: any` routes are fine with it alone.
    let table: &[(&str, &str, GatewayJwtSvid)] = &[
        (
            "  jwt_svid: {audience: api.jia.app}\n",
            ", auth: jwt_svid",
            GatewayJwtSvid {
                audience: "api.jia.app".into(),
                trust_domains: vec![],
            },
        ),
        (
            "  jwt_svid:\n    audience: api\n    trust_domains: [jia.app, partner.example]\n",
            "",
            GatewayJwtSvid {
                audience: "api".into(),
                trust_domains: vec!["jia.app".into(), "partner.example".into()],
            },
        ),
    ];
    for (block, route, want) in table {
        let text = gateway("", block, route);
        let (config, warnings) = load(&text).expect(&text);
        assert!(warnings.is_empty(), "{warnings:?}");
        let g = config.gateway.unwrap();
        assert_eq!(g.jwt_svid.as_ref(), Some(want));
        assert_eq!(g.jwt, None);
    }
}

#[test]
fn gateway_jwt_svid_problems_are_named_at_their_position() {
    // Line 6 is `gateway:` (8 with identity.files), the block under test from line 8,
    // then the routes.
    let files = "identity:\n  files: {cert: c.pem, key: k.pem, bundle: b.pem}\n";
    let table: &[(&str, &str, &str, &str)] = &[
        (
            "",
            "  jwt: {issuer: i, audiences: [a], jwks: j.json}\n",
            ", auth: jwt_svid",
            "m.yaml:10:49: gateway.routes[0].auth needs gateway.jwt_svid to be configured",
        ),
        (
            "",
            "  jwt_svid: {audience: ' '}\n",
            "",
            "m.yaml:8:24: gateway.jwt_svid.audience must name the audience",
        ),
        (
            "",
            "  jwt_svid:\n    audience: api\n    trust_domains: [jia.app, 'spiffe://partner.example']\n",
            "",
            "m.yaml:10:30: gateway.jwt_svid.trust_domains[1]: `spiffe://partner.example` is not a trust domain name",
        ),
        (
            "",
            "  jwt_svid: {audience: api, trust_domains: [Jia.App]}\n",
            "",
            "m.yaml:8:45: gateway.jwt_svid.trust_domains[0]: `Jia.App` is not a trust domain name",
        ),
        (
            "",
            "  jwt_svid: {audience: api, issuer: x}\n",
            "",
            "m.yaml:8:29: gateway.jwt_svid: unknown field `issuer`",
        ),
        (
            files,
            "  jwt_svid: {audience: api}\n",
            ", auth: jwt_svid",
            "m.yaml:10:3: gateway.jwt_svid: JWT bundles come from the Workload API",
        ),
    ];
    for (identity, block, route, want) in table {
        let text = gateway(identity, block, route);
        let got = problems(&text);
        assert!(
            got.iter().any(|p| p.contains(want)),
            "{text}: want {want}; got {got:?}"
        );
        assert!(load(&text).is_err(), "{text} must not load");
    }
}
