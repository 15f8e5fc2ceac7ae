//! Faults under load, nothing lost (issue 21, item 5).
//!
//! The story: a client keeps calling `CreatePayment` through the edge gateway at a steady
//! 150 requests a second (ghz over HTTPS, one route with `auth: none`). Each call crosses
//! two mTLS hops: gateway -> mTLS -> payment sidecar -> payment app, whose contact
//! lookup goes through the payment sidecar's outbound -> mTLS -> a contact sidecar ->
//! contact app (family and document, which the faults do not touch, are dialled directly).
//! Every meshd runs as the uid a real SPIRE registered for it and holds 20-second SVIDs
//! (the agent renews them every 5-10 s). The
//! contact replicas are found through a real dnsmasq (`dns:///contact.mesh.test`), with
//! round robin, retries, outlier detection and gRPC health checks on the payment sidecar's
//! upstream, and retries on the gateway's. While the load runs, one fault after another:
//!
//! 1. every SVID rotates (twice at least, for each long-lived sidecar);
//! 2. the SPIRE agent is stopped for 4 s and started again: every sidecar stays ready on
//!    its cached SVID and takes a new one from the restarted agent;
//! 3. the contacts' shared policy file gets a valid edit, then a broken one (kept out:
//!    the last good policy stays and the failure is counted), then the original again;
//! 4. one contact replica's sidecar is SIGKILLed and started again 4 s later: retries and
//!    ejection hide it, and once back it serves calls again;
//! 5. DNS changes: a third replica's address is added (it gets calls), one is removed
//!    (it gets no more);
//! 6. the payment sidecar gets SIGTERM and a new one takes its ports: the old one closes
//!    its listeners at once and drains, the new one binds them, and the gateway's retries
//!    carry the calls that met the gap.
//!
//! Steady load runs before the first fault and after the last, and between all of them.
//! ghz's JSON report holds every request with its start time; each is counted in the phase
//! it started in. The test prints sent / OK / failed by cause per phase, and the RSS and
//! open file descriptors of the long-lived gateway and contact sidecars before the load
//! (after a warm-up) and after it (once its connections are closed). It asserts that no
//! request failed in any phase, that the load was steady, and that RSS grew by at most
//! 10 MB and descriptors by at most 20.
//!
//! Needs SPIRE (`MESHD_SPIRE_BIN`), ghz, dnsmasq and setpriv; a missing one fails the test
//! naming it.

mod common;

use common::edge::write_gateway_cert;
use common::meshd::{free_port, wait_until, DemoApp, Proc, Sidecar};
use common::soak::{
    bindable, gateway_yaml, ghz, payment_yaml, policy_version, replace_file, report,
    seconds_to_expiry, serial, tally, usage, Contact, Dnsmasq, PaymentPorts, Usage, GATEWAY_UID,
    PAYMENT_UID,
};
use common::spire::Spire;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

/// The X.509-SVID lifetime SPIRE gives every entry: the agent renews an SVID at the first
/// sync (every 5 s) past half of its life, counted from a not-before SPIRE backdates by
/// 10 s: every 5-10 s.
const SVID_TTL_SECS: u32 = 20;
/// The steady rate ghz asks for.
const RPS: u32 = 150;
/// How much the long-lived sidecars may grow over the run.
const RSS_MARGIN_KB: u64 = 10 * 1024;
const FD_MARGIN: usize = 20;
/// The contact replicas' addresses; the first two are in DNS from the start.
const CONTACT_IPS: [&str; 3] = ["127.0.0.2", "127.0.0.3", "127.0.0.4"];

const CONTACT_POLICY: &str = r#"service: contact-service
default: deny
rules:
  - name: payments-call-contact
    from: ["spiffe://jia.app/payment-service"]
    to:
      grpc: ["contact.v1.ContactService/*"]
  - name: health-from-mesh
    from: ["spiffe://jia.app/*"]
    to:
      grpc: ["grpc.health.v1.Health/Check"]
"#;

/// A valid edit: one more rule, the caller still allowed.
const CONTACT_POLICY_EDITED: &str = r#"
  - name: no-intruders
    action: deny
    from: ["spiffe://jia.app/intruder"]
"#;

/// A broken edit (a list never closed): meshd must keep the last good policy.
const CONTACT_POLICY_BROKEN: &str = "service: contact-service\ndefault: deny\nrules:\n  - name: half-written\n    from: [\"spiffe://jia.app/payment-service\"\n";

const PAYMENT_POLICY: &str = r#"service: payment-service
default: deny
rules:
  - name: gateway-calls-payments
    from: ["spiffe://jia.app/api-gateway"]
    to:
      grpc: ["payment.v1.PaymentService/*"]
"#;

/// The chain under test, every process on loopback.
struct Mesh {
    spire: Spire,
    dir: tempfile::TempDir,
    /// The edge gateway (long-lived: measured before and after).
    gateway: Sidecar,
    /// The gateway's HTTPS port, where ghz calls.
    listen: u16,
    payment: Sidecar,
    ports: PaymentPorts,
    /// Replicas on `CONTACT_IPS`; the first is long-lived (measured before and after).
    contacts: Vec<Contact>,
    contact_policy: PathBuf,
    dns: Dnsmasq,
    /// The payment, family and document apps.
    _apps: [DemoApp; 3],
}

impl Mesh {
    fn start() -> Mesh {
        let spire = Spire::up_with_svid_ttl(SVID_TTL_SECS);
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let contact_policy = d.join("contact-policy.yaml");
        replace_file(&contact_policy, CONTACT_POLICY);
        let payment_policy = d.join("payment-policy.yaml");
        replace_file(&payment_policy, PAYMENT_POLICY);

        let port = free_port();
        let contacts = CONTACT_IPS
            .iter()
            .map(|ip| {
                let addr = format!("{ip}:{port}").parse().unwrap();
                Contact::start(&spire, d, addr, &contact_policy)
            })
            .collect();
        let dns = Dnsmasq::start(d, &CONTACT_IPS[..2]);
        let family = DemoApp::start("family", &[]);
        let document = DemoApp::start("document", &[]);
        let (inbound, outbound) = (free_port(), free_port());
        let app = DemoApp::start(
            "payment",
            &[
                "--contact",
                &format!("http://127.0.0.1:{outbound}"),
                "--family",
                &format!("http://{}", family.addr),
                "--document",
                &format!("http://{}", document.addr),
            ],
        );
        let ports = PaymentPorts {
            inbound,
            outbound,
            app: app.addr,
            contact: port,
            dns: dns.port,
            policy: payment_policy,
        };
        let payment = payment_sidecar(&spire, d, &ports, "payment");

        write_gateway_cert(d);
        let (listen, admin) = (free_port(), free_port());
        let yaml = gateway_yaml(&spire, d, listen, inbound, admin);
        let gateway = Sidecar::start_as("gateway", d, &yaml, admin, Some(GATEWAY_UID));
        gateway.wait_ready();
        Mesh {
            spire,
            dir,
            gateway,
            listen,
            payment,
            ports,
            contacts,
            contact_policy,
            dns,
            _apps: [app, family, document],
        }
    }

    fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn gateway_open(&self) -> f64 {
        let open = ["direction=\"gateway\""];
        self.gateway.metric("meshd_connections_open", &open)
    }

    fn gateway_retries(&self) -> f64 {
        let service = ["service=\"payment-service\""];
        self.gateway.metric("meshd_retries_total", &service)
    }

    /// RSS and descriptors of the long-lived sidecars: the gateway and the first contact.
    fn usage(&self) -> [Usage; 2] {
        [&self.gateway, &self.contacts[0].sidecar].map(|s| usage(s.proc.pid()))
    }

    fn rotations(&self) -> [f64; 2] {
        [&self.gateway, &self.contacts[0].sidecar]
            .map(|s| s.metric("meshd_svid_rotations_total", &[]))
    }

    /// Every sidecar running now.
    fn sidecars(&self) -> Vec<&Sidecar> {
        let contacts = self.contacts.iter().map(|c| &c.sidecar);
        [&self.gateway, &self.payment]
            .into_iter()
            .chain(contacts)
            .collect()
    }
}

/// A ready payment sidecar as uid 20001 with a fresh admin port.
fn payment_sidecar(spire: &Spire, dir: &Path, ports: &PaymentPorts, name: &str) -> Sidecar {
    let admin = free_port();
    let yaml = payment_yaml(spire, ports, admin);
    let s = Sidecar::start_as(name, dir, &yaml, admin, Some(PAYMENT_UID));
    s.wait_ready();
    s
}

/// Lets the load run for `secs` (a stretch of steady load, not a wait for readiness).
fn hold(secs: u64) {
    std::thread::sleep(Duration::from_secs(secs));
}

/// Polls until `cond` holds; fails the test naming `what` after `secs`.
fn expect_within(secs: u64, what: &str, cond: impl FnMut() -> bool) {
    let held = wait_until(Duration::from_secs(secs), cond);
    assert!(held, "not within {secs} s: {what}");
}

/// Phase 1: two new SVIDs at least on the gateway, the payment sidecar and two contacts.
fn svid_rotations(m: &Mesh) {
    let watched = [
        &m.gateway,
        &m.payment,
        &m.contacts[0].sidecar,
        &m.contacts[1].sidecar,
    ];
    let mut seen: Vec<Vec<String>> = watched.iter().map(|s| vec![serial(s)]).collect();
    expect_within(60, "two rotations of every sidecar's SVID", || {
        for (s, serials) in watched.iter().zip(seen.iter_mut()) {
            let now = serial(s);
            if !now.is_empty() && serials.last() != Some(&now) {
                serials.push(now);
            }
        }
        seen.iter().all(|s| s.len() >= 3)
    });
}

/// Phase 2: the agent away for 4 s; every sidecar stays ready, then takes a new SVID.
fn agent_outage(m: &Mesh) {
    let all = m.sidecars();
    // Stop it soon after a rotation (every SVID with 13 s or more left), so the cached
    // SVIDs outlive the outage and the sidecars' reconnection (backing off up to 5 s).
    expect_within(30, "fresh SVIDs before the agent stops", || {
        all.iter()
            .all(|s| seconds_to_expiry(s) >= i64::from(SVID_TTL_SECS) - 7)
    });
    let serials: Vec<String> = all.iter().map(|s| serial(s)).collect();
    m.spire.stop_agent();
    let down = Instant::now();
    while down.elapsed() < Duration::from_secs(4) {
        for s in &all {
            let (code, body) = s.get("/ready");
            assert_eq!(
                code, 200,
                "{} not ready without the agent: {body}",
                s.proc.name
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    m.spire.start_agent();
    expect_within(30, "new SVIDs from the restarted agent", || {
        all.iter().zip(&serials).all(|(s, old)| {
            let now = serial(s);
            !now.is_empty() && now != *old
        })
    });
    hold(4);
}

/// Phase 3: a valid edit of the contacts' policy, a broken one (the edit stays), the
/// original again.
fn policy_edits(m: &Mesh) {
    let sidecars: Vec<&Sidecar> = m.contacts.iter().map(|c| &c.sidecar).collect();
    let versions = || {
        sidecars
            .iter()
            .map(|s| policy_version(s))
            .collect::<Vec<u64>>()
    };
    let newer = |than: &[u64]| versions().iter().zip(than).all(|(v, t)| v > t);
    let failures = || {
        let name = "meshd_policy_reload_failures_total";
        sidecars
            .iter()
            .map(|s| s.metric(name, &[]))
            .collect::<Vec<f64>>()
    };

    let original = versions();
    let edited = format!("{CONTACT_POLICY}{CONTACT_POLICY_EDITED}");
    replace_file(&m.contact_policy, &edited);
    expect_within(
        10,
        "the edited policy loaded by every contact sidecar",
        || {
            newer(&original)
                && sidecars
                    .iter()
                    .all(|s| s.get("/policy").1.contains("no-intruders"))
        },
    );
    hold(4);

    let edited = versions();
    let failed = failures();
    replace_file(&m.contact_policy, CONTACT_POLICY_BROKEN);
    expect_within(
        10,
        "the broken policy refused by every contact sidecar",
        || failures().iter().zip(&failed).all(|(now, then)| now > then),
    );
    hold(4);
    assert_eq!(versions(), edited, "the last good policy stays");

    replace_file(&m.contact_policy, CONTACT_POLICY);
    expect_within(
        10,
        "the original policy back on every contact sidecar",
        || newer(&edited),
    );
    hold(3);
}

/// Phase 4: the second replica's sidecar SIGKILLed, down 4 s, back and serving. Returns
/// the payment sidecar's retries to contact meanwhile (the calls the dead replica would
/// have lost).
fn replica_killed(m: &mut Mesh) -> f64 {
    let retries = || {
        m.payment
            .metric("meshd_retries_total", &["service=\"contact-service\""])
    };
    let before = retries();
    let (spire, dir) = (&m.spire, m.dir.path());
    m.contacts[1].kill_and_restart_sidecar(spire, dir, Duration::from_secs(4));
    let back = &m.contacts[1];
    expect_within(30, "the restarted replica serving calls again", || {
        back.served_calls() > 0.0
    });
    hold(4);
    let retried = retries() - before;
    assert!(
        retried >= 1.0,
        "no call met the dead replica: the fault was not felt"
    );
    retried
}

/// Phase 5: the third replica added to DNS (it gets calls), the second removed (it gets
/// no more).
fn dns_change(m: &Mesh) {
    let endpoint = |i: usize| format!("{}:{}", CONTACT_IPS[i], m.ports.contact);
    let upstreams = || m.payment.get("/upstreams").1;
    m.dns.set(&CONTACT_IPS);
    let before = m.contacts[2].served_calls();
    expect_within(20, "the added replica in /upstreams and serving", || {
        upstreams().contains(&endpoint(2)) && m.contacts[2].served_calls() > before
    });
    hold(3);
    m.dns.set(&[CONTACT_IPS[0], CONTACT_IPS[2]]);
    expect_within(20, "the removed replica gone from /upstreams", || {
        !upstreams().contains(&endpoint(1))
    });
    // Calls in flight when it left finish (and are counted) within milliseconds.
    hold(1);
    let served = m.contacts[1].served_calls();
    hold(3);
    assert_eq!(
        m.contacts[1].served_calls(),
        served,
        "a removed replica got calls"
    );
}

/// Phase 6: SIGTERM to the payment sidecar, a new one on its ports as soon as they are
/// free. Returns, in ms from SIGTERM: the listeners free, the new one ready, the old one
/// drained and exited.
fn payment_swap(m: &mut Mesh) -> [u128; 3] {
    let term = Instant::now();
    m.payment.proc.signal("TERM");
    let (inbound, outbound) = (m.ports.inbound, m.ports.outbound);
    expect_within(10, "the old payment sidecar's listeners closed", || {
        bindable(inbound) && bindable(outbound)
    });
    let closed = term.elapsed();
    let new = payment_sidecar(&m.spire, m.dir.path(), &m.ports, "payment-2");
    let ready = term.elapsed();
    let mut old = std::mem::replace(&mut m.payment, new);
    let exit = old.proc.wait_exit(Duration::from_secs(15));
    assert!(
        exit.is_some_and(|s| s.success()),
        "the old payment sidecar did not drain and exit 0: {exit:?}\n{}",
        old.proc.dump()
    );
    let exited = term.elapsed();
    hold(6);
    [closed, ready, exited].map(|t| t.as_millis())
}

/// The phases of the run: names, starts, and the gateway's retries at each start.
#[derive(Default)]
struct Phases {
    names: Vec<&'static str>,
    starts: Vec<SystemTime>,
    retries: Vec<f64>,
}

impl Phases {
    fn start(&mut self, name: &'static str, m: &Mesh, since: Instant) {
        eprintln!("[{:5.1} s] phase: {name}", since.elapsed().as_secs_f64());
        self.names.push(name);
        self.starts.push(SystemTime::now());
        self.retries.push(m.gateway_retries());
    }
}

// Story: see the module docs. Every fault above happens under one steady ghz load through
// gateway -> payment -> contact, and not one request fails; the long-lived sidecars end
// with the memory and descriptors they started with (within 10 MB and 20).
#[test]
fn faults_under_load_lose_nothing() {
    let t0 = Instant::now();
    let mut m = Mesh::start();

    // Warm-up: 2 s of load, then the "before" figures once ghz's connections are closed.
    let mut warm = ghz(m.dir(), m.listen, RPS, &["-n", &(2 * RPS).to_string()]);
    let warm = report(&String::from_utf8_lossy(
        &warm.output().expect("run ghz").stdout,
    ));
    assert_eq!(
        warm["statusCodeDistribution"]["OK"].as_u64(),
        Some(u64::from(2 * RPS)),
        "warm-up calls failed: {:#}",
        warm["errorDistribution"]
    );
    expect_within(10, "gateway connections closed after the warm-up", || {
        m.gateway_open() == 0.0
    });
    let before = m.usage();
    let rotations_before = m.rotations();

    // The load: until stopped (SIGINT), every request kept in ghz's report.
    let mut load = Proc::spawn("ghz", ghz(m.dir(), m.listen, RPS, &["-z", "600s"]), None);
    let load_started = Instant::now();
    let mut p = Phases::default();
    p.start("0 steady load", &m, t0);
    hold(10);
    p.start("1 SVID rotations", &m, t0);
    svid_rotations(&m);
    p.start("2 SPIRE agent stopped and restarted", &m, t0);
    agent_outage(&m);
    p.start(
        "3 contact policy: valid edit, broken edit, restored",
        &m,
        t0,
    );
    policy_edits(&m);
    p.start("4 contact replica's sidecar killed and restarted", &m, t0);
    let replica_retries = replica_killed(&mut m);
    p.start("5 DNS: a replica added, another removed", &m, t0);
    dns_change(&m);
    let payment_retries = m
        .payment
        .metric("meshd_retries_total", &["service=\"contact-service\""]);
    p.start(
        "6 payment sidecar replaced (SIGTERM, new one on its ports)",
        &m,
        t0,
    );
    let swap = payment_swap(&mut m);
    p.start("7 steady load after the faults", &m, t0);
    hold(5);
    p.retries.push(m.gateway_retries());
    let stopped = SystemTime::now();
    load.signal("INT");
    assert!(
        load.wait_exit(Duration::from_secs(30)).is_some(),
        "ghz did not stop"
    );
    let load_secs = load_started.elapsed().as_secs_f64();
    let full = report(&load.dump());

    // After: once ghz's connections are closed and the mesh's settle.
    expect_within(10, "gateway connections closed after the load", || {
        m.gateway_open() == 0.0
    });
    let mut after = m.usage();
    wait_until(Duration::from_secs(10), || {
        after = m.usage();
        after
            .iter()
            .zip(&before)
            .all(|(a, b)| a.fds <= b.fds + FD_MARGIN)
    });

    // The figures.
    let tallies = tally(&full, &p.starts, stopped);
    eprintln!("\nfaults under load: {RPS} rps asked, {load_secs:.0} s of load");
    eprintln!(
        "{:<60} {:>6} {:>6} {:>7}  failed by cause",
        "phase", "sent", "OK", "retried"
    );
    for (i, t) in tallies.iter().enumerate() {
        let retried = p.retries[i + 1] - p.retries[i];
        eprintln!(
            "{:<60} {:>6} {:>6} {retried:>7}  {:?}",
            p.names[i], t.sent, t.ok, t.failed
        );
    }
    let sent: u64 = tallies.iter().map(|t| t.sent).sum();
    let ok: u64 = tallies.iter().map(|t| t.ok).sum();
    eprintln!(
        "{:<60} {sent:>6} {ok:>6}  (retried: by the gateway, to payment)",
        "all"
    );
    let names = ["gateway", "contact 127.0.0.2"];
    for (name, (b, a)) in names.iter().zip(before.iter().zip(&after)) {
        let mb = |u: &Usage| u.rss_kb as f64 / 1024.0;
        eprintln!(
            "{name} sidecar: RSS {:.1} -> {:.1} MB, open fds {} -> {}",
            mb(b),
            mb(a),
            b.fds,
            a.fds
        );
    }
    let rotations = m.rotations();
    eprintln!(
        "SVID rotations during the load: gateway +{}, contact +{}; payment -> contact retries: {payment_retries} (first payment sidecar, {replica_retries} of them while a replica was down) + {} (second)",
        rotations[0] - rotations_before[0],
        rotations[1] - rotations_before[1],
        m.payment.metric("meshd_retries_total", &["service=\"contact-service\""]),
    );
    eprintln!(
        "payment sidecar swap, from SIGTERM: listeners free after {} ms, the new one ready after {} ms, the old one drained and exited after {} ms",
        swap[0], swap[1], swap[2]
    );
    eprintln!("whole test: {:.0} s", t0.elapsed().as_secs_f64());

    assert_eq!(
        full["count"].as_u64(),
        Some(sent),
        "every request counted in a phase"
    );
    for (name, t) in p.names.iter().zip(&tallies) {
        assert_eq!(
            t.failures(),
            0,
            "requests failed in phase {name}: {:?}",
            t.failed
        );
    }
    assert!(
        sent as f64 >= 2.0 / 3.0 * f64::from(RPS) * load_secs,
        "the load was not steady: {sent} requests in {load_secs:.0} s"
    );
    for (name, (b, a)) in names.iter().zip(before.iter().zip(&after)) {
        assert!(
            a.rss_kb <= b.rss_kb + RSS_MARGIN_KB,
            "{name} sidecar's RSS grew by more than 10 MB: {b:?} -> {a:?}"
        );
        assert!(
            a.fds <= b.fds + FD_MARGIN,
            "{name} sidecar holds more than {FD_MARGIN} more descriptors: {b:?} -> {a:?}"
        );
    }
}
