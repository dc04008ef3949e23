//! Registry references as the CLI takes them: `[oci://]HOST[:PORT]/REPO[:TAG|@DIGEST]`.

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reference {
    pub host: String,
    pub repository: String,
    /// A tag or `sha256:<hex>`.
    pub reference: Option<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("invalid registry reference {0:?}: expected [oci://]HOST[:PORT]/REPOSITORY[:TAG]")]
pub struct ReferenceError(String);

impl Reference {
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let fail = || ReferenceError(text.to_string());
        let rest = text.strip_prefix("oci://").unwrap_or(text);
        let (host, path) = rest.split_once('/').ok_or_else(fail)?;
        if host.is_empty()
            || !host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
        {
            return Err(fail());
        }
        let (repository, reference) = if let Some((repo, digest)) = path.split_once('@') {
            outpost_bundle_format::Digest::parse(digest).map_err(|_| fail())?;
            (repo, Some(digest.to_string()))
        } else if let Some((repo, tag)) =
            path.rsplit_once(':').filter(|(_, tag)| !tag.contains('/'))
        {
            let valid = !tag.is_empty()
                && tag.len() <= 128
                && tag
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
            if !valid {
                return Err(fail());
            }
            (repo, Some(tag.to_string()))
        } else {
            (path, None)
        };
        let repo_ok = !repository.is_empty()
            && repository.split('/').all(|c| {
                !c.is_empty()
                    && c.bytes().all(|b| {
                        b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)
                    })
            });
        if !repo_ok {
            return Err(fail());
        }
        Ok(Reference {
            host: host.into(),
            repository: repository.into(),
            reference,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses() {
        let r = Reference::parse("oci://127.0.0.1:5000/acme/bundle:1.0.0").unwrap();
        assert_eq!(
            (
                r.host.as_str(),
                r.repository.as_str(),
                r.reference.as_deref()
            ),
            ("127.0.0.1:5000", "acme/bundle", Some("1.0.0"))
        );
        let r = Reference::parse("localhost:5000/acme").unwrap();
        assert_eq!(r.reference, None);
        assert!(Reference::parse("oci://host").is_err());
        assert!(Reference::parse("host/UPPER:1").is_err());
    }
}
