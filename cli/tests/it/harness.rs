//! Scenario helpers: echo backends that say who they are, an agent process on a temp
//! config and socket, the CLI, and a raw HTTP client for the control socket.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::Duration;

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream, UnixStream};
use tokio::process::{Child, Command};

/// The binary under test.
pub const DSO: &str = env!("CARGO_BIN_EXE_dso");

/// How long any poll waits before the test fails.
const PATIENCE: Duration = Duration::from_secs(15);

/// A TCP backend that greets each client with `NAME\n`, then echoes.
pub struct Echo {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl Echo {
    /// Binds `127.0.0.1:0` and serves until dropped.
    pub async fn start(name: &str) -> Echo {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let greeting = format!("{name}\n");
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                let greeting = greeting.clone();
                tokio::spawn(async move {
                    if s.write_all(greeting.as_bytes()).await.is_err() {
                        return;
                    }
                    let mut buf = [0u8; 4096];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        Echo { addr, task }
    }
}

impl Drop for Echo {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A client connection through the proxy.
pub struct Conn(BufReader<TcpStream>);

impl Conn {
    /// Connects to `addr`.
    pub async fn open(addr: SocketAddr) -> Conn {
        Conn(BufReader::new(TcpStream::connect(addr).await.unwrap()))
    }

    /// Reads the backend's greeting line: which backend serves this connection.
    pub async fn greeting(&mut self) -> String {
        let mut line = String::new();
        tokio::time::timeout(PATIENCE, self.0.read_line(&mut line))
            .await
            .expect("greeting in time")
            .unwrap();
        line.trim_end().to_owned()
    }

    /// Sends `msg` and checks it comes back intact.
    pub async fn echo(&mut self, msg: &str) {
        self.0.get_mut().write_all(msg.as_bytes()).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(PATIENCE, self.0.read_exact(&mut back))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!(String::from_utf8(back).unwrap(), msg);
    }

    /// Sends bytes without reading.
    pub async fn send(&mut self, msg: &str) {
        self.0.get_mut().write_all(msg.as_bytes()).await.unwrap();
    }

    /// Reads exactly `n` bytes.
    pub async fn read(&mut self, n: usize) -> String {
        let mut back = vec![0u8; n];
        tokio::time::timeout(PATIENCE, self.0.read_exact(&mut back))
            .await
            .expect("bytes in time")
            .unwrap();
        String::from_utf8(back).unwrap()
    }
}

/// A running `dso agent` with its temp directory.
pub struct Agent {
    /// Holds the config, the socket and the log; removed on drop.
    pub dir: TempDir,
    /// The control socket.
    pub socket: PathBuf,
    /// The agent process, killed on drop.
    pub child: Child,
}

/// One listener of the config, `listen: 127.0.0.1:0` (the kernel picks the port).
pub fn listener_yaml(name: &str, backends: &[SocketAddr], extra: &str) -> String {
    let list: Vec<String> = backends.iter().map(|b| b.to_string()).collect();
    format!(
        "    - name: {name}\n      listen: 127.0.0.1:0\n      backends: [{}]\n{extra}",
        list.join(", ")
    )
}

impl Agent {
    /// Starts an agent with these listener entries and waits until it answers.
    pub async fn start(listeners: &str, args: &[&str]) -> Agent {
        Agent::start_with(|_| format!("proxy:\n  listeners:\n{listeners}"), args, "info").await
    }

    /// Starts an agent on the config `yaml(dir)` returns (given the agent's temp dir, so the
    /// config can point into it), logging at `log_level`.
    pub async fn start_with(yaml: impl FnOnce(&Path) -> String, args: &[&str], log_level: &str) -> Agent {
        Agent::start_env(yaml, args, log_level, &[]).await
    }

    /// [`Agent::start_with`] with extra environment variables for the agent process.
    pub async fn start_env(
        yaml: impl FnOnce(&Path) -> String,
        args: &[&str],
        log_level: &str,
        env: &[(&str, &str)],
    ) -> Agent {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("dso.yaml");
        std::fs::write(&config, yaml(dir.path())).unwrap();
        let socket = dir.path().join("run/dso.sock");
        let log = std::fs::File::create(dir.path().join("agent.log")).unwrap();
        let child = Command::new(DSO)
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .arg("--socket")
            .arg(&socket)
            .args(args)
            // The agent manages Docker by default; on the shared engine an agent that did
            // not ask for it must not adopt other tests' containers.
            .args(no_docker_unless_asked(args))
            .env("RUST_LOG", log_level)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let agent = Agent { dir, socket, child };
        agent.wait_ready().await;
        agent
    }

    async fn wait_ready(&self) {
        poll(|| async { http(&self.socket, "GET", "/v1/health", "").await.is_ok() }).await;
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("agent.log")).unwrap_or_default()
    }

    /// Runs `dso --socket SOCKET ARGS...`.
    pub async fn dso(&self, args: &[&str]) -> Output {
        dso_with_socket(&self.socket, args).await
    }

    /// The `/v1/proxy` snapshot as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let out = self.dso(&["proxy", "status", "--json"]).await;
        assert!(out.status.success(), "status failed: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The bound address of listener `name`.
    pub async fn addr(&self, name: &str) -> SocketAddr {
        let s = self.status().await;
        let l = s["listeners"]
            .as_array()
            .unwrap()
            .iter()
            .find(|l| l["name"] == name)
            .unwrap();
        l["bind"].as_str().unwrap().parse().unwrap()
    }

    /// Sends a signal to the agent process.
    pub fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("agent running").to_string();
        let ok = std::process::Command::new("kill")
            .args([&format!("-{sig}"), &pid])
            .status()
            .unwrap();
        assert!(ok.success());
    }
}

/// `["--no-docker"]` unless `args` ask for Docker (`--docker`, `--docker=...`).
pub fn no_docker_unless_asked(args: &[&str]) -> Vec<&'static str> {
    if args
        .iter()
        .any(|a| *a == "--docker" || a.starts_with("--docker="))
    {
        Vec::new()
    } else {
        vec!["--no-docker"]
    }
}

/// Runs the CLI against `socket`.
pub async fn dso_with_socket(socket: &Path, args: &[&str]) -> Output {
    Command::new(DSO)
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("DSO_SOCKET")
        .output()
        .await
        .unwrap()
}

/// Runs the CLI with no socket argument.
pub async fn dso(args: &[&str]) -> Output {
    Command::new(DSO)
        .args(args)
        .env_remove("DSO_SOCKET")
        .output()
        .await
        .unwrap()
}

/// A command's stdout as text.
pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// A command's stderr as text.
pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Polls `check` every 10 ms until it holds; fails the test after [`PATIENCE`].
pub async fn poll<F, Fut>(mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not met within {PATIENCE:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One HTTP/1.1 request on the control socket: `(status, body)`.
pub async fn http(socket: &Path, method: &str, path: &str, body: &str) -> std::io::Result<(u16, String)> {
    let mut s = UnixStream::connect(socket).await?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).await?;
    let status = resp.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// Runs `docker ARGS` against the real engine and returns its trimmed stdout; fails the
/// test (never skips) when Docker is missing or the command fails, with Docker's error.
pub fn docker(args: &[&str]) -> String {
    let out = std::process::Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker ({e}): run `bash .ci/services.sh docker` first"));
    assert!(
        out.status.success(),
        "docker {}: {} (Docker must run: `bash .ci/services.sh docker`; image: `bash .ci/build-test-image.sh`)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Fails when `text` holds any of `values`: raw, in base64, or any line of 8 bytes or more
/// (the message names `what`, never the text, which would hold the value).
pub fn assert_no_value(what: &str, text: &str, values: &[&[u8]]) {
    use base64::Engine as _;
    for value in values {
        let raw = String::from_utf8_lossy(value);
        let b64 = base64::engine::general_purpose::STANDARD.encode(value);
        assert!(!text.contains(raw.as_ref()), "{what} holds a value");
        assert!(
            !text.contains(b64.trim_end_matches('=')),
            "{what} holds a value in base64"
        );
        for line in raw.lines().filter(|l| l.len() >= 8) {
            assert!(!text.contains(line), "{what} holds a line of a value");
        }
    }
}

impl Agent {
    /// Waits until a just spawned agent answers `/v1/health`; fails with its log when it
    /// exits first or does not answer `within`.
    pub async fn wait_started(&mut self, within: std::time::Duration) {
        let deadline = std::time::Instant::now() + within;
        while http(&self.socket, "GET", "/v1/health", "").await.is_err() {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("the agent exited with {status} at start:\n{}", self.log());
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the agent did not answer within {within:?}:\n{}",
                self.log()
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// `dso [--socket SOCKET] ARGS` with the local vault whose `vault.enc` and `master.key` are
/// in `vault`, and `stdin` written to its standard input (a value never goes in argv).
pub async fn dso_vault(vault: &Path, socket: Option<&Path>, args: &[&str], stdin: &[u8]) -> Output {
    let mut cmd = Command::new(DSO);
    if let Some(socket) = socket {
        cmd.arg("--socket").arg(socket);
    }
    let mut child = cmd
        .args(args)
        .env("DSO_VAULT_FILE", vault.join("vault.enc"))
        .env("DSO_MASTER_KEY_FILE", vault.join("master.key"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin).await.unwrap();
    drop(input);
    child.wait_with_output().await.unwrap()
}
