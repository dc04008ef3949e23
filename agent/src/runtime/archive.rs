//! Volume archives: a snapshot of a replica's `/data` kept as a tar whose entries are relative
//! to the volume (`.`, `a`, `d/b`), whatever engine made it. dockerd names them `data/…`,
//! Podman `/…`; both take the relative form back into `/data`.

use hyper::body::Bytes;
use std::io::{self, Read, Write};
use std::path::{Component, Path, PathBuf};

/// Reads what an async producer sends on a channel, on a blocking thread.
pub struct ChannelReader {
    receiver: tokio::sync::mpsc::Receiver<Bytes>,
    chunk: Bytes,
}

impl ChannelReader {
    pub fn new(receiver: tokio::sync::mpsc::Receiver<Bytes>) -> ChannelReader {
        ChannelReader {
            receiver,
            chunk: Bytes::new(),
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.chunk.is_empty() {
            match self.receiver.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

/// Copies the engine's archive of a volume from `from` into `to` (written atomically), entries
/// made relative to the volume; refuses more than `max_bytes` of content. Returns the size of
/// the archive written.
pub fn normalize(from: impl Read, to: &Path, max_bytes: u64) -> io::Result<u64> {
    let mut archive = tar::Archive::new(from);
    outpost_bundle_format::layout::write_atomic_with(to, |out| -> Result<(), Failure> {
        let mut builder = tar::Builder::new(out);
        builder.follow_symlinks(false);
        // The first entry is the volume itself: `data/` from dockerd, `/` from Podman.
        let mut root: Option<PathBuf> = None;
        let mut content = 0u64;
        for entry in archive.entries()? {
            let mut entry = entry?;
            let path = clean(&entry.path()?)?;
            let root = root.get_or_insert_with(|| path.clone());
            let relative = relative_to(root, &path)?;
            content += entry.header().size()?;
            if content > max_bytes {
                return Err(Failure(io::Error::other(format!(
                    "the volume holds more than {max_bytes} bytes (snapshots.max_gib)"
                ))));
            }
            let mut header = entry.header().clone();
            match header.entry_type() {
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()?
                        .ok_or_else(|| invalid("a hard link without a target"))?;
                    let target = relative_to(root, &clean(&target)?)?;
                    builder.append_link(&mut header, &relative, &target)?;
                }
                tar::EntryType::Symlink => {
                    // A symlink's target is data: kept as it is (resolved only inside the container).
                    let target = entry
                        .link_name()?
                        .ok_or_else(|| invalid("a symlink without a target"))?
                        .into_owned();
                    builder.append_link(&mut header, &relative, &target)?;
                }
                _ => builder.append_data(&mut header, &relative, &mut entry)?,
            }
        }
        if root.is_none() {
            return Err(Failure(invalid("the engine's archive is empty")));
        }
        Ok(builder.into_inner()?.flush()?)
    })
    .map_err(|Failure(e)| e)?;
    Ok(std::fs::metadata(to)?.len())
}

/// An error while writing a snapshot, whichever layer it came from.
struct Failure(io::Error);

impl From<io::Error> for Failure {
    fn from(e: io::Error) -> Self {
        Failure(e)
    }
}

impl From<outpost_bundle_format::layout::LayoutError> for Failure {
    fn from(e: outpost_bundle_format::layout::LayoutError) -> Self {
        Failure(io::Error::other(e.to_string()))
    }
}

/// `path` without a leading `/`, `.` parts or trailing separators; `..` is refused.
fn clean(path: &Path) -> io::Result<PathBuf> {
    let mut out = PathBuf::new();
    for component in path.components() {
        match component {
            Component::Normal(part) => out.push(part),
            Component::RootDir | Component::CurDir => {}
            Component::ParentDir | Component::Prefix(_) => {
                return Err(invalid(&format!(
                    "entry {} leaves the volume",
                    path.display()
                )));
            }
        }
    }
    Ok(out)
}

/// `path` relative to the volume's `root` (`.` for the root itself).
fn relative_to(root: &Path, path: &Path) -> io::Result<PathBuf> {
    match path.strip_prefix(root) {
        Ok(rest) if rest.as_os_str().is_empty() => Ok(PathBuf::from(".")),
        Ok(rest) => Ok(rest.to_path_buf()),
        Err(_) => Err(invalid(&format!(
            "entry {} is outside the volume's {}",
            path.display(),
            root.display()
        ))),
    }
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An archive as an engine writes it: `root` first, then names under it, spelled as given
    /// (Podman's absolute names cannot be made through `tar::Builder`'s path setters).
    fn engine_archive(root: &str, under: &str) -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut add = |name: String, kind: tar::EntryType, mode: u32, data: &[u8], link: &str| {
            let mut header = tar::Header::new_gnu();
            header.set_entry_type(kind);
            header.set_mode(mode);
            header.set_size(data.len() as u64);
            header.as_old_mut().name[..name.len()].copy_from_slice(name.as_bytes());
            header.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            header.set_cksum();
            builder.append(&header, data).unwrap();
        };
        let dir = tar::EntryType::Directory;
        add(root.into(), dir, 0o700, b"", "");
        add(format!("{under}d"), dir, 0o700, b"", "");
        add(
            format!("{under}d/log"),
            tar::EntryType::Regular,
            0o640,
            b"hello",
            "",
        );
        let log = format!("{under}d/log");
        add(
            format!("{under}again"),
            tar::EntryType::Link,
            0o640,
            b"",
            &log,
        );
        builder.into_inner().unwrap()
    }

    fn entries(path: &Path) -> Vec<(String, u32, Option<String>)> {
        let mut archive = tar::Archive::new(std::fs::File::open(path).unwrap());
        archive
            .entries()
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                (
                    e.path().unwrap().display().to_string(),
                    e.header().mode().unwrap(),
                    e.link_name().unwrap().map(|l| l.display().to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn dockerd_and_podman_archives_become_the_same_volume_relative_archive() {
        let dir = tempfile::tempdir().unwrap();
        let (docker, podman) = (dir.path().join("docker.tar"), dir.path().join("podman.tar"));
        normalize(&engine_archive("data/", "data/")[..], &docker, 1 << 20).unwrap();
        normalize(&engine_archive("/", "/")[..], &podman, 1 << 20).unwrap();
        let expected = vec![
            (".".to_string(), 0o700, None),
            ("d".to_string(), 0o700, None),
            ("d/log".to_string(), 0o640, None),
            ("again".to_string(), 0o640, Some("d/log".to_string())),
        ];
        assert_eq!(entries(&docker), expected);
        assert_eq!(entries(&podman), expected);
    }

    #[test]
    fn an_entry_outside_the_volume_or_past_the_limit_is_refused_and_nothing_is_left() {
        let dir = tempfile::tempdir().unwrap();
        let to = dir.path().join("snapshot.tar");
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(1);
        builder
            .append_data(&mut header.clone(), "data/a", &b"x"[..])
            .unwrap();
        builder
            .append_data(&mut header, "other/b", &b"y"[..])
            .unwrap();
        let escaping = builder.into_inner().unwrap();
        let e = normalize(&escaping[..], &to, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("outside the volume"), "{e}");
        let e = normalize(&engine_archive("data/", "data/")[..], &to, 3).unwrap_err();
        assert!(e.to_string().contains("more than 3 bytes"), "{e}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
