//! Handing listeners to another process: what a listener is at this moment (its settings,
//! its route, its generation number, a hold and its remaining time) as a serializable
//! [`ListenerState`], next to a duplicate of its listening socket; and the other way,
//! a listener started on a received socket with that state.
//!
//! How the sockets travel (SCM_RIGHTS over a Unix socket) is the binary's business: this
//! module only hands out and takes `OwnedFd`s.
//!
//! *Invariant*: an imported listener binds nothing; it accepts on the very socket the
//! exporter listens on (the same open file description), so the kernel's accept queue is
//! shared and a connection is never refused while both processes hold it.

use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::ListenerConfig;
use crate::error::Error;
use crate::listener::Listener;
use crate::proxy::Proxy;
use crate::route::{Backend, Mode};

/// One listener as it stands, for a new process to continue it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerState {
    /// The listener's name.
    pub name: String,
    /// The address as configured (`127.0.0.1:0` stays that; `bind` has the real port).
    pub listen: SocketAddr,
    /// The address the socket is bound to.
    pub bind: SocketAddr,
    /// The current generation's backends.
    pub backends: Vec<Backend>,
    /// The current generation number; the importer continues from it.
    pub generation: u64,
    /// Milliseconds left of a hold (pause) in force, `None` when forwarding.
    pub hold_remaining_ms: Option<u64>,
    /// The settings the listener runs with.
    pub settings: ListenerSettings,
}

/// [`ListenerConfig`]'s settings in milliseconds, the form that crosses a process boundary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListenerSettings {
    /// [`ListenerConfig::backlog`].
    pub backlog: u32,
    /// [`ListenerConfig::drain_timeout`].
    pub drain_timeout_ms: u64,
    /// [`ListenerConfig::close_window`].
    pub close_window_ms: u64,
    /// [`ListenerConfig::hold_max`].
    pub hold_max_ms: u64,
    /// [`ListenerConfig::connect_timeout`].
    pub connect_timeout_ms: u64,
    /// [`ListenerConfig::dial_attempts`].
    pub dial_attempts: u32,
    /// [`ListenerConfig::dial_budget`].
    pub dial_budget_ms: u64,
    /// [`ListenerConfig::idle_timeout`].
    pub idle_timeout_ms: Option<u64>,
    /// [`ListenerConfig::max_connections`].
    pub max_connections: Option<usize>,
    /// [`ListenerConfig::keepalive`].
    pub keepalive_ms: Option<u64>,
}

/// A listener's state and a duplicate of its listening socket.
#[derive(Debug)]
pub struct Exported {
    /// What the listener is now.
    pub state: ListenerState,
    /// The listening socket (a duplicate: this process keeps accepting on its own).
    pub socket: OwnedFd,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl ListenerSettings {
    fn of(cfg: &ListenerConfig) -> ListenerSettings {
        ListenerSettings {
            backlog: cfg.backlog,
            drain_timeout_ms: ms(cfg.drain_timeout),
            close_window_ms: ms(cfg.close_window),
            hold_max_ms: ms(cfg.hold_max),
            connect_timeout_ms: ms(cfg.connect_timeout),
            dial_attempts: cfg.dial_attempts,
            dial_budget_ms: ms(cfg.dial_budget),
            idle_timeout_ms: cfg.idle_timeout.map(ms),
            max_connections: cfg.max_connections,
            keepalive_ms: cfg.keepalive.map(ms),
        }
    }

    fn config(&self, name: &str, listen: SocketAddr, backends: Vec<Backend>) -> ListenerConfig {
        let d = Duration::from_millis;
        let mut cfg = ListenerConfig::new(name, listen, backends);
        cfg.backlog = self.backlog;
        cfg.drain_timeout = d(self.drain_timeout_ms);
        cfg.close_window = d(self.close_window_ms);
        cfg.hold_max = d(self.hold_max_ms);
        cfg.connect_timeout = d(self.connect_timeout_ms);
        cfg.dial_attempts = self.dial_attempts;
        cfg.dial_budget = d(self.dial_budget_ms);
        cfg.idle_timeout = self.idle_timeout_ms.map(d);
        cfg.max_connections = self.max_connections;
        cfg.keepalive = self.keepalive_ms.map(d);
        cfg
    }
}

impl Listener {
    /// The listener's state and a duplicate of its socket; an error when it has stopped
    /// accepting (it has no socket left to hand over).
    pub fn export(&self) -> Result<Exported, Error> {
        let shared = &self.0;
        let gone = |why: String| Error::Bind {
            listener: shared.cfg.name.clone(),
            addr: shared.bind,
            source: std::io::Error::other(why),
        };
        let socket = {
            let dup = shared.handover.lock().unwrap_or_else(|e| e.into_inner());
            match dup.as_ref() {
                Some(fd) => fd
                    .try_clone()
                    .map_err(|e| gone(format!("duplicating the socket for the handover: {e}")))?,
                None => return Err(gone("the listener has stopped accepting".to_owned())),
            }
        };
        let route = shared.route.load_full();
        let hold_remaining_ms = match &route.mode {
            Mode::Forward => None,
            Mode::Hold(h) => Some(ms(h.until.saturating_duration_since(tokio::time::Instant::now()))),
        };
        Ok(Exported {
            state: ListenerState {
                name: shared.cfg.name.clone(),
                listen: shared.cfg.listen,
                bind: shared.bind,
                backends: route
                    .generation
                    .backends
                    .iter()
                    .map(|b| b.backend.clone())
                    .collect(),
                generation: route.generation.id,
                hold_remaining_ms,
                settings: ListenerSettings::of(&shared.cfg),
            },
            socket,
        })
    }
}

impl Proxy {
    /// Every listener's state and socket, sorted by name.
    pub fn export(&self) -> Result<Vec<Exported>, Error> {
        self.listeners().iter().map(Listener::export).collect()
    }

    /// Starts the listener `state` describes on `socket` (received from the process that
    /// exported it): nothing is bound, the route and generation continue, a hold continues
    /// for its remaining time. The socket must be a listening TCP socket bound at
    /// `state.bind`. Must run inside a tokio runtime.
    pub fn import(&self, state: ListenerState, socket: OwnedFd) -> Result<Listener, Error> {
        let bad = |source: std::io::Error| Error::Bind {
            listener: state.name.clone(),
            addr: state.bind,
            source,
        };
        let std_listener = std::net::TcpListener::from(socket);
        let bound = std_listener.local_addr().map_err(bad)?;
        if bound != state.bind {
            return Err(bad(std::io::Error::other(format!(
                "the socket received is bound at {bound}, not at {}",
                state.bind
            ))));
        }
        std_listener.set_nonblocking(true).map_err(bad)?;
        let socket = tokio::net::TcpListener::from_std(std_listener).map_err(bad)?;
        let cfg = state
            .settings
            .config(&state.name, state.listen, state.backends.clone());
        let listener = self.add_listener_from(cfg, socket, state.generation.max(1))?;
        if let Some(left) = state.hold_remaining_ms {
            listener.pause(Some(Duration::from_millis(left)));
        }
        tracing::info!(listener = %state.name, bind = %state.bind, generation = state.generation, held = state.hold_remaining_ms.is_some(), "listener taken over from the previous process");
        Ok(listener)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use crate::{Backend, ListenerConfig, Proxy, ProxyConfig};

    async fn backend(tag: &'static [u8]) -> std::net::SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                tokio::spawn(async move {
                    let _ = s.write_all(tag).await;
                });
            }
        });
        addr
    }

    async fn greeting(addr: std::net::SocketAddr) -> Vec<u8> {
        let mut c = TcpStream::connect(addr).await.unwrap();
        let mut buf = vec![0; 4];
        tokio::time::timeout(Duration::from_secs(5), c.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        buf
    }

    /// The importer serves the same port with the same route and the next generation
    /// number; the exporter can stop accepting without the port closing.
    #[tokio::test]
    async fn an_imported_listener_continues_the_route_on_the_same_socket() {
        let (a, b) = (backend(b"aaaa").await, backend(b"bbbb").await);
        let old = Proxy::new(ProxyConfig::default());
        let l = old
            .add_listener(ListenerConfig::new(
                "db",
                "127.0.0.1:0".parse().unwrap(),
                vec![Backend::new(a)],
            ))
            .unwrap();
        l.swap(vec![Backend::labeled(b, "green")], None).unwrap();
        let port = l.local_addr();
        let exported = old.export().unwrap();
        assert_eq!(exported.len(), 1);
        let e = exported.into_iter().next().unwrap();
        assert_eq!(e.state.generation, 2);
        let new = Proxy::new(ProxyConfig::default());
        let imported = new.import(e.state, e.socket).unwrap();
        assert_eq!(imported.local_addr(), port);
        old.shutdown(Duration::from_secs(1)).await;
        // The old process's accept loop has ended and dropped its socket; the port is open.
        for _ in 0..5 {
            assert_eq!(greeting(port).await, b"bbbb");
        }
        assert_eq!(new.snapshot().listeners[0].counters.accepted, 5);
        let swap = imported.swap(vec![Backend::new(a)], None).unwrap();
        assert_eq!(
            swap,
            crate::Swap {
                generation: 3,
                previous: 2
            }
        );
        assert_eq!(greeting(port).await, b"aaaa");
    }

    /// A hold continues in the importer for the time it had left.
    #[tokio::test]
    async fn a_hold_continues_with_its_remaining_time() {
        let a = backend(b"aaaa").await;
        let old = Proxy::new(ProxyConfig::default());
        let l = old
            .add_listener(ListenerConfig::new(
                "db",
                "127.0.0.1:0".parse().unwrap(),
                vec![Backend::new(a)],
            ))
            .unwrap();
        l.pause(Some(Duration::from_secs(20)));
        let e = old.export().unwrap().into_iter().next().unwrap();
        let left = e.state.hold_remaining_ms.unwrap();
        assert!(left > 15_000 && left <= 20_000, "{left}");
        let new = Proxy::new(ProxyConfig::default());
        let imported = new.import(e.state, e.socket).unwrap();
        assert!(imported.is_paused());
        let snap = imported.snapshot();
        assert!(snap.hold_remaining_ms.unwrap() <= left);
    }

    /// A removed listener hands nothing over, and its port closes.
    #[tokio::test]
    async fn a_removed_listener_closes_its_port() {
        let a = backend(b"aaaa").await;
        let p = Proxy::new(ProxyConfig::default());
        let l = p
            .add_listener(ListenerConfig::new(
                "db",
                "127.0.0.1:0".parse().unwrap(),
                vec![Backend::new(a)],
            ))
            .unwrap();
        let port = l.local_addr();
        p.remove_listener("db").unwrap();
        let mut closed = false;
        for _ in 0..100 {
            if TcpStream::connect(port).await.is_err() {
                closed = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(closed, "the port of a removed listener stays open");
        assert!(l.export().is_err());
    }
}
