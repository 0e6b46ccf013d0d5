//! An in-process HashiCorp Vault that answers the calls the `vault` provider makes, with
//! Vault's JSON envelopes and error bodies (api-docs: secret/kv/kv-v2, auth/token,
//! auth/approle, system/health):
//! `sys/health`, `auth/token/lookup-self`, `auth/token/renew-self`, `auth/approle/login`,
//! `GET MOUNT/metadata/PATH`, `GET MOUNT/data/PATH[?version=N]`, `POST MOUNT/data/PATH`.
//!
//! Every request but health and login needs a known `X-Vault-Token`; secrets live per
//! namespace (`X-Vault-Namespace`), so a missing namespace header finds nothing. It can be
//! sealed, throttled (429 with Retry-After) or broken (500), and counts calls per endpoint.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use serde_json::{Value, json};

use super::http::{self, Req, Resp, Server};

/// What the server answers instead of the normal answer.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Mode {
    Normal,
    Sealed,
    /// 429 with `Retry-After: N`.
    Throttled(u64),
    Broken,
}

#[derive(Clone)]
struct TokenInfo {
    ttl: u64,
    renewable: bool,
    policies: Vec<String>,
}

struct Version {
    data: Value,
    created_time: String,
    deletion_time: String,
    destroyed: bool,
}

#[derive(Default)]
struct State {
    tokens: HashMap<String, TokenInfo>,
    /// (namespace, mount, path) -> versions, oldest first.
    secrets: HashMap<(String, String, String), Vec<Version>>,
    /// Paths (mount/path) every token is denied.
    denied: HashSet<String>,
    approle: Option<(String, String, u64)>,
    issued: usize,
    mode: Option<Mode>,
    calls: HashMap<&'static str, usize>,
    /// Namespace header of every request, in order.
    namespaces: Vec<Option<String>>,
    /// Every token presented, in order.
    tokens_seen: Vec<String>,
    /// `renew-self` answers 500 while set.
    fail_renewals: bool,
}

/// The running fake Vault.
pub struct VaultServer {
    _server: Server,
    pub address: String,
    state: Arc<Mutex<State>>,
}

impl VaultServer {
    /// Starts it over HTTP, or over HTTPS with `tls`.
    pub async fn start(tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>) -> VaultServer {
        let state = Arc::new(Mutex::new(State::default()));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let handler_state = Arc::clone(&state);
        let server = http::serve(tls, Arc::new(move |req| handle(&handler_state, req))).await;
        let host = if scheme == "https" {
            "localhost"
        } else {
            "127.0.0.1"
        };
        let address = format!("{scheme}://{host}:{}", server.addr.port());
        VaultServer {
            _server: server,
            address,
            state,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Accepts `token` with this TTL (0 = never expires).
    pub fn add_token(&self, token: &str, ttl: u64, renewable: bool) {
        self.state().tokens.insert(
            token.to_string(),
            TokenInfo {
                ttl,
                renewable,
                policies: vec!["default".into(), "app".into()],
            },
        );
    }

    pub fn set_approle(&self, role_id: &str, secret_id: &str, ttl: u64) {
        self.state().approle = Some((role_id.to_string(), secret_id.to_string(), ttl));
    }

    /// Writes a new version directly (as `vault kv put` would); returns its number.
    pub fn put(&self, namespace: &str, mount: &str, path: &str, data: Value) -> u64 {
        put(&mut self.state(), namespace, mount, path, data)
    }

    /// Soft-deletes version `n` (deletion_time = now), as `vault kv delete -versions=n`.
    pub fn delete_version(&self, namespace: &str, mount: &str, path: &str, n: u64) {
        let mut st = self.state();
        let v = &mut st.secrets.get_mut(&key(namespace, mount, path)).unwrap()[n as usize - 1];
        v.deletion_time = "2026-01-02T03:04:05.123456Z".to_string();
    }

    /// Destroys version `n`, as `vault kv destroy -versions=n`.
    pub fn destroy_version(&self, namespace: &str, mount: &str, path: &str, n: u64) {
        let mut st = self.state();
        let v = &mut st.secrets.get_mut(&key(namespace, mount, path)).unwrap()[n as usize - 1];
        v.destroyed = true;
        v.data = Value::Null;
    }

    pub fn deny(&self, mount_and_path: &str) {
        self.state().denied.insert(mount_and_path.to_string());
    }

    /// Makes `renew-self` answer 500 (or work again).
    pub fn fail_renewals(&self, fail: bool) {
        self.state().fail_renewals = fail;
    }

    pub fn set_mode(&self, mode: Mode) {
        self.state().mode = Some(mode);
    }

    /// Calls to `endpoint` so far: "health", "lookup-self", "renew-self", "approle-login",
    /// "metadata", "data-read", "data-write".
    pub fn calls(&self, endpoint: &str) -> usize {
        self.state().calls.get(endpoint).copied().unwrap_or(0)
    }

    /// Every call counted so far, for "nothing else was called" checks.
    pub fn total_calls(&self) -> usize {
        self.state().calls.values().sum()
    }

    pub fn namespaces_seen(&self) -> Vec<Option<String>> {
        self.state().namespaces.clone()
    }

    pub fn tokens_seen(&self) -> Vec<String> {
        self.state().tokens_seen.clone()
    }
}

fn key(namespace: &str, mount: &str, path: &str) -> (String, String, String) {
    (namespace.to_string(), mount.to_string(), path.to_string())
}

fn put(st: &mut State, namespace: &str, mount: &str, path: &str, data: Value) -> u64 {
    let versions = st.secrets.entry(key(namespace, mount, path)).or_default();
    versions.push(Version {
        data,
        created_time: format!("2026-12-01T10:00:{:02}.000000001Z", versions.len() % 60),
        deletion_time: String::new(),
        destroyed: false,
    });
    versions.len() as u64
}

/// Vault's error body.
fn errors(status: u16, messages: &[&str]) -> Resp {
    Resp::json(status, json!({ "errors": messages }))
}

/// Vault's success envelope around `data` (and `auth`).
fn envelope(data: Value, auth: Value) -> Value {
    json!({
        "request_id": "9a7a0b6c-1f3e-4c5a-8d7e-2b1c0d9e8f7a",
        "lease_id": "",
        "renewable": false,
        "lease_duration": 0,
        "data": data,
        "wrap_info": null,
        "warnings": null,
        "auth": auth,
        "mount_type": "kv"
    })
}

fn count(st: &mut State, endpoint: &'static str) {
    *st.calls.entry(endpoint).or_insert(0) += 1;
}

fn handle(state: &Mutex<State>, req: Req) -> Resp {
    let mut st = state.lock().unwrap();
    let namespace = req.header("x-vault-namespace").map(str::to_string);
    st.namespaces.push(namespace.clone());
    let token = req.header("x-vault-token").unwrap_or_default().to_string();
    if !token.is_empty() {
        st.tokens_seen.push(token.clone());
    }
    let Some(path) = req.path.strip_prefix("/v1/") else {
        return errors(404, &["no handler for route"]);
    };
    let path = path.to_string();
    let mode = st.mode.unwrap_or(Mode::Normal);

    if path == "sys/health" {
        count(&mut st, "health");
        let sealed = mode == Mode::Sealed;
        let body = json!({
            "initialized": true,
            "sealed": sealed,
            "standby": false,
            "performance_standby": false,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": 1_764_583_200,
            "version": "1.17.2",
            "cluster_name": "vault-cluster-test",
            "cluster_id": "1c2d3e4f-0000-1111-2222-333344445555"
        });
        return Resp::json(if sealed { 503 } else { 200 }, body);
    }
    match mode {
        Mode::Sealed => return errors(503, &["Vault is sealed"]),
        Mode::Throttled(secs) => {
            return errors(
                429,
                &[&format!("request path \"{path}\": rate limit quota exceeded")],
            )
            .with_header("retry-after", &secs.to_string());
        }
        Mode::Broken => return errors(500, &["internal error"]),
        Mode::Normal => {}
    }

    if path == "auth/approle/login" && req.method == "POST" {
        count(&mut st, "approle-login");
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let ok = match &st.approle {
            Some((role, secret, _)) => body["role_id"] == *role && body["secret_id"] == *secret,
            None => false,
        };
        if !ok {
            return errors(400, &["invalid role or secret ID"]);
        }
        let ttl = st.approle.as_ref().unwrap().2;
        st.issued += 1;
        let token = format!("hvs.approle-token-{}", st.issued);
        st.tokens.insert(
            token.clone(),
            TokenInfo {
                ttl,
                renewable: true,
                policies: vec!["default".into(), "app".into()],
            },
        );
        return Resp::json(200, envelope(Value::Null, auth_info(&token, ttl, true)));
    }

    let Some(info) = st.tokens.get(&token).cloned() else {
        if path.starts_with("auth/token/") {
            count(
                &mut st,
                if path.ends_with("renew-self") {
                    "renew-self"
                } else {
                    "lookup-self"
                },
            );
        }
        return errors(403, &["permission denied"]);
    };

    match (req.method.as_str(), path.as_str()) {
        ("GET", "auth/token/lookup-self") => {
            count(&mut st, "lookup-self");
            let data = json!({
                "accessor": "8609694a-cdbc-db9b-d345-e782dbb562ed",
                "creation_time": 1_764_583_200u64,
                "creation_ttl": info.ttl,
                "display_name": "token",
                "entity_id": "",
                "expire_time": if info.ttl == 0 { Value::Null } else { json!("2026-12-01T11:00:00.000000000Z") },
                "explicit_max_ttl": 0,
                "id": token,
                "identity_policies": null,
                "issue_time": "2026-12-01T10:00:00.000000000Z",
                "meta": null,
                "num_uses": 0,
                "orphan": false,
                "path": "auth/token/create",
                "policies": info.policies,
                "renewable": info.renewable,
                "ttl": info.ttl,
                "type": "service"
            });
            Resp::json(200, envelope(data, Value::Null))
        }
        ("POST", "auth/token/renew-self") | ("PUT", "auth/token/renew-self") => {
            count(&mut st, "renew-self");
            if st.fail_renewals {
                return errors(500, &["internal error"]);
            }
            if !info.renewable {
                return errors(400, &["lease is not renewable"]);
            }
            Resp::json(200, envelope(Value::Null, auth_info(&token, info.ttl, true)))
        }
        _ => kv(&mut st, &req, &path, namespace.unwrap_or_default()),
    }
}

fn auth_info(token: &str, ttl: u64, renewable: bool) -> Value {
    json!({
        "client_token": token,
        "accessor": "0e9e354a-520f-df04-6867-ee81cae3d42d",
        "policies": ["default", "app"],
        "token_policies": ["default", "app"],
        "metadata": {"role_name": "app"},
        "lease_duration": ttl,
        "renewable": renewable,
        "entity_id": "7d2e3179-f69b-450c-7179-ac8ee8bd8ca9",
        "token_type": "service",
        "orphan": true,
        "mfa_requirement": null,
        "num_uses": 0
    })
}

fn kv(st: &mut State, req: &Req, path: &str, namespace: String) -> Resp {
    let (kind, mount, secret) = if let Some((m, p)) = path.split_once("/metadata/") {
        ("metadata", m, p)
    } else if let Some((m, p)) = path.split_once("/data/") {
        ("data", m, p)
    } else {
        return errors(404, &[&format!("no handler for route \"{path}\"")]);
    };
    let endpoint = match (kind, req.method.as_str()) {
        ("metadata", "GET") => "metadata",
        ("data", "GET") => "data-read",
        ("data", "POST") | ("data", "PUT") => "data-write",
        _ => return errors(405, &["unsupported operation"]),
    };
    count(st, endpoint);
    if st.denied.contains(&format!("{mount}/{secret}")) {
        return errors(403, &["1 error occurred:\n\t* permission denied\n\n"]);
    }
    if endpoint == "data-write" {
        let body: Value = serde_json::from_slice(&req.body).unwrap_or(Value::Null);
        let n = put(st, &namespace, mount, secret, body["data"].clone());
        let v = &st.secrets[&key(&namespace, mount, secret)][n as usize - 1];
        let data = json!({"created_time": v.created_time, "custom_metadata": null, "deletion_time": "", "destroyed": false, "version": n});
        return Resp::json(200, envelope(data, Value::Null));
    }
    let Some(versions) = st.secrets.get(&key(&namespace, mount, secret)) else {
        return errors(404, &[]);
    };
    if endpoint == "metadata" {
        let listed: serde_json::Map<String, Value> = versions
            .iter()
            .enumerate()
            .map(|(i, v)| {
                (
                    (i + 1).to_string(),
                    json!({"created_time": v.created_time, "deletion_time": v.deletion_time, "destroyed": v.destroyed}),
                )
            })
            .collect();
        let data = json!({
            "cas_required": false,
            "created_time": versions[0].created_time,
            "current_version": versions.len(),
            "custom_metadata": null,
            "delete_version_after": "0s",
            "max_versions": 0,
            "oldest_version": 0,
            "updated_time": versions[versions.len() - 1].created_time,
            "versions": listed
        });
        return Resp::json(200, envelope(data, Value::Null));
    }
    let n: usize = req.query.get("version").and_then(|v| v.parse().ok()).unwrap_or(0);
    let n = if n == 0 { versions.len() } else { n };
    let Some(v) = versions.get(n - 1) else {
        return errors(404, &[]);
    };
    let metadata = json!({
        "created_time": v.created_time,
        "custom_metadata": null,
        "deletion_time": v.deletion_time,
        "destroyed": v.destroyed,
        "version": n
    });
    if v.destroyed || !v.deletion_time.is_empty() {
        // What Vault answers for a deleted or destroyed version: 404, data null, metadata.
        return Resp::json(
            404,
            envelope(json!({"data": null, "metadata": metadata}), Value::Null),
        );
    }
    Resp::json(
        200,
        envelope(json!({"data": v.data, "metadata": metadata}), Value::Null),
    )
}
