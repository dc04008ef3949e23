//! cosign-compatible signatures: the simple-signing payload over a manifest digest, stored as
//! cosign stores them (a manifest tagged `sha256-<hex>.sig`, one layer per signature, the
//! base64 signature in the layer annotation `dev.cosignproject.cosign/signature`).

use crate::crypto::PublicKey;
use crate::digest::Digest;
use crate::layout::oci::{self, Descriptor, ImageManifest};
use base64::Engine as _;
use serde_json::json;
use std::collections::BTreeMap;

pub const MEDIA_TYPE_SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const ANNOTATION_SIGNATURE: &str = "dev.cosignproject.cosign/signature";
pub const SIGNATURE_TYPE: &str = "cosign container image signature";
/// Largest signature payload accepted.
pub const MAX_PAYLOAD_BYTES: u64 = 64 * 1024;

/// The simple-signing payload cosign signs: `critical.image.docker-manifest-digest` binds the
/// signature to one manifest.
pub fn payload(docker_reference: &str, digest: &Digest) -> Vec<u8> {
    let value = json!({
        "critical": {
            "identity": {"docker-reference": docker_reference},
            "image": {"docker-manifest-digest": digest.to_string()},
            "type": SIGNATURE_TYPE,
        },
        "optional": null,
    });
    serde_json::to_vec(&value).unwrap_or_default()
}

/// The digest a payload claims to sign, after checking its type.
pub fn payload_digest(payload: &[u8]) -> Result<Digest, String> {
    let value: serde_json::Value =
        crate::json::from_slice(payload).map_err(|e| format!("payload is not valid JSON: {e}"))?;
    let critical = value
        .get("critical")
        .ok_or("payload has no `critical` section")?;
    if critical.get("type").and_then(|t| t.as_str()) != Some(SIGNATURE_TYPE) {
        return Err(format!("payload type is not {SIGNATURE_TYPE:?}"));
    }
    let digest = critical
        .pointer("/image/docker-manifest-digest")
        .and_then(|d| d.as_str())
        .ok_or("payload has no critical.image.docker-manifest-digest")?;
    Digest::parse(digest).map_err(|e| e.to_string())
}

/// One signature layer: the payload's descriptor with the base64 signature annotation.
pub fn signature_layer(payload: &[u8], signature_der: &[u8]) -> Descriptor {
    let mut layer = Descriptor::of(MEDIA_TYPE_SIMPLE_SIGNING, payload);
    layer.annotations = BTreeMap::from([(
        ANNOTATION_SIGNATURE.to_string(),
        base64::engine::general_purpose::STANDARD.encode(signature_der),
    )]);
    layer
}

/// A cosign signature manifest over `layers`, with the config blob cosign writes.
/// Returns (manifest bytes, config bytes).
pub fn signature_manifest(layers: Vec<Descriptor>) -> (Vec<u8>, Vec<u8>) {
    let diff_ids: Vec<String> = layers.iter().map(|l| l.digest.to_string()).collect();
    let config = json!({
        "architecture": "",
        "config": {},
        "created": "0001-01-01T00:00:00Z",
        "history": [{"created": "0001-01-01T00:00:00Z"}],
        "os": "",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let config = serde_json::to_vec(&config).unwrap_or_default();
    let manifest = ImageManifest {
        schema_version: 2,
        media_type: Some(oci::MEDIA_TYPE_MANIFEST.into()),
        artifact_type: None,
        config: Descriptor::of(oci::MEDIA_TYPE_IMAGE_CONFIG, &config),
        layers,
        subject: None,
        annotations: BTreeMap::new(),
    };
    (oci::to_bytes(&manifest), config)
}

/// The signature bytes of a layer (DER), if the annotation is present and base64.
pub fn layer_signature(layer: &Descriptor) -> Option<Vec<u8>> {
    let text = layer.annotations.get(ANNOTATION_SIGNATURE)?;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .ok()
}

/// Which of `keys` signed `payload` with `signature`.
pub fn signing_key<'k>(
    keys: &'k [PublicKey],
    payload: &[u8],
    signature: &[u8],
) -> Option<&'k PublicKey> {
    keys.iter().find(|k| k.verify(payload, signature))
}
