//! `outpost-agent support-bundle`: what a vendor's support engineer needs, for the customer to
//! review and send: version, status, history, plan, the configuration with every secret
//! redacted, recent log lines, the runtime's view, and the current release's verification
//! record. Secrets are never read (password files, granted files, kubeconfigs) and granted
//! environment values are masked; the bundle says what it left out.

use super::Failure;
use outpost_agent::config::Config;
use outpost_agent::pipeline::Agent;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};

/// Log lines kept from the journal or `--log`.
const LOG_LINES: usize = 2000;
const MASK: &str = "<redacted>";

/// One file of the bundle, and why it is there.
struct Part {
    name: &'static str,
    what: String,
    bytes: Vec<u8>,
}

pub(super) fn run(
    config_path: &Path,
    config: &Config,
    out: Option<&Path>,
    log: Option<&Path>,
    dry_run: bool,
) -> Result<(), Failure> {
    let (config_json, redacted) = redacted_config(config);
    let mut parts = vec![
        Part {
            name: "version.txt",
            what: "the agent's version and build".into(),
            bytes: format!(
                "outpost-agent {} (commit {})\n",
                env!("CARGO_PKG_VERSION"),
                option_env!("OUTPOST_COMMIT").unwrap_or("unknown")
            )
            .into_bytes(),
        },
        Part {
            name: "config.json",
            what: format!(
                "the configuration ({}), secrets redacted",
                config_path.display()
            ),
            bytes: pretty(&config_json),
        },
    ];
    let answers = agent_answers(config);
    let mut runtime = Value::Null;
    for (name, what, path) in [
        (
            "status.json",
            "status (positions, source, runtime)",
            "/status",
        ),
        (
            "history.json",
            "the last 200 events and decisions",
            "/history?limit=200",
        ),
        ("plan.json", "what a pending release would change", "/plan"),
    ] {
        let value = answers
            .as_ref()
            .map(|call| call(path))
            .unwrap_or_else(|e| Ok(json!({"unavailable": e})))
            .unwrap_or_else(|e| json!({"unavailable": e}));
        if path == "/status" {
            runtime = value["runtime"].clone();
        }
        parts.push(Part {
            name,
            what: what.into(),
            bytes: pretty(&value),
        });
    }
    parts.push(Part {
        name: "runtime.json",
        what: "the runtime's view: replicas and their health, or workloads and endpoints".into(),
        bytes: pretty(&runtime),
    });
    parts.push(Part {
        name: "current-release.json",
        what: "the current release and the records of its verification and rollout".into(),
        bytes: pretty(&current_release(config)),
    });
    let (logs, log_source) = recent_logs(log);
    parts.push(Part {
        name: "logs.txt",
        what: format!("recent log lines ({log_source})"),
        bytes: logs.into_bytes(),
    });

    println!("support bundle contents:");
    for part in &parts {
        println!(
            "  {:<22} {} ({} bytes)",
            part.name,
            part.what,
            part.bytes.len()
        );
    }
    println!("redacted (never read, or masked):");
    for line in &redacted {
        println!("  {line}");
    }
    if dry_run {
        println!("dry run: nothing written");
        return Ok(());
    }
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("outpost-support.tar.gz"));
    write_archive(&out, &parts).map_err(|e| Failure(1, format!("{}: {e}", out.display())))?;
    println!(
        "wrote {}: review it, then send it to the vendor",
        out.display()
    );
    Ok(())
}

/// The configuration as JSON with every secret masked, and what was masked or never read.
fn redacted_config(config: &Config) -> (Value, Vec<String>) {
    let mut value = serde_json::to_value(config).unwrap_or(Value::Null);
    let mut redacted = vec![
        "password and credential files named in the configuration: never read".to_string(),
        "files granted to containers (permissions.*.files): never read".into(),
        "kubernetes.kubeconfig: never read".into(),
    ];
    if let Some(permissions) = value.get_mut("permissions").and_then(Value::as_object_mut) {
        for (profile, grant) in permissions {
            if let Some(environment) = grant.get_mut("environment").and_then(Value::as_object_mut) {
                for (name, item) in environment {
                    *item = json!(MASK);
                    redacted.push(format!(
                        "permissions.{profile}.environment.{name}: value masked"
                    ));
                }
            }
        }
    }
    (value, redacted)
}

type Call<'a> = Box<dyn Fn(&str) -> Result<Value, String> + 'a>;

/// The running agent's answers, or why it cannot be asked.
fn agent_answers(config: &Config) -> Result<Call<'_>, String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    let socket = config.api.socket.clone();
    Ok(Box::new(move |path: &str| {
        runtime
            .block_on(outpost_agent::api::call(
                &socket,
                hyper::Method::GET,
                path,
                None,
            ))
            .map(|(_, value)| value)
            .map_err(|e| format!("the agent did not answer on {}: {e:#}", socket.display()))
    }))
}

/// The current release from the state store (read-only: the agent may be running or not) and
/// every record about it: acceptance after verification, application, rollout.
fn current_release(config: &Config) -> Value {
    let agent = match Agent::read_only(config.clone()) {
        Ok(agent) => agent,
        Err(e) => return json!({"unavailable": format!("{e:#}")}),
    };
    let status = agent.status().unwrap_or(Value::Null);
    let current = status["current"].clone();
    let digest = current["digest"].as_str().unwrap_or_default().to_string();
    let records: Vec<Value> = agent
        .store
        .history(1000)
        .unwrap_or_default()
        .into_iter()
        .filter(|e| !digest.is_empty() && e.digest.as_deref() == Some(digest.as_str()))
        .map(|e| json!({"at": e.at, "kind": e.kind, "message": e.message}))
        .collect();
    json!({
        "release": current,
        "verified": "accepted only after every check of the bundle format (SPEC.md section 8) and the agent's own (section 10) passed against the trust pinned at install",
        "trust": if config.trust.root.is_some() { "root.json" } else { "keys" },
        "records": records,
    })
}

/// The last lines of `--log`, else of the journal, else a note why there are none.
fn recent_logs(log: Option<&Path>) -> (String, String) {
    if let Some(path) = log {
        return match std::fs::read_to_string(path) {
            Ok(text) => (
                tail(&text),
                format!("the last {LOG_LINES} lines of {}", path.display()),
            ),
            Err(e) => (String::new(), format!("{}: {e}", path.display())),
        };
    }
    let journal = std::process::Command::new("journalctl")
        .args([
            "-u",
            "outpost-agent",
            "-n",
            &LOG_LINES.to_string(),
            "--no-pager",
        ])
        .output();
    match journal {
        Ok(output) if output.status.success() && !output.stdout.is_empty() => (
            String::from_utf8_lossy(&output.stdout).into_owned(),
            "journalctl -u outpost-agent".into(),
        ),
        _ => (
            String::new(),
            "none: no journal for outpost-agent; pass --log FILE".into(),
        ),
    }
}

fn tail(text: &str) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let start = lines.len().saturating_sub(LOG_LINES);
    lines[start..].iter().map(|l| format!("{l}\n")).collect()
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// A `.tar.gz` any tar reads: one directory, `outpost-support/`, with the parts.
fn write_archive(
    out: &Path,
    parts: &[Part],
) -> Result<(), outpost_bundle_format::layout::LayoutError> {
    outpost_bundle_format::layout::write_atomic_with(out, |file| {
        let io = |e: std::io::Error| outpost_bundle_format::layout::LayoutError::Io {
            path: out.display().to_string(),
            source: e,
        };
        let gzip = flate2::write::GzEncoder::new(file, flate2::Compression::default());
        let mut archive = tar::Builder::new(gzip);
        let now = outpost_agent::config::now().timestamp().max(0) as u64;
        for part in parts {
            let mut header = tar::Header::new_ustar();
            header.set_entry_type(tar::EntryType::Regular);
            header.set_size(part.bytes.len() as u64);
            header.set_mode(0o600);
            header.set_mtime(now);
            archive
                .append_data(
                    &mut header,
                    format!("outpost-support/{}", part.name),
                    part.bytes.as_slice(),
                )
                .map_err(io)?;
        }
        archive.into_inner().and_then(|g| g.finish()).map_err(io)?;
        Ok(())
    })
}
