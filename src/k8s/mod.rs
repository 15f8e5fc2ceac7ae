//! Kubernetes: the pod mutation (`meshd inject`) and the pod's interception rules (`meshd iptables`).

mod inject;
mod iptables;
pub use inject::{inject_file, InjectArgs};
pub use iptables::{iptables_main, IptablesCommand};
