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
fn api_host(registry: &str) -> &str {
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
        descriptor
            .annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), image.to_string());
        descriptor.annotations.insert(
            outpost_bundle_format::bundle::ANNOTATION_IMAGE.into(),
            image.to_string(),
        );
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
