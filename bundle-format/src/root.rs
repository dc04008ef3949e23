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
    version: u64,
    expires: DateTime<Utc>,
    threshold: usize,
    keys: BTreeMap<String, PublicKey>,
    ids: BTreeMap<String, String>,
    raw: Vec<u8>,
}

/// A parsed but not yet trusted root document.
struct RootDocument {
    version: u64,
    expires: DateTime<Utc>,
    threshold: usize,
    /// By canonical key id ([`PublicKey::key_id`]).
    keys: BTreeMap<String, PublicKey>,
    /// Every id the document uses for a key (canonical, or as written) → its canonical id.
    ids: BTreeMap<String, String>,
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
        let value: Value = crate::json::from_slice(raw)
            .map_err(|e| RootError(format!("root is not valid JSON: {e}")))?;
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
        let mut ids = BTreeMap::new();
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
            // The canonical id; or, for roots written before ids were canonical, the hash of
            // the key's DER as written there.
            let canonical = key.key_id();
            if *key_id != canonical
                && PublicKey::written_key_id(pem.as_bytes()).as_ref() != Some(key_id)
            {
                return fail(format!(
                    "key {key_id}: the id is not the SHA-256 of the key"
                ));
            }
            if let Some((other, _)) = ids.iter().find(|(_, c)| **c == canonical) {
                return fail(format!(
                    "keys {other} and {key_id} are the same key (in another encoding): a key counts once"
                ));
            }
            ids.insert(key_id.clone(), canonical.clone());
            ids.insert(canonical.clone(), canonical.clone());
            keys.insert(canonical, key);
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
            ids,
            signed_bytes: canonical_json(signed),
            signatures,
            raw: raw.to_vec(),
        })
    }

    /// Distinct keys among `keys` (by canonical id) with a valid signature over the signed
    /// section. A signature is checked against the key its `keyid` names, whichever id the
    /// entry uses for it.
    fn signers(
        &self,
        keys: &BTreeMap<String, PublicKey>,
        ids: &BTreeMap<String, String>,
    ) -> BTreeSet<String> {
        self.signatures
            .iter()
            .filter_map(|(key_id, sig)| {
                let canonical = ids.get(key_id).unwrap_or(key_id);
                keys.get(canonical)
                    .filter(|k| k.verify(&self.signed_bytes, sig))
                    .map(|_| canonical.clone())
            })
            .collect()
    }

    fn into_root(self) -> TrustRoot {
        TrustRoot {
            version: self.version,
            expires: self.expires,
            threshold: self.threshold,
            keys: self.keys,
            ids: self.ids,
            raw: self.raw,
        }
    }
}

impl TrustRoot {
    /// Loads a pinned root: it must be signed by a threshold of its own keys.
    pub fn from_pinned(raw: &[u8]) -> Result<TrustRoot, RootError> {
        let document = RootDocument::parse(raw)?;
        let signers = document.signers(&document.keys, &document.ids);
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
        let by_old = document.signers(&self.keys, &self.ids);
        if by_old.len() < self.threshold {
            return fail(format!(
                "root v{} is signed by {} of v{}'s keys, threshold is {}",
                document.version,
                by_old.len(),
                self.version,
                self.threshold
            ));
        }
        let by_new = document.signers(&document.keys, &document.ids);
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

    /// Rotates through the roots a bundle carries (TUF 5.3): those not newer than this one are
    /// skipped, the rest applied in version order, one version at a time. Two documents with
    /// one version are refused (which of them was meant?). Returns the resulting root and the
    /// documents applied: the only ones anybody may persist as part of the chain.
    pub fn rotate_through(
        &self,
        carried: &[Vec<u8>],
    ) -> Result<(TrustRoot, Vec<Vec<u8>>), RootError> {
        let mut root = self.clone();
        let mut applied = Vec::new();
        for (version, raw) in ordered_by_version(carried)? {
            if version <= root.version {
                continue;
            }
            root = root.rotate(raw)?;
            applied.push(raw.clone());
        }
        Ok((root, applied))
    }

    /// Read-only once verified: nothing downstream can change what was checked.
    pub fn version(&self) -> u64 {
        self.version
    }

    pub fn expires(&self) -> DateTime<Utc> {
        self.expires
    }

    pub fn threshold(&self) -> usize {
        self.threshold
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
    let mut value: Value = crate::json::from_slice(raw).map_err(|e| RootError(e.to_string()))?;
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

/// Carried roots parsed and sorted by version; two with one version are refused.
fn ordered_by_version(carried: &[Vec<u8>]) -> Result<Vec<(u64, &Vec<u8>)>, RootError> {
    let mut chain: Vec<(u64, &Vec<u8>)> = carried
        .iter()
        .map(|raw| peek_version(raw).map(|v| (v, raw)))
        .collect::<Result<_, _>>()?;
    chain.sort_by_key(|(version, _)| *version);
    if let Some(pair) = chain.windows(2).find(|pair| pair[0].0 == pair[1].0) {
        return fail(format!(
            "two carried roots have version {}: a chain has one document per version",
            pair[0].0
        ));
    }
    Ok(chain)
}

/// What a writer checks before carrying roots in a bundle (`build --root-update`): versions
/// distinct and consecutive, each a valid rotation of the one before; the first a valid
/// rotation of `previous` when given, else at least signed by a threshold of its own keys. An
/// unsigned or half-signed draft is refused here, at build time, not by every agent later.
pub fn check_carried_chain(
    carried: &[Vec<u8>],
    previous: Option<&TrustRoot>,
) -> Result<(), RootError> {
    let mut before: Option<TrustRoot> = previous.cloned();
    for (version, raw) in ordered_by_version(carried)? {
        let root = match &before {
            Some(before) => before
                .rotate(raw)
                .map_err(|e| RootError(format!("root v{version}: {}", e.0)))?,
            None => TrustRoot::from_pinned(raw)
                .map_err(|e| RootError(format!("root v{version}: {}", e.0)))?,
        };
        before = Some(root);
    }
    Ok(())
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

    /// A root listing `key` twice: once as written by `new_root`, once compressed (another
    /// key id for the same key).
    fn root_listing_one_key_twice(key: &SigningKey) -> Vec<u8> {
        let mut value: Value = serde_json::from_slice(
            &new_root(
                1,
                expires(),
                2,
                &[
                    key.public_key().clone(),
                    SigningKey::generate().unwrap().public_key().clone(),
                ],
            )
            .unwrap(),
        )
        .unwrap();
        let keys = value["signed"]["keys"].as_object_mut().unwrap();
        let other = keys
            .keys()
            .find(|id| **id != key.public_key().key_id())
            .unwrap()
            .clone();
        keys.remove(&other);
        let pem = crate::crypto::tests::compressed_pem(key.public_key());
        let written = PublicKey::written_key_id(pem.as_bytes()).unwrap();
        keys.insert(
            written,
            json!({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": pem}}),
        );
        pretty(&value)
    }

    #[test]
    fn one_key_in_two_encodings_is_one_key() {
        let key = SigningKey::generate().unwrap();
        let twice = sign_root(&root_listing_one_key_twice(&key), &key);
        let err = twice.unwrap_err().0;
        assert!(err.contains("are the same key"), "{err}");
        // A key listed (once) under the id of its compressed form still counts, once.
        let mut value: Value = serde_json::from_slice(
            &new_root(1, expires(), 1, &[key.public_key().clone()]).unwrap(),
        )
        .unwrap();
        let keys = value["signed"]["keys"].as_object_mut().unwrap();
        keys.clear();
        let pem = crate::crypto::tests::compressed_pem(key.public_key());
        keys.insert(
            PublicKey::written_key_id(pem.as_bytes()).unwrap(),
            json!({"keytype": "ecdsa", "scheme": "ecdsa-sha2-nistp256", "keyval": {"public": pem}}),
        );
        let signed = sign_root(&pretty(&value), &key).unwrap();
        let root = TrustRoot::from_pinned(&signed).unwrap();
        assert_eq!(root.keys().count(), 1);
        assert_eq!(root.keys().next().unwrap(), key.public_key());
    }

    #[test]
    fn only_verified_links_of_a_carried_chain_are_applied() {
        let (old, new) = (
            SigningKey::generate().unwrap(),
            SigningKey::generate().unwrap(),
        );
        let v1 = TrustRoot::from_pinned(
            &sign_root(
                &new_root(1, expires(), 1, &[old.public_key().clone()]).unwrap(),
                &old,
            )
            .unwrap(),
        )
        .unwrap();
        let draft = new_root(2, expires(), 1, &[new.public_key().clone()]).unwrap();
        let v2 = sign_root(&sign_root(&draft, &old).unwrap(), &new).unwrap();
        // The verified v2 and the unsigned draft of v2: which one is meant? Refused.
        let err = v1
            .rotate_through(&[v2.clone(), draft.clone()])
            .unwrap_err()
            .0;
        assert!(err.contains("two carried roots have version 2"), "{err}");
        // Roots not newer than the trust are skipped and never returned for saving.
        let (root, applied) = v1.rotate_through(std::slice::from_ref(&v2)).unwrap();
        assert_eq!((root.version, applied), (2, vec![v2.clone()]));
        let (root, applied) = root.rotate_through(std::slice::from_ref(&v2)).unwrap();
        assert_eq!((root.version, applied.len()), (2, 0));

        // Writers refuse the draft at build time, with or without the previous root.
        assert!(
            check_carried_chain(std::slice::from_ref(&draft), None)
                .unwrap_err()
                .0
                .contains("root v2")
        );
        assert!(check_carried_chain(&[draft], Some(&v1)).is_err());
        check_carried_chain(std::slice::from_ref(&v2), None).unwrap();
        check_carried_chain(&[v2], Some(&v1)).unwrap();
    }

    #[test]
    fn duplicate_members_in_a_root_are_refused() {
        let key = SigningKey::generate().unwrap();
        let root = String::from_utf8(
            sign_root(
                &new_root(1, expires(), 1, &[key.public_key().clone()]).unwrap(),
                &key,
            )
            .unwrap(),
        )
        .unwrap();
        let doubled = root.replacen("\"threshold\": 1", "\"threshold\": 1, \"threshold\": 0", 1);
        assert_ne!(doubled, root);
        let err = TrustRoot::from_pinned(doubled.as_bytes()).unwrap_err().0;
        assert!(err.contains("duplicate member \"threshold\""), "{err}");
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
