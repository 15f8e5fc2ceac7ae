//! Identity from PEM files (`identity.files`, or `MTLS_CERT_FILE`/`MTLS_KEY_FILE`/
//! `MTLS_CA_FILE` of the original design).
//!
//! Flow: `load` reads the chain, key and CA bundle into a snapshot; `run` publishes it,
//! then reloads when any of the three files changes (a `notify` watch on their folders)
//! or when `reload` is notified (SIGHUP). A half-written or mismatched set keeps the
//! previous identity and logs why.

use crate::config::parse_spiffe_id;
use crate::config::IdentityFiles;
use crate::identity::{
    check_expected, crypto_provider, publish, BundleSet, ExpectMismatch, IdentityError,
    IdentitySnapshot, IdentityStatus, SpiffeId, Svid,
};
use notify::{RecursiveMode, Watcher};
use rustls_pki_types::pem::{self, PemObject};
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;
use x509_parser::prelude::*;

/// Why the files do not make an identity; each message starts with the file to fix.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// A file cannot be read.
    #[error("{}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The certificate file is not PEM.
    #[error("{}: not a PEM certificate chain: {source}", path.display())]
    ChainPem { path: PathBuf, source: pem::Error },
    /// The certificate file holds no certificate.
    #[error("{}: holds no certificate", path.display())]
    NoCertificate { path: PathBuf },
    /// The key file holds no usable private key.
    #[error("{}: no PKCS#8 or SEC1 private key found: {source}", path.display())]
    NoKey { path: PathBuf, source: pem::Error },
    /// The key is unusable or does not belong to the certificate: named by the key file,
    /// which is where to look even when it is the pair that does not match.
    #[error("{}: {source} (certificate {})", key.display(), cert.display())]
    BadKey {
        key: PathBuf,
        cert: PathBuf,
        source: IdentityError,
    },
    /// The certificate is not a usable X.509-SVID.
    #[error("{}: {source}", path.display())]
    BadSvid {
        path: PathBuf,
        source: IdentityError,
    },
    /// The SVID is not the one `identity.expect` names.
    #[error(transparent)]
    Mismatch(#[from] ExpectMismatch),
    /// The bundle file is not PEM.
    #[error("{}: not a PEM bundle: {source}", path.display())]
    BundlePem { path: PathBuf, source: pem::Error },
    /// The bundle trusts no CA of the SVID's own trust domain.
    #[error("{}: holds no CA certificate for trust domain {trust_domain}", path.display())]
    NoOwnBundle { path: PathBuf, trust_domain: String },
    /// A CA of the bundle is unusable.
    #[error("{}: {source}", path.display())]
    BadBundle {
        path: PathBuf,
        source: IdentityError,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, FilesError> {
    std::fs::read(path).map_err(|source| FilesError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// Reads the three files into a snapshot.
pub fn load(
    files: &IdentityFiles,
    expect: Option<&SpiffeId>,
    generation: u64,
) -> Result<IdentitySnapshot, FilesError> {
    let cert_pem = read(&files.cert)?;
    let key_pem = read(&files.key)?;
    let ca_pem = read(&files.bundle)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| FilesError::ChainPem {
            path: files.cert.clone(),
            source,
        })?;
    if chain.is_empty() {
        return Err(FilesError::NoCertificate {
            path: files.cert.clone(),
        });
    }
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|source| FilesError::NoKey {
        path: files.key.clone(),
        source,
    })?;
    let svid = Svid::from_der(chain, key, &crypto_provider()).map_err(|source| match source {
        IdentityError::BadKey(_) => FilesError::BadKey {
            key: files.key.clone(),
            cert: files.cert.clone(),
            source,
        },
        _ => FilesError::BadSvid {
            path: files.cert.clone(),
            source,
        },
    })?;
    check_expected(&svid.id, expect)?;
    let cas: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&ca_pem)
        .collect::<Result<_, _>>()
        .map_err(|source| FilesError::BundlePem {
            path: files.bundle.clone(),
            source,
        })?;
    let mut by_domain: std::collections::BTreeMap<String, Vec<CertificateDer<'static>>> =
        Default::default();
    let own = svid.id.trust_domain_name().to_string();
    for ca in cas {
        let td = ca_trust_domain(&ca).unwrap_or_else(|| own.clone());
        by_domain.entry(td).or_default().push(ca);
    }
    if !by_domain.contains_key(&own) {
        return Err(FilesError::NoOwnBundle {
            path: files.bundle.clone(),
            trust_domain: own,
        });
    }
    let mut bundles = BundleSet::default();
    for (td, cas) in by_domain {
        bundles
            .insert(&td, cas)
            .map_err(|source| FilesError::BadBundle {
                path: files.bundle.clone(),
                source,
            })?;
    }
    Ok(IdentitySnapshot {
        svid,
        bundles,
        generation,
    })
}

/// A CA's trust domain, when it carries a `spiffe://td` URI SAN (as SPIRE's do).
fn ca_trust_domain(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    san.value.general_names.iter().find_map(|n| match n {
        GeneralName::URI(u) => parse_spiffe_id(u)
            .ok()
            .map(|id| id.trust_domain_name().to_string()),
        _ => None,
    })
}

/// What ends a wait of the reload loop.
enum Wake {
    Stop,
    Expired,
    Changed,
    Reload,
}

/// Publishes the files' identity and follows changes until `stop`.
pub async fn follow_files(
    files: IdentityFiles,
    expect: Option<SpiffeId>,
    status: watch::Sender<IdentityStatus>,
    reload: Arc<Notify>,
    stop: CancellationToken,
) {
    let changed = Arc::new(Notify::new());
    let _watcher = {
        let changed = changed.clone();
        let names: Vec<_> = [&files.cert, &files.key, &files.bundle]
            .iter()
            .filter_map(|p| p.file_name().map(|n| n.to_os_string()))
            .collect();
        let mut w = notify::recommended_watcher(move |ev: notify::Result<notify::Event>| {
            if let Ok(ev) = ev {
                // Our own reads raise access events: only writes, creations, renames
                // and removals mean the identity may have changed.
                if !matches!(ev.kind, notify::EventKind::Access(_))
                    && ev
                        .paths
                        .iter()
                        .any(|p| p.file_name().is_some_and(|n| names.iter().any(|m| m == n)))
                {
                    changed.notify_one();
                }
            }
        })
        .ok();
        if let Some(w) = w.as_mut() {
            for p in [&files.cert, &files.key, &files.bundle] {
                let dir = p
                    .parent()
                    .filter(|d| !d.as_os_str().is_empty())
                    .unwrap_or(Path::new("."));
                if let Err(e) = w.watch(dir, RecursiveMode::NonRecursive) {
                    tracing::warn!("cannot watch {}: {e}; SIGHUP still reloads", dir.display());
                }
            }
        }
        w
    };
    let mut generation = 0u64;
    loop {
        match load(&files, expect.as_ref(), generation + 1) {
            Ok(snap) => {
                let same = status.borrow().snapshot().is_some_and(|s| {
                    s.svid.serial == snap.svid.serial && s.bundles == snap.bundles
                });
                if !same {
                    generation += 1;
                    tracing::info!(spiffe_id = %snap.svid.id, serial = %snap.svid.serial, "loaded identity from files");
                    if generation > 1 {
                        metrics::counter!("meshd_svid_rotations_total").increment(1);
                    }
                    publish(&status, IdentityStatus::Ready(Arc::new(snap)));
                }
            }
            Err(e @ FilesError::Mismatch(_)) => {
                let reason = e.to_string();
                tracing::error!("{reason}");
                publish(&status, IdentityStatus::Mismatch { reason });
            }
            Err(e) => {
                let reason = e.to_string();
                // A live SVID stays in use; an expired one stays reported as expired
                // (fail closed) rather than as merely waiting.
                let keep = matches!(
                    *status.borrow(),
                    IdentityStatus::Ready(_) | IdentityStatus::Expired { .. }
                );
                if keep {
                    tracing::warn!("keeping the previous identity state: {reason}");
                } else {
                    tracing::warn!("no identity yet: {reason}");
                    publish(&status, IdentityStatus::Waiting { reason });
                }
            }
        }
        let expiry = status.borrow().snapshot().map(|s| s.svid.not_after);
        // Checked before waiting, not only by the timer: a change notification that is
        // already pending must never postpone failing closed.
        let wake = if expiry.is_some_and(|t| t <= std::time::SystemTime::now()) {
            Wake::Expired
        } else {
            tokio::select! {
                biased;
                _ = stop.cancelled() => Wake::Stop,
                _ = crate::identity::workload_api::sleep_until_system(expiry) => Wake::Expired,
                _ = changed.notified() => Wake::Changed,
                _ = reload.notified() => Wake::Reload,
            }
        };
        match wake {
            Wake::Stop => return,
            Wake::Reload => {}
            // Let a writer finish the other files of the set.
            Wake::Changed => tokio::time::sleep(Duration::from_millis(150)).await,
            Wake::Expired => {
                let reason = format!(
                    "SVID from {} expired and no valid replacement was written; refusing new handshakes",
                    files.cert.display()
                );
                tracing::error!("{reason}");
                publish(&status, IdentityStatus::Expired { reason });
                // Wait for the files to change before trying again.
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = changed.notified() => tokio::time::sleep(Duration::from_millis(150)).await,
                    _ = reload.notified() => {}
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dev_ca::{pem_block, DevCa};

    /// Cert, key and bundle PEM, then the file the error must name and words it must say
    /// (none: the files load).
    type Case<'a> = (&'a str, &'a str, &'a str, Option<(&'a str, &'a [&'a str])>);

    // Story: an operator's files are damaged one at a time; each error names the file to
    // fix, and a key that belongs to another certificate names the key and the cert.
    #[test]
    fn each_broken_file_is_named_in_the_error() {
        let ca = DevCa::new("jia.app").unwrap();
        let id = parse_spiffe_id("spiffe://jia.app/payment-service").unwrap();
        let svid = ca.issue_svid(&id, Duration::from_secs(3600)).unwrap();
        let other = ca.issue_svid(&id, Duration::from_secs(3600)).unwrap();
        let cert = pem_block("CERTIFICATE", &svid.chain_der[0]);
        let key = pem_block("PRIVATE KEY", &svid.key_pkcs8_der);
        let bundle = pem_block("CERTIFICATE", &ca.bundle_der()[0]);
        // A PKCS#8 block whose content is not a key.
        let garbage_key = pem_block("PRIVATE KEY", b"not a key at all");
        let other_key = pem_block("PRIVATE KEY", &other.key_pkcs8_der);
        let table: [Case; 6] = [
            (&cert, &key, &bundle, None),
            ("", &key, &bundle, Some(("svid.pem", &["no certificate"]))),
            (
                &cert,
                &key,
                "",
                Some(("bundle.pem", &["no CA certificate"])),
            ),
            (
                &cert,
                "",
                &bundle,
                Some(("key.pem", &["no PKCS#8 or SEC1"])),
            ),
            (
                &cert,
                &garbage_key,
                &bundle,
                Some(("key.pem", &["private key", "svid.pem"])),
            ),
            (
                &cert,
                &other_key,
                &bundle,
                Some(("key.pem", &["does not match", "svid.pem"])),
            ),
        ];
        for (i, (c, k, b, want)) in table.into_iter().enumerate() {
            let dir = tempfile::tempdir().unwrap();
            let files = IdentityFiles {
                cert: dir.path().join("svid.pem"),
                key: dir.path().join("key.pem"),
                bundle: dir.path().join("bundle.pem"),
            };
            std::fs::write(&files.cert, c).unwrap();
            std::fs::write(&files.key, k).unwrap();
            std::fs::write(&files.bundle, b).unwrap();
            match (load(&files, Some(&id), 1), want) {
                (Ok(snapshot), None) => assert_eq!(snapshot.svid.id, id, "case {i}"),
                (Err(e), Some((file, words))) => {
                    let e = e.to_string();
                    let named = dir.path().join(file).display().to_string();
                    assert!(
                        e.starts_with(&named),
                        "case {i}: {e:?} should start with {named}"
                    );
                    for w in words {
                        assert!(e.contains(w), "case {i}: {e:?} should say {w:?}");
                    }
                }
                (got, want) => panic!("case {i}: got {:?}, want {want:?}", got.map(|_| ())),
            }
        }
    }
}
