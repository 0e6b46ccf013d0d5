//! The `rolling` strategy: blue-green behind the proxy.
//!
//! `Begin` → create green under a temporary name → start → healthy → swap the routes →
//! blue drained → blue stopped and removed → green renamed to the original name → `Done`.
//!
//! *Invariant*: before the swap, blue is untouched and serving; any failure removes green
//! and leaves blue as it was (`RolledBack`). After the swap green serves; a failure there
//! is finished forward by recovery, never by removing green.

use std::time::Duration;

use crate::engine::{Engine, short};
use crate::error::Error;
use crate::gateway::Member;
use crate::journal::Step;
use crate::labels::ROTATION_ID;
use crate::rotation::{Run, ms};

/// Extra time allowed for a drain beyond the deadline: the proxy closes the remaining
/// connections over its close window.
const DRAIN_SLACK: Duration = Duration::from_secs(3);

/// What the run has learned so far.
#[derive(Debug, Default)]
struct Green {
    id: Option<String>,
    member: Option<Member>,
    swaps: Vec<(dso_proxy::Listener, dso_proxy::Swap)>,
    /// Connections open on blue at the swap.
    draining: u64,
}

/// Runs a rolling rotation. Returns green's ID.
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
            Err(e) if step < Step::GreenHealthy || (step == Step::GreenHealthy && g.swaps.is_empty()) => {
                match rollback(r, &g).await {
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

/// The one transition function: performs the action leading out of `from`, journals the
/// step reached, and returns it.
async fn advance<E: Engine>(r: &mut Run<'_, E>, g: &mut Green, from: Step) -> Result<Step, Error> {
    let to = match from {
        Step::Begin => {
            g.id = Some(r.create_green(r.green_name()).await?);
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
            g.swaps = r
                .gateway
                .replace(r.key, &r.blue.id, member, r.spec.drain_timeout)?;
            r.serving_after_ms = Some(ms(r.started.elapsed()));
            let draining: u64 = g
                .swaps
                .iter()
                .map(|(l, s)| {
                    l.snapshot()
                        .generations
                        .iter()
                        .filter(|x| x.generation == s.previous)
                        .map(|x| x.active)
                        .sum::<u64>()
                })
                .sum();
            g.draining = draining;
            r.record(
                Step::Swapped,
                None,
                format!("swapped; {draining} connections draining from blue"),
            )
            .await?;
            Step::Swapped
        }
        Step::Swapped => {
            let started = tokio::time::Instant::now();
            let mut forced = 0;
            for (l, s) in &g.swaps {
                let wait = r
                    .spec
                    .drain_timeout
                    .saturating_add(l.config().close_window)
                    .saturating_add(DRAIN_SLACK);
                if let dso_proxy::DrainStatus::Drained(d) = l.wait_drained(s.previous, wait).await? {
                    forced += d.forced;
                }
            }
            r.record(
                Step::Drained,
                None,
                format!(
                    "drained {} connections in {} ms ({forced} closed at the deadline)",
                    g.draining,
                    ms(started.elapsed())
                ),
            )
            .await?;
            Step::Drained
        }
        Step::Drained => {
            // A --rm blue is deleted by the daemon once stopped: its stop may answer 404, and
            // the remove 404 or 409 (removal in progress, waited for); both mean removed.
            match r.engine.stop(&r.blue.id, r.stop_grace).await {
                Err(e) if e.is_not_found() => {}
                other => other?,
            }
            crate::recovery::remove_gone(r.engine, &r.blue.id).await?;
            r.record(Step::BlueRemoved, None, format!("removed {}", short(&r.blue.id)))
                .await?;
            Step::BlueRemoved
        }
        Step::BlueRemoved => {
            let id = g.id.clone().unwrap_or_default();
            r.engine.rename(&id, &r.blue.name).await?;
            r.record(
                Step::GreenRenamed,
                None,
                format!("renamed {} to {}", short(&id), r.blue.name),
            )
            .await?;
            Step::GreenRenamed
        }
        Step::GreenRenamed => Step::Done,
        other => unreachable!("rolling rotation has no step {other:?}"),
    };
    Ok(to)
}

/// Before the swap: removes green; blue was never touched.
async fn rollback<E: Engine>(r: &Run<'_, E>, g: &Green) -> Result<(), Error> {
    let mut ids: Vec<String> = g.id.iter().cloned().collect();
    // Green may exist without a recorded ID when the create call failed half-way.
    let found = r.engine.list_labeled(ROTATION_ID, &r.rotation()).await?;
    ids.extend(found.into_iter().map(|c| c.id));
    ids.sort();
    ids.dedup();
    for id in ids.into_iter().filter(|id| *id != r.blue.id) {
        match r.engine.remove(&id).await {
            Err(e) if !e.is_not_found() => return Err(e.into()),
            _ => {}
        }
    }
    Ok(())
}
