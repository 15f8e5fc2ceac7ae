//! The development CA's JWT side as a workload sees it: JWT-SVIDs for the socket's own
//! identity, bundles that follow a rotation of the JWT authority, validation by the CA,
//! and meshd's own client (the bundles follower, the cached JWT-SVID source) against it.

use crate::dev_ca::{DevCa, Serving, MIN_TTL};
use crate::identity::{
    follow_jwt_bundles, validate_jwt_svid, JwtApiError, JwtBundlesStatus, JwtStreamState,
    JwtSvidSource, SpiffeId,
};
use futures::StreamExt;
use spiffe::WorkloadApiClient;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const STEP: Duration = Duration::from_secs(10);
const PAYMENT: &str = "spiffe://jia.app/payment-service";

fn id(s: &str) -> SpiffeId {
    SpiffeId::new(s).unwrap()
}

/// Serves `PAYMENT` on a socket in a temporary directory.
async fn serve(
    ca: &Arc<DevCa>,
    ttl: Duration,
) -> (tempfile::TempDir, String, CancellationToken, Serving) {
    let dir = tempfile::tempdir().unwrap();
    let stop = CancellationToken::new();
    let sock = dir.path().join("payment.sock");
    let serving = ca
        .clone()
        .serve(vec![(id(PAYMENT), sock.clone())], ttl, stop.clone())
        .await
        .unwrap();
    (dir, format!("unix://{}", sock.display()), stop, serving)
}

/// Waits until the follower publishes a status `ok` accepts.
async fn wait_for(
    rx: &mut watch::Receiver<JwtBundlesStatus>,
    ok: impl Fn(&JwtBundlesStatus) -> bool,
) -> JwtBundlesStatus {
    let got = tokio::time::timeout(STEP, rx.wait_for(|s| ok(s)))
        .await
        .expect("no such JWT bundles status in time")
        .expect("follower ended");
    got.clone()
}

fn kids(s: &JwtBundlesStatus, td: &str) -> Vec<String> {
    s.bundles
        .as_ref()
        .and_then(|b| b.for_domain(td))
        .map(|b| b.key_ids())
        .unwrap_or_default()
}

#[test]
fn retired_keys_stay_until_their_tokens_expire() {
    // A key that signed a token still valid for a minute stays through two rotations; a
    // key that signed nothing leaves at the next rotation.
    let ca = DevCa::new("jia.app").unwrap();
    let first = ca.jwt_key_id();
    ca.sign_jwt_svid(&id(PAYMENT), &["a".into()], Duration::from_secs(60))
        .unwrap();
    ca.rotate_jwt_authority().unwrap();
    let second = ca.jwt_key_id();
    assert_ne!(first, second);
    ca.rotate_jwt_authority().unwrap();
    let third = ca.jwt_key_id();
    let mut want = vec![first, third];
    want.sort();
    assert_eq!(ca.jwt_bundle().key_ids(), want);
    assert_eq!(ca.subscribe().borrow().jwt, 2, "each rotation is announced");
}

#[test]
fn tokens_follow_the_jwt_svid_profile() {
    // The dev CA's token has the header and claims the brief names, and validates.
    let ca = DevCa::new("jia.app").unwrap();
    let token = ca
        .sign_jwt_svid(&id(PAYMENT), &["documents".into()], Duration::from_secs(30))
        .unwrap();
    let part = |i: usize| -> serde_json::Value {
        use base64::Engine;
        let raw = token.split('.').nth(i).unwrap();
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(raw)
            .unwrap();
        serde_json::from_slice(&bytes).unwrap()
    };
    let (header, claims) = (part(0), part(1));
    assert_eq!(header["alg"], "ES256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], ca.jwt_key_id().as_str());
    assert_eq!(claims["sub"], PAYMENT);
    assert_eq!(claims["aud"], serde_json::json!(["documents"]));
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 30);
    let v = validate_jwt_svid(&token, "documents", &ca.jwt_bundles(), SystemTime::now()).unwrap();
    assert_eq!(v.id, id(PAYMENT));
}

#[tokio::test]
async fn workload_api_jwt_rpcs() {
    // A workload on the payment socket fetches a JWT-SVID, reads the JWT bundles (its
    // own domain and a federated one), and has the CA validate tokens; a wrong audience
    // and a foreign identity are refused with the Workload API's codes.
    let ca = Arc::new(DevCa::new("jia.app").unwrap());
    let other = DevCa::new("other.td").unwrap();
    ca.set_federated_jwt("other.td", other.jwt_bundle());
    let (_dir, addr, stop, _serving) = serve(&ca, Duration::from_secs(60)).await;
    let client = WorkloadApiClient::connect_to(&addr).await.unwrap();
    let svid = client.fetch_jwt_svid(["documents"], None).await.unwrap();
    assert_eq!(svid.spiffe_id(), &id(PAYMENT));
    assert_eq!(svid.audience(), ["documents".to_string()]);
    let set = client.fetch_jwt_bundles().await.unwrap();
    let bundles = crate::identity::jwt_bundles_from_set(&set).unwrap();
    assert_eq!(bundles.trust_domains(), vec!["jia.app", "other.td"]);
    let v = validate_jwt_svid(svid.token(), "documents", &bundles, SystemTime::now()).unwrap();
    assert_eq!(v.key_id, ca.jwt_key_id());

    let source = JwtSvidSource::new(&addr, None, Duration::from_secs(2));
    let (sub, aud) = source.validate("documents", svid.token()).await.unwrap();
    assert_eq!((sub, aud), (id(PAYMENT), vec!["documents".to_string()]));
    match source.validate("contacts", svid.token()).await {
        Err(JwtApiError::Refused { reason, .. }) => {
            assert!(reason.contains("audience"), "{reason}")
        }
        other => panic!("a wrong audience must be refused, got {other:?}"),
    }
    let foreign = JwtSvidSource::new(
        &addr,
        Some(id("spiffe://jia.app/someone-else")),
        Duration::from_millis(300),
    );
    match foreign.fetch(&["documents".into()]).await {
        Err(JwtApiError::Unavailable { reason, .. }) => {
            assert!(reason.contains("no identity issued"), "{reason}")
        }
        other => panic!("another identity's token must be denied, got {other:?}"),
    }
    assert_eq!(
        source.fetch(&[]).await.unwrap_err(),
        JwtApiError::NoAudience
    );
    stop.cancel();
}

#[tokio::test]
async fn bundles_follow_a_rotation_and_the_agent_going_away() {
    // meshd's follower sees the first bundle, then a rotation (old and new key IDs), and
    // keeps the last bundles while the Workload API is gone.
    let ca = Arc::new(DevCa::new("jia.app").unwrap());
    let (_dir, addr, stop, serving) = serve(&ca, Duration::from_secs(60)).await;
    let (tx, mut rx) = watch::channel(JwtBundlesStatus::waiting());
    let follow_stop = CancellationToken::new();
    let follower = tokio::spawn(follow_jwt_bundles(addr, tx, follow_stop.clone()));
    let first = ca.jwt_key_id();
    let s = wait_for(&mut rx, |s| s.state == JwtStreamState::Following).await;
    assert_eq!(kids(&s, "jia.app"), vec![first.clone()]);
    ca.sign_jwt_svid(&id(PAYMENT), &["a".into()], Duration::from_secs(60))
        .unwrap();
    ca.rotate_jwt_authority().unwrap();
    let second = ca.jwt_key_id();
    let s = wait_for(&mut rx, |s| kids(s, "jia.app").contains(&second)).await;
    assert!(kids(&s, "jia.app").contains(&first), "old key kept");
    assert_eq!(s.generation, 2);
    stop.cancel();
    serving.finished().await;
    let s = wait_for(&mut rx, |s| {
        matches!(s.state, JwtStreamState::Connecting { .. })
    })
    .await;
    assert!(
        kids(&s, "jia.app").contains(&second),
        "bundles kept while away"
    );
    follow_stop.cancel();
    tokio::time::timeout(STEP, follower).await.unwrap().unwrap();
}

#[tokio::test]
async fn jwt_svids_are_cached_until_half_their_lifetime() {
    // The outbound side asks for a token per request: the same one comes back until half
    // its 4 s lifetime, then a new one; with the agent gone the cached one serves until it
    // expires, and then the fetch fails.
    let ca = Arc::new(DevCa::new("jia.app").unwrap());
    let ttl = MIN_TTL * 2;
    let (_dir, addr, stop, serving) = serve(&ca, ttl).await;
    let source = JwtSvidSource::new(&addr, Some(id(PAYMENT)), Duration::from_millis(500));
    let aud = vec!["documents".to_string()];
    let t1 = source.fetch(&aud).await.unwrap();
    let t2 = source.fetch(&aud).await.unwrap();
    assert!(Arc::ptr_eq(&t1, &t2), "cached");
    assert!(
        !format!("{t1:?}").contains(t1.token()),
        "Debug never shows the token"
    );
    let wait = |t: SystemTime| t.duration_since(SystemTime::now()).unwrap_or_default();
    tokio::time::sleep(wait(t1.refresh_at) + Duration::from_millis(50)).await;
    let t3 = source.fetch(&aud).await.unwrap();
    assert_ne!(t3.token(), t1.token(), "refreshed after half its lifetime");
    stop.cancel();
    serving.finished().await;
    tokio::time::sleep(wait(t3.refresh_at) + Duration::from_millis(50)).await;
    let t4 = source.fetch(&aud).await.unwrap();
    assert_eq!(
        t4.token(),
        t3.token(),
        "the cached token serves while the agent is away"
    );
    tokio::time::sleep(wait(t3.expiry) + Duration::from_millis(50)).await;
    assert!(matches!(
        source.fetch(&aud).await,
        Err(JwtApiError::Unavailable { .. })
    ));
}

#[tokio::test]
async fn federated_bundles_reach_the_stream() {
    // Federating with other.td later pushes a new JWT bundles message with both domains.
    let ca = Arc::new(DevCa::new("jia.app").unwrap());
    let (_dir, addr, stop, _serving) = serve(&ca, Duration::from_secs(60)).await;
    let client = WorkloadApiClient::connect_to(&addr).await.unwrap();
    let mut stream = Box::pin(client.stream_jwt_bundles().await.unwrap());
    let first = tokio::time::timeout(STEP, stream.next()).await.unwrap();
    assert_eq!(first.unwrap().unwrap().len(), 1);
    ca.set_federated_jwt("other.td", DevCa::new("other.td").unwrap().jwt_bundle());
    let second = tokio::time::timeout(STEP, stream.next()).await.unwrap();
    assert_eq!(second.unwrap().unwrap().len(), 2);
    stop.cancel();
}
