//! The Docker Swarm secret driver (issue 12) against the real engine: `docker swarm init`
//! on loopback, a real agent process serving `/run/docker/plugins/<driver>.sock`, a
//! `docker secret create --driver` secret mapped to the local vault by its labels, and
//! services from `dso-testsrv:test` whose tasks read `/run/secrets/NAME`.
//!
//! Every test here takes one file lock (two swarm tests never run at once, also across
//! test processes), leaves a swarm left over from a crashed run first, and leaves the
//! swarm at the end whatever happens (the guard's `Drop`). They fail (never skip) when
//! Docker or the image is missing.

use std::collections::BTreeSet;
use std::path::Path;
use std::process::{Command as StdCommand, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{Agent, assert_no_value, docker, http, stderr};

/// Held for a whole swarm test: `flock` on a file every swarm test opens.
const LOCK: &str = "/tmp/dso-it-swarm.lock";

fn image() -> String {
    std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned())
}

/// `docker ARGS`: (success, stdout, stderr), never failing the test by itself.
fn docker_try(args: &[&str]) -> (bool, String, String) {
    let out = StdCommand::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker ({e}): run `bash .ci/services.sh docker` first"));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).trim().to_owned(),
    )
}

fn swarm_state() -> String {
    docker(&["info", "--format", "{{.Swarm.LocalNodeState}}"])
}

/// The swarm of one test: the lock, the swarm on loopback, and everything the test
/// created (services first, so their containers go, then the swarm).
struct Swarm {
    _lock: std::fs::File,
    run: String,
}

impl Swarm {
    fn init(tag: &str) -> Swarm {
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK)
            .unwrap();
        lock.lock().unwrap();
        if swarm_state() != "inactive" {
            // A crashed run (or one killed before its Drop) left the node in a swarm.
            eprintln!("swarm test: leaving a swarm left over from an earlier run");
            let (ok, _, err) = docker_try(&["swarm", "leave", "--force"]);
            assert!(ok, "docker swarm leave --force: {err}");
        }
        let guard = Swarm {
            _lock: lock,
            run: format!("dsosw{}{tag}", std::process::id()),
        };
        docker(&["swarm", "init", "--advertise-addr", "127.0.0.1"]);
        guard
    }

    /// A name unique to this run.
    fn name(&self, what: &str) -> String {
        format!("{}{what}", self.run)
    }
}

impl Drop for Swarm {
    fn drop(&mut self) {
        let (_, services, _) = docker_try(&[
            "service",
            "ls",
            "-q",
            "--filter",
            &format!("label=dso.test.swarm={}", self.run),
        ]);
        for s in services.lines().filter(|l| !l.is_empty()) {
            let _ = docker_try(&["service", "rm", s]);
        }
        let (ok, _, err) = docker_try(&["swarm", "leave", "--force"]);
        if !ok {
            eprintln!("swarm test: docker swarm leave --force failed: {err}");
        }
    }
}

/// A local vault and an agent whose config serves the driver `driver` with `policy`.
struct Vault {
    dir: tempfile::TempDir,
}

impl Vault {
    async fn new() -> Vault {
        let v = Vault {
            dir: tempfile::tempdir().unwrap(),
        };
        let out = v.dso(None, &["init"], b"").await;
        assert!(out.status.success(), "dso init: {}", stderr(&out));
        v
    }

    /// `dso [--socket S] ARGS` with the vault's files and `stdin`.
    async fn dso(&self, socket: Option<&Path>, args: &[&str], stdin: &[u8]) -> Output {
        let no_agent = self.dir.path().join("no-agent.sock");
        crate::harness::dso_vault(self.dir.path(), Some(socket.unwrap_or(&no_agent)), args, stdin).await
    }

    /// `dso secret set NAME` (the value on stdin), through the agent when given.
    async fn set(&self, agent: Option<&Agent>, name: &str, value: &[u8]) {
        let out = self
            .dso(agent.map(|a| a.socket.as_path()), &["secret", "set", name], value)
            .await;
        assert!(out.status.success(), "dso secret set {name}: {}", stderr(&out));
    }

    async fn agent(&self, driver: &str, policy: &str) -> Agent {
        self.agent_with(driver, policy, "").await
    }

    /// [`Vault::agent`] with `extra` appended to the config (e.g. a `secrets:` list).
    async fn agent_with(&self, driver: &str, policy: &str, extra: &str) -> Agent {
        let extra = extra.to_owned();
        let v = self.dir.path().display().to_string();
        let driver = driver.to_owned();
        let policy = policy.to_owned();
        let state = self.dir.path().join("state");
        let state = state.to_str().unwrap().to_owned();
        Agent::start_with(
            move |_| {
                format!(
                    "version: v1.0.0\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n\
agent:\n  watch:\n    polling_interval: 1s\n    debounce: 0s\n  http:\n    listen: off\n\
proxy:\n  listeners: []\n\
swarm:\n  driver: {driver}\n  scan_interval: 1s\n  policy:\n{policy}{extra}"
                )
            },
            &["--state-dir", &state],
            "trace",
        )
        .await
    }
}

/// The tasks of `service` as `docker service ps` shows them: (name, current state, error).
fn tasks(service: &str) -> Vec<(String, String, String)> {
    docker(&[
        "service",
        "ps",
        service,
        "--no-trunc",
        "--format",
        "{{.Name}}\t{{.CurrentState}}\t{{.Error}}",
    ])
    .lines()
    .map(|l| {
        let mut f = l.splitn(3, '\t');
        (
            f.next().unwrap_or("").to_owned(),
            f.next().unwrap_or("").to_owned(),
            f.next().unwrap_or("").to_owned(),
        )
    })
    .collect()
}

/// Tasks of `service` Swarm reports running (one API call: a consistent count).
fn running_tasks(service: &str) -> usize {
    tasks(service)
        .iter()
        .filter(|(_, state, _)| state.starts_with("Running"))
        .count()
}

/// The running containers of `service`.
fn containers(service: &str) -> Vec<String> {
    docker(&[
        "ps",
        "-q",
        "--no-trunc",
        "--filter",
        &format!("label=com.docker.swarm.service.name={service}"),
    ])
    .lines()
    .map(str::to_owned)
    .collect()
}

/// `/run/secrets/NAME` inside a container, read by the test server's `cat` (a scratch
/// image has no shell); `None` when the exec fails.
fn read_secret(container: &str, name: &str) -> Option<Vec<u8>> {
    let out = StdCommand::new("docker")
        .args([
            "exec",
            container,
            "/dso-testsrv",
            "cat",
            &format!("/run/secrets/{name}"),
        ])
        .output()
        .unwrap();
    out.status.success().then_some(out.stdout)
}

/// Whether the test server in `container` answers its health endpoint on the
/// container's own loopback (the probe runs inside it).
fn serves(container: &str) -> bool {
    StdCommand::new("docker")
        .args([
            "exec",
            container,
            "/dso-testsrv",
            "probe",
            "127.0.0.1:8081/health",
            "--timeout",
            "2s",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn running(container: &str) -> bool {
    docker_try(&["inspect", "-f", "{{.State.Running}}", container]).1 == "true"
}

/// Waits until `check` holds, failing with `what` and the agent's log after `within`.
async fn until(within: Duration, what: &str, agent: &Agent, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(
            Instant::now() < deadline,
            "{what} not within {within:?}; agent log:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The replicas of `service`, each read at `/run/secrets/{target}`, once every running
/// container reads `want`.
async fn all_read(agent: &Agent, service: &str, target: &str, replicas: usize, want: &[u8]) -> Vec<String> {
    let mut last = Vec::new();
    until(
        Duration::from_secs(90),
        "every replica reading the expected value",
        agent,
        || {
            last = containers(service);
            last.len() == replicas
                && last
                    .iter()
                    .all(|c| read_secret(c, target).as_deref() == Some(want))
        },
    )
    .await;
    last
}

async fn metric(agent: &Agent, line: &str) -> u64 {
    let (code, body) = http(&agent.socket, "GET", "/metrics", "").await.unwrap();
    assert_eq!(code, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(line).map(|v| v.trim().parse::<u64>().unwrap()))
        .unwrap_or_else(|| panic!("no {line} in /metrics:\n{body}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_driver_serves_rolls_on_a_change_with_replicas_serving_and_denies_other_services() {
    let swarm = Swarm::init("a");
    let vault = Vault::new().await;
    let v1: &[u8] = b"swarm-first-value-7d1f0c";
    let v2: &[u8] = b"swarm-second-value-93be4a";
    vault.set(None, "app/db", v1).await;
    let driver = swarm.name("drv");
    let secret = swarm.name("db");
    let web = swarm.name("web");
    let denied = swarm.name("other");
    let policy = format!("    - secrets: [\"{secret}\"]\n      services: [\"{web}\"]\n");
    let agent = vault.agent(&driver, &policy).await;
    let socket = format!("/run/docker/plugins/{driver}.sock");
    let mode =
        std::fs::metadata(&socket).map(|m| std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o777);
    assert_eq!(mode.ok(), Some(0o600), "{socket} mode");

    let label = format!("dso.test.swarm={}", swarm.run);
    docker(&[
        "secret",
        "create",
        "--driver",
        &driver,
        "--label",
        "dso.ref=app/db",
        "--label",
        &label,
        &secret,
    ]);
    // Two replicas; the secret's target stays `db` through every version.
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &web,
        "--label",
        &label,
        "--replicas",
        "2",
        "--secret",
        &format!("source={secret},target=db"),
        &image(),
    ]);
    let first = all_read(&agent, &web, "db", 2, v1).await;
    // Running in Swarm's eyes: the image's HEALTHCHECK passed (until then a task is
    // `starting`).
    until(Duration::from_secs(60), "both replicas running", &agent, || {
        running_tasks(&web) == 2
    })
    .await;
    // The agent watches the secret from its next scan on (the baseline: nothing rolls).
    until(
        Duration::from_secs(30),
        "the swarm secret watched",
        &agent,
        || agent.log().contains("its current version is the baseline"),
    )
    .await;

    // A change through the agent: a new version, the service rolled start-first while
    // Swarm reports both replicas running and every running container answers.
    let changed = Instant::now();
    vault.set(Some(&agent), "app/db", v2).await;
    // Swarm's count of running tasks, sampled on its own thread (one API call each: a
    // consistent count) until the update completed.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (stop, web) = (std::sync::Arc::clone(&stop), web.clone());
        std::thread::spawn(move || {
            let (mut min, mut samples) = (usize::MAX, 0u32);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = running_tasks(&web);
                if r < 2 {
                    eprintln!("swarm: {r} running: {:?}", tasks(&web));
                }
                min = min.min(r);
                samples += 1;
            }
            (min, samples)
        })
    };
    let mut probes = 0;
    let mut probe_failures = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    let new = loop {
        for c in containers(&web) {
            // A failed probe counts only when the container still runs afterwards (a
            // container Swarm is stopping is not a replica any more).
            probes += 1;
            if !serves(&c) && running(&c) {
                probe_failures.push(c);
            }
        }
        let now = containers(&web);
        if now.len() == 2
            && now.iter().all(|c| !first.contains(c))
            && now.iter().all(|c| read_secret(c, "db").as_deref() == Some(v2))
            && docker(&["service", "inspect", &web, "--format", "{{.UpdateStatus.State}}"]) == "completed"
        {
            break now;
        }
        assert!(
            Instant::now() < deadline,
            "the service never rolled to the new value:\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (min_running, samples) = sampler.join().unwrap();
    let rolled = changed.elapsed();
    eprintln!(
        "swarm: dso secret set -> both replicas reading the new value, update completed: {} ms; {samples} task-state samples, fewest running tasks {min_running}; {probes} probes of running containers, {} failed",
        rolled.as_millis(),
        probe_failures.len()
    );
    assert!(
        min_running >= 2,
        "a moment with {min_running} running task(s) during the roll"
    );
    assert!(
        probe_failures.is_empty(),
        "running replicas that did not answer: {probe_failures:?}"
    );
    assert_eq!(new.len(), 2);
    let spec = docker(&[
        "service",
        "inspect",
        &web,
        "--format",
        "{{range .Spec.TaskTemplate.ContainerSpec.Secrets}}{{.SecretName}}>{{.File.Name}} {{end}}{{.Spec.UpdateConfig.Order}}",
    ]);
    assert_eq!(spec, format!("{secret}.v2>db start-first"));
    // The first version goes once no task holds it.
    until(
        Duration::from_secs(60),
        "the old secret version removed",
        &agent,
        || {
            let names: BTreeSet<String> = docker(&["secret", "ls", "--format", "{{.Name}}"])
                .lines()
                .map(str::to_owned)
                .collect();
            !names.contains(&secret) && names.contains(&format!("{secret}.v2"))
        },
    )
    .await;
    let log = agent.log();
    assert!(
        log.contains("swarm service updated to the new secret version"),
        "{log}"
    );
    assert!(log.contains("old swarm secret version removed"), "{log}");

    // A service the policy does not name gets an error and no value: its task fails.
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &denied,
        "--label",
        &label,
        "--restart-max-attempts",
        "1",
        "--secret",
        &format!("source={secret}.v2,target=db"),
        &image(),
    ]);
    let mut errors = String::new();
    until(
        Duration::from_secs(60),
        "the denied service's task failing",
        &agent,
        || {
            let t = tasks(&denied);
            errors = t
                .iter()
                .map(|(_, _, e)| e.as_str())
                .collect::<Vec<_>>()
                .join("\n");
            t.iter()
                .any(|(_, state, e)| state.starts_with("Failed") && e.contains("secret"))
        },
    )
    .await;
    eprintln!("swarm: the denied service's task error: {errors}");
    assert!(
        tasks(&denied)
            .iter()
            .all(|(_, state, _)| !state.starts_with("Running")),
        "a denied task ran"
    );
    let log = agent.log();
    let deny = log
        .lines()
        .find(|l| l.contains("swarm secret request denied") && l.contains(&denied))
        .unwrap_or_else(|| panic!("no deny line for {denied}:\n{log}"));
    assert!(deny.contains("decision=\"deny\""), "{deny}");
    assert!(
        log.lines().any(|l| l.contains("swarm secret request allowed")
            && l.contains(&web)
            && l.contains("rule=swarm.policy[0]")),
        "no allow line naming the rule:\n{log}"
    );
    assert!(metric(&agent, "dso_swarm_secret_requests_total{decision=\"allow\"}").await >= 4);
    assert!(metric(&agent, "dso_swarm_secret_requests_total{decision=\"deny\"}").await >= 1);
    assert!(metric(&agent, "dso_swarm_service_updates_total{result=\"done\"}").await >= 1);
    assert!(metric(&agent, "dso_swarm_secret_versions_removed_total").await >= 1);

    // No value in docker inspect of the services and secrets, the tasks' containers, the
    // services' logs, the agent's log (at trace level) or any process's argv.
    let mut seen = String::new();
    for what in [&web, &denied] {
        seen += &docker(&["service", "inspect", what]);
        seen += &docker_try(&["service", "logs", "--raw", what]).1;
    }
    seen += &docker(&["secret", "inspect", &format!("{secret}.v2")]);
    for c in &new {
        seen += &docker(&["inspect", c]);
    }
    assert_no_value("docker inspect and service logs", &seen, &[v1, v2]);
    assert_no_value("the agent's log", &agent.log(), &[v1, v2]);
    let mut argv = String::new();
    for p in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmd) = std::fs::read(p.path().join("cmdline")) {
            argv += &String::from_utf8_lossy(&cmd);
        }
    }
    assert_no_value("argv of the processes", &argv, &[v1, v2]);
    stop_agent(agent, &socket).await;
    drop(swarm);
}

/// SIGTERM: the agent exits 0 and has closed and removed the driver's socket.
async fn stop_agent(mut agent: Agent, socket: &str) {
    agent.signal("TERM");
    let status = tokio::time::timeout(Duration::from_secs(30), agent.child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(
        status.success(),
        "the agent exited with {status}:\n{}",
        agent.log()
    );
    assert!(!Path::new(socket).exists(), "{socket} left behind");
}

/// Waits until a task of `service` failed with an error; returns the agent's log line
/// about it (containing `needle` and the service's name).
async fn failed_with(agent: &Agent, service: &str, needle: &str) -> String {
    until(Duration::from_secs(60), "the task failing", agent, || {
        tasks(service)
            .iter()
            .any(|(_, state, e)| state.starts_with("Failed") && e.contains("secret"))
    })
    .await;
    assert!(
        tasks(service)
            .iter()
            .all(|(_, state, _)| !state.starts_with("Running")),
        "a task of {service} ran"
    );
    let log = agent.log();
    log.lines()
        .find(|l| l.contains(needle) && l.contains(service))
        .unwrap_or_else(|| panic!("no log line with {needle:?} for {service}:\n{log}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn swarm_driver_maps_configured_secrets_keeps_stop_first_for_host_ports_and_refuses_bad_values() {
    let swarm = Swarm::init("b");
    let vault = Vault::new().await;
    let t1: &[u8] = b"swarm-token-one-5c2e81";
    let t2: &[u8] = b"swarm-token-two-0a7d3f";
    vault.set(None, "app/token", t1).await;
    let big = vec![b'x'; 600 * 1024];
    vault.set(None, "app/big", &big).await;
    let driver = swarm.name("drv");
    let policy = format!("    - secrets: [\"*\"]\n      services: [\"{}*\"]\n", swarm.run);
    let secrets = "secrets:\n  - name: tok\n    provider: local\n    mappings:\n      TOKEN: app/token\n";
    let agent = vault.agent_with(&driver, &policy, secrets).await;
    let label = format!("dso.test.swarm={}", swarm.run);

    // dso.secret=NAME: a configured secrets[] entry. The service publishes a port in host
    // mode (the engine picks the host port), so its update cannot be start-first.
    let token = swarm.name("tok");
    docker(&[
        "secret",
        "create",
        "--driver",
        &driver,
        "--label",
        "dso.secret=tok",
        "--label",
        &label,
        &token,
    ]);
    let hostport = swarm.name("hostport");
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &hostport,
        "--label",
        &label,
        "--publish",
        "mode=host,target=8081",
        "--secret",
        &format!("source={token},target=token"),
        &image(),
    ]);
    all_read(&agent, &hostport, "token", 1, t1).await;
    until(
        Duration::from_secs(30),
        "the swarm secret watched",
        &agent,
        || {
            agent
                .log()
                .contains(&format!("its current version is the baseline secret={token}"))
        },
    )
    .await;
    vault.set(Some(&agent), "app/token", t2).await;
    all_read(&agent, &hostport, "token", 1, t2).await;
    let order = docker(&[
        "service",
        "inspect",
        &hostport,
        "--format",
        "{{.Spec.UpdateConfig.Order}}",
    ]);
    assert_ne!(
        order, "start-first",
        "a host-mode port service was set to start-first"
    );
    let log = agent.log();
    let updated = log
        .lines()
        .find(|l| l.contains("swarm service updated") && l.contains(&hostport))
        .unwrap_or_else(|| panic!("no update line for {hostport}:\n{log}"));
    assert!(updated.contains("in host mode"), "{updated}");
    assert!(updated.contains(&format!("to={token}.v2")), "{updated}");

    // No mapping label: the task fails and the log names the labels to add.
    let unmapped = swarm.name("unmapped");
    docker(&[
        "secret", "create", "--driver", &driver, "--label", &label, &unmapped,
    ]);
    let svc = swarm.name("nolabel");
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &svc,
        "--label",
        &label,
        "--restart-max-attempts",
        "1",
        "--secret",
        &unmapped,
        &image(),
    ]);
    let line = failed_with(&agent, &svc, "no value can be given").await;
    assert!(line.contains("has no dso.secret or dso.ref label"), "{line}");

    // A value over Swarm's 500 KiB: an error naming the size and the limit, no value.
    let large = swarm.name("big");
    docker(&[
        "secret",
        "create",
        "--driver",
        &driver,
        "--label",
        "dso.ref=local://app/big",
        "--label",
        &label,
        &large,
    ]);
    let svc = swarm.name("bigsvc");
    docker(&[
        "service",
        "create",
        "--detach",
        "--no-resolve-image",
        "--name",
        &svc,
        "--label",
        &label,
        "--restart-max-attempts",
        "1",
        "--secret",
        &large,
        &image(),
    ]);
    let line = failed_with(&agent, &svc, "no value can be given").await;
    assert!(
        line.contains("614400 bytes") && line.contains("500 KiB"),
        "{line}"
    );
    assert!(metric(&agent, "dso_swarm_secret_read_errors_total").await >= 2);
    assert_no_value("the agent's log", &agent.log(), &[t1, t2]);
    stop_agent(agent, &format!("/run/docker/plugins/{driver}.sock")).await;
    drop(swarm);
}
