//! Transparent interception with real iptables in network namespaces: the payment pod
//! (namespace `a`) dials the contact service's own address, as an app that knows nothing
//! of sidecars does; `meshd iptables install` redirects that to payment's transparent
//! listener, which carries the call over mTLS to the contact pod (namespace `b`), whose
//! app listens on loopback only.

mod common;

use common::edge::{dnsmasq_command, get_contact_args, tool};
use common::meshd::{meshd_bin, wait_until, DevCa, Proc};
use common::netns::{ipv6_of, pair, Netns};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::Duration;

const PAYMENT: &str = "spiffe://jia.app/payment-service";
/// The uid the payment sidecar runs as, as Istio's does: its own connections are let
/// through by the rules, everyone else's (the app's, root's here) are redirected.
const PROXY_UID: &str = "1337";
const ADMIN: u16 = 15000;

/// grpcurl's `GetContact(c1)` from inside `ns` to `addr`, plaintext as the app dials it.
fn get_contact(ns: &Netns, addr: &str) -> (bool, String) {
    let grpcurl = tool("grpcurl").display().to_string();
    let args = get_contact_args(&["-plaintext"], addr);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ns.run(&grpcurl, &args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// How payment's outbound claims the contact app's address.
#[derive(PartialEq, Clone, Copy)]
enum Claim {
    /// `10.233.N.2:8081`
    Ipv4,
    /// `[fd00:233:N::2]:8081`, through the IPv6 rules and listener.
    Ipv6,
    /// `contact.mesh.test:8081`, which a dnsmasq in the payment pod resolves to the IPv4
    /// address.
    Name,
}

/// The two pods: the dev CA (in no namespace: its unix sockets are reachable from both),
/// contact's app (loopback only) and inbound sidecar in `b`, payment's sidecar in `a`,
/// running as `PROXY_UID`, with only a transparent listener for contact.
struct Pods {
    a: Netns,
    b: Netns,
    ip_b: String,
    _dir: tempfile::TempDir,
    _ca: DevCa,
    _app: Proc,
    contact: Proc,
    payment: Proc,
    /// The payment pod's DNS server, when the claim is by name.
    _dns: Option<Proc>,
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

impl Pods {
    fn start(unmatched: &str) -> Pods {
        Pods::start_with(unmatched, Claim::Ipv4)
    }

    /// Payment claims the contact app's address as `claim` says.
    fn start_with(unmatched: &str, claim: Claim) -> Pods {
        let by_name = claim == Claim::Name;
        let (a, b, _ip_a, ip_b) = pair();
        let dir = tempfile::tempdir().unwrap();
        // The payment sidecar runs as another uid: it must reach the files and sockets.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let ca = DevCa::start(
            dir.path(),
            &["payment-service", "contact-service"],
            "1h",
            &[],
        );
        for id in ["payment-service", "contact-service"] {
            let sock = dir.path().join(format!("{id}.sock"));
            std::fs::set_permissions(&sock, std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let bin = dir.path().join("meshd");
        std::fs::copy(meshd_bin(), &bin).unwrap();
        std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
        let bin = bin.display().to_string();

        let app = b.spawn(
            "contact-app",
            &bin,
            &[
                "demo-app",
                "--service",
                "contact",
                "--listen",
                "127.0.0.1:8081",
            ],
            Some("demo-app ready"),
        );
        let policy = write(
            dir.path(),
            "contact-policy.yaml",
            &format!(
                "service: contact-service\ndefault: deny\nrules:\n  - name: payment-reads-contacts\n    from: [\"{PAYMENT}\"]\n"
            ),
        );
        let contact_cfg = write(
            dir.path(),
            "contact.yaml",
            &format!(
                "service: contact-service\nidentity:\n  workload_api: {}\ninbound:\n  listen: 0.0.0.0:15006\n  forward: 127.0.0.1:8081\n  protocol: grpc\n  policy: {policy}\nadmin:\n  listen: 127.0.0.1:{ADMIN}\nlog:\n  access: all\n",
                ca.socket("contact-service")
            ),
        );
        let contact = b.spawn(
            "contact-sidecar",
            &bin,
            &["run", "--config", &contact_cfg],
            None,
        );
        b.wait_ready(ADMIN, &contact);

        let mut dns = None;
        let intercept = if by_name {
            let hosts = write(
                dir.path(),
                "dns-hosts",
                &format!("{ip_b} contact.mesh.test\n"),
            );
            let (bin, args) = dnsmasq_command(5353, Path::new(&hosts));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            dns = Some(a.spawn("dnsmasq", bin, &args, Some("read ")));
            "contact.mesh.test:8081".to_string()
        } else if claim == Claim::Ipv6 {
            format!("[{}]:8081", ipv6_of(&ip_b))
        } else {
            format!("{ip_b}:8081")
        };
        let discovery = if by_name {
            "discovery:\n  nameservers: [\"127.0.0.1:5353\"]\n"
        } else {
            ""
        };
        let payment_cfg = write(
            dir.path(),
            "payment.yaml",
            &format!(
                "service: payment-service\nidentity:\n  workload_api: {}\n  expect: {PAYMENT}\noutbound:\n  - name: contact-service\n    intercept: [\"{intercept}\"]\n    protocol: grpc\n    endpoints: [\"{ip_b}:15006\"]\n    server_id: spiffe://jia.app/contact-service\ntransparent:\n  listen: 127.0.0.1:15001\n  unmatched: {unmatched}\nadmin:\n  listen: 127.0.0.1:{ADMIN}\n{discovery}",
                ca.socket("payment-service")
            ),
        );
        let uid = format!("--reuid={PROXY_UID}");
        let gid = format!("--regid={PROXY_UID}");
        let payment = a.spawn(
            "payment-sidecar",
            "setpriv",
            &[
                &uid,
                &gid,
                "--clear-groups",
                &bin,
                "run",
                "--config",
                &payment_cfg,
            ],
            None,
        );
        a.wait_ready(ADMIN, &payment);
        Pods {
            a,
            b,
            ip_b,
            _dir: dir,
            _ca: ca,
            _app: app,
            contact,
            payment,
            _dns: dns,
        }
    }

    fn meshd_in_a(&self, args: &[&str]) -> String {
        self.a.must(&meshd_bin().display().to_string(), args)
    }

    fn intercepted(&self, result: &str) -> f64 {
        let label = format!("result=\"{result}\"");
        self.a
            .metric(ADMIN, "meshd_intercepted_connections_total", &[&label])
    }

    fn nat_rules(&self, ns: &Netns) -> String {
        ns.must("iptables", &["-w", "-t", "nat", "-S"])
    }
}

// Story: before the rules, the contact app's address answers nothing (its port is on
// loopback in its pod). `meshd iptables install` in the payment pod makes the same
// plaintext call succeed: it was redirected to the transparent listener, matched to the
// contact outbound by its original destination, and arrived at contact over mTLS as
// payment-service. A second install leaves one set of rules; uninstall removes them all,
// and the call fails again.
#[test]
fn the_app_dials_the_service_and_the_sidecar_carries_it_over_mtls() {
    let p = Pods::start("deny");
    let service = format!("{}:8081", p.ip_b);
    let (ok, text) = get_contact(&p.a, &service);
    assert!(
        !ok,
        "contact's app port answered without interception: {text}"
    );

    let installed = p.meshd_in_a(&["iptables", "install", "--proxy-uid", PROXY_UID]);
    assert!(installed.contains("installed"), "{installed}");
    let (ok, text) = get_contact(&p.a, &service);
    assert!(
        ok,
        "the intercepted call failed: {text}\n{}\n{}",
        p.payment.dump(),
        p.contact.dump()
    );
    assert!(text.contains("c1"), "{text}");
    assert!(p.intercepted("routed") >= 1.0, "not counted as routed");
    // Recorded when the response body ends, which may be just after grpcurl has it.
    let peer = format!("peer_id=\"{PAYMENT}\"");
    let seen = wait_until(Duration::from_secs(5), || {
        let parts = ["direction=\"inbound\"", peer.as_str()];
        p.b.metric(ADMIN, "meshd_requests_total", &parts) >= 1.0
    });
    assert!(
        seen,
        "contact's sidecar did not see payment-service:\n{}",
        p.contact.dump()
    );

    // Idempotent: a second install replaces the rules rather than adding to them.
    p.meshd_in_a(&["iptables", "install", "--proxy-uid", PROXY_UID]);
    let rules = p.nat_rules(&p.a);
    assert_eq!(
        rules.matches("-A OUTPUT -p tcp -j MESHD_OUTPUT").count(),
        1,
        "{rules}"
    );
    assert_eq!(
        rules.matches("REDIRECT --to-ports 15001").count(),
        1,
        "{rules}"
    );
    let printed = p.meshd_in_a(&["iptables", "print", "--proxy-uid", PROXY_UID]);
    assert!(printed.contains("--uid-owner 1337 -j RETURN"), "{printed}");

    let removed = p.meshd_in_a(&["iptables", "uninstall"]);
    assert!(removed.contains("no meshd rules left"), "{removed}");
    let rules = p.nat_rules(&p.a);
    assert!(!rules.contains("MESHD"), "left behind:\n{rules}");
    let (ok, text) = get_contact(&p.a, &service);
    assert!(!ok, "the call still went through after uninstall: {text}");
}

// Story: payment claims the contact service by name; the transparent listener resolves
// the name (through the pod's DNS server) and routes the app's call to the address it
// resolves to, as it does for a claim by IP.
#[test]
fn a_claim_by_name_follows_the_address_it_resolves_to() {
    let p = Pods::start_with("deny", Claim::Name);
    p.meshd_in_a(&["iptables", "install", "--proxy-uid", PROXY_UID]);
    let (ok, text) = get_contact(&p.a, &format!("{}:8081", p.ip_b));
    assert!(
        ok,
        "the call to the resolved address failed: {text}\n{}",
        p.payment.dump()
    );
    assert!(p.intercepted("routed") >= 1.0, "not counted as routed");
}

// Story: the app dials the contact pod's IPv6 address; the ip6tables rules send it to the
// transparent listener on [::1]:15001, which reads the IPv6 original destination and
// carries the call like any other.
#[test]
fn an_ipv6_destination_is_intercepted_too() {
    let p = Pods::start_with("deny", Claim::Ipv6);
    let installed = p.meshd_in_a(&["iptables", "install", "--proxy-uid", PROXY_UID]);
    assert!(installed.contains("ip6tables-restore"), "{installed}");
    let service = format!("[{}]:8081", ipv6_of(&p.ip_b));
    let (ok, text) = get_contact(&p.a, &service);
    assert!(ok, "the IPv6 call failed: {text}\n{}", p.payment.dump());
    assert!(p.intercepted("routed") >= 1.0, "not counted as routed");
    let rules = p.a.must("ip6tables", &["-w", "-t", "nat", "-S"]);
    assert!(
        rules.contains("-A MESHD_REDIRECT -p tcp -j REDIRECT --to-ports 15001"),
        "{rules}"
    );
    p.meshd_in_a(&["iptables", "uninstall"]);
    let rules = p.a.must("ip6tables", &["-w", "-t", "nat", "-S"]);
    assert!(!rules.contains("MESHD"), "left behind:\n{rules}");
}

// Story: with `unmatched: deny` (the default), a destination no outbound intercepts is
// closed and counted; a connection made to the transparent listener itself (not
// redirected) is closed too, instead of being relayed back into meshd.
#[test]
fn a_destination_no_outbound_claims_is_closed_and_counted() {
    let p = Pods::start("deny");
    p.meshd_in_a(&["iptables", "install", "--proxy-uid", PROXY_UID]);
    let other = format!("{}:9999", p.ip_b);
    let (ok, text) = get_contact(&p.a, &other);
    assert!(!ok, "an unclaimed destination was served: {text}");
    let counted = wait_until(Duration::from_secs(5), || p.intercepted("unmatched") >= 1.0);
    assert!(counted, "not counted as unmatched:\n{}", p.payment.dump());
    assert!(
        p.payment
            .dump()
            .contains(&format!("to {other} closed: no outbound intercepts")),
        "{}",
        p.payment.dump()
    );

    let (ok, _) = get_contact(&p.a, "127.0.0.1:15001");
    assert!(
        !ok,
        "a direct connection to the transparent listener was served"
    );
    let counted = wait_until(Duration::from_secs(5), || {
        p.intercepted("not_redirected") >= 1.0
    });
    assert!(
        counted,
        "the direct connection was not refused:\n{}",
        p.payment.dump()
    );
}

// Story: with `unmatched: passthrough`, a destination no outbound claims (a plain HTTP
// server on the contact pod's veth address) is reached as plain TCP, and counted.
#[test]
fn passthrough_relays_an_unclaimed_destination_as_plain_tcp() {
    let p = Pods::start("passthrough");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("hello.txt"), "hello from b\n").unwrap();
    let _plain = p.b.spawn(
        "plain-http",
        "python3",
        &[
            "-u",
            "-m",
            "http.server",
            "--bind",
            &p.ip_b,
            "--directory",
            &dir.path().display().to_string(),
            "9090",
        ],
        Some("Serving HTTP"),
    );
    p.meshd_in_a(&["iptables", "install", "--proxy-uid", PROXY_UID]);
    let url = format!("http://{}:9090/hello.txt", p.ip_b);
    let out = p.a.run("curl", &["-s", "-m", "5", &url]);
    let body = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        body,
        "hello from b\n",
        "passthrough failed:\n{}",
        p.payment.dump()
    );
    assert!(
        p.intercepted("passthrough") >= 1.0,
        "not counted as passthrough"
    );
    assert_eq!(p.intercepted("unmatched"), 0.0);
}

// Story: the rules name a uid meshd does not run as, so meshd's own passthrough
// connection is redirected back to it. meshd recognises it and closes it instead of
// relaying it again (which would loop until the pod ran out of sockets), says why, and
// keeps serving.
#[test]
fn a_passthrough_redirected_back_to_meshd_is_refused_not_looped() {
    let p = Pods::start("passthrough");
    p.meshd_in_a(&["iptables", "install", "--proxy-uid", "4242"]);
    let url = format!("http://{}:9999/", p.ip_b);
    let out = p.a.run("curl", &["-s", "-m", "5", &url]);
    assert!(!out.status.success(), "the looped connection got an answer");
    let counted = wait_until(Duration::from_secs(5), || p.intercepted("loop") >= 1.0);
    assert!(counted, "the loop was not refused:\n{}", p.payment.dump());
    assert!(
        p.payment.dump().contains("--proxy-uid"),
        "{}",
        p.payment.dump()
    );
    assert_eq!(p.intercepted("loop"), 1.0, "more than one hop went round");
    assert_eq!(p.a.admin_get(ADMIN, "/live").0, 200);
}

// Story: `--inbound-ports 8081` in the contact pod sends whatever arrives for the app's
// port to the mTLS inbound: a plaintext client that finds the port meets a TLS handshake
// it cannot pass, and contact's sidecar counts the failure.
#[test]
fn inbound_ports_send_plaintext_clients_to_the_mtls_listener() {
    let p = Pods::start("deny");
    let contact_bin = meshd_bin().display().to_string();
    p.b.must(
        &contact_bin,
        &["iptables", "install", "--inbound-ports", "8081"],
    );
    let before = p.b.metric(
        ADMIN,
        "meshd_tls_handshake_failures_total",
        &["direction=\"inbound\""],
    );
    let (ok, text) = get_contact(&p.a, &format!("{}:8081", p.ip_b));
    assert!(!ok, "a plaintext client got through: {text}");
    let failed = wait_until(Duration::from_secs(5), || {
        p.b.metric(
            ADMIN,
            "meshd_tls_handshake_failures_total",
            &["direction=\"inbound\""],
        ) > before
    });
    assert!(
        failed,
        "the plaintext client never reached the mTLS inbound:\n{}",
        p.contact.dump()
    );
}

// Story: bad options are named, and nothing is installed.
#[test]
fn a_bad_network_is_named_and_nothing_changes() {
    let (a, _b, _, _) = pair();
    let bin = meshd_bin().display().to_string();
    let out = a.run(
        &bin,
        &[
            "iptables",
            "install",
            "--exclude-outbound-cidrs",
            "10.0.0.0/33",
        ],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`10.0.0.0/33`"), "{err}");
    let rules = a.must("iptables", &["-w", "-t", "nat", "-S"]);
    assert!(!rules.contains("MESHD"), "{rules}");
}
