//! `POST /v1/webhook`: an incoming push trigger, "this secret changed, look now".
//!
//! Authenticated with HMAC-SHA256 under a key read once at start from
//! `agent.http.webhook.secret_file` (the file's content without its trailing newline; the
//! file may not be readable or writable by group or others). The caller sends
//! `X-DSO-Timestamp: <unix seconds>` and `X-DSO-Signature: sha256=<hex>`, the HMAC of
//! `"<timestamp>.<body>"`. A timestamp outside the replay window
//! (`agent.http.webhook.tolerance`, default 5 minutes, either way), a signature that does
//! not match (compared in constant time), a signature already accepted within the window,
//! or a missing or malformed header is a 401 with the reason, and nothing is triggered.
//! With no key configured the endpoint answers 404.
//!
//! On success the body, `{"secret": "NAME"}` or `{}` (every secret), makes the watcher
//! poll the providers of that secret now, as `POST /v1/secrets/notify` does for a local
//! vault; the answer is 202 with the providers polled.

use std::collections::{HashSet, VecDeque};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use axum::Extension;
use axum::extract::State as With;
use dso_secrets::SecretValue;
use hmac::{Hmac, Mac};
use hyper::body::Bytes;
use hyper::{HeaderMap, StatusCode};
use serde::Deserialize;
use sha2::Sha256;
use tracing::{info, warn};

use super::{ApiError, Peer, Reply, State, json, parse_json};

/// The header carrying the Unix time the caller signed.
pub const TIMESTAMP_HEADER: &str = "x-dso-timestamp";
/// The header carrying `sha256=<hex HMAC>`.
pub const SIGNATURE_HEADER: &str = "x-dso-signature";
/// The config key of the key file.
pub const KEY_FILE_KEY: &str = "agent.http.webhook.secret_file";
/// Default replay window, either side of the agent's clock.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);
/// Most signatures remembered within the window; beyond it calls are refused (429) until
/// the oldest leave the window, so no signature is ever forgotten while it could replay.
pub const MAX_SEEN: usize = 4096;

/// The webhook's key, window and recently accepted signatures.
pub struct Webhook {
    key: SecretValue,
    tolerance: Duration,
    seen: Mutex<Seen>,
}

impl std::fmt::Debug for Webhook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Webhook")
            .field("tolerance", &self.tolerance)
            .finish_non_exhaustive()
    }
}

/// Accepted signatures with their timestamps, oldest first.
#[derive(Debug, Default)]
struct Seen {
    order: VecDeque<(u64, [u8; 32])>,
    set: HashSet<[u8; 32]>,
}

static HOOK: OnceLock<Webhook> = OnceLock::new();

/// Why a call was refused (the 401's message).
#[derive(Debug, PartialEq, Eq)]
pub struct Refused(pub String);

impl Webhook {
    /// A webhook with `key` and replay window `tolerance`.
    pub fn new(key: SecretValue, tolerance: Duration) -> Webhook {
        Webhook {
            key,
            tolerance,
            seen: Mutex::default(),
        }
    }

    /// Reads the key from `file`: refused when group or others may read or write it,
    /// or when it is empty. The error names the config key, never the content.
    pub fn from_file(file: &Path, tolerance: Duration) -> anyhow::Result<Webhook> {
        let meta = std::fs::metadata(file)
            .with_context(|| format!("{KEY_FILE_KEY}: cannot read {}", file.display()))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "{KEY_FILE_KEY}: {} has mode {mode:04o}; group and others must have no access to the webhook key (chmod 600 {})",
                file.display(),
                file.display()
            );
        }
        let raw = SecretValue::new(
            std::fs::read(file).with_context(|| format!("{KEY_FILE_KEY}: cannot read {}", file.display()))?,
        );
        let bytes = raw.expose();
        let end = bytes
            .iter()
            .rposition(|b| !b.is_ascii_whitespace())
            .map_or(0, |i| i + 1);
        if end == 0 {
            bail!(
                "{KEY_FILE_KEY}: {} is empty; write a key into it (openssl rand -hex 32 > {})",
                file.display(),
                file.display()
            );
        }
        Ok(Webhook::new(SecretValue::from_slice(&bytes[..end]), tolerance))
    }

    /// Checks one call at Unix time `now` (seconds): headers present and well formed,
    /// timestamp within the window, signature matching (constant time), not seen before.
    /// A call that passes is remembered until its timestamp leaves the window.
    pub fn verify(&self, now: u64, headers: &HeaderMap, body: &[u8]) -> Result<(), Refused> {
        let header = |name: &str| -> Result<&str, Refused> {
            headers
                .get(name)
                .ok_or_else(|| Refused(format!("missing header {name}")))?
                .to_str()
                .map_err(|_| Refused(format!("header {name} is not text")))
        };
        let ts_text = header(TIMESTAMP_HEADER)?;
        let sig_text = header(SIGNATURE_HEADER)?;
        let ts: u64 = ts_text.trim().parse().map_err(|_| {
            Refused(format!(
                "header {TIMESTAMP_HEADER}: {ts_text:?} is not Unix seconds"
            ))
        })?;
        let tolerance = self.tolerance.as_secs();
        if ts.abs_diff(now) > tolerance {
            return Err(Refused(format!(
                "header {TIMESTAMP_HEADER}: {ts} is {}s from the agent's clock ({now}); the window is {tolerance}s (stale request or clock skew)",
                ts.abs_diff(now)
            )));
        }
        let sig = sig_text
            .trim()
            .strip_prefix("sha256=")
            .and_then(decode_hex32)
            .ok_or_else(|| {
                Refused(format!(
                    "header {SIGNATURE_HEADER}: expected sha256=<64 hex digits>"
                ))
            })?;
        let mut mac = Hmac::<Sha256>::new_from_slice(self.key.expose()).expect("HMAC takes any key length");
        mac.update(ts_text.trim().as_bytes());
        mac.update(b".");
        mac.update(body);
        mac.verify_slice(&sig).map_err(|_| {
            Refused("signature does not match (wrong key, or body or timestamp changed)".to_owned())
        })?;
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        while let Some(&(t, s)) = seen.order.front() {
            if t.saturating_add(tolerance) >= now {
                break;
            }
            seen.order.pop_front();
            seen.set.remove(&s);
        }
        if seen.set.contains(&sig) {
            return Err(Refused(
                "replay: this signature was already accepted within the window".to_owned(),
            ));
        }
        if seen.order.len() >= MAX_SEEN {
            return Err(Refused(format!(
                "more than {MAX_SEEN} webhook calls within the window; try again later"
            )));
        }
        seen.order.push_back((ts, sig));
        seen.set.insert(sig);
        Ok(())
    }
}

fn decode_hex32(text: &str) -> Option<[u8; 32]> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        out[i] = u8::try_from(hi * 16 + lo).ok()?;
    }
    Some(out)
}

/// Turns the webhook on with `hook`. Called once at start; later calls change nothing.
pub fn configure(hook: Webhook) {
    let _ = HOOK.set(hook);
}

/// Body of `POST /v1/webhook`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Body {
    /// The secret (`secrets[].name`) to look at; every secret when absent.
    #[serde(default)]
    secret: Option<String>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// `POST /v1/webhook`.
pub async fn receive(
    With(state): With<State>,
    peer: Option<Extension<Peer>>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let Some(hook) = HOOK.get() else {
        return Err(ApiError::not_found(format!(
            "the webhook is off: set {KEY_FILE_KEY} in the agent's config to turn it on (see docs/api.md)"
        )));
    };
    let from = peer.map(|Extension(p)| format!("{p:?}")).unwrap_or_default();
    if let Err(Refused(reason)) = hook.verify(now_secs(), &headers, &body) {
        warn!(peer = %from, reason = %reason, "webhook call refused; nothing triggered");
        let status = if reason.starts_with("more than") {
            StatusCode::TOO_MANY_REQUESTS
        } else {
            StatusCode::UNAUTHORIZED
        };
        return Err(ApiError {
            status,
            message: format!("webhook refused: {reason}"),
        });
    }
    let body: Body = parse_json(&body)?;
    let secrets = state.secrets.as_ref().ok_or_else(|| ApiError {
        status: StatusCode::CONFLICT,
        message: "the agent's config has no providers or secrets; nothing to look at".to_owned(),
    })?;
    let polled = secrets.poke(body.secret.as_deref()).ok_or_else(|| {
        ApiError::not_found(format!(
            "no secret {:?} in the agent's config (secrets[].name)",
            body.secret.as_deref().unwrap_or("")
        ))
    })?;
    info!(peer = %from, secret = ?body.secret, polled = ?polled, "webhook: providers polled now");
    json(
        StatusCode::ACCEPTED,
        &serde_json::json!({ "secret": body.secret, "polled": polled }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sign(key: &[u8], ts: &str, body: &[u8]) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).unwrap();
        mac.update(format!("{ts}.").as_bytes());
        mac.update(body);
        let sig: String = mac
            .finalize()
            .into_bytes()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        format!("sha256={sig}")
    }

    fn headers(ts: &str, sig: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(TIMESTAMP_HEADER, ts.parse().unwrap());
        h.insert(SIGNATURE_HEADER, sig.parse().unwrap());
        h
    }

    fn hook() -> Webhook {
        Webhook::new(SecretValue::from_slice(b"k3y"), Duration::from_secs(300))
    }

    #[test]
    fn a_good_signature_passes_once() {
        let h = hook();
        let body = br#"{"secret":"app"}"#;
        let hs = headers("1000", &sign(b"k3y", "1000", body));
        assert_eq!(h.verify(1000, &hs, body), Ok(()));
        let again = h.verify(1001, &hs, body).unwrap_err();
        assert!(again.0.starts_with("replay"), "{again:?}");
        // Uppercase hex is the same signature, still a replay.
        let upper = headers(
            "1000",
            &sign(b"k3y", "1000", body)
                .to_uppercase()
                .replace("SHA256=", "sha256="),
        );
        assert!(h.verify(1002, &upper, body).unwrap_err().0.starts_with("replay"));
    }

    #[test]
    fn wrong_key_body_or_timestamp_is_refused() {
        let h = hook();
        let body = b"{}";
        let r = h.verify(1000, &headers("1000", &sign(b"other", "1000", body)), body);
        assert!(r.unwrap_err().0.contains("does not match"));
        let r = h.verify(1000, &headers("1000", &sign(b"k3y", "1000", body)), b"{ }");
        assert!(r.unwrap_err().0.contains("does not match"));
        let r = h.verify(1000, &headers("999", &sign(b"k3y", "1000", body)), body);
        assert!(r.unwrap_err().0.contains("does not match"));
        let r = h.verify(1000, &headers("1000", "sha256=abc"), body);
        assert!(r.unwrap_err().0.contains("64 hex digits"));
        let r = h.verify(1000, &headers("1000", "md5=00"), body);
        assert!(r.unwrap_err().0.contains("64 hex digits"));
    }

    #[test]
    fn the_window_holds_both_ways() {
        let h = hook();
        let body = b"{}";
        for (ts, ok) in [("699", false), ("700", true), ("1300", true), ("1301", false)] {
            let r = h.verify(1000, &headers(ts, &sign(b"k3y", ts, body)), body);
            assert_eq!(r.is_ok(), ok, "{ts}: {r:?}");
            if !ok {
                assert!(r.unwrap_err().0.contains("window is 300s"));
            }
        }
        let r = h.verify(1000, &headers("soon", &sign(b"k3y", "soon", body)), body);
        assert!(r.unwrap_err().0.contains("not Unix seconds"));
    }

    #[test]
    fn the_docs_openssl_example_verifies() {
        // docs/api.md: `printf '%s.%s' 1700000000 '{}' | openssl dgst -sha256 -hmac k3y`.
        let h = hook();
        let sig = "sha256=e2974d0d973957aed8182a7f1ef5690a188566c2c4620fc16bd97d7febcf5ef3";
        assert_eq!(sign(b"k3y", "1700000000", b"{}"), sig);
        assert_eq!(
            h.verify(1_700_000_000, &headers("1700000000", sig), b"{}"),
            Ok(())
        );
    }

    #[test]
    fn missing_headers_are_named() {
        let h = hook();
        let mut only_ts = HeaderMap::new();
        only_ts.insert(TIMESTAMP_HEADER, "1000".parse().unwrap());
        assert_eq!(
            h.verify(1000, &only_ts, b"{}").unwrap_err().0,
            "missing header x-dso-signature"
        );
        assert_eq!(
            h.verify(1000, &HeaderMap::new(), b"{}").unwrap_err().0,
            "missing header x-dso-timestamp"
        );
    }

    #[test]
    fn signatures_leave_the_memory_with_the_window_and_the_memory_is_bounded() {
        let h = Webhook::new(SecretValue::from_slice(b"k"), Duration::from_secs(10));
        for i in 0..MAX_SEEN as u64 {
            let body = format!("{{\"n\":{i}}}");
            let r = h.verify(
                1000,
                &headers("1000", &sign(b"k", "1000", body.as_bytes())),
                body.as_bytes(),
            );
            assert!(r.is_ok(), "{i}: {r:?}");
        }
        let body = b"{\"n\":-1}";
        let r = h.verify(1000, &headers("1000", &sign(b"k", "1000", body)), body);
        assert!(r.unwrap_err().0.starts_with("more than"));
        // Once the first ones are out of the window they are forgotten (and could not
        // pass the window check anyway).
        let r = h.verify(1011, &headers("1011", &sign(b"k", "1011", body)), body);
        assert_eq!(r, Ok(()));
        assert_eq!(h.seen.lock().unwrap().order.len(), 1);
    }

    #[test]
    fn the_key_file_must_be_private_and_not_empty() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("key");
        std::fs::write(&f, "s3cret-key\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Webhook::from_file(&f, DEFAULT_TOLERANCE).unwrap_err().to_string();
        assert!(
            e.contains(KEY_FILE_KEY) && e.contains("0640") && !e.contains("s3cret"),
            "{e}"
        );
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o600)).unwrap();
        let h = Webhook::from_file(&f, DEFAULT_TOLERANCE).unwrap();
        // The trailing newline is not part of the key.
        let body = b"{}";
        assert_eq!(
            h.verify(5, &headers("5", &sign(b"s3cret-key", "5", body)), body),
            Ok(())
        );
        std::fs::write(&f, "\n").unwrap();
        let e = Webhook::from_file(&f, DEFAULT_TOLERANCE).unwrap_err().to_string();
        assert!(e.contains("is empty"), "{e}");
        let e = Webhook::from_file(&dir.path().join("none"), DEFAULT_TOLERANCE)
            .unwrap_err()
            .to_string();
        assert!(e.contains(KEY_FILE_KEY), "{e}");
    }
}
