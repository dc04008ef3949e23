//! The verification test vectors in testdata/bundles: one directory per scenario holding
//! `bundle.tar`, the `verify.args` a customer would pass, and `expect` (`ok` or the name of the
//! check that must fail). `OUTPOST_BLESS=1 cargo test -p outpost-tests --test vectors`
//! regenerates them from the library (signatures are randomized, so bytes change).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use chrono::{TimeZone, Utc};
use outpost_bundle_format::bundle;
use outpost_bundle_format::crypto::SigningKey;
use outpost_bundle_format::layout::Layout;
use outpost_bundle_format::layout::oci::{self, Descriptor};
use outpost_bundle_format::release::{FORMAT_VERSION, ReleaseMetadata};
use outpost_bundle_format::root;
use outpost_bundle_format::stack::{Stack, StackFile};
use outpost_tests::{run, signer, testdata};
use std::fs;

#[test]
fn every_vector_verifies_as_expected() {
    if std::env::var_os("OUTPOST_BLESS").is_some() {
        generate();
    }
    let dir = testdata().join("bundles");
    let mut count = 0;
    let mut entries: Vec<_> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    entries.sort();
    for scenario in entries {
        let expect = fs::read_to_string(scenario.join("expect"))
            .unwrap()
            .trim()
            .to_string();
        let args = fs::read_to_string(scenario.join("verify.args")).unwrap();
        let result = run(signer()
            .current_dir(&scenario)
            .arg("verify")
            .arg("bundle.tar")
            .args(args.split_whitespace()));
        let name = scenario.file_name().unwrap().to_string_lossy().into_owned();
        if expect == "ok" {
            assert_eq!(result.code, 0, "{name}: {}", result.stderr);
            assert!(
                result.stdout.starts_with("verified acme "),
                "{name}: {}",
                result.stdout
            );
        } else {
            assert_eq!(
                result.code, 1,
                "{name}: expected failure {expect}, got: {} {}",
                result.stdout, result.stderr
            );
            let needle = format!("verification failed: {expect}:");
            assert!(
                result.stderr.contains(&needle),
                "{name}: {:?} lacks {needle:?}",
                result.stderr
            );
        }
        count += 1;
    }
    assert!(count >= 15, "only {count} vectors");
}

fn key(name: &str) -> SigningKey {
    let pem = fs::read(testdata().join("keys").join(format!("{name}.key"))).unwrap();
    SigningKey::from_encrypted_pem(&pem, b"test").unwrap()
}

fn quickstart() -> StackFile {
    let text = fs::read_to_string(testdata().join("stacks/valid/quickstart.yaml")).unwrap();
    Stack::from_yaml(&text).unwrap().0
}

fn metadata(version: &str, sequence: u64) -> ReleaseMetadata {
    ReleaseMetadata {
        format_version: FORMAT_VERSION,
        name: "acme".into(),
        version: semver::Version::parse(version).unwrap(),
        sequence,
        channel: "stable".into(),
        created: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        expires: Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap(),
    }
}

fn signed(mut layout: Layout, keys: &[&str]) -> Layout {
    for name in keys {
        bundle::add_signature(&mut layout, &key(name), "acme").unwrap();
    }
    layout
}

fn tar(layout: &Layout) -> Vec<u8> {
    let mut out = Vec::new();
    layout.write_tar(&mut out).unwrap();
    out
}

/// Replaces the bundle manifest by `edit(manifest)`, fixing the index (as an attacker would).
fn edit_manifest(
    layout: &mut Layout,
    edit: impl FnOnce(&mut serde_json::Value),
) -> outpost_bundle_format::Digest {
    let old = bundle::bundle_descriptor(layout).unwrap().clone();
    let bytes = layout.read_blob(&old.digest, 1 << 20).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
    edit(&mut manifest);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &bytes);
    descriptor.artifact_type = old.artifact_type.clone();
    descriptor.annotations = old.annotations.clone();
    let digest = layout.add_blob(bytes);
    let index = layout.index_mut();
    index.manifests.retain(|d| d.digest != old.digest);
    index.manifests.insert(0, descriptor);
    digest
}

/// A bundle whose stack layer is replaced by `stack_json` (built around the builder's checks).
fn with_stack(stack_json: Vec<u8>) -> Layout {
    let mut layout = bundle::build(&quickstart(), &metadata("1.0.0", 1), &[]).unwrap();
    let layer = Descriptor::of(bundle::MEDIA_TYPE_STACK, &stack_json);
    layout.add_blob(stack_json);
    edit_manifest(&mut layout, |m| {
        m["layers"][0] = serde_json::to_value(&layer).unwrap()
    });
    layout
}

fn write(name: &str, bundle: &[u8], args: &str, expect: &str) {
    let dir = testdata().join("bundles").join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("bundle.tar"), bundle).unwrap();
    fs::write(dir.join("verify.args"), format!("{args}\n")).unwrap();
    fs::write(dir.join("expect"), format!("{expect}\n")).unwrap();
}

fn raw_tar(entries: &[(&str, tar_kind::Kind, &[u8], Option<&str>)]) -> Vec<u8> {
    tar_kind::build(entries)
}

/// Minimal tar writer for hostile entries (paths the tar crate's builder refuses to write).
mod tar_kind {
    #[derive(Clone, Copy)]
    pub enum Kind {
        File,
        Symlink,
    }

    pub fn build(entries: &[(&str, Kind, &[u8], Option<&str>)]) -> Vec<u8> {
        let mut out = Vec::new();
        for (path, kind, content, link) in entries {
            let mut header = [0u8; 512];
            header[..path.len()].copy_from_slice(path.as_bytes());
            header[100..107].copy_from_slice(b"0000644");
            header[108..115].copy_from_slice(b"0000000");
            header[116..123].copy_from_slice(b"0000000");
            header[124..135].copy_from_slice(format!("{:011o}", content.len()).as_bytes());
            header[136..147].copy_from_slice(b"00000000000");
            header[156] = match kind {
                Kind::File => b'0',
                Kind::Symlink => b'2',
            };
            if let Some(link) = link {
                header[157..157 + link.len()].copy_from_slice(link.as_bytes());
            }
            header[257..263].copy_from_slice(b"ustar\0");
            header[263..265].copy_from_slice(b"00");
            header[148..156].copy_from_slice(b"        ");
            let sum: u32 = header.iter().map(|b| *b as u32).sum();
            header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
            out.extend_from_slice(&header);
            out.extend_from_slice(content);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }
}

fn generate() {
    let dir = testdata().join("bundles");
    let _ = fs::remove_dir_all(&dir);
    let key_a = "--key ../../keys/vendor-a.pub";
    let all_keys =
        "--key ../../keys/vendor-a.pub --key ../../keys/vendor-b.pub --key ../../keys/vendor-c.pub";
    let base = || bundle::build(&quickstart(), &metadata("1.0.0", 1), &[]).unwrap();

    let valid = tar(&signed(base(), &["vendor-a"]));
    write("valid", &valid, key_a, "ok");
    write(
        "valid-2-of-3",
        &tar(&signed(base(), &["vendor-a", "vendor-c"])),
        &format!("{all_keys} --threshold 2"),
        "ok",
    );
    write("unsigned", &tar(&base()), key_a, "unsigned");
    write(
        "wrong-key",
        &tar(&signed(base(), &["vendor-b"])),
        key_a,
        "untrusted-signature",
    );
    write(
        "threshold-unmet",
        &tar(&signed(base(), &["vendor-a"])),
        &format!("{all_keys} --threshold 2"),
        "threshold-unmet",
    );
    write(
        "same-key-twice-below-threshold",
        &tar(&signed(base(), &["vendor-a", "vendor-a"])),
        &format!("{all_keys} --threshold 2"),
        "threshold-unmet",
    );

    // Tampered blob: one byte of the stack changed inside the tar, names unchanged.
    let stack_json = serde_json::to_vec(&quickstart()).unwrap();
    let mut tampered = valid.clone();
    let at = tampered
        .windows(stack_json.len())
        .position(|w| w == stack_json.as_slice())
        .unwrap();
    let offset = at + stack_json.windows(4).position(|w| w == b"1Gi\"").unwrap();
    tampered[offset] = b'9';
    write("tampered-blob", &tampered, key_a, "digest-mismatch");

    // Tampered manifest, index and signature tag rewritten consistently: the signed payload
    // still names the original digest.
    let mut layout = signed(base(), &["vendor-a"]);
    let old = bundle::bundle_descriptor(&layout).unwrap().digest;
    let new = edit_manifest(&mut layout, |m| {
        m["annotations"]["org.opencontainers.image.version"] = "9.9.9".into()
    });
    for d in &mut layout.index_mut().manifests {
        if d.ref_name() == Some(old.signature_tag().as_str()) {
            d.annotations
                .insert(oci::ANNOTATION_REF_NAME.into(), new.signature_tag());
        }
    }
    write(
        "tampered-manifest",
        &tar(&layout),
        key_a,
        "signature-mismatch",
    );

    // A valid signature of release 1.0.0 moved onto release 2.0.0.
    let donor = signed(base(), &["vendor-a"]);
    let donor_digest = bundle::bundle_descriptor(&donor).unwrap().digest;
    let mut target = bundle::build(&quickstart(), &metadata("2.0.0", 2), &[]).unwrap();
    let target_digest = bundle::bundle_descriptor(&target).unwrap().digest;
    let sig = donor
        .index()
        .manifests
        .iter()
        .find(|d| d.ref_name() == Some(donor_digest.signature_tag().as_str()))
        .unwrap()
        .clone();
    let sig_bytes = donor.read_blob(&sig.digest, 1 << 20).unwrap();
    let sig_manifest: oci::ImageManifest = serde_json::from_slice(&sig_bytes).unwrap();
    for blob in std::iter::once(&sig_manifest.config).chain(&sig_manifest.layers) {
        target.add_blob(donor.read_blob(&blob.digest, 1 << 20).unwrap());
    }
    target.add_blob(sig_bytes);
    let mut moved = sig.clone();
    moved.annotations.insert(
        oci::ANNOTATION_REF_NAME.into(),
        target_digest.signature_tag(),
    );
    target.index_mut().manifests.push(moved);
    write(
        "signature-moved",
        &tar(&target),
        key_a,
        "signature-mismatch",
    );

    // Freeze: a release past its expiry.
    let mut old_release = metadata("1.0.0", 1);
    old_release.created = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    old_release.expires = Utc.with_ymd_and_hms(2020, 6, 1, 0, 0, 0).unwrap();
    write(
        "expired",
        &tar(&signed(
            bundle::build(&quickstart(), &old_release, &[]).unwrap(),
            &["vendor-a"],
        )),
        key_a,
        "expired",
    );

    // Signed, but the stack inside breaks the rules or names an image by tag only.
    let mut stack: serde_json::Value = serde_json::to_value(quickstart()).unwrap();
    stack["resources"][0]["container"]["code"]["image"] = "ghcr.io/acme/api:1.0".into();
    write(
        "unpinned-image",
        &tar(&signed(
            with_stack(serde_json::to_vec(&stack).unwrap()),
            &["vendor-a"],
        )),
        key_a,
        "unpinned-image",
    );
    let mut stack: serde_json::Value = serde_json::to_value(quickstart()).unwrap();
    stack["resources"][0]["container"]["memory"] = "1GB".into();
    write(
        "invalid-stack",
        &tar(&signed(
            with_stack(serde_json::to_vec(&stack).unwrap()),
            &["vendor-a"],
        )),
        key_a,
        "invalid-stack",
    );

    // Trust roots: v1 trusts vendor-a; v2 trusts vendor-b and is signed by both.
    let expires = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
    let v1 = root::sign_root(
        &root::new_root(1, expires, 1, &[key("vendor-a").public_key().clone()]).unwrap(),
        &key("vendor-a"),
    )
    .unwrap();
    let v2_unsigned =
        root::new_root(2, expires, 1, &[key("vendor-b").public_key().clone()]).unwrap();
    let v2 = root::sign_root(
        &root::sign_root(&v2_unsigned, &key("vendor-a")).unwrap(),
        &key("vendor-b"),
    )
    .unwrap();
    let v2_only_new = root::sign_root(&v2_unsigned, &key("vendor-b")).unwrap();
    let rotated = signed(
        bundle::build(
            &quickstart(),
            &metadata("1.0.0", 1),
            std::slice::from_ref(&v2),
        )
        .unwrap(),
        &["vendor-b"],
    );
    write("rotated-root", &tar(&rotated), "--root root-v1.json", "ok");
    fs::write(dir.join("rotated-root/root-v1.json"), &v1).unwrap();
    let bad_rotation = signed(
        bundle::build(&quickstart(), &metadata("1.0.0", 1), &[v2_only_new]).unwrap(),
        &["vendor-b"],
    );
    write(
        "rotation-not-signed-by-old-root",
        &tar(&bad_rotation),
        "--root root-v1.json",
        "trust-root",
    );
    fs::write(
        dir.join("rotation-not-signed-by-old-root/root-v1.json"),
        &v1,
    )
    .unwrap();
    write(
        "signed-by-rotated-out-key",
        &tar(&signed(
            bundle::build(&quickstart(), &metadata("1.0.0", 1), &[v2]).unwrap(),
            &["vendor-a"],
        )),
        "--root root-v1.json",
        "untrusted-signature",
    );
    fs::write(dir.join("signed-by-rotated-out-key/root-v1.json"), &v1).unwrap();

    // Hostile and broken files.
    let blob = b"x";
    let blob_name = format!(
        "blobs/sha256/{}",
        outpost_bundle_format::Digest::of(blob).hex()
    );
    write(
        "tar-path-traversal",
        &raw_tar(&[(
            "../../../tmp/outpost-escape",
            tar_kind::Kind::File,
            blob,
            None,
        )]),
        key_a,
        "unsafe-path",
    );
    write(
        "tar-absolute-path",
        &raw_tar(&[("/tmp/outpost-escape", tar_kind::Kind::File, blob, None)]),
        key_a,
        "unsafe-path",
    );
    write(
        "tar-symlink",
        &raw_tar(&[(
            &blob_name,
            tar_kind::Kind::Symlink,
            b"",
            Some("/etc/passwd"),
        )]),
        key_a,
        "unsafe-path",
    );
    write("truncated", &valid[..valid.len() / 2], key_a, "malformed");
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    write("garbage", &garbage, key_a, "malformed");

    let readme = "# Verification test vectors\n\nOne directory per scenario: `bundle.tar`, `verify.args` (the arguments to `outpost-signer verify bundle.tar`, run from the directory) and `expect` (`ok`, or the name of the check that must fail).\nGenerated by `OUTPOST_BLESS=1 cargo test -p outpost-tests --test vectors` with the keys in `../keys/`; valid vectors expire in 2099.\n";
    fs::write(dir.join("README.md"), readme).unwrap();
}
