//! `/v1/proxy`: snapshots of the listeners and the route operations swap, pause, resume and
//! wait-for-drain. Bodies are read field by field so that an error names its field.

use std::time::Duration;

use axum::extract::{RawQuery, State as With};
use dso_proxy::{Backend, DrainStatus, Listener};
use hyper::StatusCode;
use hyper::body::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use super::{ApiError, Params, Reply, State, json, parse_json, query_map};
use crate::config::BackendEntry;
use crate::duration::HumanDuration;

/// Extra time a waiting swap allows beyond the drain deadline and close window, for the
/// closes to land.
const WAIT_SLACK: Duration = Duration::from_secs(10);

/// Answer of swap and resume.
#[derive(Debug, Serialize)]
struct SwapReply {
    listener: String,
    generation: u64,
    previous: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    drain: Option<DrainStatus>,
}

/// `GET /v1/proxy`.
pub async fn snapshot(With(state): With<State>) -> Reply {
    json(StatusCode::OK, &state.proxy.snapshot())
}

/// `GET /v1/proxy/listeners`.
pub async fn listeners(With(state): With<State>) -> Reply {
    json(StatusCode::OK, &state.proxy.snapshot().listeners)
}

/// `GET /v1/proxy/listeners/{name}`.
pub async fn listener(With(state): With<State>, p: Params) -> Reply {
    find(&state, p.first()).and_then(|l| json(StatusCode::OK, &l.snapshot()))
}

/// 409 once the agent is draining for shutdown: the route is no longer changed then.
pub(super) fn refuse_during_shutdown(state: &State) -> Result<(), ApiError> {
    if state.proxy.is_shutting_down() {
        return Err(ApiError {
            status: StatusCode::CONFLICT,
            message: "the agent is shutting down; routes are no longer changed".to_owned(),
        });
    }
    Ok(())
}

/// A duration field that must not exceed the proxy's longest wait (365 days).
fn bounded(field: &str, d: Option<HumanDuration>) -> Result<Option<Duration>, ApiError> {
    match d.map(HumanDuration::get) {
        Some(d) if d > dso_proxy::MAX_WAIT => Err(ApiError::bad_request(format!(
            "{field}: {} is longer than the longest the proxy waits (365d)",
            crate::duration::format(d)
        ))),
        other => Ok(other),
    }
}

/// A backend list within the proxy's bound, checked before anything is applied.
fn bounded_backends(entries: Vec<BackendEntry>) -> Result<Vec<Backend>, ApiError> {
    if entries.len() > dso_proxy::MAX_BACKENDS {
        return Err(ApiError::bad_request(format!(
            "backends: {} given; a route takes at most {}",
            entries.len(),
            dso_proxy::MAX_BACKENDS
        )));
    }
    Ok(to_backends(entries))
}

/// `POST /v1/proxy/listeners/{name}/swap`.
pub async fn swap(With(state): With<State>, p: Params, body: Bytes) -> Reply {
    let (state, name) = (&state, p.first());
    let body = Body::parse(&body, &["backends", "drain", "wait"])?;
    let backends: Vec<BackendEntry> = body.required("backends")?;
    let backends = bounded_backends(backends)?;
    let drain = bounded("drain", body.optional("drain")?)?;
    let wait: bool = body.optional("wait")?.unwrap_or(false);
    let l = find(state, name)?;
    refuse_during_shutdown(state)?;
    let swap = l.swap(backends, drain).map_err(proxy_error)?;
    let drain_status = if wait {
        let deadline = drain.unwrap_or(l.config().drain_timeout);
        let timeout = deadline
            .saturating_add(l.config().close_window)
            .saturating_add(WAIT_SLACK);
        Some(
            l.wait_drained(swap.previous, timeout)
                .await
                .map_err(proxy_error)?,
        )
    } else {
        None
    };
    json(
        StatusCode::OK,
        &SwapReply {
            listener: name.to_owned(),
            generation: swap.generation,
            previous: swap.previous,
            drain: drain_status,
        },
    )
}

/// `POST /v1/proxy/listeners/{name}/pause`.
pub async fn pause(With(state): With<State>, p: Params, body: Bytes) -> Reply {
    let (state, name) = (&state, p.first());
    let body = Body::parse(&body, &["max"])?;
    let max: Option<HumanDuration> = body.optional("max")?;
    if max.is_some_and(|m| m.get().is_zero()) {
        return Err(ApiError::bad_request("max: must be longer than 0s"));
    }
    let l = find(state, name)?;
    refuse_during_shutdown(state)?;
    // The answer gives the maximum in force: beyond 365 days a hold is cut to 365 days.
    let max = l.pause(max.map(HumanDuration::get));
    json(
        StatusCode::OK,
        &serde_json::json!({
            "listener": name,
            "mode": "hold",
            "generation": l.generation(),
            "max_ms": u64::try_from(max.as_millis()).unwrap_or(u64::MAX),
        }),
    )
}

/// `POST /v1/proxy/listeners/{name}/resume`.
pub async fn resume(With(state): With<State>, p: Params, body: Bytes) -> Reply {
    let (state, name) = (&state, p.first());
    let body = Body::parse(&body, &["backends", "drain"])?;
    let backends: Option<Vec<BackendEntry>> = body.optional("backends")?;
    let drain = bounded("drain", body.optional("drain")?)?;
    if backends.as_ref().is_some_and(Vec::is_empty) {
        return Err(ApiError::bad_request(
            "backends: give at least one IP:PORT, or leave the field out",
        ));
    }
    let backends = backends.map(bounded_backends).transpose()?;
    let l = find(state, name)?;
    refuse_during_shutdown(state)?;
    let swap = l.resume(backends, drain).map_err(proxy_error)?;
    json(
        StatusCode::OK,
        &SwapReply {
            listener: name.to_owned(),
            generation: swap.generation,
            previous: swap.previous,
            drain: None,
        },
    )
}

/// `GET /v1/proxy/listeners/{name}/generations/{n}/drain[?timeout=DURATION]`.
pub async fn drain(With(state): With<State>, p: Params, RawQuery(query): RawQuery) -> Reply {
    let (state, name, n) = (&state, p.first(), p.0.get(1).map_or("", String::as_str));
    let query = query_map(&query);
    let generation: u64 = n
        .parse()
        .map_err(|_| ApiError::bad_request(format!("generation {n:?} is not a number")))?;
    let timeout = match query.get("timeout") {
        Some(t) => crate::duration::parse(t).map_err(|e| ApiError::bad_request(format!("timeout: {e}")))?,
        None => Duration::from_secs(30),
    };
    let l = find(state, name)?;
    let status = l.wait_drained(generation, timeout).await.map_err(proxy_error)?;
    json(StatusCode::OK, &status)
}

fn find(state: &State, name: &str) -> Result<Listener, ApiError> {
    state.proxy.listener(name).map_err(proxy_error)
}

fn to_backends(entries: Vec<BackendEntry>) -> Vec<Backend> {
    entries.into_iter().map(Backend::from).collect()
}

fn proxy_error(e: dso_proxy::Error) -> ApiError {
    use dso_proxy::Error as E;
    let status = match &e {
        E::UnknownListener { .. } | E::UnknownGeneration { .. } => StatusCode::NOT_FOUND,
        E::NoBackends { .. } | E::SelfLoop { .. } | E::PortZero { .. } | E::TooManyBackends { .. } => {
            StatusCode::BAD_REQUEST
        }
        E::ShuttingDown | E::DuplicateListener { .. } => StatusCode::CONFLICT,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError {
        status,
        message: e.to_string(),
    }
}

/// A JSON object body whose fields are read one by one.
struct Body(Map<String, Value>);

impl Body {
    fn parse(body: &[u8], allowed: &[&str]) -> Result<Body, ApiError> {
        let Value::Object(map) = parse_json::<Value>(body)? else {
            return Err(ApiError::bad_request("invalid body: expected a JSON object"));
        };
        if let Some(k) = map.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(ApiError::bad_request(format!(
                "unknown field {k:?}; expected one of: {}",
                allowed.join(", ")
            )));
        }
        Ok(Body(map))
    }

    fn optional<T: DeserializeOwned>(&self, field: &str) -> Result<Option<T>, ApiError> {
        match self.0.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ApiError::bad_request(format!("{field}: {e}"))),
        }
    }

    fn required<T: DeserializeOwned>(&self, field: &str) -> Result<T, ApiError> {
        self.optional(field)?
            .ok_or_else(|| ApiError::bad_request(format!("{field}: missing")))
    }
}
