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
