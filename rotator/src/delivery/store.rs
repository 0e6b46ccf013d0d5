//! The agent's RAM-only secret file store: `ROOT/<instance>/<group>/<file>` on a tmpfs.
//!
//! *Invariant*: a value is written only into a directory whose file system was just checked
//! to be a tmpfs (or ramfs) with `fstatfs` on the very directory fd the file is created in;
//! the store never falls back to disk. Every write creates a temp file in the group
//! directory, sets owner and mode through the open fd, writes, and renames it over the final
//! name, so a reader sees the old or the new content, never a mix.
//!
//! *Boundary*: no symlink is followed below the root. Directories are opened with
//! `O_DIRECTORY | O_NOFOLLOW` and files with `O_NOFOLLOW`, always relative to the fd of the
//! directory that holds them (`openat`, `renameat`, `unlinkat`), so a path is never re-walked
//! between the check and the write.
//!
//! Layout: the root (mode 0700) holds one directory per container instance (0700, owned by
//! the agent), each holding group directories (0755): `env` for the launcher, `f0`, `f1`...
//! for file injection. A group is bind-mounted read-only into its container. The empty file
//! [`READY_MARKER`] in a group means "complete": it is removed when a write starts and
//! written last when the caller says the group is ready.
//!
//! Wiping overwrites each file's whole length with zeros through an fd, fsyncs, then unlinks
//! it: a process that still holds the file open reads zeros afterwards.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::fs::{File, Permissions};
use std::hash::{BuildHasher, Hasher};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use dso_secrets::SecretValue;
use dso_secrets::value::MAX_VALUE_LEN;
use nix::dir::{Dir, Type};
use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::mount::MsFlags;
use nix::sys::stat::{FileStat, Mode, SFlag};
use nix::sys::statfs::{self, FsType};
use nix::unistd::UnlinkatFlags;
use zeroize::{Zeroize, Zeroizing};

/// Where the agent keeps its secret files unless `agent.delivery.root` says otherwise.
pub const DEFAULT_ROOT: &str = "/run/dso/secrets";

/// The empty file that marks a group directory as complete (written last).
pub const READY_MARKER: &str = ".dso-ready";

/// Prefix of the temp files a write renames into place (reserved, like every `.dso` name).
const TEMP_PREFIX: &str = ".dso-tmp-";

/// File names starting with this are dso's own (the marker, temp files).
const RESERVED_PREFIX: &str = ".dso";

/// The root and the instance directories: root only. A container sees its group
/// directory through its bind mount (the daemon resolves the source as root), so no host
/// user needs to traverse these, and one whose uid matches a container's cannot reach
/// that container's files by path.
const ROOT_MODE: u32 = 0o700;
const INSTANCE_MODE: u32 = 0o700;
/// Group directories: the container's user must list them (a launcher waits for files).
const GROUP_MODE: u32 = 0o755;
/// The ready marker holds nothing; anyone may see it.
const MARKER_MODE: u32 = 0o444;

/// `RAMFS_MAGIC` from `linux/magic.h` (not exported by libc): ramfs is RAM-only too.
const RAMFS_MAGIC: u32 = 0x8584_58f6;

/// Longest instance or group name.
const MAX_DIR_NAME: usize = 128;
/// Longest file name (NAME_MAX).
const MAX_FILE_NAME: usize = 255;

/// How [`Store::open`] prepares its root.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// Mount a tmpfs on the root when it is not one already (needs root / CAP_SYS_ADMIN).
    pub mount: bool,
    /// Size limit of that tmpfs in bytes (`size=`); must be above 0 (0 means unlimited).
    pub size_bytes: u64,
}

impl Default for StoreOptions {
    /// Mount when needed, 64 MiB.
    fn default() -> StoreOptions {
        StoreOptions {
            mount: true,
            size_bytes: 64 * 1024 * 1024,
        }
    }
}

/// One file of a group: its name, bytes, mode and owner.
#[derive(Clone, Copy)]
pub struct FileSpec<'a> {
    /// File name inside the group directory (1..=255 bytes, no `/`, not starting `.dso`).
    pub name: &'a str,
    /// The bytes (a secret value: never printed).
    pub value: &'a [u8],
    /// Permission bits (0..=0o777).
    pub mode: u32,
    /// Owner uid.
    pub uid: u32,
    /// Owner gid.
    pub gid: u32,
}

impl std::fmt::Debug for FileSpec<'_> {
    /// Everything but the value (its length only).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FileSpec")
            .field("name", &self.name)
            .field("value_len", &self.value.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

/// What went wrong in the store. Messages name the path (or name) and the fix, never a value.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The root (or a directory under it) is not on a tmpfs or ramfs.
    #[error(
        "{path} is on {found}, not a tmpfs: dso writes secret files only to RAM and never \
         falls back to disk; run the agent as root so it can mount a tmpfs there, mount one \
         yourself (mount -t tmpfs -o mode=0700 tmpfs {path}), or set agent.delivery.root to a \
         tmpfs directory",
        path = .path.display()
    )]
    NotTmpfs {
        /// The directory checked.
        path: PathBuf,
        /// The file system type found there.
        found: String,
    },
    /// Mounting the tmpfs failed.
    #[error(
        "mounting a tmpfs on {path}: {source}; run the agent as root (mounting needs \
         CAP_SYS_ADMIN), mount a tmpfs there yourself, or set agent.delivery.root to a tmpfs \
         directory",
        path = .path.display()
    )]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The `mount(2)` error.
        source: Errno,
    },
    /// A file system call failed.
    #[error("{op} {path}: {source}", path = .path.display())]
    Io {
        /// What dso was doing ("creating", "renaming into place"...).
        op: &'static str,
        /// The path concerned.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// An instance, group or file name breaks its rule.
    #[error("{what} name {name:?} is refused: {why}")]
    Name {
        /// "instance", "group" or "file".
        what: &'static str,
        /// The name given.
        name: String,
        /// The rule it breaks.
        why: &'static str,
    },
    /// A file mode with bits outside 0o777.
    #[error(
        "file {name:?}: mode {mode:o} is refused: only permission bits 0 to 0777 are allowed \
         (no setuid, setgid or sticky bit)"
    )]
    Mode {
        /// The file name.
        name: String,
        /// The mode given.
        mode: u32,
    },
    /// Something in the store is not what dso would have put there (a symlink, a foreign
    /// owner, a writable root...) or the options are unusable; `why` says what and the fix.
    #[error("{path}: {why}", path = .path.display())]
    Refused {
        /// The path concerned.
        path: PathBuf,
        /// What is wrong and how to fix it.
        why: String,
    },
}

/// The store: a checked tmpfs root. Cheap to clone (one `Arc`).
#[derive(Debug, Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The root directory (absolute).
    root: PathBuf,
    /// Serialises writes and wipes: a write removes files it did not put in the group
    /// (temp files included), which must not race another writer of the same group.
    write_lock: Mutex<()>,
}

impl Store {
    /// Opens (creating it, and mounting a tmpfs there when `opts.mount` allows) the store at
    /// `root`. Refuses a root that is not a tmpfs afterwards, a symlink, a root not owned by
    /// root or the agent's user, or a group/world writable one.
    pub fn open(root: impl Into<PathBuf>, opts: &StoreOptions) -> Result<Store, StoreError> {
        let root = root.into();
        if !root.is_absolute() || root.components().any(|c| c == Component::ParentDir) {
            return Err(refused(
                &root,
                "the store root must be an absolute path without `..`; set agent.delivery.root \
                 to one",
            ));
        }
        if opts.mount && opts.size_bytes == 0 {
            return Err(refused(
                &root,
                "the tmpfs size must be above 0 (size=0 means unlimited); set a size such as \
                 64MiB",
            ));
        }
        create_chain(&root)?;
        let store = Store {
            inner: Arc::new(Inner {
                root,
                write_lock: Mutex::new(()),
            }),
        };
        match store.check() {
            Ok(()) => return Ok(store),
            Err(StoreError::NotTmpfs { .. }) if opts.mount => {}
            Err(e) => return Err(e),
        }
        let data = format!("size={},mode={ROOT_MODE:o}", opts.size_bytes);
        nix::mount::mount(
            Some("dso"),
            store.root(),
            Some("tmpfs"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            Some(data.as_str()),
        )
        .map_err(|source| StoreError::Mount {
            path: store.root().to_owned(),
            source,
        })?;
        tracing::info!(root = %store.root().display(), size_bytes = opts.size_bytes, "mounted the secret store tmpfs");
        store.check()?;
        Ok(store)
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Checks that the root is a directory (not a symlink) on a tmpfs or ramfs, owned by
    /// root or the agent's user and not group/world writable.
    pub fn check(&self) -> Result<(), StoreError> {
        let fd = self.open_root()?;
        check_ram(&fd, self.root())
    }

    /// The host path of a group directory (names validated; nothing is created).
    pub fn group_dir(&self, instance: &str, group: &str) -> Result<PathBuf, StoreError> {
        check_dir_name("instance", instance)?;
        check_dir_name("group", group)?;
        Ok(self.root().join(instance).join(group))
    }

    /// Writes `files` into `ROOT/instance/group` (each by atomic rename, with its mode and
    /// owner), removes (wipes) every other file there, and writes [`READY_MARKER`] last when
    /// `ready`. The marker is removed first, so a group is never marked complete while a
    /// write is under way. Checks the tmpfs before writing. All names are validated before
    /// anything changes; an error midway leaves the previous file of each name intact.
    /// Returns the group directory.
    pub fn write_group(
        &self,
        instance: &str,
        group: &str,
        files: &[FileSpec<'_>],
        ready: bool,
    ) -> Result<PathBuf, StoreError> {
        let group_path = self.group_dir(instance, group)?;
        let mut names = HashSet::with_capacity(files.len());
        for file in files {
            check_file_name(file.name)?;
            if file.mode & !0o777 != 0 {
                return Err(StoreError::Mode {
                    name: file.name.to_owned(),
                    mode: file.mode,
                });
            }
            if !names.insert(file.name) {
                return Err(StoreError::Name {
                    what: "file",
                    name: file.name.to_owned(),
                    why: "appears twice in one group; give each file its own name",
                });
            }
        }

        let _guard = self.lock();
        let root = self.open_root()?;
        check_ram(&root, self.root())?;
        let instance_path = self.root().join(instance);
        let instance_fd = ensure_dir_at(root.as_fd(), instance, INSTANCE_MODE, &instance_path)?;
        let dir = ensure_dir_at(instance_fd.as_fd(), group, GROUP_MODE, &group_path)?;
        // The fd the files are created in is itself on RAM (a mount below the root would
        // otherwise slip past the root's check).
        check_ram(&dir, &group_path)?;

        unlink_at(dir.as_fd(), READY_MARKER, &group_path)?;
        for file in files {
            put_file(
                dir.as_fd(),
                &group_path,
                file.name,
                file.value,
                file.mode,
                Some((file.uid, file.gid)),
            )?;
        }
        for (name, kind) in list_dir(dir.as_fd(), &group_path)? {
            let ours = name.to_str().is_some_and(|n| names.contains(n));
            if !ours && name != OsStr::new(READY_MARKER) {
                wipe_entry(dir.as_fd(), &group_path, &name, kind)?;
            }
        }
        if ready {
            put_file(dir.as_fd(), &group_path, READY_MARKER, b"", MARKER_MODE, None)?;
        }
        tracing::debug!(instance, group, files = files.len(), ready, "wrote secret group");
        Ok(group_path)
    }

    /// Reads every file of a group (dso's own `.dso*` files skipped), sorted by name.
    /// Refuses symlinks and anything but regular files.
    pub fn read_group(&self, instance: &str, group: &str) -> Result<Vec<(String, SecretValue)>, StoreError> {
        let group_path = self.group_dir(instance, group)?;
        let root = self.open_root()?;
        let instance_path = self.root().join(instance);
        let instance_fd = open_dir_at(root.as_fd(), instance, &instance_path)?
            .ok_or_else(|| missing("opening instance directory", &instance_path))?;
        let dir = open_dir_at(instance_fd.as_fd(), group, &group_path)?
            .ok_or_else(|| missing("opening group directory", &group_path))?;
        let mut out = Vec::new();
        for (name, _) in list_dir(dir.as_fd(), &group_path)? {
            let path = group_path.join(&name);
            let Some(name) = name.to_str() else {
                return Err(refused(
                    &path,
                    "is not a file name dso writes (not UTF-8); remove it",
                ));
            };
            if name.starts_with(RESERVED_PREFIX) {
                continue;
            }
            out.push((name.to_owned(), read_file_at(dir.as_fd(), name, &path)?));
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    /// The group directories of an instance, sorted (none when the instance is missing).
    pub fn groups(&self, instance: &str) -> Result<Vec<String>, StoreError> {
        check_dir_name("instance", instance)?;
        let root = self.open_root()?;
        let path = self.root().join(instance);
        match open_dir_at(root.as_fd(), instance, &path)? {
            Some(dir) => dir_names(dir.as_fd(), &path),
            None => Ok(Vec::new()),
        }
    }

    /// The instance directories under the root, sorted (entries with names dso does not
    /// give, and anything but directories, are not listed).
    pub fn instances(&self) -> Result<Vec<String>, StoreError> {
        let root = self.open_root()?;
        dir_names(root.as_fd(), self.root())
    }

    /// Whether the instance directory exists (false for an invalid name or a symlink).
    pub fn exists(&self, instance: &str) -> bool {
        if check_dir_name("instance", instance).is_err() {
            return false;
        }
        let Ok(root) = self.open_root() else {
            return false;
        };
        matches!(
            open_dir_at(root.as_fd(), instance, &self.root().join(instance)),
            Ok(Some(_))
        )
    }

    /// Wipes an instance: every file overwritten with zeros, fsynced and unlinked, then the
    /// directories removed. A missing instance is not an error. A symlink in its place is
    /// refused (its target is not touched).
    pub fn wipe(&self, instance: &str) -> Result<(), StoreError> {
        check_dir_name("instance", instance)?;
        let _guard = self.lock();
        let root = self.open_root()?;
        wipe_dir_at(root.as_fd(), OsStr::new(instance), &self.root().join(instance))?;
        tracing::debug!(instance, "wiped secret instance");
        Ok(())
    }

    /// Wipes every instance not in `keep` (the orphan sweep at agent start) and returns
    /// their names. Tries them all; returns the first error if one failed.
    pub fn sweep(&self, keep: &HashSet<String>) -> Result<Vec<String>, StoreError> {
        let mut wiped = Vec::new();
        let mut first_error = None;
        for instance in self.instances()? {
            if keep.contains(&instance) {
                continue;
            }
            match self.wipe(&instance) {
                Ok(()) => wiped.push(instance),
                Err(e) => {
                    tracing::warn!(instance, error = %e, "orphan sweep could not wipe an instance");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(wiped),
        }
    }

    fn lock(&self) -> MutexGuard<'_, ()> {
        // A panic while holding the lock leaves nothing half-done that a later write does
        // not redo (it rewrites every file and removes the rest).
        self.inner
            .write_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Opens the root without following a symlink and checks its owner and mode.
    fn open_root(&self) -> Result<OwnedFd, StoreError> {
        let root = self.root();
        let fd = nix::fcntl::open(root, dir_flags(), Mode::empty()).map_err(|e| match e {
            Errno::ELOOP | Errno::ENOTDIR => refused(
                root,
                "is a symlink or not a directory; point agent.delivery.root at a real directory",
            ),
            e => io_err("opening the store root", root, e),
        })?;
        let st = fstat(&fd, root)?;
        check_owner(&st, root)?;
        if st.st_mode & 0o022 != 0 {
            return Err(refused(
                root,
                &format!(
                    "is group or world writable (mode {:o}); run chmod go-w on it or set \
                     agent.delivery.root to another directory",
                    st.st_mode & 0o7777
                ),
            ));
        }
        Ok(fd)
    }
}

/// Creates the root and its missing parents (0700), refusing a root or a created component
/// that turns out to be a symlink, foreign-owned or group/world writable. Existing parents
/// are the operator's (`/run`, `/tmp`) and are not judged.
fn create_chain(root: &Path) -> Result<(), StoreError> {
    let mut created = false;
    let mut prefix = PathBuf::new();
    for component in root.components() {
        prefix.push(component);
        let meta = match std::fs::symlink_metadata(&prefix) {
            Ok(_) if !created && prefix != root => continue,
            Ok(meta) => meta,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match std::fs::DirBuilder::new().create(&prefix) {
                    Ok(()) => {}
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(io_err("creating", &prefix, e)),
                }
                created = true;
                // Not through the path: a symlink raced in here must not be chmod'ed.
                let fd = nix::fcntl::open(&prefix, dir_flags(), Mode::empty())
                    .map_err(|e| io_err("opening", &prefix, e))?;
                nix::sys::stat::fchmod(&fd, mode(ROOT_MODE))
                    .map_err(|e| io_err("setting the mode of", &prefix, e))?;
                std::fs::symlink_metadata(&prefix).map_err(|e| io_err("inspecting", &prefix, e))?
            }
            Err(e) => return Err(io_err("inspecting", &prefix, e)),
        };
        use std::os::unix::fs::MetadataExt;
        if meta.file_type().is_symlink() || !meta.is_dir() {
            return Err(refused(
                &prefix,
                "is a symlink or not a directory; the store root and the directories dso \
                 creates for it must be real directories",
            ));
        }
        let euid = nix::unistd::geteuid().as_raw();
        if meta.uid() != 0 && meta.uid() != euid {
            return Err(refused(
                &prefix,
                &format!(
                    "is owned by uid {}, not by root or the agent's user; chown it or set \
                     agent.delivery.root to another directory",
                    meta.uid()
                ),
            ));
        }
        if meta.mode() & 0o022 != 0 {
            return Err(refused(
                &prefix,
                &format!(
                    "is group or world writable (mode {:o}); run chmod go-w on it or set \
                     agent.delivery.root to another directory",
                    meta.mode() & 0o7777
                ),
            ));
        }
    }
    Ok(())
}

fn dir_flags() -> OFlag {
    OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC
}

fn mode(bits: u32) -> Mode {
    Mode::from_bits_truncate(bits as nix::libc::mode_t)
}

/// Fails with `NotTmpfs` unless `fd` is on a tmpfs or ramfs.
fn check_ram(fd: &OwnedFd, path: &Path) -> Result<(), StoreError> {
    let st = statfs::fstatfs(fd).map_err(|e| io_err("checking the file system of", path, e))?;
    let kind = st.filesystem_type();
    if kind == statfs::TMPFS_MAGIC || kind == FsType(RAMFS_MAGIC as _) {
        return Ok(());
    }
    Err(StoreError::NotTmpfs {
        path: path.to_owned(),
        found: fs_name(kind),
    })
}

/// A readable name for a file system type.
fn fs_name(kind: FsType) -> String {
    let known = [
        (statfs::EXT4_SUPER_MAGIC, "ext2/ext3/ext4"),
        (statfs::XFS_SUPER_MAGIC, "xfs"),
        (statfs::BTRFS_SUPER_MAGIC, "btrfs"),
        (statfs::OVERLAYFS_SUPER_MAGIC, "overlayfs"),
        (statfs::NFS_SUPER_MAGIC, "nfs"),
    ];
    match known.iter().find(|(magic, _)| *magic == kind) {
        Some((_, name)) => (*name).to_owned(),
        None => format!("file system type {:#x}", kind.0),
    }
}

/// Instance and group names: `[A-Za-z0-9._-]{1,128}`, not starting with `.`.
fn check_dir_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let why = if name.is_empty() || name.len() > MAX_DIR_NAME {
        Some("must be 1 to 128 characters")
    } else if name.starts_with('.') {
        Some("must not start with `.` (which also rules out `.` and `..`)")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        Some("may hold only ASCII letters, digits, `.`, `_` and `-`")
    } else {
        None
    };
    match why {
        Some(why) => Err(StoreError::Name {
            what,
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

/// File names: 1..=255 bytes, no `/` or NUL, not `.`/`..`, not starting with `.dso`.
fn check_file_name(name: &str) -> Result<(), StoreError> {
    let why = if name.is_empty() || name.len() > MAX_FILE_NAME {
        Some("must be 1 to 255 bytes")
    } else if name.contains(['/', '\0']) {
        Some("must not contain `/` or NUL")
    } else if name == "." || name == ".." {
        Some("must not be `.` or `..`")
    } else if name.starts_with(RESERVED_PREFIX) {
        Some("must not start with `.dso` (reserved for dso's own files)")
    } else {
        None
    };
    match why {
        Some(why) => Err(StoreError::Name {
            what: "file",
            name: name.to_owned(),
            why,
        }),
        None => Ok(()),
    }
}

fn refused(path: &Path, why: &str) -> StoreError {
    StoreError::Refused {
        path: path.to_owned(),
        why: why.to_owned(),
    }
}

fn io_err(op: &'static str, path: &Path, source: impl Into<io::Error>) -> StoreError {
    StoreError::Io {
        op,
        path: path.to_owned(),
        source: source.into(),
    }
}

fn missing(op: &'static str, path: &Path) -> StoreError {
    io_err(op, path, io::Error::from(io::ErrorKind::NotFound))
}

fn fstat(fd: &impl AsFd, path: &Path) -> Result<FileStat, StoreError> {
    nix::sys::stat::fstat(fd).map_err(|e| io_err("inspecting", path, e))
}

fn check_owner(st: &FileStat, path: &Path) -> Result<(), StoreError> {
    let euid = nix::unistd::geteuid().as_raw();
    if st.st_uid != 0 && st.st_uid != euid {
        return Err(refused(
            path,
            &format!(
                "is owned by uid {}, not by root or the agent's user; dso did not create it: \
                 remove it",
                st.st_uid
            ),
        ));
    }
    Ok(())
}

fn is_kind(st: &FileStat, kind: SFlag) -> bool {
    SFlag::from_bits_truncate(st.st_mode & SFlag::S_IFMT.bits()) == kind
}

/// Opens a directory under `parent` without following a symlink; `None` when missing.
fn open_dir_at(
    parent: BorrowedFd<'_>,
    name: impl AsRef<OsStr>,
    path: &Path,
) -> Result<Option<OwnedFd>, StoreError> {
    match nix::fcntl::openat(parent, name.as_ref(), dir_flags(), Mode::empty()) {
        Ok(fd) => Ok(Some(fd)),
        Err(Errno::ENOENT) => Ok(None),
        Err(Errno::ELOOP | Errno::ENOTDIR) => Err(refused(
            path,
            "is a symlink or not a directory; dso follows no links in its store: remove it",
        )),
        Err(e) => Err(io_err("opening directory", path, e)),
    }
}

/// Creates (if missing) and opens a directory under `parent`, owned by root or the agent's
/// user, with exactly `bits` as its mode.
fn ensure_dir_at(parent: BorrowedFd<'_>, name: &str, bits: u32, path: &Path) -> Result<OwnedFd, StoreError> {
    match nix::sys::stat::mkdirat(parent, name, mode(bits)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(io_err("creating directory", path, e)),
    }
    let fd = open_dir_at(parent, name, path)?.ok_or_else(|| missing("opening directory", path))?;
    let st = fstat(&fd, path)?;
    check_owner(&st, path)?;
    if st.st_mode & 0o7777 != bits {
        nix::sys::stat::fchmod(&fd, mode(bits)).map_err(|e| io_err("setting the mode of", path, e))?;
    }
    Ok(fd)
}

/// The entries of a directory (without `.` and `..`) and their types where the file system
/// reports them.
fn list_dir(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<(std::ffi::OsString, Option<Type>)>, StoreError> {
    let mut handle =
        Dir::openat(dir, ".", dir_flags(), Mode::empty()).map_err(|e| io_err("listing", path, e))?;
    let mut out = Vec::new();
    for entry in handle.iter() {
        let entry = entry.map_err(|e| io_err("listing", path, e))?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        out.push((name.to_owned(), entry.file_type()));
    }
    Ok(out)
}

/// The subdirectories of `dir` whose names are valid instance/group names, sorted.
fn dir_names(dir: BorrowedFd<'_>, path: &Path) -> Result<Vec<String>, StoreError> {
    let mut out = Vec::new();
    for (name, kind) in list_dir(dir, path)? {
        let Some(name) = name.to_str() else { continue };
        if check_dir_name("instance", name).is_err() {
            continue;
        }
        if entry_kind(dir, name.as_ref(), kind, &path.join(name))? == Some(Type::Directory) {
            out.push(name.to_owned());
        }
    }
    out.sort();
    Ok(out)
}

/// The type of an entry, from `readdir` or else `fstatat` (not following links); `None`
/// when it vanished meanwhile.
fn entry_kind(
    dir: BorrowedFd<'_>,
    name: &OsStr,
    kind: Option<Type>,
    path: &Path,
) -> Result<Option<Type>, StoreError> {
    if kind.is_some() {
        return Ok(kind);
    }
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_kind(&st, SFlag::S_IFDIR) => Ok(Some(Type::Directory)),
        Ok(st) if is_kind(&st, SFlag::S_IFREG) => Ok(Some(Type::File)),
        Ok(_) => Ok(Some(Type::Symlink)), // anything else is only ever unlinked
        Err(Errno::ENOENT) => Ok(None),
        Err(e) => Err(io_err("inspecting", path, e)),
    }
}

/// Unlinks a non-directory entry; a missing one is fine.
fn unlink_at(dir: BorrowedFd<'_>, name: impl AsRef<OsStr>, dir_path: &Path) -> Result<(), StoreError> {
    match nix::unistd::unlinkat(dir, name.as_ref(), UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io_err("removing", &dir_path.join(name.as_ref()), e)),
    }
}

/// Writes one file by temp file and rename. The existing entry of that name, if any, must
/// be a regular file (a symlink or directory there is refused and left alone).
fn put_file(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &str,
    value: &[u8],
    bits: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), StoreError> {
    let final_path = dir_path.join(name);
    match nix::sys::stat::fstatat(dir, name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if is_kind(&st, SFlag::S_IFREG) => {}
        Ok(_) => {
            return Err(refused(
                &final_path,
                "exists and is not a regular file (a symlink or a directory); dso replaces \
                 only files it wrote: remove it",
            ));
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(io_err("inspecting", &final_path, e)),
    }
    let (temp_name, file) = create_temp(dir, dir_path)?;
    let temp_path = dir_path.join(&temp_name);
    let result = fill(&file, &temp_path, value, bits, owner).and_then(|()| {
        nix::fcntl::renameat(dir, temp_name.as_str(), dir, name)
            .map_err(|e| io_err("renaming into place", &final_path, e))
    });
    if result.is_err() {
        // Best effort: the error being returned says what failed; the temp file must not
        // stay behind with part of a value in it.
        let _ = zero_fill(&file);
        let _ = nix::unistd::unlinkat(dir, temp_name.as_str(), UnlinkatFlags::NoRemoveDir);
    }
    result
}

/// Sets owner and mode through the fd (never the path), then writes the value.
fn fill(
    file: &File,
    path: &Path,
    value: &[u8],
    bits: u32,
    owner: Option<(u32, u32)>,
) -> Result<(), StoreError> {
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(file, Some(uid), Some(gid))
            .map_err(|e| io_err("setting the owner of", path, e))?;
    }
    file.set_permissions(Permissions::from_mode(bits))
        .map_err(|e| io_err("setting the mode of", path, e))?;
    let mut writer = file;
    writer.write_all(value).map_err(|e| io_err("writing", path, e))
}

/// A new temp file in `dir`, created exclusively (`O_EXCL` never follows a link).
fn create_temp(dir: BorrowedFd<'_>, dir_path: &Path) -> Result<(String, File), StoreError> {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let mut last = Errno::EEXIST;
    for _ in 0..16 {
        // Unique within the agent (pid + counter), unpredictable across runs (a randomly
        // keyed hasher); O_EXCL settles any collision.
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        let name = format!("{TEMP_PREFIX}{}-{:016x}", std::process::id(), hasher.finish());
        match nix::fcntl::openat(dir, name.as_str(), flags, mode(0o600)) {
            Ok(fd) => return Ok((name, File::from(fd))),
            Err(Errno::EEXIST) => last = Errno::EEXIST,
            Err(e) => return Err(io_err("creating a temp file in", dir_path, e)),
        }
    }
    Err(io_err("creating a temp file in", dir_path, last))
}

/// Overwrites the file's whole current length with zeros and fsyncs it.
fn zero_fill(file: &File) -> io::Result<()> {
    const CHUNK: usize = 64 * 1024;
    let len = file.metadata()?.len();
    let zeros = vec![0u8; CHUNK.min(len as usize)];
    let mut offset = 0u64;
    while offset < len {
        let n = (len - offset).min(CHUNK as u64) as usize;
        file.write_all_at(&zeros[..n], offset)?;
        offset += n as u64;
    }
    file.sync_all()
}

/// Reads a regular file into a `SecretValue` without intermediate copies.
fn read_file_at(dir: BorrowedFd<'_>, name: &str, path: &Path) -> Result<SecretValue, StoreError> {
    let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC;
    let fd = nix::fcntl::openat(dir, name, flags, Mode::empty()).map_err(|e| match e {
        Errno::ELOOP => refused(path, "is a symlink; dso follows no links in its store: remove it"),
        e => io_err("opening", path, e),
    })?;
    let st = fstat(&fd, path)?;
    if !is_kind(&st, SFlag::S_IFREG) {
        return Err(refused(
            path,
            "is not a regular file; dso writes only files here: remove it",
        ));
    }
    let len = usize::try_from(st.st_size).unwrap_or(usize::MAX);
    if len > MAX_VALUE_LEN {
        return Err(refused(
            path,
            &format!("holds {len} bytes, more than the {MAX_VALUE_LEN} a value may have: remove it"),
        ));
    }
    let mut file = File::from(fd);
    let mut buf = Zeroizing::new(vec![0u8; len]);
    let changed = || {
        refused(
            path,
            "changed size while being read; dso writes by rename only: retry",
        )
    };
    file.read_exact(&mut buf).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => changed(),
        _ => io_err("reading", path, e),
    })?;
    let mut probe = [0u8; 1];
    let more = file.read(&mut probe).map_err(|e| io_err("reading", path, e))?;
    probe.zeroize();
    if more != 0 {
        return Err(changed());
    }
    Ok(SecretValue::new(std::mem::take(&mut *buf)))
}

/// Wipes whatever `name` is under `dir`: a directory recursively, a regular file by
/// overwrite and unlink, anything else (a symlink) by unlink alone.
fn wipe_entry(
    dir: BorrowedFd<'_>,
    dir_path: &Path,
    name: &OsStr,
    kind: Option<Type>,
) -> Result<(), StoreError> {
    let path = dir_path.join(name);
    match entry_kind(dir, name, kind, &path)? {
        None => Ok(()),
        Some(Type::Directory) => wipe_dir_at(dir, name, &path),
        Some(Type::File) => wipe_file_at(dir, name, &path),
        Some(_) => unlink_at(dir, name, dir_path),
    }
}

/// Wipes a directory's contents, then removes it; a missing directory is fine.
fn wipe_dir_at(parent: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<(), StoreError> {
    let Some(dir) = open_dir_at(parent, name, path)? else {
        return Ok(());
    };
    for (entry, kind) in list_dir(dir.as_fd(), path)? {
        wipe_entry(dir.as_fd(), path, &entry, kind)?;
    }
    match nix::unistd::unlinkat(parent, name, UnlinkatFlags::RemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io_err("removing directory", path, e)),
    }
}

/// Overwrites a regular file with zeros through an fd (no link followed), fsyncs, unlinks.
fn wipe_file_at(dir: BorrowedFd<'_>, name: &OsStr, path: &Path) -> Result<(), StoreError> {
    let flags = OFlag::O_WRONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    match nix::fcntl::openat(dir, name, flags, Mode::empty()) {
        Ok(fd) => {
            if is_kind(&fstat(&fd, path)?, SFlag::S_IFREG) {
                zero_fill(&File::from(fd)).map_err(|e| io_err("overwriting", path, e))?;
            }
        }
        // Replaced by a symlink meanwhile: unlink the link, leave its target alone.
        Err(Errno::ELOOP) => {}
        Err(Errno::ENOENT) => return Ok(()),
        Err(e) => return Err(io_err("opening for wipe", path, e)),
    }
    match nix::unistd::unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(io_err("removing", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::MetadataExt;
    use std::sync::atomic::AtomicBool;

    use nix::mount::MntFlags;

    /// Unmounts the test's tmpfs (if still mounted) before its temp dir is removed.
    struct MountGuard(PathBuf);

    impl Drop for MountGuard {
        fn drop(&mut self) {
            let _ = nix::mount::umount2(&self.0, MntFlags::MNT_DETACH);
        }
    }

    /// A store on its own tmpfs, mounted by `Store::open` on a fresh dir. Fields drop in
    /// order: the store, then the mount, then the temp dir.
    struct Fixture {
        store: Store,
        _mount: MountGuard,
        dir: tempfile::TempDir,
    }

    fn fixture_sized(size_bytes: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("run/dso/secrets");
        let mount = MountGuard(root.clone());
        let store = Store::open(
            &root,
            &StoreOptions {
                mount: true,
                size_bytes,
            },
        )
        .unwrap();
        Fixture {
            store,
            _mount: mount,
            dir,
        }
    }

    fn fixture() -> Fixture {
        fixture_sized(8 * 1024 * 1024)
    }

    fn spec<'a>(name: &'a str, value: &'a [u8]) -> FileSpec<'a> {
        FileSpec {
            name,
            value,
            mode: 0o400,
            uid: 1000,
            gid: 1000,
        }
    }

    fn is_ram(path: &Path) -> bool {
        let kind = statfs::statfs(path).unwrap().filesystem_type();
        kind == statfs::TMPFS_MAGIC
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut out: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        out.sort();
        out
    }

    #[test]
    fn open_mounts_a_tmpfs_on_a_fresh_dir() {
        let fx = fixture();
        let root = fx.store.root();
        assert!(is_ram(root), "the root is a tmpfs after open");
        assert!(
            !is_ram(fx.dir.path()),
            "test precondition: the temp dir is on disk"
        );
        assert_eq!(std::fs::metadata(root).unwrap().mode() & 0o7777, 0o700);
        for created in ["run", "run/dso"] {
            let meta = std::fs::metadata(fx.dir.path().join(created)).unwrap();
            assert_eq!(meta.mode() & 0o7777, 0o700, "{created}");
        }
        fx.store.check().unwrap();
        // Opening again finds the tmpfs and does not mount a second one over it.
        let again = Store::open(root, &StoreOptions::default()).unwrap();
        fx.store
            .write_group("i1", "f0", &[spec("a", b"x")], true)
            .unwrap();
        assert_eq!(again.groups("i1").unwrap(), ["f0"]);
    }

    #[test]
    fn open_refuses_a_disk_dir_without_mount() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!is_ram(dir.path()), "test precondition: the temp dir is on disk");
        let root = dir.path().join("secrets");
        let _mount = MountGuard(root.clone());
        let opts = StoreOptions {
            mount: false,
            ..StoreOptions::default()
        };
        let err = Store::open(&root, &opts).unwrap_err();
        assert!(matches!(err, StoreError::NotTmpfs { .. }), "{err:?}");
        let msg = err.to_string();
        assert!(msg.contains(&root.display().to_string()), "{msg}");
        assert!(msg.contains("ext2/ext3/ext4"), "{msg}");
        assert!(msg.contains("agent.delivery.root"), "{msg}");
        assert!(!is_ram(&root), "nothing was mounted");
        assert!(names(&root).is_empty());
    }

    #[test]
    fn open_refuses_symlinked_writable_or_relative_roots() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let _guards = [MountGuard(real.clone()), MountGuard(link.clone())];

        let err = Store::open(&link, &StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(!is_ram(&real), "nothing mounted through the link");

        std::fs::set_permissions(&real, Permissions::from_mode(0o777)).unwrap();
        let err = Store::open(&real, &StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("world writable"), "{err}");
        assert!(!is_ram(&real));

        let err = Store::open("relative/secrets", &StoreOptions::default()).unwrap_err();
        assert!(err.to_string().contains("absolute"), "{err}");
        let err = Store::open(
            dir.path().join("zero"),
            &StoreOptions {
                mount: true,
                size_bytes: 0,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("above 0"), "{err}");
    }

    #[test]
    fn round_trip_keeps_bytes_mode_and_owner() {
        let fx = fixture();
        let binary: Vec<u8> = (0..=255u8).chain([0, 0, 255, b'\n']).collect();
        let files = [
            spec("db_password", &binary),
            FileSpec {
                name: "tls.key",
                value: b"-----BEGIN KEY-----\0\x01",
                mode: 0o440,
                uid: 1000,
                gid: 2000,
            },
        ];
        let group = fx.store.write_group("web-1", "f0", &files, true).unwrap();
        assert_eq!(group, fx.store.root().join("web-1/f0"));
        assert_eq!(group, fx.store.group_dir("web-1", "f0").unwrap());

        let read = fx.store.read_group("web-1", "f0").unwrap();
        let read: Vec<(&str, &[u8])> = read.iter().map(|(n, v)| (n.as_str(), v.expose())).collect();
        assert_eq!(
            read,
            [
                ("db_password", &binary[..]),
                ("tls.key", &b"-----BEGIN KEY-----\0\x01"[..])
            ]
        );

        let meta = std::fs::symlink_metadata(group.join("db_password")).unwrap();
        assert!(meta.is_file());
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o400, 1000, 1000)
        );
        let meta = std::fs::symlink_metadata(group.join("tls.key")).unwrap();
        assert_eq!(
            (meta.mode() & 0o7777, meta.uid(), meta.gid()),
            (0o440, 1000, 2000)
        );
        let inst = std::fs::metadata(fx.store.root().join("web-1")).unwrap();
        assert_eq!((inst.mode() & 0o7777, inst.uid()), (0o700, 0));
        let grp = std::fs::metadata(&group).unwrap();
        assert_eq!((grp.mode() & 0o7777, grp.uid()), (0o755, 0));
        assert_eq!(names(&group), [".dso-ready", "db_password", "tls.key"]);

        assert_eq!(fx.store.instances().unwrap(), ["web-1"]);
        assert_eq!(fx.store.groups("web-1").unwrap(), ["f0"]);
        assert!(fx.store.groups("absent").unwrap().is_empty());
        assert!(fx.store.exists("web-1"));
        assert!(!fx.store.exists("web-2"));
    }

    #[test]
    fn replace_is_atomic_for_a_concurrent_reader() {
        let fx = fixture();
        let a = vec![b'a'; 64 * 1024];
        let mut b = vec![b'b'; 64 * 1024];
        b[0] = b'B'; // the two differ at both ends, so a torn read shows
        *b.last_mut().unwrap() = b'B';
        fx.store.write_group("i", "env", &[spec("v", &a)], true).unwrap();
        let path = fx.store.root().join("i/env/v");
        let done = AtomicBool::new(false);
        let reads = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut reads = 0u32;
                while !done.load(Ordering::Relaxed) && reads < 200_000 {
                    let got = std::fs::read(&path).expect("the file is never missing");
                    assert!(got == a || got == b, "torn read of {} bytes", got.len());
                    reads += 1;
                }
                reads
            });
            for round in 0..300 {
                let value = if round % 2 == 0 { &b } else { &a };
                fx.store
                    .write_group("i", "env", &[spec("v", value)], true)
                    .unwrap();
            }
            done.store(true, Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert!(reads > 10, "the reader ran alongside the writer ({reads} reads)");
    }

    #[test]
    fn a_removed_mapping_disappears() {
        let fx = fixture();
        let group = fx
            .store
            .write_group("i", "f0", &[spec("a", b"1"), spec("b", b"2")], true)
            .unwrap();
        // A temp file left by a crash is cleaned up by the next write too.
        std::fs::write(group.join(".dso-tmp-crashed"), b"partial").unwrap();
        fx.store
            .write_group("i", "f0", &[spec("a", b"1")], false)
            .unwrap();
        assert_eq!(names(&group), ["a"], "b, the stale temp and the marker are gone");
        let read = fx.store.read_group("i", "f0").unwrap();
        assert_eq!(read.len(), 1);
        assert_eq!((read[0].0.as_str(), read[0].1.expose()), ("a", &b"1"[..]));
    }

    #[test]
    fn the_ready_marker_is_written_last() {
        let fx = fixture();
        let group = fx
            .store
            .write_group("i", "f0", &[spec("a", b"1"), spec("b", b"2")], true)
            .unwrap();
        let marker = std::fs::symlink_metadata(group.join(READY_MARKER)).unwrap();
        assert_eq!(marker.len(), 0);
        for name in ["a", "b"] {
            let file = std::fs::symlink_metadata(group.join(name)).unwrap();
            let file_at = (file.mtime(), file.mtime_nsec());
            assert!(
                (marker.mtime(), marker.mtime_nsec()) >= file_at,
                "{name} after marker"
            );
        }
        // A write that fails on its second file leaves no marker: the group is incomplete.
        std::fs::create_dir(group.join("b2")).unwrap();
        let err = fx
            .store
            .write_group("i", "f0", &[spec("a", b"new"), spec("b2", b"x")], true)
            .unwrap_err();
        assert!(matches!(err, StoreError::Refused { .. }), "{err:?}");
        assert!(err.to_string().contains("b2"), "{err}");
        assert!(!group.join(READY_MARKER).exists());
        assert_eq!(std::fs::read(group.join("a")).unwrap(), b"new");
        assert!(!names(&group).iter().any(|n| n.starts_with(TEMP_PREFIX)));
    }

    #[test]
    fn a_failed_write_keeps_the_previous_file() {
        // 256 KiB of tmpfs: a 1 MiB value cannot fit (ENOSPC midway through the write).
        let fx = fixture_sized(256 * 1024);
        let group = fx
            .store
            .write_group("i", "f0", &[spec("big", b"old value")], true)
            .unwrap();
        let huge = vec![0x5au8; 1024 * 1024];
        let err = fx
            .store
            .write_group("i", "f0", &[spec("big", &huge)], true)
            .unwrap_err();
        assert!(matches!(err, StoreError::Io { op: "writing", .. }), "{err:?}");
        assert!(
            !format!("{err} {err:?}").contains("ZZZZ"),
            "no value in the error"
        );
        assert_eq!(std::fs::read(group.join("big")).unwrap(), b"old value");
        assert_eq!(names(&group), ["big"], "temp file removed, marker withdrawn");
    }

    #[test]
    fn wipe_zeroes_open_files_and_removes_everything() {
        let fx = fixture();
        let value = b"correct horse battery staple".repeat(3000);
        fx.store
            .write_group("i", "f0", &[spec("a", &value)], true)
            .unwrap();
        fx.store
            .write_group("i", "env", &[spec("E", b"v")], true)
            .unwrap();
        fx.store
            .write_group("other", "f0", &[spec("a", b"keep")], true)
            .unwrap();
        let mut held = File::open(fx.store.root().join("i/f0/a")).unwrap();

        fx.store.wipe("i").unwrap();
        assert!(!fx.store.exists("i"));
        assert!(!fx.store.root().join("i").exists());
        held.seek(SeekFrom::Start(0)).unwrap();
        let mut after = Vec::new();
        held.read_to_end(&mut after).unwrap();
        assert_eq!(after.len(), value.len());
        assert!(
            after.iter().all(|&b| b == 0),
            "the file was overwritten before unlink"
        );

        fx.store.wipe("i").unwrap();
        fx.store.wipe("never-there").unwrap();
        assert_eq!(fx.store.instances().unwrap(), ["other"]);
        assert_eq!(fx.store.read_group("other", "f0").unwrap()[0].1.expose(), b"keep");
    }

    #[test]
    fn sweep_keeps_the_listed_instances() {
        let fx = fixture();
        for instance in ["a", "b", "c"] {
            fx.store
                .write_group(instance, "f0", &[spec("x", b"1")], true)
                .unwrap();
        }
        let keep = HashSet::from(["b".to_owned(), "not-present".to_owned()]);
        assert_eq!(fx.store.sweep(&keep).unwrap(), ["a", "c"]);
        assert_eq!(fx.store.instances().unwrap(), ["b"]);
        assert!(fx.store.sweep(&keep).unwrap().is_empty());
    }

    #[test]
    fn bad_names_and_modes_are_refused_and_change_nothing() {
        let fx = fixture();
        let long = "x".repeat(129);
        for bad in ["", ".", "..", ".hidden", "a/b", "a b", "é", long.as_str()] {
            let err = fx
                .store
                .write_group(bad, "f0", &[spec("a", b"1")], true)
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Name { what: "instance", .. }),
                "{bad:?}: {err:?}"
            );
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
            let err = fx
                .store
                .write_group("i", bad, &[spec("a", b"1")], true)
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Name { what: "group", .. }),
                "{bad:?}: {err:?}"
            );
            assert!(fx.store.wipe(bad).is_err() && !fx.store.exists(bad));
        }
        let long = "y".repeat(256);
        for bad in ["", ".", "..", "a/b", "a\0b", ".dso-ready", ".dsox", long.as_str()] {
            let err = fx
                .store
                .write_group("i", "f0", &[spec("ok", b"1"), spec(bad, b"1")], true)
                .unwrap_err();
            assert!(
                matches!(err, StoreError::Name { what: "file", .. }),
                "{bad:?}: {err:?}"
            );
        }
        let err = fx
            .store
            .write_group("i", "f0", &[spec("a", b"1"), spec("a", b"2")], true)
            .unwrap_err();
        assert!(err.to_string().contains("twice"), "{err}");
        let setuid = FileSpec {
            mode: 0o4755,
            ..spec("a", b"1")
        };
        let err = fx.store.write_group("i", "f0", &[setuid], true).unwrap_err();
        assert!(err.to_string().contains("4755"), "{err}");
        assert!(fx.store.instances().unwrap().is_empty(), "nothing was created");
        // Names that are fine: 128-character instance, 255-byte file, dots inside.
        let ok_dir = "a".repeat(128);
        let ok_file = "b".repeat(255);
        fx.store
            .write_group(
                &ok_dir,
                "f.0_-",
                &[spec(&ok_file, b"1"), spec(".env", b"2")],
                true,
            )
            .unwrap();
        assert_eq!(fx.store.read_group(&ok_dir, "f.0_-").unwrap().len(), 2);
    }

    #[test]
    fn symlinks_in_the_store_are_refused_and_targets_untouched() {
        let fx = fixture();
        let outside = fx.dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("target"), b"do not touch").unwrap();

        // A symlinked group directory.
        fx.store.write_group("i", "f0", &[spec("a", b"1")], true).unwrap();
        let inst = fx.store.root().join("i");
        std::os::unix::fs::symlink(&outside, inst.join("f1")).unwrap();
        let err = fx
            .store
            .write_group("i", "f1", &[spec("target", b"evil")], true)
            .unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        assert!(fx.store.read_group("i", "f1").is_err());
        assert_eq!(names(&outside), ["target"]);
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"do not touch");

        // A symlinked file inside a real group directory.
        std::os::unix::fs::symlink(outside.join("target"), inst.join("f0/b")).unwrap();
        let err = fx
            .store
            .write_group("i", "f0", &[spec("b", b"evil")], true)
            .unwrap_err();
        assert!(err.to_string().contains("not a regular file"), "{err}");
        let err = fx.store.read_group("i", "f0").map(|_| ()).unwrap_err();
        assert!(err.to_string().contains("symlink"), "{err}");
        // A write without that name removes the link, not its target.
        fx.store.write_group("i", "f0", &[spec("a", b"2")], true).unwrap();
        assert!(std::fs::symlink_metadata(inst.join("f0/b")).is_err());
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"do not touch");

        // Wipe unlinks links without following them.
        std::os::unix::fs::symlink(outside.join("target"), inst.join("f0/c")).unwrap();
        fx.store.wipe("i").unwrap();
        assert!(!inst.exists());
        assert_eq!(std::fs::read(outside.join("target")).unwrap(), b"do not touch");

        // A symlinked instance directory is refused by wipe and by writes.
        std::os::unix::fs::symlink(&outside, fx.store.root().join("j")).unwrap();
        assert!(fx.store.wipe("j").is_err());
        assert!(fx.store.write_group("j", "f0", &[spec("x", b"1")], true).is_err());
        assert!(!fx.store.exists("j"));
        assert_eq!(names(&outside), ["target"]);
    }

    #[test]
    fn writes_fail_once_the_tmpfs_is_gone() {
        let fx = fixture();
        fx.store.write_group("i", "f0", &[spec("a", b"1")], true).unwrap();
        nix::mount::umount2(fx.store.root(), MntFlags::MNT_DETACH).unwrap();
        let err = fx.store.check().unwrap_err();
        assert!(matches!(err, StoreError::NotTmpfs { .. }), "{err:?}");
        let err = fx
            .store
            .write_group("i", "f0", &[spec("a", b"on disk?")], true)
            .unwrap_err();
        assert!(matches!(err, StoreError::NotTmpfs { .. }), "{err:?}");
        assert!(
            names(fx.store.root()).is_empty(),
            "nothing written to the disk dir"
        );
    }

    #[test]
    fn debug_output_holds_no_value() {
        let file = spec("name", b"hunter2-secret");
        let shown = format!("{file:?}");
        assert!(
            shown.contains("name") && shown.contains("value_len: 14"),
            "{shown}"
        );
        assert!(!shown.contains("hunter2"), "{shown}");
    }
}
