//! Secret delivery end to end (issue 10), against the real Docker engine, the
//! `dso-testsrv:test` image and the static `dso-init` launcher (`DSO_INIT_BIN`): a local
//! vault (and a real moto_server for the `aws` provider, `DSO_MOTO_SERVER`), an agent with
//! `--docker`, containers labelled `dso.secrets`. First delivery, a change rotated under
//! client load, signal, env through the launcher, rollback, AWS `PutSecretValue` within one
//! poll interval, agent restarts on the same state directory and tmpfs (nothing rotates; a
//! change made while down applied once; a lost tmpfs delivered again; failed versions stay
//! failed; orphans swept), one change for two services, two changes in one debounce window,
//! and no value left in `docker inspect`, the agent's log or on disk. These fail (never
//! skip) when Docker, the image, the launcher or moto is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::harness::{Agent, DSO, docker, http, stderr};

fn launcher() -> String {
    std::env::var("DSO_INIT_BIN").unwrap_or_else(|_| {
        panic!("DSO_INIT_BIN is not set: build the static launcher with `bash .ci/build-test-image.sh` and export DSO_INIT_BIN=$(bash .ci/build-test-image.sh --init-path)")
    })
}

/// A vault, an agent scoped to this run, and its managed containers; all removed on drop
/// (containers, network, the agent's tmpfs). The agent can be stopped and started again
/// on the same state directory and tmpfs root ([`Fixture::stop_agent`],
/// [`Fixture::start_agent`]).
pub(crate) struct Fixture {
    run: String,
    vault: tempfile::TempDir,
    state: tempfile::TempDir,
    root: PathBuf,
    agent: Option<Agent>,
    started: SystemTime,
    /// The config every agent start uses.
    yaml: String,
    /// Extra environment of the agent process (e.g. AWS test keys).
    agent_env: Vec<(String, String)>,
    /// The logs of agents stopped before the current one, for failure messages.
    past_logs: String,
}

/// What [`Fixture::configure`] puts in the agent's config besides the local vault.
pub(crate) struct AgentConfig<'a> {
    /// More entries of `providers:` (indented by two spaces).
    providers: &'a str,
    /// The body of `agent.watch` (indented by four spaces).
    watch: &'a str,
    /// The `secrets:` list.
    secrets: &'a str,
    /// Extra environment of the agent process.
    env: &'a [(&'a str, &'a str)],
}

impl AgentConfig<'_> {
    const WATCH: &'static str = "    polling_interval: 1s\n    debounce: 0s\n";
}

impl Fixture {
    /// `secrets_yaml` is the `secrets:` list; `labels` and `args` go to `docker run` of the
    /// one service `web`; the agent is started.
    async fn start(
        tag: &str,
        values: &[(&str, &[u8])],
        secrets_yaml: &str,
        labels: &[&str],
        args: &[&str],
    ) -> Fixture {
        let mut f = Fixture::prepare(tag, values).await;
        f.container("web", labels, args);
        f.configure(AgentConfig {
            providers: "",
            watch: AgentConfig::WATCH,
            secrets: secrets_yaml,
            env: &[],
        });
        f.start_agent().await;
        f
    }

    /// A vault holding `values` and the run's network; no container, no agent yet.
    async fn prepare(tag: &str, values: &[(&str, &[u8])]) -> Fixture {
        let started = SystemTime::now();
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
            yaml: String::new(),
            agent_env: Vec::new(),
            past_logs: String::new(),
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
        f
    }

    /// Runs the container of Compose service `service` (`RUN-SERVICE-1`, with the labels
    /// dso manages it by, plus `labels`; `args` go to `docker run`).
    fn container(&self, service: &str, labels: &[&str], args: &[&str]) {
        let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
        let mut run_args: Vec<String> = vec![
            "run".into(),
            "-d".into(),
            "--name".into(),
            self.name_of(service),
            "--network".into(),
            format!("{}_default", self.run),
            "--health-interval=200ms".into(),
            "--health-retries=1".into(),
        ];
        for l in [
            format!("dso.test.run={}", self.run),
            "dso.reloader=true".to_owned(),
            "dso.host_ports=127.0.0.1:0:8080".to_owned(),
            "dso.drain.timeout=2s".to_owned(),
            format!("com.docker.compose.project={}", self.run),
            format!("com.docker.compose.service={service}"),
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
    }

    /// Sets the config (and environment) of every later [`Fixture::start_agent`].
    fn configure(&mut self, cfg: AgentConfig<'_>) {
        self.yaml = format!(
            "version: v1.0.0\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n{providers}\
agent:\n  watch:\n{watch}  delivery:\n    root: {root}\n    launcher: {launcher}\n\
proxy:\n  listeners: []\n\
secrets:\n{secrets}",
            v = self.vault.path().display(),
            providers = cfg.providers,
            watch = cfg.watch,
            root = self.root.display(),
            launcher = launcher(),
            secrets = cfg.secrets,
        );
        self.agent_env = cfg
            .env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
    }

    /// Starts an agent (`--docker`, scoped to this run) on the fixture's state directory
    /// and tmpfs root, and waits until it answers.
    async fn start_agent(&mut self) {
        assert!(self.agent.is_none(), "an agent already runs");
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dso.yaml");
        std::fs::write(&config, &self.yaml).unwrap();
        let socket = dir.path().join("run/dso.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let scope = format!("dso.test.run={}", self.run);
        let child = Command::new(DSO)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .args(["--docker", "--docker-scope", &scope, "--state-dir"])
            .arg(self.state.path().join("state"))
            .envs(self.agent_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "trace")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut agent = Agent { dir, socket, child };
        agent.wait_started(Duration::from_secs(30)).await;
        self.agent = Some(agent);
    }

    /// Stops the agent with SIGTERM and waits for it to exit successfully; its log is kept
    /// for failure messages.
    async fn stop_agent(&mut self) {
        let mut agent = self.agent.take().expect("an agent runs");
        agent.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), agent.child.wait())
            .await
            .unwrap_or_else(|_| panic!("the agent did not exit within 30 s of SIGTERM:\n{}", agent.log()))
            .unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}:\n{}",
            agent.log()
        );
        self.past_logs.push_str(&agent.log());
        self.past_logs.push_str("---- agent stopped ----\n");
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    /// Every agent's log so far (stopped ones first), without its DEBUG and TRACE lines
    /// (the agent logs at trace level so that value searches cover everything).
    fn logs(&self) -> String {
        format!(
            "{}{}",
            self.past_logs,
            self.agent.as_ref().map(Agent::log).unwrap_or_default()
        )
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.contains(" TRACE ") && !l.contains(" DEBUG "))
        .fold(String::new(), |acc, l| acc + l + "\n")
    }

    /// Every agent's full log so far, for value searches.
    fn full_logs(&self) -> String {
        format!(
            "{}{}",
            self.past_logs,
            self.agent.as_ref().map(Agent::log).unwrap_or_default()
        )
    }

    fn name_of(&self, service: &str) -> String {
        format!("{}-{service}-1", self.run)
    }

    async fn dso_vault(&self, args: &[&str], stdin: &[u8]) -> Output {
        let socket = self
            .agent
            .as_ref()
            .map_or_else(|| self.vault.path().join("no-agent.sock"), |a| a.socket.clone());
        crate::harness::dso_vault(self.vault.path(), Some(&socket), args, stdin).await
    }

    async fn set(&self, name: &str, value: &[u8]) {
        let out = self.dso_vault(&["secret", "set", name], value).await;
        assert!(out.status.success(), "dso secret set {name}: {}", stderr(&out));
    }

    /// IDs of the run's running containers.
    fn running(&self) -> Vec<String> {
        self.running_of(None)
    }

    /// IDs of the running containers of `service` (every service's when `None`).
    fn running_of(&self, service: Option<&str>) -> Vec<String> {
        let mut args = vec![
            "ps".to_owned(),
            "-q".to_owned(),
            "--no-trunc".to_owned(),
            "--filter".to_owned(),
            format!("label=dso.test.run={}", self.run),
        ];
        if let Some(s) = service {
            args.push("--filter".to_owned());
            args.push(format!("label=com.docker.compose.service={s}"));
        }
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs).lines().map(str::to_owned).collect()
    }

    /// The one running container, once it carries `dso.delivery.instance`.
    async fn delivered(&self, not: &str) -> String {
        self.delivered_of(None, not).await
    }

    /// The one running container of `service` (of the run when `None`) other than `not`,
    /// once it carries `dso.delivery.instance`.
    async fn delivered_of(&self, service: Option<&str>, not: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ids = self.running_of(service);
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
                self.logs()
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

/// Service `service`'s entry of `GET /v1/delivery` (`Null` when it has none).
async fn delivery_of(f: &Fixture, service: &str) -> serde_json::Value {
    let (code, body) = http(&f.agent().socket, "GET", "/v1/delivery", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let key = format!("{}/{service}", f.run);
    v["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == key.as_str())
        .cloned()
        .unwrap_or_default()
}

/// Waits until service `service` shows `n` successful deliveries (the count is kept
/// once the rotation reported back, after the container is swapped).
async fn until_delivered(f: &Fixture, service: &str, n: u64) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = delivery_of(f, service).await;
        if s["delivered"].as_u64() == Some(n) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{service}: not {n} deliveries within 30 s: {s}\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Service `service`'s last finished rotation as `GET /v1/services` shows it (from the
/// rotation history in the state directory).
async fn last_rotation(f: &Fixture, service: &str) -> serde_json::Value {
    let (code, body) = http(&f.agent().socket, "GET", "/v1/services", "").await.unwrap();
    assert_eq!(code, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v.as_array()
        .unwrap_or_else(|| panic!("GET /v1/services: {v}"))
        .iter()
        .find(|s| s["service"]["project"] == f.run.as_str() && s["service"]["service"] == service)
        .map(|s| s["last"].clone())
        .unwrap_or_else(|| panic!("no service {service} in {v}"))
}

/// Waits until the file at `path` in the one running container of the run (other than
/// `not`) reads `want`; returns the container.
async fn serving(f: &Fixture, service: Option<&str>, not: &str, path: &str, want: &[u8]) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let id = f.delivered_of(service, not).await;
        let (code, body) = get(&id, &format!("/file?path={path}")).await;
        if code == 200 && body == want {
            return id;
        }
        assert!(
            Instant::now() < deadline,
            "{path} never read {:?} (last: {code} {:?}):\n{}",
            String::from_utf8_lossy(want),
            String::from_utf8_lossy(&body),
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
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
    assert_eq!((code, body.as_slice()), (200, FILE_V1), "{}", f.logs());
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
            f.logs()
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
    assert_eq!((code, body.as_slice()), (200, ENV_V1), "{}", f.logs());
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
        assert!(Instant::now() < deadline, "no SIGHUP within 30 s: {}", f.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(f.running(), vec![id.clone()], "signal keeps the container");
    // Both deliveries show in /metrics once their rotations reported back: one rotation
    // each (the signal one under `signal`), and one latency observation each.
    let sample = |text: &str, series: &str| -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .map(|v| v.trim().parse().unwrap())
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let text = loop {
        let (code, text) = http(&f.agent().socket, "GET", "/metrics", "").await.unwrap();
        assert_eq!(code, 200);
        if sample(&text, "dso_delivery_latency_seconds_count") == Some(2.0) {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "two deliveries not in /metrics: {text}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let done: f64 = text
        .lines()
        .filter(|l| l.starts_with("dso_rotations_total{") && l.contains("result=\"done\""))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
        .sum();
    assert_eq!(done, 2.0, "{text}");
    assert_eq!(
        sample(&text, "dso_rotations_total{strategy=\"signal\",result=\"done\"}"),
        Some(1.0),
        "{text}"
    );
    let sum = sample(&text, "dso_delivery_latency_seconds_sum").unwrap();
    assert!(sum > 0.0, "{text}");
    let service = format!("{}/web", f.run);
    assert_eq!(
        sample(
            &text,
            &format!("dso_delivery_rotations_total{{service=\"{service}\",result=\"ok\"}}")
        ),
        Some(2.0),
        "{text}"
    );
    // Recorded, not asserted: first delivery (a replacement) plus one signal delivery.
    eprintln!("delivery latency: {sum:.3} s for 2 deliveries");
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
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(f.running(), vec![blue.clone()], "blue keeps serving");
    let (code, body) = get(&blue, "/file?path=/run/secrets/pw").await;
    assert_eq!((code, body.as_slice()), (200, OK_V1), "blue keeps the old value");
}

fn unix_ms(t: SystemTime) -> u64 {
    u64::try_from(t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()).unwrap()
}

/// A private `moto_server` (`$DSO_MOTO_SERVER`, else the virtualenv `ensure_moto` makes)
/// on a free loopback port, killed on drop. Never skipped: a missing moto fails the test.
struct Moto {
    child: std::process::Child,
    addr: SocketAddr,
    err: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    fn start() -> Moto {
        let bin = std::env::var_os("DSO_MOTO_SERVER").map_or_else(
            || PathBuf::from("/opt/dso-moto-venv/bin/moto_server"),
            PathBuf::from,
        );
        assert!(
            bin.is_file(),
            "moto_server {} not found: run `source .ci/services.sh && ensure_moto` and export DSO_MOTO_SERVER",
            bin.display()
        );
        let mut last = String::new();
        // A port seen free can be taken before moto binds it: retry on another.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let err = dir.path().join("moto.err");
            let port = std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port();
            let child = StdCommand::new(&bin)
                .args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&err).unwrap())
                .env("AWS_CONFIG_FILE", "/dev/null")
                .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start moto_server {}: {e}", bin.display()));
            let mut moto = Moto {
                child,
                addr: ([127, 0, 0, 1], port).into(),
                err,
                _dir: dir,
            };
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                if let Some(status) = moto.child.try_wait().unwrap() {
                    last = format!(
                        "exited with {status}: {}",
                        std::fs::read_to_string(&moto.err).unwrap_or_default()
                    );
                    break;
                }
                if std::net::TcpStream::connect_timeout(&moto.addr, Duration::from_millis(200)).is_ok() {
                    return moto;
                }
                if Instant::now() > deadline {
                    last = "no answer within 60 s".to_owned();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!("moto_server did not start: {last}");
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// One Secrets Manager call (`secretsmanager.TARGET`, the JSON 1.1 protocol of the
    /// published API) in region us-east-1; moto checks no signature. Returns the JSON answer.
    async fn call(&self, target: &str, body: serde_json::Value) -> serde_json::Value {
        let body = body.to_string();
        let req = format!(
            "POST / HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/x-amz-json-1.1\r\n\
X-Amz-Target: secretsmanager.{target}\r\nX-Amz-Date: 20260101T000000Z\r\n\
Authorization: AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/secretsmanager/aws4_request, SignedHeaders=host;x-amz-date;x-amz-target, Signature=0000\r\n\
Content-Length: {len}\r\n\r\n{body}",
            addr = self.addr,
            len = body.len(),
        );
        let mut s = TcpStream::connect(self.addr).await.unwrap();
        s.write_all(req.as_bytes()).await.unwrap();
        let mut buf = Vec::new();
        tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .expect("moto answered in time")
            .unwrap();
        let text = String::from_utf8_lossy(&buf).to_string();
        let (head, json) = text.split_once("\r\n\r\n").expect("an HTTP answer");
        assert!(
            head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
            "{target}: {text}"
        );
        // moto answers with a plain body (no chunking) for these calls.
        serde_json::from_str(json.trim()).unwrap_or_else(|e| panic!("{target}: {e}: {text}"))
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

const AWS_V1: &[u8] = b"aws-v1-Rb7c-secret";
const AWS_V2: &[u8] = b"aws-v2-Mn4e-secret";

/// Issue 10, test 4: an `aws` provider served by a real moto_server; `PutSecretValue`
/// leads to the rotation within one poll interval plus its jitter (plus the rotation's
/// own time, which the rotation history reports).
#[tokio::test]
async fn aws_put_secret_value_rotates_within_one_poll_interval() {
    let moto = Moto::start();
    let created = moto
        .call(
            "CreateSecret",
            serde_json::json!({"Name": "dso/it/db_password", "SecretString": std::str::from_utf8(AWS_V1).unwrap()}),
        )
        .await;
    assert!(created["VersionId"].is_string(), "{created}");
    let mut f = Fixture::prepare("aws", &[]).await;
    f.container("web", &["dso.secrets=db"], &["--user", "1000"]);
    let providers = format!(
        "  aws:\n    type: aws\n    region: us-east-1\n    endpoint_url: {}\n    auth:\n      method: env\n",
        moto.url()
    );
    f.configure(AgentConfig {
        providers: &providers,
        // One poll period of 1 s at all times (no backoff while nothing changes), full
        // jitter inside it.
        watch: "    polling_interval: 1s\n    max_interval: 1s\n    debounce: 0s\n",
        secrets: "  - name: db\n    provider: aws\n    mappings:\n      db_password: dso/it/db_password\n    rotation:\n      strategy: rolling\n",
        env: &[
            ("AWS_ACCESS_KEY_ID", "testing"),
            ("AWS_SECRET_ACCESS_KEY", "testing"),
            ("AWS_CONFIG_FILE", "/dev/null"),
            ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
            ("AWS_EC2_METADATA_DISABLED", "true"),
        ],
    });
    f.start_agent().await;
    let first = serving(&f, None, "", "/run/secrets/db_password", AWS_V1).await;
    until_delivered(&f, "web", 1).await;
    let before = last_rotation(&f, "web").await;

    let t = Instant::now();
    let put_ms = unix_ms(SystemTime::now());
    let put = moto
        .call(
            "PutSecretValue",
            serde_json::json!({"SecretId": "dso/it/db_password", "SecretString": std::str::from_utf8(AWS_V2).unwrap()}),
        )
        .await;
    assert!(put["VersionId"].is_string(), "{put}");
    let second = serving(&f, None, &first, "/run/secrets/db_password", AWS_V2).await;
    let total = t.elapsed();
    let status = until_delivered(&f, "web", 2).await;
    assert_eq!(
        status["versions"]["dso/it/db_password"], put["VersionId"],
        "the delivered version is PutSecretValue's: {status}"
    );
    let last = last_rotation(&f, "web").await;
    assert_ne!(last["rotation"], before["rotation"], "{last}");
    assert_eq!(last["result"], "done", "{last}");
    assert_eq!(last["container"].as_str(), Some(second.as_str()), "{last}");
    // Detection: from the put to the start of the rotation (the history's start time, the
    // same host clock). The next poll comes at most one period plus its full jitter
    // (1 s + 1 s) after the put; DescribeSecret, GetSecretValue and the submit get 500 ms.
    let detection = last["started_at_ms"].as_u64().unwrap().saturating_sub(put_ms);
    let took = last["took_ms"].as_u64().unwrap();
    eprintln!(
        "PutSecretValue -> rotation started: {detection} ms; rotation took {took} ms; -> new container serving the new file (as this test polls): {} ms",
        total.as_millis()
    );
    assert!(
        detection <= 2500,
        "the rotation started {detection} ms after PutSecretValue; the bound is 1 s interval + 1 s jitter + 500 ms:\n{}",
        f.logs()
    );
    // And the new file is read in the new container within that bound plus the rotation's
    // own time, plus 1.5 s for this test's polling (docker ps, inspect, an HTTP read).
    assert!(
        total <= Duration::from_millis(2500 + took + 1500),
        "the new file arrived {total:?} after PutSecretValue (rotation {took} ms)"
    );
    let log = f.full_logs();
    let inspect = docker(&["inspect", &second]);
    for v in [AWS_V1, AWS_V2] {
        let v = std::str::from_utf8(v).unwrap();
        assert!(!log.contains(v), "value in the agent log");
        assert!(!inspect.contains(v), "value in docker inspect");
    }
}

const RS_V1: &[u8] = b"restart-v1-Hd3q-secret";
const RS_V2: &[u8] = b"restart-v2-Wc8u-secret";

/// Issue 10, test 7: an agent restart on the same state directory and tmpfs root rotates
/// nothing (the container, its files, the history and the applied record stay); a change
/// made while the agent is down is applied once when it comes back.
#[tokio::test]
async fn agent_restart_rotates_nothing_and_applies_a_change_made_while_down_once() {
    let mut f = Fixture::start(
        "restart",
        &[("app/pw", RS_V1)],
        "  - name: pw\n    provider: local\n    mappings:\n      pw: app/pw\n    rotation:\n      strategy: rolling\n",
        &["dso.secrets=pw"],
        &[],
    )
    .await;
    let first = serving(&f, None, "", "/run/secrets/pw", RS_V1).await;
    until_delivered(&f, "web", 1).await;
    let history = last_rotation(&f, "web").await;
    let instance = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"dso.delivery.instance\"}}",
        &first,
    ]);

    // Restart with nothing changed: nothing rotates.
    f.stop_agent().await;
    assert!(
        f.root.join(&instance).is_dir(),
        "the running container's directory stays when the agent stops"
    );
    f.start_agent().await;
    // Settle: several polls (1 s) and scans; a first-delivery or orphan-sweep mistake shows
    // within them.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        f.running(),
        vec![first.clone()],
        "the same container serves:\n{}",
        f.logs()
    );
    let status = delivery_of(&f, "web").await;
    assert_eq!(status["delivered"], 0, "no delivery by the new process: {status}");
    assert_eq!(status["failed"], 0, "{status}");
    assert_eq!(
        last_rotation(&f, "web").await,
        history,
        "the rotation history is unchanged"
    );
    assert!(
        f.root.join(&instance).is_dir(),
        "the start-up sweep kept the adopted container's directory:\n{}",
        f.logs()
    );
    let (code, body) = get(&first, "/file?path=/run/secrets/pw").await;
    assert_eq!((code, body.as_slice()), (200, RS_V1), "the file is still there");

    // A change while the agent is down is applied once when it starts again.
    f.stop_agent().await;
    f.set("app/pw", RS_V2).await;
    f.start_agent().await;
    let second = serving(&f, None, &first, "/run/secrets/pw", RS_V2).await;
    until_delivered(&f, "web", 1).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        f.running(),
        vec![second.clone()],
        "one new container:\n{}",
        f.logs()
    );
    let status = delivery_of(&f, "web").await;
    assert_eq!(status["delivered"], 1, "applied exactly once: {status}");
    let last = last_rotation(&f, "web").await;
    assert_ne!(last["rotation"], history["rotation"], "{last}");
    assert_eq!(last["result"], "done", "{last}");
    assert!(
        !f.root.join(&instance).exists(),
        "the replaced container's directory was wiped"
    );
}

const TWO_V1: &[u8] = b"shared-v1-Pq2d";
const TWO_V2: &[u8] = b"shared-v2-Lx7t";

/// One change consumed by two services rotates each of them once.
#[tokio::test]
async fn one_change_consumed_by_two_services_rotates_each_once() {
    let mut f = Fixture::prepare("two", &[("app/shared", TWO_V1)]).await;
    f.container("web", &["dso.secrets=shared"], &[]);
    f.container("api", &["dso.secrets=shared"], &[]);
    f.configure(AgentConfig {
        providers: "",
        watch: AgentConfig::WATCH,
        secrets: "  - name: shared\n    provider: local\n    mappings:\n      shared: app/shared\n    rotation:\n      strategy: rolling\n",
        env: &[],
    });
    f.start_agent().await;
    let mut ids = Vec::new();
    for svc in ["web", "api"] {
        ids.push(serving(&f, Some(svc), "", "/run/secrets/shared", TWO_V1).await);
        until_delivered(&f, svc, 1).await;
    }
    f.set("app/shared", TWO_V2).await;
    for (svc, old) in ["web", "api"].into_iter().zip(&ids) {
        serving(&f, Some(svc), old, "/run/secrets/shared", TWO_V2).await;
        until_delivered(&f, svc, 2).await;
    }
    // Settle: no second rotation of either.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for svc in ["web", "api"] {
        let s = delivery_of(&f, svc).await;
        assert_eq!(s["delivered"], 2, "{svc} rotated once for the change: {s}");
        assert_eq!(f.running_of(Some(svc)).len(), 1, "{svc}: one container");
    }
}

const A_V1: &[u8] = b"pair-a-v1-Tt5r";
const A_V2: &[u8] = b"pair-a-v2-Yy3e";
const B_V1: &[u8] = b"pair-b-v1-Gg8w";
const B_V2: &[u8] = b"pair-b-v2-Jj1k";

/// A service consuming two secrets changed within one debounce window rotates once, with
/// both new values.
#[tokio::test]
async fn two_secrets_changed_in_one_debounce_window_rotate_once_with_both() {
    let mut f = Fixture::prepare("pair", &[("app/a", A_V1), ("app/b", B_V1)]).await;
    f.container("web", &["dso.secrets=sa,sb"], &[]);
    f.configure(AgentConfig {
        providers: "",
        watch: "    polling_interval: 1s\n    debounce: 2s\n",
        secrets: concat!(
            "  - name: sa\n    provider: local\n    mappings:\n      a: app/a\n    rotation:\n      strategy: rolling\n",
            "  - name: sb\n    provider: local\n    mappings:\n      b: app/b\n    rotation:\n      strategy: rolling\n",
        ),
        env: &[],
    });
    f.start_agent().await;
    let first = serving(&f, None, "", "/run/secrets/b", B_V1).await;
    let (code, body) = get(&first, "/file?path=/run/secrets/a").await;
    assert_eq!((code, body.as_slice()), (200, A_V1));
    until_delivered(&f, "web", 1).await;

    f.set("app/a", A_V2).await;
    f.set("app/b", B_V2).await;
    let second = serving(&f, None, &first, "/run/secrets/b", B_V2).await;
    let (code, body) = get(&second, "/file?path=/run/secrets/a").await;
    assert_eq!(
        (code, body.as_slice()),
        (200, A_V2),
        "both values are new in the one rotation"
    );
    until_delivered(&f, "web", 2).await;
    // Settle past another debounce window and poll: no second rotation.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(f.running(), vec![second.clone()], "{}", f.logs());
    let s = delivery_of(&f, "web").await;
    assert_eq!(s["delivered"], 2, "one rotation for both changes: {s}");
}

const LOST_V1: &[u8] = b"lost-v1-Ue6v-secret";

/// The agent's tmpfs is lost while it is down (as at a host reboot: RAM is gone, the state
/// directory on disk still records the delivered versions) and Docker restarts the
/// container, recreating its bind source empty. At the next start the container, which
/// still carries `dso.delivery.instance`, has no secret files: it gets a first delivery.
#[tokio::test]
async fn agent_start_after_its_tmpfs_was_lost_delivers_again() {
    let mut f = Fixture::start(
        "lost",
        &[("app/pw", LOST_V1)],
        "  - name: pw\n    provider: local\n    mappings:\n      pw: app/pw\n    rotation:\n      strategy: rolling\n",
        &["dso.secrets=pw"],
        &[],
    )
    .await;
    let first = serving(&f, None, "", "/run/secrets/pw", LOST_V1).await;
    until_delivered(&f, "web", 1).await;
    f.stop_agent().await;
    let umount = StdCommand::new("umount").arg("-l").arg(&f.root).output().unwrap();
    assert!(
        umount.status.success(),
        "umount {}: {}",
        f.root.display(),
        String::from_utf8_lossy(&umount.stderr)
    );
    docker(&["restart", "-t", "2", &first]);
    let (code, _) = get(&first, "/file?path=/run/secrets/pw").await;
    assert_ne!(code, 200, "the restarted container has no secret file any more");
    f.start_agent().await;
    let second = serving(&f, None, &first, "/run/secrets/pw", LOST_V1).await;
    until_delivered(&f, "web", 1).await;
    assert_eq!(f.running(), vec![second.clone()], "{}", f.logs());

    // The same when the root is a tmpfs again but fresh (a host whose /run is a tmpfs):
    // Docker recreates the container's directory there, empty.
    f.stop_agent().await;
    let instance = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"dso.delivery.instance\"}}",
        &second,
    ]);
    std::fs::remove_dir_all(f.root.join(&instance)).unwrap();
    docker(&["restart", "-t", "2", &second]);
    let group = std::fs::read_dir(f.root.join(&instance)).unwrap().count();
    assert_eq!(group, 1, "Docker recreated the bind source");
    let (code, _) = get(&second, "/file?path=/run/secrets/pw").await;
    assert_ne!(code, 200, "the restarted container has no secret file");
    f.start_agent().await;
    let third = serving(&f, None, &second, "/run/secrets/pw", LOST_V1).await;
    until_delivered(&f, "web", 1).await;
    assert_eq!(f.running(), vec![third], "{}", f.logs());
}

const KEEP_V1: &[u8] = b"keep-good-Aa4z";
const KEEP_V2: &[u8] = b"keep-good-Bb5y";

/// A version whose rotation rolled back is not tried again after an agent restart (only a
/// new version or `dso rotate SERVICE --force` retries it); `/v1/delivery` of the new
/// process still shows it as failed.
#[tokio::test]
async fn a_failed_version_is_not_retried_after_an_agent_restart() {
    let mut f = Fixture::start(
        "failkeep",
        &[("app/pw", KEEP_V1)],
        "  - name: pw\n    provider: local\n    mappings:\n      pw: app/pw\n",
        &[
            "dso.secrets=pw",
            "dso.update.strategy=rolling",
            "dso.health.timeout=3s",
        ],
        &["-e", "HEALTH_FILE=/run/secrets/pw", "-e", "UNHEALTHY_IF=bad"],
    )
    .await;
    let blue = serving(&f, None, "", "/run/secrets/pw", KEEP_V1).await;
    until_delivered(&f, "web", 1).await;
    f.set("app/pw", b"bad").await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivery_of(&f, "web").await["failed"] != 1 {
        assert!(
            Instant::now() < deadline,
            "no failed delivery within 30 s:\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let failed = delivery_of(&f, "web").await["failed_versions"].clone();
    let history = last_rotation(&f, "web").await;
    assert!(
        history["result"] == "rolled_back" || history["result"] == "failed",
        "{history}"
    );

    f.stop_agent().await;
    f.start_agent().await;
    // Settle: a retry would start within a poll (1 s) and roll back within the 3 s health
    // timeout.
    tokio::time::sleep(Duration::from_secs(7)).await;
    assert_eq!(
        last_rotation(&f, "web").await,
        history,
        "no rotation was tried again:\n{}",
        f.logs()
    );
    assert_eq!(f.running(), vec![blue.clone()], "blue keeps serving");
    let status = delivery_of(&f, "web").await;
    assert_eq!(
        status["failed_versions"], failed,
        "the failed version is still shown: {status}"
    );
    assert_eq!(
        (status["delivered"].as_u64(), status["failed"].as_u64()),
        (Some(0), Some(0)),
        "{status}"
    );
    let (code, body) = get(&blue, "/file?path=/run/secrets/pw").await;
    assert_eq!(
        (code, body.as_slice()),
        (200, KEEP_V1),
        "blue keeps the old value"
    );

    // A new version is delivered as usual, and the failed record goes.
    f.set("app/pw", KEEP_V2).await;
    serving(&f, None, &blue, "/run/secrets/pw", KEEP_V2).await;
    let status = until_delivered(&f, "web", 1).await;
    assert_eq!(status["failed_versions"], serde_json::json!({}), "{status}");
}

const GONE_V1: &[u8] = b"gone-v1-Nn2b-secret";

/// A container removed while the agent is down leaves its directory behind; the orphan
/// sweep at the next start wipes it, and nothing is rotated or recreated.
#[tokio::test]
async fn agent_start_sweeps_the_directory_of_a_container_removed_while_it_was_down() {
    let mut f = Fixture::start(
        "gone",
        &[("app/pw", GONE_V1)],
        "  - name: pw\n    provider: local\n    mappings:\n      pw: app/pw\n    rotation:\n      strategy: rolling\n",
        &["dso.secrets=pw"],
        &[],
    )
    .await;
    let id = serving(&f, None, "", "/run/secrets/pw", GONE_V1).await;
    until_delivered(&f, "web", 1).await;
    let instance = docker(&[
        "inspect",
        "-f",
        "{{index .Config.Labels \"dso.delivery.instance\"}}",
        &id,
    ]);
    f.stop_agent().await;
    docker(&["rm", "-f", &id]);
    assert!(
        f.root.join(&instance).is_dir(),
        "no agent: the directory is still there"
    );
    f.start_agent().await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while f.root.join(&instance).exists() {
        assert!(
            Instant::now() < deadline,
            "the orphan {instance} was not swept within 10 s of the start:\n{}",
            f.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(f.running().is_empty(), "nothing was recreated");
    assert_on_no_disk(&f, GONE_V1);
}

/// Events of a secret-triggered rotation that rolls back (issue 11): `dso watch --json`
/// sees `secret.changed`, the rotation with `trigger: secret`, its `rolled_back` step,
/// `rotation.rolled_back`, `rotation.failed` and `delivery.failed`, and neither value.
#[tokio::test]
async fn a_rolled_back_delivery_is_seen_on_the_event_stream_without_values() {
    const GOOD: &[u8] = b"good-value-of-the-events-test-4Kp";
    const BAD: &str = "bad-value-of-the-events-test-9Wq";
    let f = Fixture::start(
        "evrollback",
        &[("app/pw", GOOD)],
        "  - name: pw\n    provider: local\n    mappings:\n      pw: app/pw\n",
        &[
            "dso.secrets=pw",
            "dso.update.strategy=rolling",
            "dso.health.timeout=3s",
        ],
        &[
            "-e",
            "HEALTH_FILE=/run/secrets/pw",
            "-e",
            &format!("UNHEALTHY_IF={BAD}"),
        ],
    )
    .await;
    f.delivered("").await;
    let mut watch = crate::events::Watch::start(
        &f.agent().socket,
        &["--json", "--kinds", "rotation,delivery,secret"],
    )
    .await;
    f.set("app/pw", BAD.as_bytes()).await;
    let events = watch
        .until(Duration::from_secs(60), |v| v["kind"] == "delivery.failed")
        .await;
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let pos = |k: &str| {
        kinds
            .iter()
            .position(|x| *x == k)
            .unwrap_or_else(|| panic!("{k} missing in {kinds:?}"))
    };
    assert!(pos("rotation.started") < pos("rotation.rolled_back"), "{kinds:?}");
    assert!(pos("rotation.rolled_back") < pos("rotation.failed"), "{kinds:?}");
    assert!(pos("rotation.failed") < pos("delivery.failed"), "{kinds:?}");
    let changed = &events[pos("secret.changed")];
    assert_eq!(changed["data"]["secret"], "pw");
    assert_eq!(changed["data"]["reference"], "app/pw");
    let started = &events[pos("rotation.started")];
    assert_eq!(started["data"]["trigger"], "secret");
    let service = format!("{}/web", f.run);
    assert_eq!(started["data"]["service"], service.as_str());
    assert!(
        events
            .iter()
            .any(|e| e["kind"] == "rotation.step" && e["data"]["step"] == "rolled_back"),
        "{kinds:?}"
    );
    let failed = &events[pos("rotation.failed")];
    assert_eq!(failed["data"]["rolled_back"], true);
    assert!(
        failed["data"]["error"].as_str().unwrap().contains("not healthy"),
        "{failed}"
    );
    let delivery = &events[pos("delivery.failed")];
    assert_eq!(delivery["data"]["service"], service.as_str());
    assert!(delivery["data"]["versions"]["app/pw"].is_string(), "{delivery}");
    // BAD is also the container's UNHEALTHY_IF variable from its start, before it was a
    // secret (bollard logs inspected configurations at debug level): the log is checked for
    // GOOD only, the stream for both.
    let good = String::from_utf8_lossy(GOOD).into_owned();
    let stream = watch.text();
    assert!(
        !stream.contains(&good),
        "the event stream holds the good value:\n{stream}"
    );
    assert!(
        !stream.contains(BAD),
        "the event stream holds the bad value:\n{stream}"
    );
    assert!(
        !f.full_logs().contains(&good),
        "the agent log holds the good value"
    );
}
