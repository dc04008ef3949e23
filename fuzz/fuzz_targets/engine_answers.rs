//! The container engine's JSON answers (a container list, an inspect) never panic the
//! runtime: a listed container becomes an instance only with the runtime's labels.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::runtime::docker::{listed_instance, stopped_details};

fuzz_target!(|data: &[u8]| {
    let Ok(answer) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    for item in answer.as_array().into_iter().flatten() {
        if let Some(instance) = listed_instance("acme", item) {
            assert!(instance.name.starts_with("acme-"));
        }
    }
    let _ = stopped_details(&answer);
});
