//! The agent process: signals, exit codes, the control socket file.

use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::time::Duration;

use crate::harness::{Agent, Conn, DSO, Echo, docker, listener_yaml, poll, stderr};

async fn exit_code(agent: &mut Agent) -> Option<i32> {
    tokio::time::timeout(Duration::from_secs(20), agent.child.wait())
        .await
        .expect("agent exits in time")
        .unwrap()
        .code()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_is_created_0660_and_removed_on_exit() {
    let blue = Echo::start("blue").await;
    let mut agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o660);
    agent.signal("TERM");
    assert_eq!(exit_code(&mut agent).await, Some(0));
    assert!(!agent.socket.exists(), "socket removed on exit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_open_connections_finish() {
    let blue = Echo::start("blue").await;
    let mut agent = Agent::start(
        &listener_yaml("echo", &[blue.addr], ""),
        &["--shutdown-timeout", "30s"],
    )
    .await;
    let addr = agent.addr("echo").await;
    let mut c = Conn::open(addr).await;
    assert_eq!(c.greeting().await, "blue");

    agent.signal("TERM");
    poll(|| async { agent.log().contains("shutting down gracefully") }).await;
    // The open connection keeps working during the drain, new ones are not accepted.
    c.echo("during shutdown").await;
    poll(|| async { tokio::net::TcpStream::connect(addr).await.is_err() }).await;
    drop(c);
    assert_eq!(exit_code(&mut agent).await, Some(0));
    assert!(
        agent.log().contains("every connection finished"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_deadline_closes_what_is_left() {
    let blue = Echo::start("blue").await;
    let mut agent = Agent::start(
        &listener_yaml("echo", &[blue.addr], ""),
        &["--shutdown-timeout", "200ms"],
    )
    .await;
    let mut c = Conn::open(agent.addr("echo").await).await;
    assert_eq!(c.greeting().await, "blue");
    agent.signal("TERM");
    assert_eq!(exit_code(&mut agent).await, Some(0));
    assert!(
        agent.log().contains("shutdown deadline passed"),
        "{}",
        agent.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_forces_exit() {
    let blue = Echo::start("blue").await;
    let mut agent = Agent::start(
        &listener_yaml("echo", &[blue.addr], ""),
        &["--shutdown-timeout", "1h"],
    )
    .await;
    let mut c = Conn::open(agent.addr("echo").await).await;
    assert_eq!(c.greeting().await, "blue");
    agent.signal("TERM");
    poll(|| async { agent.log().contains("shutting down gracefully") }).await;
    agent.signal("INT");
    assert_eq!(exit_code(&mut agent).await, Some(0));
    assert!(agent.log().contains("second signal"), "{}", agent.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_error_exits_2_and_bind_failure_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "proxy:\n  listeners:\n    - name: a\n      listen: nowhere\n",
    )
    .unwrap();
    let out = tokio::process::Command::new(DSO)
        .args(["agent", "--no-docker", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--config")
        .arg(&bad)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    assert!(stderr(&out).contains("line 4"), "{}", stderr(&out));

    // A port that is taken: a runtime failure, and the error says which listener and address.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let cfg = dir.path().join("taken.yaml");
    std::fs::write(
        &cfg,
        format!("proxy:\n  listeners:\n    - name: a\n      listen: 127.0.0.1:{port}\n"),
    )
    .unwrap();
    let out = tokio::process::Command::new(DSO)
        .args(["agent", "--no-docker", "--socket"])
        .arg(dir.path().join("s.sock"))
        .arg("--config")
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("cannot listen on 127.0.0.1:{port}")),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_agent_on_the_same_socket_is_refused() {
    let blue = Echo::start("blue").await;
    let agent = Agent::start(&listener_yaml("echo", &[blue.addr], ""), &[]).await;
    let cfg = agent.dir.path().join("empty.yaml");
    std::fs::write(&cfg, "").unwrap();
    let out = tokio::process::Command::new(DSO)
        .args(["agent", "--no-docker", "--socket"])
        .arg(&agent.socket)
        .arg("--config")
        .arg(&cfg)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("another agent is already answering"),
        "{}",
        stderr(&out)
    );
}

/// A system group that exists for one test and is removed when dropped.
pub struct TempGroup {
    /// Its name, `dso-test-PID`.
    pub name: String,
    /// Its gid.
    pub gid: u32,
}

impl TempGroup {
    /// `groupadd --system dso-test-PID` (root only).
    pub fn create() -> TempGroup {
        let name = format!("dso-test-{}", std::process::id());
        let out = std::process::Command::new("groupadd")
            .args(["--system", &name])
            .output()
            .expect("groupadd runs");
        assert!(
            out.status.success(),
            "groupadd {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let gid = std::fs::read_to_string("/etc/group")
            .unwrap()
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split(':').collect();
                (f.first() == Some(&name.as_str())).then(|| f[2].parse().unwrap())
            })
            .expect("the new group is in /etc/group");
        TempGroup { name, gid }
    }
}

impl Drop for TempGroup {
    fn drop(&mut self) {
        let _ = std::process::Command::new("groupdel").arg(&self.name).status();
    }
}

/// Issue 9 item 5: the peer check end to end. The client runs with dropped privileges as an
/// unused uid, once without the socket's group (refused with the documented message, and
/// logged) and once with it as a supplementary group only (accepted). Needs root; under
/// CI (which runs as root) a non-root run fails instead of passing unchecked.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_that_is_not_root_owner_or_in_the_group_gets_403_and_a_member_gets_in() {
    let own_uid = std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| {
            l.strip_prefix("Uid:")
                .map(|r| r.split_whitespace().nth(1).unwrap().to_owned())
        })
        .unwrap();
    if own_uid != "0" {
        assert!(
            std::env::var("CI").is_err(),
            "this test must run as root in CI (it drops privileges in the client)"
        );
        eprintln!("SKIPPED LOUDLY: the peer-check test needs root to run a client as another uid");
        return;
    }
    let group = TempGroup::create();
    let blue = Echo::start("blue").await;
    let listeners = listener_yaml("echo", &[blue.addr], "");
    let agent = Agent::start_with(
        |_| {
            format!(
                "agent:\n  api:\n    socket_group: {}\nproxy:\n  listeners:\n{listeners}",
                group.name
            )
        },
        &[],
        "info",
    )
    .await;
    // The socket went to the configured group; its directories must be passable.
    let meta = std::fs::metadata(&agent.socket).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::gid(&meta), group.gid);
    for p in [agent.dir.path(), agent.socket.parent().unwrap()] {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    // An unused uid with an unused primary gid; the group only ever as a supplementary one.
    let (uid, gid) = (64_000 + std::process::id() % 1000, 64_999);
    let client = |groups: String| {
        let socket = agent.socket.clone();
        async move {
            tokio::process::Command::new("setpriv")
                .arg(format!("--reuid={uid}"))
                .arg(format!("--regid={gid}"))
                .arg(groups)
                .args([DSO, "--socket"])
                .arg(&socket)
                .args(["proxy", "status"])
                .output()
                .await
                .unwrap()
        }
    };
    // Not a member: the file mode is opened so that only SO_PEERCRED stands in the way.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let out = client("--clear-groups".to_owned()).await;
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let documented = format!(
        "permission denied: only root, the agent's user and members of group {} may use the control socket",
        group.name
    );
    assert!(stderr(&out).contains(&documented), "{}", stderr(&out));
    poll(|| async { agent.log().contains("control client refused") }).await;
    assert!(agent.log().contains(&format!("uid={uid}")), "{}", agent.log());

    // A member through a supplementary group, with the socket back at 0660: both the file
    // permissions and the peer check let it in.
    std::fs::set_permissions(&agent.socket, std::fs::Permissions::from_mode(0o660)).unwrap();
    let out = client(format!("--groups={}", group.gid)).await;
    assert!(out.status.success(), "member refused: {}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("echo"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// Issue 9 item 6: a socket directory that another user owns (or a symlink) could be used
/// to swap the socket for a symlink while the agent, as root, changes its mode and group:
/// refused, with the directory named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_directory_of_another_user_or_a_symlink_is_refused() {
    use std::os::unix::fs::symlink;
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("empty.yaml");
    std::fs::write(&cfg, "").unwrap();
    let run = |socket: std::path::PathBuf| {
        let cfg = cfg.clone();
        async move {
            tokio::process::Command::new(DSO)
                .args(["agent", "--no-docker", "--socket"])
                .arg(socket)
                .arg("--config")
                .arg(&cfg)
                .output()
                .await
                .unwrap()
        }
    };
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(open.join("dso.sock")).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("writable by other users"),
        "{}",
        stderr(&out)
    );

    let real = dir.path().join("real");
    std::fs::create_dir(&real).unwrap();
    let link = dir.path().join("link");
    symlink(&real, &link).unwrap();
    let out = run(link.join("dso.sock")).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("is a symlink"), "{}", stderr(&out));

    if std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .any(|l| l.starts_with("Uid:\t0\t"))
    {
        let theirs = dir.path().join("theirs");
        std::fs::create_dir(&theirs).unwrap();
        std::os::unix::fs::chown(&theirs, Some(65534), Some(65534)).unwrap();
        let out = run(theirs.join("dso.sock")).await;
        assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
        assert!(stderr(&out).contains("belongs to uid 65534"), "{}", stderr(&out));
    }
}

/// Issue 9 item 6: a state directory that another user could plant symlinks in (mode 0777,
/// or owned by another uid) is refused at start, with the directory and the fix named.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_writable_by_others_or_of_another_user_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("empty.yaml");
    std::fs::write(&cfg, "").unwrap();
    let run = |state: std::path::PathBuf| {
        let (cfg, socket) = (cfg.clone(), dir.path().join("s.sock"));
        async move {
            tokio::process::Command::new(DSO)
                .args(["agent", "--no-docker", "--socket"])
                .arg(socket)
                .arg("--config")
                .arg(&cfg)
                .arg("--state-dir")
                .arg(&state)
                .output()
                .await
                .unwrap()
        }
    };
    let open = dir.path().join("open");
    std::fs::create_dir(&open).unwrap();
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let out = run(open.clone()).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let msg = format!("state directory {} is writable by other users", open.display());
    assert!(stderr(&out).contains(&msg), "{}", stderr(&out));
    assert!(stderr(&out).contains("chmod 0700"), "{}", stderr(&out));

    let theirs = dir.path().join("theirs");
    std::fs::create_dir(&theirs).unwrap();
    match std::os::unix::fs::chown(&theirs, Some(64_321), None) {
        Ok(()) => {
            let out = run(theirs.clone()).await;
            assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
            let msg = format!("state directory {} belongs to uid 64321", theirs.display());
            assert!(stderr(&out).contains(&msg), "{}", stderr(&out));
        }
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI runs as root, chown failed: {e}"
            );
            eprintln!("SKIPPED LOUDLY: the other-owner case needs root to chown ({e})");
        }
    }
}

/// A network and one managed container labelled with a run scope; removed on drop.
struct ScopedService {
    run: String,
}

impl ScopedService {
    fn start() -> ScopedService {
        let image = std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned());
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let s = ScopedService {
            run: format!("dsowait{}x{nanos:x}", std::process::id()),
        };
        let label = format!("dso.test.run={}", s.run);
        let network = format!("{}_default", s.run);
        docker(&["network", "create", "--label", &label, &network]);
        docker(&[
            "run",
            "-d",
            "--name",
            &format!("{}-web-1", s.run),
            "--network",
            &network,
            "--label",
            &label,
            "--label",
            "dso.reloader=true",
            "--label",
            "dso.host_ports=127.0.0.1:0:8080",
            "--label",
            &format!("com.docker.compose.project={}", s.run),
            "--label",
            "com.docker.compose.service=web",
            &image,
        ]);
        s
    }
}

impl Drop for ScopedService {
    fn drop(&mut self) {
        let filter = format!("label=dso.test.run={}", self.run);
        let ids = docker(&["ps", "-aq", "--filter", &filter]);
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

/// A Unix socket at `path` that relays every connection to the real engine: the engine
/// "appears" at `path` when this starts. Stops accepting when dropped.
struct EngineRelay(tokio::task::JoinHandle<()>);

impl EngineRelay {
    fn start(path: &std::path::Path) -> EngineRelay {
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        EngineRelay(tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                tokio::spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect("/var/run/docker.sock").await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        }))
    }
}

impl Drop for EngineRelay {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Issue 11: the agent manages Docker by default and survives an engine that does not
/// answer. Pointed at a socket where nothing listens, it binds its listeners and forwards,
/// reports the wait (with the error and the next retry) in `/v1/health`, `/v1/services` and
/// `dso status`, and once an engine answers at that path it starts the Docker side: the
/// labelled container of its scope is adopted (its service and listener appear).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_no_engine_the_agent_serves_and_starts_docker_once_the_engine_answers() {
    let blue = Echo::start("blue").await;
    let engine_dir = tempfile::tempdir().unwrap();
    let engine_sock = engine_dir.path().join("docker.sock");
    let docker_host = format!("unix://{}", engine_sock.display());
    let service = ScopedService::start();
    let scope = format!("dso.test.run={}", service.run);
    let state = tempfile::tempdir().unwrap();
    let listeners = listener_yaml("echo", &[blue.addr], "");
    let mut agent = Agent::start_env(
        |_| format!("proxy:\n  listeners:\n{listeners}"),
        // `--docker` is the explicit form of the default; it also keeps the harness from
        // adding `--no-docker`.
        &[
            "--docker",
            "--docker-scope",
            &scope,
            "--state-dir",
            state.path().to_str().unwrap(),
        ],
        "info",
        &[("DOCKER_HOST", &docker_host)],
    )
    .await;

    // The configured listener forwards although the engine is away.
    let mut conn = Conn::open(agent.addr("echo").await).await;
    assert_eq!(conn.greeting().await, "blue");
    conn.echo("still here").await;

    let (code, body) = crate::harness::http(&agent.socket, "GET", "/v1/health", "")
        .await
        .unwrap();
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["docker"]["state"], "waiting", "{health}");
    let message = health["docker"]["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!("waiting for the engine at {docker_host}: ")),
        "{message}"
    );
    assert!(
        message.contains("retry in ") || message.contains("retrying now"),
        "{message}"
    );

    let (code, body) = crate::harness::http(&agent.socket, "GET", "/v1/services", "")
        .await
        .unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("waiting for the engine"), "{body}");
    let out = agent.dso(&["status"]).await;
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains(&format!("docker: waiting for the engine at {docker_host}")),
        "{}",
        stderr(&out)
    );
    assert!(
        agent.log().contains("docker engine not answering"),
        "{}",
        agent.log()
    );

    // The engine appears at that path: the next retry (backoff 1 s, 2 s, 4 s, ... at most
    // 30 s) starts the Docker side and adopts the scoped container.
    let _relay = EngineRelay::start(&engine_sock);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    let health = loop {
        let (_, body) = crate::harness::http(&agent.socket, "GET", "/v1/health", "")
            .await
            .unwrap();
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        if h["docker"]["state"] == "ready" {
            break h;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "docker side not started 45 s after the engine appeared: {h}\n{}",
            agent.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(
        health["docker"]["api"].as_str().unwrap().starts_with("1."),
        "{health}"
    );
    let out = agent.dso(&["status", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let services: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let key = format!("{}/web", service.run);
    assert!(
        services
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["service"]["project"] == service.run.as_str() && s["service"]["service"] == "web"),
        "{services}"
    );
    let proxy = agent.status().await;
    assert!(
        proxy["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"].as_str().unwrap().starts_with(&key)),
        "{proxy}"
    );
    assert!(agent.log().contains("docker engine answered"), "{}", agent.log());
    // The old connection was never disturbed.
    conn.echo("and after").await;
    drop(conn);

    // Stop the agent before the container goes: nothing may dial a removed container.
    agent.signal("TERM");
    assert_eq!(exit_code(&mut agent).await, Some(0));
}
