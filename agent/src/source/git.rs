//! The git source: fetches only the configured ref into a bare repository under the state
//! directory, acts only on a new commit, and reads the bundle at `path` (a layout tar file or a
//! layout directory) straight from the commit's tree, within the size limits.

use super::{BoxFuture, Candidate, Ingested, Pace, Source, SourceError};
use crate::config::{GitSource as GitConfig, parse_duration};
use outpost_bundle_format::layout::{Layout, LayoutError, Limits};
use std::path::{Path, PathBuf};

/// libgit2 loads a blob into memory whole; bundles in git stay below this (larger bundles, e.g.
/// with images, travel by registry or file drop).
const MAX_GIT_BLOB_BYTES: u64 = 1 << 30;
/// A fetch silent for this many stall timeouts is left behind (see `next`).
const GIVE_UP_AFTER: u32 = 10;

type FetchTask = tokio::task::JoinHandle<Result<Option<Candidate>, SourceError>>;
type InFlight = (FetchTask, std::sync::Arc<Progress>);

pub struct GitSource {
    config: GitConfig,
    password: Option<String>,
    repo_dir: PathBuf,
    spool_root: PathBuf,
    pace: Pace,
    limits: Limits,
    last_commit: Option<String>,
    /// A fetch heard nothing of for this long is given up on (see `watch`).
    stall: std::time::Duration,
    /// A fetch given up on that has not ended yet.
    in_flight: Option<InFlight>,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
}

impl GitSource {
    pub fn new(
        config: &GitConfig,
        state_dir: &Path,
        limits: Limits,
    ) -> Result<GitSource, SourceError> {
        let password = match &config.password_file {
            Some(file) => Some(
                crate::config::read_secret("source.git.password_file", file)
                    .map_err(SourceError)?,
            ),
            None => None,
        };
        Ok(GitSource {
            config: config.clone(),
            password,
            repo_dir: state_dir.join("git"),
            spool_root: state_dir.join("tmp"),
            pace: Pace::new(parse_duration(&config.interval).map_err(SourceError)?),
            limits,
            last_commit: None,
            stall: parse_duration(&config.stall_timeout).map_err(SourceError)?,
            in_flight: None,
            metrics: Default::default(),
        })
    }

    /// Counts its polls (fetches) in `metrics`.
    pub fn with_metrics(mut self, metrics: std::sync::Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Starts a fetch on a blocking thread: the new commit's bundle, or None when unchanged.
    fn start_fetch(&self) -> InFlight {
        let (repo_dir, url, refspec) = (
            self.repo_dir.clone(),
            self.config.url.clone(),
            self.refspec(),
        );
        let (username, password) = (self.config.username.clone(), self.password.clone());
        let last = self.last_commit.clone();
        let (path, limits, spool_root) = (
            self.config.path.clone(),
            self.limits,
            self.spool_root.clone(),
        );
        let progress = std::sync::Arc::new(Progress::start());
        let heard = progress.clone();
        let task =
            tokio::task::spawn_blocking(move || -> Result<Option<Candidate>, SourceError> {
                let (repo, commit) = fetch(
                    &repo_dir,
                    &url,
                    &refspec,
                    (username.as_deref(), password.as_deref()),
                    limits.max_total_bytes,
                    &heard,
                )?;
                heard.fetched();
                if last.as_deref() == Some(commit.to_string().as_str()) {
                    return Ok(None);
                }
                std::fs::create_dir_all(&spool_root)
                    .map_err(|e| SourceError(format!("{}: {e}", spool_root.display())))?;
                let spool = tempfile::Builder::new()
                    .prefix("git")
                    .tempdir_in(&spool_root)
                    .map_err(|e| SourceError(e.to_string()))?;
                let layout = read_bundle(&repo, commit, &path, &limits, spool.path());
                // A full disk is the agent's problem, not the bundle's: read it again later.
                if super::out_of_space(&layout) {
                    let reason = layout.err().map(|e| e.to_string()).unwrap_or_default();
                    return Err(SourceError(format!("git {url} {commit}: {reason}")));
                }
                Ok(Some(Candidate {
                    origin: format!("git {url} {}@{commit}", refspec.0),
                    layout,
                    digest: None,
                    spool: Some(spool),
                    key: commit.to_string(),
                    reading: None,
                    file: None,
                }))
            });
        (task, progress)
    }

    /// Waits for a fetch while it shows progress. Silent for a stall timeout, it is given up
    /// on (an error, so the daemon backs off) and kept to be waited for again.
    async fn watch(
        &mut self,
        mut task: FetchTask,
        progress: std::sync::Arc<Progress>,
    ) -> Result<Option<Candidate>, SourceError> {
        let check = (self.stall / 4).max(std::time::Duration::from_millis(50));
        loop {
            tokio::select! {
                joined = &mut task => {
                    return joined
                        .map_err(|e| SourceError(format!("git fetch task: {e}")))
                        .and_then(|found| found);
                }
                () = tokio::time::sleep(check) => {
                    let silent = progress.silent_for();
                    if silent >= self.stall {
                        progress.abandoned.store(true, std::sync::atomic::Ordering::Relaxed);
                        self.in_flight = Some((task, progress));
                        return Err(SourceError(format!(
                            "git {}: stalled: nothing received for {}s",
                            self.config.url,
                            silent.as_secs()
                        )));
                    }
                }
            }
        }
    }

    fn refspec(&self) -> (String, String) {
        let r = &self.config.reference;
        let remote = if r.starts_with("refs/") {
            r.clone()
        } else {
            format!("refs/heads/{r}")
        };
        (remote, "refs/outpost/source".to_string())
    }
}

/// What a fetch in flight has been heard of, shared with the task that watches it: libgit2
/// blocks in its own socket reads, so a server that stalls or drips is noticed from outside.
#[derive(Default)]
struct Progress {
    /// Milliseconds since `started` at the last sign of progress.
    heard_at_ms: std::sync::atomic::AtomicU64,
    /// Set by the watcher once it gave up: the fetch aborts at libgit2's next callback.
    abandoned: std::sync::atomic::AtomicBool,
    started: Option<std::time::Instant>,
}

impl Progress {
    fn start() -> Progress {
        Progress {
            started: Some(std::time::Instant::now()),
            ..Default::default()
        }
    }

    fn heard(&self) {
        let elapsed = self.started.map(|s| s.elapsed()).unwrap_or_default();
        self.heard_at_ms.store(
            elapsed.as_millis() as u64,
            std::sync::atomic::Ordering::Relaxed,
        );
    }

    /// The fetch is done: reading the bundle from the repository is local work, not watched.
    fn fetched(&self) {
        self.heard_at_ms
            .store(u64::MAX, std::sync::atomic::Ordering::Relaxed);
    }

    fn silent_for(&self) -> std::time::Duration {
        let elapsed = self.started.map(|s| s.elapsed()).unwrap_or_default();
        let heard = self.heard_at_ms.load(std::sync::atomic::Ordering::Relaxed);
        if heard == u64::MAX {
            return std::time::Duration::ZERO;
        }
        elapsed.saturating_sub(std::time::Duration::from_millis(heard))
    }

    fn abandoned(&self) -> bool {
        self.abandoned.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Fetch (blocking, libgit2) and return the commit id of the tracked ref.
fn fetch(
    repo_dir: &Path,
    url: &str,
    refspec: &(String, String),
    credentials: (Option<&str>, Option<&str>),
    max_bytes: u64,
    progress: &Progress,
) -> Result<(git2::Repository, git2::Oid), SourceError> {
    let (username, password) = credentials;
    let fail = |e: git2::Error| SourceError(format!("git {url}: {}", e.message()));
    let repo = match git2::Repository::open_bare(repo_dir) {
        Ok(repo) => repo,
        Err(_) => git2::Repository::init_bare(repo_dir).map_err(fail)?,
    };
    let mut callbacks = git2::RemoteCallbacks::new();
    let (user, pass) = (username.map(String::from), password.map(String::from));
    // libgit2 asks again after every refusal: answer once, then give up.
    let mut asked = false;
    callbacks.credentials(move |_url, from_url, _allowed| {
        if std::mem::replace(&mut asked, true) {
            return Err(git2::Error::from_str(
                "authentication failed: the server refused the credentials",
            ));
        }
        match (user.as_deref().or(from_url), pass.as_deref()) {
            (Some(user), Some(pass)) => git2::Cred::userpass_plaintext(user, pass),
            _ => Err(git2::Error::from_str(
                "the repository needs credentials (source.git.username / password_file)",
            )),
        }
    });
    let mut options = git2::FetchOptions::new();
    // A server sending without end is cut off at the bundle size limit; a fetch its watcher
    // gave up on stops at the next callback.
    callbacks.transfer_progress(|transfer| {
        progress.heard();
        transfer.received_bytes() as u64 <= max_bytes && !progress.abandoned()
    });
    callbacks.sideband_progress(|_| {
        progress.heard();
        !progress.abandoned()
    });
    options.remote_callbacks(callbacks);
    options.download_tags(git2::AutotagOption::None);
    let mut remote = repo.remote_anonymous(url).map_err(fail)?;
    let spec = format!("+{}:{}", refspec.0, refspec.1);
    remote
        .fetch(&[spec.as_str()], Some(&mut options), None)
        .map_err(fail)?;
    drop(remote);
    let commit = repo.refname_to_id(&refspec.1).map_err(fail)?;
    Ok((repo, commit))
}

/// Reads the bundle at `path` in the commit: a tar blob, or a tree holding a layout.
fn read_bundle(
    repo: &git2::Repository,
    commit: git2::Oid,
    path: &str,
    limits: &Limits,
    spool: &Path,
) -> Result<Layout, LayoutError> {
    let malformed = |reason: String| LayoutError::Malformed {
        what: format!("git path {path}"),
        reason,
    };
    let tree = repo
        .find_commit(commit)
        .and_then(|c| c.tree())
        .map_err(|e| malformed(e.message().to_string()))?;
    let entry = tree
        .get_path(Path::new(path))
        .map_err(|_| malformed("not found in the commit".into()))?;
    match entry.kind() {
        Some(git2::ObjectType::Blob) => {
            let (size, _) = repo
                .odb()
                .and_then(|odb| odb.read_header(entry.id()))
                .map_err(|e| malformed(e.message().to_string()))?;
            // libgit2 holds a blob in memory whole: bound it before loading.
            let limit = limits.max_total_bytes.min(MAX_GIT_BLOB_BYTES);
            if size as u64 > limit {
                return Err(LayoutError::SizeLimit {
                    what: format!("git path {path} (a tar held in git)"),
                    size: size as u64,
                    limit,
                });
            }
            let blob = repo
                .find_blob(entry.id())
                .map_err(|e| malformed(e.message().to_string()))?;
            Layout::read_tar(std::io::Cursor::new(blob.content()), limits, Some(spool))
        }
        Some(git2::ObjectType::Tree) => {
            // Materialize the layout directory (regular files only) and read it like any other.
            let subtree = repo
                .find_tree(entry.id())
                .map_err(|e| malformed(e.message().to_string()))?;
            let target = spool.join("layout");
            let mut total = 0u64;
            let mut entries = 0usize;
            let mut result = Ok(());
            subtree
                .walk(git2::TreeWalkMode::PreOrder, |parent, item| {
                    let name = format!("{parent}{}", item.name().unwrap_or(""));
                    match item.kind() {
                        Some(git2::ObjectType::Tree) => git2::TreeWalkResult::Ok,
                        Some(git2::ObjectType::Blob)
                            if item.filemode() == 0o100644 || item.filemode() == 0o100755 =>
                        {
                            let written = (|| {
                                entries += 1;
                                if entries > limits.max_entries {
                                    return Err(LayoutError::SizeLimit {
                                        what: format!("files under git path {path}"),
                                        size: entries as u64,
                                        limit: limits.max_entries as u64,
                                    });
                                }
                                // Sizes from the object header, before anything is loaded.
                                let (size, _) = repo
                                    .odb()
                                    .and_then(|odb| odb.read_header(item.id()))
                                    .map_err(|e| malformed(e.message().to_string()))?;
                                total = total.saturating_add(size as u64);
                                let limit = limits.max_blob_bytes.min(MAX_GIT_BLOB_BYTES);
                                if size as u64 > limit || total > limits.max_total_bytes {
                                    return Err(LayoutError::SizeLimit {
                                        what: format!("git path {path}/{name}"),
                                        size: total,
                                        limit: limits.max_total_bytes.min(limit),
                                    });
                                }
                                let blob = repo
                                    .find_blob(item.id())
                                    .map_err(|e| malformed(e.message().to_string()))?;
                                let file = target.join(&name);
                                if !file.starts_with(&target) || name.split('/').any(|c| c == "..")
                                {
                                    return Err(LayoutError::UnsafeEntry {
                                        path: name.clone(),
                                        reason: "escapes the layout".into(),
                                    });
                                }
                                // The agent's own disk: an I/O error (a full disk is read
                                // again later), not the bundle's fault.
                                let io = |source| LayoutError::Io {
                                    path: file.display().to_string(),
                                    source,
                                };
                                if let Some(dir) = file.parent() {
                                    std::fs::create_dir_all(dir).map_err(io)?;
                                }
                                std::fs::write(&file, blob.content()).map_err(io)
                            })();
                            match written {
                                Ok(()) => git2::TreeWalkResult::Ok,
                                Err(e) => {
                                    result = Err(e);
                                    git2::TreeWalkResult::Abort
                                }
                            }
                        }
                        _ => {
                            result = Err(LayoutError::UnsafeEntry {
                                path: name,
                                reason: "only regular files are allowed (no links or submodules)"
                                    .into(),
                            });
                            git2::TreeWalkResult::Abort
                        }
                    }
                })
                .ok();
            result?;
            Layout::read_dir(&target, limits)
        }
        _ => Err(malformed("neither a file nor a directory".into())),
    }
}

impl Source for GitSource {
    fn describe(&self) -> String {
        format!(
            "git {} {} {}",
            self.config.url, self.config.reference, self.config.path
        )
    }

    fn next(&mut self) -> BoxFuture<'_, Result<Candidate, SourceError>> {
        Box::pin(async move {
            loop {
                // A fetch given up on as stalled is waited for again, never run twice at once;
                // once it failed (cut off, or cancelled at its next callback) a new one starts.
                let (task, progress) = match self.in_flight.take() {
                    Some((task, _)) if task.is_finished() => match task.await {
                        Ok(Ok(Some(candidate))) => return Ok(candidate),
                        Ok(Ok(None)) => continue,
                        Ok(Err(e)) => {
                            tracing::info!("the stalled git fetch ended: {e}");
                            self.start_fetch()
                        }
                        Err(e) => {
                            tracing::warn!("the stalled git fetch task: {e}");
                            self.start_fetch()
                        }
                    },
                    // Silent for so long the connection is likely dead (libgit2 sets no
                    // socket timeout): left to end on its own, and a new fetch starts.
                    Some((_, progress)) if progress.silent_for() >= self.stall * GIVE_UP_AFTER => {
                        tracing::warn!(
                            "a git fetch silent for {}s is left behind; fetching again",
                            progress.silent_for().as_secs()
                        );
                        self.start_fetch()
                    }
                    Some((task, progress)) => {
                        // Waited for again: it may go on if it hears from the server.
                        progress
                            .abandoned
                            .store(false, std::sync::atomic::Ordering::Relaxed);
                        (task, progress)
                    }
                    None => {
                        self.pace.wait().await;
                        self.start_fetch()
                    }
                };
                let started = std::time::Instant::now();
                let found = self.watch(task, progress).await;
                self.metrics.poll(found.is_ok(), started);
                if let Some(candidate) = found? {
                    return Ok(candidate);
                }
            }
        })
    }

    fn retry_delay(&mut self, failures: u32) -> std::time::Duration {
        self.pace.after_failure(failures, None)
    }

    fn settle(&mut self, candidate: Candidate, _outcome: &Ingested) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            self.last_commit = Some(candidate.key.clone());
        })
    }
}
