//! The agent's resident memory between jobs. An idle agent is mostly pages of its own binary:
//! start-up, an ingest or a rollout runs code that idling never runs again, and the kernel maps
//! more than the page each fault needs: it reads around it (half the binary, on a disk whose
//! readahead is 8 MiB) and maps up to 16 of its neighbours already in the page cache. So:
//! - [`read_code_page_by_page`] at start-up: `MADV_RANDOM` on the file mappings (the binary,
//!   its libraries), so that a fault reads and maps only its page. Recent kernels (6.18 here)
//!   read around faults in executable mappings and map cached neighbours whatever the advice:
//!   there it holds for read-only data only;
//! - [`trim_when_quiet`]: once nothing has been busy ([`Busy`]) for a few seconds, the loaded
//!   objects' code pages are unmapped (`MADV_DONTNEED`; mapped again from the file if that code
//!   runs again), the binary's unmapped pages leave the page cache (else a later fault maps
//!   their cached neighbours with it), and the allocator returns its free heap.
//!
//! Neither changes what any memory holds: only read-only, private file mappings holding no
//! anonymous (written) page are unmapped, so their contents are the file's. Both work for any
//! user, root or not.

// The one module of the agent with `unsafe`: libc calls that take no pointer to Rust data or
// take the loader's own records (see each call).
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
            Ok(Ok(unmapped)) => tracing::debug!("memory: unmapped {unmapped} ranges of code"),
            Ok(Err(e)) => tracing::debug!("memory: /proc/self/smaps: {e}"),
            Err(e) => tracing::debug!("memory: {e}"),
        }
    }
}

/// Asks the kernel not to read ahead around faults in the agent's binary and libraries.
pub fn read_code_page_by_page() {
    if let Ok(smaps) = std::fs::read_to_string("/proc/self/smaps") {
        for FileMapping { start, end, .. } in file_mappings(&smaps) {
            // SAFETY: MADV_RANDOM only changes how faults in [start, end) read the file, never
            // what memory holds; were the range unmapped meanwhile, the call fails (ENOMEM).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_RANDOM) };
        }
    }
}

/// Unmaps the code of the binary and its libraries, drops the binary's unmapped pages from the
/// page cache and returns the allocator's free heap; returns how many ranges were unmapped.
pub fn trim() -> std::io::Result<usize> {
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let binary = std::fs::File::open("/proc/self/exe").ok();
    let unmapped = unmap_loaded_code(&code_mappings(&smaps), binary.as_ref());
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes no pointer and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
    Ok(unmapped)
}

/// What [`unmap_object_code`] is given for each loaded object.
struct Unmapping<'a> {
    /// Mappings that may be unmapped: [`code_mappings`].
    unwritten: &'a [(usize, usize)],
    /// The binary, to drop its unmapped pages from the page cache once they are unmapped.
    binary: Option<&'a std::fs::File>,
    page: usize,
    unmapped: usize,
}

/// `MADV_DONTNEED` on the read-only segments of every loaded object (the binary, its libraries),
/// where they lie in `unwritten`.
fn unmap_loaded_code(unwritten: &[(usize, usize)], binary: Option<&std::fs::File>) -> usize {
    // SAFETY: sysconf takes no pointer.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
    let mut unmapping = Unmapping {
        unwritten,
        binary,
        page,
        unmapped: 0,
    };
    // SAFETY: the callback is called during this call only, with `unmapping` alive throughout.
    unsafe { libc::dl_iterate_phdr(Some(unmap_object_code), (&raw mut unmapping).cast()) };
    unmapping.unmapped
}

/// Called by the loader for each loaded object, holding the loader's lock: no object is
/// unloaded (and its address range given to another mapping) while its pages are advised.
unsafe extern "C" fn unmap_object_code(
    info: *mut libc::dl_phdr_info,
    _size: libc::size_t,
    data: *mut libc::c_void,
) -> libc::c_int {
    // SAFETY: the loader passes a valid record; `data` is the `Unmapping` given to
    // dl_iterate_phdr by `unmap_loaded_code`, borrowed by nothing else meanwhile.
    let (info, unmapping) = unsafe { (&*info, &mut *data.cast::<Unmapping>()) };
    let headers = if info.dlpi_phdr.is_null() {
        &[][..]
    } else {
        // SAFETY: the loader's record lists `dlpi_phnum` program headers at `dlpi_phdr`.
        unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
    };
    let page = unmapping.page;
    let read_only = headers
        .iter()
        .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0);
    for header in read_only {
        let start = info.dlpi_addr.wrapping_add(header.p_vaddr) as usize;
        let end = start.saturating_add(header.p_memsz as usize);
        let (start, end) = (
            start & !(page - 1),
            end.saturating_add(page - 1) & !(page - 1),
        );
        for &(from, to) in unmapping.unwritten {
            let (from, to) = (from.max(start), to.min(end));
            // SAFETY: [from, to) is page-aligned, in a read-only private file mapping that held
            // no written page when listed and belongs to an object that stays loaded for this
            // call. MADV_DONTNEED there only drops the page table entries: the next access maps
            // the file's page again, with the same contents.
            if from < to
                && unsafe {
                    libc::madvise(from as *mut libc::c_void, to - from, libc::MADV_DONTNEED)
                } == 0
            {
                unmapping.unmapped += 1;
            }
        }
    }
    // The main program comes first, named "". Its pages leave the page cache right after they
    // are unmapped: a page faulted in before then (the code running this) keeps the cached
    // folio holding it, and later faults map that folio's neighbours too.
    // SAFETY: a name the loader gives is a NUL-terminated string.
    if !info.dlpi_name.is_null()
        && unsafe { *info.dlpi_name } == 0
        && let Some(binary) = unmapping.binary
    {
        forget_cached(binary);
    }
    0
}

/// Drops `file`'s pages that no process maps from the page cache: the kernel maps cached
/// neighbours of a faulted page whatever the readahead advice, and the whole binary is cached
/// after start-up.
fn forget_cached(file: &std::fs::File) {
    use std::os::fd::AsRawFd;
    // SAFETY: an open descriptor and no pointer; the advice only drops clean, unmapped pages.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
}

/// A private mapping of a file (the binary, a library), from `/proc/self/smaps`.
#[derive(Debug, PartialEq)]
struct FileMapping {
    start: usize,
    end: usize,
    /// Not writable, and no page of it written (made anonymous) by the loader or anyone.
    unwritten: bool,
}

/// The private file mappings in `smaps` (`/proc/PID/smaps`).
fn file_mappings(smaps: &str) -> Vec<FileMapping> {
    let mut found: Vec<FileMapping> = Vec::new();
    // Whether the mapping whose fields follow is the last one found.
    let mut in_found = false;
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
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            in_found = perms.ends_with('p') && path.starts_with('/') && end > start;
            if in_found {
                found.push(FileMapping {
                    start,
                    end,
                    unwritten: perms.starts_with("r-"),
                });
            }
        } else if in_found
            && first == "Anonymous:"
            && fields.next().is_some_and(|kib| kib != "0")
            && let Some(last) = found.last_mut()
        {
            last.unwritten = false;
        }
    }
    found
}

/// The read-only file mappings holding no written page: code and read-only data of the binary
/// and its libraries, whose contents are the file's.
fn code_mappings(smaps: &str) -> Vec<(usize, usize)> {
    file_mappings(smaps)
        .into_iter()
        .filter(|m| m.unwritten)
        .map(|m| (m.start, m.end))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_is_the_read_only_private_file_mappings_without_written_pages() {
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
Anonymous:             4 kB
";
        assert_eq!(
            code_mappings(smaps),
            vec![
                (0x55d0c0000000, 0x55d0c0200000),
                (0x55d0c0200000, 0x55d0c1000000),
                (0x7f0000100000, 0x7f0000200000),
            ]
        );
        // Read ahead for none: every private file mapping, written or not.
        let advised: Vec<(usize, bool)> = file_mappings(smaps)
            .iter()
            .map(|m| (m.start, m.unwritten))
            .collect();
        assert_eq!(
            advised,
            vec![
                (0x55d0c0000000, true),
                (0x55d0c0200000, true),
                (0x55d0c1000000, false),
                (0x55d0c1200000, false),
                (0x7f0000100000, true),
            ]
        );
    }

    /// Resident KiB of this test binary's code, from `/proc/self/smaps`.
    fn resident_code_kib() -> u64 {
        let binary = std::fs::read_link("/proc/self/exe").unwrap();
        let binary = binary.to_str().unwrap();
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let mut in_code = false;
        let mut kib = 0;
        for line in smaps.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            if fields
                .first()
                .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
            {
                in_code = fields.get(1) == Some(&"r-xp") && fields.last() == Some(&binary);
            } else if in_code && fields.first() == Some(&"Rss:") {
                kib += fields[1].parse::<u64>().unwrap();
            }
        }
        kib
    }

    #[test]
    fn a_trim_unmaps_code_pages_and_no_mapping() {
        let before = std::fs::read_to_string("/proc/self/maps").unwrap();
        read_code_page_by_page();
        let resident_before = resident_code_kib();
        let unmapped = trim().unwrap();
        let resident_after = resident_code_kib();
        assert!(
            unmapped > 0,
            "no code range of the test binary was unmapped"
        );
        assert!(
            resident_after < resident_before,
            "the test binary's code stayed resident: {resident_before} KiB before the trim, \
             {resident_after} KiB after"
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
