//! [`LocalProvider`]: the [`Provider`] over a [`LocalVault`].
//!
//! The change token of an entry is `VERSION@UPDATED_NS` (its version number and update
//! time in nanoseconds): the version alone would repeat if the vault were re-created.
//! `version` reads metadata only, and re-reads the file only when `fstat` shows it was
//! replaced; `fetch` decrypts the one entry asked for.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;

use super::error::VaultError;
use super::format::Protection;
use super::store::{EntryInfo, KeySource, LocalVault, Snapshot};
use crate::error::{Error, Result};
use crate::provider::{CheckReport, Provider, Version};
use crate::reference::Reference;
use crate::spec::{ProviderKind, ProviderSettings, ProviderSpec};
use crate::value::SecretValue;

/// The local vault as a provider. Cheap to share; calls run on tokio's blocking pool.
pub struct LocalProvider {
    name: String,
    vault: Arc<LocalVault>,
    /// The last verified read and the file identity it came from.
    cache: Arc<Mutex<Option<Arc<Snapshot>>>>,
}

/// The change token of an entry.
pub fn token(info: &EntryInfo) -> Version {
    Version::new(format!("{}@{}", info.version, info.updated_ns()))
}

/// Connects a `local` provider instance: opens the vault with its key file, or with the
/// passphrase from `DSO_VAULT_PASSPHRASE` / `DSO_VAULT_PASSPHRASE_FILE` when
/// `master_key_file` is not set. A missing file or a wrong key fails here.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    let ProviderSettings::Local(settings) = &spec.settings else {
        return Err(Error::Config {
            provider: spec.name.clone(),
            detail: "not a local provider".into(),
        });
    };
    let name = spec.name.clone();
    let vault_file = settings.vault_file.clone();
    let key_file = settings.master_key_file.clone();
    let vault = tokio::task::spawn_blocking(move || open(vault_file, key_file))
        .await
        .map_err(|e| Error::Config {
            provider: name.clone(),
            detail: format!("opening the vault: {e}"),
        })?
        .map_err(|e| Error::Config {
            provider: name.clone(),
            detail: e.to_string(),
        })?;
    Ok(Arc::new(LocalProvider::new(&spec.name, vault)))
}

fn open(vault_file: PathBuf, key_file: Option<PathBuf>) -> Result<LocalVault, VaultError> {
    let key = match key_file {
        Some(k) => KeySource::KeyFile(k),
        None => match super::passphrase_from_env()? {
            Some(p) => KeySource::Passphrase(p),
            None => {
                return Err(VaultError::Passphrase {
                    reason: format!(
                        "the local provider for {} has no master_key_file, so it needs the vault's passphrase: \
                         set DSO_VAULT_PASSPHRASE_FILE to a file holding it (or DSO_VAULT_PASSPHRASE) in the \
                         agent's environment",
                        vault_file.display()
                    ),
                });
            }
        },
    };
    LocalVault::open(&vault_file, key)
}

impl LocalProvider {
    /// A provider named `name` over an open vault.
    pub fn new(name: &str, vault: LocalVault) -> LocalProvider {
        LocalProvider {
            name: name.to_string(),
            vault: Arc::new(vault),
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// The current verified read (cached while the file is unchanged).
    async fn snapshot(&self) -> Result<Arc<Snapshot>> {
        let vault = Arc::clone(&self.vault);
        let cache = Arc::clone(&self.cache);
        tokio::task::spawn_blocking(move || {
            let prev = cache.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let snap = vault.refresh(prev.as_ref())?;
            *cache.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::clone(&snap));
            Ok::<_, VaultError>(snap)
        })
        .await
        .map_err(|e| self.unavailable(format!("reading the vault: {e}")))?
        .map_err(|e| self.runtime_error(e))
    }

    fn unavailable(&self, detail: String) -> Error {
        Error::Unavailable {
            provider: self.name.clone(),
            detail,
        }
    }

    /// A wrong key is an authentication failure; anything else (missing, damaged,
    /// unreadable file) is an outage: the watcher keeps the last good values and retries.
    fn runtime_error(&self, e: VaultError) -> Error {
        match e {
            VaultError::WrongKey { .. } | VaultError::WrongProtection { .. } | VaultError::KeyFile { .. } => {
                Error::Auth {
                    provider: self.name.clone(),
                    detail: e.to_string(),
                }
            }
            other => self.unavailable(other.to_string()),
        }
    }

    fn not_found(&self, reference: &Reference) -> Error {
        Error::NotFound {
            provider: self.name.clone(),
            reference: reference.raw.clone(),
        }
    }
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Local
    }

    async fn version(&self, reference: &Reference) -> Result<Version> {
        let snap = self.snapshot().await?;
        snap.info(&reference.object)
            .map(|i| token(&i))
            .ok_or_else(|| self.not_found(reference))
    }

    /// The value at exactly `version`. An entry that has moved on since is `NotFound`
    /// (its old value is gone): the watcher asks for the new version and fetches that.
    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue> {
        let snap = self.snapshot().await?;
        let Some(info) = snap.info(&reference.object) else {
            return Err(self.not_found(reference));
        };
        if &token(&info) != version {
            return Err(self.not_found(reference));
        }
        match self.vault.reveal(&snap, &reference.object) {
            Ok(Some(v)) => Ok(v),
            Ok(None) => Err(self.not_found(reference)),
            Err(e) => Err(self.runtime_error(e)),
        }
    }

    async fn check(&self) -> Result<CheckReport> {
        let snap = self.snapshot().await?;
        let key = match self.vault.protection() {
            Protection::KeyFile => self.vault.key_description().to_string(),
            Protection::Passphrase(p) => format!(
                "a passphrase (Argon2id m={} KiB t={} p={})",
                p.m_cost, p.t_cost, p.p_cost
            ),
        };
        Ok(CheckReport {
            provider: self.name.clone(),
            detail: format!(
                "vault {}: {} entries, opened with {key}",
                self.vault.path().display(),
                snap.len()
            ),
        })
    }
}
