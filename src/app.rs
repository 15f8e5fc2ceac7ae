//! The composition root: builds everything in the order data flows (telemetry,
//! identity, TLS, policy, listeners, admin), spawns the tasks under one drain, and waits
//! for a stop signal (SIGTERM/SIGINT, `POST /shutdown`, or the app's exit).

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::discovery::Dns;
use crate::discovery::{self, RefreshBounds};
use crate::gateway::Gateway;
use crate::identity::IdentityStatus;
use crate::inbound::Inbound;
use crate::outbound::Outbound;
use crate::outbound::{Claim, Transparent};
use crate::outbound::{UpstreamView, Upstreams};
use crate::policy::PolicyStore;
use crate::proxy::Drain;
use crate::proxy::{Connector, H2Pool};
use crate::telemetry::{self, AccessLogger, LabelBounds, Labels};
use crate::tls::TlsStore;
use anyhow::{anyhow, Context};
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
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.runtime.worker_threads)
            .enable_all()
            .build()?
    };
    rt.block_on(run(config, opts))
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot bind the {what} listener on {addr}"))
}

/// Builds and runs everything; returns after a complete drain.
pub async fn run(config: Config, opts: RunOptions) -> anyhow::Result<()> {
    let _ = crate::identity::crypto_provider();
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
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                handle.run_upkeep();
            }
        });
    }
    let labels = Arc::new(Labels::default());
    let access = Arc::new(AccessLogger {
        mode: config.log.access,
    });
    let drain = Drain::default();
    let background = CancellationToken::new();

    // Identity.
    let expect = config.identity.expect.clone();
    let (id_tx, id_rx) = watch::channel(IdentityStatus::Waiting {
        reason: "waiting for the first X.509-SVID".into(),
    });
    let reload_files = Arc::new(Notify::new());
    if let Some(files) = config.identity.files.clone() {
        tokio::spawn(crate::identity::follow_files(
            files,
            expect.clone(),
            id_tx,
            reload_files.clone(),
            background.clone(),
        ));
    } else {
        let addr = config
            .identity
            .workload_api
            .clone()
            .unwrap_or_else(|| crate::config::DEFAULT_WORKLOAD_API.into());
        tokio::spawn(crate::identity::follow_workload_api(
            addr,
            expect.clone(),
            id_tx,
            background.clone(),
        ));
    }

    // TLS.
    let upstream_ids = config
        .outbound
        .iter()
        .map(|o| (o.name.clone(), o.server_id.clone(), o.protocol.is_http()))
        .collect();
    let inbound_h2 = config.inbound.as_ref().is_none_or(|i| i.protocol.is_http());
    let tls = Arc::new(TlsStore::new(inbound_h2, upstream_ids));
    tokio::spawn(tls.clone().run(id_rx.clone()));

    // Policy.
    let policy = match config.inbound.as_ref().and_then(|i| i.policy.clone()) {
        Some(path) => {
            let store = Arc::new(PolicyStore::new(path));
            if let Err(problems) = store.reload() {
                for p in problems {
                    tracing::error!("{p}");
                }
            }
            tokio::spawn(store.clone().watch(background.clone()));
            Some(store)
        }
        None => None,
    };
    let policy_for_inbound = policy
        .clone()
        .unwrap_or_else(|| Arc::new(PolicyStore::new("<none: inbound.policy is not set>")));
    update_labels(&labels, policy.as_deref(), &config);

    // Listeners.
    let mut inbound_port = 0;
    if let Some(ib) = &config.inbound {
        let listener = bind(ib.listen, "inbound").await?;
        inbound_port = listener.local_addr()?.port();
        let inbound = Arc::new(Inbound {
            protocol: ib.protocol,
            forward: ib.forward,
            port: inbound_port,
            identity: id_rx.clone(),
            tls: tls.clone(),
            policy: policy_for_inbound.clone(),
            app: H2Pool::new(Connector::Plain(ib.forward)),
            labels: labels.clone(),
            log: access.clone(),
        });
        tracing::info!(
            "inbound listening on {} -> {}",
            listener.local_addr()?,
            ib.forward
        );
        tokio::spawn(inbound.serve(listener, drain.clone()));
    }
    let dns = Arc::new(Dns::new(&config.discovery.nameservers));
    let mut upstreams = Upstreams::default();
    let mut claims = Vec::new();
    let mut by_name = HashMap::new();
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
        let slot = tls
            .upstream(&o.name)
            .ok_or_else(|| anyhow!("outbound {}: no TLS slot", o.name))?;
        let ob = Arc::new(Outbound::new(
            o,
            slot,
            found,
            id_rx.clone(),
            labels.clone(),
            access.clone(),
            background.clone(),
        ));
        upstreams.list.push(ob.clone() as Arc<dyn UpstreamView>);
        ob.start(&drain);
        by_name.insert(o.name.clone(), ob.clone());
        for target in &o.intercept {
            claims.push(Claim {
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
    if let Some(t) = &config.transparent {
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
        let transparent = Arc::new(Transparent::new(own, claims, t.unmatched, dns.clone()));
        transparent.start(&drain).await;
        for listener in listeners {
            tokio::spawn(transparent.clone().serve(listener, drain.clone()));
        }
    }

    if let Some(g) = &config.gateway {
        let gateway = Arc::new(Gateway::new(g, &by_name, access.clone())?);
        let listener = bind(g.listen, "gateway").await?;
        tracing::info!(
            "gateway listening on {} ({} routes)",
            listener.local_addr()?,
            g.routes.len()
        );
        tokio::spawn(gateway.serve(listener, drain.clone()));
    }

    // Admin.
    let admin_listener = bind(config.admin.listen, "admin").await?;
    let shutdown = CancellationToken::new();
    let state = Arc::new(AdminState {
        identity: id_rx.clone(),
        policy: Some(policy_for_inbound.clone()).filter(|_| config.inbound.is_some()),
        inbound_port,
        metrics,
        config: config.redacted(),
        listeners_bound: Default::default(),
        shutdown: shutdown.clone(),
        log_reload,
        upstreams: Some(Arc::new(upstreams)),
    });
    state.listeners_bound.store(true, Ordering::Release);
    tracing::info!("admin listening on {}", admin_listener.local_addr()?);
    tokio::spawn(admin::serve(
        admin_listener,
        state.clone(),
        background.clone(),
    ));

    // Signals.
    let exit_with = opts.exit_with.or(config.lifecycle.exit_with_app);
    wait_for_stop(
        shutdown.clone(),
        exit_with,
        policy.clone(),
        reload_files,
        &labels,
        &config,
    )
    .await;

    tracing::info!("draining (up to {:?})", config.lifecycle.drain_timeout);
    shutdown.cancel();
    drain.stop.cancel();
    drain.tracker.close();
    if tokio::time::timeout(config.lifecycle.drain_timeout, drain.tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("drain timeout reached; closing remaining connections");
    }
    background.cancel();
    tracing::info!("stopped");
    Ok(())
}

fn update_labels(labels: &Labels, policy: Option<&PolicyStore>, _config: &Config) {
    let mut bounds = LabelBounds::default();
    if let Some(p) = policy.and_then(|p| p.snapshot()) {
        for rule in &p.rules {
            for m in &rule.from {
                if let crate::policy::IdMatcher::Exact { .. } = m {
                    bounds.peers.insert(m.to_string());
                }
            }
            for g in rule.to.iter().flat_map(|t| t.grpc.iter()) {
                let method = g.method.as_deref().unwrap_or("*");
                bounds.methods.insert(format!("{}/{method}", g.service));
            }
        }
    }
    labels.set(bounds);
}

async fn wait_for_stop(
    shutdown: CancellationToken,
    exit_with: Option<u32>,
    policy: Option<Arc<PolicyStore>>,
    reload_files: Arc<Notify>,
    labels: &Labels,
    config: &Config,
) {
    use tokio::signal::unix::{signal, SignalKind};
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
                if let Some(p) = &policy {
                    let _ = p.reload();
                }
                reload_files.notify_one();
                update_labels(labels, policy.as_deref(), config);
            }
            _ = tick.tick() => {
                let version = policy.as_ref().and_then(|p| p.snapshot()).map(|p| p.version);
                if version != seen_version {
                    seen_version = version;
                    update_labels(labels, policy.as_deref(), config);
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
