//! `dso proxy status|swap|pause|resume` against a running agent.

use crate::harness::{Agent, Conn, Echo, dso_with_socket, listener_yaml, poll, stderr, stdout};

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
