//! Integration tests of dso-secrets against real servers on loopback.

#[cfg(feature = "aws")]
mod aws;
