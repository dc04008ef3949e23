//! The agent following a git ref over file://, git:// (`git daemon`) and smart HTTP with basic
//! auth (`git http-backend` behind tests/scripts/git-http.py), all on 127.0.0.1: the attack suite
//! through each, bundles as a tar file or a layout directory, and bad credentials.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use outpost_bundle_format::layout::Layout;
use outpost_tests::agent::{AgentProcess, basic_auth};
use outpost_tests::forge::{attacks, release, signed, tar};
use outpost_tests::{free_port, repo, run, tool};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const BOTH: [&str; 2] = ["vendor-a", "vendor-b"];

/// A bare repository `vendor.git` under a served root, and the vendor's working clone.
struct VendorRepo {
    root: tempfile::TempDir,
    work: PathBuf,
}

fn git(dir: &Path, args: &[&str]) {
    run(tool("git")
        .current_dir(dir)
        .args(args)
        .env("GIT_AUTHOR_NAME", "vendor")
        .env("GIT_AUTHOR_EMAIL", "v@example.com")
        .env("GIT_COMMITTER_NAME", "vendor")
        .env("GIT_COMMITTER_EMAIL", "v@example.com"))
    .ok();
}

impl VendorRepo {
    fn new() -> VendorRepo {
        let root = tempfile::tempdir().unwrap();
        git(
            root.path(),
            &["init", "-q", "--bare", "-b", "main", "vendor.git"],
        );
        let work = root.path().join("work");
        git(root.path(), &["clone", "-q", "vendor.git", "work"]);
        git(&work, &["checkout", "-q", "-b", "main"]);
        VendorRepo { root, work }
    }

    fn bare(&self) -> PathBuf {
        self.root.path().join("vendor.git")
    }

    /// Commits `bytes` as outpost/bundle.tar on main and pushes.
    fn publish(&self, bytes: &[u8], message: &str) {
        std::fs::create_dir_all(self.work.join("outpost")).unwrap();
        std::fs::write(self.work.join("outpost/bundle.tar"), bytes).unwrap();
        self.commit(message);
    }

    /// Commits `layout` as the directory outpost/bundle on main and pushes.
    fn publish_dir(&self, layout: &Layout, message: &str) {
        let dir = self.work.join("outpost/bundle");
        let _ = std::fs::remove_dir_all(&dir);
        layout.write_dir(&dir).unwrap();
        self.commit(message);
    }

    fn commit(&self, message: &str) {
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.work, &["push", "-q", "origin", "main"]);
    }
}

/// A server process killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_port(port: u16) {
    outpost_tests::eventually(&format!("a listener on {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
    });
}

fn git_daemon(root: &Path) -> (Server, u16) {
    let port = free_port();
    // git-daemon itself, not the `git` wrapper: killing the wrapper would orphan the daemon.
    let exec_path = run(tool("git").arg("--exec-path"))
        .ok()
        .stdout
        .trim()
        .to_string();
    let child = Command::new(Path::new(&exec_path).join("git-daemon"))
        .args(["--reuseaddr", "--export-all", "--listen=127.0.0.1"])
        .arg(format!("--port={port}"))
        .arg(format!("--base-path={}", root.display()))
        .arg(root)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_port(port);
    (server, port)
}

fn git_http(root: &Path, auth: &str) -> (Server, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .arg(repo().join("tests/scripts/git-http.py"))
        .arg(root)
        .arg(port.to_string())
        .arg(auth)
        .spawn()
        .unwrap();
    let server = Server(child);
    wait_port(port);
    (server, port)
}

fn git_agent(url: &str, path: &str, auth: &str) -> AgentProcess {
    AgentProcess::start(
        &format!(
            "source:\n  git:\n    url: {url}\n    ref: main\n    path: {path}\n    interval: 200ms\n{auth}"
        ),
        "",
    )
}

/// v1, v2, then every attack, then v3: each attack rejected by its check, nothing else moved.
fn attack_suite(vendor: &VendorRepo, agent: &AgentProcess) {
    let v1 = signed(release("1.0.0", 1), &BOTH);
    vendor.publish(&tar(&v1), "1.0.0");
    agent.wait_current(1);
    vendor.publish(&tar(&signed(release("1.1.0", 2), &BOTH)), "1.1.0");
    let before = agent.wait_current(2)["current"].clone();
    for attack in attacks(3, &v1) {
        let rejected = agent.rejected_total();
        vendor.publish(&attack.tar, attack.name);
        // The counter moves after the rejection is recorded: read the status after it.
        agent.wait_for(attack.name, |_| agent.rejected_total() > rejected);
        let status = agent.status();
        assert_eq!(
            status["last_rejection"]["check"], attack.check,
            "{}: {status:#}",
            attack.name
        );
        assert!(
            status["last_rejection"]["reason"]
                .as_str()
                .is_some_and(|r| !r.is_empty())
        );
        assert_eq!(status["current"], before, "{}", attack.name);
        assert_eq!(status["pending"], Value::Null, "{}", attack.name);
    }
    vendor.publish(&tar(&signed(release("1.2.0", 3), &BOTH)), "1.2.0");
    agent.wait_current(3);
    // A commit that does not change the bundle is a no-op.
    vendor.commit("docs only");
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(agent.status()["current"]["sequence"], 3);
}

#[test]
fn attack_suite_over_file_url() {
    let vendor = VendorRepo::new();
    let agent = git_agent(
        &format!("file://{}", vendor.bare().display()),
        "outpost/bundle.tar",
        "",
    );
    attack_suite(&vendor, &agent);
    assert!(
        agent.status()["current"]["origin"]
            .as_str()
            .unwrap()
            .starts_with("git file://")
    );
}

#[test]
fn attack_suite_over_git_daemon() {
    let vendor = VendorRepo::new();
    let (_daemon, port) = git_daemon(vendor.root.path());
    let agent = git_agent(
        &format!("git://127.0.0.1:{port}/vendor.git"),
        "outpost/bundle.tar",
        "",
    );
    attack_suite(&vendor, &agent);
}

#[test]
fn attack_suite_over_smart_http_with_basic_auth() {
    let vendor = VendorRepo::new();
    let (_server, port) = git_http(vendor.root.path(), "vendor:s3cret");
    let secrets = tempfile::tempdir().unwrap();
    let url = format!("http://127.0.0.1:{port}/vendor.git");
    let agent = git_agent(
        &url,
        "outpost/bundle.tar",
        &basic_auth(secrets.path(), "vendor", "s3cret"),
    );
    attack_suite(&vendor, &agent);

    // Wrong credentials: a visible source error, the current release untouched.
    let refused = git_agent(
        &url,
        "outpost/bundle.tar",
        &basic_auth(secrets.path(), "vendor", "wrong"),
    );
    let status = refused.expect_source_error("authentication");
    assert_eq!(status["current"], Value::Null);
    assert_eq!(status["last_rejection"], Value::Null);
}

#[test]
fn a_layout_directory_in_the_repository() {
    let vendor = VendorRepo::new();
    let agent = git_agent(
        &format!("file://{}", vendor.bare().display()),
        "outpost/bundle",
        "",
    );
    let v1 = signed(release("1.0.0", 1), &BOTH);
    vendor.publish_dir(&v1, "1.0.0");
    let status = agent.wait_current(1);
    // The same digest as the tar form and the registry form.
    assert_eq!(
        status["current"]["digest"],
        outpost_tests::forge::digest(&v1).to_string()
    );
    vendor.publish_dir(
        &signed(release("1.1.0", 2), &["vendor-a"]),
        "below threshold",
    );
    agent.wait_for("rejection", |s| {
        s["last_rejection"]["check"] == "threshold-unmet"
    });
    vendor.publish_dir(&signed(release("1.1.0", 2), &BOTH), "1.1.0");
    agent.wait_current(2);
}
