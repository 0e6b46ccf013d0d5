//! [`Rotator`]: what the agent holds. It recovers interrupted rotations at start, adopts
//! the managed containers (listeners and routes, no rotation), follows Docker events, runs
//! rotations one per service at a time, and reports status.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use dso_proxy::Proxy;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::counts::RotationResult;
use crate::delivery::{Bundle, Delivery, LABEL_INSTANCE, SWEEP_MIN_AGE, volume_name};
use crate::discovery::{self, Managed, Scan};
use crate::engine::Engine;
use crate::error::Error;
use crate::gateway::Gateway;
use crate::journal::{History, Journal, Step, now_ms};
use crate::labels::{ServiceKey, Strategy};
use crate::lock::{Queue, ServiceLock};
use crate::recovery::{self, Recovered};
use crate::rotation::{self, ContainerReport, Hooks, Progress, Run, ms};
use crate::{restart, rolling, strategy};

/// Settings of the rotator.
#[derive(Debug, Clone)]
pub struct Config {
    /// Directory for the journal, history and lock files (e.g. `/var/lib/dso`).
    pub state_dir: PathBuf,
    /// Grace given to a container's main process between SIGTERM and SIGKILL on stop.
    pub stop_grace: Duration,
    /// Manage only containers carrying this label with this value (several agents or
    /// test runs on one engine); `None` manages every `dso.reloader=true` container.
    pub scope: Option<(String, String)>,
    /// How long the listeners of a service whose containers are all gone (removed, e.g.
    /// `docker compose down`) keep their ports, with an empty route, before they are
    /// released: a service recreated within it (`docker compose up --force-recreate`)
    /// keeps its ports without a gap in ownership.
    pub release_grace: Duration,
    /// Secret delivery; `None` when no secret is configured (copies are plain copies).
    pub delivery: Option<Arc<Delivery>>,
}

/// Default of [`Config::release_grace`].
pub const DEFAULT_RELEASE_GRACE: Duration = Duration::from_secs(10);

impl Config {
    /// Settings with a 10 s stop grace and a 10 s release grace.
    pub fn new(state_dir: impl Into<PathBuf>) -> Self {
        Config {
            state_dir: state_dir.into(),
            stop_grace: Duration::from_secs(10),
            scope: None,
            release_grace: DEFAULT_RELEASE_GRACE,
            delivery: None,
        }
    }
}

/// A rotation request (`dso rotate TARGET [--strategy S] [--env-file F]`). Its `Debug`
/// names environment variables without their values.
#[derive(Clone, Default)]
pub struct RotateRequest {
    /// Service (`project/service` or `service`) or container name or ID.
    pub target: String,
    /// Strategy overriding the label.
    pub strategy: Option<Strategy>,
    /// Environment variables to set in the new container.
    pub env: Vec<(String, String)>,
    /// Receives each step as it happens.
    pub progress: Option<mpsc::UnboundedSender<Progress>>,
    /// Test hooks.
    pub hooks: Hooks,
    /// How many later requests were merged into this one (0 for a request on its own).
    pub merged: u32,
    /// Secret values to deliver (a change the watcher saw); `None` keeps the current ones.
    pub secrets: Option<Arc<Bundle>>,
    /// Signal of the `signal` strategy when the container has no `dso.signal` label (a
    /// secret's `rotation.signal`).
    pub signal: Option<String>,
    /// How long a new container may take to become healthy when it has no
    /// `dso.health.timeout` label (`agent.rotation.health_check_timeout`).
    pub health_timeout: Option<Duration>,
}

impl std::fmt::Debug for RotateRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RotateRequest")
            .field("target", &self.target)
            .field("strategy", &self.strategy)
            .field(
                "env_names",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("merged", &self.merged)
            .field("secrets", &self.secrets)
            .field("signal", &self.signal)
            .field("health_timeout", &self.health_timeout)
            .finish_non_exhaustive()
    }
}

/// The result of a rotation request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RotationReport {
    /// Service rotated.
    pub service: ServiceKey,
    /// One report per container of the service.
    pub containers: Vec<ContainerReport>,
    /// Milliseconds for the whole request, including time queued.
    pub took_ms: u64,
    /// Names of the environment variables set in the new containers (values are never
    /// reported), after merging.
    #[serde(default)]
    pub env: Vec<String>,
    /// How many requests this rotation answers (1 unless later requests were merged).
    #[serde(default = "one")]
    pub requests: u32,
}

fn one() -> u32 {
    1
}

type Outcome = Result<RotationReport, Error>;

pub(crate) struct Inner<E: Engine> {
    pub(crate) engine: E,
    pub(crate) gateway: Gateway,
    pub(crate) journal: Journal,
    pub(crate) cfg: Config,
    /// One rotation per service at a time, later requests merged.
    pub(crate) queue: Arc<Queue<RotateRequest, Outcome>>,
    /// Makes rotation IDs unique within one millisecond.
    seq: std::sync::atomic::AtomicU64,
    /// The last scan, for the secret side (which services consume what).
    scans: tokio::sync::watch::Sender<Option<Arc<Scan>>>,
    /// The relevant engine events [`Rotator::watch`] acted on, for the agent's event bus.
    pub(crate) engine_events: tokio::sync::broadcast::Sender<crate::engine::Event>,
    /// Whether the orphan sweep of agent start ran.
    swept: std::sync::atomic::AtomicBool,
    /// Instance directories the last scan's containers use.
    known_instances: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Remote engines: container ID → the `StartedAt` its files were uploaded for.
    uploaded: std::sync::Mutex<std::collections::HashMap<String, String>>,
    /// Rotations run, by strategy and result (`/metrics`).
    rotations: crate::counts::RotationCounts,
}

/// The rotator. Cheap to clone.
pub struct Rotator<E: Engine> {
    pub(crate) inner: Arc<Inner<E>>,
}

impl<E: Engine> Clone for Rotator<E> {
    fn clone(&self) -> Self {
        Rotator {
            inner: Arc::clone(&self.inner),
        }
    }
}

impl<E: Engine> std::fmt::Debug for Rotator<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotator")
            .field("state_dir", &self.inner.cfg.state_dir)
            .finish()
    }
}

impl<E: Engine> Rotator<E> {
    /// Opens the state directory, recovers interrupted rotations, and adopts the managed
    /// containers: listeners on their ports routing to the running containers. Nothing is
    /// rotated. Returns the rotator and what recovery did.
    pub async fn start(engine: E, proxy: Proxy, cfg: Config) -> Result<(Self, Vec<Recovered>), Error> {
        let journal =
            Journal::open(&cfg.state_dir).map_err(|e| Error::state("opening state directory", e))?;
        let recovered = recovery::recover_all(&engine, &journal, &cfg.state_dir).await?;
        let r = Rotator {
            inner: Arc::new(Inner {
                engine,
                gateway: Gateway::new(proxy),
                journal,
                cfg,
                queue: Arc::default(),
                seq: Default::default(),
                scans: tokio::sync::watch::Sender::new(None),
                engine_events: tokio::sync::broadcast::channel(256).0,
                swept: Default::default(),
                known_instances: Default::default(),
                uploaded: Default::default(),
                rotations: Default::default(),
            }),
        };
        r.reconcile().await?;
        Ok((r, recovered))
    }

    /// The gateway (listeners per service).
    pub fn gateway(&self) -> &Gateway {
        &self.inner.gateway
    }

    /// Whether a rotation of `key` runs now (its old and new containers may both exist).
    pub fn is_rotating(&self, key: &ServiceKey) -> bool {
        self.inner.queue.is_busy(key)
    }

    /// The engine.
    pub fn engine(&self) -> &E {
        &self.inner.engine
    }

    /// Rescans and brings every listener and route in line with the running containers.
    /// Services with a rotation in progress are left to it.
    pub async fn reconcile(&self) -> Result<Scan, Error> {
        let scan = discovery::scan(&self.inner.engine, self.inner.cfg.scope.as_ref()).await?;
        let gw = &self.inner.gateway;
        // A container of a rotating service's route that was removed (by hand, or by a
        // `docker compose up` during the rotation) leaves the route at once.
        let exists = |id: &str| {
            scan.services
                .values()
                .any(|m| m.containers.iter().any(|c| c.id == id))
        };
        for key in gw.services() {
            if self.inner.queue.is_busy(&key) {
                gw.drop_missing(&key, exists).await;
            }
        }
        for m in scan.services.values() {
            if self.inner.queue.is_busy(&m.key) {
                continue;
            }
            let timing = rotation::timing(&m.spec, self.inner.cfg.stop_grace);
            if let Err(e) = gw.install(&m.key, &m.spec.ports, m.members(), timing).await {
                warn!(service = %m.key, error = %e, "cannot route service");
            }
        }
        // Services whose containers are all gone: no route now, no port after the grace.
        let queue = &self.inner.queue;
        gw.mark_gone(|k| scan.services.contains_key(k) || queue.is_busy(k))
            .await;
        gw.release_gone(self.inner.cfg.release_grace);
        if let Some(d) = &self.inner.cfg.delivery {
            // Directories no container uses any more (removed outside a rotation, or left
            // by a crash). Skipped while a container is left out for a label error: it may
            // still use one.
            if scan.errors.is_empty() {
                let referenced: std::collections::HashSet<String> = scan
                    .services
                    .values()
                    .flat_map(|m| m.containers.iter())
                    .filter_map(|c| Delivery::instance_of(c).map(str::to_owned))
                    .collect();
                // A directory whose container was seen by the last scan and is gone now
                // goes at once (`docker rm`, `compose down`).
                let gone: Vec<String> = {
                    let mut known = self
                        .inner
                        .known_instances
                        .lock()
                        .unwrap_or_else(|e| e.into_inner());
                    let gone = known.difference(&referenced).cloned().collect();
                    known.clone_from(&referenced);
                    gone
                };
                for i in gone {
                    if d.store().exists(&i) {
                        wipe_instance(&self.inner.engine, d, &i).await;
                        info!(instance = %i, "wiped the secret directory of a removed container");
                    }
                }
                // At start no rotation is writing a directory yet: every orphan goes; later
                // only those old enough not to belong to a container being created.
                let first = !self.inner.swept.swap(true, std::sync::atomic::Ordering::Relaxed);
                let min_age = if first { Duration::ZERO } else { SWEEP_MIN_AGE };
                for i in d.orphans(&referenced, min_age) {
                    wipe_instance(&self.inner.engine, d, &i).await;
                    info!(instance = %i, "wiped an orphaned secret directory");
                }
            }
        }
        if let Some(d) = &self.inner.cfg.delivery
            && d.is_remote()
        {
            self.reupload(d, &scan).await;
        }
        let scan = Arc::new(scan);
        self.inner.scans.send_replace(Some(Arc::clone(&scan)));
        Ok(Arc::unwrap_or_clone(scan))
    }

    /// Remote engines: a delivered container started again since its files were uploaded
    /// (`docker restart`, a host reboot) has empty tmpfs volumes and a launcher waiting for
    /// them: its files are uploaded again from the store. Uploading twice is harmless (the
    /// same files), so a container seen for the first time (agent start) gets one upload.
    async fn reupload(&self, d: &Delivery, scan: &Scan) {
        let running: Vec<&crate::engine::Container> = scan
            .services
            .values()
            .flat_map(|m| m.containers.iter())
            .filter(|c| c.running)
            .collect();
        for c in &running {
            let Some(inst) = Delivery::instance_of(c).filter(|i| d.store().exists(i)) else {
                continue;
            };
            let seen = self
                .inner
                .uploaded
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&c.id)
                .cloned();
            if seen.as_deref() == Some(c.process.started_at.as_str()) {
                continue;
            }
            let result = async {
                for v in d.archives(c, inst).map_err(Error::delivery)? {
                    self.inner
                        .engine
                        .put_archive(&c.id, &v.target, v.archive())
                        .await?;
                }
                Ok::<(), Error>(())
            }
            .await;
            match result {
                Ok(()) => {
                    if seen.is_some() {
                        info!(container = %c.name, "container started again: its secret files were uploaded again");
                    }
                    self.inner
                        .uploaded
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(c.id.clone(), c.process.started_at.clone());
                }
                Err(e) => {
                    warn!(container = %c.name, error = %e, "cannot upload the secret files of a started container; retried at the next scan")
                }
            }
        }
        self.inner
            .uploaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|id, _| running.iter().any(|c| c.id == *id));
    }

    /// Rotations run since the rotator started, by strategy and result.
    pub fn rotation_counts(&self) -> &crate::counts::RotationCounts {
        &self.inner.rotations
    }

    /// Follows the rotator's scans (each reconcile publishes one): which services and
    /// containers exist, for the secret side's consumers.
    pub fn subscribe_scans(&self) -> tokio::sync::watch::Receiver<Option<Arc<Scan>>> {
        self.inner.scans.subscribe()
    }

    /// Follows the relevant engine events (start, die, destroy, health status...) of
    /// managed containers, each sent once [`Rotator::watch`] has reconciled after it (so
    /// the scan of [`Rotator::subscribe_scans`] already shows a container it started).
    pub fn subscribe_engine_events(&self) -> tokio::sync::broadcast::Receiver<crate::engine::Event> {
        self.inner.engine_events.subscribe()
    }

    /// Rotates the service `req.target` names: every container of it, one after the
    /// other. Waits behind a rotation of the same service in progress; requests that
    /// arrive while one already waits are merged into it.
    pub async fn rotate(&self, req: RotateRequest) -> Result<RotationReport, Error> {
        let scan = discovery::scan(&self.inner.engine, self.inner.cfg.scope.as_ref()).await?;
        let key = scan.find(&req.target)?.key.clone();
        let me = self.clone();
        let queued_at = tokio::time::Instant::now();
        let k = key.clone();
        let mut out = self
            .inner
            .queue
            .submit(key, req, merge, move |req| {
                let me = me.clone();
                let k = k.clone();
                async move { me.run(k, req).await }
            })
            .await
            .unwrap_or_else(|| {
                Err(Error::State {
                    what: "rotation".to_owned(),
                    message: "the rotation task panicked; see the agent log".to_owned(),
                })
            });
        if let Ok(r) = &mut out {
            r.took_ms = ms(queued_at.elapsed());
        }
        out
    }

    async fn run(&self, key: ServiceKey, req: RotateRequest) -> Outcome {
        let started = tokio::time::Instant::now();
        let started_at_ms = now_ms();
        let _lock = ServiceLock::acquire(&self.inner.cfg.state_dir, &key)
            .await
            .map_err(|e| Error::state("service lock", e))?;
        // A rotation of this service left unfinished (a failed recovery, or another process
        // killed while holding the lock) is finished before its journal is reused.
        let pending = self
            .inner
            .journal
            .interrupted()
            .map_err(|e| Error::state("reading journal", e))?;
        for rec in pending.into_iter().filter(|r| r.service == key) {
            recovery::recover(&self.inner.engine, &self.inner.journal, rec).await?;
        }
        // Fresh state: the service may have changed while the request waited.
        let scan = discovery::scan(&self.inner.engine, self.inner.cfg.scope.as_ref()).await?;
        let m = scan.services.get(&key).cloned().ok_or_else(|| Error::NotFound {
            target: key.to_string(),
            known: scan.names(),
        })?;
        let mut reports = Vec::new();
        let mut attempted = String::new();
        let mut result = Ok(());
        if !m.containers.iter().any(|c| c.running) {
            // Doing nothing is not reported as a rotation done.
            result = Err(Error::NothingRunning {
                service: key.to_string(),
            });
        }
        for c in m.containers.iter().filter(|c| c.running) {
            match self.rotate_one(&m, c.clone(), &req, &mut attempted).await {
                Ok(r) => reports.push(r),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        let (res, err) = match &result {
            Ok(()) => (RotationResult::Done, None),
            Err(Error::Refused { .. }) => (
                RotationResult::Refused,
                result.as_ref().err().map(ToString::to_string),
            ),
            Err(e) => (RotationResult::Failed, Some(e.to_string())),
        };
        let history = History {
            // A failed rotation has no report: its ID is the one it was attempted under.
            rotation: reports.last().map_or(attempted, |r| r.rotation.clone()),
            strategy: reports
                .last()
                .map_or(req.strategy.unwrap_or(m.spec.strategy), |r| r.strategy),
            result: res.as_str().to_owned(),
            error: err,
            started_at_ms,
            took_ms: ms(started.elapsed()),
            container: reports.last().map(|r| r.new_id.clone()),
        };
        self.inner.rotations.add(history.strategy, res);
        if let Err(e) = self.inner.journal.set_history(&key, &history) {
            warn!(service = %key, error = %e, "cannot write rotation history");
        }
        result?;
        Ok(RotationReport {
            service: key,
            containers: reports,
            took_ms: 0,
            env: req.env.iter().map(|(k, _)| k.clone()).collect(),
            requests: req.merged.saturating_add(1),
        })
    }

    async fn rotate_one(
        &self,
        m: &Managed,
        blue: crate::engine::Container,
        req: &RotateRequest,
        attempted: &mut String,
    ) -> Result<ContainerReport, Error> {
        let inner = &self.inner;
        let delivery = inner.cfg.delivery.clone();
        // The request's health wait applies where the container's label does not set one.
        let spec_owned;
        let mut m = m;
        if let Some(t) = req.health_timeout
            && !blue.labels.contains_key(crate::labels::HEALTH_TIMEOUT)
        {
            let mut copy = m.clone();
            copy.spec.health_timeout = t;
            spec_owned = copy;
            m = &spec_owned;
        }
        let mut strategy = strategy::resolve(&m.key, &blue, &m.spec, req.strategy)?;
        if let (Some(d), Some(bundle), Strategy::Signal | Strategy::None) =
            (&delivery, &req.secrets, strategy)
        {
            if d.can_update_in_place(&blue) {
                // The files change under the running container; `signal` then tells it.
                d.update_in_place(&blue, bundle).map_err(Error::delivery)?;
                if d.is_remote()
                    && let Some(inst) = Delivery::instance_of(&blue)
                {
                    for v in d.archives(&blue, inst).map_err(Error::delivery)? {
                        inner.engine.put_archive(&blue.id, &v.target, v.archive()).await?;
                    }
                }
                info!(service = %m.key, container = %blue.name, "secret files updated in place");
            } else {
                // First delivery: the container was not created with dso's mounts (or
                // holds its values in Config.Env), so one replacement gives it them.
                let replace = strategy::resolve(&m.key, &blue, &m.spec, Some(Strategy::Auto))?;
                info!(service = %m.key, container = %blue.name, strategy = %replace, "first delivery of its secrets: one {replace} rotation, since the container has no dso secret directory to update in place");
                strategy = replace;
            }
        }
        if matches!(strategy, Strategy::Rolling | Strategy::Restart) {
            // Without its listeners a rotation neither holds nor swaps: clients would be
            // cut off while the report says zero downtime.
            inner.gateway.check_bound(&m.key, &m.spec.ports)?;
        }
        let n = inner.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let rotation = format!("{:x}{n}", now_ms());
        attempted.clone_from(&rotation);
        match strategy {
            Strategy::Rolling | Strategy::Restart => {
                let prepared = match &delivery {
                    Some(d) => d
                        .plan(&blue, req.secrets.as_deref(), &rotation)
                        .map_err(Error::delivery)?,
                    None => None,
                };
                let blue_instance = Delivery::instance_of(&blue).map(str::to_owned);
                let green_instance = prepared.as_ref().map(|p| p.instance.clone());
                let blue_uploads = match (&delivery, &blue_instance) {
                    (Some(d), Some(inst)) if strategy == Strategy::Restart && d.is_remote() => {
                        d.archives(&blue, inst).map_err(Error::delivery)?
                    }
                    _ => Vec::new(),
                };
                let mut run = Run::begin(
                    &inner.engine,
                    &inner.gateway,
                    &inner.journal,
                    &m.key,
                    &m.spec,
                    blue,
                    strategy,
                    rotation,
                    &req.env,
                    inner.cfg.stop_grace,
                    req.progress.as_ref(),
                    req.hooks,
                )?;
                run.prepared = prepared;
                run.blue_uploads = blue_uploads;
                let result = if strategy == Strategy::Rolling {
                    rolling::run(&mut run).await
                } else {
                    restart::run(&mut run).await
                };
                if let Some(d) = &delivery {
                    // Whichever side is gone loses its directory: blue after a rotation,
                    // green after a rollback. A side that still exists keeps it.
                    for inst in [&blue_instance, &green_instance].into_iter().flatten() {
                        match inner.engine.list_labeled(LABEL_INSTANCE, inst).await {
                            Ok(users) if users.is_empty() => wipe_instance(&inner.engine, d, inst).await,
                            Ok(_) => {}
                            Err(e) => {
                                warn!(instance = %inst, error = %e, "cannot tell whether a secret directory is still used; the sweep will")
                            }
                        }
                    }
                }
                match result {
                    Ok(green) => Ok(run.into_report(strategy, green)),
                    Err(e) => {
                        if !run.entry.last().step.is_terminal() {
                            // Past the point of no return, or a rollback that did not
                            // complete: recovery brings the service to one container now.
                            warn!(service = %m.key, error = %e, "rotation left unfinished; recovering");
                            let rec = run.entry.last().clone();
                            drop(run);
                            recovery::recover(&inner.engine, &inner.journal, rec).await?;
                            let scan = discovery::scan(&inner.engine, inner.cfg.scope.as_ref()).await?;
                            if let Some(now) = scan.services.get(&m.key) {
                                let timing = rotation::timing(&now.spec, inner.cfg.stop_grace);
                                inner
                                    .gateway
                                    .install(&m.key, &now.spec.ports, now.members(), timing)
                                    .await?;
                            }
                            // A restart may have left the listeners holding.
                            inner.gateway.resume(&m.key)?;
                        }
                        Err(e)
                    }
                }
            }
            Strategy::Signal | Strategy::None if !req.env.is_empty() => Err(Error::Refused {
                service: m.key.to_string(),
                strategy: strategy.to_string(),
                reason: format!(
                    "--env values ({}) need a new container, and {strategy} keeps the running one",
                    req.env
                        .iter()
                        .map(|(k, _)| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                hint: "use --strategy rolling or restart, or leave out --env".to_owned(),
            }),
            Strategy::Signal => {
                let signal = match &req.signal {
                    Some(s) if !blue.labels.contains_key(crate::labels::SIGNAL) => s.clone(),
                    _ => m.spec.signal.clone(),
                };
                inner.engine.signal(&blue.id, &signal).await?;
                let p = Progress {
                    rotation: rotation.clone(),
                    step: Step::Done,
                    elapsed_ms: 0,
                    detail: format!("sent {signal} to {}", blue.name),
                };
                if let Some(tx) = &req.progress {
                    let _ = tx.send(p.clone());
                }
                Ok(ContainerReport {
                    rotation,
                    strategy,
                    name: blue.name.clone(),
                    old_id: blue.id.clone(),
                    new_id: blue.id,
                    steps: vec![p],
                    took_ms: 0,
                    serving_after_ms: None,
                })
            }
            Strategy::None | Strategy::Auto => Ok(ContainerReport {
                rotation,
                strategy: Strategy::None,
                name: blue.name.clone(),
                old_id: blue.id.clone(),
                new_id: blue.id,
                steps: Vec::new(),
                took_ms: 0,
                serving_after_ms: None,
            }),
        }
    }
}

/// Wipes an instance's directory, and on a remote engine removes its volumes first (the
/// container using them is gone).
async fn wipe_instance<E: Engine>(engine: &E, d: &Delivery, instance: &str) {
    if d.is_remote() {
        for g in d.store().groups(instance).unwrap_or_default() {
            if let Err(e) = engine.remove_volume(&volume_name(instance, &g)).await {
                warn!(instance, error = %e, "cannot remove a secret volume");
            }
        }
    }
    d.wipe(instance);
}

/// Later requests win: their environment values replace earlier ones of the same name,
/// and a strategy they name replaces the earlier one, except that a strategy that cannot
/// apply environment values (`signal`, `none`) never replaces one that can while values
/// are pending: the values of the earlier callers are not dropped. Every caller receives
/// the merged rotation's report, which names the variables applied and the requests
/// merged.
fn merge(a: &mut RotateRequest, b: RotateRequest) {
    a.merged = a.merged.saturating_add(b.merged.max(1));
    // A later snapshot of a service's secrets is complete: it replaces the earlier one.
    if b.secrets.is_some() {
        a.secrets = b.secrets;
    }
    if b.signal.is_some() {
        a.signal = b.signal;
    }
    if b.health_timeout.is_some() {
        a.health_timeout = b.health_timeout;
    }
    let brings_env = !b.env.is_empty();
    for (k, v) in b.env {
        a.env.retain(|(x, _)| *x != k);
        a.env.push((k, v));
    }
    match b.strategy {
        Some(s)
            if !a.env.is_empty() && !replaces_container(s) && a.strategy.is_none_or(replaces_container) =>
        {
            warn!(strategy = %s, "merged request: --strategy {s} cannot apply the pending --env values; keeping the strategy that replaces the container");
        }
        Some(s) => a.strategy = Some(s),
        // Values arrive for a waiting request that keeps the container: the later request
        // (which named no strategy) gets the label's, which can apply them.
        None if brings_env && a.strategy.is_some_and(|s| !replaces_container(s)) => {
            warn!(
                "merged request: --env values arrived; the earlier request's strategy cannot apply them and is dropped for the label's"
            );
            a.strategy = None;
        }
        None => {}
    }
    if a.progress.is_none() {
        a.progress = b.progress;
    }
}

/// Whether `s` creates a new container (and so can apply environment values). `auto`
/// resolves to `rolling` or `restart`.
fn replaces_container(s: Strategy) -> bool {
    matches!(s, Strategy::Rolling | Strategy::Restart | Strategy::Auto)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DockerHealth;
    use crate::fake::Fake;
    use dso_proxy::ProxyConfig;
    use std::collections::BTreeMap;

    const LABELS: &[(&str, &str)] = &[
        ("dso.reloader", "true"),
        ("dso.host_ports", "127.0.0.1:0:8080"),
        ("dso.health.timeout", "300ms"),
        ("dso.drain.timeout", "1s"),
    ];

    async fn rotator(fake: Fake) -> (Rotator<Fake>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let (r, rec) = Rotator::start(fake, Proxy::new(ProxyConfig::default()), Config::new(dir.path()))
            .await
            .unwrap();
        assert!(rec.is_empty());
        (r, dir)
    }

    fn calls(r: &Rotator<Fake>) -> Vec<String> {
        r.engine().calls.lock().unwrap().clone()
    }

    #[tokio::test]
    async fn a_container_removed_during_a_rotation_leaves_the_route_at_once() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let key = ServiceKey::of("web", &Default::default());
        let rot = r.clone();
        let task = tokio::spawn(async move {
            rot.rotate(RotateRequest {
                target: "web".into(),
                hooks: Hooks {
                    freeze_after: Some(Step::Swapped),
                },
                ..Default::default()
            })
            .await
        });
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while r.gateway().members(&key).first().is_none_or(|m| m.id == "blue") {
            assert!(std::time::Instant::now() < deadline, "never swapped");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let green = r.gateway().members(&key)[0].id.clone();
        assert!(r.is_rotating(&key));
        // Compose's `up` removes the newer of the two containers with the same labels.
        r.engine().containers.lock().unwrap().remove(&green);
        r.reconcile().await.unwrap();
        assert!(
            r.gateway().members(&key).is_empty(),
            "the removed green left the route"
        );
        let l = &r.gateway().listeners(&key)[0];
        assert!(l.snapshot().backends.is_empty(), "nothing is dialed");
        task.abort();
    }

    #[tokio::test]
    async fn a_restart_holding_while_blue_is_removed_keeps_its_hold() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let key = ServiceKey::of("web", &Default::default());
        let rot = r.clone();
        let task = tokio::spawn(async move {
            rot.rotate(RotateRequest {
                target: "web".into(),
                strategy: Some(Strategy::Restart),
                hooks: Hooks {
                    freeze_after: Some(Step::BlueRenamed),
                },
                ..Default::default()
            })
            .await
        });
        let l = r.gateway().listeners(&key)[0].clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !r.engine().names().iter().any(|(n, _)| n != "web") {
            assert!(std::time::Instant::now() < deadline, "blue never renamed aside");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(l.snapshot().mode, "hold");
        // The held blue removed by hand: the hold stays (nothing is dialed while it holds).
        r.engine().containers.lock().unwrap().clear();
        r.reconcile().await.unwrap();
        let l = &r.gateway().listeners(&key)[0];
        assert_eq!(l.snapshot().mode, "hold", "the hold survives the rescan");
        task.abort();
    }

    #[tokio::test]
    async fn a_project_taken_down_releases_its_ports_at_once_and_only_its_own() {
        let f = Fake::default();
        let shop = [
            LABELS,
            &[
                ("com.docker.compose.project", "shop"),
                ("com.docker.compose.service", "web"),
            ],
        ]
        .concat();
        let other = [
            LABELS,
            &[
                ("com.docker.compose.project", "other"),
                ("com.docker.compose.service", "web"),
            ],
        ]
        .concat();
        f.add("a", "shop-web-1", &shop, true);
        f.add("b", "other-web-1", &other, true);
        let (r, _dir) = rotator(f).await;
        let key = |p: &str| ServiceKey {
            project: p.into(),
            service: "web".into(),
        };
        let addr = r.gateway().listeners(&key("shop"))[0].local_addr();
        // Still running: not gone, nothing released.
        assert!(
            r.gateway()
                .release_gone_now(|k| k.project == "shop")
                .await
                .is_empty()
        );
        r.engine().containers.lock().unwrap().clear();
        r.reconcile().await.unwrap();
        let released = r.gateway().release_gone_now(|k| k.project == "shop").await;
        assert_eq!(released, [(key("shop"), vec!["shop/web:8080".to_owned()])]);
        assert!(r.gateway().listeners(&key("shop")).is_empty());
        assert_eq!(
            r.gateway().listeners(&key("other")).len(),
            1,
            "another project keeps its grace"
        );
        assert!(r.gateway().proxy().listener("shop/web:8080").is_err());
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while std::net::TcpListener::bind(addr).is_err() {
            assert!(std::time::Instant::now() < deadline, "port {addr} never released");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn rolling_runs_its_steps_in_order_and_swaps_the_route() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let key = ServiceKey::of("web", &Default::default());
        assert_eq!(r.gateway().members(&key)[0].id, "blue");
        let report = r
            .rotate(RotateRequest {
                target: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let c = &report.containers[0];
        let steps: Vec<Step> = c.steps.iter().map(|s| s.step).collect();
        use Step::*;
        assert_eq!(
            steps,
            [
                Begin,
                GreenCreated,
                GreenStarted,
                GreenHealthy,
                Swapped,
                Drained,
                BlueRemoved,
                GreenRenamed,
                Done
            ]
        );
        assert_eq!(r.gateway().members(&key)[0].id, c.new_id);
        let rid = &c.rotation;
        assert_eq!(
            calls(&r),
            [
                format!("create web-dso-{rid}"),
                "start green1".into(),
                "stop blue".into(),
                "remove blue".into(),
                "rename green1 web".into()
            ]
        );
        assert_eq!(r.engine().names(), vec![("web".to_owned(), true)]);
        let st = r.status().await.unwrap();
        assert_eq!(st[0].last.as_ref().unwrap().result, "done");
        assert_eq!(st[0].containers, vec!["web (green1)".to_owned()]);
    }

    #[tokio::test]
    async fn a_green_that_never_turns_healthy_is_removed_and_blue_keeps_serving() {
        let f = Fake {
            clone_health: Some(DockerHealth::Unhealthy),
            ..Default::default()
        };
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let err = r
            .rotate(RotateRequest {
                target: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unhealthy { .. }), "{err}");
        assert_eq!(r.engine().names(), vec![("web".to_owned(), true)]);
        assert!(calls(&r).contains(&"remove green1".to_owned()));
        assert!(
            !calls(&r).iter().any(|c| c.contains("blue")),
            "blue untouched: {:?}",
            calls(&r)
        );
        let key = ServiceKey::of("web", &Default::default());
        assert_eq!(r.gateway().members(&key)[0].id, "blue");
    }

    #[tokio::test]
    async fn an_incomplete_rollback_is_finished_by_recovery_at_once() {
        let f = Fake {
            clone_health: Some(DockerHealth::Unhealthy),
            ..Default::default()
        };
        f.fail_remove_once
            .store(true, std::sync::atomic::Ordering::SeqCst);
        f.add("blue", "web", LABELS, true);
        let (r, dir) = rotator(f).await;
        let err = r
            .rotate(RotateRequest {
                target: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unhealthy { .. }), "{err}");
        assert_eq!(
            r.engine().names(),
            vec![("web".to_owned(), true)],
            "green removed by recovery"
        );
        let removes = calls(&r).iter().filter(|c| *c == "remove green1").count();
        assert_eq!(removes, 2, "{:?}", calls(&r));
        let j = Journal::open(dir.path()).unwrap();
        assert!(j.interrupted().unwrap().is_empty(), "journal closed by recovery");
    }

    #[tokio::test]
    async fn a_failed_create_leaves_blue_alone_and_unknown_targets_name_the_services() {
        let f = Fake {
            fail_create: true,
            ..Default::default()
        };
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let req = |t: &str| RotateRequest {
            target: t.into(),
            ..Default::default()
        };
        assert!(matches!(r.rotate(req("web")).await, Err(Error::Engine(_))));
        assert_eq!(r.engine().names(), vec![("web".to_owned(), true)]);
        let e = r.rotate(req("nope")).await.unwrap_err().to_string();
        assert!(e.contains("nope") && e.contains("web"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broken_event_stream_reconnects_with_backoff_and_rescans() {
        use std::sync::atomic::Ordering::SeqCst;
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let after_start = r.engine().lists.load(SeqCst);
        let stop = tokio_util::sync::CancellationToken::new();
        let w = tokio::spawn({
            let r = r.clone();
            let stop = stop.clone();
            async move { r.watch(stop).await }
        });
        // The fake's stream ends at once: rescans at 0, 0.2, 0.6, 1.4 and 3.0 s.
        tokio::time::sleep(Duration::from_millis(3100)).await;
        stop.cancel();
        w.await.unwrap();
        assert_eq!(r.engine().lists.load(SeqCst) - after_start, 5);
    }

    #[tokio::test]
    async fn a_service_with_nothing_running_is_an_error_not_a_done_rotation() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, false);
        let (r, _dir) = rotator(f).await;
        let err = r
            .rotate(RotateRequest {
                target: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NothingRunning { .. }), "{err}");
        let last = r.status().await.unwrap()[0].last.clone().unwrap();
        assert_eq!(last.result, "failed");
        use crate::counts::RotationResult::Failed;
        assert_eq!(
            r.rotation_counts().get(last.strategy, Failed),
            1,
            "counted as its history says"
        );
    }

    #[tokio::test]
    async fn signal_and_none_do_not_replace_the_container() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let req = |s| RotateRequest {
            target: "web".into(),
            strategy: Some(s),
            ..Default::default()
        };
        let rep = r.rotate(req(Strategy::Signal)).await.unwrap();
        assert_eq!(rep.containers[0].new_id, "blue");
        assert_eq!(calls(&r), ["signal blue SIGHUP"]);
        r.rotate(req(Strategy::None)).await.unwrap();
        assert_eq!(calls(&r).len(), 1);
        let n = r.rotation_counts();
        use crate::counts::RotationResult::{Done, Failed};
        assert_eq!(n.get(Strategy::Signal, Done), 1);
        assert_eq!(n.get(Strategy::None, Done), 1);
        assert_eq!(
            n.get(Strategy::Rolling, Done) + n.get(Strategy::Signal, Failed),
            0
        );
    }

    #[test]
    fn a_later_strategy_that_cannot_apply_env_values_does_not_drop_them() {
        let req = |s: Option<Strategy>, env: &[(&str, &str)]| RotateRequest {
            target: "web".into(),
            strategy: s,
            env: env.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            ..Default::default()
        };
        let mut a = req(Some(Strategy::Rolling), &[("K", "1")]);
        merge(&mut a, req(Some(Strategy::Signal), &[]));
        assert_eq!(a.strategy, Some(Strategy::Rolling));
        assert_eq!(a.env, vec![("K".to_owned(), "1".to_owned())]);
        merge(&mut a, req(Some(Strategy::Restart), &[("K", "2"), ("L", "3")]));
        assert_eq!(
            a.strategy,
            Some(Strategy::Restart),
            "a later replacing strategy wins"
        );
        assert_eq!(a.env.len(), 2);
        assert_eq!(a.merged, 2);
        // Without pending values the later strategy wins as before.
        let mut b = req(None, &[]);
        merge(&mut b, req(Some(Strategy::Signal), &[]));
        assert_eq!(b.strategy, Some(Strategy::Signal));
        // Values arriving after a signal request: the label's strategy applies them.
        merge(&mut b, req(None, &[("K", "1")]));
        assert_eq!(b.strategy, None);
        assert_eq!(b.env.len(), 1);
    }

    #[tokio::test]
    async fn env_values_with_a_strategy_that_keeps_the_container_are_refused() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        for s in [Strategy::Signal, Strategy::None] {
            let err = r
                .rotate(RotateRequest {
                    target: "web".into(),
                    strategy: Some(s),
                    env: vec![("TOKEN".into(), "v".into())],
                    ..Default::default()
                })
                .await
                .unwrap_err();
            let msg = err.to_string();
            assert!(
                matches!(err, Error::Refused { .. }) && msg.contains("TOKEN"),
                "{msg}"
            );
            assert!(!msg.contains("=v"), "no value in the error: {msg}");
        }
        assert!(calls(&r).is_empty(), "{:?}", calls(&r));
    }

    #[tokio::test]
    async fn the_report_names_the_variables_applied() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let (r, _dir) = rotator(f).await;
        let rep = r
            .rotate(RotateRequest {
                target: "web".into(),
                env: vec![("A".into(), "1".into())],
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(rep.env, ["A"]);
        assert_eq!(rep.requests, 1);
    }

    #[tokio::test]
    async fn a_hung_exec_probe_fails_a_restart_frees_the_service_and_restores_blue() {
        let f = Fake {
            exec_hangs: true,
            ..Default::default()
        };
        let mut labels = LABELS.to_vec();
        labels.push(("dso.health.exec", "/probe"));
        labels.push(("dso.update.strategy", "restart"));
        f.add("blue", "web", &labels, true);
        let (r, _dir) = rotator(f).await;
        let key = ServiceKey::of("web", &Default::default());
        let req = || RotateRequest {
            target: "web".into(),
            ..Default::default()
        };
        let err = tokio::time::timeout(Duration::from_secs(10), r.rotate(req()))
            .await
            .expect("the rotation ends by the health deadline")
            .unwrap_err();
        assert!(matches!(err, Error::Unhealthy { .. }), "{err}");
        assert!(err.to_string().contains("probe"), "{err}");
        assert_eq!(r.engine().names(), vec![("web".to_owned(), true)], "blue back");
        assert_eq!(r.gateway().members(&key)[0].id, "blue");
        assert!(!r.gateway().listeners(&key)[0].is_paused(), "hold ended");
        assert!(!r.inner.queue.is_busy(&key));
        // The lock is free: the next rotation runs (and fails the same way) at once.
        let again = tokio::time::timeout(Duration::from_secs(10), r.rotate(req())).await;
        assert!(again.is_ok(), "second rotation not blocked");
    }

    #[tokio::test]
    async fn restart_with_replicas_takes_the_member_out_and_holds_only_for_the_last() {
        let f = Fake::default();
        let mut labels = LABELS.to_vec();
        labels.push(("com.docker.compose.project", "p"));
        labels.push(("com.docker.compose.service", "web"));
        labels.push(("dso.update.strategy", "restart"));
        f.add("blue1", "p-web-1", &labels, true);
        f.add("blue2", "p-web-2", &labels, true);
        // Distinct addresses, so the route shows which member is in.
        f.containers.lock().unwrap().get_mut("blue2").unwrap().networks =
            BTreeMap::from([("bridge".to_owned(), Some("127.0.0.10".parse().unwrap()))]);
        let (r, _dir) = rotator(f).await;
        let key = ServiceKey {
            project: "p".into(),
            service: "web".into(),
        };
        assert_eq!(r.gateway().members(&key).len(), 2);
        let rep = r
            .rotate(RotateRequest {
                target: "p/web".into(),
                ..Default::default()
            })
            .await
            .unwrap();
        let paused: Vec<&str> = rep
            .containers
            .iter()
            .map(|c| {
                c.steps
                    .iter()
                    .find(|s| s.step == Step::Paused)
                    .unwrap()
                    .detail
                    .as_str()
            })
            .collect();
        assert!(
            paused[0].contains("taken out of the route; 1 other"),
            "{paused:?}"
        );
        assert!(paused[1].contains("taken out of the route"), "{paused:?}");
        let l = &r.gateway().listeners(&key)[0];
        assert!(!l.is_paused());
        assert_eq!(l.snapshot().counters.held, 0);
        let ids: Vec<String> = r.gateway().members(&key).into_iter().map(|m| m.id).collect();
        assert_eq!(ids.len(), 2);
        assert!(ids.iter().all(|i| i.starts_with("green")), "{ids:?}");
    }

    #[tokio::test]
    async fn a_service_without_its_listener_refuses_to_rotate_and_status_says_why() {
        // Something else holds the port the label names.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let ports = format!("127.0.0.1:{port}:8080");
        let f = Fake::default();
        f.add(
            "blue",
            "web",
            &[
                ("dso.reloader", "true"),
                ("dso.host_ports", &ports),
                ("dso.update.strategy", "restart"),
            ],
            true,
        );
        let (r, _dir) = rotator(f).await;
        let err = r
            .rotate(RotateRequest {
                target: "web".into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("no listener") && msg.contains(&port.to_string()),
            "{msg}"
        );
        assert!(calls(&r).is_empty(), "nothing stopped: {:?}", calls(&r));
        let st = r.status().await.unwrap();
        assert!(st[0].error.as_ref().unwrap().contains("cannot listen"), "{st:?}");
    }

    #[tokio::test]
    async fn an_overflowing_label_is_an_error_of_that_service_only() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        f.add(
            "bad",
            "db",
            &[
                ("dso.reloader", "true"),
                ("dso.host_ports", "127.0.0.1:0:5432"),
                ("dso.health.timeout", "18446744073709551615s"),
            ],
            true,
        );
        let (r, _dir) = rotator(f).await;
        let st = r.status().await.unwrap();
        let db = st.iter().find(|s| s.service.service == "db").unwrap();
        let e = db.error.as_deref().unwrap();
        assert!(e.contains("dso.health.timeout") && e.contains("maximum"), "{e}");
        let web = st.iter().find(|s| s.service.service == "web").unwrap();
        assert!(web.error.is_none());
        assert_eq!(web.containers.len(), 1);
        r.rotate(RotateRequest {
            target: "web".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    }

    #[tokio::test]
    async fn no_running_member_clears_the_route_and_a_gone_service_releases_its_port() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::new(dir.path());
        cfg.release_grace = Duration::from_millis(300);
        let (r, _) = Rotator::start(f, Proxy::new(ProxyConfig::default()), cfg)
            .await
            .unwrap();
        let key = ServiceKey::of("web", &Default::default());
        let addr = r.gateway().listeners(&key)[0].local_addr();
        assert_eq!(r.gateway().listeners(&key)[0].snapshot().backends.len(), 1);
        r.engine()
            .containers
            .lock()
            .unwrap()
            .get_mut("blue")
            .unwrap()
            .running = false;
        r.reconcile().await.unwrap();
        let l = r.gateway().listeners(&key)[0].clone();
        assert!(l.snapshot().backends.is_empty(), "stopped blue is not dialed");
        assert_eq!(l.local_addr(), addr, "same port kept");
        // A client is closed at once (no backend), not held or dialed anywhere.
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::io::AsyncReadExt::read(&mut c, &mut buf),
        )
        .await
        .expect("closed promptly");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        r.engine().containers.lock().unwrap().clear();
        r.reconcile().await.unwrap();
        assert_eq!(r.gateway().services(), vec![key.clone()], "kept during the grace");
        tokio::time::sleep(Duration::from_millis(350)).await;
        r.reconcile().await.unwrap();
        assert!(r.gateway().services().is_empty());
        assert!(r.gateway().proxy().listeners().is_empty());
        // The socket closes once its accept loop has seen the stop.
        let mut bound = std::net::TcpListener::bind(addr);
        for _ in 0..100 {
            if bound.is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
            bound = std::net::TcpListener::bind(addr);
        }
        bound.expect("port released");
    }

    #[tokio::test]
    async fn a_listener_left_in_the_proxy_is_swapped_to_the_members_not_reused_as_is() {
        let f = Fake::default();
        f.add("blue", "web", LABELS, true);
        let proxy = Proxy::new(ProxyConfig::default());
        // Left by an earlier install that failed half-way: right name, stale route.
        let stale = dso_proxy::Backend::labeled("127.0.0.200:8080".parse().unwrap(), "stale");
        proxy
            .add_listener(dso_proxy::ListenerConfig::new(
                "web:8080".to_owned(),
                "127.0.0.1:0".parse().unwrap(),
                vec![stale],
            ))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (r, _) = Rotator::start(f, proxy, Config::new(dir.path())).await.unwrap();
        let key = ServiceKey::of("web", &Default::default());
        let snap = r.gateway().listeners(&key)[0].snapshot();
        let addrs: Vec<String> = snap.backends.iter().map(|b| b.addr.to_string()).collect();
        assert_eq!(addrs, ["127.0.0.9:8080"], "routed to blue, not the stale backend");
    }
}
