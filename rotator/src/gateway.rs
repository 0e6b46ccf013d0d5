//! The proxy side of the rotator: one listener per (Compose project, service, container
//! port), whose backends are the service's containers on their chosen network.
//!
//! *Invariant*: a listener carries exactly one service's containers; two services never
//! share a route, whatever their ports. Listener names are `SERVICE:PORT` (`p/web:8080`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use dso_proxy::{Backend, Listener, ListenerConfig, Proxy, Swap};
use tracing::info;

use crate::engine::short;
use crate::error::Error;
use crate::labels::{PortMap, ServiceKey};

/// A container behind a service's listeners.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Container ID.
    pub id: String,
    /// The service's container name (the original name, also for a green still renamed).
    pub name: String,
    /// IP on the chosen network.
    pub ip: IpAddr,
}

impl Member {
    fn backend(&self, port: u16) -> Backend {
        Backend::labeled(
            SocketAddr::new(self.ip, port),
            format!("{} ({})", self.name, short(&self.id)),
        )
    }
}

/// Listener settings that come from labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// Drain deadline after a swap.
    pub drain: Duration,
    /// Longest hold during a restart.
    pub hold_max: Duration,
}

#[derive(Debug)]
struct Routed {
    ports: Vec<PortMap>,
    listeners: Vec<Listener>,
    members: Vec<Member>,
}

/// The listeners of every managed service.
#[derive(Debug)]
pub struct Gateway {
    proxy: Proxy,
    services: Mutex<BTreeMap<ServiceKey, Routed>>,
}

/// The listener name of a service's container port.
pub fn listener_name(service: &ServiceKey, container_port: u16) -> String {
    format!("{service}:{container_port}")
}

impl Gateway {
    /// A gateway over `proxy`.
    pub fn new(proxy: Proxy) -> Self {
        Gateway {
            proxy,
            services: Mutex::new(BTreeMap::new()),
        }
    }

    /// The proxy.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Makes the service's listeners exist and route to `members`. Listeners are created
    /// once and never closed while the service is managed; a changed member set is a swap.
    /// An empty member set leaves the current route alone.
    pub fn install(
        &self,
        key: &ServiceKey,
        ports: &[PortMap],
        members: Vec<Member>,
        timing: Timing,
    ) -> Result<(), Error> {
        let mut services = self.lock();
        if let Some(r) = services.get_mut(key) {
            if r.members == members || members.is_empty() {
                return Ok(());
            }
            for (p, l) in r.ports.iter().zip(&r.listeners) {
                l.swap(
                    members.iter().map(|m| m.backend(p.container)).collect(),
                    Some(timing.drain),
                )?;
            }
            info!(service = %key, members = ?members.iter().map(|m| short(&m.id)).collect::<Vec<_>>(), "route updated");
            r.members = members;
            return Ok(());
        }
        let mut listeners = Vec::new();
        for p in ports {
            let name = listener_name(key, p.container);
            let mut cfg = ListenerConfig::new(
                name.clone(),
                SocketAddr::new(p.bind, p.host),
                members.iter().map(|m| m.backend(p.container)).collect(),
            );
            cfg.drain_timeout = timing.drain;
            cfg.hold_max = timing.hold_max;
            // A listener left by an earlier adoption of the same service is reused.
            let l = match self.proxy.listener(&name) {
                Ok(l) => l,
                Err(_) => self.proxy.add_listener(cfg)?,
            };
            listeners.push(l);
        }
        info!(service = %key, ports = ?ports.iter().map(ToString::to_string).collect::<Vec<_>>(), "listening for service");
        services.insert(
            key.clone(),
            Routed {
                ports: ports.to_vec(),
                listeners,
                members,
            },
        );
        Ok(())
    }

    /// Replaces member `old` (or adds when absent) by `new` on every listener of the
    /// service. Returns the swaps, whose previous generations now drain.
    pub fn replace(
        &self,
        key: &ServiceKey,
        old: &str,
        new: Member,
        drain: Duration,
    ) -> Result<Vec<(Listener, Swap)>, Error> {
        let mut services = self.lock();
        // A service without ports has no listeners: nothing to swap.
        let Some(r) = services.get_mut(key) else {
            return Ok(Vec::new());
        };
        let mut members: Vec<Member> = r.members.iter().filter(|m| m.id != old).cloned().collect();
        members.push(new);
        let mut swaps = Vec::new();
        for (p, l) in r.ports.iter().zip(&r.listeners) {
            let s = l.swap(
                members.iter().map(|m| m.backend(p.container)).collect(),
                Some(drain),
            )?;
            swaps.push((l.clone(), s));
        }
        r.members = members;
        Ok(swaps)
    }

    /// Holds new connections on every listener of the service.
    pub fn pause(&self, key: &ServiceKey, max: Duration) {
        for l in self.listeners(key) {
            l.pause(Some(max));
        }
    }

    /// Ends a hold without changing the route.
    pub fn resume(&self, key: &ServiceKey) -> Result<(), Error> {
        for l in self.listeners(key) {
            l.resume(None, None)?;
        }
        Ok(())
    }

    /// The members behind the service.
    pub fn members(&self, key: &ServiceKey) -> Vec<Member> {
        self.lock()
            .get(key)
            .map(|r| r.members.clone())
            .unwrap_or_default()
    }

    /// The service's listeners, in port order of its label.
    pub fn listeners(&self, key: &ServiceKey) -> Vec<Listener> {
        self.lock()
            .get(key)
            .map(|r| r.listeners.clone())
            .unwrap_or_default()
    }

    /// The services with listeners.
    pub fn services(&self) -> Vec<ServiceKey> {
        self.lock().keys().cloned().collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<ServiceKey, Routed>> {
        self.services.lock().unwrap_or_else(|e| e.into_inner())
    }
}
