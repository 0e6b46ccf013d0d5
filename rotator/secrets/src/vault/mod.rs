//! The `vault` provider: HashiCorp Vault's KV v2 secrets engine, on `vaultrs`.
//!
//! Calls, all through one `vaultrs` client (its endpoint types, its middleware that adds
//! `X-Vault-Token`, `X-Vault-Namespace` and the `/v1` prefix, its HTTP connection pool):
//! - [`Provider::version`]: `GET /v1/MOUNT/metadata/PATH`, one call, metadata only; the
//!   token is `current_version`.
//! - [`Provider::fetch`]: `GET /v1/MOUNT/data/PATH?version=N`, one call, exactly that
//!   version; the value is the version's `data` object as JSON text, so
//!   [`Reference::select`] picks the field.
//! - [`Provider::check`]: `GET /v1/sys/health`, then `GET /v1/auth/token/lookup-self`.
//! - Login (module `login`): token (`lookup-self` at connect, `renew-self` before expiry) or
//!   AppRole (`POST /v1/auth/MOUNT/login`, again before the lease ends).
//!
//! The KV calls go through `vaultrs`'s request layer but read the raw answer (rustify's
//! `send`), because `vaultrs`'s typed calls drop what the provider needs: the
//! `Retry-After` header of a 429, and the body of the 404 Vault answers for a deleted
//! version (which says *deleted*, not *missing*).
//!
//! Invariant: the Vault token is never logged or put into an error; it is registered with
//! [`Redactor::global`] while it is in use.

mod kv;
mod login;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use rustify::client::Client as _;
use rustify::endpoint::Endpoint;
use tokio::sync::RwLock;
use tokio_util::sync::{CancellationToken, DropGuard};
use vaultrs::api::kv2::requests::{ReadSecretMetadataRequest, ReadSecretRequest};
use vaultrs::api::sys::requests::ReadHealthRequest;
use vaultrs::client::{VaultClient, VaultClientSettingsBuilder};
use vaultrs::error::ClientError;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::provider::{CheckReport, Provider, Version};
use crate::redact::Redactor;
use crate::reference::Reference;
use crate::spec::{ProviderKind, ProviderSettings, ProviderSpec, VaultSettings};
use crate::value::SecretValue;

/// Connects a `vault` provider instance: builds the client, logs in (token lookup or
/// AppRole login) and starts the renewal task when the token expires.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    let ProviderSettings::Vault(settings) = &spec.settings else {
        return Err(Error::Config {
            provider: spec.name.clone(),
            detail: "not a vault provider".to_string(),
        });
    };
    Ok(Arc::new(
        VaultProvider::connect(&spec.name, settings, spec.limits.timeout).await?,
    ))
}

/// A connected Vault instance. Dropping it stops the token renewal.
pub struct VaultProvider {
    shared: Arc<Shared>,
    /// Cancels the renewal task when the provider is dropped.
    _renewal: Option<DropGuard>,
}

/// What the provider and its renewal task share.
struct Shared {
    /// Instance name, for errors and logs.
    name: String,
    /// The address as configured, for `check()`.
    address: String,
    /// The `vaultrs` client; written only to swap the token after a login.
    client: RwLock<VaultClient>,
    /// How to log in again.
    auth: crate::spec::VaultAuth,
    /// The token in use, registered with the redactor (forgotten when replaced or dropped).
    token: std::sync::Mutex<Option<SecretValue>>,
}

/// A raw answer: status, `Retry-After`, and the body (zeroed on drop: it may hold values).
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Zeroizing<Vec<u8>>,
}

impl VaultProvider {
    /// Builds the client from `settings` and logs in. `timeout` bounds every call.
    pub async fn connect(name: &str, settings: &VaultSettings, timeout: Duration) -> Result<VaultProvider> {
        let client = build_client(name, settings, timeout)?;
        let shared = Arc::new(Shared {
            name: name.to_string(),
            address: settings.address.clone(),
            client: RwLock::new(client),
            auth: settings.auth.clone(),
            token: std::sync::Mutex::new(None),
        });
        let lease = shared.login_at_connect().await?;
        let renewal = lease.map(|lease| {
            let cancel = CancellationToken::new();
            tokio::spawn(login::keep_alive(Arc::clone(&shared), lease, cancel.clone()));
            cancel.drop_guard()
        });
        Ok(VaultProvider {
            shared,
            _renewal: renewal,
        })
    }
}

fn build_client(name: &str, settings: &VaultSettings, timeout: Duration) -> Result<VaultClient> {
    let config = |detail: String| Error::Config {
        provider: name.to_string(),
        detail,
    };
    match url::Url::parse(&settings.address) {
        Ok(u) if (u.scheme() == "http" || u.scheme() == "https") && u.has_host() => {}
        _ => {
            return Err(config(format!(
                "address {:?} is not an http(s) URL; write it like https://vault.example.com:8200",
                settings.address
            )));
        }
    }
    let mut ca_certs = Vec::new();
    if let Some(ca) = &settings.ca_file {
        if let Err(e) = std::fs::metadata(ca) {
            return Err(config(format!("ca_file {}: {e}", ca.display())));
        }
        ca_certs.push(ca.display().to_string());
    }
    let token = match &settings.auth {
        crate::spec::VaultAuth::Token { token } => token.expose_str().to_string(),
        crate::spec::VaultAuth::AppRole { .. } => String::new(),
    };
    // Every setting is given explicitly so that none comes from VAULT_* variables.
    let mut builder = VaultClientSettingsBuilder::default();
    builder
        .address(&settings.address)
        .token(token)
        .ca_certs(ca_certs)
        .identity(None)
        .verify(true)
        .timeout(Some(timeout));
    if let Some(ns) = &settings.namespace {
        builder.set_namespace(ns.clone());
    }
    let client_settings = builder
        .build()
        .map_err(|e| config(format!("vault client settings: {e}")))?;
    VaultClient::new(client_settings)
        .map_err(|e| config(format!("vault client: {}", crate::error::chain(&e))))
}

impl Shared {
    /// Sends one `vaultrs` endpoint with the current token and returns the raw answer.
    async fn send<E: Endpoint>(&self, endpoint: E) -> Result<Answer> {
        let client = self.client.read().await;
        let request = endpoint
            .with_middleware(&client.middle)
            .request(client.http.base.as_str())
            .map_err(|e| Error::Protocol {
                provider: self.name.clone(),
                detail: format!("building the request: {}", crate::error::chain(&e)),
            })?;
        let response = client.http.send(request).await.map_err(|e| Error::Unavailable {
            provider: self.name.clone(),
            detail: crate::error::chain(&e),
        })?;
        let status = response.status().as_u16();
        let retry_after = crate::error::retry_after(
            response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok()),
        );
        Ok(Answer {
            status,
            retry_after,
            body: Zeroizing::new(response.into_body()),
        })
    }

    /// The error for a non-2xx answer about `reference`.
    fn answer_error(&self, reference: &Reference, answer: &Answer) -> Error {
        let errors = error_messages(&answer.body);
        match answer.status {
            403 => Error::Forbidden {
                provider: self.name.clone(),
                reference: reference.raw.clone(),
                detail: if errors.is_empty() {
                    "permission denied".to_string()
                } else {
                    errors
                },
            },
            404 => Error::NotFound {
                provider: self.name.clone(),
                reference: reference.raw.clone(),
            },
            status => self.status_error(status, answer.retry_after, &errors),
        }
    }

    /// The error for a status that does not depend on the reference (429, 5xx, others).
    fn status_error(&self, status: u16, retry_after: Option<Duration>, errors: &str) -> Error {
        match status {
            429 => Error::Throttled {
                provider: self.name.clone(),
                retry_after,
            },
            503 if errors.contains("Vault is sealed") => Error::Unavailable {
                provider: self.name.clone(),
                detail: "vault is sealed".to_string(),
            },
            500..=599 => Error::Unavailable {
                provider: self.name.clone(),
                detail: format!("HTTP {status}: {errors}"),
            },
            _ => Error::Protocol {
                provider: self.name.clone(),
                detail: format!("HTTP {status}: {errors}"),
            },
        }
    }

    /// Maps an error from one of `vaultrs`'s typed calls (login, lookup, renewal).
    /// `what` names the call; a 400/401/403 there means the credentials were rejected.
    fn client_error(&self, what: &str, e: ClientError) -> Error {
        match e {
            ClientError::APIError { code, errors } => {
                let errors = errors.join("; ");
                match code {
                    400 | 401 | 403 => Error::Auth {
                        provider: self.name.clone(),
                        detail: format!("{what}: HTTP {code}: {errors}"),
                    },
                    _ => self.status_error(code, None, &errors),
                }
            }
            ClientError::RestClientError { source } => match source {
                rustify::errors::ClientError::ServerResponseError { code, content } => self.status_error(
                    code,
                    None,
                    &error_messages(content.unwrap_or_default().as_bytes()),
                ),
                other => Error::Unavailable {
                    provider: self.name.clone(),
                    detail: format!("{what}: {}", crate::error::chain(&other)),
                },
            },
            other => Error::Protocol {
                provider: self.name.clone(),
                detail: format!("{what}: {}", crate::error::chain(&other)),
            },
        }
    }

    /// Makes `token` the one in use: the client sends it, the redactor knows it.
    async fn set_token(&self, token: SecretValue) {
        Redactor::global().register(&token);
        let text = std::str::from_utf8(token.expose())
            .unwrap_or_default()
            .to_string();
        let text = Zeroizing::new(text);
        vaultrs::client::Client::set_token(&mut *self.client.write().await, &text);
        let old = self
            .token
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .replace(token);
        if let Some(old) = old {
            Redactor::global().forget(&old);
        }
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(token) = self.token.lock().unwrap_or_else(|e| e.into_inner()).take() {
            Redactor::global().forget(&token);
        }
    }
}

#[async_trait]
impl Provider for VaultProvider {
    fn name(&self) -> &str {
        &self.shared.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Vault
    }

    async fn version(&self, reference: &Reference) -> Result<Version> {
        let mount = kv::mount(&self.shared.name, reference)?;
        let endpoint = ReadSecretMetadataRequest::builder()
            .mount(mount)
            .path(reference.object.as_str())
            .build()
            .map_err(|e| kv::bad_reference(&self.shared.name, reference, e.to_string()))?;
        let answer = self.shared.send(endpoint).await?;
        if !(200..300).contains(&answer.status) {
            return Err(self.shared.answer_error(reference, &answer));
        }
        kv::current_version(&self.shared.name, reference, &answer.body)
    }

    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue> {
        let mount = kv::mount(&self.shared.name, reference)?;
        let number: u64 = version.as_str().parse().map_err(|_| {
            kv::bad_reference(
                &self.shared.name,
                reference,
                format!("version {version:?} is not a KV v2 version number"),
            )
        })?;
        let endpoint = ReadSecretRequest::builder()
            .mount(mount)
            .path(reference.object.as_str())
            .version(Some(number))
            .build()
            .map_err(|e| kv::bad_reference(&self.shared.name, reference, e.to_string()))?;
        let answer = self.shared.send(endpoint).await?;
        // A deleted or destroyed version answers 404 with its metadata: that is "unusable
        // (deleted)", not "not found".
        if ((200..300).contains(&answer.status) || answer.status == 404)
            && let Some(result) = kv::version_data(&self.shared.name, reference, number, &answer.body)
        {
            return result;
        }
        Err(self.shared.answer_error(reference, &answer))
    }

    async fn check(&self) -> Result<CheckReport> {
        let shared = &self.shared;
        let endpoint = ReadHealthRequest::builder()
            .build()
            .map_err(|e| Error::Protocol {
                provider: shared.name.clone(),
                detail: e.to_string(),
            })?;
        let answer = shared.send(endpoint).await?;
        let health: Option<kv::Health> = serde_json::from_slice(&answer.body).ok();
        let state = match (answer.status, &health) {
            (_, Some(h)) if h.sealed => {
                return Err(Error::Unavailable {
                    provider: shared.name.clone(),
                    detail: "vault is sealed".to_string(),
                });
            }
            (501, _)
            | (
                _,
                Some(kv::Health {
                    initialized: false, ..
                }),
            ) => {
                return Err(Error::Unavailable {
                    provider: shared.name.clone(),
                    detail: "vault is not initialized".to_string(),
                });
            }
            (200, Some(_)) => "active",
            (429, Some(_)) => "standby",
            (472, Some(_)) => "disaster-recovery secondary",
            (473, Some(_)) => "performance standby",
            (status, _) => {
                let errors = error_messages(&answer.body);
                return Err(shared.status_error(
                    status,
                    answer.retry_after,
                    &format!("sys/health: {errors}"),
                ));
            }
        };
        let version = health.map(|h| h.version).unwrap_or_default();
        let lookup = {
            let client = shared.client.read().await;
            vaultrs::token::lookup_self(&*client).await
        }
        .map_err(|e| shared.client_error("token lookup", e))?;
        let ttl = if lookup.ttl == 0 {
            "no expiry".to_string()
        } else {
            format!("ttl {}s", lookup.ttl)
        };
        Ok(CheckReport {
            provider: shared.name.clone(),
            detail: format!(
                "vault {version} at {} ({state}); token accepted ({ttl}, policies: {})",
                shared.address,
                lookup.policies.join(", ")
            ),
        })
    }
}

/// The `errors` of a Vault error body, joined (empty when there are none).
fn error_messages(body: &[u8]) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        #[serde(default)]
        errors: Vec<String>,
    }
    serde_json::from_slice::<Body>(body)
        .map(|b| b.errors.join("; "))
        .unwrap_or_default()
}
