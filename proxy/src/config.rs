//! Validated settings the proxy takes as arguments. File formats live in the binary.

use std::net::SocketAddr;
use std::time::Duration;

use crate::route::Backend;

/// Everything one listener needs. Build it with [`ListenerConfig::new`] and override the
/// defaults field by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerConfig {
    /// Unique name, used by every command that addresses the listener.
    pub name: String,
    /// Address to bind, taken exactly as given: `127.0.0.1:5432` stays loopback-only.
    pub listen: SocketAddr,
    /// Initial backends. Empty is allowed: connections then fail (and are counted) until a
    /// route is installed, or wait if the listener is paused.
    pub backends: Vec<Backend>,
    /// Listen backlog (accept queue length). Default 1024.
    pub backlog: u32,
    /// How long replaced connections may keep flowing after a swap. Default 30 s.
    pub drain_timeout: Duration,
    /// Window over which connections still open at a drain deadline are closed, so their
    /// clients do not all reconnect at the same instant. Default 1 s.
    pub close_window: Duration,
    /// Longest a pause may last; held connections are closed when it passes. Default 30 s.
    pub hold_max: Duration,
    /// Timeout of one backend dial. Default 5 s.
    pub connect_timeout: Duration,
    /// Dial attempts per client connection, first one included. Default 3.
    pub dial_attempts: u32,
    /// Total time the dial attempts of one connection may take. Default 10 s.
    pub dial_budget: Duration,
    /// Close a connection after this long without a byte either way. Default: never
    /// (idle database connections are normal).
    pub idle_timeout: Option<Duration>,
    /// Most connections this listener serves at once (forwarding or held). Default: no limit.
    pub max_connections: Option<usize>,
    /// TCP keepalive idle time on both legs. Default 60 s.
    pub keepalive: Option<Duration>,
}

impl ListenerConfig {
    /// A listener with the documented defaults.
    pub fn new(name: impl Into<String>, listen: SocketAddr, backends: Vec<Backend>) -> Self {
        ListenerConfig {
            name: name.into(),
            listen,
            backends,
            backlog: 1024,
            drain_timeout: Duration::from_secs(30),
            close_window: Duration::from_secs(1),
            hold_max: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            dial_attempts: 3,
            dial_budget: Duration::from_secs(10),
            idle_timeout: None,
            max_connections: None,
            keepalive: Some(Duration::from_secs(60)),
        }
    }
}

/// Settings of the whole proxy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ProxyConfig {
    /// Most connections all listeners together serve at once. Default: no limit.
    pub max_connections: Option<usize>,
}
