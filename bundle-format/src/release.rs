//! Release metadata: the bundle's config blob, covered by the signature through the manifest.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Version of the bundle format this crate writes for a release without `irreversible`
/// (see SPEC.md).
pub const FORMAT_VERSION: u32 = 1;

/// The version a release declaring `irreversible` resources is written as: a reader that does
/// not know the field refuses the bundle as unsupported rather than roll back past it without
/// restoring the data.
pub const FORMAT_VERSION_IRREVERSIBLE: u32 = 2;

/// The format version a release with these `irreversible` resources is written as.
pub fn format_version_for(irreversible: &[String]) -> u32 {
    if irreversible.is_empty() {
        FORMAT_VERSION
    } else {
        FORMAT_VERSION_IRREVERSIBLE
    }
}

/// What the vendor says about this release. Serialized as the manifest's config blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ReleaseMetadata {
    pub format_version: u32,
    /// Stack name (DNS-1123 label), equal to the stack's own name.
    pub name: String,
    pub version: semver::Version,
    /// Strictly increasing per stack and channel: the rollback counter.
    pub sequence: u64,
    pub channel: String,
    #[serde(with = "rfc3339")]
    pub created: DateTime<Utc>,
    /// After this instant agents refuse the bundle (freeze protection).
    #[serde(with = "rfc3339")]
    pub expires: DateTime<Utc>,
    /// Stateful resources this release migrates in a way the previous release cannot read:
    /// rolling back past it restores their data to the snapshot taken before it. Absent when
    /// empty, so releases without it keep their bytes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub irreversible: Vec<String>,
}

impl ReleaseMetadata {
    /// What ties the metadata to its stack: the same name, and `irreversible` naming only
    /// stateful resources with persistent storage, each once.
    pub fn check_against(&self, stack: &crate::stack::Stack) -> Result<(), String> {
        let wanted = format_version_for(&self.irreversible);
        if self.format_version != wanted {
            return Err(format!(
                "formatVersion is {} but a release {} irreversible resources is version {wanted}",
                self.format_version,
                if self.irreversible.is_empty() {
                    "without"
                } else {
                    "with"
                }
            ));
        }
        if self.name != stack.name {
            return Err(format!(
                "release name {:?} differs from the stack's name {:?}",
                self.name, stack.name
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for name in &self.irreversible {
            if !seen.insert(name) {
                return Err(format!("irreversible names resource {name:?} twice"));
            }
            match stack.resource(name) {
                None => {
                    return Err(format!(
                        "irreversible names resource {name:?}, which the stack does not have"
                    ));
                }
                Some(r) if r.container.persistent_storage.is_none() => {
                    return Err(format!(
                        "irreversible names resource {name:?}, which has no persistentStorage: only stored data can be restored"
                    ));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// RFC 3339 in UTC with whole seconds: one spelling per instant, so bytes stay deterministic.
pub mod rfc3339 {
    use super::*;

    pub fn format(at: &DateTime<Utc>) -> String {
        at.to_rfc3339_opts(SecondsFormat::Secs, true)
    }

    pub fn parse(text: &str) -> Result<DateTime<Utc>, String> {
        DateTime::parse_from_rfc3339(text)
            .map(|t| t.with_timezone(&Utc))
            .map_err(|e| format!("{text:?} is not an RFC 3339 time: {e}"))
    }

    pub fn serialize<S: serde::Serializer>(at: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(at))
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DateTime<Utc>, D::Error> {
        let text = String::deserialize(d)?;
        parse(&text).map_err(serde::de::Error::custom)
    }
}

/// A channel name: 1-63 of [a-z0-9-].
pub fn is_valid_channel(channel: &str) -> bool {
    crate::stack::is_dns_label(channel)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use chrono::TimeZone;

    const STACK: &str = "name: acme\npermissionProfiles: {execution: {}}\nresources:\n  - lifecycle: live\n    container: {name: db, code: {image: r.example/db:1}, cpu: 1, memory: 1Gi, ports: [5432], replicas: 1, persistentStorage: 1Gi, permissions: execution}\n  - lifecycle: live\n    container: {name: web, code: {image: r.example/web:1}, cpu: 1, memory: 1Gi, ports: [80], replicas: 1, permissions: execution}\n";

    fn metadata(irreversible: &[&str]) -> ReleaseMetadata {
        let irreversible: Vec<String> = irreversible.iter().map(|r| r.to_string()).collect();
        ReleaseMetadata {
            format_version: format_version_for(&irreversible),
            name: "acme".into(),
            version: semver::Version::new(2, 0, 0),
            sequence: 2,
            channel: "stable".into(),
            created: Utc.with_ymd_and_hms(2025, 1, 1, 0, 0, 0).unwrap(),
            expires: Utc.with_ymd_and_hms(2025, 4, 1, 0, 0, 0).unwrap(),
            irreversible,
        }
    }

    #[test]
    fn irreversible_names_stateful_resources_once_and_raises_the_format_version() {
        let (stack, _) = crate::stack::Stack::from_yaml(STACK).unwrap();
        let stack = crate::stack::Stack::from_file(&stack).unwrap();
        metadata(&[]).check_against(&stack).unwrap();
        let db = metadata(&["db"]);
        db.check_against(&stack).unwrap();
        assert_eq!(db.format_version, FORMAT_VERSION_IRREVERSIBLE);
        let json = String::from_utf8(crate::layout::oci::to_bytes(&db)).unwrap();
        assert!(json.ends_with(r#""irreversible":["db"]}"#), "{json}");
        // Without it, a release keeps version 1 and its bytes.
        let plain = String::from_utf8(crate::layout::oci::to_bytes(&metadata(&[]))).unwrap();
        assert!(plain.starts_with(r#"{"formatVersion":1,"#) && !plain.contains("irreversible"));
        for (names, error) in [
            (&["web"][..], "has no persistentStorage"),
            (&["cache"][..], "the stack does not have"),
            (&["db", "db"][..], "twice"),
        ] {
            let e = metadata(names).check_against(&stack).unwrap_err();
            assert!(e.contains(error), "{names:?}: {e}");
        }
        let mut mislabelled = metadata(&["db"]);
        mislabelled.format_version = FORMAT_VERSION;
        let e = mislabelled.check_against(&stack).unwrap_err();
        assert!(e.contains("formatVersion is 1"), "{e}");
    }
}
