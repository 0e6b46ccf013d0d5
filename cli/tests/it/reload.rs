//! Live config reload end to end: a real agent, its config file rewritten, then
//! `dso config reload` or SIGHUP; real echo backends and client connections on loopback.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;

use crate::events::Watch;
use crate::harness::{Agent, Conn, Echo, http, poll, stderr, stdout};

/// One listener entry on `listen`.
fn entry(name: &str, listen: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    format!(
        "    - name: {name}\n      listen: {listen}\n      backends: [{}]\n{extra}",
        list.join(", ")
    )
}

fn file(listeners: &[String]) -> String {
    format!("proxy:\n  listeners:\n{}", listeners.concat())
}

fn config_path(agent: &Agent) -> PathBuf {
    agent.dir.path().join("dso.yaml")
}

/// Rewrites the agent's config file.
fn rewrite(agent: &Agent, text: &str) {
    std::fs::write(config_path(agent), text).unwrap();
}

/// The snapshot of listener `name`, if the agent has it.
async fn listener(agent: &Agent, name: &str) -> Option<serde_json::Value> {
    let s = agent.status().await;
    s["listeners"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["name"] == name)
        .cloned()
}

/// `dso_config_reloads_total{result="RESULT"}` as `/metrics` shows it.
async fn reloads(agent: &Agent, result: &str) -> u64 {
    let (_, text) = http(&agent.socket, "GET", "/metrics", "").await.unwrap();
    let needle = format!("dso_config_reloads_total{{result=\"{result}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&needle))
        .unwrap_or_else(|| panic!("no {needle} in /metrics:\n{text}"))
        .parse()
        .unwrap()
}

/// Whether a connection to `addr` is refused now.
async fn refused(addr: SocketAddr) -> bool {
    matches!(TcpStream::connect(addr).await, Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_adds_removes_and_moves_listeners_and_an_untouched_one_never_notices() {
    let (e1, e2, e3, e4) = (
        Echo::start("keep").await,
        Echo::start("gone").await,
        Echo::start("new").await,
        Echo::start("mover").await,
    );
    let keep = entry("keep", "127.0.0.1:0", &[e1.addr], "");
    let agent = Agent::start(
        &[
            keep.clone(),
            entry("gone", "127.0.0.1:0", &[e2.addr], ""),
            entry("mover", "127.0.0.1:0", &[e4.addr], ""),
        ]
        .concat(),
        &[],
    )
    .await;
    let mut events = Watch::start(&agent.socket, &["--json"]).await;
    let (keep_addr, gone_addr, mover_addr) = (
        agent.addr("keep").await,
        agent.addr("gone").await,
        agent.addr("mover").await,
    );
    let mut through_keep = Conn::open(keep_addr).await;
    assert_eq!(through_keep.greeting().await, "keep");
    through_keep.echo("before").await;
    let mut through_gone = Conn::open(gone_addr).await;
    assert_eq!(through_gone.greeting().await, "gone");
    let keep_before = listener(&agent, "keep").await.unwrap();

    rewrite(
        &agent,
        &file(&[
            keep,
            entry("new", "127.0.0.1:0", &[e3.addr], ""),
            entry("mover", "127.0.0.2:0", &[e4.addr], ""),
        ]),
    );
    let out = agent.dso(&["config", "reload"]).await;
    assert!(out.status.success(), "reload failed: {}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("added    new on 127.0.0.1:"), "{text}");
    assert!(text.contains("removed  gone (generation 1 drains)"), "{text}");
    assert!(text.contains("moved    mover from 127.0.0.1:"), "{text}");
    assert!(text.contains("unchanged keep"), "{text}");

    // The removed listener: its open connection keeps flowing, new connections are refused.
    through_gone.echo("still flowing").await;
    poll(|| refused(gone_addr)).await;
    through_gone.echo("after the socket closed").await;
    assert!(listener(&agent, "gone").await.is_none());
    // The added one serves.
    let mut c = Conn::open(agent.addr("new").await).await;
    assert_eq!(c.greeting().await, "new");
    // The moved one serves on its new address; the old address is closed.
    let moved: SocketAddr = agent.addr("mover").await;
    assert_eq!(moved.ip().to_string(), "127.0.0.2");
    let mut c = Conn::open(moved).await;
    assert_eq!(c.greeting().await, "mover");
    poll(|| refused(mover_addr)).await;

    // The untouched listener: same socket, same generation, counters carried on, and its
    // open connection still flows.
    through_keep.echo("after").await;
    let keep_after = listener(&agent, "keep").await.unwrap();
    assert_eq!(keep_after["bind"], keep_before["bind"]);
    assert_eq!(keep_after["generation"], 1);
    assert_eq!(keep_after["accepted"], keep_before["accepted"]);
    assert_eq!(keep_after["active"], 1);
    let mut again = Conn::open(keep_addr).await;
    assert_eq!(again.greeting().await, "keep");
    assert_eq!(
        listener(&agent, "keep").await.unwrap()["accepted"],
        keep_before["accepted"].as_u64().unwrap() + 1
    );

    let seen = events
        .until(Duration::from_secs(10), |v| v["kind"] == "config.reloaded")
        .await;
    let ev = &seen.last().unwrap()["data"];
    assert_eq!(ev["trigger"], "api");
    assert_eq!(ev["added"][0]["name"], "new");
    assert_eq!(ev["removed"][0]["name"], "gone");
    assert_eq!(reloads(&agent, "ok").await, 1);
    assert!(agent.log().contains("config reloaded"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_swaps_changed_backends_and_new_settings_apply_to_new_connections_only() {
    let (blue, green) = (Echo::start("blue").await, Echo::start("green").await);
    let agent = Agent::start(&entry("app", "127.0.0.1:0", &[blue.addr], ""), &[]).await;
    let addr = agent.addr("app").await;
    let mut old = Conn::open(addr).await;
    assert_eq!(old.greeting().await, "blue");

    rewrite(
        &agent,
        &file(&[entry(
            "app",
            "127.0.0.1:0",
            &[green.addr],
            "      idle_timeout: 300ms\n",
        )]),
    );
    agent.signal("HUP");
    poll(|| async {
        listener(&agent, "app").await.unwrap()["generation"] == 2 || agent.log().contains("reload failed")
    })
    .await;
    assert!(!agent.log().contains("reload failed"), "{}", agent.log());
    let l = listener(&agent, "app").await.unwrap();
    assert_eq!(l["bind"], addr.to_string(), "same socket");

    // The new connection goes to the new backend and has the new idle timeout.
    let mut new = TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 6];
    tokio::time::timeout(Duration::from_secs(5), new.read_exact(&mut greeting))
        .await
        .expect("greeting in time")
        .unwrap();
    assert_eq!(&greeting, b"green\n");
    tokio::time::sleep(Duration::from_millis(800)).await;
    // The old connection stays on the old backend and was accepted before the idle
    // timeout existed: it is still open after more than 300 ms idle.
    old.echo("still on blue").await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), new.read(&mut buf))
        .await
        .expect("the idle connection is closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0, "the new connection was closed for idling");
    poll(|| async { listener(&agent, "app").await.unwrap()["idle_timeouts"] == 1 }).await;
    assert_eq!(reloads(&agent, "ok").await, 1);
    assert!(agent.log().contains("SIGHUP: reloading the config file"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raised_connection_limit_lets_a_waiting_connection_in() {
    let e = Echo::start("e").await;
    let agent = Agent::start(
        &entry("lim", "127.0.0.1:0", &[e.addr], "      max_connections: 1\n"),
        &[],
    )
    .await;
    let addr = agent.addr("lim").await;
    let mut first = Conn::open(addr).await;
    assert_eq!(first.greeting().await, "e");
    // The second waits in the accept queue: no greeting.
    let mut second = TcpStream::connect(addr).await.unwrap();
    let mut buf = [0u8; 2];
    assert!(
        tokio::time::timeout(Duration::from_millis(500), second.read_exact(&mut buf))
            .await
            .is_err(),
        "the limit of 1 let a second connection through"
    );
    rewrite(
        &agent,
        &file(&[entry(
            "lim",
            "127.0.0.1:0",
            &[e.addr],
            "      max_connections: 2\n",
        )]),
    );
    let out = agent.dso(&["config", "reload"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("updated  lim (max_connections) for new connections"),
        "{}",
        stdout(&out)
    );
    tokio::time::timeout(Duration::from_secs(5), second.read_exact(&mut buf))
        .await
        .expect("the waiting connection is served after the limit was raised")
        .unwrap();
    assert_eq!(&buf, b"e\n");
    first.echo("first still served").await;
    assert_eq!(listener(&agent, "lim").await.unwrap()["generation"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_file_changes_nothing_and_names_the_key_and_line() {
    let e = Echo::start("e").await;
    let good = file(&[entry("app", "127.0.0.1:0", &[e.addr], "")]);
    let agent = Agent::start(&entry("app", "127.0.0.1:0", &[e.addr], ""), &[]).await;
    let addr = agent.addr("app").await;
    let mut open = Conn::open(addr).await;
    assert_eq!(open.greeting().await, "e");
    let other = Echo::start("other").await;

    // An unknown key on line 5, next to a backend change that must not be applied.
    rewrite(
        &agent,
        &file(&[entry(
            "app",
            "127.0.0.1:0",
            &[other.addr],
            "      drain_timout: 1s\n",
        )]),
    );
    let out = agent.dso(&["config", "reload"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(err.contains("drain_timout") && err.contains("line 6"), "{err}");
    assert!(err.contains("nothing was changed"), "{err}");

    // Bad YAML.
    rewrite(&agent, &format!("{good}  - [unclosed\n"));
    let out = agent.dso(&["config", "reload", "--json"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains(" at line "), "{}", stderr(&out));

    let l = listener(&agent, "app").await.unwrap();
    assert_eq!(l["generation"], 1);
    assert_eq!(l["backends"][0]["addr"], e.addr.to_string());
    open.echo("still served").await;
    let mut c = Conn::open(addr).await;
    assert_eq!(c.greeting().await, "e");
    assert_eq!(reloads(&agent, "failed").await, 2);
    assert_eq!(reloads(&agent, "ok").await, 0);
    assert!(agent.log().contains("config reload failed"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_already_taken_fails_the_reload_before_anything_changes() {
    let (e, other) = (Echo::start("e").await, Echo::start("other").await);
    let agent = Agent::start(&entry("app", "127.0.0.1:0", &[e.addr], ""), &[]).await;
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap();
    let mut events = Watch::start(&agent.socket, &["--json"]).await;
    rewrite(
        &agent,
        &file(&[
            entry("app", "127.0.0.1:0", &[other.addr], ""),
            entry("late", "127.0.0.1:0", &[e.addr], ""),
            entry("clash", &port.to_string(), &[e.addr], ""),
        ]),
    );
    let out = agent.dso(&["config", "reload"]).await;
    assert_eq!(out.status.code(), Some(2), "{}", stdout(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("listener clash: cannot listen on {port}")) && err.contains("in use"),
        "{err}"
    );
    // Nothing was applied: no new listener, no swap.
    assert!(listener(&agent, "late").await.is_none());
    assert!(listener(&agent, "clash").await.is_none());
    assert_eq!(listener(&agent, "app").await.unwrap()["generation"], 1);
    let seen = events
        .until(Duration::from_secs(10), |v| v["kind"] == "config.reload_failed")
        .await;
    let ev = &seen.last().unwrap()["data"];
    assert_eq!(ev["result"], "failed");
    assert!(
        ev["not_applied"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s == "add late"),
        "{ev}"
    );

    // Once the port is free the same file applies.
    drop(taken);
    let out = agent.dso(&["config", "reload"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(agent.addr("clash").await, port);
    assert_eq!(listener(&agent, "app").await.unwrap()["generation"], 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_that_cannot_change_live_are_named_and_the_rest_is_applied() {
    let (e, other) = (Echo::start("e").await, Echo::start("other").await);
    let agent = Agent::start(&entry("app", "127.0.0.1:0", &[e.addr], ""), &[]).await;
    rewrite(
        &agent,
        &format!(
            "agent:\n  shutdown_timeout: 3s\n{}",
            file(&[entry("app", "127.0.0.1:0", &[other.addr], "      backlog: 8\n")])
        ),
    );
    let out = agent.dso(&["config", "reload", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "ok");
    assert_eq!(
        v["restart_required"],
        serde_json::json!(["proxy.listeners[app].backlog", "agent.shutdown_timeout"])
    );
    assert_eq!(v["swapped"][0]["name"], "app");
    let mut c = Conn::open(agent.addr("app").await).await;
    assert_eq!(c.greeting().await, "other");
    let log = agent.log();
    assert!(log.contains("need an agent restart"), "{log}");
}

/// Runs `dso secret set REF` (value on stdin) on the local vault in `vault`, initialising
/// the vault first; no agent is told (`--socket` points nowhere).
async fn vault_set(vault: &Path, reference: &str, value: &[u8]) {
    use tokio::io::AsyncWriteExt;
    let nowhere = vault.join("no-agent.sock");
    for args in [&["init"][..], &["secret", "set", reference][..]] {
        if args == ["init"] && vault.join("vault.enc").exists() {
            continue;
        }
        let mut child = tokio::process::Command::new(crate::harness::DSO)
            .arg("--socket")
            .arg(&nowhere)
            .args(args)
            .env("DSO_VAULT_FILE", vault.join("vault.enc"))
            .env("DSO_MASTER_KEY_FILE", vault.join("master.key"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(value).await.unwrap();
        drop(input);
        let out = child.wait_with_output().await.unwrap();
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
    }
}

/// A `providers:` entry for the local vault in `vault`.
fn local_provider(name: &str, vault: &Path) -> String {
    format!(
        "  {name}:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n",
        v = vault.display()
    )
}

/// A `secrets:` entry.
fn secret_entry(name: &str, provider: &str, reference: &str) -> String {
    format!("  - name: {name}\n    provider: {provider}\n    mappings: {{VALUE: {reference}}}\n")
}

/// `(version, snapshots)` of secret `name` as `/v1/secrets` shows it, once it shows one;
/// `None` when the agent has no such secret or has taken no value of it.
async fn secret_seen(agent: &Agent, name: &str) -> Option<(String, u64)> {
    let (code, body) = http(&agent.socket, "GET", "/v1/secrets", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let s = v["secrets"].as_array()?.iter().find(|s| s["name"] == name)?;
    let version = s["versions"].as_object()?.values().next()?.as_str()?.to_owned();
    Some((version, s["snapshots"].as_u64()?))
}

/// Waits until `/v1/secrets` shows a value of secret `name` taken, and returns what it shows.
async fn taken(agent: &Agent, name: &str) -> (String, u64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        if let Some(seen) = secret_seen(agent, name).await {
            return seen;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "secret {name} was not taken in time"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The provider names in `/v1/secrets`' watcher view.
async fn watched_providers(agent: &Agent) -> Vec<String> {
    let (_, body) = http(&agent.socket, "GET", "/v1/secrets", "").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["watcher"]["providers"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter_map(|p| p["provider"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// A reload adds a local-vault provider and a secret of it: the agent reads it (a
/// version, one snapshot) and names both in the report, not as a restart. A provider
/// that cannot connect fails the reload and changes nothing. Removing them again drops
/// the secret and stops polling the provider. The untouched provider's secret keeps its
/// version and snapshot count throughout, and no value reaches the log or the answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn providers_and_secrets_are_added_and_removed_live_and_the_others_keep_their_values() {
    const KEPT: &[u8] = b"kept-value-Rl0ad!";
    const ADDED: &[u8] = b"added-value-Rl0ad?";
    let (kept_vault, added_vault, state) = (
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
        tempfile::tempdir().unwrap(),
    );
    vault_set(kept_vault.path(), "app/kept", KEPT).await;
    vault_set(added_vault.path(), "app/added", ADDED).await;
    let e = Echo::start("e").await;
    let listeners = file(&[entry("app", "127.0.0.1:0", &[e.addr], "")]);
    let base = format!("{listeners}agent:\n  watch:\n    polling_interval: 10m\n    debounce: 0s\n");
    let start_yaml = format!(
        "{base}providers:\n{}secrets:\n{}",
        local_provider("kept", kept_vault.path()),
        secret_entry("keep", "kept", "app/kept")
    );
    let state_arg = state.path().to_str().unwrap().to_owned();
    let agent = Agent::start_with(|_| start_yaml.clone(), &["--state-dir", &state_arg], "debug").await;
    let kept = taken(&agent, "keep").await;
    assert_eq!(kept.1, 1, "the kept secret is taken once");

    // A provider that cannot connect (no vault at that path): the reload fails, naming
    // it, and nothing changes.
    let missing = added_vault.path().join("missing");
    std::fs::create_dir(&missing).unwrap();
    rewrite(
        &agent,
        &format!(
            "{base}providers:\n{}{}secrets:\n{}{}",
            local_provider("kept", kept_vault.path()),
            local_provider("broken", &missing),
            secret_entry("keep", "kept", "app/kept"),
            secret_entry("new", "broken", "app/added")
        ),
    );
    let out = agent.dso(&["config", "reload", "--json"]).await;
    assert!(!out.status.success(), "{}", stdout(&out));
    let text = format!("{}{}", stdout(&out), stderr(&out));
    assert!(text.contains("providers[broken]"), "{text}");
    eprintln!("reload with a provider that cannot connect: {text}");
    assert_eq!(watched_providers(&agent).await, ["kept"]);
    assert!(secret_seen(&agent, "new").await.is_none());

    // Added: read at once, named in the report, no restart asked for.
    rewrite(
        &agent,
        &format!(
            "{base}providers:\n{}{}secrets:\n{}{}",
            local_provider("kept", kept_vault.path()),
            local_provider("added", added_vault.path()),
            secret_entry("keep", "kept", "app/kept"),
            secret_entry("new", "added", "app/added")
        ),
    );
    let out = agent.dso(&["config", "reload", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["result"], "ok", "{v}");
    assert_eq!(v["providers_added"], serde_json::json!(["added"]));
    assert_eq!(v["secrets_added"], serde_json::json!(["new"]));
    assert_eq!(v["restart_required"], serde_json::json!([]));
    let added = taken(&agent, "new").await;
    assert_eq!(added.1, 1, "the added secret is taken once");
    let mut providers = watched_providers(&agent).await;
    providers.sort();
    assert_eq!(providers, ["added", "kept"]);
    assert_eq!(secret_seen(&agent, "keep").await, Some(kept.clone()));

    // Removed: gone from the API and the watcher; the kept one still unchanged.
    rewrite(&agent, &start_yaml);
    let out = agent.dso(&["config", "reload"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.contains("providers removed added"), "{text}");
    assert!(text.contains("secrets removed new"), "{text}");
    assert!(secret_seen(&agent, "new").await.is_none());
    poll(|| async { watched_providers(&agent).await == ["kept"] }).await;
    let (_, body) = http(&agent.socket, "GET", "/v1/secrets", "").await.unwrap();
    assert!(
        !body.contains("app/added"),
        "the removed secret is still watched: {body}"
    );
    assert_eq!(secret_seen(&agent, "keep").await, Some(kept));
    let log = agent.log();
    assert!(log.contains("providers added added"), "{log}");
    crate::harness::assert_no_value("agent log", &log, &[KEPT, ADDED]);
    crate::harness::assert_no_value("reload answer", &text, &[KEPT, ADDED]);
}

/// A removed listener's connections drain with its drain deadline: one still open when
/// `drain_timeout` passes is closed, and counted as forced in the reload's log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_listener_closes_what_is_still_open_at_its_drain_deadline() {
    let (e, other) = (Echo::start("e").await, Echo::start("other").await);
    let settings = "      drain_timeout: 400ms\n      close_window: 0s\n";
    let agent = Agent::start(
        &[
            entry("stay", "127.0.0.1:0", &[other.addr], ""),
            entry("gone", "127.0.0.1:0", &[e.addr], settings),
        ]
        .concat(),
        &[],
    )
    .await;
    let mut open = TcpStream::connect(agent.addr("gone").await).await.unwrap();
    let mut greeting = [0u8; 2];
    open.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"e\n");
    rewrite(&agent, &file(&[entry("stay", "127.0.0.1:0", &[other.addr], "")]));
    let started = std::time::Instant::now();
    let out = agent.dso(&["config", "reload"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let mut buf = [0u8; 8];
    let n = tokio::time::timeout(Duration::from_secs(10), open.read(&mut buf))
        .await
        .expect("closed at the drain deadline")
        .unwrap_or(0);
    assert_eq!(n, 0);
    assert!(
        started.elapsed() >= Duration::from_millis(400),
        "closed after {:?}, before its drain deadline",
        started.elapsed()
    );
    poll(|| async { agent.log().contains("generation drained") }).await;
    let log = agent.log();
    let drained = log
        .lines()
        .find(|l| l.contains("generation drained") && l.contains("gone"))
        .unwrap();
    assert!(drained.contains("forced=1"), "{drained}");
}
