//! `/v1/compose`: the agent's side of `dso up` and `dso down` (docs/api.md,
//! docs/compose.md).
//!
//! - `POST /v1/compose/prepare`: one service's declared references read from their
//!   providers now, written into the service's instance directory, and the override's
//!   parts answered ([`crate::compose::prepare`]).
//! - `POST /v1/compose/down`: the project's listeners released at once and its secret
//!   directories wiped, after `docker compose down` removed its containers.
//! - `GET /v1/compose/services`: the Compose services the agent delivered declared
//!   references to, and those recreated without dso's override (for `dso doctor`).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use dso_rotator::delivery::{Bundle, Delivery, DeliveryError, LABEL_INSTANCE};
use dso_rotator::{Engine, ServiceKey};
use dso_secrets::Error as SecretError;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use super::{ApiError, ApiRequest, Reply, State, json};
use crate::compose::prepare::{PrepareReply, PrepareRequest, instance_for, prepare};
use crate::delivery::Deliverer;
use crate::docker::Docker;

/// How long `prepare` waits for a rotation of the service in progress to end: during one
/// the old and the new container both carry the service's Compose labels, and a
/// `docker compose up` then would remove one of them.
const ROTATION_WAIT: Duration = Duration::from_secs(120);

/// Routes `/v1/compose/...`.
pub async fn handle(state: State, req: ApiRequest) -> Option<Reply> {
    let seg = req.segments();
    let reply = match (&req.method, seg.as_slice()) {
        (&Method::POST, ["prepare"]) => prepare_service(&state, &req).await,
        (&Method::POST, ["down"]) => down(&state, &req).await,
        (&Method::GET, ["services"]) => services(&state).await,
        _ => return None,
    };
    Some(reply)
}

fn conflict(message: impl Into<String>) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        message: message.into(),
    }
}

fn docker(state: &State) -> Result<Arc<Docker>, ApiError> {
    state.docker.get().map_err(|e| match e {
        crate::docker::Unavailable::Off => conflict(
            "the agent runs without Docker (--no-docker); restart it without that flag, or with `dso agent --docker`, to use `dso up`",
        ),
        waiting @ crate::docker::Unavailable::Waiting(_) => ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            message: waiting.to_string(),
        },
    })
}

/// A Compose project name as Compose accepts it (`-p`): lowercase letters, digits, `-`
/// and `_`, starting with a letter or digit.
fn check_project(project: &str) -> Result<(), ApiError> {
    let ok = project
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && project
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad_request(format!(
            "project {project:?}: a Compose project name is lowercase letters, digits, `-` and `_`, starting with a letter or digit"
        )))
    }
}

/// The HTTP status of a provider error met while reading a reference.
fn provider_status(e: &SecretError) -> StatusCode {
    match e {
        SecretError::InvalidReference { .. } => StatusCode::BAD_REQUEST,
        SecretError::NotFound { .. } | SecretError::Unusable { .. } => StatusCode::NOT_FOUND,
        SecretError::Unavailable { .. } | SecretError::Throttled { .. } => StatusCode::SERVICE_UNAVAILABLE,
        SecretError::Forbidden { .. } | SecretError::Auth { .. } => StatusCode::FORBIDDEN,
        SecretError::Config { .. } | SecretError::Protocol { .. } => StatusCode::BAD_GATEWAY,
    }
}

/// `POST /v1/compose/prepare`.
async fn prepare_service(state: &State, req: &ApiRequest) -> Reply {
    let d = docker(state)?;
    let body: PrepareRequest = req.json()?;
    check_project(&body.project)?;
    if body.service.trim().is_empty() {
        return Err(ApiError::bad_request("service: empty"));
    }
    let secrets = state.secrets.as_ref().ok_or_else(|| {
        conflict(format!(
            "service {}/{}: the agent's config defines no provider, so no dso:// or dsofile:// reference can be resolved; add one under providers: (e.g. the local vault) and restart the agent",
            body.project, body.service
        ))
    })?;
    let deliverer = secrets.deliverer().ok_or_else(|| {
        conflict("no secret delivery runs in this agent (it needs --docker and a provider in its config)")
    })?;
    let delivery = deliverer.delivery();
    if delivery.is_remote() {
        return Err(conflict(format!(
            "service {}/{}: the Docker engine is remote (or agent.delivery.remote is set): `dso up` binds directories of this host's tmpfs into the containers, which a remote engine cannot see; run `dso up` against a local engine",
            body.project, body.service
        )));
    }
    let key = ServiceKey {
        project: body.project.clone(),
        service: body.service.clone(),
    };
    // Compose runs next: with a rotation of the service in progress it would find two
    // containers carrying the service's labels and remove the newer one (the new
    // container). Waiting first also keeps the rotation's end (which wipes the retired
    // container's directory, possibly this service's instance directory) from wiping
    // what is written here.
    let started = std::time::Instant::now();
    while d.rotator.is_rotating(&key) {
        if started.elapsed() > ROTATION_WAIT {
            return Err(conflict(format!(
                "service {key} is being rotated for more than {} s; run `dso up` again once `dso status` shows it done",
                ROTATION_WAIT.as_secs()
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let reply = prepare_values(secrets, delivery, &key, &body).await?;
    d.compose.remember(&key);
    json(StatusCode::OK, &reply)
}

/// Reads the service's references, writes its files, and records the versions read as
/// applied to the service's watcher consumer (its container gets exactly them: no
/// rotation follows unless a value changes later).
async fn prepare_values(
    secrets: &crate::secrets::Secrets,
    delivery: &Delivery,
    key: &ServiceKey,
    body: &PrepareRequest,
) -> Result<PrepareReply, ApiError> {
    let kinds = secrets.provider_kinds();
    let specs = body
        .refs
        .specs(&kinds)
        .map_err(|e| ApiError::bad_request(format!("service {key}: {e}")))?;
    let mut values = Vec::new();
    let mut versions = Vec::new();
    let mut applied = Vec::new();
    for spec in &specs {
        for (var, reference) in &spec.mappings {
            let (value, version) = secrets.read_now(reference).await.map_err(|e| ApiError {
                status: provider_status(&e),
                message: format!(
                    "service {key}: variable {var} (reference {:?} of provider {}): {e}",
                    reference.raw, reference.provider
                ),
            })?;
            versions.push(format!("{}/{var}@{version}", spec.name));
            applied.push((reference.clone(), version));
            values.push((spec.name.clone(), var.clone(), value));
        }
    }
    let bundle = Bundle::new(values, versions);
    let reply = prepare(delivery, body, &bundle).map_err(|e| {
        let status = match e {
            DeliveryError::Store(_) | DeliveryError::Archive { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            _ => StatusCode::BAD_REQUEST,
        };
        ApiError {
            status,
            message: format!("service {key}: {e}"),
        }
    })?;
    if !applied.is_empty()
        && let Err(e) = secrets.watcher().applied(&Deliverer::consumer_of(key), &applied)
    {
        tracing::warn!(service = %key, error = %e, "cannot record the versions delivered; the agent may deliver them once more with a rotation");
    }
    tracing::info!(service = %key, instance = %reply.instance, references = specs.len(), "compose service prepared");
    Ok(reply)
}

/// Body of `POST /v1/compose/down`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DownBody {
    /// `com.docker.compose.project`.
    project: String,
}

/// Answer of `POST /v1/compose/down`.
#[derive(Debug, Serialize)]
struct DownReply {
    /// The project.
    project: String,
    /// Listeners released (their ports are free now).
    released: Vec<String>,
    /// Instance directories wiped.
    wiped: Vec<String>,
    /// Services of the project that still have containers (their listeners and
    /// directories are kept; run `docker compose down` first).
    still_running: Vec<String>,
}

/// `POST /v1/compose/down`: after `docker compose down`, the project's listeners are
/// released and its directories wiped at once, without waiting for the next scan or the
/// release grace.
async fn down(state: &State, req: &ApiRequest) -> Reply {
    let d = docker(state)?;
    let body: DownBody = req.json()?;
    check_project(&body.project)?;
    let project = body.project.as_str();
    // The instances the project's containers used, as last seen, before the rescan that
    // notices them gone.
    let before: BTreeSet<String> = d
        .rotator
        .subscribe_scans()
        .borrow()
        .as_deref()
        .map(|scan| {
            scan.services
                .values()
                .filter(|m| m.key.project == project)
                .flat_map(|m| m.containers.iter())
                .filter_map(|c| Delivery::instance_of(c).map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let scan = d.rotator.reconcile().await.map_err(|e| ApiError {
        status: StatusCode::BAD_GATEWAY,
        message: format!("project {project}: cannot scan Docker: {e}"),
    })?;
    let still_running: Vec<String> = scan
        .services
        .values()
        .filter(|m| m.key.project == project && !m.containers.is_empty())
        .map(|m| m.key.to_string())
        .collect();
    let released = d
        .rotator
        .gateway()
        .release_gone_now(|k| k.project == project)
        .await;
    let mut wiped = Vec::new();
    let delivery = state
        .secrets
        .as_ref()
        .and_then(|s| s.deliverer())
        .map(|x| Arc::clone(x.delivery()));
    let remembered = d.compose.list();
    if let Some(delivery) = &delivery {
        let mut candidates = before;
        for k in remembered
            .iter()
            .filter(|k| k.project == project)
            .chain(released.iter().map(|(k, _)| k))
        {
            candidates.insert(instance_for(&k.project, &k.service));
        }
        for inst in candidates {
            if !delivery.store().exists(&inst) {
                continue;
            }
            let users = d
                .rotator
                .engine()
                .list_labeled(LABEL_INSTANCE, &inst)
                .await
                .map_err(|e| ApiError {
                    status: StatusCode::BAD_GATEWAY,
                    message: format!("project {project}: cannot list containers: {e}"),
                })?;
            if users.is_empty() {
                delivery.wipe(&inst);
                wiped.push(inst);
            }
        }
    }
    if still_running.is_empty() {
        d.compose.forget_project(project);
    }
    tracing::info!(project, released = released.len(), wiped = wiped.len(), still_running = ?still_running, "compose project taken down");
    json(
        StatusCode::OK,
        &DownReply {
            project: project.to_owned(),
            released: released.into_iter().flat_map(|(_, names)| names).collect(),
            wiped,
            still_running,
        },
    )
}

/// One service of `GET /v1/compose/services`.
#[derive(Debug, Serialize)]
struct ComposeService {
    /// `project/service`.
    service: String,
    /// `ok`, or `recreated_without_override`.
    state: &'static str,
    /// Containers without the `dso.refs` label.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    containers: Vec<String>,
    /// What is wrong and the fix.
    #[serde(skip_serializing_if = "Option::is_none")]
    message: Option<String>,
}

/// `GET /v1/compose/services`.
async fn services(state: &State) -> Reply {
    let d = docker(state)?;
    let recreated = d.recreated_without_override().await.map_err(|e| ApiError {
        status: StatusCode::BAD_GATEWAY,
        message: format!("cannot list containers: {e}"),
    })?;
    let out: Vec<ComposeService> = d
        .compose
        .list()
        .into_iter()
        .map(|k| match recreated.iter().find(|r| r.service == k) {
            Some(r) => ComposeService {
                service: k.to_string(),
                state: "recreated_without_override",
                containers: r.containers.clone(),
                message: Some(r.message.clone()),
            },
            None => ComposeService {
                service: k.to_string(),
                state: "ok",
                containers: Vec::new(),
                message: None,
            },
        })
        .collect();
    json(StatusCode::OK, &serde_json::json!({ "services": out }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use dso_proxy::Proxy;
    use hyper::body::Bytes;

    fn state() -> State {
        State {
            proxy: Proxy::new(dso_proxy::ProxyConfig::default()),
            started: std::time::Instant::now(),
            docker: crate::docker::DockerSlot::off(),
            secrets: None,
            events: crate::events::Bus::new(),
        }
    }

    async fn call(method: Method, path: &str, body: &str) -> (StatusCode, String) {
        let req = ApiRequest {
            method,
            path: path
                .split('/')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            query: Default::default(),
            body: Bytes::from(body.to_owned()),
        };
        match handle(state(), req).await {
            None => (StatusCode::NOT_FOUND, String::new()),
            Some(Ok(r)) => (r.status(), String::new()),
            Some(Err(e)) => (e.status, e.message),
        }
    }

    #[tokio::test]
    async fn without_docker_the_endpoints_say_how_to_start_the_agent() {
        let (s, m) = call(Method::POST, "prepare", "{}").await;
        assert_eq!(s, StatusCode::CONFLICT);
        assert!(m.contains("--docker"), "{m}");
        let (s, _) = call(Method::POST, "down", r#"{"project":"p"}"#).await;
        assert_eq!(s, StatusCode::CONFLICT);
        let (s, _) = call(Method::GET, "prepare", "").await;
        assert_eq!(s, StatusCode::NOT_FOUND);
    }

    #[test]
    fn project_names_follow_compose() {
        assert!(check_project("dsot-shop_1").is_ok());
        for bad in ["", "Shop", "-x", "a b", "a/b"] {
            let e = check_project(bad).unwrap_err();
            assert_eq!(e.status, StatusCode::BAD_REQUEST);
            assert!(e.message.contains("lowercase"), "{}", e.message);
        }
    }

    #[test]
    fn provider_errors_map_to_documented_statuses() {
        let p = || "local".to_owned();
        let r = || "shop/x".to_owned();
        assert_eq!(
            provider_status(&SecretError::NotFound {
                provider: p(),
                reference: r()
            }),
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            provider_status(&SecretError::Unavailable {
                provider: p(),
                detail: "connection refused".into()
            }),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            provider_status(&SecretError::InvalidReference {
                provider: p(),
                reference: r(),
                reason: "x".into()
            }),
            StatusCode::BAD_REQUEST
        );
    }
}
