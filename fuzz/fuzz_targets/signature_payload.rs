//! The signature parts of a bundle never panic: a simple-signing payload yields a digest that
//! prints and parses back to itself, a signature manifest's layers give their signature bytes
//! or nothing, and junk signature bytes do not verify.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outpost_bundle_format::crypto::PublicKey;
use outpost_bundle_format::layout::oci::ImageManifest;
use outpost_bundle_format::{Digest, json, signature};

const VENDOR_KEY: &[u8] = include_bytes!("../../testdata/keys/vendor-a.pub");

fuzz_target!(|data: &[u8]| {
    if let Ok(digest) = signature::payload_digest(data) {
        assert_eq!(Digest::parse(&digest.to_string()).ok(), Some(digest));
    }
    if let Ok(manifest) = json::from_slice::<ImageManifest>(data) {
        for layer in &manifest.layers {
            let _ = signature::layer_signature(layer);
        }
    }
    // The first byte splits the input into a payload and a DER signature.
    if let Some((&split, rest)) = data.split_first() {
        let (payload, der) = rest.split_at((split as usize).min(rest.len()));
        let key = PublicKey::from_pem(VENDOR_KEY).expect("the test key parses");
        assert!(signature::signing_key(std::slice::from_ref(&key), payload, der).is_none());
    }
});
