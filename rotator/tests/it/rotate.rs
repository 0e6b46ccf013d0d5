//! Rotations against the real engine with the real proxy in front, under client load.

use std::time::Duration;

use dso_rotator::{Error, RotateRequest, Strategy};

use crate::support::{Agent, Load, Svc, World, exchange, key, short};

/// Exactly one container of `service`, running, under its original name. Returns its ID.
fn one_serving(w: &World, service: &str) -> String {
    let cs = w.service_containers(service);
    let all = w.containers();
    assert_eq!(
        all.len(),
        cs.len(),
        "a container outside the service's names remains: {all:?}"
    );
    assert_eq!(cs.len(), 1, "expected one container of {service}: {cs:?}");
    let (name, (id, running)) = cs.into_iter().next().unwrap();
    assert_eq!(name, format!("{}-{service}-1", w.run));
    assert!(running, "{name} is not running");
    id
}

#[test]
fn twenty_rolling_rotations_under_load_fail_no_connection() {
    let w = World::new();
    let blue = w.start(&Svc::new("web"));
    let agent = Agent::start(&w);
    let k = key(&w, "web");
    let addr = agent.addr(&k, 8080);
    assert!(
        addr.ip().is_loopback(),
        "bind IP 127.0.0.1 from the label is kept: {addr}"
    );
    let rt = agent.rt.handle().clone();
    let (ok, failures, seen, ids) = rt.block_on(async {
        // Blue is healthy before load starts: the proxy serves it already.
        exchange(addr, "warm").await.unwrap();
        let load = Load::start(&rt, addr, 6);
        let mut ids = vec![blue.clone()];
        for i in 0..20 {
            let report = agent
                .rotator
                .rotate(RotateRequest {
                    target: format!("{}/web", w.run),
                    env: vec![("ROUND".into(), i.to_string())],
                    ..Default::default()
                })
                .await
                .unwrap_or_else(|e| panic!("rotation {i}: {e}"));
            let c = &report.containers[0];
            assert_eq!(c.strategy, Strategy::Rolling);
            assert_eq!(c.old_id, *ids.last().unwrap());
            assert_ne!(c.new_id, c.old_id);
            assert_eq!(
                one_serving(&w, "web"),
                c.new_id,
                "rotation {i} ends with one container under the original name"
            );
            ids.push(c.new_id.clone());
        }
        // Let the load see the last green for a moment.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (ok, failures, seen) = load.finish().await;
        (ok, failures, seen, ids)
    });
    assert!(
        failures.is_empty(),
        "{} failed connections out of {}: {:?}",
        failures.len(),
        ok + failures.len() as u64,
        &failures[..failures.len().min(10)]
    );
    assert!(ok > 200, "too little load to mean anything: {ok}");
    assert!(
        seen.contains(&short(&ids[0])) && seen.contains(&short(ids.last().unwrap())),
        "served by first and last: {seen:?}"
    );
    assert!(
        seen.len() >= 15,
        "most of the 21 containers served clients: {seen:?}"
    );
}

#[test]
fn restart_holds_new_connections_and_fails_none() {
    let w = World::new();
    let mut svc = Svc::new("db");
    svc.strategy = "restart";
    let blue = w.start(&svc);
    let agent = Agent::start(&w);
    let k = key(&w, "db");
    let addr = agent.addr(&k, 8080);
    let rt = agent.rt.handle().clone();
    let (ok, failures, seen, report) = rt.block_on(async {
        exchange(addr, "warm").await.unwrap();
        let load = Load::start(&rt, addr, 6);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let report = agent
            .rotator
            .rotate(RotateRequest {
                target: format!("{}/db", w.run),
                ..Default::default()
            })
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (ok, failures, seen) = load.finish().await;
        (ok, failures, seen, report)
    });
    let c = &report.containers[0];
    assert_eq!(c.strategy, Strategy::Restart);
    assert_eq!(c.old_id, blue);
    assert_eq!(one_serving(&w, "db"), c.new_id);
    assert!(failures.is_empty(), "failed connections: {failures:?}");
    assert!(
        seen.contains(&short(&blue)) && seen.contains(&short(&c.new_id)),
        "{seen:?}"
    );
    assert!(ok > 20, "{ok}");
    let resumed = c
        .steps
        .iter()
        .find(|s| s.step == dso_rotator::journal::Step::Resumed)
        .unwrap();
    let held: u64 = resumed
        .detail
        .split("; ")
        .nth(1)
        .and_then(|d| d.split(' ').next())
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        held > 0,
        "clients connected during the restart were held, then served: {resumed:?}"
    );
    let snap = agent
        .proxy
        .listener(&dso_rotator::listener_name(&k, 8080))
        .unwrap()
        .snapshot();
    assert_eq!(snap.counters.hold_timeouts, 0);
    assert_eq!(snap.counters.failed, 0);
}

#[test]
fn rollback_when_green_never_becomes_healthy() {
    let w = World::new();
    let mut svc = Svc::new("web");
    svc.extra_labels = vec![("dso.health.timeout", "3s".into())];
    let blue = w.start(&svc);
    let agent = Agent::start(&w);
    let addr = agent.addr(&key(&w, "web"), 8080);
    let rt = agent.rt.handle().clone();
    for strategy in [Strategy::Rolling, Strategy::Restart] {
        let err = rt
            .block_on(agent.rotator.rotate(RotateRequest {
                target: format!("{}/web", w.run),
                strategy: Some(strategy),
                env: vec![("UNHEALTHY".into(), "1".into())],
                ..Default::default()
            }))
            .unwrap_err();
        assert!(matches!(err, Error::Unhealthy { .. }), "{strategy}: {err}");
        assert_eq!(
            one_serving(&w, "web"),
            blue,
            "{strategy}: blue still serves and green is gone"
        );
        assert_eq!(
            rt.block_on(exchange(addr, "after")).unwrap(),
            short(&blue),
            "{strategy}"
        );
    }
    let status = rt.block_on(agent.rotator.status()).unwrap();
    let last = status[0].last.as_ref().unwrap();
    assert_eq!(last.result, "failed");
    assert!(last.error.as_ref().unwrap().contains("not healthy"), "{last:?}");
    assert!(
        !last.rotation.is_empty(),
        "a failed rotation keeps its ID: {last:?}"
    );
}

#[test]
fn two_services_are_never_mixed_and_bind_ips_are_kept() {
    let w = World::new();
    let a = w.start(&Svc::new("a"));
    let mut sb = Svc::new("b");
    sb.ports = "0:8080";
    let b = w.start(&sb);
    let agent = Agent::start(&w);
    let (ka, kb) = (key(&w, "a"), key(&w, "b"));
    let addr_a = agent.addr(&ka, 8080);
    let addr_b = agent.addr(&kb, 8080);
    assert_eq!(addr_a.ip().to_string(), "127.0.0.1");
    assert_eq!(
        addr_b.ip().to_string(),
        "0.0.0.0",
        "no IP in the label binds all interfaces"
    );
    let addr_b = std::net::SocketAddr::from(([127, 0, 0, 1], addr_b.port()));
    let rt = agent.rt.handle().clone();
    rt.block_on(async {
        let report = agent
            .rotator
            .rotate(RotateRequest {
                target: format!("{}/a", w.run),
                ..Default::default()
            })
            .await
            .unwrap();
        let a2 = &report.containers[0].new_id;
        for i in 0..20 {
            assert_eq!(exchange(addr_a, &format!("a{i}")).await.unwrap(), short(a2));
            assert_eq!(exchange(addr_b, &format!("b{i}")).await.unwrap(), short(&b));
        }
        assert_ne!(a2, &a);
    });
}

#[test]
fn queued_requests_are_coalesced_not_dropped() {
    let w = World::new();
    w.start(&Svc::new("web"));
    let agent = Agent::start(&w);
    let rt = agent.rt.handle().clone();
    let results = rt.block_on(async {
        let mut hs = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for i in 0..4 {
            let r = agent.rotator.clone();
            let target = format!("{}/web", w.run);
            let progress = (i == 0).then(|| tx.clone());
            // The third asks for `signal`, which cannot apply the others' --env values:
            // the merged rotation still replaces the container with them.
            let (strategy, env) = if i == 2 {
                (Some(Strategy::Signal), vec![])
            } else {
                (None, vec![("N".into(), i.to_string())])
            };
            hs.push(tokio::spawn(async move {
                r.rotate(RotateRequest {
                    target,
                    strategy,
                    env,
                    progress,
                    ..Default::default()
                })
                .await
            }));
            if i == 0 {
                // The others arrive while the first one runs (green started, not healthy).
                while rx.recv().await.unwrap().step != dso_rotator::journal::Step::GreenStarted {}
            }
        }
        let mut out = Vec::new();
        for h in hs {
            out.push(h.await.unwrap().unwrap());
        }
        out
    });
    let first = &results[0].containers[0];
    let merged: Vec<_> = results[1..]
        .iter()
        .map(|r| r.containers[0].new_id.clone())
        .collect();
    assert!(
        merged.iter().all(|m| *m == merged[0]),
        "requests 2-4 share one rotation: {merged:?}"
    );
    assert_ne!(merged[0], first.new_id, "the merged rotation ran after the first");
    assert_eq!(one_serving(&w, "web"), merged[0]);
    for r in &results[1..] {
        assert_eq!(r.containers[0].strategy, Strategy::Rolling, "{r:?}");
        assert_eq!(r.env, ["N"], "the merged --env values were applied");
        assert_eq!(r.requests, 3, "every caller sees the merged outcome");
    }
    let ip = w
        .docker(&[
            "inspect",
            "-f",
            "{{range .Config.Env}}{{println .}}{{end}}",
            &merged[0],
        ])
        .unwrap();
    // Requests 2-4 reach the queue in whatever order their scans finish: the value of the
    // one merged last wins, and it is one of them.
    assert!(
        ip.lines().any(|l| l == "N=1" || l == "N=3"),
        "a merged value applied: {ip}"
    );
}

#[test]
fn a_hung_exec_probe_fails_a_restart_by_its_deadline_and_blue_serves_again() {
    let w = World::new();
    let mut svc = Svc::new("db");
    svc.strategy = "restart";
    svc.extra_labels = vec![
        ("dso.health.timeout", "3s".into()),
        // A second server inside the container: the exec never ends.
        (
            "dso.health.exec",
            r#"["/dso-testsrv","--listen=127.0.0.1:9999","--http=off"]"#.into(),
        ),
    ];
    let blue = w.start(&svc);
    let agent = Agent::start(&w);
    let k = key(&w, "db");
    let addr = agent.addr(&k, 8080);
    let rt = agent.rt.handle().clone();
    let started = std::time::Instant::now();
    let err = rt
        .block_on(async {
            tokio::time::timeout(
                Duration::from_secs(40),
                agent.rotator.rotate(RotateRequest {
                    target: format!("{}/db", w.run),
                    ..Default::default()
                }),
            )
            .await
        })
        .expect("the rotation ends: the hung probe has a deadline")
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Unhealthy { .. })
            && (msg.contains("no answer within") || msg.contains("did not finish within")),
        "the probe hung, and its deadline ended it: {msg}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(one_serving(&w, "db"), blue, "blue restored, green removed");
    assert_eq!(rt.block_on(exchange(addr, "back")).unwrap(), short(&blue));
    let l = agent
        .proxy
        .listener(&dso_rotator::listener_name(&k, 8080))
        .unwrap();
    assert!(!l.is_paused(), "the hold ended");
    let lock = dso_rotator::ServiceLock::try_acquire(&w.state_dir(), &k).unwrap();
    assert!(lock.is_some(), "the service lock is free");
}

#[test]
fn refuses_rolling_for_a_container_publishing_its_own_ports() {
    let w = World::new();
    let id = w.start(&Svc::new("web"));
    // A second service that publishes a host port itself (OS-chosen).
    let name = format!("{}-pub-1", w.run);
    w.docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &w.network,
        "-p",
        "127.0.0.1::8080",
        "--label",
        &format!("dso.test.run={}", w.run),
        "--label",
        "dso.reloader=true",
        "--label",
        "dso.update.strategy=rolling",
        "--label",
        &format!("com.docker.compose.project={}", w.run),
        "--label",
        "com.docker.compose.service=pub",
        &crate::support::image(),
    ])
    .unwrap();
    let agent = Agent::start(&w);
    let err = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: format!("{}/pub", w.run),
            ..Default::default()
        }))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Refused { .. })
            && msg.contains("publishes host ports")
            && msg.contains("--strategy restart"),
        "{msg}"
    );
    assert_eq!(w.containers().len(), 2, "nothing was created");
    assert!(w.containers().values().any(|(i, _)| *i == id));
    // The override the message names works: restart frees the port before green starts.
    let report = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: format!("{}/pub", w.run),
            strategy: Some(Strategy::Restart),
            ..Default::default()
        }))
        .unwrap();
    let green = &report.containers[0].new_id;
    let ports = w.docker(&["port", green, "8080"]).unwrap();
    assert!(
        ports.starts_with("127.0.0.1:"),
        "green publishes the port like blue did: {ports}"
    );
    assert_eq!(one_serving_of(&w, "pub"), *green);
}

#[test]
fn exec_probe_runs_in_green_and_a_failing_one_rolls_back() {
    let w = World::new();
    let mut svc = Svc::new("web");
    svc.health_interval = None;
    svc.extra_labels = vec![
        ("dso.health.timeout", "2s".into()),
        (
            "dso.health.exec",
            r#"["/dso-testsrv","probe","127.0.0.1:8081/health"]"#.into(),
        ),
    ];
    w.start(&svc);
    let mut bad = Svc::new("bad");
    bad.health_interval = None;
    bad.extra_labels = vec![
        ("dso.health.timeout", "2s".into()),
        ("dso.health.exec", "/dso-testsrv probe 127.0.0.1:8081/nope".into()),
    ];
    let bad_id = w.start(&bad);
    let agent = Agent::start(&w);
    let ok = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: format!("{}/web", w.run),
            ..Default::default()
        }))
        .unwrap();
    assert_ne!(ok.containers[0].new_id, ok.containers[0].old_id);
    let err = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: format!("{}/bad", w.run),
            ..Default::default()
        }))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("exited with 1"),
        "the probe's real exit code is reported: {msg}"
    );
    assert_eq!(one_serving_of(&w, "bad"), bad_id);
}

/// Like [`one_serving`], for one service among several.
fn one_serving_of(w: &World, service: &str) -> String {
    let cs = w.service_containers(service);
    assert_eq!(cs.len(), 1, "expected one container of {service}: {cs:?}");
    let (_, (id, running)) = cs.into_iter().next().unwrap();
    assert!(running);
    id
}

#[test]
fn an_open_connection_keeps_blue_until_it_closes() {
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
    let w = World::new();
    let blue = w.start(&Svc::new("web"));
    let agent = Agent::start(&w);
    let addr = agent.addr(&key(&w, "web"), 8080);
    let rt = agent.rt.handle().clone();
    let report = rt.block_on(async {
        let conn = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (r, mut wr) = conn.into_split();
        let mut r = BufReader::new(r);
        let mut line = String::new();
        r.read_line(&mut line).await.unwrap();
        assert_eq!(line.trim_end(), format!("dso-testsrv {}", short(&blue)));
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let rot = agent.rotator.clone();
        let target = format!("{}/web", w.run);
        let task = tokio::spawn(async move {
            rot.rotate(RotateRequest {
                target,
                progress: Some(tx),
                ..Default::default()
            })
            .await
        });
        while rx.recv().await.unwrap().step != dso_rotator::journal::Step::Swapped {}
        // New connections go to green; the open one still talks to blue.
        let green = exchange(addr, "new").await.unwrap();
        assert_ne!(green, short(&blue));
        for i in 0..5 {
            wr.write_all(format!("old{i}\n").as_bytes()).await.unwrap();
            line.clear();
            r.read_line(&mut line).await.unwrap();
            assert_eq!(
                line.trim_end(),
                format!("old{i}"),
                "the open connection still works after the swap"
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert!(
            !task.is_finished(),
            "blue is not removed while its connection is open"
        );
        drop(wr);
        drop(r);
        task.await.unwrap().unwrap()
    });
    let drained = report.containers[0]
        .steps
        .iter()
        .find(|s| s.step == dso_rotator::journal::Step::Drained)
        .unwrap();
    assert!(
        drained.detail.starts_with("drained 1 connections") && drained.detail.contains("(0 closed"),
        "{drained:?}"
    );
}
