//! The operator commands: `dso setup` into a temp root (files, modes, owners, idempotency,
//! an edited dso.yaml kept, the unit accepted by `systemd-analyze verify`), `dso system`
//! where systemd does not run, READY=1 over `$NOTIFY_SOCKET`, and `docker dso` through the
//! real Docker CLI with its global options.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tokio::process::Command;

use crate::harness::{Conn, DSO, Echo, http, listener_yaml, stderr, stdout};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|r| r.split_whitespace().nth(1).map(|u| u == "0"))
        .unwrap()
}

/// Agent mode needs root (it chowns to root:dso); CI runs as root and must not skip.
fn need_root(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(std::env::var("CI").is_err(), "{what} must run as root in CI");
    eprintln!("SKIPPED LOUDLY: {what} needs root");
    false
}

async fn setup(root: &Path, extra: &[&str]) -> Output {
    Command::new(DSO)
        .args(["setup", "--mode", "agent", "--non-interactive", "--json"])
        .args(extra)
        .env("DSO_SETUP_ROOT", root)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap()
}

fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "setup failed: {}\n{}",
        stderr(out),
        stdout(out)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// `item` -> `action` of a JSON report.
fn actions(r: &serde_json::Value) -> BTreeMap<String, String> {
    r["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                format!("{} {}", i["item"].as_str().unwrap(), i["path"].as_str().unwrap()),
                i["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Mode (with type bits), uid, gid, mtime seconds and nanoseconds, content or link target.
type Entry = (u32, u32, u32, i64, i64, Vec<u8>);

/// Every path under `root` with its type, mode, owner, mtime and content (or link target).
fn snapshot(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        let content = if m.file_type().is_symlink() {
            std::fs::read_link(&p)
                .unwrap()
                .into_os_string()
                .into_encoded_bytes()
        } else if m.is_file() {
            std::fs::read(&p).unwrap()
        } else {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            Vec::new()
        };
        out.insert(
            p,
            (m.mode(), m.uid(), m.gid(), m.mtime(), m.mtime_nsec(), content),
        );
    }
    out
}

fn mode(p: &Path) -> (u32, u32, u32) {
    let m = std::fs::symlink_metadata(p).unwrap();
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn group_gid(root: &Path, name: &str) -> u32 {
    std::fs::read_to_string(root.join("etc/group"))
        .unwrap()
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            (f[0] == name).then(|| f[2].parse().unwrap())
        })
        .unwrap_or_else(|| panic!("group {name} in {}", root.display()))
}

/// The binary as `current_exe` names it (what the link and the unit point at).
fn exe() -> PathBuf {
    std::fs::canonicalize(DSO).unwrap()
}

#[tokio::test]
async fn setup_agent_creates_every_item_once_and_keeps_an_edited_config() {
    if !need_root("setup --mode agent into a temp root") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    std::fs::create_dir_all(root.join("etc")).unwrap();
    // An empty group file: `groupadd --prefix ROOT` creates group dso in it.
    std::fs::write(root.join("etc/group"), "").unwrap();
    let launcher = dir.path().join("dso-init");
    std::fs::write(&launcher, b"\x7fELF not really, but bytes to copy").unwrap();
    let launcher_arg = ["--launcher", launcher.to_str().unwrap()];

    let first = report(&setup(&root, &launcher_arg).await);
    let acts = actions(&first);
    assert!(
        acts.values().all(|a| a == "created" || a == "unchanged"),
        "{acts:#?}"
    );
    assert_eq!(acts["group dso"], "created");
    assert_eq!(first["changed"], 8, "{acts:#?}");

    let gid = group_gid(&root, "dso");
    assert_eq!(mode(&root.join("etc/dso")), (0o775, 0, gid));
    assert_eq!(mode(&root.join("etc/dso/dso.yaml")), (0o664, 0, gid));
    assert_eq!(mode(&root.join("var/lib/dso")), (0o700, 0, 0));
    assert_eq!(mode(&root.join("run/dso")), (0o755, 0, 0));
    assert_eq!(mode(&root.join("usr/lib/dso/dso-init")), (0o755, 0, 0));
    assert_eq!(
        std::fs::read(root.join("usr/lib/dso/dso-init")).unwrap(),
        std::fs::read(&launcher).unwrap()
    );
    assert_eq!(
        mode(&root.join("etc/systemd/system/dso-agent.service")),
        (0o644, 0, 0)
    );
    let link = root.join("usr/local/lib/docker/cli-plugins/docker-dso");
    assert_eq!(std::fs::read_link(&link).unwrap(), exe());
    let unit = std::fs::read_to_string(root.join("etc/systemd/system/dso-agent.service")).unwrap();
    assert!(
        unit.contains(&format!(
            "\nExecStart={} agent --config /etc/dso/dso.yaml\n",
            exe().display()
        )),
        "{unit}"
    );
    assert!(
        unit.contains("\nTimeoutStopSec=60s\n"),
        "30s drain + 30s margin: {unit}"
    );

    // The starter config passes `dso config validate`.
    let config = root.join("etc/dso/dso.yaml");
    let out = Command::new(DSO)
        .arg("config")
        .arg("validate")
        .arg(&config)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("mode agent"), "{}", stdout(&out));

    // The unit passes systemd's own checker (the ExecStart binary exists: the built dso).
    verify_unit(&root.join("etc/systemd/system/dso-agent.service")).await;

    // Second run: nothing changes, not even a timestamp.
    let before = snapshot(&root);
    let second = report(&setup(&root, &launcher_arg).await);
    assert_eq!(second["changed"], 0, "{:#?}", actions(&second));
    assert!(
        actions(&second).values().all(|a| a == "unchanged"),
        "{:#?}",
        actions(&second)
    );
    assert_eq!(snapshot(&root), before, "a second run must not touch any file");
    let text = Command::new(DSO)
        .args(["setup", "--mode", "agent", "--non-interactive"])
        .args(launcher_arg)
        .env("DSO_SETUP_ROOT", &root)
        .stdin(Stdio::null())
        .output()
        .await
        .unwrap();
    assert!(text.status.success(), "{}", stderr(&text));
    assert!(stdout(&text).contains("exists, unchanged"), "{}", stdout(&text));
    assert!(
        stdout(&text).contains("0 created, 0 updated"),
        "{}",
        stdout(&text)
    );

    // An edited dso.yaml is kept; the template goes beside it, once.
    let template = std::fs::read(&config).unwrap();
    let edited = format!(
        "{}\n# edited by the operator\n",
        String::from_utf8_lossy(&template)
    );
    std::fs::write(&config, &edited).unwrap();
    let third = report(&setup(&root, &launcher_arg).await);
    assert_eq!(actions(&third)[&format!("config {}", config.display())], "kept");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    let new = root.join("etc/dso/dso.yaml.new");
    assert_eq!(std::fs::read(&new).unwrap(), template);
    assert_eq!(mode(&new), (0o664, 0, gid));
    let before = snapshot(&root);
    let fourth = report(&setup(&root, &launcher_arg).await);
    assert_eq!(fourth["changed"], 0, "{:#?}", actions(&fourth));
    assert_eq!(snapshot(&root), before);

    // A drifted mode is put back, and said so.
    std::fs::set_permissions(
        root.join("var/lib/dso"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    let fifth = report(&setup(&root, &launcher_arg).await);
    let key = format!("state directory {}", root.join("var/lib/dso").display());
    assert_eq!(actions(&fifth)[&key], "updated");
    assert_eq!(mode(&root.join("var/lib/dso")), (0o700, 0, 0));

    // A longer drain in the config gives the unit a longer stop timeout (the unit is dso's
    // file: replaced); the config itself is still kept.
    std::fs::write(&config, "agent:\n  shutdown_timeout: 2m\n").unwrap();
    let sixth = report(&setup(&root, &launcher_arg).await);
    let unit_path = root.join("etc/systemd/system/dso-agent.service");
    assert_eq!(
        actions(&sixth)[&format!("systemd unit {}", unit_path.display())],
        "updated"
    );
    assert_eq!(actions(&sixth)[&format!("config {}", config.display())], "kept");
    assert!(
        std::fs::read_to_string(&unit_path)
            .unwrap()
            .contains("\nTimeoutStopSec=150s\n")
    );
    verify_unit(&unit_path).await;
}

/// `systemd-analyze verify UNIT` must accept the file without a warning. Skipped (loudly)
/// only where the command does not exist.
async fn verify_unit(unit: &Path) {
    let tool = Path::new("/usr/bin/systemd-analyze");
    if !tool.exists() {
        assert!(
            std::env::var("CI").is_err(),
            "CI has systemd-analyze; install systemd"
        );
        eprintln!("SKIPPED LOUDLY: systemd-analyze is not installed; the unit was not verified");
        return;
    }
    let out = Command::new(tool).arg("verify").arg(unit).output().await.unwrap();
    assert!(out.status.success(), "systemd-analyze verify: {}", stderr(&out));
    // Unknown keys and bad values are only warnings (exit 0): none allowed.
    assert_eq!(stderr(&out), "", "systemd-analyze verify warned");
}

#[tokio::test]
async fn setup_agent_refuses_without_root_and_changes_nothing() {
    if !need_root("running setup as another user") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new("setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups", DSO])
        .args(["setup", "--mode", "agent", "--non-interactive"])
        .env("DSO_SETUP_ROOT", dir.path())
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("must run as root: sudo dso setup --mode agent"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing created"
    );
}

#[tokio::test]
async fn setup_local_makes_the_user_files_without_root() {
    let home = tempfile::tempdir().unwrap();
    let project = home.path().join("project");
    std::fs::create_dir(&project).unwrap();
    let run = || {
        let mut cmd = Command::new(DSO);
        cmd.args(["setup", "--mode", "local", "--json"])
            .env("HOME", home.path())
            .current_dir(&project)
            .stdin(Stdio::null());
        async move { cmd.output().await.unwrap() }
    };
    let first = report(&run().await);
    assert!(
        actions(&first).values().all(|a| a == "created"),
        "{:#?}",
        actions(&first)
    );
    assert_eq!(mode(&home.path().join(".dso")).0, 0o700);
    assert_eq!(
        std::fs::read_link(home.path().join(".docker/cli-plugins/docker-dso")).unwrap(),
        exe()
    );
    let config = project.join("dso.yaml");
    let out = Command::new(DSO)
        .args(["config", "validate", "dso.yaml"])
        .env("HOME", home.path())
        .current_dir(&project)
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("mode local"), "{}", stdout(&out));
    let before = snapshot(home.path());
    let second = report(&run().await);
    assert_eq!(second["changed"], 0, "{:#?}", actions(&second));
    assert_eq!(snapshot(home.path()), before);
    assert!(config.exists());
}

#[tokio::test]
async fn system_commands_name_the_fix_where_systemd_does_not_run() {
    if Path::new("/run/systemd/system").exists() {
        eprintln!("SKIPPED LOUDLY: systemd runs this host; the not-running error cannot be shown here");
        return;
    }
    for args in [
        &["system", "status"][..],
        &["system", "enable"],
        &["system", "logs", "--since", "1h"],
    ] {
        let out = Command::new(DSO).args(args).output().await.unwrap();
        assert_eq!(out.status.code(), Some(1), "{args:?}");
        let e = stderr(&out);
        assert!(e.contains("systemd is not running on this host"), "{e}");
        assert!(e.contains("dso agent --config /etc/dso/dso.yaml"), "{e}");
    }
}

/// The syscall number of `sendto(2)`, for `/proc/PID/syscall`.
#[cfg(target_arch = "x86_64")]
const SENDTO: &str = "44";
#[cfg(target_arch = "aarch64")]
const SENDTO: &str = "206";

/// READY=1 is sent only once the listeners and the control socket are bound. Made
/// deterministic: the notification socket's queue is filled first, so the agent's main
/// thread blocks inside the `sendto` of READY. While it is blocked there (seen in
/// `/proc/PID/syscall`), the control socket must already answer and the listener forward;
/// an agent that notified before binding would be stuck before binding anything.
#[tokio::test]
async fn agent_sends_ready_after_binding_and_stopping_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let notify_path = dir.path().join("notify");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let filler = UnixDatagram::unbound().unwrap();
    filler.set_nonblocking(true).unwrap();
    let mut fillers = 0;
    loop {
        match filler.send_to(b"FILLER=1", &notify_path) {
            Ok(_) => fillers += 1,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("filling the notify queue: {e}"),
        }
        assert!(fillers < 100_000, "the notify queue never filled");
    }

    let blue = Echo::start("blue").await;
    let config = dir.path().join("dso.yaml");
    std::fs::write(
        &config,
        format!(
            "proxy:\n  listeners:\n{}",
            listener_yaml("echo", &[blue.addr], "")
        ),
    )
    .unwrap();
    let socket = dir.path().join("run/dso.sock");
    let mut child = Command::new(DSO)
        .arg("agent")
        .arg("--no-docker")
        .arg("--config")
        .arg(&config)
        .arg("--socket")
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify_path)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    // Wait until the main thread (tid = pid, the one running the agent's start-up) sits
    // in sendto: the READY it cannot deliver yet.
    crate::harness::poll(|| async {
        std::fs::read_to_string(format!("/proc/{pid}/syscall"))
            .is_ok_and(|s| s.split_whitespace().next() == Some(SENDTO))
    })
    .await;
    // Still blocked in READY: everything must work already (the API and the listeners run
    // on the runtime's worker threads).
    let (code, _) = http(&socket, "GET", "/v1/health", "")
        .await
        .expect("control socket answers before READY is out");
    assert_eq!(code, 200);
    let out = crate::harness::dso_with_socket(&socket, &["proxy", "status", "--json"]).await;
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let addr = status["listeners"][0]["bind"].as_str().unwrap().parse().unwrap();
    let mut conn = Conn::open(addr).await;
    assert_eq!(conn.greeting().await, "blue");
    conn.echo("while READY is in flight").await;
    drop(conn);

    let recv = |sock: UnixDatagram| {
        tokio::task::spawn_blocking(move || {
            let mut buf = [0u8; 4096];
            let n = sock.recv(&mut buf).expect("a notification in time");
            (String::from_utf8(buf[..n].to_vec()).unwrap(), sock)
        })
    };
    let mut notify = notify;
    for _ in 0..fillers {
        let (m, n) = recv(notify).await.unwrap();
        assert_eq!(m, "FILLER=1", "READY must not come before the fillers");
        notify = n;
    }
    let (ready, notify) = recv(notify).await.unwrap();
    let lines: Vec<&str> = ready.lines().collect();
    assert_eq!(lines[0], "READY=1", "{ready}");
    assert!(
        lines[1].starts_with("STATUS=serving 1 listener(s); control socket"),
        "{ready}"
    );
    assert_eq!(lines[2], format!("MAINPID={pid}"));

    assert!(
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    let (stopping, _) = recv(notify).await.unwrap();
    assert!(
        stopping.starts_with("STOPPING=1\nSTATUS=SIGTERM: draining"),
        "{stopping}"
    );
    let status = tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
}

/// The Docker CLI itself runs the plugin: `docker dso --help` lists every command, Docker's
/// global options before the plugin's name reach dso as the environment its Docker calls
/// read.
#[tokio::test]
async fn docker_runs_the_plugin_with_its_global_options() {
    let Some(docker) = ["/usr/local/bin/docker", "/usr/bin/docker"]
        .into_iter()
        .find(|p| Path::new(p).exists())
    else {
        assert!(std::env::var("CI").is_err(), "CI has the docker CLI");
        eprintln!("SKIPPED LOUDLY: no docker CLI installed");
        return;
    };
    let config = tempfile::tempdir().unwrap();
    std::fs::create_dir(config.path().join("cli-plugins")).unwrap();
    std::os::unix::fs::symlink(DSO, config.path().join("cli-plugins/docker-dso")).unwrap();
    let docker = |args: &[&str]| {
        let mut cmd = Command::new(docker);
        cmd.args(args)
            .env("DOCKER_CONFIG", config.path())
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        async move { cmd.output().await.unwrap() }
    };

    // Every command of `dso --help` is in `docker dso --help`.
    let own = Command::new(DSO).arg("--help").output().await.unwrap();
    let commands: Vec<String> = stdout(&own)
        .split("Commands:")
        .nth(1)
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap()
        .lines()
        // A command's line is indented by two spaces; a wrapped description by more.
        .filter_map(|l| l.strip_prefix("  ").filter(|r| !r.starts_with(' ')))
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect();
    assert!(commands.len() >= 10, "{commands:?}");
    assert!(
        commands.iter().all(|c| c != "events"),
        "a wrapped description read as a command: {commands:?}"
    );
    for help in [&["dso", "--help"][..], &["help", "dso"]] {
        let out = docker(help).await;
        assert!(out.status.success(), "docker {help:?}: {}", stderr(&out));
        let text = stdout(&out);
        assert!(text.contains("Usage: docker dso"), "{text}");
        for c in &commands {
            assert!(
                text.contains(&format!("\n  {c} ")),
                "docker {help:?} lacks {c}: {text}"
            );
        }
    }

    let version = |out: Output| -> serde_json::Value {
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let v = version(docker(&["dso", "version", "--json"]).await);
    assert_eq!(v["plugin"], true);
    assert_eq!(v["docker"]["DOCKER_CONFIG"], config.path().to_str().unwrap());
    assert!(v["docker"].get("DOCKER_HOST").is_none());

    let v = version(
        docker(&[
            "-H",
            "unix:///run/elsewhere.sock",
            "-l",
            "warn",
            "dso",
            "version",
            "--json",
        ])
        .await,
    );
    assert_eq!(v["docker"]["DOCKER_HOST"], "unix:///run/elsewhere.sock");
    assert_eq!(v["plugin"], true);

    let v = version(docker(&["--context", "default", "--tlsverify", "dso", "version", "--json"]).await);
    assert_eq!(v["docker"]["DOCKER_CONTEXT"], "default");
    assert_eq!(v["docker"]["DOCKER_TLS_VERIFY"], "1");
    assert!(v["docker"].get("DOCKER_HOST").is_none());

    // Text output says where the commands go.
    let out = docker(&["--host=tcp://127.0.0.1:1", "dso", "version"]).await;
    assert!(
        stdout(&out).contains("docker:    DOCKER_HOST=tcp://127.0.0.1:1"),
        "{}",
        stdout(&out)
    );
}

/// On a terminal each privileged change is asked for; "n" declines that item only. The
/// terminal is a real pty (python3's `pty.fork`).
#[tokio::test]
async fn setup_on_a_terminal_asks_before_each_change() {
    if !need_root("setup --mode agent on a terminal") {
        return;
    }
    if std::process::Command::new("python3")
        .arg("--version")
        .output()
        .is_err()
    {
        assert!(std::env::var("CI").is_err(), "CI has python3");
        eprintln!("SKIPPED LOUDLY: python3 (for a pty) is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("etc")).unwrap();
    std::fs::write(dir.path().join("etc/group"), "").unwrap();
    // Answers: yes to everything but the third question (the starter config).
    let driver = r#"
import os, pty, sys
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], ["dso", "setup", "--mode", "agent"])
out, asked = b"", 0
while True:
    try:
        data = os.read(fd, 4096)
    except OSError:
        break
    if not data:
        break
    out += data
    if data.rstrip().endswith(b"[Y/n]"):
        asked += 1
        os.write(fd, b"n\n" if asked == 3 else b"\n")
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode())
sys.exit(os.waitstatus_to_exitcode(status))
"#;
    let out = Command::new("python3")
        .args(["-c", driver, DSO])
        .env("DSO_SETUP_ROOT", dir.path())
        .output()
        .await
        .unwrap();
    let text = stdout(&out);
    assert!(out.status.success(), "{text}{}", stderr(&out));
    assert!(text.contains("create the system group dso? [Y/n]"), "{text}");
    assert!(text.contains("write the starter config"), "{text}");
    assert!(text.contains("declined  config:"), "{text}");
    assert!(
        !dir.path().join("etc/dso/dso.yaml").exists(),
        "declined: not written"
    );
    assert!(dir.path().join("etc/dso").is_dir(), "the other answers were yes");
    assert!(dir.path().join("etc/systemd/system/dso-agent.service").is_file());
}

/// A Docker option dso cannot honour stops before anything runs, with the reason (exit 2);
/// a good one is re-executed into the environment (seen by `version`).
#[tokio::test]
async fn plugin_global_options_are_checked_and_applied_without_docker() {
    let dir = tempfile::tempdir().unwrap();
    let plugin = dir.path().join("docker-dso");
    std::os::unix::fs::symlink(DSO, &plugin).unwrap();
    let run = |args: &[&str]| {
        let mut cmd = Command::new(&plugin);
        cmd.args(args)
            .env_remove("DOCKER_HOST")
            .env_remove("DOCKER_CONTEXT");
        async move { cmd.output().await.unwrap() }
    };
    let out = run(&["-H", "unix:///a.sock", "-H", "unix:///b.sock", "dso", "version"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("give one -H"), "{}", stderr(&out));
    assert!(stdout(&out).is_empty());
    let out = run(&["--tlscert", "/x/client.crt", "dso", "version"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("cert.pem"), "{}", stderr(&out));

    let out = run(&["-Hunix:///run/other.sock", "-D", "dso", "version", "--json"]).await;
    assert!(out.status.success(), "{}", stderr(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["docker"]["DOCKER_HOST"], "unix:///run/other.sock");
    assert_eq!(
        v["plugin"], true,
        "the re-executed process still runs as the plugin"
    );
}
