//! The `local` provider: an encrypted vault file on this host, the embedded default that
//! works with nothing else installed.
//!
//! - `format.rs`: the file's byte layout (header, entries, key check, MAC), no crypto.
//! - `crypto.rs`: the master key (key file or Argon2id passphrase), AES-256-GCM sealing
//!   of each value with its name bound in, HMAC-SHA256 key check and file MAC.
//! - `store.rs`: [`LocalVault`], the file on disk: verified reads without a lock, writes
//!   under an exclusive `flock` with atomic replacement.
//! - `provider.rs`: [`LocalProvider`], the [`crate::Provider`] over it, and [`connect`].
//!
//! docs/secrets.md ("The local vault") describes the format and the threat model.

mod crypto;
mod error;
pub mod format;
mod provider;
mod store;

use std::path::PathBuf;

pub use crypto::{DEFAULT_ARGON2, MIN_PASSPHRASE_LEN, new_argon2_params};
pub use error::VaultError;
pub use format::{Argon2Params, Protection};
pub use provider::{LocalProvider, connect, token};
pub use store::{EntryInfo, KeySource, LocalVault, NewKey, Snapshot, check_name, check_value};

use crate::value::SecretValue;

/// Environment variable holding a passphrase-protected vault's passphrase.
pub const PASSPHRASE_ENV: &str = "DSO_VAULT_PASSPHRASE";

/// Environment variable naming a file that holds the passphrase (preferred: a process's
/// environment is readable by its user and root through `/proc/PID/environ`).
pub const PASSPHRASE_FILE_ENV: &str = "DSO_VAULT_PASSPHRASE_FILE";

/// The passphrase from [`PASSPHRASE_ENV`] or the file named by [`PASSPHRASE_FILE_ENV`]
/// (one trailing newline removed), or `None` when neither is set.
pub fn passphrase_from_env() -> Result<Option<SecretValue>, VaultError> {
    let direct = std::env::var_os(PASSPHRASE_ENV);
    let file = std::env::var_os(PASSPHRASE_FILE_ENV).filter(|f| !f.is_empty());
    match (direct, file) {
        (Some(_), Some(_)) => Err(VaultError::Passphrase {
            reason: format!("both {PASSPHRASE_ENV} and {PASSPHRASE_FILE_ENV} are set; set only one"),
        }),
        (Some(p), None) => {
            use std::os::unix::ffi::OsStringExt;
            Ok(Some(SecretValue::new(p.into_vec())))
        }
        (None, Some(f)) => {
            let path = PathBuf::from(f);
            let bytes = std::fs::read(&path).map_err(|e| VaultError::Passphrase {
                reason: format!("reading {} ({PASSPHRASE_FILE_ENV}): {e}", path.display()),
            })?;
            Ok(Some(strip_newline(bytes)))
        }
        (None, None) => Ok(None),
    }
}

/// A passphrase read from a file or a pipe: one trailing `\n` (or `\r\n`) is not part of it.
pub fn strip_newline(mut bytes: Vec<u8>) -> SecretValue {
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
        if bytes.last() == Some(&b'\r') {
            bytes.pop();
        }
    }
    SecretValue::new(bytes)
}

#[cfg(test)]
mod tests;
