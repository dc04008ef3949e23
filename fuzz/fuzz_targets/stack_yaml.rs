//! Stack parsing never panics, and what it accepts re-validates after a JSON round trip.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle_format::stack::{Stack, StackFile};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok((file, stack)) = Stack::from_yaml(text) {
        let json = serde_json::to_vec(&file).expect("serialize");
        let again: StackFile = serde_json::from_slice(&json).expect("round trip");
        assert_eq!(Stack::from_file(&again).expect("still valid"), stack);
    }
});
