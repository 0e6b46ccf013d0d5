//! `dso agent --docker` with `dso rotate` / `dso status`, against the real Docker engine and
//! the `dso-testsrv:test` image: a real SIGKILL of the agent process during a rotation, then
//! a restart that recovers to one container and re-adopts it without rotating.
//! These fail (never skip) when Docker or the image is missing.

use std::net::SocketAddr;
use std::process::Command as StdCommand;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use crate::harness::{Agent, DSO, docker, http, stderr, stdout};

/// A network and one managed container, removed (with anything else of the run) on drop.
struct Project {
    run: String,
}

impl Project {
    fn start(strategy: &str) -> Project {
        let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let run = format!("dsocli{}x{strategy}x{nanos:x}", std::process::id());
        let p = Project { run };
        docker(&[
            "network",
            "create",
            "--label",
            &format!("dso.test.run={}", p.run),
            &format!("{}_default", p.run),
        ]);
        docker(&[
            "run",
            "-d",
            "--name",
            &p.name(),
            "--network",
            &format!("{}_default", p.run),
            "--label",
            &format!("dso.test.run={}", p.run),
            "--label",
            "dso.reloader=true",
            "--label",
            "dso.host_ports=127.0.0.1:0:8080",
            "--label",
            &format!("dso.update.strategy={strategy}"),
            "--label",
            "dso.drain.timeout=2s",
            "--label",
            &format!("com.docker.compose.project={}", p.run),
            "--label",
            "com.docker.compose.service=web",
            "--health-interval=200ms",
            "--health-retries=1",
            &image,
        ]);
        p
    }

    fn name(&self) -> String {
        format!("{}-web-1", self.run)
    }

    /// `(name, id, running)` of every container of the run.
    fn containers(&self) -> Vec<(String, String, bool)> {
        docker(&[
            "ps",
            "-a",
            "--no-trunc",
            "--filter",
            &format!("label=dso.test.run={}", self.run),
            "--format",
            "{{.Names}} {{.ID}} {{.State}}",
        ])
        .lines()
        .map(|l| {
            let v: Vec<&str> = l.split_whitespace().collect();
            (v[0].to_owned(), v[1].to_owned(), v[2] == "running")
        })
        .collect()
    }

    /// Starts `dso agent --docker` scoped to this run; waits up to 60 s for it to answer
    /// and prints its log when it does not.
    async fn agent(&self, state: &std::path::Path) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dso.yaml");
        std::fs::write(&config, "proxy:\n  listeners: []\n").unwrap();
        let socket = dir.path().join("run/dso.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let scope = format!("dso.test.run={}", self.run);
        let child = tokio::process::Command::new(DSO)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .args(["--docker", "--docker-scope", &scope, "--state-dir"])
            .arg(state)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let agent = Agent { dir, socket, child };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        while http(&agent.socket, "GET", "/v1/health", "").await.is_err() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "agent not ready within 60 s; log:\n{}",
                agent.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        agent
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=dso.test.run={}", self.run),
        ]);
        for id in ids.lines() {
            let _ = StdCommand::new("docker").args(["rm", "-f", id]).output();
        }
        let _ = StdCommand::new("docker")
            .args(["network", "rm", &format!("{}_default", self.run)])
            .output();
    }
}

async fn greeting(addr: SocketAddr) -> String {
    let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), BufReader::new(s).read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    line.trim_end()
        .strip_prefix("dso-testsrv ")
        .unwrap_or(&line)
        .to_owned()
}

/// Starts a rotation through the API, SIGKILLs the agent as soon as `step` is reported,
/// restarts it, and checks: one container, original name, running, served by the proxy;
/// a further restart changes nothing.
async fn kill_during(strategy: &str, step: &str) {
    let p = Project::start(strategy);
    let state = tempfile::tempdir().unwrap();
    let agent = p.agent(state.path()).await;
    let listener = format!("{}/web:8080", p.run);
    let (code, body) = http(
        &agent.socket,
        "POST",
        "/v1/rotations",
        &format!(r#"{{"target":"{}/web"}}"#, p.run),
    )
    .await
    .unwrap();
    assert_eq!(code, 202, "{body}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http(&agent.socket, "GET", "/v1/rotations/1", "").await.unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        if v["steps"].as_array().unwrap().iter().any(|s| s["step"] == step) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "step {step} never reported: {body}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    agent.signal("KILL");
    // A supervisor restarts the agent once the old process is gone (its locks with it).
    let mut agent = agent;
    agent.child.wait().await.unwrap();
    drop(agent);

    // The kill can land after the last steps (they take milliseconds): recovery is due
    // only when the journal did not reach `done`.
    let journal = std::fs::read_dir(state.path().join("journal"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let text = std::fs::read_to_string(journal).unwrap();
    let finished = text.lines().last().unwrap().contains(r#""step":"done""#);
    let agent = p.agent(state.path()).await;
    assert_eq!(
        agent.log().contains("finished an interrupted rotation"),
        !finished,
        "{strategy} killed after {step}; journal:\n{text}\nlog:\n{}",
        agent.log()
    );
    let cs = p.containers();
    assert_eq!(
        cs.len(),
        1,
        "{strategy} killed after {step}: one container left: {cs:?}\n{}",
        agent.log()
    );
    let (name, id, running) = cs[0].clone();
    assert_eq!(name, p.name());
    assert!(running);
    let addr = agent.addr(&listener).await;
    let mut served = String::new();
    for _ in 0..100 {
        served = greeting(addr).await;
        if id.starts_with(&served) && !served.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        id.starts_with(&served) && !served.is_empty(),
        "proxy serves {served}, survivor is {id}"
    );

    // A graceful restart with nothing interrupted re-adopts and rotates nothing.
    agent.signal("TERM");
    let mut agent = agent;
    agent.child.wait().await.unwrap();
    drop(agent);
    let agent = p.agent(state.path()).await;
    assert_eq!(p.containers(), vec![(name, id.clone(), true)]);
    let out = agent.dso(&["status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        v[0]["containers"][0].as_str().unwrap(),
        format!("{} ({})", p.name(), &id[..12])
    );
}

#[tokio::test]
async fn sigkill_during_a_rolling_rotation_then_restart_recovers() {
    for step in ["green_created", "green_started", "swapped", "blue_removed"] {
        kill_during("rolling", step).await;
    }
}

#[tokio::test]
async fn sigkill_during_a_restart_rotation_then_restart_recovers() {
    for step in [
        "paused",
        "blue_stopped",
        "blue_renamed",
        "green_healthy",
        "resumed",
    ] {
        kill_during("restart", step).await;
    }
}

#[tokio::test]
async fn dso_rotate_prints_steps_and_status_shows_the_result() {
    let p = Project::start("rolling");
    let state = tempfile::tempdir().unwrap();
    let agent = p.agent(state.path()).await;
    let target = format!("{}/web", p.run);
    // A value on the command line is refused (exit 2, naming --env-file), nothing rotates.
    let refused = agent.dso(&["rotate", &target, "--env", "K=v"]).await;
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(stderr(&refused).contains("--env-file"), "{}", stderr(&refused));
    let env_file = state.path().join("rotate.env");
    std::fs::write(&env_file, "# comment\n\nK=v\n").unwrap();
    let out = agent
        .dso(&["rotate", &target, "--env-file", env_file.to_str().unwrap()])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("docker inspect"),
        "the env visibility note: {}",
        stderr(&out)
    );
    let text = stdout(&out);
    for step in [
        "green_created",
        "green_healthy",
        "swapped",
        "drained",
        "blue_removed",
        "green_renamed",
        "total ",
        "environment set: K",
    ] {
        assert!(text.contains(step), "{step} missing in:\n{text}");
    }
    let out = agent.dso(&["status"]).await;
    let text = stdout(&out);
    assert!(text.contains(&target) && text.contains("done"), "{text}");
    let out = agent.dso(&["rotate", "nope"]).await;
    assert!(!out.status.success());
    assert!(stderr(&out).contains("nope"), "{}", stderr(&out));
}

#[tokio::test]
async fn without_docker_the_rotation_commands_say_how_to_enable_it() {
    let agent = Agent::start("", &[]).await;
    for args in [&["rotate", "web"][..], &["status"][..]] {
        let out = agent.dso(args).await;
        assert!(!out.status.success(), "{args:?} succeeded without --docker");
        assert!(stderr(&out).contains("--docker"), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn a_bad_label_is_an_error_of_its_service_in_dso_status_and_the_agent_runs_on() {
    let p = Project::start("rolling");
    let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
    docker(&[
        "run",
        "-d",
        "--name",
        &format!("{}-bad-1", p.run),
        "--network",
        &format!("{}_default", p.run),
        "--label",
        &format!("dso.test.run={}", p.run),
        "--label",
        "dso.reloader=true",
        "--label",
        "dso.host_ports=127.0.0.1:0:8080",
        "--label",
        "dso.health.timeout=18446744073709551615s",
        "--label",
        &format!("com.docker.compose.project={}", p.run),
        "--label",
        "com.docker.compose.service=bad",
        &image,
    ]);
    let state = tempfile::tempdir().unwrap();
    let agent = p.agent(state.path()).await;
    let out = agent.dso(&["status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(
        text.contains(&format!("{}/bad", p.run))
            && text.contains("error: container")
            && text.contains("dso.health.timeout")
            && text.contains("maximum"),
        "{text}"
    );
    let out = agent.dso(&["status", "--json"]).await;
    let v: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let services = v.as_array().unwrap();
    let web = services
        .iter()
        .find(|s| s["service"]["service"] == "web")
        .unwrap();
    assert!(web.get("error").is_none(), "{web}");
    assert_eq!(
        web["containers"].as_array().unwrap().len(),
        1,
        "web is managed: {web}"
    );
    // The good service still rotates.
    let out = agent.dso(&["rotate", &format!("{}/web", p.run)]).await;
    assert!(out.status.success(), "{}", stderr(&out));
}
