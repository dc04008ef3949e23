//! `root init|sign|rotate|verify`: the trust root's life cycle.

use crate::cli::RootCommand;
use crate::keys::{load_public_keys, load_signing_key, write_file};
use crate::{Failure, Outcome, read_input};
use chrono::{Duration, Utc};
use outpost_bundle_format::release::rfc3339;
use outpost_bundle_format::root::{self, MAX_ROOT_BYTES, TrustRoot};

pub fn run(command: RootCommand) -> Outcome {
    match command {
        RootCommand::Init(args) => {
            let keys = load_public_keys(&args.keys)?;
            let expires = expiry(args.expires.as_deref())?;
            let document =
                root::new_root(1, expires, args.threshold, &keys).map_err(Failure::usage)?;
            write_file(&args.out, &document)?;
            println!(
                "wrote {} (version 1, {} key(s), threshold {}); sign it with `outpost-signer root sign`",
                args.out.display(),
                keys.len(),
                args.threshold
            );
            Ok(())
        }
        RootCommand::Sign(args) => {
            let key = load_signing_key(&args.key)?;
            let raw = read_input(&args.root, MAX_ROOT_BYTES)?;
            let signed = root::sign_root(&raw, &key)
                .map_err(|e| Failure::invalid(format!("{}: {e}", args.root.display())))?;
            write_file(&args.root, &signed)?;
            println!(
                "signed {} with key {}",
                args.root.display(),
                key.public_key().key_id()
            );
            Ok(())
        }
        RootCommand::Rotate(args) => {
            let raw = read_input(&args.root, MAX_ROOT_BYTES)?;
            let version = root::peek_version(&raw)
                .map_err(|e| Failure::invalid(format!("{}: {e}", args.root.display())))?;
            let keys = load_public_keys(&args.keys)?;
            let expires = expiry(args.expires.as_deref())?;
            let document = root::new_root(version + 1, expires, args.threshold, &keys)
                .map_err(Failure::usage)?;
            write_file(&args.out, &document)?;
            println!(
                "wrote {} (version {}); it needs signatures from a threshold of version {version}'s keys and of its own",
                args.out.display(),
                version + 1
            );
            Ok(())
        }
        RootCommand::Verify(args) => {
            let raw = read_input(&args.root, MAX_ROOT_BYTES)?;
            let trusted = match &args.previous {
                Some(previous) => {
                    let previous_raw = read_input(previous, MAX_ROOT_BYTES)?;
                    let previous = TrustRoot::from_pinned(&previous_raw)
                        .map_err(|e| Failure::invalid(format!("{}: {e}", args.root.display())))?;
                    previous.rotate(&raw)
                }
                None => TrustRoot::from_pinned(&raw),
            }
            .map_err(|e| Failure::invalid(format!("{}: trust-root: {e}", args.root.display())))?;
            if trusted.is_expired(Utc::now()) {
                return Err(Failure::invalid(format!(
                    "{}: trust-root: expired at {}",
                    args.root.display(),
                    rfc3339::format(&trusted.expires())
                )));
            }
            println!(
                "root v{} ok: {} key(s), threshold {}, expires {}",
                trusted.version(),
                trusted.keys().count(),
                trusted.threshold(),
                rfc3339::format(&trusted.expires())
            );
            Ok(())
        }
    }
}

fn expiry(flag: Option<&str>) -> Result<chrono::DateTime<Utc>, Failure> {
    match flag {
        Some(text) => rfc3339::parse(text).map_err(|e| Failure::usage(format!("--expires: {e}"))),
        None => Ok(Utc::now() + Duration::days(365)),
    }
}
