//! Carried images on VM pools. A bundle built `--with-images` brings its images to an
//! air-gapped site; the agent keeps each as an engine archive (as for a host's engine), and
//! machines fetch the archives of their release from the agent over the node protocol, each
//! checked against the SHA-256 and size the assignment names, so a VPC without a registry or
//! internet access still runs the release.

use outpost_bundle_format::stack::Stack;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// One carried image a machine needs: fetched from `GET /v1/images/{digest}.tar`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CarriedImage {
    /// The image's manifest digest, hex (as the stack pins it).
    pub digest: String,
    /// The engine's id for it once loaded (its config digest).
    pub id: String,
    /// The archive's SHA-256, hex, and its size in bytes.
    pub sha256: String,
    pub size: u64,
}

impl CarriedImage {
    /// Whether `digest` can name a file: 64 lowercase hex digits, nothing else.
    pub fn valid_digest(digest: &str) -> bool {
        digest.len() == 64
            && digest
                .bytes()
                .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    }
}

/// The agent's archives of carried images (its images directory).
pub struct Archives {
    pub dir: PathBuf,
    /// Archive digests, computed once: an archive never changes once its `.id` exists.
    known: Mutex<BTreeMap<String, CarriedImage>>,
}

impl Archives {
    pub fn new(dir: PathBuf) -> Archives {
        Archives {
            dir,
            known: Mutex::default(),
        }
    }

    /// The archive of `digest` (validated hex), if the agent keeps one.
    pub fn archive(&self, digest: &str) -> Option<PathBuf> {
        CarriedImage::valid_digest(digest).then(|| self.dir.join(format!("{digest}.tar")))
    }

    /// The carried images among those `stack` runs: images the bundle did not carry are pulled
    /// by the machines from their registry, as on a host's engine.
    pub async fn of(&self, stack: &Stack) -> Result<Vec<CarriedImage>, String> {
        let mut carried = Vec::new();
        for resource in &stack.resources {
            let Some(digest) = resource.container.image.digest() else {
                continue;
            };
            let digest = digest.hex();
            if carried.iter().any(|c: &CarriedImage| c.digest == digest) {
                continue;
            }
            let known = self.known.lock().ok().and_then(|k| k.get(&digest).cloned());
            if let Some(image) = known {
                carried.push(image);
                continue;
            }
            let Ok(id) = std::fs::read_to_string(self.dir.join(format!("{digest}.id"))) else {
                continue;
            };
            let archive = self.dir.join(format!("{digest}.tar"));
            let (sha256, size) = tokio::task::spawn_blocking(move || {
                let size = std::fs::metadata(&archive)
                    .map_err(|e| e.to_string())?
                    .len();
                let sha256 = super::file_sha256(&archive).map_err(|e| e.to_string())?;
                Ok::<_, String>((sha256, size))
            })
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("carried image {digest}: {e}"))?;
            let image = CarriedImage {
                digest: digest.clone(),
                id: id.trim().to_string(),
                sha256,
                size,
            };
            if let Ok(mut known) = self.known.lock() {
                known.insert(digest, image.clone());
            }
            carried.push(image);
        }
        Ok(carried)
    }
}
