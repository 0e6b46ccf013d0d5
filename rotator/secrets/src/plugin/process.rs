//! One running plugin process: its stdin (requests), a reader task for its stdout
//! (answers, dispatched by id) and one for its stderr (logged, redacted, truncated).
//!
//! Any protocol violation (a line that is not JSON, an unknown id, a line over
//! [`MAX_LINE`]), an exit, or a kill request ends the process: its whole process group is
//! killed, it is reaped, and every call in flight fails as `Unavailable`.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncBufReadExt as _, AsyncRead, AsyncReadExt as _, AsyncWriteExt as _, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};
use zeroize::Zeroize as _;

use crate::redact::Redactor;

/// Longest line accepted from a plugin (a 1 MiB value in base64 is about 1.4 MiB).
pub const MAX_LINE: usize = 2 * 1024 * 1024;

/// Longest stderr line logged; the rest of the line is dropped.
pub const MAX_STDERR_LINE: usize = 4096;

/// Environment variables every plugin gets (when the agent has them).
pub const BASE_ENV: [&str; 3] = ["PATH", "HOME", "LANG"];

/// An answer: the `ok` object, or the `error` object.
pub(crate) type Answer = std::result::Result<
    serde_json::Map<String, serde_json::Value>,
    serde_json::Map<String, serde_json::Value>,
>;

/// Why a call got no answer (the process is gone).
pub(crate) type Gone = String;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<std::result::Result<Answer, Gone>>>>>;

/// A live (or just ended) plugin process.
pub(crate) struct Process {
    /// Requests are written whole lines at a time.
    stdin: tokio::sync::Mutex<Option<ChildStdin>>,
    /// Calls waiting for their answer, by id.
    pending: Pending,
    /// Cancelled when the process must die (a hung call, a write failure).
    kill: CancellationToken,
    /// Set when the process ended: when, and why.
    ended: Arc<Mutex<Option<(Instant, String)>>>,
    /// Why the kill was asked for (the first reason wins).
    kill_reason: Arc<Mutex<Option<String>>>,
    /// The process id (also its process group id).
    pub(crate) pid: u32,
}

impl Process {
    /// Starts `exe` with `args` in its own process group, with an environment of only
    /// [`BASE_ENV`] and `extra_env`, in `/`.
    pub(crate) fn spawn(
        name: &str,
        exe: &Path,
        args: &[String],
        extra_env: &[String],
    ) -> std::io::Result<Process> {
        let mut cmd = Command::new(exe);
        cmd.args(args)
            .env_clear()
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        for key in BASE_ENV
            .iter()
            .copied()
            .chain(extra_env.iter().map(String::as_str))
        {
            if let Some(v) = std::env::var_os(key) {
                cmd.env(key, v);
            }
        }
        let mut child = cmd.spawn()?;
        let pid = child.id().unwrap_or(0);
        let stdin = child.stdin.take();
        let stdout = child.stdout.take().expect("piped stdout");
        let stderr = child.stderr.take().expect("piped stderr");
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let kill = CancellationToken::new();
        let ended = Arc::new(Mutex::new(None));
        let kill_reason = Arc::new(Mutex::new(None));
        tokio::spawn(log_stderr(name.to_string(), pid, stderr));
        tokio::spawn(supervise(
            name.to_string(),
            child,
            stdout,
            Arc::clone(&pending),
            kill.clone(),
            Arc::clone(&kill_reason),
            Arc::clone(&ended),
        ));
        Ok(Process {
            stdin: tokio::sync::Mutex::new(stdin),
            pending,
            kill,
            ended,
            kill_reason,
            pid,
        })
    }

    /// When and why the process ended, if it did.
    pub(crate) fn ended(&self) -> Option<(Instant, String)> {
        self.ended.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Asks for the process (group) to be killed.
    pub(crate) fn kill(&self, reason: String) {
        let reason = self
            .kill_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get_or_insert(reason)
            .clone();
        {
            // Counts as ended from now on: no new request is sent to it, and the restart
            // backoff runs from the kill (the supervisor records the exit status later).
            let _p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            self.ended
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get_or_insert((Instant::now(), reason));
        }
        self.kill.cancel();
    }

    /// Sends one request line; the answer arrives on the returned receiver (or the reason
    /// the process went away).
    pub(crate) async fn send(
        &self,
        id: u64,
        mut line: Vec<u8>,
    ) -> std::result::Result<oneshot::Receiver<std::result::Result<Answer, Gone>>, Gone> {
        let (tx, rx) = oneshot::channel();
        {
            let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((_, why)) = self.ended() {
                return Err(why);
            }
            p.insert(id, tx);
        }
        line.push(b'\n');
        let mut stdin = self.stdin.lock().await;
        let result = match stdin.as_mut() {
            Some(w) => w.write_all(&line).await.and(w.flush().await),
            None => Err(std::io::Error::other("stdin closed")),
        };
        line.zeroize();
        if let Err(e) = result {
            *stdin = None;
            self.forget(id);
            let why = format!("writing to the plugin failed: {e}");
            self.kill(why.clone());
            return Err(why);
        }
        Ok(rx)
    }

    /// Drops a call's pending entry (it timed out or was abandoned).
    pub(crate) fn forget(&self, id: u64) {
        self.pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
    }
}

/// Reads answers until the process breaks the protocol, exits or is killed; then kills
/// the group, reaps the process and fails every pending call.
async fn supervise(
    name: String,
    mut child: Child,
    stdout: tokio::process::ChildStdout,
    pending: Pending,
    kill: CancellationToken,
    kill_reason: Arc<Mutex<Option<String>>>,
    ended: Arc<Mutex<Option<(Instant, String)>>>,
) {
    let pid = child.id().unwrap_or(0);
    let mut reader = BufReader::with_capacity(64 * 1024, stdout);
    let mut buf = Vec::new();
    let why = loop {
        buf.zeroize();
        buf.clear();
        let mut limited = (&mut reader).take(MAX_LINE as u64 + 1);
        let read = tokio::select! {
            _ = kill.cancelled() => {
                break kill_reason.lock().unwrap_or_else(|e| e.into_inner()).clone().unwrap_or_else(|| "killed".to_string());
            }
            r = limited.read_until(b'\n', &mut buf) => r,
        };
        match read {
            Err(e) => break format!("reading its stdout failed: {e}"),
            Ok(0) => break "it closed its stdout (exited?)".to_string(),
            Ok(_) if buf.last() != Some(&b'\n') && buf.len() > MAX_LINE => {
                break format!("it wrote a line longer than {MAX_LINE} bytes");
            }
            Ok(_) if buf.last() != Some(&b'\n') => break "it closed its stdout mid-line".to_string(),
            Ok(_) => {}
        }
        match parse(&buf) {
            Err(why) => break why,
            Ok((id, answer)) => {
                let tx = pending.lock().unwrap_or_else(|e| e.into_inner()).remove(&id);
                match tx {
                    Some(tx) => {
                        let _ = tx.send(Ok(answer));
                    }
                    None => break format!("it answered id {id}, which no request in flight has"),
                }
            }
        }
    };
    buf.zeroize();
    if pid > 0 {
        // The whole group: a plugin's own children go with it.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(pid as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
    let status = child.wait().await;
    let why = match status {
        Ok(s) => format!("{why}; {s}"),
        Err(_) => why,
    };
    warn!(plugin = %name, pid, reason = %Redactor::global().redact(&why), "plugin process ended");
    let mut p = pending.lock().unwrap_or_else(|e| e.into_inner());
    *ended.lock().unwrap_or_else(|e| e.into_inner()) = Some((Instant::now(), why.clone()));
    for (_, tx) in p.drain() {
        let _ = tx.send(Err(why.clone()));
    }
}

/// One answer line: `{"id":N,"ok":{..}}` or `{"id":N,"error":{..}}`.
fn parse(line: &[u8]) -> std::result::Result<(u64, Answer), String> {
    let v: serde_json::Value =
        serde_json::from_slice(line).map_err(|e| format!("it wrote a line that is not JSON ({e})"))?;
    let serde_json::Value::Object(mut m) = v else {
        return Err("it wrote JSON that is not an object".to_string());
    };
    let id = m
        .get("id")
        .and_then(serde_json::Value::as_u64)
        .ok_or("it wrote an answer without a numeric \"id\"")?;
    match (m.remove("ok"), m.remove("error")) {
        (Some(serde_json::Value::Object(ok)), None) => Ok((id, Ok(ok))),
        (None, Some(serde_json::Value::Object(err))) => Ok((id, Err(err))),
        _ => Err(format!(
            "answer {id} has neither an \"ok\" nor an \"error\" object"
        )),
    }
}

/// Logs each stderr line (redacted, truncated to [`MAX_STDERR_LINE`]).
async fn log_stderr(name: String, pid: u32, stderr: impl AsyncRead + Unpin) {
    let mut reader = BufReader::new(stderr);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        let mut limited = (&mut reader).take(MAX_STDERR_LINE as u64);
        match limited.read_until(b'\n', &mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        let truncated = buf.last() != Some(&b'\n') && buf.len() >= MAX_STDERR_LINE;
        if truncated && !skip_line(&mut reader).await {
            break;
        }
        let text = String::from_utf8_lossy(&buf);
        let text = Redactor::global().redact(text.trim_end());
        info!(plugin = %name, pid, truncated, "stderr: {text}");
        buf.zeroize();
    }
}

/// Discards the rest of an over-long line; false at end of input.
async fn skip_line(reader: &mut (impl tokio::io::AsyncBufRead + Unpin)) -> bool {
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => return false,
            Ok(c) => c,
        };
        match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return true;
            }
            None => {
                let n = chunk.len();
                reader.consume(n);
            }
        }
    }
}
