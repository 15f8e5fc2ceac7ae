//! `meshd dev-ca`: the development CA as a process, for tests and local meshes.
//!
//! Flow: parse and check every argument first (bad input is an error, never a panic);
//! build a tokio runtime; create the CA and one extra CA per `--federate` domain; write
//! the requested PEM files; bind every Workload API socket; print `dev-ca ready`. Then run
//! until SIGINT/SIGTERM: SIGHUP rotates every SVID and the JWT authority at once, and the
//! `--write-files` sets are rewritten at half the TTL and on SIGHUP. On exit the sockets
//! are removed.

use crate::config::parse_duration;
use crate::config::{parse_spiffe_id, SpiffeIdError};
use crate::dev_ca::{pem_block, DevCa, DevCaError, IssuedSvid, MIN_TTL};
use crate::identity::SpiffeId;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::signal::unix::{signal, SignalKind};
use tokio_util::sync::CancellationToken;

/// How long the foreign `stranger` SVIDs written by `--write-ca-dir` stay valid.
const STRANGER_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why `meshd dev-ca` could not start or stopped early.
#[derive(Debug, thiserror::Error)]
pub enum DevCaCliError {
    /// The CA refused (bad trust domain or TTL, a socket it cannot bind, a file it cannot
    /// write).
    #[error(transparent)]
    Ca(#[from] DevCaError),
    /// An `ID=PATH` argument has no `=`.
    #[error("{flag} `{text}` must look like spiffe://td/name=/path")]
    NoSeparator { flag: &'static str, text: String },
    /// The ID of an `ID=PATH` argument is not a SPIFFE ID.
    #[error("{flag} `{text}`: bad SPIFFE ID: {reason}")]
    BadId {
        flag: &'static str,
        text: String,
        reason: SpiffeIdError,
    },
    /// The path of an `ID=PATH` argument is empty.
    #[error("{flag} `{text}`: the path after `=` is empty")]
    EmptyPath { flag: &'static str, text: String },
    /// An identity to serve or write is outside the CA's trust domain.
    #[error("{flag} {text}: {id} is not in the trust domain {trust_domain}")]
    ForeignId {
        flag: &'static str,
        text: String,
        id: SpiffeId,
        trust_domain: String,
    },
    /// `--federate` names the CA's own trust domain.
    #[error("--federate {0}: that is the CA's own trust domain")]
    FederateSelf(String),
    /// The tokio runtime could not be built.
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// A signal handler could not be installed.
    #[error("cannot listen for {name}: {error}")]
    Signal {
        name: &'static str,
        error: std::io::Error,
    },
    /// The `dev-ca ready` line could not be written.
    #[error("cannot write to stdout: {0}")]
    Stdout(std::io::Error),
}

/// Arguments of `meshd dev-ca`.
#[derive(clap::Args, Debug)]
pub struct DevCaArgs {
    /// The trust domain of the CA.
    #[arg(long, default_value = "jia.app")]
    pub trust_domain: String,
    /// SVID lifetime, X.509 and JWT; SVIDs and the JWT authority rotate at half of it
    /// (at least 2s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
    /// Serve this identity's SVIDs on this unix socket (repeatable),
    /// e.g. `spiffe://jia.app/payment-service=/tmp/payment.sock`.
    #[arg(long = "identity", value_name = "SPIFFE_ID=SOCKET")]
    pub identities: Vec<String>,
    /// Create a CA for another trust domain and trust it as federated (repeatable).
    #[arg(long = "federate", value_name = "TRUST_DOMAIN")]
    pub federate: Vec<String>,
    /// Write `ca.pem` (own root) and, per federated domain, `<td>.ca.pem`, `<td>.svid.pem`
    /// and `<td>.key.pem` (an SVID for `spiffe://<td>/stranger`) into this directory.
    #[arg(long, value_name = "DIR")]
    pub write_ca_dir: Option<PathBuf>,
    /// Write `svid.pem`, `key.pem` and `bundle.pem` for an identity into a directory,
    /// rewritten at each rotation (repeatable), e.g. `spiffe://jia.app/x=/tmp/x`.
    #[arg(long = "write-files", value_name = "SPIFFE_ID=DIR")]
    pub write_files: Vec<String>,
}

/// The arguments, checked.
#[derive(Debug)]
struct Plan {
    trust_domain: String,
    ttl: Duration,
    identities: Vec<(SpiffeId, PathBuf)>,
    federate: Vec<String>,
    write_ca_dir: Option<PathBuf>,
    write_files: Vec<(SpiffeId, PathBuf)>,
}

/// Runs the development CA until SIGINT or SIGTERM.
pub fn main(args: DevCaArgs) -> Result<(), DevCaCliError> {
    let plan = plan(args)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DevCaCliError::Runtime)?;
    runtime.block_on(run(plan))
}

/// Checks the arguments as a whole before anything is created.
fn plan(args: DevCaArgs) -> Result<Plan, DevCaCliError> {
    let own = |text: &str, flag: &'static str| -> Result<(SpiffeId, PathBuf), DevCaCliError> {
        let (id, path) = split_pair(text, flag)?;
        if id.trust_domain_name() != args.trust_domain {
            return Err(DevCaCliError::ForeignId {
                flag,
                text: text.to_string(),
                id,
                trust_domain: args.trust_domain.clone(),
            });
        }
        Ok((id, path))
    };
    let identities = args
        .identities
        .iter()
        .map(|t| own(t, "--identity"))
        .collect::<Result<Vec<_>, _>>()?;
    let write_files = args
        .write_files
        .iter()
        .map(|t| own(t, "--write-files"))
        .collect::<Result<Vec<_>, _>>()?;
    if args.ttl < MIN_TTL {
        return Err(DevCaError::TtlTooShort(args.ttl).into());
    }
    for td in &args.federate {
        if *td == args.trust_domain {
            return Err(DevCaCliError::FederateSelf(td.clone()));
        }
    }
    Ok(Plan {
        trust_domain: args.trust_domain,
        ttl: args.ttl,
        identities,
        federate: args.federate,
        write_ca_dir: args.write_ca_dir,
        write_files,
    })
}

/// Splits `spiffe://td/path=/some/path` (a `unix://` prefix on the path is allowed).
fn split_pair(text: &str, flag: &'static str) -> Result<(SpiffeId, PathBuf), DevCaCliError> {
    let (id, path) = text
        .split_once('=')
        .ok_or_else(|| DevCaCliError::NoSeparator {
            flag,
            text: text.to_string(),
        })?;
    let id = parse_spiffe_id(id).map_err(|reason| DevCaCliError::BadId {
        flag,
        text: text.to_string(),
        reason,
    })?;
    let path = path
        .strip_prefix("unix://")
        .or_else(|| path.strip_prefix("unix:"))
        .unwrap_or(path);
    if path.is_empty() {
        return Err(DevCaCliError::EmptyPath {
            flag,
            text: text.to_string(),
        });
    }
    Ok((id, PathBuf::from(path)))
}

async fn run(plan: Plan) -> Result<(), DevCaCliError> {
    let ca = Arc::new(DevCa::new(&plan.trust_domain)?);
    let mut foreign = Vec::new();
    for td in &plan.federate {
        let other = DevCa::new(td)?;
        ca.set_federated(td, other.bundle_der());
        ca.set_federated_jwt(td, other.jwt_bundle());
        foreign.push(other);
    }
    if let Some(dir) = &plan.write_ca_dir {
        write_ca_dir(dir, &ca, &foreign)?;
    }
    write_identity_files(&ca, &plan.write_files, plan.ttl)?;
    let mut signals = Signals::new()?;
    let stop = CancellationToken::new();
    let serving = ca
        .clone()
        .serve(plan.identities, plan.ttl, stop.clone())
        .await?;
    let mut out = std::io::stdout().lock();
    writeln!(out, "dev-ca ready")
        .and_then(|_| out.flush())
        .map_err(DevCaCliError::Stdout)?;
    drop(out);
    let half = plan.ttl / 2;
    loop {
        tokio::select! {
            _ = signals.interrupt.recv() => break,
            _ = signals.terminate.recv() => break,
            _ = signals.hangup.recv() => {
                tracing::info!("SIGHUP: rotating every SVID and the JWT authority");
                ca.rotate_now();
                if let Err(e) = ca.rotate_jwt_authority() {
                    tracing::error!("dev-ca: {e}");
                }
                rewrite(&ca, &plan.write_files, plan.ttl);
            }
            _ = tokio::time::sleep(half), if !plan.write_files.is_empty() => {
                rewrite(&ca, &plan.write_files, plan.ttl);
            }
        }
    }
    stop.cancel();
    serving.finished().await;
    Ok(())
}

/// Rewrites the identity files, logging (not failing) when the disk refuses.
fn rewrite(ca: &DevCa, sets: &[(SpiffeId, PathBuf)], ttl: Duration) {
    if let Err(e) = write_identity_files(ca, sets, ttl) {
        tracing::error!("dev-ca: {e}");
    }
}

struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
    hangup: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> Result<Signals, DevCaCliError> {
        let on = |kind: SignalKind, name: &'static str| {
            signal(kind).map_err(|error| DevCaCliError::Signal { name, error })
        };
        Ok(Signals {
            interrupt: on(SignalKind::interrupt(), "SIGINT")?,
            terminate: on(SignalKind::terminate(), "SIGTERM")?,
            hangup: on(SignalKind::hangup(), "SIGHUP")?,
        })
    }
}

/// `ca.pem`, and per federated domain its root plus a `stranger` SVID pair.
fn write_ca_dir(dir: &Path, ca: &DevCa, foreign: &[DevCa]) -> Result<(), DevCaError> {
    write_file(&dir.join("ca.pem"), &certs_pem(&ca.bundle_der()), false)?;
    for other in foreign {
        let td = other.trust_domain();
        let stranger = SpiffeId::new(format!("spiffe://{td}/stranger")).map_err(|e| {
            DevCaError::BadTrustDomain {
                name: td.to_string(),
                reason: e.to_string(),
            }
        })?;
        let svid = other.issue_svid(&stranger, STRANGER_TTL)?;
        write_file(
            &dir.join(format!("{td}.ca.pem")),
            &certs_pem(&other.bundle_der()),
            false,
        )?;
        write_svid(
            dir,
            &format!("{td}.svid.pem"),
            &format!("{td}.key.pem"),
            &svid,
        )?;
    }
    Ok(())
}

/// `svid.pem`, `key.pem`, `bundle.pem` for each `(id, dir)`, freshly issued.
fn write_identity_files(
    ca: &DevCa,
    sets: &[(SpiffeId, PathBuf)],
    ttl: Duration,
) -> Result<(), DevCaError> {
    for (id, dir) in sets {
        let svid = ca.issue_svid(id, ttl)?;
        // The bundle first: a watcher that reloads on the SVID change then sees both.
        write_file(&dir.join("bundle.pem"), &certs_pem(&ca.bundle_der()), false)?;
        write_svid(dir, "svid.pem", "key.pem", &svid)?;
    }
    Ok(())
}

fn write_svid(dir: &Path, cert: &str, key: &str, svid: &IssuedSvid) -> Result<(), DevCaError> {
    write_file(
        &dir.join(key),
        &pem_block("PRIVATE KEY", &svid.key_pkcs8_der),
        true,
    )?;
    write_file(&dir.join(cert), &certs_pem(&svid.chain_der), false)
}

fn certs_pem(ders: &[Vec<u8>]) -> String {
    ders.iter().map(|d| pem_block("CERTIFICATE", d)).collect()
}

/// Writes through a temporary file and a rename, so readers never see half a file.
fn write_file(path: &Path, text: &str, secret: bool) -> Result<(), DevCaError> {
    use std::os::unix::fs::OpenOptionsExt;
    let fail = |e: std::io::Error| DevCaError::WriteFile {
        path: path.display().to_string(),
        reason: e.to_string(),
    };
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(fail)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .map_err(fail)?;
    file.write_all(text.as_bytes()).map_err(fail)?;
    file.sync_all().map_err(fail)?;
    std::fs::rename(&tmp, path).map_err(fail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::identity::{crypto_provider, Svid};
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};

    fn args(extra: &[&str]) -> DevCaArgs {
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            a: DevCaArgs,
        }
        let argv = std::iter::once("dev-ca").chain(extra.iter().copied());
        <Cli as clap::Parser>::try_parse_from(argv).unwrap().a
    }

    #[test]
    fn arguments_are_checked_before_anything_starts() {
        // Typos on the command line give one clear error each, never a panic.
        let table: [(&[&str], &str); 7] = [
            (&["--ttl", "1s"], "too short"),
            (&["--identity", "spiffe://jia.app/a"], "must look like"),
            (&["--identity", "nope=/tmp/a.sock"], "bad SPIFFE ID"),
            (
                &["--identity", "spiffe://other.td/a=/tmp/a"],
                "not in the trust domain",
            ),
            (
                &["--identity", "spiffe://jia.app/a="],
                "path after `=` is empty",
            ),
            (
                &["--write-files", "spiffe://JIA.app/a=/tmp"],
                "bad SPIFFE ID",
            ),
            (&["--federate", "jia.app"], "own trust domain"),
        ];
        for (argv, want) in table {
            let err = plan(args(argv)).unwrap_err().to_string();
            assert!(err.contains(want), "{argv:?}: {err}");
        }
        let ok = plan(args(&[
            "--ttl",
            "5s",
            "--identity",
            "spiffe://jia.app/a=unix:///tmp/a.sock",
        ]))
        .unwrap();
        assert_eq!(ok.identities[0].1, PathBuf::from("/tmp/a.sock"));
        assert_eq!(ok.ttl, Duration::from_secs(5));
    }

    fn read_pems(path: &Path) -> Vec<CertificateDer<'static>> {
        let text = std::fs::read(path).unwrap();
        rustls_pemfile::certs(&mut text.as_slice())
            .collect::<Result<_, _>>()
            .unwrap()
    }

    #[test]
    fn written_files_make_a_valid_identity() {
        // A file-based sidecar and a foreign peer load what the dev CA wrote.
        let dir = tempfile::tempdir().unwrap();
        let ca = DevCa::new("jia.app").unwrap();
        let other = DevCa::new("other.td").unwrap();
        write_ca_dir(dir.path(), &ca, &[other]).unwrap();
        let id = SpiffeId::new("spiffe://jia.app/files").unwrap();
        let files = dir.path().join("files");
        write_identity_files(&ca, &[(id.clone(), files.clone())], Duration::from_secs(60)).unwrap();
        let load = |cert: &str, key: &str| {
            let chain = read_pems(&dir.path().join(cert));
            let key_text = std::fs::read(dir.path().join(key)).unwrap();
            let key: PrivateKeyDer<'static> = rustls_pemfile::private_key(&mut key_text.as_slice())
                .unwrap()
                .unwrap();
            Svid::from_der(chain, key, &crypto_provider()).unwrap()
        };
        assert_eq!(load("files/svid.pem", "files/key.pem").id, id);
        assert_eq!(
            load("other.td.svid.pem", "other.td.key.pem").id.to_string(),
            "spiffe://other.td/stranger"
        );
        assert_eq!(
            read_pems(&files.join("bundle.pem"))[0].as_ref(),
            ca.bundle_der()[0]
        );
        assert_eq!(read_pems(&dir.path().join("ca.pem")).len(), 1);
        assert_eq!(read_pems(&dir.path().join("other.td.ca.pem")).len(), 1);
    }
}
