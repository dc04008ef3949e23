//! Source: where candidate bundles come from. One small trait; one file per implementation
//! (`dir`, `oci`, `git`) plus a fake for tests. A source waits for something new, hands over a
//! layout read within the limits, and is told what became of it. Errors go back to the daemon,
//! which backs off; the running release is never touched by a source.

pub mod dir;
pub mod fake;
pub mod git;
pub mod oci;

use outpost_bundle_format::layout::Layout;
use std::future::Future;
use std::pin::Pin;

/// What became of a candidate: the pipeline's verdict, which the source is told (`settle`).
#[derive(Debug, Clone, PartialEq)]
pub enum Ingested {
    Accepted {
        digest: outpost_bundle_format::Digest,
        version: String,
        waiting_for: Option<String>,
    },
    /// The current or pending release again: nothing to do.
    Unchanged {
        digest: outpost_bundle_format::Digest,
    },
    Rejected {
        digest: Option<outpost_bundle_format::Digest>,
        check: String,
        reason: String,
    },
}

impl Ingested {
    /// One line for logs and `.reason` files.
    pub fn describe(&self) -> String {
        match self {
            Ingested::Accepted {
                digest,
                version,
                waiting_for: None,
            } => format!("accepted {version} {digest}"),
            Ingested::Accepted {
                digest,
                version,
                waiting_for: Some(w),
            } => format!("accepted {version} {digest}, waiting for {w}"),
            Ingested::Unchanged { digest } => {
                format!("unchanged: {digest} is already current, pending or rolled back")
            }
            Ingested::Rejected { check, reason, .. } => format!("rejected: {check}: {reason}"),
        }
    }

    /// Signature-related rejections may be cured by more signatures under the same digest.
    pub fn wants_more_signatures(&self) -> bool {
        matches!(self, Ingested::Rejected { check, .. } if ["unsigned", "untrusted-signature", "threshold-unmet", "signature-mismatch"].contains(&check.as_str()))
    }
}

/// The source `config.source` describes, with downloads spooled under `state_dir/tmp`, counting
/// its polls in `metrics`.
pub fn from_config(
    config: &crate::config::Config,
    limits: outpost_bundle_format::Limits,
    metrics: std::sync::Arc<crate::metrics::Metrics>,
) -> Result<Box<dyn Source>, SourceError> {
    use crate::config::SourceConfig;
    let spool = config.state_dir.join("tmp");
    std::fs::create_dir_all(&spool)
        .map_err(|e| SourceError(format!("{}: {e}", spool.display())))?;
    Ok(match &config.source {
        SourceConfig::Dir { path } => Box::new(
            dir::DirSource::new(
                path,
                limits,
                spool,
                config.state_dir.join("dir-source.reading"),
            )?
            .with_metrics(metrics),
        ),
        SourceConfig::Oci(oci) => Box::new(oci::OciSource::new(oci, limits)?.with_metrics(metrics)),
        SourceConfig::Git(git) => {
            Box::new(git::GitSource::new(git, &config.state_dir, limits)?.with_metrics(metrics))
        }
    })
}

/// Whether reading a bundle failed because the agent's own disk is full: the bundle is not at
/// fault, so it is read again later rather than rejected.
pub(crate) fn out_of_space(
    layout: &Result<Layout, outpost_bundle_format::layout::LayoutError>,
) -> bool {
    matches!(
        layout,
        Err(outpost_bundle_format::layout::LayoutError::Io { source, .. })
            if matches!(source.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
    )
}

/// A reader that reports the bytes read through it as the download in progress.
pub struct Counted<'a, R> {
    pub inner: R,
    pub metrics: &'a crate::metrics::Metrics,
}

impl<R: std::io::Read> std::io::Read for Counted<'_, R> {
    fn read(&mut self, buffer: &mut [u8]) -> std::io::Result<usize> {
        let read = self.inner.read(buffer)?;
        self.metrics.download_advanced(read as u64);
        Ok(read)
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// A bundle a source found, not yet verified.
pub struct Candidate {
    /// Where it came from, for records: a file path, `oci://...@sha256:...`, `git ...@commit`.
    pub origin: String,
    /// The layout, or why it could not be read (recorded as a rejection).
    pub layout: Result<Layout, outpost_bundle_format::layout::LayoutError>,
    /// Keeps large blobs spooled on disk alive while the candidate is processed.
    pub spool: Option<tempfile::TempDir>,
    /// The digest the source addressed the bundle by, when it has one (a registry does).
    pub digest: Option<outpost_bundle_format::Digest>,
    /// Source-specific identity (file name, manifest digest, commit id).
    pub key: String,
    /// Set while an input is read and judged; gone once the candidate is settled or dropped.
    pub reading: Option<ReadingMarker>,
    /// The dropped file itself (the file-drop source), by its real name.
    pub file: Option<std::path::PathBuf>,
}

/// A crash marker: a small file naming the input being read, removed when its candidate is
/// dropped. One found at start names an input its reader died on (a crash, a kill), which is
/// then filed rather than read again, so an input that kills the agent cannot do so at every
/// restart.
pub struct ReadingMarker {
    path: std::path::PathBuf,
}

impl ReadingMarker {
    /// Records (fsynced) that `input` is about to be read.
    pub fn begin(path: &std::path::Path, input: &[u8]) -> Result<ReadingMarker, SourceError> {
        outpost_bundle_format::layout::write_atomic(path, input)
            .map_err(|e| SourceError(format!("{}: {e}", path.display())))?;
        Ok(ReadingMarker {
            path: path.to_path_buf(),
        })
    }

    /// The input a previous run was reading when it died, if any; the marker is removed.
    pub fn left_behind(path: &std::path::Path) -> Option<Vec<u8>> {
        let input = std::fs::read(path).ok()?;
        let _ = std::fs::remove_file(path);
        Some(input)
    }
}

impl Drop for ReadingMarker {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Paces a polling source: the first poll at once, then one per interval.
pub struct Pace {
    interval: std::time::Duration,
    started: bool,
}

impl Pace {
    pub fn new(interval: std::time::Duration) -> Pace {
        Pace {
            interval,
            started: false,
        }
    }

    pub async fn wait(&mut self) {
        if std::mem::replace(&mut self.started, true) {
            tokio::time::sleep(self.interval).await;
        }
    }

    /// How long to wait after the `failures`-th failed poll in a row; the next poll follows the
    /// wait at once. The backoff is capped at the interval, so a source recovers within one
    /// interval of the fault clearing (after a few failures it polls as often as when healthy);
    /// a server's `Retry-After` (already capped by the client) is honoured in full.
    pub fn after_failure(
        &mut self,
        failures: u32,
        asked: Option<std::time::Duration>,
    ) -> std::time::Duration {
        self.started = false;
        let backoff = crate::backoff::delay(failures).min(self.interval);
        asked.map_or(backoff, |asked| asked.max(backoff))
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

pub trait Source: Send {
    /// Short description for status and logs (`dir /srv/drop`, `oci 127.0.0.1:5000/acme:stable`).
    fn describe(&self) -> String;
    /// Waits until there is a candidate (sleeping its own poll interval when nothing changed).
    fn next(&mut self) -> BoxFuture<'_, Result<Candidate, SourceError>>;
    /// What became of the candidate (the dir source files it away; others remember it).
    fn settle(&mut self, candidate: Candidate, outcome: &Ingested) -> BoxFuture<'_, ()>;
    /// How long to wait after `next` failed for the `failures`-th time in a row.
    fn retry_delay(&mut self, failures: u32) -> std::time::Duration {
        crate::backoff::delay(failures)
    }
}

#[cfg(test)]
mod tests {
    use super::Pace;
    use std::time::Duration;

    #[test]
    fn failed_polls_back_off_within_the_interval_or_as_asked() {
        let mut pace = Pace::new(Duration::from_secs(2));
        for failures in 1..12 {
            let wait = pace.after_failure(failures, None);
            assert!(wait >= Duration::from_millis(500) && wait <= Duration::from_secs(2));
            assert!(!pace.started, "the next poll follows the backoff at once");
        }
        let asked = Duration::from_secs(7);
        assert_eq!(pace.after_failure(3, Some(asked)), asked);
        let mut slow = Pace::new(Duration::from_secs(3600));
        assert!(slow.after_failure(20, None) <= Duration::from_secs(450));
    }
}
