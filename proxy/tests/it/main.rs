//! Integration tests of `dso-proxy` over real sockets on loopback.

mod dial;
mod drain;
mod forward;
mod hardening;
mod hold;
mod proxy;
mod support;
mod swap;
