//! `root.json` never panics whether pinned or carried: a carried root that rotates the pinned
//! one is newer, and pinning what was accepted gives the same root again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle_format::root::{TrustRoot, peek_version};

const PINNED: &[u8] = include_bytes!("../../testdata/bundles/rotated-root/root-v1.json");

fuzz_target!(|data: &[u8]| {
    let _ = peek_version(data);
    if let Ok(root) = TrustRoot::from_pinned(data) {
        let again = TrustRoot::from_pinned(root.raw()).expect("an accepted root pins again");
        assert_eq!(again.version(), root.version());
    }
    let pinned = TrustRoot::from_pinned(PINNED).expect("the test root pins");
    if let Ok(next) = pinned.rotate(data) {
        assert!(next.version() > pinned.version());
    }
});
