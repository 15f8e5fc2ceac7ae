use super::*;
use std::path::Path;

fn env(pairs: &[(&str, &str)]) -> Env {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn scratch() {
    let p = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/data/config/bad.yaml"
    ));
    println!("{}", check_report(p, &env(&[])).0);
    let p = Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/deploy/examples/meshd.yaml"
    ));
    println!("{}", check_report(p, &env(&[])).0);
}
