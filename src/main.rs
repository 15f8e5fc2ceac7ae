//! The `meshd` command line (DESIGN.md §3). Parses arguments, reads the environment once
//! into `config::Env`, and hands over to the library; `anyhow` lives only here and in `app`.
#![forbid(unsafe_code)]

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;

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
    /// Validate a config file (and the policy it names); errors are file:line:column.
    Check {
        #[arg(long, default_value = "/etc/meshd/meshd.yaml")]
        config: Option<PathBuf>,
        /// Policy files to validate on their own.
        #[arg(long)]
        policy: Vec<PathBuf>,
    },
    /// The development CA: serves the SPIFFE Workload API on unix sockets, one per identity.
    DevCa(meshd::dev_ca::DevCaArgs),
    /// A reference service (payment, contact, family, document) on loopback, plaintext h2c.
    DemoApp(meshd::demo_apps::DemoAppArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { .. } => {
            eprintln!("meshd run: not built yet");
            ExitCode::FAILURE
        }
        Command::Check { .. } => {
            eprintln!("meshd check: not built yet");
            ExitCode::FAILURE
        }
        Command::DevCa(args) => match meshd::dev_ca::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshd dev-ca: {e}");
                ExitCode::FAILURE
            }
        },
        Command::DemoApp(args) => match meshd::demo_apps::main(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("meshd demo-app: {e}");
                ExitCode::FAILURE
            }
        },
    }
}
