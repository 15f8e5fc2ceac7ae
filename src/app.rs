//! The composition root: builds everything in the order data flows, one step per
//! function, spawns the tasks, and waits for a stop signal.
//!
//! Flow of [`run`]: [`start_telemetry`] (logs, metrics, label bounds, access log),
//! [`start_identity`] (the SVID source task), [`start_tls`] (configs rebuilt at each
//! rotation), [`start_policy`] (the inbound policy, loaded and watched), then the
//! listeners: [`start_inbound`], [`start_outbounds`] (each with its discovery task),
//! [`start_transparent`], [`start_gateway`]; then [`start_admin`]. Connection tasks run
//! under one [`Drain`], everything else under a `background` token. [`wait_for_stop`]
//! returns on SIGTERM/SIGINT, `POST /shutdown`, or the app's exit, and [`drain`] lets
//! the connections in flight finish.

use crate::admin::{self, AdminScope, AdminState};
use crate::config::{AdminConfig, Config, GatewayConfig, IdentityConfig, TransparentConfig};
use crate::discovery::Dns;
use crate::discovery::{self, RefreshBounds};
use crate::gateway::Gateway;
use crate::identity::{IdentityStatus, JwtBundlesStatus};
use crate::inbound::{Inbound, JwtCheck};
use crate::outbound::Outbound;
use crate::outbound::{Claim, Transparent};
use crate::outbound::{UpstreamView, Upstreams};
use crate::policy::PolicyStore;
use crate::proxy::ConnectionGate;
use crate::proxy::Drain;
use crate::proxy::{Connector, H2Pool};
use crate::telemetry::{self, AccessLogger, Labels, LogReload};
use crate::tls::TlsStore;
use anyhow::{anyhow, Context};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::{watch, Notify};
use tokio_util::sync::CancellationToken;

/// What `run` needs beyond the config.
#[derive(Debug, Default)]
pub struct RunOptions {
    /// Drain and exit when this PID exits.
    pub exit_with: Option<u32>,
}

/// Runs the sidecar until drained. Builds its own runtime from `runtime.worker_threads`.
pub fn main(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let rt = if config.runtime.worker_threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(crate::telemetry::collect_memory_on_park)
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime.worker_threads)
            .enable_all()
            .on_thread_park(crate::telemetry::collect_memory_on_park)
            .build()?
    };
    rt.block_on(run(config, opts))
}

/// Raises the soft limit on open files to the hard one (as the Go runtime does): each
/// connection is a descriptor, and `connections.max` (not a default of 1024) should be
/// what bounds a listener. Says so when the hard limit is below what the config allows.
fn raise_open_files_limit(config: &Config) {
    let wanted = [
        config.inbound.as_ref().map(|i| i.connections.max),
        config.gateway.as_ref().map(|g| g.connections.max),
    ];
    let wanted: u64 = wanted.iter().flatten().map(|&m| m as u64).sum();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) if limit < wanted => tracing::warn!(
            "open files limit is {limit}; connections.max allows {wanted} connections: raise the hard limit (ulimit -Hn) or lower connections.max"
        ),
        Ok(_) => {}
        Err(e) => tracing::warn!("cannot raise the open files limit: {e}"),
    }
}

/// Builds and runs everything; returns after a complete drain.
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let telemetry = start_telemetry(&config);
    raise_open_files_limit(&config);
    let tasks = Tasks::default();
    let identity = start_identity(&config.identity, &tasks.background);
    let tls = start_tls(&config, &identity.status);
    let policy = start_policy(&config, &tasks.background);
    set_label_bounds(&telemetry.labels, policy.as_deref());
    let inbound_policy = policy
        .clone()
        .unwrap_or_else(|| Arc::new(PolicyStore::new("<none: inbound.policy is not set>")));
    let shared = Shared {
        identity: identity.status.clone(),
        tls,
        labels: telemetry.labels.clone(),
        access: telemetry.access.clone(),
        tasks: tasks.clone(),
    };

    let inbound_port =
        start_inbound(&config, &inbound_policy, &identity.jwt_bundles, &shared).await?;
    let dns = Arc::new(Dns::new(&config.discovery.nameservers));
    let outbounds = start_outbounds(&config, &dns, &shared, &identity.jwt_bundles).await?;
    if let Some(t) = &config.transparent {
        start_transparent(t, outbounds.claims, dns, &tasks.drain).await?;
    }
    if let Some(g) = &config.gateway {
        start_gateway(g, &outbounds.by_name, &identity.jwt_bundles, &shared).await?;
    }
    let admin = AdminState {
        identity: identity.status.clone(),
        jwt_bundles: identity.jwt_bundles.clone(),
        policy: Some(inbound_policy).filter(|_| config.inbound.is_some()),
        inbound_port,
        metrics: telemetry.metrics,
        config: config.redacted(),
        listeners_bound: Default::default(),
        shutdown: CancellationToken::new(),
        log_reload: telemetry.log_reload,
        upstreams: Some(Arc::new(outbounds.upstreams)),
    };
    let shutdown = start_admin(&config.admin, admin, &tasks.background).await?;

    let stop = Stop {
        shutdown: shutdown.clone(),
        exit_with: opts.exit_with.or(config.lifecycle.exit_with_app),
        policy,
        reload_files: identity.reload_files,
    };
    wait_for_stop(stop, &telemetry.labels).await;
    tracing::info!("draining (up to {:?})", config.lifecycle.drain_timeout);
    shutdown.cancel();
    drain(&tasks, config.lifecycle.drain_timeout).await;
    Ok(())
}

/// The observability every other step reports to.
struct Telemetry {
    /// Changes the log level at run time (`PUT /logging`); `None` when logging was
    /// already set up by someone else (tests).
    log_reload: Option<LogReload>,
    /// Renders `/metrics`; `None` when the recorder could not be installed.
    metrics: Option<PrometheusHandle>,
    /// The label values metrics admit (bounded by the policy).
    labels: Arc<Labels>,
    /// The access log, as `log.access` asks.
    access: Arc<AccessLogger>,
}

/// Logs at `log.level`, the Prometheus recorder (with its upkeep task), empty label
/// bounds, and the access log.
fn start_telemetry(config: &Config) -> Telemetry {
    let log_reload = telemetry::init_logging(&config.log.level);
    let metrics = match telemetry::install_metrics() {
        Ok(h) => Some(h),
        Err(e) => {
            tracing::warn!("{e}");
            None
        }
    };
    if let Some(handle) = metrics.clone() {
        // Without upkeep the exporter keeps every histogram sample until the next scrape.
        tokio::spawn(telemetry::keep_histograms_drained(handle));
    }
    Telemetry {
        log_reload,
        metrics,
        labels: Arc::new(Labels::default()),
        access: Arc::new(AccessLogger {
            mode: config.log.access,
        }),
    }
}

/// The two lifetimes of spawned tasks.
#[derive(Clone, Default)]
struct Tasks {
    /// Connection tasks: they stop accepting when draining starts and are waited for.
    drain: Drain,
    /// Everything else (identity, policy watch, discovery, admin): cancelled last.
    background: CancellationToken,
}

/// What every listener is built from.
struct Shared {
    /// The current identity, published by the identity source.
    identity: watch::Receiver<IdentityStatus>,
    /// The TLS configs, rebuilt at each rotation.
    tls: Arc<TlsStore>,
    /// The label values metrics admit.
    labels: Arc<Labels>,
    /// The access log.
    access: Arc<AccessLogger>,
    /// Where connection tasks are spawned.
    tasks: Tasks,
}

/// The identity source's output.
struct Identity {
    /// The current identity, published by the source task.
    status: watch::Receiver<IdentityStatus>,
    /// Makes the file source re-read its files (SIGHUP); the Workload API source
    /// ignores it.
    reload_files: Arc<Notify>,
    /// The Workload API's JWT bundles, followed beside the X.509 identity.
    jwt_bundles: watch::Receiver<JwtBundlesStatus>,
}

/// Spawns the identity source: the PEM files of `identity.files`, else the Workload API
/// (X.509 and, on a stream of its own, the JWT bundles).
fn start_identity(config: &IdentityConfig, background: &CancellationToken) -> Identity {
    let (id_tx, status) = watch::channel(IdentityStatus::Waiting {
        reason: "waiting for the first X.509-SVID".into(),
    });
    let reload_files = Arc::new(Notify::new());
    let expect = config.expect.clone();
    let (jwt_tx, jwt_bundles) = watch::channel(JwtBundlesStatus::waiting());
    if let Some(files) = config.files.clone() {
        jwt_tx.send_replace(JwtBundlesStatus::off(
            "identity.files has no JWT bundles: they come from the Workload API",
        ));
        tokio::spawn(crate::identity::follow_files(
            files,
            expect,
            id_tx,
            reload_files.clone(),
            background.clone(),
        ));
    } else {
        let addr = config
            .workload_api
            .clone()
            .unwrap_or_else(|| crate::config::DEFAULT_WORKLOAD_API.into());
        tokio::spawn(crate::identity::follow_jwt_bundles(
            addr.clone(),
            jwt_tx,
            background.clone(),
        ));
        tokio::spawn(crate::identity::follow_workload_api(
            addr,
            expect,
            id_tx,
            background.clone(),
        ));
    }
    Identity {
        status,
        reload_files,
        jwt_bundles,
    }
}

/// The TLS store (one client slot per outbound) and its task following the identity.
fn start_tls(config: &Config, identity: &watch::Receiver<IdentityStatus>) -> Arc<TlsStore> {
    // Server-only upstreams get their slot in `upstream_tls`: nothing in it rotates.
    let upstream_ids = config
        .outbound
        .iter()
        .filter_map(|o| Some((o.name.clone(), o.server_id.clone()?, o.protocol.is_http())))
        .collect();
    let inbound_h2 = config.inbound.as_ref().is_none_or(|i| i.protocol.is_http());
    let tls = Arc::new(TlsStore::new(inbound_h2, upstream_ids));
    tokio::spawn(tls.clone().run(identity.clone()));
    tls
}

/// The inbound policy store, loaded once (problems logged: an unloaded store denies
/// everything) and watched; `None` without `inbound.policy`.
fn start_policy(config: &Config, background: &CancellationToken) -> Option<Arc<PolicyStore>> {
    let path = config.inbound.as_ref()?.policy.clone()?;
    let store = Arc::new(PolicyStore::new(path));
    if let Err(problems) = store.reload() {
        for p in problems {
            tracing::error!("{p}");
        }
    }
    tokio::spawn(store.clone().watch(background.clone()));
    Some(store)
}

/// Bounds the metrics' peer and method labels by what the policy names.
fn set_label_bounds(labels: &Labels, policy: Option<&PolicyStore>) {
    labels.set(policy.map(PolicyStore::label_bounds).unwrap_or_default());
}

/// A listener on `addr` with an accept queue of 4096 (the kernel caps it at
/// `net.core.somaxconn`): a burst of new connections (a flood, or every client
/// reconnecting at once) waits in the queue instead of having its SYNs dropped, which
/// costs each client a one-second retransmit.
async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    let listen = || -> std::io::Result<TcpListener> {
        let socket = match addr {
            SocketAddr::V4(_) => tokio::net::TcpSocket::new_v4()?,
            SocketAddr::V6(_) => tokio::net::TcpSocket::new_v6()?,
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(4096)
    };
    listen().with_context(|| format!("cannot bind the {what} listener on {addr}"))
}

/// The inbound mTLS listener, if configured; returns its bound port (0 without one).
async fn start_inbound(
    config: &Config,
    policy: &Arc<PolicyStore>,
    jwt_bundles: &watch::Receiver<JwtBundlesStatus>,
    shared: &Shared,
) -> anyhow::Result<u16> {
    let Some(ib) = &config.inbound else {
        return Ok(0);
    };
    let listener = bind(ib.listen, "inbound").await?;
    let port = listener.local_addr()?.port();
    let inbound = Arc::new(Inbound {
        protocol: ib.protocol,
        forward: ib.forward,
        port,
        identity: shared.identity.clone(),
        tls: shared.tls.clone(),
        policy: policy.clone(),
        app: H2Pool::new(Connector::Plain(ib.forward)),
        labels: shared.labels.clone(),
        log: shared.access.clone(),
        limits: ib.connections,
        gate: ConnectionGate::new("inbound", Some(ib.connections)),
        jwt: (ib.jwt_svid.clone()).map(|j| JwtCheck::new(j, jwt_bundles.clone())),
    });
    tracing::info!(
        "inbound listening on {} -> {}",
        listener.local_addr()?,
        ib.forward
    );
    tokio::spawn(inbound.serve(listener, shared.tasks.drain.clone()));
    Ok(port)
}

/// The outbounds, for the listeners and the admin server that reach them.
struct Outbounds {
    /// Every upstream, for `/upstreams` and readiness.
    upstreams: Upstreams,
    /// Every outbound's `intercept` addresses, for the transparent listener.
    claims: Vec<Claim>,
    /// Each outbound by name, for the gateway's routes.
    by_name: HashMap<String, Arc<Outbound>>,
}

/// Each outbound with its discovery task, and its plaintext listener if it has one.
async fn start_outbounds(
    config: &Config,
    dns: &Arc<Dns>,
    shared: &Shared,
    jwt_bundles: &watch::Receiver<JwtBundlesStatus>,
) -> anyhow::Result<Outbounds> {
    let mut out = Outbounds {
        upstreams: Upstreams::default(),
        claims: Vec::new(),
        by_name: HashMap::new(),
    };
    let Tasks { drain, background } = &shared.tasks;
    let mut jwt_source = None;
    for o in &config.outbound {
        let listener = match o.listen {
            Some(addr) => Some(bind(addr, &format!("outbound {}", o.name)).await?),
            None => None,
        };
        let refresh = RefreshBounds {
            min: o.min_refresh,
            max: o.max_refresh,
        };
        let found = discovery::start(
            &o.name,
            o.endpoints.clone(),
            dns.clone(),
            refresh,
            background.clone(),
        );
        let (slot, jwt) = upstream_tls(config, o, &shared.tls, &mut jwt_source, jwt_bundles)?;
        let ob = Arc::new(Outbound::new(
            o,
            slot,
            jwt,
            found,
            shared.identity.clone(),
            shared.labels.clone(),
            shared.access.clone(),
            background.clone(),
        ));
        out.upstreams.list.push(ob.clone() as Arc<dyn UpstreamView>);
        ob.start(drain);
        out.by_name.insert(o.name.clone(), ob.clone());
        for target in &o.intercept {
            out.claims.push(Claim {
                target: target.clone(),
                outbound: ob.clone(),
                refresh,
            });
        }
        if let Some(listener) = listener {
            tracing::info!(
                "outbound {} listening on {}",
                o.name,
                listener.local_addr()?
            );
            tokio::spawn(ob.serve(listener, drain.clone()));
        }
    }
    Ok(out)
}

/// An outbound's client TLS slot (the store's, rotating with the SVID, for mTLS; built
/// once for `server_only`) and its JWT-SVID attachment (`jwt_svid`), all from one
/// `JwtSvidSource` made on first need. The source retries an unavailable agent for half
/// the shortest `timeout` of these outbounds, so a request fails with the agent's reason
/// rather than its deadline.
fn upstream_tls(
    config: &Config,
    o: &crate::config::OutboundConfig,
    store: &TlsStore,
    jwt_source: &mut Option<Arc<crate::identity::JwtSvidSource>>,
    jwt_bundles: &watch::Receiver<JwtBundlesStatus>,
) -> anyhow::Result<(
    Arc<crate::tls::UpstreamTls>,
    Option<crate::outbound::JwtAttach>,
)> {
    let slot = match (&o.server_id, &o.tls.sni) {
        (Some(_), _) => store.upstream(&o.name),
        (None, Some(sni)) => {
            let built = crate::tls::server_only_tls(o.tls.ca.as_deref(), sni, o.protocol.is_http());
            Some(Arc::new(
                built.with_context(|| format!("outbound {}", o.name))?,
            ))
        }
        (None, None) => None,
    }
    .ok_or_else(|| anyhow!("outbound {}: no TLS slot", o.name))?;
    let Some(jwt) = &o.jwt_svid else {
        return Ok((slot, None));
    };
    let source = jwt_source.get_or_insert_with(|| {
        let patience = (config.outbound.iter())
            .filter(|o| o.jwt_svid.is_some())
            .map(|o| o.timeout / 2)
            .min()
            .unwrap_or(Duration::from_secs(2));
        let addr = (config.identity.workload_api.as_deref())
            .unwrap_or(crate::config::DEFAULT_WORKLOAD_API);
        let expect = config.identity.expect.clone();
        let source = crate::identity::JwtSvidSource::new(addr, expect, patience);
        Arc::new(source.following(jwt_bundles.clone()))
    });
    let attach = crate::outbound::JwtAttach::new(&o.name, jwt.audience.clone(), source.clone());
    Ok((slot, Some(attach)))
}

/// The transparent listener (IPv4, and IPv6 loopback when the pod has it) that hands
/// intercepted connections to the outbound claiming their destination.
async fn start_transparent(
    t: &TransparentConfig,
    claims: Vec<Claim>,
    dns: Arc<Dns>,
    drain: &Drain,
) -> anyhow::Result<()> {
    let mut listeners = vec![bind(t.listen, "transparent outbound").await?];
    match TcpListener::bind(t.listen_v6).await {
        Ok(l) => listeners.push(l),
        Err(e) => tracing::info!("transparent outbound: not on {} ({e})", t.listen_v6),
    }
    let own: Vec<SocketAddr> = listeners
        .iter()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    tracing::info!(
        "transparent outbound listening on {own:?} ({} intercept entries, unmatched: {:?})",
        claims.len(),
        t.unmatched
    );
    let transparent = Arc::new(Transparent::new(own, claims, t.unmatched, dns));
    transparent.start(drain).await;
    for listener in listeners {
        tokio::spawn(transparent.clone().serve(listener, drain.clone()));
    }
    Ok(())
}

/// The edge gateway's listener, routing to the outbounds by name; its JWT-SVID provider
/// (`gateway.jwt_svid`) validates against the followed `jwt_bundles`.
async fn start_gateway(
    g: &GatewayConfig,
    by_name: &HashMap<String, Arc<Outbound>>,
    jwt_bundles: &watch::Receiver<JwtBundlesStatus>,
    shared: &Shared,
) -> anyhow::Result<()> {
    let gateway = Arc::new(Gateway::new(
        g,
        by_name,
        shared.access.clone(),
        jwt_bundles.clone(),
    )?);
    let listener = bind(g.listen, "gateway").await?;
    tracing::info!(
        "gateway listening on {} ({} routes)",
        listener.local_addr()?,
        g.routes.len()
    );
    tokio::spawn(gateway.serve(listener, shared.tasks.drain.clone()));
    Ok(())
}

/// The admin server, started once every listener is bound; returns the token that
/// `POST /shutdown` cancels.
async fn start_admin(
    config: &AdminConfig,
    state: AdminState,
    background: &CancellationToken,
) -> anyhow::Result<CancellationToken> {
    let listener = bind(config.listen, "admin").await?;
    let metrics = match config.metrics_listen {
        Some(addr) => Some(bind(addr, "admin metrics").await?),
        None => None,
    };
    let state = Arc::new(state);
    state.listeners_bound.store(true, Ordering::Release);
    tracing::info!("admin listening on {}", listener.local_addr()?);
    let stop = background.clone();
    tokio::spawn(admin::serve(
        listener,
        state.clone(),
        AdminScope::Full,
        stop,
    ));
    if let Some(listener) = metrics {
        tracing::info!(
            "admin metrics (/metrics /ready /live) listening on {}",
            listener.local_addr()?
        );
        let stop = background.clone();
        tokio::spawn(admin::serve(
            listener,
            state.clone(),
            AdminScope::MetricsOnly,
            stop,
        ));
    }
    Ok(state.shutdown.clone())
}

/// What ends the wait, and what a SIGHUP reloads.
struct Stop {
    /// Cancelled by `POST /shutdown`.
    shutdown: CancellationToken,
    /// The app's process: its exit stops meshd.
    exit_with: Option<u32>,
    /// Reloaded on SIGHUP; its new version re-bounds the metrics' labels.
    policy: Option<Arc<PolicyStore>>,
    /// Re-reads the identity files on SIGHUP.
    reload_files: Arc<Notify>,
}

/// Waits for SIGTERM, SIGINT, `POST /shutdown` or the app's exit; meanwhile reloads on
/// SIGHUP and keeps the label bounds in step with the policy.
async fn wait_for_stop(stop: Stop, labels: &Labels) {
    use tokio::signal::unix::{signal, SignalKind};
    let Stop {
        shutdown,
        exit_with,
        policy,
        reload_files,
    } = stop;
    let mut term = signal(SignalKind::terminate()).ok();
    let mut int = signal(SignalKind::interrupt()).ok();
    let mut hup = signal(SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let mut seen_version = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            Some(_) = async { term.as_mut()?.recv().await } => return,
            Some(_) = async { int.as_mut()?.recv().await } => return,
            Some(_) = async { hup.as_mut()?.recv().await } => {
                tracing::info!("SIGHUP: reloading policy and identity files");
                if let Some(p) = policy.clone() {
                    // Off the reactor: a big policy takes a while to compile. The tick
                    // below sees its new version and updates the label bounds.
                    tokio::task::spawn_blocking(move || {
                        let _ = p.reload();
                    });
                }
                reload_files.notify_one();
                set_label_bounds(labels, policy.as_deref());
            }
            _ = tick.tick() => {
                let version = policy.as_ref().and_then(|p| p.snapshot()).map(|p| p.version);
                if version != seen_version {
                    seen_version = version;
                    set_label_bounds(labels, policy.as_deref());
                }
                if let Some(pid) = exit_with {
                    if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                        tracing::info!("app process {pid} exited");
                        return;
                    }
                }
            }
        }
    }
}

/// Stops accepting, lets the connections in flight finish for up to `timeout`, then
/// stops the background tasks.
async fn drain(tasks: &Tasks, timeout: Duration) {
    tasks.drain.stop.cancel();
    tasks.drain.tracker.close();
    if tokio::time::timeout(timeout, tasks.drain.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    tasks.background.cancel();
    tracing::info!("stopped");
}
