//! Interop with independent implementations and real servers: openssl and Python
//! `cryptography` sign and verify cosign payloads with us, skopeo and oras read our layouts and
//! what we push to a real registry (CNCF distribution, started here on 127.0.0.1).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::layout::{Layout, Limits};
use outpost_bundle_format::{bundle, signature};
use outpost_tests::{TestRegistry, python, run, sha256_hex, sign_with, signer, testdata, tool};
use std::fs;
use std::path::{Path, PathBuf};

fn fresh_bundle(dir: &Path) -> (PathBuf, String) {
    let bundle = dir.join("b.tar");
    let out = run(signer()
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .arg("build")
        .arg(testdata().join("stacks/valid/quickstart.yaml"))
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--offline",
            "--out",
        ])
        .arg(&bundle))
    .ok();
    let digest = out
        .stdout
        .split_whitespace()
        .find(|w| w.starts_with("sha256:"))
        .unwrap()
        .to_string();
    (bundle, digest)
}

#[test]
fn openssl_signature_verifies_with_outpost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bundle, _) = fresh_bundle(d);
    run(tool("openssl")
        .args([
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
        ])
        .arg(d.join("k.pem")))
    .ok();
    run(tool("openssl")
        .args(["ec", "-pubout", "-in"])
        .arg(d.join("k.pem"))
        .arg("-out")
        .arg(d.join("k.pub")))
    .ok();
    run(signer()
        .arg("payload")
        .arg(&bundle)
        .arg("--out")
        .arg(d.join("payload.json")))
    .ok();
    run(tool("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(d.join("k.pem"))
        .arg("-out")
        .arg(d.join("sig.der"))
        .arg(d.join("payload.json")))
    .ok();
    run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(d.join("k.pub")))
    .fails(1, "unsigned");
    run(signer()
        .arg("attach-signature")
        .arg(&bundle)
        .arg("--payload")
        .arg(d.join("payload.json"))
        .arg("--signature")
        .arg(d.join("sig.der")))
    .ok();
    run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(d.join("k.pub")))
    .ok();
    // The openssl key is not the vendor's key.
    run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(testdata().join("keys/vendor-a.pub")))
    .fails(1, "untrusted-signature");
}

#[test]
fn python_cryptography_signature_verifies_with_outpost() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bundle, _) = fresh_bundle(d);
    run(signer()
        .arg("payload")
        .arg(&bundle)
        .arg("--out")
        .arg(d.join("payload.json")))
    .ok();
    let script = r#"
import base64, sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
d = sys.argv[1]
key = ec.generate_private_key(ec.SECP256R1())
payload = open(d + "/payload.json", "rb").read()
open(d + "/sig.b64", "wb").write(base64.b64encode(key.sign(payload, ec.ECDSA(hashes.SHA256()))))
open(d + "/py.pub", "wb").write(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
"#;
    run(python().arg("-c").arg(script).arg(d)).ok();
    run(signer()
        .arg("attach-signature")
        .arg(&bundle)
        .arg("--payload")
        .arg(d.join("payload.json"))
        .arg("--signature")
        .arg(d.join("sig.b64")))
    .ok();
    run(signer()
        .arg("verify")
        .arg(&bundle)
        .arg("--key")
        .arg(d.join("py.pub")))
    .ok();
}

/// Extracts the first signature's payload and DER signature from a bundle.
fn first_signature(bundle: &Path) -> (Vec<u8>, Vec<u8>) {
    let layout = Layout::read(bundle, &Limits::default(), None).unwrap();
    let parts = bundle::read_parts(&layout, &Limits::default()).unwrap();
    let (payload, layer) = parts.signatures.into_iter().next().unwrap();
    (payload, signature::layer_signature(&layer).unwrap())
}

#[test]
fn outpost_signature_verifies_with_openssl_and_python() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bundle, digest) = fresh_bundle(d);
    sign_with(&bundle, &["vendor-a"]);
    let (payload, sig) = first_signature(&bundle);
    let claim: serde_json::Value = serde_json::from_slice(&payload).unwrap();
    assert_eq!(
        claim["critical"]["image"]["docker-manifest-digest"],
        digest.as_str()
    );
    assert_eq!(
        claim["critical"]["type"],
        "cosign container image signature"
    );
    fs::write(d.join("payload.json"), &payload).unwrap();
    fs::write(d.join("sig.der"), &sig).unwrap();
    let public = testdata().join("keys/vendor-a.pub");
    let out = run(tool("openssl")
        .args(["dgst", "-sha256", "-verify"])
        .arg(&public)
        .arg("-signature")
        .arg(d.join("sig.der"))
        .arg(d.join("payload.json")))
    .ok();
    assert!(out.stdout.contains("Verified OK"), "{}", out.stdout);
    let script = r#"
import sys
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = serialization.load_pem_public_key(open(sys.argv[1], "rb").read())
key.verify(open(sys.argv[2] + "/sig.der", "rb").read(), open(sys.argv[2] + "/payload.json", "rb").read(), ec.ECDSA(hashes.SHA256()))
print("python verified")
"#;
    let out = run(python().arg("-c").arg(script).arg(&public).arg(d)).ok();
    assert!(out.stdout.contains("python verified"));
    // A flipped payload byte must fail in openssl too (the test can fail).
    let mut bad = payload.clone();
    bad[10] ^= 1;
    fs::write(d.join("payload.json"), &bad).unwrap();
    assert_ne!(
        run(tool("openssl")
            .args(["dgst", "-sha256", "-verify"])
            .arg(&public)
            .arg("-signature")
            .arg(d.join("sig.der"))
            .arg(d.join("payload.json")))
        .code,
        0
    );
}

#[test]
fn skopeo_reads_tar_and_directory_layouts_with_the_same_digest() {
    let dir = tempfile::tempdir().unwrap();
    let (bundle, digest) = fresh_bundle(dir.path());
    let raw = run(tool("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}:1.0.0", bundle.display())))
    .ok();
    assert_eq!(
        format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())),
        digest
    );
    let layout = dir.path().join("layout");
    run(signer()
        .env("SOURCE_DATE_EPOCH", "1790000000")
        .arg("build")
        .arg(testdata().join("stacks/valid/quickstart.yaml"))
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--offline",
            "--out-dir",
        ])
        .arg(&layout))
    .ok();
    let raw = run(tool("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci:{}:1.0.0", layout.display())))
    .ok();
    assert_eq!(
        format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())),
        digest
    );
    let config = run(tool("skopeo")
        .args(["inspect", "--config", "--raw"])
        .arg(format!("oci:{}:1.0.0", layout.display())))
    .ok();
    let metadata: serde_json::Value = serde_json::from_str(&config.stdout).unwrap();
    assert_eq!(metadata["name"], "acme");
}

#[test]
fn push_to_a_real_registry_round_trips_through_skopeo() {
    let registry = TestRegistry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bundle, digest) = fresh_bundle(d);
    sign_with(&bundle, &["vendor-a"]);
    let target = format!("oci://{}/acme/bundle:1.0.0", registry.host());
    let pushed = run(signer().arg("push").arg(&bundle).arg(&target)).ok();
    assert!(pushed.stdout.contains(&digest), "{}", pushed.stdout);
    // Pushing again is idempotent.
    run(signer().arg("push").arg(&bundle).arg(&target)).ok();

    let remote = format!("docker://{}/acme/bundle", registry.host());
    let raw = run(tool("skopeo")
        .args(["inspect", "--raw", "--tls-verify=false"])
        .arg(format!("{remote}:1.0.0")))
    .ok();
    assert_eq!(
        format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())),
        digest
    );

    // Fetch the bundle and its signature tag back with skopeo and verify the copy.
    let copy = d.join("copy");
    let sig_tag = format!("sha256-{}.sig", digest.trim_start_matches("sha256:"));
    for tag in ["1.0.0", sig_tag.as_str()] {
        run(tool("skopeo")
            .args(["copy", "--preserve-digests", "--src-tls-verify=false"])
            .arg(format!("{remote}:{tag}"))
            .arg(format!("oci:{}:{tag}", copy.display())))
        .ok();
    }
    let verified = run(signer()
        .arg("verify")
        .arg(&copy)
        .arg("--key")
        .arg(testdata().join("keys/vendor-a.pub")))
    .ok();
    assert!(verified.stdout.contains(&digest));

    // oras (an independent client) reads the artifact from the registry.
    let script = r#"
import sys, oras.client
c = oras.client.OrasClient(insecure=True)
m = c.get_manifest(sys.argv[1])
print(m["artifactType"], m["config"]["mediaType"])
"#;
    let out = run(python()
        .arg("-c")
        .arg(script)
        .arg(format!("{}/acme/bundle:1.0.0", registry.host())))
    .ok();
    assert_eq!(
        out.stdout.trim(),
        "application/vnd.outpost.bundle.v1 application/vnd.outpost.release.v1+json"
    );
}

#[test]
fn push_with_basic_auth_from_flags_and_docker_config() {
    let registry = TestRegistry::start(Some(("vendor", "s3cret")));
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (bundle, digest) = fresh_bundle(d);
    sign_with(&bundle, &["vendor-a"]);
    let target = format!("oci://{}/acme/bundle:1.0.0", registry.host());
    let empty_config = d.join("empty.json");
    fs::write(&empty_config, "{}").unwrap();
    run(signer()
        .arg("push")
        .arg(&bundle)
        .arg(&target)
        .arg("--registry-config")
        .arg(&empty_config))
    .fails(1, "authentication");
    run(signer().arg("push").arg(&bundle).arg(&target).args([
        "--username",
        "vendor",
        "--password",
        "wrong",
    ]))
    .fails(1, "refused the credentials");
    run(signer().arg("push").arg(&bundle).arg(&target).args([
        "--username",
        "vendor",
        "--password",
        "s3cret",
    ]))
    .ok();
    let config = d.join("config.json");
    fs::write(
        &config,
        format!(
            r#"{{"auths":{{"{}":{{"auth":"dmVuZG9yOnMzY3JldA=="}}}}}}"#,
            registry.host()
        ),
    )
    .unwrap();
    let target2 = format!("oci://{}/acme/other:1.0.0", registry.host());
    run(signer()
        .arg("push")
        .arg(&bundle)
        .arg(&target2)
        .arg("--registry-config")
        .arg(&config))
    .ok();
    let raw = run(tool("skopeo")
        .args([
            "inspect",
            "--raw",
            "--tls-verify=false",
            "--creds",
            "vendor:s3cret",
        ])
        .arg(format!("docker://{}/acme/other:1.0.0", registry.host())))
    .ok();
    assert_eq!(
        format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())),
        digest
    );
}

#[test]
fn push_to_git_commits_the_bundle_at_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let bare = d.join("releases.git");
    run(tool("git")
        .args(["init", "--bare", "-q", "-b", "main"])
        .arg(&bare))
    .ok();
    let bundle = testdata().join("bundles/valid/bundle.tar");
    let url = format!("git+file://{}", bare.display());
    run(signer()
        .arg("push")
        .arg(&bundle)
        .arg(&url)
        .args(["--git-path", "releases/acme.tar"]))
    .ok();
    // A second push on top of the first is a fast-forward.
    run(signer()
        .arg("push")
        .arg(&bundle)
        .arg(&url)
        .args(["--git-path", "releases/copy.tar"]))
    .ok();
    let log = run(tool("git")
        .arg("-C")
        .arg(&bare)
        .args(["log", "--oneline", "main"]))
    .ok();
    assert_eq!(log.stdout.lines().count(), 2, "{}", log.stdout);
    let show = tool("git")
        .arg("-C")
        .arg(&bare)
        .args(["show", "main:releases/acme.tar"])
        .output()
        .unwrap();
    assert!(show.status.success());
    fs::write(d.join("from-git.tar"), &show.stdout).unwrap();
    assert_eq!(show.stdout, fs::read(&bundle).unwrap());
    run(signer()
        .arg("verify")
        .arg(d.join("from-git.tar"))
        .arg("--key")
        .arg(testdata().join("keys/vendor-a.pub")))
    .ok();
    run(signer()
        .arg("push")
        .arg(&bundle)
        .arg(&url)
        .args(["--git-path", "../escape.tar"]))
    .fails(2, "relative path inside the repository");
}

/// Writes a small single-layer image as an OCI layout directory; returns its manifest digest.
fn image_layout(dir: &Path, layer_bytes: usize) -> String {
    let mut layer = Vec::new();
    {
        let mut tar = tar_builder(&mut layer);
        let content: Vec<u8> = (0..layer_bytes).map(|i| (i * 7919 % 251) as u8).collect();
        tar.append("app/data.bin", &content);
        tar.finish();
    }
    let layer_digest = outpost_bundle_format::Digest::of(&layer);
    let config = serde_json::to_vec(&serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["/app/run"]},
        "rootfs": {"type": "layers", "diff_ids": [layer_digest.to_string()]},
    }))
    .unwrap();
    let mut layout = Layout::default();
    let digest = outpost_tests::forge::add_image(&mut layout, config, layer, "1.0");
    layout.write_dir(dir).unwrap();
    digest.to_string()
}

/// A tiny tar writer for image layers (regular files only).
struct TarBuilder<'a>(&'a mut Vec<u8>);

fn tar_builder(out: &mut Vec<u8>) -> TarBuilder<'_> {
    TarBuilder(out)
}

impl TarBuilder<'_> {
    fn append(&mut self, path: &str, content: &[u8]) {
        let mut header = [0u8; 512];
        header[..path.len()].copy_from_slice(path.as_bytes());
        header[100..107].copy_from_slice(b"0000755");
        header[108..115].copy_from_slice(b"0000000");
        header[116..123].copy_from_slice(b"0000000");
        header[124..135].copy_from_slice(format!("{:011o}", content.len()).as_bytes());
        header[136..147].copy_from_slice(b"00000000000");
        header[156] = b'0';
        header[257..263].copy_from_slice(b"ustar\0");
        header[263..265].copy_from_slice(b"00");
        header[148..156].copy_from_slice(b"        ");
        let sum: u32 = header.iter().map(|b| *b as u32).sum();
        header[148..155].copy_from_slice(format!("{sum:06o}\0").as_bytes());
        self.0.extend_from_slice(&header);
        self.0.extend_from_slice(content);
        self.0.resize(self.0.len().div_ceil(512) * 512, 0);
    }

    fn finish(self) {
        self.0.resize(self.0.len() + 1024, 0);
    }
}

#[test]
fn build_resolves_tags_and_bundles_images_for_air_gapped_sites() {
    let registry = TestRegistry::start(None);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A 6 MiB layer: above the in-memory limit, so it streams through the spool.
    let image_digest = image_layout(&d.join("image"), 6 << 20);
    let image = format!("{}/acme/api:1.0", registry.host());
    run(tool("skopeo")
        .args(["copy", "--preserve-digests", "--dest-tls-verify=false"])
        .arg(format!("oci:{}:1.0", d.join("image").display()))
        .arg(format!("docker://{image}")))
    .ok();

    let stack = d.join("stack.yaml");
    let text = fs::read_to_string(testdata().join("stacks/valid/quickstart.yaml")).unwrap();
    let at = text.find("ghcr.io/acme/api@").unwrap();
    let end = at + text[at..].find('"').unwrap();
    fs::write(&stack, format!("{}{image}{}", &text[..at], &text[end..])).unwrap();

    let bundle = d.join("b.tar");
    let built = run(signer()
        .arg("build")
        .arg(&stack)
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--with-images",
            "--out",
        ])
        .arg(&bundle))
    .ok();
    // Not a terminal: a plain line as the large layer starts and one when it is done, on
    // stderr (small blobs take no time worth a line).
    let starts = built
        .stderr
        .lines()
        .filter(|l| l.ends_with(" bytes"))
        .count();
    let done = built
        .stderr
        .lines()
        .filter(|l| l.contains(": done, ") && l.contains(" MiB/s)"))
        .count();
    assert!(starts == 1 && done == 1, "{}", built.stderr);
    // On a terminal (a pty from `script`): bars with rate and time left; with --quiet, the
    // plain lines instead.
    let on_terminal = |quiet: &str| {
        let command = format!(
            "{} build {} --version 1.0.0 --sequence 1 --with-images {quiet} --out {}",
            outpost_tests::binary("outpost-signer").display(),
            stack.display(),
            d.join("tty.tar").display()
        );
        run(tool("script")
            .args(["-qec", &command, "/dev/null"])
            .env("OUTPOST_PASSWORD", "test"))
        .ok()
        .stdout
    };
    let bars = on_terminal("");
    assert!(bars.contains("eta") && !bars.contains(": done, "), "{bars}");
    let lines = on_terminal("--quiet");
    assert!(
        lines.contains(": done, ") && !lines.contains("eta"),
        "{lines}"
    );
    let report: serde_json::Value = serde_json::from_str(
        &run(signer()
            .arg("inspect")
            .arg(&bundle)
            .args(["--output", "json"]))
        .ok()
        .stdout,
    )
    .unwrap();
    let pinned = format!("{image}@{image_digest}");
    assert_eq!(report["images"][0], pinned.as_str());
    assert_eq!(report["bundledImages"][0], pinned.as_str());

    // The image inside the bundle is readable by skopeo, byte for byte.
    let raw = run(tool("skopeo")
        .args(["inspect", "--raw"])
        .arg(format!("oci-archive:{}:{pinned}", bundle.display())))
    .ok();
    assert_eq!(
        format!("sha256:{}", sha256_hex(raw.stdout.as_bytes())),
        image_digest
    );

    // The bundle digest does not depend on whether images travel with it.
    let without = d.join("without.tar");
    let a = run(signer()
        .arg("build")
        .arg(&stack)
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--created",
            "2026-01-01T00:00:00Z",
            "--out",
        ])
        .arg(&without))
    .ok();
    let b = run(signer()
        .arg("build")
        .arg(&stack)
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--created",
            "2026-01-01T00:00:00Z",
            "--with-images",
            "--out",
        ])
        .arg(&bundle))
    .ok();
    let digest_of = |s: &str| {
        s.split_whitespace()
            .find(|w| w.starts_with("sha256:"))
            .unwrap()
            .to_string()
    };
    assert_eq!(digest_of(&a.stdout), digest_of(&b.stdout));

    // A tag that does not exist is a clear error naming the resource.
    fs::write(
        &stack,
        fs::read_to_string(&stack)
            .unwrap()
            .replace("acme/api:1.0", "acme/api:9.9"),
    )
    .unwrap();
    run(signer()
        .arg("build")
        .arg(&stack)
        .args(["--version", "1.0.0", "--sequence", "1", "--out"])
        .arg(d.join("x.tar")))
    .fails(1, "resources[0] (api).code.image");
}

#[test]
fn a_layout_tarred_by_gnu_tar_verifies() {
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    run(signer()
        .arg("build")
        .arg(testdata().join("stacks/valid/quickstart.yaml"))
        .args([
            "--version",
            "1.0.0",
            "--sequence",
            "1",
            "--offline",
            "--out-dir",
        ])
        .arg(&layout))
    .ok();
    sign_with(&layout, &["vendor-a"]);
    let tarred = dir.path().join("gnu.tar");
    run(tool("tar")
        .arg("-C")
        .arg(&layout)
        .arg("-cf")
        .arg(&tarred)
        .arg("."))
    .ok();
    run(signer()
        .arg("verify")
        .arg(&tarred)
        .arg("--key")
        .arg(testdata().join("keys/vendor-a.pub")))
    .ok();
}
