//! Hitless upgrade of `dso agent`: the running agent starts a new binary and hands it every
//! listening socket (the proxy listeners, the control socket, the HTTP listener) with the
//! state in force, over a private Unix socket with SCM_RIGHTS. The contract is in
//! docs/operations.md ("Hitless upgrade").
//!
//! The exchange, old process (O) and new process (N):
//! 1. O refuses new rotations and waits for running ones (bounded); none runs across the
//!    handover, so the two processes never act on Docker at once.
//! 2. O binds `.dso-upgrade-PID.sock` (mode 0600) beside the control socket and starts the
//!    binary with the agent's own arguments and `DSO_UPGRADE_FROM` naming that socket; its
//!    stderr is read by O (copied to O's stderr, the last lines kept for an error).
//! 3. N connects; O checks the peer's pid is the child's (SO_PEERCRED) and sends an
//!    [`Offer`] (JSON) and the descriptors: O's stderr, the control socket, the HTTP
//!    listener, the proxy listeners.
//! 4. N imports the listeners (binds nothing) and reports `accepting`; starts the rest as
//!    an agent start does (adoption: nothing rotates), moves its stderr onto O's and
//!    reports `ready`.
//! 5. Only then O stops accepting everywhere (its descriptors close; the sockets stay open
//!    in N, with their accept queues), stops its Docker, secret and delivery sides, drains
//!    its connections within the shutdown deadline and exits 0, leaving the control
//!    socket's path in place.
//!
//! Any failure before 5 (the binary does not start, exits, reports a failure, or is not
//! ready within the timeout) kills N and leaves O as it was: it never stopped accepting.

mod takeover;
mod wire;

pub use takeover::take_over;

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{self, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use dso_proxy::{ListenerState, Proxy};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncBufReadExt;
use tracing::{info, warn};

use wire::{read_frame, send_fds, write_frame};

/// The variable that tells a starting agent to take over from the agent that started it:
/// the path of the handover socket.
pub const ENV: &str = "DSO_UPGRADE_FROM";

/// Default time the new process has to report ready.
pub const DEFAULT_READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest the old process waits for running rotations before an upgrade.
pub const ROTATION_WAIT: Duration = Duration::from_secs(60);

/// Lines of the new process's stderr an error quotes.
const TAIL_LINES: usize = 20;

/// How the agent was started, recorded at start-up: after a package replaced the binary,
/// `/proc/self/exe` reads "(deleted)", while the path names the new file.
#[derive(Debug, Clone)]
struct Start {
    exe: PathBuf,
    args: Vec<OsString>,
}

static START: OnceLock<Start> = OnceLock::new();

/// Records the binary's path and arguments; call first thing in `dso agent`.
pub fn record_start() {
    let mut args = std::env::args_os();
    let argv0 = args.next().map(PathBuf::from);
    // The path as started (`/usr/local/bin/dso`, maybe a symlink a package update moves to
    // the new version), made absolute; a bare name found through PATH is resolved by
    // `current_exe` (/proc/self/exe, read now, while the file is the one running).
    let exe = argv0
        .filter(|p| p.components().count() > 1)
        .and_then(|p| std::path::absolute(p).ok())
        .or_else(|| std::env::current_exe().ok())
        .unwrap_or_else(|| PathBuf::from("dso"));
    let _ = START.set(Start {
        exe,
        args: args.collect(),
    });
}

/// What the old process sends first; the descriptors follow in this order: its stderr,
/// the control socket, the HTTP listener (when `http` is set), then one per listener.
#[derive(Debug, Serialize, Deserialize)]
struct Offer {
    from_pid: u32,
    http: Option<SocketAddr>,
    listeners: Vec<ListenerState>,
}

impl Offer {
    fn fd_count(&self) -> usize {
        2 + usize::from(self.http.is_some()) + self.listeners.len()
    }
}

/// What the new process reports.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
enum Report {
    /// Its proxy listeners accept.
    Accepting,
    /// It serves everything; the old process may stop.
    Ready,
}

/// The result of a successful upgrade, as `POST /v1/agent/upgrade` answers it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Outcome {
    /// The process that handed over (and now drains and exits).
    pub old_pid: u32,
    /// The new agent.
    pub pid: u32,
    /// The binary it runs.
    pub binary: PathBuf,
    /// Milliseconds from the request to the new process's listeners accepting.
    pub accepting_ms: u64,
    /// Milliseconds from the request to the new process being ready (API served,
    /// containers adopted).
    pub ready_ms: u64,
}

/// An upgrade asked for by `POST /v1/agent/upgrade` (SIGUSR2 asks with the defaults).
#[derive(Debug)]
pub struct Request {
    /// The binary to start instead of the one the agent was started from.
    pub binary: Option<PathBuf>,
    /// Time the new process has to report ready.
    pub ready_timeout: Duration,
    /// Where the outcome goes.
    pub reply: Option<tokio::sync::oneshot::Sender<Result<Outcome, String>>>,
}

/// What the old process hands over, gathered by `agent.rs` before it serves.
#[derive(Debug)]
pub struct Handover {
    /// The proxy whose listeners are handed over.
    pub proxy: Proxy,
    /// The control socket's path (the handover socket is created beside it).
    pub control_path: PathBuf,
    /// A duplicate of the control socket.
    pub control: OwnedFd,
    /// The HTTP listener's address and a duplicate of its socket.
    pub http: Option<(SocketAddr, OwnedFd)>,
    /// The Docker side, whose rotations are paused around the handover.
    pub docker: crate::docker::DockerSlot,
}

impl Handover {
    /// Starts the new binary and hands everything over; `Ok` once the new process is ready
    /// (the caller then stops accepting and drains), `Err` with the reason otherwise (the
    /// new process is killed, rotations resume, this process serves on as before).
    pub async fn run(&self, binary: Option<PathBuf>, ready_timeout: Duration) -> anyhow::Result<Outcome> {
        let started = Instant::now();
        let start = START.get().context("the agent's start-up was not recorded")?;
        let binary = binary.unwrap_or_else(|| start.exe.clone());
        check_binary(&binary)?;
        let docker = self.docker.ready();
        if let Some(d) = &docker {
            let left = d.finish(ROTATION_WAIT).await;
            if left > 0 {
                d.reopen();
                bail!(
                    "{left} rotation(s) still running after {} s; try again when they are done (dso status)",
                    ROTATION_WAIT.as_secs()
                );
            }
        }
        let result = self.attempt(start, &binary, ready_timeout, started).await;
        if result.is_err()
            && let Some(d) = &docker
        {
            d.reopen();
        }
        result
    }

    async fn attempt(
        &self,
        start: &Start,
        binary: &Path,
        ready_timeout: Duration,
        started: Instant,
    ) -> anyhow::Result<Outcome> {
        let path = self
            .control_path
            .with_file_name(format!(".dso-upgrade-{}.sock", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path)
            .with_context(|| format!("binding the handover socket {}", path.display()))?;
        let _remove = RemoveOnDrop(path.clone());
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
        let (offer, fds) = self.offer()?;
        let mut child = tokio::process::Command::new(binary)
            .args(&start.args)
            .env(ENV, &path)
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let pid = child.id().context("the new process has no pid")?;
        info!(pid, binary = %binary.display(), "upgrade: new agent started; handing over");
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let tee = child
            .stderr
            .take()
            .map(|e| tokio::spawn(copy_stderr(e, Arc::clone(&tail))));
        let deadline = Instant::now() + ready_timeout;
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        // Set when this attempt ends, so that a child that never connected does not keep the
        // exchange's thread polling until the deadline.
        let given_up = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let _give_up = GiveUp(Arc::clone(&given_up));
        let mut exchange = tokio::task::spawn_blocking(move || {
            exchange(listener, pid, &offer, &fds, deadline, &given_up, &tx)
        });
        let mut accepting_ms = None;
        let mut exited = false;
        let failure = loop {
            tokio::select! {
                status = child.wait() => {
                    exited = true;
                    break match status {
                        Ok(s) => format!("the new agent (pid {pid}) exited ({s}) before it was ready"),
                        Err(e) => format!("waiting for the new agent (pid {pid}): {e}"),
                    };
                }
                r = rx.recv() => match r {
                    Some(Report::Accepting) => {
                        accepting_ms = Some(ms(started.elapsed()));
                        info!(pid, took_ms = accepting_ms, "upgrade: the new agent accepts");
                    }
                    Some(Report::Ready) => {
                        let ready_ms = ms(started.elapsed());
                        let outcome = Outcome {
                            old_pid: std::process::id(),
                            pid,
                            binary: binary.to_owned(),
                            accepting_ms: accepting_ms.unwrap_or(ready_ms),
                            ready_ms,
                        };
                        info!(pid, binary = %binary.display(), accepting_ms = outcome.accepting_ms, ready_ms, "upgrade: the new agent is ready; this one stops accepting and drains");
                        return Ok(outcome);
                    }
                    // The exchange gives up at the same deadline: the timeout is the reason.
                    None if Instant::now() >= deadline => {
                        break format!("the new agent (pid {pid}) was not ready within {} ms", ms(ready_timeout));
                    }
                    None => {
                        // The exchange ended without a `ready`: its error says why.
                        let why = match (&mut exchange).await {
                            Ok(Err(e)) => e,
                            Ok(Ok(())) => "the handover ended without a ready report".to_owned(),
                            Err(e) => format!("the handover task failed: {e}"),
                        };
                        break why;
                    }
                },
                () = tokio::time::sleep_until(deadline.into()) => {
                    break format!("the new agent (pid {pid}) was not ready within {} ms", ms(ready_timeout));
                }
            }
        };
        let status = if exited {
            None
        } else {
            let _ = child.start_kill();
            child.wait().await.ok()
        };
        if let Some(t) = tee {
            let _ = tokio::time::timeout(Duration::from_secs(1), t).await;
        }
        let lines: Vec<String> = lock(&tail).iter().cloned().collect();
        let mut msg = format!("upgrade to {} failed: {failure}", binary.display());
        if let Some(s) = status {
            msg.push_str(&format!("; it was stopped ({s})"));
        }
        if lines.is_empty() {
            msg.push_str("; it wrote nothing on stderr");
        } else {
            msg.push_str("; its last stderr lines:\n");
            msg.push_str(&lines.join("\n"));
        }
        msg.push_str("\nthis agent keeps serving");
        warn!(pid, error = %msg, "upgrade failed");
        bail!(msg)
    }

    /// The offer and its descriptors (duplicates: this process keeps its own).
    fn offer(&self) -> anyhow::Result<(Offer, Vec<OwnedFd>)> {
        let exported = self.proxy.export().context("exporting the listeners")?;
        let mut fds = vec![
            std::io::stderr()
                .as_fd()
                .try_clone_to_owned()
                .context("duplicating stderr")?,
            self.control
                .try_clone()
                .context("duplicating the control socket")?,
        ];
        if let Some((_, fd)) = &self.http {
            fds.push(fd.try_clone().context("duplicating the HTTP listener")?);
        }
        let mut listeners = Vec::with_capacity(exported.len());
        for e in exported {
            listeners.push(e.state);
            fds.push(e.socket);
        }
        Ok((
            Offer {
                from_pid: std::process::id(),
                http: self.http.as_ref().map(|(a, _)| *a),
                listeners,
            },
            fds,
        ))
    }
}

/// Refuses a binary that is not an executable file, naming the fix.
fn check_binary(binary: &Path) -> anyhow::Result<()> {
    let meta = std::fs::metadata(binary).with_context(|| {
        format!(
            "new binary {}: cannot read it (give --binary PATH)",
            binary.display()
        )
    })?;
    if !meta.is_file() || meta.permissions().mode() & 0o111 == 0 {
        bail!("new binary {} is not an executable file", binary.display());
    }
    Ok(())
}

/// The old process's side of the exchange, on blocking sockets (run in `spawn_blocking`).
fn exchange(
    listener: UnixListener,
    pid: u32,
    offer: &Offer,
    fds: &[OwnedFd],
    deadline: Instant,
    given_up: &std::sync::atomic::AtomicBool,
    reports: &tokio::sync::mpsc::UnboundedSender<Report>,
) -> Result<(), String> {
    let mut stream = accept_child(&listener, pid, deadline, given_up)?;
    let json = serde_json::to_vec(offer).map_err(|e| format!("encoding the offer: {e}"))?;
    write_frame(&mut stream, &json).map_err(|e| format!("sending the offer: {e}"))?;
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(AsFd::as_fd).collect();
    send_fds(&stream, &borrowed).map_err(|e| format!("sending the sockets: {e}"))?;
    loop {
        let left = deadline
            .saturating_duration_since(Instant::now())
            .max(Duration::from_millis(1));
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| format!("handover socket: {e}"))?;
        let frame = read_frame(&mut stream).map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => {
                "the new agent closed the handover socket before it was ready".to_owned()
            }
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => "no ready report in time".to_owned(),
            _ => format!("reading the new agent's report: {e}"),
        })?;
        let report: Report =
            serde_json::from_slice(&frame).map_err(|e| format!("the new agent sent a bad report: {e}"))?;
        let ready = matches!(report, Report::Ready);
        let _ = reports.send(report);
        if ready {
            return Ok(());
        }
    }
}

/// The connection of process `pid` on the handover socket; others are refused.
fn accept_child(
    listener: &UnixListener,
    pid: u32,
    deadline: Instant,
    given_up: &std::sync::atomic::AtomicBool,
) -> Result<UnixStream, String> {
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("handover socket: {e}"))?;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let cred = rustix::net::sockopt::socket_peercred(&stream)
                    .map_err(|e| format!("reading the handover peer's credentials: {e}"))?;
                let peer = u32::try_from(cred.pid.as_raw_nonzero().get()).unwrap_or(0);
                if peer != pid {
                    warn!(
                        peer,
                        expected = pid,
                        "handover socket: refused a process that is not the new agent"
                    );
                    continue;
                }
                stream
                    .set_nonblocking(false)
                    .map_err(|e| format!("handover socket: {e}"))?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if given_up.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err("the upgrade was given up".to_owned());
                }
                if Instant::now() >= deadline {
                    return Err("the new agent never connected to the handover socket (is it a dso binary of this version or newer?)".to_owned());
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(e) => return Err(format!("accepting on the handover socket: {e}")),
        }
    }
}

/// Copies the new process's stderr to ours line by line (its lines are its own log,
/// already redacted), keeping the last [`TAIL_LINES`].
async fn copy_stderr(stderr: tokio::process::ChildStderr, tail: Arc<Mutex<VecDeque<String>>>) {
    let mut lines = tokio::io::BufReader::new(stderr).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let _ = writeln!(std::io::stderr(), "{line}");
        let mut t = lock(&tail);
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line);
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

struct GiveUp(Arc<std::sync::atomic::AtomicBool>);

impl Drop for GiveUp {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Runs one upgrade request for the agent's main loop; `true` when the new process took
/// over (the caller stops accepting and drains). The outcome goes to the requester, and to
/// the log either way.
pub async fn serve_request(handover: &Handover, request: Request) -> bool {
    let trigger = if request.reply.is_some() { "api" } else { "SIGUSR2" };
    info!(trigger, binary = ?request.binary, "upgrade requested");
    let result = handover
        .run(request.binary, request.ready_timeout)
        .await
        .map_err(|e| format!("{e:#}"));
    let ok = result.is_ok();
    if let Some(reply) = request.reply {
        let _ = reply.send(result);
    }
    ok
}

/// `dso agent --upgrade`: asks the running agent to upgrade, waits, prints the outcome.
pub fn command(args: &crate::args::AgentArgs, socket: Option<PathBuf>) -> anyhow::Result<()> {
    let cfg = crate::config::load(&args.config)?;
    let socket = socket
        .or_else(|| cfg.agent.socket.clone())
        .unwrap_or_else(|| PathBuf::from(crate::config::DEFAULT_SOCKET));
    let mut body = serde_json::json!({});
    if let Some(b) = &args.binary {
        let abs = std::path::absolute(b).with_context(|| format!("--binary {}", b.display()))?;
        check_binary(&abs)?;
        body["binary"] = serde_json::json!(abs);
    }
    if let Some(t) = args.ready_timeout {
        body["ready_timeout_ms"] = serde_json::json!(ms(t.get()));
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let started = Instant::now();
    let outcome: Outcome = runtime
        .block_on(crate::client::Client::new(&socket).post("/v1/agent/upgrade", &body))
        .context("upgrade failed")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&outcome)?);
    } else {
        println!(
            "upgraded: new agent pid {} ({}) accepting after {} ms, ready after {} ms (command took {} ms); \
             the old agent (pid {}) stopped accepting and drains its connections",
            outcome.pid,
            outcome.binary.display(),
            outcome.accepting_ms,
            outcome.ready_ms,
            ms(started.elapsed()),
            outcome.old_pid,
        );
    }
    Ok(())
}
