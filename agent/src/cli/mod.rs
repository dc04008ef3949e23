//! The customer's CLI: the command definitions (clap), and what each command does. `run` is
//! the daemon; the others talk to it over its socket (`client.rs`) and print text
//! (`text.rs`) or JSON.
//!
//! Exit codes: 0 success, 1 refused or failed (verification failure, a decision that cannot be
//! made), 2 bad usage or configuration.

mod client;
mod support;
mod text;

use anyhow::Context;
use clap::{Parser, Subcommand};
use client::request;
use hyper::Method;
use outpost_agent::config::Config;
use outpost_agent::pipeline::{Agent, Ingested};
use outpost_agent::{config, daemon};
use outpost_bundle_format::Layout;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use text::*;

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
        /// Show it again every second (a download's progress, a rollout's steps) until
        /// interrupted.
        #[arg(long, short = 'w')]
        watch: bool,
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
    Rollback {
        /// Leaving a release that declared resources irreversible: restore their data to the
        /// snapshots taken before it (writes made since are lost). Refused without it.
        #[arg(long)]
        restore_data: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// The snapshots of stateful data kept for rollbacks: release, resource, ordinal, size, age.
    Snapshots {
        #[command(flatten)]
        config: ConfigArg,
        #[arg(long, short = 'o', value_enum, default_value = "text")]
        output: Output,
    },
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
    /// Check the state store (`state_dir/state.db`) read-only, beside a running agent too:
    /// whether it is an Outpost store, passes SQLite's check and is this store (not a database
    /// or -wal from another): exit 0 with a summary, or 1 with what is wrong.
    CheckState(ConfigArg),
    /// Collect what a vendor's support engineer needs into a .tar.gz for the customer to review
    /// and send: version, status, history, plan, the configuration with secrets redacted,
    /// recent logs, the runtime's view and the current release's records. Prints what is
    /// included and what was redacted first.
    SupportBundle {
        #[command(flatten)]
        config: ConfigArg,
        /// Where to write it (default outpost-support.tar.gz).
        #[arg(long)]
        out: Option<PathBuf>,
        /// The agent's log file (default: the journal of outpost-agent.service).
        #[arg(long)]
        log: Option<PathBuf>,
        /// Only say what would be included and redacted.
        #[arg(long)]
        dry_run: bool,
    },
    /// Run as the node agent on a machine of a VM pool (the machine's user data starts it):
    /// join the agent, run the replicas it assigns to this machine on the machine's container
    /// engine, and report their health.
    Node {
        /// The agent's node URL (`vm.nodes.advertise`).
        #[arg(long)]
        agent: String,
        /// This machine's cloud instance id.
        #[arg(long)]
        instance_id: String,
        /// The machine settings its user data was made for.
        #[arg(long)]
        settings: String,
        /// The file holding the bootstrap secret.
        #[arg(long)]
        bootstrap_secret_file: PathBuf,
        /// Where the node keeps its journal and last assignment.
        #[arg(long)]
        state_dir: PathBuf,
        /// The machine's engine API socket (dockerd or Podman's service).
        #[arg(
            long,
            env = "OUTPOST_DOCKER_SOCKET",
            default_value = "/var/run/docker.sock"
        )]
        docker_socket: PathBuf,
        /// Where public endpoints listen on the machine (the load balancer's targets); by
        /// default the machine's own address, the one it reaches the agent from.
        #[arg(long)]
        publish_address: Option<std::net::IpAddr>,
        /// Where the machine's link server listens: other machines reach the linked resources
        /// running here through it (allow it between the pool's machines).
        #[arg(long, env = "OUTPOST_LINKS_LISTEN", default_value = "0.0.0.0:7481")]
        links_listen: std::net::SocketAddr,
        /// The subnet of the stack's network on the machine's engine (the engine picks one
        /// when absent).
        #[arg(long, env = "OUTPOST_NETWORK_SUBNET")]
        network_subnet: Option<String>,
        /// Where the machine lists its block devices by id (attached volumes appear there).
        #[arg(long, env = "OUTPOST_DISK_BY_ID", default_value = "/dev/disk/by-id")]
        disk_by_id: PathBuf,
    },
    /// Print the IAM policy the configured VM pools need (runtime vm), least privilege: the
    /// agent may change only what carries its stack's tag.
    CloudPolicy(ConfigArg),
    /// Print the JSON Schema of the configuration file.
    ConfigSchema,
    /// Print shell completions (bash, zsh or fish) for outpost-agent.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff) for outpost-agent.
    Man,
}

/// A failure with its exit code.
struct Failure(u8, String);

impl From<anyhow::Error> for Failure {
    fn from(e: anyhow::Error) -> Self {
        Failure(1, format!("{e:#}"))
    }
}

pub fn main() -> ExitCode {
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
            outpost_agent::memory::read_code_page_by_page();
            // Trust, windows and the state store are checked before anything starts.
            let config = load(&config)?;
            outpost_agent::logging::init(&config.log);
            let agent = Agent::new(config).map_err(|e| Failure(2, format!("{e:#}")))?;
            runtime()?.block_on(daemon::run(agent))?;
        }
        Command::Node {
            agent,
            instance_id,
            settings,
            bootstrap_secret_file,
            state_dir,
            docker_socket,
            publish_address,
            network_subnet,
            disk_by_id,
            links_listen,
        } => {
            outpost_agent::logging::init(&Default::default());
            let secret = std::fs::read_to_string(&bootstrap_secret_file)
                .map_err(|e| Failure(2, format!("{}: {e}", bootstrap_secret_file.display())))?;
            let mut docker = outpost_agent::config::DockerConfig {
                socket: docker_socket,
                ..Default::default()
            };
            docker.network.subnet = network_subnet;
            let options = outpost_agent::rollout::vm::node::NodeOptions {
                agent,
                instance_id,
                settings,
                bootstrap_secret: secret.trim().to_string(),
                state_dir,
                docker,
                publish_address,
                disks: outpost_agent::rollout::vm::disk::Disks { by_id: disk_by_id },
                links_listen,
            };
            runtime()?.block_on(daemon::run_node(options))?;
        }
        Command::CloudPolicy(config) => {
            let config = load(&config)?;
            let Some(vm) = &config.vm else {
                return Err(Failure(
                    2,
                    "cloud-policy: this configuration has no vm section (runtime vm)".into(),
                ));
            };
            let policy = match vm.provider {
                outpost_agent::config::CloudProvider::Aws => {
                    outpost_agent::rollout::vm::policy::aws(vm, &config.expect.name)
                }
            };
            print_json(&policy)?;
        }
        Command::Status {
            config,
            output,
            watch,
        } => loop {
            let status = request(&config, Method::GET, "/status", None)?;
            if watch && std::io::IsTerminal::is_terminal(&std::io::stdout()) {
                // Clear the screen and go home: the new status replaces the old.
                print!("\x1b[2J\x1b[H");
            }
            match output {
                // Watching: one JSON object per line, for tools that follow it.
                Output::Json if watch => println!(
                    "{}",
                    serde_json::to_string(&status).map_err(|e| Failure(1, e.to_string()))?
                ),
                Output::Json => print_json(&status)?,
                Output::Text => print!("{}", status_text(&status)),
            }
            if !watch {
                break;
            }
            use std::io::Write;
            let _ = std::io::stdout().flush();
            std::thread::sleep(std::time::Duration::from_secs(1));
            if matches!(output, Output::Text) {
                println!();
            }
        },
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
        Command::Rollback {
            restore_data,
            config,
        } => print_message(&request(
            &config,
            Method::POST,
            "/rollback",
            Some(json!({"who": who(), "restore_data": restore_data})),
        )?),
        Command::Unpin(config) => print_message(&request(
            &config,
            Method::POST,
            "/unpin",
            Some(json!({"who": who()})),
        )?),
        Command::Snapshots { config, output } => {
            let snapshots = request(&config, Method::GET, "/snapshots", None)?;
            match output {
                Output::Json => print_json(&snapshots)?,
                Output::Text => print!("{}", snapshots_text(&snapshots, config::now())),
            }
        }
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
        Command::CheckState(arg) => {
            let config = load(&arg)?;
            let summary = outpost_agent::state::Store::check(&config.state_dir)
                .map_err(|problem| Failure(1, problem))?;
            println!("{summary}");
        }
        Command::SupportBundle {
            config: arg,
            out,
            log,
            dry_run,
        } => {
            let config = load(&arg)?;
            support::run(
                &arg.config,
                &config,
                out.as_deref(),
                log.as_deref(),
                dry_run,
            )?;
        }
        Command::ConfigSchema => print!("{}", config::json_schema()),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = Cli::command();
            clap_complete::generate(shell, &mut command, "outpost-agent", &mut std::io::stdout());
        }
        Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Failure(1, format!("stdout: {e}")))?;
        }
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
    let objects = outpost_agent::rollout::kubernetes::render::render(
        config,
        verified.stack(),
        &verified.digest().to_string(),
    )
    .map_err(|e| Failure(1, format!("{}: {e}", file.display())))?;
    let yaml = outpost_agent::rollout::kubernetes::render::to_yaml(&objects)
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
