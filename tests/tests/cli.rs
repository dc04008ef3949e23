//! The `outpost-signer` command-line contract: commands, outputs and exit codes
//! (0 ok, 1 validation/verification failed, 2 usage error).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::{run, sign_with, signer, testdata};
use std::fs;
use std::path::Path;

fn quickstart() -> std::path::PathBuf {
    testdata().join("stacks/valid/quickstart.yaml")
}

fn keygen(dir: &Path) {
    run(signer().args(["keygen", "--out-dir"]).arg(dir)).ok();
}

fn build(out: &Path, version: &str, sequence: u64) -> String {
    let result = run(signer()
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .arg("build")
        .arg(quickstart())
        .args([
            "--version",
            version,
            "--sequence",
            &sequence.to_string(),
            "--offline",
            "--out",
        ])
        .arg(out))
    .ok();
    result
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap_or_default()
        .to_string()
}

#[test]
fn keygen_writes_a_cosign_format_pair_and_refuses_to_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    keygen(dir.path());
    let key = fs::read_to_string(dir.path().join("outpost.key")).unwrap();
    assert!(
        key.starts_with("-----BEGIN ENCRYPTED SIGSTORE PRIVATE KEY-----"),
        "{key}"
    );
    let public = fs::read_to_string(dir.path().join("outpost.pub")).unwrap();
    assert!(public.starts_with("-----BEGIN PUBLIC KEY-----"));
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        fs::metadata(dir.path().join("outpost.key"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    run(signer().args(["keygen", "--out-dir"]).arg(dir.path()))
        .fails(2, "already holds a key pair");
}

#[test]
fn password_comes_from_outpost_password_then_cosign_password() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("b.tar");
    run(signer()
        .env("OUTPOST_PASSWORD", "one")
        .args(["keygen", "--out-dir"])
        .arg(dir.path()))
    .ok();
    build(&bundle, "1.0.0", 1);
    let key = dir.path().join("outpost.key");
    run(signer()
        .env("OUTPOST_PASSWORD", "two")
        .arg("sign")
        .arg(&bundle)
        .arg("--key")
        .arg(&key))
    .fails(1, "cannot decrypt the private key");
    run(signer()
        .env_remove("OUTPOST_PASSWORD")
        .env("COSIGN_PASSWORD", "one")
        .arg("sign")
        .arg(&bundle)
        .arg("--key")
        .arg(&key))
    .ok();
}

#[test]
fn build_is_deterministic_across_tar_and_directory_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b, layout_dir) = (
        dir.path().join("a.tar"),
        dir.path().join("b.tar"),
        dir.path().join("layout"),
    );
    let digest = build(&a, "1.2.3", 7);
    assert_eq!(build(&b, "1.2.3", 7), digest);
    assert_eq!(
        fs::read(&a).unwrap(),
        fs::read(&b).unwrap(),
        "same inputs, different bytes"
    );
    let out = run(signer()
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .arg("build")
        .arg(quickstart())
        .args([
            "--version",
            "1.2.3",
            "--sequence",
            "7",
            "--offline",
            "--out-dir",
        ])
        .arg(&layout_dir))
    .ok();
    assert!(out.stdout.contains(&digest), "{}", out.stdout);
    // Another sequence is another release.
    assert_ne!(build(&b, "1.2.3", 8), digest);
    // --created overrides SOURCE_DATE_EPOCH.
    let created = run(signer()
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .arg("build")
        .arg(quickstart())
        .args([
            "--version",
            "1.2.3",
            "--sequence",
            "7",
            "--offline",
            "--created",
            "2026-01-01T00:00:00Z",
            "--out",
        ])
        .arg(&b))
    .ok();
    assert!(!created.stdout.contains(&digest));
}

#[test]
fn build_refuses_unpinned_images_offline_and_every_broken_stack_rule() {
    let dir = tempfile::tempdir().unwrap();
    let stack = dir.path().join("stack.yaml");
    let text = fs::read_to_string(quickstart()).unwrap();
    let at = text.find("ghcr.io/acme/api@").unwrap();
    let end = at + text[at..].find('"').unwrap();
    fs::write(
        &stack,
        format!("{}ghcr.io/acme/api:1.0{}", &text[..at], &text[end..]),
    )
    .unwrap();
    run(signer()
        .arg("build")
        .arg(&stack)
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--offline",
            "--out",
        ])
        .arg(dir.path().join("x.tar")))
    .fails(
        1,
        "resources[0] (api).code.image: image ghcr.io/acme/api:1.0 is not pinned by digest",
    );

    for entry in fs::read_dir(testdata().join("stacks/invalid")).unwrap() {
        let path = entry.unwrap().path();
        let expected = fs::read_to_string(&path)
            .unwrap()
            .lines()
            .next()
            .unwrap()
            .trim_start_matches("# expect:")
            .trim()
            .to_string();
        run(signer()
            .arg("build")
            .arg(&path)
            .args([
                "--version",
                "1.0.0",
                "--sequence",
                "1",
                "--offline",
                "--out",
            ])
            .arg(dir.path().join("x.tar")))
        .fails(1, &expected);
    }
    assert!(
        !dir.path().join("x.tar").exists(),
        "a failed build left an output file"
    );
}

#[test]
fn usage_errors_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.tar");
    run(signer()
        .arg("build")
        .arg(quickstart())
        .args(["--version", "one", "--sequence", "1", "--offline", "--out"])
        .arg(&out))
    .fails(2, "--version");
    assert_eq!(run(signer().arg("build").arg(quickstart())).code, 2);
    // Where to push built images, for a stack that builds none: said, not ignored.
    run(signer()
        .arg("build")
        .arg(quickstart())
        .args(["--version", "1.0.0", "--sequence", "1"])
        .args(["--image-repository", "127.0.0.1:5000/acme", "--out"])
        .arg(&out))
    .fails(2, "has no resource built from source");
    assert_eq!(run(signer().arg("frobnicate")).code, 2);
    run(signer()
        .args(["verify", "missing.tar", "--key"])
        .arg(testdata().join("keys/vendor-a.pub")))
    .fails(2, "missing.tar");
    run(signer()
        .arg("push")
        .arg(testdata().join("bundles/valid/bundle.tar"))
        .arg("ftp://x"))
    .fails(2, "unknown destination");
}

#[test]
fn sign_verify_inspect_round_trip_with_k_of_n() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("b.tar");
    let digest = build(&bundle, "1.0.0", 1);
    let keys = testdata().join("keys");
    run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(keys.join("vendor-a.pub")))
    .fails(1, "verification failed: unsigned:");
    sign_with(&bundle, &["vendor-a"]);
    let verified = run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(keys.join("vendor-a.pub")))
    .ok();
    assert_eq!(
        verified.stdout.trim(),
        format!("verified acme 1.0.0 sequence 1 {digest}")
    );
    let two_of_three = |b: &Path| {
        run(signer()
            .arg("verify")
            .arg(b)
            .args(["--threshold", "2"])
            .arg("--key")
            .arg(keys.join("vendor-a.pub"))
            .arg("--key")
            .arg(keys.join("vendor-b.pub"))
            .arg("--key")
            .arg(keys.join("vendor-c.pub")))
    };
    two_of_three(&bundle).fails(1, "threshold-unmet");
    sign_with(&bundle, &["vendor-b"]);
    two_of_three(&bundle).ok();

    let inspect = run(signer()
        .arg("inspect")
        .arg(&bundle)
        .args(["--output", "json"]))
    .ok();
    let report: serde_json::Value = serde_json::from_str(&inspect.stdout).unwrap();
    assert_eq!(report["digest"], digest.as_str());
    assert_eq!(report["metadata"]["name"], "acme");
    assert_eq!(report["metadata"]["version"], "1.0.0");
    assert_eq!(report["metadata"]["sequence"], 1);
    assert_eq!(report["metadata"]["channel"], "stable");
    assert_eq!(report["resources"][0]["name"], "api");
    assert_eq!(report["signatures"].as_array().unwrap().len(), 2);
    assert!(report["images"][0].as_str().unwrap().contains("@sha256:"));
    let text = run(signer().arg("inspect").arg(&bundle)).ok();
    assert!(text.stdout.contains(&digest));
}

#[test]
fn keys_made_by_cosign_sign_bundles() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("b.tar");
    build(&bundle, "1.0.0", 1);
    let interop = testdata().join("interop");
    run(signer()
        .env("OUTPOST_PASSWORD", "")
        .arg("sign")
        .arg(&bundle)
        .arg("--key")
        .arg(interop.join("cosign-generated.key")))
    .ok();
    run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(interop.join("cosign-generated.pub")))
    .ok();
}

#[test]
fn root_rotation_through_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let keys = testdata().join("keys");
    let (v1, v2) = (
        dir.path().join("root-v1.json"),
        dir.path().join("root-v2.json"),
    );
    run(signer()
        .args(["root", "init", "--out"])
        .arg(&v1)
        .arg("--key")
        .arg(keys.join("vendor-a.pub")))
    .ok();
    run(signer().args(["root", "verify"]).arg(&v1)).fails(1, "signed by 0 of its keys");
    run(signer()
        .args(["root", "sign"])
        .arg(&v1)
        .arg("--key")
        .arg(keys.join("vendor-a.key")))
    .ok();
    run(signer().args(["root", "verify"]).arg(&v1)).ok();

    run(signer()
        .args(["root", "rotate"])
        .arg(&v1)
        .arg("--out")
        .arg(&v2)
        .arg("--key")
        .arg(keys.join("vendor-b.pub")))
    .ok();
    run(signer()
        .args(["root", "sign"])
        .arg(&v2)
        .arg("--key")
        .arg(keys.join("vendor-b.key")))
    .ok();
    run(signer()
        .args(["root", "verify"])
        .arg(&v2)
        .arg("--previous")
        .arg(&v1))
    .fails(1, "of v1's keys");
    run(signer()
        .args(["root", "sign"])
        .arg(&v2)
        .arg("--key")
        .arg(keys.join("vendor-a.key")))
    .ok();
    run(signer()
        .args(["root", "verify"])
        .arg(&v2)
        .arg("--previous")
        .arg(&v1))
    .ok();

    // A draft is refused at build time: unsigned (what `root rotate` writes), half-signed
    // against the previous root, or two documents of one version.
    let draft = dir.path().join("root-v2-draft.json");
    run(signer()
        .args(["root", "rotate"])
        .arg(&v1)
        .arg("--out")
        .arg(&draft)
        .arg("--key")
        .arg(keys.join("vendor-b.pub")))
    .ok();
    let refused = dir.path().join("refused.tar");
    let build_carrying = |roots: &[&Path], previous: Option<&Path>| {
        let mut command = signer();
        command.arg("build").arg(quickstart()).args([
            "--version",
            "2.0.0",
            "--sequence",
            "2",
            "--offline",
        ]);
        for root in roots {
            command.arg("--root-update").arg(root);
        }
        if let Some(previous) = previous {
            command.arg("--root-previous").arg(previous);
        }
        run(command.arg("--out").arg(&refused))
    };
    build_carrying(&[&draft], None).fails(
        1,
        "--root-update: root v2: root v2 is signed by 0 of its keys",
    );
    build_carrying(&[&v2, &draft], None).fails(1, "two carried roots have version 2");
    let half = dir.path().join("root-v2-half.json");
    std::fs::copy(&draft, &half).unwrap();
    run(signer()
        .args(["root", "sign"])
        .arg(&half)
        .arg("--key")
        .arg(keys.join("vendor-b.key")))
    .ok();
    build_carrying(&[&half], Some(&v1)).fails(1, "of v1's keys");
    assert!(!refused.exists(), "a refused build wrote a bundle");
    build_carrying(&[&v2], Some(&v1)).ok();

    // A bundle carrying v2 and signed only by the new key verifies against the pinned v1.
    let bundle = dir.path().join("b.tar");
    run(signer()
        .arg("build")
        .arg(quickstart())
        .args([
            "--version",
            "2.0.0",
            "--sequence",
            "2",
            "--offline",
            "--root-update",
        ])
        .arg(&v2)
        .arg("--out")
        .arg(&bundle))
    .ok();
    sign_with(&bundle, &["vendor-b"]);
    run(signer().arg("verify").arg(&bundle).arg("--root").arg(&v1)).ok();
    // Without the rotation, the new key is not trusted by v1.
    let plain = dir.path().join("plain.tar");
    build(&plain, "2.0.0", 2);
    sign_with(&plain, &["vendor-b"]);
    run(signer().arg("verify").arg(&plain).arg("--root").arg(&v1)).fails(1, "untrusted-signature");
}

/// What a reader refuses is refused at signing time, so the vendor learns it there.
#[test]
fn sign_refuses_what_every_reader_refuses() {
    use outpost_tests::forge;
    let dir = tempfile::tempdir().unwrap();
    let key = testdata().join("keys/vendor-a.key");
    let sign = |layout: &outpost_bundle_format::Layout, name: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, forge::tar(layout)).unwrap();
        run(signer().arg("sign").arg(&path).arg("--key").arg(&key))
    };
    let mut stack = serde_json::to_value(forge::quickstart()).unwrap();
    stack["resources"][0]["container"]["cpu"] = (-1).into();
    let invalid_stack = forge::with_stack(serde_json::to_vec(&stack).unwrap(), "1.0.0", 1);
    sign(&invalid_stack, "invalid-stack.tar").fails(1, "cpu");
    let doubled = r#"{"name":"acme","name":"other","permissionProfiles":{},"resources":[]}"#;
    sign(
        &forge::with_stack(doubled.as_bytes().to_vec(), "1.0.0", 1),
        "doubled-stack.tar",
    )
    .fails(1, "duplicate member \"name\"");
    let metadata = r#"{"formatVersion":1,"name":"acme","version":"1.0.0","sequence":1,"sequence":2,"channel":"stable","created":"2026-01-01T00:00:00Z","expires":"2099-01-01T00:00:00Z"}"#;
    sign(&forge::with_metadata_json(metadata), "doubled-metadata.tar")
        .fails(1, "duplicate member \"sequence\"");
    sign(&forge::unpinned("1.0.0", 1), "unpinned.tar").fails(1, "not pinned by digest");
    let (_, draft) = forge::roots();
    let carrying = outpost_bundle_format::bundle::build(
        &forge::quickstart(),
        &forge::metadata("1.0.0", 1),
        &[draft],
    )
    .unwrap();
    sign(&carrying, "draft-root.tar").fails(1, "carried trust root: root v2");
    sign(&forge::release("1.0.0", 1), "good.tar").ok();
}

#[test]
fn schema_command_prints_the_published_schema() {
    let printed = run(signer().arg("schema")).ok().stdout;
    let published =
        fs::read_to_string(outpost_tests::repo().join("bundle-format/stack.schema.json")).unwrap();
    assert_eq!(printed, published);
}

#[test]
fn push_to_a_directory_is_a_complete_file() {
    let dir = tempfile::tempdir().unwrap();
    let drop = dir.path().join("drop");
    let bundle = testdata().join("bundles/valid/bundle.tar");
    run(signer()
        .arg("push")
        .arg(&bundle)
        .arg(format!("dir://{}", drop.display())))
    .ok();
    let names: Vec<String> = fs::read_dir(&drop)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        vec!["acme-1.0.0.tar".to_string()],
        "leftover temporary files: {names:?}"
    );
    run(signer()
        .arg("verify")
        .arg(drop.join("acme-1.0.0.tar"))
        .arg("--key")
        .arg(testdata().join("keys/vendor-a.pub")))
    .ok();
}

fn agent() -> std::process::Command {
    std::process::Command::new(outpost_tests::binary("outpost-agent"))
}

#[test]
fn agent_config_errors_are_one_line_with_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.yaml");
    std::fs::write(&config, "source: {dir: {path: drop}}\ntrust: {keys: [a.pub]}\nexpect: {name: acme}\nstate_dir: state\napi: {socket: agent.sock}\nsurprise: 1\n").unwrap();
    run(agent().args(["status", "--config"]).arg(&config)).fails(2, "surprise");
    run(agent().args(["check-config", "--config"]).arg(&config)).fails(2, "surprise");
    run(agent().args(["run", "--config"]).arg(&config)).fails(2, "agent.yaml");
    run(agent()
        .args(["status", "--config"])
        .arg(dir.path().join("missing.yaml")))
    .fails(2, "missing.yaml");
    // A valid config, but no agent running: exit 1 naming the socket.
    std::fs::write(&config, "source: {dir: {path: drop}}\ntrust: {keys: [a.pub]}\nexpect: {name: acme}\nstate_dir: state\napi: {socket: agent.sock}\n").unwrap();
    run(agent().args(["status", "--config"]).arg(&config)).fails(1, "cannot reach the agent at");
    // A trust key that does not exist: the daemon refuses to start; check-config says so first.
    run(agent().args(["run", "--config"]).arg(&config)).fails(2, "a.pub");
    run(agent().args(["check-config", "--config"]).arg(&config)).fails(2, "a.pub");
    let key = outpost_tests::testdata().join("keys/vendor-a.pub");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("a.pub", &key.display().to_string());
    std::fs::write(&config, text).unwrap();
    let _ = std::fs::remove_dir_all(dir.path().join("state"));
    let checked = run(agent().args(["check-config", "--config"]).arg(&config)).ok();
    assert_eq!(checked.stdout, format!("{}: ok\n", config.display()));
    assert!(
        !dir.path().join("state").exists(),
        "check-config changes nothing"
    );
}

#[test]
fn agent_config_schema_is_the_published_one() {
    let out = run(agent().arg("config-schema")).ok();
    let published =
        std::fs::read_to_string(outpost_tests::repo().join("agent/config.schema.json")).unwrap();
    assert_eq!(out.stdout, published);
}

/// A stack written from Alien's documentation (`code: {type: image, image: ...}`) builds, and
/// the bundle stores the short spelling every format-1 reader knows.
#[test]
fn alien_spelling_of_code_builds_and_is_stored_short() {
    let dir = tempfile::tempdir().unwrap();
    let text = fs::read_to_string(quickstart()).unwrap();
    let long = text.replace("code: {image:", "code: {type: image, image:");
    assert_ne!(long, text);
    let stack = dir.path().join("stack.yaml");
    fs::write(&stack, long).unwrap();
    let bundle = dir.path().join("b.tar");
    outpost_tests::build_bundle(&stack, "1.0.0", 1, &["--offline"], &bundle);
    let layout = outpost_bundle_format::Layout::read(&bundle, &Default::default(), None).unwrap();
    let parts = outpost_bundle_format::bundle::read_parts(&layout, &Default::default()).unwrap();
    let stored = String::from_utf8(parts.stack_bytes).unwrap();
    assert!(stored.contains("\"code\":{\"image\":"), "{stored}");
    assert!(!stored.contains("\"type\""), "{stored}");
}

/// Completions and the man page come from the command definitions.
#[test]
fn signer_completions_and_man_page() {
    for (shell, needle) in [
        ("bash", "outpost-signer"),
        ("zsh", "#compdef outpost-signer"),
        ("fish", "complete -c outpost-signer"),
    ] {
        let out = run(signer().args(["completions", shell])).ok();
        assert!(out.stdout.contains(needle), "{shell}: {}", out.stdout);
        assert!(out.stdout.contains("attach-signature"), "{shell}");
    }
    let page = run(signer().arg("man")).ok();
    assert!(
        page.stdout.contains(".TH outpost-signer 1"),
        "{}",
        page.stdout
    );
    assert!(
        page.stdout.contains("attach\\-signature"),
        "{}",
        page.stdout
    );
    let unknown = run(signer().args(["completions", "tcsh"]));
    assert_eq!(unknown.code, 2, "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("invalid value 'tcsh'"),
        "{}",
        unknown.stderr
    );
}
