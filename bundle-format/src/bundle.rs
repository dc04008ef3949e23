//! Building, signing and inspecting release bundles (one OCI artifact per release).
//!
//! The bundle manifest's config blob is the release metadata, its first layer the stack (JSON),
//! then any newer trust roots the agent should rotate to, then a provenance statement for each
//! image built from source. Its digest is the
//! bundle digest everywhere: layout, registry, git.

use crate::crypto::SigningKey;
use crate::digest::Digest;
use crate::layout::oci::{self, Descriptor, ImageManifest};
use crate::layout::{Layout, LayoutError, Limits};
use crate::provenance;
use crate::release::{self, ReleaseMetadata};
use crate::signature;
use crate::stack::{Stack, StackFile};
use std::collections::BTreeMap;

pub const ARTIFACT_TYPE: &str = "application/vnd.outpost.bundle.v1";
pub const MEDIA_TYPE_RELEASE: &str = "application/vnd.outpost.release.v1+json";
pub const MEDIA_TYPE_STACK: &str = "application/vnd.outpost.stack.v1+json";
pub const MEDIA_TYPE_ROOT: &str = "application/vnd.outpost.root.v1+json";
/// Index annotation naming a bundled container image (`--with-images`).
pub const ANNOTATION_IMAGE: &str = "io.outpost.image";

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// Assembles a bundle layout from a pinned stack and its metadata. Deterministic: equal inputs
/// give equal bytes.
pub fn build(
    stack_file: &StackFile,
    metadata: &ReleaseMetadata,
    roots: &[Vec<u8>],
) -> Result<Layout, BuildError> {
    build_with_provenance(stack_file, metadata, roots, &[])
}

/// [`build`], with a provenance statement ([`crate::provenance`]) for each image built from
/// source; each must be about an image the stack pins.
pub fn build_with_provenance(
    stack_file: &StackFile,
    metadata: &ReleaseMetadata,
    roots: &[Vec<u8>],
    statements: &[Vec<u8>],
) -> Result<Layout, BuildError> {
    let stack = Stack::from_file(stack_file).map_err(|e| BuildError::Invalid(e.to_string()))?;
    if let Some((resource, image)) = stack.unpinned_images().first() {
        return Err(BuildError::Invalid(format!(
            "resource {resource}: image {image} is not pinned by digest"
        )));
    }
    metadata
        .check_against(&stack)
        .map_err(BuildError::Invalid)?;
    if !release::is_valid_channel(&metadata.channel) {
        return Err(BuildError::Invalid(format!(
            "channel {:?} must be a DNS-1123 label",
            metadata.channel
        )));
    }
    if metadata.expires <= metadata.created {
        return Err(BuildError::Invalid("expires must be after created".into()));
    }
    let mut layout = Layout::default();
    let config = oci::to_bytes(metadata);
    let stack_json = oci::to_bytes(stack_file);
    let mut layers = vec![Descriptor::of(MEDIA_TYPE_STACK, &stack_json)];
    layout.add_blob(stack_json);
    for root in roots {
        layers.push(Descriptor::of(MEDIA_TYPE_ROOT, root));
        layout.add_blob(root.clone());
    }
    provenance::check_statements(statements, &stack).map_err(BuildError::Invalid)?;
    for statement in statements {
        layers.push(Descriptor::of(provenance::MEDIA_TYPE_STATEMENT, statement));
        layout.add_blob(statement.clone());
    }
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        artifact_type: Some(ARTIFACT_TYPE.into()),
        config: Descriptor::of(MEDIA_TYPE_RELEASE, &config),
        layers,
        subject: None,
        annotations: BTreeMap::from([
            (
                oci::ANNOTATION_CREATED.into(),
                release::rfc3339::format(&metadata.created),
            ),
            (oci::ANNOTATION_VERSION.into(), metadata.version.to_string()),
        ]),
    };
    layout.add_blob(config);
    let manifest_bytes = oci::to_bytes(&manifest);
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &manifest_bytes);
    descriptor.artifact_type = Some(ARTIFACT_TYPE.into());
    descriptor.annotations.insert(
        oci::ANNOTATION_REF_NAME.into(),
        metadata.version.to_string(),
    );
    layout.add_blob(manifest_bytes);
    layout.index_mut().manifests.push(descriptor);
    Ok(layout)
}

/// The bundle manifest's descriptor: the one index entry whose manifest has the bundle
/// artifact type. Tools that rewrite index.json (skopeo, oras) drop the descriptor's
/// `artifactType`, so the manifest itself is consulted when the index does not say (each
/// candidate read once, without building its layer list).
pub fn bundle_descriptor(layout: &Layout) -> Result<&Descriptor, LayoutError> {
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct Peek {
        artifact_type: Option<String>,
        config: PeekConfig,
    }
    #[derive(serde::Deserialize)]
    #[serde(rename_all = "camelCase")]
    struct PeekConfig {
        media_type: String,
    }
    let limits = Limits::default();
    let is_bundle = |d: &&Descriptor| {
        if d.artifact_type.as_deref() == Some(ARTIFACT_TYPE) {
            return true;
        }
        if d.media_type != oci::MEDIA_TYPE_MANIFEST
            || d.ref_name().is_some_and(|r| r.ends_with(".sig"))
        {
            return false;
        }
        layout
            .read_blob(&d.digest, limits.max_metadata_bytes)
            .ok()
            .and_then(|bytes| crate::json::from_slice::<Peek>(&bytes).ok())
            .is_some_and(|m| {
                m.artifact_type.as_deref() == Some(ARTIFACT_TYPE)
                    || m.config.media_type == MEDIA_TYPE_RELEASE
            })
    };
    let mut bundles = layout.index().manifests.iter().filter(is_bundle);
    match (bundles.next(), bundles.next()) {
        (Some(descriptor), None) => Ok(descriptor),
        (None, _) => Err(LayoutError::malformed(
            "index.json",
            format!("no manifest with artifactType {ARTIFACT_TYPE} (not an Outpost bundle)"),
        )),
        (Some(_), Some(_)) => Err(LayoutError::malformed(
            "index.json",
            "more than one bundle manifest",
        )),
    }
}

/// The unverified parts of a bundle, for `inspect` and as the input of verification.
#[derive(Debug, Clone)]
pub struct BundleParts {
    pub digest: Digest,
    pub manifest_bytes: Vec<u8>,
    pub manifest: ImageManifest,
    pub metadata_bytes: Vec<u8>,
    pub stack_bytes: Vec<u8>,
    pub roots: Vec<Vec<u8>>,
    /// Provenance statements, unparsed.
    pub statements: Vec<Vec<u8>>,
    /// Signature layers found under the `sha256-<hex>.sig` ref: (payload, layer descriptor).
    pub signatures: Vec<(Vec<u8>, Descriptor)>,
}

/// Reads the bundle's manifest, metadata, stack, roots and signature layers (size-bounded).
pub fn read_parts(layout: &Layout, limits: &Limits) -> Result<BundleParts, LayoutError> {
    let descriptor = bundle_descriptor(layout)?;
    if descriptor.media_type != oci::MEDIA_TYPE_MANIFEST {
        return Err(LayoutError::malformed(
            "bundle descriptor",
            "media type must be an OCI image manifest",
        ));
    }
    let digest = descriptor.digest;
    let manifest_bytes = layout.read_blob(&digest, limits.max_metadata_bytes)?;
    let manifest: ImageManifest = crate::json::from_slice(&manifest_bytes)
        .map_err(|e| LayoutError::malformed("bundle manifest", e.to_string()))?;
    if manifest.config.media_type != MEDIA_TYPE_RELEASE {
        return Err(LayoutError::malformed(
            "bundle manifest",
            format!("config media type must be {MEDIA_TYPE_RELEASE}"),
        ));
    }
    let metadata_bytes = read_described(layout, &manifest.config, limits)?;
    let (stack_layer, further_layers) = manifest
        .layers
        .split_first()
        .ok_or_else(|| LayoutError::malformed("bundle manifest", "has no stack layer"))?;
    if stack_layer.media_type != MEDIA_TYPE_STACK {
        return Err(LayoutError::malformed(
            "bundle manifest",
            format!("first layer must be {MEDIA_TYPE_STACK}"),
        ));
    }
    let stack_limits = Limits {
        max_metadata_bytes: crate::stack::MAX_STACK_FILE_BYTES as u64,
        ..*limits
    };
    let stack_bytes = read_described(layout, stack_layer, &stack_limits)?;
    if further_layers.len() > MAX_FURTHER_LAYERS {
        return Err(LayoutError::CountLimit {
            what: "the bundle manifest".into(),
            limit: MAX_FURTHER_LAYERS,
            unit: "root and provenance layers",
        });
    }
    for (i, layer) in manifest.layers.iter().enumerate() {
        if manifest.layers[..i]
            .iter()
            .any(|l| l.digest == layer.digest)
        {
            return Err(LayoutError::malformed(
                "bundle manifest",
                format!("lists the layer {} twice", layer.digest),
            ));
        }
    }
    let root_limits = Limits {
        max_metadata_bytes: limits.max_metadata_bytes.min(crate::root::MAX_ROOT_BYTES),
        ..*limits
    };
    let statement_limits = Limits {
        max_metadata_bytes: limits
            .max_metadata_bytes
            .min(provenance::MAX_STATEMENT_BYTES),
        ..*limits
    };
    let mut roots = Vec::new();
    let mut statements = Vec::new();
    for layer in further_layers {
        match layer.media_type.as_str() {
            MEDIA_TYPE_ROOT if statements.is_empty() => {
                roots.push(read_described(layout, layer, &root_limits)?)
            }
            provenance::MEDIA_TYPE_STATEMENT => {
                statements.push(read_described(layout, layer, &statement_limits)?)
            }
            other => {
                return Err(LayoutError::malformed(
                    "bundle manifest",
                    format!(
                        "unexpected layer type {other} (after the stack: roots, then provenance statements)"
                    ),
                ));
            }
        }
    }
    let signatures = read_signatures(layout, &digest, limits)?;
    Ok(BundleParts {
        digest,
        manifest_bytes,
        manifest,
        metadata_bytes,
        stack_bytes,
        roots,
        statements,
        signatures,
    })
}

/// Layers after the stack (carried roots and provenance statements) one bundle may have: each
/// is read into memory and parsed before any signature is checked.
pub const MAX_FURTHER_LAYERS: usize = 64;

/// Signature manifests one bundle may have (one per signing tool or referrer).
pub const MAX_SIGNATURE_MANIFESTS: usize = 16;
/// Signature layers read over all of a bundle's signature manifests: each is a payload to
/// parse and a signature to check against every trusted key, so the work is bounded here.
pub const MAX_SIGNATURE_LAYERS: usize = 256;

/// The simple-signing layers of the signature manifests under the `sha256-<hex>.sig` ref:
/// at most [`MAX_SIGNATURE_MANIFESTS`] manifests and [`MAX_SIGNATURE_LAYERS`] layers, no layer
/// listed twice, every payload strict JSON.
fn read_signatures(
    layout: &Layout,
    digest: &Digest,
    limits: &Limits,
) -> Result<Vec<(Vec<u8>, Descriptor)>, LayoutError> {
    let tag = digest.signature_tag();
    let manifests: Vec<&Descriptor> = layout
        .index()
        .manifests
        .iter()
        .filter(|d| d.ref_name() == Some(tag.as_str()))
        .collect();
    if manifests.len() > MAX_SIGNATURE_MANIFESTS {
        return Err(LayoutError::CountLimit {
            what: format!("index.json under {tag}"),
            limit: MAX_SIGNATURE_MANIFESTS,
            unit: "signature manifests",
        });
    }
    let payload_limits = Limits {
        max_metadata_bytes: signature::MAX_PAYLOAD_BYTES,
        ..*limits
    };
    let mut signatures: Vec<(Vec<u8>, Descriptor)> = Vec::new();
    for sig_descriptor in manifests {
        let bytes = read_described(layout, sig_descriptor, limits)?;
        let what = format!("signature manifest {}", sig_descriptor.digest);
        let sig_manifest: ImageManifest = crate::json::from_slice(&bytes)
            .map_err(|e| LayoutError::malformed(&what, e.to_string()))?;
        for layer in sig_manifest.layers {
            if layer.media_type != signature::MEDIA_TYPE_SIMPLE_SIGNING {
                continue;
            }
            if signatures.len() == MAX_SIGNATURE_LAYERS {
                return Err(LayoutError::CountLimit {
                    what: format!("the signatures of {digest}"),
                    limit: MAX_SIGNATURE_LAYERS,
                    unit: "signature layers",
                });
            }
            if signatures.iter().any(|(_, seen)| *seen == layer) {
                return Err(LayoutError::malformed(
                    &what,
                    format!("lists the signature layer {} twice", layer.digest),
                ));
            }
            let payload = read_described(layout, &layer, &payload_limits)?;
            crate::json::check_unique_members(&payload).map_err(|e| {
                LayoutError::malformed(format!("signature payload {}", layer.digest), e.to_string())
            })?;
            signatures.push((payload, layer));
        }
    }
    Ok(signatures)
}

/// A blob's bytes, checked against its descriptor's size (the digest was checked on read).
fn read_described(
    layout: &Layout,
    descriptor: &Descriptor,
    limits: &Limits,
) -> Result<Vec<u8>, LayoutError> {
    let bytes = layout.read_blob(&descriptor.digest, limits.max_metadata_bytes)?;
    if bytes.len() as u64 != descriptor.size {
        return Err(LayoutError::malformed(
            format!("blob {}", descriptor.digest),
            format!(
                "descriptor says {} bytes, blob has {}",
                descriptor.size,
                bytes.len()
            ),
        ));
    }
    Ok(bytes)
}

/// Adds `key`'s signature over the bundle digest, as one more layer of the cosign signature
/// manifest. Returns false when this key had already signed (nothing changes).
pub fn add_signature(
    layout: &mut Layout,
    key: &SigningKey,
    docker_reference: &str,
) -> Result<bool, BuildError> {
    let parts = read_parts(layout, &Limits::default())?;
    check_content(&parts).map_err(BuildError::Invalid)?;
    let already = parts.signatures.iter().any(|(payload, layer)| {
        signature::payload_digest(payload).is_ok_and(|d| d == parts.digest)
            && signature::layer_signature(layer)
                .is_some_and(|sig| key.public_key().verify(payload, &sig))
    });
    if already {
        return Ok(false);
    }
    let payload = signature::payload(docker_reference, &parts.digest);
    let signature = key
        .sign(&payload)
        .map_err(|e| BuildError::Invalid(e.to_string()))?;
    attach_signature(layout, payload, &signature)?;
    Ok(true)
}

/// Attaches a signature made elsewhere (an HSM, KMS, openssl or cosign) over a simple-signing
/// `payload`. The payload must name this bundle's digest; the signature is checked only at
/// verification, against the keys the verifier trusts.
pub fn attach_signature(
    layout: &mut Layout,
    payload: Vec<u8>,
    signature_der: &[u8],
) -> Result<(), BuildError> {
    let parts = read_parts(layout, &Limits::default())?;
    check_content(&parts).map_err(BuildError::Invalid)?;
    let claimed = signature::payload_digest(&payload).map_err(BuildError::Invalid)?;
    if claimed != parts.digest {
        return Err(BuildError::Invalid(format!(
            "the payload names {claimed}, not this bundle {}",
            parts.digest
        )));
    }
    let layer = signature::signature_layer(&payload, signature_der);
    let mut layers: Vec<Descriptor> = parts
        .signatures
        .into_iter()
        .map(|(_, layer)| layer)
        .collect();
    if layers.contains(&layer) {
        return Ok(());
    }
    layers.push(layer);
    layout.add_blob(payload);
    let (manifest, config) = signature::signature_manifest(layers);
    layout.add_blob(config);
    let tag = parts.digest.signature_tag();
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &manifest);
    descriptor
        .annotations
        .insert(oci::ANNOTATION_REF_NAME.into(), tag.clone());
    layout.add_blob(manifest);
    let index = layout.index_mut();
    index
        .manifests
        .retain(|d| d.ref_name() != Some(tag.as_str()));
    index.manifests.push(descriptor);
    Ok(())
}

/// What a reader refuses whatever it trusts, checked before anything is signed so that a vendor
/// learns it at signing time: metadata and stack parse and obey their rules, their names
/// agree, every image is pinned, and carried roots form a verified chain.
pub fn check_content(parts: &BundleParts) -> Result<(), String> {
    let metadata = parse_metadata(&parts.metadata_bytes)?;
    let (_, stack) = parse_stack(&parts.stack_bytes)?;
    metadata.check_against(&stack)?;
    if let Some((resource, image)) = stack.unpinned_images().first() {
        return Err(format!(
            "resource {resource}: image {image} is not pinned by digest"
        ));
    }
    provenance::check_statements(&parts.statements, &stack)?;
    crate::root::check_carried_chain(&parts.roots, None)
        .map_err(|e| format!("carried trust root: {e}"))
}

/// Release metadata parsed from its bytes (untrusted until verified).
pub fn parse_metadata(bytes: &[u8]) -> Result<ReleaseMetadata, String> {
    // The version is read first so a newer format fails as "unsupported", not "unknown field".
    let value: serde_json::Value =
        crate::json::from_slice(bytes).map_err(|e| format!("release metadata: {e}"))?;
    let version = value
        .get("formatVersion")
        .and_then(serde_json::Value::as_u64);
    let known = [
        release::FORMAT_VERSION,
        release::FORMAT_VERSION_IRREVERSIBLE,
    ];
    if !version.is_some_and(|v| known.iter().any(|k| u64::from(*k) == v)) {
        return Err(format!(
            "release metadata: format version {} is not supported (this build reads versions {} and {})",
            version.map_or("missing".to_string(), |v| v.to_string()),
            known[0],
            known[1]
        ));
    }
    let metadata: ReleaseMetadata =
        serde_json::from_value(value).map_err(|e| format!("release metadata: {e}"))?;
    if !release::is_valid_channel(&metadata.channel) {
        return Err(format!(
            "release metadata: channel {:?} must be a DNS-1123 label",
            metadata.channel
        ));
    }
    if metadata.expires <= metadata.created {
        return Err("release metadata: expires must be after created".into());
    }
    Ok(metadata)
}

/// Parses a stored stack (JSON) and checks every rule.
pub fn parse_stack(bytes: &[u8]) -> Result<(StackFile, Stack), String> {
    let file: StackFile = crate::json::from_slice(bytes).map_err(|e| format!("stack: {e}"))?;
    let stack = Stack::from_file(&file).map_err(|e| e.to_string())?;
    Ok((file, stack))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stack::{Code, ContainerSpec, Cpu, Lifecycle, ResourceEntry};
    use chrono::{TimeZone, Utc};
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    const IMAGE: &str =
        "ghcr.io/acme/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn container(
        name: String,
        ports: Vec<u32>,
        memory_mi: u32,
        environment: BTreeMap<String, String>,
    ) -> ContainerSpec {
        ContainerSpec {
            name,
            code: Code::image(IMAGE),
            cpu: Cpu::Cores(0.5),
            memory: format!("{memory_mi}Mi"),
            ports,
            public_endpoints: vec![],
            replicas: Some(1),
            min_replicas: None,
            max_replicas: None,
            auto_scale: None,
            stateful: None,
            persistent_storage: None,
            ephemeral_storage: None,
            gpu: None,
            health_check: None,
            environment,
            links: vec![],
            permissions: "execution".into(),
            pool: None,
            command: vec![],
        }
    }

    fn stack_strategy() -> impl Strategy<Value = StackFile> {
        let resource = (
            "[a-z][a-z0-9]{0,10}",
            proptest::collection::btree_set(1u32..65535, 1..4),
            1u32..4096,
            proptest::collection::btree_map("[A-Z_]{1,8}", "\\PC{0,12}", 0..4),
        );
        proptest::collection::vec(resource, 1..4).prop_map(|resources| {
            let mut seen = std::collections::BTreeSet::new();
            let resources = resources
                .into_iter()
                .filter(|(name, ..)| seen.insert(name.clone()))
                .map(|(name, ports, memory, environment)| ResourceEntry {
                    lifecycle: Lifecycle::Live,
                    container: container(name, ports.into_iter().collect(), memory, environment),
                })
                .collect();
            StackFile {
                name: "acme".into(),
                permission_profiles: BTreeMap::from([(
                    "execution".into(),
                    BTreeMap::from([("aws".into(), vec!["s3:GetObject".into()])]),
                )]),
                resources,
            }
        })
    }

    fn metadata(sequence: u64, created: i64) -> ReleaseMetadata {
        ReleaseMetadata {
            format_version: release::FORMAT_VERSION,
            name: "acme".into(),
            version: semver::Version::new(1, 2, 3),
            sequence,
            channel: "stable".into(),
            created: Utc.timestamp_opt(created, 0).unwrap(),
            expires: Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap(),
            irreversible: Vec::new(),
        }
    }

    fn tar(layout: &Layout) -> Vec<u8> {
        let mut out = Vec::new();
        layout.write_tar(&mut out).unwrap();
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Same inputs → same bytes and digest; the digest survives a write/read round trip;
        /// any change of sequence or time changes the digest.
        #[test]
        fn build_is_deterministic(stack in stack_strategy(), sequence in 0u64..1_000_000, created in 0i64..4_000_000_000) {
            let first = build(&stack, &metadata(sequence, created), &[]).unwrap();
            let second = build(&stack.clone(), &metadata(sequence, created), &[]).unwrap();
            let bytes = tar(&first);
            prop_assert_eq!(&bytes, &tar(&second));
            let digest = bundle_descriptor(&first).unwrap().digest;
            let read = Layout::read_tar(std::io::Cursor::new(&bytes), &Limits::default(), None).unwrap();
            prop_assert_eq!(bundle_descriptor(&read).unwrap().digest, digest);
            let parts = read_parts(&read, &Limits::default()).unwrap();
            let (file, _) = parse_stack(&parts.stack_bytes).unwrap();
            prop_assert_eq!(file, stack.clone());
            let other = build(&stack, &metadata(sequence + 1, created), &[]).unwrap();
            prop_assert_ne!(bundle_descriptor(&other).unwrap().digest, digest);
        }
    }
}
