//! `meshd demo` as a newcomer runs it: the one-shot tour passes (its payment -> document
//! hop carrying a JWT-SVID the document sidecar checks), a second demo beside a running one
//! still works, the printed commands work, and Ctrl-C leaves nothing behind.
//! The tests share loopback default ports, so they run one at a time (a lock).

mod common;

use common::meshd::{meshd_bin, Proc};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One demo test at a time: each starts whole topologies on shared default ports.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn lock() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs `meshd demo --once` to the end (at most 120 s); (exit code, stdout + stderr).
fn demo_once() -> (Option<i32>, String) {
    let mut child = Command::new(meshd_bin())
        .args(["demo", "--once"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start meshd demo --once");
    let deadline = Instant::now() + Duration::from_secs(120);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    (out.status.code(), text)
}

/// A long-running `meshd demo`, waited for until its tour is done and it says it runs.
fn demo_running() -> Proc {
    let mut cmd = Command::new(meshd_bin());
    cmd.arg("demo");
    Proc::spawn("demo", cmd, Some("demo running"))
}

/// The value after `prefix` on the line that starts with it.
fn line_value(p: &Proc, prefix: &str) -> String {
    p.output
        .lock()
        .unwrap()
        .iter()
        .find_map(|l| l.strip_prefix(prefix).map(str::to_string))
        .unwrap_or_else(|| panic!("no `{prefix}` line:\n{}", p.dump()))
}

fn assert_every_step_passed(out: &str) {
    for step in [
        "allowed call",
        "denied caller",
        "plaintext to inbound",
        "SVID rotation",
        "admin endpoints",
        "JSON at the edge",
    ] {
        assert!(
            out.lines().any(|l| l.contains(step) && l.contains("PASS")),
            "step `{step}` did not pass:\n{out}"
        );
    }
    assert!(!out.contains("FAIL"), "{out}");
    assert!(out.contains("tour: all 6 steps passed"), "{out}");
}

// Story: CI runs the newcomer's one command; every step of the tour passes, the exit code
// is 0, the chain of SPIFFE IDs and the denied rule are shown, the summary and the tour say
// that payment calls document with mTLS and a JWT-SVID which the document sidecar checked,
// and the temp dir is gone.
#[test]
fn demo_once_passes() {
    let _one = lock();
    let (code, out) = demo_once();
    assert_eq!(code, Some(0), "{out}");
    assert_every_step_passed(&out);
    assert!(out.contains("saw spiffe://jia.app/api-gateway"), "{out}");
    assert!(out.contains("PERMISSION_DENIED"), "{out}");
    assert!(out.contains("0 failed"), "{out}");
    assert!(
        out.contains("(mTLS + JWT-SVID for document-service)")
            && out.contains("-> document sidecar 127.0.0.1:")
            && out.contains("(mTLS + JWT-SVID)"),
        "the summary shows the JWT-SVID hop:\n{out}"
    );
    assert!(
        out.contains("document sidecar  checked payment's JWT-SVID for document-service too"),
        "the allowed call went through the JWT-SVID check:\n{out}"
    );
    let dir = out
        .lines()
        .find_map(|l| l.strip_prefix("demo dir: "))
        .expect("demo dir line");
    assert!(!PathBuf::from(dir).exists(), "{dir} was left behind");
}

// Story: a demo is already running when someone starts another: the second one takes
// other ports (and says which defaults were taken) and passes, or says clearly why it
// cannot; either way the first demo keeps working.
#[test]
fn a_second_demo_beside_a_running_one() {
    let _one = lock();
    let first = demo_running();
    let (code, out) = demo_once();
    if code == Some(0) {
        assert_every_step_passed(&out);
        assert!(out.contains("is taken: "), "no port note:\n{out}");
    } else {
        assert!(
            out.contains("meshd demo: ") || out.contains("tour: failed step"),
            "a failing second demo must say why:\n{out}"
        );
    }
    let admin = line_value(&first, "  payment sidecar admin: ");
    let admin = admin
        .split_whitespace()
        .next()
        .and_then(|u| u.strip_prefix("http://"))
        .and_then(|u| u.strip_suffix("/metrics"))
        .expect("admin address")
        .parse()
        .unwrap();
    let ready = common::meshd::http(admin, "GET", "/ready");
    assert!(
        ready.as_ref().is_some_and(|(c, _)| *c == 200),
        "the first demo broke: {ready:?}\n{}",
        first.dump()
    );
    stop(first);
}

/// Stops a running demo as Ctrl-C would, so no temp dir is left behind.
fn stop(mut demo: Proc) {
    demo.signal("INT");
    assert!(
        demo.wait_exit(Duration::from_secs(10)).is_some(),
        "{}",
        demo.dump()
    );
}

// Story: a newcomer pastes the printed grpcurl and curl commands into a shell while the
// demo runs; the allowed call answers with the identity chain, through the api-gateway's
// sidecar and through the edge gateway with the demo's JWT; the intruder's is denied; the
// design's two curl commands get JSON answers from the edge gateway; the document sidecar's
// metrics show the JWT-SVIDs it accepted (every payment so far sent one).
#[test]
fn printed_commands_work() {
    let _one = lock();
    let demo = demo_running();
    let lines: Vec<String> = demo.output.lock().unwrap().clone();
    let commands: Vec<&str> = lines
        .iter()
        .map(|l| l.trim())
        .filter(|l| l.starts_with("grpcurl ") || l.starts_with("curl "))
        .collect();
    assert_eq!(commands.len(), 11, "{}", demo.dump());
    let grpcurl = Command::new("grpcurl").arg("-version").output();
    assert!(
        grpcurl.is_ok(),
        "grpcurl is missing: run tests/run.sh (it installs it) or put it on PATH"
    );
    for cmd in commands {
        let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let text = stdout.clone() + &String::from_utf8_lossy(&out.stderr);
        if cmd.starts_with("curl --cacert") && cmd.contains("CreatePayment") {
            // The design's first command: its JSON body verbatim, a JSON payment back.
            assert!(out.status.success(), "{cmd}\n{text}");
            let p: serde_json::Value = serde_json::from_str(&stdout).expect(&text);
            assert_eq!(p["amountCents"], "2999", "{text}");
            assert_eq!(p["customerId"], "user_123", "{text}");
            assert_eq!(
                p["identityChain"][0], "spiffe://jia.app/api-gateway",
                "{text}"
            );
        } else if cmd.starts_with("curl --cacert") && cmd.contains("/v1/customers/") {
            // The REST surface: a JSON array of user_123's payments (the tour's and the
            // one the design's command above just made).
            assert!(out.status.success(), "{cmd}\n{text}");
            let list: serde_json::Value = serde_json::from_str(&stdout).expect(&text);
            let list = list.as_array().expect(&text);
            assert!(list.len() >= 2, "{text}");
            assert!(list.iter().all(|p| p["customerId"] == "user_123"), "{text}");
        } else if cmd.starts_with("curl --cacert") {
            // The design's second command: a GET with no body.
            assert!(out.status.success(), "{cmd}\n{text}");
            let zones: serde_json::Value = serde_json::from_str(&stdout).expect(&text);
            assert_eq!(zones["zones"].as_array().map(Vec::len), Some(3), "{text}");
        } else if cmd.contains("grpcurl") && cmd.contains("-cacert") {
            // Through the edge gateway, with the demo's token.
            assert!(out.status.success(), "{cmd}\n{text}");
            assert!(text.contains("identityChain"), "{cmd}\n{text}");
        } else if cmd.contains("grpcurl")
            && cmd.contains(&format!(
                "127.0.0.1:{} ",
                port_of(&lines, "api-gateway sidecar")
            ))
        {
            assert!(out.status.success(), "{cmd}\n{text}");
            assert!(text.contains("identityChain"), "{cmd}\n{text}");
        } else if cmd.contains("grpcurl") {
            assert!(text.contains("PermissionDenied"), "{cmd}\n{text}");
        } else if cmd.contains("meshd_jwt_svid_validations_total") {
            let ok: f64 = stdout
                .lines()
                .filter(|l| l.contains("result=\"ok\""))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            assert!(ok >= 1.0, "no JWT-SVID accepted: {cmd}\n{text}");
            for bad in ["missing", "audience", "unknown_key"] {
                let line = format!("meshd_jwt_svid_validations_total{{result=\"{bad}\"}} 0");
                assert!(stdout.contains(&line), "{cmd}: want {line}\n{text}");
            }
        } else {
            assert!(out.status.success(), "{cmd}\n{text}");
            assert!(!text.trim().is_empty(), "{cmd} printed nothing");
        }
    }
    stop(demo);
}

/// The outbound port on the summary line of `who`.
fn port_of(lines: &[String], who: &str) -> u16 {
    lines
        .iter()
        .find(|l| l.trim_start().starts_with(who))
        .and_then(|l| l.split("outbound 127.0.0.1:").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|p| p.parse().ok())
        .expect("outbound port on the summary line")
}

// Story: Ctrl-C (SIGINT) stops a running demo within 10 s; none of its sidecar processes
// remain, and its temp dir with the Workload API sockets is gone.
#[test]
fn sigint_leaves_nothing_behind() {
    let _one = lock();
    let mut demo = demo_running();
    let pids: Vec<u32> = line_value(&demo, "demo pids: ")
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 6, "{}", demo.dump());
    let dir = PathBuf::from(line_value(&demo, "demo dir: "));
    assert!(dir.join("payment-service.sock").exists());
    for pid in &pids {
        assert!(PathBuf::from(format!("/proc/{pid}")).exists());
    }
    demo.signal("INT");
    let status = demo.wait_exit(Duration::from_secs(10));
    assert!(
        status.is_some(),
        "still running 10 s after SIGINT:\n{}",
        demo.dump()
    );
    for pid in &pids {
        assert!(
            !PathBuf::from(format!("/proc/{pid}")).exists(),
            "sidecar pid {pid} is still there:\n{}",
            demo.dump()
        );
    }
    assert!(!dir.exists(), "{} was left behind", dir.display());
    assert!(
        demo.wait_output("demo stopped", Duration::from_secs(1)),
        "{}",
        demo.dump()
    );
}
