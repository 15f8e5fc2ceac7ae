//! Table tests for `outbound[].tls` and `outbound[].jwt_svid`: what loads (and what it
//! means: the parsed `server_id`, the `sni` filled in), and each rule broken once,
//! reported at its `file:line:column`.
use crate::config::{Config, Env, JwtSvidAttach, TlsMode, UpstreamTlsConfig};
use std::path::Path;

/// One outbound `api` (HTTP, to `api.example.com:443` unless `endpoints` says) with `extra`
/// lines under it, and `head` lines at the top level.
fn config(head: &str, endpoints: &str, extra: &str) -> String {
    let mut text = format!(
        "service: s\n{head}outbound:\n  - name: api\n    listen: 127.0.0.1:15101\n    protocol: http\n    endpoints: {endpoints}\n"
    );
    for line in extra.lines() {
        text.push_str("    ");
        text.push_str(line);
        text.push('\n');
    }
    text
}

/// The outbound's `server_id`, `tls` and `jwt_svid` with the warnings, or the problems.
type Outcome = Result<
    (
        Option<String>,
        UpstreamTlsConfig,
        Option<JwtSvidAttach>,
        Vec<String>,
    ),
    Vec<String>,
>;

fn load(text: &str) -> Outcome {
    match Config::from_text(Path::new("m.yaml"), text, &Env::default()) {
        Ok((c, warnings)) => {
            let ob = &c.outbound[0];
            Ok((
                ob.server_id.as_ref().map(ToString::to_string),
                ob.tls.clone(),
                ob.jwt_svid.clone(),
                warnings.iter().map(ToString::to_string).collect(),
            ))
        }
        Err(e) => Err(e.0.iter().map(ToString::to_string).collect()),
    }
}

fn server_only(sni: &str, ca: Option<&str>) -> UpstreamTlsConfig {
    UpstreamTlsConfig {
        mode: TlsMode::ServerOnly,
        ca: ca.map(Into::into),
        sni: Some(sni.into()),
    }
}

fn audience(a: &[&str]) -> Option<JwtSvidAttach> {
    Some(JwtSvidAttach {
        audience: a.iter().map(|s| s.to_string()).collect(),
    })
}

const HOST: &str = "[\"api.example.com:443\"]";

#[test]
fn upstream_tls_and_jwt_svid_load_with_their_meaning() {
    // What loads, and what the outbound then does: mTLS to server_id by default; a
    // server-only upstream checked for the endpoints' one host (or the sni given), with
    // a JWT-SVID for the audience as the caller's proof.
    let sid = Some("spiffe://td/api".to_string());
    let table: Vec<(&str, String, Outcome)> = vec![
        (
            "default: mutual TLS to server_id, no token",
            config("", HOST, "server_id: spiffe://td/api"),
            Ok((sid.clone(), UpstreamTlsConfig::default(), None, vec![])),
        ),
        (
            "mtls with a JWT-SVID too",
            config("", HOST, "server_id: spiffe://td/api\ntls: {mode: mtls}\njwt_svid: {audience: [api, other]}"),
            Ok((sid.clone(), UpstreamTlsConfig::default(), audience(&["api", "other"]), vec![])),
        ),
        (
            "server_only: sni defaults to the static endpoints' host",
            config("", HOST, "tls: {mode: server_only}\njwt_svid: {audience: [api]}"),
            Ok((None, server_only("api.example.com", None), audience(&["api"]), vec![])),
        ),
        (
            "server_only: sni defaults to the dns:/// host; ca kept",
            config("", "dns:///api.internal:8443", "tls: {mode: server_only, ca: /etc/ca.pem}\njwt_svid: {audience: [api]}"),
            Ok((None, server_only("api.internal", Some("/etc/ca.pem")), audience(&["api"]), vec![])),
        ),
        (
            "server_only: an IP endpoint is the name checked",
            config("", "[\"127.0.0.1:8443\", \"127.0.0.1:8444\"]", "tls: {mode: server_only}\njwt_svid: {audience: [api]}"),
            Ok((None, server_only("127.0.0.1", None), audience(&["api"]), vec![])),
        ),
        (
            "server_only: an SRV name with its sni given",
            config("", "dns+srv:///_https._tcp.api", "tls: {mode: server_only, sni: api.example.com}\njwt_svid: {audience: [api]}"),
            Ok((None, server_only("api.example.com", None), audience(&["api"]), vec![])),
        ),
        (
            "server_only without a token loads, with a warning",
            config("", HOST, "tls: {mode: server_only}"),
            Ok((
                None,
                server_only("api.example.com", None),
                None,
                vec!["m.yaml:7:5: warning: outbound[0].tls: server_only without jwt_svid: the upstream gets no proof of who calls".into()],
            )),
        ),
    ];
    for (what, text, want) in table {
        assert_eq!(load(&text), want, "{what}\n{text}");
    }
}

#[test]
fn each_broken_rule_is_refused_at_its_position() {
    let table: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "mtls needs server_id",
            config("", HOST, "timeout: 1s"),
            vec!["m.yaml:3:11: outbound[0].server_id is required with tls.mode mtls (the default): the SPIFFE ID the upstream must present"],
        ),
        (
            "server_only refuses server_id",
            config("", HOST, "server_id: spiffe://td/api\ntls: {mode: server_only}\njwt_svid: {audience: [api]}"),
            vec!["m.yaml:7:16: outbound[0].server_id: not used with tls.mode server_only (the server is checked by its certificate's name, tls.sni); remove it"],
        ),
        (
            "ca and sni are for server_only",
            config("", HOST, "server_id: spiffe://td/api\ntls: {ca: /ca.pem, sni: x.example}"),
            vec![
                "m.yaml:8:15: outbound[0].tls.ca is only for tls.mode server_only (mtls checks the upstream's SPIFFE ID against the trust bundle)",
                "m.yaml:8:29: outbound[0].tls.sni is only for tls.mode server_only (mtls checks the upstream's SPIFFE ID against the trust bundle)",
            ],
        ),
        (
            "a bad sni",
            config("", HOST, "tls: {mode: server_only, sni: \"not a name\"}\njwt_svid: {audience: [api]}"),
            vec!["m.yaml:7:35: outbound[0].tls.sni: `not a name` is not a DNS name or IP address"],
        ),
        (
            "no single host to default sni to",
            config("", "[\"a.example:443\", \"b.example:443\"]", "tls: {mode: server_only}\njwt_svid: {audience: [api]}"),
            vec!["m.yaml:7:5: outbound[0].tls.sni: the endpoints name no single host to check the certificate against; set tls.sni"],
        ),
        (
            "a tcp upstream has no requests for a token",
            config("", HOST, "server_id: spiffe://td/api\nprotocol: tcp\njwt_svid: {audience: [api]}")
                .replace("    protocol: http\n", ""),
            vec!["m.yaml:8:5: outbound[0].jwt_svid: a tcp upstream has no requests to put a token on; use protocol grpc or http"],
        ),
        (
            "an empty audience list, and an empty audience",
            config("", HOST, "server_id: spiffe://td/api\njwt_svid: {audience: []}")
                + &config("", HOST, "server_id: spiffe://td/b\njwt_svid: {audience: [ok, \" \"]}")
                    .replace("service: s\noutbound:\n", "")
                    .replace("name: api", "name: b")
                    .replace("15101", "15102"),
            vec![
                "m.yaml:8:16: outbound[0].jwt_svid.audience must list at least one audience",
                "m.yaml:14:31: outbound[1].jwt_svid.audience[1] must not be empty",
            ],
        ),
        (
            "JWT-SVIDs need the Workload API",
            config("identity:\n  files: {cert: c.pem, key: k.pem, bundle: b.pem}\n", HOST, "server_id: spiffe://td/api\njwt_svid: {audience: [api]}"),
            vec!["m.yaml:10:5: outbound[0].jwt_svid: JWT-SVIDs come from the Workload API, and identity.files has none"],
        ),
        (
            "unknown keys and modes are named",
            config("", HOST, "server_id: spiffe://td/api\ntls: {mode: plain}"),
            vec!["m.yaml:8:17: outbound[0].tls.mode: unknown variant `plain`, expected `mtls` or `server_only`"],
        ),
        (
            "a bad server_id is still a SPIFFE ID error",
            config("", HOST, "server_id: api"),
            vec!["m.yaml:7:16: outbound[0].server_id: `api` is not a valid SPIFFE ID: scheme is missing or invalid"],
        ),
    ];
    let mut wrong = Vec::new();
    for (what, text, want) in table {
        let got = load(&text).map(|(.., w)| w);
        if got != Err(want.iter().map(|s| s.to_string()).collect()) {
            wrong.push(format!("{what}:\n{text}got {got:#?}"));
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}
