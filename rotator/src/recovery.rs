//! Finishing rotations an agent did not finish (killed, crashed, or failed after the point
//! of no return).
//!
//! For each interrupted journal, the survivor is green when the rotation had passed its
//! point of no return (rolling: swapped; restart: green healthy), blue otherwise. The other
//! one is removed, the survivor carries the original name and runs.
//!
//! *Invariants*: only containers recorded in the journal (by ID, or by the rotation-ID
//! label dso puts on containers it creates) are touched; a container is removed only when
//! the survivor exists, so the last copy of a service is never removed.

use std::path::Path;
use std::time::Duration;

use tracing::{info, warn};

use crate::engine::{Container, Engine, short};
use crate::error::Error;
use crate::journal::{History, Journal, Record, Step, now_ms};
use crate::labels::{ROTATION_ID, Strategy};
use crate::lock::ServiceLock;

/// Grace of a stop recovery makes itself (see `recover`).
const RECOVERY_STOP_GRACE: Duration = Duration::from_secs(10);
/// How long after the last journaled step recovery waits before looking at containers.
/// Fixed, because what it waits for cannot be observed: a call the killed agent sent
/// (create, rename, remove) that the daemon still carries out. The engine has no list of
/// requests in flight, and one that has not landed yet looks exactly like one never sent.
/// Measured by the real-SIGKILL tests (cli/tests/it/rotate.rs, rotator/tests/it/crash.rs):
/// a create lands up to a few hundred ms after the client died; 2 s covers it with margin,
/// and it is waited only for a journal younger than that (an agent restarted at once).
const SETTLE: Duration = Duration::from_secs(2);

/// What recovery did with one interrupted rotation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recovered {
    /// The journal record it started from.
    pub from: Record,
    /// ID of the container left serving, if any exists.
    pub survivor: Option<String>,
    /// IDs removed.
    pub removed: Vec<String>,
}

/// Recovers every interrupted rotation in `journal`. A rotation whose service lock is
/// held (in `state_dir/locks`) is still running in a live process and is left alone.
pub async fn recover_all<E: Engine>(
    engine: &E,
    journal: &Journal,
    state_dir: &Path,
) -> Result<Vec<Recovered>, Error> {
    let mut out = Vec::new();
    for rec in journal
        .interrupted()
        .map_err(|e| Error::state("reading journal", e))?
    {
        let lock =
            ServiceLock::try_acquire(state_dir, &rec.service).map_err(|e| Error::state("service lock", e))?;
        let Some(_lock) = lock else {
            info!(service = %rec.service, rotation = %rec.rotation, "rotation in progress in another process; not recovering it");
            continue;
        }; // The dead agent's last Docker call may still be under way in the daemon (a create
        // takes a few hundred ms): look at the containers only once it has had time to land.
        let age = Duration::from_millis(now_ms().saturating_sub(rec.at_ms));
        if age < SETTLE {
            tokio::time::sleep(SETTLE - age).await;
        }

        out.push(recover(engine, journal, rec).await?);
    }
    Ok(out)
}

/// Recovers one interrupted rotation.
pub async fn recover<E: Engine>(engine: &E, journal: &Journal, rec: Record) -> Result<Recovered, Error> {
    let forward = match rec.strategy {
        Strategy::Restart => rec.step >= Step::GreenHealthy,
        _ => rec.step >= Step::Swapped,
    };
    let blue = match &rec.blue.id {
        Some(id) => engine.inspect(id).await?,
        None => None,
    };
    let green = find_green(engine, &rec).await?;
    info!(service = %rec.service, rotation = %rec.rotation, step = ?rec.step, forward, blue = ?blue.as_ref().map(|c| short(&c.id).to_owned()), green = ?green.as_ref().map(|c| short(&c.id).to_owned()), "recovering interrupted rotation");

    let (survivor, other) = match (forward, blue, green) {
        (true, b, Some(g)) => (Some(g), b),
        (false, Some(b), g) => (Some(b), g),
        // The preferred survivor is gone: keep whatever is left, remove nothing.
        (_, Some(b), None) | (_, None, Some(b)) => (Some(b), None),
        (_, None, None) => (None, None),
    };
    let mut removed = Vec::new();
    if let (Some(_), Some(o)) = (&survivor, &other) {
        remove_gone(engine, &o.id).await?;
        removed.push(o.id.clone());
    }
    if let Some(s) = &survivor {
        if s.name != rec.original_name {
            // A container of this rotation that appeared after the lookup (a create the
            // daemon finished late) may hold the name; one that is not ours is never touched.
            if let Some(holder) = engine.inspect(&rec.original_name).await?
                && holder.id != s.id
                && holder.labels.get(ROTATION_ID) == Some(&rec.rotation)
            {
                remove_gone(engine, &holder.id).await?;
                removed.push(holder.id);
            }
            engine.rename(&s.id, &rec.original_name).await?;
        }
        let stop_in_flight = rec.strategy == Strategy::Restart
            && rec.step <= Step::Paused
            && Some(&s.id) == rec.blue.id.as_ref()
            && s.running;
        if stop_in_flight {
            // The killed agent may have sent the stop of blue that follows `paused`; the
            // daemon carries it out even so (during the grace period blue still shows as
            // running). Stopping it ourselves waits for that stop; then blue starts again.
            engine.stop(&s.id, RECOVERY_STOP_GRACE).await?;
        }
        if !s.running || stop_in_flight {
            engine.start(&s.id).await?;
        }
    } else {
        warn!(service = %rec.service, rotation = %rec.rotation, "neither container of the interrupted rotation exists");
    }
    let mut entry = journal
        .reopen(rec.clone())
        .map_err(|e| Error::state("journal", e))?;
    entry
        .finish(Step::Recovered, None)
        .map_err(|e| Error::state("journal", e))?;
    let h = History {
        rotation: rec.rotation.clone(),
        strategy: rec.strategy,
        result: "recovered".to_owned(),
        error: Some(format!("interrupted at step {:?}", rec.step)),
        started_at_ms: rec.at_ms,
        took_ms: now_ms().saturating_sub(rec.at_ms),
        container: survivor.as_ref().map(|s| s.id.clone()),
    };
    journal
        .set_history(&rec.service, &h)
        .map_err(|e| Error::state("history", e))?;
    info!(service = %rec.service, rotation = %rec.rotation, survivor = ?survivor.as_ref().map(|c| short(&c.id).to_owned()), removed = removed.len(), "recovered");
    Ok(Recovered {
        from: rec,
        survivor: survivor.map(|s| s.id),
        removed,
    })
}

/// Removes a container, also when the killed agent's own remove call is still being
/// carried out by the daemon (404: already gone; 409: removal in progress, waited for).
pub(crate) async fn remove_gone<E: Engine>(engine: &E, id: &str) -> Result<(), Error> {
    match engine.remove(id).await {
        Ok(()) => Ok(()),
        Err(e) if e.is_not_found() => Ok(()),
        Err(e) if e.status == Some(409) => {
            for _ in 0..300 {
                if engine.inspect(id).await?.is_none() {
                    return Ok(());
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e.into())
        }
        Err(e) => Err(e.into()),
    }
}

/// Green by its recorded ID, else by the rotation label (created, not yet recorded).
async fn find_green<E: Engine>(engine: &E, rec: &Record) -> Result<Option<Container>, Error> {
    if let Some(id) = &rec.green.id
        && let Some(c) = engine.inspect(id).await?
    {
        return Ok(Some(c));
    }
    let found = engine.list_labeled(ROTATION_ID, &rec.rotation).await?;
    Ok(found.into_iter().find(|c| Some(&c.id) != rec.blue.id.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::Fake;
    use crate::journal::Side;
    use crate::labels::ServiceKey;

    fn rec(strategy: Strategy, step: Step, green_id: Option<&str>) -> Record {
        Record {
            rotation: "r1".into(),
            service: ServiceKey {
                project: "p".into(),
                service: "web".into(),
            },
            strategy,
            step,
            original_name: "web-1".into(),
            blue: Side {
                id: Some("blue".into()),
                name: "web-1".into(),
            },
            green: Side {
                id: green_id.map(str::to_owned),
                name: "web-1-dso-r1".into(),
            },
            at_ms: 0,
            error: None,
        }
    }

    async fn recover_from(fake: &Fake, r: Record) -> Recovered {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let mut e = j.begin(r.clone()).unwrap();
        e.step(r.step, r.green.id.as_deref()).unwrap();
        let out = recover_all(fake, &j, dir.path()).await.unwrap();
        assert!(j.interrupted().unwrap().is_empty(), "journal closed");
        out.into_iter().next().unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn a_rotation_whose_lock_is_held_is_running_and_left_alone() {
        let f = Fake::default();
        f.add("blue", "web-1", &[], true);
        f.add("g1", "web-1-dso-r1", &[(ROTATION_ID, "r1")], true);
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(dir.path()).unwrap();
        let r = rec(Strategy::Rolling, Step::GreenStarted, Some("g1"));
        j.begin(r.clone()).unwrap();
        let held = ServiceLock::try_acquire(dir.path(), &r.service).unwrap().unwrap();
        assert!(recover_all(&f, &j, dir.path()).await.unwrap().is_empty());
        assert_eq!(f.names().len(), 2, "nothing touched");
        drop(held);
        assert_eq!(recover_all(&f, &j, dir.path()).await.unwrap().len(), 1);
        assert_eq!(f.names(), vec![("web-1".into(), true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_container_the_daemon_removed_meanwhile_counts_as_removed() {
        // The killed agent's own remove call can land between recovery's inspect and its
        // remove: the 404 that follows means done.
        let f = Fake::default();
        remove_gone(&f, "vanished").await.unwrap();
        assert_eq!(*f.calls.lock().unwrap(), ["remove vanished"]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_restart_killed_before_blue_stopped_stops_and_starts_blue() {
        let f = Fake::default();
        f.add("blue", "web-1", &[], true);
        recover_from(&f, rec(Strategy::Restart, Step::Paused, None)).await;
        assert_eq!(*f.calls.lock().unwrap(), ["stop blue", "start blue"]);
        assert_eq!(f.names(), vec![("web-1".into(), true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn before_the_swap_green_goes_and_blue_stays() {
        let f = Fake::default();
        f.add("blue", "web-1", &[], true);
        // Created but not yet recorded: found by the rotation label.
        f.add("g1", "web-1-dso-r1", &[(ROTATION_ID, "r1")], true);
        // A look-alike that no journal names is never touched.
        f.add("other", "web-1-dso-old", &[(ROTATION_ID, "r0")], true);
        let r = recover_from(&f, rec(Strategy::Rolling, Step::Begin, None)).await;
        assert_eq!(r.survivor.as_deref(), Some("blue"));
        assert_eq!(r.removed, vec!["g1".to_owned()]);
        assert_eq!(
            f.names(),
            vec![("web-1".into(), true), ("web-1-dso-old".into(), true)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_swap_green_takes_the_name_and_blue_goes() {
        let f = Fake::default();
        f.add("blue", "web-1", &[], true);
        f.add("g1", "web-1-dso-r1", &[(ROTATION_ID, "r1")], true);
        let r = recover_from(&f, rec(Strategy::Rolling, Step::Swapped, Some("g1"))).await;
        assert_eq!(r.survivor.as_deref(), Some("g1"));
        assert_eq!(f.names(), vec![("web-1".into(), true)]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_last_copy_is_never_removed() {
        // Rolled back expected, but blue is gone: green is the last copy and is kept.
        let f = Fake::default();
        f.add("g1", "web-1-dso-r1", &[(ROTATION_ID, "r1")], false);
        let r = recover_from(&f, rec(Strategy::Rolling, Step::GreenStarted, Some("g1"))).await;
        assert_eq!(r.survivor.as_deref(), Some("g1"));
        assert!(r.removed.is_empty());
        assert_eq!(f.names(), vec![("web-1".into(), true)], "renamed and started");
        // Forward expected, but green is gone: blue is kept.
        let f = Fake::default();
        f.add("blue", "web-1", &[], true);
        let r = recover_from(&f, rec(Strategy::Rolling, Step::Drained, Some("g1"))).await;
        assert_eq!(r.survivor.as_deref(), Some("blue"));
        assert!(r.removed.is_empty());
        assert!(!f.calls.lock().unwrap().iter().any(|c| c.starts_with("remove")));
    }

    #[tokio::test(start_paused = true)]
    async fn restart_before_green_is_healthy_brings_blue_back_under_its_name() {
        let f = Fake::default();
        f.add("blue", "web-1-dso-old-r1", &[], false);
        f.add("g1", "web-1", &[(ROTATION_ID, "r1")], true);
        let r = recover_from(&f, rec(Strategy::Restart, Step::GreenStarted, Some("g1"))).await;
        assert_eq!(r.survivor.as_deref(), Some("blue"));
        assert_eq!(f.names(), vec![("web-1".into(), true)]);
        let calls = f.calls.lock().unwrap().clone();
        let pos = |p: &str| calls.iter().position(|c| c.starts_with(p)).unwrap();
        assert!(
            pos("remove g1") < pos("rename blue"),
            "green frees the name first: {calls:?}"
        );
    }
}
