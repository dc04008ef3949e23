//! Container images at build time: resolving tags to digests, and copying images into the
//! bundle's layout for air-gapped sites (`--with-images`).

use crate::Failure;
use crate::cli::RegistryArgs;
use outpost_bundle_format::Digest;
use outpost_bundle_format::image_ref::ImageRef;
use outpost_bundle_format::layout::oci::{self, Descriptor, ImageIndex, ImageManifest};
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_registry_client::{Credentials, Registry, docker_config_credentials};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Registry clients by host, with credentials from flags or the docker config.
pub struct Registries<'a> {
    args: &'a RegistryArgs,
    clients: BTreeMap<String, Registry>,
}

/// The API host for an image's registry (docker.io's API lives elsewhere).
pub fn api_host(registry: &str) -> &str {
    if registry == "docker.io" {
        "registry-1.docker.io"
    } else {
        registry
    }
}

impl<'a> Registries<'a> {
    pub fn new(args: &'a RegistryArgs) -> Self {
        Registries {
            args,
            clients: BTreeMap::new(),
        }
    }

    pub fn client(&mut self, host: &str) -> Result<&Registry, Failure> {
        if !self.clients.contains_key(host) {
            let credentials = match (&self.args.username, &self.args.password) {
                (Some(username), Some(password)) => Credentials::Basic {
                    username: username.clone(),
                    password: password.clone(),
                },
                (Some(_), None) | (None, Some(_)) => {
                    return Err(Failure::usage("--username and --password go together"));
                }
                (None, None) => {
                    docker_config_credentials(host, self.args.registry_config.as_deref())
                        .map_err(Failure::usage)?
                }
            };
            let client =
                Registry::new(host, credentials, self.args.plain_http).map_err(Failure::invalid)?;
            self.clients.insert(host.to_string(), client);
        }
        self.clients
            .get(host)
            .ok_or_else(|| Failure::invalid("registry client missing"))
    }

    /// The digest a tag points to now.
    pub async fn resolve(&mut self, image: &ImageRef) -> Result<Digest, Failure> {
        let tag = image.tag().unwrap_or("latest").to_string();
        let registry = self.client(api_host(image.registry()))?;
        match registry.head_manifest(image.repository(), &tag).await {
            Ok(Some(head)) => Ok(head.digest),
            Ok(None) => Err(Failure::invalid(format!(
                "image {image}: tag not found in the registry"
            ))),
            Err(e) => Err(Failure::invalid(format!(
                "image {image}: cannot resolve the tag: {e}"
            ))),
        }
    }

    /// Copies a pinned image (manifest or index, configs, layers) into `layout`; large blobs
    /// are staged under `spool`.
    pub async fn copy_into(
        &mut self,
        image: &ImageRef,
        layout: &mut Layout,
        spool: &Path,
        progress: &crate::progress::Progress,
    ) -> Result<(), Failure> {
        let digest = image
            .digest()
            .ok_or_else(|| Failure::invalid(format!("image {image} is not pinned")))?;
        let repository = image.repository().to_string();
        let registry = self.client(api_host(image.registry()))?;
        let limits = Limits::default();
        let fail = |e: &dyn std::fmt::Display| Failure::invalid(format!("image {image}: {e}"));
        let (bytes, media_type) = registry
            .get_manifest(&repository, &digest.to_string(), limits.max_metadata_bytes)
            .await
            .map_err(|e| fail(&e))?;
        let mut descriptor = Descriptor::of(&manifest_media_type(&bytes, &media_type), &bytes);
        let mut pending = vec![(descriptor.media_type.clone(), bytes)];
        while let Some((media, bytes)) = pending.pop() {
            layout.add_blob(bytes.clone());
            let blobs: Vec<Descriptor> =
                if media == oci::MEDIA_TYPE_INDEX || media == oci::MEDIA_TYPE_DOCKER_LIST {
                    let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| fail(&e))?;
                    for child in index.manifests {
                        let (child_bytes, _) = registry
                            .get_manifest(
                                &repository,
                                &child.digest.to_string(),
                                limits.max_metadata_bytes,
                            )
                            .await
                            .map_err(|e| fail(&e))?;
                        pending.push((child.media_type, child_bytes));
                    }
                    Vec::new()
                } else {
                    let manifest: ImageManifest =
                        serde_json::from_slice(&bytes).map_err(|e| fail(&e))?;
                    std::iter::once(manifest.config)
                        .chain(manifest.layers)
                        .collect()
                };
            for blob in blobs {
                if layout.has_blob(&blob.digest) {
                    continue;
                }
                let short = &blob.digest.hex()[..12];
                let mut transfer = progress.transfer(&format!("{repository} {short}"), blob.size);
                if blob.size <= limits.max_metadata_bytes {
                    let mut content = Vec::new();
                    registry
                        .get_blob(&repository, &blob.digest, blob.size, |chunk| {
                            content.extend_from_slice(chunk);
                            transfer.advance(chunk.len() as u64);
                            Ok(())
                        })
                        .await
                        .map_err(|e| fail(&e))?;
                    layout.add_blob(content);
                } else {
                    let path = spool.join(blob.digest.hex());
                    let mut file = std::io::BufWriter::new(
                        std::fs::File::create(&path).map_err(|e| fail(&e))?,
                    );
                    let size = registry
                        .get_blob(
                            &repository,
                            &blob.digest,
                            blob.size.min(limits.max_blob_bytes),
                            |chunk| {
                                transfer.advance(chunk.len() as u64);
                                file.write_all(chunk)
                            },
                        )
                        .await
                        .map_err(|e| fail(&e))?;
                    file.flush().map_err(|e| fail(&e))?;
                    layout.add_verified_file(blob.digest, size, path);
                }
                transfer.finish();
            }
        }
        annotate_carried(&mut descriptor, image);
        let index = layout.index_mut();
        index.manifests.retain(|d| d.digest != descriptor.digest);
        index.manifests.push(descriptor);
        Ok(())
    }
}

/// The manifest's own mediaType field, else the registry's Content-Type.
fn manifest_media_type(bytes: &[u8], content_type: &str) -> String {
    serde_json::from_slice::<serde_json::Value>(bytes)
        .ok()
        .and_then(|v| {
            v.get("mediaType")
                .and_then(|m| m.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| {
            content_type
                .split(';')
                .next()
                .unwrap_or(oci::MEDIA_TYPE_MANIFEST)
                .trim()
                .to_string()
        })
}

/// The blobs of the image `digest` (a manifest, or an index of them) in `layout`, in the order
/// a registry accepts them: each manifest's config and layers, then the manifest, and the
/// index last. Manifests come with their media type.
pub fn image_blobs(
    layout: &Layout,
    digest: Digest,
    media_type: &str,
) -> Result<Vec<(Digest, Option<String>)>, Failure> {
    let limit = Limits::default().max_metadata_bytes;
    let fail = |e: &dyn std::fmt::Display| Failure::invalid(format!("image {digest}: {e}"));
    let bytes = layout.read_blob(&digest, limit).map_err(|e| fail(&e))?;
    let mut blobs = Vec::new();
    if media_type == oci::MEDIA_TYPE_INDEX || media_type == oci::MEDIA_TYPE_DOCKER_LIST {
        let index: ImageIndex = serde_json::from_slice(&bytes).map_err(|e| fail(&e))?;
        for child in index.manifests {
            for blob in image_blobs(layout, child.digest, &child.media_type)? {
                if !blobs.contains(&blob) {
                    blobs.push(blob);
                }
            }
        }
    } else {
        let manifest: ImageManifest = serde_json::from_slice(&bytes).map_err(|e| fail(&e))?;
        for blob in std::iter::once(manifest.config).chain(manifest.layers) {
            if !blobs.iter().any(|(seen, _)| *seen == blob.digest) {
                blobs.push((blob.digest, None));
            }
        }
    }
    blobs.push((digest, Some(media_type.to_string())));
    Ok(blobs)
}

/// Pushes the image `digest` from `layout` to `repository`, the top manifest under `tag` and
/// any child manifests by digest; returns the digest the registry confirmed.
pub async fn push_image(
    registry: &Registry,
    layout: &Layout,
    repository: &str,
    (digest, media_type): (Digest, &str),
    tag: &str,
    progress: &crate::progress::Progress,
) -> Result<Digest, Failure> {
    let mut pushed = digest;
    for (blob, manifest_type) in image_blobs(layout, digest, media_type)? {
        let mut content = Vec::new();
        layout
            .copy_blob(&blob, &mut content)
            .map_err(Failure::invalid)?;
        match manifest_type {
            Some(manifest_type) => {
                let reference = if blob == digest {
                    tag.to_string()
                } else {
                    blob.to_string()
                };
                pushed = registry
                    .push_manifest(repository, &reference, content, &manifest_type)
                    .await
                    .map_err(Failure::invalid)?;
            }
            None => {
                let size = content.len() as u64;
                let short = &blob.hex()[..12];
                let mut transfer = progress.transfer(&format!("{repository} {short}"), size);
                registry
                    .push_blob(repository, &blob, content)
                    .await
                    .map_err(Failure::invalid)?;
                transfer.advance(size);
                transfer.finish();
            }
        }
    }
    Ok(pushed)
}

/// Carries an image built from source in the bundle (`--with-images`), as [`Registries::copy_into`]
/// carries one from a registry: its blobs, and an index entry naming it.
pub fn carry_built(
    built: &crate::source_build::BuiltImage,
    image: &ImageRef,
    layout: &mut Layout,
) -> Result<(), Failure> {
    for (digest, _) in image_blobs(&built.layout, built.digest, &built.media_type)? {
        let size = built
            .layout
            .blob_size(&digest)
            .ok_or_else(|| Failure::invalid(format!("image {image}: blob {digest} missing")))?;
        // read_dir checked each blob file against its name.
        let path = built.dir.join("blobs/sha256").join(digest.hex());
        layout.add_verified_file(digest, size, path);
    }
    let bytes = built
        .layout
        .read_blob(&built.digest, Limits::default().max_metadata_bytes)
        .map_err(Failure::invalid)?;
    let mut descriptor = Descriptor::of(&built.media_type, &bytes);
    annotate_carried(&mut descriptor, image);
    let index = layout.index_mut();
    index.manifests.retain(|d| d.digest != descriptor.digest);
    index.manifests.push(descriptor);
    Ok(())
}

/// The index annotations that name a carried image.
fn annotate_carried(descriptor: &mut Descriptor, image: &ImageRef) {
    descriptor
        .annotations
        .insert(oci::ANNOTATION_REF_NAME.into(), image.to_string());
    descriptor.annotations.insert(
        outpost_bundle_format::bundle::ANNOTATION_IMAGE.into(),
        image.to_string(),
    );
}
