//! Table tests of the gateway's second bearer provider, JWT-SVIDs of machine clients: each
//! route kind against end-user JWTs and JWT-SVIDs, good and broken, with both providers
//! configured, so that neither provider's keys ever pass the other's tokens; the trust
//! domain limit; and a gateway without JWT bundles yet.

use crate::config::parse_spiffe_id;
use crate::dev_ca::DevCa;
use crate::gateway::auth::*;
use crate::identity::{JwtBundlesStatus, JwtStreamState};
use http::HeaderValue;
use std::time::Duration;
use tokio::sync::watch;

const ISSUER: &str = "https://auth.jia.app";
const AUDIENCE: &str = "api.jia.app";
const BILLING: &str = "spiffe://jia.app/billing";
const PARTNER: &str = "spiffe://partner.example/ledger";

/// The dev CA of jia.app (trusting partner.example's JWT keys), partner.example's CA,
/// and the end-user issuer's signing key with its JWKS in `dir`.
struct Keys {
    ca: DevCa,
    partner: DevCa,
    end_user: jsonwebtoken::EncodingKey,
    jwt: JwtConfig,
}

fn keys(dir: &Path) -> Keys {
    let ca = DevCa::new("jia.app").unwrap();
    let partner = DevCa::new("partner.example").unwrap();
    ca.set_federated_jwt("partner.example", partner.jwt_bundle());
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
    std::fs::write(
        dir.join("jwks.json"),
        p256_jwks(key.public_key_raw(), "k1").unwrap(),
    )
    .unwrap();
    let end_user = jsonwebtoken::EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
    let jwt = JwtConfig {
        issuer: ISSUER.into(),
        audiences: vec!["api".into()],
        jwks: dir.join("jwks.json"),
        leeway: Duration::from_secs(5),
        user_claim: "sub".into(),
    };
    Keys {
        ca,
        partner,
        end_user,
        jwt,
    }
}

/// Credentials with the JWKS (when `end_users`) and a JWT-SVID verifier for `AUDIENCE`
/// accepting `domains`, over `status`.
fn creds(k: &Keys, end_users: bool, domains: &[&str], status: JwtBundlesStatus) -> Credentials {
    let domains = domains.iter().map(|d| d.to_string()).collect();
    let verifier = JwtSvidVerifier::new(AUDIENCE.into(), domains, watch::channel(status).1);
    Credentials {
        jwt: end_users.then(|| JwtKeys::load(&k.jwt).unwrap()),
        api_keys: None,
        jwt_svid: Some(Arc::new(verifier)),
    }
}

fn following(ca: &DevCa) -> JwtBundlesStatus {
    JwtBundlesStatus {
        bundles: Some(Arc::new(ca.jwt_bundles())),
        state: JwtStreamState::Following,
        generation: 1,
    }
}

fn bearer(token: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
    h.insert(http::header::AUTHORIZATION, value);
    h
}

fn now() -> u64 {
    jsonwebtoken::get_current_timestamp()
}

#[test]
fn each_provider_checks_only_its_own_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let both = creds(&k, true, &[], following(&k.ca));
    let billing = parse_spiffe_id(BILLING).unwrap();
    let ttl = Duration::from_secs(60);
    let svid =
        k.ca.sign_jwt_svid(&billing, &[AUDIENCE.into()], ttl)
            .unwrap();
    let other_aud =
        k.ca.sign_jwt_svid(&billing, &["contacts".into()], ttl)
            .unwrap();
    let std_header = serde_json::json!({"alg": "ES256", "kid": k.ca.jwt_key_id(), "typ": "JWT"});
    let expired =
        k.ca.sign_jwt_custom(
            &std_header,
            &serde_json::json!({"sub": BILLING, "aud": AUDIENCE, "exp": now() - 60}),
        )
        .unwrap();
    // jia.app's subject signed by partner.example's key: trusted domain, wrong key.
    let cross = k
        .partner
        .sign_jwt_custom(
            &serde_json::json!({"alg": "ES256", "kid": k.partner.jwt_key_id()}),
            &serde_json::json!({"sub": BILLING, "aud": AUDIENCE, "exp": now() + 60}),
        )
        .unwrap();
    let sign_end_user = |claims: serde_json::Value| {
        let mut h = jsonwebtoken::Header::new(Algorithm::ES256);
        h.kid = Some("k1".into());
        jsonwebtoken::encode(&h, &claims, &k.end_user).unwrap()
    };
    let alice = sign_end_user(
        serde_json::json!({"iss": ISSUER, "aud": "api", "sub": "alice", "exp": now() + 60}),
    );
    // A JWT-SVID's claims signed by the end-user issuer's key: the JWT bundles decide,
    // and they do not hold that key.
    let forged_svid =
        sign_end_user(serde_json::json!({"sub": BILLING, "aud": AUDIENCE, "exp": now() + 60}));
    // An end-user token (the issuer's `iss`) signed by the JWT authority: the JWKS decides.
    let forged_user = k
        .ca
        .sign_jwt_custom(
            &std_header,
            &serde_json::json!({"iss": ISSUER, "sub": BILLING, "aud": ["api", AUDIENCE], "exp": now() + 60}),
        )
        .unwrap();
    use RouteAuth::*;
    let table: &[(RouteAuth, &str, Result<&str, &str>)] = &[
        (JwtSvid, &svid, Ok(BILLING)),
        (Any, &svid, Ok(BILLING)),
        (None, &svid, Ok(BILLING)),
        (Any, &alice, Ok("alice")),
        (Jwt, &alice, Ok("alice")),
        (JwtSvid, &alice, Err("this route accepts JWT-SVIDs only")),
        (Jwt, &svid, Err("this route accepts end-user JWTs only")),
        (
            JwtSvid,
            &other_aud,
            Err("JWT-SVID refused: audience [\"contacts\"] does not contain `api.jia.app`"),
        ),
        (JwtSvid, &expired, Err("JWT-SVID refused: token expired")),
        (Any, &cross, Err("JWT-SVID refused: no key `")),
        (
            Any,
            &forged_svid,
            Err("JWT-SVID refused: no key `k1` for ES256"),
        ),
        (
            JwtSvid,
            &forged_svid,
            Err("JWT-SVID refused: no key `k1` for ES256"),
        ),
        (Any, &forged_user, Err("invalid token: no key of the JWKS")),
        (
            JwtSvid,
            &forged_user,
            Err("this route accepts JWT-SVIDs only"),
        ),
        (JwtSvid, "x.y.z", Err("JWT-SVID refused: malformed token")),
    ];
    for (auth, token, want) in table {
        let got = authenticate(*auth, &both, &bearer(token), Option::None);
        match (got, want) {
            (Ok(user), Ok(w)) => assert_eq!(user.as_deref(), Some(*w), "{auth:?}"),
            (Err(e), Err(w)) => assert!(e.to_string().starts_with(w), "{auth:?}: {e} (want {w})"),
            (got, want) => panic!("{auth:?}: got {got:?}, want {want:?}"),
        }
    }
    // No credentials, or an API key, on a jwt_svid route: the kind it asks for.
    let none = authenticate(JwtSvid, &both, &HeaderMap::new(), Some("spiffe://x/cert"));
    let text = none.unwrap_err().to_string();
    assert_eq!(
        text,
        "credentials required (Authorization: Bearer <JWT-SVID>)"
    );
    let mut key = HeaderMap::new();
    key.insert("x-api-key", HeaderValue::from_static("k"));
    let err = authenticate(JwtSvid, &both, &key, Option::None).unwrap_err();
    assert_eq!(err.to_string(), "this route accepts JWT-SVIDs only");
}

#[test]
fn the_only_bearer_provider_takes_every_token() {
    // Without gateway.jwt, a token whatever its subject is a JWT-SVID; without
    // gateway.jwt_svid, one with a SPIFFE subject is an end-user JWT as before.
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let alone = creds(&k, false, &[], following(&k.ca));
    let billing = parse_spiffe_id(BILLING).unwrap();
    let svid =
        k.ca.sign_jwt_svid(&billing, &[AUDIENCE.into()], Duration::from_secs(60))
            .unwrap();
    assert_eq!(provider_of(&svid, &alone), Provider::JwtSvid);
    assert_eq!(provider_of("not.a.jwt", &alone), Provider::JwtSvid);
    let user = authenticate(RouteAuth::Any, &alone, &bearer(&svid), Option::None).unwrap();
    assert_eq!(user.as_deref(), Some(BILLING));
    let err = authenticate(RouteAuth::Any, &alone, &bearer("x.y.z"), Option::None).unwrap_err();
    assert!(
        err.to_string().starts_with("JWT-SVID refused: malformed"),
        "{err}"
    );
    let end_users_only = Credentials {
        jwt_svid: Option::None,
        ..creds(&k, true, &[], following(&k.ca))
    };
    assert_eq!(provider_of(&svid, &end_users_only), Provider::EndUser);
    let err = authenticate(
        RouteAuth::Any,
        &end_users_only,
        &bearer(&svid),
        Option::None,
    );
    assert!(err.unwrap_err().to_string().starts_with("invalid token"));
}

#[test]
fn trust_domains_limit_whose_tokens_pass_and_missing_bundles_fail_closed() {
    let dir = tempfile::tempdir().unwrap();
    let k = keys(dir.path());
    let partner = parse_spiffe_id(PARTNER).unwrap();
    let token = k
        .partner
        .sign_jwt_svid(&partner, &[AUDIENCE.into()], Duration::from_secs(60))
        .unwrap();
    let table: &[(&[&str], Result<&str, &str>)] = &[
        (&[], Ok(PARTNER)),
        (&["jia.app", "partner.example"], Ok(PARTNER)),
        (
            &["jia.app"],
            Err("JWT-SVID refused: trust domain partner.example is not accepted here"),
        ),
    ];
    for (domains, want) in table {
        let c = creds(&k, false, domains, following(&k.ca));
        let got = authenticate(RouteAuth::JwtSvid, &c, &bearer(&token), Option::None);
        match (got, want) {
            (Ok(user), Ok(w)) => assert_eq!(user.as_deref(), Some(*w), "{domains:?}"),
            (Err(e), Err(w)) => assert_eq!(e.to_string(), *w, "{domains:?}"),
            (got, want) => panic!("{domains:?}: got {got:?}, want {want:?}"),
        }
    }
    let waiting = creds(&k, false, &[], JwtBundlesStatus::waiting());
    let err = authenticate(RouteAuth::JwtSvid, &waiting, &bearer(&token), Option::None);
    assert_eq!(
        err.unwrap_err().to_string(),
        "JWT-SVID cannot be checked: no JWT bundles yet (waiting for the first JWT bundles)"
    );
}
