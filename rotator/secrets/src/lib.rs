//! `dso-secrets`: where dso's secrets come from and how a change is noticed.
//!
//! Where to start reading: [`Provider`] (`provider.rs`) is the one trait every source
//! implements: a metadata-only [`Provider::version`] (the change token), a
//! [`Provider::fetch`] of exactly that version, and [`Provider::check`] for `dso doctor`.
//! [`Reference`] (`reference.rs`) is what a config mapping points at, parsed per provider
//! kind; [`SecretValue`] (`value.rs`) is the only type that holds a value, and it has no
//! `Debug`, `Display` or `Serialize`. [`spec`] holds the validated settings the CLI's
//! config hands over; [`redact`] scrubs every known value out of text before it is logged
//! or answered.
//!
//! Invariant: this crate knows nothing of Docker or of the proxy. Values leave it only
//! through [`SecretValue::expose`], one greppable call at the place that delivers them.

#[cfg(feature = "aws")]
pub mod aws;
#[cfg(feature = "azure")]
pub mod azure;
pub mod config;
pub mod error;
pub mod local;
pub mod plugin;
pub mod provider;
pub mod redact;
pub mod reference;
pub mod registry;
pub mod spec;
pub mod value;
#[cfg(feature = "vault")]
pub mod vault;

pub use error::{Error, Result};
pub use provider::{CheckReport, Provider, Version};
pub use redact::Redactor;
pub use reference::Reference;
pub use registry::connect;
pub use spec::{ProviderKind, ProviderSpec};
pub use value::SecretValue;
pub mod state;
pub mod watcher;
