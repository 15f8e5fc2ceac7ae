//! The `meshd` command line (DESIGN.md §3). Parses arguments, reads the environment once
//! into `config::Env`, and hands over to the library; `anyhow` lives only here and in `app`.
#![forbid(unsafe_code)]

use clap::{Args, Parser, Subcommand};
use meshd::config::{self, Config, Env};
use std::path::PathBuf;
use std::process::ExitCode;

/// mimalloc rather than glibc's malloc: the proxy allocates and frees small buffers for
/// every request (headers, frames, tasks), and mimalloc does that in fewer instructions
/// at the same RSS (Cargo.toml says why it is built with `no_thp`). The
/// `system-allocator` feature leaves glibc's malloc in place, for heap profilers that
/// hook it (heaptrack; benches/e2e/README.md).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "meshd", version, about = "A SPIFFE-native sidecar proxy")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the sidecar (or gateway, per config).
    Run {
        #[arg(long, default_value = "/etc/meshd/meshd.yaml")]
        config: PathBuf,
        /// Drain and exit when this process exits (for Kubernetes Jobs).
        #[arg(long)]
        exit_with: Option<u32>,
    },
    /// Validate a config file (and the policy it names) and policy files; errors are
    /// printed as file:line:column: message, and the exit code is 1.
    Check {
        #[arg(long)]
        config: Option<PathBuf>,
        /// Policy files to validate on their own.
        #[arg(long)]
        policy: Vec<PathBuf>,
    },
    /// Authorization policy tools.
    #[command(subcommand)]
    Policy(PolicyCommand),
    /// The development CA: serves the SPIFFE Workload API on unix sockets, one per identity.
    DevCa(meshd::dev_ca::DevCaArgs),
    /// The whole reference topology on loopback with a scripted tour; runs until Ctrl-C,
    /// or with --once exits 0 when every step passed and 1 otherwise.
    Demo(meshd::demo::DemoArgs),
    /// A demo gRPC app of the reference topology (plaintext, loopback).
    DemoApp(meshd::demo::DemoAppArgs),
    /// Print a Kubernetes manifest with meshd added to every pod template.
    Inject(meshd::k8s::InjectArgs),
    /// The mutating admission webhook that injects pods at creation (HTTPS, POST /inject);
    /// `meshd injector certs` makes its CA and serving certificate.
    Injector(meshd::k8s::InjectorArgs),
    /// Ask the local admin server for /ready or /live: exit 0 on 200 (the injected
    /// sidecar's exec probes).
    Probe {
        /// /ready or /live.
        #[arg(default_value = "/ready")]
        path: String,
        /// The admin server's address.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: std::net::SocketAddr,
    },
    /// The pod's interception rules (iptables and ip6tables nat tables): install, uninstall, print.
    #[command(subcommand)]
    Iptables(meshd::k8s::IptablesCommand),
}

#[derive(Subcommand)]
enum PolicyCommand {
    /// Print ALLOW or DENY, the deciding rule and the mode for one request.
    Explain(ExplainArgs),
}

#[derive(Args)]
struct ExplainArgs {
    #[arg(long)]
    policy: PathBuf,
    /// The caller's SPIFFE ID.
    #[arg(long)]
    from: String,
    /// A gRPC target, SERVICE/METHOD.
    #[arg(long, conflicts_with = "http")]
    grpc: Option<String>,
    /// An HTTP target: METHOD PATH.
    #[arg(long, num_args = 2, value_names = ["METHOD", "PATH"])]
    http: Option<Vec<String>>,
    /// The local port (default 15006).
    #[arg(long)]
    port: Option<u16>,
}

fn env() -> Env {
    Env(std::env::vars().collect())
}

fn check(config_path: Option<PathBuf>, policies: Vec<PathBuf>) -> ExitCode {
    let mut ok = true;
    let mut policies = policies;
    if let Some(path) = &config_path {
        let (report, good) = config::check_report(path, &env());
        println!("{report}");
        ok &= good;
        if let Ok(cfg) = Config::load(path, &env()) {
            if let Some(g) = &cfg.gateway {
                let (lines, good) = meshd::gateway::check_files(g);
                for l in lines {
                    println!("{l}");
                }
                ok &= good;
            }
            if let Some(p) = cfg.inbound.and_then(|i| i.policy) {
                policies.push(p);
            }
        }
    }
    if config_path.is_none() && policies.is_empty() {
        eprintln!("meshd check: give --config FILE and/or --policy FILE");
        return ExitCode::from(2);
    }
    for p in policies {
        let (lines, good) = meshd::policy::check_file(&p);
        for l in lines {
            println!("{l}");
        }
        ok &= good;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config, exit_with } => {
            let cfg = match Config::load(&config, &env()) {
                Ok(c) => c,
                Err(errors) => {
                    eprintln!("{errors}");
                    return ExitCode::FAILURE;
                }
            };
            match meshd::app::main(cfg, meshd::app::RunOptions { exit_with }) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("meshd: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Check { config, policy } => check(config, policy),
        Command::Policy(PolicyCommand::Explain(a)) => {
            let http = a.http.as_ref().map(|v| (v[0].as_str(), v[1].as_str()));
            match meshd::policy::explain_cli(&a.policy, &a.from, a.grpc.as_deref(), http, a.port) {
                Ok(text) => {
                    println!("{text}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("{e}");
                    ExitCode::from(2)
                }
            }
        }
        Command::DevCa(args) => match meshd::dev_ca::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshd dev-ca: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Demo(args) => match meshd::demo::main(args) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("meshd demo: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Inject(args) => match meshd::k8s::inject_file(&args) {
            Ok(text) => {
                print!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd inject: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Injector(args) => match meshd::k8s::injector_main(args) {
            Ok(text) => {
                if !text.is_empty() {
                    println!("{text}");
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd injector: {e}");
                ExitCode::FAILURE
            }
        },
        Command::Probe { path, admin } => {
            match meshd::admin::probe(admin, &path, std::time::Duration::from_secs(2)) {
                Ok(body) => {
                    println!("{body}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    println!("meshd probe: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Iptables(cmd) => match meshd::k8s::iptables_main(cmd) {
            Ok(text) => {
                println!("{}", text.trim_end());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("meshd iptables: {e}");
                ExitCode::FAILURE
            }
        },
        Command::DemoApp(args) => match meshd::demo::demo_app_main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshd demo-app: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
