//! Carried images: the images an air-gapped bundle brings (`--with-images`), kept as engine
//! archives that the container-engine runtime loads instead of pulling (and that VM nodes
//! fetch from the agent).

use outpost_bundle_format::Layout;
use outpost_bundle_format::bundle::ANNOTATION_IMAGE;
use outpost_bundle_format::image_ref::ImageRef;
use outpost_bundle_format::layout::oci::ImageManifest;
use serde_json::{Value, json};
use std::io::Write;
use std::path::Path;

/// Keeps the images an air-gapped bundle carries (`--with-images`) in `dir`, one
/// `docker save`-style archive per image (`<manifest hex>.tar`, then `<manifest hex>.id` holding
/// the image ID, written last: its presence means the archive is complete). The runtime loads
/// them instead of pulling. Blobs were verified with the bundle; nothing here is trusted anew.
pub fn keep_bundled_images(layout: &Layout, dir: &Path) -> anyhow::Result<usize> {
    use anyhow::Context;
    let mut kept = 0;
    for descriptor in &layout.index().manifests {
        let Some(reference) = descriptor.annotations.get(ANNOTATION_IMAGE) else {
            continue;
        };
        let hex = descriptor.digest.hex();
        let id_file = dir.join(format!("{hex}.id"));
        if id_file.exists() {
            continue;
        }
        std::fs::create_dir_all(dir).with_context(|| dir.display().to_string())?;
        let manifest = platform_manifest(layout, &descriptor.digest)
            .with_context(|| format!("bundled image {reference}"))?;
        let config = layout.read_blob(&manifest.config.digest, 16 << 20)?;
        let repository = ImageRef::parse(reference)
            .ok()
            .and_then(|r| r.repository().rsplit('/').next().map(str::to_string))
            .unwrap_or_else(|| "image".into());
        let archive_manifest = json!([{
            "Config": format!("{}.json", manifest.config.digest.hex()),
            "RepoTags": [format!("outpost-bundled/{repository}:{}", &hex[..16])],
            "Layers": manifest.layers.iter().map(|l| format!("{}.tar", l.digest.hex())).collect::<Vec<_>>(),
        }]);
        let manifest_bytes = serde_json::to_vec(&archive_manifest)?;
        let archive = dir.join(format!("{hex}.tar"));
        outpost_bundle_format::layout::write_atomic_with(&archive, |out| -> anyhow::Result<()> {
            tar_entry(out, "manifest.json", manifest_bytes.len() as u64, |w| {
                w.write_all(&manifest_bytes).map_err(Into::into)
            })?;
            tar_entry(
                out,
                &format!("{}.json", manifest.config.digest.hex()),
                config.len() as u64,
                |w| w.write_all(&config).map_err(Into::into),
            )?;
            for layer in &manifest.layers {
                let size = layout.blob_size(&layer.digest).with_context(|| {
                    format!("bundled image {reference}: layer {} missing", layer.digest)
                })?;
                tar_entry(out, &format!("{}.tar", layer.digest.hex()), size, |w| {
                    layout
                        .copy_blob(&layer.digest, w)
                        .map(|_| ())
                        .map_err(Into::into)
                })?;
            }
            out.write_all(&[0u8; 1024])?;
            Ok(())
        })
        .with_context(|| archive.display().to_string())?;
        outpost_bundle_format::layout::write_atomic(
            &id_file,
            format!("sha256:{}", manifest.config.digest.hex()).as_bytes(),
        )?;
        std::fs::File::open(dir)?.sync_all()?;
        kept += 1;
    }
    Ok(kept)
}

/// The image manifest at `digest`; for a multi-platform index, the entry for this host's
/// platform (linux and this CPU).
fn platform_manifest(
    layout: &Layout,
    digest: &outpost_bundle_format::Digest,
) -> anyhow::Result<ImageManifest> {
    let top: Value = serde_json::from_slice(&layout.read_blob(digest, 4 << 20)?)?;
    let Some(entries) = top.get("manifests").and_then(Value::as_array) else {
        return Ok(serde_json::from_value(top)?);
    };
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    };
    let entry = entries
        .iter()
        .find(|e| e["platform"]["os"] == "linux" && e["platform"]["architecture"] == arch)
        .ok_or_else(|| anyhow::anyhow!("the image index has no linux/{arch} manifest"))?;
    let child = entry["digest"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("an index entry has no digest"))?;
    let child = outpost_bundle_format::Digest::parse(child)?;
    Ok(serde_json::from_slice(&layout.read_blob(&child, 4 << 20)?)?)
}

/// Removes kept image archives whose manifest digest is not in `in_use` (hex). Best effort: a
/// leftover archive only costs disk.
pub fn prune_bundled_images(dir: &Path, in_use: &std::collections::BTreeSet<String>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let hex = name
            .strip_suffix(".tar")
            .or_else(|| name.strip_suffix(".id"))
            .unwrap_or_default();
        if !hex.is_empty() && !hex.starts_with('.') && !in_use.contains(hex) {
            // The .id goes first: without it the archive is never trusted as complete.
            let _ = std::fs::remove_file(dir.join(format!("{hex}.id")));
            let _ = std::fs::remove_file(dir.join(format!("{hex}.tar")));
        }
    }
}

/// One regular-file tar entry: header, `size` bytes from `write`, padding.
fn tar_entry(
    out: &mut dyn Write,
    name: &str,
    size: u64,
    write: impl FnOnce(&mut dyn Write) -> anyhow::Result<()>,
) -> anyhow::Result<()> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    out.write_all(header.as_bytes())?;
    write(out)?;
    let padding = (512 - size % 512) % 512;
    out.write_all(&vec![0u8; padding as usize])?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_bundle_format::layout::oci::{self, Descriptor};

    /// A layout carrying one image as a two-platform index (arm64 first).
    fn carried_index() -> (Layout, String, String) {
        let mut layout = Layout::default();
        let mut platform_manifest = |arch: &str| {
            let config = format!(r#"{{"architecture":"{arch}","os":"linux"}}"#).into_bytes();
            let layer = format!("layer for {arch}").into_bytes();
            let config_digest = layout.add_blob(config.clone());
            layout.add_blob(layer.clone());
            let manifest = json!({
                "schemaVersion": 2,
                "mediaType": oci::MEDIA_TYPE_MANIFEST,
                "config": Descriptor::of("application/vnd.oci.image.config.v1+json", &config),
                "layers": [Descriptor::of("application/vnd.oci.image.layer.v1.tar+gzip", &layer)],
            });
            let bytes = serde_json::to_vec(&manifest).unwrap();
            layout.add_blob(bytes.clone());
            let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &bytes);
            descriptor.platform = Some(json!({"os": "linux", "architecture": arch}));
            (descriptor, config_digest)
        };
        let (arm, _) = platform_manifest("arm64");
        let (amd, amd_config) = platform_manifest("amd64");
        let index = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": oci::MEDIA_TYPE_INDEX,
            "manifests": [arm, amd],
        }))
        .unwrap();
        layout.add_blob(index.clone());
        let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_INDEX, &index);
        let hex = descriptor.digest.hex();
        descriptor.annotations.insert(
            ANNOTATION_IMAGE.into(),
            format!("r.example/app@sha256:{hex}"),
        );
        layout.index_mut().manifests.push(descriptor);
        (layout, hex, amd_config.to_string())
    }

    #[test]
    fn carried_images_are_kept_for_this_platform_and_pruned_when_unused() {
        if std::env::consts::ARCH != "x86_64" {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let (layout, hex, amd_config) = carried_index();
        assert_eq!(keep_bundled_images(&layout, dir.path()).unwrap(), 1);
        assert_eq!(
            std::fs::read_to_string(dir.path().join(format!("{hex}.id"))).unwrap(),
            amd_config
        );
        let archive = std::fs::read(dir.path().join(format!("{hex}.tar"))).unwrap();
        let mut tar = tar::Archive::new(&archive[..]);
        let names: Vec<String> = tar
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().display().to_string())
            .collect();
        assert_eq!(
            names.len(),
            3,
            "manifest.json, config, one layer: {names:?}"
        );
        assert_eq!(names[0], "manifest.json");
        // Kept once: a second acceptance of the same image writes nothing.
        assert_eq!(keep_bundled_images(&layout, dir.path()).unwrap(), 0);
        prune_bundled_images(dir.path(), &[hex.clone()].into());
        assert!(dir.path().join(format!("{hex}.tar")).exists());
        prune_bundled_images(dir.path(), &Default::default());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
