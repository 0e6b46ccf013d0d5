//! The `azure` provider. (Being written: `connect` refuses until it lands.)

use std::sync::Arc;

use crate::error::{Error, Result};
use crate::provider::Provider;
use crate::spec::ProviderSpec;

/// Connects a `azure` provider instance.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    Err(Error::Config {
        provider: spec.name.clone(),
        detail: "the azure provider is not implemented yet".to_string(),
    })
}
