//! The command line, parsed by hand into [`Command`] (std only: the binary stays small and
//! static).
//!
//! Options come first; `--` (or the first word that is not an option) starts the program and
//! its arguments, which are passed on untouched, as raw `OsString`s.

use std::ffi::{OsStr, OsString};
use std::path::PathBuf;
use std::time::Duration;

/// Where the values are read from when `--env-dir` is not given (the directory dso
/// bind-mounts read-only into the container).
pub const DEFAULT_ENV_DIR: &str = "/run/dso/env";
/// How long `--wait-for` waits when `--wait` is not given.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(30);

/// Usage text printed by `--help` and after a usage error.
pub const USAGE: &str = "\
usage: dso-init [--env-dir DIR] [--wait-for PATH]... [--wait DUR] -- PROGRAM [ARGS...]

Sets one environment variable per file of DIR (default /run/dso/env): the file name is the
variable's name ([A-Za-z_][A-Za-z0-9_]*), its bytes are the value; names starting with `.`
are skipped. Then execs PROGRAM (searched in the resulting PATH when it has no `/`), so it
keeps this process's PID and receives its signals.
  --wait-for PATH  before reading, wait until PATH exists (repeatable)
  --wait DUR       the longest wait for all of them: 500ms, 30s, 2m (default 30s)
Exit: PROGRAM's own status once it runs; 125 dso-init failed (env dir, file, wait);
126 PROGRAM is not executable; 127 PROGRAM not found; 2 usage error.
";

/// What the process was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Read the values and exec the program.
    Launch(Launch),
    /// Print [`USAGE`] and exit 0.
    Help,
    /// Print the version and exit 0.
    Version,
}

/// Settings of one launch, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The directory holding one file per variable.
    pub env_dir: PathBuf,
    /// Paths that must exist before the directory is read.
    pub wait_for: Vec<PathBuf>,
    /// The longest wait for all of `wait_for`, together.
    pub wait: Duration,
    /// The program to exec, as given (argv[0] of the new image).
    pub program: OsString,
    /// Its arguments, untouched.
    pub args: Vec<OsString>,
}

/// A usage error, with a message naming the offending argument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses the arguments after the program name.
pub fn parse(args: &[OsString]) -> Result<Command, UsageError> {
    let mut env_dir = PathBuf::from(DEFAULT_ENV_DIR);
    let mut wait_for = Vec::new();
    let mut wait = DEFAULT_WAIT;
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        let Some(text) = arg.to_str() else {
            // A non-UTF-8 word cannot be one of our options: it starts the program.
            break;
        };
        if text == "--" {
            i += 1;
            break;
        }
        if !text.starts_with('-') || text == "-" {
            break;
        }
        let (flag, inline) = match text.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(OsString::from(v))),
            _ => (text, None),
        };
        let mut value = || -> Result<OsString, UsageError> {
            if let Some(v) = inline.clone() {
                return Ok(v);
            }
            i += 1;
            args.get(i)
                .cloned()
                .ok_or_else(|| UsageError(format!("{flag} needs a value")))
        };
        match flag {
            "-h" | "--help" => return Ok(Command::Help),
            "-V" | "--version" => return Ok(Command::Version),
            "--env-dir" => env_dir = non_empty(flag, value()?)?.into(),
            "--wait-for" => wait_for.push(non_empty(flag, value()?)?.into()),
            "--wait" => {
                let v = value()?;
                wait = v.to_str().and_then(parse_duration).ok_or_else(|| {
                    UsageError(format!("--wait: bad duration {v:?} (use e.g. 500ms, 30s, 2m)"))
                })?;
            }
            other => return Err(UsageError(format!("unknown option {other:?}"))),
        }
        i += 1;
    }
    let mut rest = args[i.min(args.len())..].iter().cloned();
    let program = rest
        .next()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| UsageError("missing the program to run (after `--`)".into()))?;
    Ok(Command::Launch(Launch {
        env_dir,
        wait_for,
        wait,
        program,
        args: rest.collect(),
    }))
}

/// Refuses an empty value for `flag`.
fn non_empty(flag: &str, v: OsString) -> Result<OsString, UsageError> {
    if v.is_empty() {
        Err(UsageError(format!("{flag} needs a non-empty value")))
    } else {
        Ok(v)
    }
}

/// Parses a human duration: `500ms`, `30s`, `2m`; a bare `0` is zero.
pub fn parse_duration(s: &str) -> Option<Duration> {
    if s == "0" {
        return Some(Duration::ZERO);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).filter(|&i| i > 0)?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    match unit {
        "ms" => Some(Duration::from_millis(n)),
        "s" => Some(Duration::from_secs(n)),
        "m" => Some(Duration::from_secs(n.checked_mul(60)?)),
        _ => None,
    }
}

/// Shows a duration the way it is written on the command line (`500ms`, `30s`, `2m`).
pub fn show_duration(d: Duration) -> String {
    let ms = d.as_millis();
    if ms.is_multiple_of(60_000) && ms > 0 {
        format!("{}m", ms / 60_000)
    } else if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

/// True when `name` is a valid environment variable name: `[A-Za-z_][A-Za-z0-9_]*`.
pub fn is_env_name(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    matches!(b.first(), Some(c) if c.is_ascii_alphabetic() || *c == b'_')
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn launch(s: &str) -> Launch {
        match parse(&args(s)).unwrap() {
            Command::Launch(l) => l,
            other => panic!("expected a launch, got {other:?}"),
        }
    }

    fn error(s: &str) -> String {
        parse(&args(s)).unwrap_err().0
    }

    #[test]
    fn defaults() {
        let l = launch("-- /app serve");
        assert_eq!(l.env_dir, PathBuf::from("/run/dso/env"));
        assert!(l.wait_for.is_empty());
        assert_eq!(l.wait, Duration::from_secs(30));
        assert_eq!(l.program, "/app");
        assert_eq!(l.args, args("serve"));
    }

    #[test]
    fn options_in_both_forms_and_repeated_wait_for() {
        let l =
            launch("--env-dir /e --wait-for /e/.dso-ready --wait=500ms --wait-for=/x -- prog -a --b -- c");
        assert_eq!(l.env_dir, PathBuf::from("/e"));
        assert_eq!(
            l.wait_for,
            vec![PathBuf::from("/e/.dso-ready"), PathBuf::from("/x")]
        );
        assert_eq!(l.wait, Duration::from_millis(500));
        assert_eq!(l.program, "prog");
        // Everything after the program, including `--` and options, belongs to it.
        assert_eq!(l.args, args("-a --b -- c"));
    }

    #[test]
    fn first_non_option_starts_the_program() {
        let l = launch("--wait 2m sh -c true");
        assert_eq!((l.program.to_str(), l.args.len()), (Some("sh"), 2));
        assert_eq!(l.wait, Duration::from_secs(120));
        // After `--`, even a word that looks like an option is the program.
        assert_eq!(launch("-- --help").program, "--help");
    }

    #[test]
    fn help_and_version() {
        assert_eq!(parse(&args("--help")).unwrap(), Command::Help);
        assert_eq!(parse(&args("-h -- x")).unwrap(), Command::Help);
        assert_eq!(parse(&args("--version")).unwrap(), Command::Version);
    }

    #[test]
    fn usage_errors_name_the_argument() {
        assert!(error("").contains("missing the program"));
        assert!(error("--env-dir /x --").contains("missing the program"));
        assert!(error("--bogus -- x").contains("--bogus"));
        assert!(error("--wait").contains("--wait needs a value"));
        assert!(error("--wait 5x -- x").contains("bad duration"));
        assert!(error("--wait 10 -- x").contains("bad duration"));
        assert!(error("--env-dir= -- x").contains("non-empty"));
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Some(Duration::from_secs(120)));
        assert_eq!(parse_duration("ms"), None);
        assert_eq!(parse_duration("1h"), None);
        assert_eq!(parse_duration(" 1s"), None);
        assert_eq!(show_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(show_duration(Duration::from_secs(30)), "30s");
        assert_eq!(show_duration(Duration::from_secs(120)), "2m");
        assert_eq!(show_duration(Duration::ZERO), "0s");
    }

    #[test]
    fn env_names() {
        for ok in ["A", "_", "DB_PASSWORD", "a1", "_9"] {
            assert!(is_env_name(OsStr::new(ok)), "{ok}");
        }
        for bad in ["", "1A", "A-B", "A.B", "A B", "É", "A=B"] {
            assert!(!is_env_name(OsStr::new(bad)), "{bad}");
        }
    }
}
