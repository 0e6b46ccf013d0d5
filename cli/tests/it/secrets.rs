//! The agent's secret side end to end: a local vault written by `dso secret set`, the
//! agent's watcher told through `POST /v1/secrets/notify`, `/v1/secrets`, `/metrics`, a
//! restart that takes nothing again, and no value anywhere in a trace-level log.

use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use tokio::io::AsyncWriteExt;

use crate::harness::{Agent, http, poll, stderr};

const FIRST: &[u8] = b"first-value-Zq8!";
const SECOND: &[u8] = b"second $value \"quoted\"\nline two of it";

/// Runs `dso ARGS` on the vault in `vault`, with `stdin` as input.
async fn dso_vault(vault: &Path, socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    crate::harness::dso_vault(vault, Some(socket), args, stdin).await
}

fn config(vault: &Path) -> String {
    format!(
        "version: v1.0.0\nmode: local\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n\
agent:\n  watch:\n    polling_interval: 10m\n    debounce: 0s\n\
secrets:\n  - name: app\n    provider: local\n    mappings:\n      DB_PASSWORD: app/db_password\n",
        v = vault.display()
    )
}

/// The version `/v1/secrets` shows for the app secret, once it shows one.
async fn taken_version(socket: &Path) -> Option<(String, u64)> {
    let (code, body) = http(socket, "GET", "/v1/secrets", "").await.ok()?;
    if code != 200 {
        return None;
    }
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    let app = v["secrets"].as_array()?.iter().find(|s| s["name"] == "app")?;
    let version = app["versions"]["app/db_password"].as_str()?.to_string();
    Some((version, app["snapshots"].as_u64()?))
}

/// Polls `/v1/secrets` until the app secret's (version, snapshots) satisfies `ok`.
async fn until(socket: &Path, ok: impl Fn(&(String, u64)) -> bool) -> (String, u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(seen) = taken_version(socket).await
            && ok(&seen)
        {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "the agent did not take the secret in time"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn assert_clean(what: &str, text: &str) {
    crate::harness::assert_no_value(what, text, &[FIRST, SECOND]);
}

#[tokio::test]
async fn a_set_reaches_the_agent_at_once_and_no_value_is_logged_at_trace() {
    let vault = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    let nowhere = vault.path().join("no-agent.sock");
    let out = dso_vault(vault.path(), &nowhere, &["init"], b"").await;
    assert!(out.status.success(), "init: {}", stderr(&out));
    let out = dso_vault(
        vault.path(),
        &nowhere,
        &["secret", "set", "app/db_password"],
        FIRST,
    )
    .await;
    assert!(out.status.success(), "set: {}", stderr(&out));

    let state_arg = state.path().to_str().unwrap().to_string();
    let agent = Agent::start_with(|_| config(vault.path()), &["--state-dir", &state_arg], "trace").await;
    let first = until(&agent.socket, |_| true).await;
    let (v1, n1) = first;
    assert_eq!(n1, 1, "the first value is taken once");

    // The poll interval is 10 minutes: only the notify can make the agent see this soon.
    let started = Instant::now();
    let out = dso_vault(
        vault.path(),
        &agent.socket,
        &["secret", "set", "app/db_password"],
        SECOND,
    )
    .await;
    assert!(out.status.success(), "set: {}", stderr(&out));
    assert!(
        stderr(&out).is_empty(),
        "the notify is silent when it works: {}",
        stderr(&out)
    );
    let second = until(&agent.socket, |(_, n)| *n == 2).await;
    let (v2, _) = second;
    assert_ne!(v1, v2, "a set makes a new version");
    // Recorded, not asserted: the set includes process start and the Argon2-free key load.
    eprintln!("dso secret set to the agent's snapshot: {:?}", started.elapsed());

    let (code, metrics) = http(&agent.socket, "GET", "/metrics", "").await.unwrap();
    assert_eq!(code, 200);
    assert!(
        metrics.contains("dso_secrets_changes_total{provider=\"local\"} 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dso_secrets_provider_up{provider=\"local\"} 1"),
        "{metrics}"
    );
    let (_, api) = http(&agent.socket, "GET", "/v1/secrets", "").await.unwrap();
    assert_clean("GET /v1/secrets", &api);
    assert_clean("GET /metrics", &metrics);

    let log = agent.log();
    assert!(log.contains("secret values taken"), "the log shows the snapshots");
    assert!(
        log.contains("TRACE") || log.contains("DEBUG"),
        "the log is at trace level"
    );
    assert_clean("the agent's trace-level log", &log);
    drop(agent);

    // A restart with nothing changed takes nothing again: the versions taken were
    // persisted (no value) in the state directory.
    let agent = Agent::start_with(|_| config(vault.path()), &["--state-dir", &state_arg], "info").await;
    poll(|| {
        let socket = agent.socket.clone();
        let v2 = v2.clone();
        async move {
            let Ok((200, body)) = http(&socket, "GET", "/v1/secrets", "").await else {
                return false;
            };
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            v["watcher"]["objects"]
                .as_array()
                .is_some_and(|o| o.iter().any(|o| o["current_version"] == serde_json::json!(v2)))
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        taken_version(&agent.socket).await,
        None,
        "nothing is taken again after a restart"
    );
    for entry in walk(state.path()) {
        let bytes = std::fs::read(&entry).unwrap();
        let text = String::from_utf8_lossy(&bytes);
        assert_clean(&format!("state file {}", entry.display()), &text);
    }
}

fn walk(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// The value of the sample `series` (name and labels as written) in a `/metrics` text.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .map(|v| v.trim().parse().unwrap())
}

/// `GET /metrics` through the socket: the text, after checking the status and the type.
async fn scrape(socket: &Path) -> String {
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut resp = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut s, &mut resp)
        .await
        .unwrap();
    let (head, body) = resp.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(
        head.lines()
            .any(|l| l.eq_ignore_ascii_case("content-type: text/plain; version=0.0.4; charset=utf-8")),
        "the Prometheus text format's type: {head}"
    );
    body.to_owned()
}

#[tokio::test]
async fn a_change_moves_the_watchers_poll_fetch_and_change_counters_in_metrics() {
    let vault = tempfile::tempdir().unwrap();
    let nowhere = vault.path().join("no-agent.sock");
    let out = dso_vault(vault.path(), &nowhere, &["init"], b"").await;
    assert!(out.status.success(), "init: {}", stderr(&out));
    let set = |socket: std::path::PathBuf, value: &'static [u8]| {
        let dir = vault.path().to_path_buf();
        async move {
            let out = dso_vault(&dir, &socket, &["secret", "set", "app/db_password"], value).await;
            assert!(out.status.success(), "set: {}", stderr(&out));
        }
    };
    set(nowhere.clone(), FIRST).await;
    let agent = Agent::start_with(|_| config(vault.path()), &[], "info").await;
    until(&agent.socket, |_| true).await;
    let before = scrape(&agent.socket).await;
    let polls = "dso_secrets_provider_calls_total{provider=\"local\",call=\"version\",result=\"ok\"}";
    let fetches = "dso_secrets_provider_calls_total{provider=\"local\",call=\"fetch\",result=\"ok\"}";
    let changes = "dso_secrets_version_changes_total{provider=\"local\"}";
    let last = "dso_secrets_last_success_timestamp_seconds{provider=\"local\"}";
    assert_eq!(sample(&before, fetches), Some(1.0), "{before}");
    assert_eq!(
        sample(&before, changes),
        Some(0.0),
        "the first version is no change: {before}"
    );
    let polls_before = sample(&before, polls).unwrap();
    assert!(polls_before >= 1.0, "{before}");
    let last_before = sample(&before, last).unwrap();

    // The interval is 10 minutes: the set's notify makes the watcher poll now.
    tokio::time::sleep(Duration::from_millis(20)).await;
    set(agent.socket.clone(), SECOND).await;
    until(&agent.socket, |(_, n)| *n == 2).await;
    let after = scrape(&agent.socket).await;
    assert_eq!(
        sample(&after, polls),
        Some(polls_before + 1.0),
        "one poll saw it: {after}"
    );
    assert_eq!(
        sample(&after, fetches),
        Some(2.0),
        "one fetch per change: {after}"
    );
    assert_eq!(sample(&after, changes), Some(1.0), "{after}");
    assert_eq!(
        sample(&after, "dso_secrets_changes_total{provider=\"local\"}"),
        Some(2.0),
        "{after}"
    );
    assert!(sample(&after, last).unwrap() > last_before, "{after}");
    assert_eq!(
        sample(
            &after,
            "dso_secrets_provider_calls_total{provider=\"local\",call=\"version\",result=\"error\"}"
        ),
        Some(0.0),
        "{after}"
    );
    assert!(!after.contains("dso_secrets_provider_errors_total{"), "{after}");
    assert_clean("GET /metrics", &after);
}
