//! `dso up` / `dso down` (also `dso compose up|down`, `docker dso up -d`): a Compose project
//! whose `environment:` holds `dso://` and `dsofile://` references (docs/compose.md).
//!
//! `dso up` loads the project with Compose itself (`config`), prepares each managed
//! service's delivery (through the agent's `POST /v1/compose/prepare`, or in local mode
//! from the local vault into a tmpfs store it opens itself), and runs Compose's `up` with
//! the override on stdin. No value is ever in the override, a file on disk or argv.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use dso_rotator::delivery::declared::{self, Declared};
use dso_rotator::delivery::store::StoreOptions;
use dso_rotator::delivery::{Bundle, Delivery, DeliveryConfig};
use dso_secrets::local::{LocalVault, Protection};
use dso_secrets::spec::{Limits, LocalSettings, ProviderSettings};
use dso_secrets::{ProviderKind, ProviderSpec, Reference};
use serde_json::Value;

use crate::client::{ApiFailure, Client, Unreachable};
use crate::compose::override_::{self, Change};
use crate::compose::prepare::{self, PrepareReply, PrepareRequest};
use crate::compose::project::{Project, UpArgs};
use crate::compose::runner::{Compose, Flavor};
use crate::compose::service::{LOCAL_PROVIDER, ServiceView};
use crate::config::DeliverySettings;

/// The arguments of `dso up` / `dso down`, split by [`UpArgs::parse`] (clap would stop at
/// the first option it does not know, and Compose has many).
#[derive(Debug, Args)]
pub struct ComposeArgs {
    /// dso's options (-f, -p, --project-directory, --env-file, --profile, --compose,
    /// --local, --launcher, --secrets-root) and Compose's (-d, --build, services...).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, value_name = "ARGS")]
    pub args: Vec<String>,
}

/// `dso compose ...`.
#[derive(Debug, Subcommand)]
pub enum ComposeCommand {
    /// The same as `dso up`.
    Up(ComposeArgs),
    /// The same as `dso down`.
    Down(ComposeArgs),
}

/// How values reach the store.
enum Mode {
    /// The agent resolves and writes them (`POST /v1/compose/prepare`).
    Agent {
        client: Client,
        /// Provider names the agent has.
        providers: Vec<String>,
    },
    /// This process resolves them from the local vault and writes its own store.
    Local { socket: PathBuf, why: String },
}

/// Runs `dso compose up|down`.
pub fn compose(cmd: ComposeCommand, socket: Option<PathBuf>) -> anyhow::Result<()> {
    match cmd {
        ComposeCommand::Up(a) => up(a, socket),
        ComposeCommand::Down(a) => down(a, socket),
    }
}

/// Runs `dso up`.
pub fn up(raw: ComposeArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let args = UpArgs::parse(&raw.args)?;
    let compose = Compose::detect(args.compose.as_deref())?;
    let project = Project::load(&compose, &args)?;
    let mut views = Vec::new();
    for (name, svc) in project.services() {
        let v = ServiceView::read(name, svc)?;
        if v.managed() {
            views.push((v, svc.clone()));
        }
    }
    if views.is_empty() {
        eprintln!(
            "dso: project {}: no service has dso:// or dsofile:// references or dso.reloader: \"true\"; running Compose unchanged",
            project.name
        );
        return run_compose(&compose, &project, false, None, "up", &args.rest);
    }
    let rt = super::runtime()?;
    let mode = rt.block_on(mode(&args, socket))?;
    let default_provider = match &mode {
        Mode::Agent { providers, .. } => default_provider(providers),
        Mode::Local { .. } => Some(LOCAL_PROVIDER.to_owned()),
    };
    let local = match &mode {
        Mode::Local { socket, why } => {
            eprintln!(
                "dso: local mode ({why}): values come from the local vault and are written to a tmpfs \
                 by this command; rotation, and the ports moved to dso.host_ports, need the agent \
                 (`dso agent --docker`, socket {})",
                socket.display()
            );
            Some(LocalDelivery::open(&args)?)
        }
        Mode::Agent { .. } => None,
    };
    let mut changes = Vec::new();
    for (view, _) in &views {
        let reply = if view.refs.is_empty() {
            None
        } else {
            let Some(default) = default_provider
                .as_deref()
                .or_else(|| view.refs.iter().all(|r| r.provider.is_some()).then_some(""))
            else {
                bail!(
                    "service {}: dso:// needs a default provider, but the agent has several and none is \
                     named `local`; write dso+NAME://REF (or dsofile+NAME://REF) with NAME one of its providers",
                    view.name
                );
            };
            let refs = view.declared(default);
            let req = request(&compose, &project, view, refs)?;
            let reply = match (&mode, &local) {
                (Mode::Agent { client, .. }, _) => rt.block_on(agent_prepare(client, &req))?,
                (Mode::Local { .. }, Some(l)) => rt.block_on(l.prepare(&req))?,
                (Mode::Local { .. }, None) => unreachable!("local mode opens its store"),
            };
            if reply.instance.is_empty() {
                bail!(
                    "service {}: prepare planned no delivery for its references",
                    view.name
                );
            }
            eprintln!(
                "dso: service {}: {} env and {} file reference(s) delivered (instance {})",
                view.name,
                req.refs.env.len(),
                req.refs.files.len(),
                reply.instance
            );
            Some(reply)
        };
        changes.push(Change::new(view, reply.as_ref())?);
    }
    let stdin = match compose.flavor {
        Flavor::V2 => override_::v2_override(&project.name, &changes),
        Flavor::V1 => override_::v1_model(&project.model, &changes)?,
    };
    if std::env::var_os("DSO_PRINT_OVERRIDE").is_some() {
        eprintln!("{stdin}");
    }
    run_compose(&compose, &project, true, Some(stdin.as_bytes()), "up", &args.rest)
}

/// Runs `dso down`.
pub fn down(raw: ComposeArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let args = UpArgs::parse(&raw.args)?;
    let compose = Compose::detect(args.compose.as_deref())?;
    let project = Project::load(&compose, &args)?;
    run_compose(&compose, &project, false, None, "down", &args.rest)?;
    let rt = super::runtime()?;
    match rt.block_on(mode(&args, socket))? {
        Mode::Agent { client, .. } => {
            let _: Value = rt
                .block_on(client.post("/v1/compose/down", &serde_json::json!({"project": project.name})))
                .context("asking the agent to release the project's ports and wipe its secret directories")?;
            eprintln!(
                "dso: project {}: the agent released its listeners and wiped its secret directories",
                project.name
            );
        }
        Mode::Local { .. } => {
            let l = LocalDelivery::open(&args)?;
            let mut wiped = 0;
            for (name, _) in project.services() {
                let instance = prepare::instance_for(&project.name, name);
                if l.delivery.store().exists(&instance) {
                    l.delivery.wipe(&instance);
                    wiped += 1;
                }
            }
            eprintln!(
                "dso: project {}: wiped {wiped} secret directorie(s) under {}",
                project.name,
                l.root.display()
            );
        }
    }
    Ok(())
}

fn run_compose(
    compose: &Compose,
    project: &Project,
    with_stdin: bool,
    stdin: Option<&[u8]>,
    sub: &str,
    rest: &[String],
) -> anyhow::Result<()> {
    let mut a = project.global_args(compose.flavor, with_stdin);
    a.push(sub.to_owned());
    a.extend(rest.iter().cloned());
    let status = compose.run(&a, stdin)?;
    if !status.success() {
        bail!("{} {sub} failed ({status})", compose.display());
    }
    Ok(())
}

/// Agent mode when the socket answers (unless `--local`); local mode when nothing listens
/// on the default socket. A socket named with --socket/DSO_SOCKET that does not answer is
/// an error (the user asked for that agent).
async fn mode(args: &UpArgs, socket: Option<PathBuf>) -> anyhow::Result<Mode> {
    let socket = args.socket.clone().or(socket);
    let explicit = socket.is_some();
    let path = super::socket_path(socket);
    if args.local {
        return Ok(Mode::Local {
            socket: path,
            why: "--local".to_owned(),
        });
    }
    let client = Client::new(&path);
    match client.get::<Value>("/v1/secrets").await {
        Ok(v) => Ok(Mode::Agent {
            client,
            providers: providers_of(&v),
        }),
        Err(e) if e.downcast_ref::<ApiFailure>().is_some() => Ok(Mode::Agent {
            client,
            providers: Vec::new(),
        }),
        Err(e) if e.downcast_ref::<Unreachable>().is_some() && !explicit => Ok(Mode::Local {
            why: format!("no agent answers on {}", path.display()),
            socket: path,
        }),
        Err(e) => Err(e.context("the agent named by --socket / DSO_SOCKET; pass --local to do without it")),
    }
}

/// Provider names in `GET /v1/secrets` (the watcher's providers, and those of secrets).
fn providers_of(v: &Value) -> Vec<String> {
    let mut out: Vec<String> = v
        .pointer("/watcher/providers")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|p| p.get("provider").and_then(Value::as_str).map(str::to_owned))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// `local` when the agent has it, else its only provider.
fn default_provider(providers: &[String]) -> Option<String> {
    if providers.iter().any(|p| p == LOCAL_PROVIDER) {
        return Some(LOCAL_PROVIDER.to_owned());
    }
    match providers {
        [only] => Some(only.clone()),
        _ => None,
    }
}

async fn agent_prepare(client: &Client, req: &PrepareRequest) -> anyhow::Result<PrepareReply> {
    client
        .post("/v1/compose/prepare", &serde_json::to_value(req)?)
        .await
        .with_context(|| format!("preparing service {} through the agent", req.service))
}

/// The prepare request of a service: the image's user, entrypoint and command where the
/// service does not set them.
fn request(
    compose: &Compose,
    project: &Project,
    view: &ServiceView,
    refs: Declared,
) -> anyhow::Result<PrepareRequest> {
    let image = match &view.image {
        Some(i) => i.clone(),
        None if view.builds => match compose.flavor {
            Flavor::V2 => format!("{}-{}", project.name, view.name),
            Flavor::V1 => format!("{}_{}", project.name, view.name),
        },
        None => bail!("service {} has neither image: nor build:", view.name),
    };
    let config = match image_config(&image) {
        Ok(c) => c,
        Err(_) => {
            let sub = if view.builds { "build" } else { "pull" };
            eprintln!(
                "dso: image {image} of service {} is not on this host: running compose {sub} {}",
                view.name, view.name
            );
            let mut a = project.global_args(compose.flavor, false);
            if compose.flavor == Flavor::V1 {
                // v1 reads the user's files for build/pull (the merged model is for `up`).
                a = project.global_args(Flavor::V2, false);
            }
            a.extend([sub.to_owned(), view.name.clone()]);
            let status = compose.run(&a, None)?;
            image_config(&image).with_context(|| {
                format!(
                    "service {}: image {image} is not on this host and `compose {sub}` ({status}) did not \
                     provide it; build or load it first",
                    view.name
                )
            })?
        }
    };
    let strings = |k: &str| -> Vec<String> {
        config
            .get(k)
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect()
    };
    let entrypoint = view.entrypoint.clone().unwrap_or_else(|| strings("Entrypoint"));
    let cmd = match (&view.command, &view.entrypoint) {
        (Some(c), _) => c.clone(),
        // An entrypoint set without a command clears the image's command.
        (None, Some(_)) => Vec::new(),
        (None, None) => strings("Cmd"),
    };
    Ok(PrepareRequest {
        project: project.name.clone(),
        service: view.name.clone(),
        image,
        user: view.user.clone().unwrap_or_else(|| {
            config
                .get("User")
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_owned()
        }),
        entrypoint,
        cmd,
        refs,
    })
}

/// `docker image inspect`'s `Config` of a local image.
fn image_config(image: &str) -> anyhow::Result<Value> {
    let out = std::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{json .Config}}", image])
        .stdin(std::process::Stdio::null())
        .output()
        .context("running docker image inspect")?;
    if !out.status.success() {
        bail!(
            "no image {image}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    serde_json::from_slice(&out.stdout).context("reading docker image inspect")
}

/// Local mode: the local vault and a store this process opens.
struct LocalDelivery {
    delivery: Delivery,
    root: PathBuf,
}

impl LocalDelivery {
    fn open(args: &UpArgs) -> anyhow::Result<LocalDelivery> {
        let root_user = nix::unistd::geteuid().is_root();
        let root = match &args.secrets_root {
            Some(r) => std::path::absolute(r).context("--secrets-root")?,
            None => default_local_root(root_user)?,
        };
        let launcher = args
            .launcher
            .clone()
            .or_else(|| std::env::var_os("DSO_LAUNCHER").map(PathBuf::from))
            .or_else(|| DeliverySettings::default().launcher_path());
        let delivery = Delivery::new(DeliveryConfig {
            root: root.clone(),
            store: StoreOptions {
                mount: root_user,
                size_bytes: 64 << 20,
            },
            launcher,
            secrets: Vec::new(),
            providers: BTreeMap::from([(LOCAL_PROVIDER.to_owned(), ProviderKind::Local)]),
        })
        .with_context(|| format!("opening the local secret store at {}", root.display()))?;
        Ok(LocalDelivery { delivery, root })
    }

    /// Resolves the request's references from the local vault and prepares the service.
    async fn prepare(&self, req: &PrepareRequest) -> anyhow::Result<PrepareReply> {
        for r in req.refs.env.iter().chain(&req.refs.files) {
            if r.provider != LOCAL_PROVIDER {
                bail!(
                    "service {}: variable {} names provider {:?}: in local mode only the local vault \
                     (dso://, dso+local://) is read; start the agent that has that provider, or store \
                     the value with `dso secret set`",
                    req.service,
                    r.var,
                    r.provider
                );
            }
        }
        let vault = crate::cmd::secret::VaultArgs {
            vault_file: std::env::var_os("DSO_VAULT_FILE").map(PathBuf::from),
            key_file: std::env::var_os("DSO_MASTER_KEY_FILE").map(PathBuf::from),
            system: false,
        };
        let (vault_file, key_file) = vault.paths()?;
        let provider = local_provider(&vault_file, &key_file).await?;
        let mut values = Vec::new();
        let mut versions = Vec::new();
        for r in req.refs.env.iter().chain(&req.refs.files) {
            let what = || {
                format!(
                    "service {}: variable {} (local vault reference {:?})",
                    req.service, r.var, r.reference
                )
            };
            let reference =
                Reference::parse(ProviderKind::Local, LOCAL_PROVIDER, &r.reference).with_context(what)?;
            let version = provider.version(&reference).await.with_context(what)?;
            let whole = provider.fetch(&reference, &version).await.with_context(what)?;
            let value = reference.select(&whole).with_context(what)?;
            versions.push(version.as_str().to_owned());
            values.push((declared::declared_name(&r.var), r.var.clone(), value));
        }
        let bundle = Bundle::new(values, versions);
        prepare::prepare(&self.delivery, req, &bundle)
            .with_context(|| format!("preparing service {}", req.service))
    }
}

async fn local_provider(
    vault_file: &Path,
    key_file: &Path,
) -> anyhow::Result<std::sync::Arc<dyn dso_secrets::Provider>> {
    let master_key_file = match LocalVault::read_protection(vault_file) {
        Ok(Protection::KeyFile) => Some(key_file.to_owned()),
        Ok(_) => None,
        Err(e) => bail!(
            "cannot read the local vault {} ({e}); create it with `dso init` and store values with `dso secret set`",
            vault_file.display()
        ),
    };
    let spec = ProviderSpec {
        name: LOCAL_PROVIDER.to_owned(),
        limits: Limits::default(),
        settings: ProviderSettings::Local(LocalSettings {
            vault_file: vault_file.to_owned(),
            master_key_file,
        }),
    };
    dso_secrets::connect(&spec)
        .await
        .with_context(|| format!("opening the local vault {}", vault_file.display()))
}

/// The store of local mode: `/run/dso/secrets` as root (a tmpfs is mounted there); else
/// `$XDG_RUNTIME_DIR/dso/secrets` when that is a tmpfs, else `/dev/shm/dso-UID/secrets`.
fn default_local_root(root_user: bool) -> anyhow::Result<PathBuf> {
    if root_user {
        return Ok(PathBuf::from(dso_rotator::delivery::store::DEFAULT_ROOT));
    }
    let tmpfs = |p: &Path| {
        nix::sys::statfs::statfs(p).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
    };
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR").map(PathBuf::from)
        && x.is_absolute()
        && tmpfs(&x)
    {
        return Ok(x.join("dso/secrets"));
    }
    let shm = Path::new("/dev/shm");
    if tmpfs(shm) {
        return Ok(shm.join(format!("dso-{}/secrets", nix::unistd::geteuid())));
    }
    bail!(
        "no tmpfs for the secret files: neither $XDG_RUNTIME_DIR nor /dev/shm is a tmpfs, and dso never \
         writes secrets to disk; run as root, pass --secrets-root DIR on a tmpfs, or use the agent"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_provider_is_local_else_the_only_one() {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(default_provider(&s(&["aws", "local"])).as_deref(), Some("local"));
        assert_eq!(default_provider(&s(&["aws"])).as_deref(), Some("aws"));
        assert_eq!(default_provider(&s(&["aws", "vault"])), None);
        let v = serde_json::json!({"secrets": [], "watcher": {"providers": [{"provider": "vault"}, {"provider": "aws"}], "objects": []}});
        assert_eq!(providers_of(&v), ["aws", "vault"]);
    }
}
