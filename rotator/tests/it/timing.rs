//! How long a rolling rotation takes until green serves, for `docs/benchmarks.md`.
//! Run alone: `cargo test -p dso-rotator --test it timing -- --nocapture`.

use dso_rotator::RotateRequest;

use crate::support::{Agent, Svc, World};

fn measure(label: &str, health_interval: Option<&str>) -> Vec<(u64, u64, u64)> {
    let w = World::new();
    let mut svc = Svc::new("web");
    svc.health_interval = health_interval;
    w.start(&svc);
    let agent = Agent::start(&w);
    let mut out = Vec::new();
    for _ in 0..5 {
        let r = agent
            .rt
            .block_on(agent.rotator.rotate(RotateRequest {
                target: format!("{}/web", w.run),
                ..Default::default()
            }))
            .unwrap();
        let c = &r.containers[0];
        let healthy = c
            .steps
            .iter()
            .find(|s| s.step == dso_rotator::journal::Step::GreenHealthy)
            .map(|s| s.elapsed_ms)
            .unwrap();
        out.push((healthy, c.serving_after_ms.unwrap(), c.took_ms));
    }
    let mut serving: Vec<u64> = out.iter().map(|x| x.1).collect();
    serving.sort();
    println!(
        "rolling rotation timing [{label}]: (healthy_ms, serving_ms, total_ms) per run = {out:?}; median serving {} ms",
        serving[serving.len() / 2]
    );
    out
}

#[test]
fn rolling_rotation_serves_green_within_two_seconds() {
    // The image's HEALTHCHECK runs every 1 s: green is healthy about 1 s after start.
    let docker_check = measure("docker HEALTHCHECK every 1s", Some("1s"));
    // No HEALTHCHECK: dso's TCP connect check, polled every 50 ms.
    let tcp_check = measure("TCP connect check", None);
    for (label, runs) in [("healthcheck", docker_check), ("tcp", tcp_check)] {
        let mut serving: Vec<u64> = runs.iter().map(|x| x.1).collect();
        serving.sort();
        let median = serving[serving.len() / 2];
        // The target is < 2 s (docs/benchmarks.md has the measurements); this bound only
        // catches a gross regression without failing on a loaded CI machine.
        assert!(
            median < 5000,
            "{label}: median time until green serves {median} ms"
        );
    }
}
