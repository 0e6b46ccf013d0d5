//! The Swarm API calls the driver's rotation makes (bollard stays in this file): who
//! leads, the driver's secrets, the services that use them and their update, the tasks
//! that still hold a version, the removal of a version nobody uses.

use std::collections::{BTreeSet, HashMap};

use anyhow::Context;
use bollard::Docker;
use bollard::models::{
    Driver, EndpointPortConfigPublishModeEnum, SecretSpec, Service, ServiceSpecUpdateConfig,
    ServiceSpecUpdateConfigOrderEnum, ServiceUpdateStatusStateEnum, TaskSpecContainerSpecSecrets, TaskState,
};
use bollard::query_parameters::UpdateServiceOptionsBuilder;

use super::mapping::{self, LABEL_BASE, LABEL_VERSION};

/// The engine the agent runs next to.
#[derive(Debug, Clone)]
pub struct SwarmEngine {
    docker: Docker,
}

/// One Swarm secret of the driver.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretObject {
    /// Swarm's id.
    pub id: String,
    /// Its name (`db`, `db.v2`).
    pub name: String,
    /// Its labels (the mapping, and dso's bookkeeping on versions).
    pub labels: HashMap<String, String>,
    /// The name it is a version of.
    pub base: String,
    /// Its version number (1 for the one created by hand).
    pub version: u64,
}

/// What one service update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Updated {
    /// The update order used: `start-first`, or the service's own when it cannot.
    pub order: String,
    /// Why start-first was not used, when it was not.
    pub why_not_start_first: Option<String>,
}

impl SwarmEngine {
    /// Connects like the Docker CLI (`DOCKER_HOST`, else the local socket) and negotiates
    /// the API version down to the daemon's (1.41 for Engine 20.10).
    pub async fn connect() -> anyhow::Result<SwarmEngine> {
        let docker = Docker::connect_with_defaults()
            .context("connecting to the Docker engine")?
            .negotiate_version()
            .await
            .context("negotiating the Docker API version")?;
        Ok(SwarmEngine { docker })
    }

    /// Whether this engine is the swarm's leader (only the leader rotates; the driver
    /// answers on every manager).
    pub async fn is_leader(&self) -> anyhow::Result<bool> {
        let info = self.docker.info().await.context("docker info")?;
        let Some(node) = info.swarm.and_then(|s| s.node_id).filter(|n| !n.is_empty()) else {
            return Ok(false);
        };
        let node = self
            .docker
            .inspect_node(&node)
            .await
            .with_context(|| format!("inspecting node {node}"))?;
        Ok(node.manager_status.and_then(|m| m.leader).unwrap_or(false))
    }

    /// Every Swarm secret whose driver is `driver`.
    pub async fn driver_secrets(&self, driver: &str) -> anyhow::Result<Vec<SecretObject>> {
        let all = self
            .docker
            .list_secrets(None)
            .await
            .context("listing Swarm secrets")?;
        Ok(all
            .into_iter()
            .filter_map(|s| {
                let spec = s.spec?;
                if spec.driver.as_ref().map(|d| d.name.as_str()) != Some(driver) {
                    return None;
                }
                let name = spec.name?;
                let labels = spec.labels.unwrap_or_default();
                Some(SecretObject {
                    id: s.id?,
                    base: mapping::base_name(&name, &labels).to_owned(),
                    version: mapping::version_of(&labels),
                    name,
                    labels,
                })
            })
            .collect())
    }

    /// Creates version `version` of `current`'s base: the same labels (plus dso's), the
    /// same driver, named `BASE.vN`. Returns it.
    pub async fn create_version(
        &self,
        current: &SecretObject,
        version: u64,
        driver: &str,
    ) -> anyhow::Result<SecretObject> {
        let name = format!("{}.v{version}", current.base);
        if name.len() > 64 {
            anyhow::bail!(
                "the next version's name {name} is longer than Swarm's 64 characters; give the Swarm secret a shorter name"
            );
        }
        let mut labels = current.labels.clone();
        labels.insert(LABEL_BASE.to_owned(), current.base.clone());
        labels.insert(LABEL_VERSION.to_owned(), version.to_string());
        let spec = SecretSpec {
            name: Some(name.clone()),
            labels: Some(labels.clone()),
            driver: Some(Driver {
                name: driver.to_owned(),
                options: None,
            }),
            ..SecretSpec::default()
        };
        let id = self
            .docker
            .create_secret(spec)
            .await
            .with_context(|| format!("creating Swarm secret {name}"))?
            .id;
        Ok(SecretObject {
            id,
            name,
            labels,
            base: current.base.clone(),
            version,
        })
    }

    /// Every service.
    pub async fn services(&self) -> anyhow::Result<Vec<Service>> {
        self.docker
            .list_services(None)
            .await
            .context("listing Swarm services")
    }

    /// Swarm's own update of `service`: every secret reference whose id is in `from` now
    /// points at `to` with the same target file, uid, gid and mode; start-first unless
    /// the service publishes a port in host mode (two tasks of it cannot hold the port on
    /// one node). A refused update changes nothing (the spec is sent with the version it
    /// was read at).
    pub async fn move_secret(
        &self,
        service: &Service,
        from: &BTreeSet<String>,
        to: &SecretObject,
    ) -> anyhow::Result<Updated> {
        let id = service.id.clone().unwrap_or_default();
        let mut spec = service.spec.clone().context("a service without a spec")?;
        let name = spec.name.clone().unwrap_or_else(|| id.clone());
        let version = service.version.as_ref().and_then(|v| v.index).unwrap_or(0);
        let refs = spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
            .and_then(|c| c.secrets.as_mut())
            .with_context(|| format!("service {name} has no secrets"))?;
        let mut moved = false;
        for r in refs.iter_mut() {
            if r.secret_id.as_ref().is_some_and(|i| from.contains(i)) {
                *r = TaskSpecContainerSpecSecrets {
                    file: r.file.clone(),
                    secret_id: Some(to.id.clone()),
                    secret_name: Some(to.name.clone()),
                };
                moved = true;
            }
        }
        anyhow::ensure!(moved, "service {name} uses none of the old versions");
        let host_port = spec
            .endpoint_spec
            .as_ref()
            .and_then(|e| e.ports.as_ref())
            .into_iter()
            .flatten()
            .chain(
                service
                    .endpoint
                    .as_ref()
                    .and_then(|e| e.spec.as_ref())
                    .and_then(|e| e.ports.as_ref())
                    .into_iter()
                    .flatten(),
            )
            .find(|p| p.publish_mode == Some(EndpointPortConfigPublishModeEnum::HOST))
            .map(|p| p.published_port.unwrap_or(0));
        let update = spec
            .update_config
            .get_or_insert_with(ServiceSpecUpdateConfig::default);
        let outcome = match host_port {
            None => {
                update.order = Some(ServiceSpecUpdateConfigOrderEnum::START_FIRST);
                Updated {
                    order: "start-first".to_owned(),
                    why_not_start_first: None,
                }
            }
            Some(port) => Updated {
                order: update
                    .order
                    .map(|o| o.to_string())
                    .filter(|o| !o.is_empty())
                    .unwrap_or_else(|| "stop-first".to_owned()),
                why_not_start_first: Some(format!(
                    "it publishes port {port} in host mode: a second task could not bind it on the same node"
                )),
            },
        };
        let options = UpdateServiceOptionsBuilder::default()
            .version(version as i32)
            .build();
        self.docker
            .update_service(&id, spec, options, None)
            .await
            .with_context(|| format!("updating service {name}"))?;
        Ok(outcome)
    }

    /// The ids of the secrets that tasks not yet ended (state up to running) hold.
    pub async fn live_task_secrets(&self) -> anyhow::Result<BTreeSet<String>> {
        let tasks = self
            .docker
            .list_tasks(None)
            .await
            .context("listing Swarm tasks")?;
        Ok(tasks
            .iter()
            .filter(|t| {
                t.status.as_ref().and_then(|s| s.state).is_some_and(|s| {
                    !matches!(
                        s,
                        TaskState::COMPLETE
                            | TaskState::SHUTDOWN
                            | TaskState::FAILED
                            | TaskState::REJECTED
                            | TaskState::REMOVE
                            | TaskState::ORPHANED
                    )
                })
            })
            .flat_map(|t| {
                t.spec
                    .as_ref()
                    .and_then(|s| s.container_spec.as_ref())
                    .and_then(|c| c.secrets.clone())
                    .unwrap_or_default()
            })
            .filter_map(|r| r.secret_id)
            .collect())
    }

    /// Removes Swarm secret `id`.
    pub async fn remove(&self, id: &str) -> anyhow::Result<()> {
        self.docker
            .delete_secret(id)
            .await
            .with_context(|| format!("removing Swarm secret {id}"))
    }
}

/// The ids of the secrets a service's spec references.
pub fn secret_ids(service: &Service) -> Vec<String> {
    service
        .spec
        .as_ref()
        .and_then(|s| s.task_template.as_ref())
        .and_then(|t| t.container_spec.as_ref())
        .and_then(|c| c.secrets.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|r| r.secret_id.clone())
        .collect()
}

/// A service's name.
pub fn service_name(service: &Service) -> String {
    service
        .spec
        .as_ref()
        .and_then(|s| s.name.clone())
        .or_else(|| service.id.clone())
        .unwrap_or_default()
}

/// Where a service's last update stands: `None` when none ran.
pub fn update_state(service: &Service) -> Option<ServiceUpdateStatusStateEnum> {
    service.update_status.as_ref().and_then(|u| u.state)
}

/// Whether a service's update is still moving (so an old version may still be needed).
pub fn updating(service: &Service) -> bool {
    matches!(
        update_state(service),
        Some(
            ServiceUpdateStatusStateEnum::UPDATING
                | ServiceUpdateStatusStateEnum::PAUSED
                | ServiceUpdateStatusStateEnum::ROLLBACK_STARTED
                | ServiceUpdateStatusStateEnum::ROLLBACK_PAUSED
        )
    )
}
