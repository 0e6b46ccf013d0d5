//! `dso config validate [--check-providers]` and `dso config reload`.

use std::time::Duration;

use dso_secrets::config::{InjectSpec, SecretsConfig};
use dso_secrets::{Error, Reference, Version};

use crate::args::ConfigCommand;
use crate::config::{self, Config};
use crate::duration::format;

/// Runs a `dso config` command (`socket`: the agent's, for `reload`).
pub fn run(cmd: ConfigCommand, socket: Option<std::path::PathBuf>) -> anyhow::Result<()> {
    match cmd {
        ConfigCommand::Reload { json } => reload(&super::socket_path(socket), json),
        ConfigCommand::Validate {
            file,
            check_providers,
        } => {
            let cfg = config::load(&file)?;
            print_summary(&file, &cfg);
            if check_providers {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?;
                let outcomes = runtime.block_on(check(&cfg.secrets));
                let failed = outcomes.iter().filter(|o| !o.ok()).count();
                println!("providers:");
                for o in &outcomes {
                    println!("  {o}");
                }
                if failed > 0 {
                    anyhow::bail!(
                        "{failed} of {} reference(s) failed the provider check",
                        outcomes.len()
                    );
                }
                println!("  all {} reference(s) ok", outcomes.len());
            }
            Ok(())
        }
    }
}

/// `dso config reload`: `POST /v1/config/reload`, then what changed, what needs a
/// restart, or the error (the agent's answer carries what was applied and what not).
fn reload(socket: &std::path::Path, as_json: bool) -> anyhow::Result<()> {
    let client = crate::client::Client::new(socket);
    let bytes = super::runtime()?.block_on(client.send_raw(
        hyper::Method::POST,
        "/v1/config/reload",
        "application/json",
        hyper::body::Bytes::new(),
    ));
    let answer: serde_json::Value = match bytes {
        Ok(b) => serde_json::from_slice(&b)?,
        Err(e) => return Err(e.context("reloading the agent's config")),
    };
    if as_json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print_reload(&answer);
    }
    Ok(())
}

fn print_reload(a: &serde_json::Value) {
    let list = |key: &str, f: &dyn Fn(&serde_json::Value) -> String| -> Vec<String> {
        a[key]
            .as_array()
            .map(|v| v.iter().map(f).collect())
            .unwrap_or_default()
    };
    let name = |v: &serde_json::Value| v["name"].as_str().unwrap_or("").to_owned();
    println!("reloaded {}", a["file"].as_str().unwrap_or(""));
    for line in list("added", &|v| {
        format!("  added    {} on {}", name(v), v["bind"].as_str().unwrap_or(""))
    }) {
        println!("{line}");
    }
    for line in list("moved", &|v| {
        format!(
            "  moved    {} from {} to {} (the old address's connections drain)",
            name(v),
            v["from"].as_str().unwrap_or(""),
            v["to"].as_str().unwrap_or("")
        )
    }) {
        println!("{line}");
    }
    for line in list("swapped", &|v| {
        format!(
            "  swapped  {} to generation {} (generation {} drains)",
            name(v),
            v["generation"],
            v["previous"]
        )
    }) {
        println!("{line}");
    }
    for line in list("updated", &|v| {
        let keys: Vec<&str> = v["keys"]
            .as_array()
            .map(|k| k.iter().filter_map(|k| k.as_str()).collect())
            .unwrap_or_default();
        format!("  updated  {} ({}) for new connections", name(v), keys.join(", "))
    }) {
        println!("{line}");
    }
    for line in list("removed", &|v| {
        format!("  removed  {} (generation {} drains)", name(v), v["generation"])
    }) {
        println!("{line}");
    }
    for key in [
        "providers_added",
        "providers_replaced",
        "providers_removed",
        "secrets_added",
        "secrets_replaced",
        "secrets_removed",
    ] {
        let names = list(key, &|v| v.as_str().unwrap_or("").to_owned());
        if !names.is_empty() {
            println!("  {} {}", key.replace('_', " "), names.join(", "));
        }
    }
    let unchanged = list("unchanged", &|v| v.as_str().unwrap_or("").to_owned());
    if !unchanged.is_empty() {
        println!("  unchanged {}", unchanged.join(", "));
    }
    let restart = list("restart_required", &|v| v.as_str().unwrap_or("").to_owned());
    if !restart.is_empty() {
        println!("  needs a restart (changed, not applied): {}", restart.join(", "));
    }
}

fn print_summary(file: &std::path::Path, cfg: &Config) {
    let s = &cfg.secrets;
    println!(
        "{}: ok, {} listener(s), {} provider(s), {} secret(s), mode {}",
        file.display(),
        cfg.listeners.len(),
        s.providers.len(),
        s.secrets.len(),
        s.mode.as_str()
    );
    for l in &cfg.listeners {
        let backends = if l.backends.is_empty() {
            "(no backend)".to_owned()
        } else {
            l.backends
                .iter()
                .map(|b| match &b.label {
                    Some(label) => format!("{} ({label})", b.addr),
                    None => b.addr.to_string(),
                })
                .collect::<Vec<_>>()
                .join(", ")
        };
        println!(
            "  {}  {} -> {}  drain {}, hold max {}",
            l.name,
            l.listen,
            backends,
            format(l.drain_timeout),
            format(l.hold_max)
        );
    }
    for p in &s.providers {
        println!("  provider {}  type {}", p.name, p.kind());
    }
    for sec in &s.secrets {
        let inject = match &sec.inject {
            InjectSpec::File { path, mode, .. } => format!("files in {} ({mode:04o})", path.display()),
            InjectSpec::Env { env_mode } => format!("env ({env_mode:?})").to_lowercase(),
        };
        let rotation = if sec.rotation.enabled {
            sec.rotation.strategy.to_string()
        } else {
            "off".to_owned()
        };
        println!(
            "  secret {}  from {}, {} mapping(s), {inject}, rotation {rotation}",
            sec.name,
            sec.provider,
            sec.mappings.len()
        );
    }
    if !s.secrets.is_empty() || !s.providers.is_empty() {
        println!(
            "  watch: every {} (up to {} while unchanged), debounce {}",
            format(s.watch.polling_interval),
            format(s.watch.max_interval),
            format(s.watch.debounce)
        );
    }
    println!(
        "  logging: {} (RUST_LOG, when set, overrides it)",
        cfg.logging.default_filter()
    );
}

/// What the provider said about one reference.
pub struct Outcome {
    secret: String,
    target: String,
    reference: Reference,
    result: Result<Version, Failure>,
}

/// Why a reference failed the check.
pub enum Failure {
    /// The provider says the object does not exist.
    Missing(String),
    /// The credentials may not read it, or were refused.
    Forbidden(String),
    /// No answer, a 5xx, throttling, a timeout, or an answer off the API.
    Unreachable(String),
    /// The provider could not be set up or the reference cannot be used.
    Error(String),
}

impl Outcome {
    /// Whether the provider answered with a version.
    pub fn ok(&self) -> bool {
        self.result.is_ok()
    }

    /// The provider instance asked.
    pub fn provider(&self) -> &str {
        &self.reference.provider
    }

    /// Why the reference failed, when it did.
    pub fn failure(&self) -> Option<&Failure> {
        self.result.as_ref().err()
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}  {}  ", self.secret, self.target, self.reference)?;
        match &self.result {
            Ok(v) => write!(f, "ok (version {v})"),
            Err(Failure::Missing(d)) => write!(f, "missing: {d}"),
            Err(Failure::Forbidden(d)) => write!(f, "forbidden: {d}"),
            Err(Failure::Unreachable(d)) => write!(f, "unreachable: {d}"),
            Err(Failure::Error(d)) => write!(f, "error: {d}"),
        }
    }
}

fn classify(e: &Error) -> Failure {
    let text = dso_secrets::Redactor::global()
        .redact(&e.to_string())
        .into_owned();
    match e {
        Error::NotFound { .. } => Failure::Missing(text),
        Error::Forbidden { .. } | Error::Auth { .. } => Failure::Forbidden(text),
        Error::Unavailable { .. } | Error::Throttled { .. } | Error::Protocol { .. } => {
            Failure::Unreachable(text)
        }
        _ => Failure::Error(text),
    }
}

/// Connects every provider that a secret uses and asks it for the version of each
/// reference (metadata only). A provider that cannot connect fails all its references
/// with that reason.
pub async fn check(cfg: &SecretsConfig) -> Vec<Outcome> {
    let mut out = Vec::new();
    for name in config::used_providers(cfg) {
        let Some(spec) = cfg.provider(name) else {
            continue;
        };
        let deadline = spec.limits.timeout.max(Duration::from_millis(1));
        let connected = match tokio::time::timeout(deadline, dso_secrets::connect(spec)).await {
            Ok(Ok(p)) => Ok(p),
            Ok(Err(e)) => Err(classify(&e)),
            Err(_) => Err(Failure::Unreachable(format!(
                "provider {name}: no answer to connect within {}",
                format(deadline)
            ))),
        };
        for (secret, target, reference) in config::references(cfg).filter(|(_, _, r)| r.provider == name) {
            let result = match &connected {
                Err(f) => Err(match f {
                    Failure::Missing(d) => Failure::Missing(d.clone()),
                    Failure::Forbidden(d) => Failure::Forbidden(d.clone()),
                    Failure::Unreachable(d) => Failure::Unreachable(d.clone()),
                    Failure::Error(d) => Failure::Error(d.clone()),
                }),
                Ok(p) => match tokio::time::timeout(deadline, p.version(reference)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => Err(classify(&e)),
                    Err(_) => Err(Failure::Unreachable(format!(
                        "provider {name}: no answer within {}",
                        format(deadline)
                    ))),
                },
            };
            out.push(Outcome {
                secret: secret.to_owned(),
                target: target.to_owned(),
                reference: reference.clone(),
                result,
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A local provider whose vault file does not exist fails to connect (an error naming
    /// the provider): every reference of that provider is reported as failed, with the
    /// provider's reason.
    #[tokio::test]
    async fn check_reports_every_reference_of_a_provider_that_fails() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!(
            "providers:\n  l:\n    type: local\n    vault_file: {d}/none.enc\n    master_key_file: {d}/none.key\n\
             secrets:\n  - name: app\n    provider: l\n    mappings:\n      A: app/a\n      B: app/b#user\n",
            d = dir.path().display()
        );
        let cfg = config::parse(&text, |_| None).unwrap();
        let out = check(&cfg.secrets).await;
        assert_eq!(out.len(), 2);
        for o in &out {
            assert!(!o.ok());
            let line = o.to_string();
            assert!(line.contains("provider l"), "{line}");
            assert!(
                line.starts_with("app/A  l:app/a  ") || line.starts_with("app/B  l:app/b#user  "),
                "{line}"
            );
        }
    }

    #[test]
    fn outcomes_print_one_word_per_kind() {
        let r = Reference::parse(dso_secrets::ProviderKind::Aws, "aws", "db#pw").unwrap();
        let o = |result| {
            Outcome {
                secret: "s".into(),
                target: "PW".into(),
                reference: r.clone(),
                result,
            }
            .to_string()
        };
        assert_eq!(o(Ok(Version::new("v7"))), "s/PW  aws:db#pw  ok (version v7)");
        let nf = Error::NotFound {
            provider: "aws".into(),
            reference: "db#pw".into(),
        };
        assert!(o(Err(classify(&nf))).contains("  missing: provider aws"));
        let fb = Error::Forbidden {
            provider: "aws".into(),
            reference: "db#pw".into(),
            detail: "AccessDenied".into(),
        };
        assert!(o(Err(classify(&fb))).contains("  forbidden: "));
        let un = Error::Unavailable {
            provider: "aws".into(),
            detail: "connection refused".into(),
        };
        assert!(o(Err(classify(&un))).contains("  unreachable: "));
    }
}
