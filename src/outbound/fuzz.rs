//! Fuzzed answers of an upstream's gRPC health check (`grpc.health.v1.Health/Check`):
//! the response body, framed and unframed, mutated.
//!
//! Properties: nothing panics or hangs on any body; a body that reads is one
//! uncompressed frame whose length fits the body, and the well-formed answer reads as
//! the status it carries.

use crate::outbound::health_check::parse_grpc_response;
use crate::telemetry::fuzz_budget::{config, mutated_bytes, watchdog};
use proptest::prelude::*;

/// A framed HealthCheckResponse with `status` (field 1, varint).
fn answer(status: u8) -> Vec<u8> {
    vec![0, 0, 0, 0, 2, 0x08, status]
}

proptest! {
    #![proptest_config(config(1))]

    #[test]
    fn health_answers_read_or_are_refused(body in mutated_bytes(vec![answer(1), answer(2), answer(0), vec![0, 0, 0, 0, 0]])) {
        let _w = watchdog("health check answer");
        if parse_grpc_response(&body).is_ok() {
            prop_assert_eq!(body[0], 0);
            let len = u32::from_be_bytes([body[1], body[2], body[3], body[4]]) as usize;
            prop_assert!(5 + len <= body.len());
        }
    }

    #[test]
    fn well_formed_answers_read_as_their_status(status in 0u8..4) {
        prop_assert_eq!(parse_grpc_response(&answer(status)).ok(), Some(i32::from(status)));
    }
}
