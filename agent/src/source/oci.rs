//! The registry source. An unchanged poll is one HEAD on the tag (a few hundred bytes); only a
//! new digest is fetched: the manifest by digest, its config and layers, and the signatures
//! from the OCI 1.1 referrers API when the registry has it, else from the `sha256-<hex>.sig` tag.

use super::{BoxFuture, Candidate, Ingested, Pace, Source, SourceError};
use crate::config::{OciSource as OciConfig, parse_duration};
use outpost_bundle_format::Digest;
use outpost_bundle_format::layout::LayoutError;
use outpost_bundle_format::layout::oci::{self, Descriptor, ImageIndex, ImageManifest};
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_registry_client::{
    Credentials, Reference, Registry, RegistryError, docker_config_credentials,
};

/// Layers accepted in one bundle or signature manifest.
const MAX_LAYERS: usize = 64;
/// Signature manifests (referrers) fetched per bundle: as many as a reader accepts.
use outpost_bundle_format::bundle::MAX_SIGNATURE_MANIFESTS;

/// Why a fetch failed: the registry could not be reached (retried with backoff), or what it
/// served is wrong (a rejection, recorded like any other).
enum FetchError {
    Transport(SourceError),
    Content(LayoutError),
}

impl From<SourceError> for FetchError {
    fn from(e: SourceError) -> Self {
        FetchError::Transport(e)
    }
}

pub struct OciSource {
    registry: Registry,
    reference: Reference,
    tag: String,
    pace: Pace,
    limits: Limits,
    /// The manifest digest last handed over, and whether it may improve with more signatures.
    last: Option<(Digest, bool)>,
    /// Digest of the signature tag when `last` was fetched (re-fetch when it changes).
    last_signatures: Option<Digest>,
    /// The signature tag's digest just before the candidate in flight was fetched.
    fetched_signatures: Option<Digest>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// The `Retry-After` of the last failed request, for the backoff that follows it.
    asked_to_wait: std::sync::Mutex<Option<std::time::Duration>>,
}

impl OciSource {
    /// Counts its polls in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    pub fn new(config: &OciConfig, limits: Limits) -> Result<OciSource, SourceError> {
        let reference =
            Reference::parse(&config.reference).map_err(|e| SourceError(e.to_string()))?;
        let credentials = match (&config.username, &config.password_file) {
            (Some(username), Some(file)) => Credentials::Basic {
                username: username.clone(),
                password: crate::config::read_secret("source.oci.password_file", file)
                    .map_err(SourceError)?,
            },
            _ => docker_config_credentials(&reference.host, config.credentials_file.as_deref())
                .map_err(SourceError)?,
        };
        let stall = parse_duration(&config.stall_timeout).map_err(SourceError)?;
        let registry = Registry::new(&reference.host, credentials, config.plain_http)
            .map_err(|e| SourceError(e.to_string()))?
            .with_stall_timeout(stall);
        let interval = parse_duration(&config.interval).map_err(SourceError)?;
        let tag = reference
            .reference
            .clone()
            .unwrap_or_else(|| "latest".into());
        Ok(OciSource {
            registry,
            reference,
            tag,
            pace: Pace::new(interval),
            limits,
            last: None,
            last_signatures: None,
            fetched_signatures: None,
            metrics: Default::default(),
            asked_to_wait: Default::default(),
        })
    }

    /// A failed request: retried after the backoff, or after the wait the registry asked for.
    fn failed(&self, e: RegistryError) -> SourceError {
        if let Some(asked) = e.retry_after()
            && let Ok(mut wait) = self.asked_to_wait.lock()
        {
            *wait = Some(asked);
        }
        SourceError(format!(
            "oci://{}/{}:{}: {e}",
            self.reference.host, self.reference.repository, self.tag
        ))
    }

    /// Bad content is the bundle's fault (rejected); anything else is the connection's (retried).
    fn classify(&self, e: RegistryError) -> FetchError {
        match e {
            RegistryError::DigestMismatch {
                what,
                expected,
                actual,
            } => FetchError::Content(LayoutError::DigestMismatch {
                what,
                expected,
                actual,
            }),
            RegistryError::TooLarge { what, limit } => {
                FetchError::Content(LayoutError::SizeLimit {
                    what,
                    size: limit.saturating_add(1),
                    limit,
                })
            }
            other => FetchError::Transport(self.failed(other)),
        }
    }

    async fn signature_head(&self, digest: &Digest) -> Result<Option<Digest>, SourceError> {
        Ok(self
            .registry
            .head_manifest(&self.reference.repository, &digest.signature_tag())
            .await
            .map_err(|e| self.failed(e))?
            .map(|h| h.digest))
    }

    /// Fetches the bundle manifest, its blobs and its signatures into an in-memory layout.
    async fn fetch(&self, digest: Digest) -> Result<Layout, FetchError> {
        let repository = &self.reference.repository;
        let max = self.limits.max_metadata_bytes;
        let (bytes, _) = self
            .registry
            .get_manifest(repository, &digest.to_string(), max)
            .await
            .map_err(|e| self.classify(e))?;
        let mut layout = Layout::default();
        let manifest: ImageManifest = outpost_bundle_format::json::from_slice(&bytes)
            .map_err(|e| malformed(format!("manifest {digest}"), e))?;
        let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &bytes);
        descriptor.artifact_type = manifest.artifact_type.clone();
        descriptor
            .annotations
            .insert(oci::ANNOTATION_REF_NAME.into(), self.tag.clone());
        layout.add_blob(bytes);
        layout.index_mut().manifests.push(descriptor);
        self.fetch_blobs(&manifest, &mut layout).await?;

        for signature_manifest in self.signature_manifests(&digest).await? {
            let (bytes, _) = self
                .registry
                .get_manifest(repository, &signature_manifest.to_string(), max)
                .await
                .map_err(|e| self.classify(e))?;
            let manifest: ImageManifest = outpost_bundle_format::json::from_slice(&bytes)
                .map_err(|e| malformed(format!("signature manifest {signature_manifest}"), e))?;
            self.fetch_blobs(&manifest, &mut layout).await?;
            let mut descriptor = Descriptor::of(oci::MEDIA_TYPE_MANIFEST, &bytes);
            descriptor
                .annotations
                .insert(oci::ANNOTATION_REF_NAME.into(), digest.signature_tag());
            layout.add_blob(bytes);
            layout.index_mut().manifests.push(descriptor);
        }
        Ok(layout)
    }

    /// Signature manifests: referrers carrying cosign simple-signing layers, else the tag.
    async fn signature_manifests(&self, digest: &Digest) -> Result<Vec<Digest>, SourceError> {
        let repository = &self.reference.repository;
        let mut found = Vec::new();
        // OCI 1.1 referrers; registries without the API answer 404 (distribution 2.8 does).
        let referrers = self
            .registry
            .get_referrers(repository, digest, self.limits.max_metadata_bytes)
            .await
            .map_err(|e| self.failed(e))?;
        if let Some(bytes) = referrers
            && let Ok(index) = serde_json::from_slice::<ImageIndex>(&bytes)
        {
            for referrer in index.manifests {
                if referrer
                    .artifact_type
                    .as_deref()
                    .is_some_and(|t| t.contains("cosign") || t.contains("simplesigning"))
                {
                    found.push(referrer.digest);
                }
            }
        }
        if found.is_empty()
            && let Some(tagged) = self.signature_head(digest).await?
        {
            found.push(tagged);
        }
        // Anyone who can push may add referrers; each is looked at once, and only so many.
        found.sort();
        found.dedup();
        found.truncate(MAX_SIGNATURE_MANIFESTS);
        Ok(found)
    }

    async fn fetch_blobs(
        &self,
        manifest: &ImageManifest,
        layout: &mut Layout,
    ) -> Result<(), FetchError> {
        // A bundle or signature manifest is a handful of small blobs; bound the whole download.
        let declared: u64 = std::iter::once(&manifest.config)
            .chain(&manifest.layers)
            .map(|b| b.size)
            .fold(0, u64::saturating_add);
        if manifest.layers.len() > MAX_LAYERS || declared > self.limits.max_total_bytes {
            return Err(FetchError::Content(LayoutError::SizeLimit {
                what: format!("a manifest with {} layers", manifest.layers.len()),
                size: declared,
                limit: self.limits.max_total_bytes,
            }));
        }
        self.metrics.download_started(
            &format!("{}/{}", self.reference.host, self.reference.repository),
            declared,
        );
        let fetched = self.fetch_each(manifest, layout).await;
        self.metrics.download_finished();
        fetched
    }

    async fn fetch_each(
        &self,
        manifest: &ImageManifest,
        layout: &mut Layout,
    ) -> Result<(), FetchError> {
        for blob in std::iter::once(&manifest.config).chain(&manifest.layers) {
            if layout.has_blob(&blob.digest) {
                continue;
            }
            if blob.size > self.limits.max_metadata_bytes {
                return Err(FetchError::Content(LayoutError::SizeLimit {
                    what: format!("blob {}", blob.digest),
                    size: blob.size,
                    limit: self.limits.max_metadata_bytes,
                }));
            }
            let mut content = Vec::with_capacity(blob.size as usize);
            self.registry
                .get_blob(
                    &self.reference.repository,
                    &blob.digest,
                    blob.size,
                    |chunk| {
                        content.extend_from_slice(chunk);
                        self.metrics.download_advanced(chunk.len() as u64);
                        Ok(())
                    },
                )
                .await
                .map_err(|e| self.classify(e))?;
            layout.add_blob(content);
        }
        Ok(())
    }

    /// One poll: a HEAD of the tag, and a fetch when it names something new.
    async fn poll_once(&mut self) -> Result<Option<Candidate>, SourceError> {
        let head = self
            .registry
            .head_manifest(&self.reference.repository, &self.tag)
            .await
            .map_err(|e| self.failed(e))?;
        // Nothing published yet: keep polling at the interval, not with backoff.
        let Some(head) = head else { return Ok(None) };
        let changed = match self.last {
            Some((digest, _)) if digest != head.digest => true,
            None => true,
            // Same digest: only worth another look if more signatures may have arrived.
            Some((_, wants_signatures)) => {
                wants_signatures && self.signature_head(&head.digest).await? != self.last_signatures
            }
        };
        if !changed {
            return Ok(None);
        }
        // The signature tag as it was before the fetch: a signature pushed while this
        // candidate is fetched or judged changes it, so the release is looked at again.
        self.fetched_signatures = self.signature_head(&head.digest).await?;
        let layout = match self.fetch(head.digest).await {
            Ok(layout) => Ok(layout),
            Err(FetchError::Content(e)) => Err(e),
            Err(FetchError::Transport(e)) => return Err(e),
        };
        Ok(Some(Candidate {
            digest: Some(head.digest),
            origin: format!(
                "oci://{}/{}@{}",
                self.reference.host, self.reference.repository, head.digest
            ),
            layout,
            spool: None,
            key: head.digest.to_string(),
            reading: None,
            file: None,
        }))
    }
}

impl Source for OciSource {
    fn describe(&self) -> String {
        format!(
            "oci {}/{}:{}",
            self.reference.host, self.reference.repository, self.tag
        )
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Candidate, SourceError>> {
        Box::pin(async move {
            loop {
                self.pace.wait().await;
                let started = std::time::Instant::now();
                let polled = self.poll_once().await;
                self.metrics.poll(polled.is_ok(), started);
                if let Some(candidate) = polled? {
                    return Ok(candidate);
                }
            }
        })
    }

    fn retry_delay(&mut self, failures: u32) -> std::time::Duration {
        let asked = self.asked_to_wait.lock().ok().and_then(|mut w| w.take());
        self.pace.after_failure(failures, asked)
    }

    fn settle(&mut self, candidate: Candidate, outcome: &Ingested) -> BoxFuture<'_, ()> {
        let wants_signatures = outcome.wants_more_signatures();
        Box::pin(async move {
            if let Some(digest) = candidate.digest {
                self.last = Some((digest, wants_signatures));
                self.last_signatures = if wants_signatures {
                    self.fetched_signatures.take()
                } else {
                    None
                };
            }
        })
    }
}

fn malformed(what: String, e: impl std::fmt::Display) -> FetchError {
    FetchError::Content(LayoutError::Malformed {
        what,
        reason: e.to_string(),
    })
}
