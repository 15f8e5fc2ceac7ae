//! Plain tests of the inbound's JWT-SVID check: what a caller's `authorization` header
//! gets (subject, or the refusal and its label), when the header reaches the app, and that
//! every refusal's label is a series that starts at 0.
use super::{JwtCheck, JwtRefusal};
use crate::config::{parse_spiffe_id, InboundJwtSvid};
use crate::dev_ca::DevCa;
use crate::identity::{JwtBundlesStatus, JwtStreamState, JwtSvidRejection};
use crate::proxy::JWT_SVID_RESULTS as RESULTS;
use http::header::AUTHORIZATION;
use http::{HeaderMap, HeaderValue};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

fn check(ca: &DevCa, require: bool, forward: bool) -> JwtCheck {
    let status = JwtBundlesStatus {
        bundles: Some(Arc::new(ca.jwt_bundles())),
        state: JwtStreamState::Following,
        generation: 1,
    };
    let config = InboundJwtSvid {
        audience: "documents".into(),
        require,
        forward,
    };
    JwtCheck::new(config, watch::channel(status).1)
}

fn headers(authorization: &[&str]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for v in authorization {
        h.append(AUTHORIZATION, HeaderValue::from_str(v).unwrap());
    }
    h
}

#[test]
fn bearer_tokens_give_the_subject_or_a_refusal_with_its_label() {
    let ca = DevCa::new("jia.app").unwrap();
    let payment = parse_spiffe_id("spiffe://jia.app/payment-service").unwrap();
    let good = ca
        .sign_jwt_svid(&payment, &["documents".into()], Duration::from_secs(60))
        .unwrap();
    let other_aud = ca
        .sign_jwt_svid(&payment, &["contacts".into()], Duration::from_secs(60))
        .unwrap();
    let strict = check(&ca, true, false);
    let bearer = format!("Bearer {good}");
    let lower = format!("bearer {good}");
    let wrong = format!("Bearer {other_aud}");
    // (authorization values, result label, subject when accepted)
    let table: &[(&[&str], &str, Option<&str>)] = &[
        (&[&bearer], "ok", Some("spiffe://jia.app/payment-service")),
        (&[&lower], "ok", Some("spiffe://jia.app/payment-service")),
        (&[], "missing", None),
        (&[&good], "malformed", None),
        (&["Basic dXNlcjpwdw=="], "malformed", None),
        (&[&bearer, &bearer], "malformed", None),
        (&["Bearer a.b"], "malformed", None),
        (&[&wrong], "audience", None),
    ];
    for (values, label, subject) in table {
        let mut h = headers(values);
        let got = strict.check(&mut h);
        let got_label = match &got {
            Ok(_) => "ok",
            Err(r) => r.label(),
        };
        assert_eq!(got_label, *label, "{values:?}");
        let sub = got.ok().flatten().map(|id| id.to_string());
        assert_eq!(sub.as_deref(), *subject, "{values:?}");
        assert!(h.get(AUTHORIZATION).is_none(), "stripped: {values:?}");
        assert!(RESULTS.contains(label));
    }
    // require: false lets a request without a token through without a subject, but a
    // bad token is still refused; forward: true keeps the header for the app.
    let lenient = check(&ca, false, true);
    let mut none = headers(&[]);
    assert_eq!(lenient.check(&mut none), Ok(None));
    let mut bad = headers(&[&wrong]);
    assert!(matches!(
        lenient.check(&mut bad),
        Err(JwtRefusal::Invalid(JwtSvidRejection::WrongAudience { .. }))
    ));
    let mut kept = headers(&[&bearer]);
    assert!(lenient.check(&mut kept).unwrap().is_some());
    assert_eq!(kept[AUTHORIZATION], bearer.as_str());
}

#[test]
fn without_bundles_every_token_is_refused_naming_why() {
    let ca = DevCa::new("jia.app").unwrap();
    let payment = parse_spiffe_id("spiffe://jia.app/payment-service").unwrap();
    let good = ca
        .sign_jwt_svid(&payment, &["documents".into()], Duration::from_secs(60))
        .unwrap();
    let config = InboundJwtSvid {
        audience: "documents".into(),
        require: true,
        forward: false,
    };
    let waiting = JwtCheck::new(config, watch::channel(JwtBundlesStatus::waiting()).1);
    let refusal = waiting
        .check(&mut headers(&[&format!("Bearer {good}")]))
        .unwrap_err();
    assert_eq!(refusal.label(), "bundles_unavailable");
    assert_eq!(
        refusal.to_string(),
        "JWT-SVID cannot be checked: no JWT bundles yet (waiting for the first JWT bundles)"
    );
    assert!(!refusal.to_string().contains(&good));
}

#[test]
fn every_rejection_label_is_a_result_series() {
    use JwtSvidRejection as R;
    let all = [
        R::Malformed(String::new()),
        R::HeaderField(String::new()),
        R::Algorithm(String::new()),
        R::UnsupportedAlgorithm(String::new()),
        R::Type(String::new()),
        R::Subject(String::new()),
        R::NoBundle(String::new()),
        R::UnknownKey {
            trust_domain: String::new(),
            kid: String::new(),
            alg: "ES256",
        },
        R::Signature,
        R::NoAudience,
        R::WrongAudience {
            want: String::new(),
            got: vec![],
        },
        R::NoExpiry,
        R::Expired(1),
        R::NotYetValid(1),
    ];
    for r in all {
        assert!(RESULTS.contains(&r.label()), "{r:?}");
    }
}
