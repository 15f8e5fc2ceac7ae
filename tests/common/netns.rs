//! Network namespaces for the interception tests: a pair joined by a veth link, each with
//! its own loopback and its own iptables, so rules installed in one touch nothing else on
//! the machine. Processes are started inside with `ip netns exec` (which execs, so the PID
//! is the process's own and `Proc` stops exactly it); the namespaces are deleted on drop.
#![allow(dead_code)]

use super::meshd::{wait_until, Proc};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

/// One network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

/// Runs a command to its end; a missing program fails the test with its name.
pub fn sh(program: &str, args: &[&str]) -> Output {
    Command::new(program).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run `{program}` ({e}): run the tests through tests/run.sh, which installs it")
    })
}

fn must(program: &str, args: &[&str]) {
    let out = sh(program, args);
    assert!(
        out.status.success(),
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

impl Netns {
    /// A command that runs `program` inside this namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }

    /// Runs `program args` inside to its end.
    pub fn run(&self, program: &str, args: &[&str]) -> Output {
        let mut c = self.command(program);
        c.args(args);
        c.output()
            .unwrap_or_else(|e| panic!("cannot run `{program}` in {}: {e}", self.name))
    }

    /// Like `run`, and the command must succeed.
    pub fn must(&self, program: &str, args: &[&str]) -> String {
        let out = self.run(program, args);
        assert!(
            out.status.success(),
            "`{program} {}` in {} failed: {}{}",
            args.join(" "),
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running process inside, waiting for `marker` on its output if given.
    pub fn spawn(&self, name: &str, program: &str, args: &[&str], marker: Option<&str>) -> Proc {
        let mut c = self.command(program);
        c.args(args);
        Proc::spawn(name, c, marker)
    }

    /// An admin GET from inside the namespace (its loopback is its own): status and body.
    pub fn admin_get(&self, admin_port: u16, path: &str) -> (u16, String) {
        let url = format!("http://127.0.0.1:{admin_port}{path}");
        let out = self.run(
            "curl",
            &["-s", "-m", "5", "-w", "\n%{http_code}", url.as_str()],
        );
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.trim().parse().unwrap_or(0), body.to_string())
    }

    /// Waits until the sidecar whose admin is on `admin_port` answers `/ready` 200.
    pub fn wait_ready(&self, admin_port: u16, who: &Proc) {
        let ok = wait_until(Duration::from_secs(20), || {
            self.admin_get(admin_port, "/ready").0 == 200
        });
        assert!(
            ok,
            "{} in {} never became ready: {:?}\n{}",
            who.name,
            self.name,
            self.admin_get(admin_port, "/ready"),
            who.dump()
        );
    }

    /// The sum of the metric lines `name{...}` containing all `parts`, read from inside.
    pub fn metric(&self, admin_port: u16, name: &str, parts: &[&str]) -> f64 {
        let (_, body) = self.admin_get(admin_port, "/metrics");
        body.lines()
            .filter(|l| l.starts_with(name) && parts.iter().all(|p| l.contains(p)))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = sh("ip", &["netns", "del", &self.name]);
    }
}

/// The IPv6 address of a namespace of [`pair`], from its IPv4 one: 10.233.N.X is
/// fd00:233:N::X.
pub fn ipv6_of(ip: &str) -> String {
    let parts: Vec<&str> = ip.split('.').collect();
    format!("fd00:233:{}::{}", parts[2], parts[3])
}

/// Two namespaces joined by a veth link: `a` is 10.233.N.1/24 and fd00:233:N::1/64, `b`
/// is 10.233.N.2/24 and fd00:233:N::2/64 ([`ipv6_of`]), both with loopback up. N and the names differ per call and per test process.
pub fn pair() -> (Netns, Netns, String, String) {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tag = format!("{}x{n}", std::process::id() % 100_000);
    let (a, b) = (
        Netns {
            name: format!("meshd-{tag}-a"),
        },
        Netns {
            name: format!("meshd-{tag}-b"),
        },
    );
    must("ip", &["netns", "add", &a.name]);
    must("ip", &["netns", "add", &b.name]);
    let (va, vb) = (format!("mv{tag}a"), format!("mv{tag}b"));
    must(
        "ip",
        &["link", "add", &va, "type", "veth", "peer", "name", &vb],
    );
    must("ip", &["link", "set", &va, "netns", &a.name]);
    must("ip", &["link", "set", &vb, "netns", &b.name]);
    let subnet = 1 + n % 250;
    let (ip_a, ip_b) = (format!("10.233.{subnet}.1"), format!("10.233.{subnet}.2"));
    for (ns, dev, ip) in [(&a, &va, &ip_a), (&b, &vb, &ip_b)] {
        ns.must("ip", &["link", "set", "lo", "up"]);
        ns.must("ip", &["addr", "add", &format!("{ip}/24"), "dev", dev]);
        // nodad: usable at once, without duplicate address detection's wait.
        let v6 = format!("{}/64", ipv6_of(ip));
        ns.must("ip", &["-6", "addr", "add", &v6, "dev", dev, "nodad"]);
        ns.must("ip", &["link", "set", dev, "up"]);
    }
    (a, b, ip_a, ip_b)
}
