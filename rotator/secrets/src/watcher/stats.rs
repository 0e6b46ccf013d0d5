//! [`ProviderStats`]: what the watcher counts of one provider instance, where it happens
//! (the gate counts each call attempt, the poll loop counts changes and keeps the health
//! figures), in atomics the handle reads without asking the watcher task. The watcher's own
//! [`Status`](super::Status) reads the health figures from here too: one copy of each.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;

/// The two calls the watcher makes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Call {
    /// [`Provider::version`](crate::Provider::version): metadata only, one per poll.
    Version,
    /// [`Provider::fetch`](crate::Provider::fetch): a value, once per change.
    Fetch,
}

impl Call {
    /// Both calls, in the order [`Call::index`] numbers them.
    pub const ALL: [Call; 2] = [Call::Version, Call::Fetch];

    /// The metric label: `version` or `fetch`.
    pub fn as_str(self) -> &'static str {
        match self {
            Call::Version => "version",
            Call::Fetch => "fetch",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Why a call failed, as a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// [`Error::NotFound`].
    NotFound,
    /// [`Error::Forbidden`].
    Forbidden,
    /// [`Error::Auth`].
    Auth,
    /// [`Error::Throttled`].
    Throttled,
    /// [`Error::Unavailable`] from the provider (refused, 5xx, sealed).
    Unavailable,
    /// No answer within the provider's `timeout` (the gate gave up on the call).
    Timeout,
    /// [`Error::Unusable`].
    Unusable,
    /// [`Error::InvalidReference`].
    InvalidReference,
    /// [`Error::Config`] (a failed connect of a misconfigured provider included).
    Config,
    /// [`Error::Protocol`].
    Protocol,
}

impl ErrorKind {
    /// Every kind, in the order [`ErrorKind::index`] numbers them.
    pub const ALL: [ErrorKind; 10] = [
        ErrorKind::NotFound,
        ErrorKind::Forbidden,
        ErrorKind::Auth,
        ErrorKind::Throttled,
        ErrorKind::Unavailable,
        ErrorKind::Timeout,
        ErrorKind::Unusable,
        ErrorKind::InvalidReference,
        ErrorKind::Config,
        ErrorKind::Protocol,
    ];

    /// The kind of a provider's error (a timeout is told apart by the gate, not here).
    pub fn of(e: &Error) -> ErrorKind {
        match e {
            Error::NotFound { .. } => ErrorKind::NotFound,
            Error::Forbidden { .. } => ErrorKind::Forbidden,
            Error::Auth { .. } => ErrorKind::Auth,
            Error::Throttled { .. } => ErrorKind::Throttled,
            Error::Unavailable { .. } => ErrorKind::Unavailable,
            Error::Unusable { .. } => ErrorKind::Unusable,
            Error::InvalidReference { .. } => ErrorKind::InvalidReference,
            Error::Config { .. } => ErrorKind::Config,
            Error::Protocol { .. } => ErrorKind::Protocol,
        }
    }

    /// The metric label, e.g. `not_found`.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::NotFound => "not_found",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::Auth => "auth",
            ErrorKind::Throttled => "throttled",
            ErrorKind::Unavailable => "unavailable",
            ErrorKind::Timeout => "timeout",
            ErrorKind::Unusable => "unusable",
            ErrorKind::InvalidReference => "invalid_reference",
            ErrorKind::Config => "config",
            ErrorKind::Protocol => "protocol",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

const CALLS: usize = Call::ALL.len();
const KINDS: usize = ErrorKind::ALL.len();

/// Counters and health of one provider instance since the watcher started. Every field is
/// an atomic written where the event happens; reads are relaxed (each figure is exact, two
/// figures read one after the other may be one call apart).
#[derive(Debug, Default)]
pub struct ProviderStats {
    /// Successful call attempts, per [`Call`].
    ok: [AtomicU64; CALLS],
    /// Failed call attempts, per [`Call`] and [`ErrorKind`].
    errors: [[AtomicU64; KINDS]; CALLS],
    /// Polls that saw an object's version differ from the one seen before.
    changes: AtomicU64,
    /// Times the provider went down (calls started failing on transient or auth errors).
    outages: AtomicU64,
    /// Whether the provider is down (see [`ProviderStats::up`]).
    down: AtomicBool,
    /// Failed calls since the last success.
    failures: AtomicU32,
    /// Last call the provider answered (a value, a version or a definite error such as not
    /// found), Unix milliseconds; 0 before the first.
    last_success_ms: AtomicU64,
}

impl ProviderStats {
    /// Call attempts of `call` that succeeded. Each attempt the gate makes counts (a retry
    /// is a second attempt), a failed connect counts as a failed attempt of its call.
    pub fn calls_ok(&self, call: Call) -> u64 {
        self.ok[call.index()].load(Ordering::Relaxed)
    }

    /// Call attempts of `call` that failed, of any kind.
    pub fn calls_failed(&self, call: Call) -> u64 {
        ErrorKind::ALL.iter().map(|k| self.errors(call, *k)).sum()
    }

    /// Call attempts of `call` that failed with `kind`.
    pub fn errors(&self, call: Call, kind: ErrorKind) -> u64 {
        self.errors[call.index()][kind.index()].load(Ordering::Relaxed)
    }

    /// Polls that returned a version different from the one the watcher had seen for that
    /// object (the first version seen after start is not a change).
    pub fn version_changes(&self) -> u64 {
        self.changes.load(Ordering::Relaxed)
    }

    /// Times calls to the provider started failing (transient or authentication errors).
    pub fn outages(&self) -> u64 {
        self.outages.load(Ordering::Relaxed)
    }

    /// False after a call failed on a transient or authentication error, until a call
    /// succeeds.
    pub fn up(&self) -> bool {
        !self.down.load(Ordering::Relaxed)
    }

    /// Failed calls (transient or authentication errors) since the last success.
    pub fn consecutive_failures(&self) -> u32 {
        self.failures.load(Ordering::Relaxed)
    }

    /// The last call the provider answered (a version, a value, or a definite answer such
    /// as not found), Unix milliseconds; `None` before the first.
    pub fn last_success_unix_ms(&self) -> Option<u64> {
        match self.last_success_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(ms),
        }
    }

    /// One call attempt ended: `Ok`, or failed with `kind`.
    pub(crate) fn count(&self, call: Call, result: Result<(), ErrorKind>) {
        match result {
            Ok(()) => &self.ok[call.index()],
            Err(kind) => &self.errors[call.index()][kind.index()],
        }
        .fetch_add(1, Ordering::Relaxed);
    }

    /// A poll saw a new version of an object it had a version of.
    pub(crate) fn changed(&self) {
        self.changes.fetch_add(1, Ordering::Relaxed);
    }

    /// The provider answered; returns whether it was down until now.
    pub(crate) fn answered(&self) -> bool {
        self.failures.store(0, Ordering::Relaxed);
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        self.last_success_ms.store(ms.max(1), Ordering::Relaxed);
        self.down.swap(false, Ordering::Relaxed)
    }

    /// A call failed on a transient or authentication error; returns whether the provider
    /// just went down.
    pub(crate) fn failed(&self) -> bool {
        self.failures.fetch_add(1, Ordering::Relaxed);
        let went_down = !self.down.swap(true, Ordering::Relaxed);
        if went_down {
            self.outages.fetch_add(1, Ordering::Relaxed);
        }
        went_down
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_call_and_kind_and_health_moves_with_answers() {
        let s = ProviderStats::default();
        assert!(s.up());
        assert_eq!(s.last_success_unix_ms(), None);
        s.count(Call::Version, Ok(()));
        s.count(Call::Version, Err(ErrorKind::Timeout));
        s.count(Call::Fetch, Err(ErrorKind::NotFound));
        s.count(Call::Fetch, Err(ErrorKind::NotFound));
        assert_eq!(s.calls_ok(Call::Version), 1);
        assert_eq!(s.calls_failed(Call::Version), 1);
        assert_eq!(s.errors(Call::Version, ErrorKind::Timeout), 1);
        assert_eq!(s.errors(Call::Fetch, ErrorKind::NotFound), 2);
        assert_eq!(s.calls_ok(Call::Fetch), 0);
        assert!(s.failed(), "the first failure takes it down");
        assert!(!s.failed());
        assert_eq!((s.up(), s.consecutive_failures(), s.outages()), (false, 2, 1));
        assert!(s.answered(), "it was down");
        assert_eq!((s.up(), s.consecutive_failures()), (true, 0));
        assert!(s.last_success_unix_ms().is_some());
    }
}
