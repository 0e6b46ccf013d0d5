//! The error type of `dso-rotator`.

use std::time::Duration;

use crate::engine::EngineError;
use crate::labels::LabelError;

/// What went wrong in discovery or a rotation. Cloneable, because every request merged
/// into one rotation gets its result. Messages never carry a secret value.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// A Docker call failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// Secret delivery failed (store, layout, a missing value); nothing was created.
    #[error("secret delivery: {0}")]
    Delivery(String),
    /// A dso label is malformed.
    #[error(transparent)]
    Label(#[from] LabelError),
    /// The proxy refused an operation (bind, swap).
    #[error("proxy: {0}")]
    Proxy(String),
    /// The journal or a lock file could not be written.
    #[error("state directory: {what}: {message}")]
    State {
        /// What was being written.
        what: String,
        /// The operating system's message.
        message: String,
    },
    /// No managed container or service has this name.
    #[error("no managed service or container named {target:?}; managed: {known}")]
    NotFound {
        /// What was asked for.
        target: String,
        /// Managed services, comma-separated.
        known: String,
    },
    /// A service name that several Compose projects use.
    #[error("{target:?} names a service in several projects; use one of: {candidates}")]
    Ambiguous {
        /// What was asked for.
        target: String,
        /// The matching `project/service` keys.
        candidates: String,
    },
    /// The service has no running container to rotate.
    #[error("service {service} has no running container to rotate; start it first")]
    NothingRunning {
        /// Service.
        service: String,
    },
    /// A new container did not become healthy in time.
    #[error("container {container} not healthy after {}ms: {last}", waited.as_millis())]
    Unhealthy {
        /// Container name or short ID.
        container: String,
        /// How long it was waited for.
        waited: Duration,
        /// The last check's result.
        last: String,
    },
    /// A container stopped while it was expected to run.
    #[error("container {container} exited")]
    Exited {
        /// Container name.
        container: String,
    },
    /// A container disappeared during the rotation.
    #[error("container {container} disappeared")]
    Vanished {
        /// Container short ID.
        container: String,
    },
    /// The strategy cannot be used for this service.
    #[error("service {service}: {strategy} refused: {reason}; {hint}")]
    Refused {
        /// Service.
        service: String,
        /// Strategy refused.
        strategy: String,
        /// Why.
        reason: String,
        /// How to override.
        hint: String,
    },
}

impl Error {
    /// A delivery error, as text (the error type is not `Clone`).
    pub fn delivery(e: crate::delivery::DeliveryError) -> Self {
        Error::Delivery(e.to_string())
    }

    /// A state-directory error.
    pub fn state(what: impl Into<String>, e: std::io::Error) -> Self {
        Error::State {
            what: what.into(),
            message: e.to_string(),
        }
    }
}

impl From<dso_proxy::Error> for Error {
    fn from(e: dso_proxy::Error) -> Self {
        Error::Proxy(e.to_string())
    }
}
