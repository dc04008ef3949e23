//! The agent's resident memory between jobs. An idle agent is mostly pages of its own binary:
//! start-up, an ingest or a rollout runs code that idling never runs again, and the kernel's
//! readahead maps megabytes around each page of code it faults in (half the binary, on a disk
//! whose readahead is 8 MiB). Two pieces of advice to the kernel keep that down:
//! - [`read_code_page_by_page`] at start-up: `MADV_RANDOM` on the agent's read-only file
//!   mappings (its binary, its libraries), so a fault maps the page it needs, not its
//!   neighbourhood;
//! - [`trim_when_quiet`]: once nothing has been busy ([`Busy`]) for a few seconds, those
//!   mappings' pages that no other process maps are handed back (`MADV_PAGEOUT`; clean file
//!   pages, read again from disk if the code runs again) and the allocator returns its free heap.
//!
//! Neither changes what any memory holds: only read-only, private file mappings holding no
//! anonymous (written) page are advised. The kernel applies `MADV_PAGEOUT` to file pages only
//! for a process that could write the file (root, or the binary's owner); otherwise it is a
//! no-op and only the readahead advice helps.

// The one module of the agent with `unsafe`: two libc calls with no memory-safety contract to
// uphold beyond valid arguments (see each call).
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::Notify;

/// How long nothing must be busy before pages are handed back.
const QUIET: Duration = Duration::from_secs(5);

static ACTIVE: AtomicUsize = AtomicUsize::new(0);
static WOKEN: Notify = Notify::const_new();

/// Marks work that runs code idling does not (start-up, an ingest, a rollout): while one is
/// alive nothing is trimmed, and the next trim comes [`QUIET`] after the last is dropped.
#[must_use = "the work is busy only while this lives"]
pub struct Busy(());

impl Busy {
    pub fn start() -> Busy {
        ACTIVE.fetch_add(1, Ordering::SeqCst);
        WOKEN.notify_one();
        Busy(())
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        ACTIVE.fetch_sub(1, Ordering::SeqCst);
        WOKEN.notify_one();
    }
}

/// Trims [`QUIET`] after each busy spell ends, forever.
pub async fn trim_when_quiet() {
    loop {
        WOKEN.notified().await;
        loop {
            if ACTIVE.load(Ordering::SeqCst) > 0 {
                WOKEN.notified().await;
                continue;
            }
            tokio::select! {
                _ = WOKEN.notified() => continue,
                _ = tokio::time::sleep(QUIET) => break,
            }
        }
        match tokio::task::spawn_blocking(trim).await {
            Ok(Ok(advised)) => tracing::debug!("memory: handed back pages of {advised} mappings"),
            Ok(Err(e)) => tracing::debug!("memory: /proc/self/smaps: {e}"),
            Err(e) => tracing::debug!("memory: {e}"),
        }
    }
}

/// Asks the kernel not to read ahead around faults in the agent's own code.
pub fn read_code_page_by_page() {
    if let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") {
        advise(&smaps, libc::MADV_RANDOM);
    }
}

/// Hands back the pages of the agent's code that no other process maps, and the allocator's
/// free heap; returns how many mappings were advised.
pub fn trim() -> std::io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let advised = advise(&smaps, libc::MADV_PAGEOUT);
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(advised)
}

fn advise(smaps: &str, advice: libc::c_int) -> usize {
    let mut advised = 0;
    for (start, end) in code_mappings(smaps) {
        // SAFETY: [start, end) is a whole mapping the kernel listed for this process. The
        // advice given (MADV_RANDOM, MADV_PAGEOUT) never changes the contents of memory; were
        // the range unmapped meanwhile, the call fails with ENOMEM and nothing happens.
        let result = unsafe { libc::madvise(start as *mut libc::c_void, end - start, advice) };
        if result == 0 {
            advised += 1;
        }
    }
    advised
}

/// The read-only, private file mappings in `smaps` (`/proc/PID/smaps`) that hold no anonymous
/// page: code and read-only data of the binary and its libraries, never written memory.
fn code_mappings(smaps: &str) -> Vec<(usize, usize)> {
    let mut found = Vec::new();
    let mut candidate: Option<(usize, usize)> = None;
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let Some(first) = fields.next() else { continue };
        if let Some((start, end)) = first.split_once('-')
            && let (Ok(start), Ok(end)) = (
                usize::from_str_radix(start, 16),
                usize::from_str_radix(end, 16),
            )
        {
            // A mapping: range, perms, offset, device, inode, path.
            found.extend(candidate.take());
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let read_only_private = perms.starts_with("r-") && perms.ends_with('p');
            if read_only_private && path.starts_with('/') && end > start {
                candidate = Some((start, end));
            }
        } else if first == "Anonymous:" && fields.next().is_some_and(|kib| kib != "0") {
            candidate = None;
        }
    }
    found.extend(candidate);
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_read_only_private_file_mappings_without_written_pages_are_advised() {
        let smaps = "\
55d0c0000000-55d0c0200000 r--p 00000000 fe:01 42 /usr/bin/outpost-agent
Rss:                 512 kB
Anonymous:             0 kB
55d0c0200000-55d0c1000000 r-xp 00200000 fe:01 42 /usr/bin/outpost-agent
Anonymous:             0 kB
55d0c1000000-55d0c1200000 r--p 01000000 fe:01 42 /usr/bin/outpost-agent
Anonymous:          1948 kB
55d0c1200000-55d0c1210000 rw-p 01200000 fe:01 42 /usr/bin/outpost-agent
Anonymous:            40 kB
55d0c2000000-55d0c2100000 rw-p 00000000 00:00 0 [heap]
Anonymous:           796 kB
7f0000000000-7f0000008000 rw-s 00000000 fe:01 77 /var/lib/outpost/state.db-shm
Anonymous:             0 kB
7f0000100000-7f0000200000 r-xp 00000000 fe:01 88 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000300000-7f0000301000 r--p 00000000 00:00 0
Anonymous:             0 kB
";
        assert_eq!(
            code_mappings(smaps),
            vec![
                (0x55d0c0000000, 0x55d0c0200000),
                (0x55d0c0200000, 0x55d0c1000000),
                (0x7f0000100000, 0x7f0000200000),
            ]
        );
    }

    #[test]
    fn a_trim_advises_this_process_code_and_unmaps_nothing() {
        let before = std::fs::read_to_string("/proc/self/maps").unwrap();
        read_code_page_by_page();
        let advised = trim().unwrap();
        assert!(
            advised > 0,
            "no code mapping of the test binary was advised"
        );
        // Advice only: every code mapping is still there (its pages are read again as it runs).
        let after = std::fs::read_to_string("/proc/self/maps").unwrap();
        let code = |maps: &str| -> Vec<String> {
            maps.lines()
                .filter(|l| l.contains(" r-xp ") && l.contains('/'))
                .map(str::to_string)
                .collect()
        };
        assert_eq!(code(&after), code(&before));
    }
}
