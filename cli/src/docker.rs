//! The agent's Docker side: the `dso-rotator` it hosts when started with `--docker`, and
//! the rotations requested through the control API, tracked so `dso rotate` can show each
//! step as it happens.

use std::collections::{BTreeSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use dso_proxy::Proxy;
use dso_rotator::delivery::declared::LABEL_REFS;
use dso_rotator::labels;
use dso_rotator::{
    Config, DockerEngine, Engine, Progress, RotateRequest, RotationReport, Rotator, ServiceKey, Strategy,
};
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// How many finished rotations the agent remembers for `GET /v1/rotations`.
const KEEP: usize = 64;

/// What `--docker` gives the agent.
#[derive(Debug)]
pub struct Docker {
    /// The rotator, adopting and rotating the managed containers.
    pub rotator: Rotator<DockerEngine>,
    tracked: Mutex<VecDeque<Tracked>>,
    seq: std::sync::atomic::AtomicU64,
    /// Rotations started through the API, awaited at shutdown ([`Docker::finish`]).
    running: tokio_util::task::TaskTracker,
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
    /// (no rotation), and follows Docker events until `stop`.
    pub async fn start(
        proxy: Proxy,
        state_dir: PathBuf,
        scope: Option<(String, String)>,
        delivery: Option<(Arc<dso_rotator::delivery::Delivery>, Option<bool>)>,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Docker>> {
        let engine = DockerEngine::connect()
            .await
            .context("connecting to Docker (is the daemon running?)")?;
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
        }
        let services = rotator.gateway().services().len();
        info!(services, "managed containers adopted");
        let watcher = rotator.clone();
        tokio::spawn(async move { watcher.watch(stop).await });
        Ok(Arc::new(Docker {
            rotator,
            tracked: Mutex::new(VecDeque::new()),
            seq: Default::default(),
            running: tokio_util::task::TaskTracker::new(),
            compose,
        }))
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
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let me = Arc::clone(self);
        let pump_id = id.clone();
        tokio::spawn(async move {
            while let Some(p) = rx.recv().await {
                me.update(&pump_id, |t| t.steps.push(p));
            }
        });
        let me = Arc::clone(self);
        let run_id = id.clone();
        self.running.spawn(async move {
            let result = me
                .rotator
                .rotate({
                    req.progress = Some(tx);
                    req
                })
                .await;
            if let Some(done) = done {
                let _ = done.send(result.clone().map_err(|e| e.to_string()));
            }
            // Let the step pump catch up before the final state shows.
            tokio::task::yield_now().await;
            me.update(&run_id, |t| match result {
                Ok(r) => {
                    t.state = "done";
                    t.report = Some(r);
                }
                Err(e) => {
                    t.state = "failed";
                    t.error = Some(e.to_string());
                }
            });
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

    /// The request with this ID.
    pub fn get(&self, id: &str) -> Option<Tracked> {
        self.lock().iter().find(|t| t.id == id).cloned()
    }

    /// Every remembered request, oldest first.
    pub fn list(&self) -> Vec<Tracked> {
        self.lock().iter().cloned().collect()
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
