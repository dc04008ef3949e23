//! The verification test vectors in testdata/bundles: one directory per scenario holding
//! `bundle.tar`, the `verify.args` a customer would pass, and `expect` (`ok` or the name of the
//! check that must fail). `OUTPOST_BLESS=1 cargo test -p outpost-tests --test vectors`
//! regenerates them from the library (signatures are randomized, so bytes change).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use chrono::{TimeZone, Utc};
use outpost_bundle_format::bundle;
use outpost_bundle_format::layout::oci;
use outpost_bundle_format::root;
use outpost_tests::forge::{
    EntryKind, directory_with_data, edit_manifest, garbage, key, metadata, move_signature,
    quickstart, raw_tar, release, roots, rotated_root, signature_amplification, signed,
    signed_payload, signed_unchecked, tampered_tar, tar, with_metadata_json, with_stack,
};
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

fn write(name: &str, bundle: &[u8], args: &str, expect: &str) {
    let dir = testdata().join("bundles").join(name);
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("bundle.tar"), bundle).unwrap();
    fs::write(dir.join("verify.args"), format!("{args}\n")).unwrap();
    fs::write(dir.join("expect"), format!("{expect}\n")).unwrap();
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
    write(
        "tampered-blob",
        &tampered_tar(&signed(base(), &["vendor-a"])),
        key_a,
        "digest-mismatch",
    );

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
    let target = move_signature(&signed(base(), &["vendor-a"]), release("2.0.0", 2));
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
        &tar(&signed_unchecked(
            with_stack(serde_json::to_vec(&stack).unwrap(), "1.0.0", 1),
            &["vendor-a"],
        )),
        key_a,
        "unpinned-image",
    );
    let mut stack: serde_json::Value = serde_json::to_value(quickstart()).unwrap();
    stack["resources"][0]["container"]["memory"] = "1GB".into();
    write(
        "invalid-stack",
        &tar(&signed_unchecked(
            with_stack(serde_json::to_vec(&stack).unwrap(), "1.0.0", 1),
            &["vendor-a"],
        )),
        key_a,
        "invalid-stack",
    );

    // Trust roots: v1 trusts vendor-a; v2 trusts vendor-b and is signed by both.
    let (v1, v2_unsigned) = roots();
    let v2 = rotated_root(&v2_unsigned);
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
        &raw_tar(&[("../../../tmp/outpost-escape", EntryKind::File, blob, None)]),
        key_a,
        "unsafe-path",
    );
    write(
        "tar-absolute-path",
        &raw_tar(&[("/tmp/outpost-escape", EntryKind::File, blob, None)]),
        key_a,
        "unsafe-path",
    );
    write(
        "tar-symlink",
        &raw_tar(&[(&blob_name, EntryKind::Symlink, b"", Some("/etc/passwd"))]),
        key_a,
        "unsafe-path",
    );
    write("truncated", &valid[..valid.len() / 2], key_a, "malformed");
    write(
        "signature-amplification",
        &signature_amplification(&signed(base(), &["vendor-a"]), 256),
        key_a,
        "malformed",
    );
    write(
        "directory-with-data",
        &directory_with_data(&signed(base(), &["vendor-a"]), 64 << 10),
        key_a,
        "malformed",
    );

    // Signed by a trusted key and still refused: duplicate members in signed JSON.
    let doubled = r#"{"formatVersion":1,"name":"acme","version":"1.0.0","sequence":1,"sequence":18446744073709551615,"channel":"stable","created":"2026-01-01T00:00:00Z","expires":"2099-01-01T00:00:00Z"}"#;
    write(
        "duplicate-member-in-metadata",
        &tar(&signed_unchecked(
            with_metadata_json(doubled),
            &["vendor-a"],
        )),
        key_a,
        "metadata",
    );
    let target = base();
    let payload = format!(
        r#"{{"critical":{{"identity":{{"docker-reference":"acme"}},"image":{{"docker-manifest-digest":"{}","docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
        outpost_tests::forge::digest(&release("0.0.1", 1)),
        outpost_tests::forge::digest(&target)
    );
    write(
        "duplicate-member-in-payload",
        &tar(&signed_payload(target, &payload, &["vendor-a"])),
        key_a,
        "malformed",
    );
    // A verified root v2 carried beside the unsigned draft of v2.
    let (v1, v2_unsigned) = roots();
    write(
        "carried-draft-root",
        &tar(&signed_unchecked(
            bundle::build(
                &quickstart(),
                &metadata("1.0.0", 1),
                &[rotated_root(&v2_unsigned), v2_unsigned],
            )
            .unwrap(),
            &["vendor-b"],
        )),
        "--root root-v1.json",
        "trust-root",
    );
    fs::write(dir.join("carried-draft-root/root-v1.json"), &v1).unwrap();
    write("garbage", &garbage(), key_a, "malformed");

    let readme = "# Verification test vectors\n\nOne directory per scenario: `bundle.tar`, `verify.args` (the arguments to `outpost-signer verify bundle.tar`, run from the directory) and `expect` (`ok`, or the name of the check that must fail).\nGenerated by `OUTPOST_BLESS=1 cargo test -p outpost-tests --test vectors` with the keys in `../keys/`; valid vectors expire in 2099.\n";
    fs::write(dir.join("README.md"), readme).unwrap();
}
