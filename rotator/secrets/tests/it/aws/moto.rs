//! A private `moto_server` per test, on a free loopback port, killed on drop.
//!
//! The binary is `$DSO_MOTO_SERVER` (exported by `.ci/test`), else the virtualenv that
//! `ensure_moto` creates. Never skipped: when moto is missing or does not start, the test
//! fails and says how to install it.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Where `ensure_moto` installs moto_server when `DSO_MOTO_SERVER` is unset.
const DEFAULT_MOTO: &str = "/opt/dso-moto-venv/bin/moto_server";

/// A running moto_server.
pub struct Moto {
    child: Child,
    /// `127.0.0.1:PORT`.
    pub addr: SocketAddr,
    /// moto's stderr (werkzeug's request log and any start-up error).
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl Moto {
    /// Starts a moto_server with no IAM checks (any credentials are accepted).
    pub fn start() -> Moto {
        Moto::start_with(&[])
    }

    /// Starts a moto_server with extra environment (e.g. `INITIAL_NO_AUTH_ACTION_COUNT`).
    pub fn start_with(env: &[(&str, &str)]) -> Moto {
        let bin = binary();
        let mut last = String::new();
        // A port picked by binding :0 can be taken again before moto binds it: retry.
        for _ in 0..3 {
            let dir = tempfile::tempdir().expect("tempdir");
            let stderr = dir.path().join("moto.err");
            let port = free_port();
            let mut cmd = Command::new(&bin);
            cmd.args(["-H", "127.0.0.1", "-p", &port.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(&stderr).expect("moto stderr file"))
                // moto must never look for real AWS configuration.
                .env("AWS_CONFIG_FILE", "/dev/null")
                .env("AWS_SHARED_CREDENTIALS_FILE", "/dev/null");
            for (k, v) in env {
                cmd.env(k, v);
            }
            let child = cmd.spawn().unwrap_or_else(|e| {
                panic!(
                    "cannot start moto_server {}: {e}. Run `source .ci/services.sh && ensure_moto`",
                    bin.display()
                )
            });
            let addr: SocketAddr = ([127, 0, 0, 1], port).into();
            let mut moto = Moto {
                child,
                addr,
                stderr,
                _dir: dir,
            };
            match moto.wait_ready(Duration::from_secs(60)) {
                Ok(()) => return moto,
                Err(e) => last = e,
            }
        }
        panic!("moto_server {} did not start on loopback: {last}", bin.display());
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn wait_ready(&mut self, limit: Duration) -> Result<(), String> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Err(format!("exited with {status}: {}", self.stderr_tail()));
            }
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no answer on {} within {limit:?}: {}",
            self.addr,
            self.stderr_tail()
        ))
    }

    fn stderr_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The moto_server binary, or a failure that says how to get one.
fn binary() -> PathBuf {
    match std::env::var_os("DSO_MOTO_SERVER") {
        Some(path) => {
            let path = PathBuf::from(path);
            assert!(
                path.is_file(),
                "DSO_MOTO_SERVER={} does not exist; run `source .ci/services.sh && ensure_moto`",
                path.display()
            );
            path
        }
        None => {
            let path = PathBuf::from(DEFAULT_MOTO);
            assert!(
                path.is_file(),
                "moto_server not found (DSO_MOTO_SERVER is unset and {DEFAULT_MOTO} does not exist); \
                 run `source .ci/services.sh && ensure_moto` (the AWS tests never skip)"
            );
            path
        }
    }
}

/// A loopback port that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}
