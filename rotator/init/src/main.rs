//! `dso-init`: dso's launcher for secrets injected as environment variables.
//!
//! dso bind-mounts this static binary read-only into a container at `/run/dso/init` and makes
//! it the entrypoint, followed by `--` and the container's own entrypoint and command. It
//! reads one variable per file of the env directory (a tmpfs directory dso bind-mounts at
//! `/run/dso/env`), sets them, and execs the program: the application keeps the PID (PID 1 in
//! a container, so `docker stop`'s SIGTERM reaches it) and sees ordinary environment
//! variables, while neither `docker inspect` nor the host disk holds a value.
//!
//! Start reading at [`main`]: [`args`] parses the command line, [`launch::wait_for`] holds the
//! start until the files are there (the remote-engine path uploads them after the container
//! starts), [`envdir::read`] turns the directory into variables, [`launch::exec`] replaces
//! this process. Messages go to stderr prefixed `dso-init:` and never contain a value.

mod args;
mod envdir;
mod launch;

use std::process::ExitCode;

use args::Command;

/// Exit code of dso-init's own failures (env dir, files, wait), as `docker run` uses 125.
const FAILED: u8 = 125;

fn main() -> ExitCode {
    let argv: Vec<_> = std::env::args_os().skip(1).collect();
    let launch = match args::parse(&argv) {
        Ok(Command::Launch(l)) => l,
        Ok(Command::Help) => {
            print!("{}", args::USAGE);
            return ExitCode::SUCCESS;
        }
        Ok(Command::Version) => {
            println!("dso-init {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("dso-init: {e}\n\n{}", args::USAGE);
            return ExitCode::from(2);
        }
    };
    if let Err(missing) = launch::wait_for(&launch.wait_for, launch.wait) {
        eprintln!(
            "dso-init: {} did not appear within {} (--wait); dso did not finish delivering this container's secrets",
            missing.display(),
            args::show_duration(launch.wait)
        );
        return ExitCode::from(FAILED);
    }
    let vars = match envdir::read(&launch.env_dir) {
        Ok(v) => v,
        Err(e) => {
            eprintln!("dso-init: {e}");
            return ExitCode::from(FAILED);
        }
    };
    let e = launch::exec(&launch.program, &launch.args, vars);
    eprintln!("dso-init: {}", e.message());
    ExitCode::from(e.code())
}
