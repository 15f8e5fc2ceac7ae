//! Kubernetes: the pod mutation (`meshd inject`) and the pod's interception rules (`meshd iptables`).

mod inject;
mod iptables;
pub use inject::{
    inject_file, mutate_pod, skip_reason, InjectArgs, PodOutcome, PodShapeError, SidecarOptions,
    Skip,
};
pub use iptables::{iptables_main, IptablesCommand};
