//! The command set is part of the contract. (Also makes `cargo test --workspace` build the
//! `outpost-signer` binary that the cross-crate tests in tests/ run.)

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::process::Command;

#[test]
fn help_lists_every_contract_command() {
    let output = Command::new(env!("CARGO_BIN_EXE_outpost-signer"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in [
        "keygen",
        "build",
        "sign",
        "verify",
        "inspect",
        "push",
        "root",
        "schema",
        "payload",
        "attach-signature",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from --help:\n{help}"
        );
    }
    let root = Command::new(env!("CARGO_BIN_EXE_outpost-signer"))
        .args(["root", "--help"])
        .output()
        .unwrap();
    let root = String::from_utf8_lossy(&root.stdout);
    for command in ["init", "sign", "rotate", "verify"] {
        assert!(
            root.lines().any(|l| l.trim_start().starts_with(command)),
            "root {command} missing:\n{root}"
        );
    }
}
