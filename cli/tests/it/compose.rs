//! `dso up` / `dso down` end to end with the real Compose v2 (`docker compose`, 2.40.3) and
//! v1 (`docker-compose` 1.29), the real engine, the `dso-testsrv:test` image and the static
//! launcher (`DSO_INIT_BIN`), in local mode (a local vault in a temp dir, the store on a
//! tmpfs `dso up` mounts under the test's temp dir). Each project has a unique `dsot-` name
//! and is taken down by a guard even when the test fails. What the container sees is read
//! through the test server's HTTP view (`/env/NAME`, `/file?path=P`) on the container's
//! address while the container exists. These fail (never skip) when Docker, Compose, the
//! image or the launcher is missing.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use crate::harness::{DSO, docker};

fn image() -> String {
    std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned())
}

fn launcher() -> String {
    std::env::var("DSO_INIT_BIN").unwrap_or_else(|_| {
        panic!("DSO_INIT_BIN is not set: export DSO_INIT_BIN=$(bash .ci/build-test-image.sh --init-path)")
    })
}

fn text(o: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A Compose project in a temp dir with its own vault and tmpfs store root; taken down
/// (containers, network, instance directories, the tmpfs) on drop.
struct Proj {
    name: String,
    /// `--compose` value: `v1` or `v2`.
    compose: &'static str,
    dir: tempfile::TempDir,
    root: PathBuf,
}

impl Proj {
    fn new(tag: &str, compose: &'static str) -> Proj {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("dsot-{tag}-{compose}-{}x{nanos:x}", std::process::id());
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("tmpfs");
        let p = Proj {
            name,
            compose,
            dir,
            root,
        };
        let init = p.dso_raw(&["init"], b"");
        assert!(init.status.success(), "dso init: {}", text(&init));
        p
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    fn write(&self, file: &str, content: &str) {
        std::fs::write(self.path().join(file), content.replace("IMAGE", &image())).unwrap();
    }

    /// Runs `dso ARGS` in the project directory with the project's vault, `stdin` fed.
    fn dso_env(&self, args: &[&str], stdin: &[u8], env: &[(&str, &str)]) -> Output {
        let mut child = Command::new(DSO)
            .args(args)
            .current_dir(self.path())
            .env_remove("DSO_SOCKET")
            .env_remove("COMPOSE_FILE")
            .env_remove("COMPOSE_PROJECT_NAME")
            .env("DSO_VAULT_FILE", self.path().join("v/vault.enc"))
            .env("DSO_MASTER_KEY_FILE", self.path().join("v/master.key"))
            .envs(env.iter().copied())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(stdin).unwrap();
        child.wait_with_output().unwrap()
    }

    fn dso_raw(&self, args: &[&str], stdin: &[u8]) -> Output {
        self.dso_env(args, stdin, &[])
    }

    fn set(&self, name: &str, value: &[u8]) {
        let o = self.dso_raw(&["secret", "set", name], value);
        assert!(o.status.success(), "dso secret set: {}", text(&o));
    }

    /// `dso up|down --compose V --local --launcher L --secrets-root R -p NAME ARGS`.
    fn compose_args(&self, sub: &str, args: &[&str]) -> Vec<String> {
        let mut a: Vec<String> = [
            sub,
            "--compose",
            self.compose,
            "--local",
            "--launcher",
            &launcher(),
            "--secrets-root",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        a.push(self.root.display().to_string());
        a.extend(args.iter().map(|s| s.to_string()));
        a
    }

    fn run(&self, sub: &str, args: &[&str], env: &[(&str, &str)]) -> Output {
        let a = self.compose_args(sub, args);
        let refs: Vec<&str> = a.iter().map(String::as_str).collect();
        self.dso_env(&refs, b"", env)
    }

    /// `dso up -p NAME -d ARGS`, which must succeed.
    fn up(&self, args: &[&str]) -> Output {
        let mut a = vec!["-p", &self.name, "-d"];
        a.extend_from_slice(args);
        let o = self.run("up", &a, &[]);
        assert!(o.status.success(), "dso up: {}", text(&o));
        o
    }

    /// The container ids of the project (all states).
    fn containers(&self) -> Vec<String> {
        let label = format!("label=com.docker.compose.project={}", self.name);
        let out = docker(&["ps", "-aq", "--no-trunc", "--filter", &label]);
        let mut ids: Vec<String> = out.lines().map(str::to_owned).collect();
        ids.sort();
        ids
    }

    /// The one container of `service`.
    fn container(&self, service: &str) -> String {
        let out = docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
            "--filter",
            &format!("label=com.docker.compose.service={service}"),
        ]);
        let ids: Vec<&str> = out.lines().collect();
        assert_eq!(ids.len(), 1, "one container of {service}: {ids:?}");
        ids[0].to_owned()
    }

    fn inspect(&self, id: &str) -> serde_json::Value {
        let v: serde_json::Value = serde_json::from_str(&docker(&["inspect", id])).unwrap();
        v[0].clone()
    }

    /// `GET path` on the test server's HTTP view of `service` (port 8081 on its address),
    /// retried until the server answers.
    fn view(&self, service: &str, path: &str) -> (u16, String, Vec<u8>) {
        let id = self.container(service);
        let c = self.inspect(&id);
        let ip = c["NetworkSettings"]["Networks"]
            .as_object()
            .and_then(|n| {
                n.values()
                    .find_map(|v| v["IPAddress"].as_str().filter(|s| !s.is_empty()))
            })
            .unwrap_or_else(|| panic!("{service} has no address: {}", c["State"]))
            .to_owned();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match get(&format!("{ip}:8081"), path) {
                Ok(r) => return r,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => panic!("GET {path} on {service} ({ip}): {e}"),
            }
        }
    }

    fn env_of(&self, service: &str, var: &str) -> Option<Vec<u8>> {
        let (status, _, body) = self.view(service, &format!("/env/{var}"));
        (status == 200).then_some(body)
    }

    /// The instance directories in the store root.
    fn instances(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("compose-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for Proj {
    fn drop(&mut self) {
        let _ = self.run("down", &["-p", &self.name.clone()], &[]);
        let ids = self.containers();
        if !ids.is_empty() {
            let mut a = vec!["rm", "-f"];
            a.extend(ids.iter().map(String::as_str));
            let _ = Command::new("docker").args(&a).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &format!("{}_default", self.name)])
            .stderr(Stdio::null())
            .output();
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
        // Images a test built (`build:` without `image:`), v2 and v1 names.
        let _ = Command::new("docker")
            .args([
                "image",
                "rm",
                "-f",
                &format!("{}-web", self.name),
                &format!("{}_web", self.name),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .output();
    }
}

/// One HTTP/1.1 GET: status, the headers' text, body.
fn get(addr: &str, path: &str) -> std::io::Result<(u16, String, Vec<u8>)> {
    let mut s = TcpStream::connect_timeout(&addr.parse().unwrap(), Duration::from_secs(1))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("no header end"))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    Ok((status, head, raw[split + 4..].to_vec()))
}

/// The value every test stores: a `$` (Compose would interpolate it) and newlines.
const VALUE: &[u8] = b"pa$s\nw$$ord $HOME\n";

fn ports_become_host_ports(compose: &'static str) {
    let p = Proj::new("ports", compose);
    p.set("app/key", VALUE);
    // Compose v1 1.29 refuses host_ip in the long syntax; v2 takes it.
    let long = if compose == "v2" {
        "      - target: 8081\n        published: \"19001\"\n        host_ip: 127.0.0.2\n"
    } else {
        "      - target: 8081\n        published: 19001\n"
    };
    p.write(
        "compose.yaml",
        &format!(
            "services:\n  web:\n    image: IMAGE\n    environment:\n      KEY: dso://app/key\n    ports:\n{}{long}",
            "      - \"127.0.0.1:18000-18001:8080-8081\"\n      - \"[::1]:19002:8080/tcp\"\n"
        ),
    );
    p.up(&[]);
    let c = p.inspect(&p.container("web"));
    let expected_long = if compose == "v2" {
        "127.0.0.2:19001:8081"
    } else {
        "19001:8081"
    };
    assert_eq!(
        c["Config"]["Labels"]["dso.host_ports"].as_str().unwrap(),
        format!("127.0.0.1:18000:8080,127.0.0.1:18001:8081,[::1]:19002:8080,{expected_long}")
    );
    assert_eq!(c["Config"]["Labels"]["dso.reloader"], "true");
    let bindings = &c["HostConfig"]["PortBindings"];
    assert!(
        bindings.is_null() || bindings.as_object().is_some_and(|m| m.is_empty()),
        "Docker publishes nothing: {bindings}"
    );
}

#[test]
fn v2_ports_with_bind_ip_long_syntax_and_ranges_move_to_host_ports() {
    ports_become_host_ports("v2");
}

#[test]
fn v1_ports_with_bind_ip_long_syntax_and_ranges_move_to_host_ports() {
    ports_become_host_ports("v1");
}

fn values_reach_the_container_and_not_inspect(compose: &'static str) {
    let p = Proj::new("values", compose);
    p.set("app/key", VALUE);
    p.set("app/db", VALUE);
    p.write(
        "compose.yaml",
        "services:\n  web:\n    image: IMAGE\n    environment:\n      API_KEY: dso://app/key\n      \
DB_FILE: dsofile://app/db\n      PLAIN: \"lit$$eral\"\n",
    );
    p.up(&[]);
    assert_eq!(
        p.env_of("web", "API_KEY").as_deref(),
        Some(VALUE),
        "env via dso://"
    );
    assert_eq!(
        p.env_of("web", "DB_FILE").as_deref(),
        Some(&b"/run/secrets/DB_FILE"[..])
    );
    assert_eq!(p.env_of("web", "PLAIN").as_deref(), Some(&b"lit$eral"[..]));
    let (status, head, body) = p.view("web", "/file?path=/run/secrets/DB_FILE");
    assert_eq!(status, 200, "{head}");
    assert_eq!(body, VALUE, "the file holds the value exactly");
    assert!(head.contains("X-File-Mode: 0400"), "{head}");
    let id = p.container("web");
    let inspect = docker(&["inspect", &id]);
    for needle in ["pa$s", "w$$ord", "$HOME\n"] {
        assert!(!inspect.contains(needle), "docker inspect shows {needle:?}");
    }
    let c = p.inspect(&id);
    let env: Vec<&str> = c["Config"]["Env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|v| v.as_str())
        .collect();
    assert!(!env.iter().any(|e| e.starts_with("API_KEY=")), "{env:?}");
    assert!(env.contains(&"DB_FILE=/run/secrets/DB_FILE"), "{env:?}");
}

#[test]
fn v2_values_with_dollar_and_newline_reach_the_container_and_not_docker_inspect() {
    values_reach_the_container_and_not_inspect("v2");
}

#[test]
fn v1_values_with_dollar_and_newline_reach_the_container_and_not_docker_inspect() {
    values_reach_the_container_and_not_inspect("v1");
}

fn files_and_dotenv(compose: &'static str) {
    let p = Proj::new("files", compose);
    p.set("shop/key", b"from-the-vault");
    p.write(".env", "APP=shop\nGREETING=hello from .env\n");
    p.write("app.env", "FILEKEY=dso://shop/key\nFILEPLAIN=p\n");
    p.write(
        "base.yaml",
        "services:\n  web:\n    image: IMAGE\n    env_file: app.env\n    environment:\n      GREETING: \"${GREETING}\"\n",
    );
    p.write(
        "extra.yaml",
        "services:\n  web:\n    environment:\n      - \"KEY=dso://${APP}/key\"\n      - ONLY_HERE=x\n  other:\n    image: IMAGE\n",
    );
    p.up(&["-f", "base.yaml", "-f", "extra.yaml"]);
    assert_eq!(
        p.env_of("web", "GREETING").as_deref(),
        Some(&b"hello from .env"[..])
    );
    assert_eq!(p.env_of("web", "KEY").as_deref(), Some(&b"from-the-vault"[..]));
    assert_eq!(p.env_of("web", "ONLY_HERE").as_deref(), Some(&b"x"[..]));
    let env = p.inspect(&p.container("web"))["Config"]["Env"].to_string();
    assert!(
        !env.contains("KEY="),
        "a KEY=dso:// list item is removed too: {env}"
    );
    assert_eq!(
        p.env_of("web", "FILEKEY").as_deref(),
        Some(&b"from-the-vault"[..]),
        "env_file references"
    );
    assert_eq!(p.env_of("web", "FILEPLAIN").as_deref(), Some(&b"p"[..]));
    assert!(env.contains("FILEPLAIN=p"), "{env}");
    // The service without references is left to Compose as written.
    let other = p.inspect(&p.container("other"));
    assert!(other["Config"]["Labels"].get("dso.reloader").is_none());
    assert_eq!(p.containers().len(), 2);
}

#[test]
fn v2_several_files_and_dotenv_interpolation() {
    files_and_dotenv("v2");
}

#[test]
fn v1_several_files_and_dotenv_interpolation() {
    files_and_dotenv("v1");
}

fn up_twice_then_down(compose: &'static str) {
    let p = Proj::new("twice", compose);
    p.set("app/key", VALUE);
    p.write(
        "compose.yaml",
        "services:\n  web:\n    image: IMAGE\n    labels:\n      dso.update.strategy: rolling\n    \
environment:\n      KEY: dso://app/key\n      F: dsofile://app/key\n    ports:\n      - \"127.0.0.1:18080:8080\"\n",
    );
    p.up(&[]);
    let first = p.containers();
    assert_eq!(first.len(), 1);
    let started = p.inspect(&first[0])["State"]["StartedAt"].clone();
    p.up(&[]);
    assert_eq!(p.containers(), first, "the second dso up recreated a container");
    assert_eq!(
        p.inspect(&first[0])["State"]["StartedAt"],
        started,
        "nor restarted it"
    );
    assert_eq!(
        p.inspect(&first[0])["Config"]["Labels"]["dso.update.strategy"],
        "rolling",
        "the service's own dso.* labels pass through"
    );
    assert_eq!(p.instances().len(), 1, "{:?}", p.instances());
    let o = p.run("down", &["-p", &p.name], &[]);
    assert!(o.status.success(), "dso down: {}", text(&o));
    assert!(p.containers().is_empty(), "dso down removes the containers");
    assert!(
        p.instances().is_empty(),
        "dso down wipes the instance directory: {:?}",
        p.instances()
    );
}

#[test]
fn v2_up_twice_recreates_nothing_and_down_wipes() {
    up_twice_then_down("v2");
}

#[test]
fn v1_up_twice_recreates_nothing_and_down_wipes() {
    up_twice_then_down("v1");
}

#[test]
fn compose_file_and_project_name_come_from_the_environment() {
    let p = Proj::new("envsel", "v2");
    p.set("app/key", b"k");
    p.write(
        "one.yaml",
        "services:\n  web:\n    image: IMAGE\n    environment:\n      KEY: dso://app/key\n",
    );
    let o = p.run(
        "up",
        &["-d"],
        &[("COMPOSE_FILE", "one.yaml"), ("COMPOSE_PROJECT_NAME", &p.name)],
    );
    assert!(o.status.success(), "{}", text(&o));
    assert_eq!(p.env_of("web", "KEY").as_deref(), Some(&b"k"[..]));
}

#[test]
fn bad_inputs_are_refused_before_anything_is_created() {
    let p = Proj::new("bad", "v2");
    p.set("app/key", b"k");
    p.write(
        "compose.yaml",
        "services:\n  dns:\n    image: IMAGE\n    environment:\n      KEY: dso://app/key\n    ports:\n      - \"5353:53/udp\"\n",
    );
    let o = p.run("up", &["-p", &p.name, "-d"], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("service dns") && err.contains("5353:53/udp") && err.contains("TCP"),
        "{err}"
    );
    assert!(p.containers().is_empty());
    p.write(
        "compose.yaml",
        "services:\n  web:\n    image: IMAGE\n    environment:\n      KEY: dso://app/missing\n",
    );
    let o = p.run("up", &["-p", &p.name, "-d"], &[]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("KEY") && err.contains("app/missing"), "{err}");
    assert!(p.containers().is_empty());
    p.write(
        "compose.yaml",
        "services:\n  web:\n    image: IMAGE\n    environment:\n      KEY: dso+aws://app/key\n",
    );
    let o = p.run("up", &["-p", &p.name, "-d"], &[]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("\"aws\"") && err.contains("local mode"),
        "{err}"
    );
    assert!(p.containers().is_empty());
    let o = p.run(
        "up",
        &["--compose", "/nonexistent/compose", "-p", &p.name, "-d"],
        &[],
    );
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--compose /nonexistent/compose"),
        "{err}"
    );
    assert!(p.containers().is_empty());
}

/// An agent with `--docker`, scoped to one project (`dso.test.run=NAME`), reading the
/// project's vault, its store on a tmpfs under its temp dir; stopped and unmounted on drop.
struct AgentProc {
    dir: tempfile::TempDir,
    socket: PathBuf,
    root: PathBuf,
    child: std::process::Child,
}

impl AgentProc {
    fn start(p: &Proj) -> AgentProc {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("secrets");
        let socket = dir.path().join("run/dso.sock");
        let yaml = format!(
            "version: v1.0.0\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    \
master_key_file: {v}/master.key\nagent:\n  watch:\n    polling_interval: 1s\n    debounce: 0s\n  \
delivery:\n    root: {root}\n    launcher: {launcher}\nproxy:\n  listeners: []\n",
            v = p.path().join("v").display(),
            root = root.display(),
            launcher = launcher(),
        );
        std::fs::write(dir.path().join("dso.yaml"), yaml).unwrap();
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(DSO)
            .arg("agent")
            .arg("--config")
            .arg(dir.path().join("dso.yaml"))
            .arg("--socket")
            .arg(&socket)
            .args([
                "--docker",
                "--docker-scope",
                &format!("dso.test.run={}", p.name),
                "--state-dir",
            ])
            .arg(dir.path().join("state"))
            .env("RUST_LOG", "debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut a = AgentProc {
            dir,
            socket,
            root,
            child,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&a.socket).is_err() {
            if let Ok(Some(s)) = a.child.try_wait() {
                panic!("the agent exited with {s}:\n{}", a.log());
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not answer:\n{}",
                a.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        a
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// `dso --socket S proxy status --json`'s listeners.
    fn listeners(&self) -> Vec<serde_json::Value> {
        let o = Command::new(DSO)
            .arg("--socket")
            .arg(&self.socket)
            .args(["proxy", "status", "--json"])
            .output()
            .unwrap();
        assert!(o.status.success(), "proxy status: {}", text(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["listeners"].as_array().cloned().unwrap_or_default()
    }

    fn instances(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| n.starts_with("compose-"))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = nix::mount::umount2(&self.root, nix::mount::MntFlags::MNT_DETACH);
    }
}

/// Agent mode: prepare through the agent, its proxy owns the port, down releases it.
fn agent_mode(compose: &'static str) {
    let p = Proj::new("agent", compose);
    p.set("app/key", VALUE);
    let agent = AgentProc::start(&p);
    p.write(
        "compose.yaml",
        &format!(
            "services:\n  web:\n    image: IMAGE\n    labels:\n      dso.test.run: {}\n    environment:\n      \
KEY: dso://app/key\n      F: dsofile://app/key\n    ports:\n      - \"127.0.0.1:0:8080\"\n",
            p.name
        ),
    );
    let sock = agent.socket.display().to_string();
    let o = p.dso_env(
        &["up", "--compose", compose, "--socket", &sock, "-p", &p.name, "-d"],
        b"",
        &[],
    );
    assert!(
        o.status.success(),
        "dso up (agent mode): {}\nagent log:\n{}",
        text(&o),
        agent.log()
    );
    assert!(
        !String::from_utf8_lossy(&o.stderr).contains("local mode"),
        "{}",
        text(&o)
    );
    assert_eq!(p.env_of("web", "KEY").as_deref(), Some(VALUE));
    let (_, _, body) = p.view("web", "/file?path=/run/secrets/F");
    assert_eq!(body, VALUE);
    assert_eq!(
        agent.instances().len(),
        1,
        "the agent's store holds the service's directory"
    );
    // The agent adopts the container and its proxy binds the port on 127.0.0.1.
    let deadline = Instant::now() + Duration::from_secs(30);
    let bind = loop {
        let found = agent
            .listeners()
            .into_iter()
            .find(|l| l["name"].as_str().is_some_and(|n| n.contains(&p.name)));
        if let Some(l) = found {
            break l["bind"].as_str().unwrap().to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no listener for the project:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(bind.starts_with("127.0.0.1:"), "{bind}");
    let mut s = TcpStream::connect(&bind).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut greeting = [0u8; 11];
    s.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting, b"dso-testsrv", "the proxy forwards to the container");
    drop(s);
    let o = p.dso_env(
        &["down", "--compose", compose, "--socket", &sock, "-p", &p.name],
        b"",
        &[],
    );
    assert!(
        o.status.success(),
        "dso down: {}\nagent log:\n{}",
        text(&o),
        agent.log()
    );
    assert!(p.containers().is_empty());
    assert!(
        !agent
            .listeners()
            .iter()
            .any(|l| l["name"].as_str().is_some_and(|n| n.contains(&p.name))),
        "dso down releases the port"
    );
    assert!(
        agent.instances().is_empty(),
        "dso down wipes the agent's directories"
    );
}

#[test]
fn v2_agent_mode_prepares_through_the_agent_and_down_releases_the_port() {
    agent_mode("v2");
}

#[test]
fn v1_agent_mode_prepares_through_the_agent_and_down_releases_the_port() {
    agent_mode("v1");
}

#[test]
fn v2_a_missing_image_is_built_before_its_facts_are_read() {
    let p = Proj::new("build", "v2");
    p.set("app/key", b"built");
    p.write("Dockerfile", "FROM IMAGE\n");
    p.write(
        "compose.yaml",
        "services:\n  web:\n    build: .\n    environment:\n      KEY: dso://app/key\n",
    );
    let o = p.up(&[]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("running compose build web"),
        "{}",
        text(&o)
    );
    // The launcher wraps the image's own entrypoint, read after the build.
    assert_eq!(p.env_of("web", "KEY").as_deref(), Some(&b"built"[..]));
}

#[test]
fn docker_dso_up_d_works_as_the_docker_cli_plugin() {
    let p = Proj::new("plugin", "v2");
    p.set("app/key", b"via-plugin");
    p.write(
        "compose.yaml",
        "services:\n  web:\n    image: IMAGE\n    environment:\n      KEY: dso://app/key\n",
    );
    // A Docker config of its own whose cli-plugins hold docker-dso and Compose v2.
    let cfg = p.path().join("docker-config");
    std::fs::create_dir_all(cfg.join("cli-plugins")).unwrap();
    std::os::unix::fs::symlink(DSO, cfg.join("cli-plugins/docker-dso")).unwrap();
    let home = std::env::var("HOME").unwrap();
    let compose = Path::new(&home).join(".docker/cli-plugins/docker-compose");
    let compose = if compose.exists() {
        compose
    } else {
        PathBuf::from("/usr/libexec/docker/cli-plugins/docker-compose")
    };
    std::os::unix::fs::symlink(&compose, cfg.join("cli-plugins/docker-compose")).unwrap();
    let mut args = vec!["dso".to_owned()];
    args.extend(p.compose_args("up", &["-p", &p.name, "-d"]));
    let o = Command::new("docker")
        .args(&args)
        .current_dir(p.path())
        .env("DOCKER_CONFIG", &cfg)
        .env_remove("DSO_SOCKET")
        .env("DSO_VAULT_FILE", p.path().join("v/vault.enc"))
        .env("DSO_MASTER_KEY_FILE", p.path().join("v/master.key"))
        .output()
        .unwrap();
    assert!(o.status.success(), "docker dso up -d: {}", text(&o));
    assert_eq!(p.env_of("web", "KEY").as_deref(), Some(&b"via-plugin"[..]));
}
