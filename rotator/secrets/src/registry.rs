//! Builds a [`Provider`] from its validated [`ProviderSpec`]: the one place that knows
//! which module implements which kind, and which cargo feature gates it.

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::provider::Provider;
use crate::spec::{ProviderSettings, ProviderSpec};

/// Connects the provider instance `spec` describes. Nothing is fetched; credentials are
/// loaded (and, for Vault AppRole, a login is made) so that a bad setting fails here.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    match &spec.settings {
        ProviderSettings::Local(_) => crate::local::connect(spec).await,
        #[cfg(feature = "vault")]
        ProviderSettings::Vault(_) => crate::vault::connect(spec).await,
        #[cfg(feature = "aws")]
        ProviderSettings::Aws(_) => crate::aws::connect(spec).await,
        #[cfg(feature = "azure")]
        ProviderSettings::Azure(_) => crate::azure::connect(spec).await,
        ProviderSettings::Plugin(_) => crate::plugin::connect(spec).await,
        #[allow(unreachable_patterns)]
        _ => Err(Error::Config {
            provider: spec.name.clone(),
            detail: format!(
                "this dso was built without the {kind:?} provider; rebuild with `--features {kind}`",
                kind = spec.kind().as_str()
            ),
        }),
    }
}

/// Compiles only while every provider's `connect` future is `Send`: the agent connects
/// providers from tasks of a multi-threaded runtime (an Azure helper once held a
/// non-`Sync` closure across an await and broke that).
#[allow(dead_code)]
fn connect_is_send(
    spec: &ProviderSpec,
) -> impl std::future::Future<Output = Result<Arc<dyn Provider>>> + Send + '_ {
    connect(spec)
}
