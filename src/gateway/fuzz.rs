//! Fuzzed gateway credentials: bearer JWTs (signature, header and claims mutated, algs
//! swapped, HMAC tokens keyed with the public key), JWKS documents, API keys files, the
//! credential headers of a request against each route kind, and the user a client
//! certificate names.
//!
//! Properties: nothing panics or hangs. A JWT authenticates only with the header and
//! payload that were signed and the signature the key made; a token whose header says
//! another alg or kid, or that is HMAC-signed (with any secret, the public key
//! included), never does; a re-signed token authenticates only with the issuer, an
//! audience, an unexpired `exp` and a non-empty user claim. A JWKS that loads holds no
//! symmetric key. A request authenticates only as a user its credentials name (`mtls`
//! routes only by certificate; `none` routes may be anonymous, no other).

use crate::config::{JwtConfig, RouteAuth};
use crate::gateway::auth::{authenticate, base64url, p256_jwks, ApiKeys, Credentials, JwtKeys};
use crate::gateway::client_cert::user_of;
use crate::telemetry::fuzz_budget::{config, mutated, mutated_bytes, watchdog};
use http::{HeaderMap, HeaderValue};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use proptest::prelude::*;
use serde_json::{json, Value};
use std::sync::OnceLock;
use std::time::Duration;

const ISSUER: &str = "https://auth.jia.app";
const KEY: &str = "k-alice";

/// The gateway's credentials from files, the signing key, and the JWKS text.
struct Fixture {
    creds: Credentials,
    signer: EncodingKey,
    jwks: String,
    config: JwtConfig,
    _dir: tempfile::TempDir,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let dir = tempfile::tempdir().expect("a temporary folder");
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
        let jwks = p256_jwks(key.public_key_raw(), "k1").expect("a P-256 point");
        std::fs::write(dir.path().join("jwks.json"), &jwks).expect("jwks written");
        let hash: String = ring::digest::digest(&ring::digest::SHA256, KEY.as_bytes())
            .as_ref()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        let keys = dir.path().join("keys.yaml");
        std::fs::write(&keys, format!("- {{user: alice-svc, sha256: {hash}}}\n")).expect("keys");
        let config = JwtConfig {
            issuer: ISSUER.into(),
            audiences: vec!["api".into()],
            jwks: dir.path().join("jwks.json"),
            leeway: Duration::from_secs(5),
            user_claim: "sub".into(),
        };
        let creds = Credentials {
            jwt: Some(JwtKeys::load(&config).expect("jwks loads")),
            api_keys: Some(ApiKeys::load(&keys).expect("keys load")),
            jwt_svid: None,
        };
        let signer = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).expect("signer");
        Fixture {
            creds,
            signer,
            jwks,
            config,
            _dir: dir,
        }
    })
}

fn sign(header: &Header, claims: &Value) -> String {
    jsonwebtoken::encode(header, claims, &fixture().signer).expect("signed")
}

fn good_header() -> Header {
    let mut h = Header::new(Algorithm::ES256);
    h.kid = Some("k1".into());
    h
}

fn good_claims() -> Value {
    let exp = jsonwebtoken::get_current_timestamp() + 600;
    json!({"iss": ISSUER, "aud": "api", "sub": "alice", "exp": exp})
}

fn verify(token: &str) -> Result<String, String> {
    let jwt = fixture().creds.jwt.as_ref().expect("JWT keys");
    jwt.verify(token).map_err(|e| e.to_string())
}

/// Claims made from the grammar: each claim right, wrong or missing.
fn claims() -> impl Strategy<Value = Value> {
    let now = jsonwebtoken::get_current_timestamp() as i64;
    (
        prop::option::of(prop_oneof![
            Just(json!(ISSUER)),
            Just(json!("https://evil")),
            Just(json!(7))
        ]),
        prop::option::of(prop_oneof![
            Just(json!("api")),
            Just(json!(["x", "api"])),
            Just(json!("other")),
            Just(json!([]))
        ]),
        prop::option::of(prop_oneof![
            Just(json!("alice")),
            Just(json!("")),
            Just(json!(null)),
            Just(json!(5))
        ]),
        prop::option::of(prop_oneof![
            (-100_000i64..100_000).prop_map(move |d| json!(now + d)),
            Just(json!("soon"))
        ]),
        prop::option::of((-100_000i64..100_000).prop_map(move |d| json!(now + d))),
    )
        .prop_map(|(iss, aud, sub, exp, nbf)| {
            let mut m = serde_json::Map::new();
            for (k, v) in [
                ("iss", iss),
                ("aud", aud),
                ("sub", sub),
                ("exp", exp),
                ("nbf", nbf),
            ] {
                if let Some(v) = v {
                    m.insert(k.into(), v);
                }
            }
            Value::Object(m)
        })
}

proptest! {
    #![proptest_config(config(2))]

    #[test]
    fn mutated_tokens_never_authenticate(edits in proptest::collection::vec(crate::telemetry::fuzz_budget::edit(), 1..4), part in 0usize..4) {
        let _w = watchdog("JwtKeys::verify");
        let good = sign(&good_header(), &good_claims());
        let parts: Vec<&str> = good.split('.').collect();
        let token = if part == 3 {
            String::from_utf8_lossy(&crate::telemetry::fuzz_budget::apply(good.as_bytes(), &edits)).into_owned()
        } else {
            let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
            p[part] = String::from_utf8_lossy(&crate::telemetry::fuzz_budget::apply(p[part].as_bytes(), &edits)).into_owned();
            p.join(".")
        };
        if verify(&token).is_ok() {
            let got: Vec<&str> = token.split('.').collect();
            prop_assert_eq!(got.len(), 3);
            prop_assert_eq!(&got[..2], &parts[..2], "a changed header or payload authenticated");
            use base64::Engine;
            let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
            prop_assert_eq!(b64.decode(got[2]).ok(), b64.decode(parts[2]).ok(), "a changed signature authenticated");
        }
    }

    #[test]
    fn headers_with_another_alg_or_kid_never_authenticate(
        alg in prop::sample::select(vec!["none", "HS256", "HS384", "RS256", "ES384", "EdDSA", "PS256", "ES256", "es256", ""]),
        kid in prop::option::of(prop::sample::select(vec!["k1", "k2", "", "../k1"])),
        secret in prop::sample::select(vec![0u8, 1, 2]),
        extra in prop::option::of(prop::sample::select(vec!["jku", "jwk", "x5u", "crit"])),
    ) {
        let _w = watchdog("JwtKeys::verify");
        let f = fixture();
        let mut header = json!({"alg": alg, "typ": "JWT"});
        if let Some(k) = kid { header["kid"] = json!(k); }
        if let Some(x) = extra { header[x] = json!("https://evil/jwks.json"); }
        let head = base64url(header.to_string().as_bytes());
        let body = base64url(good_claims().to_string().as_bytes());
        let signed = format!("{head}.{body}");
        // The signature: the real key's over another header, HMAC with the public key
        // (or the JWKS text) as its secret, or none.
        let sig = match secret {
            0 => sign(&good_header(), &good_claims()).rsplit('.').next().unwrap_or_default().to_string(),
            1 => {
                let k = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, f.jwks.as_bytes());
                base64url(ring::hmac::sign(&k, signed.as_bytes()).as_ref())
            }
            _ => String::new(),
        };
        let token = format!("{signed}.{sig}");
        prop_assert!(verify(&token).is_err(), "header {} authenticated", header);
    }

    #[test]
    fn resigned_claims_authenticate_only_when_right(claims in claims()) {
        let _w = watchdog("JwtKeys::verify");
        let token = sign(&good_header(), &claims);
        if let Ok(user) = verify(&token) {
            let now = jsonwebtoken::get_current_timestamp() as i64;
            prop_assert_eq!(&claims["iss"], &json!(ISSUER));
            let aud = &claims["aud"];
            prop_assert!(aud == &json!("api") || aud.as_array().is_some_and(|a| a.contains(&json!("api"))));
            prop_assert!(claims["exp"].as_i64().is_some_and(|e| e + 5 >= now), "{}", claims);
            prop_assert!(claims.get("nbf").is_none_or(|n| n.as_i64().is_some_and(|n| n - 5 <= now)), "{}", claims);
            prop_assert_eq!(Some(user.as_str()), claims["sub"].as_str());
            prop_assert!(!user.is_empty());
        }
    }

    #[test]
    fn jwks_documents_never_load_a_symmetric_key(
        text in mutated(&[
            &fixture().jwks,
            r#"{"keys":[{"kty":"oct","k":"c2VjcmV0","alg":"HS256","kid":"k1"}]}"#,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo","kid":"e"}]}"#,
            r#"{"keys":[{"kty":"RSA","n":"sXch","e":"AQAB","alg":"RS256"}]}"#,
            r#"{"keys":[]}"#,
        ]),
    ) {
        let _w = watchdog("JwtKeys::load");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let mut config = fixture().config.clone();
        config.jwks = dir.path().join("jwks.json");
        std::fs::write(&config.jwks, &text).expect("jwks written");
        if let Ok(keys) = JwtKeys::load(&config) {
            let claims = good_claims();
            for (alg, secret) in [(Algorithm::HS256, "c2VjcmV0"), (Algorithm::HS256, "secret")] {
                let mut h = Header::new(alg);
                h.kid = Some("k1".into());
                let token = jsonwebtoken::encode(&h, &claims, &EncodingKey::from_secret(secret.as_bytes())).expect("signed");
                prop_assert!(keys.verify(&token).is_err(), "an HMAC token verified with {}", text);
            }
        }
    }

    #[test]
    fn api_keys_files_never_panic(
        text in mutated(&[
            "- {user: alice-svc, sha256: 6f0e3b1c9b2f7a4d8e5c6b7a8f9d0e1f2a3b4c5d6e7f8091a2b3c4d5e6f70819}\n",
            "- user: a\n  sha256: 6F0E3B1C9B2F7A4D8E5C6B7A8F9D0E1F2A3B4C5D6E7F8091A2B3C4D5E6F70819\n- user: b\n  sha256: 00\n",
        ]),
    ) {
        let _w = watchdog("ApiKeys::load");
        let dir = tempfile::tempdir().expect("a temporary folder");
        let path = dir.path().join("keys.yaml");
        std::fs::write(&path, &text).expect("keys written");
        if let Ok(keys) = ApiKeys::load(&path) {
            prop_assert!(keys.user("").is_none() || text.contains("e3b0c442"));
        }
    }

    #[test]
    fn requests_authenticate_only_as_their_credentials_say(
        auth in prop::sample::select(vec![RouteAuth::Any, RouteAuth::Jwt, RouteAuth::JwtSvid, RouteAuth::ApiKey, RouteAuth::Mtls, RouteAuth::None]),
        bearer in prop::option::of(mutated(&["Bearer x", "bearer  y ", "Basic eA=="])),
        good_bearer in any::<bool>(),
        api_key in prop::option::of(mutated_bytes(vec![KEY.as_bytes().to_vec(), b"k-\xff".to_vec()])),
        cert_user in prop::option::of(Just("spiffe://partner.example/app")),
    ) {
        let _w = watchdog("authenticate");
        let mut headers = HeaderMap::new();
        let token = sign(&good_header(), &good_claims());
        let bearer = if good_bearer { Some(format!("Bearer {token}")) } else { bearer };
        if let Some(b) = &bearer {
            if let Ok(v) = HeaderValue::from_str(b) { headers.insert(http::header::AUTHORIZATION, v); }
        }
        if let Some(k) = &api_key {
            if let Ok(v) = HeaderValue::from_bytes(k) { headers.insert("x-api-key", v); }
        }
        match authenticate(auth, &fixture().creds, &headers, cert_user) {
            Ok(None) => prop_assert_eq!(auth, RouteAuth::None),
            Ok(Some(user)) => {
                let ok = ["alice", "alice-svc"].contains(&user.as_str()) || Some(user.as_str()) == cert_user;
                prop_assert!(ok, "authenticated as {}", user);
                if auth == RouteAuth::Mtls {
                    prop_assert_eq!(Some(user.as_str()), cert_user);
                }
            }
            Err(_) => {}
        }
    }

    #[test]
    fn client_certificates_name_a_user_without_panic(
        der in mutated_bytes(vec![crate::identity::fuzz::pki().leaf.clone(), crate::identity::fuzz::pki().root.clone()]),
    ) {
        let _w = watchdog("user_of");
        if let Some(user) = user_of(&der) {
            prop_assert!(!user.is_empty());
        }
    }
}

#[test]
fn the_fixture_token_authenticates() {
    assert_eq!(
        verify(&sign(&good_header(), &good_claims())),
        Ok("alice".into())
    );
}
