//! Table tests of the JWT side of identity: every rule of the JWT-SVID standard broken
//! once and refused with its reason, the JWT bundle (JWK Set) reader, and which Workload
//! API errors are retried.

use super::*;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::json;
use spiffe::transport::{GrpcStatusCode, TransportError};
use spiffe::WorkloadApiError;
use std::sync::Arc;

/// A P-256 signing key and its public JWK half.
struct Signer {
    pair: EcdsaKeyPair,
    key: JwtKey,
}

fn signer(kid: &str) -> Signer {
    let rng = SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let key = JwtKey::p256(kid, pair.public_key().as_ref());
    Signer { pair, key }
}

fn sign(s: &Signer, header: &Value, claims: &Value) -> String {
    let part = |v: &Value| B64.encode(serde_json::to_vec(v).unwrap());
    let signed = format!("{}.{}", part(header), part(claims));
    let sig = s
        .pair
        .sign(&SystemRandom::new(), signed.as_bytes())
        .unwrap();
    format!("{signed}.{}", B64.encode(sig.as_ref()))
}

fn now_s() -> u64 {
    crate::identity::unix_seconds(SystemTime::now())
}

fn bundles(own: &Signer, other: &Signer) -> JwtBundles {
    let mut b = JwtBundles::default();
    let one = |s: &Signer| JwtBundle {
        keys: [(s.key.kid.clone(), s.key.clone())].into(),
    };
    b.domains.insert("jia.app".into(), one(own));
    b.domains.insert("other.td".into(), one(other));
    b
}

#[test]
fn every_broken_rule_is_refused_with_its_reason() {
    // A validator for audience `documents` sees one good token and then each rule of the
    // JWT-SVID standard broken once; each refusal names its own reason.
    let own = signer("k-own");
    let other = signer("k-other");
    let set = bundles(&own, &other);
    let exp = now_s() + 60;
    let header = json!({"alg": "ES256", "kid": "k-own", "typ": "JWT"});
    let claims = json!({"sub": "spiffe://jia.app/payment", "aud": ["documents"], "exp": exp});
    let with = |base: &Value, key: &str, v: Value| {
        let mut out = base.clone();
        if v.is_null() {
            out.as_object_mut().unwrap().remove(key);
        } else {
            out[key] = v;
        }
        out
    };
    let good = sign(&own, &header, &claims);
    let tampered = {
        let forged = sign(
            &own,
            &header,
            &with(&claims, "sub", json!("spiffe://jia.app/admin")),
        );
        let mut p: Vec<&str> = forged.split('.').collect();
        p[2] = good.split('.').nth(2).unwrap();
        p.join(".")
    };
    let unsigned = |alg: &str| {
        let h = B64.encode(serde_json::to_vec(&json!({"alg": alg, "kid": "k-own"})).unwrap());
        let c = B64.encode(serde_json::to_vec(&claims).unwrap());
        format!("{h}.{c}.")
    };
    let table: Vec<(&str, String, Option<&str>)> = vec![
        ("standard token", good.clone(), None),
        (
            "typ JOSE",
            sign(&own, &with(&header, "typ", json!("JOSE")), &claims),
            None,
        ),
        (
            "no typ",
            sign(&own, &with(&header, "typ", Value::Null), &claims),
            None,
        ),
        (
            "no kid: the domain's keys are tried",
            sign(&own, &with(&header, "kid", Value::Null), &claims),
            None,
        ),
        (
            "aud as one string",
            sign(&own, &header, &with(&claims, "aud", json!("documents"))),
            None,
        ),
        (
            "wrong audience",
            sign(&own, &header, &with(&claims, "aud", json!(["contacts"]))),
            Some("audience"),
        ),
        (
            "no audience",
            sign(&own, &header, &with(&claims, "aud", Value::Null)),
            Some("audience"),
        ),
        (
            "expired",
            sign(&own, &header, &with(&claims, "exp", json!(now_s() - 5))),
            Some("expired"),
        ),
        (
            "no exp",
            sign(&own, &header, &with(&claims, "exp", Value::Null)),
            Some("expired"),
        ),
        (
            "nbf in the future",
            sign(&own, &header, &with(&claims, "nbf", json!(now_s() + 30))),
            Some("not_yet_valid"),
        ),
        ("alg none", unsigned("none"), Some("algorithm")),
        ("alg HS256", unsigned("HS256"), Some("algorithm")),
        (
            "alg ES512 (allowed, not in ring)",
            unsigned("ES512"),
            Some("algorithm"),
        ),
        (
            "alg RS256 with an EC key",
            sign(&own, &with(&header, "alg", json!("RS256")), &claims),
            Some("unknown_key"),
        ),
        (
            "typ at+jwt",
            sign(&own, &with(&header, "typ", json!("at+jwt")), &claims),
            Some("typ"),
        ),
        (
            "extra header jku",
            sign(&own, &with(&header, "jku", json!("https://evil")), &claims),
            Some("header_field"),
        ),
        (
            "extra private header",
            sign(&own, &with(&header, "x-meshd", json!(1)), &claims),
            Some("header_field"),
        ),
        (
            "sub not a SPIFFE ID",
            sign(
                &own,
                &header,
                &with(&claims, "sub", json!("https://jia.app/a")),
            ),
            Some("subject"),
        ),
        (
            "no sub",
            sign(&own, &header, &with(&claims, "sub", Value::Null)),
            Some("subject"),
        ),
        (
            "sub of an untrusted domain",
            sign(
                &own,
                &header,
                &with(&claims, "sub", json!("spiffe://third.td/a")),
            ),
            Some("no_bundle"),
        ),
        (
            "signed with other.td's key for a jia.app subject",
            sign(&other, &with(&header, "kid", json!("k-other")), &claims),
            Some("unknown_key"),
        ),
        (
            "unknown kid",
            sign(&own, &with(&header, "kid", json!("k-gone")), &claims),
            Some("unknown_key"),
        ),
        ("payload changed after signing", tampered, Some("signature")),
        ("two parts", "a.b".into(), Some("malformed")),
        ("not base64", "!!.??.**".into(), Some("malformed")),
        (
            "far too long",
            "a".repeat(MAX_TOKEN_LEN + 1),
            Some("malformed"),
        ),
    ];
    for (case, token, want) in table {
        let got = validate_jwt_svid(&token, "documents", &set, SystemTime::now());
        match (want, got) {
            (None, Ok(v)) => {
                assert_eq!(v.id.to_string(), "spiffe://jia.app/payment", "{case}");
                assert_eq!(v.key_id, "k-own", "{case}");
            }
            (Some(label), Err(e)) => {
                assert_eq!(e.label(), label, "{case}: {e}");
                let sig = token.rsplit('.').next().unwrap_or("");
                let quoted = sig.len() > 8 && e.to_string().contains(sig);
                assert!(!quoted, "{case}: the reason quotes the token");
            }
            (want, got) => panic!("{case}: wanted {want:?}, got {got:?}"),
        }
    }
}

#[test]
fn other_domain_tokens_use_their_own_bundle() {
    // A federated caller's token verifies with its own domain's key, not ours.
    let own = signer("k-own");
    let other = signer("k-other");
    let token = sign(
        &other,
        &json!({"alg": "ES256", "kid": "k-other"}),
        &json!({"sub": "spiffe://other.td/billing", "aud": "documents", "exp": now_s() + 60}),
    );
    let v = validate_jwt_svid(
        &token,
        "documents",
        &bundles(&own, &other),
        SystemTime::now(),
    );
    assert_eq!(v.unwrap().id.to_string(), "spiffe://other.td/billing");
}

#[test]
fn jwks_are_read_by_the_standard() {
    // JWK Sets as SPIRE and others send them: JWT-SVID keys kept, others left out, broken
    // ones refused with the trust domain and key named.
    let s = signer("k1");
    let ec = s.key.to_jwk();
    /// The key IDs kept, or a part of the error.
    type Want = Result<Vec<&'static str>, &'static str>;
    let table: Vec<(&str, Value, Want)> = vec![
        ("one EC key", json!({"keys": [ec.clone()]}), Ok(vec!["k1"])),
        (
            "use omitted (SPIRE)",
            json!({"keys": [with_field(&ec, "use", Value::Null)]}),
            Ok(vec!["k1"]),
        ),
        (
            "an X.509 key is left out",
            json!({"keys": [with_field(&ec, "use", json!("x509-svid"))]}),
            Ok(vec![]),
        ),
        (
            "an HMAC key is left out",
            json!({"keys": [{"kty": "oct", "kid": "h", "k": "c2VjcmV0"}]}),
            Ok(vec![]),
        ),
        (
            "an RSA key",
            json!({"keys": [{"kty": "RSA", "kid": "r1", "n": "AQAB", "e": "AQAB"}]}),
            Ok(vec!["r1"]),
        ),
        (
            "no kid",
            json!({"keys": [with_field(&ec, "kid", Value::Null)]}),
            Err("has no kid"),
        ),
        (
            "short coordinate",
            json!({"keys": [with_field(&ec, "x", json!("AQAB"))]}),
            Err("coordinates must be 32 bytes"),
        ),
        (
            "no keys array",
            json!({"kty": "EC"}),
            Err("no `keys` array"),
        ),
    ];
    for (case, doc, want) in table {
        let got = JwtBundle::from_jwks("jia.app", &serde_json::to_vec(&doc).unwrap());
        match (want, got) {
            (Ok(kids), Ok(b)) => assert_eq!(b.key_ids(), kids, "{case}"),
            (Err(text), Err(e)) => {
                let e = e.to_string();
                assert!(e.contains(text) && e.contains("jia.app"), "{case}: {e}");
            }
            (want, got) => panic!("{case}: wanted {want:?}, got {got:?}"),
        }
    }
    let bundle = JwtBundle::from_jwks(
        "jia.app",
        &serde_json::to_vec(&json!({"keys": [ec]})).unwrap(),
    )
    .unwrap();
    let again = JwtBundle::from_jwks("jia.app", &bundle.to_jwks()).unwrap();
    assert_eq!(again, bundle, "a bundle survives its own JWK Set");
    let jwks: Value = serde_json::from_slice(&bundle.to_jwks()).unwrap();
    assert_eq!(jwks["keys"][0]["use"], "jwt-svid");
    assert_eq!(jwks["keys"][0]["crv"], "P-256");
}

fn with_field(v: &Value, key: &str, new: Value) -> Value {
    let mut out = v.clone();
    if new.is_null() {
        out.as_object_mut().unwrap().remove(key);
    } else {
        out[key] = new;
    }
    out
}

#[test]
fn workload_api_errors_decide_retries() {
    // The Workload Endpoint standard: InvalidArgument and Unimplemented are reported, not
    // retried; Unavailable, PermissionDenied and an unreachable agent are retried.
    let status = |code| WorkloadApiError::Transport(TransportError::status(code, "x"));
    let table = [
        (
            status(GrpcStatusCode::InvalidArgument),
            RetryDecision::Report,
        ),
        (status(GrpcStatusCode::Unimplemented), RetryDecision::Report),
        (status(GrpcStatusCode::Unavailable), RetryDecision::BackOff),
        (status(GrpcStatusCode::Internal), RetryDecision::BackOff),
        (
            WorkloadApiError::PermissionDenied("nope".into()),
            RetryDecision::BackOff,
        ),
        (WorkloadApiError::NoIdentityIssued, RetryDecision::BackOff),
        (
            WorkloadApiError::Transport(TransportError::connect(std::io::Error::other("refused"))),
            RetryDecision::BackOff,
        ),
        (WorkloadApiError::EmptyResponse, RetryDecision::Report),
    ];
    for (e, want) in table {
        assert_eq!(retry_decision(&e), want, "{e}");
    }
}

// Story: payment's sidecar holds a cached JWT-SVID for `documents`, fresh for minutes yet.
// SPIRE revokes the authority that signed it: the key leaves jia.app's JWT bundle, and
// every validator now refuses the token. The sidecar stops handing it out at once (here the
// agent is unreachable, so the call fails closed instead of sending a token that cannot
// pass); while the key is still in the bundle, the cached token serves.
#[tokio::test]
async fn a_cached_token_whose_key_left_the_bundle_is_not_handed_out() {
    let old = signer("old-key");
    let new = signer("new-key");
    let claims =
        json!({"sub": "spiffe://jia.app/payment", "aud": ["documents"], "exp": now_s() + 600});
    let token = sign(
        &old,
        &json!({"alg": "ES256", "kid": "old-key", "typ": "JWT"}),
        &claims,
    );
    let svid = spiffe::JwtSvid::parse_insecure(&token).unwrap();
    let status = |signer: &Signer| JwtBundlesStatus {
        bundles: Some(Arc::new(bundles(signer, &new))),
        state: JwtStreamState::Following,
        generation: 1,
    };
    let (tx, rx) = tokio::sync::watch::channel(status(&old));
    let source =
        JwtSvidSource::new("unix:///nonexistent/agent.sock", None, Duration::ZERO).following(rx);
    let audience = vec!["documents".to_string()];
    source.store(
        audience.clone(),
        Arc::new(JwtSvidToken::new(svid, SystemTime::now())),
    );

    let served = source.fetch(&audience).await.expect("the cached token");
    assert_eq!(served.key_id(), "old-key");

    tx.send_replace(status(&new));
    let refused = source.fetch(&audience).await;
    assert!(refused.is_err(), "a token of a revoked key was handed out");
}
