//! `dso proxy status|swap|pause|resume` against a running agent.

use crate::harness::{Agent, Conn, Echo, docker, dso_with_socket, listener_yaml, poll, stderr, stdout};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_table_and_json_show_the_real_listener() {
    let blue = Echo::start("blue").await;
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let addr = agent.addr("echo").await;
    assert_ne!(addr.port(), 0, "the real bound port is reported");

    let mut c = Conn::open(addr).await;
    assert_eq!(c.greeting().await, "blue");
    c.echo("hello").await;
    // Byte counters are added after each write: wait until they include the echo.
    poll(|| async {
        let l = &agent.status().await["listeners"][0];
        l["bytes_in"] == 5 && l["bytes_out"] == 10
    })
    .await;

    let out = agent.dso(&["proxy", "status"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let table = stdout(&out);
    let header = table.lines().next().unwrap();
    for col in [
        "LISTENER", "BIND", "MODE", "GEN", "BACKENDS", "ACTIVE", "HELD", "DRAINING", "IN", "OUT", "ERRORS",
        "P50", "P99",
    ] {
        assert!(header.contains(col), "missing column {col}: {table}");
    }
    let row = table.lines().nth(1).unwrap();
    assert!(row.starts_with("echo "), "{table}");
    assert!(
        row.contains(&addr.to_string()) && row.contains(&blue.addr.to_string()),
        "{table}"
    );
    assert!(row.contains("forward"), "{table}");
    // One connection forwarding; 5 bytes in, greeting + echo out.
    assert!(row.contains(" 5 B "), "{table}");
    assert!(row.contains(" 10 B "), "{table}");

    let json = agent.status().await;
    let l = &json["listeners"][0];
    assert_eq!(l["name"], "echo");
    assert_eq!(l["generation"], 1);
    assert_eq!(l["active"], 1);
    assert_eq!(l["bytes_in"], 5);
    assert_eq!(l["backends"][0]["addr"], blue.addr.to_string());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_sends_new_connections_to_the_new_backend_and_keeps_old_ones() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let addr = agent.addr("echo").await;
    let mut old = Conn::open(addr).await;
    assert_eq!(old.greeting().await, "blue");

    let target = format!("{}=green-1", green.addr);
    let out = agent.dso(&["proxy", "swap", "echo", &target]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("generation 2 now serves"),
        "{}",
        stdout(&out)
    );

    let mut new = Conn::open(addr).await;
    assert_eq!(new.greeting().await, "green");
    old.echo("still on blue").await;

    let table = stdout(&agent.dso(&["proxy", "status"]).await);
    assert!(
        table.contains(&format!("{} (green-1)", green.addr)),
        "labels shown: {table}"
    );
    let draining = format!("echo: generation 1 ({}) draining: 1 open, closed in ", blue.addr);
    assert!(table.contains(&draining), "draining generation shown: {table}");
    let json = agent.status().await;
    assert_eq!(json["listeners"][0]["generation"], 2);
    assert_eq!(json["listeners"][0]["draining"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swap_wait_reports_drain_time_and_forced_closes() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(
        &listener_yaml("echo", &[blue.addr], "      close_window: 10ms\n"),
        &[],
    )
    .await;
    let addr = agent.addr("echo").await;

    // Nothing open: drains at once, nothing forced.
    let out = agent
        .dso(&["proxy", "swap", "echo", &green.addr.to_string(), "--wait"])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("generation 1 drained in"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("0 connection(s) forced"),
        "{}",
        stdout(&out)
    );

    // One connection that never closes: forced at the 200 ms deadline.
    let mut c = Conn::open(addr).await;
    assert_eq!(c.greeting().await, "green");
    let out = agent
        .dso(&[
            "proxy",
            "swap",
            "echo",
            &blue.addr.to_string(),
            "--drain",
            "200ms",
            "--wait",
        ])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("generation 2 drained in"), "{text}");
    assert!(text.contains("1 connection(s) forced"), "{text}");
    let json = agent.status().await;
    assert_eq!(json["listeners"][0]["forced_closes"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_made_during_a_pause_completes_after_resume() {
    let blue = Echo::start("blue").await;
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let addr = agent.addr("echo").await;

    let out = agent.dso(&["proxy", "pause", "echo", "--max", "1m"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("paused"), "{}", stdout(&out));

    let mut c = Conn::open(addr).await;
    c.send("early").await;
    poll(|| async { agent.status().await["listeners"][0]["held"] == 1 }).await;
    let table = stdout(&agent.dso(&["proxy", "status"]).await);
    assert!(table.contains("hold ("), "{table}");

    let out = agent.dso(&["proxy", "resume", "echo"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("forwarding"), "{}", stdout(&out));
    assert_eq!(c.greeting().await, "blue");
    assert_eq!(c.read(5).await, "early");
    c.echo("after").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_with_addresses_moves_held_connections_to_them() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let addr = agent.addr("echo").await;
    assert!(agent.dso(&["proxy", "pause", "echo"]).await.status.success());
    let mut c = Conn::open(addr).await;
    poll(|| async { agent.status().await["listeners"][0]["held"] == 1 }).await;
    let out = agent
        .dso(&["proxy", "resume", "echo", &green.addr.to_string()])
        .await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("generation 2"), "{}", stdout(&out));
    assert_eq!(c.greeting().await, "green");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_listener_lists_the_existing_ones() {
    let blue = Echo::start("blue").await;
    let listeners = listener_yaml("a", &[blue.addr], "") + &listener_yaml("b", &[blue.addr], "");
    let agent = Agent::start(&listeners, &[]).await;
    for args in [
        vec!["proxy", "swap", "nope", "127.0.0.1:1"],
        vec!["proxy", "pause", "nope"],
        vec!["proxy", "resume", "nope"],
    ] {
        let out = agent.dso(&args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(
            stderr(&out).contains("unknown listener \"nope\"; listeners: a, b"),
            "{args:?}: {}",
            stderr(&out)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_address_says_what_was_expected() {
    let dir = tempfile::tempdir().unwrap();
    let out = dso_with_socket(&dir.path().join("s"), &["proxy", "swap", "pg", "localhost:5432"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("expected IP:PORT"), "{}", stderr(&out));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_not_running_names_the_socket_and_how_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("missing.sock");
    let out = dso_with_socket(&socket, &["proxy", "status"]).await;
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("cannot reach the dso agent at {}", socket.display())),
        "{err}"
    );
    assert!(err.contains("dso agent --config"), "{err}");

    // DSO_SOCKET is honoured the same way.
    let out = tokio::process::Command::new(crate::harness::DSO)
        .args(["proxy", "status"])
        .env("DSO_SOCKET", &socket)
        .output()
        .await
        .unwrap();
    assert!(
        stderr(&out).contains(&socket.display().to_string()),
        "{}",
        stderr(&out)
    );
}

/// Removes every container and the network of a test run on drop.
struct DockerRun(String);

impl Drop for DockerRun {
    fn drop(&mut self) {
        let ids = docker(&["ps", "-aq", "--filter", &format!("label=dso.test.run={}", self.0)]);
        for id in ids.lines() {
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &format!("{}_default", self.0)])
            .output();
    }
}

/// A Compose service's listener is named `project/service:port`. Every `dso proxy` command
/// and the one-listener endpoints must reach it: the client percent-encodes the name as one
/// path segment and the agent decodes it (issue 8 item 1: before, `dso proxy pause
/// shop/web:8080` answered `no endpoint`). Runs against the real engine and agent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_proxy_command_works_on_a_compose_listener_name() {
    let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let run = DockerRun(format!("dsoname{}x{nanos:x}", std::process::id()));
    let label = format!("dso.test.run={}", run.0);
    let network = format!("{}_default", run.0);
    docker(&["network", "create", "--label", &label, &network]);
    docker(&[
        "run",
        "-d",
        "--name",
        &format!("{}-web-1", run.0),
        "--network",
        &network,
        "--label",
        &label,
        "--label",
        "dso.reloader=true",
        "--label",
        "dso.host_ports=127.0.0.1:0:8080",
        "--label",
        &format!("com.docker.compose.project={}", run.0),
        "--label",
        "com.docker.compose.service=web",
        &image,
    ]);
    let state = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(
        "    []\n",
        &[
            "--docker",
            "--docker-scope",
            &label,
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
    )
    .await;
    let name = format!("{}/web:8080", run.0);
    poll(|| async {
        agent.status().await["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == name.as_str())
    })
    .await;
    let addr = agent.addr(&name).await;
    let blue = Echo::start("blue").await;

    let out = agent.dso(&["proxy", "pause", &name, "--max", "1m"]).await;
    assert!(out.status.success(), "pause: {}", stderr(&out));
    let out = agent.dso(&["proxy", "resume", &name]).await;
    assert!(out.status.success(), "resume: {}", stderr(&out));
    let out = agent
        .dso(&[
            "proxy",
            "swap",
            &name,
            &blue.addr.to_string(),
            "--drain",
            "1s",
            "--wait",
        ])
        .await;
    assert!(out.status.success(), "swap --wait: {}", stderr(&out));
    assert!(stdout(&out).contains("drained in"), "{}", stdout(&out));
    let mut c = Conn::open(addr).await;
    assert_eq!(c.greeting().await, "blue");

    // The one-listener endpoints, with the name encoded as one segment.
    let encoded = format!("{}%2Fweb%3A8080", run.0);
    let (code, body) = crate::harness::http(
        &agent.socket,
        "GET",
        &format!("/v1/proxy/listeners/{encoded}"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["name"], name.as_str());
    let gen_path = format!("/v1/proxy/listeners/{encoded}/generations/1/drain?timeout=0s");
    let (code, body) = crate::harness::http(&agent.socket, "GET", &gen_path, "")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    // The raw, unencoded name is not one segment: it is still a clear 404.
    let (code, _) = crate::harness::http(
        &agent.socket,
        "POST",
        &format!("/v1/proxy/listeners/{name}/pause"),
        "",
    )
    .await
    .unwrap();
    assert_eq!(code, 404);

    // Stop the agent before the container goes, so nothing dials a removed container.
    agent.child.kill().await.unwrap();
    drop(c);
}
