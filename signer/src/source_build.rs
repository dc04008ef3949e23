//! `code: {type: source}` at build time: each source tree is checked against the file system,
//! digested, and built by buildah (daemonless, its own storage in a temporary directory, chroot
//! isolation) into an OCI layout, with every timestamp set to the release's `created` so the
//! same tree builds the same image digest. The result is pushed or carried by the caller, which
//! then writes the provenance statement this module fills in.

use crate::Failure;
use outpost_bundle_format::Digest;
use outpost_bundle_format::layout::oci::{self, Descriptor, ImageIndex, ImageManifest};
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_bundle_format::provenance::{Provenance, source_tree_digest};
use outpost_bundle_format::stack::SourceBuild;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// What `--builder-id` defaults to: the provenance's `runDetails.builder.id`.
pub const BUILDER_ID: &str = "https://outpost.dev/signer/buildah";

/// One image built from source: its OCI layout and what the provenance statement says.
pub struct BuiltImage {
    pub resource: String,
    /// The layout buildah wrote (kept until the bundle is written).
    pub dir: PathBuf,
    pub layout: Layout,
    /// The image's manifest, or index for several platforms: what the stack pins.
    pub digest: Digest,
    pub media_type: String,
    pub provenance: Provenance,
}

/// buildah, run with storage of its own under `work`.
pub struct Buildah {
    program: PathBuf,
    work: PathBuf,
    version: String,
    /// A registries.conf marking the registries to reach without TLS (`--insecure-registry`),
    /// when there are any; else the machine's own applies.
    registries_conf: Option<PathBuf>,
}

/// A source build checked against the file system and digested, ready to build.
pub struct Prepared<'a> {
    pub build: &'a SourceBuild,
    /// Where errors say it is, e.g. `stack.yaml: resource api`.
    pub at: String,
    context: PathBuf,
    tree_digest: Digest,
}

/// Checks `build`'s context and Dockerfile against the file system (inside the stack's
/// directory, links inside the context) and digests its tree: done for every source before
/// the first build, so a mistake costs no build time.
pub fn prepare<'a>(
    at: String,
    stack_dir: &Path,
    build: &'a SourceBuild,
) -> Result<Prepared<'a>, Failure> {
    let context = checked_context(&at, stack_dir, build)?;
    let tree = source_tree_digest(&context)
        .map_err(|e| Failure::invalid(format!("{at}: code.src: {e}")))?;
    for (link, target) in &tree.symlinks {
        check_link(&at, &context, link, target)?;
    }
    Ok(Prepared {
        build,
        at,
        context,
        tree_digest: tree.digest,
    })
}

impl Buildah {
    /// Finds the builder and reads its version. `program` is `--buildah` (default `buildah`);
    /// base images from `insecure` registries (`HOST[:PORT]`) are pulled without TLS.
    pub fn new(program: &Path, work: &Path, insecure: &[String]) -> Result<Buildah, Failure> {
        let output = Command::new(program).arg("--version").output().map_err(|e| {
            Failure::invalid(format!(
                "{}: cannot run the image builder ({e}); install buildah (Debian: apt install buildah) or name it with --buildah",
                program.display()
            ))
        })?;
        let text = String::from_utf8_lossy(&output.stdout);
        // "buildah version 1.28.2 (image-spec 1.1.0-rc2, runtime-spec 1.0.2-dev)"
        let version = text
            .split_whitespace()
            .nth(2)
            .filter(|_| output.status.success() && text.starts_with("buildah version "))
            .ok_or_else(|| {
                Failure::invalid(format!(
                    "{}: not buildah (--version printed {:?})",
                    program.display(),
                    text.trim()
                ))
            })?
            .to_string();
        let registries_conf = if insecure.is_empty() {
            None
        } else {
            let path = work.join("registries.conf");
            let entries: String = insecure
                .iter()
                .map(|host| format!("[[registry]]\nlocation = {host:?}\ninsecure = true\n"))
                .collect();
            std::fs::write(&path, entries)
                .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
            Some(path)
        };
        for dir in ["cni", "images"] {
            std::fs::create_dir_all(work.join(dir))
                .map_err(|e| Failure::usage(format!("{}: {e}", work.display())))?;
        }
        Ok(Buildah {
            program: program.to_path_buf(),
            work: work.to_path_buf(),
            version,
            registries_conf,
        })
    }

    fn command(&self) -> Command {
        let mut command = Command::new(&self.program);
        command
            .arg("--root")
            .arg(self.work.join("storage"))
            .arg("--runroot")
            .arg(self.work.join("run"))
            .args(["--storage-driver", "vfs"])
            .stdin(Stdio::null());
        if let Some(conf) = &self.registries_conf {
            command.env("CONTAINERS_REGISTRIES_CONF", conf);
        }
        command
    }

    /// Runs buildah with its output on our stderr (stdout is for the result line).
    fn run(&self, at: &str, what: &str, command: &mut Command) -> Result<(), Failure> {
        let status = command
            .stdout(Stdio::from(std::io::stderr()))
            .stderr(Stdio::inherit())
            .status()
            .map_err(|e| Failure::invalid(format!("{at}: cannot run buildah: {e}")))?;
        if status.success() {
            Ok(())
        } else {
            Err(Failure::invalid(format!(
                "{at}: {what} failed (buildah {status}); no bundle was written"
            )))
        }
    }

    /// One `buildah build` of `context` for `platform` (else the builder's own), tagged `name`.
    fn build_one(
        &self,
        at: &str,
        context: &Path,
        build: &SourceBuild,
        platform: Option<&str>,
        epoch: i64,
        name: &str,
    ) -> Result<(), Failure> {
        let mut command = self.command();
        command
            // RUN steps share the host's network, as `docker build` does by default.
            .args([
                "build",
                "--isolation",
                "chroot",
                "--network",
                "host",
                "--format",
                "oci",
            ])
            // No network plugins are needed; an empty directory keeps buildah from reading
            // (and warning about) the machine's CNI configuration.
            .arg("--cni-config-dir")
            .arg(self.work.join("cni"))
            .arg(format!("--timestamp={epoch}"))
            .arg("--file")
            .arg(context.join(&build.dockerfile));
        if let Some(target) = &build.target {
            command.arg("--target").arg(target);
        }
        for (key, value) in &build.args {
            command.arg("--build-arg").arg(format!("{key}={value}"));
        }
        if let Some(platform) = platform {
            command.arg("--platform").arg(platform);
        }
        command.arg("--tag").arg(name).arg(context);
        self.run(at, "the build", &mut command)
    }

    /// Builds a prepared source with every timestamp at `epoch`, into an OCI layout.
    pub fn build(&self, prepared: &Prepared, epoch: i64) -> Result<BuiltImage, Failure> {
        let (build, at, context) = (prepared.build, prepared.at.as_str(), &prepared.context);
        eprintln!(
            "building {} from {} ({})",
            build.resource, build.src, prepared.tree_digest
        );
        let dir = self.work.join("images").join(&build.resource);
        // One build per platform, one after the other: buildah's own multi-platform build
        // runs them in parallel and lists them in the order they finish, which would make the
        // index differ from run to run.
        let platforms: Vec<Option<&str>> = if build.platforms.is_empty() {
            vec![None]
        } else {
            build.platforms.iter().map(|p| Some(p.as_str())).collect()
        };
        for (index, platform) in platforms.iter().enumerate() {
            let name = format!("localhost/outpost-build/{}-{index}", build.resource);
            self.build_one(at, context, build, *platform, epoch, &name)?;
            let destination = format!("oci:{}:{index}", dir.display());
            let mut export = self.command();
            export.args(["push", "--quiet", "--format", "oci", &name, &destination]);
            self.run(at, "exporting the image", &mut export)?;
        }
        let read = |dir: &Path| {
            Layout::read_dir(dir, &Limits::default())
                .map_err(|e| Failure::invalid(format!("{at}: the built image: {e}")))
        };
        let mut layout = read(&dir)?;
        let mut manifests = Vec::new();
        for (index, platform) in platforms.iter().enumerate() {
            let mut descriptor = layout
                .index()
                .manifests
                .iter()
                .find(|d| d.ref_name() == Some(index.to_string().as_str()))
                .cloned()
                .ok_or_else(|| Failure::invalid(format!("{at}: buildah wrote no image {index}")))?;
            descriptor.annotations.clear();
            descriptor.platform = Some(built_platform(at, &layout, &descriptor, *platform)?);
            manifests.push(descriptor);
        }
        let descriptor = match <[_; 1]>::try_from(manifests) {
            Ok([single]) => Descriptor {
                platform: None,
                ..single
            },
            Err(manifests) => {
                let bytes = oci::to_bytes(&ImageIndex::new(manifests));
                let descriptor = Descriptor::of(oci::MEDIA_TYPE_INDEX, &bytes);
                let blob = dir.join("blobs/sha256").join(descriptor.digest.hex());
                std::fs::write(&blob, &bytes)
                    .map_err(|e| Failure::usage(format!("{}: {e}", blob.display())))?;
                layout = read(&dir)?;
                descriptor
            }
        };
        Ok(BuiltImage {
            resource: build.resource.clone(),
            dir,
            layout,
            digest: descriptor.digest,
            media_type: descriptor.media_type,
            provenance: Provenance {
                resource: build.resource.clone(),
                image_name: String::new(),
                image_digest: descriptor.digest,
                source_path: build.src.clone(),
                source_digest: prepared.tree_digest,
                dockerfile: build.dockerfile.clone(),
                target: build.target.clone(),
                args: build.args.clone(),
                platforms: build.platforms.clone(),
                source_date_epoch: epoch,
                builder_id: BUILDER_ID.into(),
                builder_version: BTreeMap::from([
                    ("buildah".to_string(), self.version.clone()),
                    (
                        "outpost-signer".to_string(),
                        env!("CARGO_PKG_VERSION").to_string(),
                    ),
                ]),
            },
        })
    }
}

/// The platform the image at `descriptor` was built for, from its config; refused when it is not
/// the one `requested` (buildah goes on with a base image that lacks the platform).
fn built_platform(
    at: &str,
    layout: &Layout,
    descriptor: &Descriptor,
    requested: Option<&str>,
) -> Result<serde_json::Value, Failure> {
    let fail = |e: &dyn std::fmt::Display| Failure::invalid(format!("{at}: the built image: {e}"));
    let limit = Limits::default().max_metadata_bytes;
    let manifest: ImageManifest = serde_json::from_slice(
        &layout
            .read_blob(&descriptor.digest, limit)
            .map_err(|e| fail(&e))?,
    )
    .map_err(|e| fail(&e))?;
    let config: serde_json::Value = serde_json::from_slice(
        &layout
            .read_blob(&manifest.config.digest, limit)
            .map_err(|e| fail(&e))?,
    )
    .map_err(|e| fail(&e))?;
    let part = |key: &str| config[key].as_str().unwrap_or_default().to_string();
    let (os, architecture, variant) = (part("os"), part("architecture"), part("variant"));
    let built = [os.as_str(), architecture.as_str(), variant.as_str()]
        .into_iter()
        .filter(|p| !p.is_empty())
        .collect::<Vec<_>>()
        .join("/");
    // A platform asked for without a variant accepts the variant the builder chose.
    if let Some(requested) = requested
        && requested != built
        && requested != format!("{os}/{architecture}")
    {
        return Err(Failure::invalid(format!(
            "{at}: asked for platform {requested}, buildah built {built} (is the base image there for {requested}?)"
        )));
    }
    let mut platform = serde_json::json!({"architecture": architecture, "os": os});
    if !variant.is_empty() {
        platform["variant"] = variant.into();
    }
    Ok(platform)
}

/// The build context and its Dockerfile, resolved: both inside the stack's directory tree
/// (symbolic links followed), the one a directory and the other a file.
fn checked_context(at: &str, stack_dir: &Path, build: &SourceBuild) -> Result<PathBuf, Failure> {
    let context = stack_dir.join(&build.src).canonicalize().map_err(|e| {
        Failure::invalid(format!(
            "{at}: code.src {}: {e}",
            stack_dir.join(&build.src).display()
        ))
    })?;
    if !context.starts_with(stack_dir) {
        return Err(Failure::invalid(format!(
            "{at}: code.src {:?} resolves to {}, outside the stack's directory {} (symbolic link)",
            build.src,
            context.display(),
            stack_dir.display()
        )));
    }
    if !context.is_dir() {
        return Err(Failure::invalid(format!(
            "{at}: code.src {:?} is not a directory",
            build.src
        )));
    }
    let dockerfile = context.join(&build.dockerfile);
    let resolved = dockerfile.canonicalize().map_err(|e| {
        Failure::invalid(format!(
            "{at}: code.dockerfile {}: {e}",
            dockerfile.display()
        ))
    })?;
    if !resolved.starts_with(&context) || !resolved.is_file() {
        return Err(Failure::invalid(format!(
            "{at}: code.dockerfile {:?} must be a file inside code.src",
            build.dockerfile
        )));
    }
    Ok(context)
}

/// A symbolic link in the build context must resolve (every link on the way followed) to
/// something inside the context: the source digest covers nothing else.
fn check_link(at: &str, context: &Path, link: &Path, target: &Path) -> Result<(), Failure> {
    let path = context.join(link);
    match path.canonicalize() {
        Ok(resolved) if resolved.starts_with(context) => Ok(()),
        Ok(resolved) => Err(Failure::invalid(format!(
            "{at}: code.src: {} is a symbolic link to {}, outside code.src ({})",
            path.display(),
            resolved.display(),
            context.display()
        ))),
        Err(e) => Err(Failure::invalid(format!(
            "{at}: code.src: {} is a symbolic link to {} that does not resolve ({e})",
            path.display(),
            target.display()
        ))),
    }
}

/// The tag a built image is pushed under: `<resource>-<version>`, with semver's `+` (not
/// allowed in a tag) as `_`.
pub fn image_tag(resource: &str, version: &semver::Version) -> String {
    let tag = format!("{resource}-{version}").replace('+', "_");
    tag.chars().take(128).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_must_resolve_inside_the_context() {
        let dir = tempfile::tempdir().unwrap();
        let stack = dir.path().canonicalize().unwrap();
        let context = stack.join("api");
        std::fs::create_dir_all(context.join("sub")).unwrap();
        std::fs::create_dir_all(stack.join("shared")).unwrap();
        let link = |name: &str, target: &str| {
            std::os::unix::fs::symlink(target, context.join(name)).unwrap();
            check_link("r", &context, Path::new(name), Path::new(target))
        };
        link("inside", "sub").unwrap();
        // A link to the stack directory, and one through it and up: both leave the context.
        let error = link("up", "..").unwrap_err();
        assert!(
            error.message.contains("outside code.src"),
            "{}",
            error.message
        );
        let error = link("further", "up/..").unwrap_err();
        assert!(
            error.message.contains("outside code.src"),
            "{}",
            error.message
        );
        link("sibling", "../shared").unwrap_err();
        link("absolute", "/etc/passwd").unwrap_err();
        let error = link("dangling", "no/such/file").unwrap_err();
        assert!(
            error.message.contains("does not resolve"),
            "{}",
            error.message
        );
    }

    #[test]
    fn tags_follow_the_tag_grammar() {
        let version = semver::Version::parse("1.2.0-rc.1+build.5").unwrap();
        assert_eq!(image_tag("api", &version), "api-1.2.0-rc.1_build.5");
    }
}
