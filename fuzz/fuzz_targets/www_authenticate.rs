//! A registry's `WWW-Authenticate` header never panics the client, and a bearer challenge it
//! accepts sends the client only to an http(s) realm.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_registry_client::Challenge;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    if let Ok(Challenge::Bearer { realm, .. }) = Challenge::parse(header) {
        assert!(realm.starts_with("https://") || realm.starts_with("http://"));
    }
});
