//! Reads the env directory: one regular file per variable, the file name is the name and the
//! file's bytes are the value.
//!
//! Errors name the directory or the file, never a byte of any file's content.

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::args::is_env_name;

/// One variable read from the directory. Deliberately not `Debug`: it holds a value.
pub struct Var {
    /// The variable's name (the file name).
    pub name: OsString,
    /// The file's bytes, exactly; never printed.
    pub value: Vec<u8>,
}

/// Why the directory could not be turned into variables.
#[derive(Debug)]
pub enum Error {
    /// The directory could not be listed (missing, not a directory, no permission).
    Dir {
        /// The directory.
        dir: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A file could not be read.
    Read {
        /// The file.
        file: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A regular file whose name is not a valid variable name.
    BadName {
        /// The file.
        file: PathBuf,
    },
    /// A file holding a NUL byte, which no environment variable can hold.
    Nul {
        /// The file.
        file: PathBuf,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Dir { dir, source } => {
                write!(f, "env directory {}: {source}", dir.display())
            }
            Error::Read { file, source } => write!(f, "reading {}: {source}", file.display()),
            Error::BadName { file } => write!(
                f,
                "{}: not a valid environment variable name (use [A-Za-z_][A-Za-z0-9_]*, or a name starting with `.` to have it skipped)",
                file.display()
            ),
            Error::Nul { file } => write!(
                f,
                "{}: the value contains a NUL byte, which an environment variable cannot hold (deliver it as a file instead)",
                file.display()
            ),
        }
    }
}

/// Reads every variable of `dir`, sorted by name. Entries whose name starts with `.` (the
/// `.dso-ready` marker, temporary files of an atomic rename) and entries that are not
/// regular files (after following symlinks) are skipped.
pub fn read(dir: &Path) -> Result<Vec<Var>, Error> {
    let dir_error = |source| Error::Dir {
        dir: dir.to_owned(),
        source,
    };
    let mut vars = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(dir_error)? {
        let entry = entry.map_err(dir_error)?;
        let name = entry.file_name();
        if name.as_encoded_bytes().starts_with(b".") {
            continue;
        }
        let file = entry.path();
        let read_error = |source| Error::Read {
            file: file.clone(),
            source,
        };
        let meta = std::fs::metadata(&file).map_err(read_error)?;
        if !meta.is_file() {
            continue;
        }
        if !is_env_name(&name) {
            return Err(Error::BadName { file });
        }
        let value = std::fs::read(&file).map_err(read_error)?;
        if value.contains(&0) {
            return Err(Error::Nul { file });
        }
        vars.push(Var { name, value });
    }
    vars.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(vars)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
    }

    #[test]
    fn regular_files_become_variables_byte_for_byte() {
        let d = dir();
        let tricky: &[u8] = b"line1\nline2 $HOME \"q\" 'q' \xc3\xa9 \x01\xff\n";
        std::fs::write(d.path().join("B_TOKEN"), tricky).unwrap();
        std::fs::write(d.path().join("A"), b"").unwrap();
        std::fs::write(d.path().join(".dso-ready"), b"").unwrap();
        std::fs::write(d.path().join(".tmp-A.123"), b"bad\0content").unwrap();
        std::fs::create_dir(d.path().join("SUBDIR")).unwrap();
        std::os::unix::fs::symlink("B_TOKEN", d.path().join("LINKED")).unwrap();

        let vars = read(d.path()).unwrap();
        let names: Vec<_> = vars.iter().map(|v| v.name.to_str().unwrap()).collect();
        assert_eq!(names, ["A", "B_TOKEN", "LINKED"]);
        assert_eq!(vars[0].value, b"");
        assert_eq!(vars[1].value, tricky);
        assert_eq!(vars[2].value, tricky);
    }

    #[test]
    fn bad_name_is_an_error_naming_the_file() {
        let d = dir();
        std::fs::write(d.path().join("DB-PASSWORD"), b"hunter2").unwrap();
        let e = read(d.path()).err().unwrap().to_string();
        assert!(e.contains("DB-PASSWORD"), "{e}");
        assert!(e.contains("not a valid environment variable name"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }

    #[test]
    fn nul_content_is_an_error_without_the_content() {
        let d = dir();
        std::fs::write(d.path().join("TOKEN"), b"abc\0hunter2").unwrap();
        let e = read(d.path()).err().unwrap().to_string();
        assert!(e.contains("TOKEN") && e.contains("NUL"), "{e}");
        assert!(!e.contains("hunter2") && !e.contains("abc"), "{e}");
    }

    #[test]
    fn missing_directory_and_unreadable_file_are_named() {
        let d = dir();
        let missing = d.path().join("nope");
        let e = read(&missing).err().unwrap().to_string();
        assert!(e.contains(&*missing.to_string_lossy()), "{e}");

        // A dangling symlink cannot be read: the error names it.
        std::os::unix::fs::symlink("gone", d.path().join("DANGLING")).unwrap();
        let e = read(d.path()).err().unwrap().to_string();
        assert!(e.contains("DANGLING"), "{e}");
    }
}
