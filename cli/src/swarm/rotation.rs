//! Rotation in Swarm: a changed value becomes a new version of the Swarm secret, and every
//! service that uses an older version is moved to it with Swarm's own update; a version
//! no service and no running task uses any more is removed.
//!
//! One loop per agent, on the leader only (a manager that is not the leader answers the
//! driver and watches, but changes nothing in the swarm). Each scan (every
//! `swarm.scan_interval`, and at once after a change):
//! 1. lists the driver's Swarm secrets, grouped by base name; the newest version of each
//!    is *current*, and its labels' reference is watched as consumer `swarm:BASE`;
//! 2. creates the versions changes asked for (`BASE.vN`, the same labels and driver);
//! 3. moves every service that references an older version to the current one (the
//!    equivalent of `docker service update --secret-rm OLD --secret-add
//!    source=NEW,target=SAME`), start-first where the service allows it;
//! 4. removes older versions that no service references and no live task holds, unless
//!    some service's update is still moving (its rollback would need the old one).
//!
//! A failure leaves the service on its old spec (Swarm refuses the update whole) and is
//! logged and published; an update Swarm rolled back is not tried again for that version.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dso_secrets::{Reference, Version};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::engine::{self, SecretObject, SwarmEngine};
use super::{Shared, mapping};

/// The watcher consumer of a Swarm secret's base name.
pub const CONSUMER: &str = "swarm:";

/// How long a service update the engine refused waits before it is tried again.
const RETRY: Duration = Duration::from_secs(60);

/// A watcher snapshot of a `swarm:` consumer, without its values.
#[derive(Debug)]
pub struct Change {
    /// `swarm:BASE`.
    pub consumer: String,
    /// The versions the snapshot was taken at.
    pub versions: Vec<(Reference, Version)>,
    /// Whether the consumer had no applied record (a baseline, nothing rolls).
    pub first: bool,
}

/// One attempt to move a service to a version.
#[derive(Debug, Clone)]
struct Attempt {
    /// When.
    at: Instant,
    /// Whether the engine took the update.
    taken: bool,
    /// Whether it came back on the old version (rolled back): not tried again.
    held: bool,
}

/// The loop's memory.
struct Rotation {
    shared: Arc<Shared>,
    engine: SwarmEngine,
    /// Base name -> the reference watched for it.
    watched: BTreeMap<String, Reference>,
    /// Base name -> versions a change asked a new Swarm secret version for.
    pending: BTreeMap<String, Vec<(Reference, Version)>>,
    /// (service id, target secret id) -> the last attempt.
    attempts: HashMap<(String, String), Attempt>,
    /// Mapping errors already logged, per secret id (logged once).
    unmapped: BTreeSet<String>,
    /// The last leadership seen, to log its changes once.
    leader: Option<bool>,
}

/// Runs the loop until `stop`.
pub async fn run(
    shared: Arc<Shared>,
    engine: SwarmEngine,
    mut changes: mpsc::UnboundedReceiver<Change>,
    stop: CancellationToken,
) {
    let interval = shared.settings.scan_interval;
    let mut r = Rotation {
        shared,
        engine,
        watched: BTreeMap::new(),
        pending: BTreeMap::new(),
        attempts: HashMap::new(),
        unmapped: BTreeSet::new(),
        leader: None,
    };
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = tick.tick() => r.scan().await,
            c = changes.recv() => match c {
                None => return,
                Some(c) => {
                    if r.on_change(c) {
                        r.scan().await;
                    }
                }
            },
        }
    }
}

impl Rotation {
    /// Takes a change; true when a scan should run now.
    fn on_change(&mut self, c: Change) -> bool {
        let base = c
            .consumer
            .strip_prefix(CONSUMER)
            .unwrap_or(&c.consumer)
            .to_owned();
        let versions: Vec<String> = c.versions.iter().map(|(r, v)| format!("{}@{v}", r.raw)).collect();
        if c.first {
            info!(secret = %base, versions = ?versions, "swarm secret watched; its current version is the baseline");
            self.applied(&c.consumer, &c.versions);
            return false;
        }
        if !self.shared.settings.rotate {
            info!(secret = %base, versions = ?versions, "swarm secret changed; swarm.rotate is off, so nothing rolls (new tasks read the new value)");
            self.applied(&c.consumer, &c.versions);
            return false;
        }
        if self.leader != Some(true) {
            info!(secret = %base, versions = ?versions, "swarm secret changed; this manager is not the leader, the leader's agent rolls the services");
            self.applied(&c.consumer, &c.versions);
            return false;
        }
        info!(secret = %base, versions = ?versions, "swarm secret changed; a new version is created and its services roll");
        self.pending.insert(base, c.versions);
        true
    }

    fn applied(&self, consumer: &str, versions: &[(Reference, Version)]) {
        if let Err(e) = self.shared.secrets.watcher().applied(consumer, versions) {
            warn!(consumer, error = %e, "cannot record the versions taken; an agent restart will see them as changed");
        }
    }

    async fn scan(&mut self) {
        if let Err(e) = self.scan_once().await {
            warn!(
                error = format!("{e:#}"),
                "swarm scan failed; the next scan tries again"
            );
        }
    }

    async fn scan_once(&mut self) -> anyhow::Result<()> {
        let leader = self.engine.is_leader().await?;
        if self.leader != Some(leader) {
            info!(leader, "swarm leadership of this node");
            self.leader = Some(leader);
        }
        let mut groups = self.groups().await?;
        self.watch(&groups);
        if !leader || !self.shared.settings.rotate {
            return Ok(());
        }
        self.create_pending(&mut groups).await;
        let services = self.engine.services().await?;
        self.converge(&groups, &services).await;
        self.remove_unused(&groups).await
    }

    /// The driver's Swarm secrets by base name, oldest version first.
    async fn groups(&self) -> anyhow::Result<BTreeMap<String, Vec<SecretObject>>> {
        let mut groups: BTreeMap<String, Vec<SecretObject>> = BTreeMap::new();
        for s in self.engine.driver_secrets(&self.shared.settings.driver).await? {
            groups.entry(s.base.clone()).or_default().push(s);
        }
        for g in groups.values_mut() {
            g.sort_by_key(|s| s.version);
        }
        Ok(groups)
    }

    /// Watches each group's current reference; stops watching groups that are gone.
    fn watch(&mut self, groups: &BTreeMap<String, Vec<SecretObject>>) {
        let watcher = self.shared.secrets.watcher();
        for (base, versions) in groups {
            let current = versions.last().expect("a group has a version");
            let reference = match mapping::resolve(
                &current.name,
                &current.labels,
                &self.shared.secrets.config(),
            ) {
                Ok(r) => r,
                Err(e) => {
                    if self.unmapped.insert(current.id.clone()) {
                        warn!(secret = %current.name, error = %e, "swarm secret cannot be mapped; requests for it get this error and it is not watched");
                    }
                    continue;
                }
            };
            if self.watched.get(base) == Some(&reference) {
                continue;
            }
            let consumer = format!("{CONSUMER}{base}");
            match watcher.watch(consumer, vec![(base.clone(), reference.clone())]) {
                Ok(()) => {
                    info!(secret = %base, reference = %reference.raw, provider = %reference.provider, "swarm secret watched");
                    self.watched.insert(base.clone(), reference);
                }
                Err(e) => warn!(secret = %base, error = %e, "cannot watch the swarm secret's reference"),
            }
        }
        self.watched.retain(|base, _| {
            let keep = groups.contains_key(base);
            if !keep {
                info!(secret = %base, "swarm secret gone; no longer watched");
                watcher.unwatch(&format!("{CONSUMER}{base}"));
            }
            keep
        });
    }

    /// Creates the versions changes asked for; a failure keeps the change pending.
    async fn create_pending(&mut self, groups: &mut BTreeMap<String, Vec<SecretObject>>) {
        let pending = std::mem::take(&mut self.pending);
        for (base, versions) in pending {
            let Some(group) = groups.get_mut(&base) else {
                info!(secret = %base, "swarm secret changed but is gone; nothing to roll");
                continue;
            };
            let current = group.last().expect("a group has a version").clone();
            match self
                .engine
                .create_version(&current, current.version + 1, &self.shared.settings.driver)
                .await
            {
                Ok(new) => {
                    info!(secret = %base, old = %current.name, new = %new.name, "swarm secret version created");
                    self.shared.events.publish(
                        "swarm.rotation.started",
                        serde_json::json!({ "secret": base, "old": current.name, "new": new.name, "new_id": new.id }),
                    );
                    self.applied(&format!("{CONSUMER}{base}"), &versions);
                    group.push(new);
                }
                Err(e) => {
                    let e = format!("{e:#}");
                    warn!(secret = %base, error = %e, "cannot create the new swarm secret version; services keep the old one, the next scan tries again");
                    self.shared.stats.rotation(false);
                    self.shared.events.publish(
                        "swarm.rotation.failed",
                        serde_json::json!({ "secret": base, "service": null, "error": e }),
                    );
                    self.pending.insert(base, versions);
                }
            }
        }
    }

    /// Moves every service on an older version of a group to its current version.
    async fn converge(
        &mut self,
        groups: &BTreeMap<String, Vec<SecretObject>>,
        services: &[bollard::models::Service],
    ) {
        for service in services {
            let uses: BTreeSet<String> = engine::secret_ids(service).into_iter().collect();
            let id = service.id.clone().unwrap_or_default();
            let name = engine::service_name(service);
            for (base, versions) in groups {
                let current = versions.last().expect("a group has a version");
                let old: BTreeSet<String> = versions[..versions.len() - 1]
                    .iter()
                    .map(|v| v.id.clone())
                    .filter(|i| uses.contains(i))
                    .collect();
                if old.is_empty() {
                    continue;
                }
                let key = (id.clone(), current.id.clone());
                if let Some(a) = self.attempts.get_mut(&key) {
                    if a.held {
                        continue;
                    }
                    if a.taken {
                        if engine::updating(service) {
                            continue;
                        }
                        // Taken, not moving, and still on the old version: Swarm rolled
                        // it back (its failure_action), or someone else changed it.
                        a.held = true;
                        let state = engine::update_state(service)
                            .map(|s| s.to_string())
                            .unwrap_or_default();
                        let e = format!(
                            "service {name} is back on the old version of {base} (update state {state:?}); it keeps it, the next change of the value tries again"
                        );
                        warn!(service = %name, secret = %base, update_state = %state, "swarm service update did not stay; the service keeps the old secret version");
                        self.shared.stats.rotation(false);
                        self.shared.events.publish(
                            "swarm.rotation.failed",
                            serde_json::json!({ "secret": base, "service": name, "error": e }),
                        );
                        continue;
                    }
                    if a.at.elapsed() < RETRY {
                        continue;
                    }
                }
                let old_names: Vec<&str> = versions
                    .iter()
                    .filter(|v| old.contains(&v.id))
                    .map(|v| v.name.as_str())
                    .collect();
                match self.engine.move_secret(service, &old, current).await {
                    Ok(u) => {
                        info!(
                            service = %name, secret = %base, from = ?old_names, to = %current.name, order = %u.order,
                            why_not_start_first = u.why_not_start_first.as_deref().unwrap_or(""),
                            "swarm service updated to the new secret version; Swarm rolls its tasks"
                        );
                        self.shared.stats.rotation(true);
                        self.shared.events.publish(
                            "swarm.service.updated",
                            serde_json::json!({
                                "service": name, "service_id": id, "secret": base, "from": old_names,
                                "to": current.name, "order": u.order, "why_not_start_first": u.why_not_start_first,
                            }),
                        );
                        self.attempts.insert(
                            key,
                            Attempt {
                                at: Instant::now(),
                                taken: true,
                                held: false,
                            },
                        );
                    }
                    Err(e) => {
                        let e = format!("{e:#}");
                        warn!(service = %name, secret = %base, error = %e, "swarm service update refused; the service keeps its old spec, tried again in 60 s");
                        self.shared.stats.rotation(false);
                        self.shared.events.publish(
                            "swarm.rotation.failed",
                            serde_json::json!({ "secret": base, "service": name, "error": e }),
                        );
                        self.attempts.insert(
                            key,
                            Attempt {
                                at: Instant::now(),
                                taken: false,
                                held: false,
                            },
                        );
                    }
                }
            }
        }
    }

    /// Removes older versions nobody uses (listed again: the updates just made changed
    /// the services).
    async fn remove_unused(&mut self, groups: &BTreeMap<String, Vec<SecretObject>>) -> anyhow::Result<()> {
        if groups.values().all(|g| g.len() < 2) {
            return Ok(());
        }
        let services = self.engine.services().await?;
        if let Some(s) = services.iter().find(|s| engine::updating(s)) {
            debug!(service = %engine::service_name(s), "a service update is moving; old swarm secret versions stay for now");
            return Ok(());
        }
        let referenced: BTreeSet<String> = services.iter().flat_map(engine::secret_ids).collect();
        let live = self.engine.live_task_secrets().await?;
        for versions in groups.values() {
            for old in &versions[..versions.len() - 1] {
                if referenced.contains(&old.id) || live.contains(&old.id) {
                    continue;
                }
                match self.engine.remove(&old.id).await {
                    Ok(()) => {
                        info!(secret = %old.name, id = %old.id, base = %old.base, "old swarm secret version removed: no service or task uses it");
                        self.shared.stats.removed();
                        self.shared.events.publish(
                            "swarm.secret.removed",
                            serde_json::json!({ "secret": old.base, "name": old.name, "id": old.id }),
                        );
                    }
                    Err(e) => {
                        warn!(secret = %old.name, error = format!("{e:#}"), "cannot remove the old swarm secret version; the next scan tries again")
                    }
                }
            }
        }
        Ok(())
    }
}
