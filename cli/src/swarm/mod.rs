//! The Docker Swarm secret driver (docs/swarm.md): Swarm's manager leader asks the agent
//! for a Swarm secret's value over Docker's plugin protocol, the access policy decides,
//! the value comes from dso's providers; a changed value rolls the services that use it.
//!
//! - `config.rs`: the `swarm:` section and its checked [`config::SwarmSettings`];
//! - `driver.rs`: the plugin socket and its two calls;
//! - `mapping.rs`: a Swarm secret's labels to a dso reference;
//! - `policy.rs`: which services may read which secrets;
//! - `rotation.rs`: new versions, service updates and removals, on the leader;
//! - `engine.rs`: the Swarm API calls (bollard).

pub mod config;
mod driver;
mod engine;
mod mapping;
mod policy;
mod rotation;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use dso_secrets::config::SecretsConfig;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::config::SwarmSettings;
use self::policy::Decision;
pub use self::rotation::{CONSUMER, Change};

/// What the driver's handlers and the rotation loop share.
pub struct Shared {
    /// `swarm:`.
    settings: SwarmSettings,
    /// The agent's secret side: providers (reads) and the watcher (changes).
    secrets: Arc<crate::secrets::Secrets>,
    /// The agent's event bus.
    events: crate::events::Bus,
    /// The counters `/metrics` shows.
    stats: &'static Stats,
}

/// The driver's counters (process-wide: one driver per agent).
#[derive(Debug, Default)]
pub struct Stats {
    allowed: AtomicU64,
    denied: AtomicU64,
    read_errors: AtomicU64,
    updates_done: AtomicU64,
    updates_failed: AtomicU64,
    removed: AtomicU64,
}

static STATS: OnceLock<Stats> = OnceLock::new();

impl Stats {
    fn count(&self, d: &Decision, error: bool) {
        match d {
            Decision::Allow { .. } => {
                self.allowed.fetch_add(1, Ordering::Relaxed);
                if error {
                    self.read_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
            Decision::Deny { .. } => {
                self.denied.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn rotation(&self, ok: bool) {
        let c = if ok {
            &self.updates_done
        } else {
            &self.updates_failed
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn removed(&self) {
        self.removed.fetch_add(1, Ordering::Relaxed);
    }
}

/// The running driver.
#[derive(Debug)]
pub struct Driver {
    task: tokio::task::JoinHandle<()>,
}

/// Starts the driver: binds `/run/docker/plugins/<driver>.sock`, serves it, and runs the
/// rotation loop once the engine answers (retried with backoff). Needs the secret side (providers).
/// `take_over`: started by a hitless upgrade, so the previous agent's socket is replaced.
pub async fn start(
    take_over: bool,
    settings: SwarmSettings,
    secrets: Option<Arc<crate::secrets::Secrets>>,
    secrets_cfg: &SecretsConfig,
    events: crate::events::Bus,
    stop: CancellationToken,
) -> anyhow::Result<Driver> {
    let Some(secrets) = secrets.filter(|_| !secrets_cfg.providers.is_empty()) else {
        anyhow::bail!(
            "swarm: the Swarm secret driver reads values from dso's providers, but the config defines none; add one under providers: (e.g. the local vault)"
        );
    };
    let socket = driver::bind(&settings.driver, take_over).await?;
    let stats = STATS.get_or_init(Stats::default);
    let shared = Arc::new(Shared {
        settings,
        secrets: Arc::clone(&secrets),
        events,
        stats,
    });
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    secrets.set_swarm(tx);
    info!(
        socket = %socket.path().display(),
        driver = %shared.settings.driver,
        rules = shared.settings.policy.len(),
        rotate = shared.settings.rotate,
        "swarm secret driver serving"
    );
    // The driver answers whether or not the engine does; the rotation waits for it.
    let (rot, rot_stop) = (Arc::clone(&shared), stop.clone());
    tokio::spawn(async move {
        let mut wait = std::time::Duration::from_secs(1);
        loop {
            match engine::SwarmEngine::connect().await {
                Ok(engine) => return rotation::run(rot, engine, rx, rot_stop).await,
                Err(e) => {
                    warn!(error = format!("{e:#}"), retry_in = ?wait, "swarm rotation cannot reach the Docker engine")
                }
            }
            tokio::select! {
                () = rot_stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(std::time::Duration::from_secs(30));
        }
    });
    let task = tokio::spawn(socket.serve(shared, stop));
    Ok(Driver { task })
}

impl Driver {
    /// Waits until the socket is closed and removed (after the stop token).
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}

/// The driver's metrics, once it started.
pub fn collector() -> Option<Box<dyn Collector>> {
    STATS
        .get()
        .map(|s| Box::new(StatsCollector(s)) as Box<dyn Collector>)
}

/// One counter family: name (without `_total`), help, and rows of (label key, label
/// value, count); an empty key is a row without labels.
type Family = (&'static str, &'static str, Vec<(&'static str, &'static str, u64)>);

#[derive(Debug)]
struct StatsCollector(&'static Stats);

impl Collector for StatsCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> std::fmt::Result {
        let s = self.0;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let families: [Family; 4] = [
            (
                "dso_swarm_secret_requests",
                "GetSecret requests of the Swarm secret driver, by the access policy's decision.",
                vec![
                    ("decision", "allow", get(&s.allowed)),
                    ("decision", "deny", get(&s.denied)),
                ],
            ),
            (
                "dso_swarm_secret_read_errors",
                "Allowed GetSecret requests answered with an error (mapping, provider or size).",
                vec![("", "", get(&s.read_errors))],
            ),
            (
                "dso_swarm_service_updates",
                "Swarm service updates to a new secret version, by result (failed: refused, rolled back, or the version could not be created).",
                vec![
                    ("result", "done", get(&s.updates_done)),
                    ("result", "failed", get(&s.updates_failed)),
                ],
            ),
            (
                "dso_swarm_secret_versions_removed",
                "Old Swarm secret versions removed once no service or task used them.",
                vec![("", "", get(&s.removed))],
            ),
        ];
        for (name, help, rows) in families {
            let mut m = enc.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (k, v, n) in rows {
                let labels: Vec<(&str, &str)> = if k.is_empty() { Vec::new() } else { vec![(k, v)] };
                ConstCounter::new(n).encode(m.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}
