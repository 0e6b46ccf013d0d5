//! What every strategy shares: the context of one container's rotation, its progress
//! reporting, and the report it ends with.
//!
//! A rotation is a state machine over [`Step`]: each strategy has one transition function
//! (`advance`) that performs the action leading out of a step and names the step reached.
//! [`Run::record`] journals (fsync) and logs each step before the next action starts.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::info;

use crate::delivery::{Delivery, Prepared};
use crate::engine::{CloneSpec, Container, Engine, short};
use crate::error::Error;
use crate::gateway::{Gateway, Member, Timing};
use crate::health::{self, HealthCheck};
use crate::journal::{Entry, Journal, Record, Side, Step, now_ms};
use crate::labels::{self, ServiceKey, ServiceSpec, Strategy};

/// One step as shown to the user (`dso rotate` prints these as they happen).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Rotation ID.
    pub rotation: String,
    /// Step reached.
    pub step: Step,
    /// Milliseconds since the rotation started.
    pub elapsed_ms: u64,
    /// What happened, e.g. `healthy after 412 ms`.
    pub detail: String,
}

/// How the rotation of one container ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerReport {
    /// Rotation ID.
    pub rotation: String,
    /// Strategy that ran (never `auto`).
    pub strategy: Strategy,
    /// The container's name (unchanged by the rotation).
    pub name: String,
    /// ID before.
    pub old_id: String,
    /// ID after (equal to `old_id` for `signal` and `none`, and after a rollback).
    pub new_id: String,
    /// Every step with its time.
    pub steps: Vec<Progress>,
    /// Milliseconds from start to end.
    pub took_ms: u64,
    /// Milliseconds from start until the new container served (swap or resume).
    pub serving_after_ms: Option<u64>,
}

/// Test hook: where to stop a rotation as if the agent had been killed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hooks {
    /// After journaling this step, the rotation never continues (it awaits forever), so a
    /// test can drop it exactly there and check recovery.
    pub freeze_after: Option<Step>,
}

/// The context of one container's rotation.
pub(crate) struct Run<'a, E: Engine> {
    pub engine: &'a E,
    pub gateway: &'a Gateway,
    pub key: &'a ServiceKey,
    pub spec: &'a ServiceSpec,
    pub blue: Container,
    pub env: &'a [(String, String)],
    pub stop_grace: Duration,
    pub entry: Entry,
    pub started: Instant,
    pub steps: Vec<Progress>,
    pub progress: Option<&'a mpsc::UnboundedSender<Progress>>,
    pub hooks: Hooks,
    pub serving_after_ms: Option<u64>,
    /// What delivery gives the new container (files written, binds, entrypoint).
    pub prepared: Option<Prepared>,
    /// Remote engines: blue's archives, uploaded again if blue is started again (a restart
    /// rollback), since its volumes' tmpfs emptied when it stopped.
    pub blue_uploads: Vec<crate::delivery::RemoteGroup>,
}

impl<'a, E: Engine> Run<'a, E> {
    /// Labels dso adds to a container it creates for this rotation.
    pub fn clone_labels(&self) -> Vec<(String, String)> {
        let mut labels = vec![(labels::ROTATION_ID.to_owned(), self.rotation())];
        if self.key.project.is_empty() {
            labels.push((labels::SERVICE.to_owned(), self.key.service.clone()));
        }
        labels
    }

    /// Opens the journal with a `Begin` record and returns the context.
    #[allow(clippy::too_many_arguments)]
    pub fn begin(
        engine: &'a E,
        gateway: &'a Gateway,
        journal: &Journal,
        key: &'a ServiceKey,
        spec: &'a ServiceSpec,
        blue: Container,
        strategy: Strategy,
        rotation: String,
        env: &'a [(String, String)],
        stop_grace: Duration,
        progress: Option<&'a mpsc::UnboundedSender<Progress>>,
        hooks: Hooks,
    ) -> Result<Self, Error> {
        let green_name = match strategy {
            Strategy::Restart => blue.name.clone(),
            _ => format!("{}-dso-{rotation}", blue.name),
        };
        let first = Record {
            rotation,
            service: key.clone(),
            strategy,
            step: Step::Begin,
            original_name: blue.name.clone(),
            blue: Side {
                id: Some(blue.id.clone()),
                name: blue.name.clone(),
            },
            green: Side {
                id: None,
                name: green_name,
            },
            at_ms: now_ms(),
            error: None,
        };
        let entry = journal.begin(first).map_err(|e| Error::state("journal", e))?;
        let mut run = Run {
            engine,
            gateway,
            key,
            spec,
            blue,
            env,
            stop_grace,
            entry,
            started: Instant::now(),
            steps: Vec::new(),
            progress,
            hooks,
            serving_after_ms: None,
            prepared: None,
            blue_uploads: Vec::new(),
        };
        run.report(Step::Begin, format!("{strategy} rotation of {}", run.blue.name));
        Ok(run)
    }

    /// The rotation ID.
    pub fn rotation(&self) -> String {
        self.entry.last().rotation.clone()
    }

    /// Green's planned name.
    /// Creates green from blue's configuration under `name` and journals `GreenCreated`.
    /// Returns green's ID.
    pub async fn create_green(&mut self, name: String) -> Result<String, Error> {
        let mut env = self.env.to_vec();
        let mut labels = self.clone_labels();
        let mut overrides = Default::default();
        if let Some(p) = &self.prepared {
            for (k, v) in &p.env {
                env.retain(|(x, _)| x != k);
                env.push((k.clone(), v.clone()));
            }
            labels.extend(p.labels.iter().cloned());
            overrides = p.overrides.clone();
        }
        let spec = CloneSpec {
            from: self.blue.id.clone(),
            name,
            env,
            labels,
            primary_network: self.spec.network.clone(),
            overrides,
        };
        if let Some(p) = &self.prepared {
            for v in &p.volumes {
                let labels = [(crate::delivery::LABEL_INSTANCE.to_owned(), p.instance.clone())];
                self.engine
                    .create_tmpfs_volume(&v.volume, Delivery::volume_size(v), &labels)
                    .await?;
            }
        }
        let id = self.engine.create_clone(&spec).await?;
        if let Some(l) = self.prepared.as_ref().and_then(|p| p.launcher_upload.as_ref()) {
            let tar = crate::delivery::launcher_archive(l)
                .map_err(|e| Error::Delivery(format!("reading the launcher {}: {e}", l.display())))?;
            if let Err(e) = self.engine.put_launcher(&id, &tar).await {
                // Not journaled yet: remove the copy here, or it would be left behind.
                let _ = self.engine.remove(&id).await;
                return Err(e.into());
            }
        }
        self.record(
            Step::GreenCreated,
            Some(&id),
            format!("created {} ({})", spec.name, short(&id)),
        )
        .await?;
        Ok(id)
    }

    /// Starts green and journals `GreenStarted`.
    pub async fn start_green(&mut self, id: &str) -> Result<(), Error> {
        self.engine.start(id).await?;
        // Remote engines: the volumes are mounted now; the launcher waits for the uploads.
        if let Some(p) = &self.prepared {
            for v in &p.volumes {
                self.engine.put_archive(id, &v.target, v.archive()).await?;
            }
        }
        self.record(Step::GreenStarted, None, format!("started {}", short(id)))
            .await
    }

    /// Waits until green passes its health check and journals `GreenHealthy`. Returns green
    /// as a route member under blue's name.
    pub async fn wait_green_healthy(&mut self, id: &str) -> Result<Member, Error> {
        let h = health::wait(self.engine, id, &self.health_check()).await?;
        self.record(
            Step::GreenHealthy,
            None,
            format!("healthy after {} ms", ms(h.waited)),
        )
        .await?;
        Ok(Member {
            id: id.to_owned(),
            name: self.blue.name.clone(),
            ip: h.ip,
        })
    }

    pub fn green_name(&self) -> String {
        self.entry.last().green.name.clone()
    }

    /// The health check of a new container of this service.
    pub fn health_check(&self) -> HealthCheck {
        HealthCheck {
            ports: self.spec.ports.iter().map(|p| p.container).collect(),
            network: self.spec.network.clone(),
            project: self.key.project.clone(),
            exec: self.spec.health_exec.clone(),
            timeout: self.spec.health_timeout,
        }
    }

    /// Listener timings of the service.
    pub fn timing(&self) -> Timing {
        timing(self.spec, self.stop_grace)
    }

    /// Journals `step` (fsync), logs it, reports it, and honours the freeze hook.
    pub async fn record(&mut self, step: Step, green_id: Option<&str>, detail: String) -> Result<(), Error> {
        self.entry
            .step(step, green_id)
            .map_err(|e| Error::state("journal", e))?;
        self.report(step, detail);
        self.checkpoint(step).await;
        Ok(())
    }

    /// Honours the freeze hook for `step` (a step boundary).
    pub async fn checkpoint(&self, step: Step) {
        if self.hooks.freeze_after == Some(step) {
            std::future::pending::<()>().await;
        }
    }

    /// Journals a terminal step.
    pub fn finish(&mut self, step: Step, error: Option<String>, detail: String) -> Result<(), Error> {
        self.entry
            .finish(step, error)
            .map_err(|e| Error::state("journal", e))?;
        self.report(step, detail);
        Ok(())
    }

    fn report(&mut self, step: Step, detail: String) {
        let elapsed_ms = ms(self.started.elapsed());
        let rotation = self.rotation();
        info!(service = %self.key, rotation = %rotation, container = short(&self.blue.id), step = ?step, elapsed_ms, "{detail}");
        let p = Progress {
            rotation,
            step,
            elapsed_ms,
            detail,
        };
        if let Some(tx) = self.progress {
            let _ = tx.send(p.clone());
        }
        self.steps.push(p);
    }

    /// The report of a finished run.
    pub fn into_report(self, strategy: Strategy, new_id: String) -> ContainerReport {
        ContainerReport {
            rotation: self.entry.last().rotation.clone(),
            strategy,
            name: self.blue.name.clone(),
            old_id: self.blue.id.clone(),
            new_id,
            took_ms: ms(self.started.elapsed()),
            serving_after_ms: self.serving_after_ms,
            steps: self.steps,
        }
    }
}

/// Listener timings for a service.
pub(crate) fn timing(spec: &ServiceSpec, stop_grace: Duration) -> Timing {
    Timing {
        drain: spec.drain_timeout,
        // A restart holds while blue stops and green starts and passes its check.
        hold_max: spec
            .health_timeout
            .saturating_add(stop_grace)
            .saturating_add(crate::restart::RESTART_SETTLE)
            .saturating_add(Duration::from_secs(10)),
    }
}

/// Whole milliseconds.
pub(crate) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
