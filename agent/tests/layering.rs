//! The agent's house rules, read from its sources: modules import only downward (in the order
//! below), so there is no cycle and `runtime/` and `source/` know nothing of the pipeline, the
//! rollout, the daemon, the API or the CLI; no source file has more than 700 lines of
//! non-test code; and only `memory.rs` has `unsafe` code. `cargo test -p outpost-agent --test layering`.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each module may use the modules before it, never one after it.
const ORDER: &[&str] = &[
    "config", "state", "plan", "diff", "status", "metrics", "backoff", "forward", "logging",
    "memory", "runtime", "source", "approval", "rollout", "pipeline", "api", "daemon", "cli",
];

const MAX_LINES: usize = 700;

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The file's code before its test module (files named `*tests.rs` are all test code).
fn non_test_code(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap();
    if path
        .file_name()
        .unwrap()
        .to_string_lossy()
        .ends_with("tests.rs")
    {
        return String::new();
    }
    match text.find("\n#[cfg(test)]\n") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

#[test]
fn modules_import_only_downward_and_stay_small() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let rank: BTreeMap<&str, usize> = ORDER.iter().enumerate().map(|(i, m)| (*m, i)).collect();
    let mut problems = Vec::new();
    for path in &files {
        let relative = path.strip_prefix(&src).unwrap();
        let module = relative
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        let code = non_test_code(path);
        let lines = code.lines().count();
        if lines > MAX_LINES {
            problems.push(format!(
                "{}: {lines} lines of non-test code (at most {MAX_LINES})",
                relative.display()
            ));
        }
        let text = std::fs::read_to_string(path).unwrap();
        if module != "memory" && (text.contains("unsafe {") || text.contains("allow(unsafe_code)"))
        {
            problems.push(format!(
                "{}: unsafe code outside src/memory.rs",
                relative.display()
            ));
        }
        if matches!(module.as_str(), "lib" | "main" | "testing") {
            continue;
        }
        let Some(&own) = rank.get(module.as_str()) else {
            problems.push(format!(
                "{}: module {module} is not in ORDER",
                relative.display()
            ));
            continue;
        };
        for (at, _) in code.match_indices("crate::") {
            let used: String = code[at + 7..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            if used == module {
                continue;
            }
            match rank.get(used.as_str()) {
                Some(&other) if other < own => {}
                Some(_) => problems.push(format!(
                    "{}: {module} uses crate::{used}, which comes after it",
                    relative.display()
                )),
                None => problems.push(format!(
                    "{}: crate::{used} is not in ORDER",
                    relative.display()
                )),
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}
