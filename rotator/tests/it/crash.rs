//! An agent killed at each step of a rotation, then started again: exactly one container
//! serves under the original name, the other is gone, and the new agent routes to it.
//! Also: an agent restart without an interrupted rotation re-adopts and rotates nothing.

use std::time::Duration;

use dso_rotator::journal::Step;
use dso_rotator::{Hooks, RotateRequest, Strategy};

use crate::support::{Agent, Svc, World, exchange, key, short};

/// Starts a rotation with `strategy` frozen after `step`, kills the agent there, starts a
/// new one on the same state directory, and checks the consistent state.
fn kill_at(strategy: Strategy, step: Step) {
    let w = World::new();
    let mut svc = Svc::new("web");
    svc.strategy = if strategy == Strategy::Restart {
        "restart"
    } else {
        "rolling"
    };
    let blue = w.start(&svc);
    let agent = Agent::start(&w);
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let r = agent.rotator.clone();
    let target = format!("{}/web", w.run);
    agent.rt.spawn(async move {
        let _ = r
            .rotate(RotateRequest {
                target,
                progress: Some(tx),
                hooks: Hooks {
                    freeze_after: Some(step),
                },
                ..Default::default()
            })
            .await;
    });
    agent.rt.block_on(async {
        let reached = tokio::time::timeout(Duration::from_secs(40), async {
            while let Some(p) = rx.recv().await {
                if p.step == step {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(reached, Ok(true), "{strategy}: step {step:?} not reached");
    });
    agent.kill();

    let agent = Agent::start(&w);
    assert_eq!(
        agent.recovered.len(),
        1,
        "{strategy} {step:?}: one interrupted rotation recovered"
    );
    let survivor = agent.recovered[0].survivor.clone().expect("a survivor");
    let cs = w.containers();
    assert_eq!(
        cs.len(),
        1,
        "{strategy} {step:?}: exactly one container left: {cs:?}"
    );
    let (name, (id, running)) = cs.into_iter().next().unwrap();
    assert_eq!(
        name,
        format!("{}-web-1", w.run),
        "{strategy} {step:?}: original name"
    );
    assert!(running, "{strategy} {step:?}: survivor runs");
    assert_eq!(id, survivor);
    let forward = match strategy {
        Strategy::Restart => step >= Step::GreenHealthy,
        _ => step >= Step::Swapped,
    };
    assert_eq!(
        id != blue,
        forward,
        "{strategy} {step:?}: survivor is {} ",
        if forward { "green" } else { "blue" }
    );
    let addr = agent.addr(&key(&w, "web"), 8080);
    let served = agent.rt.block_on(async {
        // The survivor may have been started by recovery: give it its health interval.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            match exchange(addr, "after").await {
                Ok(id) => return id,
                Err(e) if tokio::time::Instant::now() > deadline => panic!("{strategy} {step:?}: {e}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    });
    assert_eq!(
        served,
        short(&id),
        "{strategy} {step:?}: the proxy routes to the survivor"
    );
    // The journal is closed: a third start recovers nothing.
    agent.kill();
    let again = Agent::start(&w);
    assert!(again.recovered.is_empty());
    again.kill();
}

#[test]
fn rolling_killed_at_each_step_recovers_to_one_container() {
    for step in [
        Step::Begin,
        Step::GreenCreated,
        Step::GreenStarted,
        Step::GreenHealthy,
        Step::Swapped,
        Step::Drained,
        Step::BlueRemoved,
        Step::GreenRenamed,
    ] {
        kill_at(Strategy::Rolling, step);
    }
}

#[test]
fn restart_killed_at_each_step_recovers_to_one_container() {
    for step in [
        Step::Begin,
        Step::Paused,
        Step::BlueStopped,
        Step::BlueRenamed,
        Step::GreenCreated,
        Step::GreenStarted,
        Step::GreenHealthy,
        Step::Resumed,
        Step::BlueRemoved,
    ] {
        kill_at(Strategy::Restart, step);
    }
}

#[test]
fn agent_restart_readopts_without_rotating() {
    let w = World::new();
    let a = w.start(&Svc::new("web"));
    let mut sb = Svc::new("db");
    sb.strategy = "restart";
    let b = w.start(&sb);
    let agent = Agent::start(&w);
    let before = w.containers();
    let ka = key(&w, "web");
    let kb = key(&w, "db");
    let served = |agent: &Agent| {
        let (pa, pb) = (agent.addr(&ka, 8080), agent.addr(&kb, 8080));
        agent
            .rt
            .block_on(async { (exchange(pa, "x").await.unwrap(), exchange(pb, "y").await.unwrap()) })
    };
    assert_eq!(served(&agent), (short(&a), short(&b)));
    agent.kill();

    let agent = Agent::start(&w);
    assert!(agent.recovered.is_empty());
    assert_eq!(w.containers(), before, "no container created, removed or renamed");
    assert_eq!(
        served(&agent),
        (short(&a), short(&b)),
        "re-adopted with the same containers"
    );
    let status = agent.rt.block_on(agent.rotator.status()).unwrap();
    assert_eq!(status.len(), 2);
    for s in &status {
        assert!(s.last.is_none(), "no rotation recorded: {s:?}");
        assert_eq!(s.containers.len(), 1);
        assert!(
            s.ports[0].starts_with("127.0.0.1:") && !s.ports[0].starts_with("127.0.0.1:0:"),
            "{:?}",
            s.ports
        );
    }
}

#[test]
fn events_add_a_new_container_of_a_service_to_its_route() {
    let w = World::new();
    let a = w.start(&Svc::new("web"));
    let agent = Agent::start(&w);
    let stop = tokio_util::sync::CancellationToken::new();
    let r = agent.rotator.clone();
    let s2 = stop.clone();
    agent.rt.spawn(async move { r.watch(s2).await });
    let k = key(&w, "web");
    let b = w.start_named(&Svc::new("web"), &format!("{}-web-2", w.run));
    let members = agent.rt.block_on(async {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let m = agent.rotator.gateway().members(&k);
            if m.len() == 2 || tokio::time::Instant::now() > deadline {
                return m;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    let mut ids: Vec<_> = members.iter().map(|m| m.id.clone()).collect();
    ids.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(
        ids, want,
        "the second container joined the route after its start event"
    );
    stop.cancel();
}
