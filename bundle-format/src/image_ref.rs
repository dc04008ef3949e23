//! Container image references (`registry/path[:tag][@sha256:...]`), checked on the way in.

use crate::digest::Digest;
use std::fmt;

/// A parsed image reference. `registry` is always explicit in the output form so two spellings
/// of the same image compare equal.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ImageRefError {
    reference: String,
    reason: String,
}

const DEFAULT_REGISTRY: &str = "docker.io";

impl ImageRef {
    pub fn parse(text: &str) -> Result<Self, ImageRefError> {
        let fail = |reason: &str| ImageRefError {
            reference: text.to_string(),
            reason: reason.to_string(),
        };
        if text.len() > 512 {
            return Err(fail("longer than 512 characters"));
        }
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => (
                rest,
                Some(Digest::parse(digest).map_err(|e| fail(&e.to_string()))?),
            ),
            None => (text, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, Some(tag.to_string())),
            _ => (rest, None),
        };
        if let Some(tag) = &tag {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && !tag.starts_with(['.', '-'])
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(fail("the tag must be 1-128 of [A-Za-z0-9_.-]"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path)) if first.contains(['.', ':']) || first == "localhost" => {
                (first.to_string(), path.to_string())
            }
            _ => (DEFAULT_REGISTRY.to_string(), name.to_string()),
        };
        if !valid_registry(&registry) {
            return Err(fail(
                "the registry must be a host name with an optional port",
            ));
        }
        if repository.is_empty() || !repository.split('/').all(valid_path_component) {
            return Err(fail(
                "each path component must be lowercase letters and digits separated by '.', '_', '__' or '-'",
            ));
        }
        if tag.is_none() && digest.is_none() {
            return Err(fail("needs a tag or a digest"));
        }
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<Digest> {
        self.digest
    }

    /// The same reference pinned to `digest` (the tag is kept for readers).
    pub fn pinned(&self, digest: Digest) -> ImageRef {
        ImageRef {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

fn valid_registry(registry: &str) -> bool {
    let (host, port) = match registry.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (registry, None),
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !label.starts_with('-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    host_ok && port_ok
}

fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !bytes.first().is_some_and(alnum) || !bytes.last().is_some_and(alnum) {
        return false;
    }
    // Separators: '.', '_', '__' or any run of '-', never two separators of other kinds in a row.
    let mut previous_separator: Option<u8> = None;
    let mut run = 0;
    for &b in bytes {
        if alnum(&b) {
            previous_separator = None;
            run = 0;
        } else if b"._-".contains(&b) {
            let ok = match previous_separator {
                None => true,
                Some(b'-') => b == b'-',
                Some(b'_') => b == b'_' && run == 1,
                Some(_) => false,
            };
            if !ok {
                return false;
            }
            previous_separator = Some(b);
            run += 1;
        } else {
            return false;
        }
    }
    true
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_common_forms() {
        let r = ImageRef::parse(&format!("ghcr.io/acme/api@{D}")).unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("ghcr.io", "acme/api", None)
        );
        let r = ImageRef::parse("127.0.0.1:5000/demo/web:1.0").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "demo/web", Some("1.0"))
        );
        let r = ImageRef::parse("busybox:latest").unwrap();
        assert_eq!(r.to_string(), "docker.io/busybox:latest");
        let r = ImageRef::parse(&format!("localhost/a/b:v1@{D}")).unwrap();
        assert_eq!(r.to_string(), format!("localhost/a/b:v1@{D}"));
    }

    #[test]
    fn rejects_bad_forms() {
        for bad in [
            "",
            "Upper/case:1",
            "a//b:1",
            "a/b",
            "a/b:",
            "a/b:-x",
            "a/b@sha256:xyz",
            "a/../b:1",
            "host:99999/a:1",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad}");
        }
    }
}
