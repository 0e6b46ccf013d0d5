//! The control socket: created safely, checked per peer, served with hyper's HTTP/1.1
//! around the axum router; and the connection handling (cap, eviction, timeouts) the HTTP
//! listener shares.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use std::future::Future;

use anyhow::{Context, bail};
use axum::response::IntoResponse;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::peer::{Access, GROUP, Verdict};
use super::{ApiError, Peer, State, error_response};

/// Most control connections served at once. At the cap, a new connection evicts the one
/// that has been quiet longest (no request in progress), so idle or trickling clients
/// cannot lock the API out; if every connection has a request in progress, the new one
/// waits in the socket's backlog.
pub const MAX_CONNECTIONS: usize = 128;

/// Longest a client may take to send a request's headers.
pub const HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Longest a kept-alive connection may stay without a byte either way and no request in
/// progress.
pub const IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

/// How long a request in progress at shutdown may take to finish its answer.
const STOP_GRACE: Duration = Duration::from_secs(2);

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
    /// The group whose members may use the socket, and its gid when it exists.
    group: (String, Option<u32>),
    /// Cancelled when a new agent took the socket over (`upgrade.rs`): stop accepting,
    /// keep the connections in progress and the socket file.
    handed_over: CancellationToken,
}

/// Creates the control socket at `path`: parent directory created, a stale socket file
/// removed only when nothing answers on it, mode 0660, given to `group`
/// (`agent.api.socket_group`) or, by default, to group `dso` when it exists. A group that is
/// named but does not exist is an error naming the key; the default group may be missing
/// (then only root and the agent's user get in).
pub async fn bind_with_group(path: &Path, group: Option<&str>) -> anyhow::Result<ApiServer> {
    let (group, gid) = match group {
        Some(g) => match super::peer::group_id(g) {
            Some(gid) => (g.to_owned(), Some(gid)),
            None => bail!(
                "agent.api.socket_group: group {g:?} does not exist on this host; create it \
                 (groupadd --system {g}) or remove the key to use group {GROUP}"
            ),
        },
        None => (GROUP.to_owned(), super::peer::group_id(GROUP)),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
        check_socket_dir(dir)?;
    }
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            bail!(
                "{} exists and is not a socket; remove it or choose another --socket",
                path.display()
            );
        }
        // Only "connection refused" proves nobody listens; any other failure (a full
        // backlog, a permission error) may hide a live agent whose socket must stay.
        match UnixStream::connect(path).await {
            Ok(_) => bail!("another agent is already answering on {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => bail!(
                "cannot tell whether an agent is answering on {} ({e}); remove the file if none runs",
                path.display()
            ),
        }
        std::fs::remove_file(path).with_context(|| format!("removing stale socket {}", path.display()))?;
        info!(socket = %path.display(), "removed stale socket");
    }
    let listener =
        UnixListener::bind(path).with_context(|| format!("binding control socket {}", path.display()))?;
    // The directory is checked (owned by root or us, nobody else may replace entries), and
    // the path must still be the socket just bound, not a symlink planted meanwhile.
    let meta = std::fs::symlink_metadata(path).with_context(|| format!("checking {}", path.display()))?;
    if !meta.file_type().is_socket() {
        bail!(
            "{} is not the socket just bound; refusing to change its permissions",
            path.display()
        );
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
    if let Some(gid) = gid
        && let Err(e) = std::os::unix::fs::lchown(path, None, Some(gid))
    {
        warn!(socket = %path.display(), group = %group, error = %e, "cannot give the socket to its group");
    }
    Ok(ApiServer {
        listener,
        path: path.to_owned(),
        group: (group, gid),
        handed_over: CancellationToken::new(),
    })
}

/// The control socket handed over by the agent this process replaces (`upgrade.rs`):
/// nothing is bound or changed on disk; `group` is resolved as [`bind_with_group`] does.
pub fn inherit(
    listener: std::os::unix::net::UnixListener,
    path: &Path,
    group: Option<&str>,
) -> anyhow::Result<ApiServer> {
    let (group, gid) = match group {
        Some(g) => (g.to_owned(), super::peer::group_id(g)),
        None => (GROUP.to_owned(), super::peer::group_id(GROUP)),
    };
    listener
        .set_nonblocking(true)
        .context("the control socket handed over")?;
    let listener = UnixListener::from_std(listener).context("the control socket handed over")?;
    Ok(ApiServer {
        listener,
        path: path.to_owned(),
        group: (group, gid),
        handed_over: CancellationToken::new(),
    })
}

/// Refuses a socket directory that someone other than root or the agent's user could use to
/// swap the socket for a symlink: a symlink itself, owned by another user, or writable by
/// group or others without the sticky bit.
fn check_socket_dir(dir: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::symlink_metadata(dir)
        .with_context(|| format!("checking socket directory {}", dir.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "socket directory {} is a symlink; give the real directory with --socket",
            dir.display()
        );
    }
    let own = super::peer::own_uid().unwrap_or(0);
    if meta.uid() != 0 && meta.uid() != own {
        bail!(
            "socket directory {} belongs to uid {}, not to root or the agent's user (uid {own}); \
             fix its owner or choose another --socket",
            dir.display(),
            meta.uid()
        );
    }
    if meta.mode() & 0o022 != 0 && meta.mode() & 0o1000 == 0 {
        bail!(
            "socket directory {} is writable by other users (mode {:o}); make it 0755 or choose another --socket",
            dir.display(),
            meta.mode() & 0o7777
        );
    }
    Ok(())
}

impl ApiServer {
    /// A duplicate of the listening socket, for a handover.
    pub fn socket(&self) -> std::io::Result<std::os::fd::OwnedFd> {
        std::os::fd::AsFd::as_fd(&self.listener).try_clone_to_owned()
    }

    /// Cancel it once a new agent serves the socket: this one stops accepting, lets its
    /// connections finish (until `stop`) and leaves the socket file in place.
    pub fn handover_token(&self) -> CancellationToken {
        self.handed_over.clone()
    }

    /// Serves the [`super::router`] until `stop` is cancelled, then removes the socket file.
    pub async fn serve(self, state: State, stop: CancellationToken) {
        let access = Arc::new(Access {
            group: self.group.1,
            ..Access::for_this_process()
        });
        let group: Arc<str> = Arc::from(self.group.0.as_str());
        let app = super::router().with_state(state);
        let conns = Conns::new();
        let mut last_warning: Option<Instant> = None;
        info!(socket = %self.path.display(), "control API listening");
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                () = self.handed_over.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    // Out of descriptors, say: back off, and say so at most once a second.
                    if last_warning.is_none_or(|t| t.elapsed() >= Duration::from_secs(1)) {
                        warn!(error = %e, "control socket accept failed; retrying in 50 ms");
                        last_warning = Some(Instant::now());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(permit) = conns.slot(&stop).await else {
                break;
            };
            let peer = match stream.peer_cred() {
                Ok(cred) => match access.check(&cred) {
                    Verdict::Allow(why) => {
                        debug!(uid = cred.uid(), pid = ?cred.pid(), why, "control client allowed");
                        Some(Peer::Local {
                            uid: cred.uid(),
                            gid: cred.gid(),
                            pid: cred.pid(),
                        })
                    }
                    Verdict::Deny => {
                        warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), group = %group, "control client refused: not root, not the agent's user, not in the socket's group");
                        None
                    }
                },
                Err(e) => {
                    warn!(error = %e, "cannot read control client credentials; refusing");
                    None
                }
            };
            let (app, group) = (app.clone(), Arc::clone(&group));
            // A refused peer gets its 403 and the connection closes.
            let keep_alive = peer.is_some();
            conns.spawn(permit, stream, keep_alive, stop.clone(), move |req| {
                let (app, group, peer) = (app.clone(), Arc::clone(&group), peer.clone());
                async move {
                    match peer {
                        Some(peer) => super::dispatch(app, peer, req).await,
                        None => refused(&group),
                    }
                }
            });
        }
        if self.handed_over.is_cancelled() {
            info!(socket = %self.path.display(), "control socket handed over; the new agent serves it");
            // The connections accepted before stay until the agent stops (`stop`); the
            // answer to the upgrade request is among them, so the process waits for them to
            // end (each gets [`STOP_GRACE`] to finish its answer) before it exits.
            stop.cancelled().await;
            conns.wait_closed(STOP_GRACE + Duration::from_millis(500)).await;
            return;
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(socket = %self.path.display(), error = %e, "cannot remove control socket");
        }
    }
}

fn refused(group: &str) -> Response<axum::body::Body> {
    error_response(&ApiError {
        status: StatusCode::FORBIDDEN,
        message: format!(
            "permission denied: only root, the agent's user and members of group {group} may use the control socket"
        ),
    })
    .into_response()
}

/// The connections of one listener: at most [`MAX_CONNECTIONS`] at once (at the cap a new
/// one evicts the quietest idle one), each closed after [`HEADER_TIMEOUT`] without a
/// request's headers or [`IDLE_TIMEOUT`] without a byte.
#[derive(Debug)]
pub(super) struct Conns {
    slots: Arc<tokio::sync::Semaphore>,
    open: Arc<Mutex<Vec<Arc<Activity>>>>,
    epoch: Instant,
}

impl Conns {
    pub(super) fn new() -> Conns {
        Conns {
            slots: Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS)),
            open: Arc::default(),
            epoch: Instant::now(),
        }
    }

    /// A slot for a connection just accepted; at the cap, evicts the quietest connection
    /// and waits for a slot. `None` once `stop` is cancelled.
    pub(super) async fn slot(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        match Arc::clone(&self.slots).try_acquire_owned() {
            Ok(p) => Some(p),
            Err(_) => {
                evict_quietest(&self.open);
                tokio::select! {
                    () = stop.cancelled() => None,
                    p = Arc::clone(&self.slots).acquire_owned() => p.ok(),
                }
            }
        }
    }

    /// Waits until every connection has ended, at most `bound`.
    pub(super) async fn wait_closed(&self, bound: Duration) {
        let deadline = Instant::now() + bound;
        while !lock(&self.open).is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Serves one connection with hyper's HTTP/1.1 in its own task, answering each request
    /// with `answer`, until it ends, is evicted, idles out or `stop` is cancelled.
    pub(super) fn spawn<S, F, Fut>(
        &self,
        permit: OwnedSemaphorePermit,
        stream: S,
        keep_alive: bool,
        stop: CancellationToken,
        answer: F,
    ) where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<axum::body::Body>> + Send + 'static,
    {
        let activity = Arc::new(Activity::new(self.epoch));
        lock(&self.open).push(Arc::clone(&activity));
        let open = Arc::clone(&self.open);
        let answer = Arc::new(answer);
        tokio::spawn(async move {
            let _permit = permit;
            let svc = {
                let activity = Arc::clone(&activity);
                service_fn(move |req| {
                    let (answer, activity) = (Arc::clone(&answer), Arc::clone(&activity));
                    async move {
                        let _busy = activity.busy();
                        Ok::<_, Infallible>(answer(req).await)
                    }
                })
            };
            let io = Tracked {
                inner: stream,
                activity: Arc::clone(&activity),
            };
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .keep_alive(keep_alive)
                .serve_connection(TokioIo::new(io), svc);
            tokio::pin!(conn);
            tokio::select! {
                r = conn.as_mut() => if let Err(e) = r {
                    debug!(error = %e, "control connection ended with an error");
                },
                () = stop.cancelled() => {
                    // A request in progress gets its answer (the answer to `dso agent
                    // --upgrade` is written after the new agent took over), bounded.
                    conn.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, conn.as_mut()).await;
                }
                () = activity.evicted.cancelled() => debug!("control connection closed: quietest at the connection cap"),
                () = activity.idle_for(IDLE_TIMEOUT) => debug!("control connection closed: idle"),
            }
            lock(&open).retain(|a| !Arc::ptr_eq(a, &activity));
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Closes the open connection that has been quiet longest and has no request in progress.
fn evict_quietest(open: &Mutex<Vec<Arc<Activity>>>) {
    let open = lock(open);
    if let Some(a) = open
        .iter()
        .filter(|a| a.in_flight.load(Ordering::Relaxed) == 0 && !a.evicted.is_cancelled())
        .min_by_key(|a| a.last_ms.load(Ordering::Relaxed))
    {
        a.evicted.cancel();
    }
}

/// When a control connection last moved a byte, and whether a request is in progress.
#[derive(Debug)]
struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    in_flight: AtomicUsize,
    evicted: CancellationToken,
}

impl Activity {
    fn new(epoch: Instant) -> Self {
        let a = Activity {
            epoch,
            last_ms: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            evicted: CancellationToken::new(),
        };
        a.touch();
        a
    }

    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    fn busy(&self) -> Busy<'_> {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(self)
    }

    /// Resolves once the connection has had no byte and no request in progress for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let quiet = last.elapsed();
            if quiet >= idle && self.in_flight.load(Ordering::Relaxed) == 0 {
                return;
            }
            tokio::time::sleep(idle.saturating_sub(quiet).max(Duration::from_millis(100))).await;
        }
    }
}

/// A request in progress on a connection, until dropped.
struct Busy<'a>(&'a Activity);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A connection's stream, noting every byte read or written.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Tracked<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Tracked<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
