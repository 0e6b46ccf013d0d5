//! The Docker engine boundary: the [`Engine`] trait the rotation logic is written against,
//! the plain types it speaks in, and [`DockerEngine`], its implementation on bollard.
//!
//! *Boundary*: every bollard call of the crate is in this file. Nothing above it sees a
//! bollard type, so rotations, health checks and recovery are tested with a fake engine,
//! and this module is tested against a real daemon.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerCreateBody, ContainerInspectResponse, EndpointSettings, HealthStatusEnum};
use bollard::models::{NetworkConnectRequest, NetworkingConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::{Stream, StreamExt};
use tracing::debug;

use crate::labels::RELOADER;

/// A failed engine call. Carries the operation and the daemon's message; never a secret.
#[derive(Debug, Clone, thiserror::Error)]
#[error("docker {op}: {message}")]
pub struct EngineError {
    /// What was attempted, e.g. `create container app-1-dso-green-7`.
    pub op: String,
    /// HTTP status from the daemon, when it answered.
    pub status: Option<u16>,
    /// The daemon's or the transport's message.
    pub message: String,
}

impl EngineError {
    /// An error for `op` with no HTTP status (transport, decoding, fake engine).
    pub fn new(op: impl Into<String>, message: impl Into<String>) -> Self {
        EngineError {
            op: op.into(),
            status: None,
            message: message.into(),
        }
    }

    /// Whether the daemon said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        self.status == Some(404)
    }
}

/// Health of a container as Docker reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DockerHealth {
    /// The container has no HEALTHCHECK.
    None,
    /// The healthcheck has not passed yet.
    Starting,
    /// The last healthcheck passed.
    Healthy,
    /// The healthcheck failed its retries.
    Unhealthy,
}

/// A mount of a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// `volume`, `bind`, `tmpfs`, ...
    pub kind: String,
    /// Path inside the container.
    pub destination: String,
}

/// What the rotator needs to know about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Container {
    /// Full container ID.
    pub id: String,
    /// Name without the leading `/`.
    pub name: String,
    /// The image as the user named it (`Config.Image`).
    pub image: String,
    /// The image ID the container runs (`sha256:...`); clones pin it.
    pub image_id: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Whether it is running.
    pub running: bool,
    /// Health as Docker reports it.
    pub health: DockerHealth,
    /// Networks by name, with the container's IP on each (when it has one).
    pub networks: BTreeMap<String, Option<IpAddr>>,
    /// Whether the container publishes host ports itself (`-p`, `publish_all`).
    pub publishes_ports: bool,
    /// Mounts.
    pub mounts: Vec<Mount>,
}

impl Container {
    /// The first 12 characters of the ID, as `docker ps` shows it.
    pub fn short_id(&self) -> &str {
        short(&self.id)
    }
}

/// The first 12 characters of a container ID.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(12)]
}

/// How to create a replacement from an existing container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloneSpec {
    /// ID of the container whose configuration is copied (blue).
    pub from: String,
    /// Name of the new container.
    pub name: String,
    /// Environment variables set or replaced (`KEY`, `VALUE`).
    pub env: Vec<(String, String)>,
    /// Labels set or replaced.
    pub labels: Vec<(String, String)>,
    /// The network the route uses; it is the one given at create time.
    pub primary_network: Option<String>,
}

/// A container event the discovery follows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// Container ID.
    pub id: String,
    /// `start`, `die`, `destroy`, `rename`, `health_status: healthy`, ...
    pub action: String,
}

/// A boxed stream of engine events.
pub type EventStream = Pin<Box<dyn Stream<Item = Result<Event, EngineError>> + Send>>;

/// A boxed future, for trait methods that must be `Send`.
type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'a>>;

/// The operations rotations need from a container engine.
pub trait Engine: Send + Sync + 'static {
    /// Every container (running or not) labelled `dso.reloader=true`.
    fn list_managed(&self) -> Fut<'_, Vec<Container>>;
    /// Every container carrying label `key=value`, running or not.
    fn list_labeled<'a>(&'a self, key: &'a str, value: &'a str) -> Fut<'a, Vec<Container>>;
    /// The container with this ID or name, or `None` when it does not exist.
    fn inspect<'a>(&'a self, id: &'a str) -> Fut<'a, Option<Container>>;
    /// Creates (does not start) a copy of `spec.from`; returns the new ID.
    fn create_clone<'a>(&'a self, spec: &'a CloneSpec) -> Fut<'a, String>;
    /// Starts a container.
    fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()>;
    /// Stops a container, killing it after `grace`.
    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> Fut<'a, ()>;
    /// Removes a container (forcefully) with its anonymous volumes kept.
    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, ()>;
    /// Renames a container.
    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> Fut<'a, ()>;
    /// Sends a signal (`SIGHUP`, ...) to the container's main process.
    fn signal<'a>(&'a self, id: &'a str, signal: &'a str) -> Fut<'a, ()>;
    /// Runs `cmd` in the container and returns its exit code once it has ended.
    fn exec<'a>(&'a self, id: &'a str, cmd: &'a [String]) -> Fut<'a, i64>;
    /// Events of managed containers from the moment of this call (also those before the
    /// stream is first polled). Ends or errors when the daemon goes away.
    fn events(&self) -> EventStream;
}

/// [`Engine`] on the local Docker daemon through bollard.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    docker: Docker,
    api: String,
}

impl DockerEngine {
    /// Connects with the local defaults (`DOCKER_HOST` or `/var/run/docker.sock`) and
    /// negotiates the API version down to what the daemon speaks (1.41 for Docker 20.10).
    pub async fn connect() -> Result<Self, EngineError> {
        let docker = Docker::connect_with_local_defaults().map_err(|e| err("connect", e))?;
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| err("negotiate API version", e))?;
        let v = docker.client_version();
        let api = format!("{}.{}", v.major_version, v.minor_version);
        debug!(api = %api, "connected to docker");
        Ok(DockerEngine { docker, api })
    }

    /// The negotiated API version, e.g. `1.41`.
    pub fn api_version(&self) -> &str {
        &self.api
    }

    async fn inspect_raw(&self, id: &str) -> Result<Option<ContainerInspectResponse>, EngineError> {
        match self.docker.inspect_container(id, None).await {
            Ok(c) => Ok(Some(c)),
            Err(e) => {
                let e = err(format!("inspect {id}"), e);
                if e.is_not_found() { Ok(None) } else { Err(e) }
            }
        }
    }

    async fn list(&self, label: String) -> Result<Vec<Container>, EngineError> {
        let filters = HashMap::from([("label".to_owned(), vec![label])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let list = self
            .docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| err("list containers", e))?;
        let mut out = Vec::new();
        for s in list {
            let Some(id) = s.id else { continue };
            // A container can vanish between list and inspect; skip it.
            if let Some(c) = self.inspect_raw(&id).await? {
                out.push(convert(c));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    async fn clone_container(&self, spec: &CloneSpec) -> Result<String, EngineError> {
        let op = format!("create container {}", spec.name);
        let blue = self
            .inspect_raw(&spec.from)
            .await?
            .ok_or_else(|| EngineError::new(&op, format!("container {} does not exist", spec.from)))?;
        let body = clone_body(&blue, spec);
        let opts = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        let created = self
            .docker
            .create_container(Some(opts), body.create)
            .await
            .map_err(|e| err(&op, e))?;
        // API < 1.44 accepts one network at create time; the others are connected before start.
        for (net, endpoint) in body.more_networks {
            let req = NetworkConnectRequest {
                container: created.id.clone(),
                endpoint_config: Some(endpoint),
            };
            if let Err(e) = self.docker.connect_network(&net, req).await {
                let _ = self.docker.remove_container(&created.id, Some(force())).await;
                return Err(err(format!("connect {} to network {net}", spec.name), e));
            }
        }
        Ok(created.id)
    }

    async fn exec_wait(&self, id: &str, cmd: &[String]) -> Result<i64, EngineError> {
        let op = format!("exec in {}", short(id));
        let exec = self
            .docker
            .create_exec(
                id,
                CreateExecOptions {
                    cmd: Some(cmd.to_vec()),
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| err(&op, e))?;
        // Attached, so the call returns only when the process has closed its output.
        let started = self
            .docker
            .start_exec(&exec.id, Some(StartExecOptions::default()))
            .await
            .map_err(|e| err(&op, e))?;
        if let StartExecResults::Attached { mut output, .. } = started {
            while let Some(chunk) = output.next().await {
                chunk.map_err(|e| err(&op, e))?;
            }
        }
        // The output can close a moment before the daemon records the exit code.
        for _ in 0..100 {
            let info = self
                .docker
                .inspect_exec(&exec.id)
                .await
                .map_err(|e| err(&op, e))?;
            if info.running != Some(true)
                && let Some(code) = info.exit_code
            {
                return Ok(code);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Err(EngineError::new(op, "exec did not report an exit code"))
    }
}

impl Engine for DockerEngine {
    fn list_managed(&self) -> Fut<'_, Vec<Container>> {
        Box::pin(self.list(format!("{RELOADER}=true")))
    }

    fn list_labeled<'a>(&'a self, key: &'a str, value: &'a str) -> Fut<'a, Vec<Container>> {
        Box::pin(self.list(format!("{key}={value}")))
    }

    fn inspect<'a>(&'a self, id: &'a str) -> Fut<'a, Option<Container>> {
        Box::pin(async move { Ok(self.inspect_raw(id).await?.map(convert)) })
    }

    fn create_clone<'a>(&'a self, spec: &'a CloneSpec) -> Fut<'a, String> {
        Box::pin(self.clone_container(spec))
    }

    fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            let r = self.docker.start_container(id, None).await;
            // 304: already started.
            match r {
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
                r => r.map_err(|e| err(format!("start {}", short(id)), e)),
            }
        })
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> Fut<'a, ()> {
        Box::pin(async move {
            let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
            let opts = StopContainerOptionsBuilder::new().t(t).build();
            match self.docker.stop_container(id, Some(opts)).await {
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
                r => r.map_err(|e| err(format!("stop {}", short(id)), e)),
            }
        })
    }

    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            self.docker
                .remove_container(id, Some(force()))
                .await
                .map_err(|e| err(format!("remove {}", short(id)), e))
        })
    }

    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            let opts = RenameContainerOptionsBuilder::new().name(name).build();
            self.docker
                .rename_container(id, opts)
                .await
                .map_err(|e| err(format!("rename {} to {name}", short(id)), e))
        })
    }

    fn signal<'a>(&'a self, id: &'a str, signal: &'a str) -> Fut<'a, ()> {
        Box::pin(async move {
            let opts = KillContainerOptionsBuilder::new().signal(signal).build();
            self.docker
                .kill_container(id, Some(opts))
                .await
                .map_err(|e| err(format!("send {signal} to {}", short(id)), e))
        })
    }

    fn exec<'a>(&'a self, id: &'a str, cmd: &'a [String]) -> Fut<'a, i64> {
        Box::pin(self.exec_wait(id, cmd))
    }

    fn events(&self) -> EventStream {
        let filters = HashMap::from([
            ("type".to_owned(), vec!["container".to_owned()]),
            ("label".to_owned(), vec![format!("{RELOADER}=true")]),
        ]);
        // The request goes out when the stream is first polled; `since` makes it start
        // from now, so events between this call and the first poll are not lost.
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let since = format!("{}.{:09}", now.as_secs(), now.subsec_nanos());
        let opts = EventsOptionsBuilder::new()
            .since(&since)
            .filters(&filters)
            .build();
        let s = self.docker.events(Some(opts)).filter_map(|m| async move {
            match m {
                Err(e) => Some(Err(err("events", e))),
                Ok(m) => {
                    let id = m.actor.and_then(|a| a.id)?;
                    let action = m.action?;
                    Some(Ok(Event { id, action }))
                }
            }
        });
        Box::pin(s)
    }
}

fn force() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new().force(true).v(false).build()
}

fn err(op: impl Into<String>, e: bollard::errors::Error) -> EngineError {
    let status = match &e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    };
    let message = match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message,
        e => e.to_string(),
    };
    EngineError {
        op: op.into(),
        status,
        message,
    }
}

fn convert(c: ContainerInspectResponse) -> Container {
    let cfg = c.config.unwrap_or_default();
    let state = c.state.unwrap_or_default();
    let has_check = cfg
        .healthcheck
        .as_ref()
        .and_then(|h| h.test.as_ref())
        .is_some_and(|t| t.first().is_some_and(|f| f != "NONE"));
    let health = match state.health.and_then(|h| h.status) {
        _ if !has_check => DockerHealth::None,
        Some(HealthStatusEnum::HEALTHY) => DockerHealth::Healthy,
        Some(HealthStatusEnum::UNHEALTHY) => DockerHealth::Unhealthy,
        _ => DockerHealth::Starting,
    };
    let hc = c.host_config.unwrap_or_default();
    let publishes_ports = hc.publish_all_ports == Some(true)
        || hc
            .port_bindings
            .as_ref()
            .is_some_and(|m| m.values().any(|b| b.as_ref().is_some_and(|b| !b.is_empty())));
    let networks = c
        .network_settings
        .and_then(|n| n.networks)
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| {
            let ip = ep
                .ip_address
                .filter(|s| !s.is_empty())
                .and_then(|s| s.parse().ok());
            (name, ip)
        })
        .collect();
    Container {
        id: c.id.unwrap_or_default(),
        name: c.name.unwrap_or_default().trim_start_matches('/').to_owned(),
        image: cfg.image.unwrap_or_default(),
        image_id: c.image.unwrap_or_default(),
        labels: cfg.labels.unwrap_or_default().into_iter().collect(),
        running: state.running == Some(true),
        health,
        networks,
        publishes_ports,
        mounts: c
            .mounts
            .unwrap_or_default()
            .into_iter()
            .map(|m| Mount {
                kind: m.typ.unwrap_or_default(),
                destination: m.destination.unwrap_or_default(),
            })
            .collect(),
    }
}

/// A create request plus the networks to connect before start.
struct CloneBody {
    create: ContainerCreateBody,
    more_networks: Vec<(String, EndpointSettings)>,
}

/// Copies blue's configuration: image pinned by ID; networks, aliases, volumes and labels
/// kept; static IP, MAC address and hostname dropped (Docker picks new ones).
fn clone_body(blue: &ContainerInspectResponse, spec: &CloneSpec) -> CloneBody {
    let cfg = blue.config.clone().unwrap_or_default();
    let mut hc = blue.host_config.clone().unwrap_or_default();
    let blue_id = blue.id.clone().unwrap_or_default();

    let mut env: Vec<String> = cfg.env.clone().unwrap_or_default();
    for (k, v) in &spec.env {
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) != k);
        env.push(format!("{k}={v}"));
    }
    let mut labels = cfg.labels.clone().unwrap_or_default();
    for (k, v) in &spec.labels {
        labels.insert(k.clone(), v.clone());
    }

    // Anonymous and named volumes that are not in Binds/Mounts (declared by the image or
    // with `-v /path`) are carried over by name, so the replacement sees the same data.
    let mut binds = hc.binds.clone().unwrap_or_default();
    let declared: Vec<String> = binds
        .iter()
        .filter_map(|b| b.split(':').nth(1).map(str::to_owned))
        .chain(hc.mounts.iter().flatten().filter_map(|m| m.target.clone()))
        .collect();
    for m in blue.mounts.iter().flatten() {
        let (Some(name), Some(dest)) = (&m.name, &m.destination) else {
            continue;
        };
        if m.typ.as_deref() == Some("volume") && !declared.contains(dest) {
            let mode = if m.rw == Some(false) { ":ro" } else { "" };
            binds.push(format!("{name}:{dest}{mode}"));
        }
    }
    if !binds.is_empty() {
        hc.binds = Some(binds);
    }

    let mut endpoints: Vec<(String, EndpointSettings)> = blue
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| {
            let aliases = ep.aliases.map(|a| {
                a.into_iter()
                    .filter(|x| !blue_id.starts_with(x.as_str()))
                    .collect::<Vec<_>>()
            });
            let keep = EndpointSettings {
                aliases: aliases.filter(|a| !a.is_empty()),
                links: ep.links,
                driver_opts: ep.driver_opts,
                ..Default::default()
            };
            (name, keep)
        })
        .collect();
    endpoints.sort_by(|a, b| a.0.cmp(&b.0));
    // The network given at create time must be the network mode's (Docker ignores or
    // rejects another); then the route's network; then the first by name.
    let mode = hc.network_mode.clone().unwrap_or_default();
    let mode_net = if mode == "default" {
        "bridge"
    } else {
        mode.as_str()
    };
    let first = endpoints
        .iter()
        .find(|(e, _)| e == mode_net)
        .map(|(e, _)| e.clone())
        .or_else(|| {
            spec.primary_network
                .clone()
                .filter(|n| endpoints.iter().any(|(e, _)| e == n))
        })
        .or_else(|| endpoints.first().map(|(e, _)| e.clone()));
    let mut first_ep = HashMap::new();
    let mut more = Vec::new();
    for (name, ep) in endpoints {
        if Some(&name) == first.as_ref() {
            first_ep.insert(name, ep);
        } else if !matches!(mode.as_str(), "host" | "none") && !mode.starts_with("container:") {
            more.push((name, ep));
        }
    }

    let create = ContainerCreateBody {
        hostname: None,
        domainname: cfg.domainname,
        user: cfg.user,
        exposed_ports: cfg.exposed_ports,
        tty: cfg.tty,
        open_stdin: cfg.open_stdin,
        stdin_once: cfg.stdin_once,
        env: Some(env),
        cmd: cfg.cmd,
        healthcheck: cfg.healthcheck,
        args_escaped: cfg.args_escaped,
        image: blue.image.clone(),
        volumes: cfg.volumes,
        working_dir: cfg.working_dir,
        entrypoint: cfg.entrypoint,
        network_disabled: cfg.network_disabled,
        labels: Some(labels),
        stop_signal: cfg.stop_signal,
        stop_timeout: cfg.stop_timeout,
        shell: cfg.shell,
        host_config: Some(hc),
        networking_config: (!first_ep.is_empty()).then_some(NetworkingConfig {
            endpoints_config: Some(first_ep),
        }),
        ..Default::default()
    };
    CloneBody {
        create,
        more_networks: more,
    }
}
