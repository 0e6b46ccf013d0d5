//! The agent's Docker side: the `dso-rotator` it hosts (unless started with `--no-docker`),
//! the rotations requested through the control API, tracked so `dso rotate` can show each
//! step as it happens.
//!
//! Every rotation (asked through the API, triggered by a secret change, or finished by
//! recovery) goes through here, so this is where the event bus hears of rotations
//! (`rotation.*`) and of the engine events of managed containers (`docker.container`);
//! kinds and fields are in docs/api.md.
//!
//! step as it happens, and the [`DockerSlot`] that holds it: an agent whose engine does not
//! answer serves its listeners and API anyway and starts the Docker side once it does.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::Context;
use dso_proxy::Proxy;
use dso_rotator::delivery::declared::LABEL_REFS;
use dso_rotator::journal::Step;
use dso_rotator::labels;
use dso_rotator::{
    Config, DockerEngine, Engine, Progress, RotateRequest, RotationReport, Rotator, ServiceKey, Strategy,
};
use serde::Serialize;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::events::Bus;

/// How many finished rotations the agent remembers for `GET /v1/rotations`.
const KEEP: usize = 64;

/// The first wait between two attempts to reach the engine; doubled after each failure.
const RETRY_FIRST: Duration = Duration::from_secs(1);
/// The longest wait between two attempts.
const RETRY_MAX: Duration = Duration::from_secs(30);
/// How long one attempt may take to connect (a socket that accepts and never answers).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The engine address the agent uses: `DOCKER_HOST`, else the default socket.
pub fn engine_address() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_owned())
}

/// What the agent's Docker side needs to start; kept for the retries.
#[derive(Debug, Clone)]
pub struct StartParams {
    /// The agent's proxy (the rotator adds the services' listeners to it).
    pub proxy: Proxy,
    /// Journal, history and locks.
    pub state_dir: PathBuf,
    /// `--docker-scope`.
    pub scope: Option<(String, String)>,
    /// The delivery store and `agent.delivery.remote`, when secrets are delivered.
    pub delivery: Option<(Arc<dso_rotator::delivery::Delivery>, Option<bool>)>,
    /// The agent's event bus.
    pub events: Bus,
}

/// Holds the agent's Docker side, which may start after the API: off (`--no-docker`),
/// waiting for the engine (with the last error and the next retry), or running. Handlers
/// read it on each request; clones share it.
#[derive(Debug, Clone)]
pub struct DockerSlot(Arc<SlotInner>);

#[derive(Debug)]
struct SlotInner {
    /// Whether the agent manages Docker at all.
    enabled: bool,
    /// Set once, when the rotator has adopted the managed containers.
    ready: OnceLock<Arc<Docker>>,
    /// The last failed attempt, while not ready.
    waiting: Mutex<Option<Waiting>>,
}

/// The last failed attempt to start the Docker side.
#[derive(Debug, Clone)]
struct Waiting {
    engine: String,
    error: String,
    attempts: u32,
    /// When the next attempt starts.
    retry_at: Instant,
}

/// Why the Docker side cannot answer a request.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unavailable {
    /// The agent was started with `--no-docker` or `DSO_DOCKER=0`.
    #[error(
        "the agent runs without Docker (--no-docker or DSO_DOCKER=0); restart it without them, or with `dso agent --docker`"
    )]
    Off,
    /// The engine has not answered yet: what was tried, the error, the next retry.
    #[error("docker: {0}")]
    Waiting(String),
}

impl DockerSlot {
    /// A slot for an agent without Docker.
    pub fn off() -> DockerSlot {
        DockerSlot::new(false)
    }

    fn new(enabled: bool) -> DockerSlot {
        DockerSlot(Arc::new(SlotInner {
            enabled,
            ready: OnceLock::new(),
            waiting: Mutex::new(None),
        }))
    }

    /// The running Docker side, or why there is none.
    pub fn get(&self) -> Result<Arc<Docker>, Unavailable> {
        if let Some(d) = self.0.ready.get() {
            return Ok(Arc::clone(d));
        }
        if !self.0.enabled {
            return Err(Unavailable::Off);
        }
        Err(Unavailable::Waiting(self.describe_waiting()))
    }

    /// The running Docker side, if any.
    pub fn ready(&self) -> Option<Arc<Docker>> {
        self.0.ready.get().cloned()
    }

    fn describe_waiting(&self) -> String {
        match self.lock().clone() {
            None => format!("connecting to the engine at {}", engine_address()),
            Some(w) => {
                let left = w.retry_at.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    format!(
                        "waiting for the engine at {}: {}; retrying now (attempt {})",
                        w.engine,
                        w.error,
                        w.attempts + 1
                    )
                } else {
                    format!(
                        "waiting for the engine at {}: {}; retry in {}s",
                        w.engine,
                        w.error,
                        left.as_secs_f64().ceil() as u64
                    )
                }
            }
        }
    }

    /// The Docker side as `/v1/health` shows it: `state` is `off`, `starting`,
    /// `waiting` or `ready`; `message` says what it waits for.
    pub fn health(&self) -> serde_json::Value {
        if let Some(d) = self.0.ready.get() {
            return serde_json::json!({
                "state": "ready",
                "engine": engine_address(),
                "api": d.rotator.engine().api_version(),
            });
        }
        if !self.0.enabled {
            return serde_json::json!({ "state": "off", "message": Unavailable::Off.to_string() });
        }
        let w = self.lock().clone();
        let message = self.describe_waiting();
        match w {
            None => {
                serde_json::json!({ "state": "starting", "engine": engine_address(), "message": message })
            }
            Some(w) => serde_json::json!({
                "state": "waiting",
                "engine": w.engine,
                "error": w.error,
                "attempts": w.attempts,
                "retry_in_ms": u64::try_from(w.retry_at.saturating_duration_since(Instant::now()).as_millis()).unwrap_or(u64::MAX),
                "message": message,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Waiting>> {
        self.0.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Starts the Docker side: one attempt now (so an agent whose engine answers is ready
    /// with its containers adopted when this returns, as before), and when it fails, retries
    /// in the background with backoff (1 s doubling to 30 s) until one succeeds or `retry`
    /// is cancelled. `on_ready` runs once, with the started side (the delivery wiring).
    /// `stop` ends the Docker watcher at shutdown.
    pub async fn start(
        params: StartParams,
        stop: CancellationToken,
        retry: CancellationToken,
        on_ready: impl FnOnce(Arc<Docker>) + Send + 'static,
    ) -> DockerSlot {
        let slot = DockerSlot::new(true);
        let mut backoff = RETRY_FIRST;
        if let Err(wait) = slot.attempt(&params, &stop, backoff).await {
            let me = slot.clone();
            tokio::spawn(async move {
                let mut wait = wait;
                loop {
                    tokio::select! {
                        () = retry.cancelled() => return,
                        () = tokio::time::sleep(wait) => {}
                    }
                    backoff = backoff.saturating_mul(2).min(RETRY_MAX);
                    let attempt = tokio::select! {
                        () = retry.cancelled() => return,
                        r = me.attempt(&params, &stop, backoff) => r,
                    };
                    match attempt {
                        Ok(d) => {
                            on_ready(d);
                            return;
                        }
                        Err(next) => wait = next,
                    }
                }
            });
        } else if let Some(d) = slot.ready() {
            on_ready(d);
        }
        slot
    }

    /// One attempt; on failure records it (with the retry `next` from now), logs it, and
    /// returns the wait.
    async fn attempt(
        &self,
        p: &StartParams,
        stop: &CancellationToken,
        next: Duration,
    ) -> Result<Arc<Docker>, Duration> {
        let before: std::collections::HashSet<String> =
            p.proxy.listeners().iter().map(|l| l.name().to_owned()).collect();
        match Docker::start(
            p.proxy.clone(),
            p.state_dir.clone(),
            p.scope.clone(),
            p.delivery.clone(),
            stop.clone(),
            p.events.clone(),
        )
        .await
        {
            Ok(d) => {
                let was_waiting = self.lock().take();
                if let Some(w) = was_waiting {
                    info!(engine = %w.engine, attempts = w.attempts + 1, "docker engine answered; the Docker side runs");
                }
                let _ = self.0.ready.set(Arc::clone(&d));
                Ok(d)
            }
            Err(e) => {
                // A start that failed half way (the engine went away during adoption) must
                // not leave listeners behind that the next attempt would find taken.
                for l in p.proxy.listeners() {
                    if !before.contains(l.name()) {
                        let _ = p.proxy.remove_listener(l.name());
                    }
                }
                let engine = engine_address();
                let error = dso_secrets::Redactor::global()
                    .redact(&format!("{e:#}"))
                    .into_owned();
                let mut w = self.lock();
                let attempts = w.as_ref().map_or(0, |w| w.attempts) + 1;
                warn!(engine = %engine, error = %error, attempts, retry_in = ?next, "docker engine not answering; listeners and the API run, the Docker side starts once it answers");
                *w = Some(Waiting {
                    engine,
                    error,
                    attempts,
                    retry_at: Instant::now() + next,
                });
                Err(next)
            }
        }
    }
}

/// What the agent's Docker side holds once started.
#[derive(Debug)]
pub struct Docker {
    /// The rotator, adopting and rotating the managed containers.
    pub rotator: Rotator<DockerEngine>,
    tracked: Mutex<VecDeque<Tracked>>,
    seq: std::sync::atomic::AtomicU64,
    /// Rotations started through the API, awaited at shutdown ([`Docker::finish`]).
    running: tokio_util::task::TaskTracker,
    /// The agent's event bus.
    events: Bus,
    /// Compose services the agent delivered declared references (`dso.refs`) to.
    pub compose: ComposeServices,
}

/// A rotation request as the API shows it.
#[derive(Debug, Clone, Serialize)]
pub struct Tracked {
    /// Request ID (per agent run).
    pub id: String,
    /// What was asked to rotate.
    pub target: String,
    /// `running`, `done` or `failed`.
    pub state: &'static str,
    /// Steps so far.
    pub steps: Vec<Progress>,
    /// The report when done.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<RotationReport>,
    /// The error when failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Docker {
    /// Connects to Docker, recovers interrupted rotations, adopts the managed containers
    /// (no rotation), and follows Docker events until `stop`, publishing on `events`.
    pub async fn start(
        proxy: Proxy,
        state_dir: PathBuf,
        scope: Option<(String, String)>,
        delivery: Option<(Arc<dso_rotator::delivery::Delivery>, Option<bool>)>,
        stop: CancellationToken,
        events: Bus,
    ) -> anyhow::Result<Arc<Docker>> {
        let engine = match tokio::time::timeout(CONNECT_TIMEOUT, DockerEngine::connect()).await {
            Ok(r) => r.context("connecting to Docker (is the daemon running?)")?,
            Err(_) => anyhow::bail!(
                "connecting to Docker: no answer within {} s",
                CONNECT_TIMEOUT.as_secs()
            ),
        };
        info!(api = engine.api_version(), state_dir = %state_dir.display(), "docker connected");
        if let Some((d, forced)) = &delivery {
            let remote = forced.unwrap_or(!engine.is_local());
            d.set_remote(remote);
            info!(
                path = if remote {
                    "remote: tmpfs volumes filled by archive uploads"
                } else {
                    "local: bind mounts of the agent's tmpfs"
                },
                "secret delivery path"
            );
        }
        let delivery = delivery.map(|(d, _)| d);
        let compose = ComposeServices::open(&state_dir);
        let mut cfg = Config::new(&state_dir);
        cfg.scope = scope;
        cfg.delivery = delivery;
        let (rotator, recovered) = Rotator::start(engine, proxy, cfg)
            .await
            .with_context(|| format!("starting the rotator on state directory {}", state_dir.display()))?;
        for r in &recovered {
            warn!(service = %r.from.service, rotation = %r.from.rotation, step = ?r.from.step, survivor = ?r.survivor, "finished an interrupted rotation");
            events.publish(
                "rotation.recovered",
                json!({
                    "service": r.from.service.to_string(),
                    "rotation": r.from.rotation,
                    "strategy": r.from.strategy.to_string(),
                    "interrupted_at": r.from.step,
                    "survivor": r.survivor,
                    "removed": r.removed,
                }),
            );
        }
        let services = rotator.gateway().services().len();
        info!(services, "managed containers adopted");
        // Subscribed before the watcher starts, so its first events are not missed.
        let engine_events = rotator.subscribe_engine_events();
        tokio::spawn(follow_engine_events(
            engine_events,
            rotator.subscribe_scans(),
            events.clone(),
            stop.clone(),
        ));
        let watcher = rotator.clone();
        tokio::spawn(async move { watcher.watch(stop).await });
        Ok(Arc::new(Docker {
            rotator,
            tracked: Mutex::new(VecDeque::new()),
            seq: Default::default(),
            running: tokio_util::task::TaskTracker::new(),
            events,
            compose,
        }))
    }

    /// The agent's event bus.
    pub fn events(&self) -> &Bus {
        &self.events
    }

    /// Starts a rotation in the background; returns its request ID.
    pub fn submit(
        self: &Arc<Self>,
        target: String,
        strategy: Option<Strategy>,
        env: Vec<(String, String)>,
    ) -> String {
        self.submit_request(
            RotateRequest {
                target,
                strategy,
                env,
                ..Default::default()
            },
            None,
        )
    }

    /// [`Docker::submit`] with secret values to deliver, and a channel that receives the
    /// outcome (the secret side records applied or failed versions from it).
    pub fn submit_request(
        self: &Arc<Self>,
        mut req: RotateRequest,
        done: Option<tokio::sync::oneshot::Sender<Result<RotationReport, String>>>,
    ) -> String {
        let target = req.target.clone();
        let n = self.seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        let id = n.to_string();
        {
            let mut t = self.lock();
            t.push_back(Tracked {
                id: id.clone(),
                target: target.clone(),
                state: "running",
                steps: Vec::new(),
                report: None,
                error: None,
            });
            while t.len() > KEEP {
                t.pop_front();
            }
        }
        // What the events say about this request: the service key when the last scan knows
        // the target (else the target as given), and what asked for it.
        let service = self
            .rotator
            .subscribe_scans()
            .borrow()
            .as_deref()
            .and_then(|scan| scan.find(&target).ok().map(|m| m.key.to_string()))
            .unwrap_or_else(|| target.clone());
        let about = json!({
            "id": id,
            "service": service,
            "target": target,
            "trigger": if req.secrets.is_some() { "secret" } else { "manual" },
        });
        let mut started = about.clone();
        started["strategy"] = json!(req.strategy.map(|s| s.to_string()));
        self.events.publish("rotation.started", started);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Progress>();
        let (outcome_tx, mut outcome_rx) = tokio::sync::oneshot::channel::<Result<RotationReport, String>>();
        let me = Arc::clone(self);
        let pump_id = id.clone();
        // One task publishes the steps and then the outcome, so they reach the bus (and
        // `GET /v1/rotations/ID`) in the order they happened, and only then tells `done`
        // (whose `delivery.failed` follows `rotation.failed`).
        let pump = tokio::spawn(async move {
            let mut rolled_back = false;
            let mut step = |p: Progress| {
                rolled_back |= p.step == Step::RolledBack;
                let mut data = about.clone();
                data["rotation"] = json!(p.rotation);
                data["step"] = json!(p.step);
                data["elapsed_ms"] = json!(p.elapsed_ms);
                data["detail"] = json!(p.detail);
                me.events.publish("rotation.step", data);
                me.update(&pump_id, |t| t.steps.push(p));
            };
            let mut outcome = None;
            loop {
                tokio::select! {
                    biased;
                    p = rx.recv() => match p {
                        Some(p) => step(p),
                        None => break,
                    },
                    o = &mut outcome_rx => {
                        outcome = Some(o);
                        break;
                    }
                }
            }
            // The rotation has returned: every step it reported is in the channel.
            while let Ok(p) = rx.try_recv() {
                step(p);
            }
            let outcome = match outcome {
                Some(o) => o,
                None => (&mut outcome_rx).await,
            }
            .unwrap_or_else(|_| Err("the rotation task ended without a result".to_owned()));
            me.publish_outcome(about, &outcome, rolled_back);
            if let Some(done) = done {
                let _ = done.send(outcome.clone());
            }
            me.update(&pump_id, |t| match outcome {
                Ok(r) => {
                    t.state = "done";
                    t.report = Some(r);
                }
                Err(e) => {
                    t.state = "failed";
                    t.error = Some(e);
                }
            });
        });
        let me = Arc::clone(self);
        self.running.spawn(async move {
            let result = me
                .rotator
                .rotate({
                    req.progress = Some(tx);
                    req
                })
                .await
                .map_err(|e| e.to_string());
            let _ = outcome_tx.send(result);
            // Tracked until the outcome is published and `done` told.
            let _ = pump.await;
        });
        id
    }

    /// Whether [`Docker::finish`] was called: no new rotation is started.
    pub fn is_closed(&self) -> bool {
        self.running.is_closed()
    }

    /// Takes no new rotation and waits up to `deadline` for those running to end, so that
    /// the agent does not exit in the middle of one. Returns how many were still running
    /// at the deadline (their journal lets the next agent finish them).
    pub async fn finish(&self, deadline: std::time::Duration) -> usize {
        self.running.close();
        if tokio::time::timeout(deadline, self.running.wait()).await.is_ok() {
            0
        } else {
            self.running.len()
        }
    }

    /// Takes new rotations again after [`Docker::finish`]: an upgrade that failed leaves
    /// this agent serving as before.
    pub fn reopen(&self) {
        self.running.reopen();
    }

    /// The request with this ID.
    pub fn get(&self, id: &str) -> Option<Tracked> {
        self.lock().iter().find(|t| t.id == id).cloned()
    }

    /// Every remembered request, oldest first.
    pub fn list(&self) -> Vec<Tracked> {
        self.lock().iter().cloned().collect()
    }

    /// `rotation.succeeded`, or `rotation.rolled_back` (when a step said so) and then
    /// `rotation.failed`: every rotation ends with exactly one of succeeded and failed.
    fn publish_outcome(
        &self,
        about: serde_json::Value,
        outcome: &Result<RotationReport, String>,
        rolled_back: bool,
    ) {
        match outcome {
            Ok(r) => {
                let mut data = about;
                data["service"] = json!(r.service.to_string());
                data["took_ms"] = json!(r.took_ms);
                data["requests"] = json!(r.requests);
                data["containers"] = r
                    .containers
                    .iter()
                    .map(|c| {
                        json!({
                            "rotation": c.rotation,
                            "name": c.name,
                            "strategy": c.strategy.to_string(),
                            "old_id": c.old_id,
                            "new_id": c.new_id,
                            "took_ms": c.took_ms,
                            "serving_after_ms": c.serving_after_ms,
                        })
                    })
                    .collect();
                self.events.publish("rotation.succeeded", data);
            }
            Err(e) => {
                let mut data = about;
                data["error"] = json!(e);
                data["rolled_back"] = json!(rolled_back);
                if rolled_back {
                    self.events.publish("rotation.rolled_back", data.clone());
                }
                self.events.publish("rotation.failed", data);
            }
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Tracked)) {
        if let Some(t) = self.lock().iter_mut().find(|t| t.id == id) {
            f(t);
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Tracked>> {
        self.tracked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Publishes `docker.container` for the engine events the rotator's watcher acted on
/// (start, die, destroy, health status) of the containers its scans manage, with their
/// names and services: a container is known from the scans (kept until its `destroy`), so
/// the event of one already removed still names it. Until `stop`.
async fn follow_engine_events(
    mut events: tokio::sync::broadcast::Receiver<dso_rotator::engine::Event>,
    mut scans: tokio::sync::watch::Receiver<Option<Arc<dso_rotator::Scan>>>,
    bus: Bus,
    stop: CancellationToken,
) {
    use tokio::sync::broadcast::error::RecvError;
    // Container ID -> (name, service).
    let mut known: std::collections::HashMap<String, (String, String)> = Default::default();
    let learn = |known: &mut std::collections::HashMap<String, (String, String)>,
                 scans: &mut tokio::sync::watch::Receiver<Option<Arc<dso_rotator::Scan>>>| {
        if let Some(scan) = scans.borrow_and_update().as_deref() {
            for m in scan.services.values() {
                for c in &m.containers {
                    known.insert(c.id.clone(), (c.name.clone(), m.key.to_string()));
                }
            }
        }
    };
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            r = scans.changed() => {
                if r.is_err() {
                    return;
                }
                learn(&mut known, &mut scans);
            }
            ev = events.recv() => match ev {
                Ok(ev) => {
                    learn(&mut known, &mut scans);
                    let (action, health) = match ev.action.split_once(": ") {
                        Some((a, h)) => (a.to_owned(), Some(h.to_owned())),
                        None => (ev.action.clone(), None),
                    };
                    if !matches!(action.as_str(), "start" | "die" | "destroy" | "health_status") {
                        continue;
                    }
                    let who = if action == "destroy" { known.remove(&ev.id) } else { known.get(&ev.id).cloned() };
                    // Not in a scan: outside this agent's scope (or gone before any scan).
                    let Some((name, service)) = who else { continue };
                    let mut data = json!({
                        "action": action,
                        "container": ev.id,
                        "name": name,
                        "service": service,
                    });
                    if let Some(h) = health {
                        data["health"] = json!(h);
                    }
                    bus.publish("docker.container", data);
                }
                Err(RecvError::Lagged(n)) => warn!(missed = n, "docker events for the event bus were missed"),
                Err(RecvError::Closed) => return,
            },
        }
    }
}

/// A remembered Compose service whose container now lacks dso's override: recreated by a
/// plain `docker compose up` (no `dso.refs` label, so no secrets).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Recreated {
    /// The service.
    pub service: ServiceKey,
    /// Its containers without the `dso.refs` label (names).
    pub containers: Vec<String>,
    /// What is wrong and the fix, one line.
    pub message: String,
}

/// The Compose services the agent delivered declared references to (`POST
/// /v1/compose/prepare`, or a scan seeing a container with `dso.refs`), persisted in
/// `STATE/compose-services.json` so that an agent restart does not forget them. Forgotten
/// at `POST /v1/compose/down` of their project.
#[derive(Debug)]
pub struct ComposeServices {
    file: PathBuf,
    set: Mutex<BTreeSet<ServiceKey>>,
}

#[derive(Debug, Serialize, serde::Deserialize)]
struct ComposeFile {
    format: u32,
    services: Vec<String>,
}

impl ComposeServices {
    /// The record in `state_dir` (empty when absent; an unreadable one is logged and
    /// starts empty).
    pub fn open(state_dir: &std::path::Path) -> ComposeServices {
        let file = state_dir.join("compose-services.json");
        let set = match std::fs::read(&file) {
            Ok(bytes) => match serde_json::from_slice::<ComposeFile>(&bytes) {
                Ok(f) => f
                    .services
                    .iter()
                    .filter_map(|s| s.split_once('/'))
                    .map(|(p, s)| ServiceKey {
                        project: p.to_owned(),
                        service: s.to_owned(),
                    })
                    .collect(),
                Err(e) => {
                    warn!(file = %file.display(), error = %e, "cannot read the remembered Compose services; starting with none");
                    BTreeSet::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeSet::new(),
            Err(e) => {
                warn!(file = %file.display(), error = %e, "cannot read the remembered Compose services; starting with none");
                BTreeSet::new()
            }
        };
        ComposeServices {
            file,
            set: Mutex::new(set),
        }
    }

    /// Remembers a service (written at once when it is new).
    pub fn remember(&self, key: &ServiceKey) {
        if key.project.is_empty() {
            return;
        }
        let mut set = self.lock();
        if set.insert(key.clone()) {
            self.save(&set);
        }
    }

    /// Forgets every service of `project`; returns them.
    pub fn forget_project(&self, project: &str) -> Vec<ServiceKey> {
        let mut set = self.lock();
        let gone: Vec<ServiceKey> = set.iter().filter(|k| k.project == project).cloned().collect();
        if !gone.is_empty() {
            set.retain(|k| k.project != project);
            self.save(&set);
        }
        gone
    }

    /// The remembered services.
    pub fn list(&self) -> Vec<ServiceKey> {
        self.lock().iter().cloned().collect()
    }

    fn save(&self, set: &BTreeSet<ServiceKey>) {
        let f = ComposeFile {
            format: 1,
            services: set.iter().map(ToString::to_string).collect(),
        };
        let bytes = serde_json::to_vec_pretty(&f).expect("the record serializes");
        let tmp = self.file.with_extension("json.tmp");
        let r = std::fs::write(&tmp, &bytes).and_then(|()| std::fs::rename(&tmp, &self.file));
        if let Err(e) = r {
            warn!(file = %self.file.display(), error = %e, "cannot record the Compose services; an agent restart forgets them");
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<ServiceKey>> {
        self.set.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The containers of `key` among `containers` (one project's) that lack the `dso.refs`
/// label: what a plain `docker compose up` of a `dso up` project creates. One-off
/// containers (`docker compose run`) are not the service.
pub fn without_override(key: &ServiceKey, containers: &[dso_rotator::Container]) -> Vec<String> {
    containers
        .iter()
        .filter(|c| c.labels.get(labels::COMPOSE_SERVICE) == Some(&key.service))
        .filter(|c| {
            c.labels
                .get("com.docker.compose.oneoff")
                .is_none_or(|v| !v.eq_ignore_ascii_case("true"))
        })
        .filter(|c| !c.labels.contains_key(LABEL_REFS))
        .map(|c| c.name.clone())
        .collect()
}

impl Docker {
    /// The remembered Compose services whose containers were recreated without dso's
    /// override (a plain `docker compose up`): they run without their secrets. For
    /// `GET /v1/services`, `GET /v1/compose/services`, `dso status` and `dso doctor`.
    pub async fn recreated_without_override(&self) -> Result<Vec<Recreated>, dso_rotator::EngineError> {
        let remembered = self.compose.list();
        let mut projects: Vec<&str> = remembered.iter().map(|k| k.project.as_str()).collect();
        projects.dedup();
        let mut out = Vec::new();
        for p in projects {
            let containers = self
                .rotator
                .engine()
                .list_labeled(labels::COMPOSE_PROJECT, p)
                .await?;
            for key in remembered.iter().filter(|k| k.project == p) {
                let names = without_override(key, &containers);
                if names.is_empty() {
                    continue;
                }
                out.push(Recreated {
                    service: key.clone(),
                    message: format!(
                        "service {key} was recreated without dso's override (a plain `docker compose up`?): container {} has no dso.refs label, so it runs without its secrets and dso does not manage it; run `dso up` in the project directory",
                        names.join(", ")
                    ),
                    containers: names,
                });
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agent_without_docker_says_how_to_turn_it_on() {
        let slot = DockerSlot::off();
        assert_eq!(slot.get().unwrap_err(), Unavailable::Off);
        assert!(Unavailable::Off.to_string().contains("`dso agent --docker`"));
        assert_eq!(slot.health()["state"], "off");
    }

    /// While waiting, the error, the address and the seconds until the next attempt show;
    /// past the retry time the message says the retry runs.
    #[test]
    fn a_waiting_slot_shows_the_error_and_the_next_retry() {
        let slot = DockerSlot::new(true);
        assert_eq!(slot.health()["state"], "starting");
        *slot.lock() = Some(Waiting {
            engine: "unix:///tmp/none.sock".to_owned(),
            error: "connect: no such file".to_owned(),
            attempts: 3,
            retry_at: Instant::now() + Duration::from_millis(7_500),
        });
        let Err(Unavailable::Waiting(m)) = slot.get() else {
            panic!("not waiting");
        };
        assert_eq!(
            m,
            "waiting for the engine at unix:///tmp/none.sock: connect: no such file; retry in 8s"
        );
        let h = slot.health();
        assert_eq!(h["state"], "waiting");
        assert_eq!(h["attempts"], 3);
        assert!(h["retry_in_ms"].as_u64().unwrap() <= 7_500);
        slot.lock().as_mut().unwrap().retry_at = Instant::now();
        assert!(slot.describe_waiting().ends_with("retrying now (attempt 4)"));
        assert!(slot.ready().is_none());
    }

    fn key(p: &str, s: &str) -> ServiceKey {
        ServiceKey {
            project: p.into(),
            service: s.into(),
        }
    }

    #[test]
    fn remembered_services_survive_a_reopen_and_are_forgotten_per_project() {
        let dir = tempfile::tempdir().unwrap();
        let c = ComposeServices::open(dir.path());
        c.remember(&key("shop", "web"));
        c.remember(&key("shop", "db"));
        c.remember(&key("blog", "web"));
        c.remember(&key("", "plain"));
        let again = ComposeServices::open(dir.path());
        assert_eq!(
            again.list(),
            [key("blog", "web"), key("shop", "db"), key("shop", "web")]
        );
        assert_eq!(
            again.forget_project("shop"),
            [key("shop", "db"), key("shop", "web")]
        );
        assert_eq!(ComposeServices::open(dir.path()).list(), [key("blog", "web")]);
        std::fs::write(dir.path().join("compose-services.json"), b"{").unwrap();
        assert!(
            ComposeServices::open(dir.path()).list().is_empty(),
            "a damaged record starts empty"
        );
    }

    #[test]
    fn a_service_container_without_dso_refs_is_a_recreation_and_one_offs_are_not() {
        let c = |name: &str, labels: &[(&str, &str)]| dso_rotator::Container {
            id: name.into(),
            name: name.into(),
            image: String::new(),
            image_id: String::new(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            running: true,
            health: dso_rotator::engine::DockerHealth::None,
            networks: Default::default(),
            publishes_ports: false,
            auto_remove: false,
            mounts: Vec::new(),
            process: Default::default(),
        };
        let svc = (labels::COMPOSE_SERVICE, "web");
        let all = [
            c("managed", &[svc, (LABEL_REFS, "{}")]),
            c("plain", &[svc]),
            c("oneoff", &[svc, ("com.docker.compose.oneoff", "True")]),
            c("db", &[(labels::COMPOSE_SERVICE, "db")]),
        ];
        assert_eq!(without_override(&key("p", "web"), &all), ["plain"]);
        assert!(without_override(&key("p", "db"), &all[..1]).is_empty());
    }
}
