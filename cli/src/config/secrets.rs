//! Stage two for the secret side: `providers:`, `secrets:`, `defaults:`, `agent.watch`,
//! `agent.rotation` and `logging:` become [`SecretsConfig`] (the types of
//! `dso_secrets::config` and `dso_secrets::spec`), with every default applied and every
//! rule that serde cannot express checked here. Every error names the key and its line.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::time::Duration;

use dso_secrets::config::{
    AgentRotation, EnvMode, InjectSpec, Mode, RotationSpec, SecretSpec, SecretsConfig, Strategy, Targets,
    WatchSettings,
};
use dso_secrets::spec::{
    AwsAuth, AwsSettings, AzureAuth, AzureSettings, Credential, Limits, LocalSettings, PluginSettings,
    ProviderSettings, ProviderSpec, VaultAuth, VaultSettings,
};
use dso_secrets::{ProviderKind, Reference};

use super::ConfigError;
use super::file::{
    AgentRotationSection, AuthEntry, DefaultsSection, EnvModeWord, FileConfig, InjectEntry, InjectType,
    LevelWord, ModeWord, ProviderEntry, ProviderType, RotationEntry, SecretEntry, StrategyWord, WatchSection,
};
use super::lines::Lines;

/// `logging:`, checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LoggingConfig {
    /// `logging.level`, when the file sets one.
    pub level: Option<&'static str>,
}

impl LoggingConfig {
    /// The tracing filter to use when `RUST_LOG` is unset: the file's level, else `info`.
    /// `RUST_LOG`, when set, wins whole (it can name per-module levels the file cannot).
    pub fn default_filter(&self) -> &'static str {
        self.level.unwrap_or("info")
    }
}

/// What the secret side needs from its surroundings.
pub struct Ctx<'a> {
    /// Key lines.
    pub lines: &'a Lines<'a>,
    /// `$HOME`, for `~` in paths.
    pub home: Option<String>,
}

impl Ctx<'_> {
    fn bad(&self, key: &str, message: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.to_owned(),
            line: self.lines.line(key),
            message: message.into(),
        }
    }

    /// A path, with a leading `~` expanded from `$HOME`.
    fn path(&self, key: &str, raw: &str) -> Result<PathBuf, ConfigError> {
        let raw = raw.trim();
        if raw.is_empty() {
            return Err(self.bad(key, "empty path"));
        }
        if raw == "~" || raw.starts_with("~/") {
            let Some(home) = self.home.as_deref().filter(|h| !h.is_empty()) else {
                return Err(self.bad(
                    key,
                    format!("{raw:?} starts with ~ but HOME is not set; write the full path"),
                ));
            };
            return Ok(PathBuf::from(format!("{home}{}", &raw[1..])));
        }
        if raw.starts_with('~') {
            return Err(self.bad(
                key,
                format!("{raw:?}: only ~/ (your own home) is expanded; write the full path"),
            ));
        }
        Ok(PathBuf::from(raw))
    }

    fn duration(
        &self,
        key: &str,
        d: Duration,
        min: Duration,
        max: Duration,
    ) -> Result<Duration, ConfigError> {
        if d < min || d > max {
            return Err(self.bad(
                key,
                format!(
                    "{} is out of range; expected {} to {}",
                    crate::duration::format(d),
                    crate::duration::format(min),
                    crate::duration::format(max)
                ),
            ));
        }
        Ok(d)
    }
}

/// Converts the secret side of a parsed file.
pub fn check(raw: &mut FileConfig, ctx: &Ctx<'_>) -> Result<(SecretsConfig, LoggingConfig), ConfigError> {
    let mode = match raw.mode {
        Some(ModeWord::Local) => Mode::Local,
        Some(ModeWord::Agent) | None => Mode::Agent,
    };
    let watch = watch(ctx, raw.agent.as_ref().and_then(|a| a.watch.as_ref()))?;
    let agent_rotation = agent_rotation(ctx, raw.agent.as_ref().and_then(|a| a.rotation.as_ref()))?;

    let mut providers = Vec::new();
    for (name, entry) in raw.providers.take().map(|m| m.0).unwrap_or_default() {
        providers.push(provider(ctx, mode, &name, entry)?);
    }

    let defaults = raw.defaults.take().unwrap_or_default();
    let mut secrets = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    for (i, entry) in raw
        .secrets
        .take()
        .map(|s| s.0)
        .unwrap_or_default()
        .into_iter()
        .enumerate()
    {
        let s = secret(ctx, i, entry, &providers, &defaults, &agent_rotation)?;
        if let Some(first) = names.insert(s.name.clone(), i) {
            return Err(ctx.bad(
                &format!("secrets[{i}].name"),
                format!("duplicate secret name {:?} (also secrets[{first}])", s.name),
            ));
        }
        secrets.push(s);
    }
    let logging = LoggingConfig {
        level: raw.logging.as_ref().and_then(|l| l.level).map(|l| match l {
            LevelWord::Trace => "trace",
            LevelWord::Debug => "debug",
            LevelWord::Info => "info",
            LevelWord::Warn => "warn",
            LevelWord::Error => "error",
        }),
    };
    Ok((
        SecretsConfig {
            mode,
            providers,
            secrets,
            watch,
            rotation: agent_rotation,
        },
        logging,
    ))
}

fn watch(ctx: &Ctx<'_>, w: Option<&WatchSection>) -> Result<WatchSettings, ConfigError> {
    let mut out = WatchSettings::default();
    let Some(w) = w else {
        return Ok(out);
    };
    if let Some(d) = w.polling_interval {
        out.polling_interval = ctx.duration(
            "agent.watch.polling_interval",
            d.get(),
            Duration::from_secs(1),
            Duration::from_secs(86_400),
        )?;
        out.max_interval = out.polling_interval * WatchSettings::DEFAULT_BACKOFF_FACTOR;
    }
    if let Some(d) = w.max_interval {
        out.max_interval = ctx.duration(
            "agent.watch.max_interval",
            d.get(),
            out.polling_interval,
            Duration::from_secs(7 * 86_400),
        )?;
    }
    if let Some(d) = w.debounce {
        out.debounce = ctx.duration(
            "agent.watch.debounce",
            d.get(),
            Duration::ZERO,
            Duration::from_secs(600),
        )?;
    }
    if let Some(j) = w.jitter {
        out.jitter = j;
    }
    Ok(out)
}

fn strategy(w: StrategyWord) -> Strategy {
    match w {
        StrategyWord::Rolling => Strategy::Rolling,
        StrategyWord::Restart => Strategy::Restart,
        StrategyWord::Signal => Strategy::Signal,
        StrategyWord::None => Strategy::None,
        StrategyWord::Auto => Strategy::Auto,
    }
}

fn agent_rotation(ctx: &Ctx<'_>, r: Option<&AgentRotationSection>) -> Result<AgentRotation, ConfigError> {
    let mut out = AgentRotation::default();
    let Some(r) = r else {
        return Ok(out);
    };
    if let Some(e) = r.enabled {
        out.enabled = e;
    }
    if let Some(s) = r.strategy {
        out.strategy = strategy(s);
    }
    if let Some(d) = r.health_check_timeout {
        out.health_check_timeout = ctx.duration(
            "agent.rotation.health_check_timeout",
            d.get(),
            Duration::from_secs(1),
            Duration::from_secs(3600),
        )?;
    }
    Ok(out)
}

/// Letters, digits, `-`, `_`, `.`; 1 to 128 characters.
fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 128 && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

const NAME_RULE: &str = "use 1-128 letters, digits, '-', '_' and '.'";

fn http_url(ctx: &Ctx<'_>, key: &str, v: &str) -> Result<String, ConfigError> {
    let v = v.trim();
    let rest = v.strip_prefix("https://").or_else(|| v.strip_prefix("http://"));
    match rest {
        Some(host) if !host.is_empty() && !host.starts_with('/') => Ok(v.trim_end_matches('/').to_owned()),
        _ => Err(ctx.bad(key, format!("invalid URL {v:?}; expected https://HOST[:PORT]"))),
    }
}

fn provider(ctx: &Ctx<'_>, mode: Mode, name: &str, e: ProviderEntry) -> Result<ProviderSpec, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    if !valid_name(name) {
        return Err(ctx.bad(
            &format!("providers.{name}"),
            format!("invalid provider name {name:?}; {NAME_RULE}"),
        ));
    }
    let kind = e.kind.ok_or_else(|| {
        ctx.bad(
            &format!("providers.{name}"),
            "missing `type`; every provider needs one of local, vault, aws, azure, plugin",
        )
    })?;
    let kind = match kind {
        ProviderType::Local => ProviderKind::Local,
        ProviderType::Vault => ProviderKind::Vault,
        ProviderType::Aws => ProviderKind::Aws,
        ProviderType::Azure => ProviderKind::Azure,
        ProviderType::Plugin => ProviderKind::Plugin,
    };
    let set: [(&str, bool); 18] = [
        ("vault_file", e.vault_file.is_some()),
        ("master_key_file", e.master_key_file.is_some()),
        ("address", e.address.is_some()),
        ("namespace", e.namespace.is_some()),
        ("ca_file", e.ca_file.is_some()),
        ("auth", e.auth.is_some()),
        ("region", e.region.is_some()),
        ("endpoint_url", e.endpoint_url.is_some()),
        ("profile", e.profile.is_some()),
        ("vault_url", e.vault_url.is_some()),
        ("authority_host", e.authority_host.is_some()),
        ("command", e.command.is_some()),
        ("args", e.args.is_some()),
        ("sha256", e.sha256.is_some()),
        ("pins_file", e.pins_file.is_some()),
        ("config", e.config.is_some()),
        ("env", e.env.is_some()),
        ("retry", e.retry.is_some()),
    ];
    let own: &[&str] = match kind {
        ProviderKind::Local => &["vault_file", "master_key_file"],
        ProviderKind::Vault => &["address", "namespace", "ca_file", "auth"],
        ProviderKind::Aws => &["region", "endpoint_url", "profile", "auth"],
        ProviderKind::Azure => &["vault_url", "authority_host", "ca_file", "auth"],
        ProviderKind::Plugin => &["command", "args", "sha256", "pins_file", "config", "env"],
    };
    const COMMON: &[&str] = &["retry", "rate_limit", "concurrency", "timeout"];
    if let Some((k, _)) = set
        .iter()
        .find(|(k, on)| *on && !own.contains(k) && !COMMON.contains(k))
    {
        return Err(ctx.bad(
            &key(k),
            format!(
                "`{k}` is not a setting of a {kind} provider; a {kind} provider takes {}, and every provider takes {}",
                own.join(", "),
                COMMON.join(", ")
            ),
        ));
    }
    let limits = limits(ctx, name, &e)?;
    let settings = match kind {
        ProviderKind::Local => {
            let (vault, key_file) = match mode {
                Mode::Agent => ("/var/lib/dso/vault.enc", "/var/lib/dso/master.key"),
                Mode::Local => ("~/.dso/vault.enc", "~/.dso/master.key"),
            };
            ProviderSettings::Local(LocalSettings {
                vault_file: ctx.path(&key("vault_file"), e.vault_file.as_deref().unwrap_or(vault))?,
                master_key_file: Some(ctx.path(
                    &key("master_key_file"),
                    e.master_key_file.as_deref().unwrap_or(key_file),
                )?),
            })
        }
        ProviderKind::Vault => vault(ctx, name, e)?,
        ProviderKind::Aws => aws(ctx, name, e)?,
        ProviderKind::Azure => azure(ctx, name, e)?,
        ProviderKind::Plugin => plugin(ctx, name, e)?,
    };
    Ok(ProviderSpec {
        name: name.to_owned(),
        limits,
        settings,
    })
}

fn limits(ctx: &Ctx<'_>, name: &str, e: &ProviderEntry) -> Result<Limits, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let mut l = Limits::default();
    if let Some(r) = e.rate_limit {
        if !(r.is_finite() && r > 0.0 && r <= 10_000.0) {
            return Err(ctx.bad(
                &key("rate_limit"),
                format!("{r} is out of range; expected calls per second, more than 0 and at most 10000"),
            ));
        }
        l.rate_per_sec = r;
    }
    if let Some(c) = e.concurrency {
        if !(1..=256).contains(&c) {
            return Err(ctx.bad(
                &key("concurrency"),
                format!("{c} is out of range; expected 1 to 256"),
            ));
        }
        l.concurrency = c;
    }
    if let Some(t) = e.timeout {
        l.timeout = ctx.duration(
            &key("timeout"),
            t.get(),
            Duration::from_millis(1),
            Duration::from_secs(3600),
        )?;
    }
    if let Some(r) = &e.retry {
        if let Some(a) = r.attempts {
            if !(1..=20).contains(&a) {
                return Err(ctx.bad(
                    &key("retry.attempts"),
                    format!("{a} is out of range; expected 1 to 20"),
                ));
            }
            l.retry_attempts = a;
        }
        if let Some(b) = r.backoff {
            l.retry_backoff = ctx.duration(
                &key("retry.backoff"),
                b.get(),
                Duration::from_millis(1),
                Duration::from_secs(600),
            )?;
        }
    }
    Ok(l)
}

/// The auth method, checked against `methods`, and the params it may use.
fn auth_method(
    ctx: &Ctx<'_>,
    name: &str,
    auth: Option<&AuthEntry>,
    default: Option<&'static str>,
    methods: &[&'static str],
) -> Result<&'static str, ConfigError> {
    let key = format!("providers.{name}.auth.method");
    match auth.and_then(|a| a.method.as_deref()) {
        Some(m) => methods.iter().copied().find(|k| *k == m).ok_or_else(|| {
            ctx.bad(
                &key,
                format!(
                    "unknown auth method {m:?}; expected one of {}",
                    methods.join(", ")
                ),
            )
        }),
        None => {
            default.ok_or_else(|| ctx.bad(&key, format!("missing; expected one of {}", methods.join(", "))))
        }
    }
}

/// Refuses auth params that `method` does not take.
fn only_params(
    ctx: &Ctx<'_>,
    name: &str,
    method: &str,
    auth: Option<&AuthEntry>,
    allowed: &[&str],
) -> Result<(), ConfigError> {
    let Some(p) = auth.and_then(|a| a.params.as_ref()) else {
        return Ok(());
    };
    let set = [
        ("address", p.address.is_some()),
        ("token", p.token.is_some()),
        ("role_id", p.role_id.is_some()),
        ("secret_id_file", p.secret_id_file.is_some()),
        ("mount", p.mount.is_some()),
        ("tenant_id", p.tenant_id.is_some()),
        ("client_id", p.client_id.is_some()),
        ("client_secret", p.client_secret.is_some()),
        ("token_file", p.token_file.is_some()),
        ("endpoint", p.endpoint.is_some()),
    ];
    if let Some((k, _)) = set.iter().find(|(k, on)| *on && !allowed.contains(k)) {
        let takes = if allowed.is_empty() {
            "no params".to_owned()
        } else {
            allowed.join(", ")
        };
        return Err(ctx.bad(
            &format!("providers.{name}.auth.params.{k}"),
            format!("`{k}` is not a parameter of auth method {method}; {method} takes {takes}"),
        ));
    }
    Ok(())
}

fn required<'v>(ctx: &Ctx<'_>, key: &str, v: Option<&'v String>, what: &str) -> Result<&'v str, ConfigError> {
    match v.map(|s| s.trim()) {
        Some(s) if !s.is_empty() => Ok(s),
        _ => Err(ctx.bad(key, format!("missing; {what}"))),
    }
}

fn vault(ctx: &Ctx<'_>, name: &str, e: ProviderEntry) -> Result<ProviderSettings, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let auth = e.auth.as_ref();
    let params = auth.and_then(|a| a.params.as_ref());
    let method = auth_method(ctx, name, auth, Some("token"), &["token", "approle"])?;
    let address = match (e.address.as_ref(), params.and_then(|p| p.address.as_ref())) {
        (Some(_), Some(_)) => {
            return Err(ctx.bad(
                &key("auth.params.address"),
                format!("the address is set twice, as providers.{name}.address and as providers.{name}.auth.params.address; keep one"),
            ));
        }
        (Some(a), None) => http_url(ctx, &key("address"), a)?,
        (None, Some(a)) => http_url(ctx, &key("auth.params.address"), a)?,
        (None, None) => {
            return Err(ctx.bad(
                &format!("providers.{name}"),
                "missing `address` (or `auth.params.address`); a Vault provider needs the server, like https://vault.example.com:8200",
            ));
        }
    };
    let auth = match method {
        "token" => {
            only_params(ctx, name, method, auth, &["address", "token"])?;
            let token = required(
                ctx,
                &key("auth.params.token"),
                params.and_then(|p| p.token.as_ref()),
                "auth method token needs `token` (write token: \"${VAULT_TOKEN}\" to take it from the environment)",
            )?;
            VaultAuth::Token {
                token: Credential::new(token),
            }
        }
        _ => {
            only_params(
                ctx,
                name,
                method,
                auth,
                &["address", "role_id", "secret_id_file", "mount"],
            )?;
            let p = params;
            let role_id = required(
                ctx,
                &key("auth.params.role_id"),
                p.and_then(|p| p.role_id.as_ref()),
                "auth method approle needs `role_id`",
            )?;
            let sid = required(
                ctx,
                &key("auth.params.secret_id_file"),
                p.and_then(|p| p.secret_id_file.as_ref()),
                "auth method approle needs `secret_id_file` (the secret id is read from that file at each login)",
            )?;
            let mount = p
                .and_then(|p| p.mount.as_deref())
                .map(str::trim)
                .unwrap_or("approle");
            if mount.is_empty() || mount.starts_with('/') || mount.ends_with('/') {
                return Err(ctx.bad(
                    &key("auth.params.mount"),
                    format!("invalid mount {mount:?}; expected a path like approle"),
                ));
            }
            VaultAuth::AppRole {
                role_id: role_id.to_owned(),
                secret_id_file: ctx.path(&key("auth.params.secret_id_file"), sid)?,
                mount: mount.to_owned(),
            }
        }
    };
    Ok(ProviderSettings::Vault(VaultSettings {
        address,
        namespace: e.namespace.map(|n| n.trim().to_owned()).filter(|n| !n.is_empty()),
        ca_file: e
            .ca_file
            .as_deref()
            .map(|f| ctx.path(&key("ca_file"), f))
            .transpose()?,
        auth,
    }))
}

fn aws(ctx: &Ctx<'_>, name: &str, e: ProviderEntry) -> Result<ProviderSettings, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let auth = e.auth.as_ref();
    let method = auth_method(
        ctx,
        name,
        auth,
        Some("default"),
        &["default", "iam_role", "env", "profile"],
    )?;
    only_params(ctx, name, method, auth, &[])?;
    let region = e.region.map(|r| r.trim().to_owned());
    if let Some(r) = &region
        && (r.is_empty()
            || !r
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-'))
    {
        return Err(ctx.bad(
            &key("region"),
            format!("invalid region {r:?}; expected a region code like us-east-1"),
        ));
    }
    let auth = match method {
        "iam_role" => AwsAuth::IamRole,
        "env" => AwsAuth::Env,
        "profile" => AwsAuth::Profile,
        _ => AwsAuth::Default,
    };
    if auth == AwsAuth::Profile && e.profile.as_deref().is_none_or(|p| p.trim().is_empty()) {
        return Err(ctx.bad(
            &key("profile"),
            "missing; auth method profile needs `profile: NAME` (a profile of ~/.aws/config)",
        ));
    }
    Ok(ProviderSettings::Aws(AwsSettings {
        region,
        endpoint_url: e
            .endpoint_url
            .as_deref()
            .map(|u| http_url(ctx, &key("endpoint_url"), u))
            .transpose()?,
        profile: e.profile.map(|p| p.trim().to_owned()),
        auth,
    }))
}

fn azure(ctx: &Ctx<'_>, name: &str, e: ProviderEntry) -> Result<ProviderSettings, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let auth = e.auth.as_ref();
    let params = auth.and_then(|a| a.params.as_ref());
    let method = auth_method(
        ctx,
        name,
        auth,
        Some("managed_identity"),
        &["managed_identity", "client_secret", "workload_identity"],
    )?;
    let vault_url = http_url(
        ctx,
        &key("vault_url"),
        required(
            ctx,
            &format!("providers.{name}"),
            e.vault_url.as_ref(),
            "an Azure provider needs `vault_url`, like https://NAME.vault.azure.net",
        )?,
    )?;
    let p = |f: fn(&super::file::AuthParams) -> &Option<String>| params.and_then(|p| f(p).as_ref());
    let tenant = || {
        required(
            ctx,
            &key("auth.params.tenant_id"),
            p(|p| &p.tenant_id),
            &format!("auth method {method} needs `tenant_id`"),
        )
    };
    let client = || {
        required(
            ctx,
            &key("auth.params.client_id"),
            p(|p| &p.client_id),
            &format!("auth method {method} needs `client_id`"),
        )
    };
    let auth = match method {
        "managed_identity" => {
            only_params(ctx, name, method, auth, &["client_id", "endpoint"])?;
            AzureAuth::ManagedIdentity {
                client_id: p(|p| &p.client_id).map(|s| s.trim().to_owned()),
                endpoint: p(|p| &p.endpoint)
                    .map(|u| http_url(ctx, &key("auth.params.endpoint"), u))
                    .transpose()?,
            }
        }
        "client_secret" => {
            only_params(
                ctx,
                name,
                method,
                auth,
                &["tenant_id", "client_id", "client_secret"],
            )?;
            AzureAuth::ClientSecret {
                tenant_id: tenant()?.to_owned(),
                client_id: client()?.to_owned(),
                client_secret: Credential::new(required(
                    ctx,
                    &key("auth.params.client_secret"),
                    p(|p| &p.client_secret),
                    "auth method client_secret needs `client_secret` (write \"${AZURE_CLIENT_SECRET}\" to take it from the environment)",
                )?),
            }
        }
        _ => {
            only_params(ctx, name, method, auth, &["tenant_id", "client_id", "token_file"])?;
            let file = required(
                ctx,
                &key("auth.params.token_file"),
                p(|p| &p.token_file),
                "auth method workload_identity needs `token_file`",
            )?;
            AzureAuth::WorkloadIdentity {
                tenant_id: tenant()?.to_owned(),
                client_id: client()?.to_owned(),
                token_file: ctx.path(&key("auth.params.token_file"), file)?,
            }
        }
    };
    Ok(ProviderSettings::Azure(AzureSettings {
        vault_url,
        auth,
        authority_host: match e.authority_host.as_deref() {
            Some(h) => http_url(ctx, &key("authority_host"), h)?,
            None => "https://login.microsoftonline.com".to_owned(),
        },
        ca_file: e
            .ca_file
            .as_deref()
            .map(|f| ctx.path(&key("ca_file"), f))
            .transpose()?,
    }))
}

fn plugin(ctx: &Ctx<'_>, name: &str, e: ProviderEntry) -> Result<ProviderSettings, ConfigError> {
    let key = |k: &str| format!("providers.{name}.{k}");
    let command = required(
        ctx,
        &format!("providers.{name}"),
        e.command.as_ref(),
        "a plugin provider needs `command`, the executable",
    )?;
    let sha256 = match e.sha256.as_deref().map(str::trim) {
        Some(h) if h.len() == 64 && h.chars().all(|c| c.is_ascii_hexdigit()) => Some(h.to_ascii_lowercase()),
        Some(h) => {
            return Err(ctx.bad(
                &key("sha256"),
                format!("invalid SHA-256 {h:?}; expected 64 hex digits (sha256sum PLUGIN)"),
            ));
        }
        None => None,
    };
    let config = match e.config {
        None => serde_json::Value::Object(Default::default()),
        Some(v @ serde_json::Value::Object(_)) => v,
        Some(_) => return Err(ctx.bad(&key("config"), "expected a map of settings for the plugin")),
    };
    Ok(ProviderSettings::Plugin(PluginSettings {
        command: ctx.path(&key("command"), command)?,
        args: e.args.unwrap_or_default(),
        sha256,
        pins_file: e
            .pins_file
            .as_deref()
            .map(|f| ctx.path(&key("pins_file"), f))
            .transpose()?,
        config,
        env: plugin_env(ctx, &key("env"), e.env)?,
    }))
}

/// An environment variable name: a letter or `_`, then letters, digits and `_`.
fn valid_env_name(s: &str) -> bool {
    let mut c = s.chars();
    c.next().is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
        && c.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// A file name: 1-255 letters, digits, `.`, `_`, `-`, not starting with `.`.
fn valid_file_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 255
        && !s.starts_with('.')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

fn secret(
    ctx: &Ctx<'_>,
    i: usize,
    e: SecretEntry,
    providers: &[ProviderSpec],
    defaults: &DefaultsSection,
    agent: &AgentRotation,
) -> Result<SecretSpec, ConfigError> {
    let key = |k: &str| format!("secrets[{i}].{k}");
    let name = e
        .name
        .ok_or_else(|| ctx.bad(&format!("secrets[{i}]"), "missing `name`; every secret needs one"))?;
    if !valid_name(&name) {
        return Err(ctx.bad(&key("name"), format!("invalid secret name {name:?}; {NAME_RULE}")));
    }
    let provider_name = e.provider.ok_or_else(|| {
        ctx.bad(
            &format!("secrets[{i}]"),
            format!("missing `provider`; secret {name:?} needs the name of one of providers:"),
        )
    })?;
    let Some(provider) = providers.iter().find(|p| p.name == provider_name) else {
        let known: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
        let hint = if known.is_empty() {
            "this file has no providers: section".to_owned()
        } else {
            format!("providers in this file: {}", known.join(", "))
        };
        return Err(ctx.bad(
            &key("provider"),
            format!("unknown provider {provider_name:?}; {hint}"),
        ));
    };
    let inject = inject(ctx, i, defaults.inject.as_ref(), e.inject.as_ref())?;
    let rotation = rotation(
        ctx,
        i,
        defaults.rotation.as_ref(),
        e.rotation.as_ref(),
        agent,
        &inject,
    )?;
    let raw_mappings = e.mappings.map(|m| m.0).unwrap_or_default();
    if raw_mappings.is_empty() {
        return Err(ctx.bad(
            &key("mappings"),
            format!("secret {name:?} has no mappings; write NAME_IN_CONTAINER: REFERENCE pairs"),
        ));
    }
    let is_env = matches!(inject, InjectSpec::Env { .. });
    let mut mappings = Vec::with_capacity(raw_mappings.len());
    for (target, raw) in raw_mappings {
        let mkey = key(&format!("mappings.{target}"));
        if is_env && !valid_env_name(&target) {
            return Err(ctx.bad(
                &mkey,
                format!("{target:?} is not an environment variable name; use a letter or '_', then letters, digits and '_'"),
            ));
        }
        if !is_env && !valid_file_name(&target) {
            return Err(ctx.bad(
                &mkey,
                format!("{target:?} is not a file name; use 1-255 letters, digits, '.', '_' and '-', not starting with '.'"),
            ));
        }
        let reference = Reference::parse(provider.kind(), &provider.name, &raw)
            .map_err(|err| ctx.bad(&mkey, err.to_string()))?;
        mappings.push((target, reference));
    }
    let targets = match e.targets {
        None => Targets::default(),
        Some(t) => {
            let list = |k: &str, v: Option<Vec<String>>| -> Result<Vec<String>, ConfigError> {
                let v = v.unwrap_or_default();
                if let Some(bad) = v
                    .iter()
                    .find(|s| s.trim().is_empty() || s.chars().any(char::is_control))
                {
                    return Err(ctx.bad(&key(&format!("targets.{k}")), format!("invalid name {bad:?}")));
                }
                Ok(v)
            };
            Targets {
                containers: list("containers", t.containers)?,
                services: list("services", t.services)?,
                labels: t.labels.map(|m| m.0.into_iter().collect()).unwrap_or_default(),
            }
        }
    };
    Ok(SecretSpec {
        name,
        provider: provider_name,
        mappings,
        targets,
        inject,
        rotation,
    })
}

/// `defaults.inject` under the secret's own `inject`, key by key; when the secret names a
/// different `type`, the defaults do not apply to it.
fn inject(
    ctx: &Ctx<'_>,
    i: usize,
    defaults: Option<&InjectEntry>,
    own: Option<&InjectEntry>,
) -> Result<InjectSpec, ConfigError> {
    let d = defaults.cloned().unwrap_or_default();
    let o = own.cloned().unwrap_or_default();
    let (merged, from_own) = match (d.kind, o.kind) {
        (Some(a), Some(b)) if a != b => (o.clone(), true),
        _ => (
            InjectEntry {
                kind: o.kind.or(d.kind),
                path: o.path.clone().or(d.path),
                mode: o.mode.or(d.mode),
                uid: o.uid.or(d.uid),
                gid: o.gid.or(d.gid),
                env_mode: o.env_mode.or(d.env_mode),
                env_pointers: o.env_pointers.or(d.env_pointers),
            },
            own.is_some(),
        ),
    };
    let at = |k: &str, own_has: bool| {
        if own_has || from_own && defaults.is_none() {
            format!("secrets[{i}].inject.{k}")
        } else {
            format!("defaults.inject.{k}")
        }
    };
    match merged.kind.unwrap_or(InjectType::File) {
        InjectType::Env => {
            for (k, set_own, set) in [
                ("path", o.path.is_some(), merged.path.is_some()),
                ("mode", o.mode.is_some(), merged.mode.is_some()),
                ("uid", o.uid.is_some(), merged.uid.is_some()),
                ("gid", o.gid.is_some(), merged.gid.is_some()),
                (
                    "env_pointers",
                    o.env_pointers.is_some(),
                    merged.env_pointers.is_some(),
                ),
            ] {
                if set {
                    return Err(ctx.bad(
                        &at(k, set_own),
                        format!("`{k}` applies to `type: file` only; this secret is injected as env"),
                    ));
                }
            }
            Ok(InjectSpec::Env {
                env_mode: match merged.env_mode {
                    Some(EnvModeWord::Native) => EnvMode::Native,
                    _ => EnvMode::Launcher,
                },
            })
        }
        InjectType::File => {
            if merged.env_mode.is_some() {
                return Err(ctx.bad(
                    &at("env_mode", o.env_mode.is_some()),
                    "`env_mode` applies to `type: env` only; this secret is injected as files",
                ));
            }
            let path = merged.path.as_deref().unwrap_or(InjectSpec::DEFAULT_PATH).trim();
            if !path.starts_with('/') || path.split('/').any(|s| s == "..") || path == "/" {
                return Err(ctx.bad(
                    &at("path", o.path.is_some()),
                    format!("invalid path {path:?}; expected an absolute directory inside the container, like /run/secrets"),
                ));
            }
            Ok(InjectSpec::File {
                path: PathBuf::from(path),
                mode: merged.mode.map(|m| m.0).unwrap_or(InjectSpec::DEFAULT_MODE),
                uid: merged.uid,
                gid: merged.gid,
                env_pointers: merged.env_pointers.unwrap_or(false),
            })
        }
    }
}

/// Signals a container may be sent, without the `SIG` prefix.
const SIGNALS: &[&str] = &[
    "HUP", "INT", "QUIT", "USR1", "USR2", "TERM", "WINCH", "ALRM", "CONT",
];

fn rotation(
    ctx: &Ctx<'_>,
    i: usize,
    defaults: Option<&RotationEntry>,
    own: Option<&RotationEntry>,
    agent: &AgentRotation,
    inject: &InjectSpec,
) -> Result<RotationSpec, ConfigError> {
    let d = defaults.cloned().unwrap_or_default();
    let o = own.cloned().unwrap_or_default();
    let strategy = o.strategy.or(d.strategy).map(strategy).unwrap_or(agent.strategy);
    let strategy_key = if o.strategy.is_some() {
        format!("secrets[{i}].rotation.strategy")
    } else if d.strategy.is_some() {
        "defaults.rotation.strategy".to_owned()
    } else {
        "agent.rotation.strategy".to_owned()
    };
    let signal = match o
        .signal
        .as_ref()
        .map(|s| (s, true))
        .or(d.signal.as_ref().map(|s| (s, false)))
    {
        None => "SIGHUP".to_owned(),
        Some((s, mine)) => {
            let k = if mine {
                format!("secrets[{i}].rotation.signal")
            } else {
                "defaults.rotation.signal".to_owned()
            };
            let up = s.trim().to_ascii_uppercase();
            let bare = up.strip_prefix("SIG").unwrap_or(&up);
            if !SIGNALS.contains(&bare) {
                return Err(ctx.bad(
                    &k,
                    format!(
                        "unknown signal {s:?}; expected one of SIG{}",
                        SIGNALS.join(", SIG")
                    ),
                ));
            }
            if mine && strategy != Strategy::Signal {
                return Err(ctx.bad(
                    &k,
                    format!(
                        "`signal` is used by `strategy: signal` only; this secret's strategy is {strategy}"
                    ),
                ));
            }
            format!("SIG{bare}")
        }
    };
    if strategy == Strategy::Signal && matches!(inject, InjectSpec::Env { .. }) {
        return Err(ctx.bad(
            &strategy_key,
            "strategy signal cannot deliver a secret injected as env (a signal cannot change a running process's environment); use `inject: {type: file}` or strategy rolling/restart",
        ));
    }
    Ok(RotationSpec {
        enabled: agent.enabled && o.enabled.or(d.enabled).unwrap_or(true),
        strategy,
        signal,
    })
}

/// Names of every reference in `cfg`, for `--check-providers`: `(secret, target, reference)`.
pub fn references(cfg: &SecretsConfig) -> impl Iterator<Item = (&str, &str, &Reference)> {
    cfg.secrets.iter().flat_map(|s| {
        s.mappings
            .iter()
            .map(move |(t, r)| (s.name.as_str(), t.as_str(), r))
    })
}

/// Unique provider names, in file order, that `cfg`'s secrets use.
pub fn used_providers(cfg: &SecretsConfig) -> Vec<&str> {
    let mut seen = HashSet::new();
    cfg.secrets
        .iter()
        .map(|s| s.provider.as_str())
        .filter(|p| seen.insert(*p))
        .collect()
}

/// `providers.NAME.env`: environment variable names (never values) a plugin may see.
fn plugin_env(ctx: &Ctx<'_>, key: &str, names: Option<Vec<String>>) -> Result<Vec<String>, ConfigError> {
    let names = names.unwrap_or_default();
    for n in &names {
        let ok = !n.is_empty()
            && !n.starts_with(|c: char| c.is_ascii_digit())
            && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !ok {
            return Err(ctx.bad(
                key,
                format!("{n:?} is not an environment variable name (letters, digits, '_', not starting with a digit)"),
            ));
        }
    }
    Ok(names)
}
