//! The customer's command set is part of the contract. (Also makes `cargo test --workspace`
//! build the `outpost-agent` binary that the cross-crate tests in tests/ run.)

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::process::Command;

#[test]
fn help_lists_every_contract_command() {
    let output = Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
        .arg("--help")
        .output()
        .unwrap();
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for command in [
        "run",
        "status",
        "plan",
        "approve",
        "reject",
        "pin",
        "unpin",
        "rollback",
        "history",
        "verify",
        "render",
        "config-schema",
    ] {
        assert!(
            help.lines().any(|l| l.trim_start().starts_with(command)),
            "{command} missing from --help:\n{help}"
        );
    }
}

#[test]
fn every_customer_command_takes_config() {
    for args in [
        &["status"][..],
        &["plan"],
        &["approve", "1.0.0"],
        &["reject", "1.0.0", "--reason", "x"],
        &["pin", "1.0.0"],
        &["unpin"],
        &["history"],
        &["verify", "f.tar"],
        &["run"],
    ] {
        let output = Command::new(env!("CARGO_BIN_EXE_outpost-agent"))
            .args(args)
            .arg("--help")
            .output()
            .unwrap();
        let help = String::from_utf8_lossy(&output.stdout);
        assert!(help.contains("--config <CONFIG>"), "{args:?}:\n{help}");
    }
}
