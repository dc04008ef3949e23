//! Support for Outpost's cross-crate integration tests: locating the built binaries, running
//! them, temporary registries on 127.0.0.1, and the repository's test data.
//!
//! External tools (docker-registry, skopeo, openssl, git, the Python venv) are installed by
//! `.ci/scripts/setup.sh`; a test that needs one and cannot find it fails with that hint.

pub mod agent;
pub mod cloud;
pub mod engine;
pub mod faults;
pub mod forge;
pub mod git;
pub mod prometheus;
pub mod throttle;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap_or_default()
}

pub fn testdata() -> PathBuf {
    repo().join("testdata")
}

/// A binary of the workspace, built by `cargo test --workspace` next to the test executables.
///
/// `OUTPOST_BIN_DIR` points elsewhere (e.g. binaries built with another profile).
pub fn binary(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("OUTPOST_BIN_DIR") {
        return PathBuf::from(dir).join(name);
    }
    let exe = std::env::current_exe().unwrap_or_default();
    // target/<profile>/deps/<test> → target/<profile>/<name>
    let path = exe
        .parent()
        .and_then(Path::parent)
        .map(|p| p.join(name))
        .unwrap_or_default();
    assert!(
        path.exists(),
        "{} not built: run `cargo test --workspace` (it builds every binary)",
        path.display()
    );
    path
}

pub fn signer() -> Command {
    let mut command = Command::new(binary("outpost-signer"));
    command
        .env("OUTPOST_PASSWORD", "test")
        .env_remove("COSIGN_PASSWORD")
        .env_remove("SOURCE_DATE_EPOCH");
    command
}

/// The result of a command, with helpers for assertions.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn of(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    #[track_caller]
    pub fn ok(self) -> Run {
        assert_eq!(
            self.code, 0,
            "expected success\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }

    #[track_caller]
    pub fn fails(self, code: i32, needle: &str) -> Run {
        assert_eq!(
            self.code, code,
            "expected exit {code}\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        assert!(
            self.stderr.contains(needle),
            "stderr lacks {needle:?}: {}",
            self.stderr
        );
        assert_eq!(
            self.stderr.trim_end().lines().count(),
            1,
            "error is not one line: {}",
            self.stderr
        );
        self
    }
}

#[track_caller]
pub fn run(command: &mut Command) -> Run {
    let output = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    Run::of(output)
}

/// Runs an external tool, failing with an install hint when it is missing.
#[track_caller]
pub fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {name}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "{name} is not installed: run .ci/scripts/setup.sh (tests/run.sh does)"
    );
    Command::new(name)
}

/// The test venv `.ci/scripts/setup.sh` fills (`OUTPOST_VENV` overrides where).
pub fn venv() -> PathBuf {
    std::env::var_os("OUTPOST_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".work/venv"))
}

/// The Python of the test venv (cryptography, oras, boto3).
pub fn python() -> Command {
    let python = venv().join("bin/python");
    assert!(
        python.exists(),
        "{} missing: run .ci/scripts/setup.sh",
        python.display()
    );
    Command::new(python)
}

/// `outpost-signer build STACK --version V --sequence N EXTRA... --out OUT`; must succeed.
pub fn build_bundle(stack: &Path, version: &str, sequence: u64, extra: &[&str], out: &Path) {
    run(signer()
        .arg("build")
        .arg(stack)
        .args(["--version", version, "--sequence", &sequence.to_string()])
        .args(extra)
        .arg("--out")
        .arg(out))
    .ok();
}

/// Signs the bundle file with each test key (`testdata/keys/NAME.key`; `signer()` sets the
/// password).
pub fn sign_with(bundle: &Path, keys: &[&str]) {
    for key in keys {
        run(signer()
            .arg("sign")
            .arg(bundle)
            .arg("--key")
            .arg(testdata().join(format!("keys/{key}.key"))))
        .ok();
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or(0)
}

/// A CNCF distribution registry on 127.0.0.1, stopped on drop.
pub struct TestRegistry {
    pub dir: tempfile::TempDir,
    /// Where it listens: 127.0.0.1, or an address test machines reach.
    pub address: String,
    pub port: u16,
    pub auth: Option<(String, String)>,
}

impl TestRegistry {
    /// No auth, or basic auth (htpasswd) with `auth`.
    pub fn start(auth: Option<(&str, &str)>) -> TestRegistry {
        Self::launch(auth, "--auth", "127.0.0.1")
    }

    /// No auth, listening on `address` (a bridge's, for machines in network namespaces).
    pub fn start_on(address: &str) -> TestRegistry {
        Self::launch(None, "--auth", address)
    }

    /// Bearer-token auth: a token server (tests/scripts/token-server.py) hands out JWTs to
    /// `user:pass` over basic auth; the registry accepts only those tokens.
    pub fn start_with_token_auth(user: &str, pass: &str) -> TestRegistry {
        Self::launch(Some((user, pass)), "--token", "127.0.0.1")
    }

    fn launch(auth: Option<(&str, &str)>, mode: &str, address: &str) -> TestRegistry {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        let script = repo().join("tests/scripts/registry.sh");
        for _ in 0..5 {
            let port = free_port();
            let mut command = Command::new("bash");
            command
                .env("REGISTRY_ADDRESS", address)
                .arg(&script)
                .arg("start")
                .arg(dir.path())
                .arg(port.to_string());
            if let Some((user, pass)) = auth {
                command.arg(mode).arg(format!("{user}:{pass}"));
            }
            if run(&mut command).code == 0 {
                return TestRegistry {
                    dir,
                    address: address.to_string(),
                    port,
                    auth: auth.map(|(u, p)| (u.to_string(), p.to_string())),
                };
            }
        }
        panic!("could not start docker-registry (installed by .ci/scripts/setup.sh)");
    }

    pub fn host(&self) -> String {
        format!("{}:{}", self.address, self.port)
    }

    /// Pushes `layout` to `acme/shop:<tag>` with `outpost-signer push`.
    pub fn push(&self, layout: &outpost_bundle_format::layout::Layout, tag: &str) {
        let file = tempfile::NamedTempFile::new().unwrap_or_else(|e| panic!("tempfile: {e}"));
        std::fs::write(file.path(), forge::tar(layout)).unwrap_or_else(|e| panic!("write: {e}"));
        let mut command = signer();
        command
            .arg("push")
            .arg(file.path())
            .arg(format!("oci://{}/acme/shop:{tag}", self.host()));
        if let Some((user, pass)) = &self.auth {
            command
                .env("OUTPOST_REGISTRY_USERNAME", user)
                .env("OUTPOST_REGISTRY_PASSWORD", pass);
        }
        run(&mut command).ok();
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        let script = repo().join("tests/scripts/registry.sh");
        let _ = Command::new("bash")
            .arg(script)
            .arg("stop")
            .arg(self.dir.path())
            .output();
    }
}

/// Polls `check` every 20 ms until it gives a value; after 10 s fails with `what` and the last
/// explanation `check` gave.
#[track_caller]
pub fn eventually<T>(what: &str, check: impl FnMut() -> Result<T, String>) -> T {
    eventually_within(10, what, check)
}

/// `eventually` with a deadline of `seconds`.
#[track_caller]
pub fn eventually_within<T>(
    seconds: u64,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> T {
    let mut last = String::new();
    poll_within(seconds, || check().map_err(|e| last = e).ok())
        .unwrap_or_else(|| panic!("timed out waiting for {what}: {last}"))
}

/// Calls `check` until it gives a value or `seconds` pass (then None): every 20 ms for short
/// waits, every 200 ms for long ones (rollouts), so waiting costs little CPU.
pub fn poll_within<T>(seconds: u64, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(seconds);
    let pause = std::time::Duration::from_millis(if seconds > 10 { 200 } else { 20 });
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(pause);
    }
}

/// SHA-256 hex of bytes (for comparing digests computed by other tools).
pub fn sha256_hex(bytes: &[u8]) -> String {
    outpost_bundle_format::Digest::of(bytes).hex()
}

/// Kubernetes versions whose schemas every object we render must satisfy.
pub const KUBERNETES: [&str; 2] = ["1.33.0", "1.37.0"];

/// Validates every object in the YAML `file` strictly against the schemas of each of
/// [`KUBERNETES`] with `kubernetes-validate` (PyPI): no kube-apiserver can run here.
#[track_caller]
pub fn assert_valid_for_kubernetes(file: &Path, what: &str) {
    for version in KUBERNETES {
        let result = run(python()
            .args([
                "-m",
                "kubernetes_validate",
                "--strict",
                "--quiet",
                "-k",
                version,
            ])
            .arg(file));
        assert_eq!(
            result.code, 0,
            "{what} on kubernetes {version}: {}{}",
            result.stdout, result.stderr
        );
    }
}
