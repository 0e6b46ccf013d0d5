//! The crate's one error type. Every variant names the provider instance and, where there
//! is one, the reference; none ever carries a value.

use std::time::Duration;

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Why a provider, a reference or the local vault failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A reference does not follow its provider's syntax.
    #[error("provider {provider}: invalid reference {reference:?}: {reason}")]
    InvalidReference {
        /// Provider instance name.
        provider: String,
        /// The reference as written.
        reference: String,
        /// What is wrong and what was expected.
        reason: String,
    },
    /// The secret (or the version asked for) does not exist.
    #[error("provider {provider}: {reference:?} not found")]
    NotFound {
        /// Provider instance name.
        provider: String,
        /// The reference as written.
        reference: String,
    },
    /// The credentials are valid but may not read this secret.
    #[error("provider {provider}: access to {reference:?} denied: {detail}")]
    Forbidden {
        /// Provider instance name.
        provider: String,
        /// The reference as written.
        reference: String,
        /// The provider's reason (never a value).
        detail: String,
    },
    /// Logging in failed or the credentials were rejected.
    #[error("provider {provider}: authentication failed: {detail}")]
    Auth {
        /// Provider instance name.
        provider: String,
        /// What was rejected.
        detail: String,
    },
    /// The provider asked us to slow down.
    #[error("provider {provider}: throttled{}", retry_after.map(|d| format!(" (retry after {d:?})")).unwrap_or_default())]
    Throttled {
        /// Provider instance name.
        provider: String,
        /// The provider's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
    },
    /// The provider did not answer, answered 5xx, or is sealed: worth retrying later.
    #[error("provider {provider}: unavailable: {detail}")]
    Unavailable {
        /// Provider instance name.
        provider: String,
        /// What happened (connection refused, 503, sealed...).
        detail: String,
    },
    /// The secret was read but cannot be delivered (empty, JSON key missing, too large).
    #[error("provider {provider}: {reference:?} cannot be used: {reason}")]
    Unusable {
        /// Provider instance name.
        provider: String,
        /// The reference as written.
        reference: String,
        /// Why (never the value).
        reason: String,
    },
    /// The provider's settings are wrong (a missing file, a bad URL).
    #[error("provider {provider}: {detail}")]
    Config {
        /// Provider instance name.
        provider: String,
        /// What is wrong and how to fix it.
        detail: String,
    },
    /// The provider answered something that does not follow its API.
    #[error("provider {provider}: unexpected answer: {detail}")]
    Protocol {
        /// Provider instance name.
        provider: String,
        /// What was unexpected (never a value).
        detail: String,
    },
}

impl Error {
    /// Whether the same call may succeed later without any change on our side
    /// (throttling, outages); the watcher backs off and retries these, and keeps the last
    /// good value meanwhile.
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Throttled { .. } | Error::Unavailable { .. })
    }

    /// The delay the provider asked for, when it asked for one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Error::Throttled { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// An error and its sources on one line, without repeating a source that the message
/// already quotes (HTTP client errors often do). For provider error details: the errors
/// of the HTTP stacks used here carry URLs and reasons, never a response body.
#[cfg(any(feature = "vault", feature = "azure"))]
pub(crate) fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let s_text = s.to_string();
        if !text.contains(&s_text) {
            text.push_str(": ");
            text.push_str(&s_text);
        }
        source = s.source();
    }
    text
}

/// A `Retry-After` header value in seconds (the HTTP-date form is not read: the providers
/// here send seconds), for [`Error::Throttled`].
#[cfg(any(feature = "vault", feature = "azure", feature = "aws"))]
pub(crate) fn retry_after(value: Option<&str>) -> Option<Duration> {
    value?.trim().parse::<u64>().ok().map(Duration::from_secs)
}
