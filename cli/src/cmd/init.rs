//! `dso init`: creates the local vault and its key (or a passphrase-protected vault).
//! Never overwrites either.

use std::io::IsTerminal;
use std::os::unix::fs::DirBuilderExt;
use std::path::Path;

use anyhow::{Context, bail};
use clap::Args;
use dso_secrets::SecretValue;
use dso_secrets::local::{self, DEFAULT_ARGON2, LocalVault, MIN_PASSPHRASE_LEN, NewKey};

use super::secret::{VaultArgs, prompt_twice, read_capped};

/// `dso init` options.
#[derive(Debug, Args)]
pub struct InitArgs {
    /// Protect the vault with a passphrase (Argon2id) instead of a key file: read from
    /// stdin when it is not a terminal, else asked twice without echo.
    #[arg(long)]
    pub passphrase: bool,
    /// Where to create the vault and key.
    #[command(flatten)]
    pub vault: VaultArgs,
}

/// Runs `dso init`.
pub fn run(args: InitArgs) -> anyhow::Result<()> {
    let (vault_file, key_file) = args.vault.paths()?;
    // Checked before any prompt: typing a passphrase for nothing helps no one.
    for path in std::iter::once(&vault_file).chain((!args.passphrase).then_some(&key_file)) {
        if path.symlink_metadata().is_ok() {
            return Err(local::VaultError::Exists { path: path.clone() }.into());
        }
    }
    make_parent(&vault_file)?;
    let key = if args.passphrase {
        let passphrase = new_passphrase()?;
        let (m, t, p) = DEFAULT_ARGON2;
        NewKey::Passphrase {
            passphrase,
            params: local::new_argon2_params(m, t, p)?,
        }
    } else {
        make_parent(&key_file)?;
        NewKey::KeyFile(key_file.clone())
    };
    LocalVault::create(&vault_file, key)?;
    println!("created the vault {} (mode 0600)", vault_file.display());
    if args.passphrase {
        println!(
            "it opens with its passphrase: dso asks for it, or reads DSO_VAULT_PASSPHRASE_FILE / \
             DSO_VAULT_PASSPHRASE; a lost passphrase cannot be recovered"
        );
    } else {
        println!(
            "created its key {} (mode 0600): back it up apart from the vault; without it the vault \
             cannot be opened",
            key_file.display()
        );
    }
    println!("next: printf '%s' VALUE | dso secret set NAME");
    Ok(())
}

/// Creates the parent directory (0700) when it is missing.
fn make_parent(path: &Path) -> anyhow::Result<()> {
    let Some(dir) = path.parent() else {
        return Ok(());
    };
    if dir.as_os_str().is_empty() || dir.exists() {
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the directory {} (mode 0700)", dir.display()))
}

/// The new vault's passphrase: the environment, else stdin when it is not a terminal
/// (one trailing newline removed), else a no-echo prompt asked twice.
fn new_passphrase() -> anyhow::Result<SecretValue> {
    let passphrase = match local::passphrase_from_env()? {
        Some(p) => p,
        None if !std::io::stdin().is_terminal() => {
            let raw =
                read_capped(&mut std::io::stdin().lock()).context("reading the passphrase from stdin")?;
            local::strip_newline(raw.expose().to_vec())
        }
        None => prompt_twice("new vault passphrase")?,
    };
    if passphrase.len() < MIN_PASSPHRASE_LEN {
        bail!(
            "the passphrase is shorter than {MIN_PASSPHRASE_LEN} bytes; choose a longer one (nothing was created)"
        );
    }
    Ok(passphrase)
}
