//! The real SPIRE that the other integration tests rely on: `spire/up.sh` starts it, the
//! reference identities are served per uid, and the helper's knobs (entries, federated
//! bundles, agent restart) do what they say.

mod common;

use common::spire::{Spire, IDENTITIES};
use std::process::Command;
use std::time::Duration;

/// Payment-service's uid asks the agent for its identity and gets exactly that one.
#[test]
fn payment_uid_gets_payment_svid() {
    let spire = Spire::up();
    let out = spire.fetch_x509_as(20001).expect("fetch x509 as uid 20001");
    assert!(
        out.contains("spiffe://jia.app/payment-service"),
        "fetch output:\n{out}"
    );
    assert!(
        !out.contains("spiffe://jia.app/api-gateway"),
        "fetch output:\n{out}"
    );
}

/// Every reference identity is served to its own uid, and a uid with no entry gets nothing.
#[test]
fn every_reference_uid_is_served_and_strangers_are_not() {
    let spire = Spire::up();
    for (name, uid) in IDENTITIES {
        let out = spire
            .fetch_x509_as(uid)
            .unwrap_or_else(|e| panic!("uid {uid}: {e}"));
        assert!(
            out.contains(&format!("spiffe://jia.app/{name}")),
            "uid {uid}:\n{out}"
        );
    }
    assert!(
        spire.fetch_x509_as(20999).is_err(),
        "uid 20999 has no entry"
    );
}

/// An entry created by a test is served after the agent syncs, and gone after deletion.
#[test]
fn created_entry_is_served_then_deleted() {
    let spire = Spire::up();
    let id = "spiffe://jia.app/extra-service";
    let entry = spire.create_entry(id, 20010, Some(120));
    spire.wait_served(20010, id, Duration::from_secs(30));
    spire.delete_entry(&entry);
    spire.wait_not_served(20010, id, Duration::from_secs(30));
}

/// The agent comes back after a restart with its node identity (no new join token) and
/// serves the same workloads; a federated bundle set on the server shows up in `bundle list`.
#[test]
fn agent_restart_keeps_node_identity_and_bundle_set_works() {
    let spire = Spire::up();
    spire.stop_agent();
    assert!(
        !spire.agent_socket().exists(),
        "agent socket removed on stop"
    );
    assert!(spire.fetch_x509_as(20001).is_err(), "no agent, no SVID");
    spire.start_agent();
    spire.wait_served(
        20001,
        "spiffe://jia.app/payment-service",
        Duration::from_secs(30),
    );
    let agents = spire.server_cli(&["agent", "list"]);
    assert!(
        agents.contains(spire.agent_id()),
        "same agent ID after restart:\n{agents}"
    );

    let pem = test_ca_pem(&spire);
    spire.bundle_set("other.test", &pem);
    let list = spire.server_cli(&["bundle", "list", "-id", "spiffe://other.test"]);
    assert!(
        list.contains("BEGIN CERTIFICATE"),
        "federated bundle stored:\n{list}"
    );
}

/// A throwaway self-signed CA certificate, made with the openssl CLI.
fn test_ca_pem(spire: &Spire) -> String {
    let dir = spire.run_dir();
    let status = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
        ])
        .args([
            "-subj",
            "/CN=other.test CA",
            "-days",
            "1",
            "-addext",
            "basicConstraints=critical,CA:true",
        ])
        .arg("-keyout")
        .arg(dir.join("other-ca.key"))
        .arg("-out")
        .arg(dir.join("other-ca.pem"))
        .output()
        .expect("run openssl");
    assert!(status.status.success(), "openssl: {status:?}");
    std::fs::read_to_string(dir.join("other-ca.pem")).expect("read CA pem")
}
