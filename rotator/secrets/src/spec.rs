//! The validated settings this crate takes. The CLI's config file is converted into these
//! (with errors that name key and line); nothing here parses YAML.
//!
//! Each provider module may grow its own settings struct; keep the field names those of
//! the config file so the docs describe one shape.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

use crate::value::SecretValue;

/// The kinds of provider (`providers.NAME.type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// The embedded encrypted vault file.
    Local,
    /// HashiCorp Vault, KV v2.
    Vault,
    /// AWS Secrets Manager.
    Aws,
    /// Azure Key Vault.
    Azure,
    /// An external executable speaking the plugin protocol.
    Plugin,
}

impl ProviderKind {
    /// Every kind, in the order the docs list them.
    pub const ALL: [ProviderKind; 5] = [
        ProviderKind::Local,
        ProviderKind::Vault,
        ProviderKind::Aws,
        ProviderKind::Azure,
        ProviderKind::Plugin,
    ];

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Vault => "vault",
            ProviderKind::Aws => "aws",
            ProviderKind::Azure => "azure",
            ProviderKind::Plugin => "plugin",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<ProviderKind> {
        ProviderKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

impl fmt::Display for ProviderKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A credential from the config (a Vault token, an Azure client secret). Held like a
/// value; its `Debug` prints nothing of it.
pub struct Credential(pub SecretValue);

impl Credential {
    /// A credential from config text.
    pub fn new(text: &str) -> Credential {
        Credential(SecretValue::from_slice(text.as_bytes()))
    }

    /// The credential as text (credentials come from YAML, so they are UTF-8).
    pub fn expose_str(&self) -> &str {
        std::str::from_utf8(self.0.expose()).unwrap_or_default()
    }
}

impl Clone for Credential {
    fn clone(&self) -> Credential {
        Credential(self.0.duplicate())
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Credential(<redacted>)")
    }
}

impl PartialEq for Credential {
    fn eq(&self, other: &Credential) -> bool {
        self.0 == other.0
    }
}

/// Limits every provider instance has (`providers.NAME.rate_limit`, `.concurrency`,
/// `.retry`).
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Most calls per second to this provider (metadata and value reads together).
    pub rate_per_sec: f64,
    /// Most calls in flight at once.
    pub concurrency: usize,
    /// Attempts of one call on a transient error before it counts as failed.
    pub retry_attempts: u32,
    /// First backoff between those attempts (doubles each time).
    pub retry_backoff: Duration,
    /// Deadline of one call.
    pub timeout: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            rate_per_sec: 50.0,
            concurrency: 8,
            retry_attempts: 3,
            retry_backoff: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One configured provider instance.
#[derive(Debug, Clone)]
pub struct ProviderSpec {
    /// Instance name (`providers.NAME`).
    pub name: String,
    /// Rate, concurrency and retry limits.
    pub limits: Limits,
    /// The kind and its own settings.
    pub settings: ProviderSettings,
}

impl ProviderSpec {
    /// The kind of this instance.
    pub fn kind(&self) -> ProviderKind {
        match self.settings {
            ProviderSettings::Local(_) => ProviderKind::Local,
            ProviderSettings::Vault(_) => ProviderKind::Vault,
            ProviderSettings::Aws(_) => ProviderKind::Aws,
            ProviderSettings::Azure(_) => ProviderKind::Azure,
            ProviderSettings::Plugin(_) => ProviderKind::Plugin,
        }
    }
}

/// Per-kind settings.
#[derive(Debug, Clone)]
pub enum ProviderSettings {
    /// `type: local`.
    Local(LocalSettings),
    /// `type: vault`.
    Vault(VaultSettings),
    /// `type: aws`.
    Aws(AwsSettings),
    /// `type: azure`.
    Azure(AzureSettings),
    /// `type: plugin`.
    Plugin(PluginSettings),
}

/// `type: local`: the embedded vault.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalSettings {
    /// The encrypted vault file.
    pub vault_file: PathBuf,
    /// The 256-bit key file; `None` when the vault is passphrase-protected.
    pub master_key_file: Option<PathBuf>,
}

/// `type: vault`: HashiCorp Vault, KV v2.
#[derive(Debug, Clone, PartialEq)]
pub struct VaultSettings {
    /// `https://vault.example.com:8200`.
    pub address: String,
    /// Vault Enterprise namespace (`X-Vault-Namespace`).
    pub namespace: Option<String>,
    /// PEM file of the CA that signs Vault's certificate.
    pub ca_file: Option<PathBuf>,
    /// How to log in.
    pub auth: VaultAuth,
}

/// Vault login methods.
#[derive(Debug, Clone, PartialEq)]
pub enum VaultAuth {
    /// A token (renewed before expiry when renewable).
    Token {
        /// The token.
        token: Credential,
    },
    /// AppRole: role id in the config, secret id read from a file at each login.
    AppRole {
        /// The role id (not a secret by itself).
        role_id: String,
        /// File holding the secret id.
        secret_id_file: PathBuf,
        /// Auth mount, `approle` by default.
        mount: String,
    },
}

/// `type: aws`: AWS Secrets Manager.
#[derive(Debug, Clone, PartialEq)]
pub struct AwsSettings {
    /// Region; `None` uses the default chain (env, profile, instance metadata).
    pub region: Option<String>,
    /// Endpoint override (a VPC endpoint, or a test server).
    pub endpoint_url: Option<String>,
    /// Named profile from `~/.aws/config`; `None` uses the default chain.
    pub profile: Option<String>,
    /// Which credentials to use (`auth.method`).
    pub auth: AwsAuth,
}

/// AWS credential sources (`providers.NAME.auth.method`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum AwsAuth {
    /// The SDK's default chain: environment, profile, web identity, container, then the
    /// instance role.
    #[default]
    Default,
    /// Credentials are expected from the instance role. The chain is still the default
    /// one (see docs/secrets.md): the method records intent, it does not restrict.
    IamRole,
    /// Credentials are expected from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY`; the
    /// default chain, which reads those first.
    Env,
    /// Credentials are expected from the named `profile`; the default chain, given that
    /// profile.
    Profile,
}

/// `type: azure`: Azure Key Vault.
#[derive(Debug, Clone, PartialEq)]
pub struct AzureSettings {
    /// `https://NAME.vault.azure.net`.
    pub vault_url: String,
    /// How to get a token.
    pub auth: AzureAuth,
    /// Login endpoint, `https://login.microsoftonline.com` by default.
    pub authority_host: String,
    /// PEM file of extra CAs to trust (tests, private endpoints).
    pub ca_file: Option<PathBuf>,
}

/// Azure credential kinds.
#[derive(Debug, Clone, PartialEq)]
pub enum AzureAuth {
    /// The host's managed identity (IMDS, or App Service's `IDENTITY_ENDPOINT`).
    ManagedIdentity {
        /// User-assigned identity's client id; `None` for the system-assigned one.
        client_id: Option<String>,
        /// Token endpoint override (IMDS by default).
        endpoint: Option<String>,
    },
    /// A service principal's client secret.
    ClientSecret {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// The client secret.
        client_secret: Credential,
    },
    /// Workload identity: a federated token read from a file at each login.
    WorkloadIdentity {
        /// Directory (tenant) id.
        tenant_id: String,
        /// Application (client) id.
        client_id: String,
        /// File holding the federated token (`AZURE_FEDERATED_TOKEN_FILE`).
        token_file: PathBuf,
    },
}

/// `type: plugin`: an external executable.
#[derive(Debug, Clone, PartialEq)]
pub struct PluginSettings {
    /// The executable.
    pub command: PathBuf,
    /// Arguments (never a secret: argv is visible to every user).
    pub args: Vec<String>,
    /// The pinned SHA-256 (hex); `None` looks it up in `dso-plugins-sha256.json`.
    pub sha256: Option<String>,
    /// The pin file consulted when `sha256` is `None`.
    pub pins_file: Option<PathBuf>,
    /// Opaque settings sent to the plugin in its first message.
    pub config: serde_json::Value,
    /// Names of agent environment variables passed to the plugin besides `PATH`, `HOME`
    /// and `LANG` (the plugin starts with an otherwise empty environment).
    pub env: Vec<String>,
}
