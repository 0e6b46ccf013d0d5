//! The control socket: created safely, checked per peer, served with hyper's HTTP/1.1.

use std::convert::Infallible;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::peer::{Access, GROUP, Verdict};
use super::{ApiError, Router, State, error_response};

/// Largest request body accepted.
const MAX_BODY: usize = 1 << 20;

/// A bound control socket, not yet serving.
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    path: PathBuf,
}

/// Creates the control socket at `path`: parent directory created, a stale socket file
/// removed only when nothing answers on it, mode 0660, group `dso` when it exists.
pub async fn bind(path: &Path) -> anyhow::Result<ApiServer> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating socket directory {}", dir.display()))?;
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
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))
        .with_context(|| format!("setting mode 0660 on {}", path.display()))?;
    if let Some(gid) = super::peer::group_id(GROUP)
        && let Err(e) = std::os::unix::fs::chown(path, None, Some(gid))
    {
        warn!(socket = %path.display(), group = GROUP, error = %e, "cannot give the socket to group dso");
    }
    Ok(ApiServer {
        listener,
        path: path.to_owned(),
    })
}

impl ApiServer {
    /// Serves requests until `stop` is cancelled, then removes the socket file.
    pub async fn serve(self, state: State, router: Router, stop: CancellationToken) {
        let access = Arc::new(Access::for_this_process());
        let router = Arc::new(router);
        info!(socket = %self.path.display(), "control API listening");
        loop {
            let accepted = tokio::select! {
                () = stop.cancelled() => break,
                r = self.listener.accept() => r,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "control socket accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let allowed = match stream.peer_cred() {
                Ok(cred) => match access.check(&cred) {
                    Verdict::Allow(why) => {
                        debug!(uid = cred.uid(), pid = ?cred.pid(), why, "control client allowed");
                        true
                    }
                    Verdict::Deny => {
                        warn!(uid = cred.uid(), gid = cred.gid(), pid = ?cred.pid(), "control client refused: not root, not the agent's user, not in group dso");
                        false
                    }
                },
                Err(e) => {
                    warn!(error = %e, "cannot read control client credentials; refusing");
                    false
                }
            };
            let (state, router, stop) = (state.clone(), Arc::clone(&router), stop.clone());
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let (state, router) = (state.clone(), Arc::clone(&router));
                    async move { Ok::<_, Infallible>(answer(allowed, state, &router, req).await) }
                });
                let conn = http1::Builder::new().serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => if let Err(e) = r {
                        debug!(error = %e, "control connection ended with an error");
                    },
                    () = stop.cancelled() => {}
                }
            });
        }
        if let Err(e) = std::fs::remove_file(&self.path) {
            warn!(socket = %self.path.display(), error = %e, "cannot remove control socket");
        }
    }
}

async fn answer(
    allowed: bool,
    state: State,
    router: &Router,
    req: Request<Incoming>,
) -> Response<Full<Bytes>> {
    if !allowed {
        return error_response(&ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "permission denied: only root, the agent's user and members of group {GROUP} may use the control socket"
            ),
        });
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return error_response(&ApiError::bad_request(format!("cannot read body: {e}"))),
    };
    let (method, path) = (parts.method, parts.uri.path().to_owned());
    let reply = router
        .route(state, method.clone(), &path, parts.uri.query(), body)
        .await;
    match reply {
        Ok(r) => {
            debug!(%method, %path, status = %r.status(), "control request");
            r
        }
        Err(e) => {
            debug!(%method, %path, status = %e.status, error = %e.message, "control request failed");
            error_response(&e)
        }
    }
}
