//! The vault's cryptography: the master key (from a key file or a passphrase through
//! Argon2id), the two keys derived from it, entry sealing with AES-256-GCM, and the
//! HMAC-SHA256 key check and file MAC.
//!
//! Every key lives in a zeroize-on-drop type: [`MasterKey`] and the MAC key in
//! `Zeroizing`, the AES key schedule in `Aes256Gcm` (the `aes` crate's `zeroize` feature
//! is on).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::TryRngCore;
use rand::rngs::OsRng;
use sha2::Sha256;
use zeroize::Zeroizing;

use super::error::VaultError;
use super::format::{Argon2Params, NONCE_LEN, TAG_LEN};
use crate::value::SecretValue;

type HmacSha256 = Hmac<Sha256>;

/// Argon2id parameters of new passphrase vaults: 64 MiB, 3 passes, 1 lane (above the
/// OWASP minimum of 19 MiB / 2 passes; about half a second on one core of this project's
/// test machine).
pub const DEFAULT_ARGON2: (u32, u32, u32) = (64 * 1024, 3, 1);

/// Shortest passphrase `dso init --passphrase` accepts.
pub const MIN_PASSPHRASE_LEN: usize = 8;

/// The 256-bit master key.
pub struct MasterKey(Zeroizing<[u8; 32]>);

impl MasterKey {
    /// A fresh random key.
    pub fn generate() -> Result<MasterKey, VaultError> {
        let mut key = Zeroizing::new([0u8; 32]);
        fill_random(key.as_mut())?;
        Ok(MasterKey(key))
    }

    /// The key derived from `passphrase` with `params`.
    pub fn from_passphrase(passphrase: &[u8], params: &Argon2Params) -> Result<MasterKey, VaultError> {
        let bad = |e: argon2::Error| VaultError::Passphrase {
            reason: format!("Argon2id failed: {e}"),
        };
        let argon_params =
            argon2::Params::new(params.m_cost, params.t_cost, params.p_cost, Some(32)).map_err(bad)?;
        let argon = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, argon_params);
        let mut key = Zeroizing::new([0u8; 32]);
        argon
            .hash_password_into(passphrase, &params.salt, key.as_mut())
            .map_err(bad)?;
        Ok(MasterKey(key))
    }

    /// Reads a key file written by [`MasterKey::write_new_file`]: one line of base64 of 32
    /// bytes. Refuses a file that others than its owner may read.
    pub fn read_file(path: &Path) -> Result<MasterKey, VaultError> {
        let key_err = |reason: String| VaultError::KeyFile {
            path: path.to_owned(),
            reason,
        };
        let meta = std::fs::metadata(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => key_err(
                "no such file: create a vault and its key with `dso init`, or point to the key with \
                 --key-file or DSO_MASTER_KEY_FILE"
                    .into(),
            ),
            _ => key_err(format!("cannot read it: {e}")),
        })?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(key_err(format!(
                "mode {mode:04o} lets other users read it; run `chmod 600 {}`",
                path.display()
            )));
        }
        let text = Zeroizing::new(std::fs::read(path).map_err(|e| key_err(format!("cannot read it: {e}")))?);
        let trimmed = text.trim_ascii();
        let mut raw = Zeroizing::new(Vec::with_capacity(48));
        base64::engine::general_purpose::STANDARD
            .decode_vec(trimmed, &mut raw)
            .map_err(|_| key_err("not a dso key file (expected one line of base64)".into()))?;
        if raw.len() != 32 {
            return Err(key_err(format!(
                "not a dso key file (decodes to {} bytes, expected 32)",
                raw.len()
            )));
        }
        let mut key = Zeroizing::new([0u8; 32]);
        key.copy_from_slice(&raw);
        Ok(MasterKey(key))
    }

    /// Writes this key to a new file `path`, created with mode 0600; refuses an existing
    /// file.
    pub fn write_new_file(&self, path: &Path) -> Result<(), VaultError> {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::AlreadyExists => VaultError::Exists {
                    path: path.to_owned(),
                },
                _ => VaultError::io(path, "creating the key file", e),
            })?;
        let mut line = Zeroizing::new(base64::engine::general_purpose::STANDARD.encode(self.0.as_ref()));
        line.push('\n');
        file.write_all(line.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| VaultError::io(path, "writing the key file", e))
    }
}

/// The keys a vault handle works with, derived from the master key with HMAC-SHA256 and a
/// distinct label each.
pub struct Keys {
    cipher: Aes256Gcm,
    mac_key: Zeroizing<[u8; 32]>,
}

impl Keys {
    /// Derives the encryption and MAC keys.
    pub fn derive(master: &MasterKey) -> Keys {
        let enc = Zeroizing::new(hmac(master.0.as_ref(), &[b"dso-vault-v1/encryption"]));
        let mac_key = Zeroizing::new(hmac(master.0.as_ref(), &[b"dso-vault-v1/mac"]));
        let cipher = Aes256Gcm::new_from_slice(enc.as_ref()).expect("32-byte key");
        Keys { cipher, mac_key }
    }

    /// The key check over the header bytes: proves the key opens this vault without
    /// touching any entry.
    pub fn key_check(&self, header: &[u8]) -> [u8; TAG_LEN] {
        hmac(self.mac_key.as_ref(), &[b"dso-vault-v1/key-check", header])
    }

    /// Whether `check` is the key check of `header` under these keys (constant time).
    pub fn verify_key_check(&self, header: &[u8], check: &[u8; TAG_LEN]) -> bool {
        verify(self.mac_key.as_ref(), &[b"dso-vault-v1/key-check", header], check)
    }

    /// The MAC of the whole file before it.
    pub fn file_mac(&self, covered: &[u8]) -> [u8; TAG_LEN] {
        hmac(self.mac_key.as_ref(), &[b"dso-vault-v1/file", covered])
    }

    /// Whether `mac` is the MAC of `covered` (constant time).
    pub fn verify_file_mac(&self, covered: &[u8], mac: &[u8; TAG_LEN]) -> bool {
        verify(self.mac_key.as_ref(), &[b"dso-vault-v1/file", covered], mac)
    }

    /// Encrypts `value` under a fresh random nonce, bound to `aad`.
    pub fn seal(&self, aad: &[u8], value: &SecretValue) -> Result<([u8; NONCE_LEN], Vec<u8>), VaultError> {
        let mut nonce = [0u8; NONCE_LEN];
        fill_random(&mut nonce)?;
        let ciphertext = self
            .cipher
            .encrypt(
                Nonce::from_slice(&nonce),
                Payload {
                    msg: value.expose(),
                    aad,
                },
            )
            .map_err(|_| VaultError::Crypto {
                reason: "AES-GCM encryption failed".into(),
            })?;
        Ok((nonce, ciphertext))
    }

    /// Decrypts a sealed value; `None` when the ciphertext, nonce or associated data do not
    /// match (a tampered entry, or one copied under another name).
    pub fn open(&self, aad: &[u8], nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> Option<SecretValue> {
        self.cipher
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ciphertext, aad })
            .ok()
            .map(SecretValue::new)
    }
}

/// Fresh Argon2id parameters with a random salt.
pub fn new_argon2_params(m_cost: u32, t_cost: u32, p_cost: u32) -> Result<Argon2Params, VaultError> {
    let mut salt = [0u8; 16];
    fill_random(&mut salt)?;
    Ok(Argon2Params {
        m_cost,
        t_cost,
        p_cost,
        salt,
    })
}

/// Fills `buf` from the operating system's random source.
pub fn fill_random(buf: &mut [u8]) -> Result<(), VaultError> {
    OsRng.try_fill_bytes(buf).map_err(|e| VaultError::Crypto {
        reason: format!("the system random source failed: {e}"),
    })
}

fn mac_of(key: &[u8], parts: &[&[u8]]) -> HmacSha256 {
    let mut mac = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    mac_of(key, parts).finalize().into_bytes().into()
}

fn verify(key: &[u8], parts: &[&[u8]], tag: &[u8; 32]) -> bool {
    mac_of(key, parts).verify_slice(tag).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_binds_aad_and_uses_fresh_nonces() {
        let keys = Keys::derive(&MasterKey::generate().unwrap());
        let value = SecretValue::from_slice(b"p\0w\n$'\"");
        let (n1, c1) = keys.seal(b"name-a", &value).unwrap();
        let (n2, c2) = keys.seal(b"name-a", &value).unwrap();
        assert_ne!(n1, n2, "a fresh nonce per write");
        assert_ne!(c1, c2);
        assert!(keys.open(b"name-a", &n1, &c1).unwrap() == value);
        assert!(
            keys.open(b"name-b", &n1, &c1).is_none(),
            "copied under another name"
        );
        let other = Keys::derive(&MasterKey::generate().unwrap());
        assert!(other.open(b"name-a", &n1, &c1).is_none(), "another key");
    }

    #[test]
    fn passphrase_derivation_is_deterministic_per_salt() {
        let p = new_argon2_params(64, 1, 1).unwrap();
        let a = MasterKey::from_passphrase(b"correct horse", &p).unwrap();
        let b = MasterKey::from_passphrase(b"correct horse", &p).unwrap();
        let c = MasterKey::from_passphrase(b"correct horsf", &p).unwrap();
        assert_eq!(a.0.as_ref(), b.0.as_ref());
        assert_ne!(a.0.as_ref(), c.0.as_ref());
        let q = new_argon2_params(64, 1, 1).unwrap();
        let d = MasterKey::from_passphrase(b"correct horse", &q).unwrap();
        assert_ne!(a.0.as_ref(), d.0.as_ref(), "another salt");
    }

    #[test]
    fn key_file_round_trip_and_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("master.key");
        let key = MasterKey::generate().unwrap();
        key.write_new_file(&path).unwrap();
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(MasterKey::read_file(&path).unwrap().0.as_ref(), key.0.as_ref());
        assert!(matches!(
            key.write_new_file(&path),
            Err(VaultError::Exists { .. })
        ));

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = MasterKey::read_file(&path).err().unwrap().to_string();
        assert!(e.contains("chmod 600") && e.contains("master.key"), "{e}");

        let bad = dir.path().join("bad.key");
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&bad)
            .unwrap()
            .write_all(b"aGVsbG8=\n")
            .unwrap();
        let e = MasterKey::read_file(&bad).err().unwrap().to_string();
        assert!(e.contains("expected 32"), "{e}");
        let e = MasterKey::read_file(&dir.path().join("none"))
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("dso init"), "{e}");
    }
}
