//! Integration tests of `dso-secrets`: each provider against a real server or an
//! in-process server that answers the published API with its real envelopes and errors.

mod support;

#[cfg(feature = "azure")]
mod azure;
#[cfg(feature = "vault")]
mod vault;
