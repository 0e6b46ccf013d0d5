//! The HTTP listener (`agent.http`) over real TCP: only `/health`, `/metrics`, `/v1/events`
//! and `/v1/webhook` there; `POST /v1/webhook` authenticated with HMAC-SHA256 and a replay
//! window, triggering a real poll of the local vault only when the call is good.

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::harness::{Agent, DSO, http, stderr};

const KEY: &str = "webhook-test-key-9f3";

/// One HTTP/1.1 request over TCP: `(status, body)`.
async fn tcp(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_string(&mut resp))
        .await
        .expect("answer in time")
        .unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// The HTTP listener's address, as `/health` on the control socket reports it.
async fn http_addr(agent: &Agent) -> SocketAddr {
    let (_, body) = http(&agent.socket, "GET", "/health", "").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["http"]
        .as_str()
        .unwrap_or_else(|| panic!("no http in {v}"))
        .parse()
        .unwrap()
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// `X-DSO-Timestamp` and `X-DSO-Signature` for `body` at `ts` under `key`.
fn signed(key: &str, ts: u64, body: &str) -> Vec<(&'static str, String)> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key.as_bytes()).unwrap();
    mac.update(format!("{ts}.{body}").as_bytes());
    let hex: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    vec![
        ("X-DSO-Timestamp", ts.to_string()),
        ("X-DSO-Signature", format!("sha256={hex}")),
    ]
}

#[tokio::test]
async fn the_http_listener_serves_health_and_metrics_and_nothing_else() {
    let agent = Agent::start_with(
        |_| "agent:\n  http:\n    listen: 127.0.0.1:0\nproxy:\n  listeners: []\n".to_owned(),
        &[],
        "info",
    )
    .await;
    let addr = http_addr(&agent).await;
    let (code, body) = tcp(addr, "GET", "/health", &[], "").await;
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["live"], true);
    assert_eq!(v["ready"], true, "{v}");
    assert_eq!(v["reasons"], serde_json::json!([]));
    let (code, body) = tcp(addr, "GET", "/metrics", &[], "").await;
    assert_eq!(code, 200);
    assert!(
        body.contains("# TYPE dso_proxy_connections_accepted_total counter"),
        "{body}"
    );
    for path in [
        "/v1/services",
        "/v1/proxy",
        "/v1/health",
        "/v1/vault/secrets",
        "/v1/secrets",
        "/",
    ] {
        let (code, body) = tcp(addr, "GET", path, &[], "").await;
        assert_eq!(code, 404, "{path}: {body}");
        assert!(body.contains("on the Unix socket"), "{path}: {body}");
    }
    let (code, _) = tcp(addr, "POST", "/v1/proxy/listeners/x/swap", &[], "{}").await;
    assert_eq!(code, 404);
    // No key configured: the webhook is off.
    let (code, body) = tcp(addr, "POST", "/v1/webhook", &signed(KEY, now(), "{}"), "{}").await;
    assert_eq!(code, 404, "{body}");
    assert!(body.contains("agent.http.webhook.secret_file"), "{body}");
    // The socket still has everything.
    let (code, _) = http(&agent.socket, "GET", "/v1/proxy", "").await.unwrap();
    assert_eq!(code, 200);
    let (code, body) = http(&agent.socket, "GET", "/health", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
}

#[tokio::test]
async fn a_body_over_the_limit_is_413_on_the_socket() {
    let agent = Agent::start_with(|_| "agent:\n  http:\n    listen: off\n".to_owned(), &[], "info").await;
    let big = " ".repeat(1024 * 1024 + 1);
    let (code, body) = http(&agent.socket, "POST", "/v1/secrets/notify", &big)
        .await
        .unwrap();
    assert_eq!(code, 413, "{body}");
    assert!(body.contains("larger than 1048576 bytes"), "{body}");
    // `listen: off`: no address, and still ready.
    let (code, body) = http(&agent.socket, "GET", "/health", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    assert!(!body.contains("\"http\""), "{body}");
}

#[tokio::test]
async fn a_taken_configured_address_stops_the_agent_naming_the_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dso.yaml");
    std::fs::write(&config, format!("agent:\n  http:\n    listen: {addr}\n")).unwrap();
    let out = run_agent(dir.path(), &config).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("agent.http.listen") && err.contains(&addr.to_string()),
        "{err}"
    );
}

#[tokio::test]
async fn a_key_file_others_can_read_stops_the_agent_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("webhook.key");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("dso.yaml");
    std::fs::write(
        &config,
        format!(
            "agent:\n  http:\n    listen: off\n    webhook:\n      secret_file: {}\n",
            key.display()
        ),
    )
    .unwrap();
    let out = run_agent(dir.path(), &config).await;
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("agent.http.webhook.secret_file") && err.contains("0644"),
        "{err}"
    );
    assert!(!err.contains(KEY), "the key is in the error: {err}");
}

async fn run_agent(dir: &Path, config: &Path) -> Output {
    let child = Command::new(DSO)
        .arg("agent")
        .arg("--no-docker")
        .arg("--config")
        .arg(config)
        .arg("--socket")
        .arg(dir.join("dso.sock"))
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    tokio::time::timeout(Duration::from_secs(20), child.wait_with_output())
        .await
        .expect("the agent stops at once")
        .unwrap()
}

/// Runs `dso ARGS` on the vault in `vault` with `stdin`, telling no agent (the socket
/// path has none), so only the webhook can make the agent look.
async fn vault_cmd(vault: &Path, args: &[&str], stdin: &[u8]) {
    let out = crate::harness::dso_vault(vault, Some(&vault.join("no-agent.sock")), args, stdin).await;
    assert!(out.status.success(), "{args:?}: {}", stderr(&out));
}

/// The version the agent took of secret `app`, once it took one.
async fn taken(socket: &Path) -> Option<String> {
    let (code, body) = http(socket, "GET", "/v1/secrets", "").await.ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let app = v["secrets"].as_array()?.iter().find(|s| s["name"] == "app")?;
    Some(app["versions"]["app/db_password"].as_str()?.to_owned())
}

async fn until_taken(socket: &Path, not: Option<&str>) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(v) = taken(socket).await
            && Some(v.as_str()) != not
        {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not take a new version in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn the_webhook_triggers_a_poll_only_when_signed_fresh_and_new() {
    let vault = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    vault_cmd(vault.path(), &["init"], b"").await;
    vault_cmd(vault.path(), &["secret", "set", "app/db_password"], b"first-Zq8").await;
    let key = vault.path().join("webhook.key");
    std::fs::write(&key, format!("{KEY}\n")).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let v = vault.path().display().to_string();
    let k = key.display().to_string();
    let state_arg = state.path().to_str().unwrap().to_owned();
    let agent = Agent::start_with(
        move |_| {
            format!(
                "providers:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n\
agent:\n  watch:\n    polling_interval: 10m\n    debounce: 0s\n  http:\n    listen: 127.0.0.1:0\n    webhook:\n      secret_file: {k}\n      tolerance: 2m\n\
secrets:\n  - name: app\n    provider: local\n    mappings:\n      DB_PASSWORD: app/db_password\n"
            )
        },
        &["--state-dir", &state_arg],
        "info",
    )
    .await;
    let addr = http_addr(&agent).await;
    let v1 = until_taken(&agent.socket, None).await;
    // Changed behind the agent's back; its poll interval is 10 minutes.
    vault_cmd(vault.path(), &["secret", "set", "app/db_password"], b"second-Zq8").await;

    let body = r#"{"secret":"app"}"#;
    let ts = now();
    let good = signed(KEY, ts, body);
    let mut refused: Vec<(&str, Vec<(&str, String)>)> = vec![
        ("wrong key", signed("another-key", ts, body)),
        ("stale timestamp", signed(KEY, ts - 150, body)),
        ("future timestamp", signed(KEY, ts + 150, body)),
        ("missing signature", vec![good[0].clone()]),
        ("missing timestamp", vec![good[1].clone()]),
        (
            "bad signature",
            vec![
                good[0].clone(),
                ("X-DSO-Signature", format!("sha256={}", "0".repeat(64))),
            ],
        ),
        (
            "not hex",
            vec![good[0].clone(), ("X-DSO-Signature", "sha256=xyz".to_owned())],
        ),
    ];
    // The good signature over another body.
    refused.push(("body changed", good.clone()));
    for (what, headers) in &refused {
        let b = if *what == "body changed" { "{}" } else { body };
        let (code, text) = tcp(addr, "POST", "/v1/webhook", headers, b).await;
        assert_eq!(code, 401, "{what}: {text}");
        assert!(text.contains("webhook refused"), "{what}: {text}");
        assert!(!text.contains(KEY), "{what}: the key in the answer");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        taken(&agent.socket).await.as_deref(),
        Some(v1.as_str()),
        "a refused call triggered a poll"
    );

    let (code, text) = tcp(addr, "POST", "/v1/webhook", &good, body).await;
    assert_eq!(code, 202, "{text}");
    let answer: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["polled"], serde_json::json!(["local"]));
    let started = Instant::now();
    let v2 = until_taken(&agent.socket, Some(&v1)).await;
    assert!(started.elapsed() < Duration::from_secs(10));

    // The same request again: a replay, refused, nothing looked at.
    vault_cmd(vault.path(), &["secret", "set", "app/db_password"], b"third-Zq8").await;
    let (code, text) = tcp(addr, "POST", "/v1/webhook", &good, body).await;
    assert_eq!(code, 401, "{text}");
    assert!(text.contains("replay"), "{text}");
    // An unknown secret, signed: 404 after authentication.
    let nope = r#"{"secret":"nope"}"#;
    let (code, text) = tcp(addr, "POST", "/v1/webhook", &signed(KEY, now(), nope), nope).await;
    assert_eq!(code, 404, "{text}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        taken(&agent.socket).await.as_deref(),
        Some(v2.as_str()),
        "the replay triggered a poll"
    );

    // `{}` is every secret, on the socket too.
    let (code, text) = http_signed(&agent, &signed(KEY, now(), "{}")).await;
    assert_eq!(code, 202, "{text}");
    until_taken(&agent.socket, Some(&v2)).await;
    let log = agent.log();
    assert!(!log.contains(KEY), "the key is in the log");
    assert!(log.contains("webhook call refused"), "{log}");
}

/// `POST /v1/webhook` with body `{}` on the control socket.
async fn http_signed(agent: &Agent, headers: &[(&str, String)]) -> (u16, String) {
    let mut s = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    let mut req =
        "POST /v1/webhook HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-length: 2\r\n"
            .to_owned();
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n{}");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).await.unwrap();
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (
        status,
        resp.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default(),
    )
}

/// `/health` (on the socket) as `(status, answer)`.
async fn health(agent: &Agent) -> (u16, serde_json::Value) {
    let (code, body) = http(&agent.socket, "GET", "/health", "").await.unwrap();
    (code, serde_json::from_str(&body).unwrap())
}

#[tokio::test]
async fn health_is_503_with_the_reason_while_a_provider_is_down() {
    // A Vault nobody answers for (port 1 on loopback refuses).
    let agent = Agent::start_with(
        |_| {
            "providers:\n  vault:\n    type: vault\n    address: http://127.0.0.1:1\n    auth:\n      method: token\n      params:\n        token: t-not-used\n\
agent:\n  watch:\n    polling_interval: 1s\n  http:\n    listen: 127.0.0.1:0\n\
secrets:\n  - name: app\n    provider: vault\n    mappings:\n      DB_PASSWORD: secret/data/app#password\n"
                .to_owned()
        },
        &[],
        "info",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(20);
    let (code, v) = loop {
        let (code, v) = health(&agent).await;
        if code == 503 || Instant::now() > deadline {
            break (code, v);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 503, "{v}");
    assert_eq!(v["live"], true);
    assert_eq!(v["ready"], false);
    let reasons = v["reasons"].to_string();
    assert!(reasons.contains("secrets: provider vault down"), "{reasons}");
    // The same on the HTTP listener.
    let (code, body) = tcp(http_addr(&agent).await, "GET", "/health", &[], "").await;
    assert_eq!(code, 503, "{body}");
}

#[tokio::test]
async fn health_is_ready_once_the_docker_side_has_scanned() {
    if std::env::var_os("DSO_DOCKER_REQUIRED").is_none() && !Path::new("/var/run/docker.sock").exists() {
        eprintln!("skipped: no Docker engine");
        return;
    }
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap().to_owned();
    let scope = format!("dso.test.run=health{}", std::process::id());
    let agent = Agent::start_with(
        |_| "agent:\n  http:\n    listen: 127.0.0.1:0\n".to_owned(),
        &["--docker", "--docker-scope", &scope, "--state-dir", &state_arg],
        "info",
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, v) = health(&agent).await;
        if code == 200 {
            assert_eq!(v["ready"], true, "{v}");
            break;
        }
        let reasons = v["reasons"].to_string();
        assert!(reasons.contains("docker:"), "not ready for another reason: {v}");
        assert!(Instant::now() < deadline, "not ready in time: {v}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn bad_agent_http_keys_are_named_with_their_line() {
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("dso.yaml");
    for (yaml, key, what) in [
        (
            "agent:\n  http:\n    listen: localhost\n",
            "agent.http.listen",
            "is not IP:PORT",
        ),
        (
            "agent:\n  http:\n    webhook:\n      secret_file: key.txt\n",
            "agent.http.webhook.secret_file",
            "absolute path",
        ),
        (
            "agent:\n  http:\n    webhook:\n      tolerance: 2h\n",
            "agent.http.webhook.tolerance",
            "expected 1s to 1h",
        ),
    ] {
        std::fs::write(&f, yaml).unwrap();
        let out = crate::harness::dso(&["config", "validate", f.to_str().unwrap()]).await;
        assert_eq!(out.status.code(), Some(2), "{yaml}");
        let err = stderr(&out);
        assert!(
            err.contains(key) && err.contains(what) && err.contains("line"),
            "{err}"
        );
    }
    for ok in [
        "agent:\n  http:\n    listen: off\n",
        "agent:\n  http:\n    listen: false\n",
        "agent:\n  http:\n    listen: '[::1]:8471'\n",
    ] {
        std::fs::write(&f, ok).unwrap();
        let out = crate::harness::dso(&["config", "validate", f.to_str().unwrap()]).await;
        assert!(out.status.success(), "{ok}: {}", stderr(&out));
    }
}
