//! `dso system enable|disable|status|logs`: the agent's systemd unit through `systemctl`
//! and `journalctl`, with a clear error where systemd does not run this host.

use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};
use clap::Subcommand;

/// The unit `dso setup --mode agent` installs.
pub const UNIT: &str = "dso-agent";

/// `dso system ...`.
#[derive(Debug, Subcommand)]
pub enum SystemCommand {
    /// Start the agent now and at every boot (`systemctl enable --now dso-agent`).
    Enable,
    /// Stop the agent and keep it from starting at boot (`systemctl disable --now dso-agent`).
    Disable,
    /// The unit's state and its last log lines (`systemctl status dso-agent`).
    Status,
    /// The agent's log from journald (`journalctl -u dso-agent`).
    Logs {
        /// Keep printing new lines as they come.
        #[arg(short, long)]
        follow: bool,
        /// Only lines since this time: journalctl's syntax (`1h ago`, `today`,
        /// `2026-12-01 10:00`), or a dso duration like `1h` or `30m` meaning that long ago.
        #[arg(long, value_name = "TIME")]
        since: Option<String>,
        /// Only the last N lines.
        #[arg(short = 'n', long, value_name = "N")]
        lines: Option<u32>,
    },
}

/// Whether systemd is the init system of the host under `root` (the test that
/// `sd_booted(3)` makes: the directory `/run/systemd/system` exists).
pub fn systemd_running(root: &Path) -> bool {
    root.join("run/systemd/system").is_dir()
}

/// The program and arguments a subcommand runs.
pub fn command_line(cmd: &SystemCommand) -> (&'static str, Vec<String>) {
    let unit = UNIT.to_owned();
    match cmd {
        SystemCommand::Enable => ("systemctl", vec!["enable".into(), "--now".into(), unit]),
        SystemCommand::Disable => ("systemctl", vec!["disable".into(), "--now".into(), unit]),
        SystemCommand::Status => ("systemctl", vec!["status".into(), "--no-pager".into(), unit]),
        SystemCommand::Logs { follow, since, lines } => {
            let mut args = vec!["-u".to_owned(), unit, "--no-pager".into()];
            if *follow {
                args.push("--follow".into());
            }
            if let Some(s) = since {
                args.push(format!("--since={}", since_arg(s)));
            }
            if let Some(n) = lines {
                args.push(format!("--lines={n}"));
            }
            ("journalctl", args)
        }
    }
}

/// `1h` (a dso duration, the seed README's form) is journalctl's `-1h`... which it reads
/// as "1 hour ago" only with a sign; everything else passes through unchanged.
fn since_arg(s: &str) -> String {
    match crate::duration::parse(s) {
        Ok(d) => format!("-{}s", d.as_secs()),
        Err(_) => s.to_owned(),
    }
}

/// Runs `dso system ...`; exits with the wrapped command's status.
pub fn run(cmd: SystemCommand) -> anyhow::Result<()> {
    if !systemd_running(Path::new("/")) {
        bail!(
            "systemd is not running on this host (no /run/systemd/system; PID 1 is {}), so there is \
             no dso-agent service to {}; run the agent in the foreground instead \
             (`dso agent --config /etc/dso/dso.yaml`, e.g. under your own supervisor) or use a \
             host booted with systemd",
            pid1_name(),
            verb(&cmd)
        );
    }
    let (program, args) = command_line(&cmd);
    let status = Command::new(program)
        .args(&args)
        .status()
        .with_context(|| format!("running {program} {}", args.join(" ")))?;
    if !status.success() {
        bail!(
            "`{program} {}` exited with {status}{}",
            args.join(" "),
            if matches!(cmd, SystemCommand::Enable | SystemCommand::Disable) {
                " (it needs root: sudo dso system ...)"
            } else {
                ""
            }
        );
    }
    Ok(())
}

fn verb(cmd: &SystemCommand) -> &'static str {
    match cmd {
        SystemCommand::Enable => "enable",
        SystemCommand::Disable => "disable",
        SystemCommand::Status => "show",
        SystemCommand::Logs { .. } => "read the logs of",
    }
}

/// The name of PID 1, for the error (`/proc/1/comm`).
fn pid1_name() -> String {
    std::fs::read_to_string("/proc/1/comm")
        .map(|s| format!("{:?}", s.trim()))
        .unwrap_or_else(|_| "unknown".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(cmd: SystemCommand) -> String {
        let (p, a) = command_line(&cmd);
        format!("{p} {}", a.join(" "))
    }

    #[test]
    fn each_subcommand_runs_the_systemd_tool() {
        assert_eq!(line(SystemCommand::Enable), "systemctl enable --now dso-agent");
        assert_eq!(line(SystemCommand::Disable), "systemctl disable --now dso-agent");
        assert_eq!(
            line(SystemCommand::Status),
            "systemctl status --no-pager dso-agent"
        );
        let logs = |follow, since: Option<&str>, lines| SystemCommand::Logs {
            follow,
            since: since.map(str::to_owned),
            lines,
        };
        assert_eq!(
            line(logs(false, None, None)),
            "journalctl -u dso-agent --no-pager"
        );
        assert_eq!(
            line(logs(true, Some("1h"), Some(50))),
            "journalctl -u dso-agent --no-pager --follow --since=-3600s --lines=50"
        );
        assert_eq!(
            line(logs(false, Some("2026-12-01 10:00"), None)),
            "journalctl -u dso-agent --no-pager --since=2026-12-01 10:00"
        );
    }

    #[test]
    fn systemd_is_detected_by_its_runtime_directory() {
        let dir = tempfile::tempdir().unwrap();
        assert!(!systemd_running(dir.path()));
        std::fs::create_dir_all(dir.path().join("run/systemd/system")).unwrap();
        assert!(systemd_running(dir.path()));
    }
}
