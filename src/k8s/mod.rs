//! Kubernetes: the pod mutation (`meshd inject`), the admission webhook that runs the same
//! mutation at pod creation (`meshd injector`), and the pod's interception rules
//! (`meshd iptables`).

mod inject;
mod injector;
mod iptables;

#[cfg(test)]
mod fuzz;
pub use inject::{
    exemption, inject_file, mutate_pod, Exemption, InjectArgs, PodOutcome, PodShapeError,
    SidecarOptions,
};
pub use injector::{
    main as injector_main, review, write_certs, Answer, BadReview, CertsArgs, CertsError,
    InjectorArgs, InjectorCommand, InjectorError, ServeArgs, ServeError, Verdict,
};
pub use iptables::{iptables_main, IptablesCommand};
