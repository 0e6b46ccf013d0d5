//! Delivery: secret values into containers as RAM-only files, or as environment variables
//! that dso's launcher reads from such files, kept in the agent's own tmpfs with one
//! directory per container instance. The user-facing contract is `docs/injection.md`.
//!
//! - `store.rs`: the tmpfs root and the per-instance directories (write, read, wipe, sweep).
//! - `archive.rs`: the in-memory tar archive the remote-engine path uploads.
//! - this file: which secrets a container consumes ([`Delivery::consumed`]), and the plan
//!   of one container instance: its files written, the binds and entrypoint of its create
//!   request ([`Delivery::plan`]); files updated in place for `signal` and `none`
//!   ([`Delivery::update_in_place`]).
//!
//! Layout: `ROOT/<instance>/<group>/<file>`. `<instance>` is the rotation ID of the rotation
//! that created the container (label `dso.delivery.instance`); `<group>` is `env` (what the
//! launcher reads, bind-mounted at [`ENV_DIR`]) or `f0`, `f1`, ... (one per distinct target
//! directory of file injection, in config order), each bind-mounted read-only.
//!
//! *Invariant*: a group is always a directory, never a single file: a file replaced by
//! rename inside a bind-mounted directory is seen by the container, a bind-mounted file
//! replaced by rename is not.

pub mod archive;
pub mod declared;
pub mod store;

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use dso_secrets::SecretValue;
use dso_secrets::config::{EnvMode, InjectSpec, SecretSpec};
use tracing::warn;

use crate::engine::{Container, Overrides};
use store::{FileSpec, Store, StoreError, StoreOptions};
use zeroize::Zeroizing;

/// Label naming a container's instance directory.
pub const LABEL_INSTANCE: &str = "dso.delivery.instance";
/// Label listing the secrets a container consumes (`name1,name2`), as in the original DSO.
pub const LABEL_SECRETS: &str = "dso.secrets";
/// Where the launcher's directory is mounted inside the container.
pub const ENV_DIR: &str = "/run/dso/env";
/// Where the launcher binary is mounted inside the container.
pub const LAUNCHER_PATH: &str = "/run/dso/init";
/// The group of launcher-read values.
const ENV_GROUP: &str = "env";
/// Instance directories younger than this are never swept: a rotation writes one before
/// its container exists.
pub const SWEEP_MIN_AGE: Duration = Duration::from_secs(300);

/// The values of one delivery, keyed by secret name and mapping key.
pub struct Bundle {
    values: Vec<(String, String, SecretValue)>,
    /// Versions the values were read at (`secret/key@version`), for reports; no value.
    pub versions: Vec<String>,
}

impl std::fmt::Debug for Bundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bundle")
            .field("versions", &self.versions)
            .finish()
    }
}

impl Bundle {
    /// A bundle of `(secret, key, value)` triples and their versions.
    pub fn new(values: Vec<(String, String, SecretValue)>, versions: Vec<String>) -> Bundle {
        Bundle { values, versions }
    }

    /// The value of mapping `key` of `secret`.
    pub fn get(&self, secret: &str, key: &str) -> Option<&SecretValue> {
        self.values
            .iter()
            .find(|(s, k, _)| s == secret && k == key)
            .map(|(_, _, v)| v)
    }

    /// Whether the bundle holds no value.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }
}

/// Settings of delivery (`agent.delivery` in the config).
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// The tmpfs root (default `/run/dso/secrets`).
    pub root: PathBuf,
    /// Whether dso mounts a tmpfs at the root when it is not one, and its size.
    pub store: StoreOptions,
    /// Host path of the static `dso-init` launcher; needed by `inject: env` (launcher).
    pub launcher: Option<PathBuf>,
    /// The configured secrets.
    pub secrets: Vec<SecretSpec>,
    /// Every configured provider instance and its kind, for the references a container
    /// declares in its `dso.refs` label.
    pub providers: BTreeMap<String, dso_secrets::ProviderKind>,
}

/// A delivery error: names the container, the secret and the fix; never a value.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    /// The store refused (not a tmpfs, I/O, a bad name).
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A mapping has no value yet.
    #[error(
        "container {container}: secret {secret:?} mapping {key:?} has no value yet (the provider was not read, or the value is unusable); see `dso secrets`"
    )]
    Missing {
        /// Container name.
        container: String,
        /// Secret name.
        secret: String,
        /// Mapping key.
        key: String,
    },
    /// The container's user is a name dso cannot resolve into a uid.
    #[error(
        "container {container}: USER {user:?} is not numeric, so dso cannot tell which uid owns the secret files; set inject.uid and inject.gid of secret {secret:?}, or run the container as a numeric uid[:gid]"
    )]
    User {
        /// Container name.
        container: String,
        /// Its `USER`.
        user: String,
        /// The secret needing an owner.
        secret: String,
    },
    /// Two mappings land on one name.
    #[error(
        "container {container}: {what} {name:?} is given by both secret {first:?} and secret {second:?}; rename one mapping key"
    )]
    Clash {
        /// Container name.
        container: String,
        /// `file` or `environment variable`.
        what: &'static str,
        /// The name.
        name: String,
        /// First secret.
        first: String,
        /// Second secret.
        second: String,
    },
    /// Env injection needs the launcher and none is configured or it is missing.
    #[error(
        "container {container}: secret {secret:?} is injected as env through the launcher, but {why}; set agent.delivery.launcher to the static dso-init binary, or use inject.env_mode: native (values then persist on disk, see docs/injection.md)"
    )]
    Launcher {
        /// Container name.
        container: String,
        /// Secret name.
        secret: String,
        /// What is wrong.
        why: String,
    },
    /// A native env value is not UTF-8 (Docker's `Config.Env` is text).
    #[error(
        "container {container}: secret {secret:?} mapping {key:?} is not UTF-8 text and cannot be a native environment variable; use file injection"
    )]
    NotText {
        /// Container name.
        container: String,
        /// Secret name.
        secret: String,
        /// Mapping key.
        key: String,
    },
    /// A secret injected as native env for a container planned before it exists (`dso
    /// up`): its values would travel in the Compose model and the API answer.
    #[error(
        "service {service}: secret {secret} uses inject.env_mode: native, which `dso up` does not deliver (the value would travel through the Compose model); use inject.type: file or env_mode: launcher for it"
    )]
    NativeBeforeCreate {
        /// `project/service`.
        service: String,
        /// The secret's name.
        secret: String,
    },
    /// The archive of a group could not be built (remote engines).
    #[error("container {container}: {message}")]
    Archive {
        /// Container name.
        container: String,
        /// The archive builder's message (names the file, never the value).
        message: String,
    },
    /// In-place update of a container dso did not create.
    #[error(
        "container {container} has no dso secret directory (it was not created by dso); it needs a rotation that replaces it"
    )]
    NoInstance {
        /// Container name.
        container: String,
    },
}

/// What one container instance gets: the create-request changes and the labels. Its
/// `Debug` names environment variables without their values.
#[derive(Clone, Default)]
pub struct Prepared {
    /// The instance directory's name.
    pub instance: String,
    /// Binds, entrypoint and removed variables of the copy.
    pub overrides: Overrides,
    /// Native environment values (`env_mode: native`), `NAME=VALUE` in `Config.Env`.
    pub env: Vec<(String, String)>,
    /// Labels of the copy (`dso.delivery.instance`).
    pub labels: Vec<(String, String)>,
    /// Remote engines: the tmpfs volumes to create before the copy and fill once it runs.
    pub volumes: Vec<RemoteGroup>,
    /// Remote engines: the launcher binary to copy into the created container.
    pub launcher_upload: Option<PathBuf>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("instance", &self.instance)
            .field("overrides", &self.overrides)
            .field(
                "env_names",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("labels", &self.labels)
            .field("volumes", &self.volumes)
            .field("launcher_upload", &self.launcher_upload)
            .finish()
    }
}

/// One group delivered to a remote engine: a tmpfs volume mounted at `target`, filled by
/// an archive upload once the container runs.
#[derive(Clone)]
pub struct RemoteGroup {
    /// Volume name (`dso-<instance>-<group>`).
    pub volume: String,
    /// Directory inside the container.
    pub target: String,
    /// The archive: the group's files and the ready marker (zeroed on drop).
    archive: Arc<Zeroizing<Vec<u8>>>,
}

impl RemoteGroup {
    /// The archive bytes.
    pub fn archive(&self) -> &[u8] {
        &self.archive
    }
}

impl std::fmt::Debug for RemoteGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteGroup")
            .field("volume", &self.volume)
            .field("target", &self.target)
            .field("archive_len", &self.archive.len())
            .finish()
    }
}

/// The volume of group `group` of instance `instance` on a remote engine.
pub fn volume_name(instance: &str, group: &str) -> String {
    format!("dso-{instance}-{group}")
}

/// Size limit of a remote group's tmpfs volume: twice its content, at least 8 MiB.
fn volume_size(archive_len: usize) -> u64 {
    (archive_len as u64).saturating_mul(2).max(8 << 20)
}

/// The delivery side of the rotator. Cheap to share (`Arc`).
pub struct Delivery {
    store: Store,
    launcher: Option<PathBuf>,
    secrets: RwLock<Vec<SecretSpec>>,
    /// Provider kinds by instance name, for declared references (`dso.refs`); a config
    /// reload replaces them ([`Delivery::set_providers`]).
    providers: RwLock<BTreeMap<String, dso_secrets::ProviderKind>>,
    /// The engine does not see this host's directories: volumes and uploads, not binds.
    remote: AtomicBool,
}

impl std::fmt::Debug for Delivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Delivery")
            .field("root", &self.store.root())
            .field("launcher", &self.launcher)
            .finish()
    }
}

/// One group's files as planned.
struct Group {
    name: String,
    /// Directory inside the container.
    target: String,
    files: Vec<PlannedFile>,
}

struct PlannedFile {
    secret: String,
    key: String,
    mode: u32,
    uid: u32,
    gid: u32,
}

/// The layout of one container: groups and native env mappings.
struct Layout {
    groups: Vec<Group>,
    /// `(secret, key)` of native env mappings.
    native: Vec<(String, String)>,
    /// `KEY_FILE=PATH` pointers of file mappings with `env_pointers` (paths, not values).
    pointers: Vec<(String, String)>,
}

impl Delivery {
    /// Opens the store (mounting its tmpfs when needed) and checks the launcher.
    pub fn new(cfg: DeliveryConfig) -> Result<Delivery, DeliveryError> {
        let store = Store::open(&cfg.root, &cfg.store)?;
        Ok(Delivery {
            store,
            launcher: cfg.launcher,
            secrets: RwLock::new(cfg.secrets),
            providers: RwLock::new(cfg.providers),
            remote: AtomicBool::new(false),
        })
    }

    /// Chooses the remote path (tmpfs volumes filled by archive uploads) or the local one
    /// (bind mounts of the store's directories); the agent sets it from the engine.
    pub fn set_remote(&self, remote: bool) {
        self.remote.store(remote, Ordering::Relaxed);
    }

    /// Whether the remote path is used.
    pub fn is_remote(&self) -> bool {
        self.remote.load(Ordering::Relaxed)
    }

    /// The store.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Replaces the configured secrets (config reload).
    pub fn set_secrets(&self, secrets: Vec<SecretSpec>) {
        *self.secrets.write().unwrap_or_else(|p| p.into_inner()) = secrets;
    }

    /// Replaces the provider kinds declared references resolve against (config reload).
    pub fn set_providers(&self, providers: BTreeMap<String, dso_secrets::ProviderKind>) {
        *self.providers.write().unwrap_or_else(|p| p.into_inner()) = providers;
    }

    /// The instance directory a container was created with, from its label.
    pub fn instance_of(c: &Container) -> Option<&str> {
        c.labels
            .get(LABEL_INSTANCE)
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
    }

    /// The secrets container `c` consumes, in config order: those its `dso.secrets` label
    /// names and those whose `targets` match it, then those its `dso.refs` label declares
    /// ([`declared`]). Names in the label that no secret has, and a `dso.refs` label that
    /// cannot be used, are logged and skipped.
    pub fn consumed(&self, c: &Container) -> Vec<SecretSpec> {
        let mut out = self.configured(c);
        out.extend(self.declared(c));
        out
    }

    /// The configured secrets `c` consumes.
    fn configured(&self, c: &Container) -> Vec<SecretSpec> {
        let secrets = self.secrets.read().unwrap_or_else(|p| p.into_inner());
        let named: Vec<&str> = c
            .labels
            .get(LABEL_SECRETS)
            .map(|v| v.split(',').map(str::trim).filter(|s| !s.is_empty()).collect())
            .unwrap_or_default();
        for n in &named {
            if !secrets.iter().any(|s| s.name == *n) {
                warn!(container = %c.name, secret = %n, "label dso.secrets names a secret the config does not define; skipped");
            }
        }
        let service = c.labels.get("com.docker.compose.service").map(String::as_str);
        secrets
            .iter()
            .filter(|s| {
                let t = &s.targets;
                named.contains(&s.name.as_str())
                    || t.containers.contains(&c.name)
                    || service.is_some_and(|svc| t.services.iter().any(|n| n == svc))
                    || (!t.labels.is_empty() && t.labels.iter().all(|(k, v)| c.labels.get(k) == Some(v)))
            })
            .cloned()
            .collect()
    }

    /// The secrets `c` declares in its `dso.refs` label; none (logged) when the label
    /// cannot be used.
    pub fn declared(&self, c: &Container) -> Vec<SecretSpec> {
        let Some(label) = c.labels.get(declared::LABEL_REFS) else {
            return Vec::new();
        };
        let providers = self.providers.read().unwrap_or_else(|p| p.into_inner());
        match declared::Declared::parse(label).and_then(|d| d.specs(&providers)) {
            Ok(specs) => specs,
            Err(e) => {
                warn!(container = %c.name, error = %e, "its declared references are skipped");
                Vec::new()
            }
        }
    }

    /// Whether any consumed secret of `c` is injected as native env (its values live in
    /// `Config.Env`, so only a new container takes new ones).
    pub fn has_native_env(&self, c: &Container) -> bool {
        self.native_env_secret(c).is_some()
    }

    /// The first consumed secret of `c` injected as native env.
    pub fn native_env_secret(&self, c: &Container) -> Option<String> {
        self.consumed(c)
            .into_iter()
            .find(|s| {
                matches!(
                    s.inject,
                    InjectSpec::Env {
                        env_mode: EnvMode::Native
                    }
                )
            })
            .map(|s| s.name)
    }

    fn layout(&self, c: &Container, secrets: &[SecretSpec]) -> Result<Layout, DeliveryError> {
        let mut groups: Vec<Group> = Vec::new();
        let mut native: Vec<(String, String)> = Vec::new();
        let mut pointers: Vec<(String, String)> = Vec::new();
        let mut env_names: BTreeMap<String, String> = BTreeMap::new();
        let owner =
            |s: &SecretSpec, uid: Option<u32>, gid: Option<u32>| -> Result<(u32, u32), DeliveryError> {
                let (cu, cg) = match (uid, gid) {
                    (Some(u), Some(g)) => return Ok((u, g)),
                    _ => parse_user(&c.process.user).ok_or_else(|| DeliveryError::User {
                        container: c.name.clone(),
                        user: c.process.user.clone(),
                        secret: s.name.clone(),
                    })?,
                };
                Ok((uid.unwrap_or(cu), gid.unwrap_or(cg)))
            };
        for s in secrets {
            match &s.inject {
                InjectSpec::File {
                    path,
                    mode,
                    uid,
                    gid,
                    env_pointers,
                } => {
                    let (uid, gid) = owner(s, *uid, *gid)?;
                    let target = path.to_string_lossy().into_owned();
                    let idx = match groups
                        .iter()
                        .position(|g| g.target == target && g.name != ENV_GROUP)
                    {
                        Some(i) => i,
                        None => {
                            let n = groups.iter().filter(|g| g.name != ENV_GROUP).count();
                            groups.push(Group {
                                name: format!("f{n}"),
                                target,
                                files: Vec::new(),
                            });
                            groups.len() - 1
                        }
                    };
                    if *env_pointers {
                        for (key, _) in &s.mappings {
                            let dir = path.to_string_lossy();
                            pointers.push((
                                format!("{key}_FILE"),
                                format!("{}/{key}", dir.trim_end_matches('/')),
                            ));
                        }
                    }
                    for (key, _) in &s.mappings {
                        if let Some(other) = groups[idx].files.iter().find(|f| f.key == *key) {
                            return Err(DeliveryError::Clash {
                                container: c.name.clone(),
                                what: "file",
                                name: format!("{}/{key}", groups[idx].target),
                                first: other.secret.clone(),
                                second: s.name.clone(),
                            });
                        }
                        groups[idx].files.push(PlannedFile {
                            secret: s.name.clone(),
                            key: key.clone(),
                            mode: *mode,
                            uid,
                            gid,
                        });
                    }
                }
                InjectSpec::Env { env_mode } => {
                    for (key, _) in &s.mappings {
                        if let Some(first) = env_names.insert(key.clone(), s.name.clone()) {
                            return Err(DeliveryError::Clash {
                                container: c.name.clone(),
                                what: "environment variable",
                                name: key.clone(),
                                first,
                                second: s.name.clone(),
                            });
                        }
                    }
                    match env_mode {
                        EnvMode::Native => {
                            native.extend(s.mappings.iter().map(|(k, _)| (s.name.clone(), k.clone())))
                        }
                        EnvMode::Launcher => {
                            match &self.launcher {
                                None => {
                                    return Err(DeliveryError::Launcher {
                                        container: c.name.clone(),
                                        secret: s.name.clone(),
                                        why: "no launcher is configured".to_owned(),
                                    });
                                }
                                Some(p) if !p.is_file() => {
                                    return Err(DeliveryError::Launcher {
                                        container: c.name.clone(),
                                        secret: s.name.clone(),
                                        why: format!("{} is not a file", p.display()),
                                    });
                                }
                                Some(_) => {}
                            }
                            let (uid, gid) = owner(s, None, None)?;
                            let idx = match groups.iter().position(|g| g.name == ENV_GROUP) {
                                Some(i) => i,
                                None => {
                                    groups.push(Group {
                                        name: ENV_GROUP.to_owned(),
                                        target: ENV_DIR.to_owned(),
                                        files: Vec::new(),
                                    });
                                    groups.len() - 1
                                }
                            };
                            groups[idx]
                                .files
                                .extend(s.mappings.iter().map(|(k, _)| PlannedFile {
                                    secret: s.name.clone(),
                                    key: k.clone(),
                                    mode: 0o400,
                                    uid,
                                    gid,
                                }));
                        }
                    }
                }
            }
        }
        if self.is_remote() && !groups.iter().any(|g| g.name == ENV_GROUP) {
            // The launcher holds every remote container's entrypoint and reads its env
            // directory: an empty one when no value is an environment variable.
            groups.push(Group {
                name: ENV_GROUP.to_owned(),
                target: ENV_DIR.to_owned(),
                files: Vec::new(),
            });
        }
        if self.is_remote() && self.launcher.as_ref().is_none_or(|p| !p.is_file()) {
            return Err(DeliveryError::Launcher {
                container: c.name.clone(),
                secret: secrets.first().map(|s| s.name.clone()).unwrap_or_default(),
                why: "a remote engine needs the launcher to hold the entrypoint until the files are uploaded, and it is missing".to_owned(),
            });
        }
        Ok(Layout {
            groups,
            native,
            pointers,
        })
    }

    /// The archives of an instance's groups for a remote engine: each group's files from
    /// the store, with the layout's modes and owners, and the ready marker.
    pub fn archives(&self, c: &Container, instance: &str) -> Result<Vec<RemoteGroup>, DeliveryError> {
        let layout = self.layout(c, &self.consumed(c))?;
        let mut out = Vec::new();
        for g in &layout.groups {
            let values = self.store.read_group(instance, &g.name)?;
            let mut entries = Vec::new();
            for f in &g.files {
                let v = values
                    .iter()
                    .find(|(n, _)| *n == f.key)
                    .map(|(_, v)| v)
                    .ok_or_else(|| DeliveryError::Missing {
                        container: c.name.clone(),
                        secret: f.secret.clone(),
                        key: f.key.clone(),
                    })?;
                entries.push(archive::FileEntry {
                    name: &f.key,
                    value: v.expose(),
                    mode: f.mode,
                    uid: f.uid,
                    gid: f.gid,
                });
            }
            let bytes = archive::build(&entries, true).map_err(|e| DeliveryError::Archive {
                container: c.name.clone(),
                message: e.to_string(),
            })?;
            out.push(RemoteGroup {
                volume: volume_name(instance, &g.name),
                target: g.target.clone(),
                archive: Arc::new(bytes),
            });
        }
        Ok(out)
    }

    /// The size limit of a remote group's volume.
    pub fn volume_size(group: &RemoteGroup) -> u64 {
        volume_size(group.archive.len())
    }

    /// Values of one group: from `bundle` when it has them, else from `current` (the
    /// files the container has now).
    fn group_values(
        &self,
        c: &Container,
        g: &Group,
        bundle: Option<&Bundle>,
        current: &[(String, SecretValue)],
    ) -> Result<Vec<SecretValue>, DeliveryError> {
        g.files
            .iter()
            .map(|f| {
                bundle
                    .and_then(|b| b.get(&f.secret, &f.key))
                    .map(SecretValue::duplicate)
                    .or_else(|| {
                        current
                            .iter()
                            .find(|(n, _)| *n == f.key)
                            .map(|(_, v)| v.duplicate())
                    })
                    .ok_or_else(|| DeliveryError::Missing {
                        container: c.name.clone(),
                        secret: f.secret.clone(),
                        key: f.key.clone(),
                    })
            })
            .collect()
    }

    fn write(&self, instance: &str, g: &Group, values: &[SecretValue]) -> Result<PathBuf, DeliveryError> {
        let specs: Vec<FileSpec<'_>> = g
            .files
            .iter()
            .zip(values)
            .map(|(f, v)| FileSpec {
                name: &f.key,
                value: v.expose(),
                mode: f.mode,
                uid: f.uid,
                gid: f.gid,
            })
            .collect();
        Ok(self.store.write_group(instance, &g.name, &specs, true)?)
    }

    /// Plans the copy of `blue` as instance `instance`: writes its files (values from
    /// `bundle`, else blue's current files) and returns the create-request changes.
    /// `None` when blue consumes no secret and has no dso mounts (a plain copy), or when
    /// no value is known yet (no bundle and blue was never delivered to: a manual
    /// rotation before the first delivery copies blue as it is).
    pub fn plan(
        &self,
        blue: &Container,
        bundle: Option<&Bundle>,
        instance: &str,
    ) -> Result<Option<Prepared>, DeliveryError> {
        let secrets = self.consumed(blue);
        let blue_instance = Self::instance_of(blue);
        if secrets.is_empty() && blue_instance.is_none() && !self.has_dso_binds(blue, None) {
            return Ok(None);
        }
        if !secrets.is_empty() && bundle.is_none() && blue_instance.is_none() {
            warn!(container = %blue.name, "its secrets were not delivered yet; copying it unchanged");
            return Ok(None);
        }
        let layout = self.layout(blue, &secrets)?;
        let mut prepared = Prepared {
            instance: instance.to_owned(),
            labels: vec![(LABEL_INSTANCE.to_owned(), instance.to_owned())],
            ..Prepared::default()
        };
        let result = (|| {
            for g in &layout.groups {
                let current = match blue_instance {
                    Some(bi) if self.store.exists(bi) && self.store.groups(bi)?.contains(&g.name) => {
                        self.store.read_group(bi, &g.name)?
                    }
                    _ => Vec::new(),
                };
                let values = self.group_values(blue, g, bundle, &current)?;
                let dir = self.write(instance, g, &values)?;
                if !self.is_remote() {
                    prepared
                        .overrides
                        .add_binds
                        .push(format!("{}:{}:ro", dir.display(), g.target));
                }
            }
            if self.is_remote() {
                // The store keeps the values (RAM, on this host); the engine gets them in
                // its own tmpfs volumes once the container runs.
                prepared.volumes = self.archives(blue, instance)?;
                for v in &prepared.volumes {
                    prepared
                        .overrides
                        .add_binds
                        .push(format!("{}:{}", v.volume, v.target));
                }
            }
            Ok::<(), DeliveryError>(())
        })();
        if let Err(e) = result {
            if let Err(w) = self.store.wipe(instance) {
                warn!(instance, error = %w, "cannot wipe a half-written instance directory");
            }
            return Err(e);
        }
        // Native env: new values replace blue's (which the copy inherits otherwise).
        for (secret, key) in &layout.native {
            if let Some(v) = bundle.and_then(|b| b.get(secret, key)) {
                let text = std::str::from_utf8(v.expose()).map_err(|_| DeliveryError::NotText {
                    container: blue.name.clone(),
                    secret: secret.clone(),
                    key: key.clone(),
                })?;
                prepared.env.push((key.clone(), text.to_owned()));
            }
        }
        prepared.env.extend(layout.pointers.iter().cloned());
        prepared.overrides.drop_binds = blue
            .process
            .binds
            .iter()
            .filter(|b| self.is_dso_bind(b, blue_instance))
            .cloned()
            .collect();
        let wants_launcher = layout.groups.iter().any(|g| g.name == ENV_GROUP);
        let wrapped = blue.process.entrypoint.first().map(String::as_str) == Some(LAUNCHER_PATH);
        if self.is_remote() {
            // The launcher is copied into the created container and waits for every
            // group's ready marker before it execs the original entrypoint.
            prepared.launcher_upload = self.launcher.clone();
            let original = if wrapped {
                unwrap_entrypoint(&blue.process.entrypoint)
            } else {
                blue.process.entrypoint.clone()
            };
            let mut entry = vec![
                LAUNCHER_PATH.to_owned(),
                "--env-dir".to_owned(),
                ENV_DIR.to_owned(),
            ];
            for g in &layout.groups {
                entry.push("--wait-for".to_owned());
                entry.push(format!(
                    "{}/{}",
                    g.target.trim_end_matches('/'),
                    store::READY_MARKER
                ));
            }
            entry.push("--".to_owned());
            entry.extend(original);
            prepared.overrides.entrypoint = Some((entry, blue.process.cmd.clone()));
        } else if wants_launcher {
            if let Some(l) = &self.launcher {
                prepared
                    .overrides
                    .add_binds
                    .push(format!("{}:{LAUNCHER_PATH}:ro", l.display()));
            }
            if !wrapped {
                let mut entry = launcher_args();
                entry.extend(blue.process.entrypoint.iter().cloned());
                prepared.overrides.entrypoint = Some((entry, blue.process.cmd.clone()));
            }
        } else if wrapped {
            prepared.overrides.entrypoint = Some((
                unwrap_entrypoint(&blue.process.entrypoint),
                blue.process.cmd.clone(),
            ));
        }
        Ok(Some(prepared))
    }

    /// Writes new values into the files of the running container `c` in place (each file
    /// replaced atomically), for `signal` and `none`. Values the bundle lacks keep their
    /// current content.
    pub fn update_in_place(&self, c: &Container, bundle: &Bundle) -> Result<(), DeliveryError> {
        let Some(instance) = Self::instance_of(c).filter(|i| self.store.exists(i)) else {
            return Err(DeliveryError::NoInstance {
                container: c.name.clone(),
            });
        };
        let layout = self.layout(c, &self.consumed(c))?;
        let groups = self.store.groups(instance)?;
        for g in &layout.groups {
            if !groups.contains(&g.name) {
                // A group the container was not created with is not mounted in it.
                return Err(DeliveryError::NoInstance {
                    container: c.name.clone(),
                });
            }
            let current = self.store.read_group(instance, &g.name)?;
            let values = self.group_values(c, g, Some(bundle), &current)?;
            self.write(instance, g, &values)?;
        }
        Ok(())
    }

    /// Whether `c` can take new values in place (its instance directory has every group
    /// its secrets need, and none of them is native env).
    pub fn can_update_in_place(&self, c: &Container) -> bool {
        let Some(instance) = Self::instance_of(c).filter(|i| self.store.exists(i)) else {
            return false;
        };
        let secrets = self.consumed(c);
        if secrets.iter().any(|s| {
            matches!(
                s.inject,
                InjectSpec::Env {
                    env_mode: EnvMode::Native
                }
            )
        }) {
            return false;
        }
        let Ok(layout) = self.layout(c, &secrets) else {
            return false;
        };
        let Ok(groups) = self.store.groups(instance) else {
            return false;
        };
        layout.groups.iter().all(|g| groups.contains(&g.name))
    }

    /// Whether `c` has its secret files: it carries [`LABEL_INSTANCE`] and every group its
    /// secrets need is a directory of the store holding files. False for a container dso
    /// did not create, and for one whose directory is gone or was recreated empty (the
    /// tmpfs lost at a host reboot while the state directory, on disk, still records the
    /// delivered versions; Docker recreates a missing bind source as an empty directory).
    /// A group being rewritten counts (its old files stay until each is replaced by
    /// rename). A layout error counts as having them: the next rotation reports it.
    pub fn has_files(&self, c: &Container) -> bool {
        let Some(instance) = Self::instance_of(c) else {
            return false;
        };
        let Ok(layout) = self.layout(c, &self.consumed(c)) else {
            return true;
        };
        layout.groups.iter().all(|g| {
            self.store
                .group_dir(instance, &g.name)
                .ok()
                .and_then(|d| std::fs::read_dir(d).ok())
                .is_some_and(|mut entries| entries.next().is_some())
        })
    }

    /// Wipes an instance directory (overwritten, then unlinked); logs a failure.
    pub fn wipe(&self, instance: &str) {
        if let Err(e) = self.store.wipe(instance) {
            warn!(instance, error = %e, "cannot wipe secret directory");
        }
    }

    /// Wipes every instance directory that no container in `referenced` uses and that is
    /// at least `min_age` old ([`SWEEP_MIN_AGE`] while rotations may be writing one;
    /// zero at agent start). Returns what was wiped.
    pub fn sweep(&self, referenced: &HashSet<String>, min_age: Duration) -> Vec<String> {
        let orphans = self.orphans(referenced, min_age);
        for i in &orphans {
            self.wipe(i);
        }
        orphans
    }

    /// The instance directories [`Delivery::sweep`] would wipe.
    pub fn orphans(&self, referenced: &HashSet<String>, min_age: Duration) -> Vec<String> {
        let Ok(all) = self.store.instances() else {
            return Vec::new();
        };
        let now = SystemTime::now();
        all.into_iter()
            .filter(|i| !referenced.contains(i))
            .filter(|i| {
                let age = std::fs::symlink_metadata(self.store.root().join(i))
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| now.duration_since(t).ok())
                    .unwrap_or_default();
                age >= min_age
            })
            .collect()
    }

    fn has_dso_binds(&self, c: &Container, instance: Option<&str>) -> bool {
        c.process.binds.iter().any(|b| self.is_dso_bind(b, instance))
    }

    /// Whether a bind item is one dso added: a directory under the store root, the
    /// launcher, or (remote engines) a group volume of the container's own instance,
    /// `dso-<instance>-<group>`. A user's volume whose name happens to start with `dso-`
    /// is not one.
    fn is_dso_bind(&self, bind: &str, instance: Option<&str>) -> bool {
        let source = bind.split(':').next().unwrap_or_default();
        let under_root = Path::new(source).starts_with(self.store.root());
        let volume = instance.is_some_and(|i| {
            source
                .strip_prefix(&format!("dso-{i}-"))
                .is_some_and(|g| g == ENV_GROUP || (g.starts_with('f') && g[1..].parse::<u32>().is_ok()))
        });
        under_root
            || volume
            || bind
                .split(':')
                .nth(1)
                .is_some_and(|t| t == LAUNCHER_PATH || t == ENV_DIR)
    }
}

/// The launcher's own arguments before the original entrypoint.
fn launcher_args() -> Vec<String> {
    vec![
        LAUNCHER_PATH.to_owned(),
        "--env-dir".to_owned(),
        ENV_DIR.to_owned(),
        "--".to_owned(),
    ]
}

/// The original entrypoint of a launcher-wrapped one (what follows `--`).
fn unwrap_entrypoint(entry: &[String]) -> Vec<String> {
    match entry.iter().position(|a| a == "--") {
        Some(i) => entry[i + 1..].to_vec(),
        None => entry.get(1..).unwrap_or_default().to_vec(),
    }
}

/// `USER` as a numeric uid and gid: `""` is root, `1000` is uid 1000 with gid 0 (what the
/// runtime gives a uid without a passwd entry), `1000:1000` both. A name is `None`.
pub fn parse_user(user: &str) -> Option<(u32, u32)> {
    let user = user.trim();
    if user.is_empty() {
        return Some((0, 0));
    }
    let (u, g) = match user.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (user, None),
    };
    let uid = u.parse().ok()?;
    let gid = match g {
        Some(g) => g.parse().ok()?,
        None => 0,
    };
    Some((uid, gid))
}

#[cfg(test)]
mod tests;

/// The archive that puts the launcher at [`LAUNCHER_PATH`] in a container's root (remote
/// engines; the binary is not secret).
pub fn launcher_archive(launcher: &Path) -> Result<Vec<u8>, std::io::Error> {
    let bin = std::fs::read(launcher)?;
    let mut out = Vec::with_capacity(bin.len() + 4096);
    {
        let mut b = tar::Builder::new(&mut out);
        let mtime = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        for dir in ["run/", "run/dso/"] {
            let mut h = tar::Header::new_ustar();
            h.set_entry_type(tar::EntryType::Directory);
            h.set_mode(0o755);
            h.set_size(0);
            h.set_mtime(mtime);
            b.append_data(&mut h, dir, std::io::empty())?;
        }
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o755);
        h.set_size(bin.len() as u64);
        h.set_mtime(mtime);
        b.append_data(&mut h, LAUNCHER_PATH.trim_start_matches('/'), bin.as_slice())?;
        b.finish()?;
    }
    Ok(out)
}
