//! `GET /health` (both listeners): liveness and readiness with reasons.
//!
//! Live: the process answers. Ready: the control socket and the HTTP listener (when on) are
//! bound, the Docker side (when the agent manages Docker) has started and scanned the
//! engine, no managed service's host ports failed to bind, and the secret watcher (when
//! the config has secrets) runs with no provider down, and the agent is not draining for
//! shutdown. 200 when ready, 503 otherwise, each
//! reason naming the part and what is wrong.
//!
//! What the agent expects (Docker or not) and how its HTTP listener fared are set once at
//! start with [`configure`] and [`set_http`]; the rest is read from [`State`] per request.

use std::sync::{Mutex, OnceLock};

use axum::extract::State as With;
use hyper::StatusCode;
use serde::Serialize;

use super::{Reply, State, json};

/// What the agent was started to run.
#[derive(Debug, Clone, Copy, Default)]
pub struct Expect {
    /// The agent manages Docker (`--docker`).
    pub docker: bool,
}

/// How the HTTP listener fared.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HttpListener {
    /// Not started yet.
    Pending,
    /// `agent.http.listen: off`.
    Off,
    /// Bound at this address.
    Bound(std::net::SocketAddr),
    /// Could not be bound; why.
    Failed(String),
}

static EXPECT: OnceLock<Expect> = OnceLock::new();
static HTTP: Mutex<HttpListener> = Mutex::new(HttpListener::Pending);

/// Records what the agent runs. Called once at start; later calls change nothing.
pub fn configure(expect: Expect) {
    let _ = EXPECT.set(expect);
}

/// Records the HTTP listener's state.
pub fn set_http(state: HttpListener) {
    *HTTP.lock().unwrap_or_else(|e| e.into_inner()) = state;
}

/// The answer of `GET /health`.
#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct Health {
    /// The process answers (always true in an answer).
    pub live: bool,
    /// Everything the agent was configured to run is up.
    pub ready: bool,
    /// Why it is not ready (empty when ready).
    pub reasons: Vec<String>,
    /// The HTTP listener's address, when bound.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http: Option<String>,
}

/// What the parts of the agent reported, for [`assess`].
#[derive(Debug, Default)]
pub struct Parts {
    /// The agent manages Docker.
    pub docker_expected: bool,
    /// The Docker side has started.
    pub docker_started: bool,
    /// It has scanned the engine at least once.
    pub docker_scanned: bool,
    /// While it has not started: what it waits for (the engine, the error, the retry).
    pub docker_waiting: Option<String>,
    /// Managed services whose host ports failed to bind: service, why.
    pub unbound: Vec<(String, String)>,
    /// The config has providers or secrets.
    pub secrets_expected: bool,
    /// The secret side has started.
    pub secrets_started: bool,
    /// Its watcher answers.
    pub watcher_running: bool,
    /// Providers down: name, last error.
    pub providers_down: Vec<(String, Option<String>)>,
    /// The HTTP listener.
    pub http: Option<HttpListener>,
    /// The agent is draining for shutdown.
    pub shutting_down: bool,
}

/// Readiness from the parts' reports.
pub fn assess(p: &Parts) -> Health {
    let mut reasons = Vec::new();
    if p.shutting_down {
        reasons.push("agent: shutting down (connections draining)".to_owned());
    }
    match &p.http {
        Some(HttpListener::Failed(why)) => reasons.push(format!("http listener: {why}")),
        Some(HttpListener::Pending) => reasons.push("http listener: not bound yet".to_owned()),
        _ => {}
    }
    if p.docker_expected {
        if !p.docker_started {
            reasons.push(match &p.docker_waiting {
                Some(w) => format!("docker: {w}"),
                None => "docker: the Docker side has not started (engine not answering?)".to_owned(),
            });
        } else if !p.docker_scanned {
            reasons.push("docker: the managed containers have not been scanned yet".to_owned());
        }
    }
    for (service, why) in &p.unbound {
        reasons.push(format!("docker: service {service}: host ports not bound: {why}"));
    }
    if p.secrets_expected {
        if !p.secrets_started {
            reasons.push("secrets: the secret watcher has not started".to_owned());
        } else if !p.watcher_running {
            reasons.push("secrets: the secret watcher has stopped".to_owned());
        }
    }
    for (provider, error) in &p.providers_down {
        reasons.push(match error {
            Some(e) => format!("secrets: provider {provider} down: {e}"),
            None => format!("secrets: provider {provider} down"),
        });
    }
    let http = match &p.http {
        Some(HttpListener::Bound(a)) => Some(a.to_string()),
        _ => None,
    };
    Health {
        live: true,
        ready: reasons.is_empty(),
        reasons,
        http,
    }
}

/// Reads the parts from the running agent.
async fn parts(state: &State) -> Parts {
    let expect = EXPECT.get().copied().unwrap_or_default();
    let mut p = Parts {
        docker_expected: expect.docker,
        shutting_down: state.proxy.is_shutting_down(),
        http: EXPECT
            .get()
            .map(|_| HTTP.lock().unwrap_or_else(|e| e.into_inner()).clone()),
        ..Parts::default()
    };
    if let Err(crate::docker::Unavailable::Waiting(w)) = state.docker.get() {
        p.docker_waiting = Some(w);
    }
    if let Some(d) = &state.docker.ready() {
        p.docker_started = true;
        p.docker_scanned = d.rotator.subscribe_scans().borrow().is_some();
        let gateway = d.rotator.gateway();
        for key in gateway.services() {
            if let Some(why) = gateway.bind_error(&key) {
                p.unbound.push((key.to_string(), why));
            }
        }
    }
    if let Some(s) = &state.secrets {
        p.secrets_expected = true;
        p.secrets_started = true;
        match s.watcher().status().await {
            Some(status) => {
                p.watcher_running = true;
                p.providers_down = status
                    .providers
                    .into_iter()
                    .filter(|pr| !pr.up)
                    .map(|pr| (pr.provider, pr.last_error))
                    .collect();
            }
            None => p.watcher_running = false,
        }
    }
    p
}

/// `GET /health`.
pub async fn health(With(state): With<State>) -> Reply {
    let h = assess(&parts(&state).await);
    let status = if h.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json(status, &h)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_expected_part_is_up() {
        let ok = Parts {
            docker_expected: true,
            docker_started: true,
            docker_scanned: true,
            secrets_expected: true,
            secrets_started: true,
            watcher_running: true,
            http: Some(HttpListener::Bound("127.0.0.1:8471".parse().unwrap())),
            ..Parts::default()
        };
        let h = assess(&ok);
        assert!(h.ready && h.live && h.reasons.is_empty(), "{h:?}");
        assert_eq!(h.http.as_deref(), Some("127.0.0.1:8471"));

        let down = Parts {
            docker_started: false,
            providers_down: vec![("vault".into(), Some("connection refused".into()))],
            http: Some(HttpListener::Failed(
                "agent.http.listen: cannot bind 127.0.0.1:8471: address in use".into(),
            )),
            ..ok
        };
        let h = assess(&down);
        assert!(!h.ready && h.live);
        assert_eq!(
            h.reasons,
            [
                "http listener: agent.http.listen: cannot bind 127.0.0.1:8471: address in use",
                "docker: the Docker side has not started (engine not answering?)",
                "secrets: provider vault down: connection refused",
            ]
        );
        // Nothing expected, nothing missing.
        assert!(assess(&Parts::default()).ready);
        let off = Parts {
            http: Some(HttpListener::Off),
            ..Parts::default()
        };
        assert!(assess(&off).ready);
        let draining = Parts {
            shutting_down: true,
            ..off
        };
        assert_eq!(
            assess(&draining).reasons,
            ["agent: shutting down (connections draining)"]
        );
    }
}
