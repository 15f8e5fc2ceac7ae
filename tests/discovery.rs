//! Discovery and load balancing through real processes: a real dnsmasq serves A and SRV
//! records from a hosts file the tests rewrite (SIGHUP reloads it, `--local-ttl=1`), the
//! payment sidecar resolves `contact` through it, and several contact replicas (a demo
//! app behind its own sidecar, each sidecar on its own loopback IP) count the requests
//! they receive in `meshd_requests_total`.

mod common;

use common::edge::dnsmasq_command;
use common::meshd::{free_port, meshd_bin, wait_until, Proc};
use common::replicas::{addr, ca, counts, payment, send, served_since, start_replicas, Replica};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A dnsmasq on a loopback port answering only from `hosts` and `--srv-host` records.
struct Dnsmasq {
    proc: Proc,
    port: u16,
    hosts: PathBuf,
}

impl Dnsmasq {
    fn start(dir: &Path, hosts: &str, srv: &[String]) -> Dnsmasq {
        let port = free_port();
        let file = dir.join("dns-hosts");
        std::fs::write(&file, hosts).unwrap();
        let (bin, args) = dnsmasq_command(port, &file);
        let mut cmd = Command::new(bin);
        cmd.args(args);
        for s in srv {
            cmd.arg(format!("--srv-host={s}"));
        }
        let proc = Proc::spawn("dnsmasq", cmd, Some("read "));
        Dnsmasq {
            proc,
            port,
            hosts: file,
        }
    }

    /// Replaces the hosts file and makes dnsmasq reload it.
    fn set_hosts(&self, text: &str) {
        let tmp = self.hosts.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.hosts).unwrap();
        self.proc.signal("HUP");
    }
}

// Story: contact runs as a headless Service; a replica is added and another removed by
// editing DNS, and within the TTL the payment sidecar sends traffic to exactly the
// replicas DNS names, without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dns_replicas_come_and_go_within_the_ttl() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (port, replicas) =
        start_replicas(dir.path(), &ca, &["127.0.0.2", "127.0.0.3", "127.0.0.4"]);
    let dns = Dnsmasq::start(
        dir.path(),
        "127.0.0.2 contact.mesh.test\n127.0.0.3 contact.mesh.test\n",
        &[],
    );
    let extra =
        format!("    endpoints: dns:///contact.mesh.test:{port}\n    balancer: round_robin\n");
    let (pay, outbound) = payment(dir.path(), &ca, "payment", &extra, Some(dns.port));
    pay.wait_ready();
    let pid = pay.proc.pid();

    assert_eq!(send(outbound, 40, 2).await, 0);
    let first = served_since(&replicas, &vec![0.0; replicas.len()], 40.0);
    assert_eq!(first[0] + first[1], 40.0, "{first:?}");
    assert!(first[0] > 0.0 && first[1] > 0.0, "{first:?}");
    assert_eq!(first[2], 0.0, "not in DNS yet: {first:?}");
    assert_eq!(
        pay.metric(
            "meshd_upstream_endpoints",
            &["service=\"contact-service\"", "state=\"healthy\""]
        ),
        2.0
    );

    // Scale: .4 joins, .2 leaves.
    dns.set_hosts("127.0.0.3 contact.mesh.test\n127.0.0.4 contact.mesh.test\n");
    let moved = wait_until(Duration::from_secs(10), || {
        let (_, body) = pay.get("/upstreams");
        body.contains(&format!("127.0.0.4:{port}")) && !body.contains(&format!("127.0.0.2:{port}"))
    });
    assert!(
        moved,
        "endpoints did not follow DNS: {}",
        pay.get("/upstreams").1
    );
    let before = counts(&replicas);
    assert_eq!(send(outbound, 40, 2).await, 0);
    let d = served_since(&replicas, &before, 40.0);
    assert_eq!(d[0], 0.0, "removed replica got traffic: {d:?}");
    assert_eq!(d[1] + d[2], 40.0, "{d:?}");
    assert!(d[2] > 0.0, "new replica got none: {d:?}");
    assert_eq!(pay.proc.pid(), pid);

    // DNS goes away: the last good set keeps serving, and the failure is counted.
    drop(dns);
    let counted = wait_until(Duration::from_secs(15), || {
        pay.metric(
            "meshd_discovery_errors_total",
            &["service=\"contact-service\""],
        ) > 0.0
    });
    assert!(counted, "{}", pay.proc.dump());
    assert_eq!(
        send(outbound, 10, 1).await,
        0,
        "stale endpoints still serve"
    );
    assert_eq!(pay.get("/ready").0, 200);
}

// Story: contact is published as SRV records with their own ports and weights 3 and 1;
// round robin honours both.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn srv_ports_and_weights_are_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let (p1, p2) = (free_port(), free_port());
    let replicas = vec![
        Replica::start(dir.path(), &ca, addr("127.0.0.2", p1), &[]),
        Replica::start(dir.path(), &ca, addr("127.0.0.3", p2), &[]),
    ];
    let dns = Dnsmasq::start(
        dir.path(),
        "127.0.0.2 r1.mesh.test\n127.0.0.3 r2.mesh.test\n",
        &[
            format!("_grpc._tcp.contact.mesh.test,r1.mesh.test,{p1},0,3"),
            format!("_grpc._tcp.contact.mesh.test,r2.mesh.test,{p2},0,1"),
        ],
    );
    let extra =
        "    endpoints: dns+srv:///_grpc._tcp.contact.mesh.test\n    balancer: round_robin\n";
    let (pay, outbound) = payment(dir.path(), &ca, "payment", extra, Some(dns.port));
    pay.wait_ready();
    assert_eq!(send(outbound, 80, 1).await, 0);
    let c = served_since(&replicas, &vec![0.0; replicas.len()], 80.0);
    assert_eq!(c, vec![60.0, 20.0], "weights 3:1 over SRV ports");
    let (_, body) = pay.get("/upstreams");
    assert!(body.contains(&format!("127.0.0.2:{p1}")) && body.contains("\"weight\": 3"));
}

// Story: one of three replicas answers 50 ms slower; P2C over peak-EWMA sends it well
// under a third of the calls while round robin sends it exactly a third.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn p2c_ewma_avoids_the_slow_replica_and_round_robin_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let port = free_port();
    let replicas = vec![
        Replica::start(dir.path(), &ca, addr("127.0.0.2", port), &[]),
        Replica::start(dir.path(), &ca, addr("127.0.0.3", port), &[]),
        Replica::start(
            dir.path(),
            &ca,
            addr("127.0.0.4", port),
            &["--delay", "50ms"],
        ),
    ];
    let list = format!(
        "    endpoints: [\"127.0.0.2:{port}\", \"127.0.0.3:{port}\", \"127.0.0.4:{port}\"]\n"
    );
    let (p2c, p2c_port) = payment(dir.path(), &ca, "payment-p2c", &list, None);
    let rr_extra = format!("{list}    balancer: round_robin\n");
    let (rr, rr_port) = payment(dir.path(), &ca, "payment-rr", &rr_extra, None);
    p2c.wait_ready();
    rr.wait_ready();

    let n = 300;
    let before = counts(&replicas);
    assert_eq!(send(p2c_port, n, 4).await, 0);
    let d = served_since(&replicas, &before, n as f64);
    let slow_share = d[2] / n as f64;
    eprintln!("P2C-EWMA distribution over (fast, fast, slow): {d:?}");
    assert!(
        slow_share < 0.15,
        "P2C-EWMA sent {slow_share:.2} of calls to the slow replica: {d:?}"
    );

    let before = counts(&replicas);
    assert_eq!(send(rr_port, n, 4).await, 0);
    let d = served_since(&replicas, &before, n as f64);
    assert_eq!(d, vec![100.0, 100.0, 100.0], "round robin is even");
    let (_, body) = p2c.get("/upstreams");
    assert!(body.contains("\"ewma_ms\""), "{body}");
}

// Story: an operator feeds bad input (a name that does not resolve, a SRV record
// pointing at nothing, a malformed endpoint file, a port out of range, an endpoint that
// is not who the file says): meshd stays up, says why, counts it, keeps the last good
// set, and never sends traffic to an endpoint that fails its server_id check.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_discovery_input_degrades_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ca(dir.path());
    let port = free_port();
    let replica = Replica::start(dir.path(), &ca, addr("127.0.0.2", port), &[]);
    let dns = Dnsmasq::start(
        dir.path(),
        "127.0.0.2 contact.mesh.test\n",
        &["_grpc._tcp.ghost.mesh.test,nothing.mesh.test,4000,0,1".to_string()],
    );

    // A name that does not resolve: not ready, and the reason names the upstream.
    let extra = format!("    endpoints: dns:///nope.mesh.test:{port}\n");
    let (pay, _) = payment(dir.path(), &ca, "payment-nxdomain", &extra, Some(dns.port));
    let said = wait_until(Duration::from_secs(10), || {
        let (code, body) = pay.get("/ready");
        code == 503 && body.contains("contact-service") && body.contains("nope.mesh.test")
    });
    assert!(said, "{:?}", pay.get("/ready"));
    drop(pay);

    // A SRV record whose target has no address.
    let extra = "    endpoints: dns+srv:///_grpc._tcp.ghost.mesh.test\n";
    let (pay, out) = payment(dir.path(), &ca, "payment-srv", extra, Some(dns.port));
    let said = wait_until(Duration::from_secs(10), || {
        pay.get("/ready").1.contains("nothing.mesh.test")
    });
    assert!(said, "{:?}", pay.get("/ready"));
    assert_eq!(send(out, 1, 1).await, 1, "no endpoints: the call fails");
    drop(pay);

    // A file: malformed first, then a port out of range, then good, then malformed.
    let file = dir.path().join("contact-endpoints.yaml");
    std::fs::write(&file, "- address: [127.0.0.2\n").unwrap();
    let extra = format!("    endpoints: file://{}\n", file.display());
    let (pay, out) = payment(dir.path(), &ca, "payment-file", &extra, None);
    let said = wait_until(Duration::from_secs(10), || {
        let (code, body) = pay.get("/ready");
        code == 503 && body.contains("contact-endpoints.yaml")
    });
    assert!(said, "{:?}", pay.get("/ready"));
    std::fs::write(&file, "- 127.0.0.2:70000\n").unwrap();
    let said = wait_until(Duration::from_secs(10), || {
        pay.get("/ready").1.contains("not in 1..=65535")
    });
    assert!(said, "{:?}", pay.get("/ready"));
    std::fs::write(&file, format!("- address: 127.0.0.2:{port}\n  zone: z1\n")).unwrap();
    pay.wait_ready();
    assert_eq!(send(out, 5, 1).await, 0);
    std::fs::write(&file, "not: [a list\n").unwrap();
    let counted = wait_until(Duration::from_secs(10), || {
        pay.metric(
            "meshd_discovery_errors_total",
            &["service=\"contact-service\"", "reason=\"bad_file\""],
        ) >= 3.0
    });
    assert!(counted, "{}", pay.get("/metrics").1);
    assert_eq!(send(out, 5, 1).await, 0, "the last good file keeps serving");
    assert_eq!(pay.get("/ready").0, 200);

    // The file says this endpoint is family-service; contact's sidecar is not, so the
    // handshake fails and the contact app sees nothing.
    let served = replica.served();
    std::fs::write(
        &file,
        format!("- address: 127.0.0.2:{port}\n  server_id: spiffe://jia.app/family-service\n"),
    )
    .unwrap();
    let switched = wait_until(Duration::from_secs(10), || {
        pay.get("/upstreams")
            .1
            .contains("spiffe://jia.app/family-service")
    });
    assert!(switched, "{}", pay.get("/upstreams").1);
    assert_eq!(
        send(out, 5, 1).await,
        5,
        "a wrong server_id gets no traffic"
    );
    assert_eq!(replica.served(), served);
    assert!(
        pay.metric(
            "meshd_tls_handshake_failures_total",
            &["reason=\"wrong_server_id\""]
        ) > 0.0
    );

    // A port out of range in the config itself is a clear error from `meshd check`.
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "service: p\noutbound:\n  - name: c\n    listen: 127.0.0.1:1\n    endpoints: dns:///c.mesh.test:70000\n    server_id: spiffe://jia.app/c\n",
    )
    .unwrap();
    let out = Command::new(meshd_bin())
        .args(["check", "--config"])
        .arg(&bad)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("70000"), "{text}");
}
