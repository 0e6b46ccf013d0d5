//! The agent's side of `dso up` / `dso down` against the real engine and real Compose v2
//! (`docker compose`) and v1 (`docker-compose`): a hand-written Compose file, an override
//! built from `POST /v1/compose/prepare`'s answer as `dso up` builds it, the container
//! reading its file and env values; a `dso secret set` rotating it; Compose's view after
//! the rotation (`ps` lists one container, `up` recreates nothing, `logs` works); a plain
//! `docker compose up` reported by `GET /v1/services` (also after an agent restart); and
//! `docker compose down` + `POST /v1/compose/down` releasing the port and leaving no
//! instance directory. These fail (never skip) when Docker, Compose, the image or the
//! launcher is missing.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command as StdCommand, Output, Stdio};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::process::Command;

use crate::harness::{Agent, DSO, docker, http, stderr};

fn launcher() -> String {
    std::env::var("DSO_INIT_BIN").unwrap_or_else(|_| {
        panic!("DSO_INIT_BIN is not set: export DSO_INIT_BIN=$(bash .ci/build-test-image.sh --init-path)")
    })
}

fn image() -> String {
    std::env::var("DSO_TESTSRV_IMAGE").unwrap_or_else(|_| "dso-testsrv:test".to_owned())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Flavor {
    /// `docker compose` (v2): the override on stdin, `-f -` after the file.
    V2,
    /// `docker-compose` 1.29: `-f -` only works alone, so the override (names, paths and
    /// labels, never a value) goes to a file of the test's directory.
    V1,
}

/// A vault, an agent scoped to this run, a Compose project directory; containers,
/// networks and the agent's tmpfs removed on drop.
struct Project {
    flavor: Flavor,
    run: String,
    name: String,
    vault: tempfile::TempDir,
    state: tempfile::TempDir,
    dir: tempfile::TempDir,
    root: PathBuf,
    yaml: String,
    agent: Option<Agent>,
}

impl Project {
    async fn new(flavor: Flavor) -> Project {
        let nanos = SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let tag = if flavor == Flavor::V2 { "v2" } else { "v1" };
        let name = format!("dsot-ca{tag}-{}x{nanos:x}", std::process::id());
        let vault = tempfile::tempdir().unwrap();
        let state = tempfile::tempdir().unwrap();
        let root = state.path().join("secrets-tmpfs");
        let yaml = format!(
            "version: v1.0.0\nproviders:\n  local:\n    type: local\n    vault_file: {v}/vault.enc\n    master_key_file: {v}/master.key\n\
agent:\n  watch:\n    polling_interval: 1s\n    debounce: 0s\n  delivery:\n    root: {root}\n    launcher: {launcher}\n\
proxy:\n  listeners: []\n",
            v = vault.path().display(),
            root = root.display(),
            launcher = launcher(),
        );
        let p = Project {
            flavor,
            run: name.clone(),
            name,
            vault,
            state,
            dir: tempfile::tempdir().unwrap(),
            root,
            yaml,
            agent: None,
        };
        let init = p.dso_vault(&["init"], b"").await;
        assert!(init.status.success(), "dso init: {}", stderr(&init));
        // The service's Compose file as a user writes it: references in `environment:`.
        std::fs::write(
            p.dir.path().join("compose.yml"),
            format!(
                "services:\n  web:\n    image: {image}\n    labels:\n      dso.test.run: {run}\n    environment:\n      KEY_FILE: dsofile://shop/key\n",
                image = image(),
                run = p.run
            ),
        )
        .unwrap();
        p
    }

    async fn start_agent(&mut self) {
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
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut agent = Agent { dir, socket, child };
        agent.wait_started(Duration::from_secs(30)).await;
        self.agent = Some(agent);
    }

    async fn stop_agent(&mut self) {
        let mut agent = self.agent.take().expect("an agent runs");
        agent.signal("TERM");
        let status = tokio::time::timeout(Duration::from_secs(30), agent.child.wait())
            .await
            .expect("the agent exits within 30 s of SIGTERM")
            .unwrap();
        assert!(
            status.success(),
            "the agent exited with {status}:\n{}",
            agent.log()
        );
    }

    fn agent(&self) -> &Agent {
        self.agent.as_ref().unwrap()
    }

    fn log(&self) -> String {
        self.agent.as_ref().map(Agent::log).unwrap_or_default()
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

    async fn api(&self, method: &str, path: &str, body: &str) -> (u16, serde_json::Value) {
        let (code, text) = http(&self.agent().socket, method, path, body).await.unwrap();
        let v = serde_json::from_str(&text).unwrap_or_else(|_| serde_json::Value::String(text.clone()));
        (code, v)
    }

    /// `POST /v1/compose/prepare` for service `web` with these references, as `dso up`
    /// sends it.
    async fn prepare(&self, refs: serde_json::Value) -> (u16, serde_json::Value) {
        let body = serde_json::json!({
            "project": self.name,
            "service": "web",
            "image": image(),
            "user": "",
            "entrypoint": ["/dso-testsrv"],
            "cmd": ["--listen", "0.0.0.0:8080", "--http", "0.0.0.0:8081"],
            "refs": refs,
        });
        self.api("POST", "/v1/compose/prepare", &body.to_string()).await
    }

    fn refs() -> serde_json::Value {
        serde_json::json!({
            "env": [{"var": "API_KEY", "provider": "local", "ref": "shop/env"}],
            "files": [{"var": "KEY_FILE", "provider": "local", "ref": "shop/key"}],
        })
    }

    /// The override `dso up` builds from a prepare answer: dso's labels, the binds,
    /// entrypoint, command and variables. Names, paths and labels only.
    fn override_of(&self, reply: &serde_json::Value) -> String {
        let mut labels = serde_json::Map::new();
        labels.insert("dso.reloader".into(), "true".into());
        labels.insert("dso.host_ports".into(), "127.0.0.1:0:8080".into());
        labels.insert("dso.drain.timeout".into(), "2s".into());
        for (k, v) in reply["labels"].as_object().unwrap() {
            labels.insert(k.clone(), v.clone());
        }
        let mut web = serde_json::json!({
            "labels": labels,
            "volumes": reply["binds"],
            "environment": reply["environment"],
        });
        if !reply["entrypoint"].is_null() {
            web["entrypoint"] = reply["entrypoint"].clone();
            web["command"] = reply["command"].clone();
        }
        serde_json::json!({ "services": { "web": web } }).to_string()
    }

    /// Runs Compose on the project's file, with `override_yaml` as a second file when
    /// given (stdin for v2, a file for v1).
    fn compose(&self, override_yaml: Option<&str>, args: &[&str]) -> Output {
        let mut cmd = match self.flavor {
            Flavor::V2 => {
                let mut c = StdCommand::new("docker");
                c.arg("compose");
                c
            }
            Flavor::V1 => StdCommand::new("docker-compose"),
        };
        cmd.current_dir(self.dir.path())
            .args(["-p", &self.name, "-f", "compose.yml"]);
        match (self.flavor, override_yaml) {
            (Flavor::V2, Some(_)) => {
                cmd.args(["-f", "-"]);
            }
            (Flavor::V1, Some(o)) => {
                std::fs::write(self.dir.path().join("override.json"), o).unwrap();
                cmd.args(["-f", "override.json"]);
            }
            _ => {}
        }
        cmd.args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("compose runs");
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            if let (Flavor::V2, Some(o)) = (self.flavor, override_yaml) {
                input.write_all(o.as_bytes()).unwrap();
            }
        }
        child.wait_with_output().unwrap()
    }

    fn compose_ok(&self, override_yaml: Option<&str>, args: &[&str]) -> String {
        let out = self.compose(override_yaml, args);
        assert!(
            out.status.success(),
            "compose {args:?}: {}\nagent log:\n{}",
            stderr(&out),
            self.log()
        );
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }

    /// IDs of the project's service `web` containers Compose considers its own.
    fn compose_ps(&self, override_yaml: Option<&str>) -> Vec<String> {
        self.compose_ok(override_yaml, &["ps", "-q"])
            .lines()
            .map(str::trim)
            .filter(|l| l.len() >= 12 && l.chars().all(|c| c.is_ascii_hexdigit()))
            .map(str::to_owned)
            .collect()
    }

    /// Running containers of the project (full IDs).
    fn running(&self) -> Vec<String> {
        docker(&[
            "ps",
            "-q",
            "--no-trunc",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
        ])
        .lines()
        .map(str::to_owned)
        .collect()
    }

    /// The one running container other than `not`, once it answers on its HTTP port.
    async fn one_running(&self, not: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let ids = self.running();
            if ids.len() == 1 && ids[0] != not && get(&ids[0], "/health").await.0 == 200 {
                return ids[0].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no single new running container within 60 s (running: {ids:?}); agent log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn listener(&self) -> SocketAddr {
        let name = format!("{}/web:8080", self.name);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.agent().status().await;
            if let Some(l) = s["listeners"]
                .as_array()
                .unwrap()
                .iter()
                .find(|l| l["name"] == name.as_str())
                && !l["backends"].as_array().is_some_and(Vec::is_empty)
            {
                return l["bind"].as_str().unwrap().parse().unwrap();
            }
            assert!(
                Instant::now() < deadline,
                "listener {name} with a backend never appeared: {s}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The store's instance directories.
    fn instances(&self) -> Vec<String> {
        std::fs::read_dir(&self.root)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// `GET /v1/services`' entry of service `web`.
    async fn service_entry(&self) -> serde_json::Value {
        let (code, v) = self.api("GET", "/v1/services", "").await;
        assert_eq!(code, 200, "{v}");
        v.as_array()
            .unwrap()
            .iter()
            .find(|s| s["service"]["project"] == self.name.as_str() && s["service"]["service"] == "web")
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        drop(self.agent.take());
        let ids = docker(&[
            "ps",
            "-aq",
            "--filter",
            &format!("label=com.docker.compose.project={}", self.name),
        ]);
        for id in ids.lines() {
            let _ = StdCommand::new("docker").args(["rm", "-f", id]).output();
        }
        let _ = StdCommand::new("docker")
            .args(["network", "rm", &format!("{}_default", self.name)])
            .output();
        let _ = StdCommand::new("umount").arg(&self.root).output();
    }
}

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
    let Ok(Ok(mut s)) = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr)).await else {
        return (0, Vec::new());
    };
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut buf = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    let Some(split) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        return (0, Vec::new());
    };
    let head = String::from_utf8_lossy(&buf[..split]).to_string();
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, buf[split + 4..].to_vec())
}

/// The greeting line of the proxy's listener (`dso-testsrv <instance>`).
async fn greeting(addr: SocketAddr) -> String {
    let mut s = tokio::time::timeout(Duration::from_secs(5), TcpStream::connect(addr))
        .await
        .expect("connect to the listener")
        .unwrap();
    let mut buf = [0u8; 128];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("a greeting")
        .unwrap();
    String::from_utf8_lossy(&buf[..n]).trim().to_owned()
}

async fn end_to_end(flavor: Flavor) {
    let mut p = Project::new(flavor).await;
    let nanos = SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let key1 = format!("key-one-{nanos:x}");
    let key2 = format!("key-two-{nanos:x}");
    let env1 = format!("env-one-{nanos:x}");
    p.set("shop/key", key1.as_bytes()).await;
    p.set("shop/env", env1.as_bytes()).await;
    p.start_agent().await;

    // Errors name the service, the variable and the reference, never a value.
    let (code, e) = p
        .prepare(serde_json::json!({"files": [{"var": "KEY_FILE", "provider": "nope", "ref": "shop/key"}]}))
        .await;
    assert_eq!(code, 400, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(
        msg.contains("nope") && msg.contains("KEY_FILE") && msg.contains("web"),
        "{msg}"
    );
    let (code, e) = p
        .prepare(
            serde_json::json!({"files": [{"var": "KEY_FILE", "provider": "local", "ref": "shop/missing"}]}),
        )
        .await;
    assert_eq!(code, 404, "{e}");
    let msg = e["error"].as_str().unwrap();
    assert!(msg.contains("shop/missing") && msg.contains("KEY_FILE"), "{msg}");
    assert!(
        p.instances().is_empty(),
        "a refused prepare writes nothing: {:?}",
        p.instances()
    );

    // `dso up`: prepare, then Compose with the override.
    let (code, reply) = p.prepare(Project::refs()).await;
    assert_eq!(code, 200, "{reply}\n{}", p.log());
    let text = reply.to_string();
    assert!(
        !text.contains(&key1) && !text.contains(&env1),
        "no value in the answer"
    );
    let over = p.override_of(&reply);
    p.compose_ok(Some(&over), &["up", "-d"]);
    let first = p.one_running("").await;
    let (code, body) = get(&first, "/file?path=/run/secrets/KEY_FILE").await;
    assert_eq!((code, body), (200, key1.clone().into_bytes()));
    let (code, body) = get(&first, "/env/API_KEY").await;
    assert_eq!(
        (code, body),
        (200, env1.clone().into_bytes()),
        "env through the launcher"
    );
    let (_, body) = get(&first, "/env/KEY_FILE").await;
    assert_eq!(body, b"/run/secrets/KEY_FILE");
    let inspect = docker(&["inspect", &first]);
    assert!(
        !inspect.contains(&key1) && !inspect.contains(&env1),
        "no value in docker inspect"
    );
    let addr = p.listener().await;
    assert!(
        greeting(addr).await.starts_with("dso-testsrv"),
        "the proxy serves it"
    );
    // The values it was created with are recorded as delivered: nothing rotates.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        p.running(),
        std::slice::from_ref(&first),
        "prepare's values are not delivered again\n{}",
        p.log()
    );

    // A change of the referenced value rotates the service; it serves the new value.
    p.set("shop/key", key2.as_bytes()).await;
    // While both containers carry the service's labels, Compose's `up` would remove the
    // newer one: prepare (so `dso up`) answers only once the rotation has ended.
    let deadline = Instant::now() + Duration::from_secs(60);
    while p.running().len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the rotation never started\n{}",
            p.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (code, during) = p.prepare(Project::refs()).await;
    assert_eq!(code, 200, "{during}");
    assert_eq!(
        docker(&["ps", "-aq", "--no-trunc", "--filter", &format!("id={first}")]),
        "",
        "prepare answered while the retired container still existed"
    );
    let green = p.one_running(&first).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = get(&green, "/file?path=/run/secrets/KEY_FILE").await;
        if body == key2.as_bytes() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the new container never served the new value"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(get(&green, "/env/API_KEY").await.1, env1.as_bytes());
    // Wait for the rotation to end (the old container removed, green renamed).
    let deadline = Instant::now() + Duration::from_secs(30);
    while !docker(&["ps", "-aq", "--filter", &format!("id={first}")]).is_empty() {
        assert!(
            Instant::now() < deadline,
            "the retired container was never removed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Compose's view: one container, its own; `up` with the same files recreates nothing.
    let ps = p.compose_ps(Some(&over));
    assert_eq!(ps.len(), 1, "compose ps lists one container: {ps:?}");
    assert!(green.starts_with(&ps[0]), "{ps:?} is {green}");
    let (code, again) = p.prepare(Project::refs()).await;
    assert_eq!(code, 200, "{again}");
    assert_eq!(again, reply, "an unchanged dso up gets the same override");
    let out = p.compose_ok(Some(&p.override_of(&again)), &["up", "-d"]);
    assert_eq!(
        p.running(),
        std::slice::from_ref(&green),
        "up recreated the rotated service:\n{out}"
    );
    assert!(!out.contains("Recreat"), "{out}");
    p.compose_ok(Some(&over), &["logs", "--tail", "5", "web"]);
    assert_eq!(
        get(&green, "/file?path=/run/secrets/KEY_FILE").await.1,
        key2.as_bytes()
    );

    // A plain `docker compose up` (no override): recreated without secrets, reported.
    let out = p.compose_ok(None, &["up", "-d"]);
    let plain = p.one_running(&green).await;
    assert_eq!(
        get(&plain, "/env/KEY_FILE").await.1,
        b"dsofile://shop/key",
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let e = p.service_entry().await;
        if e["error"]
            .as_str()
            .is_some_and(|m| m.contains("run `dso up` in the project directory"))
        {
            break;
        }
        assert!(Instant::now() < deadline, "not reported: {e}\n{}", p.log());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, cs) = p.api("GET", "/v1/compose/services", "").await;
    assert_eq!(cs["services"][0]["state"], "recreated_without_override", "{cs}");
    // `dso doctor` fails on it, naming the service and the fix.
    let agent = p.agent();
    let doctor = Command::new(DSO)
        .arg("--socket")
        .arg(&agent.socket)
        .args(["doctor", "--json", "--config"])
        .arg(agent.dir.path().join("dso.yaml"))
        .output()
        .await
        .unwrap();
    let report: serde_json::Value = serde_json::from_slice(&doctor.stdout).unwrap();
    let compose = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "compose services")
        .unwrap_or_else(|| panic!("no compose services check: {report:#}"))
        .clone();
    assert_eq!(compose["status"], "fail", "{compose}");
    assert!(compose["fix"].as_str().unwrap().contains("dso up"), "{compose}");
    assert_eq!(doctor.status.code(), Some(1), "{report:#}");
    // The agent remembers across a restart.
    p.stop_agent().await;
    p.start_agent().await;
    let e = p.service_entry().await;
    assert!(
        e["error"].as_str().is_some_and(|m| m.contains("dso up")),
        "forgotten after a restart: {e}"
    );

    // `dso up` again puts it back under dso.
    let (code, reply) = p.prepare(Project::refs()).await;
    assert_eq!(code, 200, "{reply}");
    let over = p.override_of(&reply);
    p.compose_ok(Some(&over), &["up", "-d"]);
    let managed = p.one_running(&plain).await;
    assert_eq!(
        get(&managed, "/file?path=/run/secrets/KEY_FILE").await.1,
        key2.as_bytes()
    );
    let addr = p.listener().await;
    assert!(p.service_entry().await["error"].is_null());

    // `dso down`: Compose removes the containers, the agent releases the port at once and
    // wipes the directories.
    p.compose_ok(Some(&over), &["down"]);
    let (code, down) = p
        .api(
            "POST",
            "/v1/compose/down",
            &serde_json::json!({"project": p.name}).to_string(),
        )
        .await;
    assert_eq!(code, 200, "{down}");
    assert_eq!(
        down["released"],
        serde_json::json!([format!("{}/web:8080", p.name)]),
        "{down}"
    );
    assert!(p.instances().is_empty(), "left: {:?}; {down}", p.instances());
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::net::TcpListener::bind(addr) {
            Ok(_) => break,
            Err(e) => assert!(Instant::now() < deadline, "port {addr} still taken: {e}"),
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let (_, cs) = p.api("GET", "/v1/compose/services", "").await;
    assert_eq!(cs["services"], serde_json::json!([]), "forgotten at down: {cs}");
    let logs = p.log();
    assert!(!logs.contains(&key1) && !logs.contains(&key2) && !logs.contains(&env1));
}

#[tokio::test]
async fn compose_v2_service_follows_its_references_through_rotation_recreation_and_down() {
    end_to_end(Flavor::V2).await;
}

#[tokio::test]
async fn compose_v1_service_follows_its_references_through_rotation_recreation_and_down() {
    end_to_end(Flavor::V1).await;
}
