//! `push`: publish a bundle to an OCI registry, a directory (file drop) or a git repository.
//! The bundle digest is the same at every destination: manifests travel as exact bytes.

use crate::cli::PushArgs;
use crate::images::{Registries, push_image};
use crate::keys::open_bundle;
use crate::{Failure, Outcome, runtime};
use outpost_bundle_format::Digest;
use outpost_bundle_format::bundle;
use outpost_bundle_format::layout::oci;
use outpost_bundle_format::layout::{Layout, Limits};
use outpost_registry_client::Reference;
use std::path::Path;

pub fn run(args: PushArgs) -> Outcome {
    let opened = open_bundle(&args.bundle)?;
    let layout = &opened.layout;
    let parts = bundle::read_parts(layout, &Limits::default())
        .map_err(|e| Failure::invalid(format!("{}: {e}", args.bundle.display())))?;
    let metadata = bundle::parse_metadata(&parts.metadata_bytes).map_err(Failure::invalid)?;
    let destination = args.destination.as_str();
    if let Some(path) = destination.strip_prefix("dir://") {
        let name = format!("{}-{}.tar", metadata.name, metadata.version);
        let target = Path::new(path).join(&name);
        std::fs::create_dir_all(path).map_err(|e| Failure::usage(format!("{path}: {e}")))?;
        // write_tar_file writes a dot-file then renames: a watching agent never sees a partial file.
        layout
            .write_tar_file(&target)
            .map_err(|e| Failure::usage(format!("{}: {e}", target.display())))?;
        println!("pushed {} to {}", parts.digest, target.display());
        Ok(())
    } else if let Some(url) = destination.strip_prefix("git+") {
        push_git(
            layout,
            url,
            &args.git_branch,
            &args.git_path,
            &metadata,
            parts.digest,
        )
    } else if destination.starts_with("oci://") {
        let reference = Reference::parse(destination).map_err(Failure::usage)?;
        let tag = reference
            .reference
            .clone()
            .unwrap_or_else(|| metadata.version.to_string());
        if Digest::parse(&tag).is_ok() {
            return Err(Failure::usage("push to a tag, not a digest"));
        }
        let rt = runtime()?;
        let progress = crate::progress::Progress::new(args.quiet);
        let progress = &progress;
        let mut registries = Registries::new(&args.registry);
        let registry = registries.client(&reference.host)?;
        let repository = reference.repository.as_str();
        let push_manifest = |digest: Digest, tag: String| async move {
            push_image(
                registry,
                layout,
                repository,
                (digest, oci::MEDIA_TYPE_MANIFEST),
                &tag,
                progress,
            )
            .await
        };
        let pushed = rt.block_on(push_manifest(parts.digest, tag.clone()))?;
        let signature_tag = parts.digest.signature_tag();
        let signature_manifest = layout
            .index()
            .manifests
            .iter()
            .find(|d| d.ref_name() == Some(signature_tag.as_str()))
            .map(|d| d.digest);
        if let Some(digest) = signature_manifest {
            rt.block_on(push_manifest(digest, signature_tag))?;
        }
        println!(
            "pushed {pushed} to oci://{}/{repository}:{tag} ({} signature(s))",
            reference.host,
            parts.signatures.len()
        );
        Ok(())
    } else {
        Err(Failure::usage(format!(
            "unknown destination {destination:?}: use oci://HOST/REPO[:TAG], dir://PATH or git+URL"
        )))
    }
}

/// Commits the bundle tar at `path` on `branch` of the repository at `url`, then pushes.
fn push_git(
    layout: &Layout,
    url: &str,
    branch: &str,
    path: &str,
    metadata: &outpost_bundle_format::ReleaseMetadata,
    digest: Digest,
) -> Outcome {
    let relative = Path::new(path);
    let safe = relative
        .components()
        .all(|c| matches!(c, std::path::Component::Normal(_)));
    if !safe || path.is_empty() {
        return Err(Failure::usage(format!(
            "--git-path {path:?} must be a relative path inside the repository"
        )));
    }
    let git_fail = |e: git2::Error| Failure::invalid(format!("git {url}: {}", e.message()));
    let work =
        tempfile::tempdir().map_err(|e| Failure::usage(format!("temporary directory: {e}")))?;
    let mut fetch = git2::FetchOptions::new();
    fetch.remote_callbacks(git_callbacks());
    let repo = git2::build::RepoBuilder::new()
        .fetch_options(fetch)
        .clone(url, work.path())
        .map_err(git_fail)?;

    // Start from the branch if it exists (an empty repository has none yet).
    let parent = repo
        .find_reference(&format!("refs/remotes/origin/{branch}"))
        .ok()
        .and_then(|r| r.peel_to_commit().ok());
    let target = work.path().join(relative);
    if let Some(dir) = target.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::usage(format!("{}: {e}", dir.display())))?;
    }
    let mut index = repo.index().map_err(git_fail)?;
    if let Some(parent) = &parent {
        index
            .read_tree(&parent.tree().map_err(git_fail)?)
            .map_err(git_fail)?;
    }
    layout
        .write_tar_file(&target)
        .map_err(|e| Failure::usage(e.to_string()))?;
    index.add_path(relative).map_err(git_fail)?;
    let tree = repo
        .find_tree(index.write_tree().map_err(git_fail)?)
        .map_err(git_fail)?;
    let signature =
        git2::Signature::now("outpost-signer", "outpost-signer@localhost").map_err(git_fail)?;
    let message = format!(
        "release {} {} (sequence {})\n\nbundle {digest}\n",
        metadata.name, metadata.version, metadata.sequence
    );
    let parents: Vec<&git2::Commit> = parent.iter().collect();
    let commit = repo
        .commit(None, &signature, &signature, &message, &tree, &parents)
        .map_err(git_fail)?;
    let refname = format!("refs/heads/{branch}");
    repo.reference(&refname, commit, true, "outpost-signer push")
        .map_err(git_fail)?;

    let rejected = std::cell::RefCell::new(None);
    let mut callbacks = git_callbacks();
    callbacks.push_update_reference(|reference, status| {
        if let Some(status) = status {
            *rejected.borrow_mut() = Some(format!("{reference}: {status}"));
        }
        Ok(())
    });
    let mut push = git2::PushOptions::new();
    push.remote_callbacks(callbacks);
    let mut remote = repo.find_remote("origin").map_err(git_fail)?;
    remote
        .push(&[format!("{refname}:{refname}")], Some(&mut push))
        .map_err(git_fail)?;
    drop(remote);
    drop(push);
    if let Some(reason) = rejected.into_inner() {
        return Err(Failure::invalid(format!(
            "git {url}: push rejected: {reason}"
        )));
    }
    println!("pushed {digest} to {url} {branch}:{path} (commit {commit})");
    Ok(())
}

/// Credentials for https remotes from OUTPOST_GIT_USERNAME / OUTPOST_GIT_PASSWORD (or the URL's user).
fn git_callbacks<'a>() -> git2::RemoteCallbacks<'a> {
    let mut callbacks = git2::RemoteCallbacks::new();
    callbacks.credentials(|_url, username, _allowed| {
        match (
            std::env::var("OUTPOST_GIT_USERNAME")
                .ok()
                .or(username.map(String::from)),
            std::env::var("OUTPOST_GIT_PASSWORD").ok(),
        ) {
            (Some(user), Some(password)) => git2::Cred::userpass_plaintext(&user, &password),
            _ => Err(git2::Error::from_str(
                "the repository needs credentials (OUTPOST_GIT_USERNAME / OUTPOST_GIT_PASSWORD)",
            )),
        }
    });
    callbacks
}
