//! The file-drop source (air-gapped sites, USB sticks): a directory watched with inotify.
//!
//! Only complete files count: a file is considered when it is renamed into the directory or
//! closed after writing, never while it is being written; names starting with `.` and ending in
//! `.partial`, `.tmp` or `.reason` are ignored. Each processed file moves to `accepted/` or
//! `rejected/` with a `<name>.reason` file beside it, whatever bytes its name is made of.
//!
//! While a file is read and judged, a marker in the state directory names it. A marker found at
//! start means the agent died reading that file: it is filed as rejected ("the agent stopped
//! while reading this file") instead of read again, so one file cannot crash-loop the agent.

use super::{BoxFuture, Candidate, Ingested, ReadingMarker, Source, SourceError};
use notify::{EventKind, RecursiveMode, Watcher};
use outpost_bundle_format::layout::{Layout, LayoutError, Limits};
use std::collections::VecDeque;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use tokio::sync::mpsc;

/// Why a file named by a marker left at start is filed without being read.
pub const INTERRUPTED: &str = "the agent stopped while reading this file";

pub struct DirSource {
    dir: PathBuf,
    reader: Reader,
    /// A file the previous run died reading, filed first.
    interrupted: Option<PathBuf>,
    queue: VecDeque<PathBuf>,
    events: mpsc::UnboundedReceiver<PathBuf>,
    _watcher: notify::RecommendedWatcher,
}

/// Whether a file name may be a finished bundle.
pub fn eligible(name: &str) -> bool {
    !name.is_empty()
        && !name.starts_with('.')
        && ![".partial", ".tmp", ".reason"]
            .iter()
            .any(|s| name.ends_with(s))
}

impl DirSource {
    pub fn new(
        dir: &Path,
        limits: Limits,
        spool_root: PathBuf,
        marker: PathBuf,
    ) -> Result<DirSource, SourceError> {
        for sub in ["accepted", "rejected"] {
            let path = dir.join(sub);
            std::fs::create_dir_all(&path)
                .map_err(|e| SourceError(format!("{}: {e}", path.display())))?;
            // Processed files are moved there: a link would send them anywhere.
            let real_dir = std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_dir());
            if !real_dir {
                return Err(SourceError(format!(
                    "{}: must be a directory, not a link",
                    path.display()
                )));
            }
        }
        let (sender, events) = mpsc::unbounded_channel();
        let watched = dir.to_path_buf();
        let mut watcher =
            notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                let Ok(event) = event else { return };
                let complete = matches!(
                    event.kind,
                    EventKind::Modify(notify::event::ModifyKind::Name(
                        notify::event::RenameMode::To | notify::event::RenameMode::Both
                    )) | EventKind::Access(notify::event::AccessKind::Close(
                        notify::event::AccessMode::Write
                    ))
                );
                if complete {
                    for path in event.paths {
                        if path.parent() == Some(watched.as_path()) {
                            let _ = sender.send(path);
                        }
                    }
                }
            })
            .map_err(|e| SourceError(format!("cannot watch {}: {e}", dir.display())))?;
        watcher
            .watch(dir, RecursiveMode::NonRecursive)
            .map_err(|e| SourceError(format!("cannot watch {}: {e}", dir.display())))?;
        // Files already there when the agent starts (dropped while it was down).
        let mut queue: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(|e| SourceError(format!("{}: {e}", dir.display())))?
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_file())
            .collect();
        queue.sort();
        let interrupted = ReadingMarker::left_behind(&marker)
            .map(|name| dir.join(std::ffi::OsStr::from_bytes(&name)))
            .filter(|path| queue.contains(path));
        queue.retain(|path| Some(path) != interrupted.as_ref());
        Ok(DirSource {
            dir: dir.to_path_buf(),
            reader: Reader {
                limits,
                spool_root,
                marker,
                metrics: Default::default(),
            },
            interrupted,
            queue: queue.into(),
            events,
            _watcher: watcher,
        })
    }
}

/// The candidate a dropped file is: known by its name for records, settled by its own path.
fn filed(path: PathBuf, layout: Result<Layout, LayoutError>) -> Candidate {
    let key = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Candidate {
        origin: path.display().to_string(),
        layout,
        digest: None,
        spool: None,
        key,
        reading: None,
        file: Some(path),
    }
}

/// Reads dropped files (on a blocking thread: a large file must not hold up the agent's API).
#[derive(Clone)]
struct Reader {
    limits: Limits,
    spool_root: PathBuf,
    /// The crash marker (see the module docs).
    marker: PathBuf,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl Reader {
    fn candidate(&self, path: PathBuf) -> Option<Candidate> {
        let file_name = path.file_name()?;
        let name = file_name.to_string_lossy().into_owned();
        if !eligible(&name) {
            return None;
        }
        let unreadable = |error| Some(filed(path.clone(), Err(error)));
        // Opened without following links and without blocking (a FIFO must not hang the
        // agent); the checks below are on the opened file itself, so nothing can be swapped in
        // between.
        use std::os::unix::fs::OpenOptionsExt;
        let opened = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(&path);
        let file = match opened {
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return unreadable(LayoutError::UnsafeEntry {
                    path: name.clone(),
                    reason: "a link, not a file".into(),
                });
            }
            // Gone already: nothing to file away.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            // Unreadable (permissions...): rejected with the reason, not left there unnoticed.
            Err(e) => {
                return unreadable(LayoutError::Malformed {
                    what: name.clone(),
                    reason: format!("cannot open: {e}"),
                });
            }
            Ok(file) => file,
        };
        let metadata = file.metadata().ok()?;
        if !metadata.is_file() {
            return None;
        }
        let reading = match ReadingMarker::begin(&self.marker, file_name.as_bytes()) {
            Ok(marker) => Some(marker),
            Err(e) => {
                tracing::warn!("{e}: reading {name} without a crash marker");
                None
            }
        };
        let spool = tempfile::Builder::new()
            .prefix("spool")
            .tempdir_in(&self.spool_root)
            .ok();
        self.metrics.download_started(&name, metadata.len());
        let reader = std::io::BufReader::with_capacity(
            1 << 20,
            super::Counted {
                inner: file,
                metrics: &self.metrics,
            },
        );
        let started = std::time::Instant::now();
        let layout = Layout::read_tar(reader, &self.limits, spool.as_ref().map(|s| s.path()));
        self.metrics.download_finished();
        // A file read is this source's poll: it answered, whatever the file held.
        self.metrics.poll(true, started);
        Some(Candidate {
            spool,
            reading,
            ..filed(path, layout)
        })
    }
}

impl DirSource {
    /// Counts its polls (files read) in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.reader.metrics = metrics;
        self
    }

    /// The file the previous run died reading, as a rejection that reads nothing.
    fn interrupted_candidate(&mut self) -> Option<Candidate> {
        let path = self.interrupted.take()?;
        let name = path.file_name()?.to_string_lossy().into_owned();
        let layout = Err(LayoutError::Interrupted {
            what: name,
            reason: INTERRUPTED.into(),
        });
        Some(filed(path, layout))
    }
}

impl Source for DirSource {
    fn describe(&self) -> String {
        format!("dir {}", self.dir.display())
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Candidate, SourceError>> {
        Box::pin(async move {
            if let Some(candidate) = self.interrupted_candidate() {
                return Ok(candidate);
            }
            loop {
                while let Some(path) = self.queue.pop_front() {
                    let reader = self.reader.clone();
                    let read = tokio::task::spawn_blocking(move || reader.candidate(path)).await;
                    match read {
                        // The agent's own disk is full: not the bundle's fault. It stays where
                        // it is and is read again after the source's backoff.
                        Ok(Some(candidate)) if super::out_of_space(&candidate.layout) => {
                            let message = format!(
                                "{}: no space left on device while reading it under {} (left in place, read again once there is room)",
                                candidate.origin,
                                self.reader.spool_root.display()
                            );
                            if let Some(file) = candidate.file.clone() {
                                self.queue.push_front(file);
                            }
                            return Err(SourceError(message));
                        }
                        Ok(Some(candidate)) => return Ok(candidate),
                        Ok(None) => {}
                        Err(e) => return Err(SourceError(format!("reading a dropped file: {e}"))),
                    }
                }
                match self.events.recv().await {
                    Some(path) => {
                        if !self.queue.contains(&path) {
                            self.queue.push_back(path);
                        }
                        // Collect whatever else arrived in the same burst.
                        while let Ok(path) = self.events.try_recv() {
                            if !self.queue.contains(&path) {
                                self.queue.push_back(path);
                            }
                        }
                    }
                    None => {
                        return Err(SourceError(format!(
                            "the watch on {} ended",
                            self.dir.display()
                        )));
                    }
                }
            }
        })
    }

    fn settle(&mut self, candidate: Candidate, outcome: &Ingested) -> BoxFuture<'_, ()> {
        let folder = match outcome {
            Ingested::Rejected { .. } => "rejected",
            _ => "accepted",
        };
        let reason = format!("{}\n", outcome.describe());
        Box::pin(async move {
            // The file's own path: its name may not be UTF-8 (the key is only for records).
            let from = candidate
                .file
                .clone()
                .unwrap_or_else(|| self.dir.join(&candidate.key));
            let Some(name) = from.file_name().map(std::ffi::OsStr::to_os_string) else {
                return;
            };
            let target_dir = self.dir.join(folder);
            let mut target = target_dir.join(&name);
            if target.exists() {
                let stamp = crate::config::now().format("%Y%m%dT%H%M%S%.3f");
                let mut stamped = name.clone();
                stamped.push(format!(".{stamp}"));
                target = target_dir.join(stamped);
            }
            let mut reason_name = target.file_name().unwrap_or_default().to_os_string();
            reason_name.push(".reason");
            let _ = outpost_bundle_format::layout::write_atomic(
                &target.with_file_name(reason_name),
                reason.as_bytes(),
            );
            if let Err(e) = std::fs::rename(&from, &target) {
                tracing::warn!(
                    "cannot move {} to {}: {e}",
                    from.display(),
                    target.display()
                );
            }
            // Filed: the crash marker goes with the candidate.
            drop(candidate);
        })
    }
}
