//! [`SecretValue`]: the one type that holds a secret's bytes.
//!
//! No `Debug`, `Display`, `Serialize` or `Clone`-by-accident: copies are explicit
//! ([`SecretValue::duplicate`]) and the bytes are zeroed when the value is dropped.

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

/// Largest value dso accepts from any provider or from `dso secret set`.
///
/// 1 MiB: above the 512 KiB the local vault promises and the 500 KiB a Swarm secret may
/// hold, small enough that 10,000 of them stay far below the agent's memory.
pub const MAX_VALUE_LEN: usize = 1024 * 1024;

/// A secret's bytes, zeroed on drop.
pub struct SecretValue(Zeroizing<Vec<u8>>);

impl SecretValue {
    /// Takes ownership of `bytes`; they are zeroed when the value is dropped.
    pub fn new(bytes: Vec<u8>) -> SecretValue {
        SecretValue(Zeroizing::new(bytes))
    }

    /// Copies `bytes` into a new value (the caller zeroes its own copy).
    pub fn from_slice(bytes: &[u8]) -> SecretValue {
        SecretValue::new(bytes.to_vec())
    }

    /// The bytes. Call this only where the value is delivered (a file write, a provider
    /// request body), so that every place a value leaves is found by grepping `expose(`.
    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// Length in bytes (printable: a length is not the value).
    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// Whether the value is empty (an empty value is never delivered).
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// An explicit copy, for the few places that must hold the value twice.
    pub fn duplicate(&self) -> SecretValue {
        SecretValue::from_slice(&self.0)
    }

    /// SHA-256 of the value, hex: the change token for providers without version metadata.
    /// It is a digest, not the value, but it still confirms a guess: it is persisted only
    /// where the docs say so and never logged.
    pub fn sha256_hex(&self) -> String {
        let digest = Sha256::digest(self.expose());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl PartialEq for SecretValue {
    /// Constant-time comparison: equality of values must not leak through timing.
    fn eq(&self, other: &SecretValue) -> bool {
        let (a, b) = (self.expose(), other.expose());
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl Eq for SecretValue {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equality_and_digest() {
        let a = SecretValue::from_slice(b"s3cr3t");
        assert!(a == a.duplicate());
        assert!(a != SecretValue::from_slice(b"s3cr3u"));
        assert_eq!(a.len(), 6);
        assert_eq!(
            SecretValue::from_slice(b"abc").sha256_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
