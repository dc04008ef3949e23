//! OCI image layouts, as a directory or a single tar file: safe reading with limits, and
//! deterministic writing.
//!
//! Reading checks every blob's digest as it streams past, refuses anything that is not
//! `oci-layout`, `index.json` or `blobs/sha256/<hex>` (so no entry can escape the layout),
//! refuses links and devices, and bounds every size. Writing emits only blobs reachable from
//! `index.json`, in a fixed order with zeroed metadata, so the same content gives the same bytes.

pub mod oci;

use crate::crypto::Sha256;
use crate::digest::Digest;
use oci::{ImageIndex, ImageManifest};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

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

    /// Reads a layout from a directory or a tar file.
    ///
    /// Blobs larger than `limits.max_metadata_bytes` stay on disk for directories; for tar files
    /// they are written under `spool` when given (e.g. to load images later) and otherwise only
    /// verified.
    pub fn read(path: &Path, limits: &Limits, spool: Option<&Path>) -> Result<Layout, LayoutError> {
        let metadata = fs::metadata(path).map_err(LayoutError::io(path))?;
        if metadata.is_dir() {
            Self::read_dir(path, limits)
        } else {
            let file = File::open(path).map_err(LayoutError::io(path))?;
            Self::read_tar(io::BufReader::with_capacity(1 << 20, file), limits, spool)
        }
    }

    pub fn read_dir(dir: &Path, limits: &Limits) -> Result<Layout, LayoutError> {
        let mut reader = LayoutReader::new(limits);
        let top = fs::read_dir(dir).map_err(LayoutError::io(dir))?;
        for entry in top {
            let entry = entry.map_err(LayoutError::io(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let kind = entry.file_type().map_err(LayoutError::io(&path))?;
            reader.count_entry(&name)?;
            match (name.as_str(), kind.is_dir(), kind.is_file()) {
                (oci::LAYOUT_FILE | "index.json", _, true) => {
                    let size = fs::symlink_metadata(&path)
                        .map_err(LayoutError::io(&path))?
                        .len();
                    let file = File::open(&path).map_err(LayoutError::io(&path))?;
                    reader.entry(&name, size, file, None)?;
                }
                ("blobs", true, _) => {
                    for algorithm in fs::read_dir(&path).map_err(LayoutError::io(&path))? {
                        let algorithm = algorithm.map_err(LayoutError::io(&path))?;
                        let algorithm_name =
                            format!("blobs/{}", algorithm.file_name().to_string_lossy());
                        reader.count_entry(&algorithm_name)?;
                        if algorithm_name != "blobs/sha256"
                            || !algorithm
                                .file_type()
                                .map_err(LayoutError::io(algorithm.path()))?
                                .is_dir()
                        {
                            return Err(unexpected(&algorithm_name));
                        }
                        for blob in fs::read_dir(algorithm.path())
                            .map_err(LayoutError::io(algorithm.path()))?
                        {
                            let blob = blob.map_err(LayoutError::io(algorithm.path()))?;
                            let blob_path = blob.path();
                            let blob_name =
                                format!("blobs/sha256/{}", blob.file_name().to_string_lossy());
                            reader.count_entry(&blob_name)?;
                            let meta = fs::symlink_metadata(&blob_path)
                                .map_err(LayoutError::io(&blob_path))?;
                            if !meta.file_type().is_file() {
                                return Err(LayoutError::UnsafeEntry {
                                    path: blob_name,
                                    reason: "only regular files are allowed (no links or devices)"
                                        .into(),
                                });
                            }
                            let file =
                                File::open(&blob_path).map_err(LayoutError::io(&blob_path))?;
                            reader.entry(&blob_name, meta.len(), file, Some(&blob_path))?;
                        }
                    }
                }
                _ if kind.is_symlink() => {
                    return Err(LayoutError::UnsafeEntry {
                        path: name,
                        reason: "links are not allowed in a layout".into(),
                    });
                }
                _ => return Err(unexpected(&name)),
            }
        }
        reader.finish()
    }

    pub fn read_tar(
        input: impl Read,
        limits: &Limits,
        spool: Option<&Path>,
    ) -> Result<Layout, LayoutError> {
        let mut reader = LayoutReader::new(limits);
        reader.spool = spool.map(Path::to_path_buf);
        let mut archive = tar::Archive::new(input);
        // Raw mode: the tar crate would otherwise read PAX and GNU long-name headers of any size
        // into memory before we see them. The format never needs them (paths are short).
        let entries = archive.entries().map_err(LayoutError::io("tar"))?.raw(true);
        for entry in entries {
            let entry = entry.map_err(tar_error)?;
            let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
            // Every header counts, whatever it turns out to be.
            reader.count_entry(&raw_path)?;
            let kind = entry.header().entry_type();
            if kind.is_pax_global_extensions()
                || kind.is_pax_local_extensions()
                || kind.is_gnu_longname()
                || kind.is_gnu_longlink()
            {
                return Err(LayoutError::malformed(
                    "tar",
                    "extended headers (PAX, GNU long names) are not allowed in a bundle",
                ));
            }
            if kind.is_dir() {
                // A directory's data would be skipped unread and uncounted: refuse it.
                let size = entry.header().size().map_err(tar_error)?;
                if size != 0 {
                    return Err(LayoutError::malformed(
                        raw_path,
                        format!("a directory entry carrying {size} bytes of data"),
                    ));
                }
                // `tar -C layout -cf x.tar .` starts with the directory itself.
                let name = match raw_path.as_str() {
                    "." | "./" => ".".to_string(),
                    _ => safe_tar_path(&raw_path)?,
                };
                if !matches!(name.as_str(), "." | "blobs" | "blobs/sha256") {
                    return Err(unexpected(&name));
                }
                reader.directory(&name)?;
                continue;
            }
            let name = safe_tar_path(&raw_path)?;
            if !(kind.is_file() || kind == tar::EntryType::Continuous) {
                return Err(LayoutError::UnsafeEntry {
                    path: raw_path,
                    reason: "only regular files and directories are allowed (no links or devices)"
                        .into(),
                });
            }
            let size = entry.header().size().map_err(tar_error)?;
            reader.entry(&name, size, entry, None)?;
        }
        reader.finish()
    }

    /// Writes the layout as a directory, crash-safely: blobs first (content-addressed), then
    /// index.json by atomic rename, then unreferenced blobs are removed.
    pub fn write_dir(&self, dir: &Path) -> Result<(), LayoutError> {
        let limits = Limits::default();
        let reachable = self.reachable(&limits)?;
        let blob_dir = dir.join("blobs").join("sha256");
        fs::create_dir_all(&blob_dir).map_err(LayoutError::io(&blob_dir))?;
        for digest in &reachable {
            let path = blob_dir.join(digest.hex());
            // A blob read from this very directory is already in place (and was verified).
            let in_place = matches!(&self.blobs.get(digest), Some(Blob { data: BlobData::File { path: source, offset: 0 }, .. }) if source == &path);
            if !in_place {
                self.write_blob_file(digest, &path)?;
            }
        }
        write_atomic(&dir.join(oci::LAYOUT_FILE), oci::LAYOUT_FILE_CONTENT)?;
        write_atomic(&dir.join("index.json"), &oci::to_bytes(&self.index))?;
        for entry in fs::read_dir(&blob_dir)
            .map_err(LayoutError::io(&blob_dir))?
            .flatten()
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if Digest::from_hex(&name).is_ok_and(|d| !reachable.contains(&d)) {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// Streams one blob to `path` atomically (temporary sibling, fsync, rename).
    fn write_blob_file(&self, digest: &Digest, path: &Path) -> Result<(), LayoutError> {
        let tmp = temp_sibling(path);
        let result = (|| {
            let mut file = io::BufWriter::with_capacity(1 << 20, create_temp(&tmp)?);
            self.copy_blob(digest, &mut file)?;
            let file = file.into_inner().map_err(|e| LayoutError::Io {
                path: tmp.display().to_string(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(LayoutError::io(&tmp))?;
            fs::rename(&tmp, path).map_err(LayoutError::io(path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    /// Writes the layout as one deterministic tar stream.
    pub fn write_tar(&self, out: impl Write) -> Result<(), LayoutError> {
        let limits = Limits::default();
        let reachable = self.reachable(&limits)?;
        let mut builder = tar::Builder::new(out);
        builder.mode(tar::HeaderMode::Deterministic);
        let index = oci::to_bytes(&self.index);
        append_file(
            &mut builder,
            oci::LAYOUT_FILE,
            oci::LAYOUT_FILE_CONTENT.len() as u64,
            oci::LAYOUT_FILE_CONTENT,
        )?;
        append_file(
            &mut builder,
            "index.json",
            index.len() as u64,
            index.as_slice(),
        )?;
        append_dir(&mut builder, "blobs/")?;
        append_dir(&mut builder, "blobs/sha256/")?;
        for digest in &reachable {
            let size = self
                .blob_size(digest)
                .ok_or(LayoutError::MissingBlob(*digest))?;
            let name = format!("blobs/sha256/{}", digest.hex());
            match &self.blobs[digest].data {
                BlobData::Memory(bytes) => {
                    append_file(&mut builder, &name, size, bytes.as_slice())?
                }
                BlobData::File { path, offset } => {
                    let file = open_at(path, *offset)?;
                    append_file(&mut builder, &name, size, file.take(size))?
                }
                BlobData::Discarded => {
                    return Err(LayoutError::malformed(
                        format!("blob {digest}"),
                        "content was not kept",
                    ));
                }
            }
        }
        builder
            .into_inner()
            .and_then(|mut w| w.flush())
            .map_err(LayoutError::io("tar output"))
    }

    /// Writes a tar file atomically (temporary file, fsync, rename).
    pub fn write_tar_file(&self, path: &Path) -> Result<(), LayoutError> {
        let tmp = temp_sibling(path);
        let result = (|| {
            let file = create_temp(&tmp)?;
            let mut writer = io::BufWriter::with_capacity(1 << 20, file);
            self.write_tar(&mut writer)?;
            let file = writer.into_inner().map_err(|e| LayoutError::Io {
                path: tmp.display().to_string(),
                source: e.into_error(),
            })?;
            file.sync_all().map_err(LayoutError::io(&tmp))?;
            fs::rename(&tmp, path).map_err(LayoutError::io(path))
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }
}

/// One index.json entry per manifest: a digest listed again could only make readers do the
/// same work again (thousands of entries naming one large manifest or signature manifest).
fn check_listed_once(index: &ImageIndex) -> Result<(), LayoutError> {
    let mut listed = BTreeSet::new();
    match index.manifests.iter().find(|d| !listed.insert(d.digest)) {
        Some(again) => Err(LayoutError::malformed(
            "index.json",
            format!("lists {} more than once", again.digest),
        )),
        None => Ok(()),
    }
}

fn unexpected(name: &str) -> LayoutError {
    LayoutError::UnsafeEntry {
        path: name.to_string(),
        reason: "not part of an OCI layout (only oci-layout, index.json and blobs/sha256/<hex>)"
            .into(),
    }
}

fn tar_error(e: io::Error) -> LayoutError {
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

/// Normalizes a tar entry path and refuses anything that could leave the layout.
fn safe_tar_path(raw: &str) -> Result<String, LayoutError> {
    let unsafe_entry = |reason: &str| LayoutError::UnsafeEntry {
        path: raw.to_string(),
        reason: reason.to_string(),
    };
    if raw.contains('\0') || raw.contains('\\') {
        return Err(unsafe_entry("invalid characters in path"));
    }
    let mut parts = Vec::new();
    for component in Path::new(raw).components() {
        match component {
            Component::Normal(part) => parts.push(part.to_string_lossy().into_owned()),
            Component::CurDir => {}
            Component::ParentDir => return Err(unsafe_entry("path contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(unsafe_entry("absolute path")),
        }
    }
    if parts.is_empty() {
        return Err(unsafe_entry("empty path"));
    }
    Ok(parts.join("/"))
}

struct LayoutReader<'a> {
    limits: &'a Limits,
    entries: usize,
    total: u64,
    /// Bytes of small blobs held in memory (bounded by `max_held_bytes`).
    held: u64,
    saw_layout_file: bool,
    directories: BTreeSet<String>,
    index: Option<Vec<u8>>,
    blobs: BTreeMap<Digest, Blob>,
    spool: Option<PathBuf>,
    /// The spool file small blobs past the memory budget are appended to, and its length.
    small_spool: Option<(File, PathBuf, u64)>,
}

impl<'a> LayoutReader<'a> {
    fn new(limits: &'a Limits) -> Self {
        LayoutReader {
            limits,
            entries: 0,
            total: 0,
            held: 0,
            saw_layout_file: false,
            directories: BTreeSet::new(),
            index: None,
            blobs: BTreeMap::new(),
            spool: None,
            small_spool: None,
        }
    }

    fn count_entry(&mut self, name: &str) -> Result<(), LayoutError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(LayoutError::CountLimit {
                what: format!("layout (at {name:?})"),
                limit: self.limits.max_entries,
                unit: "entries",
            });
        }
        Ok(())
    }

    /// One of the layout's directories (`.`, `blobs`, `blobs/sha256`), each at most once.
    fn directory(&mut self, name: &str) -> Result<(), LayoutError> {
        if self.directories.insert(name.to_string()) {
            Ok(())
        } else {
            Err(LayoutError::malformed(name, "directory appears twice"))
        }
    }

    /// One regular file of the layout. `on_disk` is its path when it is already a file we can
    /// keep referring to (directory layouts).
    fn entry(
        &mut self,
        name: &str,
        size: u64,
        content: impl Read,
        on_disk: Option<&Path>,
    ) -> Result<(), LayoutError> {
        self.total = self.total.saturating_add(size);
        if self.total > self.limits.max_total_bytes {
            return Err(LayoutError::SizeLimit {
                what: "layout".into(),
                size: self.total,
                limit: self.limits.max_total_bytes,
            });
        }
        match name {
            oci::LAYOUT_FILE => {
                let bytes = read_limited(content, size, 1024, name)?;
                let value: serde_json::Value = crate::json::from_slice(&bytes)
                    .map_err(|e| LayoutError::malformed(name, e.to_string()))?;
                if value.get("imageLayoutVersion").and_then(|v| v.as_str()) != Some("1.0.0") {
                    return Err(LayoutError::malformed(
                        name,
                        "imageLayoutVersion must be 1.0.0",
                    ));
                }
                if std::mem::replace(&mut self.saw_layout_file, true) {
                    return Err(LayoutError::malformed(name, "appears twice"));
                }
            }
            "index.json" => {
                let bytes = read_limited(content, size, self.limits.max_metadata_bytes, name)?;
                if self.index.replace(bytes).is_some() {
                    return Err(LayoutError::malformed(name, "appears twice"));
                }
            }
            _ => {
                let hex_part = name
                    .strip_prefix("blobs/sha256/")
                    .ok_or_else(|| unexpected(name))?;
                let expected =
                    Digest::from_hex(hex_part).map_err(|_| LayoutError::UnsafeEntry {
                        path: name.to_string(),
                        reason: "blob file names must be 64 lowercase hex digits".into(),
                    })?;
                if self.blobs.contains_key(&expected) {
                    return Err(LayoutError::malformed(name, "appears twice"));
                }
                if size > self.limits.max_blob_bytes {
                    return Err(LayoutError::SizeLimit {
                        what: name.to_string(),
                        size,
                        limit: self.limits.max_blob_bytes,
                    });
                }
                let held = self.held.saturating_add(size);
                let blob = if size <= self.limits.max_metadata_bytes
                    && held <= self.limits.max_held_bytes
                {
                    let bytes = read_limited(content, size, self.limits.max_metadata_bytes, name)?;
                    check_digest(name, expected, Digest::of(&bytes))?;
                    self.held = held;
                    Blob {
                        size,
                        data: BlobData::Memory(bytes),
                    }
                } else if size <= self.limits.max_metadata_bytes
                    && on_disk.is_none()
                    && self.spool.is_some()
                {
                    let data = self.append_small(name, expected, size, content)?;
                    Blob { size, data }
                } else {
                    let data = self.stream_large(name, expected, size, content, on_disk)?;
                    Blob { size, data }
                };
                self.blobs.insert(expected, blob);
            }
        }
        Ok(())
    }

    /// A small blob past the memory budget, from a tar: appended to the one small-blob spool
    /// file while hashed.
    fn append_small(
        &mut self,
        name: &str,
        expected: Digest,
        size: u64,
        content: impl Read,
    ) -> Result<BlobData, LayoutError> {
        if self.small_spool.is_none() {
            let spool = self.spool.as_deref().unwrap_or(Path::new("."));
            fs::create_dir_all(spool).map_err(LayoutError::io(spool))?;
            let path = spool.join("small-blobs");
            let file = File::create(&path).map_err(LayoutError::io(&path))?;
            self.small_spool = Some((file, path, 0));
        }
        let Some((file, path, length)) = self.small_spool.as_mut() else {
            return Err(LayoutError::malformed(name, "no spool"));
        };
        let offset = *length;
        let mut out = io::BufWriter::new(&*file);
        let actual = hash_stream(content, size, name, |chunk| out.write_all(chunk))?;
        out.flush().map_err(LayoutError::io(&*path))?;
        check_digest(name, expected, actual)?;
        *length += size;
        Ok(BlobData::File {
            path: path.clone(),
            offset,
        })
    }

    /// A blob not held in memory: left where it is (a directory's file), written to the spool
    /// while hashed (a tar read with one), or only hashed.
    fn stream_large(
        &self,
        name: &str,
        expected: Digest,
        size: u64,
        content: impl Read,
        on_disk: Option<&Path>,
    ) -> Result<BlobData, LayoutError> {
        let spool_path = match (on_disk, &self.spool) {
            (None, Some(spool)) => Some(spool.join(expected.hex())),
            _ => None,
        };
        let mut sink = match &spool_path {
            Some(path) => {
                fs::create_dir_all(self.spool.as_deref().unwrap_or(Path::new(".")))
                    .map_err(LayoutError::io(path))?;
                Some(File::create(path.with_extension("partial")).map_err(LayoutError::io(path))?)
            }
            None => None,
        };
        let actual = hash_stream(content, size, name, |chunk| match sink.as_mut() {
            Some(file) => file.write_all(chunk),
            None => Ok(()),
        })?;
        check_digest(name, expected, actual)?;
        Ok(match (on_disk, spool_path) {
            (Some(path), _) => BlobData::File {
                path: path.to_path_buf(),
                offset: 0,
            },
            (None, Some(path)) => {
                fs::rename(path.with_extension("partial"), &path)
                    .map_err(LayoutError::io(&path))?;
                BlobData::File { path, offset: 0 }
            }
            (None, None) => BlobData::Discarded,
        })
    }

    fn finish(self) -> Result<Layout, LayoutError> {
        if !self.saw_layout_file {
            return Err(LayoutError::malformed(
                "layout",
                "oci-layout file is missing (not an OCI image layout)",
            ));
        }
        let index_bytes = self
            .index
            .ok_or_else(|| LayoutError::malformed("layout", "index.json is missing"))?;
        let index: ImageIndex = crate::json::from_slice(&index_bytes)
            .map_err(|e| LayoutError::malformed("index.json", e.to_string()))?;
        if index.schema_version != 2 {
            return Err(LayoutError::malformed(
                "index.json",
                "schemaVersion must be 2",
            ));
        }
        check_listed_once(&index)?;
        Ok(Layout {
            index,
            blobs: self.blobs,
        })
    }
}

fn check_digest(name: &str, expected: Digest, actual: Digest) -> Result<(), LayoutError> {
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
fn read_limited(
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
fn hash_stream(
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
fn open_at(path: &Path, offset: u64) -> Result<File, LayoutError> {
    use io::Seek;
    let mut file = File::open(path).map_err(LayoutError::io(path))?;
    file.seek(io::SeekFrom::Start(offset))
        .map_err(LayoutError::io(path))?;
    Ok(file)
}

fn append_file(
    builder: &mut tar::Builder<impl Write>,
    name: &str,
    size: u64,
    content: impl Read,
) -> Result<(), LayoutError> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Regular);
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    builder
        .append_data(&mut header, name, content)
        .map_err(LayoutError::io(name))
}

fn append_dir(builder: &mut tar::Builder<impl Write>, name: &str) -> Result<(), LayoutError> {
    let mut header = tar::Header::new_ustar();
    header.set_entry_type(tar::EntryType::Directory);
    header.set_size(0);
    header.set_mode(0o755);
    header.set_mtime(0);
    header.set_uid(0);
    header.set_gid(0);
    builder
        .append_data(&mut header, name, io::empty())
        .map_err(LayoutError::io(name))
}

/// A fresh dot-name beside `path` for an atomic write (pid, time and a counter: not guessable
/// in advance by someone who can write to the directory).
fn temp_sibling(path: &Path) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let count = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    path.with_file_name(format!(
        ".{name}.tmp-{}-{nanos}-{count}",
        std::process::id()
    ))
}

/// Creates the temporary file, refusing anything already there (a planted link included).
fn create_temp(tmp: &Path) -> Result<File, LayoutError> {
    fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(tmp)
        .map_err(LayoutError::io(tmp))
}

/// Writes a file atomically: temporary sibling, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), LayoutError> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut file = create_temp(&tmp)?;
        file.write_all(bytes).map_err(LayoutError::io(&tmp))?;
        file.sync_all().map_err(LayoutError::io(&tmp))?;
        fs::rename(&tmp, path).map_err(LayoutError::io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests;
