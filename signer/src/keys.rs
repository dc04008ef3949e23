//! Key pairs and the sign / verify commands.

use crate::cli::{AttachArgs, KeygenArgs, PayloadArgs, SignArgs, VerifyArgs};
use crate::{Failure, Outcome, read_input};
use outpost_bundle_format::crypto::{PublicKey, SigningKey};
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_bundle_format::root::TrustRoot;
use outpost_bundle_format::verify::verify as verify_bundle;
use outpost_bundle_format::{Trust, bundle};
use std::path::{Path, PathBuf};

const MAX_KEY_BYTES: u64 = 64 * 1024;

/// OUTPOST_PASSWORD, else COSIGN_PASSWORD, else empty.
fn password() -> Vec<u8> {
    std::env::var_os("OUTPOST_PASSWORD")
        .or_else(|| std::env::var_os("COSIGN_PASSWORD"))
        .map(|p| p.into_encoded_bytes())
        .unwrap_or_default()
}

pub fn load_signing_key(path: &Path) -> Result<SigningKey, Failure> {
    let pem = read_input(path, MAX_KEY_BYTES)?;
    SigningKey::from_encrypted_pem(&pem, &password())
        .map_err(|e| Failure::invalid(format!("{}: {e}", path.display())))
}

pub fn load_public_key(path: &Path) -> Result<PublicKey, Failure> {
    let pem = read_input(path, MAX_KEY_BYTES)?;
    PublicKey::from_pem(&pem).map_err(|e| Failure::invalid(format!("{}: {e}", path.display())))
}

pub fn load_public_keys(paths: &[PathBuf]) -> Result<Vec<PublicKey>, Failure> {
    let mut keys: Vec<PublicKey> = Vec::new();
    for path in paths {
        let key = load_public_key(path)?;
        if keys.contains(&key) {
            return Err(Failure::usage(format!(
                "{}: the same key is given twice",
                path.display()
            )));
        }
        keys.push(key);
    }
    Ok(keys)
}

pub fn load_root(path: &Path) -> Result<TrustRoot, Failure> {
    let raw = read_input(path, outpost_bundle_format::root::MAX_ROOT_BYTES)?;
    TrustRoot::from_pinned(&raw)
        .map_err(|e| Failure::invalid(format!("{}: trust-root: {e}", path.display())))
}

pub fn keygen(args: KeygenArgs) -> Outcome {
    let key_path = args.out_dir.join("outpost.key");
    let pub_path = args.out_dir.join("outpost.pub");
    if !args.force && (key_path.exists() || pub_path.exists()) {
        return Err(Failure::usage(format!(
            "{} already holds a key pair (use --force to replace it)",
            args.out_dir.display()
        )));
    }
    std::fs::create_dir_all(&args.out_dir)
        .map_err(|e| Failure::usage(format!("{}: {e}", args.out_dir.display())))?;
    let key = SigningKey::generate().map_err(Failure::invalid)?;
    let pem = key
        .to_encrypted_pem(&password())
        .map_err(Failure::invalid)?;
    write_private(&key_path, pem.as_bytes())?;
    write_file(&pub_path, key.public_key().to_pem().as_bytes())?;
    println!(
        "wrote {} and {} (key id {})",
        key_path.display(),
        pub_path.display(),
        key.public_key().key_id()
    );
    Ok(())
}

fn write_private(path: &Path, bytes: &[u8]) -> Outcome {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("key.tmp");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| Failure::usage(format!("{}: {e}", tmp.display())))?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|e| Failure::usage(format!("{}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
}

pub fn write_file(path: &Path, bytes: &[u8]) -> Outcome {
    outpost_bundle_format::layout::write_atomic(path, bytes)
        .map_err(|e| Failure::usage(e.to_string()))
}

/// A bundle opened for reading; large blobs of a tar stay in `_spool` until it is dropped.
pub struct OpenBundle {
    pub layout: Layout,
    _spool: Option<tempfile::TempDir>,
}

/// A spool for the blobs of a tar bundle that are not held in memory, beside the bundle (a
/// directory's blobs stay where they are).
fn spool_for(path: &Path) -> Result<Option<tempfile::TempDir>, Failure> {
    let meta =
        std::fs::metadata(path).map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
    if meta.is_dir() {
        return Ok(None);
    }
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    tempfile::Builder::new()
        .prefix(".outpost-spool")
        .tempdir_in(parent)
        .map(Some)
        .map_err(|e| Failure::usage(format!("{}: {e}", parent.display())))
}

/// Reads a bundle (tar or directory) with default limits, keeping every blob available.
pub fn open_bundle(path: &Path) -> Result<OpenBundle, Failure> {
    let spool = spool_for(path)?;
    let layout = Layout::read(path, &Limits::default(), spool.as_ref().map(|s| s.path()))
        .map_err(|e| Failure::invalid(format!("{}: {}: {e}", path.display(), e.check())))?;
    Ok(OpenBundle {
        layout,
        _spool: spool,
    })
}

/// Writes a layout back where it came from (tar file or directory), atomically.
pub fn save_bundle(layout: &Layout, path: &Path) -> Outcome {
    let result = if path.is_dir() {
        layout.write_dir(path)
    } else {
        layout.write_tar_file(path)
    };
    result.map_err(|e| Failure::invalid(format!("{}: {e}", path.display())))
}

/// The bundle digest and the docker-reference to sign (default: the stack name).
fn signing_target(
    layout: &Layout,
    path: &Path,
    reference: Option<String>,
) -> Result<(outpost_bundle_format::Digest, String), Failure> {
    let parts = bundle::read_parts(layout, &Limits::default())
        .map_err(|e| Failure::invalid(format!("{}: {}: {e}", path.display(), e.check())))?;
    let reference = match reference {
        Some(reference) => reference,
        None => {
            bundle::parse_metadata(&parts.metadata_bytes)
                .map_err(Failure::invalid)?
                .name
        }
    };
    Ok((parts.digest, reference))
}

pub fn sign(args: SignArgs) -> Outcome {
    let key = load_signing_key(&args.key)?;
    let mut bundle_file = open_bundle(&args.bundle)?;
    let (digest, reference) = signing_target(&bundle_file.layout, &args.bundle, args.reference)?;
    let added = bundle::add_signature(&mut bundle_file.layout, &key, &reference)
        .map_err(|e| Failure::invalid(format!("{}: {e}", args.bundle.display())))?;
    if added {
        save_bundle(&bundle_file.layout, &args.bundle)?;
        println!("signed {digest} with key {}", key.public_key().key_id());
    } else {
        println!(
            "{digest} is already signed by key {}",
            key.public_key().key_id()
        );
    }
    Ok(())
}

pub fn payload(args: PayloadArgs) -> Outcome {
    let opened = open_bundle(&args.bundle)?;
    let (digest, reference) = signing_target(&opened.layout, &args.bundle, args.reference)?;
    let payload = outpost_bundle_format::signature::payload(&reference, &digest);
    match &args.out {
        Some(path) => write_file(path, &payload),
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(&payload)
                .map_err(|e| Failure::usage(format!("stdout: {e}")))
        }
    }
}

pub fn attach(args: AttachArgs) -> Outcome {
    use base64::Engine as _;
    let payload = read_input(
        &args.payload,
        outpost_bundle_format::signature::MAX_PAYLOAD_BYTES,
    )?;
    let raw = read_input(&args.signature, 64 * 1024)?;
    // DER ECDSA signatures start with a SEQUENCE tag (0x30); otherwise expect base64 text.
    let signature = if raw.first() == Some(&0x30) {
        raw
    } else {
        let text: Vec<u8> = raw
            .into_iter()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|_| {
                Failure::invalid(format!(
                    "{}: neither DER nor base64",
                    args.signature.display()
                ))
            })?
    };
    let mut opened = open_bundle(&args.bundle)?;
    bundle::attach_signature(&mut opened.layout, payload, &signature)
        .map_err(|e| Failure::invalid(format!("{}: {e}", args.bundle.display())))?;
    save_bundle(&opened.layout, &args.bundle)?;
    println!("attached the signature to {}", args.bundle.display());
    Ok(())
}

pub fn verify(args: VerifyArgs) -> Outcome {
    let trust = match &args.root {
        Some(root) => Trust::Root(load_root(root)?),
        None => {
            let keys = load_public_keys(&args.keys)?;
            let threshold = args.threshold.unwrap_or(1);
            if threshold == 0 || threshold > keys.len() {
                return Err(Failure::usage(format!(
                    "--threshold {threshold} needs between 1 and {} keys",
                    keys.len()
                )));
            }
            Trust::Keys { keys, threshold }
        }
    };
    if !args.bundle.exists() {
        return Err(Failure::usage(format!(
            "{}: no such file or directory",
            args.bundle.display()
        )));
    }
    let limits = Limits::default();
    let spool = spool_for(&args.bundle)?;
    let verified = Layout::read(&args.bundle, &limits, spool.as_ref().map(|s| s.path()))
        .map_err(outpost_bundle_format::VerifyError::from)
        .and_then(|layout| verify_bundle(&layout, &trust, chrono::Utc::now(), &limits))
        .map_err(|e| Failure::invalid(format!("verification failed: {}: {e}", e.check())))?;
    let metadata = verified.metadata();
    println!(
        "verified {} {} sequence {} {}",
        metadata.name,
        metadata.version,
        metadata.sequence,
        verified.digest()
    );
    Ok(())
}
