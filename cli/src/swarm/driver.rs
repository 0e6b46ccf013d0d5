//! The secret driver Swarm's manager leader calls: Docker's plugin protocol (HTTP/1.1 with
//! JSON bodies) on the legacy socket `/run/docker/plugins/<driver>.sock`.
//!
//! - `POST /Plugin.Activate` answers `{"Implements": ["secretprovider"]}`;
//! - `POST /SecretProvider.GetSecret` takes the request moby's `secrets.Request` defines
//!   ([`GetSecret`]) and answers `{"Value": <base64>, "Err": "...", "DoNotReuse": bool}`.
//!
//! Every request is decided by the access policy first; a denied one gets an `Err` and no
//! value. An allowed one reads the value its labels map to once, through the agent's
//! providers. The answer always says `DoNotReuse: true`: the manager then keeps the value
//! per task instead of per node, so a second service's task on the same node is asked for
//! (and decided) on its own instead of receiving the first one's copy.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::Shared;
use super::mapping;
use super::policy::{self, Decision};

/// Where Docker looks for plugin sockets without a managed plugin.
pub const PLUGIN_DIR: &str = "/run/docker/plugins";
/// The media type of Docker's plugin protocol, as the daemon sends it.
pub const CONTENT_TYPE: &str = "application/vnd.docker.plugins.v1.2+json";
/// Largest value Swarm takes (`validation.MaxSecretSize`, 500 KiB).
pub const MAX_VALUE: usize = 500 * 1024;

/// `POST /SecretProvider.GetSecret` as moby's `secrets.Request` encodes it. Every field
/// may be missing (Go's `omitempty`).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase", default)]
pub struct GetSecret {
    /// The Swarm secret's name.
    pub secret_name: String,
    /// The Swarm secret's labels: where dso reads the mapping.
    pub secret_labels: HashMap<String, String>,
    /// The service's id.
    #[serde(rename = "ServiceID")]
    pub service_id: String,
    /// The service's name: what the policy's `services` match.
    pub service_name: String,
    /// The service's labels: what the policy's `service_labels` match.
    pub service_labels: HashMap<String, String>,
    /// The task's id.
    #[serde(rename = "TaskID")]
    pub task_id: String,
    /// The task's name (`SERVICE.SLOT.ID`).
    pub task_name: String,
    /// The task's image.
    pub task_image: String,
    /// The node the task is assigned to.
    #[serde(rename = "NodeID")]
    pub node_id: String,
    /// The service's hostname template.
    pub service_hostname: String,
    /// The service's endpoint spec (mode, ports); logged by nothing, kept for the record.
    pub service_endpoint_spec: Option<serde_json::Value>,
}

/// The answer to `GetSecret`: a value or an error, never both.
#[derive(Debug, Default, Serialize)]
#[serde(rename_all = "PascalCase")]
struct Answer {
    /// The value, base64 (Go's `[]byte` in JSON).
    #[serde(skip_serializing_if = "Option::is_none")]
    value: Option<String>,
    /// Why there is no value.
    #[serde(skip_serializing_if = "String::is_empty")]
    err: String,
    /// Keep the value per task (see the module doc).
    do_not_reuse: bool,
}

/// A bound driver socket, not yet serving.
#[derive(Debug)]
pub struct DriverSocket {
    listener: UnixListener,
    path: PathBuf,
    inode: (u64, u64),
}

/// The socket path of driver `name`.
pub fn socket_path(name: &str) -> PathBuf {
    Path::new(PLUGIN_DIR).join(format!("{name}.sock"))
}

/// Creates `/run/docker/plugins/<name>.sock` (the directory 0700 when created, the socket
/// 0600): a socket file left by a dead process is replaced, one that answers is an error
/// (another agent serves this driver name) unless `take_over` (a hitless upgrade: the
/// previous agent serves it until the new socket is renamed over its file, so the path
/// always answers).
pub async fn bind(name: &str, take_over: bool) -> anyhow::Result<DriverSocket> {
    let path = socket_path(name);
    let dir = path.parent().expect("a plugin socket has a directory");
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating the Docker plugin directory {}", dir.display()))?;
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.file_type().is_socket() => {
            if take_over {
                return bind_over(&path).await;
            }
            if tokio::net::UnixStream::connect(&path).await.is_ok() {
                bail!(
                    "swarm.driver: {} already answers (another agent serves driver {name}); stop it or choose another swarm.driver",
                    path.display()
                );
            }
            std::fs::remove_file(&path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "swarm.driver: {} exists and is not a socket; remove it or choose another swarm.driver",
            path.display()
        ),
        Err(_) => {}
    }
    let listener = UnixListener::bind(&path)
        .with_context(|| format!("binding the secret driver socket {}", path.display()))?;
    // The directory is root's and 0700: nobody else reaches the socket before this.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", path.display()))?;
    let inode = inode(&path)?;
    Ok(DriverSocket {
        listener,
        path,
        inode,
    })
}

/// Binds a socket beside `path` and renames it over the file: Docker's next connection
/// reaches the new socket, one already open finishes on the old process.
async fn bind_over(path: &Path) -> anyhow::Result<DriverSocket> {
    let tmp = path.with_extension(format!("sock.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let listener = UnixListener::bind(&tmp)
        .with_context(|| format!("binding the secret driver socket {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("setting mode 0600 on {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("moving the secret driver socket onto {}", path.display()))?;
    let inode = inode(path)?;
    Ok(DriverSocket {
        listener,
        path: path.to_owned(),
        inode,
    })
}

/// The (device, inode) of the socket file: at stop, the file is removed only if it is still
/// this socket's (after an upgrade it is the new agent's).
fn inode(path: &Path) -> anyhow::Result<(u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    Ok((m.dev(), m.ino()))
}

impl DriverSocket {
    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Serves until `stop` is cancelled, then removes the socket file.
    pub async fn serve(self, shared: Arc<Shared>, stop: CancellationToken) {
        let app = Router::new()
            .route("/Plugin.Activate", post(activate))
            .route("/SecretProvider.GetSecret", post(get_secret))
            .with_state(shared);
        let path = self.path.clone();
        if let Err(e) = axum::serve(self.listener, app)
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .await
        {
            warn!(socket = %path.display(), error = %e, "secret driver socket failed");
        }
        match inode(&path) {
            Ok(ino) if ino == self.inode => {
                let _ = std::fs::remove_file(&path);
                info!(socket = %path.display(), "secret driver stopped");
            }
            _ => {
                info!(socket = %path.display(), "secret driver stopped; the socket file is another agent's now and stays")
            }
        }
    }
}

fn json(status: StatusCode, body: String) -> Response {
    (status, [(header::CONTENT_TYPE, CONTENT_TYPE)], body).into_response()
}

async fn activate() -> Response {
    json(StatusCode::OK, r#"{"Implements":["secretprovider"]}"#.to_owned())
}

async fn get_secret(State(shared): State<Arc<Shared>>, body: Bytes) -> Response {
    let req: GetSecret = match serde_json::from_slice(&body) {
        Ok(r) => r,
        Err(e) => {
            let answer = Answer {
                err: format!("dso: the GetSecret request is not the JSON Docker sends: {e}"),
                do_not_reuse: true,
                ..Answer::default()
            };
            return json(StatusCode::OK, serde_json::to_string(&answer).unwrap_or_default());
        }
    };
    let answer = answer(&shared, &req).await;
    json(StatusCode::OK, serde_json::to_string(&answer).unwrap_or_default())
}

/// Decides, reads, checks; logs and publishes the decision (never the value).
async fn answer(shared: &Shared, req: &GetSecret) -> Answer {
    let base = mapping::base_name(&req.secret_name, &req.secret_labels).to_owned();
    let decision = policy::decide(
        &shared.settings.policy,
        &base,
        &req.service_name,
        &req.service_labels,
    );
    let deny = |err: String| Answer {
        err,
        do_not_reuse: true,
        ..Answer::default()
    };
    let record = |outcome: &str, error: Option<&str>| {
        shared.stats.count(&decision, error.is_some());
        shared.events.publish(
            "swarm.secret.read",
            serde_json::json!({
                "secret": req.secret_name,
                "base": base,
                "service": req.service_name,
                "service_id": req.service_id,
                "task": req.task_name,
                "task_id": req.task_id,
                "node": req.node_id,
                "decision": decision.as_str(),
                "rule": decision.rule(),
                "outcome": outcome,
                "error": error,
            }),
        );
    };
    if let Decision::Deny { reason } = &decision {
        warn!(
            secret = %req.secret_name, service = %req.service_name, service_id = %req.service_id,
            task = %req.task_name, task_id = %req.task_id, node = %req.node_id,
            decision = "deny", rule = "none", reason = %reason,
            "swarm secret request denied"
        );
        record("denied", Some(reason));
        return deny(format!("dso: access denied: {reason}"));
    }
    let fail = |e: String| {
        warn!(
            secret = %req.secret_name, service = %req.service_name, task = %req.task_name,
            decision = "allow", rule = %decision.rule(), error = %e,
            "swarm secret request allowed but no value can be given"
        );
        record("error", Some(&e));
        deny(format!("dso: {e}"))
    };
    let reference = match mapping::resolve(&req.secret_name, &req.secret_labels, &shared.secrets.config()) {
        Ok(r) => r,
        Err(e) => return fail(e),
    };
    let value = match shared.secrets.read_now(&reference).await {
        Ok((v, _version)) => v,
        Err(e) => {
            return fail(format!(
                "Swarm secret {}: reading {}: {e}",
                req.secret_name, reference.raw
            ));
        }
    };
    if value.is_empty() || value.len() > MAX_VALUE {
        return fail(format!(
            "Swarm secret {}: the value of {} is {} bytes; Swarm takes 1 byte to 500 KiB ({MAX_VALUE} bytes)",
            req.secret_name,
            reference.raw,
            value.len()
        ));
    }
    info!(
        secret = %req.secret_name, service = %req.service_name, service_id = %req.service_id,
        task = %req.task_name, task_id = %req.task_id, node = %req.node_id,
        decision = "allow", rule = %decision.rule(), reference = %reference.raw, bytes = value.len(),
        "swarm secret request allowed"
    );
    record("value", None);
    // The one place a value leaves for Swarm: base64 in the answer's body.
    Answer {
        value: Some(base64::engine::general_purpose::STANDARD.encode(value.expose())),
        err: String::new(),
        do_not_reuse: true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hitless upgrade's driver socket: the new one is renamed onto the path while the old
    /// one still answers, so the path never stops answering, and the old one can tell the
    /// file is no longer its own (it must not remove it at stop).
    #[tokio::test]
    async fn a_take_over_renames_the_new_socket_onto_the_answering_path() {
        let name = format!("dso-unit-{}", std::process::id());
        let old = bind(&name, false).await.unwrap();
        let err = bind(&name, false).await.unwrap_err().to_string();
        assert!(err.contains("already answers"), "{err}");
        let new = bind(&name, true).await.unwrap();
        assert_eq!(new.path(), old.path());
        let now = inode(new.path()).unwrap();
        assert_eq!(now, new.inode);
        assert_ne!(now, old.inode, "the old socket's check must see another file");
        tokio::net::UnixStream::connect(new.path()).await.unwrap();
        let mode = std::fs::metadata(new.path()).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let _ = std::fs::remove_file(new.path());
    }

    #[test]
    fn the_request_reads_the_fields_moby_sends() {
        let body = r#"{"SecretName":"db","SecretLabels":{"dso.secret":"db"},"ServiceID":"s1","ServiceName":"api","ServiceLabels":{"team":"pay"},"TaskID":"t1","TaskName":"api.1.t1","TaskImage":"img:1","NodeID":"n1","ServiceHostname":"h","ServiceEndpointSpec":{"Mode":1,"Ports":[{"PublishMode":"host","TargetPort":80}]}}"#;
        let r: GetSecret = serde_json::from_str(body).unwrap();
        assert_eq!(
            (
                r.secret_name.as_str(),
                r.service_id.as_str(),
                r.service_name.as_str(),
                r.task_id.as_str(),
                r.node_id.as_str()
            ),
            ("db", "s1", "api", "t1", "n1")
        );
        assert_eq!(r.secret_labels["dso.secret"], "db");
        assert_eq!(r.service_labels["team"], "pay");
        assert_eq!(
            (
                r.task_name.as_str(),
                r.task_image.as_str(),
                r.service_hostname.as_str()
            ),
            ("api.1.t1", "img:1", "h")
        );
        assert!(r.service_endpoint_spec.is_some());
        // Go's omitempty leaves fields out.
        let r: GetSecret = serde_json::from_str(r#"{"SecretName":"x"}"#).unwrap();
        assert!(r.service_name.is_empty() && r.secret_labels.is_empty());
    }

    #[test]
    fn an_answer_carries_a_value_or_an_error() {
        let a = Answer {
            value: Some("aGk=".into()),
            err: String::new(),
            do_not_reuse: true,
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"Value":"aGk=","DoNotReuse":true}"#
        );
        let a = Answer {
            err: "dso: access denied".into(),
            do_not_reuse: true,
            ..Answer::default()
        };
        assert_eq!(
            serde_json::to_string(&a).unwrap(),
            r#"{"Err":"dso: access denied","DoNotReuse":true}"#
        );
    }
}
