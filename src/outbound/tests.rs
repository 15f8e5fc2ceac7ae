//! An upstream's endpoint set as its caller would see it through `Outbound`: a new set
//! from discovery keeps the connection, statistics and health of every endpoint that
//! stays (and a changed endpoint starts afresh); an endpoint ejected after failures or
//! failing its health check gets no request while another is eligible, and requests
//! come back to it once it is healthy again; when all are out they share the traffic.

use super::*;
use crate::config::{Config, Env};
use crate::discovery::{self, Dns, RefreshBounds};
use std::path::Path;

/// One upstream with `policy` and `extra` config lines, on a static list (never applied:
/// the tests apply their own sets).
fn outbound(policy: &str, extra: &str) -> Outbound {
    let text = format!(
        "service: t\noutbound:\n  - name: contact\n    listen: 127.0.0.1:0\n    endpoints: [\"127.0.0.1:9\"]\n    server_id: spiffe://jia.app/contact\n    balancer: {policy}\n{extra}"
    );
    let (config, _) = Config::from_text(Path::new("t.yaml"), &text, &Env::default())
        .unwrap_or_else(|e| panic!("test config: {e}"));
    let o = &config.outbound[0];
    let stop = tokio_util::sync::CancellationToken::new();
    let found = discovery::start(
        "contact",
        o.endpoints.clone(),
        Arc::new(Dns::new(&[])),
        RefreshBounds {
            min: Duration::from_secs(3600),
            max: Duration::from_secs(3600),
        },
        stop.clone(),
    );
    let tls = Arc::new(UpstreamTls {
        server_id: o.server_id.clone(),
        server_name: crate::tls::spiffe_server_name(),
        alpn_h2: true,
        config: Default::default(),
    });
    let (_, identity) = watch::channel(IdentityStatus::Waiting {
        reason: "test: no identity".into(),
    });
    let ob = Outbound::new(
        o,
        tls,
        None,
        found,
        identity,
        Arc::new(Labels::default()),
        Arc::new(AccessLogger {
            mode: crate::telemetry::AccessLog::Off,
        }),
        stop,
    );
    ob.apply(&EndpointSet::default());
    ob
}

fn addr(k: usize) -> SocketAddr {
    SocketAddr::from(([10, 1, (k >> 8) as u8, k as u8], 8443))
}

fn set(range: impl IntoIterator<Item = usize>) -> EndpointSet {
    EndpointSet::new(
        range
            .into_iter()
            .map(|k| DiscoveredEndpoint::plain(addr(k)))
            .collect(),
    )
}

fn endpoint(ob: &Outbound, k: usize) -> Arc<Endpoint> {
    let set = ob.endpoints.load();
    let found = set.all().iter().find(|e| e.meta.addr == addr(k)).cloned();
    found.unwrap_or_else(|| panic!("no endpoint {}", addr(k)))
}

/// Picks `n` times with nothing tried, the requests staying in flight until the end (as
/// under load); counts per endpoint number.
fn picks(ob: &Outbound, n: usize) -> HashMap<usize, usize> {
    let mut counts = HashMap::new();
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        let ep = ob.pick(&[]).expect("an endpoint");
        let ip = match ep.endpoint.meta.addr {
            SocketAddr::V4(a) => a.ip().octets(),
            SocketAddr::V6(_) => unreachable!(),
        };
        *counts
            .entry(usize::from(ip[2]) << 8 | usize::from(ip[3]))
            .or_default() += 1;
        held.push(ep);
    }
    counts
}

#[tokio::test]
async fn a_new_set_keeps_the_state_of_endpoints_that_stay() {
    let ob = outbound("p2c_ewma", "");
    ob.apply(&set(0..1_000));
    let kept = endpoint(&ob, 503);
    let busy = InFlight::start(kept.clone());
    busy.record(false);
    kept.health.set_unhealthy(true);
    let gone = endpoint(&ob, 0);

    // 10 % replaced (0, 10, 20, ... leave; 1000.. arrive); one endpoint's weight changes
    let mut next = set((0..1_000).filter(|k| k % 10 != 0).chain(1_000..1_100));
    next.endpoints
        .iter_mut()
        .find(|e| e.addr == addr(505))
        .unwrap()
        .weight = 5;
    let before_505 = endpoint(&ob, 505);
    ob.apply(&next);

    let now = ob.endpoints.load();
    assert_eq!(now.all().len(), 1_000);
    let after = endpoint(&ob, 503);
    assert!(
        Arc::ptr_eq(&kept, &after),
        "the same endpoint, connection pool and all"
    );
    let (requests, failures, in_flight, _) = after.stats.snapshot();
    assert_eq!((requests, failures, in_flight), (1, 1, 1));
    assert_eq!(after.health.state(Instant::now()), HealthState::Unhealthy);
    assert!(!now.all().iter().any(|e| Arc::ptr_eq(e, &gone)));
    let changed = endpoint(&ob, 505);
    assert!(
        !Arc::ptr_eq(&before_505, &changed),
        "a changed weight is a new endpoint"
    );
    assert_eq!(changed.meta.weight, 5);
    assert_eq!(
        endpoint(&ob, 1_050).stats.snapshot().0,
        0,
        "a new endpoint starts afresh"
    );
    // the unhealthy one that stayed is left out of the picks
    assert_eq!(now.pool_len(), 999);
    drop(busy);
}

#[tokio::test]
async fn an_unhealthy_endpoint_gets_nothing_until_it_is_healthy_again() {
    for policy in ["p2c_ewma", "round_robin", "least_request"] {
        let ob = outbound(policy, "");
        ob.apply(&set(0..100));
        endpoint(&ob, 7).health.set_unhealthy(true);
        let counts = picks(&ob, 10_000);
        assert_eq!(counts.get(&7), None, "{policy}: {counts:?}");
        assert_eq!(
            counts.len(),
            99,
            "{policy}: every other endpoint gets requests"
        );
        assert_eq!(
            ob.endpoints.load().pool_len(),
            99,
            "{policy}: rebuilt without it"
        );
        endpoint(&ob, 7).health.set_unhealthy(false);
        // noticed by the next pick (one endpoint is out), then shared again
        let counts = picks(&ob, 10_000);
        assert!(
            counts.get(&7).is_some_and(|&c| c > 20),
            "{policy}: {counts:?}"
        );
    }
}

#[tokio::test]
async fn an_ejected_endpoint_gets_nothing_and_all_out_share_the_traffic() {
    let ob = outbound(
        "round_robin",
        "    outlier_detection: {consecutive_failures: 2, base_ejection_time: 5m, max_ejection_percent: 100}\n",
    );
    ob.apply(&set(0..10));
    for _ in 0..2 {
        let ep = InFlight::start(endpoint(&ob, 3));
        ob.observe(ep, Outcome::NotProcessed);
    }
    assert!(endpoint(&ob, 3).health.is_ejected(Instant::now()));
    assert_eq!(ob.endpoints.load().pool_len(), 9, "rebuilt at the ejection");
    let counts = picks(&ob, 900);
    assert_eq!(counts.get(&3), None, "{counts:?}");
    assert!(
        counts.values().all(|&c| c == 100),
        "round robin over the rest: {counts:?}"
    );

    // every endpoint out: all share the traffic rather than failing it (panic routing)
    for k in 0..10 {
        endpoint(&ob, k).health.set_unhealthy(true);
    }
    let counts = picks(&ob, 1_000);
    assert!(ob.endpoints.load().panic());
    assert_eq!(counts.len(), 10, "{counts:?}");
    // one healthy again: it alone takes the requests once noticed (within 10 picks)
    endpoint(&ob, 6).health.set_unhealthy(false);
    let _ = picks(&ob, 10);
    assert_eq!(picks(&ob, 100).get(&6), Some(&100));
}

#[tokio::test]
async fn retries_pass_over_tried_endpoints() {
    let ob = outbound("p2c_ewma", "");
    ob.apply(&set(0..3));
    let tried = [addr(0), addr(1)];
    for _ in 0..100 {
        let ep = ob.pick(&tried).expect("an endpoint");
        assert_eq!(ep.endpoint.meta.addr, addr(2));
    }
    ob.apply(&EndpointSet::default());
    assert!(ob.pick(&[]).is_none(), "no endpoints: no pick");
}
