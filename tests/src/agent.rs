//! A real `outpost-agent run` process for the integration tests: its config, state directory and
//! socket in a temporary directory, the CLI pointed at it, and ways to wait for its state.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use crate::{Run, binary, run, testdata};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct AgentProcess {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    /// Environment the daemon runs with, beyond the test's own.
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

/// How a test interrupts the agent in the middle of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Interrupt {
    /// kill -9: no chance to clean up.
    Kill,
    /// SIGTERM, as a service manager stops the agent: it must be gone well within the stop
    /// timeout (systemd's 90 s, Kubernetes' 30 s grace) on its own.
    Term,
}

/// Rounds of an interruption campaign: four, or `OUTPOST_INTERRUPT_ROUNDS`
/// (`tests/bench.sh interrupts` runs 30).
pub fn campaign_rounds() -> u64 {
    std::env::var("OUTPOST_INTERRUPT_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(4)
}

/// Pseudo-random pauses (xorshift from a fixed seed, so a failing round replays).
pub struct Pauses(u64);

impl Pauses {
    pub fn new(seed: u64) -> Pauses {
        Pauses(seed.max(1))
    }

    /// A pause of `least_ms` plus up to `spread_ms` more.
    pub fn next(&mut self, least_ms: u64, spread_ms: u64) -> Duration {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        Duration::from_millis(least_ms + self.0 % spread_ms.max(1))
    }
}

/// Trust block for vendor-a and vendor-b, both required.
pub fn trust_two_of_two() -> String {
    let keys = testdata().join("keys");
    format!(
        "trust:\n  keys: [{}, {}]\n  threshold: 2\n",
        keys.join("vendor-a.pub").display(),
        keys.join("vendor-b.pub").display()
    )
}

impl AgentProcess {
    /// Writes the config (`source` and `extra` are YAML blocks; trust is vendor-a + vendor-b,
    /// threshold 2, unless `extra` has its own) and starts the agent.
    pub fn start(source: &str, extra: &str) -> AgentProcess {
        Self::start_with_env(source, extra, &[])
    }

    /// [`AgentProcess::start`] with `env` set for the daemon.
    pub fn start_with_env(source: &str, extra: &str, env: &[(&str, &str)]) -> AgentProcess {
        let dir = tempfile::tempdir().unwrap();
        let trust = if extra.contains("trust:") {
            String::new()
        } else {
            trust_two_of_two()
        };
        let permissions = if extra.contains("permissions:") {
            ""
        } else {
            "permissions:\n  execution: {}\n"
        };
        let text = format!(
            "{source}\n{trust}expect:\n  name: acme\n  channel: stable\n{permissions}state_dir: state\napi:\n  socket: agent.sock\n{extra}\n"
        );
        let config = dir.path().join("agent.yaml");
        std::fs::write(&config, text).unwrap();
        let mut agent = AgentProcess {
            dir,
            config,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            child: None,
        };
        agent.restart();
        agent
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// (Re)starts the daemon and waits for its socket to answer.
    pub fn restart(&mut self) {
        self.stop();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.path("agent.log"))
            .unwrap();
        let child = Command::new(binary("outpost-agent"))
            .arg("run")
            .arg("--config")
            .arg(&self.config)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if self.cli(&["status"]).code == 0 {
                return;
            }
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                panic!("the agent exited with {status}: {}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not come up: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9: no chance to clean up.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Interrupts the daemon `how`; a SIGTERM must be obeyed within 8 s.
    #[track_caller]
    pub fn interrupt(&mut self, how: Interrupt) {
        match how {
            Interrupt::Kill => self.kill(),
            Interrupt::Term => {
                // `stop` sends SIGTERM and waits up to 10 s before it kills.
                let asked = Instant::now();
                self.stop();
                let took = asked.elapsed();
                assert!(
                    took < Duration::from_secs(8),
                    "stopped on its own within 8 s of SIGTERM, not {took:?}: {}",
                    self.log()
                );
            }
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }

    /// `outpost-agent ARGS... --config CONFIG`.
    pub fn cli(&self, args: &[&str]) -> Run {
        run(Command::new(binary("outpost-agent"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env("USER", "tester"))
    }

    pub fn status(&self) -> Value {
        let result = self.cli(&["status", "--output", "json"]).ok();
        serde_json::from_str(&result.stdout).unwrap()
    }

    /// Polls `status` until `done` holds (10 s at most).
    #[track_caller]
    pub fn wait_for(&self, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        self.wait_within(10, what, done)
    }

    /// Polls `status` until `done` holds (`seconds` at most).
    #[track_caller]
    pub fn wait_within(&self, seconds: u64, what: &str, done: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        crate::poll_within(seconds, || {
            let status = self.status();
            if done(&status) {
                Some(status)
            } else {
                last = status;
                None
            }
        })
        .unwrap_or_else(|| {
            panic!(
                "timed out waiting for {what}: status: {last:#}\nlog: {}",
                self.log()
            )
        })
    }

    /// Waits (2 min at most) until the runtime runs the current release, healthy, and the
    /// current release is `sequence`.
    #[track_caller]
    pub fn wait_converged(&self, sequence: u64) -> Value {
        self.wait_converged_within(120, sequence)
    }

    #[track_caller]
    pub fn wait_converged_within(&self, seconds: u64, sequence: u64) -> Value {
        self.wait_within(seconds, &format!("converged at sequence {sequence}"), |s| {
            s["current"]["sequence"] == sequence
                && s["runtime"]["converged"] == s["current"]["digest"]
                && s["runtime"]["phase"] == "converged"
        })
    }

    /// Waits until the current release has `sequence`.
    #[track_caller]
    pub fn wait_current(&self, sequence: u64) -> Value {
        self.wait_for(&format!("current sequence {sequence}"), |s| {
            s["current"]["sequence"] == sequence
        })
    }

    /// Waits for a source error containing `needle` (bad credentials, a registry gone) and checks
    /// that it changed nothing: no release, no rejection.
    #[track_caller]
    pub fn expect_source_error(&self, needle: &str) -> Value {
        let status = self.wait_for(&format!("a source error with {needle:?}"), |s| {
            s["source"]["last_error"]
                .as_str()
                .is_some_and(|e| e.contains(needle))
        });
        assert_eq!(status["last_rejection"], Value::Null, "{status:#}");
        status
    }

    /// `outpost_bundles_rejected_total` from /metrics, through the status socket.
    pub fn rejected_total(&self) -> u64 {
        self.metric("outpost_bundles_rejected_total")
    }

    /// The sum of every series of metric `name` (all its label sets).
    pub fn metric(&self, name: &str) -> u64 {
        let text = crate::agent::http_get(&self.socket(), "/metrics");
        text.lines()
            .filter(|l| l.starts_with(&format!("{name} ")) || l.starts_with(&format!("{name}{{")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    }

    pub fn socket(&self) -> PathBuf {
        self.path("agent.sock")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `username` and `password_file` lines for a `source.oci` or `source.git` block; the password
/// goes to a file in `dir`.
pub fn basic_auth(dir: &Path, user: &str, password: &str) -> String {
    let file = dir.join(format!("{user}.password"));
    std::fs::write(&file, format!("{password}\n")).unwrap();
    format!(
        "    username: {user}\n    password_file: {}\n",
        file.display()
    )
}

/// A plain HTTP/1.0 GET over the agent's unix socket (what a monitoring sidecar would do).
pub fn http_get(socket: &Path, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut stream) = std::os::unix::net::UnixStream::connect(socket) else {
        return String::new();
    };
    let _ = write!(stream, "GET {path} HTTP/1.0\r\nHost: agent\r\n\r\n");
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default()
}

/// Writes `bytes` as `dir/name` the way a careful operator does: under a dot-name, then renamed.
pub fn drop_file(dir: &Path, name: &str, bytes: &[u8]) {
    let partial = dir.join(format!(".{name}.partial"));
    std::fs::write(&partial, bytes).unwrap();
    std::fs::rename(&partial, dir.join(name)).unwrap();
}
