//! [`Watcher`]: notices changes by polling version metadata only, and hands out one
//! consistent [`Snapshot`] per affected consumer.
//!
//! What it takes: the watched items (per consumer, its mappings `key -> Reference`), the
//! providers, [`WatchSettings`], a state directory and a stop token. What it hands on:
//! [`Event`]s on a channel, to the delivery code, which calls [`Watcher::applied`] once it
//! delivered a snapshot.
//!
//! How (see `docs/secrets.md`, "Change detection"):
//! - Each distinct *object* ([`Reference::object_key`]) is polled with
//!   [`Provider::version`] once per period (interval × factor, factor 1, 2, 4 while nothing
//!   changes, back to 1 after a change), at a uniformly random instant inside the period
//!   (full jitter). Calls pass a per-provider [`gate`] (concurrency, rate, timeout, retry).
//! - A changed version opens the debounce window; when it closes, every changed object is
//!   fetched once at the version seen, fields are selected, and each affected consumer gets
//!   one snapshot built from those fetches.
//! - Values are held once per object, registered with [`Redactor::global`] while held, and
//!   dropped (zeroed, forgotten) when replaced or when no consumer needs them.
//!
//! [`Redactor::global`]: crate::redact::Redactor::global

mod core;
mod gate;
mod stats;

pub use stats::{Call, ErrorKind, ProviderStats};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};
use crate::provider::{Provider, Version};
use crate::reference::Reference;
use crate::spec::Limits;
use crate::state::{StateError, StateStore};
use crate::value::SecretValue;

/// How the watcher polls (`agent.watch` in the config).
#[derive(Debug, Clone)]
pub struct WatchSettings {
    /// Base polling interval (`agent.watch.polling_interval`, default 30 s).
    pub interval: Duration,
    /// Largest factor the interval grows to while nothing changes (default 4).
    pub max_backoff_factor: u32,
    /// Changes seen within this window become one snapshot per consumer (default 2 s).
    pub debounce: Duration,
    /// Longest wait between polls of an object whose polls fail (default 5 min).
    pub max_error_backoff: Duration,
    /// Limits per provider instance name; a provider not listed gets `Limits::default()`.
    pub limits: HashMap<String, Limits>,
    /// Capacity of the event channel (default 1024); a full channel pauses the watcher.
    pub channel_capacity: usize,
    /// Full jitter on every period (`agent.watch.jitter`, default true).
    pub jitter: bool,
}

impl Default for WatchSettings {
    fn default() -> WatchSettings {
        WatchSettings {
            interval: Duration::from_secs(30),
            max_backoff_factor: 4,
            debounce: Duration::from_secs(2),
            max_error_backoff: Duration::from_secs(300),
            limits: HashMap::new(),
            channel_capacity: 1024,
            jitter: true,
        }
    }
}

/// One consumer and what it maps (key = the name inside the container).
#[derive(Debug, Clone)]
pub struct Watched {
    /// Opaque consumer id chosen by the caller (a container or service name).
    pub consumer: String,
    /// `(key, reference)` pairs.
    pub mappings: Vec<(String, Reference)>,
}

/// All of one consumer's mappings, each value from one fetch of its object.
pub struct Snapshot {
    /// The consumer id.
    pub consumer: String,
    /// `(key, value)` for every mapping, in mapping order.
    pub values: Vec<(String, SecretValue)>,
    /// The version each mapping's value was read at, in mapping order.
    pub versions: Vec<(Reference, Version)>,
    /// Whether the consumer had no applied record (its first delivery).
    pub first: bool,
    /// When the watcher had what this snapshot delivers: the later of the poll that first
    /// saw the newest of its versions and the consumer's [`Watcher::watch`]. Delivery
    /// latency is measured from here.
    pub noticed: tokio::time::Instant,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys: Vec<(&str, usize)> = self.values.iter().map(|(k, v)| (k.as_str(), v.len())).collect();
        f.debug_struct("Snapshot")
            .field("consumer", &self.consumer)
            .field("keys_and_lengths", &keys)
            .field("versions", &self.versions)
            .field("first", &self.first)
            .finish()
    }
}

/// What the watcher reports.
#[derive(Debug)]
pub enum Event {
    /// A consumer's values changed (or it is new, or changed while the agent was down).
    Snapshot(Snapshot),
    /// Calls to a provider fail; the last good values stay, nothing is triggered.
    ProviderDown {
        /// Provider instance name.
        provider: String,
        /// The last error (redacted, never a value).
        error: String,
    },
    /// A provider that was down answers again.
    ProviderUp {
        /// Provider instance name.
        provider: String,
    },
    /// A reference's value cannot be delivered (empty, JSON key missing, not found,
    /// forbidden); the consumer gets no snapshot until it can.
    Unusable {
        /// The consumer id.
        consumer: String,
        /// The reference.
        reference: Reference,
        /// Why (never the value).
        reason: String,
    },
}

/// Which providers [`Watcher::trigger`] polls now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// Every provider.
    All,
    /// One provider instance.
    Provider(String),
}

/// Watcher status for the API and `dso status` (no values).
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    /// Per provider instance.
    pub providers: Vec<ProviderStatus>,
    /// Per polled object.
    pub objects: Vec<ObjectStatus>,
}

/// One provider's health as the watcher sees it.
#[derive(Debug, Clone, Serialize)]
pub struct ProviderStatus {
    /// Instance name.
    pub provider: String,
    /// False after a poll failed on a transient or authentication error, until a call
    /// succeeds.
    pub up: bool,
    /// Last successful call, Unix milliseconds.
    pub last_success_unix_ms: Option<u64>,
    /// Last error (redacted).
    pub last_error: Option<String>,
    /// Failed polls since the last success.
    pub consecutive_failures: u32,
}

/// One polled object.
#[derive(Debug, Clone, Serialize)]
pub struct ObjectStatus {
    /// Provider instance name.
    pub provider: String,
    /// The references (as written) that share this object's poll.
    pub references: Vec<String>,
    /// How many consumers use it.
    pub consumers: usize,
    /// The version last seen.
    pub current_version: Option<Version>,
    /// Last successful poll, Unix milliseconds.
    pub last_success_unix_ms: Option<u64>,
    /// Last error (redacted).
    pub last_error: Option<String>,
    /// Failed polls since the last success.
    pub consecutive_failures: u32,
    /// Current interval factor (1 right after a change, up to `max_backoff_factor`).
    pub backoff_factor: u32,
}

/// Handle of a running watcher. Dropping it does not stop the watcher: cancel the token.
pub struct Watcher {
    /// Commands to the watcher task.
    commands: mpsc::UnboundedSender<core::Command>,
    /// Known provider names, to refuse a mapping to an unknown one synchronously
    /// (changed by [`Watcher::add_provider`] and [`Watcher::remove_provider`]).
    providers: std::sync::RwLock<HashMap<String, Arc<dyn Provider>>>,
    /// The applied-version store.
    state: Arc<StateStore>,
    /// Counters and health per provider instance, written by the watcher task.
    stats: std::sync::RwLock<Arc<BTreeMap<String, Arc<ProviderStats>>>>,
}

impl Watcher {
    /// Starts watching `items`. Events arrive on the returned receiver; the watcher runs
    /// until `cancel` is cancelled.
    pub fn start(
        items: Vec<Watched>,
        providers: HashMap<String, Arc<dyn Provider>>,
        settings: WatchSettings,
        state_dir: impl Into<PathBuf>,
        cancel: CancellationToken,
    ) -> Result<(Watcher, mpsc::Receiver<Event>), StartError> {
        let state = Arc::new(StateStore::open(state_dir)?);
        let stats: Arc<BTreeMap<String, Arc<ProviderStats>>> = Arc::new(
            providers
                .keys()
                .map(|name| (name.clone(), Arc::default()))
                .collect(),
        );
        let (events_tx, events_rx) = mpsc::channel(settings.channel_capacity.max(1));
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let core = core::Core::new(&providers, &stats, settings, events_tx);
        let watcher = Watcher {
            commands: cmd_tx,
            providers: std::sync::RwLock::new(providers),
            state: Arc::clone(&state),
            stats: std::sync::RwLock::new(stats),
        };
        for item in items {
            watcher.watch(item.consumer, item.mappings)?;
        }
        tokio::spawn(core.run(cmd_rx, cancel));
        Ok((watcher, events_rx))
    }

    /// Starts (or replaces) watching one consumer's mappings. Its persisted applied
    /// versions decide what is emitted once its objects' versions are known.
    pub fn watch(&self, consumer: String, mappings: Vec<(String, Reference)>) -> Result<(), StartError> {
        let providers = self.providers.read().unwrap_or_else(|e| e.into_inner());
        for (_, r) in &mappings {
            if !providers.contains_key(&r.provider) {
                let mut known: Vec<&str> = providers.keys().map(String::as_str).collect();
                known.sort_unstable();
                return Err(StartError::Provider(Error::Config {
                    provider: r.provider.clone(),
                    detail: format!(
                        "reference {:?} of consumer {consumer:?} names an unknown provider (known: {})",
                        r.raw,
                        known.join(", ")
                    ),
                }));
            }
        }
        let applied = self.state.load(&consumer)?;
        // Sent under the lock: a provider removed meanwhile is removed after this watch.
        let _ = self.commands.send(core::Command::Watch {
            consumer,
            mappings,
            applied,
        });
        Ok(())
    }

    /// Adds provider instance `name` (or replaces the one of that name) with its call
    /// `limits`. A replaced instance's objects stay watched by their consumers but are
    /// read anew through the new instance: the values held drop (zeroed, forgotten by the
    /// redactor), every object is polled at once, and a consumer gets a snapshot only if
    /// a version differs from the one it was handed; its counters start from zero. Other
    /// providers' objects, values and counters are untouched.
    pub fn add_provider(&self, name: &str, provider: Arc<dyn Provider>, limits: Limits) {
        let mut providers = self.providers.write().unwrap_or_else(|e| e.into_inner());
        let stats: Arc<ProviderStats> = Arc::default();
        {
            let mut all = self.stats.write().unwrap_or_else(|e| e.into_inner());
            let mut next = BTreeMap::clone(&all);
            next.insert(name.to_string(), Arc::clone(&stats));
            *all = Arc::new(next);
        }
        providers.insert(name.to_string(), Arc::clone(&provider));
        let _ = self.commands.send(core::Command::AddProvider {
            name: name.to_string(),
            provider,
            limits,
            stats,
        });
    }

    /// Removes provider instance `name`: its objects are no longer polled, every consumer
    /// with a mapping to it stops being watched (their applied records stay), and the
    /// values held for them are dropped (zeroed, forgotten by the redactor). Other
    /// providers' objects, values and counters are untouched. Returns whether it was known.
    pub fn remove_provider(&self, name: &str) -> bool {
        let mut providers = self.providers.write().unwrap_or_else(|e| e.into_inner());
        let known = providers.remove(name).is_some();
        {
            let mut all = self.stats.write().unwrap_or_else(|e| e.into_inner());
            let mut next = BTreeMap::clone(&all);
            next.remove(name);
            *all = Arc::new(next);
        }
        let _ = self.commands.send(core::Command::RemoveProvider {
            name: name.to_string(),
        });
        known
    }

    /// Stops watching a consumer; values no other consumer needs are dropped. Its applied
    /// record stays (see [`StateStore::forget`]).
    pub fn unwatch(&self, consumer: &str) {
        let _ = self.commands.send(core::Command::Unwatch {
            consumer: consumer.to_string(),
        });
    }

    /// "Look now": polls every object of the provider(s) at once, bypassing the interval
    /// and any error backoff but not the rate limit (`dso secret set`, webhooks).
    pub fn trigger(&self, which: Trigger) {
        let _ = self.commands.send(core::Command::Trigger(which));
    }

    /// Records that `versions` were delivered to `consumer` (persisted atomically).
    pub fn applied(&self, consumer: &str, versions: &[(Reference, Version)]) -> Result<(), StateError> {
        self.state.mark_applied(consumer, versions)
    }

    /// The applied-version store.
    pub fn state(&self) -> &StateStore {
        &self.state
    }

    /// Counters and health of each provider instance, by name (read without asking the
    /// watcher task, so a scrape never waits on it).
    pub fn provider_stats(&self) -> Arc<BTreeMap<String, Arc<ProviderStats>>> {
        Arc::clone(&self.stats.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Current status. `None` when the watcher has stopped.
    pub async fn status(&self) -> Option<Status> {
        let (tx, rx) = oneshot::channel();
        self.commands.send(core::Command::Status(tx)).ok()?;
        rx.await.ok()
    }
}

/// Why the watcher could not start or take a consumer.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
    /// A mapping names an unknown provider.
    #[error(transparent)]
    Provider(Error),
}
