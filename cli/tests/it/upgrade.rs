//! Hitless upgrade (`dso agent --upgrade`, SIGUSR2): 10 upgrades in a row under real
//! PostgreSQL load through a proxy listener, with new connections per transaction
//! (`pgbench -C`) and with persistent ones; broken new binaries (one exits 1, one hangs)
//! under load; and an agent managing a Docker container, which must not rotate.
//! PostgreSQL comes from `DSO_PG_BIN` (default /usr/lib/postgresql/15/bin); these tests
//! fail, never skip, when it or Docker is missing.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command as StdCommand, Stdio};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::TcpStream;

use crate::harness::{Agent, docker, http, poll, stderr, stdout};

fn pg_bin(tool: &str) -> PathBuf {
    let dir = std::env::var("DSO_PG_BIN").unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".to_owned());
    let p = Path::new(&dir).join(tool);
    assert!(
        p.exists(),
        "{} missing: install PostgreSQL or set DSO_PG_BIN",
        p.display()
    );
    p
}

/// A private PostgreSQL on loopback (trust auth) with pgbench's tables, stopped on drop.
struct Postgres {
    dir: tempfile::TempDir,
    port: u16,
}

impl Postgres {
    fn start() -> Postgres {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // PostgreSQL refuses to run as root: it runs as `postgres`, which must own the dir.
        let as_pg = |cmd: &Path| {
            let mut c = StdCommand::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(cmd);
            c
        };
        assert!(
            StdCommand::new("chown")
                .arg("postgres:")
                .arg(dir.path())
                .status()
                .unwrap()
                .success()
        );
        let out = as_pg(&pg_bin("initdb"))
            .arg("-D")
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres"])
            .output()
            .unwrap();
        assert!(out.status.success(), "initdb: {}", stderr(&out));
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let opts = format!(
            "-p {port} -k {} -c listen_addresses=127.0.0.1 -c max_connections=100 -c fsync=off -c synchronous_commit=off",
            dir.path().display()
        );
        let out = as_pg(&pg_bin("pg_ctl"))
            .arg("-D")
            .arg(&data)
            .arg("-l")
            .arg(dir.path().join("server.log"))
            .args(["-w", "-t", "60", "-o", &opts, "start"])
            .output()
            .unwrap();
        assert!(out.status.success(), "pg_ctl start: {}", stderr(&out));
        let pg = Postgres { dir, port };
        let out = StdCommand::new(pg_bin("pgbench"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port.to_string(),
                "-U",
                "postgres",
                "-i",
                "-s",
                "1",
                "-q",
                "postgres",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "pgbench -i: {}", stderr(&out));
        pg
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = StdCommand::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(pg_bin("pg_ctl"))
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

/// A pgbench run through `addr` in the background.
fn pgbench(addr: SocketAddr, args: &[&str]) -> tokio::process::Child {
    tokio::process::Command::new(pg_bin("pgbench"))
        .args([
            "-h",
            &addr.ip().to_string(),
            "-p",
            &addr.port().to_string(),
            "-U",
            "postgres",
            "-n",
        ])
        .args(args)
        .arg("postgres")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap()
}

/// Waits for a pgbench run and asserts that it exited 0 with no failed transaction, no
/// aborted client and no connection error. Returns the transactions processed.
async fn assert_clean(run: tokio::process::Child, what: &str) -> u64 {
    let out = tokio::time::timeout(Duration::from_secs(120), run.wait_with_output())
        .await
        .expect("pgbench ended in time")
        .unwrap();
    let (o, e) = (stdout(&out), stderr(&out));
    assert!(
        out.status.success(),
        "{what}: pgbench failed ({}):\n{o}\n{e}",
        out.status
    );
    assert!(
        o.contains("number of failed transactions: 0 "),
        "{what}: failed transactions:\n{o}"
    );
    for bad in ["aborted", "error", "could not connect", "connection to server"] {
        assert!(
            !e.to_lowercase().contains(bad),
            "{what}: pgbench reported {bad:?}:\n{e}"
        );
    }
    let processed = o
        .lines()
        .find_map(|l| l.strip_prefix("number of transactions actually processed: "))
        .and_then(|v| v.split('/').next())
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("{what}: no transaction count:\n{o}"));
    assert!(processed > 0, "{what}: nothing processed:\n{o}");
    processed
}

/// Every agent process a test saw; those still running are killed at the end.
#[derive(Default)]
struct Pids(Vec<u32>);

impl Drop for Pids {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = StdCommand::new("kill").args(["-KILL", &pid.to_string()]).output();
        }
    }
}

/// Whether process `pid` runs (a zombie does not).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat
            .rsplit_once(')')
            .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// `dso agent --upgrade` on `agent`'s socket and config, with `extra` arguments.
async fn upgrade(agent: &Agent, extra: &[&str]) -> std::process::Output {
    let mut args = vec!["agent", "--config"];
    let config = agent.dir.path().join("dso.yaml");
    let config = config.to_str().unwrap().to_owned();
    args.push(&config);
    args.push("--upgrade");
    args.extend_from_slice(extra);
    agent.dso(&args).await
}

/// One successful upgrade: the new pid and the command's accepting time.
async fn upgrade_ok(agent: &Agent) -> (u32, u64, u64) {
    let started = Instant::now();
    let out = upgrade(agent, &["--json"]).await;
    let wall = started.elapsed().as_millis() as u64;
    assert!(
        out.status.success(),
        "upgrade failed: {}\nlog:\n{}",
        stderr(&out),
        agent.log()
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let pid = v["pid"].as_u64().unwrap() as u32;
    (pid, v["accepting_ms"].as_u64().unwrap(), wall)
}

async fn start_agent(backend: SocketAddr) -> Agent {
    Agent::start_with(
        |_| {
            format!(
                "agent:\n  http:\n    listen: off\nproxy:\n  listeners:\n    - name: db\n      listen: 127.0.0.1:0\n      backends: [{backend}]\n"
            )
        },
        // Old processes drain for up to a minute: longer than any run here.
        &["--shutdown-timeout", "60s"],
        "info",
    )
    .await
}

/// The generation the listener `db` is at.
async fn generation(agent: &Agent) -> u64 {
    let s = agent.status().await;
    s["listeners"][0]["generation"].as_u64().unwrap()
}

fn summary(label: &str, times: &[(u64, u64)]) {
    let mut acc: Vec<u64> = times.iter().map(|t| t.0).collect();
    acc.sort_unstable();
    let walls: Vec<u64> = times.iter().map(|t| t.1).collect();
    eprintln!(
        "{label}: accepting_ms per upgrade {:?} (min {} median {} max {}); command wall ms {:?}",
        times.iter().map(|t| t.0).collect::<Vec<_>>(),
        acc[0],
        acc[acc.len() / 2],
        acc[acc.len() - 1],
        walls
    );
}

/// 10 upgrades in a row under `pgbench -C` (a new connection per transaction): zero failed
/// transactions, zero refused connections; routes and generation numbers carry over, and
/// every old process exits once drained.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_pgbench_with_a_connection_per_transaction() {
    let pg = Postgres::start();
    let agent = start_agent(pg.addr()).await;
    let addr = agent.addr("db").await;
    let swapped = agent
        .dso(&["proxy", "swap", "db", &format!("{}=postgres", pg.addr())])
        .await;
    assert!(swapped.status.success(), "{}", stderr(&swapped));
    assert_eq!(generation(&agent).await, 2);
    let mut pids = Pids(vec![agent.child.id().unwrap()]);
    let run = pgbench(addr, &["-C", "-c", "4", "-j", "2", "-T", "14"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut times = Vec::new();
    for _ in 0..10 {
        let (pid, accepting, wall) = upgrade_ok(&agent).await;
        pids.0.push(pid);
        times.push((accepting, wall));
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    let processed = assert_clean(run, "pgbench -C").await;
    summary("pgbench -C", &times);
    eprintln!("pgbench -C: {processed} transactions, each on a new connection");
    // The route and its generation number continue in the last process.
    assert_eq!(agent.addr("db").await, addr);
    assert_eq!(generation(&agent).await, 2);
    let last = *pids.0.last().unwrap();
    let health = http(&agent.socket, "GET", "/v1/health", "").await.unwrap();
    assert_eq!(health.0, 200, "{}", health.1);
    // Every old process has drained and exited; the last one serves.
    let old: Vec<u32> = pids.0[..pids.0.len() - 1].to_vec();
    poll(|| {
        let old = old.clone();
        async move { old.iter().all(|p| !running(*p)) }
    })
    .await;
    assert!(running(last));
    assert!(agent.socket.exists(), "the control socket's file is gone");
}

/// 10 upgrades under persistent connections: pgbench's connections stay in the process
/// that accepted them, which drains (deadline 60 s, longer than the run) while newer ones
/// serve; a second run started midway lands in a later process. Zero failures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_upgrades_under_persistent_connections_with_old_processes_draining() {
    let pg = Postgres::start();
    let agent = start_agent(pg.addr()).await;
    let addr = agent.addr("db").await;
    let mut pids = Pids(vec![agent.child.id().unwrap()]);
    let first = pgbench(addr, &["-c", "4", "-j", "2", "-T", "14"]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let mut times = Vec::new();
    let mut second = None;
    for i in 0..10 {
        let (pid, accepting, wall) = upgrade_ok(&agent).await;
        pids.0.push(pid);
        times.push((accepting, wall));
        if i == 4 {
            second = Some(pgbench(addr, &["-c", "2", "-j", "1", "-T", "6"]));
        }
        tokio::time::sleep(Duration::from_millis(800)).await;
    }
    // The first process still serves the first run's connections while the last serves
    // new ones.
    assert!(
        running(pids.0[0]),
        "the first agent exited before its connections ended"
    );
    let a = assert_clean(first, "persistent run").await;
    let b = assert_clean(second.unwrap(), "persistent run started midway").await;
    summary("persistent", &times);
    eprintln!("persistent: {a} + {b} transactions");
    let old: Vec<u32> = pids.0[..pids.0.len() - 1].to_vec();
    poll(|| {
        let old = old.clone();
        async move { old.iter().all(|p| !running(*p)) }
    })
    .await;
}

/// A new binary that exits 1, and one that hangs, under `pgbench -C`: each upgrade fails
/// with the reason (exit status and stderr; the timeout), the broken process is gone, and
/// the agent serves on without a failed transaction; a good upgrade afterwards works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_new_binary_leaves_the_agent_serving() {
    let pg = Postgres::start();
    let agent = start_agent(pg.addr()).await;
    let addr = agent.addr("db").await;
    let mut pids = Pids(vec![agent.child.id().unwrap()]);
    let exits = agent.dir.path().join("exits.sh");
    std::fs::write(
        &exits,
        "#!/bin/sh\necho 'dso 9.9: cannot start: something is wrong' >&2\nexit 1\n",
    )
    .unwrap();
    let hangs = agent.dir.path().join("hangs.sh");
    std::fs::write(&hangs, "#!/bin/sh\necho $$ > \"$0.pid\"\nexec sleep 60\n").unwrap();
    for f in [&exits, &hangs] {
        std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    let run = pgbench(addr, &["-C", "-c", "4", "-j", "2", "-T", "10"]);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let out = upgrade(&agent, &["--binary", exits.to_str().unwrap()]).await;
        assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
        let e = stderr(&out);
        assert!(e.contains("exit status: 1"), "{e}");
        assert!(e.contains("dso 9.9: cannot start: something is wrong"), "{e}");
        assert!(e.contains("this agent keeps serving"), "{e}");
    }
    let started = Instant::now();
    let out = upgrade(
        &agent,
        &["--binary", hangs.to_str().unwrap(), "--ready-timeout", "2s"],
    )
    .await;
    assert_eq!(out.status.code(), Some(1), "{}", stdout(&out));
    let e = stderr(&out);
    assert!(e.contains("not ready within 2000 ms"), "{e}");
    eprintln!(
        "hanging binary refused after {} ms",
        started.elapsed().as_millis()
    );
    let hung: u32 = std::fs::read_to_string(hangs.with_extension("sh.pid"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert!(!running(hung), "the hanging binary was not killed");
    let missing = upgrade(&agent, &["--binary", "/nonexistent/dso"]).await;
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("/nonexistent/dso"),
        "{}",
        stderr(&missing)
    );
    // The original agent served throughout and still does.
    assert!(running(pids.0[0]));
    let processed = assert_clean(run, "pgbench -C with broken binaries").await;
    eprintln!("broken binaries: {processed} transactions, none failed");
    // Rotations and upgrades were resumed: a good upgrade works now, under load again.
    let run = pgbench(addr, &["-C", "-c", "2", "-j", "1", "-T", "3"]);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (pid, _, _) = upgrade_ok(&agent).await;
    pids.0.push(pid);
    assert_clean(run, "pgbench -C after the broken binaries").await;
}

/// SIGUSR2 upgrades as `--upgrade` does; the log says what happened.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigusr2_upgrades_the_agent() {
    let backend = crate::harness::Echo::start("a").await;
    let agent = start_agent(backend.addr).await;
    let addr = agent.addr("db").await;
    let mut pids = Pids(vec![agent.child.id().unwrap()]);
    // A hold in force crosses the upgrade with its remaining time.
    let paused = agent.dso(&["proxy", "pause", "db", "--max", "20s"]).await;
    assert!(paused.status.success(), "{}", stderr(&paused));
    agent.signal("USR2");
    let mut new_pid = None;
    poll(|| {
        let log = agent.log();
        let found = log
            .lines()
            .find(|l| l.contains("the new agent is ready"))
            .and_then(|l| l.split("pid=").nth(1))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|p| p.parse::<u32>().ok());
        new_pid = found;
        async move { found.is_some() }
    })
    .await;
    let new_pid = new_pid.unwrap();
    pids.0.push(new_pid);
    poll(|| async { !running(pids.0[0]) }).await;
    let s = agent.status().await;
    assert_eq!(s["listeners"][0]["mode"], "hold", "{s}");
    let left = s["listeners"][0]["hold_remaining_ms"].as_u64().unwrap();
    assert!(left > 5_000 && left < 20_000, "{left}");
    let resumed = agent.dso(&["proxy", "resume", "db"]).await;
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let mut c = crate::harness::Conn::open(addr).await;
    assert_eq!(c.greeting().await, "a");
    let s = agent.status().await;
    assert_eq!(s["listeners"][0]["bind"], addr.to_string());
    assert!(running(new_pid));
}

/// A managed container survives an upgrade untouched: same container ID, no rotation,
/// and its port keeps serving through the new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_of_a_docker_agent_rotates_nothing() {
    let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let run = format!("dsoupg{}x{nanos:x}", std::process::id());
    let _cleanup = Cleanup(run.clone());
    docker(&[
        "network",
        "create",
        "--label",
        &format!("dso.test.run={run}"),
        &format!("{run}_default"),
    ]);
    docker(&[
        "run",
        "-d",
        "--name",
        &format!("{run}-web-1"),
        "--network",
        &format!("{run}_default"),
        "--label",
        &format!("dso.test.run={run}"),
        "--label",
        "dso.reloader=true",
        "--label",
        "dso.host_ports=127.0.0.1:0:8080",
        "--label",
        &format!("com.docker.compose.project={run}"),
        "--label",
        "com.docker.compose.service=web",
        "--health-interval=200ms",
        "--health-retries=1",
        &image,
    ]);
    let ids = || {
        docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=dso.test.run={run}"),
        ])
    };
    let before = ids();
    let state = tempfile::tempdir().unwrap();
    let scope = format!("dso.test.run={run}");
    let agent = Agent::start_with(
        |_| "agent:\n  http:\n    listen: off\nproxy:\n  listeners: []\n".to_owned(),
        &[
            "--docker",
            "--docker-scope",
            &scope,
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
        "info",
    )
    .await;
    let mut pids = Pids(vec![agent.child.id().unwrap()]);
    // The service's listener once the container is adopted.
    poll(|| async { listener_addr(&agent).await.is_some() }).await;
    let addr = listener_addr(&agent).await.unwrap();
    let greeting_before = greeting(addr).await;
    let (pid, accepting, _) = upgrade_ok(&agent).await;
    pids.0.push(pid);
    eprintln!("docker agent: accepting after {accepting} ms");
    // The new process adopted the container: its status shows the service.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let out = agent.dso(&["status", "--json"]).await;
        let text = stdout(&out);
        if out.status.success() && text.contains(&run) && text.contains("web") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new agent does not show the service: {text}{}\nlog:\n{}",
            stderr(&out),
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(greeting(addr).await, greeting_before, "another container serves");
    assert_eq!(ids(), before, "containers changed across the upgrade");
    let log = agent.log();
    assert!(
        !log.contains("rotation.started") && !log.contains("rotating"),
        "something rotated:\n{log}"
    );
    poll(|| async { !running(pids.0[0]) }).await;
    assert_eq!(greeting(addr).await, greeting_before);
}

async fn listener_addr(agent: &Agent) -> Option<SocketAddr> {
    let s = agent.status().await;
    s["listeners"]
        .as_array()?
        .first()?
        .get("bind")?
        .as_str()?
        .parse()
        .ok()
}

/// The greeting of the testsrv instance behind `addr` (its instance id).
async fn greeting(addr: SocketAddr) -> String {
    let s = tokio::time::timeout(Duration::from_secs(10), TcpStream::connect(addr))
        .await
        .unwrap()
        .unwrap();
    let mut line = String::new();
    tokio::time::timeout(Duration::from_secs(10), BufReader::new(s).read_line(&mut line))
        .await
        .unwrap()
        .unwrap();
    line.trim_end().to_owned()
}

/// Removes the run's containers and network.
struct Cleanup(String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let ids = docker(&["ps", "-aq", "--filter", &format!("label=dso.test.run={}", self.0)]);
        for id in ids.lines() {
            let _ = StdCommand::new("docker").args(["rm", "-f", id]).output();
        }
        let _ = StdCommand::new("docker")
            .args(["network", "rm", &format!("{}_default", self.0)])
            .output();
    }
}

/// Under systemd (`NOTIFY_SOCKET`): the new process announces itself as the main PID with
/// READY=1 (the unit has NotifyAccess=all), and the old one, which drains and exits, never
/// says STOPPING=1: for systemd the service did not stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_systemd_the_new_process_becomes_the_main_pid() {
    let backend = crate::harness::Echo::start("a").await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(300))).unwrap();
    let yaml = format!(
        "agent:\n  http:\n    listen: off\nproxy:\n  listeners:\n    - name: db\n      listen: 127.0.0.1:0\n      backends: [{}]\n",
        backend.addr
    );
    let agent = Agent::start_env(
        move |_| yaml,
        &["--shutdown-timeout", "60s"],
        "info",
        &[("NOTIFY_SOCKET", path.to_str().unwrap())],
    )
    .await;
    let old = agent.child.id().unwrap();
    let mut pids = Pids(vec![old]);
    let (new, _, _) = upgrade_ok(&agent).await;
    pids.0.push(new);
    poll(|| async { !running(old) }).await;
    let mut messages = Vec::new();
    let mut buf = vec![0u8; 4096];
    while let Ok(n) = sock.recv(&mut buf) {
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    let ready_from = |pid: u32| {
        messages
            .iter()
            .any(|m| m.contains("READY=1") && m.lines().any(|l| l == format!("MAINPID={pid}")))
    };
    assert!(ready_from(old), "{messages:?}");
    assert!(ready_from(new), "{messages:?}");
    assert!(!messages.iter().any(|m| m.contains("STOPPING=1")), "{messages:?}");
}
