//! One Compose service's delivery, planned before Compose creates its container: the
//! values written into the store under a per-service instance directory, and what the
//! override must give the container (binds, entrypoint and command, variables, labels).
//!
//! The instance directory is named after the project and the service
//! ([`instance_for`]), not after a rotation: an unchanged `dso up` then writes an
//! identical override, so Compose's config hash does not change and nothing is recreated.
//! A rotation later gives the service's new container a directory of its own, as for any
//! managed container.

use std::collections::BTreeMap;

use dso_rotator::delivery::declared::{self, Declared};
use dso_rotator::delivery::{Bundle, Delivery, DeliveryError, LABEL_INSTANCE};
use dso_rotator::engine::{Container, DockerHealth, Process};
use serde::{Deserialize, Serialize};

/// What `dso up` knows of a service before its container exists (`POST
/// /v1/compose/prepare`). Names and references only, never a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareRequest {
    /// `com.docker.compose.project`.
    pub project: String,
    /// `com.docker.compose.service`.
    pub service: String,
    /// The service's image.
    pub image: String,
    /// The user the container will run as: the service's `user:`, else the image's
    /// `Config.User` (may be empty: root).
    pub user: String,
    /// The entrypoint it will run: the service's `entrypoint:`, else the image's.
    pub entrypoint: Vec<String>,
    /// The command: the service's `command:`, else the image's `Cmd`.
    pub cmd: Vec<String>,
    /// The service's references.
    pub refs: Declared,
}

/// What the override gives the service (`POST /v1/compose/prepare`'s answer). Paths and
/// names only, never a value.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrepareReply {
    /// The instance directory's name (label `dso.delivery.instance`).
    pub instance: String,
    /// Bind mounts `SOURCE:TARGET:ro` (the store's group directories, the launcher).
    pub binds: Vec<String>,
    /// Entrypoint and command, when the launcher wraps them.
    pub entrypoint: Option<Vec<String>>,
    /// The command to set with [`entrypoint`](Self::entrypoint) (setting an entrypoint
    /// clears the image's command).
    pub command: Option<Vec<String>>,
    /// Variables to set: each `dsofile://` variable holds its file's path.
    pub environment: BTreeMap<String, String>,
    /// Variables to remove: each `dso://` variable (the launcher sets it).
    pub remove_env: Vec<String>,
    /// Labels to set (`dso.delivery.instance`, `dso.refs`).
    pub labels: BTreeMap<String, String>,
}

/// The instance directory of a Compose service's first container: stable for the project
/// and service, so an unchanged `dso up` writes an identical override.
pub fn instance_for(project: &str, service: &str) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(format!("{project}/{service}").as_bytes());
    let hex: String = digest[..6].iter().map(|b| format!("{b:02x}")).collect();
    format!("compose-{hex}")
}

/// The container Compose will create, as delivery sees it.
fn planned_container(req: &PrepareRequest, label: &str) -> Container {
    Container {
        id: String::new(),
        name: format!("{}-{}", req.project, req.service),
        image: req.image.clone(),
        image_id: String::new(),
        labels: BTreeMap::from([
            ("com.docker.compose.project".to_owned(), req.project.clone()),
            ("com.docker.compose.service".to_owned(), req.service.clone()),
            (declared::LABEL_REFS.to_owned(), label.to_owned()),
        ]),
        running: false,
        health: DockerHealth::None,
        networks: BTreeMap::new(),
        publishes_ports: false,
        auto_remove: false,
        mounts: Vec::new(),
        process: Process {
            user: req.user.clone(),
            entrypoint: req.entrypoint.clone(),
            cmd: req.cmd.clone(),
            binds: Vec::new(),
            started_at: String::new(),
        },
    }
}

/// Writes the service's values (`bundle`, keyed as [`Declared::specs`] names them) into
/// its instance directory and returns the override's parts. Errors name the service and
/// the variable, never a value; a failed write leaves no directory behind.
pub fn prepare(
    delivery: &Delivery,
    req: &PrepareRequest,
    bundle: &Bundle,
) -> Result<PrepareReply, DeliveryError> {
    let label = req.refs.to_label();
    let c = planned_container(req, &label);
    let instance = instance_for(&req.project, &req.service);
    // Native env values would go into the reply and the Compose model: refused, so that a
    // value never leaves the store on this path.
    if let Some(secret) = delivery.native_env_secret(&c) {
        return Err(DeliveryError::NativeBeforeCreate {
            service: format!("{}/{}", req.project, req.service),
            secret,
        });
    }
    let Some(p) = delivery.plan(&c, Some(bundle), &instance)? else {
        return Ok(PrepareReply::default());
    };
    let mut labels = BTreeMap::from([(declared::LABEL_REFS.to_owned(), label)]);
    labels.extend(p.labels);
    labels.insert(LABEL_INSTANCE.to_owned(), instance.clone());
    let (entrypoint, command) = match p.overrides.entrypoint {
        Some((e, c)) => (Some(e), Some(c)),
        None => (None, None),
    };
    Ok(PrepareReply {
        instance,
        binds: p.overrides.add_binds,
        entrypoint,
        command,
        // Paths only: the `dsofile://` variables and `env_pointers` (native values were refused).
        environment: req
            .refs
            .files
            .iter()
            .map(|r| (r.var.clone(), declared::declared_file_path(&r.var)))
            .chain(p.env)
            .collect(),
        remove_env: req.refs.env.iter().map(|r| r.var.clone()).collect(),
        labels,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use dso_rotator::delivery::declared::DeclaredRef;
    use dso_rotator::delivery::{DeliveryConfig, store::StoreOptions};
    use dso_secrets::SecretValue;

    #[test]
    fn a_native_env_secret_targeting_the_service_is_refused_and_nothing_is_written() {
        use dso_secrets::config::{EnvMode, InjectSpec, RotationSpec, SecretSpec, Targets};
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let native = SecretSpec {
            name: "db".into(),
            provider: "local".into(),
            mappings: vec![(
                "DB_PASSWORD".into(),
                dso_secrets::Reference::parse(dso_secrets::ProviderKind::Local, "local", "shop/db").unwrap(),
            )],
            targets: Targets {
                services: vec!["web".into()],
                ..Targets::default()
            },
            inject: InjectSpec::Env {
                env_mode: EnvMode::Native,
            },
            rotation: RotationSpec::default(),
        };
        let d = Delivery::new(DeliveryConfig {
            root: root.clone(),
            store: StoreOptions {
                mount: true,
                size_bytes: 8 << 20,
            },
            launcher: None,
            secrets: vec![native],
            providers: BTreeMap::from([("local".to_owned(), dso_secrets::ProviderKind::Local)]),
        })
        .expect("tests run as root: the store mounts its tmpfs");
        let req = PrepareRequest {
            project: "shop".into(),
            service: "web".into(),
            image: "app:1".into(),
            user: String::new(),
            entrypoint: vec!["/app".into()],
            cmd: Vec::new(),
            refs: Declared::default(),
        };
        let bundle = Bundle::new(
            vec![(
                "db".into(),
                "DB_PASSWORD".into(),
                SecretValue::from_slice(b"s3cr3t-native"),
            )],
            Vec::new(),
        );
        let e = prepare(&d, &req, &bundle).unwrap_err().to_string();
        let written = d.store().exists(&instance_for("shop", "web"));
        let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
        assert!(
            e.contains("shop/web") && e.contains("db") && e.contains("env_mode"),
            "{e}"
        );
        assert!(!e.contains("s3cr3t-native"));
        assert!(!written, "nothing is written for a refused service");
    }

    #[test]
    fn a_service_gets_its_files_binds_and_launcher_under_a_stable_instance() {
        let dir = tempfile::tempdir().unwrap();
        let launcher = dir.path().join("dso-init");
        std::fs::write(&launcher, b"launcher").unwrap();
        let root = dir.path().join("root");
        let d = Delivery::new(DeliveryConfig {
            root: root.clone(),
            store: StoreOptions {
                mount: true,
                size_bytes: 8 << 20,
            },
            launcher: Some(launcher.clone()),
            secrets: Vec::new(),
            providers: BTreeMap::from([("local".to_owned(), dso_secrets::ProviderKind::Local)]),
        })
        .expect("tests run as root: the store mounts its tmpfs");
        let req = PrepareRequest {
            project: "shop".into(),
            service: "web".into(),
            image: "app:1".into(),
            user: "1000".into(),
            entrypoint: vec!["/app".into()],
            cmd: vec!["--serve".into()],
            refs: Declared {
                env: vec![DeclaredRef {
                    var: "API_KEY".into(),
                    provider: "local".into(),
                    reference: "shop/api".into(),
                }],
                files: vec![DeclaredRef {
                    var: "DB_PASSWORD_FILE".into(),
                    provider: "local".into(),
                    reference: "shop/db".into(),
                }],
            },
        };
        let bundle = Bundle::new(
            vec![
                (
                    "compose:API_KEY".into(),
                    "API_KEY".into(),
                    SecretValue::from_slice(b"k1"),
                ),
                (
                    "compose:DB_PASSWORD_FILE".into(),
                    "DB_PASSWORD_FILE".into(),
                    SecretValue::from_slice(b"pw"),
                ),
            ],
            Vec::new(),
        );
        let a = prepare(&d, &req, &bundle).unwrap();
        let b = prepare(&d, &req, &bundle).unwrap();
        let _ = nix::mount::umount2(&root, nix::mount::MntFlags::MNT_DETACH);
        assert_eq!(a, b, "an unchanged service gets an identical override");
        assert_eq!(a.instance, instance_for("shop", "web"));
        assert_ne!(instance_for("shop", "web"), instance_for("shop", "db"));
        assert_eq!(a.remove_env, ["API_KEY"]);
        assert_eq!(a.environment["DB_PASSWORD_FILE"], "/run/secrets/DB_PASSWORD_FILE");
        assert!(
            a.binds.iter().any(|b| b.ends_with(":/run/secrets:ro")),
            "{:?}",
            a.binds
        );
        assert!(
            a.binds.iter().any(|b| b.ends_with(":/run/dso/init:ro")),
            "{:?}",
            a.binds
        );
        let entry = a.entrypoint.unwrap();
        assert_eq!(entry.first().map(String::as_str), Some("/run/dso/init"));
        assert_eq!(entry.last().map(String::as_str), Some("/app"));
        assert_eq!(a.command.unwrap(), ["--serve"]);
        assert_eq!(a.labels[LABEL_INSTANCE], a.instance);
        assert!(!serde_json::to_string(&a.labels).unwrap().contains("pw"));
    }
}
