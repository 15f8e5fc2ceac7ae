//! `meshd demo`: the whole reference topology of DESIGN.md §1 on loopback, in one command.
//!
//! Flow: [`main`] builds a runtime and listens for SIGINT/SIGTERM from the start. [`run`]
//! makes a private temp dir (policies, protos, configs, logs, Workload API sockets), starts
//! the development CA in-process on one socket per identity, starts the four demo apps
//! in-process, picks ports (`ports`: the DESIGN.md §2 defaults where free, else a free
//! loopback port, and says so), writes one config per sidecar and starts each as a child
//! process (`sidecars`: `meshd run --config F --exit-with <our pid>`), then waits for
//! every `/ready`. One hop carries a JWT-SVID beside mTLS: payment's sidecar sends one for
//! `document-service` with each call to document, whose sidecar requires it and whose
//! policy names payment `via: both`. The tour (`tour`) runs; without `--once` the demo
//! then stays up until a signal. Whatever happened, [`Demo::shutdown`] stops the apps,
//! asks each sidecar to drain (`POST /shutdown`, killed after 5 s), stops the CA (which
//! removes its sockets) and removes the temp dir.

mod apps;
mod edge_call;
mod gateway;
mod payment;
mod ports;
mod sidecars;
mod tour;
pub use apps::{demo_app_main, DemoAppArgs, DemoAppError};
pub use gateway::GatewayFilesError;
pub use ports::{PortError, PortPicker};
pub use sidecars::SidecarError;

use crate::config::parse_duration;
pub use crate::demo::sidecars::{http, log_tail};
use crate::demo::sidecars::{
    spawn_sidecar, stop_sidecar, wait_ready, Child, SidecarSpec, Upstream, READY_TIMEOUT,
    STOP_GRACE,
};
use crate::dev_ca::{DevCa, DevCaError, Serving};
use crate::identity::SpiffeId;
use apps::{DemoOptions, DemoService};
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// `println!` that ignores a closed stdout (`meshd demo | head` must not panic).
macro_rules! say {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}
pub(crate) use say;

/// The trust domain of the reference topology.
pub const TRUST_DOMAIN: &str = "jia.app";
/// The identity the payment policy does not allow (step 2 of the tour).
pub const INTRUDER: &str = "intruder";
/// The reference policies, embedded so the demo works from any directory.
const POLICIES: [(&str, &str); 4] = [
    (
        "payment-service",
        include_str!("../../deploy/policies/payment-service.yaml"),
    ),
    (
        "contact-service",
        include_str!("../../deploy/policies/contact-service.yaml"),
    ),
    (
        "family-service",
        include_str!("../../deploy/policies/family-service.yaml"),
    ),
    // The reference document policy, but payment must show its JWT-SVID too (`via: both`).
    (
        "document-service",
        include_str!("document-service-policy.yaml"),
    ),
];

/// The reference protos, written out so the printed `grpcurl` commands work.
const PROTOS: [(&str, &str); 6] = [
    ("payment.proto", include_str!("../../proto/payment.proto")),
    (
        "google/api/annotations.proto",
        include_str!("../../proto/google/api/annotations.proto"),
    ),
    (
        "google/api/http.proto",
        include_str!("../../proto/google/api/http.proto"),
    ),
    ("contact.proto", include_str!("../../proto/contact.proto")),
    ("family.proto", include_str!("../../proto/family.proto")),
    ("document.proto", include_str!("../../proto/document.proto")),
];

/// The audience of the JWT-SVID the payment sidecar sends the document service with every
/// call, and the document sidecar requires beside the caller's mTLS SVID.
pub const DOCUMENT_AUDIENCE: &str = "document-service";

/// The services payment calls: app kind, service name, payment's outbound default port,
/// and the audience of the JWT-SVID its sidecar requires (document only: the demo's
/// JWT-SVID hop).
const LEAVES: [(DemoService, &str, u16, Option<&str>); 3] = [
    (DemoService::Contact, "contact-service", 15101, None),
    (DemoService::Family, "family-service", 15102, None),
    (
        DemoService::Document,
        "document-service",
        15103,
        Some(DOCUMENT_AUDIENCE),
    ),
];

/// Why `meshd demo` could not set up the topology (a failed tour step is not an error).
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The tokio runtime could not be built.
    #[error("cannot start the tokio runtime: {0}")]
    Runtime(std::io::Error),
    /// A signal handler could not be installed.
    #[error("cannot listen for {name}: {error}")]
    Signal {
        name: &'static str,
        error: std::io::Error,
    },
    /// The temp dir, or a policy, proto or folder in it, could not be created.
    #[error("cannot create {path}: {error}")]
    Create {
        path: PathBuf,
        error: std::io::Error,
    },
    /// No loopback port could be found for a listener.
    #[error(transparent)]
    Port(#[from] PortError),
    /// A reference name does not make a SPIFFE ID.
    #[error("{name}: {reason}")]
    BadId {
        name: &'static str,
        reason: spiffe::SpiffeIdError,
    },
    /// The development CA could not be created.
    #[error(transparent)]
    Ca(DevCaError),
    /// The development CA could not serve its sockets.
    #[error("development CA: {0}")]
    CaServe(DevCaError),
    /// An in-process demo app could not start.
    #[error("the {service} app: {error}")]
    App {
        service: &'static str,
        error: DemoAppError,
    },
    /// The edge gateway's certificate, keys or token could not be made.
    #[error(transparent)]
    GatewayFiles(#[from] GatewayFilesError),
    /// A sidecar could not be started or did not become ready.
    #[error(transparent)]
    Sidecar(#[from] SidecarError),
    /// Setup ended without a topology (a bug: `start` sets it when it succeeds).
    #[error("the demo did not start")]
    NotStarted,
}

/// Arguments of `meshd demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Run the tour once and exit: 0 when every step behaved as expected, 1 otherwise.
    #[arg(long)]
    pub once: bool,
    /// SVID lifetime; the dev CA also rotates every SVID at half of it (at least 2s).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub ttl: Duration,
}

/// Runs the demo; `Ok(true)` when every tour step passed. Setup failures are `Err`.
pub fn main(args: DemoArgs) -> Result<bool, DemoError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(DemoError::Runtime)?;
    runtime.block_on(run(args))
}

/// The full SPIFFE ID of a reference name, e.g. `spiffe://jia.app/payment-service`.
pub fn spiffe_id(name: &str) -> String {
    format!("spiffe://{TRUST_DOMAIN}/{name}")
}

/// What the tour and the summary need to know about the running topology.
#[derive(Debug, Clone)]
pub struct Topology {
    /// The private temp dir (sockets, configs, logs, policies, protos).
    pub dir: PathBuf,
    pub ttl: Duration,
    pub payment_app: SocketAddr,
    pub payment_inbound: u16,
    pub payment_admin: u16,
    /// The api-gateway sidecar's outbound listener for payment-service.
    pub gateway_out: u16,
    /// The edge gateway's port (HTTPS, JWT) and its certificate and token files.
    pub gateway: (u16, crate::demo::gateway::GatewayFiles),
    /// The intruder sidecar's outbound listener for payment-service.
    pub intruder_out: u16,
    /// Every sidecar: name, admin address and a one-line description of its listeners.
    pub sidecars: Vec<SidecarInfo>,
    /// Defaults that were taken, and what was used instead.
    pub notes: Vec<String>,
}

/// One sidecar as the summary shows it.
#[derive(Debug, Clone)]
pub struct SidecarInfo {
    /// e.g. `payment` (the log is `logs/payment-sidecar.log`).
    pub name: String,
    pub admin: SocketAddr,
    pub pid: u32,
    /// e.g. `inbound  127.0.0.1:15006 -> app 127.0.0.1:8081`, one line per listener.
    pub listeners: Vec<String>,
}

impl Topology {
    /// The admin address of the named sidecar.
    pub fn admin(&self, name: &str) -> Option<SocketAddr> {
        self.sidecars
            .iter()
            .find(|s| s.name == name)
            .map(|s| s.admin)
    }

    /// The log file of the named sidecar.
    pub fn log(&self, name: &str) -> PathBuf {
        log_path(&self.dir, name)
    }
}

pub(crate) fn log_path(dir: &Path, name: &str) -> PathBuf {
    dir.join("logs").join(format!("{name}-sidecar.log"))
}

pub(crate) fn socket_path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.sock"))
}

/// Everything the demo started, so that [`Demo::shutdown`] can stop it all.
struct Demo {
    dir: PathBuf,
    /// Stops the in-process CA and demo apps.
    stop: CancellationToken,
    /// The CA's sockets; finished after `stop`, which removes them.
    serving: Option<Serving>,
    ca: Option<Arc<DevCa>>,
    children: Vec<Child>,
    topology: Option<Topology>,
}

async fn run(args: DemoArgs) -> Result<bool, DemoError> {
    let interrupted = CancellationToken::new();
    listen_for_signals(interrupted.clone())?;
    let dir = make_dir()?;
    let mut demo = Demo {
        dir,
        stop: CancellationToken::new(),
        serving: None,
        ca: None,
        children: Vec::new(),
        topology: None,
    };
    let once = args.once;
    let outcome = tokio::select! {
        r = async {
            demo.start(&args).await?;
            let (topology, ca) = match (&demo.topology, &demo.ca) {
                (Some(t), Some(ca)) => (t.clone(), ca.clone()),
                _ => return Err(DemoError::NotStarted),
            };
            crate::demo::tour::print_summary(&topology);
            let passed = crate::demo::tour::run(&topology, &ca, once).await;
            if !once {
                say!(
                    "demo running: press Ctrl-C to stop it and remove {}",
                    topology.dir.display()
                );
                interrupted.cancelled().await;
            }
            Ok(passed)
        } => r,
        _ = interrupted.cancelled() => {
            say!("interrupted before the tour finished");
            Ok(false)
        }
    };
    if !once {
        say!("stopping the demo");
    }
    let problems = demo.shutdown().await;
    for p in &problems {
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), "meshd demo: {p}");
    }
    if !once {
        say!("demo stopped");
    }
    outcome
}

/// Cancels `token` on SIGINT or SIGTERM.
fn listen_for_signals(token: CancellationToken) -> Result<(), DemoError> {
    use tokio::signal::unix::{signal, SignalKind};
    let on = |kind: SignalKind, name: &'static str| {
        signal(kind).map_err(|error| DemoError::Signal { name, error })
    };
    let mut int = on(SignalKind::interrupt(), "SIGINT")?;
    let mut term = on(SignalKind::terminate(), "SIGTERM")?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            token.cancel();
        }
    });
    Ok(())
}

/// Removes `$TMPDIR/meshd-demo-<pid>-*` dirs whose demo process is gone (it was killed
/// with SIGKILL and could not clean up); a live demo's dir is never touched.
fn remove_stale_dirs(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = name
            .strip_prefix("meshd-demo-")
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A new private dir `$TMPDIR/meshd-demo-<pid>-<random>` with the policies and protos.
fn make_dir() -> Result<PathBuf, DemoError> {
    use std::os::unix::fs::DirBuilderExt;
    remove_stale_dirs(&std::env::temp_dir());
    let dir = std::env::temp_dir().join(format!(
        "meshd-demo-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    let fail = |path: &Path, error| DemoError::Create {
        path: path.to_path_buf(),
        error,
    };
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&dir)
        .map_err(|e| fail(&dir, e))?;
    let write = |path: PathBuf, text: &str| -> Result<(), DemoError> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| fail(parent, e))?;
        }
        std::fs::write(&path, text).map_err(|e| fail(&path, e))
    };
    let files = POLICIES
        .iter()
        .map(|(id, text)| (dir.join("policies").join(format!("{id}.yaml")), *text))
        .chain(
            PROTOS
                .iter()
                .map(|(name, text)| (dir.join("proto").join(name), *text)),
        );
    let mut result = Ok(());
    for (path, text) in files {
        result = result.and_then(|_| write(path, text));
    }
    result = result.and_then(|_| {
        std::fs::create_dir_all(dir.join("logs")).map_err(|e| fail(&dir.join("logs"), e))
    });
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&dir);
        return Err(e);
    }
    Ok(dir)
}

impl Demo {
    /// Starts the CA, the apps and the sidecars, and waits until every sidecar is ready.
    async fn start(&mut self, args: &DemoArgs) -> Result<(), DemoError> {
        let dir = self.dir.clone();
        let ca = Arc::new(DevCa::new(TRUST_DOMAIN).map_err(DemoError::Ca)?);
        let mut identities = Vec::new();
        let names = ["payment-service", "api-gateway", INTRUDER]
            .into_iter()
            .chain(LEAVES.iter().map(|l| l.1));
        for name in names {
            let id = SpiffeId::new(spiffe_id(name))
                .map_err(|reason| DemoError::BadId { name, reason })?;
            identities.push((id, socket_path(&dir, name)));
        }
        self.ca = Some(ca.clone());
        self.serving = Some(
            ca.serve(identities, args.ttl, self.stop.clone())
                .await
                .map_err(DemoError::CaServe)?,
        );

        let mut ports = PortPicker::default();
        let payment_inbound = ports.pick("the payment sidecar's inbound", Some(15006))?;
        let payment_admin = ports.pick("the payment sidecar's admin", Some(15000))?;
        let payment_app_port = ports.pick("the payment app", Some(8081))?;
        let gateway_out = ports.pick("the api-gateway sidecar's outbound", Some(15100))?;
        let gateway_port = ports.pick("the edge gateway", Some(8080))?;
        let gateway_files = crate::demo::gateway::write_files(&dir)?;
        let mut specs = Vec::new();
        let mut payment_out = Vec::new();
        let mut opts = DemoOptions::default();
        for (kind, name, default_out, jwt_audience) in LEAVES {
            let app = start_app(kind, 0, DemoOptions::default(), &self.stop).await?;
            let inbound = ports.pick(&format!("the {name} sidecar's inbound"), None)?;
            let out = ports.pick(
                &format!("the payment sidecar's outbound for {name}"),
                Some(default_out),
            )?;
            let url = Some(format!("http://127.0.0.1:{out}"));
            match kind {
                DemoService::Contact => opts.contact = url,
                DemoService::Family => opts.family = url,
                _ => opts.document = url,
            }
            payment_out.push(Upstream {
                name: name.to_string(),
                listen: out,
                sidecar: inbound,
                jwt_audience: jwt_audience.map(str::to_string),
            });
            let short = name.trim_end_matches("-service");
            specs.push(SidecarSpec {
                name: short.to_string(),
                id: name.to_string(),
                admin: ports.pick(&format!("the {short} sidecar's admin"), None)?,
                inbound: Some((inbound, app)),
                inbound_jwt_audience: jwt_audience.map(str::to_string),
                outbound: vec![],
                gateway: None,
            });
        }
        let payment_app =
            start_app(DemoService::Payment, payment_app_port, opts, &self.stop).await?;
        specs.push(SidecarSpec {
            name: "payment".into(),
            id: "payment-service".into(),
            admin: payment_admin,
            inbound: Some((payment_inbound, payment_app)),
            inbound_jwt_audience: None,
            outbound: payment_out,
            gateway: None,
        });
        let intruder_out = ports.pick("the intruder sidecar's outbound", None)?;
        for (name, out) in [("api-gateway", gateway_out), (INTRUDER, intruder_out)] {
            specs.push(SidecarSpec {
                name: name.into(),
                id: name.into(),
                admin: ports.pick(&format!("the {name} sidecar's admin"), None)?,
                inbound: None,
                inbound_jwt_audience: None,
                outbound: vec![Upstream {
                    name: "payment-service".into(),
                    listen: out,
                    sidecar: payment_inbound,
                    jwt_audience: None,
                }],
                gateway: (name == "api-gateway").then(|| (gateway_port, gateway_files.clone())),
            });
        }
        for spec in specs {
            let child = spawn_sidecar(&dir, spec)?;
            self.children.push(child);
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        for child in &mut self.children {
            wait_ready(&dir, child, deadline).await?;
        }
        self.topology = Some(Topology {
            dir,
            ttl: args.ttl,
            payment_app,
            payment_inbound,
            payment_admin,
            gateway_out,
            gateway: (gateway_port, gateway_files),
            intruder_out,
            sidecars: self
                .children
                .iter()
                .map(|c| SidecarInfo {
                    name: c.spec.name.clone(),
                    admin: SocketAddr::from((Ipv4Addr::LOCALHOST, c.spec.admin)),
                    pid: c.pid,
                    listeners: c.spec.listeners(),
                })
                .collect(),
            notes: ports.notes,
        });
        Ok(())
    }

    /// Stops everything this demo started and removes its dir; returns what went wrong.
    async fn shutdown(mut self) -> Vec<String> {
        let mut problems = Vec::new();
        self.stop.cancel();
        let stops = self.children.iter_mut().map(stop_sidecar);
        for p in futures::future::join_all(stops).await.into_iter().flatten() {
            problems.push(p);
        }
        if let Some(serving) = self.serving.take() {
            if tokio::time::timeout(STOP_GRACE, serving.finished())
                .await
                .is_err()
            {
                problems.push("the development CA did not stop in 5 s".into());
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            problems.push(format!("cannot remove {}: {e}", self.dir.display()));
        }
        problems
    }
}

/// Starts an in-process demo app on 127.0.0.1:`port` (0: any free port).
async fn start_app(
    kind: DemoService,
    port: u16,
    opts: DemoOptions,
    stop: &CancellationToken,
) -> Result<SocketAddr, DemoError> {
    let listen = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    apps::serve(kind, listen, opts, stop.clone())
        .await
        .map_err(|error| DemoError::App {
            service: kind.grpc_name(),
            error,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_dirs_of_killed_demos_are_removed() {
        // A demo killed with SIGKILL left its dir; the next demo removes it, not live ones.
        let tmp = tempfile::tempdir().unwrap();
        let dead = tmp.path().join("meshd-demo-4294967294-0badf00d");
        let live = tmp
            .path()
            .join(format!("meshd-demo-{}-00c0ffee", std::process::id()));
        let other = tmp.path().join("meshd-demo-notapid");
        for d in [&dead, &live, &other] {
            std::fs::create_dir_all(d.join("logs")).unwrap();
        }
        remove_stale_dirs(tmp.path());
        assert!(!dead.exists());
        assert!(live.exists() && other.exists());
    }

    #[test]
    fn embedded_policies_parse() {
        // The policies written into the temp dir are the reference ones and are valid.
        let dir = tempfile::tempdir().unwrap();
        for (id, text) in POLICIES {
            let path = dir.path().join(format!("{id}.yaml"));
            std::fs::write(&path, text).unwrap();
            let (lines, good) = crate::policy::check_file(&path);
            assert!(good, "{id}: {lines:?}");
        }
    }
}
