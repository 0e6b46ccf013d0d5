//! Test servers and their helpers.

pub mod azure_server;
pub mod http;
pub mod tls;
pub mod vault_server;

use dso_secrets::spec::Limits;

/// Limits with a short timeout, so a test that goes wrong fails fast.
pub fn limits() -> Limits {
    Limits {
        timeout: std::time::Duration::from_secs(5),
        ..Limits::default()
    }
}
