//! The `plugin` provider: an external executable speaking JSON lines on stdin/stdout
//! (protocol version [`PROTOCOL`], described in `docs/secrets.md`, "Plugins").
//!
//! - **Pinning**: before every start the executable's SHA-256 is compared with its pin
//!   ([`pin`]); a mismatch or a missing pin refuses to run it.
//! - **Isolation**: the plugin runs in its own process group, in `/`, with an empty
//!   environment except `PATH`, `HOME`, `LANG` and the names in `env`; its settings (which
//!   may hold credentials) go in the first message on stdin, never in argv or environment.
//!   Its stderr is logged line by line, redacted and truncated.
//! - **Restart policy**: a plugin that exits, hangs past `Limits::timeout`, or writes
//!   anything that is not a protocol answer is killed (its whole group); the calls in
//!   flight fail as `Unavailable`; the next call starts it again once a backoff has passed
//!   (1 s, doubling to 60 s, reset by a successful answer). It never takes the agent down.
//! - **No version metadata**: a plugin may answer `version` with `null`; the provider then
//!   reads the value and uses [`Version::from_digest`] (each poll reads the value).

mod pin;
mod process;

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use base64::Engine as _;
use serde_json::{Map, Value, json};
use tokio::time::Instant;
use tracing::info;
use zeroize::Zeroize as _;

use crate::error::{Error, Result};
use crate::provider::{CheckReport, Provider, Version};
use crate::redact::Redactor;
use crate::reference::Reference;
use crate::spec::{Limits, PluginSettings, ProviderKind, ProviderSettings, ProviderSpec};
use crate::value::{MAX_VALUE_LEN, SecretValue};

pub use pin::sha256_file;
pub use process::{BASE_ENV, MAX_LINE, MAX_STDERR_LINE};

/// The protocol version this dso speaks (sent in `hello`; the plugin must answer it).
pub const PROTOCOL: u64 = 1;

/// First wait before restarting a plugin that died.
pub const RESTART_BACKOFF_MIN: Duration = Duration::from_secs(1);

/// Longest wait before restarting a plugin that keeps dying.
pub const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Least time a plugin gets to answer `hello` (interpreters can be slow to start); the
/// call timeout applies when it is longer.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest error message taken from a plugin.
const MAX_MESSAGE: usize = 500;

/// Longest `check` detail taken from a plugin.
const MAX_DETAIL: usize = 4096;

/// Connects a `plugin` provider instance: checks the pin and starts the plugin (so that
/// a bad setting fails here), then answers calls through it.
pub async fn connect(spec: &ProviderSpec) -> Result<Arc<dyn Provider>> {
    let ProviderSettings::Plugin(settings) = &spec.settings else {
        return Err(Error::Config {
            provider: spec.name.clone(),
            detail: "not a plugin provider".to_string(),
        });
    };
    let p = PluginProvider::new(&spec.name, settings.clone(), spec.limits.clone());
    p.process().await?;
    Ok(Arc::new(p))
}

/// A plugin provider instance.
pub struct PluginProvider {
    /// Instance name.
    name: String,
    /// Its settings.
    settings: PluginSettings,
    /// Its limits (the per-call timeout).
    limits: Limits,
    /// The running process and the restart backoff.
    slot: tokio::sync::Mutex<Slot>,
    /// Request ids (0 is `hello`).
    next_id: AtomicU64,
    /// References the plugin reported no version for (their token is a digest).
    digest_refs: Mutex<HashSet<String>>,
    /// How many times a process was started (for status and tests).
    starts: AtomicU64,
}

struct Slot {
    process: Option<Arc<process::Process>>,
    /// Wait before the next start after a death.
    backoff: Duration,
    /// No start before this instant.
    not_before: Option<Instant>,
    /// Why the last process ended (shown while waiting to restart).
    last_death: Option<String>,
}

impl PluginProvider {
    /// A provider that starts its plugin on first use.
    pub fn new(name: &str, settings: PluginSettings, limits: Limits) -> PluginProvider {
        PluginProvider {
            name: name.to_string(),
            settings,
            limits,
            slot: tokio::sync::Mutex::new(Slot {
                process: None,
                backoff: RESTART_BACKOFF_MIN,
                not_before: None,
                last_death: None,
            }),
            next_id: AtomicU64::new(1),
            digest_refs: Mutex::new(HashSet::new()),
            starts: AtomicU64::new(0),
        }
    }

    /// How many plugin processes were started so far.
    pub fn starts(&self) -> u64 {
        self.starts.load(Ordering::SeqCst)
    }

    /// The pid of the running plugin process, if one runs.
    pub async fn pid(&self) -> Option<u32> {
        let slot = self.slot.lock().await;
        slot.process
            .as_ref()
            .filter(|p| p.ended().is_none())
            .map(|p| p.pid)
    }

    fn unavailable(&self, detail: String) -> Error {
        Error::Unavailable {
            provider: self.name.clone(),
            detail,
        }
    }

    /// The running process, starting one (pin check, spawn, `hello`) when none runs and
    /// the restart backoff allows.
    async fn process(&self) -> Result<Arc<process::Process>> {
        let mut slot = self.slot.lock().await;
        if let Some(p) = &slot.process {
            match p.ended() {
                None => return Ok(Arc::clone(p)),
                Some((at, why)) => {
                    slot.not_before = Some(at + slot.backoff);
                    slot.backoff = (slot.backoff * 2).min(RESTART_BACKOFF_MAX);
                    slot.last_death = Some(why);
                    slot.process = None;
                }
            }
        }
        if let Some(nb) = slot.not_before {
            let now = Instant::now();
            if now < nb {
                return Err(self.unavailable(format!(
                    "plugin restarts in {:.1}s (it ended: {})",
                    (nb - now).as_secs_f64(),
                    slot.last_death.as_deref().unwrap_or("unknown")
                )));
            }
        }
        let exe = pin::resolve(
            &self.name,
            &self.settings.command,
            std::env::var("PATH").ok().as_deref(),
        )?;
        pin::verify(&self.name, &self.settings, &exe)?;
        let proc = process::Process::spawn(&self.name, &exe, &self.settings.args, &self.settings.env)
            .map_err(|e| Error::Config {
                provider: self.name.clone(),
                detail: format!("starting plugin {}: {e}", exe.display()),
            })?;
        self.starts.fetch_add(1, Ordering::SeqCst);
        let proc = Arc::new(proc);
        info!(provider = %self.name, plugin = %exe.display(), pid = proc.pid, "plugin started");
        let hello = json!({
            "id": 0,
            "method": "hello",
            "protocol": PROTOCOL,
            "provider": self.name,
            "config": self.settings.config,
        });
        match self.exchange(&proc, 0, hello).await {
            Ok(ok) => {
                let spoken = ok.get("protocol").and_then(Value::as_u64);
                if spoken != Some(PROTOCOL) {
                    proc.kill("it does not speak this protocol version".to_string());
                    slot.not_before = Some(Instant::now() + slot.backoff);
                    return Err(Error::Protocol {
                        provider: self.name.clone(),
                        detail: format!(
                            "plugin {} answered hello with protocol {spoken:?}; this dso speaks {PROTOCOL}",
                            exe.display()
                        ),
                    });
                }
            }
            Err(e) => {
                proc.kill("hello failed".to_string());
                slot.last_death = Some(e.to_string());
                slot.not_before = Some(Instant::now() + slot.backoff);
                slot.backoff = (slot.backoff * 2).min(RESTART_BACKOFF_MAX);
                return Err(e);
            }
        }
        slot.process = Some(Arc::clone(&proc));
        Ok(proc)
    }

    /// Sends one request and waits (at most the call timeout) for its answer. A hung or
    /// abandoned call kills the process.
    async fn exchange(
        &self,
        proc: &Arc<process::Process>,
        id: u64,
        request: Value,
    ) -> Result<Map<String, Value>> {
        let timeout = if id == 0 {
            self.limits.timeout.max(START_TIMEOUT)
        } else {
            self.limits.timeout
        };
        let line = serde_json::to_vec(&request).expect("requests serialize");
        let rx = proc.send(id, line).await.map_err(|why| self.unavailable(why))?;
        let guard = Abandon {
            proc: Arc::clone(proc),
            id,
            armed: true,
        };
        let answer = tokio::time::timeout(timeout, rx).await;
        let mut guard = guard;
        guard.armed = false;
        let answer = match answer {
            Err(_) => {
                let why = format!("no answer to request {id} within {timeout:?}; killed");
                proc.forget(id);
                proc.kill(why.clone());
                return Err(self.unavailable(why));
            }
            Ok(Err(_)) => return Err(self.unavailable("plugin ended".to_string())),
            Ok(Ok(Err(why))) => return Err(self.unavailable(why)),
            Ok(Ok(Ok(a))) => a,
        };
        match answer {
            Ok(ok) => Ok(ok),
            Err(err) => Err(self.error(&err, request.get("reference").and_then(Value::as_str))),
        }
    }

    /// One call: start if needed, exchange, reset the restart backoff on an answer.
    async fn call(
        &self,
        method: &str,
        reference: Option<&Reference>,
        version: Option<&str>,
    ) -> Result<Map<String, Value>> {
        let proc = self.process().await?;
        let id = self.next_id.fetch_add(1, Ordering::SeqCst);
        let mut req = json!({"id": id, "method": method});
        if let Some(r) = reference {
            req["reference"] = Value::String(r.raw.clone());
        }
        if let Some(v) = version {
            req["version"] = Value::String(v.to_string());
        }
        let result = self.exchange(&proc, id, req).await;
        if !matches!(result, Err(Error::Unavailable { .. })) {
            self.slot.lock().await.backoff = RESTART_BACKOFF_MIN;
        }
        result
    }

    /// The error object of an answer as this crate's error.
    fn error(&self, err: &Map<String, Value>, reference: Option<&str>) -> Error {
        let kind = err.get("kind").and_then(Value::as_str).unwrap_or("");
        let message = err.get("message").and_then(Value::as_str).unwrap_or("");
        let mut message: String = message.chars().take(MAX_MESSAGE).collect();
        message = Redactor::global().redact(&message).into_owned();
        let provider = self.name.clone();
        let reference = reference.unwrap_or("").to_string();
        match kind {
            "not_found" => Error::NotFound { provider, reference },
            "forbidden" => Error::Forbidden {
                provider,
                reference,
                detail: message,
            },
            "auth" => Error::Auth {
                provider,
                detail: message,
            },
            "throttled" => Error::Throttled {
                provider,
                retry_after: err
                    .get("retry_after_ms")
                    .and_then(Value::as_u64)
                    .map(Duration::from_millis),
            },
            "unavailable" => Error::Unavailable {
                provider,
                detail: message,
            },
            "invalid" => Error::InvalidReference {
                provider,
                reference,
                reason: message,
            },
            other => Error::Protocol {
                provider,
                detail: format!("plugin error of unknown kind {other:?}: {message}"),
            },
        }
    }

    /// Reads the value (optionally at `version`) and the version the plugin reports.
    async fn read(
        &self,
        reference: &Reference,
        version: Option<&str>,
    ) -> Result<(SecretValue, Option<String>)> {
        let mut ok = self.call("fetch", Some(reference), version).await?;
        let reported = ok.get("version").and_then(Value::as_str).map(str::to_string);
        let Some(Value::String(mut b64)) = ok.remove("value") else {
            return Err(Error::Protocol {
                provider: self.name.clone(),
                detail: format!("fetch of {:?} answered without a base64 \"value\"", reference.raw),
            });
        };
        let decoded = base64::engine::general_purpose::STANDARD.decode(b64.as_bytes());
        b64.zeroize();
        let bytes = decoded.map_err(|_| Error::Protocol {
            provider: self.name.clone(),
            detail: format!(
                "fetch of {:?} answered a \"value\" that is not base64",
                reference.raw
            ),
        })?;
        let value = SecretValue::new(bytes);
        if value.len() > MAX_VALUE_LEN {
            return Err(Error::Unusable {
                provider: self.name.clone(),
                reference: reference.raw.clone(),
                reason: format!("the value is {} bytes, more than {MAX_VALUE_LEN}", value.len()),
            });
        }
        Ok((value, reported))
    }
}

/// Kills the process when a call is dropped before its answer arrived (its caller's own
/// deadline fired first): a plugin that does not answer in time counts as hung.
struct Abandon {
    proc: Arc<process::Process>,
    id: u64,
    armed: bool,
}

impl Drop for Abandon {
    fn drop(&mut self) {
        if self.armed {
            self.proc.forget(self.id);
            self.proc.kill(format!(
                "request {} was abandoned before the plugin answered",
                self.id
            ));
        }
    }
}

#[async_trait]
impl Provider for PluginProvider {
    fn name(&self) -> &str {
        &self.name
    }

    fn kind(&self) -> ProviderKind {
        ProviderKind::Plugin
    }

    async fn version(&self, reference: &Reference) -> Result<Version> {
        let ok = self.call("version", Some(reference), None).await?;
        match ok.get("version") {
            Some(Value::String(v)) if !v.is_empty() => Ok(Version::new(v.clone())),
            None | Some(Value::Null) => {
                // No version metadata: the token is the value's digest (reads the value).
                self.digest_refs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(reference.raw.clone());
                let (value, _) = self.read(reference, None).await?;
                Ok(Version::from_digest(&value))
            }
            Some(_) => Err(Error::Protocol {
                provider: self.name.clone(),
                detail: format!(
                    "version of {:?}: \"version\" is not a non-empty string or null",
                    reference.raw
                ),
            }),
        }
    }

    async fn fetch(&self, reference: &Reference, version: &Version) -> Result<SecretValue> {
        let digest = self
            .digest_refs
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&reference.raw);
        if digest {
            let (value, _) = self.read(reference, None).await?;
            if Version::from_digest(&value) != *version {
                return Err(self.unavailable(format!(
                    "{:?} changed between its version and its fetch; read again at the next poll",
                    reference.raw
                )));
            }
            return Ok(value);
        }
        let (value, reported) = self.read(reference, Some(version.as_str())).await?;
        if let Some(r) = reported
            && r != version.as_str()
        {
            return Err(Error::Protocol {
                provider: self.name.clone(),
                detail: format!(
                    "fetch of {:?} at version {version} answered version {r}",
                    reference.raw
                ),
            });
        }
        Ok(value)
    }

    async fn check(&self) -> Result<CheckReport> {
        let ok = self.call("check", None, None).await?;
        let detail = ok
            .get("detail")
            .and_then(Value::as_str)
            .unwrap_or("answered check");
        let detail: String = detail.chars().take(MAX_DETAIL).collect();
        Ok(CheckReport {
            provider: self.name.clone(),
            detail: format!(
                "plugin {} (pinned, {} start(s)): {}",
                self.settings.command.display(),
                self.starts(),
                Redactor::global().redact(&detail)
            ),
        })
    }
}
