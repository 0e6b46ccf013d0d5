//! The project the way Compose loads it: the arguments that select it (`-f`, `-p`,
//! `--project-directory`, `--env-file`, `--profile`), `COMPOSE_FILE` and
//! `COMPOSE_PROJECT_NAME` (from the environment or `.env`), the default file names, and
//! the model Compose itself computes (`config`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use serde_json::Value;

use super::runner::{Compose, Flavor};

/// The command line of `dso up` / `dso down`, split: what selects the project, dso's own
/// options, and what passes through to Compose's `up` / `down`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpArgs {
    /// `-f` / `--file`, in order.
    pub files: Vec<String>,
    /// `-p` / `--project-name`.
    pub project_name: Option<String>,
    /// `--project-directory`.
    pub project_directory: Option<String>,
    /// `--env-file`, in order.
    pub env_files: Vec<String>,
    /// `--profile`, in order.
    pub profiles: Vec<String>,
    /// `--compose v1|v2|PATH`.
    pub compose: Option<String>,
    /// `--local`: no agent even when one answers.
    pub local: bool,
    /// `--launcher PATH` (local mode): the static `dso-init`.
    pub launcher: Option<PathBuf>,
    /// `--secrets-root DIR` (local mode): the tmpfs directory of the secret files.
    pub secrets_root: Option<PathBuf>,
    /// `--socket PATH` written after `up` (dso's global option, taken here too).
    pub socket: Option<PathBuf>,
    /// Everything else, for Compose's subcommand (`-d`, `--build`, service names...).
    pub rest: Vec<String>,
}

impl UpArgs {
    /// Splits raw arguments. Options may come in any order and in `--opt=value` form.
    pub fn parse(raw: &[String]) -> anyhow::Result<UpArgs> {
        let mut a = UpArgs::default();
        let mut it = raw.iter();
        while let Some(arg) = it.next() {
            if arg == "--" {
                a.rest.extend(it.by_ref().cloned());
                break;
            }
            let (flag, inline) = match arg.split_once('=') {
                Some((f, v)) if f.starts_with("--") => (f, Some(v.to_owned())),
                _ => (arg.as_str(), None),
            };
            let mut value = |name: &str| -> anyhow::Result<String> {
                match &inline {
                    Some(v) => Ok(v.clone()),
                    None => it
                        .next()
                        .cloned()
                        .with_context(|| format!("{name} needs a value")),
                }
            };
            match flag {
                "-f" | "--file" => a.files.push(value(flag)?),
                "-p" | "--project-name" => a.project_name = Some(value(flag)?),
                "--project-directory" => a.project_directory = Some(value(flag)?),
                "--env-file" => a.env_files.push(value(flag)?),
                "--profile" => a.profiles.push(value(flag)?),
                "--compose" => a.compose = Some(value(flag)?),
                "--launcher" => a.launcher = Some(value(flag)?.into()),
                "--secrets-root" => a.secrets_root = Some(value(flag)?.into()),
                "--socket" => a.socket = Some(value(flag)?.into()),
                "--local" if inline.is_none() => a.local = true,
                _ => {
                    if let Some(f) = arg
                        .strip_prefix("-f")
                        .filter(|f| !f.is_empty() && !arg.starts_with("--"))
                    {
                        a.files.push(f.to_owned());
                    } else {
                        a.rest.push(arg.clone());
                    }
                }
            }
        }
        if let Some(p) = &a.project_name {
            check_project_name(p)?;
        }
        Ok(a)
    }
}

/// Compose's rule for `-p`: lowercase letters, digits, `-` and `_`, starting with a letter
/// or digit.
pub fn check_project_name(p: &str) -> anyhow::Result<()> {
    let ok = p
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if !ok {
        bail!(
            "project name {p:?} is not valid: use lowercase letters, digits, `-` and `_`, \
             starting with a letter or digit"
        );
    }
    Ok(())
}

/// The loaded project.
#[derive(Debug, Clone)]
pub struct Project {
    /// The project name Compose uses.
    pub name: String,
    /// The project directory (absolute).
    pub directory: PathBuf,
    /// The files Compose v2 reads (explicit; v1 gets the merged model instead).
    pub files: Vec<String>,
    /// The model as `config` printed it (strings `$`-escaped).
    pub model: Value,
    /// The arguments before Compose's subcommand that select the project the same way
    /// again (`--env-file`, `--profile`), besides files, name and directory.
    pub selectors: Vec<String>,
}

const DEFAULT_FILES: [&str; 4] = [
    "compose.yaml",
    "compose.yml",
    "docker-compose.yml",
    "docker-compose.yaml",
];
const OVERRIDE_FILES: [&str; 4] = [
    "compose.override.yml",
    "compose.override.yaml",
    "docker-compose.override.yml",
    "docker-compose.override.yaml",
];

impl Project {
    /// Loads the project with `compose config`.
    pub fn load(compose: &Compose, args: &UpArgs) -> anyhow::Result<Project> {
        let cwd = std::env::current_dir().context("reading the current directory")?;
        let workdir = match &args.project_directory {
            Some(d) => {
                std::path::absolute(cwd.join(d)).with_context(|| format!("--project-directory {d}"))?
            }
            None => cwd.clone(),
        };
        let dotenv = read_dotenv(args, &workdir);
        let from_env = |k: &str| {
            std::env::var(k)
                .ok()
                .filter(|v| !v.is_empty())
                .or_else(|| dotenv.get(k).cloned().filter(|v| !v.is_empty()))
        };
        let files: Vec<String> = if !args.files.is_empty() {
            args.files.clone()
        } else if let Some(list) = from_env("COMPOSE_FILE") {
            let sep = from_env("COMPOSE_PATH_SEPARATOR").unwrap_or_else(|| ":".to_owned());
            list.split(sep.as_str())
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect()
        } else {
            discover(&workdir)?
        };
        if files.iter().any(|f| f == "-") {
            bail!("-f - is where dso passes its override: give your Compose files by name");
        }
        let directory = match &args.project_directory {
            Some(_) => workdir.clone(),
            None => {
                let first = cwd.join(&files[0]);
                std::path::absolute(first.parent().unwrap_or(&cwd)).unwrap_or(cwd.clone())
            }
        };
        let mut selectors = Vec::new();
        for e in &args.env_files {
            selectors.extend(["--env-file".to_owned(), e.clone()]);
        }
        for p in &args.profiles {
            selectors.extend(["--profile".to_owned(), p.clone()]);
        }
        let mut config_args: Vec<String> = files.iter().flat_map(|f| ["-f".to_owned(), f.clone()]).collect();
        if let Some(p) = &args.project_name {
            config_args.extend(["-p".to_owned(), p.clone()]);
        }
        if let Some(d) = &args.project_directory {
            config_args.extend(["--project-directory".to_owned(), d.clone()]);
        }
        config_args.extend(selectors.iter().cloned());
        config_args.push("config".to_owned());
        let model: Value = match compose.flavor {
            Flavor::V2 => {
                config_args.extend(["--format".to_owned(), "json".to_owned()]);
                let out = compose.output(&config_args)?;
                serde_json::from_slice(&out).context("reading `docker compose config --format json`")?
            }
            Flavor::V1 => {
                let out = compose.output(&config_args)?;
                serde_yaml::from_slice(&out).context("reading `docker-compose config`")?
            }
        };
        let name = match (&args.project_name, model.get("name").and_then(Value::as_str)) {
            (Some(p), _) => p.clone(),
            (None, Some(n)) => n.to_owned(),
            (None, None) => match from_env("COMPOSE_PROJECT_NAME") {
                Some(n) => n,
                None => normalize_name(&directory),
            },
        };
        check_project_name(&name).context("the project name Compose uses; pass a valid one with -p")?;
        Ok(Project {
            name,
            directory,
            files,
            model,
            selectors,
        })
    }

    /// The services of the model, by name.
    pub fn services(&self) -> Vec<(&str, &Value)> {
        self.model
            .get("services")
            .and_then(Value::as_object)
            .map(|m| m.iter().map(|(k, v)| (k.as_str(), v)).collect())
            .unwrap_or_default()
    }

    /// The arguments before Compose's subcommand for a run that reads `stdin_file` (the
    /// override for v2, the merged model for v1) from `-f -`, or only the user's files.
    pub fn global_args(&self, flavor: Flavor, with_stdin: bool) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        match flavor {
            Flavor::V2 => {
                for f in &self.files {
                    a.extend(["-f".to_owned(), f.clone()]);
                }
                if with_stdin {
                    a.extend(["-f".to_owned(), "-".to_owned()]);
                }
            }
            Flavor::V1 => {
                if with_stdin {
                    a.extend(["-f".to_owned(), "-".to_owned()]);
                } else {
                    for f in &self.files {
                        a.extend(["-f".to_owned(), f.clone()]);
                    }
                }
            }
        }
        a.extend(["-p".to_owned(), self.name.clone()]);
        a.extend([
            "--project-directory".to_owned(),
            self.directory.display().to_string(),
        ]);
        a.extend(self.selectors.iter().cloned());
        a
    }
}

/// Compose's default file lookup: the first of the default names in `dir` or the closest
/// parent holding one, plus the override file beside it.
fn discover(dir: &Path) -> anyhow::Result<Vec<String>> {
    for d in dir.ancestors() {
        if let Some(main) = DEFAULT_FILES.iter().map(|f| d.join(f)).find(|p| p.is_file()) {
            let mut out = vec![main.display().to_string()];
            if let Some(o) = OVERRIDE_FILES.iter().map(|f| d.join(f)).find(|p| p.is_file()) {
                out.push(o.display().to_string());
            }
            return Ok(out);
        }
    }
    bail!(
        "no Compose file in {} or its parents ({}); pass one with -f FILE",
        dir.display(),
        DEFAULT_FILES.join(", ")
    )
}

/// `COMPOSE_*` of the env file (`--env-file`, else `.env` in the project directory):
/// `KEY=VALUE` lines, comments and quotes as Compose reads them.
fn read_dotenv(args: &UpArgs, workdir: &Path) -> BTreeMap<String, String> {
    let path = match args.env_files.last() {
        Some(f) => PathBuf::from(f),
        None => workdir.join(".env"),
    };
    let Ok(text) = std::fs::read_to_string(path) else {
        return BTreeMap::new();
    };
    text.lines()
        .filter_map(|l| {
            let l = l.trim();
            let l = l.strip_prefix("export ").unwrap_or(l);
            let (k, v) = l.split_once('=')?;
            if k.starts_with('#') || !k.starts_with("COMPOSE_") {
                return None;
            }
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|v| v.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|v| v.strip_suffix('\'')))
                .unwrap_or(v);
            Some((k.trim().to_owned(), v.to_owned()))
        })
        .collect()
}

/// Compose v1's project name from a directory: its base name lowercased, keeping letters,
/// digits, `-` and `_`.
fn normalize_name(dir: &Path) -> String {
    dir.file_name()
        .map(|n| n.to_string_lossy().to_lowercase())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-' || *c == '_')
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn project_options_are_taken_from_anywhere_the_rest_passes_through() {
        let a = UpArgs::parse(&s(&[
            "-d",
            "-f",
            "a.yml",
            "--file=b.yml",
            "-fc.yml",
            "--build",
            "-p",
            "shop",
            "--compose",
            "v1",
            "--local",
            "web",
        ]))
        .unwrap();
        assert_eq!(a.files, ["a.yml", "b.yml", "c.yml"]);
        assert_eq!(a.project_name.as_deref(), Some("shop"));
        assert_eq!(a.compose.as_deref(), Some("v1"));
        assert!(a.local);
        assert_eq!(a.rest, ["-d", "--build", "web"]);
        assert!(
            UpArgs::parse(&s(&["-p", "Shop"]))
                .unwrap_err()
                .to_string()
                .contains("lowercase")
        );
        assert!(UpArgs::parse(&s(&["-f"])).is_err());
    }

    #[test]
    fn default_files_and_names() {
        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("My App").join("sub");
        std::fs::create_dir_all(&sub).unwrap();
        let top = dir.path().join("My App");
        std::fs::write(top.join("docker-compose.yml"), "services: {}\n").unwrap();
        std::fs::write(top.join("compose.override.yaml"), "services: {}\n").unwrap();
        let found = discover(&sub).unwrap();
        assert!(found[0].ends_with("My App/docker-compose.yml"), "{found:?}");
        assert!(found[1].ends_with("compose.override.yaml"), "{found:?}");
        assert_eq!(normalize_name(&top), "myapp");
    }
}
