//! Table tests of the design's gateway variables: what each one overrides, how a bad
//! value is reported, and that the API key never shows.

use super::parse_bool;
use crate::config::{ApiKeyDigest, ClientAuth, Config, ConfigErrors, ConfigProblem, Env};
use std::path::Path;
use std::time::Duration;

const GATEWAY: &str = "service: api-gateway\noutbound:\n  - name: p\n    endpoints: [\"127.0.0.1:1\"]\n    server_id: spiffe://td/p\ngateway:\n  tls: {cert: c.pem, key: k.pem}\n  api_keys: keys.yaml\n  routes:\n    - {name: r, prefix: /, upstream: p}\n";

/// Environment pairs and the problems they must produce.
type EnvCase<'a> = (&'a [(&'a str, &'a str)], &'a [&'a str]);

fn load(text: &str, pairs: &[(&str, &str)]) -> Result<(Config, Vec<ConfigProblem>), ConfigErrors> {
    let env: Env = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Config::from_text(Path::new("m.yaml"), text, &env)
}

fn problems(text: &str, pairs: &[(&str, &str)]) -> Vec<String> {
    match load(text, pairs) {
        Ok((_, warnings)) => warnings.iter().map(ToString::to_string).collect(),
        Err(errors) => errors.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn yes_and_no_as_environments_write_them() {
    let table = [
        ("true", Ok(true)),
        ("1", Ok(true)),
        ("TRUE", Ok(true)),
        ("yes", Ok(true)),
        ("on", Ok(true)),
        ("false", Ok(false)),
        ("0", Ok(false)),
        ("No", Ok(false)),
        ("off", Ok(false)),
        ("maybe", Err("expected true or false")),
        ("", Err("expected true or false")),
    ];
    for (text, want) in table {
        let got = parse_bool(text).map_err(|e| e.to_string());
        assert_eq!(got, want.map_err(String::from), "{text}");
    }
}

#[test]
fn the_gateway_variables_override_the_gateway_section() {
    let pairs = [
        ("API_GATEWAY_ADDRESS", "127.0.0.1:9443"),
        ("API_GATEWAY_KEY", "k-from-env"),
        ("API_GATEWAY_ENABLE_TLS", "true"),
        ("GATEWAY_CERT_FILE", "/etc/gw/tls.crt"),
        ("GATEWAY_KEY_FILE", "/etc/gw/tls.key"),
        ("GATEWAY_CA_FILE", "/etc/gw/partners-ca.pem"),
    ];
    let (config, warnings) = load(GATEWAY, &pairs).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let g = config.gateway.unwrap();
    assert_eq!(g.listen, "127.0.0.1:9443".parse().unwrap());
    assert_eq!(g.env_api_key, Some(ApiKeyDigest::of("k-from-env")));
    assert_eq!(g.tls.cert, Path::new("/etc/gw/tls.crt"));
    assert_eq!(g.tls.key, Path::new("/etc/gw/tls.key"));
    assert_eq!(
        g.tls.client_ca.as_deref(),
        Some(Path::new("/etc/gw/partners-ca.pem"))
    );
    assert_eq!(g.tls.client_auth(), Some(ClientAuth::Optional));
    assert_eq!(g.routes[0].connect_timeout, Duration::from_secs(30));
    assert_eq!(g.routes[0].request_timeout, Duration::from_secs(30));
    // Without variables: the file's values, no client certificates, no env key.
    let (config, _) = load(GATEWAY, &[]).unwrap();
    let g = config.gateway.unwrap();
    assert_eq!(g.listen, "0.0.0.0:8080".parse().unwrap());
    assert_eq!((g.env_api_key, g.tls.client_auth()), (None, None));
}

#[test]
fn the_environment_key_never_shows() {
    let key = "k-very-secret-1234";
    let (config, _) = load(GATEWAY, &[("API_GATEWAY_KEY", key)]).unwrap();
    let hex: String = ApiKeyDigest::of(key)
        .0
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let shown = [
        config.redacted().to_string(),
        serde_json::to_string(&config).unwrap(),
        format!("{config:?}"),
    ];
    for text in shown {
        assert!(!text.contains(key) && !text.contains(&hex), "{text}");
    }
    assert_eq!(config.redacted()["gateway"]["api_key"], "<redacted>");
    // The file cannot set it.
    let file = GATEWAY.replace("  api_keys: keys.yaml\n", "  api_key: k\n");
    assert!(problems(&file, &[])[0].contains("unknown field `api_key`"));
}

#[test]
fn bad_gateway_variables_name_the_variable_and_value() {
    let table: &[EnvCase] = &[
        (&[("API_GATEWAY_ADDRESS", "api-gateway:8080")], &["env:API_GATEWAY_ADDRESS: environment variable API_GATEWAY_ADDRESS=`api-gateway:8080`: invalid socket address syntax"]),
        (&[("API_GATEWAY_ENABLE_TLS", "false")], &["env:API_GATEWAY_ENABLE_TLS: API_GATEWAY_ENABLE_TLS=`false`: the gateway serves HTTPS only (there is no plaintext edge); unset it or set it to true"]),
        (&[("API_GATEWAY_ENABLE_TLS", "0")], &["env:API_GATEWAY_ENABLE_TLS: API_GATEWAY_ENABLE_TLS=`0`: the gateway serves HTTPS only (there is no plaintext edge); unset it or set it to true"]),
        (&[("API_GATEWAY_ENABLE_TLS", "maybe")], &["env:API_GATEWAY_ENABLE_TLS: environment variable API_GATEWAY_ENABLE_TLS=`maybe`: expected true or false"]),
        (&[("API_GATEWAY_ENABLE_TLS", "1")], &[]),
        // The moved listener is checked like the file's.
        (&[("API_GATEWAY_ADDRESS", "127.0.0.1:15000")], &["m.yaml: admin.listen: 127.0.0.1:15000 collides with gateway.listen (127.0.0.1:15000)"]),
    ];
    for (pairs, want) in table {
        assert_eq!(problems(GATEWAY, pairs), want.to_vec(), "{pairs:?}");
    }
    // Without a gateway section the variables have nothing to set: a warning each.
    let sidecar = "service: s\n";
    assert_eq!(
        problems(sidecar, &[("API_GATEWAY_KEY", "k"), ("GATEWAY_CA_FILE", "/ca.pem")]),
        [
            "env:API_GATEWAY_KEY: warning: API_GATEWAY_KEY is set but the config has no gateway section: ignored",
            "env:GATEWAY_CA_FILE: warning: GATEWAY_CA_FILE is set but the config has no gateway section: ignored",
        ]
    );
}

#[test]
fn client_certificates_and_timeouts_are_checked() {
    let with = |route: &str, tls: &str| {
        GATEWAY
            .replace("{cert: c.pem, key: k.pem}", tls)
            .replace("{name: r, prefix: /, upstream: p}", route)
    };
    let plain_tls = "{cert: c.pem, key: k.pem}";
    let mtls_tls = "{cert: c.pem, key: k.pem, client_ca: ca.pem, client_auth: required}";
    let table: Vec<(String, EnvCase)> = vec![
        (with("{name: r, prefix: /, upstream: p, auth: mtls}", plain_tls), (&[], &["m.yaml:10:47: gateway.routes[0].auth needs gateway.tls.client_ca to be configured"])),
        (with("{name: r, prefix: /, upstream: p, auth: mtls}", mtls_tls), (&[], &[])),
        // GATEWAY_CA_FILE gives the CA an mtls route needs.
        (with("{name: r, prefix: /, upstream: p, auth: mtls}", plain_tls), (&[("GATEWAY_CA_FILE", "/ca.pem")], &[])),
        (with("{name: r, prefix: /, upstream: p}", "{cert: c.pem, key: k.pem, client_auth: required}"), (&[], &["m.yaml:7:47: gateway.tls.client_auth needs gateway.tls.client_ca to be configured"])),
        (with("{name: r, prefix: /, upstream: p, request_timeout: 0s, connect_timeout: 2s}", plain_tls), (&[], &["m.yaml:10:58: gateway.routes[0].request_timeout must be greater than 0"])),
        (with("{name: r, prefix: /, upstream: p, connect_timeout: 5}", plain_tls), (&[], &["m.yaml:10:58: gateway.routes[0].connect_timeout: duration `5` needs a unit: ms, s, m or h"])),
    ];
    for (text, (pairs, want)) in table {
        assert_eq!(problems(&text, pairs), want.to_vec(), "{text}");
    }
    // An api_key route without a keys file is fine when API_GATEWAY_KEY gives a key.
    let only_env = with(
        "{name: r, prefix: /, upstream: p, auth: api_key}",
        plain_tls,
    )
    .replace("  api_keys: keys.yaml\n", "");
    assert_eq!(
        problems(&only_env, &[]),
        ["m.yaml:9:47: gateway.routes[0].auth needs gateway.api_keys to be configured"]
    );
    assert!(problems(&only_env, &[("API_GATEWAY_KEY", "k")]).is_empty());
}
