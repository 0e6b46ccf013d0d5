//! `dso secret set|get|list|delete`: the local vault, with no agent needed.
//!
//! A value never comes from argv (every user of the host can read it there): it comes
//! from stdin, a no-echo prompt on a terminal, or `--from-file`. After a set or delete, a
//! running agent is told (`POST /v1/secrets/notify`, names only) so it need not wait for
//! its next poll.
//!
//! When the caller cannot read the vault file or its key (`EACCES`: in agent mode both are
//! root's) and an agent answers on the socket, the command goes through the agent's
//! `/v1/vault/secrets` endpoints instead; `--via-agent` forces that. The value then travels
//! as the raw body of the request on the socket, never on the command line.

use std::ffi::OsString;
use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dso_secrets::SecretValue;
use dso_secrets::local::{self, EntryInfo, KeySource, LocalVault, Protection, VaultError};
use dso_secrets::value::MAX_VALUE_LEN;
use zeroize::Zeroizing;

/// Where the vault is in agent mode.
pub const SYSTEM_DIR: &str = "/var/lib/dso";

/// Where the vault and its key are (shared by `dso init` and `dso secret`).
#[derive(Debug, Args)]
pub struct VaultArgs {
    /// The vault file [default: ~/.dso/vault.enc; with --system /var/lib/dso/vault.enc].
    #[arg(long, env = "DSO_VAULT_FILE", value_name = "PATH", global = true)]
    pub vault_file: Option<PathBuf>,
    /// The master key file [default: ~/.dso/master.key; with --system
    /// /var/lib/dso/master.key]. Not used by a passphrase-protected vault.
    #[arg(long, env = "DSO_MASTER_KEY_FILE", value_name = "PATH", global = true)]
    pub key_file: Option<PathBuf>,
    /// Use the agent-mode vault and key under /var/lib/dso (root only) as defaults.
    #[arg(long, global = true)]
    pub system: bool,
}

impl VaultArgs {
    /// The vault file and key file, absolute.
    pub fn paths(&self) -> anyhow::Result<(PathBuf, PathBuf)> {
        let dir = if self.system {
            PathBuf::from(SYSTEM_DIR)
        } else {
            match std::env::var_os("HOME").filter(|h| !h.is_empty()) {
                Some(home) => PathBuf::from(home).join(".dso"),
                None if self.vault_file.is_some() && self.key_file.is_some() => PathBuf::new(),
                None => bail!(
                    "HOME is not set, so ~/.dso cannot be found: pass --vault-file and --key-file \
                     (or DSO_VAULT_FILE and DSO_MASTER_KEY_FILE)"
                ),
            }
        };
        let vault = self.vault_file.clone().unwrap_or_else(|| dir.join("vault.enc"));
        let key = self.key_file.clone().unwrap_or_else(|| dir.join("master.key"));
        let abs = |p: &Path| std::path::absolute(p).with_context(|| format!("resolving {}", p.display()));
        Ok((abs(&vault)?, abs(&key)?))
    }
}

/// `dso secret ...`.
#[derive(Debug, Args)]
pub struct SecretArgs {
    /// Which vault.
    #[command(flatten)]
    pub vault: VaultArgs,
    /// Go through the running agent's control socket (`/v1/vault/secrets`) even when the
    /// vault is readable here. Without it, that happens only when the vault file or its key
    /// cannot be read by this user (permission denied) and an agent answers.
    #[arg(long, global = true)]
    pub via_agent: bool,
    /// Through the agent: which `type: local` provider of its config, when it has several.
    #[arg(long, value_name = "NAME", global = true)]
    pub provider: Option<String>,
    /// What to do.
    #[command(subcommand)]
    pub command: SecretCommand,
}

/// The `dso secret` subcommands.
#[derive(Debug, Subcommand)]
pub enum SecretCommand {
    /// Store a value under NAME (from stdin, a no-echo prompt, or --from-file).
    #[command(
        long_about = "Store a value under NAME in the local vault, as a new version. The value \
is read from stdin when stdin is not a terminal (every byte is kept, a trailing newline \
too), from a no-echo prompt asked twice on a terminal, or from --from-file FILE. It is never \
taken from the command line, where every user of the host could read it. Values are \
arbitrary bytes up to 1 MiB.\n\n\
When an agent answers on the control socket, it is told which name changed (never the value).",
        after_long_help = "Examples:\n  \
printf '%s' 's3cr3t' | dso secret set myapp/db_password\n  \
dso secret set myapp/tls_key --from-file key.pem\n  \
dso secret set myapp/api_token          # prompts twice, no echo"
    )]
    Set {
        /// Entry name, a relative path like myapp/db_password.
        #[arg(value_parser = parse_name)]
        name: String,
        /// Read the value from this file (its bytes as they are).
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Refused: a value on the command line is visible to every user.
        #[arg(hide = true, value_name = "VALUE", num_args = 0.., allow_hyphen_values = true)]
        value_in_argv: Vec<OsString>,
    },
    /// Print the value of NAME (its bytes, nothing else) on stdout.
    #[command(after_long_help = "Examples:\n  dso secret get myapp/db_password\n  \
PGPASSWORD=\"$(dso secret get myapp/db_password)\" psql ...")]
    Get {
        /// Entry name.
        #[arg(value_parser = parse_name)]
        name: String,
    },
    /// List names, versions and update times (never values).
    #[command(
        after_long_help = "Examples:\n  dso secret list\n  dso secret list --json | jq -r '.secrets[].name'"
    )]
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete NAME.
    #[command(after_long_help = "Example:\n  dso secret delete myapp/old_token")]
    Delete {
        /// Entry name.
        #[arg(value_parser = parse_name)]
        name: String,
    },
}

fn parse_name(s: &str) -> Result<String, String> {
    local::check_name(s).map_err(|e| e.to_string())?;
    Ok(s.to_owned())
}

/// Runs `dso secret ...`.
pub fn run(args: SecretArgs, socket: PathBuf) -> anyhow::Result<()> {
    let (vault_file, key_file) = args.vault.paths()?;
    let denied = if args.via_agent {
        None
    } else {
        unreadable(&vault_file, &key_file)
    };
    if args.via_agent || denied.is_some() {
        return via_agent::run(args.command, &socket, args.provider.as_deref(), denied.as_deref());
    }
    match args.command {
        SecretCommand::Set {
            name,
            from_file,
            value_in_argv,
        } => {
            if !value_in_argv.is_empty() {
                refuse_value_in_argv();
            }
            let vault = open(&vault_file, &key_file)?;
            let value = read_value(&name, from_file.as_deref())?;
            let info = vault.set(&name, &value)?;
            println!("set {name} version {} in {}", info.version, vault_file.display());
            notify::agent(&socket, &vault_file, &name);
        }
        SecretCommand::Get { name } => {
            let vault = open(&vault_file, &key_file)?;
            let Some((_, value)) = vault.get(&name)? else {
                bail!(
                    "no secret {name:?} in {} (see `dso secret list`)",
                    vault_file.display()
                );
            };
            let mut out = std::io::stdout().lock();
            out.write_all(value.expose())
                .and_then(|()| out.flush())
                .context("writing the value to stdout")?;
        }
        SecretCommand::List { json } => {
            let vault = open(&vault_file, &key_file)?;
            print!("{}", render_list(&vault_file, &vault.list()?, json));
        }
        SecretCommand::Delete { name } => {
            let vault = open(&vault_file, &key_file)?;
            let Some(info) = vault.delete(&name)? else {
                bail!(
                    "no secret {name:?} in {} (see `dso secret list`)",
                    vault_file.display()
                );
            };
            println!(
                "deleted {name} (was version {}) from {}",
                info.version,
                vault_file.display()
            );
            notify::agent(&socket, &vault_file, &name);
        }
    }
    Ok(())
}

/// `Some(why)` when this user may not read the vault file or its key (permission denied):
/// the case where the agent, which runs as root, is asked instead.
fn unreadable(vault_file: &Path, key_file: &Path) -> Option<String> {
    let denied = |p: &Path| match std::fs::File::open(p) {
        Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => {
            Some(format!("{} is not readable by this user ({e})", p.display()))
        }
        _ => None,
    };
    if let Some(why) = denied(vault_file) {
        return Some(why);
    }
    // The key file matters only for a key-file vault (it may not exist otherwise).
    match LocalVault::read_protection(vault_file) {
        Ok(Protection::KeyFile) => denied(key_file),
        _ => None,
    }
}

/// `dso secret ...` through the agent's `/v1/vault/secrets`.
mod via_agent {
    use std::io::Write;
    use std::path::{Path, PathBuf};
    use std::time::{Duration, UNIX_EPOCH};

    use anyhow::{Context, bail};
    use dso_secrets::local::EntryInfo;
    use hyper::body::Bytes;
    use hyper::{Method, StatusCode};
    use serde::Deserialize;

    use super::SecretCommand;
    use crate::client::{ApiFailure, Unreachable, path_segment};

    /// One entry as the agent answers it.
    #[derive(Debug, Deserialize)]
    struct Entry {
        name: String,
        version: u64,
        updated_ns: u64,
    }

    impl Entry {
        fn info(&self) -> EntryInfo {
            EntryInfo {
                name: self.name.clone(),
                version: self.version,
                updated: UNIX_EPOCH + Duration::from_nanos(self.updated_ns),
            }
        }
    }

    #[derive(Debug, Deserialize)]
    struct List {
        vault_file: PathBuf,
        secrets: Vec<Entry>,
    }

    #[derive(Debug, Deserialize)]
    struct Changed {
        vault_file: PathBuf,
        #[serde(alias = "deleted")]
        secret: Entry,
    }

    /// Runs one subcommand through the agent at `socket`. `denied` says why the vault
    /// could not be read here, when that is why the agent is asked.
    pub fn run(
        command: SecretCommand,
        socket: &Path,
        provider: Option<&str>,
        denied: Option<&str>,
    ) -> anyhow::Result<()> {
        let rt = crate::cmd::runtime()?;
        let path = |name: Option<&str>| {
            let mut p = "/v1/vault/secrets".to_owned();
            if let Some(n) = name {
                p.push('/');
                p.push_str(&path_segment(n));
            }
            if let Some(pr) = provider {
                p.push_str("?provider=");
                p.push_str(&path_segment(pr));
            }
            p
        };
        let call = |method: Method, path: String, body: Bytes| {
            rt.block_on(request(socket, method, &path, body))
                .map_err(|e| explain(e, socket, denied))
        };
        match command {
            SecretCommand::Set {
                name,
                from_file,
                value_in_argv,
            } => {
                if !value_in_argv.is_empty() {
                    super::refuse_value_in_argv();
                }
                let value = super::read_value(&name, from_file.as_deref())?;
                let answer = call(
                    Method::PUT,
                    path(Some(&name)),
                    Bytes::copy_from_slice(value.expose()),
                )?;
                drop(value);
                let c: Changed = serde_json::from_slice(&answer).context("decoding the agent's answer")?;
                println!(
                    "set {name} version {} in {} (through the agent)",
                    c.secret.version,
                    c.vault_file.display()
                );
            }
            SecretCommand::Get { name } => {
                let value = call(Method::GET, path(Some(&name)), Bytes::new())?;
                let mut out = std::io::stdout().lock();
                out.write_all(&value)
                    .and_then(|()| out.flush())
                    .context("writing the value to stdout")?;
            }
            SecretCommand::List { json } => {
                let answer = call(Method::GET, path(None), Bytes::new())?;
                let l: List = serde_json::from_slice(&answer).context("decoding the agent's answer")?;
                let entries: Vec<EntryInfo> = l.secrets.iter().map(Entry::info).collect();
                print!("{}", super::render_list(&l.vault_file, &entries, json));
            }
            SecretCommand::Delete { name } => {
                let answer = call(Method::DELETE, path(Some(&name)), Bytes::new())?;
                let c: Changed = serde_json::from_slice(&answer).context("decoding the agent's answer")?;
                println!(
                    "deleted {name} (was version {}) from {} (through the agent)",
                    c.secret.version,
                    c.vault_file.display()
                );
            }
        }
        Ok(())
    }

    /// Adds why the agent was asked to an unreachable agent's error.
    fn explain(e: anyhow::Error, socket: &Path, denied: Option<&str>) -> anyhow::Error {
        match (denied, e.downcast_ref::<Unreachable>()) {
            (Some(why), Some(_)) => anyhow::anyhow!(
                "{why}, and no dso agent answers at {} to do it instead: run this as root (sudo), \
                 or start the agent (`dso agent --config FILE`) and use its socket (--socket PATH)",
                socket.display()
            ),
            _ => e,
        }
    }

    /// One request with a raw body through the shared client; an agent without the
    /// endpoint (an older dso) is named as such.
    async fn request(socket: &Path, method: Method, path: &str, body: Bytes) -> anyhow::Result<Bytes> {
        let client = crate::client::Client::new(socket);
        match client
            .send_raw(method, path, "application/octet-stream", body)
            .await
        {
            Err(e)
                if e.downcast_ref::<ApiFailure>().is_some_and(|f| {
                    f.status == StatusCode::NOT_FOUND && f.message.starts_with("no endpoint")
                }) =>
            {
                bail!(
                    "the agent at {} does not serve /v1/vault/secrets (an older dso?): {e}",
                    socket.display()
                )
            }
            other => other,
        }
    }
}

/// Exits with status 2: the value was typed where everyone can read it. It is not echoed.
fn refuse_value_in_argv() -> ! {
    clap::Error::raw(
        clap::error::ErrorKind::UnknownArgument,
        "dso never takes a secret value from the command line, where every user of this host can \
         read it (ps, /proc): pass it on stdin (printf '%s' \"$VALUE\" | dso secret set NAME), type \
         it at the prompt (run `dso secret set NAME` on a terminal), or use --from-file FILE\n",
    )
    .exit()
}

/// Opens the vault, asking for its passphrase when it has one.
pub fn open(vault_file: &Path, key_file: &Path) -> anyhow::Result<LocalVault> {
    let key = match LocalVault::read_protection(vault_file)? {
        Protection::KeyFile => KeySource::KeyFile(key_file.to_owned()),
        Protection::Passphrase(_) => KeySource::Passphrase(passphrase_for(vault_file)?),
    };
    Ok(LocalVault::open(vault_file, key)?)
}

/// The passphrase of an existing vault: from the environment, else from a prompt on the
/// terminal (stdin may carry the value, so it is never read from stdin).
fn passphrase_for(vault_file: &Path) -> anyhow::Result<SecretValue> {
    if let Some(p) = local::passphrase_from_env()? {
        return Ok(p);
    }
    let prompt = format!("passphrase for {}: ", vault_file.display());
    match rpassword::prompt_password(prompt) {
        Ok(p) => Ok(SecretValue::new(p.into_bytes())),
        Err(e) => Err(VaultError::Passphrase {
            reason: format!(
                "{} is protected by a passphrase and there is no terminal to ask it on ({e}): set \
                 DSO_VAULT_PASSPHRASE_FILE to a file holding it, or DSO_VAULT_PASSPHRASE",
                vault_file.display()
            ),
        }
        .into()),
    }
}

/// Asks twice without echo on the terminal; the two answers must match.
pub fn prompt_twice(what: &str) -> anyhow::Result<SecretValue> {
    let first =
        Zeroizing::new(rpassword::prompt_password(format!("{what}: ")).context("reading from the terminal")?);
    let second = Zeroizing::new(
        rpassword::prompt_password(format!("{what} (again): ")).context("reading from the terminal")?,
    );
    if *first != *second {
        bail!("the two entries differ; nothing was changed");
    }
    Ok(SecretValue::from_slice(first.as_bytes()))
}

/// Reads at most `MAX_VALUE_LEN + 1` bytes (enough to tell a value that is too large).
pub fn read_capped(reader: &mut dyn Read) -> std::io::Result<SecretValue> {
    let mut buf = Vec::with_capacity(MAX_VALUE_LEN + 1);
    let read = reader.take(MAX_VALUE_LEN as u64 + 1).read_to_end(&mut buf);
    let value = SecretValue::new(buf);
    read.map(|_| value)
}

fn read_value(name: &str, from_file: Option<&Path>) -> anyhow::Result<SecretValue> {
    let value = match from_file {
        Some(path) => {
            let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            read_capped(&mut f).with_context(|| format!("reading {}", path.display()))?
        }
        None if !std::io::stdin().is_terminal() => {
            read_capped(&mut std::io::stdin().lock()).context("reading the value from stdin")?
        }
        None => prompt_twice(&format!("value for {name}"))?,
    };
    if value.len() > MAX_VALUE_LEN {
        bail!(
            "secret {name:?}: the value is more than {MAX_VALUE_LEN} bytes (1 MiB), the limit; nothing was changed"
        );
    }
    local::check_value(name, &value)?;
    if value.expose().ends_with(b"\n") {
        eprintln!("note: the value ends with a newline, which is kept (use printf '%s' to leave it out)");
    }
    Ok(value)
}

fn render_list(vault_file: &Path, entries: &[EntryInfo], json: bool) -> String {
    if json {
        let secrets: Vec<serde_json::Value> = entries
            .iter()
            .map(|e| {
                serde_json::json!({
                    "name": e.name,
                    "version": e.version,
                    "updated": rfc3339(e.updated_ns()),
                })
            })
            .collect();
        let doc = serde_json::json!({ "vault_file": vault_file, "secrets": secrets });
        return format!("{doc:#}\n");
    }
    if entries.is_empty() {
        return format!(
            "no secrets in {} (add one with `dso secret set NAME`)\n",
            vault_file.display()
        );
    }
    let width = entries.iter().map(|e| e.name.len()).max().unwrap_or(0).max(4);
    let mut out = format!("{:<width$}  {:>7}  UPDATED\n", "NAME", "VERSION");
    for e in entries {
        out.push_str(&format!(
            "{:<width$}  {:>7}  {}\n",
            e.name,
            e.version,
            rfc3339(e.updated_ns())
        ));
    }
    out
}

/// `2026-12-01T16:31:16Z` (UTC, whole seconds) from nanoseconds since the epoch.
pub fn rfc3339(ns: u64) -> String {
    let secs = (UNIX_EPOCH + Duration::from_nanos(ns))
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Howard Hinnant's days-to-civil algorithm.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Telling a running agent that a name changed.
mod notify {
    use std::path::Path;
    use std::time::Duration;

    use hyper::StatusCode;
    use serde::de::IgnoredAny;

    use crate::client::{ApiFailure, Client, Unreachable};

    /// How long the agent may take to answer before the command goes on without it.
    const PATIENCE: Duration = Duration::from_secs(2);

    /// Sends `POST /v1/secrets/notify` (names only). No agent, or an agent that does not
    /// know the endpoint, is fine and silent; any other failure is one warning line.
    pub fn agent(socket: &Path, vault_file: &Path, name: &str) {
        let body = serde_json::json!({
            "provider_kind": "local",
            "vault_file": vault_file,
            "name": name,
        });
        let client = Client::new(socket);
        let outcome = match super::super::runtime() {
            Ok(rt) => rt.block_on(async {
                tokio::time::timeout(PATIENCE, client.post::<IgnoredAny>("/v1/secrets/notify", &body)).await
            }),
            Err(e) => Ok(Err(e)),
        };
        let problem = match outcome {
            Ok(Ok(_)) => return,
            Ok(Err(e)) => match classify(&e) {
                Some(p) => p,
                None => return,
            },
            Err(_) => format!("no answer within {PATIENCE:?}"),
        };
        eprintln!(
            "warning: could not tell the dso agent at {} about the change ({}); it will see it at its next poll",
            socket.display(),
            problem.replace('\n', " ")
        );
    }

    /// `None` when the failure is one to stay silent about.
    fn classify(e: &anyhow::Error) -> Option<String> {
        for cause in e.chain() {
            if let Some(u) = cause.downcast_ref::<Unreachable>() {
                return match u.source.kind() {
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => None,
                    _ => Some(u.source.to_string()),
                };
            }
            if let Some(f) = cause.downcast_ref::<ApiFailure>() {
                return (f.status != StatusCode::NOT_FOUND).then(|| format!("{}: {}", f.status, f.message));
            }
            // A 2xx answer whose body is not JSON still means the agent took the notice.
            if cause.is::<serde_json::Error>() {
                return None;
            }
        }
        Some(format!("{e:#}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400 * 1_000_000_000), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_876_276_500_000_000), "2026-11-28T14:31:16Z");
    }

    #[test]
    fn list_never_shows_values_and_json_is_valid() {
        let entries = vec![EntryInfo {
            name: "myapp/db".into(),
            version: 3,
            updated: UNIX_EPOCH + Duration::from_secs(60),
        }];
        let table = render_list(Path::new("/v.enc"), &entries, false);
        assert!(
            table.contains("myapp/db") && table.contains("1970-01-01T00:01:00Z"),
            "{table}"
        );
        let json: serde_json::Value =
            serde_json::from_str(&render_list(Path::new("/v.enc"), &entries, true)).unwrap();
        assert_eq!(json["secrets"][0]["version"], 3);
        assert_eq!(json["vault_file"], "/v.enc");
        assert!(render_list(Path::new("/v.enc"), &[], false).contains("no secrets"));
    }

    #[test]
    fn read_capped_tells_too_large() {
        let big = vec![1u8; MAX_VALUE_LEN + 10];
        assert_eq!(read_capped(&mut &big[..]).unwrap().len(), MAX_VALUE_LEN + 1);
        assert_eq!(read_capped(&mut &b"ab\n"[..]).unwrap().expose(), b"ab\n");
    }
}
