//! The `azure` provider: Azure Key Vault secrets over its REST API (api-version 7.4).
//!
//! Plain `reqwest`, no Azure SDK: the official Rust SDK (`azure_security_keyvault_secrets`,
//! `azure_identity`) is pre-1.0, changes its API between releases and brings a large
//! dependency tree, while dso needs four HTTP calls and three token requests.
//!
//! Calls:
//! - [`Provider::version`]: `GET {vault}/secrets/{name}/versions?api-version=7.4`, following
//!   `nextLink` (one call per page of 25 versions); metadata only. The token is the id of
//!   the newest **enabled** version (latest `attributes.created`, then `updated`).
//! - [`Provider::fetch`]: `GET {vault}/secrets/{name}/{version}?api-version=7.4`: its `value`.
//! - [`Provider::check`]: `GET {vault}/secrets?api-version=7.4&maxresults=1`.
//!
//! Authentication (module `credential`) follows the Azure SDKs' challenge policy: the first
//! request goes without a token, the vault answers 401 with `WWW-Authenticate: Bearer
//! authorization="https://login.microsoftonline.com/TENANT", resource="https://vault.azure.net"`,
//! and the token is asked for that resource (scope `RESOURCE/.default`). The resource must
//! be the vault's host or a parent domain of it (so a rogue endpoint cannot obtain a token
//! for another service), and the challenge's tenant must be the configured one. Tokens are
//! cached until shortly before they expire.
//!
//! Invariant: no token, client secret or value is logged or put into an error; tokens and
//! the client secret are registered with [`crate::Redactor::global`].

mod credential;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use reqwest::Url;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::provider::{CheckReport, Provider, Version};
use crate::reference::Reference;
use crate::spec::{AzureSettings, ProviderKind, ProviderSettings, ProviderSpec};
use crate::value::SecretValue;

use credential::{Challenge, TokenSource};

/// The Key Vault REST API version used.
pub const API_VERSION: &str = "7.4";

/// Most pages of versions followed for one `version()` (25 versions a page).
const MAX_PAGES: usize = 400;

/// Connects an `azure` provider instance. Nothing is sent yet: the first call learns the
/// challenge and gets a token. Reads `IDENTITY_ENDPOINT` / `IDENTITY_HEADER` (App Service
/// managed identity) from the process environment.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    connect_with_env(spec, &|name| std::env::var(name).ok()).await
}

/// [`connect`], reading the managed-identity environment through `env` instead of the
/// process environment.
pub async fn connect_with_env(
    spec: &ProviderSpec,
    env: &(dyn Fn(&str) -> Option<String> + Sync),
) -> Result<Arc<dyn Provider>> {
    let ProviderSettings::Azure(settings) = &spec.settings else {
        return Err(Error::Config {
            provider: spec.name.clone(),
            detail: "not an azure provider".to_string(),
        });
    };
    Ok(Arc::new(AzureProvider::new(
        &spec.name,
        settings,
        spec.limits.timeout,
        env,
    )?))
}

/// A connected Key Vault.
pub struct AzureProvider {
    name: String,
    /// `https://NAME.vault.azure.net`, without a trailing slash.
    vault: Url,
    http: reqwest::Client,
    tokens: TokenSource,
    /// Learned from the first 401.
    challenge: std::sync::Mutex<Option<Challenge>>,
}

/// A raw answer; the body is zeroed on drop (it may hold a value).
struct Answer {
    status: u16,
    retry_after: Option<Duration>,
    body: Zeroizing<Vec<u8>>,
}

impl AzureProvider {
    fn new(
        name: &str,
        settings: &AzureSettings,
        timeout: Duration,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<AzureProvider> {
        let config = |detail: String| Error::Config {
            provider: name.to_string(),
            detail,
        };
        let vault = Url::parse(settings.vault_url.trim_end_matches('/'))
            .ok()
            .filter(|u| u.scheme() == "https" && u.host_str().is_some())
            .ok_or_else(|| {
                config(format!(
                    "vault_url {:?} is not an https URL; write it like https://NAME.vault.azure.net",
                    settings.vault_url
                ))
            })?;
        let mut builder = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .redirect(reqwest::redirect::Policy::none())
            .user_agent(concat!("dso/", env!("CARGO_PKG_VERSION")));
        if let Some(ca) = &settings.ca_file {
            let pem = std::fs::read(ca).map_err(|e| config(format!("ca_file {}: {e}", ca.display())))?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| config(format!("ca_file {}: {e}", ca.display())))?;
            if certs.is_empty() {
                return Err(config(format!(
                    "ca_file {} holds no PEM certificate",
                    ca.display()
                )));
            }
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let http = builder
            .build()
            .map_err(|e| config(format!("https client: {e}")))?;
        let tokens = TokenSource::new(name, settings, env)?;
        Ok(AzureProvider {
            name: name.to_string(),
            vault,
            http,
            tokens,
            challenge: std::sync::Mutex::new(None),
        })
    }

    fn url(&self, path: &str) -> Url {
        let mut url = self.vault.clone();
        url.set_path(path);
        url.query_pairs_mut().append_pair("api-version", API_VERSION);
        url
    }

    /// GET `url` with the challenge protocol: no token until the vault asked for one;
    /// a 401 on a cached token gets one fresh token and one retry.
    async fn get(&self, url: &Url) -> Result<Answer> {
        let mut fresh_token = false;
        for _ in 0..3 {
            let challenge = self.challenge.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let mut request = self.http.get(url.clone());
            let had_token = challenge.is_some();
            if let Some(challenge) = &challenge {
                let (token, fresh) = self.tokens.token(&self.http, challenge).await?;
                fresh_token = fresh;
                let header = Zeroizing::new(format!(
                    "Bearer {}",
                    std::str::from_utf8(token.expose()).unwrap_or_default()
                ));
                request = request.header(reqwest::header::AUTHORIZATION, header.as_str());
            }
            let response = request.send().await.map_err(|e| self.transport_error(&e))?;
            let status = response.status().as_u16();
            if status == 401 {
                let header = response
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string);
                let body = response.bytes().await.unwrap_or_default();
                let reason = vault_error(&body);
                if had_token && fresh_token {
                    return Err(Error::Auth {
                        provider: self.name.clone(),
                        detail: format!("the vault rejected a new token: {reason}"),
                    });
                }
                let Some(header) = header else {
                    return Err(Error::Auth {
                        provider: self.name.clone(),
                        detail: format!("401 without a WWW-Authenticate challenge: {reason}"),
                    });
                };
                let learned = Challenge::parse(&self.name, &header, &self.vault)?;
                self.tokens.check_tenant(&learned)?;
                self.tokens.forget_cached().await;
                *self.challenge.lock().unwrap_or_else(|e| e.into_inner()) = Some(learned);
                continue;
            }
            let retry_after = crate::error::retry_after(
                response
                    .headers()
                    .get(reqwest::header::RETRY_AFTER)
                    .and_then(|v| v.to_str().ok()),
            );
            let body = response.bytes().await.map_err(|e| self.transport_error(&e))?;
            return Ok(Answer {
                status,
                retry_after,
                body: Zeroizing::new(body.to_vec()),
            });
        }
        Err(Error::Auth {
            provider: self.name.clone(),
            detail: "the vault kept answering 401".to_string(),
        })
    }

    fn transport_error(&self, e: &reqwest::Error) -> Error {
        Error::Unavailable {
            provider: self.name.clone(),
            detail: crate::error::chain(e),
        }
    }

    /// The error for a non-2xx answer about `reference` (401 is handled by [`get`]).
    fn answer_error(&self, reference: &str, answer: &Answer) -> Error {
        let reason = vault_error(&answer.body);
        match answer.status {
            403 => Error::Forbidden {
                provider: self.name.clone(),
                reference: reference.to_string(),
                detail: reason,
            },
            404 => Error::NotFound {
                provider: self.name.clone(),
                reference: reference.to_string(),
            },
            429 => Error::Throttled {
                provider: self.name.clone(),
                retry_after: answer.retry_after,
            },
            status @ 500..=599 => Error::Unavailable {
                provider: self.name.clone(),
                detail: format!("HTTP {status}: {reason}"),
            },
            status => Error::Protocol {
                provider: self.name.clone(),
                detail: format!("HTTP {status} for {reference:?}: {reason}"),
            },
        }
    }

    fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            provider: self.name.clone(),
            detail,
        }
    }

    /// Whether `link` (a `nextLink`) points into this vault: the bearer token goes nowhere else.
    fn same_origin(&self, link: &Url) -> bool {
        link.scheme() == self.vault.scheme()
            && link.host_str() == self.vault.host_str()
            && link.port_or_known_default() == self.vault.port_or_known_default()
    }
}

/// One item of a versions page.
#[derive(Deserialize)]
struct VersionItem {
    id: String,
    #[serde(default)]
    attributes: Attributes,
}

#[derive(Deserialize, Default)]
struct Attributes {
    #[serde(default)]
    enabled: Option<bool>,
    #[serde(default)]
    created: Option<i64>,
    #[serde(default)]
    updated: Option<i64>,
}

#[derive(Deserialize)]
struct VersionsPage {
    #[serde(default)]
    value: Vec<VersionItem>,
    #[serde(default, rename = "nextLink")]
    next_link: Option<String>,
}

/// `GET secrets/{name}/{version}`.
#[derive(Deserialize)]
struct SecretBundle {
    value: Option<String>,
    #[serde(default)]
    id: String,
}

#[async_trait]
impl Provider for AzureProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Azure
    }

    async fn version(&self, reference: &Reference) -> Result<Version> {
        let mut url = self.url(&format!("/secrets/{}/versions", reference.object));
        // (created, updated, version id) of the newest enabled version so far.
        let mut newest: Option<(i64, i64, String)> = None;
        let mut seen = 0usize;
        for _ in 0..MAX_PAGES {
            let answer = self.get(&url).await?;
            if answer.status != 200 {
                return Err(self.answer_error(&reference.raw, &answer));
            }
            let page: VersionsPage = serde_json::from_slice(&answer.body)
                .map_err(|e| self.protocol(format!("versions of {:?}: {e}", reference.raw)))?;
            for item in page.value {
                seen += 1;
                if item.attributes.enabled != Some(true) {
                    continue;
                }
                let Some(id) = item.id.rsplit('/').next().filter(|v| !v.is_empty()) else {
                    continue;
                };
                let key = (
                    item.attributes.created.unwrap_or(0),
                    item.attributes.updated.unwrap_or(0),
                    id.to_string(),
                );
                if newest.as_ref().is_none_or(|n| key > *n) {
                    newest = Some(key);
                }
            }
            match page.next_link.filter(|l| !l.is_empty()) {
                None => {
                    return match newest {
                        Some((_, _, id)) => Ok(Version::new(id)),
                        None => Err(Error::Unusable {
                            provider: self.name.clone(),
                            reference: reference.raw.clone(),
                            reason: format!("none of its {seen} versions is enabled"),
                        }),
                    };
                }
                Some(link) => {
                    let next = Url::parse(&link)
                        .map_err(|e| self.protocol(format!("nextLink of {:?}: {e}", reference.raw)))?;
                    if !self.same_origin(&next) {
                        return Err(self.protocol(format!(
                            "nextLink of {:?} points outside the vault ({})",
                            reference.raw,
                            next.host_str().unwrap_or_default()
                        )));
                    }
                    url = next;
                }
            }
        }
        Err(self.protocol(format!(
            "versions of {:?}: more than {MAX_PAGES} pages",
            reference.raw
        )))
    }

    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue> {
        let id = version.as_str();
        if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Err(Error::InvalidReference {
                provider: self.name.clone(),
                reference: reference.raw.clone(),
                reason: format!("{id:?} is not a Key Vault version id"),
            });
        }
        let url = self.url(&format!("/secrets/{}/{id}", reference.object));
        let answer = self.get(&url).await?;
        if answer.status == 403 && inner_code(&answer.body).as_deref() == Some("SecretDisabled") {
            return Err(Error::Unusable {
                provider: self.name.clone(),
                reference: reference.raw.clone(),
                reason: format!("version {id} is disabled"),
            });
        }
        if answer.status != 200 {
            return Err(self.answer_error(&reference.raw, &answer));
        }
        let bundle: SecretBundle = serde_json::from_slice(&answer.body).map_err(|_| {
            self.protocol(format!(
                "the answer for {:?} is not a secret bundle",
                reference.raw
            ))
        })?;
        if !bundle.id.is_empty() && bundle.id.rsplit('/').next() != Some(id) {
            return Err(self.protocol(format!(
                "asked {:?} for version {id}, got another version",
                reference.raw
            )));
        }
        match bundle.value {
            Some(value) => Ok(SecretValue::new(value.into_bytes())),
            None => Err(Error::Unusable {
                provider: self.name.clone(),
                reference: reference.raw.clone(),
                reason: format!("version {id} has no value"),
            }),
        }
    }

    async fn check(&self) -> Result<CheckReport> {
        let mut url = self.url("/secrets");
        url.query_pairs_mut().append_pair("maxresults", "1");
        let answer = self.get(&url).await?;
        if answer.status != 200 {
            return Err(self.answer_error("(list secrets)", &answer));
        }
        let challenge = self.challenge.lock().unwrap_or_else(|e| e.into_inner()).clone();
        Ok(CheckReport {
            provider: self.name.clone(),
            detail: format!(
                "key vault {} (api-version {API_VERSION}) accepted a {} token for {}",
                self.vault.as_str().trim_end_matches('/'),
                self.tokens.kind(),
                challenge.map(|c| c.resource).unwrap_or_default()
            ),
        })
    }
}

/// `code: message` from Key Vault's error envelope (or the body's length when it is not one).
fn vault_error(body: &[u8]) -> String {
    #[derive(Deserialize)]
    struct Envelope {
        error: Inner,
    }
    #[derive(Deserialize)]
    struct Inner {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(e) => format!("{}: {}", e.error.code, e.error.message),
        Err(_) if body.is_empty() => "empty body".to_string(),
        Err(_) => format!("a {}-byte body that is not a Key Vault error", body.len()),
    }
}

/// `error.innererror.code` of Key Vault's error envelope.
fn inner_code(body: &[u8]) -> Option<String> {
    let doc: serde_json::Value = serde_json::from_slice(body).ok()?;
    doc["error"]["innererror"]["code"].as_str().map(str::to_string)
}
