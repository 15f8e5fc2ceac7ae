//! `meshd injector`: the mutating admission webhook that gives pods the sidecar at
//! creation, with the mutation of `meshd inject` (one mutation, two front doors).
//!
//! Flow: `meshd injector certs` ([`certs`]) makes a CA and a serving certificate;
//! `meshd injector --listen ADDR --tls-cert F --tls-key F` ([`serve`]) serves HTTPS:
//! `POST /inject` answers an AdmissionReview ([`review`]: decide, mutate, diff into a JSON
//! Patch), `/ready`, `/live` and `/metrics` (`meshd_injector_requests_total{result}`).
//! The API server chooses which pods reach the webhook (the MutatingWebhookConfiguration's
//! namespaceSelector and objectSelector, deploy/k8s/injector.yaml); the webhook injects
//! every pod it is sent except those [`crate::k8s::exemption`] leaves alone.

mod certs;
pub(super) mod review;
mod serve;

pub use certs::{write_certs, CertsArgs, CertsError};
pub use review::{review, Answer, BadReview, Verdict};
pub use serve::{ServeArgs, ServeError};

/// `meshd injector`: serve the webhook, or `meshd injector certs`.
#[derive(Debug, Clone, clap::Args)]
#[command(args_conflicts_with_subcommands = true, subcommand_negates_reqs = true)]
pub struct InjectorArgs {
    /// `certs`, or none to serve.
    #[command(subcommand)]
    pub command: Option<InjectorCommand>,
    /// The server's options.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// The subcommands of `meshd injector`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum InjectorCommand {
    /// Write a CA (ca.pem) and a serving certificate (tls.pem, tls-key.pem) for the
    /// injector's Service, and print the caBundle line for the MutatingWebhookConfiguration.
    Certs(CertsArgs),
}

/// Why `meshd injector` stopped.
#[derive(Debug, thiserror::Error)]
pub enum InjectorError {
    /// `meshd injector certs` failed.
    #[error(transparent)]
    Certs(#[from] CertsError),
    /// The server failed to start or stopped on an error.
    #[error(transparent)]
    Serve(#[from] ServeError),
}

/// Runs `meshd injector`; returns what to print on success.
pub fn main(args: InjectorArgs) -> Result<String, InjectorError> {
    match args.command {
        Some(InjectorCommand::Certs(c)) => Ok(write_certs(&c)?),
        None => {
            serve::main(args.serve)?;
            Ok(String::new())
        }
    }
}

#[cfg(test)]
mod tests;
