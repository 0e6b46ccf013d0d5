//! The real binary as a process: startup, SIGHUP, SIGTERM, probe exit codes, usage errors.

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::http;

const BIN: &str = env!("CARGO_BIN_EXE_dso-testsrv");

/// A free loopback port (bound then released; good enough for a test that binds at once).
fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

/// Runs the binary and waits for its startup line on stderr.
fn spawn(extra: &[&str]) -> (Child, SocketAddr) {
    spawn_with_env(extra, &[])
}

/// Like [`spawn`], with extra environment variables.
fn spawn_with_env(extra: &[&str], env: &[(&str, &std::path::Path)]) -> (Child, SocketAddr) {
    let (echo, web) = (free_addr(), free_addr());
    let mut child = Command::new(BIN)
        .args(["--listen", &echo.to_string(), "--http", &web.to_string()])
        .args(extra)
        .envs(env.iter().map(|(k, v)| (k, v.as_os_str())))
        .env("INSTANCE_ID", "proc-1")
        .env("DSO_TEST_SECRET", "hunter2")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stderr.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert!(line.contains("echo on"), "startup line: {line}");
    (child, web)
}

/// Sends a signal with kill(1): the workspace forbids unsafe code, so no libc::kill here.
fn kill(child: &Child, signal: &str) {
    let ok = Command::new("kill")
        .args([signal, &child.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {signal}");
}

#[test]
fn sighup_counts_reloads_and_sigterm_exits_promptly() {
    let (mut child, web) = spawn(&[]);
    assert_eq!(http(web, "GET", "/env/DSO_TEST_SECRET"), (200, "hunter2".into()));
    // One signal at a time: two SIGHUPs sent back to back may be delivered as one
    // (pending signals of one kind coalesce), which made this test flaky in CI.
    for n in 1..=2 {
        kill(&child, "-HUP");
        let deadline = Instant::now() + Duration::from_secs(5);
        while http(web, "GET", "/reloads").1 != format!("{n}\n") {
            assert!(Instant::now() < deadline, "reload counter never reached {n}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    let start = Instant::now();
    kill(&child, "-TERM");
    let status = child.wait().unwrap();
    assert!(status.success(), "exit status {status}");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "took {:?}",
        start.elapsed()
    );
}

/// Waits until `GET /reloads` shows `n`.
fn await_reloads(web: SocketAddr, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while http(web, "GET", "/reloads").1 != format!("{n}\n") {
        assert!(Instant::now() < deadline, "reload counter never reached {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn reload_file_health_file_pid_and_cat() {
    let dir = std::env::temp_dir().join(format!("dso-testsrv-it-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (conf, pw) = (dir.join("conf"), dir.join("pw"));
    let (mut child, web) = spawn_with_env(
        &[],
        &[
            ("RELOAD_FILE", &conf),
            ("HEALTH_FILE", &pw),
            ("UNHEALTHY_IF", std::path::Path::new("bad-password")),
        ],
    );
    assert_eq!(http(web, "GET", "/pid"), (200, format!("{}\n", child.id())));
    assert_eq!(http(web, "GET", "/reloaded").0, 404, "no SIGHUP yet");

    std::fs::write(&conf, "v1").unwrap();
    kill(&child, "-HUP");
    await_reloads(web, 1);
    std::fs::write(&conf, "v2").unwrap();
    assert_eq!(
        http(web, "GET", "/reloaded"),
        (200, "v1".into()),
        "what was read at the signal, not the file now"
    );
    kill(&child, "-HUP");
    await_reloads(web, 2);
    assert_eq!(http(web, "GET", "/reloaded"), (200, "v2".into()));

    assert_eq!(http(web, "GET", "/health").0, 200, "no health file yet");
    std::fs::write(&pw, "bad-password\n").unwrap();
    assert_eq!(http(web, "GET", "/health").0, 503);
    std::fs::write(&pw, "good-password").unwrap();
    assert_eq!(http(web, "GET", "/health").0, 200);

    let out = Command::new(BIN).arg("cat").arg(&conf).output().unwrap();
    assert_eq!((out.status.code(), out.stdout), (Some(0), b"v2".to_vec()));
    let out = Command::new(BIN)
        .arg("cat")
        .arg(dir.join("missing"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("missing") && err.contains("No such file"), "{err}");

    kill(&child, "-TERM");
    child.wait().unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn probe_exit_codes() {
    let (mut child, web) = spawn(&["--unhealthy"]);
    let probe = |path: &str| {
        Command::new(BIN)
            .args(["probe", &format!("{web}{path}")])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(probe("/health"), Some(1), "--unhealthy means never healthy");
    assert_eq!(probe("/id"), Some(0));
    kill(&child, "-TERM");
    child.wait().unwrap();
    assert_eq!(probe("/health"), Some(1), "refused connection is unhealthy");
}

#[test]
fn usage_error_exits_2() {
    let out = Command::new(BIN).arg("--nope").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--nope"));
}
