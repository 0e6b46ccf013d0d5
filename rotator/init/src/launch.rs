//! Waiting for the files, finding the program, and exec'ing it.

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::envdir::Var;

/// The search path when the resulting environment has no `PATH` (the one Docker and most
/// shells use).
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// How often `--wait-for` looks again.
const POLL: Duration = Duration::from_millis(25);

/// Waits until every path of `paths` exists, for at most `wait` in total. On timeout, returns
/// the first path still missing.
pub fn wait_for(paths: &[PathBuf], wait: Duration) -> Result<(), PathBuf> {
    let deadline = Instant::now() + wait;
    for path in paths {
        // `symlink_metadata`: a marker file exists once its name does.
        while std::fs::symlink_metadata(path).is_err() {
            let now = Instant::now();
            if now >= deadline {
                return Err(path.clone());
            }
            std::thread::sleep(POLL.min(deadline - now));
        }
    }
    Ok(())
}

/// Why the program could not be started; the exit code follows the shells' convention.
#[derive(Debug)]
pub enum ExecError {
    /// Not found (exit 127).
    NotFound(String),
    /// Found but not executable, or the exec failed (exit 126).
    NotExecutable(String),
}

impl ExecError {
    /// The exit code a shell would give.
    pub fn code(&self) -> u8 {
        match self {
            ExecError::NotFound(_) => 127,
            ExecError::NotExecutable(_) => 126,
        }
    }

    /// The message (names the program, never a value).
    pub fn message(&self) -> &str {
        match self {
            ExecError::NotFound(m) | ExecError::NotExecutable(m) => m,
        }
    }
}

/// Finds `program` the way `execvp` does: as given when it contains a `/`, else in each
/// directory of `path` (an empty entry is the current directory). The first executable
/// regular file wins; a match that is not executable is reported only when nothing is.
pub fn resolve(program: &OsStr, path: Option<&OsStr>) -> Result<PathBuf, ExecError> {
    let shown = program.to_string_lossy();
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let path = path.unwrap_or(OsStr::new(DEFAULT_PATH));
    let mut not_executable = None;
    for dir in path.as_bytes().split(|&b| b == b':') {
        let dir = if dir.is_empty() {
            Path::new(".")
        } else {
            Path::new(OsStr::from_bytes(dir))
        };
        let candidate = dir.join(program);
        match std::fs::metadata(&candidate) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => return Ok(candidate),
            Ok(m) if m.is_file() => {
                not_executable.get_or_insert(candidate);
            }
            _ => {}
        }
    }
    Err(match not_executable {
        // The directory is named; the PATH itself is not, since it may come from the env dir.
        Some(found) => {
            ExecError::NotExecutable(format!("{}: permission denied (not executable)", found.display()))
        }
        None => ExecError::NotFound(format!("{shown}: command not found in PATH")),
    })
}

/// Execs `program` with `args` and the inherited environment plus `vars` (which override
/// inherited variables of the same name). Returns only on failure.
pub fn exec(program: &OsStr, args: &[OsString], vars: Vec<Var>) -> ExecError {
    let path = vars
        .iter()
        .rev()
        .find(|v| v.name == "PATH")
        .map(|v| OsString::from(OsStr::from_bytes(&v.value)))
        .or_else(|| std::env::var_os("PATH"));
    let resolved = match resolve(program, path.as_deref()) {
        Ok(p) => p,
        Err(e) => return e,
    };
    let mut command = std::process::Command::new(&resolved);
    command.arg0(program).args(args);
    for var in vars {
        command.env(var.name, OsStr::from_bytes(&var.value));
    }
    let e = command.exec();
    let shown = resolved.display();
    match e.kind() {
        std::io::ErrorKind::NotFound => ExecError::NotFound(format!("{shown}: {e}")),
        _ => ExecError::NotExecutable(format!("{shown}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, mode: u32) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, b"#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        p
    }

    #[test]
    fn path_search_takes_the_first_executable() {
        let a = tempfile::tempdir().unwrap();
        let b = tempfile::tempdir().unwrap();
        script(a.path(), "tool", 0o644);
        let exe = script(b.path(), "tool", 0o755);
        let path = format!("/surely/missing:{}:{}", a.path().display(), b.path().display());
        assert_eq!(resolve(OsStr::new("tool"), Some(OsStr::new(&path))).unwrap(), exe);
    }

    #[test]
    fn not_executable_and_not_found() {
        let a = tempfile::tempdir().unwrap();
        script(a.path(), "tool", 0o644);
        let path = a.path().as_os_str();
        let e = resolve(OsStr::new("tool"), Some(path)).unwrap_err();
        assert_eq!(e.code(), 126, "{}", e.message());
        let e = resolve(OsStr::new("nothing-here"), Some(path)).unwrap_err();
        assert_eq!(e.code(), 127);
        assert!(e.message().contains("nothing-here"));
    }

    #[test]
    fn slash_means_as_given_and_default_path_applies() {
        assert_eq!(resolve(OsStr::new("./x"), None).unwrap(), PathBuf::from("./x"));
        // `sh` is in the default PATH on any Unix this runs on.
        assert!(resolve(OsStr::new("sh"), None).unwrap().is_absolute());
    }

    #[test]
    fn wait_for_times_out_naming_the_missing_path() {
        let d = tempfile::tempdir().unwrap();
        let here = d.path().join("here");
        std::fs::write(&here, b"").unwrap();
        let missing = d.path().join(".dso-ready");
        let start = Instant::now();
        assert_eq!(
            wait_for(&[here.clone(), missing.clone()], Duration::from_millis(120)),
            Err(missing)
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_millis(120) && waited < Duration::from_secs(2),
            "{waited:?}"
        );
        assert_eq!(wait_for(&[here], Duration::ZERO), Ok(()));
    }
}
