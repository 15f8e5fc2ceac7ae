//! The floor under `scale.sh connections`: what the libraries meshd's inbound is built
//! on hold per mTLS connection, with nothing of meshd's around them.
//!
//! Story: the curve compares meshd's memory per held connection with Envoy's. Most of
//! meshd's is the state of rustls and h2, sized by those crates. This server is only
//! those crates, set up as meshd's inbound sets them up: TCP accepted on a current-thread
//! runtime with mimalloc (and meshd's collect on park), the TLS handshake with
//! `meshd::tls::server_config` (client SVID required and checked, ALPN h2) through
//! tokio-rustls, then an h2 server (the crate's default settings) answering every stream
//! `200` with no body, inside the connection's one task. Each phase is boxed, as meshd
//! boxes them, so a held connection keeps only the TLS stream and the h2 connection.
//! What it holds per connection is the least meshd could hold while built on rustls and h2.
//!
//! `cargo build --release --example conn_floor`, then
//! `conn_floor --listen 127.0.0.1:PORT --cert svid.pem --key key.pem --bundle bundle.pem`
//! (an X.509-SVID chain, its key, and the trust bundle of the clients' trust domain). It
//! prints `listening on ADDR` once it accepts.

use anyhow::{bail, Context};
use meshd::identity::{crypto_provider, BundleSet, IdentitySnapshot, Svid};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

/// The same allocator as the meshd binary: the memory per connection depends on it.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What the command line gives.
struct Args {
    listen: SocketAddr,
    cert: PathBuf,
    key: PathBuf,
    bundle: PathBuf,
}

fn args() -> anyhow::Result<Args> {
    let mut it = std::env::args().skip(1);
    let (mut listen, mut cert, mut key, mut bundle) = (None, None, None, None);
    while let Some(flag) = it.next() {
        let value = it.next().with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--listen" => {
                listen = Some(value.parse().with_context(|| format!("--listen {value}"))?)
            }
            "--cert" => cert = Some(PathBuf::from(value)),
            "--key" => key = Some(PathBuf::from(value)),
            "--bundle" => bundle = Some(PathBuf::from(value)),
            _ => bail!("unknown flag {flag}"),
        }
    }
    Ok(Args {
        listen: listen.context("--listen is required")?,
        cert: cert.context("--cert is required")?,
        key: key.context("--key is required")?,
        bundle: bundle.context("--bundle is required")?,
    })
}

/// The SVID and the bundle of its own trust domain, from PEM files.
fn snapshot(a: &Args) -> anyhow::Result<IdentitySnapshot> {
    let certs = |p: &PathBuf| {
        CertificateDer::pem_file_iter(p)
            .and_then(|i| i.collect::<Result<Vec<_>, _>>())
            .with_context(|| p.display().to_string())
    };
    let key = PrivateKeyDer::from_pem_file(&a.key).with_context(|| a.key.display().to_string())?;
    let svid = Svid::from_der(certs(&a.cert)?, key, &crypto_provider())
        .with_context(|| a.cert.display().to_string())?;
    let mut bundles = BundleSet::default();
    bundles
        .insert(svid.id.trust_domain().as_ref(), certs(&a.bundle)?)
        .with_context(|| a.bundle.display().to_string())?;
    Ok(IdentitySnapshot {
        svid,
        bundles,
        generation: 1,
    })
}

/// One connection: TLS, the HTTP/2 handshake, then `200` to every stream until it ends.
async fn serve(acceptor: tokio_rustls::TlsAcceptor, tcp: tokio::net::TcpStream) {
    let Ok(tls) = Box::pin(acceptor.accept(tcp)).await else {
        return;
    };
    let Ok(mut conn) = Box::pin(h2::server::handshake(tls)).await else {
        return;
    };
    while let Some(Ok((_request, mut respond))) = conn.accept().await {
        let _ = respond.send_response(http::Response::new(()), true);
    }
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let config = meshd::tls::server_config(&snapshot(&a)?, true).context("server config")?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .on_thread_park(meshd::telemetry::collect_memory_on_park)
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(a.listen)
            .await
            .with_context(|| format!("listen on {}", a.listen))?;
        println!("listening on {}", a.listen);
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let _ = tcp.set_nodelay(true);
            tokio::spawn(serve(acceptor.clone(), tcp));
        }
    })
}
