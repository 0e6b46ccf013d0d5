//! The event bus end to end: `dso watch` on a real agent sees a secret change made with
//! `dso secret set` (and no value anywhere in the stream), exits 1 when the agent stops;
//! with Docker, the SSE stream shows a rotation's steps in order and the outgoing webhooks
//! get the signed outcome (a 400 receiver once, a 500 receiver every attempt), and
//! `dso status --watch` prints again; an unreachable provider is one `provider.down`
//! (replayed with `Last-Event-ID`). A secret-triggered rollback's events are tested in
//! `delivery.rs`.
//! The Docker test fails (never skips) when Docker or the image is missing.

use std::path::Path;
use std::process::{Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use sha2::Sha256;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::{Agent, DSO, docker, stderr};

const FIRST: &[u8] = b"events-first-value-Hq2!x";
const SECOND: &[u8] = b"events second $value \"q\"\nand its second line";

/// Runs `dso ARGS` on the vault in `vault` with `stdin` as input.
async fn dso_vault(vault: &Path, socket: &Path, args: &[&str], stdin: &[u8]) -> Output {
    crate::harness::dso_vault(vault, Some(socket), args, stdin).await
}

/// `dso watch ARGS` as a child whose stdout lines arrive on a channel, and the text of
/// everything it printed (stdout and stderr) so far.
pub(crate) struct Watch {
    child: Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    all: Arc<Mutex<String>>,
    /// The stdout and stderr readers, done once the process closed both.
    readers: Vec<tokio::task::JoinHandle<()>>,
}

impl Watch {
    pub(crate) async fn start(socket: &Path, args: &[&str]) -> Watch {
        let mut child = Command::new(DSO)
            .arg("--socket")
            .arg(socket)
            .arg("watch")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let all: Arc<Mutex<String>> = Arc::default();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let a = Arc::clone(&all);
        let mut readers = Vec::new();
        readers.push(tokio::spawn(async move {
            while let Ok(Some(l)) = out.next_line().await {
                a.lock().unwrap().push_str(&format!("{l}\n"));
                let _ = tx.send(l);
            }
        }));
        let mut err = BufReader::new(child.stderr.take().unwrap()).lines();
        let a = Arc::clone(&all);
        readers.push(tokio::spawn(async move {
            while let Ok(Some(l)) = err.next_line().await {
                a.lock().unwrap().push_str(&format!("stderr: {l}\n"));
            }
        }));
        // The process starts and subscribes in a few ms; give it ample time.
        tokio::time::sleep(Duration::from_millis(700)).await;
        Watch {
            child,
            lines,
            all,
            readers,
        }
    }

    /// The next line within `within`; panics with everything printed otherwise.
    pub(crate) async fn line(&mut self, within: Duration) -> String {
        match tokio::time::timeout(within, self.lines.recv()).await {
            Ok(Some(l)) => l,
            _ => panic!(
                "no line from dso watch in {within:?}; it printed:\n{}",
                self.text()
            ),
        }
    }

    /// Lines as JSON until one satisfies `done`; returns every event read.
    pub(crate) async fn until(
        &mut self,
        within: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + within;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let l = self.line(left).await;
            let v: serde_json::Value =
                serde_json::from_str(&l).unwrap_or_else(|e| panic!("dso watch --json printed {l:?}: {e}"));
            let stop = done(&v);
            seen.push(v);
            if stop {
                return seen;
            }
        }
    }

    pub(crate) fn text(&self) -> String {
        self.all.lock().unwrap().clone()
    }

    fn interrupt(&self) {
        let pid = self.child.id().unwrap().to_string();
        assert!(
            std::process::Command::new("kill")
                .args(["-INT", &pid])
                .status()
                .unwrap()
                .success()
        );
    }

    /// Waits for the process to exit and for all it printed.
    async fn exit_code(&mut self) -> Option<i32> {
        let code = tokio::time::timeout(Duration::from_secs(10), self.child.wait())
            .await
            .expect("dso watch exits within 10 s")
            .unwrap()
            .code();
        for r in self.readers.drain(..) {
            let _ = tokio::time::timeout(Duration::from_secs(5), r).await;
        }
        code
    }
}

fn assert_clean(what: &str, text: &str) {
    crate::harness::assert_no_value(what, text, &[FIRST, SECOND]);
}

#[tokio::test]
async fn dso_watch_sees_a_secret_change_without_its_value_and_exits_1_when_the_agent_stops() {
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
    let config = format!(
        "version: v1.0.0\nmode: local\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n\
agent:\n  watch:\n    polling_interval: 10m\n    debounce: 0s\n\
secrets:\n  - name: app\n    provider: local\n    mappings:\n      DB_PASSWORD: app/db_password\n",
        v = vault.path().display()
    );
    let state_arg = state.path().to_str().unwrap().to_string();
    let agent = Agent::start_with(|_| config, &["--state-dir", &state_arg], "debug").await;

    let mut json = Watch::start(&agent.socket, &["--json", "--kinds", "secret"]).await;
    let mut human = Watch::start(&agent.socket, &["--kinds", "secret.changed"]).await;
    let out = dso_vault(
        vault.path(),
        &agent.socket,
        &["secret", "set", "app/db_password"],
        SECOND,
    )
    .await;
    assert!(out.status.success(), "set: {}", stderr(&out));
    // The agent may also publish its first snapshot's change, if the watch was earlier
    // than it: the change of this set is the one with an old version.
    let seen = json
        .until(Duration::from_secs(15), |v| {
            v["kind"] == "secret.changed" && v["data"]["old_version"].is_string()
        })
        .await;
    let e = seen.last().unwrap();
    assert_eq!(e["data"]["secret"], "app");
    assert_eq!(e["data"]["key"], "DB_PASSWORD");
    assert_eq!(e["data"]["reference"], "app/db_password");
    assert_eq!(e["data"]["provider"], "local");
    assert_ne!(e["data"]["old_version"], e["data"]["new_version"]);
    assert!(e["seq"].as_u64().unwrap() >= 1 && e["unix_ms"].as_u64().unwrap() > 0);
    let mut line = human.line(Duration::from_secs(15)).await;
    while !line.contains(&format!("version {}", e["data"]["old_version"].as_str().unwrap())) {
        line = human.line(Duration::from_secs(15)).await;
    }
    assert!(
        line.contains("secret.changed app DB_PASSWORD (app/db_password) version"),
        "{line}"
    );

    json.interrupt();
    assert_eq!(json.exit_code().await, Some(0), "SIGINT ends dso watch with 0");
    // The agent stops: the stream ends and dso watch says so, exit 1.
    agent.signal("TERM");
    assert_eq!(human.exit_code().await, Some(1), "{}", human.text());
    assert!(
        human.text().contains("ended the event stream"),
        "{}",
        human.text()
    );
    for (what, text) in [
        ("dso watch --json", json.text()),
        ("dso watch", human.text()),
        ("the agent log", agent.log()),
    ] {
        assert_clean(what, &text);
    }
    // An agent that is not there: a clear error, exit 1.
    let gone = Command::new(DSO)
        .arg("--socket")
        .arg(&nowhere)
        .arg("watch")
        .output()
        .await
        .unwrap();
    assert_eq!(gone.status.code(), Some(1));
    assert!(
        stderr(&gone).contains("cannot reach the dso agent"),
        "{}",
        stderr(&gone)
    );
}

/// A network and one managed rolling container, removed with everything of the run on drop.
struct Project {
    run: String,
}

impl Project {
    fn start() -> Project {
        let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let p = Project {
            run: format!("dsoev{}x{nanos:x}", std::process::id()),
        };
        let label = format!("dso.test.run={}", p.run);
        let net = format!("{}_default", p.run);
        docker(&["network", "create", "--label", &label, &net]);
        docker(&[
            "run",
            "-d",
            "--name",
            &format!("{}-web-1", p.run),
            "--network",
            &net,
            "--label",
            &label,
            "--label",
            "dso.reloader=true",
            "--label",
            "dso.host_ports=127.0.0.1:0:8080",
            "--label",
            "dso.update.strategy=rolling",
            "--label",
            "dso.drain.timeout=1s",
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
            let _ = std::process::Command::new("docker")
                .args(["rm", "-f", id])
                .output();
        }
        let _ = std::process::Command::new("docker")
            .args(["network", "rm", &format!("{}_default", self.run)])
            .output();
    }
}

/// What an in-process webhook receiver saw: per request, its headers and body.
type Seen = Arc<Mutex<Vec<(hyper::HeaderMap, Vec<u8>)>>>;

/// A webhook receiver on 127.0.0.1:0 answering every request with `status`.
async fn receiver(status: u16) -> (String, Seen) {
    use http_body_util::{BodyExt, Full};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let s = Arc::clone(&seen);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let s = Arc::clone(&s);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let s = Arc::clone(&s);
                    async move {
                        let (parts, body) = req.into_parts();
                        let body = body.collect().await.unwrap().to_bytes().to_vec();
                        s.lock().unwrap().push((parts.headers, body));
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(Full::new(hyper::body::Bytes::new()))
                                .unwrap(),
                        )
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    (url, seen)
}

/// Checks `X-DSO-Signature` the way a receiver does: HMAC-SHA256 of "timestamp.body".
fn signed_by(key: &[u8], headers: &hyper::HeaderMap, body: &[u8]) -> bool {
    let ts = headers["x-dso-timestamp"].to_str().unwrap();
    let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
    mac.update(ts.as_bytes());
    mac.update(b".");
    mac.update(body);
    let want: String = mac
        .finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    headers["x-dso-signature"].to_str().unwrap() == format!("sha256={want}")
}

#[tokio::test]
async fn the_event_stream_shows_a_rotation_in_order_and_webhooks_get_it_signed() {
    let p = Project::start();
    let state = tempfile::tempdir().unwrap();
    let (ok_url, ok_seen) = receiver(204).await;
    let (refusing_url, refusing_seen) = receiver(400).await;
    let (failing_url, failing_seen) = receiver(500).await;
    let key = b"webhook-key-for-the-events-test";
    let scope = format!("dso.test.run={}", p.run);
    let state_arg = state.path().to_str().unwrap().to_string();
    let agent = Agent::start_with(
        |dir| {
            std::fs::write(dir.join("hook.key"), [&key[..], b"\n"].concat()).unwrap();
            let k = dir.join("hook.key");
            let hook = |url: &str, extra: &str| {
                format!(
                    "      - url: {url}\n        allow_http: true\n        secret_file: {}\n        events: [rotation.succeeded, rotation.failed]\n{extra}",
                    k.display()
                )
            };
            format!(
                "proxy:\n  listeners: []\nagent:\n  notify:\n    webhooks:\n{}{}{}",
                hook(&ok_url, ""),
                hook(&refusing_url, ""),
                hook(&failing_url, "        max_attempts: 3\n"),
            )
        },
        &["--docker", "--docker-scope", &scope, "--state-dir", &state_arg],
        "info",
    )
    .await;

    let mut watch = Watch::start(&agent.socket, &["--json", "--kinds", "rotation,docker"]).await;
    // `dso status --watch`, piped: a `--- HH:MM:SS UTC` line before each print.
    let status_log = agent.dir.path().join("status-watch.txt");
    let mut status_watch = Command::new(DSO)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["status", "--watch"])
        .stdout(std::fs::File::create(&status_log).unwrap())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let target = format!("{}/web", p.run);
    let out = agent.dso(&["rotate", &target]).await;
    assert!(
        out.status.success(),
        "rotate: {}\nlog:\n{}",
        stderr(&out),
        agent.log()
    );
    let events = watch
        .until(Duration::from_secs(60), |v| {
            v["kind"] == "rotation.succeeded" || v["kind"] == "rotation.failed"
        })
        .await;
    let rotation: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"].as_str().unwrap().starts_with("rotation."))
        .collect();
    let seqs: Vec<u64> = events.iter().map(|e| e["seq"].as_u64().unwrap()).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "seq increases: {seqs:?}");
    assert_eq!(
        rotation.first().unwrap()["kind"],
        "rotation.started",
        "{rotation:#?}"
    );
    assert_eq!(
        rotation.last().unwrap()["kind"],
        "rotation.succeeded",
        "{rotation:#?}"
    );
    let steps: Vec<&str> = rotation
        .iter()
        .filter(|e| e["kind"] == "rotation.step")
        .map(|e| e["data"]["step"].as_str().unwrap())
        .collect();
    assert_eq!(
        steps,
        [
            "begin",
            "green_created",
            "green_started",
            "green_healthy",
            "swapped",
            "drained",
            "blue_removed",
            "green_renamed",
            "done"
        ],
        "the rolling rotation's steps, in order"
    );
    for e in &rotation {
        assert_eq!(e["data"]["service"], target.as_str(), "{e}");
        assert_eq!(e["data"]["trigger"], "manual", "{e}");
    }
    let done = rotation.last().unwrap();
    let c = &done["data"]["containers"][0];
    assert_eq!(c["name"], format!("{}-web-1", p.run));
    assert_ne!(c["old_id"], c["new_id"]);
    let (old_id, new_id) = (
        c["old_id"].as_str().unwrap().to_owned(),
        c["new_id"].as_str().unwrap().to_owned(),
    );
    // Docker's side: green started, blue destroyed, both named with their service.
    let mut docker_events: Vec<serde_json::Value> = events
        .iter()
        .filter(|e| e["kind"] == "docker.container")
        .cloned()
        .collect();
    let has = |ev: &[serde_json::Value], action: &str, id: &str| {
        ev.iter().any(|e| {
            e["data"]["action"] == action
                && e["data"]["container"] == id
                && e["data"]["service"] == target.as_str()
        })
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while !(has(&docker_events, "start", &new_id) && has(&docker_events, "destroy", &old_id)) {
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "docker.container start/destroy missing: {docker_events:#?}"
        );
        let l = watch.line(left).await;
        let v: serde_json::Value = serde_json::from_str(&l).unwrap();
        if v["kind"] == "docker.container" {
            docker_events.push(v);
        }
    }

    // The status was printed again after the rotation's events, the last time with green.
    let deadline = Instant::now() + Duration::from_secs(10);
    let printed = loop {
        let text = std::fs::read_to_string(&status_log).unwrap_or_default();
        let last = text.rsplit("--- ").next().unwrap_or("").to_owned();
        if last.contains(&new_id[..12]) && !last.contains("(rotating)") || Instant::now() > deadline {
            break text;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let prints = printed
        .lines()
        .filter(|l| l.starts_with("--- ") && l.ends_with(" UTC"))
        .count();
    assert!(
        prints >= 2,
        "dso status --watch printed again after events:\n{printed}"
    );
    assert!(printed.contains(&old_id[..12]), "{printed}");
    let last = printed.rsplit("--- ").next().unwrap();
    assert!(
        last.contains(&new_id[..12]) && last.contains(&target),
        "the last print shows green:\n{printed}"
    );
    let pid = status_watch.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let code = tokio::time::timeout(Duration::from_secs(10), status_watch.wait())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(code.code(), Some(0), "SIGINT ends dso status --watch with 0");

    // The webhooks: signed, one attempt for a 400, every attempt for a 500.
    let deadline = Instant::now() + Duration::from_secs(20);
    while (ok_seen.lock().unwrap().is_empty() || failing_seen.lock().unwrap().len() < 3)
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    {
        let ok = ok_seen.lock().unwrap();
        assert_eq!(ok.len(), 1, "one rotation.succeeded, delivered once");
        let (headers, body) = &ok[0];
        assert!(signed_by(key, headers, body), "bad signature: {headers:?}");
        let ts: u64 = headers["x-dso-timestamp"].to_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        assert!(now.abs_diff(ts) < 120, "timestamp {ts} vs now {now}");
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["kind"], "rotation.succeeded");
        assert_eq!(v["seq"], done["seq"]);
        assert!(!signed_by(b"another key", headers, body));
    }
    // Long enough for retries that should not happen (backoff 0.5 s, 1 s).
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(refusing_seen.lock().unwrap().len(), 1, "a 400 is not retried");
    let failing = failing_seen.lock().unwrap();
    assert_eq!(failing.len(), 3, "a 500 is tried max_attempts times");
    assert!(failing.iter().all(|(h, b)| signed_by(key, h, b)));
}

#[tokio::test]
async fn a_provider_that_cannot_be_reached_is_one_provider_down_event_with_its_error() {
    // A port nothing listens on: bound, then closed.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let state = tempfile::tempdir().unwrap();
    let state_arg = state.path().to_str().unwrap().to_string();
    let token = "events-test-vault-token-Vq7m";
    let config = format!(
        "providers:\n  v:\n    type: vault\n    address: https://127.0.0.1:{port}\n    auth:\n      method: token\n      params:\n        token: {token}\n\
agent:\n  watch:\n    polling_interval: 1s\n    max_interval: 2s\n    debounce: 0s\n\
secrets:\n  - name: app\n    provider: v\n    mappings:\n      K: secret/data/app#k\n"
    );
    let agent = Agent::start_with(|_| config, &["--state-dir", &state_arg], "debug").await;
    // Raw SSE with `Last-Event-ID: 0`: the agent replays what it published before this
    // client connected (the outage may start within milliseconds of the agent's start).
    let mut sock = tokio::net::UnixStream::connect(&agent.socket).await.unwrap();
    sock.write_all(b"GET /v1/events?kinds=provider HTTP/1.1\r\nhost: localhost\r\nlast-event-id: 0\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    let end = Instant::now() + Duration::from_secs(6);
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(end.saturating_duration_since(Instant::now()), {
        use tokio::io::AsyncReadExt;
        sock.read(&mut buf)
    })
    .await
    {
        if n == 0 {
            break;
        }
        text.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(text.contains("content-type: text/event-stream"), "{text}");
    // Polls go on failing every 1-2 s: the transition is published once, not per poll.
    assert_eq!(text.matches("event: provider.down\n").count(), 1, "{text}");
    let data = text
        .lines()
        .find(|l| l.starts_with("data: ") && l.contains("provider.down"))
        .unwrap()
        .strip_prefix("data: ")
        .unwrap();
    let down: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(down["data"]["provider"], "v");
    assert!(!down["data"]["error"].as_str().unwrap().is_empty(), "{down}");
    assert!(!text.contains(token), "the token is not in the stream");
    eprintln!("provider.down as streamed: {data}");
}
