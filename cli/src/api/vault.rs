//! `/v1/vault/secrets`: the agent's local vaults through its control socket.
//!
//! In agent mode the vault file and its key are readable by root only; members of the
//! socket's group change entries through these endpoints instead (`dso secret set|list|
//! delete` does so when it cannot read the vault itself). Names, versions and times are
//! answered to every allowed peer; a value is answered only when the config says
//! `agent.api.allow_secret_read: true` (otherwise every member of the group could read every
//! secret). A value travels as the raw body (`application/octet-stream`) both ways, never in
//! a URL or a JSON document, and never passes the redactor (which would mangle it); every
//! other answer is JSON and does.
//!
//! The agent sets what this module serves once at start with [`configure`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};

use axum::extract::{RawQuery, State as With};
use dso_secrets::SecretValue;
use dso_secrets::local::{self, EntryInfo, KeySource, LocalVault, VaultError};
use dso_secrets::spec::ProviderSettings;
use dso_secrets::value::MAX_VALUE_LEN;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Response, StatusCode};
use tracing::info;

use super::{ApiError, Params, Reply, State, json, query_map};
use crate::cmd::secret::rfc3339;
use crate::config::Config;

/// The config key that allows reading values back.
pub const ALLOW_READ_KEY: &str = "agent.api.allow_secret_read";

/// The local vaults the agent's config names, and whether values may be read back.
struct VaultApi {
    /// `type: local` provider instances, in file order: name, vault file, key file.
    vaults: Vec<(String, PathBuf, Option<PathBuf>)>,
    /// `agent.api.allow_secret_read`.
    allow_read: bool,
    /// Vaults opened so far, per provider (opening may derive a key from a passphrase).
    opened: Mutex<HashMap<String, Arc<LocalVault>>>,
}

static API: OnceLock<VaultApi> = OnceLock::new();

/// Takes the local providers and `agent.api.allow_secret_read` from the agent's config.
/// Called once at start; later calls change nothing.
pub fn configure(cfg: &Config) {
    let vaults = cfg
        .secrets
        .providers
        .iter()
        .filter_map(|p| match &p.settings {
            ProviderSettings::Local(l) => {
                Some((p.name.clone(), l.vault_file.clone(), l.master_key_file.clone()))
            }
            _ => None,
        })
        .collect();
    let _ = API.set(VaultApi {
        vaults,
        allow_read: cfg.agent.allow_secret_read,
        opened: Mutex::default(),
    });
}

fn api() -> Result<&'static VaultApi, ApiError> {
    API.get()
        .ok_or_else(|| conflict("the agent's config has no `type: local` provider".to_owned()))
}

fn conflict(what: String) -> ApiError {
    ApiError {
        status: StatusCode::CONFLICT,
        message: format!("{what}; add one under `providers:` (see docs/config.md)"),
    }
}

/// The provider instance the request names (`?provider=NAME`), or the only local one.
fn pick<'a>(
    api: &'a VaultApi,
    query: &HashMap<String, String>,
) -> Result<&'a (String, PathBuf, Option<PathBuf>), ApiError> {
    let names = || {
        api.vaults
            .iter()
            .map(|v| v.0.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match query.get("provider") {
        Some(p) => api.vaults.iter().find(|v| v.0 == *p).ok_or_else(|| {
            ApiError::not_found(format!(
                "no local provider {p:?} in the agent's config (local providers: {})",
                names()
            ))
        }),
        None => match api.vaults.as_slice() {
            [] => Err(conflict(
                "the agent's config has no `type: local` provider".to_owned(),
            )),
            [one] => Ok(one),
            _ => Err(ApiError::bad_request(format!(
                "several local providers are configured ({}); name one with ?provider=NAME (dso secret --provider NAME)",
                names()
            ))),
        },
    }
}

/// Runs `f` on the opened vault of the request's provider, off the async threads.
async fn with_vault<T: Send + 'static>(
    query: &HashMap<String, String>,
    f: impl FnOnce(&LocalVault) -> Result<T, VaultError> + Send + 'static,
) -> Result<(String, PathBuf, T), ApiError> {
    let api = api()?;
    let (provider, file, key) = pick(api, query)?.clone();
    let (p, vault_file) = (provider.clone(), file.clone());
    let out = tokio::task::spawn_blocking(move || {
        let vault = {
            let cached = lock(&api.opened).get(&p).cloned();
            match cached {
                Some(v) => v,
                None => {
                    let v = Arc::new(open(&file, key)?);
                    lock(&api.opened).insert(p.clone(), Arc::clone(&v));
                    v
                }
            }
        };
        f(&vault)
    })
    .await
    .map_err(|e| internal(format!("vault task failed: {e}")))?
    .map_err(|e| vault_error(&provider, e))?;
    Ok((provider, vault_file, out))
}

fn open(file: &std::path::Path, key: Option<PathBuf>) -> Result<LocalVault, VaultError> {
    let key = match key {
        Some(k) => KeySource::KeyFile(k),
        None => match local::passphrase_from_env()? {
            Some(p) => KeySource::Passphrase(p),
            None => {
                return Err(VaultError::Passphrase {
                    reason: format!(
                        "{} is protected by a passphrase and the agent has none: start it with \
                         DSO_VAULT_PASSPHRASE_FILE set",
                        file.display()
                    ),
                });
            }
        },
    };
    LocalVault::open(file, key)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn internal(message: String) -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        message,
    }
}

/// A vault error as an answer: bad names and values are the client's (400), the rest the
/// agent's (500). Vault errors never carry a value.
fn vault_error(provider: &str, e: VaultError) -> ApiError {
    let status = match e {
        VaultError::InvalidName { .. } | VaultError::BadValue { .. } => StatusCode::BAD_REQUEST,
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    };
    ApiError {
        status,
        message: format!("provider {provider}: {e}"),
    }
}

fn entry_json(e: &EntryInfo) -> serde_json::Value {
    serde_json::json!({
        "name": e.name,
        "version": e.version,
        "updated": rfc3339(e.updated_ns()),
        "updated_ns": e.updated_ns(),
    })
}

fn check_name(name: &str) -> Result<(), ApiError> {
    local::check_name(name).map_err(|e| ApiError::bad_request(e.to_string()))
}

/// `GET /v1/vault/secrets[?provider=NAME]`.
pub async fn list(RawQuery(query): RawQuery) -> Reply {
    let (provider, file, entries) = with_vault(&query_map(&query), |v| v.list()).await?;
    let secrets: Vec<serde_json::Value> = entries.iter().map(entry_json).collect();
    json(
        StatusCode::OK,
        &serde_json::json!({ "provider": provider, "vault_file": file, "secrets": secrets }),
    )
}

/// `GET /v1/vault/secrets/{name}[?provider=NAME]`: the raw value, when allowed.
pub async fn get(p: Params, RawQuery(query): RawQuery) -> Reply {
    let name = p.first().to_owned();
    check_name(&name)?;
    if !api()?.allow_read {
        return Err(ApiError {
            status: StatusCode::FORBIDDEN,
            message: format!(
                "reading a value through the control socket is off: set {ALLOW_READ_KEY}: true in the \
                 agent's config to allow it (every member of the socket's group can then read every \
                 local secret), or run `dso secret get` as root"
            ),
        });
    }
    let n = name.clone();
    let (provider, file, found) = with_vault(&query_map(&query), move |v| v.get(&n)).await?;
    let Some((info, value)) = found else {
        return Err(not_found(&provider, &file, &name));
    };
    info!(provider = %provider, name = %name, version = info.version, "secret value read through the control socket");
    // The raw value, not JSON, and not through the redactor (which would replace it).
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/octet-stream")
        .header("cache-control", "no-store")
        .header("x-dso-version", info.version.to_string())
        .body(Full::new(Bytes::copy_from_slice(value.expose())))
        .expect("static headers are valid"))
}

fn not_found(provider: &str, file: &std::path::Path, name: &str) -> ApiError {
    ApiError::not_found(format!(
        "no secret {name:?} in {} (provider {provider}; see `dso secret list`)",
        file.display()
    ))
}

/// `PUT /v1/vault/secrets/{name}[?provider=NAME]`: the raw body is the value.
pub async fn set(With(state): With<State>, p: Params, RawQuery(query): RawQuery, body: Bytes) -> Reply {
    let (state, name) = (&state, p.first().to_owned());
    check_name(&name)?;
    if body.len() > MAX_VALUE_LEN {
        return Err(ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: format!(
                "secret {name:?}: the value is {} bytes, more than {MAX_VALUE_LEN} (the limit); nothing was changed",
                body.len()
            ),
        });
    }
    let value = SecretValue::from_slice(&body);
    local::check_value(&name, &value).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let n = name.clone();
    let (provider, file, info) = with_vault(&query_map(&query), move |v| v.set(&n, &value)).await?;
    let polled = notify(state, &file);
    info!(provider = %provider, name = %name, version = info.version, "secret set through the control socket");
    json(
        StatusCode::OK,
        &serde_json::json!({
            "provider": provider,
            "vault_file": file,
            "secret": entry_json(&info),
            "polled": polled,
        }),
    )
}

/// `DELETE /v1/vault/secrets/{name}[?provider=NAME]`.
pub async fn delete(With(state): With<State>, p: Params, RawQuery(query): RawQuery) -> Reply {
    let (state, name) = (&state, p.first().to_owned());
    check_name(&name)?;
    let n = name.clone();
    let (provider, file, info) = with_vault(&query_map(&query), move |v| v.delete(&n)).await?;
    let Some(info) = info else {
        return Err(not_found(&provider, &file, &name));
    };
    let polled = notify(state, &file);
    info!(provider = %provider, name = %name, version = info.version, "secret deleted through the control socket");
    json(
        StatusCode::OK,
        &serde_json::json!({
            "provider": provider,
            "vault_file": file,
            "deleted": entry_json(&info),
            "polled": polled,
        }),
    )
}

/// Tells the watcher at once (as `dso secret set` does with `POST /v1/secrets/notify`).
fn notify(state: &State, file: &std::path::Path) -> Vec<String> {
    state
        .secrets
        .as_ref()
        .map(|s| s.notify_local(file))
        .unwrap_or_default()
}
