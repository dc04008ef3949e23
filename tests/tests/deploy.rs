//! The install artifacts in deploy/: the systemd unit passes `systemd-analyze verify`, the
//! install script places the binary, config, pinned root, unit, completions and man page with
//! the right modes, and the Debian packages build reproducibly, install, run and remove cleanly
//! (system-wide: that test refuses to run where an agent is installed).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_tests::{binary, repo, run};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
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

/// The Debian packages: built twice from the same binaries they are the same bytes; installed
/// with dpkg the agent's unit passes `systemd-analyze verify`, nothing unconfigured is started,
/// the installed binary runs an agent; removed, the binaries go and the state stays.
#[test]
fn debian_packages_install_run_and_remove_cleanly() {
    // It installs system-wide: never where an agent is installed or has state.
    let present = Command::new("dpkg")
        .args(["-s", "outpost-agent"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        !present && !Path::new("/var/lib/outpost").exists() && !Path::new("/etc/outpost").exists(),
        "refusing to run: this machine has outpost-agent installed or its state (/var/lib/outpost, /etc/outpost)"
    );
    let dir = tempfile::tempdir().unwrap();
    let build = |out: &Path| {
        run(Command::new("bash")
            .arg(repo().join("deploy/debian/build.sh"))
            .arg("--agent")
            .arg(binary("outpost-agent"))
            .arg("--signer")
            .arg(binary("outpost-signer"))
            .arg("--out")
            .arg(out)
            .env("DEB_COMPRESSION", "gzip")
            .env("SOURCE_DATE_EPOCH", "1700000000"))
        .ok()
    };
    let (first, second) = (dir.path().join("first"), dir.path().join("second"));
    build(&first);
    build(&second);
    let version = env!("CARGO_PKG_VERSION");
    let arch = run(Command::new("dpkg").arg("--print-architecture"))
        .ok()
        .stdout;
    let agent_deb = format!("outpost-agent_{version}_{}.deb", arch.trim());
    let signer_deb = format!("outpost-signer_{version}_{}.deb", arch.trim());
    for deb in [&agent_deb, &signer_deb] {
        assert_eq!(
            std::fs::read(first.join(deb)).unwrap(),
            std::fs::read(second.join(deb)).unwrap(),
            "{deb} is not reproducible"
        );
    }

    let installed = run(Command::new("dpkg")
        .arg("-i")
        .arg(first.join(&agent_deb))
        .arg(first.join(&signer_deb)))
    .ok();
    // Unconfigured: nothing started, and the customer is told what to do.
    assert!(
        installed.stderr.contains("write /etc/outpost/agent.yaml"),
        "{}",
        installed.stderr
    );
    let cleanup = Purge;
    for path in [
        "/usr/bin/outpost-agent",
        "/usr/bin/outpost-signer",
        "/lib/systemd/system/outpost-agent.service",
        "/etc/outpost/agent.example.yaml",
        "/usr/share/bash-completion/completions/outpost-agent",
        "/usr/share/man/man1/outpost-signer.1.gz",
        "/var/lib/outpost",
    ] {
        assert!(Path::new(path).exists(), "{path} not installed");
    }
    let verify = run(Command::new("systemd-analyze")
        .arg("verify")
        .arg("/lib/systemd/system/outpost-agent.service"));
    assert!(
        verify.code == 0 && verify.stdout.trim().is_empty() && verify.stderr.trim().is_empty(),
        "systemd-analyze verify: {}{}",
        verify.stdout,
        verify.stderr
    );
    // The installed binary runs an agent (in a directory of the test's own).
    let work = tempfile::tempdir().unwrap();
    let keys = outpost_tests::testdata().join("keys");
    let config = work.path().join("agent.yaml");
    std::fs::create_dir(work.path().join("drop")).unwrap();
    std::fs::write(
        &config,
        format!(
            "source: {{dir: {{path: drop}}}}\ntrust: {{keys: [{}]}}\nexpect: {{name: acme}}\nstate_dir: state\napi: {{socket: agent.sock}}\n",
            keys.join("vendor-a.pub").display()
        ),
    )
    .unwrap();
    run(Command::new("/usr/bin/outpost-agent")
        .args(["check-config", "--config"])
        .arg(&config))
    .ok();
    let mut agent = Command::new("/usr/bin/outpost-agent")
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let status = outpost_tests::poll_within(20, || {
        let status = run(Command::new("/usr/bin/outpost-agent")
            .args(["status", "--config"])
            .arg(&config));
        (status.code == 0).then_some(status.stdout)
    });
    let _ = agent.kill();
    let _ = agent.wait();
    assert!(status.is_some_and(|s| s.contains("current:   none")));

    // Removed: the binaries go, the state and the configuration stay; purged: the
    // configuration goes, the state still stays.
    std::fs::write("/var/lib/outpost/state.db", b"kept").unwrap();
    std::fs::write("/etc/outpost/agent.yaml", b"kept").unwrap();
    run(Command::new("dpkg").args(["-r", "outpost-agent", "outpost-signer"])).ok();
    assert!(!Path::new("/usr/bin/outpost-agent").exists());
    assert!(!Path::new("/usr/bin/outpost-signer").exists());
    assert!(Path::new("/var/lib/outpost/state.db").exists());
    assert!(Path::new("/etc/outpost/agent.yaml").exists());
    run(Command::new("dpkg").args(["-P", "outpost-agent"])).ok();
    assert!(!Path::new("/etc/outpost/agent.yaml").exists());
    assert!(Path::new("/var/lib/outpost/state.db").exists());
    drop(cleanup);
}

/// Leaves the machine as the test found it, whatever happened.
struct Purge;

impl Drop for Purge {
    fn drop(&mut self) {
        let _ = Command::new("dpkg")
            .args(["-P", "outpost-agent", "outpost-signer"])
            .output();
        let _ = std::fs::remove_dir_all("/var/lib/outpost");
        let _ = std::fs::remove_dir_all("/etc/outpost");
    }
}
