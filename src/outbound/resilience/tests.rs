use super::*;
use http::Method;

fn outlier(n: u32, base_s: u64, max_s: u64, percent: u32) -> OutlierConfig {
    OutlierConfig {
        consecutive_failures: n,
        base_ejection_time: Duration::from_secs(base_s),
        max_ejection_time: Duration::from_secs(max_s),
        max_ejection_percent: percent,
    }
}

#[test]
fn only_safe_requests_are_retried() {
    use Outcome::*;
    // (outcome, grpc, method, allowed)
    let table = [
        (GrpcUnavailable, true, Method::POST, true),
        (NoResponse, true, Method::POST, true),
        (ServerError, true, Method::POST, false),
        (TimedOut, true, Method::POST, false),
        (Answered, true, Method::POST, false),
        (NoResponse, false, Method::GET, true),
        (NoResponse, false, Method::PUT, true),
        (NoResponse, false, Method::DELETE, true),
        (NoResponse, false, Method::POST, false),
        (NoResponse, false, Method::PATCH, false),
        // an HTTP 503 carries a body the app could have seen: not retried
        (ServerError, false, Method::GET, false),
        (GrpcUnavailable, false, Method::GET, false),
        // never processed upstream (connect failure, refused stream): any method
        (NotProcessed, false, Method::POST, true),
        (NotProcessed, false, Method::PATCH, true),
        (NotProcessed, true, Method::POST, true),
    ];
    for (i, (outcome, grpc, method, want)) in table.into_iter().enumerate() {
        assert_eq!(retry_allowed(outcome, grpc, &method), want, "case {i}");
    }
}

#[test]
fn backoff_doubles_to_a_cap_with_jitter() {
    let ms = Duration::from_millis;
    let table = [
        (1, 1.0, ms(25)),
        (2, 1.0, ms(50)),
        (3, 1.0, ms(100)),
        (5, 1.0, ms(250)),
        (40, 1.0, ms(250)),
        (2, 0.5, ms(25)),
        (3, 0.0, ms(0)),
        (3, 7.0, ms(100)),
    ];
    for (attempt, jitter, want) in table {
        assert_eq!(
            backoff(attempt, ms(25), ms(250), jitter),
            want,
            "{attempt} {jitter}"
        );
    }
}

#[test]
fn ejection_cap_keeps_at_least_one_and_never_all() {
    // (total, percent, cap)
    let table = [
        (0, 50, 0),
        (3, 0, 0),
        (3, 10, 1),
        (3, 50, 1),
        (3, 67, 2),
        (3, 99, 2),
        (3, 100, 3),
        (10, 10, 1),
        (10, 50, 5),
        (1, 10, 1),
        (1, 50, 1),
    ];
    for (total, percent, want) in table {
        assert_eq!(max_ejected(total, percent), want, "{total} {percent}");
    }
}

#[test]
fn ejections_grow_with_repeats_up_to_the_max() {
    let cfg = outlier(5, 30, 300, 10);
    let s = Duration::from_secs;
    let table = [
        (0, s(30)),
        (1, s(30)),
        (2, s(60)),
        (9, s(270)),
        (10, s(300)),
        (u32::MAX, s(300)),
    ];
    for (times, want) in table {
        assert_eq!(ejection_time(&cfg, times), want, "{times}");
    }
}

#[test]
fn consecutive_failures_eject_and_success_resets() {
    let cfg = outlier(3, 1, 10, 100);
    let h = EndpointHealth::default();
    let t0 = Instant::now();
    let fail = |t| h.observe(Outcome::NoResponse, &cfg, t, || true);
    assert_eq!(fail(t0), None);
    assert_eq!(fail(t0), None);
    // a success in between starts the count again
    assert_eq!(h.observe(Outcome::Answered, &cfg, t0, || true), None);
    assert_eq!(fail(t0), None);
    assert_eq!(fail(t0), None);
    assert_eq!(fail(t0), Some(Duration::from_secs(1)));
    assert!(!h.eligible(t0));
    assert_eq!(h.state(t0), HealthState::Ejected);
    // back after the ejection; failing again ejects for twice as long
    let t1 = t0 + Duration::from_millis(1500);
    assert!(h.eligible(t1));
    for _ in 0..2 {
        assert_eq!(fail(t1), None);
    }
    assert_eq!(fail(t1), Some(Duration::from_secs(2)));
    // after a whole max_ejection_time without ejection the length starts over
    let t2 = t1 + Duration::from_secs(13);
    for _ in 0..2 {
        fail(t2);
    }
    assert_eq!(fail(t2), Some(Duration::from_secs(1)));
}

#[test]
fn ejection_respects_the_cap_and_active_checks() {
    let cfg = outlier(1, 1, 10, 10);
    let h = EndpointHealth::default();
    let t0 = Instant::now();
    // the upstream's cap is reached: the endpoint stays in
    assert_eq!(h.observe(Outcome::ServerError, &cfg, t0, || false), None);
    assert!(h.eligible(t0));
    h.set_unhealthy(true);
    assert!(!h.eligible(t0));
    assert_eq!(h.state(t0), HealthState::Unhealthy);
    h.set_unhealthy(false);
    // detection off
    let off = outlier(0, 1, 10, 10);
    for _ in 0..10 {
        assert_eq!(h.observe(Outcome::NoResponse, &off, t0, || true), None);
    }
}

#[test]
fn breaker_opens_at_the_limit_and_closes_again() {
    let b = Breaker::new(
        "test-upstream",
        LimitsConfig {
            max_requests: 2,
            max_pending: 1,
        },
    );
    let a = b.admit().unwrap();
    assert!(!b.open.load(Ordering::Relaxed));
    let c = b.admit().unwrap();
    assert!(b.open.load(Ordering::Relaxed), "open at the limit");
    assert_eq!(b.admit().unwrap_err(), LimitHit::Requests(2));
    drop(a);
    assert!(!b.open.load(Ordering::Relaxed), "closed below the limit");
    let w = b.wait_for_connection().unwrap();
    assert_eq!(b.wait_for_connection().unwrap_err(), LimitHit::Pending(1));
    drop(w);
    drop(c);
    assert_eq!(b.load(), (0, 0));
    assert!(!b.open.load(Ordering::Relaxed));
    assert_eq!(
        LimitHit::Requests(2).to_string(),
        "2 requests in progress (limits.max_requests)"
    );
}

#[test]
fn retry_budget_is_a_share_of_recent_requests() {
    let t0 = Instant::now();
    let b = RetryBudget::new(20, 0, t0);
    for _ in 0..100 {
        b.deposit(t0);
    }
    let granted = (0..100).filter(|_| b.try_withdraw(t0)).count();
    assert_eq!(granted, 20);
    // the window forgets after 10 s
    let later = t0 + Duration::from_secs(11);
    assert!(!b.try_withdraw(later));
    b.deposit(later);
    for _ in 0..4 {
        b.deposit(later);
    }
    assert!(b.try_withdraw(later));
    assert!(!b.try_withdraw(later));
    // the per-second floor allows retries with no traffic
    let floor = RetryBudget::new(20, 1, t0);
    let granted = (0..50).filter(|_| floor.try_withdraw(t0)).count();
    assert_eq!(granted, 10);
}
