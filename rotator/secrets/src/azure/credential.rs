//! Tokens for Key Vault: the 401 bearer challenge, the credential kinds, and the cache.
//!
//! - Managed identity: the `managed_identity.endpoint` override if set (IMDS-shaped:
//!   `GET URL?api-version=2018-02-01&resource=R[&client_id=C]` with `Metadata: true`);
//!   else App Service's `IDENTITY_ENDPOINT` + `IDENTITY_HEADER` when both are set
//!   (`GET ...?api-version=2019-08-01&resource=R` with `X-IDENTITY-HEADER`); else IMDS at
//!   `http://169.254.169.254/metadata/identity/oauth2/token`.
//! - Client secret: `POST {authority_host}/{tenant}/oauth2/v2.0/token` with
//!   `grant_type=client_credentials&client_id&client_secret&scope=RESOURCE/.default`.
//! - Workload identity: the same endpoint with `client_assertion_type=urn:ietf:params:oauth:client-assertion-type:jwt-bearer`
//!   and `client_assertion=` the token file's contents, read at each request (the file
//!   is rotated by the platform).
//!
//! A token is reused until shortly before it expires: 5 minutes before, or half its
//! lifetime when that is shorter.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use reqwest::Url;
use serde::Deserialize;
use zeroize::Zeroizing;

use crate::error::{Error, Result};
use crate::redact::Redactor;
use crate::spec::{AzureAuth, AzureSettings, Credential};
use crate::value::SecretValue;

/// IMDS's token endpoint (Azure VMs, VM scale sets, AKS node identities).
const IMDS: &str = "http://169.254.169.254/metadata/identity/oauth2/token";

/// What a 401 challenge said.
#[derive(Clone, Debug)]
pub(super) struct Challenge {
    /// `https://vault.azure.net`: what managed identity asks a token for.
    pub(super) resource: String,
    /// `https://vault.azure.net/.default`: what the v2 token endpoint asks for.
    pub(super) scope: String,
    /// The tenant from `authorization="https://login.microsoftonline.com/TENANT"`.
    pub(super) tenant: Option<String>,
}

impl Challenge {
    /// Parses a `WWW-Authenticate: Bearer k="v", ...` header and checks that its resource
    /// belongs to `vault`.
    pub(super) fn parse(provider: &str, header: &str, vault: &Url) -> Result<Challenge> {
        let auth = |detail: String| Error::Auth {
            provider: provider.to_string(),
            detail,
        };
        let rest = header
            .trim()
            .strip_prefix("Bearer")
            .or_else(|| header.trim().strip_prefix("bearer"))
            .ok_or_else(|| {
                auth(format!(
                    "the vault's challenge is not a Bearer challenge: {header:?}"
                ))
            })?;
        let params = challenge_params(rest);
        let get = |k: &str| {
            params
                .iter()
                .find(|(key, _)| key.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.clone())
        };
        let resource = match (get("resource"), get("scope")) {
            (Some(r), _) => r,
            (None, Some(s)) => s.trim_end_matches("/.default").to_string(),
            (None, None) => {
                return Err(auth(format!(
                    "the vault's challenge names no resource or scope: {header:?}"
                )));
            }
        };
        let scope = get("scope").unwrap_or_else(|| format!("{}/.default", resource.trim_end_matches('/')));
        let resource_host = Url::parse(&resource)
            .ok()
            .and_then(|u| u.host_str().map(str::to_ascii_lowercase))
            .ok_or_else(|| auth(format!("the challenge's resource {resource:?} is not a URL")))?;
        let vault_host = vault.host_str().unwrap_or_default().to_ascii_lowercase();
        if vault_host != resource_host && !vault_host.ends_with(&format!(".{resource_host}")) {
            return Err(auth(format!(
                "the vault {vault_host} asked for a token for {resource}, which is not its domain; refusing (a vault's resource is its parent domain, like vault.azure.net)"
            )));
        }
        let tenant = get("authorization")
            .or_else(|| get("authorization_uri"))
            .and_then(|a| Url::parse(&a).ok())
            .and_then(|u| u.path_segments()?.find(|s| !s.is_empty()).map(str::to_string));
        Ok(Challenge {
            resource,
            scope,
            tenant,
        })
    }
}

/// `k="v", k2=v2` pairs.
fn challenge_params(text: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut chars = text.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace() || *c == ',') {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
        if key.trim().is_empty() {
            return out;
        }
        if chars.next() != Some('=') {
            continue;
        }
        let value = if chars.peek() == Some(&'"') {
            chars.next();
            let v: String = std::iter::from_fn(|| chars.next_if(|c| *c != '"')).collect();
            chars.next();
            v
        } else {
            std::iter::from_fn(|| chars.next_if(|c| *c != ','))
                .collect::<String>()
                .trim()
                .to_string()
        };
        out.push((key.trim().to_string(), value));
    }
}

/// Where tokens come from.
enum Kind {
    Imds {
        endpoint: Url,
        client_id: Option<String>,
    },
    AppService {
        endpoint: Url,
        header: Credential,
        client_id: Option<String>,
    },
    ClientSecret {
        token_url: Url,
        tenant: String,
        client_id: String,
        secret: Credential,
    },
    Workload {
        token_url: Url,
        tenant: String,
        client_id: String,
        token_file: PathBuf,
    },
}

struct Cached {
    token: SecretValue,
    resource: String,
    refresh_at: Instant,
}

/// One credential and its cached token.
pub(super) struct TokenSource {
    provider: String,
    kind: Kind,
    /// Held while a token is fetched, so concurrent calls share one token request.
    cache: tokio::sync::Mutex<Option<Cached>>,
}

impl TokenSource {
    pub(super) fn new(
        provider: &str,
        settings: &AzureSettings,
        env: &(dyn Fn(&str) -> Option<String> + Sync),
    ) -> Result<TokenSource> {
        let config = |detail: String| Error::Config {
            provider: provider.to_string(),
            detail,
        };
        let token_url = |tenant: &str| -> Result<Url> {
            if tenant.is_empty()
                || !tenant
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            {
                return Err(config(format!(
                    "tenant_id {tenant:?} is not a directory id (a GUID or a domain like contoso.onmicrosoft.com)"
                )));
            }
            let base = settings.authority_host.trim_end_matches('/');
            Url::parse(&format!("{base}/{tenant}/oauth2/v2.0/token"))
                .ok()
                .filter(|u| u.scheme() == "https")
                .ok_or_else(|| {
                    config(format!(
                        "authority_host {:?} is not an https URL (the default is https://login.microsoftonline.com)",
                        settings.authority_host
                    ))
                })
        };
        let kind = match &settings.auth {
            AzureAuth::ManagedIdentity { client_id, endpoint } => match endpoint {
                Some(endpoint) => Kind::Imds {
                    endpoint: Url::parse(endpoint)
                        .map_err(|e| config(format!("managed identity endpoint {endpoint:?}: {e}")))?,
                    client_id: client_id.clone(),
                },
                None => match (env("IDENTITY_ENDPOINT"), env("IDENTITY_HEADER")) {
                    (Some(endpoint), Some(header)) => Kind::AppService {
                        endpoint: Url::parse(&endpoint)
                            .map_err(|e| config(format!("IDENTITY_ENDPOINT {endpoint:?}: {e}")))?,
                        header: Credential::new(&header),
                        client_id: client_id.clone(),
                    },
                    _ => Kind::Imds {
                        endpoint: Url::parse(IMDS).map_err(|e| config(e.to_string()))?,
                        client_id: client_id.clone(),
                    },
                },
            },
            AzureAuth::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
            } => {
                Redactor::global().register(&client_secret.0);
                Kind::ClientSecret {
                    token_url: token_url(tenant_id)?,
                    tenant: tenant_id.clone(),
                    client_id: client_id.clone(),
                    secret: client_secret.clone(),
                }
            }
            AzureAuth::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => {
                if let Err(e) = std::fs::metadata(token_file) {
                    return Err(config(format!(
                        "workload identity token_file {}: {e}",
                        token_file.display()
                    )));
                }
                Kind::Workload {
                    token_url: token_url(tenant_id)?,
                    tenant: tenant_id.clone(),
                    client_id: client_id.clone(),
                    token_file: token_file.clone(),
                }
            }
        };
        Ok(TokenSource {
            provider: provider.to_string(),
            kind,
            cache: tokio::sync::Mutex::new(None),
        })
    }

    /// The credential kind, for `check()`.
    pub(super) fn kind(&self) -> &'static str {
        match self.kind {
            Kind::Imds { .. } => "managed identity (IMDS)",
            Kind::AppService { .. } => "managed identity (App Service)",
            Kind::ClientSecret { .. } => "client secret",
            Kind::Workload { .. } => "workload identity",
        }
    }

    /// Refuses a challenge from another tenant than the configured one (as the Azure SDKs
    /// do unless told otherwise). Managed identity has no tenant setting.
    pub(super) fn check_tenant(&self, challenge: &Challenge) -> Result<()> {
        let configured = match &self.kind {
            Kind::ClientSecret { tenant, .. } | Kind::Workload { tenant, .. } => tenant,
            _ => return Ok(()),
        };
        match &challenge.tenant {
            Some(t) if !t.eq_ignore_ascii_case(configured) => Err(Error::Auth {
                provider: self.provider.clone(),
                detail: format!(
                    "the vault belongs to tenant {t}, but tenant_id is {configured}; set tenant_id to {t}"
                ),
            }),
            _ => Ok(()),
        }
    }

    /// Drops the cached token (the vault rejected it, or asked anew).
    pub(super) async fn forget_cached(&self) {
        if let Some(old) = self.cache.lock().await.take() {
            Redactor::global().forget(&old.token);
        }
    }

    /// A token for the challenge's resource; `true` when it was just fetched.
    pub(super) async fn token(
        &self,
        http: &reqwest::Client,
        challenge: &Challenge,
    ) -> Result<(SecretValue, bool)> {
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.as_ref()
            && c.resource == challenge.resource
            && Instant::now() < c.refresh_at
        {
            return Ok((c.token.duplicate(), false));
        }
        let (token, lifetime) = self.request(http, challenge).await?;
        let margin = Duration::from_secs(300).min(lifetime / 2);
        Redactor::global().register(&token);
        let fresh = Cached {
            token: token.duplicate(),
            resource: challenge.resource.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(margin),
        };
        if let Some(old) = cache.replace(fresh) {
            Redactor::global().forget(&old.token);
        }
        tracing::debug!(provider = %self.provider, kind = self.kind(), lifetime_seconds = lifetime.as_secs(), "azure token acquired");
        Ok((token, true))
    }

    /// One token request.
    async fn request(
        &self,
        http: &reqwest::Client,
        challenge: &Challenge,
    ) -> Result<(SecretValue, Duration)> {
        let (url, request) = match &self.kind {
            Kind::Imds { endpoint, client_id } => {
                let mut url = endpoint.clone();
                url.query_pairs_mut()
                    .append_pair("api-version", "2018-02-01")
                    .append_pair("resource", &challenge.resource);
                if let Some(id) = client_id {
                    url.query_pairs_mut().append_pair("client_id", id);
                }
                (url.clone(), http.get(url).header("Metadata", "true"))
            }
            Kind::AppService {
                endpoint,
                header,
                client_id,
            } => {
                let mut url = endpoint.clone();
                url.query_pairs_mut()
                    .append_pair("api-version", "2019-08-01")
                    .append_pair("resource", &challenge.resource);
                if let Some(id) = client_id {
                    url.query_pairs_mut().append_pair("client_id", id);
                }
                (
                    url.clone(),
                    http.get(url).header("X-IDENTITY-HEADER", header.expose_str()),
                )
            }
            Kind::ClientSecret {
                token_url,
                client_id,
                secret,
                ..
            } => {
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    ("client_secret", secret.expose_str()),
                    ("scope", challenge.scope.as_str()),
                ];
                (token_url.clone(), http.post(token_url.clone()).form(&form))
            }
            Kind::Workload {
                token_url,
                client_id,
                token_file,
                ..
            } => {
                let assertion = std::fs::read_to_string(token_file).map_err(|e| Error::Config {
                    provider: self.provider.clone(),
                    detail: format!("workload identity token_file {}: {e}", token_file.display()),
                })?;
                let assertion = Zeroizing::new(assertion);
                let form = [
                    ("grant_type", "client_credentials"),
                    ("client_id", client_id.as_str()),
                    (
                        "client_assertion_type",
                        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                    ),
                    ("client_assertion", assertion.trim()),
                    ("scope", challenge.scope.as_str()),
                ];
                (token_url.clone(), http.post(token_url.clone()).form(&form))
            }
        };
        let endpoint = format!(
            "{}://{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.path()
        );
        let response = request.send().await.map_err(|e| Error::Unavailable {
            provider: self.provider.clone(),
            detail: format!("token endpoint {endpoint}: {}", crate::error::chain(&e)),
        })?;
        let status = response.status().as_u16();
        let retry_after = crate::error::retry_after(
            response
                .headers()
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok()),
        );
        let body = Zeroizing::new(response.bytes().await.unwrap_or_default().to_vec());
        if status != 200 {
            let reason = token_error(&body);
            return Err(match status {
                429 => Error::Throttled {
                    provider: self.provider.clone(),
                    retry_after,
                },
                500..=599 => Error::Unavailable {
                    provider: self.provider.clone(),
                    detail: format!("token endpoint {endpoint}: HTTP {status}: {reason}"),
                },
                _ => Error::Auth {
                    provider: self.provider.clone(),
                    detail: format!("{} rejected by {endpoint}: HTTP {status}: {reason}", self.kind()),
                },
            });
        }
        let answer: TokenAnswer = serde_json::from_slice(&body).map_err(|_| Error::Protocol {
            provider: self.provider.clone(),
            detail: format!("token endpoint {endpoint} answered without an access_token"),
        })?;
        let lifetime = answer.lifetime();
        let token = SecretValue::new(answer.access_token.into_bytes());
        if token.is_empty() {
            return Err(Error::Protocol {
                provider: self.provider.clone(),
                detail: format!("token endpoint {endpoint} answered an empty access_token"),
            });
        }
        Ok((token, lifetime))
    }
}

impl Drop for TokenSource {
    fn drop(&mut self) {
        if let Kind::ClientSecret { secret, .. } = &self.kind {
            Redactor::global().forget(&secret.0);
        }
        if let Some(cached) = self.cache.get_mut().take() {
            Redactor::global().forget(&cached.token);
        }
    }
}

/// Every token endpoint's answer (AAD v2: `expires_in` a number; IMDS: strings; App
/// Service: `expires_on` only).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    #[serde(default)]
    expires_on: Option<serde_json::Value>,
}

impl TokenAnswer {
    fn lifetime(&self) -> Duration {
        let number = |v: &serde_json::Value| match v {
            serde_json::Value::Number(n) => n.as_i64(),
            serde_json::Value::String(s) => s.trim().parse::<i64>().ok(),
            _ => None,
        };
        if let Some(secs) = self.expires_in.as_ref().and_then(number) {
            return Duration::from_secs(secs.max(0) as u64);
        }
        if let Some(at) = self.expires_on.as_ref().and_then(number) {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs() as i64)
                .unwrap_or_default();
            return Duration::from_secs((at - now).max(0) as u64);
        }
        // No expiry given: reuse it for five minutes at most.
        Duration::from_secs(300)
    }
}

/// `error: first line of error_description` (AAD, IMDS) or `message` (App Service).
fn token_error(body: &[u8]) -> String {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return format!("a {}-byte body that is not JSON", body.len());
    };
    let description = doc["error_description"]
        .as_str()
        .or_else(|| doc["message"].as_str())
        .unwrap_or_default()
        .lines()
        .next()
        .unwrap_or_default();
    match doc["error"].as_str() {
        Some(code) => format!("{code}: {description}"),
        None => description.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenge_forms() {
        let vault = Url::parse("https://myvault.vault.azure.net").unwrap();
        let c = Challenge::parse(
            "kv",
            r#"Bearer authorization="https://login.microsoftonline.com/72f988bf-86f1-41af-91ab-2d7cd011db47", resource="https://vault.azure.net""#,
            &vault,
        )
        .unwrap();
        assert_eq!(c.resource, "https://vault.azure.net");
        assert_eq!(c.scope, "https://vault.azure.net/.default");
        assert_eq!(c.tenant.as_deref(), Some("72f988bf-86f1-41af-91ab-2d7cd011db47"));
        let c = Challenge::parse(
            "kv",
            r#"Bearer authorization_uri="https://login.windows.net/t1", scope="https://vault.azure.net/.default""#,
            &vault,
        )
        .unwrap();
        assert_eq!(
            (c.resource.as_str(), c.tenant.as_deref()),
            ("https://vault.azure.net", Some("t1"))
        );
        let e = Challenge::parse("kv", r#"Bearer authorization="https://login.microsoftonline.com/t", resource="https://storage.azure.com""#, &vault)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not its domain"), "{e}");
        assert!(Challenge::parse("kv", "Basic realm=x", &vault).is_err());
    }

    #[test]
    fn token_lifetimes() {
        let t: TokenAnswer = serde_json::from_str(r#"{"access_token":"a","expires_in":3599}"#).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(3599));
        let t: TokenAnswer =
            serde_json::from_str(r#"{"access_token":"a","expires_in":"86399","expires_on":"1"}"#).unwrap();
        assert_eq!(t.lifetime(), Duration::from_secs(86399));
    }
}
