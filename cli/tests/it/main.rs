//! Integration tests of the `dso` binary: a real agent process on loopback with tiny echo
//! backends, driven by the real CLI and by raw HTTP on the control socket.

mod agent;
mod api;
mod compose;
mod config;
mod delivery;
mod harness;
mod plugin;
mod proxy;
mod rotate;
mod secret;
mod secrets;
