//! Kubernetes: the pod mutation (`meshd inject`), the admission webhook that runs the same
//! mutation at pod creation (`meshd injector`), and the pod's interception rules
//! (`meshd iptables`).

mod inject;
mod injector;
mod iptables;

#[cfg(test)]
mod fuzz;
pub use inject::{
    inject_file, mutate_pod, skip_reason, InjectArgs, PodOutcome, PodShapeError, SidecarOptions,
    Skip,
};
pub use injector::{
    main as injector_main, review, write_certs, Answer, BadReview, CertsArgs, CertsError,
    InjectorArgs, InjectorCommand, InjectorError, ServeArgs, ServeError, Verdict,
};
pub use iptables::{iptables_main, IptablesCommand};
