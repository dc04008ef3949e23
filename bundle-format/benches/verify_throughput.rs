//! Verify a 1 GiB bundle and compare its throughput with `openssl dgst -sha256` on the same
//! file in the same run (the hardware's SHA-256 limit).
//!
//!     cargo bench -p outpost-bundle-format --bench verify_throughput
//!
//! OUTPOST_BENCH_MIB sets the size (default 1024). The file lives in the system temp dir and is
//! removed at the end. Both measurements read from the page cache (the file is read once first).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use chrono::{TimeZone, Utc};
use outpost_bundle_format::bundle;
use outpost_bundle_format::crypto::{Sha256, SigningKey};
use outpost_bundle_format::layout::oci::{self, Descriptor, ImageManifest};
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_bundle_format::release::{FORMAT_VERSION, ReleaseMetadata};
use outpost_bundle_format::stack::Stack;
use outpost_bundle_format::{Digest, Trust, verify};
use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn main() {
    let mib: u64 = std::env::var("OUTPOST_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let dir = tempfile::tempdir().expect("temp dir");
    let layer_path = dir.path().join("layer.bin");
    let layer_digest = write_layer(&layer_path, mib << 20);

    let stack_text = include_str!("../../testdata/stacks/valid/quickstart.yaml");
    let (stack_file, _) = Stack::from_yaml(stack_text).expect("stack");
    let metadata = ReleaseMetadata {
        format_version: FORMAT_VERSION,
        name: "acme".into(),
        version: semver::Version::new(1, 0, 0),
        sequence: 1,
        channel: "stable".into(),
        created: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        expires: Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap(),
        irreversible: Vec::new(),
    };
    let mut layout = bundle::build(&stack_file, &metadata, &[]).expect("build");
    let key = SigningKey::generate().expect("key");
    bundle::add_signature(&mut layout, &key, "acme").expect("sign");
    // The big blob travels as a bundled image layer.
    let config = b"{\"rootfs\":{\"type\":\"layers\",\"diff_ids\":[]}}".to_vec();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::of(oci::MEDIA_TYPE_IMAGE_CONFIG, &config),
        layers: vec![Descriptor {
            size: mib << 20,
            ..Descriptor::of("application/vnd.oci.image.layer.v1.tar", b"")
        }],
        subject: None,
        annotations: Default::default(),
    };
    let mut manifest = manifest;
    manifest.layers[0].digest = layer_digest;
    let manifest = oci::to_bytes(&manifest);
    layout
        .index_mut()
        .manifests
        .push(Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &manifest));
    layout.add_blob(config);
    layout.add_blob(manifest);
    layout.add_verified_file(layer_digest, mib << 20, layer_path.clone());
    let bundle_path = dir.path().join("bundle.tar");
    layout.write_tar_file(&bundle_path).expect("write tar");
    std::fs::remove_file(&layer_path).ok();
    let size = std::fs::metadata(&bundle_path).expect("size").len();
    warm(&bundle_path);

    let trust = Trust::Keys {
        keys: vec![key.public_key().clone()],
        threshold: 1,
    };
    let limits = Limits::default();
    let ours = best_of(3, || {
        let layout = Layout::read(&bundle_path, &limits, None).expect("read");
        verify(&layout, &trust, Utc::now(), &limits).expect("verify");
    });
    let openssl = best_of(3, || {
        let status = std::process::Command::new("openssl")
            .args(["dgst", "-sha256"])
            .arg(&bundle_path)
            .stdout(std::process::Stdio::null())
            .status()
            .expect("openssl must be installed");
        assert!(status.success());
    });
    let rate = |d: Duration| size as f64 / d.as_secs_f64() / (1 << 20) as f64;
    println!(
        "bundle size:                {:.1} MiB",
        size as f64 / (1 << 20) as f64
    );
    println!(
        "outpost verify:             {:>8.3} s  {:>8.1} MiB/s",
        ours.as_secs_f64(),
        rate(ours)
    );
    println!(
        "openssl dgst -sha256:       {:>8.3} s  {:>8.1} MiB/s",
        openssl.as_secs_f64(),
        rate(openssl)
    );
    println!(
        "throughput ratio (goal >= 0.9): {:.3}",
        openssl.as_secs_f64() / ours.as_secs_f64()
    );
}

/// Pseudo-random bytes (xorshift), so compression or dedup cannot flatter anything.
fn write_layer(path: &std::path::Path, size: u64) -> Digest {
    let mut file =
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path).expect("create"));
    let mut hasher = Sha256::default();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut chunk = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < size {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = chunk.len().min((size - written) as usize);
        hasher.update(&chunk[..n]);
        file.write_all(&chunk[..n]).expect("write");
        written += n as u64;
    }
    file.flush().expect("flush");
    Digest::from_sha256(hasher.finish())
}

fn warm(path: &std::path::Path) {
    let mut file = std::fs::File::open(path).expect("open");
    let mut buffer = vec![0u8; 1 << 20];
    while file.read(&mut buffer).expect("read") > 0 {}
}

fn best_of(runs: usize, mut f: impl FnMut()) -> Duration {
    (0..runs)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed()
        })
        .min()
        .unwrap_or_default()
}
