//! The one error type of `dso-proxy`.

use std::io;
use std::net::SocketAddr;

/// What went wrong in a proxy operation. Each variant carries what a caller needs to report
/// it or act on it; none carries data that crossed the proxy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The listening socket could not be created, bound or put into listening state.
    #[error("listener {listener}: cannot listen on {addr}")]
    Bind {
        /// Name of the listener.
        listener: String,
        /// Address as configured.
        addr: SocketAddr,
        /// The operating system's reason.
        #[source]
        source: io::Error,
    },
    /// A listener with this name already exists.
    #[error("listener {name} already exists")]
    DuplicateListener {
        /// The name that was asked for twice.
        name: String,
    },
    /// No listener has this name.
    #[error("unknown listener {name:?}; listeners: {}", list(known))]
    UnknownListener {
        /// The name that was asked for.
        name: String,
        /// The names that do exist, sorted.
        known: Vec<String>,
    },
    /// The generation is neither current nor draining on this listener.
    #[error("listener {listener}: generation {generation} is unknown (current is {current})")]
    UnknownGeneration {
        /// Name of the listener.
        listener: String,
        /// The generation that was asked for.
        generation: u64,
        /// The listener's current generation.
        current: u64,
    },
    /// A route was given an empty list of backends where at least one is needed.
    #[error("listener {listener}: a route needs at least one backend")]
    NoBackends {
        /// Name of the listener.
        listener: String,
    },
    /// A backend address is the listener's own address: connections would loop.
    #[error("listener {listener}: backend {backend} is the listener's own address")]
    SelfLoop {
        /// Name of the listener.
        listener: String,
        /// The offending backend.
        backend: SocketAddr,
    },
    /// A route was given more backends than a listener takes.
    #[error("listener {listener}: {count} backends given; a route takes at most {max}")]
    TooManyBackends {
        /// Name of the listener.
        listener: String,
        /// How many were given.
        count: usize,
        /// The bound ([`crate::MAX_BACKENDS`]).
        max: usize,
    },
    /// A backend address has port 0, which cannot be dialed.
    #[error("listener {listener}: backend {backend} has port 0; give the port the backend listens on")]
    PortZero {
        /// Name of the listener.
        listener: String,
        /// The offending backend.
        backend: SocketAddr,
    },
    /// The proxy is shutting down and takes no new listeners.
    #[error("the proxy is shutting down")]
    ShuttingDown,
}

fn list(names: &[String]) -> String {
    if names.is_empty() {
        "(none)".to_owned()
    } else {
        names.join(", ")
    }
}
