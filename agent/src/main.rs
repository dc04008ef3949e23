//! `outpost-agent`: the customer's daemon (`run`) and CLI. The command definitions, the socket
//! client and the text rendering are in `cli/`.

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
