//! Secret delivery end to end (issue 10), against the real Docker engine, the
//! `dso-testsrv:test` image and the static `dso-init` launcher (`DSO_INIT_BIN`): a local
//! vault, an agent with `--docker`, a container labelled `dso.secrets`. First delivery,
//! a change rotated under client load, signal, env through the launcher, rollback, and no
//! value left in `docker inspect`, the agent's log or on disk. These fail (never skip) when
//! Docker, the image or the launcher is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::harness::{Agent, DSO, http, stderr};

fn docker(args: &[&str]) -> String {
    let out = StdCommand::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker ({e}): run `bash .ci/services.sh docker` first"));
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn launcher() -> String {
    std::env::var("DSO_INIT_BIN").unwrap_or_else(|_| {
        panic!("DSO_INIT_BIN is not set: build the static launcher with `bash .ci/build-test-image.sh` and export DSO_INIT_BIN=$(bash .ci/build-test-image.sh --init-path)")
    })
}

/// A vault, an agent scoped to this run, and one managed container; all removed on drop
/// (containers, network, the agent's tmpfs).
pub(crate) struct Fixture {
    run: String,
    vault: tempfile::TempDir,
    state: tempfile::TempDir,
    root: PathBuf,
    agent: Option<Agent>,
    started: SystemTime,
}

impl Fixture {
    /// `secrets_yaml` is the `secrets:` list; `labels` and `args` go to `docker run`.
    async fn start(
        tag: &str,
        values: &[(&str, &[u8])],
        secrets_yaml: &str,
        labels: &[&str],
        args: &[&str],
    ) -> Fixture {
        let started = SystemTime::now();
        let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
        let nanos = started
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let run = format!("dsodel{}x{tag}x{nanos:x}", std::process::id());
        let vault = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = state.path().join("secrets-tmpfs");
        let f = Fixture {
            run,
            vault,
            state,
            root,
            agent: None,
            started,
        };
        let init = f.dso_vault(&["init"], b"").await;
        assert!(init.status.success(), "dso init: {}", stderr(&init));
        for (name, value) in values {
            f.set(name, value).await;
        }
        docker(&[
            "network",
            "create",
            "--label",
            &format!("dso.test.run={}", f.run),
            &format!("{}_default", f.run),
        ]);
        let mut run_args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            f.name(),
            "--network".into(),
            format!("{}_default", f.run),
            "--health-interval=200ms".into(),
            "--health-retries=1".into(),
        ];
        for l in [
            format!("dso.test.run={}", f.run),
            "dso.reloader=true".to_owned(),
            "dso.host_ports=127.0.0.1:0:8080".to_owned(),
            "dso.drain.timeout=2s".to_owned(),
            format!("com.docker.compose.project={}", f.run),
            "com.docker.compose.service=web".to_owned(),
        ]
        .into_iter()
        .chain(labels.iter().map(|s| s.to_string()))
        {
            run_args.push("--label".into());
            run_args.push(l);
        }
        run_args.extend(args.iter().map(|s| s.to_string()));
        run_args.push(image);
        let refs: Vec<&str> = run_args.iter().map(String::as_str).collect();
        docker(&refs);
        let mut f = f;
        let yaml = format!(
            "version: v1.0.0\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n\
agent:\n  watch:\n    polling_interval: 1s\n    debounce: 0s\n  delivery:\n    root: {root}\n    launcher: {launcher}\n\
proxy:\n  listeners: []\n\
secrets:\n{secrets_yaml}",
            v = f.vault.path().display(),
            root = f.root.display(),
            launcher = launcher(),
        );
        let scope = format!("dso.test.run={}", f.run);
        let state_dir = f.state.path().join("state");
        let agent = Agent::start_with(
            |_| yaml,
            &[
                "--docker",
                "--docker-scope",
                &scope,
                "--state-dir",
                state_dir.to_str().unwrap(),
            ],
            "trace",
        )
        .await;
        f.agent = Some(agent);
        f
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    fn name(&self) -> String {
        format!("{}-web-1", self.run)
    }

    async fn dso_vault(&self, args: &[&str], stdin: &[u8]) -> Output {
        let socket = self
            .agent
            .as_ref()
            .map_or_else(|| self.vault.path().join("no-agent.sock"), |a| a.socket.clone());
        let mut child = Command::new(DSO)
            .arg("--socket")
            .arg(socket)
            .args(args)
            .env("DSO_VAULT_FILE", self.vault.path().join("vault.enc"))
            .env("DSO_MASTER_KEY_FILE", self.vault.path().join("master.key"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).await.unwrap();
        drop(input);
        child.wait_with_output().await.unwrap()
    }

    async fn set(&self, name: &str, value: &[u8]) {
        let out = self.dso_vault(&["secret", "set", name], value).await;
        assert!(out.status.success(), "dso secret set {name}: {}", stderr(&out));
    }

    /// `(id, running, labels as JSON)` of the run's containers.
    fn running(&self) -> Vec<String> {
        docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=dso.test.run={}", self.run),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// The one running container, once it carries `dso.delivery.instance`.
    async fn delivered(&self, not: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ids = self.running();
            if ids.len() == 1 && ids[0] != not {
                let inst = docker(&[
                    "inspect",
                    "-f",
                    "{{index .Config.Labels \"dso.delivery.instance\"}}",
                    &ids[0],
                ]);
                if !inst.is_empty() && inst != "<no value>" {
                    return ids[0].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no delivered container within 60 s (running: {ids:?}); agent log:\n{}",
                self.agent().log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn proxy_addr(&self) -> SocketAddr {
        let name = format!("{}/web:8080", self.run);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.agent().status().await;
            if let Some(l) = s["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["name"] == name.as_str())
            {
                return l["bind"].as_str().unwrap().parse().unwrap();
            }
            assert!(Instant::now() < deadline, "listener {name} never appeared");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // The agent first, so it does not react to the removals.
        drop(self.agent.take());
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
        let _ = StdCommand::new("umount").arg(&self.root).output();
    }
}

/// The one service's entry of `GET /v1/delivery`.
async fn delivery_status(f: &Fixture) -> serde_json::Value {
    let (code, body) = http(&f.agent().socket, "GET", "/v1/delivery", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["services"][0].clone()
}

/// The container's IP on the run's network (only asked while it exists).
fn ip(id: &str) -> String {
    docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        id,
    ])
}

/// `GET path` on the test server's HTTP port of a running container: (status, body).
async fn get(id: &str, path: &str) -> (u16, Vec<u8>) {
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", id]),
        "true",
        "never dial a container that is not running"
    );
    let addr: SocketAddr = format!("{}:8081", ip(id)).parse().unwrap();
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .expect("read timed out")
        .unwrap();
    let split = buf
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("an HTTP answer");
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, buf[split + 4..].to_vec())
}

/// Every file under `dir` (not following symlinks, not crossing into /proc or /sys) whose
/// bytes contain `needle`; files older than `since` are skipped when `since` is given.
fn search(dir: &Path, skip: &Path, needle: &[u8], since: Option<SystemTime>, hits: &mut Vec<PathBuf>) {
    if dir == skip {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        let Ok(m) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if m.is_dir() {
            search(&p, skip, needle, since, hits);
        } else if m.is_file() {
            if since.is_some_and(|t| m.modified().map_or(true, |mt| mt < t)) {
                continue;
            }
            if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p);
            }
        }
    }
}

/// The value is nowhere on disk: every file of Docker's root dir and the agent's state
/// dir, and every file written under /tmp and $HOME since the test started. The agent's
/// tmpfs (RAM, where a container that still exists keeps its files) is not disk.
fn assert_on_no_disk(f: &Fixture, value: &[u8]) {
    let mut hits = Vec::new();
    let skip = f.root.as_path();
    search(Path::new("/var/lib/docker"), skip, value, None, &mut hits);
    search(f.state.path(), skip, value, None, &mut hits);
    search(Path::new("/tmp"), skip, value, Some(f.started), &mut hits);
    if let Some(home) = std::env::var_os("HOME") {
        search(Path::new(&home), skip, value, Some(f.started), &mut hits);
    }
    assert!(hits.is_empty(), "the value was found on disk in {hits:?}");
}

const FILE_V1: &[u8] = b"file-v1-7Hq2-secret";
const FILE_V2: &[u8] = b"file-v2-Kp9w-secret";
const FILE_V3: &[u8] = b"file-v3-Zz1m-secret";

#[tokio::test]
async fn file_secret_first_delivery_then_changes_roll_under_load_and_leave_no_trace() {
    let f = Fixture::start(
        "file",
        &[("app/db_password", FILE_V1)],
        "  - name: db\n    provider: local\n    mappings:\n      db_password: app/db_password\n    rotation:\n      strategy: rolling\n",
        &["dso.secrets=db"],
        &["--user", "1000"],
    )
    .await;
    // First delivery: the container was created without dso's mounts, so one rotation.
    let first = f.delivered("").await;
    let (code, body) = get(&first, "/file?path=/run/secrets/db_password").await;
    assert_eq!((code, body.as_slice()), (200, FILE_V1), "{}", f.agent().log());
    let (_, stat) = get(&first, "/stat?path=/run/secrets/db_password").await;
    let stat = String::from_utf8_lossy(&stat).to_string();
    assert!(
        stat.contains("mode=0400 uid=1000 "),
        "mode 0400, uid 1000: {stat}"
    );
    // Another uid in the same container cannot read it.
    let other = StdCommand::new("docker")
        .args([
            "exec",
            "-u",
            "1001",
            &first,
            "/dso-testsrv",
            "cat",
            "/run/secrets/db_password",
        ])
        .output()
        .unwrap();
    assert!(!other.status.success(), "uid 1001 read the 0400 file");
    assert!(String::from_utf8_lossy(&other.stderr).contains("ermission denied"));

    // Changes under continuous client load through the proxy: zero failed connections.
    let addr = f.proxy_addr().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = {
        let stop = std::sync::Arc::clone(&stop);
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            let deadline = Instant::now() + Duration::from_secs(120);
            while !stop.load(std::sync::atomic::Ordering::Relaxed)
                && Instant::now() < deadline
                && ok < 100_000
            {
                match tokio::time::timeout(Duration::from_secs(10), async {
                    let s = TcpStream::connect(addr).await?;
                    let mut line = String::new();
                    BufReader::new(s).read_line(&mut line).await?;
                    Ok::<_, std::io::Error>(line)
                })
                .await
                {
                    Ok(Ok(l)) if l.starts_with("dso-testsrv ") => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        })
    };
    let mut current = first;
    for value in [FILE_V2, FILE_V3] {
        let t = Instant::now();
        f.set("app/db_password", value).await;
        let next = f.delivered(&current).await;
        let (code, body) = get(&next, "/file?path=/run/secrets/db_password").await;
        assert_eq!((code, body.as_slice()), (200, value));
        eprintln!(
            "secret set -> new container delivered: {} ms",
            t.elapsed().as_millis()
        );
        current = next;
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = load.await.unwrap();
    assert!(ok > 0, "no connection went through");
    assert!(
        failed.is_empty(),
        "{} failed connections of {}: {:?}",
        failed.len(),
        ok + failed.len() as u32,
        &failed[..failed.len().min(5)]
    );

    // Not in docker inspect, not in the agent's log (at trace level).
    let inspect = docker(&["inspect", &current]);
    let log = f.agent().log();
    for v in [FILE_V1, FILE_V2, FILE_V3] {
        let v = std::str::from_utf8(v).unwrap();
        assert!(!inspect.contains(v), "value in docker inspect");
        assert!(!log.contains(v), "value in the agent log");
    }
    let status = delivery_status(&f).await;
    assert_eq!(status["delivered"], 3, "{status}");

    // Removal wipes the directory; nothing is left on disk.
    docker(&["rm", "-f", &current]);
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::fs::read_dir(&f.root).map(|d| d.count()).unwrap_or(0) > 0 {
        assert!(
            Instant::now() < deadline,
            "secret directory not wiped after removal: {}",
            f.agent().log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for v in [FILE_V1, FILE_V2, FILE_V3] {
        assert_on_no_disk(&f, v);
    }
}

const ENV_V1: &[u8] = b"env-v1-Qx81-secret";

#[tokio::test]
async fn env_secret_through_the_launcher_reaches_pid_1_and_not_inspect() {
    let f = Fixture::start(
        "env",
        &[("app/api_key", ENV_V1)],
        "  - name: api\n    provider: local\n    mappings:\n      API_KEY: app/api_key\n    inject:\n      type: env\n",
        &["dso.secrets=api"],
        &[],
    )
    .await;
    let id = f.delivered("").await;
    let (code, body) = get(&id, "/env/API_KEY").await;
    assert_eq!((code, body.as_slice()), (200, ENV_V1), "{}", f.agent().log());
    let (_, pid) = get(&id, "/pid").await;
    assert_eq!(String::from_utf8_lossy(&pid).trim(), "1");
    let inspect = docker(&["inspect", &id]);
    assert!(
        !inspect.contains(std::str::from_utf8(ENV_V1).unwrap()),
        "value in docker inspect"
    );
    assert!(
        inspect.contains("/run/dso/init"),
        "the launcher is the entrypoint"
    );
    // docker stop's SIGTERM reaches the application (PID 1) at once.
    let t = Instant::now();
    docker(&["stop", "-t", "10", &id]);
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "stop took {:?}",
        t.elapsed()
    );
    assert_on_no_disk(&f, ENV_V1);
}

const SIG_V1: &[u8] = b"sig-v1-token";
const SIG_V2: &[u8] = b"sig-v2-token";

#[tokio::test]
async fn signal_strategy_replaces_the_file_before_the_signal() {
    let f = Fixture::start(
        "sig",
        &[("app/token", SIG_V1)],
        "  - name: tok\n    provider: local\n    mappings:\n      token: app/token\n    rotation:\n      strategy: signal\n",
        &["dso.secrets=tok"],
        &["-e", "RELOAD_FILE=/run/secrets/token"],
    )
    .await;
    // First delivery replaces the container (it had no dso mounts); later ones signal it.
    let id = f.delivered("").await;
    f.set("app/token", SIG_V2).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (code, body) = get(&id, "/reloaded").await;
        if code == 200 {
            assert_eq!(body, SIG_V2, "the file had its new content when SIGHUP arrived");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no SIGHUP within 30 s: {}",
            f.agent().log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.running(), vec![id.clone()], "signal keeps the container");
}

const OK_V1: &[u8] = b"good-one";

#[tokio::test]
async fn a_value_that_makes_green_unhealthy_rolls_back_and_blue_keeps_the_old_one() {
    let f = Fixture::start(
        "rollback",
        &[("app/pw", OK_V1)],
        "  - name: pw\n    provider: local\n    mappings:\n      pw: app/pw\n",
        &[
            "dso.secrets=pw",
            "dso.update.strategy=rolling",
            "dso.health.timeout=3s",
        ],
        &["-e", "HEALTH_FILE=/run/secrets/pw", "-e", "UNHEALTHY_IF=bad"],
    )
    .await;
    let blue = f.delivered("").await;
    f.set("app/pw", b"bad").await;
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let body = delivery_status(&f).await;
        if body["failed"] == 1 {
            assert_eq!(
                body["failed_versions"].as_object().map(|m| m.len()),
                Some(1),
                "{body}"
            );
            assert!(
                body["last_error"].as_str().unwrap().contains("not healthy"),
                "{body}"
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no failed delivery within 60 s: {body}\n{}",
            f.agent().log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(f.running(), vec![blue.clone()], "blue keeps serving");
    let (code, body) = get(&blue, "/file?path=/run/secrets/pw").await;
    assert_eq!((code, body.as_slice()), (200, OK_V1), "blue keeps the old value");
}
