//! The in-memory tar archive the remote-engine path ("the tar streamer") uploads with
//! CopyToContainer into a container's tmpfs-backed volume.
//!
//! The archive is uploaded with the target directory as the extraction path, so every entry
//! sits at the archive root: plain ustar regular files with their exact mode, uid and gid,
//! then (when asked) the empty [`READY_MARKER`] last, which tells the launcher the set is
//! complete.
//!
//! *Invariant*: the only copy of a value this module makes is inside the returned buffer,
//! which is [`Zeroizing`]. The buffer is allocated once with its exact final size (so no
//! growth leaves an old, unzeroed allocation behind) and values are written into it directly,
//! never through a staging buffer such as `io::copy`'s.

use std::time::{SystemTime, UNIX_EPOCH};

use zeroize::Zeroizing;

/// The name of the empty file that marks a delivery directory as complete.
pub const READY_MARKER: &str = ".dso-ready";

/// Tar block size: headers are one block, data is padded to whole blocks.
const BLOCK: usize = 512;
/// The longest name a plain ustar header holds without a prefix or an extension entry.
const MAX_NAME: usize = 100;
/// Permission bits a delivered file may carry (no set-uid, set-gid or sticky bit).
const MODE_BITS: u32 = 0o777;

/// One file of the archive. `value` is borrowed: the archive copies it once, into itself.
#[derive(Clone, Copy)]
pub struct FileEntry<'a> {
    /// File name inside the target directory (no `/`).
    pub name: &'a str,
    /// The file's content (a secret value).
    pub value: &'a [u8],
    /// Permission bits, e.g. `0o400`.
    pub mode: u32,
    /// Owner uid inside the container.
    pub uid: u32,
    /// Owner gid inside the container.
    pub gid: u32,
}

impl std::fmt::Debug for FileEntry<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the value: only its length.
        f.debug_struct("FileEntry")
            .field("name", &self.name)
            .field("len", &self.value.len())
            .field("mode", &format_args!("{:04o}", self.mode))
            .field("uid", &self.uid)
            .field("gid", &self.gid)
            .finish()
    }
}

/// Why an archive could not be built. Names the file, never its content.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// A file name that cannot be delivered as given.
    #[error("secret file name {name:?} is not usable: {reason}")]
    InvalidName {
        /// The name as given.
        name: String,
        /// What is wrong with it and how to fix it.
        reason: &'static str,
    },
    /// A mode with bits beyond the permission bits.
    #[error("secret file {name:?}: mode {mode:o} has bits beyond 0777; use permission bits only (e.g. 0400)")]
    InvalidMode {
        /// The file.
        name: String,
        /// The mode as given.
        mode: u32,
    },
    /// Two entries with one name (the second would replace the first).
    #[error("secret file {name:?} is given twice for one target directory; give each file its own name")]
    Duplicate {
        /// The repeated name.
        name: String,
    },
    /// The tar header could not be written (a bug: the inputs were validated).
    #[error("building the archive entry for {name:?}: {message}")]
    Header {
        /// The file.
        name: String,
        /// The tar crate's message.
        message: String,
    },
}

/// Builds the archive of `files` (in order), with the empty [`READY_MARKER`] last when
/// `ready_marker` is set. Every entry is checked before anything is written.
pub fn build(files: &[FileEntry<'_>], ready_marker: bool) -> Result<Zeroizing<Vec<u8>>, ArchiveError> {
    for (i, f) in files.iter().enumerate() {
        check_name(f.name)?;
        if f.mode & !MODE_BITS != 0 {
            return Err(ArchiveError::InvalidMode {
                name: f.name.to_owned(),
                mode: f.mode,
            });
        }
        if files[..i].iter().any(|g| g.name == f.name) {
            return Err(ArchiveError::Duplicate {
                name: f.name.to_owned(),
            });
        }
    }
    let mtime = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let size = files.iter().map(|f| BLOCK + padded(f.value.len())).sum::<usize>()
        + if ready_marker { BLOCK } else { 0 }
        + 2 * BLOCK;
    let mut out = Zeroizing::new(Vec::with_capacity(size));
    let start = out.as_ptr();
    {
        let mut builder = tar::Builder::new(&mut *out);
        for f in files {
            let header = header(f.name, f.value.len(), f.mode, f.uid, f.gid, mtime)?;
            // The header through the builder; the value straight into the buffer (the
            // builder's `append` would stage it in an `io::copy` buffer on the stack).
            builder
                .append(&header, std::io::empty())
                .map_err(|e| header_error(f.name, e))?;
            let buf = builder.get_mut();
            buf.extend_from_slice(f.value);
            buf.resize(buf.len() + padded(f.value.len()) - f.value.len(), 0);
        }
        if ready_marker {
            let header = header(READY_MARKER, 0, 0o444, 0, 0, mtime)?;
            builder
                .append(&header, std::io::empty())
                .map_err(|e| header_error(READY_MARKER, e))?;
        }
        builder
            .finish()
            .map_err(|e| header_error("(end of archive)", e))?;
    }
    // The size was computed exactly, so the buffer never moved; a move would have left an
    // unzeroed copy of the values in the old allocation.
    assert!(
        out.len() == size && out.as_ptr() == start,
        "archive size computed wrong ({} != {size})",
        out.len()
    );
    Ok(out)
}

/// Checks that `name` can be delivered as one plain file at the archive root.
pub fn check_name(name: &str) -> Result<(), ArchiveError> {
    let reason = if name.is_empty() {
        Some("it is empty; give the file a name")
    } else if name.contains('/') {
        Some(
            "it contains '/'; files go straight into the target directory, set the directory as the target instead",
        )
    } else if name == "." || name == ".." {
        Some("'.' and '..' are directories; give the file a name")
    } else if name.contains('\0') {
        Some("it contains a NUL byte")
    } else if name.len() > MAX_NAME {
        Some("it is longer than 100 bytes; use a shorter name")
    } else if name.starts_with(".dso") {
        Some("names starting with '.dso' are reserved for dso's own markers; rename the file")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ArchiveError::InvalidName {
            name: name.to_owned(),
            reason,
        }),
        None => Ok(()),
    }
}

/// `len` rounded up to whole blocks.
fn padded(len: usize) -> usize {
    len.div_ceil(BLOCK) * BLOCK
}

fn header(
    name: &str,
    len: usize,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: u64,
) -> Result<tar::Header, ArchiveError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| header_error(name, e))?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_size(len as u64);
    h.set_mode(mode);
    h.set_uid(u64::from(uid));
    h.set_gid(u64::from(gid));
    h.set_mtime(mtime);
    h.set_cksum();
    Ok(h)
}

fn header_error(name: &str, e: std::io::Error) -> ArchiveError {
    ArchiveError::Header {
        name: name.to_owned(),
        message: e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn entry<'a>(name: &'a str, value: &'a [u8], mode: u32, uid: u32, gid: u32) -> FileEntry<'a> {
        FileEntry {
            name,
            value,
            mode,
            uid,
            gid,
        }
    }

    /// (name, mode, uid, gid, mtime, content) of every entry, in order.
    fn read_back(archive: &[u8]) -> Vec<(String, u32, u64, u64, u64, Vec<u8>)> {
        let mut a = tar::Archive::new(archive);
        a.entries()
            .unwrap()
            .map(|e| {
                let mut e = e.unwrap();
                assert_eq!(e.header().entry_type(), tar::EntryType::Regular);
                let name = e.path().unwrap().to_str().unwrap().to_owned();
                let h = e.header().clone();
                let mut content = Vec::new();
                e.read_to_end(&mut content).unwrap();
                (
                    name,
                    h.mode().unwrap(),
                    h.uid().unwrap(),
                    h.gid().unwrap(),
                    h.mtime().unwrap(),
                    content,
                )
            })
            .collect()
    }

    #[test]
    fn entries_keep_name_mode_owner_content_and_the_marker_is_last() {
        let big = vec![b'x'; 1500];
        let files = [
            entry("db_password", b"s3cret-value", 0o400, 0, 0),
            entry("api.key", &big, 0o440, 1000, 1001),
            entry("empty", b"", 0o444, 65534, 65534),
        ];
        let before = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
        let archive = build(&files, true).unwrap();
        let got = read_back(&archive);
        let names: Vec<&str> = got.iter().map(|g| g.0.as_str()).collect();
        assert_eq!(names, ["db_password", "api.key", "empty", READY_MARKER]);
        assert_eq!((got[0].1, got[0].2, got[0].3), (0o400, 0, 0));
        assert_eq!(got[0].5, b"s3cret-value");
        assert_eq!((got[1].1, got[1].2, got[1].3), (0o440, 1000, 1001));
        assert_eq!(got[1].5, big);
        assert_eq!((got[2].1, got[2].2, got[2].3), (0o444, 65534, 65534));
        assert!(got[2].5.is_empty());
        assert!(got[3].5.is_empty(), "the marker is empty");
        for g in &got {
            assert!(g.4 >= before && g.4 <= before + 5, "mtime is now: {}", g.4);
        }
        // Exact size: headers, data padded to blocks, marker, two end blocks.
        assert_eq!(archive.len(), 512 + 512 + 512 + 1536 + 512 + 512 + 1024);
        assert_eq!(archive.capacity(), archive.len(), "allocated once, exactly");
        let count = archive.windows(12).filter(|w| *w == b"s3cret-value").count();
        assert_eq!(count, 1, "the value is in the archive once, as the file's data");
    }

    #[test]
    fn without_the_marker_only_the_files_are_there() {
        let archive = build(&[entry("a", b"1", 0o400, 0, 0)], false).unwrap();
        let got = read_back(&archive);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, "a");
        let empty = build(&[], true).unwrap();
        let got = read_back(&empty);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, READY_MARKER);
    }

    #[test]
    fn a_name_of_exactly_100_bytes_fits_a_plain_ustar_header() {
        let name = "n".repeat(100);
        let archive = build(&[entry(&name, b"v", 0o400, 0, 0)], false).unwrap();
        assert_eq!(read_back(&archive)[0].0, name);
        // One header block, one data block, the end: no long-name extension entry.
        assert_eq!(archive.len(), 512 + 512 + 1024);
    }

    #[test]
    fn bad_names_are_refused_with_the_name_and_the_fix() {
        let long = "n".repeat(101);
        for (name, needle) in [
            ("", "empty"),
            ("a/b", "'/'"),
            ("/abs", "'/'"),
            ("..", "directories"),
            (".", "directories"),
            ("a\0b", "NUL"),
            (long.as_str(), "100 bytes"),
            (".dso-ready", "reserved"),
            (".dsox", "reserved"),
        ] {
            let e = build(&[entry(name, b"value-xyz", 0o400, 0, 0)], true).unwrap_err();
            let msg = e.to_string();
            assert!(msg.contains(needle), "{name:?}: {msg}");
            assert!(!msg.contains("value-xyz"), "the value never appears: {msg}");
        }
        // Names that only look odd are fine.
        for name in ["a..b", ".env", "dso", "x.dso"] {
            build(&[entry(name, b"v", 0o400, 0, 0)], true).unwrap();
        }
    }

    #[test]
    fn bad_modes_and_duplicates_are_refused() {
        let e = build(&[entry("a", b"v", 0o4755, 0, 0)], false).unwrap_err();
        assert!(e.to_string().contains("4755"), "{e}");
        let e = build(
            &[entry("a", b"v", 0o400, 0, 0), entry("a", b"w", 0o400, 0, 0)],
            false,
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn debug_shows_the_length_not_the_value() {
        let s = format!("{:?}", entry("a", b"hunter2", 0o400, 0, 0));
        assert!(!s.contains("hunter2"), "{s}");
        assert!(s.contains("len: 7"), "{s}");
    }
}
