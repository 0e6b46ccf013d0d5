//! `dso doctor` on a healthy setup (a local vault, an agent, the real engine, a tmpfs
//! delivery root, the static launcher) and on deliberately broken ones: no agent, a socket
//! with the wrong mode, a config error, a delivery root on disk, a missing or dynamically
//! linked launcher, an unreachable provider, DOCKER_HOST pointing at nothing. Each asserts
//! the exit code and the JSON status of the check concerned.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Output;

use tempfile::TempDir;
use tokio::process::Command;

use crate::harness::{Agent, DSO, Echo, listener_yaml, stderr};

/// The static launcher built by `.ci` (`DSO_INIT_BIN`, else the workspace's static build).
fn launcher() -> PathBuf {
    std::env::var_os("DSO_INIT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../target/static/x86_64-unknown-linux-gnu/release/dso-init")
        })
}

/// A setup's files: a local vault with one value, a tmpfs delivery root, a state directory.
struct Setup {
    dir: TempDir,
    /// On /dev/shm: a tmpfs.
    root: TempDir,
    state: TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let s = Setup {
            dir: tempfile::tempdir().unwrap(),
            root: tempfile::tempdir_in("/dev/shm").unwrap(),
            state: tempfile::tempdir().unwrap(),
        };
        let out = s.vault(&["init"], b"").await;
        assert!(out.status.success(), "{}", stderr(&out));
        let out = s
            .vault(&["secret", "set", "app/db_password"], b"doctor-value-7Hq")
            .await;
        assert!(out.status.success(), "{}", stderr(&out));
        assert!(
            launcher().is_file(),
            "the static launcher {} is missing: build it (.ci/test does) or set DSO_INIT_BIN",
            launcher().display()
        );
        s
    }

    async fn vault(&self, args: &[&str], stdin: &[u8]) -> Output {
        crate::harness::dso_vault(self.dir.path(), None, args, stdin).await
    }

    /// The healthy config with `delivery` as the `agent.delivery` lines, `providers` as the
    /// extra providers and `listeners` under `proxy.listeners`.
    fn yaml(&self, delivery: &str, providers: &str, listeners: &str) -> String {
        format!(
            "providers:\n  local:\n    type: local\n    vault_file: {d}/vault.enc\n    master_key_file: {d}/master.key\n{providers}\
agent:\n  watch:\n    polling_interval: 10m\n  delivery:\n{delivery}\
secrets:\n  - name: app\n    provider: local\n    mappings:\n      DB_PASSWORD: app/db_password\n\
proxy:\n  listeners:\n{listeners}",
            d = self.dir.path().display(),
        )
    }

    fn healthy_delivery(&self) -> String {
        format!(
            "    root: {}\n    launcher: {}\n",
            self.root.path().display(),
            launcher().display()
        )
    }

    /// Writes `yaml` as the config file and returns its path.
    fn write(&self, yaml: &str) -> PathBuf {
        let path = self.dir.path().join("dso.yaml");
        std::fs::write(&path, yaml).unwrap();
        path
    }

    /// Runs `dso --socket SOCKET doctor --config CONFIG --state-dir STATE --json EXTRA`.
    async fn doctor(&self, config: &Path, socket: &Path, extra: &[&str], env: &[(&str, &str)]) -> Report {
        let out = Command::new(DSO)
            .arg("--socket")
            .arg(socket)
            .arg("doctor")
            .arg("--config")
            .arg(config)
            .arg("--state-dir")
            .arg(self.state.path())
            .arg("--json")
            .args(extra)
            .env_remove("DOCKER_HOST")
            .env_remove("DSO_SOCKET")
            .env_remove("DSO_STATE_DIR")
            .envs(env.iter().copied())
            .output()
            .await
            .unwrap();
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("doctor --json printed no JSON ({e}): {}", stderr(&out)));
        Report { out, json }
    }

    /// A socket path where nothing runs.
    fn no_socket(&self) -> PathBuf {
        self.dir.path().join("none.sock")
    }
}

struct Report {
    out: Output,
    json: serde_json::Value,
}

impl Report {
    fn code(&self) -> Option<i32> {
        self.out.status.code()
    }

    /// The check named `name`.
    fn check(&self, name: &str) -> &serde_json::Value {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == name)
            .unwrap_or_else(|| panic!("no check {name}: {}", self.json))
    }

    fn status(&self, name: &str) -> &str {
        self.check(name)["status"].as_str().unwrap()
    }

    fn found(&self, name: &str) -> &str {
        self.check(name)["found"].as_str().unwrap()
    }

    fn failed(&self) -> Vec<&str> {
        self.json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["status"] == "fail")
            .map(|c| c["name"].as_str().unwrap())
            .collect()
    }
}

/// Starts an agent (no Docker) on the setup's config.
async fn agent(setup: &Setup, yaml: String) -> Agent {
    let state = setup.state.path().to_str().unwrap().to_owned();
    Agent::start_with(move |_| yaml, &["--state-dir", &state], "info").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_setup_passes_with_exit_0() {
    let s = Setup::new().await;
    let blue = Echo::start("blue").await;
    let yaml = s.yaml(
        &s.healthy_delivery(),
        "",
        &listener_yaml("echo", &[blue.addr], ""),
    );
    let config = s.write(&yaml);
    let a = agent(&s, yaml).await;
    let r = s.doctor(&config, &a.socket, &[], &[]).await;
    assert!(r.failed().is_empty(), "{:#}", r.json);
    assert_eq!(r.code(), Some(0), "{}", stderr(&r.out));
    assert_eq!(r.json["ok"], true);
    for name in [
        "config",
        "docker engine",
        "clock",
        "agent",
        "delivery tmpfs",
        "launcher",
        "state directory",
        "provider local",
    ] {
        assert_eq!(r.status(name), "ok", "{name}: {:#}", r.check(name));
    }
    assert!(
        r.found("docker engine").contains("API 1."),
        "{}",
        r.found("docker engine")
    );
    assert!(
        r.found("launcher").contains("static ELF"),
        "{}",
        r.found("launcher")
    );
    assert!(r.found("agent").contains("docker: off"), "{}", r.found("agent"));
    // The socket is 0660; its group is `dso` only where that group exists.
    assert_ne!(r.status("agent socket"), "fail", "{:#}", r.check("agent socket"));
    assert_ne!(r.status("compose"), "fail", "{:#}", r.check("compose"));
    // The text form says the same and exits the same.
    let out = Command::new(DSO)
        .arg("--socket")
        .arg(&a.socket)
        .args(["doctor", "--config"])
        .arg(&config)
        .arg("--state-dir")
        .arg(s.state.path())
        .env_remove("DOCKER_HOST")
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("ok       provider local"), "{text}");
    // The value never shows.
    assert!(!text.contains("doctor-value-7Hq") && !r.json.to_string().contains("doctor-value-7Hq"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_agent_on_the_socket_fails() {
    let s = Setup::new().await;
    let config = s.write(&s.yaml(&s.healthy_delivery(), "", "    []\n"));
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.json["ok"], false);
    assert_eq!(r.status("agent socket"), "fail", "{:#}", r.json);
    assert!(
        r.found("agent socket").contains("none.sock"),
        "{}",
        r.found("agent socket")
    );
    assert_eq!(r.status("agent"), "skipped");
    assert!(stderr(&r.out).contains("check(s) failed"), "{}", stderr(&r.out));

    // A socket file left behind with nothing listening: the socket looks right, the agent
    // does not answer.
    let stale = s.dir.path().join("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    std::fs::set_permissions(&stale, std::fs::Permissions::from_mode(0o660)).unwrap();
    let r = s.doctor(&config, &stale, &[], &[]).await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("agent"), "fail", "{:#}", r.json);
    assert!(
        r.found("agent").contains("no agent answers"),
        "{}",
        r.found("agent")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_with_the_wrong_mode_fails_or_warns() {
    let s = Setup::new().await;
    let yaml = s.yaml(&s.healthy_delivery(), "", "    []\n");
    let config = s.write(&yaml);
    let a = agent(&s, yaml).await;
    std::fs::set_permissions(&a.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
    let r = s.doctor(&config, &a.socket, &[], &[]).await;
    assert_eq!(r.code(), Some(1), "{:#}", r.json);
    assert_eq!(r.status("agent socket"), "fail", "{:#}", r.json);
    assert!(
        r.found("agent socket").contains("mode 0666"),
        "{}",
        r.found("agent socket")
    );
    assert_eq!(r.failed(), ["agent socket"], "{:#}", r.json);
    // Too narrow (group members locked out) is a warning: the run still passes.
    std::fs::set_permissions(&a.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let r = s.doctor(&config, &a.socket, &[], &[]).await;
    assert_eq!(r.status("agent socket"), "warn", "{:#}", r.json);
    assert_eq!(r.code(), Some(0), "warnings do not fail: {:#}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_error_names_the_key_and_the_line() {
    let s = Setup::new().await;
    let config = s.write("proxy:\n  listeners: []\nagent:\n  delivery:\n    rooot: /run/dso/secrets\n");
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("config"), "fail");
    let found = r.found("config");
    assert!(found.contains("rooot") && found.contains("line 5"), "{found}");
    for dependent in ["delivery tmpfs", "launcher", "providers"] {
        assert_eq!(r.status(dependent), "skipped", "{dependent}: {:#}", r.json);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delivery_root_that_is_not_a_tmpfs_fails() {
    let s = Setup::new().await;
    let disk = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let on_disk = |mount: bool| {
        format!(
            "    root: {}\n    mount_tmpfs: {mount}\n    launcher: {}\n",
            disk.path().display(),
            launcher().display()
        )
    };
    let config = s.write(&s.yaml(&on_disk(false), "", "    []\n"));
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("delivery tmpfs"), "fail", "{:#}", r.json);
    let found = r.found("delivery tmpfs");
    assert!(
        found.contains("agent.delivery.root") && found.contains("not a tmpfs"),
        "{found}"
    );
    // With mount_tmpfs the agent mounts one at start: before it runs, a warning.
    let config = s.write(&s.yaml(&on_disk(true), "", "    []\n"));
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.status("delivery tmpfs"), "warn", "{:#}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_dynamically_linked_launcher_fails() {
    let s = Setup::new().await;
    let with = |launcher: &str| {
        format!(
            "    root: {}\n    launcher: {launcher}\n",
            s.root.path().display()
        )
    };
    let missing = s.dir.path().join("no-dso-init");
    let config = s.write(&s.yaml(&with(missing.to_str().unwrap()), "", "    []\n"));
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("launcher"), "fail", "{:#}", r.json);
    assert!(
        r.found("launcher").contains("no-dso-init"),
        "{}",
        r.found("launcher")
    );
    // The dso binary itself is dynamically linked against glibc.
    let config = s.write(&s.yaml(&with(DSO), "", "    []\n"));
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.status("launcher"), "fail", "{:#}", r.json);
    assert!(
        r.found("launcher").contains("dynamically linked"),
        "{}",
        r.found("launcher")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_provider_fails() {
    let s = Setup::new().await;
    // The local vault file is gone: checked at the basic level already.
    std::fs::rename(s.dir.path().join("vault.enc"), s.dir.path().join("moved.enc")).unwrap();
    let config = s.write(&s.yaml(&s.healthy_delivery(), "", "    []\n"));
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("provider local"), "fail", "{:#}", r.json);
    assert!(
        r.found("provider local").contains("provider local"),
        "{}",
        r.found("provider local")
    );
    std::fs::rename(s.dir.path().join("moved.enc"), s.dir.path().join("vault.enc")).unwrap();

    // AWS at a loopback port where nothing listens: skipped at the basic level, a failure
    // with --level full.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let aws = format!(
        "  aws:\n    type: aws\n    region: us-east-1\n    endpoint_url: http://{closed}\n    auth:\n      method: env\n"
    );
    let yaml = s.yaml(&s.healthy_delivery(), &aws, "    []\n").replace(
        "secrets:\n",
        "secrets:\n  - name: db\n    provider: aws\n    mappings:\n      PW: dso/doctor/pw\n",
    );
    let config = s.write(&yaml);
    let env = [
        ("AWS_ACCESS_KEY_ID", "testing"),
        ("AWS_SECRET_ACCESS_KEY", "testing"),
        ("AWS_CONFIG_FILE", "/dev/null"),
        ("AWS_SHARED_CREDENTIALS_FILE", "/dev/null"),
    ];
    let r = s.doctor(&config, &s.no_socket(), &[], &env).await;
    assert_eq!(r.status("provider aws"), "skipped", "{:#}", r.json);
    assert_eq!(r.status("provider local"), "ok", "{:#}", r.json);
    let r = s
        .doctor(&config, &s.no_socket(), &["--level", "full"], &env)
        .await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("provider aws"), "fail", "{:#}", r.json);
    assert!(
        r.found("provider aws").contains("unreachable"),
        "{}",
        r.found("provider aws")
    );
    assert_eq!(r.status("provider local"), "ok", "{:#}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_host_pointing_at_nothing_fails_the_engine_check() {
    let s = Setup::new().await;
    let config = s.write(&s.yaml(&s.healthy_delivery(), "", "    []\n"));
    let nothing = format!("unix://{}", s.dir.path().join("no-docker.sock").display());
    let r = s
        .doctor(&config, &s.no_socket(), &[], &[("DOCKER_HOST", &nothing)])
        .await;
    assert_eq!(r.code(), Some(1));
    assert_eq!(r.status("docker engine"), "fail", "{:#}", r.json);
    assert!(
        r.found("docker engine").contains(&nothing),
        "{}",
        r.found("docker engine")
    );
    assert_eq!(r.status("clock"), "skipped");
    // The same setup with the real engine: the engine check passes.
    let r = s.doctor(&config, &s.no_socket(), &[], &[]).await;
    assert_eq!(r.status("docker engine"), "ok", "{:#}", r.json);

    // An agent that manages Docker, started with that DOCKER_HOST, runs and waits for its
    // engine: the agent check warns with the agent's own message.
    let scope = format!("dso.test.run=doctor-none-{}", std::process::id());
    let state = s.state.path().to_str().unwrap().to_owned();
    let yaml = s.yaml(
        &s.healthy_delivery(),
        "",
        "    []
",
    );
    let a = Agent::start_env(
        move |_| yaml,
        &["--docker", "--docker-scope", &scope, "--state-dir", &state],
        "info",
        &[("DOCKER_HOST", &nothing)],
    )
    .await;
    let r = s.doctor(&config, &a.socket, &[], &[]).await;
    assert_eq!(r.status("agent"), "warn", "{:#}", r.json);
    assert!(
        r.found("agent")
            .contains(&format!("docker: waiting for the engine at {nothing}")),
        "{}",
        r.found("agent")
    );
}
