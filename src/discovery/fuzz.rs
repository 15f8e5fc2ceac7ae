//! Fuzzed endpoint files (`endpoints: file:///path`): YAML lists of `host:port`
//! strings and `{address, weight, server_id, zone}` entries, mutated.
//!
//! Properties: nothing panics or hangs; a file that reads gives at least one endpoint,
//! each with a port and a weight in range, whose `host:port` prints back to itself.

use crate::config::parse_host_port;
use crate::discovery::file::check;
use crate::telemetry::fuzz_budget::{config, mutated, watchdog};
use proptest::prelude::*;

const FILES: &[&str] = &[
    "- 127.0.0.1:8081\n- \"[::1]:8082\"\n- contact.default.svc:15006\n",
    "- {address: 10.0.0.1:15006, weight: 3, server_id: spiffe://jia.app/contact-service, zone: a}\n- address: 10.0.0.2:15006\n  weight: 100\n",
    "[]\n",
];

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn endpoint_files_read_or_are_refused(text in mutated(FILES)) {
        let _w = watchdog("endpoint file");
        if let Ok(entries) = check(&text) {
            prop_assert!(!entries.is_empty());
            for e in &entries {
                prop_assert!(e.host_port.port > 0);
                prop_assert_eq!(parse_host_port(&e.host_port.to_string()), Ok(e.host_port.clone()));
            }
        }
    }
}
