//! `outpost-agent`: `run` is the daemon; every other command is the customer's CLI, talking to
//! the running agent over its unix socket (found through `--config`).
//!
//! Exit codes: 0 success, 1 refused or failed (verification failure, a decision that cannot be
//! made), 2 bad usage or configuration.

use anyhow::Context;
use clap::{Parser, Subcommand};
use hyper::{Method, StatusCode};
use outpost_agent::config::Config;
use outpost_agent::pipeline::{Agent, Ingested};
use outpost_agent::{api, config, daemon};
use outpost_bundle_format::Layout;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "outpost-agent",
    version,
    about = "Pulls signed Outpost bundles, verifies them and holds them for the customer's approval."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(clap::Args)]
struct ConfigArg {
    /// The agent's configuration file.
    #[arg(long, short = 'c', default_value = "/etc/outpost/agent.yaml")]
    config: PathBuf,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (the daemon).
    Run(ConfigArg),
    /// Show the current, pending and last rejected release.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
    },
    /// What the pending release changes against the current one.
    Plan {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
    },
    /// Approve the pending release VERSION.
    Approve {
        version: String,
        /// Only if the pending release still has this digest (the one `plan` showed).
        #[arg(long)]
        digest: Option<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Reject the pending release VERSION.
    Reject {
        version: String,
        /// Only if the pending release still has this digest.
        #[arg(long)]
        digest: Option<String>,
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Hold the current release VERSION: new releases wait until `unpin`.
    Pin {
        version: String,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Let new releases through again.
    Unpin(ConfigArg),
    /// Make the last good release current again; the runtime converges to it.
    Rollback(ConfigArg),
    /// Events and decisions, newest first.
    History {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
    },
    /// The full offline check of a bundle file or directory against this agent's trust,
    /// expectations and rollback floor, recording nothing.
    Verify {
        file: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print, as multi-document YAML, exactly the Kubernetes objects this config maps the
    /// bundle to (verified against this agent's trust first), for review before approving.
    Render {
        bundle: PathBuf,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Check the configuration file and the trust it pins (keys or root.json), starting and
    /// changing nothing: exit 0, or 2 with what is wrong and where.
    CheckConfig(ConfigArg),
    /// Print the JSON Schema of the configuration file.
    ConfigSchema,
}

/// A failure with its exit code.
struct Failure(u8, String);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure(1, format!("{e:#}"))
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match execute(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, message)) => {
            eprintln!("error: {message}");
            ExitCode::from(code)
        }
    }
}

fn load(config: &ConfigArg) -> Result<Config, Failure> {
    Config::load(&config.config).map_err(|e| Failure(2, e.to_string()))
}

fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure(1, e.to_string()))
}

/// One call to the running agent; a refusal (409) or bad request is exit 1 with its message.
fn request(
    config: &ConfigArg,
    method: Method,
    path: &str,
    body: Option<Value>,
) -> Result<Value, Failure> {
    let config = load(config)?;
    let (status, value) = runtime()?.block_on(api::call(&config.api.socket, method, path, body))?;
    if status != StatusCode::OK {
        let message = value
            .get("error")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_else(|| value.to_string());
        return Err(Failure(1, message));
    }
    Ok(value)
}

fn who() -> String {
    std::env::var("USER")
        .or_else(|_| std::env::var("LOGNAME"))
        .unwrap_or_else(|_| "unknown".into())
}

fn print_message(value: &Value) {
    println!(
        "{}",
        value
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_default()
    );
}

fn print_json(value: &Value) -> Result<(), Failure> {
    println!(
        "{}",
        serde_json::to_string_pretty(value).map_err(|e| Failure(1, e.to_string()))?
    );
    Ok(())
}

fn execute(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run(config) => {
            // Trust, windows and the state store are checked before anything starts.
            let agent = Agent::new(load(&config)?).map_err(|e| Failure(2, format!("{e:#}")))?;
            runtime()?.block_on(daemon::run(agent))?;
        }
        Command::Status { config, output } => {
            let status = request(&config, Method::GET, "/status", None)?;
            match output {
                Output::Json => print_json(&status)?,
                Output::Text => print!("{}", status_text(&status)),
            }
        }
        Command::Plan { config, output } => {
            let plan = request(&config, Method::GET, "/plan", None)?;
            match output {
                Output::Json => print_json(&plan)?,
                Output::Text => print!(
                    "{}",
                    plan.get("text").and_then(Value::as_str).unwrap_or_default()
                ),
            }
        }
        Command::Approve {
            version,
            digest,
            config,
        } => print_message(&request(
            &config,
            Method::POST,
            "/approve",
            Some(json!({"version": version, "digest": digest, "who": who()})),
        )?),
        Command::Reject {
            version,
            digest,
            reason,
            config,
        } => {
            if reason.trim().is_empty() {
                return Err(Failure(2, "--reason must say why".into()));
            }
            print_message(&request(
                &config,
                Method::POST,
                "/reject",
                Some(json!({"version": version, "digest": digest, "reason": reason, "who": who()})),
            )?)
        }
        Command::Pin { version, config } => print_message(&request(
            &config,
            Method::POST,
            "/pin",
            Some(json!({"version": version, "who": who()})),
        )?),
        Command::Rollback(config) => print_message(&request(
            &config,
            Method::POST,
            "/rollback",
            Some(json!({"who": who()})),
        )?),
        Command::Unpin(config) => print_message(&request(
            &config,
            Method::POST,
            "/unpin",
            Some(json!({"who": who()})),
        )?),
        Command::History {
            config,
            limit,
            output,
        } => {
            let history = request(
                &config,
                Method::GET,
                &format!("/history?limit={limit}"),
                None,
            )?;
            match output {
                Output::Json => print_json(&history)?,
                Output::Text => print!("{}", history_text(&history)),
            }
        }
        Command::Verify { file, config } => verify(&file, &load(&config)?)?,
        Command::Render { bundle, config } => render(&bundle, &load(&config)?)?,
        Command::CheckConfig(arg) => {
            let config = load(&arg)?;
            outpost_agent::pipeline::load_trust(&config)
                .map_err(|e| Failure(2, format!("{}: {e:#}", arg.config.display())))?;
            println!("{}: ok", arg.config.display());
        }
        Command::ConfigSchema => print!("{}", config::json_schema()),
    }
    Ok(())
}

/// A bundle file opened for an offline check, beside the running agent or without one: the
/// read-only agent, and the layout (its spool lives as long as it does) or why it is unreadable.
type Opened = (
    Agent,
    tempfile::TempDir,
    Result<Layout, outpost_bundle_format::layout::LayoutError>,
);

fn open_bundle(file: &Path, config: &Config) -> Result<Opened, Failure> {
    let agent = Agent::read_only(config.clone()).map_err(|e| Failure(2, format!("{e:#}")))?;
    let spool = tempfile::tempdir().context("creating a spool directory")?;
    let layout = Layout::read(file, agent.limits(), Some(spool.path()));
    Ok((agent, spool, layout))
}

fn verification_failed(file: &Path, check: &str, reason: impl std::fmt::Display) -> Failure {
    Failure(
        1,
        format!("{}: verification failed: {check}: {reason}", file.display()),
    )
}

fn render(file: &Path, config: &Config) -> Result<(), Failure> {
    let (agent, _spool, layout) = open_bundle(file, config)?;
    let layout = layout.map_err(|e| verification_failed(file, e.check(), &e))?;
    let verified = agent
        .verify_for_review(&layout, config::now())
        .map_err(|e| verification_failed(file, e.check(), &e))?;
    let objects =
        outpost_agent::render::render(config, verified.stack(), &verified.digest().to_string())
            .map_err(|e| Failure(1, format!("{}: {e}", file.display())))?;
    let yaml = outpost_agent::render::to_yaml(&objects)
        .map_err(|e| Failure(1, format!("{}: {e}", file.display())))?;
    print!("{yaml}");
    Ok(())
}

fn verify(file: &Path, config: &Config) -> Result<(), Failure> {
    let (agent, _spool, layout) = open_bundle(file, config)?;
    let outcome = match layout {
        Ok(layout) => agent.dry_run(&layout, &file.display().to_string(), config::now())?,
        Err(e) => Ingested::Rejected {
            digest: None,
            check: e.check().to_string(),
            reason: e.to_string(),
        },
    };
    match outcome {
        Ingested::Accepted {
            digest,
            version,
            waiting_for,
        } => {
            println!("verified {} {version} {digest}", config.expect.name);
            match waiting_for {
                Some(w) => println!("would wait for: {w}"),
                None => println!("would be applied"),
            }
            Ok(())
        }
        Ingested::Unchanged { digest } => {
            println!("verified {digest}: already current, pending or rolled back");
            Ok(())
        }
        Ingested::Rejected { check, reason, .. } => Err(verification_failed(file, &check, reason)),
    }
}

fn release_line(release: &Value) -> String {
    let field = |name: &str| {
        release
            .get(name)
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .unwrap_or_default()
    };
    format!(
        "{} (sequence {}, {})",
        field("version"),
        field("sequence"),
        field("digest")
    )
}

/// The runtime part of `status`: phase, each resource's rollout step and replicas' health.
fn runtime_text(runtime: &Value) -> String {
    let Some(view) = runtime.as_object() else {
        return format!("runtime:   {}\n", runtime.as_str().unwrap_or("none"));
    };
    let get = |k: &str| view.get(k).and_then(Value::as_str);
    let mut out = format!(
        "runtime:   {} ({})\n",
        get("kind").unwrap_or("?"),
        get("phase").unwrap_or("starting")
    );
    if let Some(note) = get("note") {
        out.push_str(&format!("           {note}\n"));
    }
    for (key, label) in [
        ("last_error", "last error"),
        ("last_rollback", "last rollback"),
    ] {
        if let Some(text) = get(key) {
            out.push_str(&format!("           {label}: {text}\n"));
        }
    }
    let list = |key: &str| {
        view.get(key)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
    };
    for line in list("endpoints").chain(list("endpoint_errors")) {
        out.push_str(&format!("endpoint:  {line}\n"));
    }
    for (name, resource) in view
        .get("resources")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        out.push_str(&format!(
            "resource:  {name}: {}\n",
            resource["step"].as_str().unwrap_or("-")
        ));
        for replica in resource["replicas"].as_array().into_iter().flatten() {
            out.push_str(&format!(
                "             {} {}\n",
                replica["name"].as_str().unwrap_or_default(),
                replica["health"].as_str().unwrap_or_default()
            ));
        }
        // Kubernetes: the workload's counts, as its controller reports them.
        let workload = &resource["workload"];
        if let Some(object) = workload["object"].as_str() {
            out.push_str(&format!(
                "             {object}: {} replicas, {} ready, {} updated, {} available\n",
                workload["replicas"], workload["ready"], workload["updated"], workload["available"]
            ));
        }
    }
    for finding in list("findings") {
        out.push_str(&format!("finding:   {finding}\n"));
    }
    out
}

fn status_text(status: &Value) -> String {
    let mut out = String::new();
    let stack = &status["stack"];
    out.push_str(&format!(
        "stack:     {} (channel {})\n",
        stack["name"].as_str().unwrap_or_default(),
        stack["channel"].as_str().unwrap_or_default()
    ));
    if let Some(source) = status["source"]["describe"].as_str() {
        out.push_str(&format!("source:    {source}"));
        if let Some(error) = status["source"]["last_error"].as_str() {
            out.push_str(&format!(" (last error: {error})"));
        }
        out.push('\n');
    }
    match &status["current"] {
        Value::Null => out.push_str("current:   none\n"),
        current => out.push_str(&format!("current:   {}\n", release_line(current))),
    }
    match &status["pending"] {
        Value::Null => out.push_str("pending:   none\n"),
        pending => out.push_str(&format!(
            "pending:   {}\n           waiting for {}\n",
            release_line(pending),
            pending["waiting_for"].as_str().unwrap_or("nothing")
        )),
    }
    if let Some(pinned) = status["pinned"].as_str() {
        out.push_str(&format!("pinned:    {pinned}\n"));
    }
    out.push_str(&runtime_text(&status["runtime"]));
    if let Some(r) = status["last_rejection"].as_object() {
        let get = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("-");
        out.push_str(&format!(
            "rejected:  {} at {} ({}): {}\n",
            get("digest"),
            get("at"),
            get("check"),
            get("reason")
        ));
    }
    out
}

fn history_text(history: &Value) -> String {
    let mut out = String::new();
    for event in history["events"].as_array().into_iter().flatten() {
        let get = |k: &str| event.get(k).and_then(Value::as_str).unwrap_or("");
        out.push_str(&format!(
            "{}  {:<10} {}\n",
            get("at"),
            get("kind"),
            get("message")
        ));
    }
    let decisions = history["decisions"]
        .as_array()
        .into_iter()
        .flatten()
        .collect::<Vec<_>>();
    if !decisions.is_empty() {
        out.push_str("\ndecisions:\n");
        for d in decisions {
            let get = |k: &str| d.get(k).and_then(Value::as_str).unwrap_or("");
            let reason = d
                .get("reason")
                .and_then(Value::as_str)
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            out.push_str(&format!(
                "{}  {:<8} {} by {}{reason}\n",
                get("at"),
                get("decision"),
                get("version"),
                get("who")
            ));
        }
    }
    out
}
