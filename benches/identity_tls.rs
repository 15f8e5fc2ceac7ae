//! Costs on the connection path: SPIFFE ID parsing, X.509-SVID leaf checks, the inbound's
//! check of a client's SVID chain (first sight, and found again in the verified-chain
//! cache), and a whole in-memory mutual-TLS handshake between `tls::server_config` and
//! `tls::client_config` (rustls `ServerConnection`/`ClientConnection` fed from each other's
//! buffers, no sockets).
//!
//! Before the criterion runs, `main` checks that the setup measures what it claims: the
//! handshake ends with the client's SPIFFE ID seen by the server, and a client that expects
//! another server ID is refused (so the verifier is really on the measured path), and the
//! chain check accepts the client's SVID but refuses the same SVID against another CA.

use criterion::{criterion_group, BatchSize, Criterion};
use meshd::config::parse_spiffe_id;
use meshd::dev_ca::DevCa;
use meshd::identity::{crypto_provider, parse_svid_leaf, BundleSet, IdentitySnapshot, Svid};
use meshd::tls::spiffe_server_name;
use meshd::tls::{client_config, client_verifier, peer_id, server_config};
use rustls::client::Resumption;
use rustls::{ClientConfig, ClientConnection, Connection, ServerConfig, ServerConnection};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use std::hint::black_box;
use std::sync::Arc;
use std::time::Duration;

const CLIENT: &str = "spiffe://jia.app/bench-client";
const SERVER: &str = "spiffe://jia.app/bench-server";

/// An identity snapshot for `id`, issued by `ca`, trusting `ca`'s bundle.
fn snapshot(ca: &DevCa, id: &str) -> IdentitySnapshot {
    let id = parse_spiffe_id(id).expect("bench id");
    let issued = ca
        .issue_svid(&id, Duration::from_secs(3600))
        .expect("issue SVID");
    let chain = issued
        .chain_der
        .into_iter()
        .map(CertificateDer::from)
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(issued.key_pkcs8_der));
    let svid = Svid::from_der(chain, key, &crypto_provider()).expect("SVID");
    let mut bundles = BundleSet::default();
    bundles
        .insert(
            ca.trust_domain(),
            ca.bundle_der()
                .into_iter()
                .map(CertificateDer::from)
                .collect(),
        )
        .expect("bundle");
    IdentitySnapshot {
        svid,
        bundles,
        generation: 1,
    }
}

/// Moves every pending TLS record from `from` to `to` and lets `to` process them.
fn transfer(from: &mut Connection, to: &mut Connection) -> Result<usize, rustls::Error> {
    let mut buf = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut buf).expect("write to a Vec");
    }
    let mut rd = &buf[..];
    while !rd.is_empty() {
        to.read_tls(&mut rd).expect("read from a slice");
        to.process_new_packets()?;
    }
    Ok(buf.len())
}

/// Runs one handshake to the end, or returns the first error either side saw.
fn handshake(client: &Arc<ClientConfig>, server: &Arc<ServerConfig>) -> Result<Connection, String> {
    let mut c: Connection = ClientConnection::new(client.clone(), spiffe_server_name())
        .map_err(|e| e.to_string())?
        .into();
    let mut s: Connection = ServerConnection::new(server.clone())
        .map_err(|e| e.to_string())?
        .into();
    for _ in 0..10 {
        if !c.is_handshaking() && !s.is_handshaking() && !c.wants_write() && !s.wants_write() {
            return Ok(s);
        }
        transfer(&mut c, &mut s).map_err(|e| format!("server: {e}"))?;
        transfer(&mut s, &mut c).map_err(|e| format!("client: {e}"))?;
    }
    Err("handshake did not finish in 10 flights".into())
}

struct Setup {
    server: Arc<ServerConfig>,
    /// The client config as meshd builds it (session resumption on, rustls's default).
    client: Arc<ClientConfig>,
    /// The same without resumption: every handshake is a full one with both chains verified.
    client_full: Arc<ClientConfig>,
    leaf: Vec<u8>,
    /// The client's SVID chain as it arrives at the inbound (leaf, then intermediates).
    client_chain: Vec<CertificateDer<'static>>,
    /// What the inbound trusts.
    server_bundles: BundleSet,
}

fn setup() -> Setup {
    let ca = DevCa::new("jia.app").expect("dev CA");
    let server_snap = snapshot(&ca, SERVER);
    let client_snap = snapshot(&ca, CLIENT);
    let server = Arc::new(server_config(&server_snap, true).expect("server config"));
    let want = parse_spiffe_id(SERVER).expect("id");
    let client_cfg = client_config(&client_snap, &want, true).expect("client config");
    let mut full = client_cfg.clone();
    full.resumption = Resumption::disabled();
    let leaf = client_snap.svid.certified_key.cert[0].to_vec();
    Setup {
        server,
        client: Arc::new(client_cfg),
        client_full: Arc::new(full),
        leaf,
        client_chain: client_snap.svid.certified_key.cert.clone(),
        server_bundles: server_snap.bundles.clone(),
    }
}

/// Fails loudly unless the handshake authenticates both sides and refuses a wrong server ID.
fn prove_setup(s: &Setup) {
    let conn = handshake(&s.client_full, &s.server).expect("handshake");
    let seen = peer_id(conn.peer_certificates()).expect("server sees a client SVID");
    assert_eq!(seen.to_string(), CLIENT);
    let ca = DevCa::new("jia.app").expect("dev CA");
    let other = parse_spiffe_id("spiffe://jia.app/not-the-server").expect("id");
    // Same CA for both sides, so only the server-ID check can refuse.
    let server_snap = snapshot(&ca, SERVER);
    let client_snap = snapshot(&ca, CLIENT);
    let server = Arc::new(server_config(&server_snap, true).expect("server config"));
    let wrong = Arc::new(client_config(&client_snap, &other, true).expect("client config"));
    let err = handshake(&wrong, &server).expect_err("a wrong server ID must be refused");
    assert!(err.starts_with("client:"), "refused by the client: {err}");
    println!("setup: handshake authenticates {CLIENT}; a wrong server ID is refused ({err})");

    let (leaf, intermediates) = s.client_chain.split_first().expect("a chain");
    client_verifier(&s.server_bundles)
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .expect("the inbound accepts the client's SVID chain");
    let stranger = snapshot(&DevCa::new("jia.app").expect("dev CA"), SERVER);
    let err = client_verifier(&stranger.bundles)
        .verify_client_cert(leaf, intermediates, UnixTime::now())
        .expect_err("a chain to another CA must be refused");
    println!(
        "setup: the chain check accepts {CLIENT}'s SVID and refuses it against another CA ({err})"
    );
}

fn bench(c: &mut Criterion) {
    let s = setup();

    let mut g = c.benchmark_group("spiffe_id");
    g.bench_function("parse_short", |b| {
        b.iter(|| parse_spiffe_id(black_box("spiffe://jia.app/bench-client")))
    });
    g.bench_function("parse_k8s_style", |b| {
        b.iter(|| {
            parse_spiffe_id(black_box(
                "spiffe://cluster.prod.jia.app/ns/payments/sa/payment-service-v2",
            ))
        })
    });
    g.bench_function("reject_uppercase", |b| {
        b.iter(|| parse_spiffe_id(black_box("spiffe://Jia.App/bench-client")))
    });
    g.finish();

    let mut g = c.benchmark_group("svid");
    g.bench_function("parse_svid_leaf", |b| {
        b.iter(|| parse_svid_leaf(black_box(&s.leaf)).expect("leaf"))
    });
    let (leaf, intermediates) = s.client_chain.split_first().expect("a chain");
    // A new verifier per iteration (made outside the timing): the chain is seen first.
    g.bench_function("verify_chain_first_sight", |b| {
        b.iter_batched(
            || client_verifier(&s.server_bundles),
            |v| {
                v.verify_client_cert(leaf, intermediates, UnixTime::now())
                    .expect("chain")
            },
            BatchSize::SmallInput,
        )
    });
    // One verifier: after the first call the chain is found in the verified-chain cache.
    g.bench_function("verify_chain_cached", |b| {
        let v = client_verifier(&s.server_bundles);
        b.iter(|| {
            v.verify_client_cert(black_box(leaf), intermediates, UnixTime::now())
                .expect("chain")
        })
    });
    g.finish();

    let mut g = c.benchmark_group("mtls_handshake");
    g.bench_function("full", |b| {
        b.iter(|| handshake(&s.client_full, &s.server).expect("handshake"))
    });
    g.bench_function("as_configured", |b| {
        b.iter(|| handshake(&s.client, &s.server).expect("handshake"))
    });
    g.bench_function("config_build_pair", |b| {
        let ca = DevCa::new("jia.app").expect("dev CA");
        let snap = snapshot(&ca, SERVER);
        let want = parse_spiffe_id(SERVER).expect("id");
        b.iter_batched(
            || (),
            |_| {
                (
                    server_config(&snap, true).expect("server"),
                    client_config(&snap, &want, true).expect("client"),
                )
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, bench);

fn main() {
    prove_setup(&setup());
    benches();
    Criterion::default().configure_from_args().final_summary();
}
