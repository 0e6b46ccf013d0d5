//! The Docker engine boundary: the [`Engine`] trait the rotation logic is written against,
//! the plain types it speaks in, and [`DockerEngine`], its implementation on bollard.
//!
//! *Boundary*: every bollard call of the crate is in this module. Nothing above it sees a
//! bollard type, so rotations, health checks and recovery are tested with a fake engine,
//! and this module is tested against a real daemon. `docker.rs` implements the trait on
//! bollard; `clone.rs` turns an inspected container into the create request of its copy;
//! `archive.rs` has the remote-delivery calls (tmpfs volumes, CopyToContainer into them).

mod archive;
mod clone;
mod docker;

use std::collections::BTreeMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::time::Duration;

use futures_util::Stream;

pub use docker::{CALL_TIMEOUT, DockerEngine};

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
    /// Whether the daemon deletes it when it stops (`--rm`, `HostConfig.AutoRemove`).
    pub auto_remove: bool,
    /// Mounts.
    pub mounts: Vec<Mount>,
    /// What the container runs, as its configuration says (image defaults merged in).
    pub process: Process,
}

/// The process settings of a container that delivery needs (`Config.User`,
/// `Config.Entrypoint`, `Config.Cmd`, `HostConfig.Binds`). The daemon merges the image's
/// defaults into a container's configuration at create time, so these are what runs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Process {
    /// `USER` (`""`, `1000`, `1000:1000`, `app`, `app:app`).
    pub user: String,
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Command.
    pub cmd: Vec<String>,
    /// Bind mounts as `SOURCE:TARGET[:OPTIONS]` (also `VOLUME:TARGET`).
    pub binds: Vec<String>,
    /// When its main process last started (`State.StartedAt`), empty when never: a change
    /// means the container was started again (its tmpfs volumes are empty again).
    pub started_at: String,
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

/// How to create a replacement from an existing container. Its `Debug` names the
/// environment variables without their values (they may be secrets).
#[derive(Clone, PartialEq, Eq)]
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
    /// Changes delivery makes to the copy (mounts, entrypoint); empty for a plain copy.
    pub overrides: Overrides,
}

impl std::fmt::Debug for CloneSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloneSpec")
            .field("from", &self.from)
            .field("name", &self.name)
            .field(
                "env_names",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("labels", &self.labels)
            .field("primary_network", &self.primary_network)
            .field("overrides", &self.overrides)
            .finish()
    }
}

/// What delivery changes in a copy: binds removed and added, the entrypoint and command
/// replaced, environment variables removed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    /// Binds of blue (exact `HostConfig.Binds` items) the copy does not get.
    pub drop_binds: Vec<String>,
    /// Binds the copy gets in addition (`SOURCE:TARGET:ro`).
    pub add_binds: Vec<String>,
    /// Entrypoint and command of the copy, when they change.
    pub entrypoint: Option<(Vec<String>, Vec<String>)>,
    /// Names of environment variables the copy does not get.
    pub remove_env: Vec<String>,
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
pub(crate) type Fut<'a, T> = Pin<Box<dyn Future<Output = Result<T, EngineError>> + Send + 'a>>;

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
    /// Runs `cmd` in the container and returns its exit code once it has ended; an error
    /// when it has not ended within `timeout` (the process is left to the container).
    fn exec<'a>(&'a self, id: &'a str, cmd: &'a [String], timeout: Duration) -> Fut<'a, i64>;
    /// Events of managed containers from the moment of this call (also those before the
    /// stream is first polled). Ends or errors when the daemon goes away.
    fn events(&self) -> EventStream;
    /// Creates (or finds, when it exists with these very options) the named volume
    /// `name` on the local driver as a tmpfs of `size_bytes` (mode 0711, nosuid, nodev,
    /// noexec) with `labels`. An existing volume of that name with other options is an error.
    /// The tmpfs is mounted only while a container using it runs.
    fn create_tmpfs_volume<'a>(
        &'a self,
        name: &'a str,
        size_bytes: u64,
        labels: &'a [(String, String)],
    ) -> Fut<'a, ()>;
    /// Removes a volume; one that does not exist is not an error. A volume a container
    /// still uses is.
    fn remove_volume<'a>(&'a self, name: &'a str) -> Fut<'a, ()>;
    /// Extracts the tar `archive` into directory `path` of the running container `id`
    /// (CopyToContainer). Refused, with nothing sent, unless the container runs and a local
    /// tmpfs volume is mounted exactly at `path`: anywhere else the bytes would land in the
    /// writable layer on disk, and into a stopped container the engine answers success and
    /// loses the files.
    fn put_archive<'a>(&'a self, id: &'a str, path: &'a str, archive: &'a [u8]) -> Fut<'a, ()>;
    /// Whether bind mounts from this host reach the engine: true for the engine on a unix
    /// socket of this host; false over TCP and for rootless or Docker Desktop engines,
    /// whose directories are not this host's.
    fn is_local(&self) -> bool;
    /// Uploads a non-secret archive (dso's launcher, for remote engines) into `/` of a
    /// created, not yet started container. It lands in the container's writable layer,
    /// which is why only the launcher binary ever goes this way, never a value.
    fn put_launcher<'a>(&'a self, id: &'a str, archive: &'a [u8]) -> Fut<'a, ()>;
}
