//! The development CA (placeholder; filled in by the identity work).

/// Arguments of `meshd dev-ca`.
#[derive(clap::Args, Debug)]
pub struct DevCaArgs {}

/// Runs the development CA until interrupted.
pub fn main(_args: DevCaArgs) -> Result<(), String> {
    Err("not built yet".into())
}
