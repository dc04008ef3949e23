//! Git servers for the tests on 127.0.0.1: a vendor's repository with a working clone,
//! `git daemon`, and smart HTTP (`git http-backend` behind tests/scripts/git-http.py).

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use crate::{free_port, repo, run, tool};
use outpost_bundle_format::layout::Layout;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A bare repository `vendor.git` under a served root, and the vendor's working clone.
#[derive(Debug)]
pub struct VendorRepo {
    pub root: tempfile::TempDir,
    work: PathBuf,
}

impl Default for VendorRepo {
    fn default() -> Self {
        VendorRepo::new()
    }
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
    pub fn new() -> VendorRepo {
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

    pub fn bare(&self) -> PathBuf {
        self.root.path().join("vendor.git")
    }

    /// Commits `bytes` as outpost/bundle.tar on main and pushes.
    pub fn publish(&self, bytes: &[u8], message: &str) {
        std::fs::create_dir_all(self.work.join("outpost")).unwrap();
        std::fs::write(self.work.join("outpost/bundle.tar"), bytes).unwrap();
        self.commit(message);
    }

    /// Commits `layout` as the directory outpost/bundle on main and pushes.
    pub fn publish_dir(&self, layout: &Layout, message: &str) {
        let dir = self.work.join("outpost/bundle");
        let _ = std::fs::remove_dir_all(&dir);
        layout.write_dir(&dir).unwrap();
        self.commit(message);
    }

    pub fn commit(&self, message: &str) {
        git(&self.work, &["add", "-A"]);
        git(
            &self.work,
            &["commit", "-q", "--allow-empty", "-m", message],
        );
        git(&self.work, &["push", "-q", "origin", "main"]);
    }
}

/// A server process killed on drop.
pub struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub fn wait_port(port: u16) {
    crate::eventually(&format!("a listener on {port}"), || {
        std::net::TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())
    });
}

pub fn git_daemon(root: &Path) -> (Server, u16) {
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

pub fn git_http(root: &Path, auth: &str) -> (Server, u16) {
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
