//! Delivery: secret values into containers as RAM-only files (or launcher-read env files),
//! kept in the agent's own tmpfs, one directory per container instance.
//!
//! - `store.rs`: the tmpfs root and the per-instance directories (write, read, wipe, sweep).
//! - `archive.rs`: the in-memory tar archive the remote-engine path uploads.

pub mod archive;
pub mod store;
