//! [`Redactor`]: replaces every known secret value in text with `[REDACTED]`.
//!
//! Every value the agent holds is registered here while it is held (its raw bytes, its
//! standard and URL-safe base64 forms, and its JSON-escaped form, since errors and API
//! answers may embed either). The binary passes every log line and every API answer
//! through [`Redactor::redact`]; libraries need not remember to.
//!
//! Values shorter than [`MIN_REDACTED_LEN`] bytes are not registered: redacting every
//! `a` in the logs would make them useless and hide nothing a guess would not find.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock, RwLock};

use aho_corasick::AhoCorasick;
use base64::Engine as _;
use zeroize::Zeroizing;

use crate::value::SecretValue;

/// What a redacted value is replaced with.
pub const REDACTED: &str = "[REDACTED]";

/// Shortest value that is redacted.
pub const MIN_REDACTED_LEN: usize = 4;

/// The set of values to scrub, with a matcher rebuilt when the set changes.
#[derive(Default)]
pub struct Redactor {
    inner: RwLock<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Each pattern and how many registrations hold it.
    patterns: HashMap<Pattern, usize>,
    /// Built from `patterns`; `None` when there is nothing to redact.
    matcher: Option<Arc<AhoCorasick>>,
    /// `patterns` changed since `matcher` was built: rebuilt at the next redaction, so a
    /// burst of registrations (10,000 values at an agent's start) builds it once, not once
    /// per value (quadratic: minutes for 10,000 values).
    dirty: bool,
}

impl Redactor {
    /// The process-wide redactor the binary's log writer and API use.
    pub fn global() -> &'static Redactor {
        static GLOBAL: OnceLock<Redactor> = OnceLock::new();
        GLOBAL.get_or_init(Redactor::default)
    }

    /// Starts redacting `value` (and its encoded forms). Registrations are counted: the
    /// value stays redacted until [`forget`](Redactor::forget) was called as many times.
    pub fn register(&self, value: &SecretValue) {
        let forms = forms(value);
        if forms.is_empty() {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for form in forms {
            *inner.patterns.entry(form).or_insert(0) += 1;
        }
        inner.dirty = true;
    }

    /// Undoes one [`register`](Redactor::register) of `value`.
    pub fn forget(&self, value: &SecretValue) {
        let forms = forms(value);
        if forms.is_empty() {
            return;
        }
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        for form in forms {
            if let Some(n) = inner.patterns.get_mut(&form) {
                *n -= 1;
                if *n == 0 {
                    inner.patterns.remove(&form);
                }
            }
        }
        inner.dirty = true;
    }

    /// How many distinct patterns are registered (for tests and metrics).
    pub fn len(&self) -> usize {
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .patterns
            .len()
    }

    /// Whether nothing is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// `text` with every registered value replaced by [`REDACTED`].
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.redact_bytes(text.as_bytes()) {
            Cow::Borrowed(_) => Cow::Borrowed(text),
            // Replacing whole matches of byte patterns can split a multi-byte character
            // only if a pattern starts or ends inside one; lossy conversion keeps the
            // output valid UTF-8 either way.
            Cow::Owned(bytes) => Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
        }
    }

    /// `bytes` with every registered value replaced by [`REDACTED`].
    pub fn redact_bytes<'a>(&self, bytes: &'a [u8]) -> Cow<'a, [u8]> {
        let matcher = {
            let inner = self.inner.read().unwrap_or_else(|e| e.into_inner());
            if inner.dirty {
                drop(inner);
                let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
                if inner.dirty {
                    inner.rebuild();
                    inner.dirty = false;
                }
                inner.matcher.clone()
            } else {
                inner.matcher.clone()
            }
        };
        let Some(matcher) = matcher else {
            return Cow::Borrowed(bytes);
        };
        if !matcher.is_match(bytes) {
            return Cow::Borrowed(bytes);
        }
        let mut out = Vec::with_capacity(bytes.len());
        let mut last = 0;
        for m in matcher.find_iter(bytes) {
            out.extend_from_slice(&bytes[last..m.start()]);
            out.extend_from_slice(REDACTED.as_bytes());
            last = m.end();
        }
        out.extend_from_slice(&bytes[last..]);
        Cow::Owned(out)
    }
}

impl Inner {
    fn rebuild(&mut self) {
        if self.patterns.is_empty() {
            self.matcher = None;
            return;
        }
        // Longest first, so a value wins over a shorter value it contains.
        let mut pats: Vec<&[u8]> = self.patterns.keys().map(|p| p.0.as_slice()).collect();
        pats.sort_by_key(|p| std::cmp::Reverse(p.len()));
        // A few large values (hundreds of KiB) would make the automatic choice build a
        // DFA for minutes while holding the lock every log line waits on; past 64 KiB of
        // patterns the contiguous NFA is built in linear time instead.
        let total: usize = pats.iter().map(|p| p.len()).sum();
        let kind = (total > 64 * 1024).then_some(aho_corasick::AhoCorasickKind::ContiguousNFA);
        self.matcher = AhoCorasick::builder()
            .match_kind(aho_corasick::MatchKind::LeftmostLongest)
            .kind(kind)
            .build(pats)
            .ok()
            .map(Arc::new);
    }
}

/// One form of a value to look for; zeroed on drop.
#[derive(PartialEq, Eq, Hash)]
struct Pattern(Vec<u8>);

impl Drop for Pattern {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.0);
    }
}

/// The forms of a value that may appear in text.
fn forms(value: &SecretValue) -> Vec<Pattern> {
    let raw = value.expose();
    if raw.len() < MIN_REDACTED_LEN {
        return Vec::new();
    }
    let mut out = vec![Pattern(raw.to_vec())];
    let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
    let b64_trimmed = b64.trim_end_matches('=').to_string();
    let url = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(raw);
    out.push(Pattern(b64_trimmed.into_bytes()));
    out.push(Pattern(url.into_bytes()));
    drop(Zeroizing::new(b64));
    if let Ok(text) = std::str::from_utf8(raw) {
        let json = serde_json::to_string(text).unwrap_or_default();
        let inner = &json[1..json.len().saturating_sub(1).max(1)];
        if inner.as_bytes() != raw {
            out.push(Pattern(inner.as_bytes().to_vec()));
        }
        // Debug formatting (`{:?}`) escapes like JSON for the common cases; one line of a
        // multi-line value may be logged alone, so long lines are redacted too.
        for line in text.lines() {
            if line.len() >= 8 && line.len() < raw.len() {
                out.push(Pattern(line.as_bytes().to_vec()));
            }
        }
        drop(Zeroizing::new(json));
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_raw_base64_and_json_forms() {
        let r = Redactor::default();
        let v = SecretValue::from_slice(b"hunter2\"quoted\"\nsecond line here");
        r.register(&v);
        let b64 = base64::engine::general_purpose::STANDARD.encode(v.expose());
        let line = format!(
            "raw={} b64={b64} json={:?}",
            "hunter2\"quoted\"\nsecond line here", "hunter2\"quoted\"\nsecond line here"
        );
        let out = r.redact(&line);
        assert!(!out.contains("hunter2"), "{out}");
        assert!(!out.contains(&b64[..b64.len() - 2]), "{out}");
        assert!(!out.contains("second line here"), "{out}");
        r.forget(&v);
        assert!(r.is_empty());
        assert_eq!(r.redact("hunter2"), "hunter2");
    }

    #[test]
    fn counted_registrations_and_short_values() {
        let r = Redactor::default();
        let v = SecretValue::from_slice(b"topsecret");
        r.register(&v);
        r.register(&v);
        r.forget(&v);
        assert_eq!(r.redact("x topsecret y"), "x [REDACTED] y");
        r.forget(&v);
        assert_eq!(r.redact("x topsecret y"), "x topsecret y");
        r.register(&SecretValue::from_slice(b"ab"));
        assert!(r.is_empty());
    }
}
