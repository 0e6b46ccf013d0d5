//! [`LocalVault`]: one vault file and the key that opens it.
//!
//! Reads take no lock: a write replaces the file by rename, so a reader sees the old or
//! the new file, never half of one. Writes take an exclusive `flock` on `FILE.lock`, read
//! and verify the current file under it, change one entry, and replace the file atomically
//! (temp file 0600 in the same directory, write, fsync, rename, fsync the directory). A
//! file that does not verify (damaged, or another key) is an error and is never rewritten.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::crypto::{Keys, MasterKey, fill_random};
use super::error::VaultError;
use super::format::{self, Argon2Params, Entry, FormatError, Header, MAX_NAME_LEN, Protection};
use crate::reference::Reference;
use crate::spec::ProviderKind;
use crate::value::{MAX_VALUE_LEN, SecretValue};

/// How to open an existing vault.
pub enum KeySource {
    /// The key file at this path.
    KeyFile(PathBuf),
    /// This passphrase (the vault's header holds the salt and Argon2id parameters).
    Passphrase(SecretValue),
}

/// How to protect a new vault.
pub enum NewKey {
    /// Generate a random key and write it to this new file (0600).
    KeyFile(PathBuf),
    /// Derive the key from this passphrase with these Argon2id parameters.
    Passphrase {
        /// The passphrase.
        passphrase: SecretValue,
        /// Cost and salt (see [`super::crypto::new_argon2_params`]).
        params: Argon2Params,
    },
}

/// What is public about one entry: its name, version and update time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryInfo {
    /// The entry's name.
    pub name: String,
    /// Its version: grows with every write of the file, never reused.
    pub version: u64,
    /// When it was last set.
    pub updated: SystemTime,
}

impl EntryInfo {
    fn of(e: &Entry) -> EntryInfo {
        EntryInfo {
            name: e.name.clone(),
            version: e.version,
            updated: UNIX_EPOCH + Duration::from_nanos(e.updated_ns),
        }
    }

    /// The update time in nanoseconds since the Unix epoch.
    pub fn updated_ns(&self) -> u64 {
        self.updated
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

/// Identity of a file's content as seen by `fstat`: a rename-replaced file has a new inode,
/// so an unchanged stamp means unchanged bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: (i64, i64),
    ctime_ns: (i64, i64),
}

impl Stamp {
    fn of(meta: &std::fs::Metadata) -> Stamp {
        Stamp {
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.size(),
            mtime_ns: (meta.mtime(), meta.mtime_nsec()),
            ctime_ns: (meta.ctime(), meta.ctime_nsec()),
        }
    }
}

/// A verified read of the whole file: metadata of every entry and the sealed values.
pub struct Snapshot {
    header: Header,
    entries: Vec<Entry>,
    stamp: Stamp,
}

impl Snapshot {
    /// Every entry's metadata, sorted by name.
    pub fn list(&self) -> Vec<EntryInfo> {
        self.entries.iter().map(EntryInfo::of).collect()
    }

    /// One entry's metadata (no decryption).
    pub fn info(&self, name: &str) -> Option<EntryInfo> {
        self.find(name).ok().map(|i| EntryInfo::of(&self.entries[i]))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether the vault has no entry.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn find(&self, name: &str) -> Result<usize, usize> {
        self.entries.binary_search_by(|e| e.name.as_str().cmp(name))
    }
}

/// An open vault: the file's path and the keys that open it.
pub struct LocalVault {
    path: PathBuf,
    lock_path: PathBuf,
    keys: Keys,
    protection: Protection,
    key_desc: String,
}

impl LocalVault {
    /// How the vault at `path` is protected (reads its header only; needs no key).
    pub fn read_protection(path: &Path) -> Result<Protection, VaultError> {
        let bytes = read_all(path)?.0;
        format::parse_header(&bytes)
            .map(|(h, _)| h.protection)
            .map_err(|e| format_error(path, e))
    }

    /// Opens the vault at `path` with `key`, verifying the key and the whole file.
    pub fn open(path: &Path, key: KeySource) -> Result<LocalVault, VaultError> {
        let (bytes, _) = read_all(path)?;
        let (header, _) = format::parse_header(&bytes).map_err(|e| format_error(path, e))?;
        let (master, key_desc) = match (key, &header.protection) {
            (KeySource::KeyFile(k), Protection::KeyFile) => {
                (MasterKey::read_file(&k)?, format!("the key file {}", k.display()))
            }
            (KeySource::Passphrase(p), Protection::Passphrase(params)) => (
                MasterKey::from_passphrase(p.expose(), params)?,
                "the passphrase".to_string(),
            ),
            (KeySource::KeyFile(_), Protection::Passphrase(_)) => {
                return Err(VaultError::WrongProtection {
                    path: path.to_owned(),
                    actual: "a passphrase",
                    fix: "give the passphrase on the prompt, in DSO_VAULT_PASSPHRASE or in the file named by \
                          DSO_VAULT_PASSPHRASE_FILE (a provider: leave master_key_file out)",
                });
            }
            (KeySource::Passphrase(_), Protection::KeyFile) => {
                return Err(VaultError::WrongProtection {
                    path: path.to_owned(),
                    actual: "a key file",
                    fix: "give its key with --key-file or DSO_MASTER_KEY_FILE (a provider: master_key_file)",
                });
            }
        };
        let vault = LocalVault {
            path: path.to_owned(),
            lock_path: lock_path(path),
            keys: Keys::derive(&master),
            protection: header.protection.clone(),
            key_desc,
        };
        vault.decode(&bytes, None)?;
        Ok(vault)
    }

    /// Creates a new, empty vault at `path` (and, for [`NewKey::KeyFile`], its key file).
    /// Refuses when either file exists; the parent directories must exist.
    pub fn create(path: &Path, key: NewKey) -> Result<LocalVault, VaultError> {
        if let NewKey::KeyFile(k) = &key
            && k.symlink_metadata().is_ok()
        {
            return Err(VaultError::Exists { path: k.clone() });
        }
        let lock_path = lock_path(path);
        let _lock = lock(&lock_path)?;
        if path.symlink_metadata().is_ok() {
            return Err(VaultError::Exists {
                path: path.to_owned(),
            });
        }
        let (master, protection, key_desc, key_file) = match key {
            NewKey::KeyFile(k) => {
                let master = MasterKey::generate()?;
                master.write_new_file(&k)?;
                sync_dir(&k)?;
                let desc = format!("the key file {}", k.display());
                (master, Protection::KeyFile, desc, Some(k))
            }
            NewKey::Passphrase { passphrase, params } => {
                let master = MasterKey::from_passphrase(passphrase.expose(), &params)?;
                (
                    master,
                    Protection::Passphrase(params),
                    "the passphrase".to_string(),
                    None,
                )
            }
        };
        let mut vault_id = [0u8; 16];
        fill_random(&mut vault_id)?;
        let vault = LocalVault {
            path: path.to_owned(),
            lock_path,
            keys: Keys::derive(&master),
            protection: protection.clone(),
            key_desc,
        };
        let header = Header {
            vault_id,
            protection,
            next_version: 1,
        };
        let written = write_new(path, &vault.encode(&header, &[]));
        if written.is_err()
            && let Some(k) = key_file
        {
            // The key was created by this call for this vault only: without the vault it
            // protects nothing, and leaving it would make the retry refuse.
            let _ = std::fs::remove_file(k);
        }
        written?;
        Ok(vault)
    }

    /// The vault file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// How the vault is protected.
    pub fn protection(&self) -> &Protection {
        &self.protection
    }

    /// Which key opened it, for messages (`the key file /x`, `the passphrase`).
    pub fn key_description(&self) -> &str {
        &self.key_desc
    }

    /// Reads and verifies the whole file.
    pub fn snapshot(&self) -> Result<Snapshot, VaultError> {
        let (bytes, stamp) = read_all(&self.path)?;
        self.decode(&bytes, Some(stamp))
    }

    /// `prev` again when the file has not been replaced since it was read (one `fstat`),
    /// else a fresh verified read.
    pub fn refresh(&self, prev: Option<&Arc<Snapshot>>) -> Result<Arc<Snapshot>, VaultError> {
        let mut file = open_existing(&self.path)?;
        let meta = file
            .metadata()
            .map_err(|e| VaultError::io(&self.path, "reading", e))?;
        let stamp = Stamp::of(&meta);
        if let Some(prev) = prev
            && prev.stamp == stamp
        {
            return Ok(Arc::clone(prev));
        }
        let bytes = read_open(&self.path, &mut file, meta.len())?;
        Ok(Arc::new(self.decode(&bytes, Some(stamp))?))
    }

    /// Decrypts one entry of `snap` (and only that one).
    pub fn reveal(&self, snap: &Snapshot, name: &str) -> Result<Option<SecretValue>, VaultError> {
        let Ok(i) = snap.find(name) else {
            return Ok(None);
        };
        let e = &snap.entries[i];
        let aad = format::entry_aad(&snap.header.vault_id, &e.name, e.version, e.updated_ns);
        self.keys
            .open(&aad, &e.nonce, &e.ciphertext)
            .map(Some)
            .ok_or_else(|| VaultError::EntryDamaged {
                path: self.path.clone(),
                name: name.to_string(),
            })
    }

    /// Every entry's metadata, sorted by name. Decrypts nothing.
    pub fn list(&self) -> Result<Vec<EntryInfo>, VaultError> {
        Ok(self.snapshot()?.list())
    }

    /// One entry's metadata and value.
    pub fn get(&self, name: &str) -> Result<Option<(EntryInfo, SecretValue)>, VaultError> {
        let snap = self.snapshot()?;
        let Some(info) = snap.info(name) else {
            return Ok(None);
        };
        Ok(self.reveal(&snap, name)?.map(|v| (info, v)))
    }

    /// Sets `name` to `value` under a new version; returns the entry's new metadata.
    pub fn set(&self, name: &str, value: &SecretValue) -> Result<EntryInfo, VaultError> {
        check_name(name)?;
        check_value(name, value)?;
        self.modify(|keys, header, entries| Ok((self.put(keys, header, entries, name, value)?, true)))
    }

    /// Sets several entries in one write of the file (an import); each takes its own
    /// version, in the order given.
    pub fn set_many(&self, items: &[(&str, &SecretValue)]) -> Result<Vec<EntryInfo>, VaultError> {
        for (name, value) in items {
            check_name(name)?;
            check_value(name, value)?;
        }
        self.modify(|keys, header, entries| {
            let mut infos = Vec::with_capacity(items.len());
            for (name, value) in items {
                infos.push(self.put(keys, header, entries, name, value)?);
            }
            Ok((infos, !items.is_empty()))
        })
    }

    /// Deletes `name`; returns its last metadata, or `None` (and writes nothing) when
    /// there was no such entry.
    pub fn delete(&self, name: &str) -> Result<Option<EntryInfo>, VaultError> {
        self.modify(
            |_, _, entries| match entries.binary_search_by(|e| e.name.as_str().cmp(name)) {
                Ok(i) => Ok((Some(EntryInfo::of(&entries.remove(i))), true)),
                Err(_) => Ok((None, false)),
            },
        )
    }

    /// Seals `value` as the next version of `name` into `entries` (kept sorted).
    fn put(
        &self,
        keys: &Keys,
        header: &mut Header,
        entries: &mut Vec<Entry>,
        name: &str,
        value: &SecretValue,
    ) -> Result<EntryInfo, VaultError> {
        let version = header.next_version;
        header.next_version = version.checked_add(1).ok_or_else(|| VaultError::Damaged {
            path: self.path.clone(),
            reason: "the version counter is exhausted".into(),
        })?;
        let updated_ns = now_ns();
        let aad = format::entry_aad(&header.vault_id, name, version, updated_ns);
        let (nonce, ciphertext) = keys.seal(&aad, value)?;
        let entry = Entry {
            name: name.to_string(),
            version,
            updated_ns,
            nonce,
            ciphertext,
        };
        let info = EntryInfo::of(&entry);
        match entries.binary_search_by(|e| e.name.as_str().cmp(name)) {
            Ok(i) => entries[i] = entry,
            Err(i) => entries.insert(i, entry),
        }
        Ok(info)
    }

    /// Runs `change` on the current file under the write lock; writes the result when it
    /// says something changed.
    fn modify<T>(
        &self,
        change: impl FnOnce(&Keys, &mut Header, &mut Vec<Entry>) -> Result<(T, bool), VaultError>,
    ) -> Result<T, VaultError> {
        let _lock = lock(&self.lock_path)?;
        let Snapshot {
            mut header,
            mut entries,
            ..
        } = self.snapshot()?;
        let (out, changed) = change(&self.keys, &mut header, &mut entries)?;
        if changed {
            replace(&self.path, &self.encode(&header, &entries))?;
        }
        Ok(out)
    }

    fn encode(&self, header: &Header, entries: &[Entry]) -> Vec<u8> {
        let size: usize = entries
            .iter()
            .map(|e| e.name.len() + e.ciphertext.len() + 64)
            .sum();
        let mut out = Vec::with_capacity(size + 256);
        format::encode_header(header, &mut out);
        let check = self.keys.key_check(&out);
        out.extend_from_slice(&check);
        format::encode_count(entries.len(), &mut out);
        for e in entries {
            format::encode_entry(e, &mut out);
        }
        let mac = self.keys.file_mac(&out);
        out.extend_from_slice(&mac);
        out
    }

    fn decode(&self, bytes: &[u8], stamp: Option<Stamp>) -> Result<Snapshot, VaultError> {
        let parsed = format::parse(bytes).map_err(|e| format_error(&self.path, e))?;
        if !self
            .keys
            .verify_key_check(&bytes[..parsed.header_len], &parsed.key_check)
        {
            return Err(VaultError::WrongKey {
                path: self.path.clone(),
                what: self.key_desc.clone(),
            });
        }
        if !self
            .keys
            .verify_file_mac(&bytes[..parsed.mac_covered_len], &parsed.mac)
        {
            return Err(VaultError::Damaged {
                path: self.path.clone(),
                reason: "its MAC does not match its content".into(),
            });
        }
        let stamp = stamp.unwrap_or(Stamp {
            dev: 0,
            ino: 0,
            size: 0,
            mtime_ns: (0, 0),
            ctime_ns: (0, 0),
        });
        Ok(Snapshot {
            header: parsed.header,
            entries: parsed.entries,
            stamp,
        })
    }

    /// Test hook: writes `entries` as they are (already sealed) under a valid key check and
    /// MAC, as someone holding the key could.
    #[cfg(test)]
    pub(super) fn write_raw(&self, f: impl FnOnce(&mut Vec<Entry>)) {
        let snap = self.snapshot().unwrap();
        let mut entries = snap.entries;
        f(&mut entries);
        replace(&self.path, &self.encode(&snap.header, &entries)).unwrap();
    }
}

/// Checks an entry name: the local provider's reference syntax (a relative path like
/// `myapp/db_password`, no `#`), printable, no whitespace, at most [`MAX_NAME_LEN`] bytes.
pub fn check_name(name: &str) -> Result<(), VaultError> {
    let bad = |reason: &str| VaultError::InvalidName {
        name: name.to_string(),
        reason: reason.to_string(),
    };
    if name.is_empty() {
        return Err(bad("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("longer than {MAX_NAME_LEN} bytes")));
    }
    if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(bad("no spaces or control characters"));
    }
    if name.contains('#') {
        return Err(bad(
            "no '#' (it selects a JSON key in a reference: myapp/db#password)",
        ));
    }
    Reference::parse(ProviderKind::Local, "local", name).map_err(|e| match e {
        crate::Error::InvalidReference { reason, .. } => bad(&reason),
        other => bad(&other.to_string()),
    })?;
    Ok(())
}

/// Checks a value: not empty, at most [`MAX_VALUE_LEN`] bytes.
pub fn check_value(name: &str, value: &SecretValue) -> Result<(), VaultError> {
    let bad = |reason: String| VaultError::BadValue {
        name: name.to_string(),
        reason,
    };
    if value.is_empty() {
        return Err(bad(
            "the value is empty (an empty secret is never delivered)".into()
        ));
    }
    if value.len() > MAX_VALUE_LEN {
        return Err(bad(format!(
            "the value is {} bytes; the limit is {MAX_VALUE_LEN} bytes (1 MiB)",
            value.len()
        )));
    }
    Ok(())
}

fn lock_path(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(".lock");
    path.with_file_name(name)
}

/// Takes the exclusive write lock; released when the returned file is dropped. The lock
/// file is never removed (removing it would let two writers lock two different files).
fn lock(lock_path: &Path) -> Result<File, VaultError> {
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(lock_path)
        .map_err(|e| VaultError::io(lock_path, "creating the lock file", e))?;
    file.lock().map_err(|e| VaultError::io(lock_path, "locking", e))?;
    Ok(file)
}

fn open_existing(path: &Path) -> Result<File, VaultError> {
    File::open(path).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => VaultError::Missing {
            path: path.to_owned(),
        },
        _ => VaultError::io(path, "opening", e),
    })
}

fn read_open(path: &Path, file: &mut File, len: u64) -> Result<Vec<u8>, VaultError> {
    let mut bytes = Vec::with_capacity(len as usize + 1);
    file.read_to_end(&mut bytes)
        .map_err(|e| VaultError::io(path, "reading", e))?;
    Ok(bytes)
}

fn read_all(path: &Path) -> Result<(Vec<u8>, Stamp), VaultError> {
    let mut file = open_existing(path)?;
    let meta = file.metadata().map_err(|e| VaultError::io(path, "reading", e))?;
    let bytes = read_open(path, &mut file, meta.len())?;
    Ok((bytes, Stamp::of(&meta)))
}

fn format_error(path: &Path, e: FormatError) -> VaultError {
    match e {
        FormatError::NotAVault => VaultError::NotAVault {
            path: path.to_owned(),
        },
        FormatError::Unsupported(found) => VaultError::UnsupportedFormat {
            path: path.to_owned(),
            found,
        },
        FormatError::Damaged(reason) => VaultError::Damaged {
            path: path.to_owned(),
            reason,
        },
    }
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// Writes `bytes` to a new temp file (0600) beside `path`, fsynced; returns its path.
fn write_temp(path: &Path, bytes: &[u8]) -> Result<PathBuf, VaultError> {
    let mut rnd = [0u8; 8];
    fill_random(&mut rnd)?;
    let mut name = std::ffi::OsString::from(".");
    name.push(path.file_name().unwrap_or_default());
    name.push(format!(
        ".tmp-{}-{:016x}",
        std::process::id(),
        u64::from_ne_bytes(rnd)
    ));
    let tmp = path.with_file_name(name);
    let result = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(bytes)?;
            f.sync_all()
        });
    match result {
        Ok(()) => Ok(tmp),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(VaultError::io(&tmp, "writing the temp file", e))
        }
    }
}

/// Replaces `path` with `bytes` atomically.
fn replace(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    let tmp = write_temp(path, bytes)?;
    if let Err(e) = std::fs::rename(&tmp, path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(VaultError::io(path, "renaming the temp file onto", e));
    }
    sync_dir(path)
}

/// Creates `path` with `bytes` atomically, failing when it exists (a hard link does not
/// replace its target, unlike rename).
fn write_new(path: &Path, bytes: &[u8]) -> Result<(), VaultError> {
    let tmp = write_temp(path, bytes)?;
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    linked.map_err(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => VaultError::Exists {
            path: path.to_owned(),
        },
        _ => VaultError::io(path, "creating", e),
    })?;
    sync_dir(path)
}

/// fsyncs the directory holding `path`, so a rename or a new file survives a crash.
fn sync_dir(path: &Path) -> Result<(), VaultError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| VaultError::io(dir, "syncing the directory", e))
}
