//! `build`: stack file → pinned stack → deterministic bundle layout.

use crate::cli::BuildArgs;
use crate::images;
use crate::images::Registries;
use crate::source_build::{self, Buildah, BuiltImage};
use crate::{Failure, Outcome, read_input, runtime};
use chrono::{DateTime, Duration, TimeZone, Utc};
use outpost_bundle_format::Digest;
use outpost_bundle_format::bundle;
use outpost_bundle_format::image_ref::ImageRef;
use outpost_bundle_format::release::{ReleaseMetadata, format_version_for, rfc3339};
use outpost_bundle_format::root;
use outpost_bundle_format::stack::{self, Code, MAX_STACK_FILE_BYTES, SourceBuild, Stack};

/// Releases expire this long after creation unless --expires says otherwise.
const DEFAULT_LIFETIME_DAYS: i64 = 90;

pub fn run(args: BuildArgs) -> Outcome {
    let text = read_input(&args.stack, MAX_STACK_FILE_BYTES as u64)?;
    let text = String::from_utf8(text)
        .map_err(|_| Failure::invalid(format!("{}: not UTF-8 text", args.stack.display())))?;
    let mut file = stack::parse_stack_yaml(&text)
        .map_err(|e| Failure::invalid(format!("{}: {e}", args.stack.display())))?;
    let sources = stack::check_before_build(&file)
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
    if args.offline && (args.with_images || args.image_repository.is_some()) {
        return Err(Failure::usage(
            "--with-images and --image-repository need a registry; they cannot be combined with --offline",
        ));
    }
    if let (Some(first), true) = (sources.first(), args.offline) {
        return Err(Failure::usage(format!(
            "{}: resource {} is built from source, which needs a registry (--image-repository) or --with-images; it cannot be combined with --offline",
            args.stack.display(),
            first.resource
        )));
    }
    if let (Some(repository), true) = (&args.image_repository, sources.is_empty()) {
        return Err(Failure::usage(format!(
            "--image-repository {repository}: {} has no resource built from source (code.type: source), so nothing would be pushed there; leave the option out",
            args.stack.display()
        )));
    }
    if let Some(first) = sources.first()
        && args.image_repository.is_none()
        && !args.with_images
    {
        return Err(Failure::usage(format!(
            "{}: resource {} is built from source: give --image-repository HOST/REPO to push its image, or --with-images to carry it in the bundle",
            args.stack.display(),
            first.resource
        )));
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

    let built = match &rt {
        Some(rt) if !sources.is_empty() => build_sources(
            &args,
            &file.name,
            &sources,
            spool.path(),
            (created.timestamp(), &version),
            |image, built| {
                rt.block_on(images::push_image(
                    registries.client(images::api_host(image.registry()))?,
                    &built.layout,
                    image.repository(),
                    (built.digest, &built.media_type),
                    image.tag().unwrap_or("latest"),
                    &progress,
                ))
            },
        )?,
        _ => Vec::new(),
    };

    // Pin every image by digest.
    for (index, entry) in file.resources.iter_mut().enumerate() {
        let at = format!(
            "{}: resources[{index}] ({}).code.image",
            args.stack.display(),
            entry.container.name
        );
        if let Some((image, _)) = built
            .iter()
            .find(|(_, b)| b.resource == entry.container.name)
        {
            entry.container.code = Code::image(image.to_string());
            continue;
        }
        // Checked by check_before_build.
        let image = ImageRef::parse(entry.container.code.image.as_deref().unwrap_or_default())
            .map_err(|e| Failure::invalid(format!("{at}: {e}")))?;
        if image.digest().is_some() {
            entry.container.code = Code::image(image.to_string());
            continue;
        }
        let Some(rt) = &rt else {
            return Err(Failure::invalid(format!(
                "{at}: image {image} is not pinned by digest (--offline cannot resolve tags)"
            )));
        };
        let digest = rt
            .block_on(registries.resolve(&image))
            .map_err(|e| Failure::invalid(format!("{at}: {}", e.message)))?;
        entry.container.code = Code::image(image.pinned(digest).to_string());
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
    let statements: Vec<Vec<u8>> = built
        .iter()
        .map(|(_, b)| b.provenance.statement())
        .collect();
    let mut layout = bundle::build_with_provenance(&file, &metadata, &roots, &statements)
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
            match built.iter().find(|(built, _)| built == image) {
                Some((_, built)) => images::carry_built(built, image, &mut layout)?,
                None => {
                    rt.block_on(registries.copy_into(image, &mut layout, spool.path(), &progress))?
                }
            }
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

/// Builds every source image (buildah, timestamps at `epoch`) and names it: pushed with `push`
/// to `--image-repository` as `<resource>-<version>`, else named for carrying only. Returns
/// each pinned name with its build; the provenance names the image.
fn build_sources(
    args: &BuildArgs,
    stack_name: &str,
    sources: &[SourceBuild],
    work: &std::path::Path,
    (epoch, version): (i64, &semver::Version),
    mut push: impl FnMut(&ImageRef, &BuiltImage) -> Result<Digest, Failure>,
) -> Result<Vec<(ImageRef, BuiltImage)>, Failure> {
    let stack_dir = args
        .stack
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(std::path::Path::new("."))
        .canonicalize()
        .map_err(|e| Failure::usage(format!("{}: {e}", args.stack.display())))?;
    let name = match &args.image_repository {
        Some(repository) => repository.clone(),
        None => format!("localhost/outpost/{stack_name}"),
    };
    // Everything that can be wrong is found before the first build.
    let mut prepared = Vec::new();
    for build in sources {
        let tag = source_build::image_tag(&build.resource, version);
        let reference = ImageRef::parse(&format!("{name}:{tag}"))
            .map_err(|e| Failure::usage(format!("--image-repository {name:?}: {e}")))?;
        let at = format!("{}: resource {}", args.stack.display(), build.resource);
        prepared.push((reference, source_build::prepare(at, &stack_dir, build)?));
    }
    let mut insecure = args.insecure_registries.clone();
    if let (Some((reference, _)), true) = (prepared.first(), args.registry.plain_http) {
        insecure.push(reference.registry().to_string());
    }
    let buildah = Buildah::new(&args.buildah, work, &insecure)?;
    let mut built = Vec::new();
    for (reference, source) in prepared {
        let mut image = buildah.build(&source, epoch)?;
        if args.image_repository.is_some() {
            let pushed = push(&reference, &image)?;
            if pushed != image.digest {
                return Err(Failure::invalid(format!(
                    "{}: the registry stored {pushed}, not the built {}",
                    source.at, image.digest
                )));
            }
            eprintln!("pushed {} to {reference}", image.digest);
        }
        image.provenance.image_name =
            format!("{}/{}", reference.registry(), reference.repository());
        built.push((reference.pinned(image.digest), image));
    }
    Ok(built)
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
