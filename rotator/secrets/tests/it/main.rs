//! Integration tests of dso-secrets against real servers on loopback.

mod aws;
