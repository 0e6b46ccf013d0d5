//! [`StateStore`]: the last *applied* version per (consumer, reference), persisted in the
//! state directory so that an agent restart triggers nothing and a change made while the
//! agent was down is applied once at start.
//!
//! One JSON file per consumer, `c-ENCODED.json` where ENCODED is the consumer id with every
//! byte outside `[A-Za-z0-9.-]` percent-encoded (so `a_b/c` and `a/b_c` never share a file),
//! or `h-SHA256.json` when the encoded name would be longer than [`MAX_ENCODED_LEN`]; the
//! file holds the consumer id too, and a hashed file whose id differs is not used. The
//! file holds versions (change tokens) and references, never a value. Writes are atomic:
//! temp file (mode 0600), fsync, rename, fsync of the directory.
//!
//! Invariant: a version is persisted only after the caller delivered it
//! ([`StateStore::mark_applied`]); the watcher itself never writes here.

use std::collections::HashMap;
use std::fs;
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::provider::Version;
use crate::reference::Reference;

/// Longest percent-encoded consumer id used as a file name; longer ids are hashed.
pub const MAX_ENCODED_LEN: usize = 200;

/// Why the state directory could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// A file system call failed.
    #[error("state {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A state file is not what this version of dso writes.
    #[error("state file {path} is damaged ({detail}); remove it to re-deliver that consumer's secrets once")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}

/// The applied versions of one consumer, keyed by (provider, reference as written).
pub type Applied = HashMap<(String, String), Version>;

/// On-disk shape of one consumer's file.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsumerFile {
    /// Format version of this file.
    format: u32,
    /// The consumer id (checked on read: hashed file names are not reversible).
    consumer: String,
    /// One entry per reference.
    applied: Vec<Entry>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    provider: String,
    reference: String,
    version: Version,
}

/// The applied-version store of one state directory.
pub struct StateStore {
    /// The directory (created 0700 when missing).
    dir: PathBuf,
    /// Serializes read-modify-write of one file between callers of this process.
    lock: Mutex<()>,
}

impl StateStore {
    /// Opens (and creates, mode 0700) the state directory.
    pub fn open(dir: impl Into<PathBuf>) -> Result<StateStore, StateError> {
        let dir = dir.into();
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| StateError::Io {
                path: dir.clone(),
                source,
            })?;
        Ok(StateStore {
            dir,
            lock: Mutex::new(()),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds `consumer`'s record.
    pub fn file_for(&self, consumer: &str) -> PathBuf {
        self.dir.join(file_name(consumer))
    }

    /// The consumer's applied versions, or `None` when it has no record (a new consumer).
    pub fn load(&self, consumer: &str) -> Result<Option<Applied>, StateError> {
        let path = self.file_for(consumer);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(StateError::Io { path, source }),
        };
        let file: ConsumerFile = serde_json::from_slice(&bytes).map_err(|e| StateError::Corrupt {
            path: path.clone(),
            detail: e.to_string(),
        })?;
        if file.format != 1 {
            return Err(StateError::Corrupt {
                path,
                detail: format!("format {} (this dso reads format 1)", file.format),
            });
        }
        if file.consumer != consumer {
            // Only possible for hashed names: a SHA-256 collision, or a hand-copied file.
            return Err(StateError::Corrupt {
                path,
                detail: format!("it belongs to consumer {:?}", file.consumer),
            });
        }
        Ok(Some(
            file.applied
                .into_iter()
                .map(|e| ((e.provider, e.reference), e.version))
                .collect(),
        ))
    }

    /// Records that `versions` were delivered to `consumer` (merged into its record).
    pub fn mark_applied(&self, consumer: &str, versions: &[(Reference, Version)]) -> Result<(), StateError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let mut applied = self.load(consumer)?.unwrap_or_default();
        for (r, v) in versions {
            applied.insert((r.provider.clone(), r.raw.clone()), v.clone());
        }
        let mut entries: Vec<Entry> = applied
            .into_iter()
            .map(|((provider, reference), version)| Entry {
                provider,
                reference,
                version,
            })
            .collect();
        entries.sort_by(|a, b| (&a.provider, &a.reference).cmp(&(&b.provider, &b.reference)));
        let file = ConsumerFile {
            format: 1,
            consumer: consumer.to_string(),
            applied: entries,
        };
        let bytes = serde_json::to_vec_pretty(&file).expect("state serializes");
        write_atomic(&self.file_for(consumer), &bytes)
    }

    /// Removes `consumer`'s record (it will get a `first` snapshot when watched again).
    pub fn forget(&self, consumer: &str) -> Result<(), StateError> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.file_for(consumer);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(source) => Err(StateError::Io { path, source }),
        }
    }
}

/// The injective file name of a consumer id.
fn file_name(consumer: &str) -> String {
    let mut enc = String::with_capacity(consumer.len());
    for b in consumer.bytes() {
        if b.is_ascii_alphanumeric() || b == b'.' || b == b'-' {
            enc.push(b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    if enc.len() <= MAX_ENCODED_LEN && enc != "." && enc != ".." {
        format!("c-{enc}.json")
    } else {
        let digest = Sha256::digest(consumer.as_bytes());
        let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
        format!("h-{hex}.json")
    }
}

/// Writes `bytes` to `path` atomically: temp file in the same directory (0600), fsync,
/// rename over `path`, fsync the directory.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), StateError> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |source| StateError::Io { path: p, source }
    };
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("state");
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(io(&tmp))?;
    f.write_all(bytes).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    drop(f);
    fs::rename(&tmp, path).map_err(io(path))?;
    fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::ProviderKind;

    #[test]
    fn names_are_injective() {
        assert_ne!(file_name("a_b/c"), file_name("a/b_c"));
        assert_ne!(file_name("a%5Fb"), file_name("a_b"));
        assert_eq!(file_name("web-1.svc"), "c-web-1.svc.json");
        assert!(file_name(&"x/".repeat(200)).starts_with("h-"));
        assert!(!file_name("..").contains('/'));
    }

    #[test]
    fn round_trip_and_merge() {
        let dir = tempfile::tempdir().unwrap();
        let s = StateStore::open(dir.path().join("state")).unwrap();
        assert!(s.load("a_b/c").unwrap().is_none());
        let r1 = Reference::parse(ProviderKind::Aws, "aws", "db#user").unwrap();
        let r2 = Reference::parse(ProviderKind::Aws, "aws", "db#password").unwrap();
        s.mark_applied("a_b/c", &[(r1.clone(), Version::new("v1"))])
            .unwrap();
        s.mark_applied("a_b/c", &[(r2.clone(), Version::new("v2"))])
            .unwrap();
        let got = s.load("a_b/c").unwrap().unwrap();
        assert_eq!(got[&("aws".into(), "db#user".into())], Version::new("v1"));
        assert_eq!(got[&("aws".into(), "db#password".into())], Version::new("v2"));
        assert!(s.load("a/b_c").unwrap().is_none());
        s.forget("a_b/c").unwrap();
        assert!(s.load("a_b/c").unwrap().is_none());
    }
}
