//! Integration tests of `dso-secrets` (one binary; one module per area).

mod plugin;
mod watcher;
