//! End-to-end tests of the `dso-init` binary: as a process on this host (values, PID, waits,
//! exit codes) and inside a real container of the test image (`docker`).

mod docker;
mod process;

use std::path::Path;
use std::process::{Command, Output};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_dso-init");

/// `dso-init --env-dir DIR ARGS...` with a clean, known environment.
pub fn init(dir: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.env_clear()
        .env("PATH", "/usr/bin:/bin")
        .arg("--env-dir")
        .arg(dir)
        .args(args);
    c
}

/// Runs `command` and returns its output, panicking only if it could not be spawned.
pub fn run(command: &mut Command) -> Output {
    command.output().expect("spawn dso-init")
}

/// The stderr of `out`, as text.
pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The value of `name` in a NUL-separated `/proc/PID/environ` dump.
pub fn environ_value<'a>(environ: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let prefix = format!("{name}=");
    environ
        .split(|&b| b == 0)
        .find_map(|entry| entry.strip_prefix(prefix.as_bytes()))
}
