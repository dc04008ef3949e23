//! Bundles made through the library, good and hostile: the test vectors and the agent's attack
//! suite are built from these. Keys are the test keys in testdata/keys (password `test`).

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use crate::testdata;
use chrono::{TimeZone, Utc};
use outpost_bundle_format::Digest;
use outpost_bundle_format::bundle;
use outpost_bundle_format::crypto::SigningKey;
use outpost_bundle_format::layout::Layout;
use outpost_bundle_format::layout::oci::{self, Descriptor};
use outpost_bundle_format::release::{FORMAT_VERSION, ReleaseMetadata};
use outpost_bundle_format::stack::{Stack, StackFile};

pub fn key(name: &str) -> SigningKey {
    let pem = std::fs::read(testdata().join("keys").join(format!("{name}.key"))).unwrap();
    SigningKey::from_encrypted_pem(&pem, b"test").unwrap()
}

/// The quick-start stack (`acme`), renamed when `name` differs.
pub fn stack(name: &str) -> StackFile {
    let text = std::fs::read_to_string(testdata().join("stacks/valid/quickstart.yaml")).unwrap();
    let text = text.replacen("name: acme", &format!("name: {name}"), 1);
    Stack::from_yaml(&text).unwrap().0
}

pub fn quickstart() -> StackFile {
    stack("acme")
}

/// Release metadata for stack `acme`, channel `stable`, created 2026-01-01, expiring in 2099.
pub fn metadata(version: &str, sequence: u64) -> ReleaseMetadata {
    ReleaseMetadata {
        format_version: FORMAT_VERSION,
        name: "acme".into(),
        version: semver::Version::parse(version).unwrap(),
        sequence,
        channel: "stable".into(),
        created: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        expires: Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap(),
        irreversible: Vec::new(),
    }
}

/// Trust roots: v1 trusts vendor-a; v2 trusts vendor-b, unsigned (sign it with `root::sign_root`).
pub fn roots() -> (Vec<u8>, Vec<u8>) {
    use outpost_bundle_format::root;
    let expires = Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap();
    let v1 = root::sign_root(
        &root::new_root(1, expires, 1, &[key("vendor-a").public_key().clone()]).unwrap(),
        &key("vendor-a"),
    )
    .unwrap();
    let v2_unsigned =
        root::new_root(2, expires, 1, &[key("vendor-b").public_key().clone()]).unwrap();
    (v1, v2_unsigned)
}

/// Root v2 signed by both vendor-a (v1's key) and vendor-b (its own): a valid rotation.
pub fn rotated_root(v2_unsigned: &[u8]) -> Vec<u8> {
    use outpost_bundle_format::root::sign_root;
    sign_root(
        &sign_root(v2_unsigned, &key("vendor-a")).unwrap(),
        &key("vendor-b"),
    )
    .unwrap()
}

/// An unsigned quick-start release.
pub fn release(version: &str, sequence: u64) -> Layout {
    bundle::build(&quickstart(), &metadata(version, sequence), &[]).unwrap()
}

pub fn signed(mut layout: Layout, keys: &[&str]) -> Layout {
    for name in keys {
        bundle::add_signature(&mut layout, &key(name), "acme").unwrap();
    }
    layout
}

pub fn tar(layout: &Layout) -> Vec<u8> {
    let mut out = Vec::new();
    layout.write_tar(&mut out).unwrap();
    out
}

pub fn digest(layout: &Layout) -> Digest {
    bundle::bundle_descriptor(layout).unwrap().digest
}

/// Replaces the bundle manifest by `edit(manifest)`, fixing the index (as an attacker would).
pub fn edit_manifest(layout: &mut Layout, edit: impl FnOnce(&mut serde_json::Value)) -> Digest {
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

/// A release whose stack layer is replaced by `stack_json` (built around the builder's checks).
pub fn with_stack(stack_json: Vec<u8>, version: &str, sequence: u64) -> Layout {
    let mut layout = release(version, sequence);
    let layer = Descriptor::of(bundle::MEDIA_TYPE_STACK, &stack_json);
    layout.add_blob(stack_json);
    edit_manifest(&mut layout, |m| {
        m["layers"][0] = serde_json::to_value(&layer).unwrap()
    });
    layout
}

/// `layout` with a provenance statement layer added after its stack (and roots).
pub fn with_provenance(mut layout: Layout, statement: Vec<u8>) -> Layout {
    use outpost_bundle_format::provenance::MEDIA_TYPE_STATEMENT;
    let layer = Descriptor::of(MEDIA_TYPE_STATEMENT, &statement);
    layout.add_blob(statement);
    edit_manifest(&mut layout, |m| {
        m["layers"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::to_value(&layer).unwrap())
    });
    layout
}

/// A release naming its first image by tag only.
pub fn unpinned(version: &str, sequence: u64) -> Layout {
    let mut stack = serde_json::to_value(quickstart()).unwrap();
    stack["resources"][0]["container"]["code"]["image"] = "ghcr.io/acme/api:1.0".into();
    with_stack(serde_json::to_vec(&stack).unwrap(), version, sequence)
}

/// `target` carrying the signature manifest of `donor`, tagged for `target`'s digest.
pub fn move_signature(donor: &Layout, mut target: Layout) -> Layout {
    let (donor_digest, target_digest) = (digest(donor), digest(&target));
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
    let mut moved = sig;
    moved.annotations.insert(
        oci::ANNOTATION_REF_NAME.into(),
        target_digest.signature_tag(),
    );
    target.index_mut().manifests.push(moved);
    target
}

/// The tar of `layout` with one byte of its stack changed, names and sizes unchanged.
pub fn tampered_tar(layout: &Layout) -> Vec<u8> {
    let mut bytes = tar(layout);
    let parts = bundle::read_parts(layout, &Default::default()).unwrap();
    let stack_json = parts.stack_bytes;
    let at = bytes
        .windows(stack_json.len())
        .position(|w| w == stack_json.as_slice())
        .unwrap();
    let offset = at + stack_json.windows(4).position(|w| w == b"1Gi\"").unwrap();
    bytes[offset] = b'9';
    bytes
}

#[derive(Clone, Copy)]
pub enum EntryKind {
    File,
    Symlink,
    Hardlink,
    Directory,
}

/// A tar with hostile entries (paths the tar crate's builder refuses to write).
pub fn raw_tar(entries: &[(&str, EntryKind, &[u8], Option<&str>)]) -> Vec<u8> {
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
            EntryKind::File => b'0',
            EntryKind::Symlink => b'2',
            EntryKind::Hardlink => b'1',
            EntryKind::Directory => b'5',
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

/// A layout tar written entry by entry (`oci-layout`, `index.json`, then `blobs`), for layouts
/// the library would refuse to write (an index listing one manifest twice).
pub fn layout_tar(index: &[u8], blobs: &[&[u8]]) -> Vec<u8> {
    layout_tar_with(index, &[], blobs)
}

/// [`layout_tar`] with `extra` entries between `index.json` and the blobs.
fn layout_tar_with(
    index: &[u8],
    extra: &[(&str, EntryKind, &[u8], Option<&str>)],
    blobs: &[&[u8]],
) -> Vec<u8> {
    let names: Vec<String> = blobs
        .iter()
        .map(|b| format!("blobs/sha256/{}", Digest::of(b).hex()))
        .collect();
    let mut entries: Vec<(&str, EntryKind, &[u8], Option<&str>)> = vec![
        (
            "oci-layout",
            EntryKind::File,
            oci::LAYOUT_FILE_CONTENT,
            None,
        ),
        ("index.json", EntryKind::File, index, None),
    ];
    entries.extend_from_slice(extra);
    entries.extend(
        names
            .iter()
            .zip(blobs)
            .map(|(name, blob)| (name.as_str(), EntryKind::File, *blob, None)),
    );
    raw_tar(&entries)
}

/// `layout`'s index and every blob it holds, as `(index entries, blobs)` to rearrange.
fn parts_of(layout: &Layout) -> (Vec<Descriptor>, Vec<Vec<u8>>) {
    let blobs = layout
        .reachable(&Default::default())
        .unwrap()
        .iter()
        .map(|d| layout.read_blob(d, 1 << 30).unwrap())
        .collect();
    (layout.index().manifests.clone(), blobs)
}

fn index_json(manifests: Vec<Descriptor>) -> Vec<u8> {
    serde_json::to_vec(&oci::ImageIndex::new(manifests)).unwrap()
}

/// The review's signature amplification, at `copies`: the index names the bundle's signature
/// manifest `copies` times, and that manifest lists its signature layer `copies` times.
pub fn signature_amplification(layout: &Layout, copies: usize) -> Vec<u8> {
    let (mut manifests, mut blobs) = parts_of(layout);
    let tag = digest(layout).signature_tag();
    let sig = manifests
        .iter()
        .position(|d| d.ref_name() == Some(tag.as_str()))
        .unwrap();
    let sig_bytes = layout.read_blob(&manifests[sig].digest, 1 << 20).unwrap();
    let mut sig_manifest: serde_json::Value = serde_json::from_slice(&sig_bytes).unwrap();
    let layer = sig_manifest["layers"][0].clone();
    sig_manifest["layers"] = serde_json::Value::Array(vec![layer; copies]);
    let amplified = serde_json::to_vec(&sig_manifest).unwrap();
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &amplified);
    descriptor.annotations = manifests[sig].annotations.clone();
    manifests.remove(sig);
    manifests.extend(std::iter::repeat_n(descriptor, copies));
    blobs.push(amplified);
    let index = index_json(manifests);
    layout_tar(&index, &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

/// The review's re-parse shape: `copies` index entries naming one large manifest that is not a
/// bundle (`filler` layer descriptors long), beside the genuine bundle.
pub fn reparse_amplification(layout: &Layout, copies: usize, filler: usize) -> Vec<u8> {
    let (mut manifests, mut blobs) = parts_of(layout);
    let config = b"{}".to_vec();
    let layer = Descriptor::of("application/octet-stream", &config);
    let big = oci::ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::of(oci::MEDIA_TYPE_IMAGE_CONFIG, &config),
        layers: vec![layer; filler],
        subject: None,
        annotations: Default::default(),
    };
    let big = oci::to_bytes(&big);
    let descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &big);
    manifests.extend(std::iter::repeat_n(descriptor, copies));
    blobs.push(big);
    blobs.push(config);
    let index = index_json(manifests);
    layout_tar(&index, &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

/// `layout` with `manifests` distinct signature manifests of `layers` distinct layers each
/// (payloads that differ in `optional`), all under the bundle's signature tag.
pub fn many_signatures(layout: &Layout, manifests: usize, layers: usize) -> Vec<u8> {
    let (mut index, mut blobs) = parts_of(layout);
    let bundle = digest(layout);
    let tag = bundle.signature_tag();
    index.retain(|d| d.ref_name() != Some(tag.as_str()));
    for m in 0..manifests {
        let mut descriptors = Vec::new();
        for l in 0..layers {
            let payload = format!(
                r#"{{"critical":{{"identity":{{"docker-reference":"acme"}},"image":{{"docker-manifest-digest":"{bundle}"}},"type":"cosign container image signature"}},"optional":{{"n":"{m}-{l}"}}}}"#
            )
            .into_bytes();
            descriptors.push(outpost_bundle_format::signature::signature_layer(
                &payload, b"0",
            ));
            blobs.push(payload);
        }
        let (manifest, config) = outpost_bundle_format::signature::signature_manifest(descriptors);
        let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &manifest);
        descriptor
            .annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), tag.clone());
        index.push(descriptor);
        blobs.push(manifest);
        blobs.push(config);
    }
    blobs.sort();
    blobs.dedup();
    layout_tar(
        &index_json(index),
        &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    )
}

/// A tar of `layout` whose `blobs/` directory entry carries `size` bytes of data.
pub fn directory_with_data(layout: &Layout, size: usize) -> Vec<u8> {
    let (index, blobs) = parts_of(layout);
    let data = vec![0u8; size];
    layout_tar_with(
        &index_json(index),
        &[("blobs/", EntryKind::Directory, &data, None)],
        &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    )
}

/// A release whose signed metadata is `json` (e.g. with a member given twice).
pub fn with_metadata_json(json: &str) -> Layout {
    let mut layout = release("9.9.9", 99);
    let bytes = json.as_bytes().to_vec();
    let config = Descriptor::of(bundle::MEDIA_TYPE_RELEASE, &bytes);
    layout.add_blob(bytes);
    edit_manifest(&mut layout, |m| {
        m["config"] = serde_json::to_value(&config).unwrap()
    });
    layout
}

/// `layout` signed by `keys` over a payload of the caller's spelling (the library would refuse
/// to attach one with duplicate members).
pub fn signed_payload(mut layout: Layout, payload: &str, keys: &[&str]) -> Layout {
    let tag = digest(&layout).signature_tag();
    let payload = payload.as_bytes().to_vec();
    let layers = keys
        .iter()
        .map(|name| {
            let signature = key(name).sign(&payload).unwrap();
            outpost_bundle_format::signature::signature_layer(&payload, &signature)
        })
        .collect();
    let (manifest, config) = outpost_bundle_format::signature::signature_manifest(layers);
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &manifest);
    descriptor
        .annotations
        .insert(oci::ANNOTATION_REF_NAME.into(), tag.clone());
    let index = layout.index_mut();
    index
        .manifests
        .retain(|d| d.ref_name() != Some(tag.as_str()));
    index.manifests.push(descriptor);
    for blob in [payload, manifest, config] {
        layout.add_blob(blob);
    }
    layout
}

/// `layout` signed by `keys` the way any tool can, without the library's check that the content
/// is valid (which `bundle::add_signature` makes): for signed content a reader must refuse.
pub fn signed_unchecked(layout: Layout, keys: &[&str]) -> Layout {
    let payload = outpost_bundle_format::signature::payload("acme", &digest(&layout));
    signed_payload(layout, std::str::from_utf8(&payload).unwrap(), keys)
}

pub fn garbage() -> Vec<u8> {
    (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect()
}

/// One hostile bundle and the check that must refuse it.
pub struct Attack {
    pub name: &'static str,
    pub layout: Option<Layout>,
    /// The file form (tar); for tar-level attacks there is no layout.
    pub tar: Vec<u8>,
    pub check: &'static str,
}

/// The attack suite against an agent trusting vendor-a and vendor-b with threshold 2 for stack
/// `acme` on `stable`, whose highest accepted sequence is below `next`; `replay` is an older,
/// once-accepted release. Tar-level attacks have no layout (they cannot travel through a
/// registry, which checks digests itself).
pub fn attacks(next: u64, replay: &Layout) -> Vec<Attack> {
    let version = |n: u64| format!("9.{n}.0");
    let both = ["vendor-a", "vendor-b"];
    let with_layout = |name, layout: Layout, check| Attack {
        name,
        tar: tar(&layout),
        layout: Some(layout),
        check,
    };
    let tar_only = |name, tar: Vec<u8>, check| Attack {
        name,
        layout: None,
        tar,
        check,
    };
    let mut expired = metadata(&version(next), next);
    expired.created = Utc.with_ymd_and_hms(2020, 1, 1, 0, 0, 0).unwrap();
    expired.expires = Utc.with_ymd_and_hms(2020, 6, 1, 0, 0, 0).unwrap();
    let mut wrong_stack = metadata(&version(next), next);
    wrong_stack.name = "other".into();
    let mut wrong_channel = metadata(&version(next), next);
    wrong_channel.channel = "beta".into();
    let donor = signed(release("1.0.0", 1), &both);
    let blob = b"x";
    let blob_name = format!("blobs/sha256/{}", Digest::of(blob).hex());
    let valid_tar = tar(&signed(release(&version(next), next), &both));
    vec![
        tar_only(
            "tampered",
            tampered_tar(&signed(release(&version(next), next), &both)),
            "digest-mismatch",
        ),
        with_layout("unsigned", release(&version(next), next), "unsigned"),
        with_layout(
            "wrong-key",
            signed(release(&version(next), next), &["vendor-c"]),
            "untrusted-signature",
        ),
        with_layout(
            "below-threshold",
            signed(release(&version(next), next), &["vendor-a"]),
            "threshold-unmet",
        ),
        with_layout(
            "same-key-twice",
            signed(release(&version(next), next), &["vendor-a", "vendor-a"]),
            "threshold-unmet",
        ),
        with_layout(
            "signature-from-another-bundle",
            move_signature(&donor, release(&version(next), next)),
            "signature-mismatch",
        ),
        with_layout(
            "wrong-stack",
            signed(
                bundle::build(&stack("other"), &wrong_stack, &[]).unwrap(),
                &both,
            ),
            "wrong-stack",
        ),
        with_layout(
            "wrong-channel",
            signed(
                bundle::build(&quickstart(), &wrong_channel, &[]).unwrap(),
                &both,
            ),
            "wrong-channel",
        ),
        with_layout(
            "expired",
            signed(bundle::build(&quickstart(), &expired, &[]).unwrap(), &both),
            "expired",
        ),
        with_layout("replayed-older-sequence", replay.clone(), "rollback"),
        with_layout(
            "unpinned-image",
            signed_unchecked(unpinned(&version(next), next), &both),
            "unpinned-image",
        ),
        tar_only(
            "tar-path-traversal",
            raw_tar(&[("../../../tmp/outpost-escape", EntryKind::File, blob, None)]),
            "unsafe-path",
        ),
        tar_only(
            "tar-absolute-path",
            raw_tar(&[("/tmp/outpost-escape", EntryKind::File, blob, None)]),
            "unsafe-path",
        ),
        tar_only(
            "tar-symlink",
            raw_tar(&[(&blob_name, EntryKind::Symlink, b"", Some("/etc/passwd"))]),
            "unsafe-path",
        ),
        tar_only(
            "tar-hardlink",
            raw_tar(&[(&blob_name, EntryKind::Hardlink, b"", Some("/etc/shadow"))]),
            "unsafe-path",
        ),
        tar_only(
            "truncated",
            valid_tar[..valid_tar.len() / 2].to_vec(),
            "malformed",
        ),
        tar_only("garbage", garbage(), "malformed"),
        // Outsiders, no key needed (the outside review of issue 10, by class).
        tar_only(
            "signature-amplification",
            signature_amplification(&signed(release(&version(next), next), &both), 64),
            "malformed",
        ),
        tar_only(
            "reparse-amplification",
            reparse_amplification(&signed(release(&version(next), next), &both), 64, 64),
            "malformed",
        ),
        tar_only(
            "too-many-signature-manifests",
            many_signatures(&release(&version(next), next), 17, 1),
            "size-limit",
        ),
        tar_only(
            "too-many-signature-layers",
            many_signatures(&release(&version(next), next), 2, 129),
            "size-limit",
        ),
        tar_only(
            "directory-with-data",
            directory_with_data(&signed(release(&version(next), next), &both), 4096),
            "malformed",
        ),
        tar_only(
            "second-descriptor-lies-about-size",
            lying_second_descriptor(&signed(release(&version(next), next), &both)),
            "malformed",
        ),
        // Signed by trusted keys, and still refused.
        tar_only(
            "duplicate-sequence-in-metadata",
            tar(&signed_unchecked(
                with_metadata_json(&format!(
                    r#"{{"formatVersion":1,"name":"acme","version":"{}","sequence":{next},"sequence":18446744073709551615,"channel":"stable","created":"2026-01-01T00:00:00Z","expires":"2099-01-01T00:00:00Z"}}"#,
                    version(next)
                )),
                &both,
            )),
            "metadata",
        ),
        tar_only(
            "duplicate-channel-in-metadata",
            tar(&signed_unchecked(
                with_metadata_json(&format!(
                    r#"{{"formatVersion":1,"name":"acme","version":"{}","sequence":{next},"channel":"beta","channel":"stable","created":"2026-01-01T00:00:00Z","expires":"2099-01-01T00:00:00Z"}}"#,
                    version(next)
                )),
                &both,
            )),
            "metadata",
        ),
        tar_only(
            "duplicate-digest-in-payload",
            {
                let target = release(&version(next), next);
                let innocent = digest(&release("0.0.1", 1));
                let payload = format!(
                    r#"{{"critical":{{"identity":{{"docker-reference":"acme"}},"image":{{"docker-manifest-digest":"{innocent}","docker-manifest-digest":"{}"}},"type":"cosign container image signature"}},"optional":null}}"#,
                    digest(&target)
                );
                tar(&signed_payload(target, &payload, &both))
            },
            "malformed",
        ),
    ]
}

/// `layout` whose signature manifest names the stack blob again with a size that lies (the
/// first descriptor of that digest, in the bundle manifest, tells the truth).
pub fn lying_second_descriptor(layout: &Layout) -> Vec<u8> {
    let (mut index, mut blobs) = parts_of(layout);
    let parts = bundle::read_parts(layout, &Default::default()).unwrap();
    let stack = parts.manifest.layers[0].clone();
    let tag = parts.digest.signature_tag();
    let sig = index
        .iter()
        .position(|d| d.ref_name() == Some(tag.as_str()))
        .unwrap();
    let sig_bytes = layout.read_blob(&index[sig].digest, 1 << 20).unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&sig_bytes).unwrap();
    let mut lying = serde_json::to_value(&stack).unwrap();
    lying["size"] = (stack.size + 1000).into();
    manifest["layers"].as_array_mut().unwrap().push(lying);
    let bytes = serde_json::to_vec(&manifest).unwrap();
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &bytes);
    descriptor.annotations = index[sig].annotations.clone();
    index[sig] = descriptor;
    blobs.push(bytes);
    layout_tar(
        &index_json(index),
        &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>(),
    )
}

/// Adds a single-layer container image to `layout` under `ref_name`; returns its manifest digest.
pub fn add_image(layout: &mut Layout, config: Vec<u8>, layer: Vec<u8>, ref_name: &str) -> Digest {
    let manifest = oci::ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::of(oci::MEDIA_TYPE_IMAGE_CONFIG, &config),
        layers: vec![Descriptor::of(
            "application/vnd.oci.image.layer.v1.tar",
            &layer,
        )],
        subject: None,
        annotations: Default::default(),
    };
    let bytes = oci::to_bytes(&manifest);
    let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &bytes);
    descriptor
        .annotations
        .insert(oci::ANNOTATION_REF_NAME.into(), ref_name.into());
    layout.add_blob(config);
    layout.add_blob(layer);
    layout.index_mut().manifests.push(descriptor);
    layout.add_blob(bytes)
}

/// `layout` carrying one container image with a `size`-byte layer, as `build --with-images`
/// makes for air-gapped sites (big enough that reading it takes a while).
pub fn with_image(mut layout: Layout, size: usize) -> Layout {
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let layer: Vec<u8> = (0..size)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#
            .to_vec();
    let api =
        "ghcr.io/acme/api@sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    add_image(&mut layout, config, layer, api);
    layout
}
