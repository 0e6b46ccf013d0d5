//! [`VaultError`]: what went wrong with a vault file, its key or an entry. Every variant
//! names the file (or the entry) and, where there is one, the fix; none carries a value.

use std::path::{Path, PathBuf};

/// Why a vault operation failed.
#[derive(Debug, thiserror::Error)]
pub enum VaultError {
    /// A system call on a file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done (`reading`, `renaming`...).
        op: &'static str,
        /// The system error.
        #[source]
        source: std::io::Error,
    },
    /// The vault file does not exist.
    #[error(
        "no vault at {}: create one with `dso init`, or point to yours with --vault-file or DSO_VAULT_FILE",
        path.display()
    )]
    Missing {
        /// The file looked for.
        path: PathBuf,
    },
    /// The file is not a dso vault at all.
    #[error("{} is not a dso vault (it does not start with DSOVAULT)", path.display())]
    NotAVault {
        /// The file.
        path: PathBuf,
    },
    /// The file was written by a newer dso.
    #[error(
        "vault {} has format version {found}; this dso reads version {}: upgrade dso",
        path.display(),
        super::format::FORMAT_VERSION
    )]
    UnsupportedFormat {
        /// The file.
        path: PathBuf,
        /// Its format version.
        found: u16,
    },
    /// The file's structure or MAC is broken. Nothing was written.
    #[error(
        "vault {} is damaged ({reason}); it was left as it is: restore it from a backup",
        path.display()
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// What is broken.
        reason: String,
    },
    /// The key does not open the vault. Nothing was written.
    #[error("vault {}: wrong key: {what} does not open it", path.display())]
    WrongKey {
        /// The vault.
        path: PathBuf,
        /// Which key was tried (`the key file /x/master.key`, `the passphrase`).
        what: String,
    },
    /// The vault is protected the other way (a passphrase where a key file was given, or
    /// the reverse).
    #[error("vault {} is protected by {actual}: {fix}", path.display())]
    WrongProtection {
        /// The vault.
        path: PathBuf,
        /// `a passphrase` or `a key file`.
        actual: &'static str,
        /// What to do.
        fix: &'static str,
    },
    /// The key file cannot be used.
    #[error("key file {}: {reason}", path.display())]
    KeyFile {
        /// The key file.
        path: PathBuf,
        /// Why, and the fix.
        reason: String,
    },
    /// `dso init` found a file where it would create one.
    #[error(
        "{} already exists; dso init never overwrites a vault or a key: move it away, or choose \
         another path with --vault-file / --key-file",
        path.display()
    )]
    Exists {
        /// The existing file.
        path: PathBuf,
    },
    /// The passphrase is missing, too short, or cannot be read.
    #[error("passphrase: {reason}")]
    Passphrase {
        /// Why, and the fix.
        reason: String,
    },
    /// An entry name the local reference syntax does not accept.
    #[error("invalid secret name {name:?}: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A value that cannot be stored.
    #[error("secret {name:?}: {reason}")]
    BadValue {
        /// The entry name.
        name: String,
        /// Why (its length and the limit; never the value).
        reason: String,
    },
    /// An entry that does not decrypt although the file MAC holds.
    #[error(
        "vault {}: entry {name:?} does not decrypt (it was altered or copied from another name); \
         set it again with `dso secret set {name}`",
        path.display()
    )]
    EntryDamaged {
        /// The vault.
        path: PathBuf,
        /// The entry.
        name: String,
    },
    /// The cipher or the random source failed.
    #[error("vault crypto: {reason}")]
    Crypto {
        /// What failed.
        reason: String,
    },
}

impl VaultError {
    /// An I/O error on `path` while doing `op`.
    pub fn io(path: &Path, op: &'static str, source: std::io::Error) -> VaultError {
        VaultError::Io {
            path: path.to_owned(),
            op,
            source,
        }
    }
}
