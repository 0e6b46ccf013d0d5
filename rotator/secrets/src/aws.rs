//! The `aws` provider: AWS Secrets Manager on `aws-sdk-secretsmanager`.
//!
//! Where to start reading: [`AwsProvider::connect_with`] builds one instance's own SDK
//! config (region, endpoint, profile, retries and timeouts from [`Limits`]) and its own
//! client; [`Provider::version`] is one `DescribeSecret` (the `AWSCURRENT` version id, never
//! the value), [`Provider::fetch`] one `GetSecretValue` of exactly that `VersionId`.
//! [`classify`] turns what AWS answered into this crate's [`Error`].
//!
//! Credentials always come from the SDK's default chain (environment, profile files, web
//! identity, ECS and EC2 instance roles): the host is the credential, the config holds no
//! key. Each instance loads its own chain with its own settings, so two instances (two
//! regions, two endpoints, two profiles) share no client and no config.
//!
//! Retries: the SDK's standard retry makes at most `limits.retry_attempts` attempts with
//! exponential backoff from `limits.retry_backoff`, within one deadline of
//! `limits.timeout`; what fails after that is returned to the watcher, whose part is to
//! back off across polls, not to retry the same call again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_config::{BehaviorVersion, ConfigLoader, Region, SdkConfig};
use aws_sdk_secretsmanager::Client;
use aws_sdk_secretsmanager::config::ProvideCredentials;
use aws_sdk_secretsmanager::config::retry::RetryConfig;
use aws_sdk_secretsmanager::config::timeout::TimeoutConfig;
use aws_sdk_secretsmanager::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::error::{Error, Result};
use crate::provider::{CheckReport, Provider, Version};
use crate::reference::Reference;
use crate::spec::{AwsSettings, Limits, ProviderKind, ProviderSettings, ProviderSpec};
use crate::value::{MAX_VALUE_LEN, SecretValue};

/// The staging label of a secret's current version.
pub const CURRENT_STAGE: &str = "AWSCURRENT";

/// Connects an `aws` provider instance with the default credential chain.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    Ok(Arc::new(AwsProvider::connect(spec).await?))
}

/// One AWS Secrets Manager instance (`providers.NAME.type: aws`): its own SDK config and
/// client.
pub struct AwsProvider {
    name: String,
    client: Client,
    sts: aws_sdk_sts::Client,
    /// The region in use (from the settings, or what the default chain found).
    region: String,
    /// The endpoint override, when there is one.
    endpoint_url: Option<String>,
}

impl AwsProvider {
    /// Connects with the SDK's default credential chain and `spec`'s settings. Loads the
    /// credentials once, so that a host with none fails here with the fix.
    pub async fn connect(spec: &ProviderSpec) -> Result<AwsProvider> {
        AwsProvider::connect_with(spec, |loader| loader).await
    }

    /// Like [`connect`](AwsProvider::connect), with a hook that adjusts the SDK's config
    /// loader after dso has applied `spec` and before it loads: embedders and tests use it
    /// for explicit credentials or profile files, so that nothing depends on the process
    /// environment.
    pub async fn connect_with(
        spec: &ProviderSpec,
        adjust: impl FnOnce(ConfigLoader) -> ConfigLoader,
    ) -> Result<AwsProvider> {
        let config_error = |detail: String| Error::Config {
            provider: spec.name.clone(),
            detail,
        };
        let ProviderSettings::Aws(settings) = &spec.settings else {
            return Err(config_error(format!("is a {} provider, not aws", spec.kind())));
        };
        check_settings(settings).map_err(config_error)?;
        refuse_sensitive_logging(std::env::var(LOG_SENSITIVE_BODIES).ok().as_deref())
            .map_err(config_error)?;
        let loader = adjust(loader_for(settings, &spec.limits));
        let sdk = loader.load().await;
        let Some(region) = sdk.region().map(Region::to_string) else {
            return Err(config_error(
                "no AWS region: set providers.NAME.region, AWS_REGION, or `region` in the profile"
                    .to_string(),
            ));
        };
        load_credentials(&spec.name, &sdk, spec.limits.timeout).await?;
        Ok(AwsProvider {
            name: spec.name.clone(),
            client: Client::new(&sdk),
            sts: aws_sdk_sts::Client::new(&sdk),
            region,
            endpoint_url: settings.endpoint_url.clone(),
        })
    }

    /// The region this instance talks to.
    pub fn region(&self) -> &str {
        &self.region
    }
}

/// The AWS SDK's switch that logs response bodies of sensitive operations (such as
/// `GetSecretValue`, i.e. secret values) at trace level.
pub const LOG_SENSITIVE_BODIES: &str = "LOG_SENSITIVE_BODIES";

/// Refuses to run when the SDK was told to log secret values (`LOG_SENSITIVE_BODIES=true`
/// in the environment, which the SDK reads at every call).
fn refuse_sensitive_logging(value: Option<&str>) -> std::result::Result<(), String> {
    match value {
        Some(v) if v.eq_ignore_ascii_case("true") => Err(format!(
            "{LOG_SENSITIVE_BODIES}={v} in the environment makes the AWS SDK log secret values at \
             trace level; unset it"
        )),
        _ => Ok(()),
    }
}

/// Checks what the SDK would only reject later or obscurely.
fn check_settings(settings: &AwsSettings) -> std::result::Result<(), String> {
    if let Some(region) = &settings.region {
        let ok = !region.is_empty()
            && region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !ok {
            return Err(format!(
                "region {region:?} is not an AWS region name (like us-east-1)"
            ));
        }
    }
    if let Some(url) = &settings.endpoint_url {
        let rest = url
            .strip_prefix("https://")
            .or_else(|| url.strip_prefix("http://"));
        if rest.is_none_or(|r| r.is_empty() || r.contains(char::is_whitespace)) {
            return Err(format!("endpoint_url {url:?} is not an http:// or https:// URL"));
        }
    }
    if settings.profile.as_deref() == Some("") {
        return Err("profile is empty: remove it to use the default chain".to_string());
    }
    Ok(())
}

/// The SDK config loader for one instance: settings, retries and deadlines from `limits`.
fn loader_for(settings: &AwsSettings, limits: &Limits) -> ConfigLoader {
    let attempts = limits.retry_attempts.max(1);
    let mut loader = aws_config::defaults(BehaviorVersion::latest())
        .retry_config(
            RetryConfig::standard()
                .with_max_attempts(attempts)
                .with_initial_backoff(limits.retry_backoff),
        )
        .timeout_config(timeouts(limits));
    if let Some(profile) = &settings.profile {
        loader = loader.profile_name(profile);
    }
    if let Some(region) = &settings.region {
        loader = loader.region(Region::new(region.clone()));
    }
    if let Some(url) = &settings.endpoint_url {
        loader = loader.endpoint_url(url);
    }
    loader
}

/// One deadline of `limits.timeout` for a whole call (every attempt and backoff), each
/// attempt at most its share of it (at least 1 s), connecting at most 3 s.
fn timeouts(limits: &Limits) -> TimeoutConfig {
    let attempts = limits.retry_attempts.max(1);
    let attempt = (limits.timeout / attempts)
        .max(Duration::from_secs(1))
        .min(limits.timeout);
    TimeoutConfig::builder()
        .operation_timeout(limits.timeout)
        .operation_attempt_timeout(attempt)
        .connect_timeout(limits.timeout.min(Duration::from_secs(3)))
        .build()
}

/// Asks the credential chain once, within `timeout`. The SDK caches what it returns.
async fn load_credentials(name: &str, sdk: &SdkConfig, timeout: Duration) -> Result<()> {
    let auth = |detail: String| Error::Auth {
        provider: name.to_string(),
        detail,
    };
    let Some(chain) = sdk.credentials_provider() else {
        return Err(auth("no credential provider configured".to_string()));
    };
    match tokio::time::timeout(timeout, chain.provide_credentials()).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(auth(format!(
            "no AWS credentials from the default chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, \
             the profile's credentials, web identity, or the instance role): {}",
            DisplayErrorContext(&e)
        ))),
        Err(_) => Err(Error::Unavailable {
            provider: name.to_string(),
            detail: format!("the default credential chain did not answer within {timeout:?}"),
        }),
    }
}

/// What one failed call looked like, stripped of SDK types: the input of [`classify`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Failure {
    /// AWS error code (`ResourceNotFoundException`), when the answer had one.
    pub code: Option<String>,
    /// AWS error message (never a value: AWS does not echo secret values in errors).
    pub message: Option<String>,
    /// HTTP status, when there was an answer.
    pub status: Option<u16>,
    /// The `Retry-After` header, when there was one.
    pub retry_after: Option<Duration>,
    /// No answer at all: connection refused, reset, DNS, TLS, or a deadline.
    pub transport: Option<String>,
}

impl Failure {
    /// Reads an SDK error of any operation.
    pub fn from_sdk<E, R>(err: &SdkError<E, R>) -> Failure
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
        R: std::fmt::Debug + 'static,
        SdkError<E, R>: std::error::Error,
    {
        let context = || DisplayErrorContext(err).to_string();
        match err {
            SdkError::TimeoutError(_) => Failure {
                transport: Some(format!("timed out: {}", context())),
                ..Failure::default()
            },
            SdkError::DispatchFailure(_) => Failure {
                transport: Some(context()),
                ..Failure::default()
            },
            SdkError::ConstructionFailure(_) => Failure {
                code: Some("dso:RequestNotBuilt".to_string()),
                message: Some(context()),
                ..Failure::default()
            },
            _ => Failure {
                code: err.code().map(str::to_string),
                message: err.message().map(str::to_string),
                status: None,
                retry_after: None,
                transport: None,
            },
        }
    }

    /// Adds what the raw HTTP answer says (status, `Retry-After`).
    fn with_response(
        mut self,
        response: Option<&aws_sdk_secretsmanager::config::http::HttpResponse>,
    ) -> Failure {
        if let Some(r) = response {
            self.status = Some(r.status().as_u16());
            self.retry_after = crate::error::retry_after(r.headers().get("retry-after"));
            // Only an error status: a 2xx body that failed to parse may hold a value.
            if self.code.is_none() && r.status().as_u16() >= 400 {
                // Not the protocol's JSON error, but an XML `<Error><Code>` (what moto
                // answers for IAM denials, and what some proxies in front of AWS send):
                // take its code and message rather than only the status.
                let body = r.body().bytes().map(String::from_utf8_lossy);
                if let Some(body) = body {
                    self.code = xml_element(&body, "Code");
                    self.message = self.message.or_else(|| xml_element(&body, "Message"));
                }
            }
        }
        self
    }
}

/// The text of the first `<tag>...</tag>` in `doc`, when there is one.
fn xml_element(doc: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let start = doc.find(&open)? + open.len();
    let len = doc[start..].find(&format!("</{tag}>"))?;
    let text = doc[start..start + len].trim();
    (!text.is_empty() && text.len() <= 1024).then(|| text.to_string())
}

/// Turns what AWS answered into an [`Error`] for provider `provider` and reference
/// `reference` (the secret id as written).
///
/// | AWS says | error |
/// |---|---|
/// | `ResourceNotFoundException`, 404 | `NotFound` |
/// | `AccessDeniedException`, `DecryptionFailure` | `Forbidden` |
/// | `UnrecognizedClientException`, `InvalidClientTokenId`, `InvalidSignatureException`, `ExpiredTokenException`, ... , other 401/403 | `Auth` |
/// | `ThrottlingException`, `TooManyRequestsException`, `RequestLimitExceeded`, 429 | `Throttled` (with `Retry-After`) |
/// | `InternalServiceError`, `InternalFailure`, `ServiceUnavailable`, 5xx, no answer | `Unavailable` |
/// | `InvalidRequestException` "marked for deletion" | `Unusable` (scheduled for deletion) |
/// | `InvalidParameterException` | `InvalidReference` |
/// | anything else | `Protocol` with code and message |
pub fn classify(provider: &str, reference: &str, failure: &Failure) -> Error {
    let provider = provider.to_string();
    let reference = reference.to_string();
    let message = failure.message.clone().unwrap_or_default();
    let code = failure.code.as_deref().unwrap_or("");
    let described = || match (&failure.code, &failure.status) {
        (Some(c), _) if message.is_empty() => c.clone(),
        (Some(c), _) => format!("{c}: {message}"),
        (None, Some(s)) => format!("HTTP {s}"),
        (None, None) => "no error code".to_string(),
    };
    if let Some(transport) = &failure.transport {
        return Error::Unavailable {
            provider,
            detail: transport.clone(),
        };
    }
    match code {
        "ResourceNotFoundException" => return Error::NotFound { provider, reference },
        "AccessDeniedException" | "AccessDenied" => {
            return Error::Forbidden {
                provider,
                reference,
                detail: described(),
            };
        }
        "DecryptionFailure" => {
            return Error::Forbidden {
                provider,
                reference,
                detail: format!(
                    "{}; the credentials need kms:Decrypt on the secret's KMS key",
                    described()
                ),
            };
        }
        "UnrecognizedClientException"
        | "InvalidClientTokenId"
        | "InvalidSignatureException"
        | "SignatureDoesNotMatch"
        | "IncompleteSignature"
        | "MissingAuthenticationToken"
        | "InvalidAccessKeyId"
        | "ExpiredTokenException"
        | "ExpiredToken"
        | "RequestExpired" => {
            return Error::Auth {
                provider,
                detail: described(),
            };
        }
        "ThrottlingException" | "Throttling" | "TooManyRequestsException" | "RequestLimitExceeded" => {
            return Error::Throttled {
                provider,
                retry_after: failure.retry_after,
            };
        }
        "InternalServiceError" | "InternalFailure" | "ServiceUnavailable" | "ServiceUnavailableException" => {
            return Error::Unavailable {
                provider,
                detail: described(),
            };
        }
        "InvalidRequestException" if message.contains("deletion") || message.contains("deleted") => {
            return Error::Unusable {
                provider,
                reference,
                reason: format!(
                    "the secret is scheduled for deletion ({}); restore it with \
                     `aws secretsmanager restore-secret` or point the mapping at another secret",
                    described()
                ),
            };
        }
        "InvalidParameterException" => {
            return Error::InvalidReference {
                provider,
                reference,
                reason: format!("AWS refused the secret id: {}", described()),
            };
        }
        _ => {}
    }
    match failure.status {
        Some(429) => Error::Throttled {
            provider,
            retry_after: failure.retry_after,
        },
        Some(s) if s >= 500 => Error::Unavailable {
            provider,
            detail: described(),
        },
        Some(401 | 403) => Error::Auth {
            provider,
            detail: described(),
        },
        Some(404) => Error::NotFound { provider, reference },
        _ => Error::Protocol {
            provider,
            detail: described(),
        },
    }
}

impl AwsProvider {
    fn error<E>(
        &self,
        reference: &str,
        err: &SdkError<E, aws_sdk_secretsmanager::config::http::HttpResponse>,
    ) -> Error
    where
        E: ProvideErrorMetadata + std::error::Error + 'static,
    {
        let failure = Failure::from_sdk(err).with_response(err.raw_response());
        classify(&self.name, reference, &failure)
    }

    fn unusable(&self, reference: &Reference, reason: String) -> Error {
        Error::Unusable {
            provider: self.name.clone(),
            reference: reference.raw.clone(),
            reason,
        }
    }

    fn protocol(&self, detail: String) -> Error {
        Error::Protocol {
            provider: self.name.clone(),
            detail,
        }
    }
}

#[async_trait]
impl Provider for AwsProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Aws
    }

    fn retries_internally(&self) -> bool {
        true
    }

    /// One `DescribeSecret`: the version id staged `AWSCURRENT`. Never reads the value.
    async fn version(&self, reference: &Reference) -> Result<Version> {
        let out = self
            .client
            .describe_secret()
            .secret_id(&reference.object)
            .send()
            .await
            .map_err(|e| self.error(&reference.raw, &e))?;
        if let Some(deleted) = out.deleted_date() {
            return Err(self.unusable(
                reference,
                format!(
                    "the secret is scheduled for deletion (DeletedDate {deleted}); restore it with \
                     `aws secretsmanager restore-secret --secret-id {}` or point the mapping at another secret",
                    reference.object
                ),
            ));
        }
        let current = out
            .version_ids_to_stages()
            .into_iter()
            .flatten()
            .filter(|(_, stages)| stages.iter().any(|s| s == CURRENT_STAGE))
            .map(|(id, _)| id.clone())
            .min();
        match current {
            Some(id) => {
                tracing::debug!(provider = %self.name, secret = %reference.object, version = %id, "aws: DescribeSecret");
                Ok(Version::new(id))
            }
            None => Err(self.unusable(
                reference,
                format!("the secret has no version staged {CURRENT_STAGE} (no value was ever stored)"),
            )),
        }
    }

    /// One `GetSecretValue` with `VersionId` = `version`: `SecretString` or `SecretBinary`
    /// as bytes.
    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue> {
        let out = self
            .client
            .get_secret_value()
            .secret_id(&reference.object)
            .version_id(version.as_str())
            .send()
            .await
            .map_err(|e| self.error(&reference.raw, &e))?;
        if let Some(got) = out.version_id()
            && got != version.as_str()
        {
            return Err(self.protocol(format!(
                "GetSecretValue of {:?} version {version} answered version {got}",
                reference.raw
            )));
        }
        tracing::debug!(provider = %self.name, secret = %reference.object, version = %version, "aws: GetSecretValue");
        let mut out = out;
        let value = if let Some(s) = out.secret_string.take() {
            SecretValue::new(s.into_bytes())
        } else if let Some(b) = out.secret_binary.take() {
            SecretValue::new(b.into_inner())
        } else {
            return Err(self.unusable(
                reference,
                format!("version {version} has neither SecretString nor SecretBinary"),
            ));
        };
        if value.len() > MAX_VALUE_LEN {
            return Err(self.unusable(
                reference,
                format!(
                    "the value is {} bytes, more than dso's limit of {MAX_VALUE_LEN}",
                    value.len()
                ),
            ));
        }
        Ok(value)
    }

    /// `sts:GetCallerIdentity` for the identity (needs no permission; reported as unknown,
    /// never an error, when STS fails, e.g. behind a Secrets Manager-only VPC endpoint), then a
    /// `DescribeSecret` of a name that does not exist: `ResourceNotFoundException` (or
    /// `AccessDeniedException`, when the policy names only the secrets dso reads) proves
    /// the endpoint answers and accepts the signature, without reading any secret.
    async fn check(&self) -> Result<CheckReport> {
        let identity = match self.sts.get_caller_identity().send().await {
            Ok(id) => id.arn().unwrap_or("(no ARN)").to_string(),
            // Never fatal: behind a Secrets Manager-only endpoint STS may not answer (or
            // answer 403 for the wrong service); the probe below judges the credentials.
            Err(e) => {
                let failure = Failure::from_sdk(&e).with_response(e.raw_response());
                let why = classify(&self.name, "(check)", &failure);
                format!("unknown (sts:GetCallerIdentity: {why})")
            }
        };
        let probe = "dso-check/does-not-exist";
        let authorized = match self.client.describe_secret().secret_id(probe).send().await {
            Ok(_) => "DescribeSecret answered",
            Err(e) => match self.error(probe, &e) {
                Error::NotFound { .. } => "DescribeSecret answered (probe secret not found, as expected)",
                Error::Forbidden { .. } => {
                    "DescribeSecret answered AccessDenied for a probe name (the policy is scoped to named secrets)"
                }
                other => return Err(other),
            },
        };
        let endpoint = self
            .endpoint_url
            .as_deref()
            .map_or_else(|| "the AWS endpoint".to_string(), |u| format!("endpoint {u}"));
        Ok(CheckReport {
            provider: self.name.clone(),
            detail: format!(
                "AWS Secrets Manager in region {} via {endpoint}; identity {identity}; {authorized}",
                self.region
            ),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(code: &str, status: u16) -> Failure {
        Failure {
            code: Some(code.to_string()),
            message: Some("m".to_string()),
            status: Some(status),
            ..Failure::default()
        }
    }

    #[test]
    fn classification() {
        let c = |f: &Failure| classify("p", "db", f);
        assert!(matches!(
            c(&failure("ResourceNotFoundException", 400)),
            Error::NotFound { .. }
        ));
        assert!(matches!(
            c(&failure("AccessDeniedException", 400)),
            Error::Forbidden { .. }
        ));
        assert!(matches!(
            c(&failure("UnrecognizedClientException", 400)),
            Error::Auth { .. }
        ));
        assert!(matches!(
            c(&failure("ExpiredTokenException", 400)),
            Error::Auth { .. }
        ));
        let mut t = failure("ThrottlingException", 400);
        t.retry_after = Some(Duration::from_secs(7));
        let e = c(&t);
        assert!(e.is_transient());
        assert_eq!(e.retry_after(), Some(Duration::from_secs(7)));
        assert!(matches!(
            c(&Failure {
                status: Some(429),
                ..Failure::default()
            }),
            Error::Throttled {
                retry_after: None,
                ..
            }
        ));
        assert!(matches!(
            c(&failure("InternalServiceError", 500)),
            Error::Unavailable { .. }
        ));
        assert!(matches!(
            c(&Failure {
                status: Some(503),
                ..Failure::default()
            }),
            Error::Unavailable { .. }
        ));
        assert!(matches!(
            c(&Failure {
                transport: Some("connection refused".into()),
                ..Failure::default()
            }),
            Error::Unavailable { .. }
        ));
        let mut d = failure("InvalidRequestException", 400);
        d.message =
            Some("You can't perform this operation on the secret because it was marked for deletion.".into());
        assert!(matches!(c(&d), Error::Unusable { .. }));
        assert!(matches!(
            c(&Failure {
                status: Some(403),
                ..Failure::default()
            }),
            Error::Auth { .. }
        ));
        assert!(matches!(c(&failure("SomethingNew", 400)), Error::Protocol { .. }));
    }

    #[test]
    fn settings_are_checked() {
        let s = |region: Option<&str>, url: Option<&str>| AwsSettings {
            region: region.map(str::to_string),
            endpoint_url: url.map(str::to_string),
            profile: None,
            auth: Default::default(),
        };
        assert!(check_settings(&s(Some("eu-west-1"), Some("http://127.0.0.1:5000"))).is_ok());
        assert!(
            check_settings(&s(Some("EU West"), None))
                .unwrap_err()
                .contains("region")
        );
        assert!(
            check_settings(&s(None, Some("127.0.0.1:5000")))
                .unwrap_err()
                .contains("endpoint_url")
        );
    }

    #[test]
    fn sdk_body_logging_is_refused() {
        assert!(refuse_sensitive_logging(None).is_ok());
        assert!(refuse_sensitive_logging(Some("false")).is_ok());
        let e = refuse_sensitive_logging(Some("TRUE")).unwrap_err();
        assert!(e.contains("LOG_SENSITIVE_BODIES") && e.contains("unset"), "{e}");
    }

    #[test]
    fn deadlines_from_limits() {
        let limits = Limits {
            retry_attempts: 4,
            timeout: Duration::from_secs(8),
            ..Limits::default()
        };
        let t = timeouts(&limits);
        assert_eq!(t.operation_timeout(), Some(Duration::from_secs(8)));
        assert_eq!(t.operation_attempt_timeout(), Some(Duration::from_secs(2)));
        assert_eq!(t.connect_timeout(), Some(Duration::from_secs(3)));
    }
}
