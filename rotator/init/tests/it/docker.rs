//! `dso-init` in a real container: the static binary bind-mounted read-only at
//! `/run/dso/init`, a host tmpfs directory bind-mounted read-only at `/run/dso/env`, the test
//! image's own entrypoint and command after `--`.
//!
//! Needs a Docker engine, the image `$DSO_TESTSRV_IMAGE` and `$DSO_INIT_BIN` (the static
//! build, from `.ci/build-test-image.sh`). A missing engine or image fails the test, as in
//! every Docker test of this workspace; a missing `DSO_INIT_BIN` fails it under
//! `DSO_DOCKER_REQUIRED=1` (as in CI) and skips it loudly otherwise.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

fn docker(args: &[&str]) -> Result<String, String> {
    let out = Command::new("docker")
        .args(args)
        .output()
        .map_err(|e| format!("cannot run docker: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "docker {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn image() -> String {
    std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned())
}

/// The static launcher, or `None` (after saying so loudly) when the test must be skipped.
fn init_bin() -> Option<PathBuf> {
    let required = std::env::var("DSO_DOCKER_REQUIRED").is_ok_and(|v| v == "1");
    match std::env::var_os("DSO_INIT_BIN") {
        Some(p) if Path::new(&p).is_file() => Some(PathBuf::from(p)),
        Some(p) => panic!(
            "DSO_INIT_BIN={} is not a file: run `bash .ci/build-test-image.sh` (it builds the static dso-init and prints its path)",
            Path::new(&p).display()
        ),
        None if required => panic!(
            "DSO_INIT_BIN is not set but DSO_DOCKER_REQUIRED=1: export DSO_INIT_BIN=<the static dso-init printed by `bash .ci/build-test-image.sh`>"
        ),
        None => {
            // Straight to stderr, not eprintln!: the test harness would hide captured output.
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED docker::container_gets_the_value_as_pid_1_and_inspect_does_not: DSO_INIT_BIN is not set (the static dso-init from `bash .ci/build-test-image.sh`); set it, or DSO_DOCKER_REQUIRED=1 to make this a failure"
            );
            None
        }
    }
}

/// A tmpfs mounted on a fresh directory; unmounted (contents gone with it) on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=1m,mode=0755", "dso-init-test"])
            .arg(dir.path())
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a tmpfs on {} failed (this test runs as root, as CI does): {}",
            dir.path().display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

/// A container removed (forcibly) on drop, so a failing assertion leaves nothing behind.
struct Container {
    id: String,
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = docker(&["rm", "-f", "-v", &self.id]);
    }
}

impl Container {
    /// What the container wrote to stderr (the launcher's and the server's messages).
    fn logs(&self) -> String {
        let out = Command::new("docker").args(["logs", &self.id]).output();
        out.map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    }

    fn running(&self) -> bool {
        docker(&["inspect", "-f", "{{.State.Running}}", &self.id]).as_deref() == Ok("true")
    }

    /// `GET path` on the container's HTTP port; only while it runs (a stopped container's
    /// address may already belong to someone else's).
    fn get(&self, addr: SocketAddr, path: &str) -> Result<(u16, Vec<u8>), String> {
        if !self.running() {
            panic!("container {} is not running; its log:\n{}", self.id, self.logs());
        }
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2)).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").map_err(|e| e.to_string())?;
        let mut out = Vec::new();
        s.read_to_end(&mut out).map_err(|e| e.to_string())?;
        let end = out.windows(4).position(|w| w == b"\r\n\r\n").ok_or("no head")?;
        let head = String::from_utf8_lossy(&out[..end]).into_owned();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or("no status")?;
        Ok((status, out[end + 4..].to_vec()))
    }
}

/// Lines of a Go template over a list in the image's config (entrypoint or cmd).
fn image_list(field: &str) -> Vec<String> {
    let out = docker(&[
        "image",
        "inspect",
        "-f",
        &format!("{{{{join .Config.{field} \"\\n\"}}}}"),
        &image(),
    ])
    .unwrap();
    out.lines().filter(|l| !l.is_empty()).map(str::to_owned).collect()
}

#[test]
fn container_gets_the_value_as_pid_1_and_inspect_does_not() {
    if let Err(e) = docker(&["version", "--format", "{{.Server.APIVersion}}"]) {
        panic!(
            "Docker is not reachable ({e}). This test needs it: run `bash .ci/services.sh docker` (ensure_docker) first."
        );
    }
    if docker(&["image", "inspect", &image()]).is_err() {
        panic!(
            "test image {} is missing: run `bash .ci/build-test-image.sh` first.",
            image()
        );
    }
    let Some(bin) = init_bin() else { return };

    let env = Tmpfs::mount();
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    // The searches below look for `marker`: JSON would escape the quote of the full value.
    let marker = format!("dso-init-pw-{nanos}");
    let value = format!("{marker}-$x'\"z");
    std::fs::write(env.path().join("DB_PASSWORD"), &value).unwrap();

    // The image's own entrypoint and command, after `--`: what dso does for a container.
    let entrypoint = image_list("Entrypoint");
    let cmd = image_list("Cmd");
    assert_eq!(entrypoint, ["/dso-testsrv"], "unexpected test image entrypoint");
    let name = format!("dso-init-test-{}-{nanos}", std::process::id());
    let mounts = [
        format!("type=bind,source={},target=/run/dso/init,readonly", bin.display()),
        format!(
            "type=bind,source={},target=/run/dso/env,readonly",
            env.path().display()
        ),
    ];
    let mut args = vec![
        "run",
        "-d",
        "--name",
        &name,
        "--label",
        "dso.test.run=dso-init",
        "--entrypoint",
        "/run/dso/init",
    ];
    for m in &mounts {
        args.extend(["--mount", m.as_str()]);
    }
    let image = image();
    args.push(&image);
    args.push("--");
    args.extend(entrypoint.iter().map(String::as_str));
    args.extend(cmd.iter().map(String::as_str));
    let id = docker(&args).unwrap();
    let container = Container { id };

    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &container.id,
    ])
    .unwrap();
    let addr: SocketAddr = format!("{ip}:8081").parse().unwrap_or_else(|_| {
        panic!(
            "container has no address {ip:?} (exited?); its log:\n{}",
            container.logs()
        )
    });
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match container.get(addr, "/health") {
            Ok((200, _)) => break,
            other if Instant::now() > deadline => panic!("test server never answered: {other:?}"),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }

    assert_eq!(
        container.get(addr, "/env/DB_PASSWORD").unwrap(),
        (200, value.clone().into_bytes())
    );
    let (status, pid) = container.get(addr, "/pid").unwrap();
    assert_eq!(
        (status, String::from_utf8_lossy(&pid).trim()),
        (200, "1"),
        "the application is PID 1"
    );

    // Where the value is visible: PID 1's environ for root; not for another uid, and not in
    // the environment of a `docker exec` process (that one gets the configured Env).
    let exec = |user: &str, path: &str| {
        Command::new("docker")
            .args(["exec", "-u", user, &container.id, "/dso-testsrv", "cat", path])
            .output()
            .unwrap()
    };
    let root_view = exec("0", "/proc/1/environ");
    assert!(
        root_view.status.success(),
        "{}",
        String::from_utf8_lossy(&root_view.stderr)
    );
    let needle = format!("DB_PASSWORD={value}\0");
    assert!(
        root_view
            .stdout
            .windows(needle.len())
            .any(|w| w == needle.as_bytes()),
        "PID 1's environment lacks the value"
    );
    let other = exec("1001", "/proc/1/environ");
    assert_eq!(other.status.code(), Some(1), "uid 1001 read PID 1's environ");
    assert!(String::from_utf8_lossy(&other.stderr).contains("ermission denied"));
    let own = exec("0", "/proc/self/environ");
    assert!(own.status.success());
    assert!(
        !String::from_utf8_lossy(&own.stdout).contains(&marker),
        "docker exec inherited the value"
    );

    let inspect = docker(&["inspect", &container.id]).unwrap();
    assert!(!inspect.contains(&marker), "docker inspect shows the value");
    assert!(
        inspect.contains("/run/dso/init"),
        "inspect should show the launcher entrypoint: {inspect}"
    );
    let full_id = docker(&["inspect", "-f", "{{.Id}}", &container.id]).unwrap();
    // The engine's own record of the container on the host disk (readable: this test is root).
    let root = docker(&["info", "-f", "{{.DockerRootDir}}"]).unwrap();
    let config = PathBuf::from(format!("{root}/containers/{full_id}/config.v2.json"));
    let bytes = std::fs::read(&config).unwrap_or_else(|e| panic!("{}: {e}", config.display()));
    assert!(
        !String::from_utf8_lossy(&bytes).contains(&marker),
        "{} holds the value",
        config.display()
    );
    assert!(
        String::from_utf8_lossy(&bytes).contains("/run/dso/init"),
        "not the container's config"
    );

    // SIGTERM reaches PID 1 (the test server exits 0 on it); SIGKILL after the grace would be 137.
    let started = Instant::now();
    docker(&["stop", "-t", "10", &container.id]).unwrap();
    let took = started.elapsed();
    eprintln!("docker stop with the launcher as entrypoint took {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "docker stop took {took:?}: SIGTERM did not reach the application"
    );
    let code = docker(&["inspect", "-f", "{{.State.ExitCode}}", &container.id]).unwrap();
    assert_eq!(
        code, "0",
        "the application should exit 0 on SIGTERM, not be killed"
    );
    drop(container);
    drop(env);
}
