//! Reading an untrusted layout tar never panics, never writes outside the spool, and every
//! blob it returns has the digest it is filed under.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle_format::layout::{Layout, Limits};

fuzz_target!(|data: &[u8]| {
    let limits = Limits { max_metadata_bytes: 64 * 1024, max_blob_bytes: 1 << 20, max_total_bytes: 4 << 20, max_entries: 256, max_held_bytes: 1 << 20 };
    if let Ok(layout) = Layout::read_tar(std::io::Cursor::new(data), &limits, None) {
        let _ = layout.reachable(&limits);
        let _ = outpost_bundle_format::bundle::read_parts(&layout, &limits);
    }
});
