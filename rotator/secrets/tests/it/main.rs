//! Integration tests of `dso-secrets` (one binary; one module per area): each provider
//! against a real server or an in-process server that answers the published API with its
//! real envelopes and errors, the plugin provider against real child processes, and the
//! watcher on the paused clock.

mod support;

#[cfg(feature = "aws")]
mod aws;
#[cfg(feature = "azure")]
mod azure;
mod plugin;
#[cfg(feature = "vault")]
mod vault;
mod watcher;
