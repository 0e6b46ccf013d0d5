//! Test servers and their helpers.

// Each provider's tests use part of these; a build with some provider features off (or
// a later provider that needs only some helpers) leaves the rest unused.
#![allow(dead_code)]

#[cfg(feature = "azure")]
pub mod azure_server;
pub mod http;
pub mod logs;
pub mod tls;
#[cfg(feature = "vault")]
pub mod vault_server;

use dso_secrets::spec::Limits;

/// Limits with a short timeout, so a test that goes wrong fails fast.
pub fn limits() -> Limits {
    Limits {
        timeout: std::time::Duration::from_secs(5),
        ..Limits::default()
    }
}
