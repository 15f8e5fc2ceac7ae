//! Table tests of the gateway's credential checks: each route kind against each kind of
//! credential a client may send, and the credential files' own errors.

use super::*;

/// The JWT-SVID provider's tables.
mod jwt_svid;
use http::HeaderValue;
use std::time::Duration;

const ISSUER: &str = "https://auth.jia.app";
const KEY: &str = "k-alice";

/// Credentials from files in `dir`, and a function that signs claims with the JWKS key.
fn setup(dir: &Path) -> (Credentials, impl Fn(serde_json::Value) -> String) {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    let p = key.public_key_raw();
    let jwks = p256_jwks(p, "k1").unwrap();
    std::fs::write(dir.join("jwks.json"), jwks).unwrap();
    let hash: String = ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02X}"))
        .collect();
    std::fs::write(
        dir.join("keys.yaml"),
        format!("- {{user: alice-svc, sha256: {hash}}}\n"),
    )
    .unwrap();
    let config = JwtConfig {
        issuer: ISSUER.into(),
        audiences: vec!["api".into()],
        jwks: dir.join("jwks.json"),
        leeway: Duration::from_secs(5),
        user_claim: "sub".into(),
    };
    let creds = Credentials {
        jwt: Some(JwtKeys::load(&config).unwrap()),
        api_keys: Some(ApiKeys::load(&dir.join("keys.yaml")).unwrap()),
        jwt_svid: None,
    };
    let signer = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let sign = move |claims: serde_json::Value| {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &signer).unwrap()
    };
    (creds, sign)
}

fn headers(pairs: &[(&'static str, String)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

/// A route's `auth`, the headers sent, and the user or the start of the error.
type Row = (
    RouteAuth,
    Vec<(&'static str, String)>,
    Result<Option<&'static str>, &'static str>,
);

#[test]
fn each_route_kind_meets_each_credential() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, sign) = setup(dir.path());
    let exp = jsonwebtoken::get_current_timestamp() + 60;
    let good = sign(serde_json::json!({"iss": ISSUER, "aud": "api", "sub": "alice", "exp": exp}));
    let no_sub = sign(serde_json::json!({"iss": ISSUER, "aud": ["x", "api"], "exp": exp}));
    let bearer = ("authorization", format!("Bearer {good}"));
    let key = ("x-api-key", KEY.to_string());
    use RouteAuth::*;
    // (route, headers, the user or the start of the error)
    let table: Vec<Row> = vec![
        (Any, vec![bearer.clone()], Ok(Some("alice"))),
        (Any, vec![key.clone()], Ok(Some("alice-svc"))),
        (Jwt, vec![bearer.clone()], Ok(Some("alice"))),
        (ApiKey, vec![key.clone()], Ok(Some("alice-svc"))),
        (None, vec![], Ok(Option::None)),
        (None, vec![bearer.clone()], Ok(Some("alice"))),
        (
            None,
            vec![("authorization", "Bearer x.y.z".into())],
            Err("invalid token"),
        ),
        (Any, vec![], Err("credentials required")),
        (Jwt, vec![], Err("credentials required (Authorization")),
        (Jwt, vec![key.clone()], Err("this route accepts JWTs only")),
        (
            ApiKey,
            vec![bearer.clone()],
            Err("this route accepts API keys only"),
        ),
        (
            Any,
            vec![("x-api-key", "k-bob".into())],
            Err("unknown API key"),
        ),
        (
            Any,
            vec![("authorization", format!("Bearer {no_sub}"))],
            Err("invalid token: no `sub` claim"),
        ),
        (
            Any,
            vec![("authorization", format!("Basic {good}"))],
            Err("credentials required"),
        ),
    ];
    for (auth, pairs, want) in table {
        let got = authenticate(auth, &creds, &headers(&pairs), Option::None);
        match (got, want) {
            (Ok(user), Ok(w)) => assert_eq!(user.as_deref(), w, "{auth:?} {pairs:?}"),
            (Err(e), Err(w)) => assert!(e.to_string().starts_with(w), "{auth:?}: {e} (want {w})"),
            (got, want) => panic!("{auth:?} {pairs:?}: got {got:?}, want {want:?}"),
        }
    }
}

/// A route's `auth`, the headers sent, the client certificate's user, and the user or
/// the start of the error.
type CertRow = (
    RouteAuth,
    Vec<(&'static str, String)>,
    Option<&'static str>,
    Result<Option<&'static str>, &'static str>,
);

#[test]
fn a_client_certificate_counts_where_the_route_takes_it() {
    let dir = tempfile::tempdir().unwrap();
    let (creds, sign) = setup(dir.path());
    let exp = jsonwebtoken::get_current_timestamp() + 60;
    let good = sign(serde_json::json!({"iss": ISSUER, "aud": "api", "sub": "alice", "exp": exp}));
    let bearer = ("authorization", format!("Bearer {good}"));
    let bad = ("authorization", "Bearer x.y.z".to_string());
    let key = ("x-api-key", KEY.to_string());
    let partner = Some("spiffe://partner.test/billing");
    use RouteAuth::*;
    let table: Vec<CertRow> = vec![
        // mtls: the certificate alone decides.
        (Mtls, vec![], partner, Ok(partner)),
        (Mtls, vec![bearer.clone()], partner, Ok(partner)),
        (
            Mtls,
            vec![],
            Option::None,
            Err("credentials required (a client certificate)"),
        ),
        (
            Mtls,
            vec![key.clone()],
            Option::None,
            Err("this route accepts client certificates only"),
        ),
        // any and none: a certificate when no token or key was sent; a sent one names the caller.
        (Any, vec![], partner, Ok(partner)),
        (Any, vec![bearer.clone()], partner, Ok(Some("alice"))),
        (Any, vec![key.clone()], partner, Ok(Some("alice-svc"))),
        (Any, vec![bad.clone()], partner, Err("invalid token")),
        (None, vec![], partner, Ok(partner)),
        (None, vec![bad], partner, Err("invalid token")),
        // jwt and api_key: their kind only.
        (
            Jwt,
            vec![],
            partner,
            Err("credentials required (Authorization"),
        ),
        (
            ApiKey,
            vec![],
            partner,
            Err("credentials required (x-api-key)"),
        ),
        (Jwt, vec![bearer], partner, Ok(Some("alice"))),
    ];
    for (auth, pairs, cert, want) in table {
        let got = authenticate(auth, &creds, &headers(&pairs), cert);
        match (got, want) {
            (Ok(user), Ok(w)) => assert_eq!(user.as_deref(), w, "{auth:?} {pairs:?} {cert:?}"),
            (Err(e), Err(w)) => assert!(e.to_string().starts_with(w), "{auth:?}: {e} (want {w})"),
            (got, want) => panic!("{auth:?} {pairs:?} {cert:?}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn the_environment_key_sits_beside_the_keys_file() {
    let dir = tempfile::tempdir().unwrap();
    let (mut creds, _) = setup(dir.path());
    let keys = creds.api_keys.as_mut().unwrap();
    keys.add_env_key(&ApiKeyDigest::of("k-from-env"));
    // The same key as the file's: the file's user stays.
    keys.add_env_key(&ApiKeyDigest::of(KEY));
    let table = [
        ("k-from-env", Some(ENV_API_KEY_USER)),
        (KEY, Some("alice-svc")),
        ("k-other", Option::None),
    ];
    for (key, want) in table {
        assert_eq!(creds.api_keys.as_ref().unwrap().user(key), want, "{key}");
    }
    let mut only_env = ApiKeys::default();
    only_env.add_env_key(&ApiKeyDigest::of("k-from-env"));
    assert_eq!(only_env.user("k-from-env"), Some(ENV_API_KEY_USER));
}

#[test]
fn bad_credential_files_are_named_with_the_entry() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let jwt = |text: &str| {
        std::fs::write(d.join("j.json"), text).unwrap();
        let config = JwtConfig {
            issuer: ISSUER.into(),
            audiences: vec!["api".into()],
            jwks: d.join("j.json"),
            leeway: Duration::ZERO,
            user_claim: "sub".into(),
        };
        JwtKeys::load(&config)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(jwt("{").contains("not a JWKS document"));
    assert!(jwt(r#"{"keys":[]}"#).contains("has no keys"));
    assert!(jwt(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#).contains("keys[0]: a symmetric key"));
    let keys = |text: &str| {
        std::fs::write(d.join("k.yaml"), text).unwrap();
        ApiKeys::load(&d.join("k.yaml"))
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default()
    };
    assert!(keys("- {user: a, sha256: abc}\n").contains("[0] (a): sha256 must be 64 hex digits"));
    let h = "ab".repeat(32);
    assert!(keys(&format!(
        "- {{user: a, sha256: {h}}}\n- {{user: b, sha256: {h}}}\n"
    ))
    .contains("[1] (b): the same key is listed twice"));
    assert!(keys("- {user: a, key: plain}\n").contains("unknown field `key`"));
    let missing = ApiKeys::load(&d.join("none.yaml"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        missing.starts_with(&d.join("none.yaml").display().to_string()),
        "{missing}"
    );
}
