//! Reading a layout, from a directory or a tar stream, entry by entry: names and types checked
//! before content is read, every header and byte counted against the limits, every blob hashed as
//! it streams past.

use super::{
    Blob, BlobData, Layout, LayoutError, Limits, check_digest, check_listed_once, hash_stream, oci,
    read_limited, tar_error,
};
use crate::digest::Digest;
use oci::ImageIndex;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

impl Layout {
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
}

fn unexpected(name: &str) -> LayoutError {
    LayoutError::UnsafeEntry {
        path: name.to_string(),
        reason: "not part of an OCI layout (only oci-layout, index.json and blobs/sha256/<hex>)"
            .into(),
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
