//! The `restart` strategy: for services that cannot run twice side by side.
//!
//! `Begin` → listeners hold new connections → blue stopped → blue renamed aside → green
//! created under the original name (same volumes) → started → healthy → listeners resume
//! to green → blue removed → `Done`. Connections made during the hold wait and are
//! forwarded to green.
//!
//! *Invariant*: until green is healthy, blue is kept (stopped, renamed); any failure
//! removes green, gives blue its name back, starts it and resumes the listeners to it.

use std::time::Duration;

use crate::engine::{Engine, short};
use crate::error::Error;
use crate::gateway::Member;
use crate::health;
use crate::journal::Step;
use crate::labels::ROTATION_ID;
use crate::rotation::{Run, ms};

#[derive(Debug, Default)]
struct Green {
    id: Option<String>,
    member: Option<Member>,
}

/// The name blue carries while green takes its name.
pub(crate) fn aside_name(original: &str, rotation: &str) -> String {
    format!("{original}-dso-old-{rotation}")
}

/// Runs a restart rotation. Returns green's ID.
pub(crate) async fn run<E: Engine>(r: &mut Run<'_, E>) -> Result<String, Error> {
    let mut g = Green::default();
    let mut step = Step::Begin;
    r.checkpoint(step).await;
    loop {
        match advance(r, &mut g, step).await {
            Ok(Step::Done) => {
                r.finish(
                    Step::Done,
                    None,
                    format!("done in {} ms", ms(r.started.elapsed())),
                )?;
                return Ok(g.id.unwrap_or_default());
            }
            Ok(next) => step = next,
            Err(e) if step < Step::GreenHealthy => {
                match rollback(r, &g, step).await {
                    Ok(()) => r.finish(Step::RolledBack, Some(e.to_string()), format!("rolled back: {e}"))?,
                    // The journal stays open: recovery finishes the rollback.
                    Err(e2) => tracing::warn!(error = %e2, "rollback incomplete; recovery takes over"),
                }
                return Err(e);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Wait between pausing the listeners and stopping blue. Kept as a fixed wait, measured:
/// what it waits for is a client's session start on a connection the proxy forwarded just
/// before the pause (PostgreSQL's startup packet and authentication), which neither the
/// engine nor the proxy can see: the proxy counts open connections per generation, not
/// whether the protocol above them has finished its handshake, and dso-proxy has no count
/// of dials in flight. Load tests (docs/benchmarks.md, restart with hold): 4 clients
/// aborted with "the database system is shutting down" without it, 0 with 0.5 s.
pub(crate) const RESTART_SETTLE: Duration = Duration::from_millis(500);

async fn advance<E: Engine>(r: &mut Run<'_, E>, g: &mut Green, from: Step) -> Result<Step, Error> {
    let to = match from {
        Step::Begin => {
            // With other replicas serving, blue only leaves the route; the listeners hold
            // new connections only when blue is the last member.
            let detail = if r.gateway.take_out(r.key, &r.blue.id, r.spec.drain_timeout)? {
                let others = r.gateway.members(r.key).len();
                format!("taken out of the route; {others} other members serve new connections")
            } else {
                r.gateway.pause(r.key, r.timing().hold_max);
                "listeners hold new connections".to_owned()
            };
            r.record(Step::Paused, None, detail).await?;
            Step::Paused
        }
        Step::Paused => {
            // Connections dialed just before the pause may still be starting their session;
            // a server that begins its shutdown then refuses them (PostgreSQL: "the database
            // system is shutting down"). Measured in the load tests: 4 aborted clients
            // without this wait, 0 with 0.5 s (docs/benchmarks.md, restart with hold).
            tokio::time::sleep(RESTART_SETTLE).await;
            r.engine.stop(&r.blue.id, r.stop_grace).await?;
            r.record(Step::BlueStopped, None, format!("stopped {}", short(&r.blue.id)))
                .await?;
            Step::BlueStopped
        }
        Step::BlueStopped => {
            let aside = aside_name(&r.blue.name, &r.rotation());
            r.engine.rename(&r.blue.id, &aside).await?;
            r.record(
                Step::BlueRenamed,
                None,
                format!("renamed {} to {aside}", short(&r.blue.id)),
            )
            .await?;
            Step::BlueRenamed
        }
        Step::BlueRenamed => {
            g.id = Some(r.create_green(r.blue.name.clone()).await?);
            Step::GreenCreated
        }
        Step::GreenCreated => {
            r.start_green(g.id.as_deref().unwrap_or_default()).await?;
            Step::GreenStarted
        }
        Step::GreenStarted => {
            g.member = Some(r.wait_green_healthy(g.id.as_deref().unwrap_or_default()).await?);
            Step::GreenHealthy
        }
        Step::GreenHealthy => {
            let member = g.member.clone().expect("green is healthy");
            let held: u64 = r
                .gateway
                .listeners(r.key)
                .iter()
                .map(|l| l.snapshot().counters.held)
                .sum();
            // A swap ends the hold: held connections are dialed to green.
            r.gateway
                .replace(r.key, &r.blue.id, member, r.spec.drain_timeout)?;
            r.serving_after_ms = Some(ms(r.started.elapsed()));
            r.record(
                Step::Resumed,
                None,
                format!("resumed to green; {held} held connections released"),
            )
            .await?;
            Step::Resumed
        }
        Step::Resumed => {
            r.engine.remove(&r.blue.id).await?;
            r.record(Step::BlueRemoved, None, format!("removed {}", short(&r.blue.id)))
                .await?;
            Step::BlueRemoved
        }
        Step::BlueRemoved => Step::Done,
        other => unreachable!("restart rotation has no step {other:?}"),
    };
    Ok(to)
}

/// Before green is healthy: remove green, give blue its name back, start it, and resume
/// the listeners to it (its IP may have changed).
async fn rollback<E: Engine>(r: &Run<'_, E>, g: &Green, failed_from: Step) -> Result<(), Error> {
    let mut ids: Vec<String> = g.id.iter().cloned().collect();
    if let Ok(found) = r.engine.list_labeled(ROTATION_ID, &r.rotation()).await {
        ids.extend(found.into_iter().map(|c| c.id));
    }
    ids.sort();
    ids.dedup();
    for id in ids.iter().filter(|id| **id != r.blue.id) {
        match r.engine.remove(id).await {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
    }
    if failed_from >= Step::BlueRenamed {
        r.engine.rename(&r.blue.id, &r.blue.name).await?;
    }
    let result = async {
        r.engine.start(&r.blue.id).await?;
        // Remote engines: blue's volumes emptied when it stopped; its launcher waits for
        // the files again.
        for v in &r.blue_uploads {
            r.engine.put_archive(&r.blue.id, &v.target, v.archive()).await?;
        }
        // Blue served before the rotation: its address is waited for, not the exec probe
        // (a probe that hangs would keep the service down for a second timeout).
        let check = health::HealthCheck {
            exec: None,
            ..r.health_check()
        };
        let h = health::wait(r.engine, &r.blue.id, &check).await?;
        let member = Member {
            id: r.blue.id.clone(),
            name: r.blue.name.clone(),
            ip: h.ip,
        };
        r.gateway
            .replace(r.key, &r.blue.id, member, r.spec.drain_timeout)?;
        Ok(())
    }
    .await;
    if result.is_err() {
        // Do not leave clients held until hold_max for nothing.
        let _ = r.gateway.resume(r.key);
    }
    result
}
