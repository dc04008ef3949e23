//! Images built from source: `outpost-signer build` runs the machine's real buildah on a small
//! source tree (its base image from a real registry on 127.0.0.1, nothing from the network),
//! pushes the image, and writes a provenance statement the bundle's signature covers. The agent
//! runs the image on a real dockerd and shows where it came from; tampered or mismatched
//! statements and escaping sources are refused.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::Digest;
use outpost_bundle_format::provenance::Provenance;
use outpost_tests::agent::{AgentProcess, drop_file};
use outpost_tests::engine::{Kind, TestEngine, demo_image, http_body};
use outpost_tests::forge::{quickstart, release, signed, signed_unchecked, tar, with_provenance};
use outpost_tests::{TestRegistry, free_port, poll_within, run, sign_with, signer};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// busybox httpd serving the built-in /www; it exits on SIGTERM (as PID 1 it would ignore it).
const SERVE: &str = "trap 'exit 0' TERM; httpd -f -p 8080 -h /www & wait";

/// A vendor's source tree: `stack.yaml` beside `api/` (a Dockerfile on a base image given as a
/// build argument, and the page it serves).
struct Vendor {
    dir: tempfile::TempDir,
}

impl Vendor {
    fn new(base: &str, page: &str) -> Vendor {
        let dir = tempfile::tempdir().unwrap();
        let api = dir.path().join("api");
        std::fs::create_dir_all(api.join("www")).unwrap();
        std::fs::write(
            api.join("Dockerfile"),
            "ARG BASE\nFROM $BASE\nCOPY www /www\n",
        )
        .unwrap();
        std::fs::write(api.join("www/index.html"), page).unwrap();
        std::fs::write(
            dir.path().join("stack.yaml"),
            format!(
                r#"name: acme
permissionProfiles:
  execution: {{}}
resources:
  - lifecycle: live
    container:
      name: web
      code: {{type: source, src: ./api, args: {{BASE: "{base}"}}}}
      cpu: 0.25
      memory: 64Mi
      ports: [8080]
      publicEndpoints: [{{name: web, port: 8080, protocol: http}}]
      healthCheck: {{path: /index.html, port: 8080}}
      command: [sh, -c, "{SERVE}"]
      permissions: execution
"#
            ),
        )
        .unwrap();
        Vendor { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `outpost-signer build` with `destination` (push, carry), at a fixed creation time.
    fn build(
        &self,
        destination: &[&str],
        version: &str,
        sequence: u64,
        out: &Path,
    ) -> outpost_tests::Run {
        run(signer()
            .arg("build")
            .arg(self.path("stack.yaml"))
            .args(["--version", version, "--sequence", &sequence.to_string()])
            .args([
                "--created",
                "2026-11-01T00:00:00Z",
                "--expires",
                "2036-01-01T00:00:00Z",
            ])
            .args(destination)
            .arg("--quiet")
            .arg("--out")
            .arg(out))
    }
}

fn inspect(bundle: &Path) -> Value {
    let out = run(signer()
        .arg("inspect")
        .arg(bundle)
        .args(["--output", "json"]))
    .ok();
    serde_json::from_str(&out.stdout).unwrap()
}

#[test]
fn a_source_tree_builds_reproducibly_and_runs_on_dockerd() {
    let registry = TestRegistry::start(None);
    let base = demo_image(&registry, "base");
    let repository = format!("{}/acme/shop", registry.host());
    let push = ["--image-repository", repository.as_str(), "--plain-http"];
    let vendor = Vendor::new(&base, "release one\n");
    let work = tempfile::tempdir().unwrap();
    let (first, again, second) = (
        work.path().join("acme-1.0.0.tar"),
        work.path().join("again.tar"),
        work.path().join("acme-1.1.0.tar"),
    );

    let built = vendor.build(&push, "1.0.0", 1, &first).ok();
    assert!(
        built
            .stdout
            .starts_with("built acme 1.0.0 sequence 1 sha256:"),
        "{}",
        built.stdout
    );
    assert!(
        built.stderr.contains("COPY www /www"),
        "the build log streams: {}",
        built.stderr
    );
    let one = inspect(&first);
    let image = one["resources"][0]["image"].as_str().unwrap().to_string();
    assert!(
        image.starts_with(&format!("{repository}:web-1.0.0@sha256:")),
        "{image}"
    );
    let from = &one["resources"][0]["builtFrom"];
    assert_eq!(from["source"], "api");
    assert_eq!(from["args"]["BASE"], base.as_str());
    assert!(from["builder"]["version"]["buildah"].is_string(), "{from}");

    // The same tree builds the same image, and the same bundle, byte for byte.
    vendor.build(&push, "1.0.0", 1, &again).ok();
    assert_eq!(
        file_digest(&first),
        file_digest(&again),
        "the same bundle twice"
    );

    // A changed file gives another source digest and another image.
    std::fs::write(vendor.path("api/www/index.html"), "release two\n").unwrap();
    vendor.build(&push, "1.1.0", 2, &second).ok();
    let two = inspect(&second);
    let image_two = two["resources"][0]["image"].as_str().unwrap();
    assert_ne!(digest_of(image_two), digest_of(&image));
    assert_ne!(
        two["resources"][0]["builtFrom"]["sourceDigest"],
        from["sourceDigest"]
    );

    // Carried only (an air-gapped site): no registry holds this image, the bundle does.
    let third = work.path().join("acme-1.2.0.tar");
    std::fs::write(vendor.path("api/www/index.html"), "release three\n").unwrap();
    let base_registry = registry.host();
    vendor
        .build(
            &["--with-images", "--insecure-registry", &base_registry],
            "1.2.0",
            3,
            &third,
        )
        .ok();
    let three = inspect(&third);
    let carried = three["resources"][0]["image"].as_str().unwrap();
    assert!(
        carried.starts_with("localhost/outpost/acme:web-1.2.0@sha256:"),
        "{carried}"
    );
    assert_eq!(three["bundledImages"][0], carried);

    for file in [&first, &second, &third] {
        sign_with(file, &BOTH);
    }
    let engine = TestEngine::start(Kind::Docker);
    let drop = tempfile::tempdir().unwrap();
    let web = free_port();
    let agent = AgentProcess::start(
        &format!("source:\n  dir:\n    path: {}\n", drop.path().display()),
        &format!(
            "{}approval:\n  mode: manual\n",
            engine.agent_config(&[("web", web)])
        ),
    );
    for (file, version, sequence, page, bundle) in [
        (&first, "1.0.0", 1, "release one", &one),
        (&second, "1.1.0", 2, "release two", &two),
        (&third, "1.2.0", 3, "release three", &three),
    ] {
        drop_file(
            drop.path(),
            &format!("acme-{version}.tar"),
            &std::fs::read(file).unwrap(),
        );
        agent.wait_for(&format!("pending {version}"), |s| {
            s["pending"]["version"] == version
        });
        let plan = agent.cli(&["plan"]).ok().stdout;
        let source_digest = bundle["resources"][0]["builtFrom"]["sourceDigest"]
            .as_str()
            .unwrap();
        assert!(
            plan.contains(&format!(
                "built from source api ({source_digest}) with Dockerfile by buildah "
            )),
            "{plan}"
        );
        let plan: Value =
            serde_json::from_str(&agent.cli(&["plan", "--output", "json"]).ok().stdout).unwrap();
        assert_eq!(
            plan["images"][0]["built_from"]["source_digest"], source_digest,
            "{plan:#}"
        );
        agent.cli(&["approve", version]).ok();
        agent.wait_converged(sequence);
        let answer = poll_within(30, || http_body(web, "/").filter(|b| b.contains(page)));
        assert!(
            answer.is_some(),
            "web never answered {page:?}\nlog: {}",
            agent.log()
        );
    }
}

fn file_digest(path: &Path) -> String {
    outpost_tests::sha256_hex(&std::fs::read(path).unwrap())
}

fn digest_of(image: &str) -> Digest {
    Digest::parse(image.rsplit_once('@').unwrap().1).unwrap()
}

#[test]
fn escaping_sources_failed_builds_and_missing_destinations_are_refused() {
    let outside = tempfile::tempdir().unwrap();
    std::fs::write(outside.path().join("secret"), "s3cret").unwrap();
    let vendor = Vendor::new("scratch", "page\n");
    let out = vendor.path("out.tar");
    let build = || vendor.build(&["--with-images"], "1.0.0", 1, &out);
    // Where the image goes must be said before anything is built.
    run(signer()
        .arg("build")
        .arg(vendor.path("stack.yaml"))
        .args(["--version", "1.0.0", "--sequence", "1", "--out"])
        .arg(&out))
    .fails(
        2,
        "resource web is built from source: give --image-repository",
    );

    // A link inside the tree that points out of the stack's directory.
    std::os::unix::fs::symlink(outside.path().join("secret"), vendor.path("api/www/leak")).unwrap();
    build().fails(1, "is a symbolic link to");
    std::fs::remove_file(vendor.path("api/www/leak")).unwrap();

    // src itself reached through a link that leaves the tree.
    let stack = std::fs::read_to_string(vendor.path("stack.yaml")).unwrap();
    std::os::unix::fs::symlink(outside.path(), vendor.path("elsewhere")).unwrap();
    std::fs::write(
        vendor.path("stack.yaml"),
        stack.replace("src: ./api", "src: ./elsewhere"),
    )
    .unwrap();
    build().fails(1, "outside the stack's directory");
    std::fs::write(vendor.path("stack.yaml"), &stack).unwrap();

    // A failing build names the resource and writes no bundle.
    std::fs::write(
        vendor.path("api/Dockerfile"),
        "FROM scratch\nRUN /no/such/program\n",
    )
    .unwrap();
    let failed = build();
    assert_eq!(failed.code, 1, "{}", failed.stderr);
    let last = failed.stderr.trim_end().lines().last().unwrap_or_default();
    assert!(
        last.starts_with("error: ") && last.contains("resource web: the build failed"),
        "{last}"
    );
    assert!(
        failed.stderr.contains("/no/such/program"),
        "the log reaches the vendor: {}",
        failed.stderr
    );
    assert!(!out.exists(), "a failed build left a bundle");
}

/// A statement about the quick-start stack's api image (what the stack pins, by default).
fn statement(subject: Option<Digest>) -> Vec<u8> {
    let stack = outpost_bundle_format::stack::Stack::from_file(&quickstart()).unwrap();
    let pinned = stack
        .resource("api")
        .unwrap()
        .container
        .image
        .digest()
        .unwrap();
    Provenance {
        resource: "api".into(),
        image_name: "ghcr.io/acme/api".into(),
        image_digest: subject.unwrap_or(pinned),
        source_path: "api".into(),
        source_digest: Digest::of(b"tree"),
        dockerfile: "Dockerfile".into(),
        target: None,
        args: BTreeMap::new(),
        platforms: vec![],
        source_date_epoch: 0,
        builder_id: "https://outpost.dev/signer/buildah".into(),
        builder_version: BTreeMap::from([("buildah".into(), "1.28.2".into())]),
    }
    .statement()
}

#[test]
fn provenance_is_verified_with_the_bundle() {
    let dir = tempfile::tempdir().unwrap();
    let verify = |name: &str, bytes: &[u8]| {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        let keys = outpost_tests::testdata().join("keys");
        run(signer()
            .arg("verify")
            .arg(&path)
            .arg("--key")
            .arg(keys.join("vendor-a.pub"))
            .arg("--key")
            .arg(keys.join("vendor-b.pub")))
    };
    let good = signed(with_provenance(release("1.0.0", 1), statement(None)), &BOTH);
    verify("good.tar", &tar(&good)).ok();

    // Signed by the vendor, but about another image than the stack pins: a named rejection.
    let other = Digest::of(b"another image");
    let mismatched = signed_unchecked(
        with_provenance(release("1.0.0", 1), statement(Some(other))),
        &BOTH,
    );
    verify("mismatch.tar", &tar(&mismatched)).fails(
        1,
        &format!("verification failed: provenance: provenance statement 1: resource api: the statement's subject is ghcr.io/acme/api@{other}, but the stack pins ghcr.io/acme/api"),
    );

    // One byte of a signed statement changed: its digest no longer matches the signed manifest.
    let mut bytes = tar(&good);
    let needle = b"\"buildah\":\"1.28.2\"";
    let at = bytes
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    bytes[at + needle.len() - 2] = b'9';
    let tampered = verify("tampered.tar", &bytes);
    assert_eq!(tampered.code, 1, "{}", tampered.stdout);
    assert!(
        tampered.stderr.contains("verification failed"),
        "{}",
        tampered.stderr
    );
    assert!(tampered.stderr.contains("digest"), "{}", tampered.stderr);
}

/// `platforms` with more than one entry builds an OCI index (no emulator needed: the tree is
/// copied, not run), the same twice, and the stack pins the index.
#[test]
fn several_platforms_build_one_index_reproducibly() {
    let vendor = Vendor::new("scratch", "page\n");
    let stack = std::fs::read_to_string(vendor.path("stack.yaml")).unwrap();
    std::fs::write(
        vendor.path("stack.yaml"),
        stack.replace(
            "args: {BASE: \"scratch\"}",
            "args: {BASE: \"scratch\"}, platforms: [linux/amd64, linux/arm64]",
        ),
    )
    .unwrap();
    let build = |out: &Path| vendor.build(&["--with-images"], "1.0.0", 1, out).ok();
    let (first, again) = (vendor.path("first.tar"), vendor.path("again.tar"));
    build(&first);
    build(&again);
    assert_eq!(
        file_digest(&first),
        file_digest(&again),
        "the same bundle twice"
    );
    let report = inspect(&first);
    let image = report["resources"][0]["image"].as_str().unwrap();
    assert_eq!(report["bundledImages"][0], image);
    assert_eq!(
        report["resources"][0]["builtFrom"]["platforms"],
        serde_json::json!(["linux/amd64", "linux/arm64"])
    );
    let layout = outpost_bundle_format::Layout::read(&first, &Default::default(), None).unwrap();
    let carried = layout
        .index()
        .manifests
        .iter()
        .find(|d| d.digest == digest_of(image))
        .unwrap();
    assert_eq!(
        carried.media_type,
        outpost_bundle_format::layout::oci::MEDIA_TYPE_INDEX
    );
    let index: outpost_bundle_format::layout::oci::ImageIndex =
        serde_json::from_slice(&layout.read_blob(&carried.digest, 1 << 20).unwrap()).unwrap();
    assert_eq!(index.manifests.len(), 2);
}
