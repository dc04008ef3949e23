//! The bundle's JSON documents (OCI index, OCI manifest, release metadata, provenance
//! statements) never panic, and what is accepted survives a round trip unchanged.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle_format::bundle::parse_metadata;
use outpost_bundle_format::json;
use outpost_bundle_format::layout::oci::{self, ImageIndex, ImageManifest};
use outpost_bundle_format::provenance::Provenance;

fuzz_target!(|data: &[u8]| {
    if let Ok(index) = json::from_slice::<ImageIndex>(data) {
        let again: ImageIndex = json::from_slice(&oci::to_bytes(&index)).expect("index round trip");
        assert_eq!(again, index);
        for entry in &index.manifests {
            let _ = entry.ref_name();
        }
    }
    if let Ok(manifest) = json::from_slice::<ImageManifest>(data) {
        let again: ImageManifest =
            json::from_slice(&oci::to_bytes(&manifest)).expect("manifest round trip");
        assert_eq!(again, manifest);
    }
    let _ = parse_metadata(data);
    if let Ok(provenance) = Provenance::parse(data) {
        let again = Provenance::parse(&provenance.statement()).expect("statement round trip");
        assert_eq!(again, provenance);
    }
});
