//! Which Compose runs, and running it: v2 (`docker compose`, or a v2 `docker-compose`
//! binary) or v1 (`docker-compose` 1.x), detected at run time unless `--compose` says.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, ExitStatus, Stdio};

use anyhow::{Context, bail};

/// Compose's major version: what `-f -` accepts differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Compose v1 (1.29): `-f -` only as the single file.
    V1,
    /// Compose v2: `-f -` combined with other files, `!reset` in overrides.
    V2,
}

/// A Compose program: the command and the arguments that come before Compose's own.
#[derive(Debug, Clone)]
pub struct Compose {
    /// v1 or v2.
    pub flavor: Flavor,
    /// The program (`docker`, `docker-compose`, or a path).
    program: PathBuf,
    /// `compose` when the program is `docker`.
    prefix: Vec<String>,
}

const INSTALL: &str = "install Compose v2 (the docker-compose-plugin package, or the static \
binary copied to ~/.docker/cli-plugins/docker-compose) or Compose v1 (`apt-get install \
docker-compose`), or name one with --compose PATH";

impl Compose {
    /// Finds Compose: `choice` is `v1`, `v2`, a path, or `None` to detect (v2 first).
    pub fn detect(choice: Option<&str>) -> anyhow::Result<Compose> {
        let docker = || Compose {
            flavor: Flavor::V2,
            program: PathBuf::from("docker"),
            prefix: vec!["compose".to_owned()],
        };
        let standalone = |p: PathBuf| Compose {
            flavor: Flavor::V1,
            program: p,
            prefix: Vec::new(),
        };
        match choice {
            Some("v2") => docker()
                .probe()
                .with_context(|| format!("--compose v2: `docker compose version` failed; {INSTALL}")),
            Some("v1") => standalone("docker-compose".into())
                .probe()
                .with_context(|| format!("--compose v1: `docker-compose version` failed; {INSTALL}")),
            Some(path) => standalone(path.into())
                .probe()
                .with_context(|| format!("--compose {path}: `{path} version` failed")),
            None => docker()
                .probe()
                .or_else(|_| standalone("docker-compose".into()).probe())
                .map_err(|_| anyhow::anyhow!("no Docker Compose found (neither `docker compose` nor `docker-compose` answers `version`); {INSTALL}")),
        }
    }

    /// Runs `version` and reads the major version from it.
    fn probe(mut self) -> anyhow::Result<Compose> {
        let out = self
            .command()
            .arg("version")
            .stdin(Stdio::null())
            .output()
            .with_context(|| format!("running {}", self.program.display()))?;
        if !out.status.success() {
            bail!(
                "{} version exited with {}: {}",
                self.program.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let text = String::from_utf8_lossy(&out.stdout).to_lowercase();
        self.flavor = if text.contains("version 1.") {
            Flavor::V1
        } else if text.contains("version v2") || text.contains("version 2.") {
            Flavor::V2
        } else {
            bail!("cannot tell the Compose version from {:?}", text.trim());
        };
        Ok(self)
    }

    /// The program with its prefix, ready for Compose's arguments.
    pub fn command(&self) -> Command {
        let mut c = Command::new(&self.program);
        c.args(&self.prefix);
        c
    }

    /// How to show this Compose in messages (`docker compose`, `docker-compose`).
    pub fn display(&self) -> String {
        std::iter::once(self.program.display().to_string())
            .chain(self.prefix.iter().cloned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs Compose with `args`, capturing stdout (stderr goes to the user); stdout on
    /// success, an error naming the command and Compose's message otherwise.
    pub fn output(&self, args: &[String]) -> anyhow::Result<Vec<u8>> {
        let out = self
            .command()
            .args(args)
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running {}", self.display()))?;
        if !out.status.success() {
            bail!(
                "{} {} failed: {}",
                self.display(),
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(out.stdout)
    }

    /// Runs Compose with `args`, its output going to the user's terminal, `stdin` (the
    /// override or the merged model: names and paths, never a value) written to its
    /// standard input when given.
    pub fn run(&self, args: &[String], stdin: Option<&[u8]>) -> anyhow::Result<ExitStatus> {
        let mut cmd = self.command();
        cmd.args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::inherit()
        });
        let mut child = cmd
            .spawn()
            .with_context(|| format!("running {}", self.display()))?;
        if let Some(bytes) = stdin {
            let mut pipe = child.stdin.take().context("Compose's stdin")?;
            pipe.write_all(bytes)
                .context("writing the override to Compose's stdin")?;
        }
        child
            .wait()
            .with_context(|| format!("waiting for {}", self.display()))
    }
}
