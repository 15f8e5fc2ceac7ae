//! `meshd injector certs`: a CA and the webhook's serving certificate, for clusters
//! without cert-manager.
//!
//! Flow: an EC P-256 CA (self-signed), then a serving certificate it signs for the
//! Service's names (`SERVICE.NAMESPACE.svc` and `.svc.cluster.local`, as the API server
//! calls a webhook's `service`) plus `--dns` and `--ip` extras; written as DIR/ca.pem,
//! DIR/tls.pem and DIR/tls-key.pem (0600). The caller prints the `caBundle` line that
//! [`write_certs`] returns, for the MutatingWebhookConfiguration.

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, PKCS_ECDSA_P256_SHA256,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long the CA is valid: the caBundle is pasted once.
const CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// How long the serving certificate is valid; renewing it is running the command again
/// (the injector reloads the files).
const SERVING_LIFETIME: Duration = Duration::from_secs(2 * 365 * 24 * 3600);

/// The options of `meshd injector certs`.
#[derive(Debug, Clone, clap::Args)]
pub struct CertsArgs {
    /// The folder for ca.pem, tls.pem and tls-key.pem (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// The injector's Service name.
    #[arg(long, default_value = "meshd-injector")]
    pub service: String,
    /// The injector's namespace.
    #[arg(long, default_value = "meshd-system")]
    pub namespace: String,
    /// Another DNS name for the serving certificate (repeatable).
    #[arg(long = "dns")]
    pub dns: Vec<String>,
    /// An IP address for the serving certificate (repeatable), e.g. 127.0.0.1 for tests.
    #[arg(long = "ip")]
    pub ip: Vec<IpAddr>,
}

/// Why the certificates could not be made.
#[derive(Debug, thiserror::Error)]
pub enum CertsError {
    /// rcgen refused a key, a name or a certificate.
    #[error("could not create {what}: {error}")]
    Certificate { what: String, error: rcgen::Error },
    /// A file or the folder could not be written.
    #[error("cannot write {path}: {error}")]
    Write {
        path: PathBuf,
        error: std::io::Error,
    },
}

/// The DNS names of the serving certificate: the Service's, then the extras.
pub fn serving_names(args: &CertsArgs) -> Vec<String> {
    let (s, ns) = (&args.service, &args.namespace);
    let mut names = vec![
        s.clone(),
        format!("{s}.{ns}"),
        format!("{s}.{ns}.svc"),
        format!("{s}.{ns}.svc.cluster.local"),
    ];
    for d in &args.dns {
        if !names.contains(d) {
            names.push(d.clone());
        }
    }
    names
}

/// Writes the three files and returns the `caBundle: ...` line to print.
pub fn write_certs(args: &CertsArgs) -> Result<String, CertsError> {
    let fail = |what: &str| {
        let what = what.to_string();
        move |error| CertsError::Certificate { what, error }
    };
    let now = SystemTime::now();
    let ca_key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail("the CA key"))?;
    let mut ca = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, "meshd injector CA");
    ca.distinguished_name = dn;
    ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca.not_before = (now - Duration::from_secs(60)).into();
    ca.not_after = (now + CA_LIFETIME).into();
    let ca_cert = ca.self_signed(&ca_key).map_err(fail("the CA"))?;
    let issuer = Issuer::new(ca, ca_key);

    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(fail("the serving key"))?;
    let names = serving_names(args);
    let mut params = CertificateParams::new(names.clone()).map_err(fail("the DNS names"))?;
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, names[2].as_str());
    params.distinguished_name = dn;
    params
        .subject_alt_names
        .extend(args.ip.iter().map(|ip| SanType::IpAddress(*ip)));
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.not_before = (now - Duration::from_secs(60)).into();
    params.not_after = (now + SERVING_LIFETIME).into();
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(fail("the serving certificate"))?;

    let dir = &args.out;
    std::fs::create_dir_all(dir).map_err(|error| CertsError::Write {
        path: dir.clone(),
        error,
    })?;
    let ca_pem = ca_cert.pem();
    write(&dir.join("ca.pem"), &ca_pem, 0o644)?;
    write(&dir.join("tls.pem"), &cert.pem(), 0o644)?;
    write(&dir.join("tls-key.pem"), &key.serialize_pem(), 0o600)?;
    let bundle = base64::engine::general_purpose::STANDARD.encode(ca_pem);
    Ok(format!("caBundle: {bundle}"))
}

/// Writes `text` to a new file (renamed into place, so a running injector never reads
/// half a file) with these permissions.
fn write(path: &Path, text: &str, mode: u32) -> Result<(), CertsError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |error| CertsError::Write {
        path: path.to_path_buf(),
        error,
    };
    let tmp = path.with_extension("pem.tmp");
    std::fs::write(&tmp, text).map_err(err)?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
