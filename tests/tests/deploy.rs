//! The install artifacts in deploy/: the systemd unit passes `systemd-analyze verify`, and the
//! install script places the binary, config, pinned root and unit with the right modes.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::{binary, repo, run};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

#[test]
fn the_systemd_unit_verifies() {
    let dir = tempfile::tempdir().unwrap();
    // verify checks that ExecStart's binary exists: point it at the one just built.
    let unit = std::fs::read_to_string(repo().join("deploy/systemd/outpost-agent.service"))
        .unwrap()
        .replace(
            "/usr/local/bin/outpost-agent",
            &binary("outpost-agent").display().to_string(),
        );
    for needle in [
        "Type=notify",
        "StateDirectory=outpost",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
    ] {
        assert!(unit.contains(needle), "the unit lacks {needle}");
    }
    let path = dir.path().join("outpost-agent.service");
    std::fs::write(&path, unit).unwrap();
    let result = run(Command::new("systemd-analyze").arg("verify").arg(&path));
    // verify exits 0 even for lines it ignores ("Failed to parse ..."): any output is a fault.
    assert!(
        result.code == 0 && result.stdout.trim().is_empty() && result.stderr.trim().is_empty(),
        "systemd-analyze verify: {}{}",
        result.stdout,
        result.stderr
    );
}

#[test]
fn the_install_script_places_everything() {
    let dir = tempfile::tempdir().unwrap();
    let (config, root) = (dir.path().join("agent.yaml"), dir.path().join("root.json"));
    std::fs::write(&config, "source: {dir: {path: /var/lib/outpost/drop}}\n").unwrap();
    std::fs::write(&root, "{}").unwrap();
    let dest = dir.path().join("root");
    run(Command::new("bash")
        .arg(repo().join("deploy/systemd/install.sh"))
        .arg("--binary")
        .arg(binary("outpost-agent"))
        .arg("--config")
        .arg(&config)
        .arg("--root")
        .arg(&root)
        .env("DESTDIR", &dest))
    .ok();
    for (path, mode) in [
        ("usr/local/bin/outpost-agent", 0o755),
        ("etc/outpost/agent.yaml", 0o640),
        ("etc/outpost/root.json", 0o644),
        ("etc/systemd/system/outpost-agent.service", 0o644),
        (
            "usr/local/share/bash-completion/completions/outpost-agent",
            0o644,
        ),
        ("usr/local/share/zsh/site-functions/_outpost-agent", 0o644),
        (
            "usr/local/share/fish/vendor_completions.d/outpost-agent.fish",
            0o644,
        ),
        ("usr/local/share/man/man1/outpost-agent.1.gz", 0o644),
    ] {
        let metadata = std::fs::metadata(dest.join(path)).unwrap();
        assert_eq!(metadata.permissions().mode() & 0o777, mode, "{path}");
    }
    // The completions know the commands; bash accepts the script; man renders the page.
    let share = dest.join("usr/local/share");
    let bash =
        std::fs::read_to_string(share.join("bash-completion/completions/outpost-agent")).unwrap();
    for command in ["approve", "rollback", "check-config", "completions"] {
        assert!(
            bash.contains(command),
            "{command} missing from the bash completions"
        );
    }
    run(Command::new("bash")
        .arg("-n")
        .arg(share.join("bash-completion/completions/outpost-agent")))
    .ok();
    let fish = std::fs::read_to_string(share.join("fish/vendor_completions.d/outpost-agent.fish"))
        .unwrap();
    assert!(fish.contains("complete -c outpost-agent"), "{fish}");
    let page = run(Command::new("sh").arg("-c").arg(format!(
        "gzip -dc {} | head -20",
        share.join("man/man1/outpost-agent.1.gz").display()
    )))
    .ok();
    assert!(
        page.stdout.contains(".TH outpost-agent 1"),
        "{}",
        page.stdout
    );
    // Missing inputs are refused with a one-line reason.
    run(Command::new("bash")
        .arg(repo().join("deploy/systemd/install.sh"))
        .args(["--binary", "/nonexistent", "--config", "x", "--root", "y"])
        .env("DESTDIR", &dest))
    .fails(1, "/nonexistent is not an executable");
}
