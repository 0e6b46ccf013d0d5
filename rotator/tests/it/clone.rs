//! Clone fidelity against the real engine: what a replacement keeps, changes or refuses
//! (the table in docs/rotation.md). Each row of that table is an assertion here.

use dso_rotator::engine::CloneSpec;
use dso_rotator::{DockerEngine, Engine, Error, RotateRequest, Strategy};
use serde_json::Value;

use crate::support::{Agent, RUN_LABEL, Svc, World, image, key};

fn inspect(w: &World, id: &str) -> Value {
    let out = w.docker(&["inspect", id]).unwrap();
    let v: Value = serde_json::from_str(&out).unwrap();
    v[0].clone()
}

/// Sorted mounts as `type:name-or-source:destination:rw`.
fn mounts(c: &Value) -> Vec<String> {
    let mut v: Vec<String> = c["Mounts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let what = m["Name"]
                .as_str()
                .filter(|s| !s.is_empty())
                .or(m["Source"].as_str())
                .unwrap_or("");
            format!("{}:{}:{}:{}", m["Type"], what, m["Destination"], m["RW"])
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_clone_keeps_every_setting_of_the_table() {
    let w = World::new();
    let e = DockerEngine::connect().await.expect("connect");
    let run_label = format!("{RUN_LABEL}={}", w.run);
    let extra_net = format!("{}-extra", w.run);
    w.docker(&["network", "create", "--label", &run_label, &extra_net])
        .unwrap();
    let vol = format!("{}-data", w.run);
    w.docker(&["volume", "create", "--label", &run_label, &vol])
        .unwrap();
    let name = format!("{}-full-1", w.run);
    let id = w
        .docker(&[
            "create",
            "--name",
            &name,
            "--hostname",
            "rabbit-node-1",
            "--network",
            &w.network,
            "--network-alias",
            "full-alias",
            "--label",
            &run_label,
            "--label",
            "app.tier=backend",
            "--restart",
            "unless-stopped",
            "--health-cmd",
            "/dso-testsrv probe 127.0.0.1:8081/health",
            "--health-interval",
            "1s",
            "--health-retries",
            "3",
            "--user",
            "1000:1000",
            "--workdir",
            "/work",
            "--entrypoint",
            "/dso-testsrv",
            "--tmpfs",
            "/scratch:size=1m,mode=1777",
            "-v",
            &format!("{vol}:/state"),
            "-v",
            "/anon",
            "--log-driver",
            "json-file",
            "--log-opt",
            "max-size=1m",
            "--log-opt",
            "max-file=2",
            "--ulimit",
            "nofile=1024:2048",
            "--cap-drop",
            "ALL",
            "--cap-add",
            "NET_BIND_SERVICE",
            "-e",
            "KEEP=1",
            &image(),
            "--id",
            "fidelity",
        ])
        .unwrap();
    w.docker(&["network", "connect", "--alias", "extra-alias", &extra_net, &id])
        .unwrap();
    let spec = CloneSpec {
        from: id.clone(),
        name: format!("{}-full-2", w.run),
        env: vec![("NEW".into(), "2".into())],
        labels: vec![("dso.rotation.id".into(), "t1".into())],
        primary_network: None,
        overrides: Default::default(),
    };
    let green = e.create_clone(&spec).await.unwrap();
    let (b, g) = (inspect(&w, &id), inspect(&w, &green));

    // Image: the name as blue gave it, and the same image ID.
    assert_eq!(g["Config"]["Image"], image(), "image name kept");
    assert_eq!(g["Image"], b["Image"], "image ID pinned");
    // Hostname chosen by the user is kept.
    assert_eq!(g["Config"]["Hostname"], "rabbit-node-1");
    for (path, what) in [
        (&["HostConfig", "RestartPolicy"][..], "restart policy"),
        (&["Config", "Healthcheck"], "healthcheck"),
        (&["Config", "User"], "user"),
        (&["Config", "WorkingDir"], "workdir"),
        (&["Config", "Entrypoint"], "entrypoint"),
        (&["Config", "Cmd"], "cmd"),
        (&["HostConfig", "Tmpfs"], "tmpfs"),
        (&["HostConfig", "LogConfig"], "log config"),
        (&["HostConfig", "Ulimits"], "ulimits"),
        (&["HostConfig", "CapAdd"], "capabilities added"),
        (&["HostConfig", "CapDrop"], "capabilities dropped"),
        (&["HostConfig", "AutoRemove"], "auto-remove (false here)"),
    ] {
        let get = |v: &Value| path.iter().fold(v.clone(), |v, k| v[*k].clone());
        assert_eq!(get(&g), get(&b), "{what} kept");
        assert!(
            !get(&b).is_null() || what.starts_with("auto"),
            "{what}: blue has it set"
        );
    }
    // Labels: all of blue's, plus dso's own.
    let bl = b["Config"]["Labels"].as_object().unwrap();
    let gl = g["Config"]["Labels"].as_object().unwrap();
    for (k, v) in bl {
        assert_eq!(gl.get(k), Some(v), "label {k} kept");
    }
    assert_eq!(gl["dso.rotation.id"], "t1");
    // Environment: kept, with the new value added.
    let env: Vec<&str> = g["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(env.contains(&"KEEP=1") && env.contains(&"NEW=2"), "{env:?}");
    // Volumes: the same named and anonymous volumes.
    assert_eq!(mounts(&g), mounts(&b), "same volumes");
    assert_eq!(mounts(&b).len(), 2, "{:?}", mounts(&b));
    // Networks and aliases: both networks, with the user's aliases (not blue's short ID).
    let nets = |c: &Value| {
        let mut v: Vec<(String, Vec<String>)> = c["NetworkSettings"]["Networks"]
            .as_object()
            .unwrap()
            .iter()
            .map(|(n, ep)| {
                let mut a: Vec<String> = ep["Aliases"]
                    .as_array()
                    .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
                    .unwrap_or_default();
                a.retain(|x| x.ends_with("-alias"));
                a.sort();
                (n.clone(), a)
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(nets(&g), nets(&b), "networks and aliases");
    assert_eq!(nets(&b).len(), 2);
    // -v: the anonymous volume goes too (World's drop would also remove both).
    w.docker(&["rm", "-fv", &green, &id]).unwrap();
}

#[tokio::test]
async fn a_default_hostname_is_not_copied_and_auto_remove_is_cleared() {
    let w = World::new();
    let e = DockerEngine::connect().await.expect("connect");
    let mut svc = Svc::new("rm");
    svc.run_args = vec!["--rm".into()];
    let id = w.start(&svc);
    let spec = CloneSpec {
        from: id.clone(),
        name: format!("{}-rm-2", w.run),
        env: vec![],
        labels: vec![],
        primary_network: None,
        overrides: Default::default(),
    };
    let green = e.create_clone(&spec).await.unwrap();
    let (b, g) = (inspect(&w, &id), inspect(&w, &green));
    assert_eq!(b["HostConfig"]["AutoRemove"], true);
    assert_eq!(
        g["HostConfig"]["AutoRemove"], false,
        "--rm cleared on the replacement"
    );
    assert_eq!(b["Config"]["Hostname"], id[..12], "Docker's default");
    assert_eq!(g["Config"]["Hostname"], green[..12], "green gets its own default");
    e.remove(&green).await.unwrap();
}

#[test]
fn a_rm_container_is_refused_by_restart_and_rolled_without_rm() {
    let w = World::new();
    let mut svc = Svc::new("web");
    svc.strategy = "auto";
    svc.run_args = vec!["--rm".into()];
    let blue = w.start(&svc);
    let agent = Agent::start(&w);
    let target = format!("{}/web", w.run);
    let err = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: target.clone(),
            strategy: Some(Strategy::Restart),
            ..Default::default()
        }))
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, Error::Refused { .. }) && msg.contains("--rm"),
        "{msg}"
    );
    assert_eq!(w.containers().len(), 1, "nothing created or stopped");
    assert!(w.containers().values().all(|(i, running)| *i == blue && *running));
    let report = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target,
            strategy: Some(Strategy::Rolling),
            ..Default::default()
        }))
        .unwrap();
    let green = &report.containers[0].new_id;
    let cs = w.containers();
    assert_eq!(cs.len(), 1, "blue deleted by the daemon or by dso: {cs:?}");
    let (name, (id, running)) = cs.into_iter().next().unwrap();
    assert_eq!((&id, running), (green, true));
    assert_eq!(name, format!("{}-web-1", w.run));
    assert_eq!(
        w.docker(&["inspect", "-f", "{{.HostConfig.AutoRemove}}", green])
            .unwrap(),
        "false"
    );
    let addr = agent.addr(&key(&w, "web"), 8080);
    assert_eq!(
        agent.rt.block_on(crate::support::exchange(addr, "x")).unwrap(),
        crate::support::short(green)
    );
}

/// Untags the image on drop.
struct Tag(String);
impl Drop for Tag {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker")
            .args(["rmi", &self.0])
            .output();
    }
}

#[test]
fn the_image_name_survives_rotations_and_keeps_a_database_on_restart() {
    let w = World::new();
    // A database-looking name for the test image: `auto` must pick restart every time.
    let pg = format!("{}/postgres:16", w.run);
    w.docker(&["tag", &image(), &pg]).unwrap();
    let _tag = Tag(pg.clone());
    let mut db = Svc::new("db");
    db.strategy = "auto";
    db.image = Some(pg.clone());
    w.start(&db);
    let web = Svc::new("web");
    w.start(&web);
    let agent = Agent::start(&w);
    let ps_image = |service: &str| {
        w.docker(&[
            "ps",
            "--filter",
            &format!("name=^{}-{service}-1$", w.run),
            "--format",
            "{{.Image}}",
        ])
        .unwrap()
    };
    for round in 0..2 {
        for (service, want_image, want) in [
            ("db", pg.as_str(), Strategy::Restart),
            ("web", "dso-testsrv:test", Strategy::Rolling),
        ] {
            let r = agent
                .rt
                .block_on(agent.rotator.rotate(RotateRequest {
                    target: format!("{}/{service}", w.run),
                    ..Default::default()
                }))
                .unwrap_or_else(|e| panic!("round {round} {service}: {e}"));
            assert_eq!(r.containers[0].strategy, want, "round {round} {service}");
            let want_image = if service == "web" {
                image()
            } else {
                want_image.to_owned()
            };
            assert_eq!(
                ps_image(service),
                want_image,
                "round {round}: docker ps shows the name"
            );
        }
    }
}

#[test]
fn a_retagged_image_name_is_not_picked_up_the_clone_runs_blues_image_id() {
    let w = World::new();
    let app = format!("{}/app:1", w.run);
    w.docker(&["tag", &image(), &app]).unwrap();
    let _tag = Tag(app.clone());
    let mut svc = Svc::new("web");
    svc.image = Some(app.clone());
    let blue = w.start(&svc);
    let blue_image = w.docker(&["inspect", "-f", "{{.Image}}", &blue]).unwrap();
    // Another image under the same name: a commit of blue has a new ID.
    let other = w
        .docker(&["commit", "--change", "LABEL retagged=1", &blue])
        .unwrap();
    w.docker(&["tag", &other, &app]).unwrap();
    let _other = Tag(other.clone());
    assert_ne!(other, blue_image);
    let agent = Agent::start(&w);
    let report = agent
        .rt
        .block_on(agent.rotator.rotate(RotateRequest {
            target: format!("{}/web", w.run),
            ..Default::default()
        }))
        .unwrap();
    let green = &report.containers[0].new_id;
    assert_eq!(
        w.docker(&["inspect", "-f", "{{.Image}}", green]).unwrap(),
        blue_image,
        "green runs blue's image, not the retagged one"
    );
    assert_eq!(
        w.docker(&["inspect", "-f", "{{.Config.Image}}", green]).unwrap(),
        blue_image,
        "created by ID, since the name now names another image"
    );
}
