//! What the scale benches (`policy_scale`, `endpoint_scale`) share: how a run says how big
//! its curve is.

/// The sizes a scale bench measures, and whether it runs quick.
///
/// Quick unless asked for the full curve: `cargo test --all-targets` runs a bench binary
/// without `--bench` (as CI does), and a full curve takes many minutes.
/// `MESHD_SCALE_QUICK=1` makes any run quick; `MESHD_SCALE_SIZES=10,100` picks the sizes.
pub struct ScaleArgs {
    /// A smoke run: the two smallest sizes and few repeats, no figures to judge.
    pub quick: bool,
    /// The sizes to measure, in order.
    pub sizes: Vec<usize>,
}

impl ScaleArgs {
    /// Reads the process's arguments and `MESHD_SCALE_*` variables; `full` is the curve
    /// measured by `cargo bench`.
    pub fn from_env(full: &[usize]) -> ScaleArgs {
        let quick = std::env::var_os("MESHD_SCALE_QUICK").is_some_and(|v| v != "0")
            || !std::env::args().any(|a| a == "--bench");
        let sizes = match std::env::var("MESHD_SCALE_SIZES") {
            Ok(list) => list
                .split(',')
                .map(|s| s.trim().parse().expect("MESHD_SCALE_SIZES: numbers"))
                .collect(),
            Err(_) if quick => vec![10, 1_000],
            Err(_) => full.to_vec(),
        };
        ScaleArgs { quick, sizes }
    }
}
