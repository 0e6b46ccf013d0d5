//! `dso-proxy`: the L4 proxy at the heart of dso.
//!
//! It owns listening sockets and forwards each accepted connection to a backend chosen
//! from the listener's current route. A route is replaced whole and atomically
//! ([`Listener::swap`]); connections keep the generation they were routed under and drain
//! with a deadline. A listener can hold new connections ([`Listener::pause`]) while its
//! backend restarts. The crate knows nothing of Docker or secrets.
//!
//! Where to start reading: [`Proxy`] (`proxy.rs`) holds the listeners; `listener.rs` owns
//! a port, its accept loop and the control operations; `route.rs` defines the route value
//! and its generations; `conn.rs` takes one connection through hold, dial and retry;
//! `forward.rs` moves the bytes (bulk data zero-copy through `splice.rs` on Linux);
//! `stats.rs` has the counters and snapshots; `socket.rs`
//! keeps socket options (socket2) in one place; `handover.rs` exports a listener's state
//! and socket for a new process and imports them there (hitless upgrade).
//!
//! Signals and process lifetime are the binary's business: [`Proxy::shutdown`] and
//! [`Proxy::force_close`] are what it calls.

mod config;
mod conn;
mod error;
mod forward;
mod handover;
mod listener;
mod proxy;
mod route;
mod socket;
#[cfg(target_os = "linux")]
mod splice;
mod stats;
mod worker;

pub use config::{ListenerConfig, ProxyConfig};
#[doc(hidden)]
pub use conn::accept_path_once;
pub use error::Error;
pub use handover::{Exported, ListenerSettings, ListenerState};
pub use listener::{
    DrainReport, DrainStatus, Listener, MAX_BACKENDS, MAX_WAIT, Swap, check_backends, routes_to_itself,
};
pub use proxy::{Proxy, ShutdownReport};
pub use route::Backend;
pub use stats::{
    BackendSnapshot, CounterSnapshot, GenerationPhase, GenerationSnapshot, LatencySnapshot, ListenerSnapshot,
    ProxySnapshot,
};
