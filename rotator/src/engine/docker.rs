//! [`DockerEngine`]: the [`Engine`] trait on the local Docker daemon through bollard.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
use bollard::models::{ContainerInspectResponse, HealthStatusEnum, NetworkConnectRequest};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, RenameContainerOptionsBuilder,
    StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use tracing::debug;

use super::archive::runs_apart;
use super::clone::clone_body;
use super::{
    CloneSpec, Container, DockerHealth, Engine, EngineError, Event, EventStream, Fut, Mount, Process, short,
};
use crate::labels::RELOADER;

/// Deadline of one engine call (inspect, list, create, start, remove, rename, signal; a
/// stop gets its grace on top). The daemon answers these in milliseconds; one that takes
/// this long is stuck (a hung storage driver, a paused daemon), and a rotation must not
/// wait for it forever while it holds the service lock or the listeners' hold.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Runs `f` with a deadline; past it the call is abandoned (the future dropped) and an
/// error names the operation.
async fn within<T>(
    op: impl Into<String>,
    limit: Duration,
    f: impl std::future::Future<Output = Result<T, EngineError>>,
) -> Result<T, EngineError> {
    match tokio::time::timeout(limit, f).await {
        Ok(r) => r,
        Err(_) => Err(EngineError::new(
            op,
            format!("no answer within {} ms; abandoned", limit.as_millis()),
        )),
    }
}

/// [`Engine`] on a Docker daemon through bollard.
#[derive(Debug, Clone)]
pub struct DockerEngine {
    pub(super) docker: Docker,
    api: String,
    /// Whether bind mounts from this host reach the engine (see [`Engine::is_local`]).
    local: bool,
}

impl DockerEngine {
    /// Connects to the engine `DOCKER_HOST` names (unset: `/var/run/docker.sock`) and
    /// negotiates the API version down to what the daemon speaks (1.41 for Docker 20.10).
    /// A unix socket is local (bind mounts from this host reach it) unless the engine says it
    /// is rootless or Docker Desktop; `tcp://` and `http://` are remote.
    pub async fn connect() -> Result<Self, EngineError> {
        let host = std::env::var("DOCKER_HOST").ok().filter(|h| !h.is_empty());
        match host {
            None => Self::connect_to("unix:///var/run/docker.sock").await,
            Some(h) => {
                if std::env::var_os("DOCKER_TLS_VERIFY").is_some() {
                    return Err(EngineError::new(
                        "connect",
                        "DOCKER_TLS_VERIFY is set but this build speaks plain HTTP to the engine; forward the engine's socket (e.g. `ssh -NL 127.0.0.1:2375:/var/run/docker.sock HOST`) and set DOCKER_HOST=tcp://127.0.0.1:2375",
                    ));
                }
                Self::connect_to(&h).await
            }
        }
    }

    /// Connects to the engine at `url`: `unix:///PATH` (local unless the engine is rootless
    /// or Docker Desktop) or `tcp://HOST:PORT` / `http://HOST:PORT` (remote).
    pub async fn connect_to(url: &str) -> Result<Self, EngineError> {
        let op = format!("connect to {url}");
        let (docker, unix) = if url.starts_with("unix://") {
            let d = Docker::connect_with_unix(url, 120, bollard::API_DEFAULT_VERSION);
            (d.map_err(|e| err(&op, e))?, true)
        } else if url.starts_with("tcp://") || url.starts_with("http://") {
            let d = Docker::connect_with_http(url, 120, bollard::API_DEFAULT_VERSION);
            (d.map_err(|e| err(&op, e))?, false)
        } else {
            return Err(EngineError::new(
                op,
                "unsupported engine address; use unix:///PATH or tcp://HOST:PORT (for ssh://, forward the socket: `ssh -NL 127.0.0.1:2375:/var/run/docker.sock HOST` and DOCKER_HOST=tcp://127.0.0.1:2375)",
            ));
        };
        let docker = docker
            .negotiate_version()
            .await
            .map_err(|e| err("negotiate API version", e))?;
        let v = docker.client_version();
        let api = format!("{}.{}", v.major_version, v.minor_version);
        // A rootless engine or Docker Desktop answers on a local socket but runs in its own
        // namespace or VM: this host's directories are not what it bind-mounts.
        let local = unix && {
            let info = docker.info().await.map_err(|e| err("engine info", e))?;
            !runs_apart(info.operating_system.as_deref(), info.security_options.as_deref())
        };
        debug!(api = %api, url, local, "connected to docker");
        Ok(DockerEngine { docker, api, local })
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
        let blue_image_id = blue.image.clone().unwrap_or_default();
        let name = blue
            .config
            .as_ref()
            .and_then(|c| c.image.clone())
            .unwrap_or_default();
        // The clone names the image as blue did, so `docker ps` and the stateful check keep
        // seeing the name; it runs blue's image only if the name still resolves to blue's
        // image ID. A name retagged since (or an image created by ID) is created by ID.
        let by_name = !name.is_empty() && !name.starts_with("sha256:") && {
            let found = self.docker.inspect_image(&name).await;
            found.ok().and_then(|i| i.id).as_deref() == Some(blue_image_id.as_str())
        };
        let image = if by_name {
            name.clone()
        } else {
            blue_image_id.clone()
        };
        if !by_name {
            tracing::warn!(container = %spec.name, image = %name, id = %blue_image_id, "image name no longer names the image blue runs; the clone runs it by ID");
        }
        let body = clone_body(&blue, spec, image);
        if body.auto_remove_cleared {
            tracing::warn!(container = %spec.name, "blue was started with --rm (AutoRemove); the replacement is created without it, so stopping it never deletes the last copy");
        }
        let opts = CreateContainerOptionsBuilder::new().name(&spec.name).build();
        let created = self
            .docker
            .create_container(Some(opts), body.create)
            .await
            .map_err(|e| err(&op, e))?;
        // The name could have been retagged between the check and the create.
        let green_image = self
            .inspect_raw(&created.id)
            .await?
            .and_then(|g| g.image)
            .unwrap_or_default();
        if green_image != blue_image_id {
            let _ = self.docker.remove_container(&created.id, Some(force())).await;
            return Err(EngineError::new(
                op,
                format!(
                    "image {name} was retagged during the create (now {green_image}, blue runs {blue_image_id}); retry"
                ),
            ));
        }
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
        Box::pin(within(
            "list containers",
            CALL_TIMEOUT,
            self.list(format!("{RELOADER}=true")),
        ))
    }

    fn list_labeled<'a>(&'a self, key: &'a str, value: &'a str) -> Fut<'a, Vec<Container>> {
        Box::pin(within(
            "list containers",
            CALL_TIMEOUT,
            self.list(format!("{key}={value}")),
        ))
    }

    fn inspect<'a>(&'a self, id: &'a str) -> Fut<'a, Option<Container>> {
        Box::pin(within(
            format!("inspect {}", short(id)),
            CALL_TIMEOUT,
            async move { Ok(self.inspect_raw(id).await?.map(convert)) },
        ))
    }

    fn create_clone<'a>(&'a self, spec: &'a CloneSpec) -> Fut<'a, String> {
        // Inspect, image check, create and network connects: one deadline for the lot.
        Box::pin(within(
            format!("create container {}", spec.name),
            CALL_TIMEOUT,
            self.clone_container(spec),
        ))
    }

    fn start<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(within(format!("start {}", short(id)), CALL_TIMEOUT, async move {
            let r = self.docker.start_container(id, None).await;
            // 304: already started.
            match r {
                Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
                r => r.map_err(|e| err(format!("start {}", short(id)), e)),
            }
        }))
    }

    fn stop<'a>(&'a self, id: &'a str, grace: Duration) -> Fut<'a, ()> {
        Box::pin(within(
            format!("stop {}", short(id)),
            grace.saturating_add(CALL_TIMEOUT),
            async move {
                let t = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX);
                let opts = StopContainerOptionsBuilder::new().t(t).build();
                match self.docker.stop_container(id, Some(opts)).await {
                    Err(bollard::errors::Error::DockerResponseServerError { status_code: 304, .. }) => Ok(()),
                    r => r.map_err(|e| err(format!("stop {}", short(id)), e)),
                }
            },
        ))
    }

    fn remove<'a>(&'a self, id: &'a str) -> Fut<'a, ()> {
        Box::pin(within(
            format!("remove {}", short(id)),
            CALL_TIMEOUT,
            async move {
                self.docker
                    .remove_container(id, Some(force()))
                    .await
                    .map_err(|e| err(format!("remove {}", short(id)), e))
            },
        ))
    }

    fn rename<'a>(&'a self, id: &'a str, name: &'a str) -> Fut<'a, ()> {
        Box::pin(within(
            format!("rename {} to {name}", short(id)),
            CALL_TIMEOUT,
            async move {
                let opts = RenameContainerOptionsBuilder::new().name(name).build();
                self.docker
                    .rename_container(id, opts)
                    .await
                    .map_err(|e| err(format!("rename {} to {name}", short(id)), e))
            },
        ))
    }

    fn signal<'a>(&'a self, id: &'a str, signal: &'a str) -> Fut<'a, ()> {
        Box::pin(within(
            format!("send {signal} to {}", short(id)),
            CALL_TIMEOUT,
            async move {
                let opts = KillContainerOptionsBuilder::new().signal(signal).build();
                self.docker
                    .kill_container(id, Some(opts))
                    .await
                    .map_err(|e| err(format!("send {signal} to {}", short(id)), e))
            },
        ))
    }

    fn exec<'a>(&'a self, id: &'a str, cmd: &'a [String], timeout: Duration) -> Fut<'a, i64> {
        Box::pin(within(
            format!("exec in {}", short(id)),
            timeout,
            self.exec_wait(id, cmd),
        ))
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

    fn create_tmpfs_volume<'a>(
        &'a self,
        name: &'a str,
        size_bytes: u64,
        labels: &'a [(String, String)],
    ) -> Fut<'a, ()> {
        Box::pin(within(
            format!("create tmpfs volume {name}"),
            CALL_TIMEOUT,
            self.create_tmpfs_volume_call(name, size_bytes, labels),
        ))
    }

    fn remove_volume<'a>(&'a self, name: &'a str) -> Fut<'a, ()> {
        Box::pin(within(
            format!("remove volume {name}"),
            CALL_TIMEOUT,
            self.remove_volume_call(name),
        ))
    }

    fn put_launcher<'a>(&'a self, id: &'a str, archive: &'a [u8]) -> Fut<'a, ()> {
        Box::pin(within(
            format!("copy the launcher into {}", short(id)),
            CALL_TIMEOUT,
            self.put_launcher_call(id, archive),
        ))
    }

    fn put_archive<'a>(&'a self, id: &'a str, path: &'a str, archive: &'a [u8]) -> Fut<'a, ()> {
        Box::pin(within(
            format!("copy archive into {}:{path}", short(id)),
            CALL_TIMEOUT,
            self.put_archive_call(id, path, archive),
        ))
    }

    fn is_local(&self) -> bool {
        self.local
    }
}

fn force() -> bollard::query_parameters::RemoveContainerOptions {
    RemoveContainerOptionsBuilder::new().force(true).v(false).build()
}

pub(super) fn err(op: impl Into<String>, e: bollard::errors::Error) -> EngineError {
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
    let process = Process {
        user: cfg.user.clone().unwrap_or_default(),
        entrypoint: cfg.entrypoint.clone().unwrap_or_default(),
        cmd: cfg.cmd.clone().unwrap_or_default(),
        binds: hc.binds.clone().unwrap_or_default(),
        started_at: state.started_at.clone().unwrap_or_default(),
    };
    let auto_remove = hc.auto_remove == Some(true);
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
        auto_remove,
        mounts: c
            .mounts
            .unwrap_or_default()
            .into_iter()
            .map(|m| Mount {
                kind: m.typ.unwrap_or_default(),
                destination: m.destination.unwrap_or_default(),
            })
            .collect(),
        process,
    }
}
