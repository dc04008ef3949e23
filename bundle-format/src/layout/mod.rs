//! OCI image layouts, as a directory or a single tar file: safe reading with limits, and
//! deterministic writing.
//!
//! Reading checks every blob's digest as it streams past, refuses anything that is not
//! `oci-layout`, `index.json` or `blobs/sha256/<hex>` (so no entry can escape the layout),
//! refuses links and devices, and bounds every size. Writing emits only blobs reachable from
//! `index.json`, in a fixed order with zeroed metadata, so the same content gives the same bytes.

pub mod oci;
mod read;
mod write;

pub use write::{write_atomic, write_atomic_with};

use crate::crypto::Sha256;
use crate::digest::Digest;
use oci::{ImageIndex, ImageManifest};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

/// Size bounds for reading untrusted layouts (TUF's "endless data" attack).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// index.json, manifests, configs, stack, roots and signature payloads are read into memory
    /// and parsed; each is at most this big.
    pub max_metadata_bytes: u64,
    /// Any single blob (e.g. an image layer).
    pub max_blob_bytes: u64,
    /// All blobs together.
    pub max_total_bytes: u64,
    /// Entries in a tar or files in a directory (directories included).
    pub max_entries: usize,
    /// Small blobs are kept in memory until they add up to this; later ones are read from
    /// disk when needed (a directory's own files, or the spool a tar is read with), so memory
    /// does not grow with the number of small blobs an archive holds.
    pub max_held_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_metadata_bytes: 4 << 20,
            max_blob_bytes: 16 << 30,
            max_total_bytes: 64 << 30,
            max_entries: 100_000,
            max_held_bytes: 16 << 20,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LayoutError {
    #[error("{path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("{what} is {size} bytes, over the {limit}-byte limit")]
    SizeLimit { what: String, size: u64, limit: u64 },
    #[error("{what} has more than {limit} {unit}")]
    CountLimit {
        what: String,
        limit: usize,
        unit: &'static str,
    },
    #[error("{what} has digest {actual}, not {expected}")]
    DigestMismatch {
        what: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("unsafe entry {path:?}: {reason}")]
    UnsafeEntry { path: String, reason: String },
    #[error("{what}: {reason}")]
    Malformed { what: String, reason: String },
    #[error("blob {0} is referenced but missing from the layout")]
    MissingBlob(Digest),
    /// A reader that died while reading this input (a crash, a kill): it is filed, not read
    /// again, so an input that kills its reader cannot do it at every restart.
    #[error("{what}: {reason}")]
    Interrupted { what: String, reason: String },
}

impl LayoutError {
    /// Short stable name of the check that failed.
    pub fn check(&self) -> &'static str {
        match self {
            LayoutError::Io { .. } => "io",
            LayoutError::SizeLimit { .. } | LayoutError::CountLimit { .. } => "size-limit",
            LayoutError::DigestMismatch { .. } => "digest-mismatch",
            LayoutError::UnsafeEntry { .. } => "unsafe-path",
            LayoutError::Malformed { .. } => "malformed",
            LayoutError::MissingBlob(_) => "missing-blob",
            LayoutError::Interrupted { .. } => "interrupted",
        }
    }

    fn io(path: impl AsRef<Path>) -> impl FnOnce(io::Error) -> LayoutError {
        let path = path.as_ref().display().to_string();
        move |source| LayoutError::Io { path, source }
    }

    pub(crate) fn malformed(what: impl Into<String>, reason: impl Into<String>) -> Self {
        LayoutError::Malformed {
            what: what.into(),
            reason: reason.into(),
        }
    }
}

/// Where a blob's verified bytes are.
#[derive(Debug, Clone)]
enum BlobData {
    Memory(Vec<u8>),
    /// Bytes at `offset` of a file, verified when read (or written by us): a whole file (a
    /// directory layout's blob, a large blob spooled from a tar), or one of the small blobs
    /// past the memory budget, appended to one spool file so they cost no file each.
    File {
        path: PathBuf,
        offset: u64,
    },
    /// Verified while streaming through a tar, not retained.
    Discarded,
}

#[derive(Debug, Clone)]
struct Blob {
    size: u64,
    data: BlobData,
}

/// An OCI image layout held as an index plus content-addressed blobs.
#[derive(Debug, Clone)]
pub struct Layout {
    index: ImageIndex,
    blobs: BTreeMap<Digest, Blob>,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            index: ImageIndex::new(Vec::new()),
            blobs: BTreeMap::new(),
        }
    }
}

impl Layout {
    pub fn index(&self) -> &ImageIndex {
        &self.index
    }

    pub fn index_mut(&mut self) -> &mut ImageIndex {
        &mut self.index
    }

    /// Adds a blob held in memory and returns its digest.
    pub fn add_blob(&mut self, bytes: Vec<u8>) -> Digest {
        let digest = Digest::of(&bytes);
        self.blobs.insert(
            digest,
            Blob {
                size: bytes.len() as u64,
                data: BlobData::Memory(bytes),
            },
        );
        digest
    }

    /// Adds a blob whose file content the caller has already verified to have `digest`.
    pub fn add_verified_file(&mut self, digest: Digest, size: u64, path: PathBuf) {
        self.blobs.insert(
            digest,
            Blob {
                size,
                data: BlobData::File { path, offset: 0 },
            },
        );
    }

    pub fn has_blob(&self, digest: &Digest) -> bool {
        self.blobs.contains_key(digest)
    }

    pub fn blob_size(&self, digest: &Digest) -> Option<u64> {
        self.blobs.get(digest).map(|b| b.size)
    }

    /// A small blob's bytes, bounded by `limit` (metadata is parsed in memory).
    pub fn read_blob(&self, digest: &Digest, limit: u64) -> Result<Vec<u8>, LayoutError> {
        let blob = self
            .blobs
            .get(digest)
            .ok_or(LayoutError::MissingBlob(*digest))?;
        if blob.size > limit {
            return Err(LayoutError::SizeLimit {
                what: format!("blob {digest}"),
                size: blob.size,
                limit,
            });
        }
        match &blob.data {
            BlobData::Memory(bytes) => Ok(bytes.clone()),
            BlobData::File { path, offset } => {
                let file = open_at(path, *offset)?.take(blob.size);
                let bytes = read_limited(file, blob.size, limit, &path.display().to_string())?;
                // The file was verified when read; check again in case it changed since.
                let actual = Digest::of(&bytes);
                if actual != *digest {
                    return Err(LayoutError::DigestMismatch {
                        what: path.display().to_string(),
                        expected: *digest,
                        actual,
                    });
                }
                Ok(bytes)
            }
            BlobData::Discarded => Err(LayoutError::malformed(
                format!("blob {digest}"),
                "content was verified but not kept (read the layout with a spool directory)",
            )),
        }
    }

    /// Copies a blob to `out` (for large blobs such as image layers).
    pub fn copy_blob(&self, digest: &Digest, out: &mut dyn Write) -> Result<u64, LayoutError> {
        let blob = self
            .blobs
            .get(digest)
            .ok_or(LayoutError::MissingBlob(*digest))?;
        match &blob.data {
            BlobData::Memory(bytes) => {
                out.write_all(bytes).map_err(LayoutError::io("output"))?;
                Ok(bytes.len() as u64)
            }
            BlobData::File { path, offset } => {
                // Hash again while copying: the file may have changed since it was verified.
                let what = path.display().to_string();
                let file = open_at(path, *offset)?;
                let actual = hash_stream(file, blob.size, &what, |chunk| out.write_all(chunk))?;
                check_digest(&what, *digest, actual)?;
                Ok(blob.size)
            }
            BlobData::Discarded => Err(LayoutError::malformed(
                format!("blob {digest}"),
                "content was verified but not kept",
            )),
        }
    }

    /// Digests reachable from index.json (manifests, their configs and layers, nested indexes).
    ///
    /// Linear in the layout: every descriptor's size is checked however often its digest is
    /// referenced, and each manifest or index is parsed once.
    pub fn reachable(&self, limits: &Limits) -> Result<BTreeSet<Digest>, LayoutError> {
        check_listed_once(&self.index)?;
        let mut seen = BTreeSet::new();
        let mut stack: Vec<(oci::Descriptor, usize)> = self
            .index
            .manifests
            .iter()
            .cloned()
            .map(|d| (d, 0))
            .collect();
        while let Some((descriptor, depth)) = stack.pop() {
            let size = self
                .blob_size(&descriptor.digest)
                .ok_or(LayoutError::MissingBlob(descriptor.digest))?;
            if size != descriptor.size {
                return Err(LayoutError::malformed(
                    format!("descriptor of {}", descriptor.digest),
                    format!("says {} bytes, blob has {size}", descriptor.size),
                ));
            }
            if !seen.insert(descriptor.digest) {
                continue;
            }
            if depth > 4 {
                return Err(LayoutError::malformed(
                    "layout",
                    "manifests nested deeper than 4",
                ));
            }
            let media = descriptor.media_type.as_str();
            if media == oci::MEDIA_TYPE_MANIFEST || media == oci::MEDIA_TYPE_DOCKER_MANIFEST {
                let manifest: ImageManifest =
                    self.read_json(&descriptor.digest, "manifest", limits)?;
                stack.push((manifest.config, depth + 1));
                stack.extend(manifest.layers.into_iter().map(|l| (l, depth + 1)));
            } else if media == oci::MEDIA_TYPE_INDEX || media == oci::MEDIA_TYPE_DOCKER_LIST {
                let index: ImageIndex = self.read_json(&descriptor.digest, "index", limits)?;
                stack.extend(index.manifests.into_iter().map(|m| (m, depth + 1)));
            }
        }
        Ok(seen)
    }

    /// A metadata blob parsed as strict JSON (duplicate members refused).
    pub fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        digest: &Digest,
        what: &str,
        limits: &Limits,
    ) -> Result<T, LayoutError> {
        let bytes = self.read_blob(digest, limits.max_metadata_bytes)?;
        crate::json::from_slice(&bytes)
            .map_err(|e| LayoutError::malformed(format!("{what} {digest}"), e.to_string()))
    }
}

/// One index.json entry per manifest: a digest listed again could only make readers do the
/// same work again (thousands of entries naming one large manifest or signature manifest).
pub(super) fn check_listed_once(index: &ImageIndex) -> Result<(), LayoutError> {
    let mut listed = BTreeSet::new();
    match index.manifests.iter().find(|d| !listed.insert(d.digest)) {
        Some(again) => Err(LayoutError::malformed(
            "index.json",
            format!("lists {} more than once", again.digest),
        )),
        None => Ok(()),
    }
}

pub(super) fn check_digest(
    name: &str,
    expected: Digest,
    actual: Digest,
) -> Result<(), LayoutError> {
    if expected == actual {
        Ok(())
    } else {
        Err(LayoutError::DigestMismatch {
            what: name.to_string(),
            expected,
            actual,
        })
    }
}

/// Reads exactly `size` bytes (the declared size), refusing more than `limit`.
pub(super) fn read_limited(
    content: impl Read,
    size: u64,
    limit: u64,
    name: &str,
) -> Result<Vec<u8>, LayoutError> {
    if size > limit {
        return Err(LayoutError::SizeLimit {
            what: name.to_string(),
            size,
            limit,
        });
    }
    let mut bytes = Vec::with_capacity(size as usize);
    content
        .take(size + 1)
        .read_to_end(&mut bytes)
        .map_err(tar_error)?;
    if bytes.len() as u64 != size {
        return Err(LayoutError::malformed(
            name,
            "size changed while reading (truncated?)",
        ));
    }
    Ok(bytes)
}

/// Hashes `size` bytes of `content` in 1 MiB chunks, passing each chunk to `sink`.
pub(super) fn hash_stream(
    mut content: impl Read,
    size: u64,
    name: &str,
    mut sink: impl FnMut(&[u8]) -> io::Result<()>,
) -> Result<Digest, LayoutError> {
    let mut hasher = Sha256::default();
    // No bigger than the blob: thousands of small blobs must not each cost a 1 MiB buffer.
    let mut buffer = vec![0u8; size.min(1 << 20) as usize];
    let mut remaining = size;
    while remaining > 0 {
        let want = buffer.len().min(remaining as usize);
        let read = content.read(&mut buffer[..want]).map_err(tar_error)?;
        if read == 0 {
            return Err(LayoutError::malformed(name, "truncated"));
        }
        hasher.update(&buffer[..read]);
        sink(&buffer[..read]).map_err(LayoutError::io(name))?;
        remaining -= read as u64;
    }
    Ok(Digest::from_sha256(hasher.finish()))
}

/// `path` opened and positioned at `offset`.
pub(super) fn open_at(path: &Path, offset: u64) -> Result<File, LayoutError> {
    use io::Seek;
    let mut file = File::open(path).map_err(LayoutError::io(path))?;
    file.seek(io::SeekFrom::Start(offset))
        .map_err(LayoutError::io(path))?;
    Ok(file)
}

pub(super) fn tar_error(e: io::Error) -> LayoutError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        LayoutError::malformed("tar", "truncated")
    } else if e
        .to_string()
        .chars()
        .all(|c| c.is_ascii_graphic() || c == ' ')
    {
        LayoutError::malformed("tar", e.to_string())
    } else {
        // The tar crate quotes the bad header bytes; keep the one-line message printable.
        LayoutError::malformed("tar", "not a tar archive (invalid header)")
    }
}

#[cfg(test)]
mod tests;
