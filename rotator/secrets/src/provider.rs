//! The [`Provider`] trait: every secret source (local vault, Vault, AWS, Azure, plugins)
//! answers the same three questions.

use std::fmt;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::reference::Reference;
use crate::spec::ProviderKind;
use crate::value::SecretValue;

/// The change token of one secret object: a provider's version id (AWS `VersionId`, Vault
/// KV `current_version`, Azure version, local vault entry version), or `sha256:HEX` for a
/// provider without version metadata. Opaque: compared for equality only. Never a value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Version(pub String);

impl Version {
    /// A version from a provider's own id.
    pub fn new(id: impl Into<String>) -> Version {
        Version(id.into())
    }

    /// The token of a provider that has no version metadata: the SHA-256 of the value.
    pub fn from_digest(value: &SecretValue) -> Version {
        Version(format!("sha256:{}", value.sha256_hex()))
    }

    /// The token as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Version {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// What [`Provider::check`] found, for `dso doctor` and `dso config validate
/// --check-providers`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CheckReport {
    /// Provider instance name.
    pub provider: String,
    /// One line on what was checked and what answered (address, identity, API version).
    pub detail: String,
}

/// One secret source. Implementations must be cheap to share (`Arc<dyn Provider>`) and
/// safe to call concurrently; the watcher bounds concurrency and rate per provider.
///
/// Contract:
/// - [`version`](Provider::version) reads **metadata only** (never the value) when the
///   provider has version metadata; it is called once per reference object per poll.
/// - [`fetch`](Provider::fetch) reads exactly the version given, so a value and its token
///   always agree; it returns the whole object, and [`Reference::select`] picks the field.
/// - Errors carry the instance name and the reference, never a value.
#[async_trait]
pub trait Provider: Send + Sync {
    /// Instance name from the config (`providers.NAME`).
    fn name(&self) -> &str;

    /// Which kind of provider this is.
    fn kind(&self) -> ProviderKind;

    /// Whether the provider retries transient failures itself, within one call, by the
    /// same `Limits` (the AWS SDK's standard retry). The watcher's gate then makes one
    /// attempt per call instead of retrying on top, which would multiply the attempts.
    fn retries_internally(&self) -> bool {
        false
    }

    /// Parses a mapping's reference text in this provider's syntax.
    fn parse(&self, reference: &str) -> Result<Reference> {
        Reference::parse(self.kind(), self.name(), reference)
    }

    /// The current change token of the reference's object, from metadata only.
    async fn version(&self, reference: &Reference) -> Result<Version>;

    /// The object's value at exactly `version`.
    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue>;

    /// Whether the provider is reachable and the credentials are accepted (no value read).
    async fn check(&self) -> Result<CheckReport>;
}
