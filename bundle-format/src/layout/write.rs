//! Writing a layout: deterministic tar bytes, a crash-safe directory, and the one atomic-write
//! helper (temporary sibling, fsync, rename) everything in the workspace writes files with.

use super::{Blob, BlobData, Layout, LayoutError, Limits, oci, open_at};
use crate::digest::Digest;
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

impl Layout {
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

    /// Streams one blob to `path` atomically.
    fn write_blob_file(&self, digest: &Digest, path: &Path) -> Result<(), LayoutError> {
        write_atomic_with(path, |out| self.copy_blob(digest, out).map(|_| ()))
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
        write_atomic_with(path, |out| self.write_tar(out))
    }
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
    write_atomic_with(path, |out| {
        out.write_all(bytes).map_err(LayoutError::io(path))
    })
}

/// Writes `path` atomically: `write` fills a fresh temporary sibling (buffered), which is then
/// fsynced and renamed over `path`. On any error the temporary file is removed and `path` is
/// left as it was, so a reader (or a crash) never sees a partial file.
pub fn write_atomic_with<E: From<LayoutError>>(
    path: &Path,
    write: impl FnOnce(&mut io::BufWriter<File>) -> Result<(), E>,
) -> Result<(), E> {
    let tmp = temp_sibling(path);
    let result = (|| {
        let mut out = io::BufWriter::with_capacity(1 << 20, create_temp(&tmp)?);
        write(&mut out)?;
        let file = out.into_inner().map_err(|e| LayoutError::Io {
            path: tmp.display().to_string(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(LayoutError::io(&tmp))?;
        fs::rename(&tmp, path).map_err(LayoutError::io(path))?;
        Ok(())
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}
