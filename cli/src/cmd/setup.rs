//! `dso setup --mode local|agent`: creates what a dso installation needs, item by item, and
//! says what it did with each (created, updated, unchanged, kept, declined, skipped, conflict).
//!
//! Agent mode (root only): group `dso`, `/etc/dso` 0775 root:dso, `/etc/dso/dso.yaml` 0664
//! root:dso, `/var/lib/dso` 0700, `/run/dso` 0755, the `docker-dso` plugin link in
//! `/usr/local/lib/docker/cli-plugins`, the launcher `/usr/lib/dso/dso-init`, the unit
//! `/etc/systemd/system/dso-agent.service`. Local mode (no root): `~/.dso` 0700, the plugin
//! link in `~/.docker/cli-plugins`, `./dso.yaml`.
//!
//! Idempotent: a second run changes nothing. A `dso.yaml` that exists is never rewritten;
//! when it differs from the template, the template goes to `dso.yaml.new` beside it. The
//! hidden `--root DIR` (`DSO_SETUP_ROOT`) puts every system path under DIR, group file
//! included (`groupadd --prefix DIR`), so tests run it without touching `/etc`.

use std::fs::{self, OpenOptions};
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, ValueEnum};
use serde::Serialize;

/// The unit template: `@DSO@` is the binary, `@TIMEOUT_STOP@` the stop timeout.
pub const UNIT_TEMPLATE: &str = include_str!("setup/dso-agent.service");
/// The agent-mode starter config: `@GROUP@` the socket's group, `@API@` an `api:` block
/// when the group is not `dso`.
const AGENT_CONFIG: &str = include_str!("setup/dso.yaml");
/// The local-mode starter config.
const LOCAL_CONFIG: &str = include_str!("setup/dso-local.yaml");

/// Where the unit is installed (under `--root`).
pub const UNIT_PATH: &str = "etc/systemd/system/dso-agent.service";
/// Where the launcher is installed: the second place `agent.delivery.launcher` looks.
pub const LAUNCHER_PATH: &str = "usr/lib/dso/dso-init";
/// The system-wide Docker CLI plugin directory.
pub const SYSTEM_PLUGIN_DIR: &str = "usr/local/lib/docker/cli-plugins";

/// The group the agent gives its control socket when the config names none
/// (`agent.api.socket_group`).
pub const DEFAULT_GROUP: &str = "dso";

/// Time added to `agent.shutdown_timeout` for `TimeoutStopSec`: rotations finishing within
/// the same deadline, the journal, the exit.
const STOP_MARGIN: Duration = Duration::from_secs(30);

/// `dso setup` options.
#[derive(Debug, Args)]
pub struct SetupArgs {
    /// `agent`: the system agent under systemd (root); `local`: one user's files, no agent.
    #[arg(long, value_enum)]
    pub mode: Mode,
    /// Never ask; without it, each privileged change is asked for when stdin is a terminal.
    #[arg(long)]
    pub non_interactive: bool,
    /// Print the items as one JSON object.
    #[arg(long)]
    pub json: bool,
    /// Agent mode: the group given /etc/dso and the control socket (created when missing;
    /// a name other than `dso` is written to the config as agent.api.socket_group).
    #[arg(long, default_value = DEFAULT_GROUP, value_name = "NAME")]
    pub group: String,
    /// Agent mode: the dso-init launcher to install [default: dso-init next to this binary].
    #[arg(long, value_name = "FILE")]
    pub launcher: Option<PathBuf>,
    /// Local mode: where to write the config [default: ./dso.yaml].
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Put every system path under DIR (tests): /etc/dso becomes DIR/etc/dso, the group is
    /// created in DIR/etc/group.
    #[arg(long, env = "DSO_SETUP_ROOT", value_name = "DIR", hide = true)]
    pub root: Option<PathBuf>,
}

/// What is being set up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// One user, no agent, no root.
    Local,
    /// The system agent under systemd.
    Agent,
}

/// What happened to one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// It did not exist and was created.
    Created,
    /// It existed and was changed (mode, owner, link target, content).
    Updated,
    /// It was already as it should be.
    Unchanged,
    /// An edited config left as it is (the template is beside it).
    Kept,
    /// The operator answered no.
    Declined,
    /// Nothing to install from (the launcher was not found); the detail says how to fix it.
    Skipped,
    /// Something else is in the way; nothing was changed; the detail says what to do.
    Conflict,
}

/// One line of the report.
#[derive(Debug, Serialize)]
pub struct Item {
    /// What it is (`group`, `config`, `unit`...).
    pub item: &'static str,
    /// Its path, or the group's name.
    pub path: String,
    /// What was done.
    pub action: Action,
    /// Mode, owner, what changed, what to do next.
    pub detail: String,
}

impl Item {
    /// The item as one line of text: `created   config: /etc/dso/dso.yaml  ...`.
    pub fn line(&self) -> String {
        let action = format!("{:?}", self.action).to_lowercase();
        format!("{action:<9} {}: {}  {}", self.item, self.path, self.detail)
    }
}

/// Owner and mode an item must have; `owner: None` leaves the owner alone (local mode).
#[derive(Debug, Clone, Copy)]
struct Want {
    mode: u32,
    owner: Option<(u32, u32)>,
}

impl Want {
    fn describe(&self, group: &str) -> String {
        match self.owner {
            Some((0, 0)) => format!("{:04o} root:root", self.mode),
            Some((_, _)) => format!("{:04o} root:{group}", self.mode),
            None => format!("{:04o}", self.mode),
        }
    }
}

/// Asks before privileged changes when it may.
struct Prompt {
    ask: bool,
}

impl Prompt {
    fn confirm(&self, what: &str) -> anyhow::Result<bool> {
        if !self.ask {
            return Ok(true);
        }
        eprint!("{what}? [Y/n] ");
        std::io::stderr().flush().ok();
        let mut line = String::new();
        std::io::stdin()
            .lock()
            .read_line(&mut line)
            .context("reading the answer")?;
        Ok(matches!(line.trim(), "" | "y" | "Y" | "yes" | "Yes"))
    }
}

/// The run's settings, resolved.
struct Setup {
    root: PathBuf,
    group: String,
    exe: PathBuf,
    prompt: Prompt,
    items: Vec<Item>,
    /// Print each item as it is done (text output); JSON prints them all at the end.
    stream: bool,
}

/// Runs `dso setup`.
pub fn run(args: SetupArgs) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding this binary (for the plugin link and the unit)")?;
    let mut s = Setup {
        root: args.root.clone().unwrap_or_else(|| PathBuf::from("/")),
        group: args.group.clone(),
        exe,
        prompt: Prompt {
            ask: !args.non_interactive && std::io::stdin().is_terminal() && args.mode == Mode::Agent,
        },
        items: Vec::new(),
        stream: !args.json,
    };
    let result = match args.mode {
        Mode::Agent => s.agent(&args),
        Mode::Local => s.local(&args),
    };
    if let Err(e) = result {
        if args.json {
            let out = serde_json::json!({ "mode": args.mode, "items": s.items, "error": format!("{e:#}") });
            println!("{}", serde_json::to_string_pretty(&out)?);
        }
        if s.items.is_empty() {
            return Err(e);
        }
        return Err(e.context("dso setup stopped; the items above were done"));
    }
    let conflicts = s.items.iter().filter(|i| i.action == Action::Conflict).count();
    if args.json {
        let changed = s
            .items
            .iter()
            .filter(|i| matches!(i.action, Action::Created | Action::Updated))
            .count();
        let out = serde_json::json!({ "mode": args.mode, "changed": changed, "items": s.items });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print!("{}", s.summary(args.mode));
    }
    if conflicts > 0 {
        bail!("{conflicts} item(s) could not be set up (see `conflict` above); nothing else was left undone");
    }
    Ok(())
}

impl Setup {
    /// `ROOT/rel`.
    fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn push(&mut self, item: &'static str, path: impl AsRef<Path>, action: Action, detail: String) {
        let item = Item {
            item,
            path: path.as_ref().display().to_string(),
            action,
            detail,
        };
        if self.stream {
            println!("{}", item.line());
        }
        self.items.push(item);
    }

    fn agent(&mut self, args: &SetupArgs) -> anyhow::Result<()> {
        if effective_uid() != Some(0) {
            bail!(
                "dso setup --mode agent changes system files (/etc/dso, /var/lib/dso, group {}, a \
                 systemd unit) and must run as root: sudo dso setup --mode agent (or --mode local \
                 for one user's setup without an agent)",
                self.group
            );
        }
        let gid = self.group_item()?;
        let Some(gid) = gid else {
            // Declined: everything group-owned would be wrong, so stop here.
            return Ok(());
        };
        let root_only = |mode| Want {
            mode,
            owner: Some((0, 0)),
        };
        let grouped = |mode| Want {
            mode,
            owner: Some((0, gid)),
        };
        self.dir_item("config directory", &self.path("etc/dso"), grouped(0o775))?;
        let config = self.agent_config();
        let config_path = self.path("etc/dso/dso.yaml");
        self.config_item(&config_path, &config, grouped(0o664))?;
        self.dir_item("state directory", &self.path("var/lib/dso"), root_only(0o700))?;
        self.dir_item("socket directory", &self.path("run/dso"), root_only(0o755))?;
        let plugin_dir = self.path(SYSTEM_PLUGIN_DIR);
        let link = plugin_dir.join("docker-dso");
        self.parents(&link, root_only(0o755))?;
        self.link_item(&link)?;
        self.launcher_item(args.launcher.as_deref())?;
        let (unit, note) = self.unit_text(&config_path);
        let unit_path = self.path(UNIT_PATH);
        self.parents(&unit_path, root_only(0o755))?;
        let changed = self.file_item("systemd unit", &unit_path, unit.as_bytes(), root_only(0o644))?;
        if let Some(note) = note {
            self.push("stop timeout", &config_path, Action::Skipped, note);
        }
        self.reload_item(changed)?;
        Ok(())
    }

    fn local(&mut self, args: &SetupArgs) -> anyhow::Result<()> {
        let home = std::env::var_os("HOME")
            .filter(|h| !h.is_empty())
            .map(PathBuf::from)
            .context("HOME is not set; local mode keeps its files in ~/.dso")?;
        let own = |mode| Want { mode, owner: None };
        self.dir_item("vault directory", &home.join(".dso"), own(0o700))?;
        let docker = home.join(".docker");
        if !docker.exists() {
            self.dir_item("docker config directory", &docker, own(0o700))?;
        }
        self.dir_item("plugin directory", &docker.join("cli-plugins"), own(0o755))?;
        self.link_item(&docker.join("cli-plugins/docker-dso"))?;
        let config = args.config.clone().unwrap_or_else(|| PathBuf::from("dso.yaml"));
        self.config_item(&config, LOCAL_CONFIG, own(0o644))?;
        Ok(())
    }

    /// The group, created when missing; its gid, or `None` when the operator declined.
    fn group_item(&mut self) -> anyhow::Result<Option<u32>> {
        let file = self.path("etc/group");
        if let Some(gid) = group_id(&file, &self.group)? {
            let detail = format!("gid {gid}");
            self.push("group", self.group.clone(), Action::Unchanged, detail);
            return Ok(Some(gid));
        }
        if !self
            .prompt
            .confirm(&format!("create the system group {}", self.group))?
        {
            let detail = "not created; setup stops here (everything else is owned by this group)".into();
            self.push("group", self.group.clone(), Action::Declined, detail);
            return Ok(None);
        }
        let mut cmd = Command::new(groupadd());
        cmd.arg("--system");
        if self.root != Path::new("/") {
            cmd.arg("--prefix").arg(&self.root);
        }
        cmd.arg(&self.group);
        let out = cmd.output().with_context(|| {
            format!(
                "running groupadd --system {} (is the passwd package installed?)",
                self.group
            )
        })?;
        if !out.status.success() {
            bail!(
                "groupadd --system {} failed: {}",
                self.group,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        let gid = group_id(&file, &self.group)?.with_context(|| {
            format!(
                "groupadd succeeded but {} has no group {}",
                file.display(),
                self.group
            )
        })?;
        let detail = format!(
            "system group, gid {gid}; add users with: usermod -aG {} USER",
            self.group
        );
        self.push("group", self.group.clone(), Action::Created, detail);
        Ok(Some(gid))
    }

    /// A directory with this mode and owner: created, fixed, or left alone.
    fn dir_item(&mut self, item: &'static str, path: &Path, want: Want) -> anyhow::Result<()> {
        let described = want.describe(&self.group);
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self
                    .prompt
                    .confirm(&format!("create {} ({described})", path.display()))?
                {
                    self.push(item, path, Action::Declined, format!("not created ({described})"));
                    return Ok(());
                }
                if let Some(parent) = path.parent() {
                    fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
                }
                fs::DirBuilder::new()
                    .mode(want.mode)
                    .create(path)
                    .with_context(|| format!("creating the directory {}", path.display()))?;
                apply(path, want)?;
                self.push(item, path, Action::Created, described);
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
            Ok(meta) if !meta.is_dir() => {
                let detail = format!(
                    "exists and is not a directory; move it away and run dso setup again ({described})"
                );
                self.push(item, path, Action::Conflict, detail);
            }
            Ok(meta) => self.fix(item, path, &meta, want)?,
        }
        Ok(())
    }

    /// Mode and owner of something that exists: fixed when they differ.
    fn fix(
        &mut self,
        item: &'static str,
        path: &Path,
        meta: &fs::Metadata,
        want: Want,
    ) -> anyhow::Result<()> {
        let described = want.describe(&self.group);
        let mode = meta.mode() & 0o7777;
        let owner_ok = want.owner.is_none_or(|(u, g)| meta.uid() == u && meta.gid() == g);
        if mode == want.mode && owner_ok {
            self.push(
                item,
                path,
                Action::Unchanged,
                format!("exists, unchanged ({described})"),
            );
            return Ok(());
        }
        let was = format!("{mode:04o} {}:{}", meta.uid(), meta.gid());
        if !self
            .prompt
            .confirm(&format!("change {} from {was} to {described}", path.display()))?
        {
            self.push(
                item,
                path,
                Action::Declined,
                format!("left at {was}; should be {described}"),
            );
            return Ok(());
        }
        apply(path, want)?;
        self.push(item, path, Action::Updated, format!("{was} -> {described}"));
        Ok(())
    }

    /// Missing parent directories of `path`, created quietly (they are not items).
    fn parents(&self, path: &Path, want: Want) -> anyhow::Result<()> {
        let Some(dir) = path.parent() else { return Ok(()) };
        if dir.exists() {
            return Ok(());
        }
        fs::DirBuilder::new()
            .recursive(true)
            .mode(want.mode)
            .create(dir)
            .with_context(|| format!("creating {}", dir.display()))
    }

    /// A config file: written when missing, never rewritten; when it differs from the
    /// template, the template is written as `FILE.new`.
    fn config_item(&mut self, path: &Path, template: &str, want: Want) -> anyhow::Result<()> {
        let described = want.describe(&self.group);
        match fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self.prompt.confirm(&format!(
                    "write the starter config {} ({described})",
                    path.display()
                ))? {
                    self.push("config", path, Action::Declined, "not written".into());
                    return Ok(());
                }
                write_atomic(path, template.as_bytes(), want)?;
                self.push(
                    "config",
                    path,
                    Action::Created,
                    format!(
                        "starter config ({described}); edit it, then `dso config validate {}`",
                        path.display()
                    ),
                );
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
            Ok(meta) if !meta.is_file() => {
                let detail = "exists and is not a regular file; move it away and run dso setup again".into();
                self.push("config", path, Action::Conflict, detail);
            }
            Ok(meta) => {
                let current = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
                if current == template.as_bytes() {
                    return self.fix("config", path, &meta, want);
                }
                let new = with_suffix(path, ".new");
                let fresh = fs::read(&new).ok().as_deref() != Some(template.as_bytes());
                if fresh {
                    write_atomic(&new, template.as_bytes(), want)?;
                }
                let detail = format!(
                    "edited: kept as it is; the current template is {} ({})",
                    new.display(),
                    if fresh { "written now" } else { "already there" }
                );
                self.push("config", path, Action::Kept, detail);
                // Mode and owner still matter (group members edit it).
                if meta.mode() & 0o7777 != want.mode
                    || want
                        .owner
                        .is_some_and(|(u, g)| meta.uid() != u || meta.gid() != g)
                {
                    self.fix("config", path, &meta, want)?;
                }
            }
        }
        Ok(())
    }

    /// A file dso owns (the unit, the launcher): written when missing or different.
    /// Returns whether it changed.
    fn file_item(
        &mut self,
        item: &'static str,
        path: &Path,
        content: &[u8],
        want: Want,
    ) -> anyhow::Result<bool> {
        let described = want.describe(&self.group);
        let current = match fs::symlink_metadata(path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(e).with_context(|| format!("checking {}", path.display())),
            Ok(meta) if !meta.is_file() => {
                let detail = "exists and is not a regular file; move it away and run dso setup again".into();
                self.push(item, path, Action::Conflict, detail);
                return Ok(false);
            }
            Ok(meta) => Some(meta),
        };
        if let Some(meta) = &current
            && fs::read(path).with_context(|| format!("reading {}", path.display()))? == content
        {
            self.fix(item, path, meta, want)?;
            return Ok(self.items.last().is_some_and(|i| i.action == Action::Updated));
        }
        let verb = if current.is_some() { "replace" } else { "write" };
        if !self
            .prompt
            .confirm(&format!("{verb} {} ({described})", path.display()))?
        {
            self.push(item, path, Action::Declined, format!("not {verb}d"));
            return Ok(false);
        }
        write_atomic(path, content, want)?;
        let (action, detail) = match current {
            None => (Action::Created, described),
            Some(_) => (Action::Updated, format!("content replaced ({described})")),
        };
        self.push(item, path, action, detail);
        Ok(true)
    }

    /// The `docker-dso` plugin link to this binary.
    fn link_item(&mut self, link: &Path) -> anyhow::Result<()> {
        let target = self.exe.clone();
        let detail = format!("-> {}", target.display());
        match fs::symlink_metadata(link) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let now =
                    fs::read_link(link).with_context(|| format!("reading the link {}", link.display()))?;
                if now == target {
                    self.push(
                        "docker plugin",
                        link,
                        Action::Unchanged,
                        format!("exists, unchanged {detail}"),
                    );
                    return Ok(());
                }
                if !self
                    .prompt
                    .confirm(&format!("point {} at {}", link.display(), target.display()))?
                {
                    self.push(
                        "docker plugin",
                        link,
                        Action::Declined,
                        format!("still -> {}", now.display()),
                    );
                    return Ok(());
                }
                let tmp = with_suffix(link, ".dso-setup-tmp");
                let _ = fs::remove_file(&tmp);
                std::os::unix::fs::symlink(&target, &tmp)
                    .with_context(|| format!("creating {}", tmp.display()))?;
                fs::rename(&tmp, link).with_context(|| format!("replacing {}", link.display()))?;
                self.push(
                    "docker plugin",
                    link,
                    Action::Updated,
                    format!("was -> {}, now {detail}", now.display()),
                );
            }
            Ok(_) => {
                let detail =
                    "exists and is not a symlink (an older copy?); remove it and run dso setup again".into();
                self.push("docker plugin", link, Action::Conflict, detail);
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !self
                    .prompt
                    .confirm(&format!("link {} to {}", link.display(), target.display()))?
                {
                    self.push("docker plugin", link, Action::Declined, "not linked".into());
                    return Ok(());
                }
                std::os::unix::fs::symlink(&target, link)
                    .with_context(|| format!("creating the link {}", link.display()))?;
                self.push(
                    "docker plugin",
                    link,
                    Action::Created,
                    format!("{detail}; try `docker dso version`"),
                );
            }
            Err(e) => return Err(e).with_context(|| format!("checking {}", link.display())),
        }
        Ok(())
    }

    /// The launcher, copied to where `agent.delivery.launcher` looks by default.
    fn launcher_item(&mut self, given: Option<&Path>) -> anyhow::Result<()> {
        let dest = self.path(LAUNCHER_PATH);
        let source = match given {
            Some(p) => p.to_path_buf(),
            None => self.exe.with_file_name("dso-init"),
        };
        if !source.is_file() {
            if given.is_some() {
                bail!("--launcher {}: no such file", source.display());
            }
            if dest.is_file() {
                let detail = format!(
                    "exists, unchanged (no dso-init next to {} to compare with)",
                    self.exe.display()
                );
                self.push("launcher", &dest, Action::Unchanged, detail);
                return Ok(());
            }
            let detail = format!(
                "no dso-init next to {}: build it (cargo build --release -p dso-init) and run dso setup \
                 --launcher PATH; until then secrets injected as env cannot be delivered",
                self.exe.display()
            );
            self.push("launcher", &dest, Action::Skipped, detail);
            return Ok(());
        }
        let bytes =
            fs::read(&source).with_context(|| format!("reading the launcher {}", source.display()))?;
        let root_only = Want {
            mode: 0o755,
            owner: Some((0, 0)),
        };
        self.parents(&dest, root_only)?;
        self.file_item("launcher", &dest, &bytes, root_only)?;
        Ok(())
    }

    /// After the unit changed: `systemctl daemon-reload` when systemd runs this host.
    fn reload_item(&mut self, unit_changed: bool) -> anyhow::Result<()> {
        let running = crate::cmd::system::systemd_running(&self.root);
        let (action, detail) = match (unit_changed, running, self.root == Path::new("/")) {
            (false, _, _) => (Action::Unchanged, "the unit did not change; nothing to reload".to_owned()),
            (true, true, true) => {
                let out = Command::new("systemctl")
                    .arg("daemon-reload")
                    .output()
                    .context("running systemctl daemon-reload")?;
                if !out.status.success() {
                    bail!("systemctl daemon-reload failed: {}", String::from_utf8_lossy(&out.stderr).trim());
                }
                (Action::Updated, "systemctl daemon-reload done; start with `dso system enable`".to_owned())
            }
            (true, _, _) => (
                Action::Unchanged,
                "systemd is not running on this host (no /run/systemd/system): nothing reloaded; the unit is used once it runs".to_owned(),
            ),
        };
        self.push("systemd", "daemon-reload", action, detail);
        Ok(())
    }

    fn agent_config(&self) -> String {
        let api = if self.group == DEFAULT_GROUP {
            String::new()
        } else {
            format!("  api:\n    socket_group: {}\n", self.group)
        };
        AGENT_CONFIG
            .replace("@GROUP@", &self.group)
            .replace("@API@", &api)
    }

    /// The unit for this binary, its stop timeout from the config's shutdown timeout; with
    /// a note when the config could not be read for it.
    fn unit_text(&self, config: &Path) -> (String, Option<String>) {
        let (shutdown, note) = match crate::config::load(config) {
            Ok(c) => (c.agent.shutdown_timeout, None),
            Err(e) if config.exists() => (
                None,
                Some(format!(
                    "TimeoutStopSec uses the default shutdown timeout: {} does not load ({}); fix it and run dso setup again",
                    config.display(),
                    e.source
                )),
            ),
            Err(_) => (None, None),
        };
        let shutdown = shutdown.unwrap_or(crate::config::DEFAULT_SHUTDOWN_TIMEOUT);
        (render_unit(&self.exe, shutdown), note)
    }

    fn summary(&self, mode: Mode) -> String {
        let mut out = String::new();
        let count = |a: Action| self.items.iter().filter(|i| i.action == a).count();
        out += &format!(
            "setup ({}): {} created, {} updated, {} unchanged, {} kept, {} declined, {} skipped, {} conflict\n",
            if mode == Mode::Agent { "agent" } else { "local" },
            count(Action::Created),
            count(Action::Updated),
            count(Action::Unchanged),
            count(Action::Kept),
            count(Action::Declined),
            count(Action::Skipped),
            count(Action::Conflict),
        );
        out += match mode {
            Mode::Agent => {
                "next: edit /etc/dso/dso.yaml, `sudo dso init --system` for the local vault, `sudo dso system enable`; let users in with `usermod -aG dso USER`\n"
            }
            Mode::Local => "next: `dso init` (the vault in ~/.dso), `dso secret set NAME`\n",
        };
        out
    }
}

/// The unit text for binary `exe` and a drain deadline `shutdown`.
pub fn render_unit(exe: &Path, shutdown: Duration) -> String {
    let stop = (shutdown + STOP_MARGIN).as_secs_f64().ceil() as u64;
    UNIT_TEMPLATE
        .replace("@DSO@", &unit_path_arg(exe))
        .replace("@TIMEOUT_STOP@", &format!("{stop}s"))
}

/// A path as one `ExecStart=` word: `%` starts a systemd specifier and `\\` an escape, so
/// both are doubled; a path with blanks or quotes is double-quoted.
fn unit_path_arg(path: &Path) -> String {
    let text = path
        .display()
        .to_string()
        .replace('\\', "\\\\")
        .replace('%', "%%");
    if text.contains(|c: char| c.is_whitespace() || c == '"' || c == '\'') {
        format!("\"{}\"", text.replace('"', "\\\""))
    } else {
        text
    }
}

/// Sets mode and owner (symlinks are refused before this is called).
fn apply(path: &Path, want: Want) -> anyhow::Result<()> {
    if let Some((uid, gid)) = want.owner {
        std::os::unix::fs::lchown(path, Some(uid), Some(gid))
            .with_context(|| format!("chown {uid}:{gid} {}", path.display()))?;
    }
    fs::set_permissions(path, fs::Permissions::from_mode(want.mode))
        .with_context(|| format!("chmod {:o} {}", want.mode, path.display()))
}

/// Writes `content` to a temp file beside `path` (mode and owner set before the rename),
/// then renames it over `path`: a reader never sees half a file.
fn write_atomic(path: &Path, content: &[u8], want: Want) -> anyhow::Result<()> {
    let tmp = with_suffix(path, ".dso-setup-tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(content)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    apply(&tmp, want)?;
    fs::rename(&tmp, path).with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

/// The gid of `name` in the group file `file` (`None`: no such group, or no file).
fn group_id(file: &Path, name: &str) -> anyhow::Result<Option<u32>> {
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    Ok(text.lines().find_map(|l| {
        let mut f = l.split(':');
        (f.next()? == name).then_some(())?;
        f.nth(1)?.parse().ok()
    }))
}

/// This process's effective uid, from `/proc/self/status` (`Uid:` real, effective, ...).
fn effective_uid() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Uid:"))?;
    line["Uid:".len()..].split_whitespace().nth(1)?.parse().ok()
}

/// `groupadd`, also where a non-login PATH lacks `/usr/sbin`.
fn groupadd() -> PathBuf {
    ["/usr/sbin/groupadd", "/sbin/groupadd"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("groupadd"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_unit_names_the_binary_and_a_stop_timeout_past_the_drain() {
        let unit = render_unit(Path::new("/usr/local/bin/dso"), Duration::from_secs(45));
        assert!(unit.contains("\nExecStart=/usr/local/bin/dso agent --config /etc/dso/dso.yaml\n"));
        assert!(unit.contains("\nTimeoutStopSec=75s\n"), "{unit}");
        assert!(unit.contains("\nType=notify\n"));
        assert!(!unit.contains('@'), "every placeholder filled");
        assert!(
            unit.contains("\nExecReload=/usr/local/bin/dso agent --config /etc/dso/dso.yaml --upgrade\n")
        );
        assert!(
            unit.contains("\nNotifyAccess=all\n"),
            "the new process after an upgrade sends MAINPID="
        );
    }

    #[test]
    fn odd_binary_paths_are_escaped_for_systemd() {
        assert_eq!(unit_path_arg(Path::new("/opt/dso/bin/dso")), "/opt/dso/bin/dso");
        assert_eq!(unit_path_arg(Path::new("/opt/100%/dso")), "/opt/100%%/dso");
        assert_eq!(
            unit_path_arg(Path::new("/opt/my tools/dso")),
            "\"/opt/my tools/dso\""
        );
    }

    #[test]
    fn group_lookup_reads_the_given_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("group");
        fs::write(&f, "root:x:0:\ndso:x:995:alice\ndsox:x:7:\n").unwrap();
        assert_eq!(group_id(&f, "dso").unwrap(), Some(995));
        assert_eq!(group_id(&f, "ds").unwrap(), None);
        assert_eq!(group_id(&dir.path().join("none"), "dso").unwrap(), None);
    }

    #[test]
    fn the_starter_configs_are_valid() {
        let lookup = |k: &str| (k == "HOME").then(|| "/home/u".to_owned());
        let setup = |group: &str| Setup {
            root: PathBuf::from("/"),
            group: group.into(),
            exe: PathBuf::from("/usr/bin/dso"),
            prompt: Prompt { ask: false },
            items: Vec::new(),
            stream: false,
        };
        let cfg = crate::config::parse(&setup("dso").agent_config(), lookup).unwrap();
        assert_eq!(cfg.agent.socket.as_deref(), Some(Path::new("/run/dso/dso.sock")));
        assert_eq!(cfg.agent.socket_group, None);
        let cfg = crate::config::parse(&setup("ops").agent_config(), lookup).unwrap();
        assert_eq!(cfg.agent.socket_group.as_deref(), Some("ops"));
        crate::config::parse(LOCAL_CONFIG, lookup).unwrap();
    }
}
