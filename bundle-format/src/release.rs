//! Release metadata: the bundle's config blob, covered by the signature through the manifest.

use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Deserialize, Serialize};

/// Version of the bundle format this crate writes and reads (see SPEC.md).
pub const FORMAT_VERSION: u32 = 1;

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
