//! The trust root: a TUF-style `root.json` that the customer pins at install.
//!
//! ```json
//! {"signed": {"_type": "outpost-root", "spec_version": "1", "version": 1,
//!             "expires": "2027-01-01T00:00:00Z", "threshold": 1,
//!             "keys": {"<keyid>": {"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256",
//!                                  "keyval": {"public": "<PEM>"}}}},
//!  "signatures": [{"keyid": "<keyid>", "sig": "<base64 DER>"}]}
//! ```
//! Signatures cover the canonical JSON of `signed` (sorted keys, no whitespace), computed from
//! the raw document so unknown fields stay covered. Rotation N→N+1 needs a threshold of N's keys
//! and a threshold of N+1's keys, and N+1's version must be exactly N+1 (TUF 5.3.4).

use crate::crypto::{PublicKey, SigningKey};
use crate::release::rfc3339;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet};

pub const ROOT_TYPE: &str = "outpost-root";
pub const MAX_ROOT_BYTES: u64 = 512 * 1024;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RootError(pub String);

fn fail<T>(message: impl Into<String>) -> Result<T, RootError> {
    Err(RootError(message.into()))
}

/// A trust root whose own signatures met its threshold (or that was verified by rotation).
#[derive(Debug, Clone)]
pub struct TrustRoot {
    pub version: u64,
    pub expires: DateTime<Utc>,
    pub threshold: usize,
    keys: BTreeMap<String, PublicKey>,
    raw: Vec<u8>,
}

/// A parsed but not yet trusted root document.
struct RootDocument {
    version: u64,
    expires: DateTime<Utc>,
    threshold: usize,
    keys: BTreeMap<String, PublicKey>,
    signed_bytes: Vec<u8>,
    signatures: Vec<(String, Vec<u8>)>,
    raw: Vec<u8>,
}

impl RootDocument {
    fn parse(raw: &[u8]) -> Result<Self, RootError> {
        if raw.len() as u64 > MAX_ROOT_BYTES {
            return fail(format!(
                "root is {} bytes, over the {MAX_ROOT_BYTES}-byte limit",
                raw.len()
            ));
        }
        let value: Value =
            serde_json::from_slice(raw).map_err(|e| RootError(format!("root is not JSON: {e}")))?;
        let signed = value
            .get("signed")
            .ok_or_else(|| RootError("root has no `signed` section".into()))?;
        if signed.get("_type").and_then(Value::as_str) != Some(ROOT_TYPE) {
            return fail(format!("root `_type` must be {ROOT_TYPE:?}"));
        }
        let version = signed
            .get("version")
            .and_then(Value::as_u64)
            .filter(|v| *v >= 1)
            .ok_or_else(|| RootError("root `version` must be a positive integer".into()))?;
        let expires = signed
            .get("expires")
            .and_then(Value::as_str)
            .ok_or_else(|| RootError("root has no `expires`".into()))
            .and_then(|t| rfc3339::parse(t).map_err(RootError))?;
        let threshold = signed
            .get("threshold")
            .and_then(Value::as_u64)
            .filter(|t| *t >= 1)
            .ok_or_else(|| RootError("root `threshold` must be at least 1".into()))?
            as usize;
        let mut keys = BTreeMap::new();
        let key_map = signed
            .get("keys")
            .and_then(Value::as_object)
            .ok_or_else(|| RootError("root has no `keys` object".into()))?;
        for (key_id, entry) in key_map {
            let pem = entry
                .pointer("/keyval/public")
                .and_then(Value::as_str)
                .ok_or_else(|| RootError(format!("key {key_id} has no keyval.public")))?;
            if entry.get("scheme").and_then(Value::as_str) != Some("ecdsa-sha2-nistp256") {
                return fail(format!(
                    "key {key_id}: only scheme ecdsa-sha2-nistp256 is supported"
                ));
            }
            let key = PublicKey::from_pem(pem.as_bytes())
                .map_err(|e| RootError(format!("key {key_id}: {e}")))?;
            if &key.key_id() != key_id {
                return fail(format!(
                    "key {key_id}: the id is not the SHA-256 of the key"
                ));
            }
            keys.insert(key_id.clone(), key);
        }
        if threshold > keys.len() {
            return fail(format!(
                "root threshold {threshold} is more than its {} keys",
                keys.len()
            ));
        }
        let mut signatures = Vec::new();
        for entry in value
            .get("signatures")
            .and_then(Value::as_array)
            .map(Vec::as_slice)
            .unwrap_or(&[])
        {
            let key_id = entry
                .get("keyid")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            let sig = entry
                .get("sig")
                .and_then(Value::as_str)
                .and_then(|s| base64::engine::general_purpose::STANDARD.decode(s).ok())
                .unwrap_or_default();
            signatures.push((key_id, sig));
        }
        Ok(RootDocument {
            version,
            expires,
            threshold,
            keys,
            signed_bytes: canonical_json(signed),
            signatures,
            raw: raw.to_vec(),
        })
    }

    /// Distinct key ids among `keys` with a valid signature over the signed section.
    fn signers(&self, keys: &BTreeMap<String, PublicKey>) -> BTreeSet<String> {
        self.signatures
            .iter()
            .filter(|(key_id, sig)| {
                keys.get(key_id)
                    .is_some_and(|k| k.verify(&self.signed_bytes, sig))
            })
            .map(|(key_id, _)| key_id.clone())
            .collect()
    }

    fn into_root(self) -> TrustRoot {
        TrustRoot {
            version: self.version,
            expires: self.expires,
            threshold: self.threshold,
            keys: self.keys,
            raw: self.raw,
        }
    }
}

impl TrustRoot {
    /// Loads a pinned root: it must be signed by a threshold of its own keys.
    pub fn from_pinned(raw: &[u8]) -> Result<TrustRoot, RootError> {
        let document = RootDocument::parse(raw)?;
        let signers = document.signers(&document.keys);
        if signers.len() < document.threshold {
            return fail(format!(
                "root v{} is signed by {} of its keys, threshold is {}",
                document.version,
                signers.len(),
                document.threshold
            ));
        }
        Ok(document.into_root())
    }

    /// Verifies `next` as the successor of this root (TUF root rotation).
    pub fn rotate(&self, next: &[u8]) -> Result<TrustRoot, RootError> {
        let document = RootDocument::parse(next)?;
        if document.version != self.version + 1 {
            return fail(format!(
                "root v{} cannot follow v{}: versions must increase by exactly one",
                document.version, self.version
            ));
        }
        let by_old = document.signers(&self.keys);
        if by_old.len() < self.threshold {
            return fail(format!(
                "root v{} is signed by {} of v{}'s keys, threshold is {}",
                document.version,
                by_old.len(),
                self.version,
                self.threshold
            ));
        }
        let by_new = document.signers(&document.keys);
        if by_new.len() < document.threshold {
            return fail(format!(
                "root v{} is signed by {} of its own keys, threshold is {}",
                document.version,
                by_new.len(),
                document.threshold
            ));
        }
        Ok(document.into_root())
    }

    pub fn keys(&self) -> impl Iterator<Item = &PublicKey> {
        self.keys.values()
    }

    pub fn raw(&self) -> &[u8] {
        &self.raw
    }

    pub fn is_expired(&self, now: DateTime<Utc>) -> bool {
        now >= self.expires
    }
}

/// A new, unsigned root document (`root init` / `root rotate`).
pub fn new_root(
    version: u64,
    expires: DateTime<Utc>,
    threshold: usize,
    keys: &[PublicKey],
) -> Result<Vec<u8>, RootError> {
    if threshold == 0 || threshold > keys.len() {
        return fail(format!(
            "threshold must be between 1 and the number of keys ({})",
            keys.len()
        ));
    }
    let mut key_map = serde_json::Map::new();
    for key in keys {
        key_map.insert(
            key.key_id(),
            json!({
                "keytype": "ecdsa",
                "scheme": "ecdsa-sha2-nistp256",
                "keyval": {"public": key.to_pem()},
            }),
        );
    }
    if key_map.len() != keys.len() {
        return fail("the same key is listed twice");
    }
    let document = json!({
        "signed": {
            "_type": ROOT_TYPE,
            "spec_version": "1",
            "version": version,
            "expires": rfc3339::format(&expires),
            "threshold": threshold,
            "keys": key_map,
        },
        "signatures": [],
    });
    Ok(pretty(&document))
}

/// The same document with `key`'s signature added (replacing an earlier one by the same key).
pub fn sign_root(raw: &[u8], key: &SigningKey) -> Result<Vec<u8>, RootError> {
    let document = RootDocument::parse(raw)?;
    let mut value: Value = serde_json::from_slice(raw).map_err(|e| RootError(e.to_string()))?;
    let signature = key
        .sign(&document.signed_bytes)
        .map_err(|e| RootError(e.to_string()))?;
    let key_id = key.public_key().key_id();
    let mut signatures: Vec<Value> = value
        .get("signatures")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    signatures.retain(|s| s.get("keyid").and_then(Value::as_str) != Some(key_id.as_str()));
    signatures.push(json!({"keyid": key_id, "sig": base64::engine::general_purpose::STANDARD.encode(signature)}));
    if let Some(object) = value.as_object_mut() {
        object.insert("signatures".into(), Value::Array(signatures));
    }
    Ok(pretty(&value))
}

/// Version of an unverified root document (to order a chain).
pub fn peek_version(raw: &[u8]) -> Result<u64, RootError> {
    RootDocument::parse(raw).map(|d| d.version)
}

fn pretty(value: &Value) -> Vec<u8> {
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

/// Canonical JSON (OLPC-style as TUF uses it): object keys sorted by code point, no whitespace.
pub fn canonical_json(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push(b'{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical_string(key, out);
                out.push(b':');
                write_canonical(item, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(item, out);
            }
            out.push(b']');
        }
        Value::String(text) => write_canonical_string(text, out),
        scalar => out.extend(serde_json::to_vec(scalar).unwrap_or_default()),
    }
}

/// OLPC canonical JSON escapes only `"` and `\`; every other byte is written as is (the PEM
/// newlines in `keyval.public` included), as securesystemslib does.
fn write_canonical_string(text: &str, out: &mut Vec<u8>) {
    out.push(b'"');
    for byte in text.bytes() {
        if byte == b'"' || byte == b'\\' {
            out.push(b'\\');
        }
        out.push(byte);
    }
    out.push(b'"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn expires() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2099, 1, 1, 0, 0, 0).unwrap()
    }

    #[test]
    fn pinned_root_needs_its_threshold() {
        let (a, b) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let root = new_root(
            1,
            expires(),
            2,
            &[a.public_key().clone(), b.public_key().clone()],
        )
        .unwrap();
        let one = sign_root(&root, &a).unwrap();
        assert!(
            TrustRoot::from_pinned(&one)
                .unwrap_err()
                .0
                .contains("1 of its keys, threshold is 2")
        );
        let both = sign_root(&one, &b).unwrap();
        assert_eq!(TrustRoot::from_pinned(&both).unwrap().version, 1);
        // Signing twice with one key does not count twice.
        let twice = sign_root(&one, &a).unwrap();
        assert!(TrustRoot::from_pinned(&twice).is_err());
    }

    #[test]
    fn rotation_needs_old_and_new_thresholds_and_next_version() {
        let (old, new) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let v1 = sign_root(
            &new_root(1, expires(), 1, &[old.public_key().clone()]).unwrap(),
            &old,
        )
        .unwrap();
        let v1 = TrustRoot::from_pinned(&v1).unwrap();
        let v2 = new_root(2, expires(), 1, &[new.public_key().clone()]).unwrap();
        let only_new = sign_root(&v2, &new).unwrap();
        assert!(v1.rotate(&only_new).unwrap_err().0.contains("of v1's keys"));
        let only_old = sign_root(&v2, &old).unwrap();
        assert!(v1.rotate(&only_old).unwrap_err().0.contains("its own keys"));
        let both = sign_root(&only_old, &new).unwrap();
        assert_eq!(v1.rotate(&both).unwrap().version, 2);
        let v3 = sign_root(
            &sign_root(
                &new_root(3, expires(), 1, &[new.public_key().clone()]).unwrap(),
                &old,
            )
            .unwrap(),
            &new,
        )
        .unwrap();
        assert!(v1.rotate(&v3).unwrap_err().0.contains("exactly one"));
    }

    #[test]
    fn tampering_the_signed_section_breaks_it() {
        let key = SigningKey::generate().unwrap();
        let root = sign_root(
            &new_root(1, expires(), 1, &[key.public_key().clone()]).unwrap(),
            &key,
        )
        .unwrap();
        let tampered = String::from_utf8(root).unwrap().replace("2099", "2098");
        assert!(TrustRoot::from_pinned(tampered.as_bytes()).is_err());
    }

    #[test]
    fn canonical_json_sorts_and_compacts() {
        let value: Value =
            serde_json::from_str(r#"{"b": [1, {"z": 1, "a": "\u00e9\n\"\\"}], "a": null}"#)
                .unwrap();
        // OLPC canonical form: only quote and backslash are escaped; the newline stays raw.
        let expected = "{\"a\":null,\"b\":[1,{\"a\":\"\u{e9}\n\\\"\\\\\",\"z\":1}]}";
        assert_eq!(String::from_utf8(canonical_json(&value)).unwrap(), expected);
    }
}
