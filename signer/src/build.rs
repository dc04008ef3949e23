//! `build`: stack file → pinned stack → deterministic bundle layout.

use crate::cli::BuildArgs;
use crate::images::Registries;
use crate::{Failure, Outcome, read_input, runtime};
use chrono::{DateTime, Duration, TimeZone, Utc};
use outpost_bundle_format::bundle;
use outpost_bundle_format::release::{ReleaseMetadata, format_version_for, rfc3339};
use outpost_bundle_format::root;
use outpost_bundle_format::stack::{MAX_STACK_FILE_BYTES, Stack};

/// Releases expire this long after creation unless --expires says otherwise.
const DEFAULT_LIFETIME_DAYS: i64 = 90;

pub fn run(args: BuildArgs) -> Outcome {
    let text = read_input(&args.stack, MAX_STACK_FILE_BYTES as u64)?;
    let text = String::from_utf8(text)
        .map_err(|_| Failure::invalid(format!("{}: not UTF-8 text", args.stack.display())))?;
    let (mut file, stack) = Stack::from_yaml(&text)
        .map_err(|e| Failure::invalid(format!("{}: {e}", args.stack.display())))?;

    let version = semver::Version::parse(&args.version)
        .map_err(|e| Failure::usage(format!("--version {:?}: {e}", args.version)))?;
    let created = created_time(args.created.as_deref())?;
    let expires = match &args.expires {
        Some(text) => {
            rfc3339::parse(text).map_err(|e| Failure::usage(format!("--expires: {e}")))?
        }
        None => created + Duration::days(DEFAULT_LIFETIME_DAYS),
    };
    if args.offline && args.with_images {
        return Err(Failure::usage(
            "--with-images needs a registry; it cannot be combined with --offline",
        ));
    }
    let mut roots = Vec::new();
    for path in &args.root_updates {
        let raw = read_input(path, root::MAX_ROOT_BYTES)?;
        root::peek_version(&raw)
            .map_err(|e| Failure::invalid(format!("{}: {e}", path.display())))?;
        roots.push(raw);
    }
    let previous = match &args.root_previous {
        Some(path) => Some(
            root::TrustRoot::from_pinned(&read_input(path, root::MAX_ROOT_BYTES)?).map_err(
                |e| Failure::invalid(format!("--root-previous {}: {e}", path.display())),
            )?,
        ),
        None => None,
    };
    root::check_carried_chain(&roots, previous.as_ref())
        .map_err(|e| Failure::invalid(format!("--root-update: {e}")))?;

    let spool =
        tempfile::tempdir().map_err(|e| Failure::usage(format!("temporary directory: {e}")))?;
    let mut registries = Registries::new(&args.registry);
    let progress = crate::progress::Progress::new(args.quiet);
    let rt = if args.offline { None } else { Some(runtime()?) };

    // Pin every image by digest.
    for (index, entry) in file.resources.iter_mut().enumerate() {
        let Some(resource) = stack.resource(&entry.container.name) else {
            continue;
        };
        // The pinned stack spells code the one way every reader of format version 1 knows.
        entry.container.code.kind = None;
        let image = &resource.container.image;
        if image.digest().is_some() {
            entry.container.code.image = image.to_string();
            continue;
        }
        let at = format!(
            "{}: resources[{index}] ({}).code.image",
            args.stack.display(),
            entry.container.name
        );
        let Some(rt) = &rt else {
            return Err(Failure::invalid(format!(
                "{at}: image {image} is not pinned by digest (--offline cannot resolve tags)"
            )));
        };
        let digest = rt
            .block_on(registries.resolve(image))
            .map_err(|e| Failure::invalid(format!("{at}: {}", e.message)))?;
        entry.container.code.image = image.pinned(digest).to_string();
    }

    let metadata = ReleaseMetadata {
        format_version: format_version_for(&args.irreversible),
        name: file.name.clone(),
        version,
        sequence: args.sequence,
        channel: args.channel.clone(),
        created,
        expires,
        irreversible: args.irreversible.clone(),
    };
    let mut layout = bundle::build(&file, &metadata, &roots)
        .map_err(|e| Failure::invalid(format!("{}: {e}", args.stack.display())))?;

    if let (true, Some(rt)) = (args.with_images, &rt) {
        let pinned = Stack::from_file(&file).map_err(Failure::invalid)?;
        let mut images: Vec<_> = pinned
            .resources
            .iter()
            .map(|r| r.container.image.clone())
            .collect();
        images.sort();
        images.dedup();
        for image in &images {
            rt.block_on(registries.copy_into(image, &mut layout, spool.path(), &progress))?;
        }
    }

    let digest = bundle::bundle_descriptor(&layout)
        .map_err(Failure::invalid)?
        .digest;
    let target = match (&args.out, &args.out_dir) {
        (Some(path), _) => {
            layout
                .write_tar_file(path)
                .map_err(|e| Failure::usage(format!("{}: {e}", path.display())))?;
            path
        }
        (None, Some(dir)) => {
            layout
                .write_dir(dir)
                .map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?;
            dir
        }
        (None, None) => return Err(Failure::usage("--out FILE or --out-dir DIR is required")),
    };
    println!(
        "built {} {} sequence {} {} -> {}",
        metadata.name,
        metadata.version,
        metadata.sequence,
        digest,
        target.display()
    );
    Ok(())
}

/// --created, else $SOURCE_DATE_EPOCH (reproducible builds), else now; whole seconds.
fn created_time(flag: Option<&str>) -> Result<DateTime<Utc>, Failure> {
    if let Some(text) = flag {
        return rfc3339::parse(text).map_err(|e| Failure::usage(format!("--created: {e}")));
    }
    if let Some(epoch) = std::env::var_os("SOURCE_DATE_EPOCH") {
        let epoch = epoch.to_string_lossy();
        let seconds: i64 = epoch.trim().parse().map_err(|_| {
            Failure::usage(format!(
                "SOURCE_DATE_EPOCH={epoch:?} is not a number of seconds"
            ))
        })?;
        return Utc
            .timestamp_opt(seconds, 0)
            .single()
            .ok_or_else(|| Failure::usage(format!("SOURCE_DATE_EPOCH={epoch:?} is out of range")));
    }
    let now = Utc::now();
    Utc.timestamp_opt(now.timestamp(), 0)
        .single()
        .ok_or_else(|| Failure::invalid("clock out of range"))
}
