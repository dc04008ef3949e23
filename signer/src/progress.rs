//! Progress of long transfers (`build --with-images`, `push`): on a terminal, a bar per blob
//! with bytes, rate and time left; otherwise one plain line when a large blob (over 1 MiB)
//! starts and one when it is done, so a log shows the long waits and small blobs stay quiet;
//! `--quiet` asks for those plain lines on a terminal too. Always on stderr, so stdout stays
//! what scripts read.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::time::Instant;

/// Blobs up to this size get no plain lines (they take no time worth reporting).
const LINE_THRESHOLD: u64 = 1 << 20;

pub struct Progress {
    bars: Option<MultiProgress>,
    lines: bool,
}

impl Progress {
    pub fn new(quiet: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        Progress {
            bars: (!quiet && terminal)
                .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            lines: quiet || !terminal,
        }
    }

    /// A transfer of `total` bytes, named `what`.
    pub fn transfer(&self, what: &str, total: u64) -> Transfer {
        let bar = self.bars.as_ref().map(|bars| {
            let bar = bars.add(ProgressBar::new(total));
            let style = ProgressStyle::with_template(
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_message(what.to_string());
            bar
        });
        let lines = self.lines && total > LINE_THRESHOLD;
        if lines {
            eprintln!("{what}: {total} bytes");
        }
        Transfer {
            bar,
            lines,
            what: what.to_string(),
            done: 0,
            started: Instant::now(),
        }
    }
}

pub struct Transfer {
    bar: Option<ProgressBar>,
    lines: bool,
    what: String,
    done: u64,
    started: Instant,
}

impl Transfer {
    pub fn advance(&mut self, bytes: u64) {
        self.done += bytes;
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
    }

    pub fn finish(self) {
        if let Some(bar) = &self.bar {
            bar.finish();
        }
        if self.lines {
            let seconds = self.started.elapsed().as_secs_f64();
            let rate = if seconds > 0.0 {
                self.done as f64 / seconds / (1 << 20) as f64
            } else {
                0.0
            };
            eprintln!(
                "{}: done, {} bytes in {seconds:.1} s ({rate:.1} MiB/s)",
                self.what, self.done
            );
        }
    }
}
