//! Build provenance: how an image the stack pins was built from source, as an in-toto
//! statement with a SLSA provenance v1 predicate. Statements are layers of the bundle manifest,
//! so the bundle's signature covers them; [`Provenance::parse`] is the checked constructor and
//! [`Provenance::check_against`] ties a statement to the stack. Also the source tree digest
//! the statements name (SPEC.md section 5.1), so a customer can recompute it from the vendor's
//! source.

use crate::crypto::Sha256;
use crate::digest::Digest;
use crate::stack::Stack;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Largest statement read: they are a few hundred bytes.
pub const MAX_STATEMENT_BYTES: u64 = 64 * 1024;
/// The layer media type of a statement (the in-toto attestation framework's).
pub const MEDIA_TYPE_STATEMENT: &str = "application/vnd.in-toto+json";
pub const STATEMENT_TYPE: &str = "https://in-toto.io/Statement/v1";
pub const PREDICATE_TYPE: &str = "https://slsa.dev/provenance/v1";
/// What `externalParameters` means: a Dockerfile build of a source tree by `outpost-signer`.
pub const BUILD_TYPE: &str = "https://outpost.dev/build/source/v1";

/// How one image was built, checked. Equal inputs give equal statement bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provenance {
    /// The stack resource whose image this is.
    pub resource: String,
    /// The image's name (where it was pushed, or its carried name), without tag or digest.
    pub image_name: String,
    /// The image's manifest (or index) digest: what the stack pins.
    pub image_digest: Digest,
    /// The build context, relative to the stack file's directory.
    pub source_path: String,
    /// [`source_tree_digest`] of the build context.
    pub source_digest: Digest,
    pub dockerfile: String,
    pub target: Option<String>,
    pub args: BTreeMap<String, String>,
    pub platforms: Vec<String>,
    /// The timestamp every file and the image config were given (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: i64,
    /// The builder, e.g. `https://outpost.dev/signer/buildah`.
    pub builder_id: String,
    /// Tool versions, e.g. `buildah` → `1.28.2`.
    pub builder_version: BTreeMap<String, String>,
}

// The statement as written: in-toto Statement v1 around a SLSA provenance v1 predicate.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Statement {
    #[serde(rename = "_type")]
    statement_type: String,
    subject: Vec<ResourceDescriptor>,
    predicate_type: String,
    predicate: Predicate,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceDescriptor {
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uri: Option<String>,
    digest: DigestSet,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct DigestSet {
    sha256: String,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Predicate {
    build_definition: BuildDefinition,
    run_details: RunDetails,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BuildDefinition {
    build_type: String,
    external_parameters: ExternalParameters,
    internal_parameters: InternalParameters,
    resolved_dependencies: Vec<ResourceDescriptor>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ExternalParameters {
    resource: String,
    source: String,
    dockerfile: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    target: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    args: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    platforms: Vec<String>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct InternalParameters {
    source_date_epoch: i64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RunDetails {
    builder: Builder,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Builder {
    id: String,
    version: BTreeMap<String, String>,
}

fn sha256_hex(digest: &DigestSet, what: &str) -> Result<Digest, String> {
    Digest::from_hex(&digest.sha256).map_err(|e| format!("{what}: {e}"))
}

impl Provenance {
    /// The statement's bytes (compact JSON), as stored in the bundle.
    pub fn statement(&self) -> Vec<u8> {
        let statement = Statement {
            statement_type: STATEMENT_TYPE.into(),
            subject: vec![ResourceDescriptor {
                name: Some(self.image_name.clone()),
                uri: None,
                digest: DigestSet {
                    sha256: self.image_digest.hex(),
                },
            }],
            predicate_type: PREDICATE_TYPE.into(),
            predicate: Predicate {
                build_definition: BuildDefinition {
                    build_type: BUILD_TYPE.into(),
                    external_parameters: ExternalParameters {
                        resource: self.resource.clone(),
                        source: self.source_path.clone(),
                        dockerfile: self.dockerfile.clone(),
                        target: self.target.clone(),
                        args: self.args.clone(),
                        platforms: self.platforms.clone(),
                    },
                    internal_parameters: InternalParameters {
                        source_date_epoch: self.source_date_epoch,
                    },
                    resolved_dependencies: vec![ResourceDescriptor {
                        name: Some("source".into()),
                        uri: Some(format!("file:{}", self.source_path)),
                        digest: DigestSet {
                            sha256: self.source_digest.hex(),
                        },
                    }],
                },
                run_details: RunDetails {
                    builder: Builder {
                        id: self.builder_id.clone(),
                        version: self.builder_version.clone(),
                    },
                },
            },
        };
        crate::layout::oci::to_bytes(&statement)
    }

    /// Reads a statement: strict JSON, the in-toto and SLSA types this format writes, one
    /// subject, and the source among the resolved dependencies.
    pub fn parse(bytes: &[u8]) -> Result<Provenance, String> {
        let statement: Statement = crate::json::from_slice(bytes).map_err(|e| e.to_string())?;
        if statement.statement_type != STATEMENT_TYPE {
            return Err(format!(
                "_type is {:?}, not {STATEMENT_TYPE}",
                statement.statement_type
            ));
        }
        if statement.predicate_type != PREDICATE_TYPE {
            return Err(format!(
                "predicateType is {:?}, not {PREDICATE_TYPE}",
                statement.predicate_type
            ));
        }
        let definition = statement.predicate.build_definition;
        if definition.build_type != BUILD_TYPE {
            return Err(format!(
                "buildType is {:?}, not {BUILD_TYPE}",
                definition.build_type
            ));
        }
        let [subject] = <[ResourceDescriptor; 1]>::try_from(statement.subject)
            .map_err(|subjects| format!("has {} subjects, not one", subjects.len()))?;
        let image_name = subject
            .name
            .filter(|name| !name.is_empty())
            .ok_or("the subject has no name")?;
        let image_digest = sha256_hex(&subject.digest, "subject digest")?;
        let parameters = definition.external_parameters;
        let source = definition
            .resolved_dependencies
            .iter()
            .find(|d| d.name.as_deref() == Some("source"))
            .ok_or("no resolved dependency named source")?;
        let source_digest = sha256_hex(&source.digest, "source digest")?;
        let builder = statement.predicate.run_details.builder;
        let provenance = Provenance {
            resource: parameters.resource,
            image_name,
            image_digest,
            source_path: parameters.source,
            source_digest,
            dockerfile: parameters.dockerfile,
            target: parameters.target,
            args: parameters.args,
            platforms: parameters.platforms,
            source_date_epoch: definition.internal_parameters.source_date_epoch,
            builder_id: builder.id,
            builder_version: builder.version,
        };
        provenance.check_fields()?;
        Ok(provenance)
    }

    /// The rules the stack model puts on a source build, and text fit to show a customer: no
    /// control characters (a newline could forge lines of a plan), at most 512 characters.
    fn check_fields(&self) -> Result<(), String> {
        use crate::stack::{is_environment_name, is_platform, is_stage_name, relative_path};
        let texts = [
            ("the subject name", &self.image_name),
            ("resource", &self.resource),
            ("source", &self.source_path),
            ("dockerfile", &self.dockerfile),
            ("the builder id", &self.builder_id),
        ];
        let versions = self.builder_version.iter().flat_map(|(k, v)| [k, v]);
        let args = self.args.iter().flat_map(|(k, v)| [k, v]);
        for (what, text) in texts
            .into_iter()
            .chain(versions.map(|t| ("a builder version", t)))
            .chain(args.map(|t| ("a build argument", t)))
        {
            if text.len() > 512 || text.chars().any(char::is_control) {
                return Err(format!(
                    "{what} has control characters or is over 512 characters"
                ));
            }
        }
        if !crate::stack::is_dns_label(&self.resource) {
            return Err(format!(
                "resource {:?} is not a resource name",
                self.resource
            ));
        }
        for (what, path) in [
            ("source", &self.source_path),
            ("dockerfile", &self.dockerfile),
        ] {
            match relative_path(what, path) {
                Ok(normal) if normal == *path => {}
                _ => return Err(format!("{what} {path:?} is not a normalised relative path")),
            }
        }
        if let Some(target) = self.target.as_ref().filter(|t| !is_stage_name(t)) {
            return Err(format!("target {target:?} is not a build stage name"));
        }
        if let Some(name) = self.args.keys().find(|n| !is_environment_name(n)) {
            return Err(format!("build argument name {name:?} is not a valid name"));
        }
        if let Some(platform) = self.platforms.iter().find(|p| !is_platform(p)) {
            return Err(format!("platform {platform:?} is not os/arch[/variant]"));
        }
        Ok(())
    }

    /// The statement is about an image the stack pins: its resource exists and pins exactly
    /// the subject's digest.
    pub fn check_against(&self, stack: &Stack) -> Result<(), String> {
        let resource = stack.resource(&self.resource).ok_or_else(|| {
            format!(
                "names resource {:?}, which the stack does not have",
                self.resource
            )
        })?;
        let image = &resource.container.image;
        let pinned = image.digest();
        if pinned != Some(self.image_digest)
            || self.image_name != format!("{}/{}", image.registry(), image.repository())
        {
            return Err(format!(
                "resource {}: the statement's subject is {}@{}, but the stack pins {}",
                self.resource, self.image_name, self.image_digest, resource.container.image
            ));
        }
        Ok(())
    }
}

/// Parses and checks every statement of a bundle against its stack: at most one per resource.
pub fn check_statements(statements: &[Vec<u8>], stack: &Stack) -> Result<Vec<Provenance>, String> {
    let mut checked: Vec<Provenance> = Vec::with_capacity(statements.len());
    for (index, bytes) in statements.iter().enumerate() {
        let provenance = Provenance::parse(bytes)
            .and_then(|p| p.check_against(stack).map(|()| p))
            .map_err(|e| format!("provenance statement {}: {e}", index + 1))?;
        if checked.iter().any(|p| p.resource == provenance.resource) {
            return Err(format!(
                "provenance statement {}: resource {} has a statement already",
                index + 1,
                provenance.resource
            ));
        }
        checked.push(provenance);
    }
    Ok(checked)
}

/// A source tree's digest and the symbolic links it holds (relative path, target as written),
/// so the caller can refuse links that leave the tree.
#[derive(Debug, Clone)]
pub struct SourceTree {
    pub digest: Digest,
    pub symlinks: Vec<(PathBuf, PathBuf)>,
}

/// The digest of the directory tree at `root` (SPEC.md section 5.1): SHA-256 over one record
/// per entry below `root`, sorted by path bytes. A record is `<kind> <mode> <sha256 hex> <path>`
/// and a NUL, where kind is `dir`, `file` or `link`; mode is the permission bits in four octal
/// digits (`0777` for a link); the hash is of the file's content, the link's target, or nothing
/// for a directory. Owners and times do not count. Other file types are refused.
pub fn source_tree_digest(root: &Path) -> Result<SourceTree, String> {
    let mut records: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut symlinks = Vec::new();
    let mut pending = vec![PathBuf::new()];
    let io = |path: &Path, e: std::io::Error| format!("{}: {e}", root.join(path).display());
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(root.join(&dir)).map_err(|e| io(&dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| io(&dir, e))?;
            let relative = dir.join(entry.file_name());
            let kind = entry.file_type().map_err(|e| io(&relative, e))?;
            let path = root.join(&relative);
            let (label, mode, content) = if kind.is_dir() {
                pending.push(relative.clone());
                let mode = permissions(&path).map_err(|e| io(&relative, e))?;
                ("dir", mode, Digest::of(b""))
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(|e| io(&relative, e))?;
                let digest = Digest::of(target.as_os_str().as_encoded_bytes());
                symlinks.push((relative.clone(), target));
                ("link", 0o777, digest)
            } else if kind.is_file() {
                let mode = permissions(&path).map_err(|e| io(&relative, e))?;
                let digest = file_digest(&path).map_err(|e| io(&relative, e))?;
                ("file", mode, digest)
            } else {
                return Err(format!(
                    "{}: only files, directories and symbolic links can be built from",
                    root.join(&relative).display()
                ));
            };
            let path = relative.as_os_str().as_encoded_bytes().to_vec();
            let mut record = format!("{label} {mode:04o} {} ", content.hex()).into_bytes();
            record.extend_from_slice(&path);
            record.push(0);
            records.push((path, record));
        }
    }
    records.sort();
    let mut hasher = Sha256::default();
    for (_, record) in &records {
        hasher.update(record);
    }
    symlinks.sort();
    Ok(SourceTree {
        digest: Digest::from_sha256(hasher.finish()),
        symlinks,
    })
}

fn file_digest(path: &Path) -> std::io::Result<Digest> {
    let mut hasher = Sha256::default();
    std::io::copy(&mut std::fs::File::open(path)?, &mut hasher)?;
    Ok(Digest::from_sha256(hasher.finish()))
}

/// The permission bits (setuid, setgid and sticky included): an image copies them.
#[cfg(unix)]
fn permissions(path: &Path) -> std::io::Result<u32> {
    use std::os::unix::fs::PermissionsExt;
    Ok(std::fs::metadata(path)?.permissions().mode() & 0o7777)
}

#[cfg(not(unix))]
fn permissions(path: &Path) -> std::io::Result<u32> {
    Ok(if std::fs::metadata(path)?.is_dir() {
        0o755
    } else {
        0o644
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::StackFile;

    fn sample() -> Provenance {
        Provenance {
            resource: "api".into(),
            image_name: "registry.example/acme/shop".into(),
            image_digest: Digest::of(b"image"),
            source_path: "api".into(),
            source_digest: Digest::of(b"tree"),
            dockerfile: "Dockerfile".into(),
            target: Some("run".into()),
            args: BTreeMap::from([("VERSION".into(), "1".into())]),
            platforms: vec!["linux/amd64".into()],
            source_date_epoch: 1_700_000_000,
            builder_id: "https://outpost.dev/signer/buildah".into(),
            builder_version: BTreeMap::from([("buildah".into(), "1.28.2".into())]),
        }
    }

    fn stack(image: &str) -> Stack {
        let file: StackFile = serde_json::from_value(serde_json::json!({
            "name": "shop",
            "permissionProfiles": {"none": {}},
            "resources": [{"lifecycle": "live", "container": {
                "name": "api", "code": {"image": image}, "cpu": 1, "memory": "64Mi",
                "ports": [8080], "permissions": "none"}}]
        }))
        .unwrap();
        Stack::from_file(&file).unwrap()
    }

    #[test]
    fn a_statement_reads_back_as_written() {
        let written = sample();
        let bytes = written.statement();
        assert_eq!(Provenance::parse(&bytes).unwrap(), written);
        assert_eq!(bytes, written.statement(), "deterministic");
        let text = String::from_utf8(bytes).unwrap();
        assert!(text.starts_with(r#"{"_type":"https://in-toto.io/Statement/v1","subject":[{"name":"registry.example/acme/shop","digest":{"sha256":""#), "{text}");
    }

    #[test]
    fn a_statement_must_match_the_image_the_stack_pins() {
        let provenance = sample();
        let pinned = format!("registry.example/acme/shop@{}", provenance.image_digest);
        check_statements(&[provenance.statement()], &stack(&pinned)).unwrap();
        let other = format!("registry.example/acme/shop@{}", Digest::of(b"other"));
        let error = check_statements(&[provenance.statement()], &stack(&other)).unwrap_err();
        assert!(
            error.starts_with(
                "provenance statement 1: resource api: the statement's subject is registry.example/acme/shop@sha256:"
            ),
            "{error}"
        );
        let twice = check_statements(
            &[provenance.statement(), provenance.statement()],
            &stack(&pinned),
        )
        .unwrap_err();
        assert!(
            twice.contains("statement 2: resource api has a statement already"),
            "{twice}"
        );
        let elsewhere = Provenance {
            resource: "db".into(),
            ..sample()
        };
        let error = check_statements(&[elsewhere.statement()], &stack(&pinned)).unwrap_err();
        assert!(error.contains("names resource \"db\""), "{error}");
    }

    #[test]
    fn malformed_statements_are_refused() {
        let good = String::from_utf8(sample().statement()).unwrap();
        for (from, to, expected) in [
            (
                "https://in-toto.io/Statement/v1",
                "https://in-toto.io/Statement/v0.1",
                "_type",
            ),
            (
                "https://slsa.dev/provenance/v1",
                "https://slsa.dev/provenance/v0.2",
                "predicateType",
            ),
            ("https://outpost.dev/build/source/v1", "x", "buildType"),
            (
                "\"subject\":[",
                "\"subject\":[{\"name\":\"x\",\"digest\":{\"sha256\":\"00\"}},",
                "2 subjects",
            ),
            (
                "\"name\":\"source\"",
                "\"name\":\"context\"",
                "no resolved dependency named source",
            ),
            (
                "\"resource\":\"api\"",
                "\"resource\":\"api\",\"extra\":1",
                "unknown field",
            ),
            (
                "\"resource\":\"api\"",
                "\"resource\":\"api\",\"resource\":\"db\"",
                "duplicate",
            ),
            (
                "\"source\":\"api\"",
                "\"source\":\"api\\nimage web: forged\"",
                "source has control characters",
            ),
            (
                "\"source\":\"api\"",
                "\"source\":\"../api\"",
                "not a normalised",
            ),
            (
                "\"dockerfile\":\"Dockerfile\"",
                "\"dockerfile\":\"./Dockerfile\"",
                "not a normalised",
            ),
            ("\"target\":\"run\"", "\"target\":\"-x\"", "build stage"),
            ("\"linux/amd64\"", "\"amd64\"", "os/arch"),
            (
                "\"resource\":\"api\"",
                "\"resource\":\"API\"",
                "not a resource name",
            ),
        ] {
            assert!(good.contains(from), "{from}");
            let bad = good.replacen(from, to, 1);
            let error = Provenance::parse(bad.as_bytes()).unwrap_err();
            assert!(error.contains(expected), "{to}: {error}");
        }
    }

    #[test]
    fn the_tree_digest_follows_content_modes_and_names_not_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("bin")).unwrap();
        std::fs::write(root.join("bin/run"), b"#!/bin/sh\n").unwrap();
        std::fs::write(root.join("Dockerfile"), b"FROM scratch\n").unwrap();
        std::os::unix::fs::symlink("bin/run", root.join("start")).unwrap();
        let first = source_tree_digest(root).unwrap();
        assert_eq!(
            first.symlinks,
            vec![(PathBuf::from("start"), PathBuf::from("bin/run"))]
        );
        let touched = std::fs::File::options()
            .write(true)
            .open(root.join("Dockerfile"))
            .unwrap();
        touched
            .set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(
            source_tree_digest(root).unwrap().digest,
            first.digest,
            "times do not count"
        );
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("bin/run"), std::fs::Permissions::from_mode(0o755))
            .unwrap();
        let executable = source_tree_digest(root).unwrap().digest;
        assert_ne!(executable, first.digest, "permissions count");
        std::fs::create_dir(root.join("empty")).unwrap();
        assert_ne!(
            source_tree_digest(root).unwrap().digest,
            executable,
            "directories count"
        );
    }
}
