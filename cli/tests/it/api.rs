//! The control API over raw HTTP, the way `curl --unix-socket` uses it.

use crate::harness::{Agent, Conn, Echo, http, listener_yaml, poll};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_answer_json_and_errors_name_the_field() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let s = &agent.socket;

    let (code, body) = http(s, "GET", "/v1/health", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"status\": \"ok\""), "{body}");

    let (code, body) = http(s, "GET", "/v1/proxy/listeners/echo", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"name\": \"echo\""), "{body}");

    let (code, body) = http(s, "GET", "/v1/proxy/listeners/nope", "").await.unwrap();
    assert_eq!(code, 404);
    assert!(
        body.contains("unknown listener \\\"nope\\\"; listeners: echo"),
        "{body}"
    );

    let (code, body) = http(
        s,
        "POST",
        "/v1/proxy/listeners/echo/swap",
        r#"{"backends":["nowhere"]}"#,
    )
    .await
    .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("backends: invalid backend"), "{body}");
    let (code, body) = http(s, "POST", "/v1/proxy/listeners/echo/swap", r#"{"backends":[]}"#)
        .await
        .unwrap();
    assert_eq!(code, 400, "{body}");
    let (code, body) = http(s, "POST", "/v1/proxy/listeners/echo/swap", r#"{}"#)
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("backends: missing"), "{body}");
    let (code, body) = http(
        s,
        "POST",
        "/v1/proxy/listeners/echo/swap",
        r#"{"backends":["127.0.0.1:1"],"drain":"soon"}"#,
    )
    .await
    .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("drain: invalid duration"), "{body}");
    let (code, body) = http(s, "POST", "/v1/proxy/listeners/echo/pause", r#"{"maximum":"1s"}"#)
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("unknown field \\\"maximum\\\""), "{body}");
    let (code, body) = http(s, "POST", "/v1/proxy/listeners/echo/swap", "{not json")
        .await
        .unwrap();
    assert_eq!(code, 400);
    assert!(body.contains("invalid body"), "{body}");
    let (code, _) = http(s, "GET", "/v1/nothing", "").await.unwrap();
    assert_eq!(code, 404);

    // A labelled swap with wait, then the drain endpoint of the replaced generation.
    let swap = format!(
        r#"{{"backends":[{{"addr":"{}","label":"green"}}],"drain":"1s","wait":true}}"#,
        green.addr
    );
    let (code, body) = http(s, "POST", "/v1/proxy/listeners/echo/swap", &swap)
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["generation"], 2);
    assert_eq!(v["drain"]["state"], "drained");
    assert_eq!(v["drain"]["forced"], 0);
    let (code, body) = http(
        s,
        "GET",
        "/v1/proxy/listeners/echo/generations/1/drain?timeout=1s",
        "",
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"state\": \"drained\""), "{body}");
    let (code, body) = http(
        s,
        "GET",
        "/v1/proxy/listeners/echo/generations/2/drain?timeout=0s",
        "",
    )
    .await
    .unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("\"state\": \"current\""), "{body}");
    let (code, body) = http(s, "GET", "/v1/proxy/listeners/echo/generations/99/drain", "")
        .await
        .unwrap();
    assert_eq!(code, 404, "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_come_from_the_real_counters() {
    let blue = Echo::start("blue").await;
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let mut c = Conn::open(agent.addr("echo").await).await;
    assert_eq!(c.greeting().await, "blue");
    c.echo("12345678").await;

    // Byte counters are added after each write: wait until they include the echo.
    let needle = "dso_proxy_bytes_total{listener=\"echo\",direction=\"out\"} 13";
    poll(|| async {
        let (_, text) = http(&agent.socket, "GET", "/metrics", "").await.unwrap();
        text.lines().any(|l| l == needle)
    })
    .await;
    let (code, text) = http(&agent.socket, "GET", "/metrics", "").await.unwrap();
    assert_eq!(code, 200);
    for line in [
        "dso_proxy_connections_accepted_total{listener=\"echo\"} 1",
        "dso_proxy_connections_active{listener=\"echo\"} 1",
        "dso_proxy_bytes_total{listener=\"echo\",direction=\"in\"} 8",
        "dso_proxy_bytes_total{listener=\"echo\",direction=\"out\"} 13",
        "dso_proxy_dial_errors_total{listener=\"echo\"} 0",
        "dso_proxy_generation{listener=\"echo\"} 1",
        "dso_proxy_connect_seconds_count{listener=\"echo\"} 1",
        &format!(
            "dso_proxy_backend_connections_active{{listener=\"echo\",backend=\"{}\",label=\"\"}} 1",
            blue.addr
        ),
    ] {
        assert!(text.lines().any(|l| l == line), "missing {line:?} in\n{text}");
    }
    assert!(
        text.contains("dso_proxy_connect_seconds{listener=\"echo\",quantile=\"0.99\"}"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_socket_file_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let stale = dir.path().join("run/dso.sock");
    std::fs::create_dir_all(stale.parent().unwrap()).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(stale.exists(), "a socket file nobody answers on");
    let blue = Echo::start("blue").await;
    // Agent::start uses <tempdir>/run/dso.sock too; run one by hand on the stale path.
    let cfg = dir.path().join("dso.yaml");
    std::fs::write(
        &cfg,
        format!(
            "proxy:\n  listeners:\n{}",
            listener_yaml("echo", &[blue.addr], "")
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(crate::harness::DSO)
        .arg("agent")
        .arg("--no-docker")
        .arg("--config")
        .arg(&cfg)
        .arg("--socket")
        .arg(&stale)
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    crate::harness::poll(|| async { http(&stale, "GET", "/v1/health", "").await.is_ok() }).await;
    child.kill().await.unwrap();
}

/// Issue 9 items 11 and 16: a drain beyond the proxy's longest wait is refused before
/// anything is applied (it used to panic after the swap, with an empty reply); a pause
/// beyond the cap reports the figure in force; more backends than a route takes is a 400.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_range_values_are_refused_before_anything_changes() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let out = agent
        .dso(&[
            "proxy",
            "swap",
            "echo",
            &green.addr.to_string(),
            "--drain",
            "18446744073709551615s",
            "--wait",
        ])
        .await;
    // The CLI refuses it while parsing its flags (durations are capped at 365 days).
    assert_eq!(out.status.code(), Some(2), "{}", crate::harness::stderr(&out));
    assert!(
        crate::harness::stderr(&out).contains("--drain") && crate::harness::stderr(&out).contains("365d"),
        "{}",
        crate::harness::stderr(&out)
    );
    // The API refuses the same value sent raw, naming the field, before anything changes.
    let (code, body) = http(
        &agent.socket,
        "POST",
        "/v1/proxy/listeners/echo/swap",
        &format!(
            r#"{{"backends":["{}"],"drain":"18446744073709551615s","wait":true}}"#,
            green.addr
        ),
    )
    .await
    .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("drain"), "{body}");
    assert_eq!(
        agent.status().await["listeners"][0]["generation"],
        1,
        "nothing applied"
    );

    let out = agent.dso(&["proxy", "pause", "echo", "--max", "1000d"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", crate::harness::stderr(&out));
    let out = agent.dso(&["proxy", "pause", "echo", "--max", "365d"]).await;
    assert!(out.status.success(), "{}", crate::harness::stderr(&out));
    assert!(
        crate::harness::stdout(&out).contains("525600m00s"),
        "{}",
        crate::harness::stdout(&out)
    );
    assert!(agent.dso(&["proxy", "resume", "echo"]).await.status.success());

    let many: Vec<String> = (0..=dso_proxy::MAX_BACKENDS)
        .map(|i| format!("\"10.9.{}.{}:80\"", i / 250, i % 250 + 1))
        .collect();
    let (code, body) = http(
        &agent.socket,
        "POST",
        "/v1/proxy/listeners/echo/swap",
        &format!(r#"{{"backends":[{}]}}"#, many.join(",")),
    )
    .await
    .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("at most 1024"), "{body}");
    let (code, body) = http(
        &agent.socket,
        "POST",
        "/v1/proxy/listeners/echo/swap",
        r#"{"backends":["0.0.0.0:0"]}"#,
    )
    .await
    .unwrap();
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("port 0"), "{body}");
}

/// Issue 9 item 8: a swap at the backend bound on one listener while another listener's
/// connections and `/v1/health` are served: every one of them completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_swap_does_not_hold_up_other_listeners_or_health() {
    let blue = Echo::start("blue").await;
    let listeners = listener_yaml("big", &[blue.addr], "") + &listener_yaml("other", &[blue.addr], "");
    let agent = Agent::start(&listeners, &[]).await;
    let other = agent.addr("other").await;
    let many: Vec<String> = (0..dso_proxy::MAX_BACKENDS)
        .map(|i| format!("\"10.9.{}.{}:80\"", i / 250, i % 250 + 1))
        .collect();
    let body = format!(r#"{{"backends":[{}]}}"#, many.join(","));
    let socket = agent.socket.clone();
    let swaps = tokio::spawn(async move {
        for _ in 0..5 {
            let (code, body) = http(&socket, "POST", "/v1/proxy/listeners/big/swap", &body)
                .await
                .unwrap();
            assert_eq!(code, 200, "{body}");
        }
    });
    for _ in 0..20 {
        let (code, _) = http(&agent.socket, "GET", "/v1/health", "").await.unwrap();
        assert_eq!(code, 200);
        let mut c = Conn::open(other).await;
        assert_eq!(c.greeting().await, "blue");
    }
    swaps.await.unwrap();
    assert_eq!(agent.status().await["listeners"][0]["generation"], 6);
}

/// Issue 9 item 13: idle and trickling control connections past the connection cap do not
/// lock out the API (the quietest is closed to make room) nor the data path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_trickling_control_connections_do_not_lock_out_the_api() {
    use tokio::io::AsyncWriteExt;
    let blue = Echo::start("blue").await;
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let addr = agent.addr("echo").await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        idle.push(tokio::net::UnixStream::connect(&agent.socket).await.unwrap());
    }
    let mut trickling = Vec::new();
    for _ in 0..20 {
        let mut s = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
        s.write_all(b"GET /v1/hea").await.unwrap();
        trickling.push(s);
    }
    for s in &mut trickling {
        let _ = s.write_all(b"l").await;
    }
    for _ in 0..5 {
        let (code, body) = tokio::time::timeout(
            std::time::Duration::from_secs(10),
            http(&agent.socket, "GET", "/v1/health", ""),
        )
        .await
        .expect("the API answers past the connection cap")
        .unwrap();
        assert_eq!(code, 200, "{body}");
        let mut c = Conn::open(addr).await;
        assert_eq!(c.greeting().await, "blue");
    }
}

/// Issue 9 items 3 and 16: during the shutdown drain, swap, pause and resume answer 409 as
/// docs/api.md says (they answered 200).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn route_changes_answer_409_during_the_shutdown_drain() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(
        &listener_yaml("echo", &[blue.addr], ""),
        &["--shutdown-timeout", "30s"],
    )
    .await;
    let mut c = Conn::open(agent.addr("echo").await).await;
    assert_eq!(c.greeting().await, "blue");
    agent.signal("TERM");
    poll(|| async { agent.log().contains("shutting down gracefully") }).await;
    let swap = format!(r#"{{"backends":["{}"]}}"#, green.addr);
    for (path, body) in [
        ("/v1/proxy/listeners/echo/swap", swap.as_str()),
        ("/v1/proxy/listeners/echo/pause", ""),
        ("/v1/proxy/listeners/echo/resume", ""),
    ] {
        let (code, body) = http(&agent.socket, "POST", path, body).await.unwrap();
        assert_eq!(code, 409, "{path}: {body}");
        assert!(body.contains("shutting down"), "{body}");
    }
    c.echo("still served").await;
}
