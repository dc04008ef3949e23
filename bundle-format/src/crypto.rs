//! The only module that touches cryptography: SHA-256 and ECDSA P-256 keys in cosign's formats.
//!
//! Everything else in the workspace hashes and verifies through these types, so an audit of
//! the crypto surface starts and ends here. Key files are read and written by the `sigstore`
//! crate (cosign's encrypted PEM: scrypt + nacl secretbox); hashing uses aws-lc's SHA-256,
//! which runs at the speed of the CPU's SHA extensions.

use aws_lc_rs::digest;
use base64::Engine as _;
use sigstore::crypto::signing_key::ecdsa::{ECDSAKeys, EllipticCurve};
use sigstore::crypto::{CosignVerificationKey, SigStoreSigner, Signature};

/// Why a key could not be read, made or used.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

impl KeyError {
    fn new(context: &str, error: impl std::fmt::Display) -> Self {
        KeyError(format!("{context}: {error}"))
    }
}

/// Incremental SHA-256.
pub struct Sha256(digest::Context);

impl Default for Sha256 {
    fn default() -> Self {
        Sha256(digest::Context::new(&digest::SHA256))
    }
}

impl Sha256 {
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    pub fn finish(self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.0.finish().as_ref());
        out
    }
}

/// Hashing as a sink: `io::copy(&mut file, &mut hasher)`.
impl std::io::Write for Sha256 {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.update(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// SHA-256 of a byte string.
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut hasher = Sha256::default();
    hasher.update(bytes);
    hasher.finish()
}

/// 32 bytes from the operating system's secure random source, as lowercase hex: the agent's
/// shared secrets and tokens (node bootstrap, node credentials).
pub fn random_secret() -> Result<String, KeyError> {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|e| KeyError::new("random bytes", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether two secrets are equal, in time that does not depend on where they differ.
pub fn secrets_equal(a: &[u8], b: &[u8]) -> bool {
    aws_lc_rs::constant_time::verify_slices_are_equal(a, b).is_ok()
}

/// An ECDSA P-256 public key (PEM "PUBLIC KEY", SubjectPublicKeyInfo), as cosign writes it.
#[derive(Clone)]
pub struct PublicKey {
    spki_der: Vec<u8>,
    key: CosignVerificationKey,
}

impl std::fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PublicKey({})", self.key_id())
    }
}

impl PartialEq for PublicKey {
    fn eq(&self, other: &Self) -> bool {
        self.spki_der == other.spki_der
    }
}

impl PublicKey {
    /// Reads a PEM public key; only ECDSA P-256 is accepted (the format's only scheme).
    ///
    /// The key is kept in one canonical encoding (SubjectPublicKeyInfo with the uncompressed
    /// point, as cosign writes it), so the same key given compressed or uncompressed is one
    /// key: one key id, counted once.
    pub fn from_pem(pem: &[u8]) -> Result<Self, KeyError> {
        let key = CosignVerificationKey::try_from_pem(pem)
            .map_err(|e| KeyError::new("not a PEM public key", e))?;
        let CosignVerificationKey::ECDSA_P256_SHA256_ASN1(der) = &key else {
            return Err(KeyError(
                "unsupported key type: only ECDSA P-256 keys are accepted".into(),
            ));
        };
        let spki_der = canonical_p256_spki(der)?;
        let key = if spki_der == *der {
            key
        } else {
            CosignVerificationKey::try_from_der(&spki_der)
                .map_err(|e| KeyError::new("not a P-256 public key", e))?
        };
        Ok(PublicKey { spki_der, key })
    }

    /// The key id as `root.json` files made before ids were canonical may spell it: the hash
    /// of the DER exactly as written in `pem` (equal to [`key_id`](Self::key_id) for keys
    /// written uncompressed, as every tool here writes them).
    pub fn written_key_id(pem: &[u8]) -> Option<String> {
        match CosignVerificationKey::try_from_pem(pem).ok()? {
            CosignVerificationKey::ECDSA_P256_SHA256_ASN1(der) => Some(hex::encode(sha256(&der))),
            _ => None,
        }
    }

    pub fn to_pem(&self) -> String {
        let body = base64::engine::general_purpose::STANDARD.encode(&self.spki_der);
        let mut pem = String::from("-----BEGIN PUBLIC KEY-----\n");
        for line in body.as_bytes().chunks(64) {
            pem.push_str(&String::from_utf8_lossy(line));
            pem.push('\n');
        }
        pem.push_str("-----END PUBLIC KEY-----\n");
        pem
    }

    /// The key's identity: hex SHA-256 of its DER SubjectPublicKeyInfo.
    pub fn key_id(&self) -> String {
        hex::encode(sha256(&self.spki_der))
    }

    /// True when `signature` (ASN.1 DER ECDSA) is valid for `message` under this key.
    pub fn verify(&self, message: &[u8], signature_der: &[u8]) -> bool {
        self.key
            .verify_signature(Signature::Raw(signature_der), message)
            .is_ok()
    }
}

/// The SubjectPublicKeyInfo of a P-256 key with its point uncompressed (the encoding cosign,
/// openssl and this crate write), whatever point encoding `spki_der` used.
fn canonical_p256_spki(spki_der: &[u8]) -> Result<Vec<u8>, KeyError> {
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_ASN1, ParsedPublicKey};
    let invalid = |e: &dyn std::fmt::Display| KeyError::new("not a valid P-256 public key", e);
    let parsed =
        ParsedPublicKey::new(&ECDSA_P256_SHA256_ASN1, spki_der).map_err(|e| invalid(&e))?;
    let der = parsed.as_der().map_err(|e| invalid(&e))?;
    Ok(der.as_ref().to_vec())
}

/// An ECDSA P-256 private key.
pub struct SigningKey {
    keys: ECDSAKeys,
    signer: SigStoreSigner,
    public: PublicKey,
}

impl SigningKey {
    pub fn generate() -> Result<Self, KeyError> {
        let keys = ECDSAKeys::new(EllipticCurve::P256)
            .map_err(|e| KeyError::new("cannot generate a key", e))?;
        Self::from_keys(keys)
    }

    /// Reads cosign's encrypted key file ("ENCRYPTED SIGSTORE PRIVATE KEY" or the older
    /// "ENCRYPTED COSIGN PRIVATE KEY").
    pub fn from_encrypted_pem(pem: &[u8], password: &[u8]) -> Result<Self, KeyError> {
        let keys = ECDSAKeys::from_encrypted_pem(pem, password)
            .map_err(|e| KeyError::new("cannot decrypt the private key (wrong password?)", e))?;
        if !matches!(keys, ECDSAKeys::P256(_)) {
            return Err(KeyError(
                "unsupported key type: only ECDSA P-256 keys are accepted".into(),
            ));
        }
        Self::from_keys(keys)
    }

    fn from_keys(keys: ECDSAKeys) -> Result<Self, KeyError> {
        let signer = keys
            .to_sigstore_signer()
            .map_err(|e| KeyError::new("unusable key", e))?;
        let pem = keys
            .as_inner()
            .public_key_to_pem()
            .map_err(|e| KeyError::new("unusable key", e))?;
        let public = PublicKey::from_pem(pem.as_bytes())?;
        Ok(SigningKey {
            keys,
            signer,
            public,
        })
    }

    /// cosign's encrypted key file ("ENCRYPTED SIGSTORE PRIVATE KEY").
    pub fn to_encrypted_pem(&self, password: &[u8]) -> Result<String, KeyError> {
        let pem = self
            .keys
            .as_inner()
            .private_key_to_encrypted_pem(password)
            .map_err(|e| KeyError::new("cannot encrypt the private key", e))?;
        Ok(pem.to_string())
    }

    pub fn public_key(&self) -> &PublicKey {
        &self.public
    }

    /// An ASN.1 DER ECDSA P-256/SHA-256 signature over `message`.
    pub fn sign(&self, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        self.signer
            .sign(message)
            .map_err(|e| KeyError::new("signing failed", e))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn sign_verify_round_trip_and_key_file() {
        let key = SigningKey::generate().unwrap();
        let signature = key.sign(b"hello").unwrap();
        assert!(key.public_key().verify(b"hello", &signature));
        assert!(!key.public_key().verify(b"hellO", &signature));

        let pem = key.to_encrypted_pem(b"pw").unwrap();
        assert!(pem.contains("ENCRYPTED SIGSTORE PRIVATE KEY"));
        let again = SigningKey::from_encrypted_pem(pem.as_bytes(), b"pw").unwrap();
        assert_eq!(again.public_key(), key.public_key());
        assert!(SigningKey::from_encrypted_pem(pem.as_bytes(), b"wrong").is_err());

        let public = PublicKey::from_pem(key.public_key().to_pem().as_bytes()).unwrap();
        assert_eq!(&public, key.public_key());
    }

    /// The key's SubjectPublicKeyInfo with the point compressed (02/03 + x), as PEM.
    pub(crate) fn compressed_pem(key: &PublicKey) -> String {
        let der = &key.spki_der;
        let (x, y) = (&der[27..59], &der[59..91]);
        let mut compressed = vec![
            0x30, 0x39, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06,
            0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x22, 0x00,
        ];
        compressed.push(0x02 | (y[31] & 1));
        compressed.extend_from_slice(x);
        let body = base64::engine::general_purpose::STANDARD.encode(&compressed);
        format!("-----BEGIN PUBLIC KEY-----\n{body}\n-----END PUBLIC KEY-----\n")
    }

    #[test]
    fn one_key_in_any_point_encoding_is_one_key() {
        let key = SigningKey::generate().unwrap();
        let pem = compressed_pem(key.public_key());
        let compressed = PublicKey::from_pem(pem.as_bytes()).unwrap();
        assert_eq!(&compressed, key.public_key());
        assert_eq!(compressed.key_id(), key.public_key().key_id());
        assert_eq!(compressed.to_pem(), key.public_key().to_pem());
        assert_ne!(
            PublicKey::written_key_id(pem.as_bytes()).unwrap(),
            key.public_key().key_id()
        );
        let signature = key.sign(b"hello").unwrap();
        assert!(compressed.verify(b"hello", &signature));
    }

    #[test]
    fn sha256_known_vector() {
        assert_eq!(
            hex::encode(sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
