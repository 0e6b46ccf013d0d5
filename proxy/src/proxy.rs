//! The set of listeners of one process, the global connection limit, and shutdown.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::{ListenerConfig, ProxyConfig};
use crate::error::Error;
use crate::listener::{Listener, Parent};
use crate::stats::ProxySnapshot;

/// A running proxy: named listeners, each owning a port. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    listeners: RwLock<BTreeMap<String, Listener>>,
    global_limit: Option<Arc<Semaphore>>,
    /// Cancelled to stop every accept loop.
    stop: CancellationToken,
    /// Cancelled to close every connection.
    kill: CancellationToken,
    /// Every connection task, for shutdown.
    connections: TaskTracker,
}

/// How a shutdown ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShutdownReport {
    /// Connections that finished by themselves before the deadline.
    pub drained: bool,
    /// Connections still open at the deadline and closed.
    pub forced: u64,
    /// Milliseconds the shutdown took.
    pub took_ms: u64,
}

impl Proxy {
    /// A proxy with no listener yet.
    pub fn new(cfg: ProxyConfig) -> Self {
        Proxy {
            inner: Arc::new(Inner {
                listeners: RwLock::new(BTreeMap::new()),
                global_limit: crate::listener::connection_limit(cfg.max_connections),
                stop: CancellationToken::new(),
                kill: CancellationToken::new(),
                connections: TaskTracker::new(),
            }),
        }
    }

    /// Binds a listener and starts accepting on it. Must run inside a tokio runtime.
    pub fn add_listener(&self, cfg: ListenerConfig) -> Result<Listener, Error> {
        self.insert(cfg, Listener::start)
    }

    /// Starts a listener on `socket`, already bound and listening (one handed over by a
    /// previous agent process), numbering its first generation `first`. Nothing is bound.
    pub(crate) fn add_listener_from(
        &self,
        cfg: ListenerConfig,
        socket: tokio::net::TcpListener,
        first: u64,
    ) -> Result<Listener, Error> {
        self.insert(cfg, |cfg, parent| Listener::start_on(cfg, socket, parent, first))
    }

    /// Starts a listener with `start` under the registry's lock (refused while shutting
    /// down or when the name is taken) and records it.
    fn insert(
        &self,
        cfg: ListenerConfig,
        start: impl FnOnce(ListenerConfig, Parent) -> Result<Listener, Error>,
    ) -> Result<Listener, Error> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut listeners = self.inner.listeners.write().unwrap_or_else(|e| e.into_inner());
        if listeners.contains_key(&cfg.name) {
            return Err(Error::DuplicateListener { name: cfg.name });
        }
        let name = cfg.name.clone();
        let listener = start(
            cfg,
            Parent {
                stop: self.inner.stop.clone(),
                kill: self.inner.kill.clone(),
                global_limit: self.inner.global_limit.clone(),
                connections: self.inner.connections.clone(),
            },
        )?;
        listeners.insert(name, listener.clone());
        Ok(listener)
    }

    /// Closes a listener's socket. Its connections keep flowing until they end; use
    /// [`Listener::swap`] first when they should move.
    pub fn remove_listener(&self, name: &str) -> Result<(), Error> {
        let removed = self
            .inner
            .listeners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(l) => {
                l.stop_accepting();
                info!(listener = %name, "listener removed");
                Ok(())
            }
            None => Err(self.unknown(name)),
        }
    }

    /// Removes a listener as a config reload does: it stops accepting (its socket closes
    /// once the accept loop has ended) and its open connections drain: they keep flowing
    /// until they close or `drain` (default: the listener's drain timeout) passes, then
    /// the rest are closed over its close window. Returns the generation that drains.
    pub fn retire_listener(&self, name: &str, drain: Option<Duration>) -> Result<u64, Error> {
        let removed = self
            .inner
            .listeners
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
        match removed {
            Some(l) => {
                let generation = l.stop_and_drain(drain);
                info!(listener = %name, generation, "listener removed; its connections drain");
                Ok(generation)
            }
            None => Err(self.unknown(name)),
        }
    }

    /// Binds a new listener from `cfg` in place of the one of the same name (a reload that
    /// moved it to another address): once the new socket is bound, the old listener is
    /// retired as by [`Proxy::retire_listener`] with `drain`. When the bind fails,
    /// nothing changed.
    pub fn replace_listener(&self, cfg: ListenerConfig, drain: Option<Duration>) -> Result<Listener, Error> {
        if self.inner.stop.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        let mut listeners = self.inner.listeners.write().unwrap_or_else(|e| e.into_inner());
        let Some(old) = listeners.get(&cfg.name).cloned() else {
            drop(listeners);
            return Err(self.unknown(&cfg.name));
        };
        let name = cfg.name.clone();
        let listener = Listener::start(
            cfg,
            Parent {
                stop: self.inner.stop.clone(),
                kill: self.inner.kill.clone(),
                global_limit: self.inner.global_limit.clone(),
                connections: self.inner.connections.clone(),
            },
        )?;
        listeners.insert(name.clone(), listener.clone());
        drop(listeners);
        let generation = old.stop_and_drain(drain);
        info!(listener = %name, from = %old.local_addr(), to = %listener.local_addr(), drains = generation, "listener moved");
        Ok(listener)
    }

    /// Checks that `cfg`'s address can be bound now, without binding it: the check a
    /// config reload makes before it changes anything. A port that another process (or
    /// another listener) holds fails with [`Error::Bind`].
    pub fn check_bind(cfg: &ListenerConfig) -> Result<(), Error> {
        crate::socket::probe(cfg.listen).map_err(|source| Error::Bind {
            listener: cfg.name.clone(),
            addr: cfg.listen,
            source,
        })
    }

    /// The listener called `name`, or an error listing those that exist.
    pub fn listener(&self, name: &str) -> Result<Listener, Error> {
        self.inner
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .cloned()
            .ok_or_else(|| self.unknown(name))
    }

    /// Every listener, sorted by name.
    pub fn listeners(&self) -> Vec<Listener> {
        self.inner
            .listeners
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Counters and state of every listener.
    pub fn snapshot(&self) -> ProxySnapshot {
        ProxySnapshot {
            listeners: self.listeners().iter().map(Listener::snapshot).collect(),
        }
    }

    /// Stops accepting on every listener, waits up to `deadline` for open connections to
    /// finish, then closes what is left. Listening sockets close when their accept loops end.
    pub async fn shutdown(&self, deadline: Duration) -> ShutdownReport {
        let started = tokio::time::Instant::now();
        self.inner.stop.cancel();
        self.inner.connections.close();
        let open = self.inner.connections.len();
        info!(connections = open, deadline = ?deadline, "shutting down: stopped accepting, draining");
        let drained = tokio::time::timeout(deadline, self.inner.connections.wait())
            .await
            .is_ok();
        let mut forced = 0;
        if !drained {
            forced = self.inner.connections.len() as u64;
            warn!(
                connections = forced,
                "shutdown deadline passed; closing remaining connections"
            );
            self.force_close();
            self.inner.connections.wait().await;
        }
        let took_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
        ShutdownReport {
            drained,
            forced,
            took_ms,
        }
    }

    /// Whether [`Proxy::shutdown`] or [`Proxy::force_close`] has begun: callers refuse
    /// reconfiguration (swap, pause, resume) from then on.
    pub fn is_shutting_down(&self) -> bool {
        self.inner.stop.is_cancelled()
    }

    /// Stops accepting and closes every connection now (second signal, fatal error).
    pub fn force_close(&self) {
        self.inner.stop.cancel();
        self.inner.kill.cancel();
    }

    fn unknown(&self, name: &str) -> Error {
        Error::UnknownListener {
            name: name.to_owned(),
            known: self
                .inner
                .listeners
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .keys()
                .cloned()
                .collect(),
        }
    }
}
