//! Integration tests of the `dso` binary: a real agent process on loopback with tiny echo
//! backends, driven by the real CLI and by raw HTTP on the control socket.

mod agent;
mod api;
mod compose;
mod compose_agent;
mod config;
mod delivery;
mod doctor;
mod events;
mod harness;
mod http;
mod plugin;
mod proxy;
mod reload;
mod rotate;
mod secret;
mod secrets;
mod setup;
mod swarm;
mod upgrade;
