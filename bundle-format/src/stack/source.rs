//! `code: {type: source}`: the builds a stack file asks for, checked before anything is built.
//! Paths are checked as text here; the signer checks them again against the file system
//! (symbolic links) before it builds.

use super::{Code, CodeKind, Location, Stack, StackError, StackFile, err};
use std::collections::BTreeMap;

/// Build arguments one source build may pass.
const MAX_BUILD_ARGS: usize = 64;
/// Platforms one source build may target.
const MAX_PLATFORMS: usize = 16;

/// One image to build from source, as the stack file asks for it (paths normalised).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceBuild {
    pub resource: String,
    /// The build context, relative to the stack file's directory, `/`-separated (`.` for the
    /// directory itself).
    pub src: String,
    /// The Dockerfile, relative to `src`.
    pub dockerfile: String,
    pub target: Option<String>,
    pub args: BTreeMap<String, String>,
    pub platforms: Vec<String>,
}

/// Checks every rule of the stack model for a stack file that may still hold source code, and
/// returns the builds it asks for. Source resources are checked with a placeholder image, so a
/// mistake anywhere is found before a build starts.
pub fn check_before_build(file: &StackFile) -> Result<Vec<SourceBuild>, StackError> {
    let mut builds = Vec::new();
    let mut placeholder = file.clone();
    for (index, entry) in placeholder.resources.iter_mut().enumerate() {
        let spec = &mut entry.container;
        if !spec.code.is_source() {
            continue;
        }
        let at = Location {
            prefix: format!("resources[{index}] ({})", spec.name),
        };
        builds.push(check_source(&at, &spec.name, &spec.code)?);
        spec.code = Code::image(format!(
            "outpost.invalid/source/{}@sha256:{}",
            spec.name.to_ascii_lowercase(),
            "0".repeat(64)
        ));
    }
    Stack::from_file(&placeholder)?;
    Ok(builds)
}

/// The first field only `type: source` may have, if `code` has one.
pub(super) fn source_only_field(code: &Code) -> Option<&'static str> {
    [
        ("src", code.src.is_some()),
        ("dockerfile", code.dockerfile.is_some()),
        ("target", code.target.is_some()),
        ("args", !code.args.is_empty()),
        ("platforms", !code.platforms.is_empty()),
    ]
    .into_iter()
    .find_map(|(field, present)| present.then_some(field))
}

fn check_source(at: &Location, resource: &str, code: &Code) -> Result<SourceBuild, StackError> {
    debug_assert_eq!(code.kind, Some(CodeKind::Source));
    if code.image.is_some() {
        return Err(err(
            at.field("code.image"),
            "`type: source` builds its image; give `src`, not `image`",
        ));
    }
    let src = code
        .src
        .as_deref()
        .ok_or_else(|| err(at.field("code.src"), "is required for `type: source`"))?;
    let src = relative_path(&at.field("code.src"), src)?;
    let dockerfile = relative_path(
        &at.field("code.dockerfile"),
        code.dockerfile.as_deref().unwrap_or("Dockerfile"),
    )?;
    if dockerfile == "." {
        return Err(err(at.field("code.dockerfile"), "must name a file"));
    }
    if let Some(target) = &code.target
        && !is_stage_name(target)
    {
        return Err(err(
            at.field("code.target"),
            format!("{target:?} is not a build stage name (letters, digits, '_', '.', '-')"),
        ));
    }
    if code.args.len() > MAX_BUILD_ARGS {
        return Err(err(
            at.field("code.args"),
            format!("at most {MAX_BUILD_ARGS} build arguments"),
        ));
    }
    for (name, value) in &code.args {
        if !super::is_environment_name(name) {
            return Err(err(
                at.field(format_args!("code.args.{name}")),
                "a build argument's name must match [A-Za-z_][A-Za-z0-9_]*",
            ));
        }
        if value.chars().any(char::is_control) {
            return Err(err(
                at.field(format_args!("code.args.{name}")),
                "must not contain control characters (newlines, tabs, NUL)",
            ));
        }
    }
    if code.platforms.len() > MAX_PLATFORMS {
        return Err(err(
            at.field("code.platforms"),
            format!("at most {MAX_PLATFORMS} platforms"),
        ));
    }
    for (i, platform) in code.platforms.iter().enumerate() {
        let here = at.field(format_args!("code.platforms[{i}]"));
        if !is_platform(platform) {
            return Err(err(
                here,
                format!("{platform:?} is not a platform like linux/amd64 or linux/arm64/v8"),
            ));
        }
        if code.platforms[..i].contains(platform) {
            return Err(err(here, format!("{platform} is listed twice")));
        }
    }
    Ok(SourceBuild {
        resource: resource.to_string(),
        src,
        dockerfile,
        target: code.target.clone(),
        args: code.args.clone(),
        platforms: code.platforms.clone(),
    })
}

/// A relative path that stays below its base: no leading `/`, no `..`; `.` and empty components
/// dropped.
pub(crate) fn relative_path(at: &str, text: &str) -> Result<String, StackError> {
    if text.is_empty() || text.len() > 4096 || text.contains('\0') {
        return Err(err(at, "must be a relative path (1-4096 bytes, no NUL)"));
    }
    if text.starts_with('/') {
        return Err(err(
            at,
            format!("{text:?} is absolute; give a path relative to the stack file"),
        ));
    }
    let mut parts = Vec::new();
    for part in text.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(err(
                    at,
                    format!("{text:?} leaves the stack's directory tree ('..')"),
                ));
            }
            part => parts.push(part),
        }
    }
    Ok(if parts.is_empty() {
        ".".into()
    } else {
        parts.join("/")
    })
}

pub(crate) fn is_stage_name(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 128
        && bytes[0].is_ascii_alphanumeric()
        && bytes
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

/// `os/arch` or `os/arch/variant`, each part lowercase letters, digits or `_`.
pub(crate) fn is_platform(text: &str) -> bool {
    let parts: Vec<&str> = text.split('/').collect();
    (2..=3).contains(&parts.len())
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.len() <= 32
                && p.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    const STACK: &str = "name: shop\nresources:\n  - lifecycle: live\n    container:\n      name: api\n      code: CODE\n      cpu: 1\n      memory: 64Mi\n      ports: [8080]\n      permissions: none\npermissionProfiles:\n  none: {}\n";

    fn builds(code: &str) -> Result<Vec<SourceBuild>, String> {
        let file = super::super::parse_stack_yaml(&STACK.replace("CODE", code))
            .map_err(|e| e.to_string())?;
        check_before_build(&file).map_err(|e| e.to_string())
    }

    #[test]
    fn a_source_build_is_read_with_its_defaults_and_paths_normalised() {
        let got = builds("{type: source, src: ./services//api/.}").unwrap();
        assert_eq!(
            got,
            vec![SourceBuild {
                resource: "api".into(),
                src: "services/api".into(),
                dockerfile: "Dockerfile".into(),
                target: None,
                args: BTreeMap::new(),
                platforms: vec![],
            }]
        );
        let got = builds(
            "{type: source, src: ., dockerfile: build/Containerfile, target: run, args: {V: '1'}, platforms: [linux/amd64, linux/arm64/v8]}",
        )
        .unwrap();
        assert_eq!(got[0].src, ".");
        assert_eq!(got[0].dockerfile, "build/Containerfile");
        assert_eq!(got[0].platforms.len(), 2);
        assert!(builds("{image: ghcr.io/a/b:1}").unwrap().is_empty());
    }

    #[test]
    fn bad_source_fields_are_refused_by_name() {
        for (code, expected) in [
            ("{type: source}", "(api).code.src: is required"),
            (
                "{type: source, src: ../elsewhere}",
                "(api).code.src: \"../elsewhere\" leaves",
            ),
            (
                "{type: source, src: api/../../x}",
                "leaves the stack's directory tree",
            ),
            (
                "{type: source, src: /srv/api}",
                "(api).code.src: \"/srv/api\" is absolute",
            ),
            (
                "{type: source, src: api, dockerfile: ../Dockerfile}",
                "(api).code.dockerfile",
            ),
            (
                "{type: source, src: api, image: a/b:1}",
                "(api).code.image: `type: source`",
            ),
            ("{type: source, src: api, target: -x}", "(api).code.target"),
            (
                "{type: source, src: api, args: {1X: a}}",
                "(api).code.args.1X",
            ),
            (
                "{type: source, src: api, platforms: [amd64]}",
                "(api).code.platforms[0]",
            ),
            (
                "{type: source, src: api, platforms: [linux/amd64, linux/amd64]}",
                "listed twice",
            ),
            (
                "{image: a/b:1, src: api}",
                "(api).code.src: belongs to `type: source`",
            ),
            ("{type: image}", "(api).code.image: is required"),
        ] {
            let error = builds(code).unwrap_err();
            assert!(error.contains(expected), "{code}: {error}");
        }
    }

    #[test]
    fn the_rest_of_the_stack_is_checked_before_a_build() {
        let file = super::super::parse_stack_yaml(
            &STACK
                .replace("CODE", "{type: source, src: api}")
                .replace("64Mi", "64GB"),
        )
        .unwrap();
        let error = check_before_build(&file).unwrap_err().to_string();
        assert!(error.contains("(api).memory"), "{error}");
    }

    #[test]
    fn a_bundle_stack_never_holds_source_code() {
        let file =
            super::super::parse_stack_yaml(&STACK.replace("CODE", "{type: source, src: api}"))
                .unwrap();
        let error = Stack::from_file(&file).unwrap_err().to_string();
        assert!(
            error.contains("(api).code: type source is built"),
            "{error}"
        );
    }
}
