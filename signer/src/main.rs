//! `outpost-signer`: the vendor's CLI. Builds a release bundle from a stack file, signs it
//! (cosign-compatible), verifies and inspects it, publishes it to a registry, a directory or a
//! git repository, and manages the trust root. The format itself lives in
//! `outpost-bundle-format`; this crate is glue and I/O.
//!
//! Exit codes: 0 ok, 1 validation or verification failed, 2 usage error.

mod build;
mod cli;
mod images;
mod inspect;
mod keys;
mod progress;
mod publish;
mod root_cmd;
mod source_build;

use clap::Parser;
use std::process::ExitCode;

/// A failure with the exit code it maps to. Printed as one line.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Input that fails validation or verification (exit 1).
    pub fn invalid(message: impl std::fmt::Display) -> Self {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }
    /// Bad arguments, missing files (exit 2).
    pub fn usage(message: impl std::fmt::Display) -> Self {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }
}

pub type Outcome = Result<(), Failure>;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let result = match args.command {
        cli::Command::Keygen(a) => keys::keygen(a),
        cli::Command::Build(a) => build::run(*a),
        cli::Command::Sign(a) => keys::sign(a),
        cli::Command::AttachSignature(a) => keys::attach(a),
        cli::Command::Payload(a) => keys::payload(a),
        cli::Command::Verify(a) => keys::verify(a),
        cli::Command::Inspect(a) => inspect::run(a),
        cli::Command::Push(a) => publish::run(a),
        cli::Command::Root(a) => root_cmd::run(a),
        cli::Command::Schema => {
            print!("{}", outpost_bundle_format::stack::json_schema());
            Ok(())
        }
        cli::Command::Completions { shell } => {
            use clap::CommandFactory;
            let mut command = cli::Cli::command();
            clap_complete::generate(
                shell,
                &mut command,
                "outpost-signer",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        cli::Command::Man => {
            use clap::CommandFactory;
            clap_mangen::Man::new(cli::Cli::command())
                .render(&mut std::io::stdout())
                .map_err(|e| Failure::usage(format!("stdout: {e}")))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message.replace('\n', " "));
            ExitCode::from(failure.code)
        }
    }
}

/// Reads a whole input file, bounded; a missing file is a usage error.
pub fn read_input(path: &std::path::Path, limit: u64) -> Result<Vec<u8>, Failure> {
    let meta =
        std::fs::metadata(path).map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
    if meta.len() > limit {
        return Err(Failure::invalid(format!(
            "{}: {} bytes is over the {limit}-byte limit",
            path.display(),
            meta.len()
        )));
    }
    std::fs::read(path).map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

/// A tokio runtime for the commands that talk to registries.
pub fn runtime() -> Result<tokio::runtime::Runtime, Failure> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| Failure::invalid(format!("cannot start the async runtime: {e}")))
}
