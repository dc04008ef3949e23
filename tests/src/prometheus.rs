//! A real Prometheus server (Debian's `prometheus`) on 127.0.0.1 for the tests, scraping the
//! targets it is given every second, and `promtool`.

#![allow(clippy::unwrap_used)] // test support: a panic is a failed test

use crate::engine::http_body;
use std::process::{Child, Command, Stdio};

pub struct TestPrometheus {
    pub port: u16,
    child: Child,
    _dir: tempfile::TempDir,
}

impl TestPrometheus {
    /// Starts a server scraping `targets` (`host:port`) every second.
    pub fn start(targets: &[String]) -> TestPrometheus {
        let dir = tempfile::tempdir().unwrap();
        let port = crate::free_port();
        let config = format!(
            "global: {{scrape_interval: 1s, evaluation_interval: 1s}}\nscrape_configs:\n  - job_name: outpost\n    static_configs:\n      - targets: [{}]\n",
            targets.join(", ")
        );
        std::fs::write(dir.path().join("prometheus.yml"), config).unwrap();
        let log = std::fs::File::create(dir.path().join("prometheus.log")).unwrap();
        let child = Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("prometheus (Debian package `prometheus`, installed by .ci/scripts/setup.sh)");
        let server = TestPrometheus {
            port,
            child,
            _dir: dir,
        };
        crate::eventually("prometheus ready", || {
            http_body(port, "/-/ready")
                .ok_or_else(|| "not ready".to_string())
                .map(|_| ())
        });
        server
    }

    /// The value of an instant PromQL query with one result, once it has one.
    pub fn query_value(&self, promql: &str) -> Option<f64> {
        let encoded: String = promql
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'.' | b'-' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let body = http_body(self.port, &format!("/api/v1/query?query={encoded}"))?;
        let answer: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = answer["data"]["result"].as_array()?;
        result.first()?["value"][1].as_str()?.parse().ok()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self._dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for TestPrometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `promtool ARGS` with `input` on stdin: (exit code, stdout and stderr).
pub fn promtool(args: &[&str], input: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package `prometheus`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        ),
    )
}
