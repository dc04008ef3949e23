//! Reading hostile layouts shaped to amplify work (issue 10), each at two sizes: wall time and
//! peak RSS of reading and verifying the file as the agent does (`Layout::read_tar` with a spool,
//! then `verify`), with the agent's default limits. Each case runs in a child process of this
//! bench so that its peak RSS (VmHWM) is its own.
//!
//! `cargo bench -p outpost-tests --bench amplification` (or `tests/bench.sh amplification`).

#![allow(clippy::unwrap_used)] // bench code: a panic is a failed run

use outpost_bundle_format::crypto::PublicKey;
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_bundle_format::{Trust, verify};
use outpost_tests::forge::{
    layout_tar, many_signatures, release, reparse_amplification, signature_amplification, signed,
    tar, with_image,
};
use std::time::Instant;

const CHILD: &str = "OUTPOST_AMPLIFICATION_FILE";

/// A case: its name and how to make its file.
type Case = (String, Box<dyn Fn() -> Vec<u8>>);

fn main() {
    if let Some(file) = std::env::var_os(CHILD) {
        return measure(std::path::Path::new(&file));
    }
    let genuine = || signed(release("1.0.0", 1), &["vendor-a", "vendor-b"]);
    let cases: Vec<Case> = vec![
        (
            "genuine, 16 MiB image".into(),
            Box::new(move || {
                tar(&signed(
                    with_image(release("1.0.0", 1), 16 << 20),
                    &["vendor-a"],
                ))
            }),
        ),
        (
            "genuine, 256 MiB image".into(),
            Box::new(move || {
                tar(&signed(
                    with_image(release("1.0.0", 1), 256 << 20),
                    &["vendor-a"],
                ))
            }),
        ),
        (
            "signature amplification x2048".into(),
            Box::new(move || signature_amplification(&genuine(), 2048)),
        ),
        (
            "signature amplification x16384".into(),
            Box::new(move || signature_amplification(&genuine(), 16384)),
        ),
        (
            "re-parse x4096 of a 1 MB manifest".into(),
            Box::new(move || reparse_amplification(&genuine(), 4096, 8000)),
        ),
        (
            "re-parse x16384 of a 1 MB manifest".into(),
            Box::new(move || reparse_amplification(&genuine(), 16384, 8000)),
        ),
        (
            "64 MiB of 4 KiB blobs beside a bundle".into(),
            Box::new(move || small_blobs(&genuine(), 16 << 10)),
        ),
        (
            "256 MiB of 4 KiB blobs beside a bundle".into(),
            Box::new(move || small_blobs(&genuine(), 64 << 10)),
        ),
        (
            "signatures at the cap: 4 manifests x 64 layers".into(),
            Box::new(|| many_signatures(&release("1.0.0", 1), 4, 64)),
        ),
        (
            "signatures over the cap: 16 manifests x 4096 layers".into(),
            Box::new(|| many_signatures(&release("1.0.0", 1), 16, 4096)),
        ),
    ];
    let dir = tempfile::tempdir().unwrap();
    println!(
        "{:<52} {:>10} {:>10} {:>12}  outcome",
        "case", "tar MiB", "time ms", "peak RSS MiB"
    );
    for (name, make) in cases {
        let path = dir.path().join("case.tar");
        std::fs::write(&path, make()).unwrap();
        let size = std::fs::metadata(&path).unwrap().len() as f64 / (1 << 20) as f64;
        let output = std::process::Command::new(std::env::current_exe().unwrap())
            .env(CHILD, &path)
            .output()
            .unwrap();
        let report = String::from_utf8_lossy(&output.stdout);
        let mut fields = report.trim().splitn(3, ' ');
        let (ms, rss, outcome) = (
            fields.next().unwrap_or("?"),
            fields.next().unwrap_or("?"),
            fields.next().unwrap_or("?"),
        );
        println!("{name:<52} {size:>10.1} {ms:>10} {rss:>12}  {outcome}");
    }
}

/// `layout`'s tar with `count` distinct unreferenced 4 KiB blobs (digest-checked, then ignored).
fn small_blobs(layout: &Layout, count: u32) -> Vec<u8> {
    let mut blobs: Vec<Vec<u8>> = (0..count)
        .map(|i| {
            let mut blob = vec![0u8; 4096];
            blob[..4].copy_from_slice(&i.to_le_bytes());
            blob
        })
        .collect();
    for digest in layout.reachable(&Limits::default()).unwrap() {
        blobs.push(layout.read_blob(&digest, 1 << 20).unwrap());
    }
    let index = serde_json::to_vec(layout.index()).unwrap();
    layout_tar(&index, &blobs.iter().map(Vec::as_slice).collect::<Vec<_>>())
}

/// In the child: read and verify one file, print `<ms> <peak RSS MiB> <outcome>`.
fn measure(file: &std::path::Path) {
    let limits = Limits {
        max_blob_bytes: 16 << 30,
        max_total_bytes: 16 << 30,
        ..Limits::default()
    };
    // The public key only: decrypting a private key (scrypt) would dwarf what is measured.
    let pem = std::fs::read(outpost_tests::testdata().join("keys/vendor-a.pub")).unwrap();
    let trust = Trust::Keys {
        keys: vec![PublicKey::from_pem(&pem).unwrap()],
        threshold: 1,
    };
    let spool = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let reader = std::io::BufReader::new(std::fs::File::open(file).unwrap());
    let outcome = Layout::read_tar(reader, &limits, Some(spool.path()))
        .map_err(outpost_bundle_format::VerifyError::from)
        .and_then(|layout| verify(&layout, &trust, chrono::Utc::now(), &limits));
    let elapsed = start.elapsed();
    let outcome = match outcome {
        Ok(verified) => format!("verified {}", verified.metadata().version),
        Err(e) => format!("refused: {}: {}", e.check(), first_words(&e.to_string())),
    };
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let peak_kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    println!(
        "{:.0} {:.1} {outcome}",
        elapsed.as_secs_f64() * 1e3,
        peak_kib as f64 / 1024.0
    );
}

fn first_words(text: &str) -> String {
    text.chars().take(70).collect()
}
