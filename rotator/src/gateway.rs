//! The proxy side of the rotator: one listener per (Compose project, service, container
//! port), whose backends are the service's containers on their chosen network.
//!
//! *Invariant*: a listener carries exactly one service's containers; two services never
//! share a route, whatever their ports. Listener names are `SERVICE:PORT` (`p/web:8080`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

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
    /// When the service stopped being listed (all its containers removed), if it did.
    gone_since: Option<Instant>,
}

/// The listeners of every managed service.
#[derive(Debug)]
pub struct Gateway {
    proxy: Proxy,
    services: Mutex<BTreeMap<ServiceKey, Routed>>,
    /// Services whose listeners could not be bound, with the reason.
    unbound: Mutex<BTreeMap<ServiceKey, String>>,
    /// One install (or clearing) at a time: the route changes of one service are not
    /// interleaved, while the map lock is never held across an await.
    installing: tokio::sync::Mutex<()>,
}

/// The listener name of a service's container port.
pub fn listener_name(service: &ServiceKey, container_port: u16) -> String {
    format!("{service}:{container_port}")
}

/// How long a rebind of a cleared listener's own address is retried while the old socket
/// closes (its accept loop ends asynchronously after `remove_listener`).
const REBIND_WAIT: Duration = Duration::from_secs(2);

impl Gateway {
    /// A gateway over `proxy`.
    pub fn new(proxy: Proxy) -> Self {
        Gateway {
            proxy,
            services: Mutex::new(BTreeMap::new()),
            unbound: Mutex::new(BTreeMap::new()),
            installing: tokio::sync::Mutex::new(()),
        }
    }

    /// The proxy.
    pub fn proxy(&self) -> &Proxy {
        &self.proxy
    }

    /// Makes the service's listeners exist on exactly `ports` and route to exactly
    /// `members`. A changed member set is a swap; an empty one clears the route (the
    /// listener keeps its port and closes new connections at once: no address of a
    /// container that stopped or was removed is dialed). Ports that left the label are
    /// released, new ones bound. A listener of the same name found in the proxy (left by
    /// an install that failed half-way) is rebuilt or swapped, never trusted as is. When
    /// a port cannot be bound, the listeners this call bound are released again and the
    /// error is remembered for [`Gateway::check_bound`].
    pub async fn install(
        &self,
        key: &ServiceKey,
        ports: &[PortMap],
        members: Vec<Member>,
        timing: Timing,
    ) -> Result<(), Error> {
        let _one = self.installing.lock().await;
        let result = self.install_inner(key, ports, members, timing).await;
        let mut unbound = self.unbound.lock().unwrap_or_else(|e| e.into_inner());
        match &result {
            Ok(()) => {
                unbound.remove(key);
            }
            Err(e) => {
                unbound.insert(key.clone(), e.to_string());
            }
        }
        result
    }

    async fn install_inner(
        &self,
        key: &ServiceKey,
        ports: &[PortMap],
        members: Vec<Member>,
        timing: Timing,
    ) -> Result<(), Error> {
        let existing = self
            .lock()
            .get(key)
            .map(|r| (r.ports.clone(), r.listeners.clone(), r.members.clone()));
        if let Some((old_ports, mut listeners, old_members)) = existing {
            if old_ports == ports {
                let mut result = Ok(());
                if old_members != members {
                    for (p, l) in old_ports.iter().zip(listeners.iter_mut()) {
                        match self.route(l, &members, p.container, timing.drain).await {
                            Ok(new) => *l = new,
                            Err(e) => result = Err(e),
                        }
                    }
                    if result.is_ok() {
                        info!(service = %key, members = ?members.iter().map(|m| short(&m.id)).collect::<Vec<_>>(), "route updated");
                    }
                }
                if let Some(r) = self.lock().get_mut(key) {
                    r.gone_since = None;
                    r.listeners = listeners;
                    if result.is_ok() {
                        r.members = members;
                    }
                }
                return result;
            }
            // Ports changed (a recreated container with a new dso.host_ports): release the
            // old listeners, then bind the new set below.
            self.lock().remove(key);
            for l in &listeners {
                let _ = self.proxy.remove_listener(l.name());
            }
            info!(service = %key, old = ?old_ports.iter().map(ToString::to_string).collect::<Vec<_>>(), new = ?ports.iter().map(ToString::to_string).collect::<Vec<_>>(), "ports changed; listeners rebound");
        }
        if ports.is_empty() {
            return Ok(());
        }
        let mut listeners = Vec::new();
        for p in ports {
            match self.bind(key, p, &members, timing).await {
                Ok(l) => listeners.push(l),
                Err(e) => {
                    for l in &listeners {
                        let _ = self.proxy.remove_listener(l.name());
                    }
                    return Err(e);
                }
            }
        }
        info!(service = %key, ports = ?ports.iter().map(ToString::to_string).collect::<Vec<_>>(), "listening for service");
        self.lock().insert(
            key.clone(),
            Routed {
                ports: ports.to_vec(),
                listeners,
                members,
                gone_since: None,
            },
        );
        Ok(())
    }

    /// The listener of port `p` routing to `members`: a new one, or the one of that name
    /// the proxy has already when it is bound where `p` says (then swapped or cleared).
    async fn bind(
        &self,
        key: &ServiceKey,
        p: &PortMap,
        members: &[Member],
        timing: Timing,
    ) -> Result<Listener, Error> {
        let name = listener_name(key, p.container);
        if let Ok(l) = self.proxy.listener(&name) {
            let a = l.local_addr();
            if a.ip() == p.bind && (p.host == 0 || a.port() == p.host) {
                return self.route(&l, members, p.container, timing.drain).await;
            }
            let _ = self.proxy.remove_listener(&name);
        }
        let mut cfg = ListenerConfig::new(
            name,
            SocketAddr::new(p.bind, p.host),
            members.iter().map(|m| m.backend(p.container)).collect(),
        );
        cfg.drain_timeout = timing.drain;
        cfg.hold_max = timing.hold_max;
        Ok(self.proxy.add_listener(cfg)?)
    }

    /// Routes `l` to `members`: a swap, or for no member a listener with an empty route
    /// on the same address. Returns the listener now in place.
    async fn route(
        &self,
        l: &Listener,
        members: &[Member],
        port: u16,
        drain: Duration,
    ) -> Result<Listener, Error> {
        if !members.is_empty() {
            l.swap(members.iter().map(|m| m.backend(port)).collect(), Some(drain))?;
            return Ok(l.clone());
        }
        if l.snapshot().backends.is_empty() {
            return Ok(l.clone());
        }
        // dso-proxy refuses a swap to no backend, so the listener is replaced by one on
        // the same address with an empty route (new connections are closed at once).
        // The port refuses connections for the moment the old socket takes to close (its
        // accept loop ends asynchronously).
        let mut cfg = l.config().clone();
        cfg.listen = l.local_addr();
        cfg.backends = Vec::new();
        self.proxy.remove_listener(l.name())?;
        let started = Instant::now();
        loop {
            match self.proxy.add_listener(cfg.clone()) {
                Ok(new) => {
                    info!(listener = %cfg.name, waited_ms = started.elapsed().as_millis() as u64, "no running member: route cleared");
                    return Ok(new);
                }
                Err(e) if started.elapsed() < REBIND_WAIT => {
                    tracing::debug!(error = %e, "rebinding cleared listener");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Marks every routed service for which `listed` is false gone: its route is cleared
    /// at once (its containers no longer exist), and its listeners are released by
    /// [`Gateway::release_gone`] once it has been gone for the grace period.
    pub async fn mark_gone(&self, listed: impl Fn(&ServiceKey) -> bool) {
        let _one = self.installing.lock().await;
        let newly: Vec<(ServiceKey, Vec<PortMap>, Vec<Listener>)> = self
            .lock()
            .iter_mut()
            .filter(|(k, r)| !listed(k) && r.gone_since.is_none())
            .map(|(k, r)| {
                r.gone_since = Some(Instant::now());
                r.members.clear();
                (k.clone(), r.ports.clone(), r.listeners.clone())
            })
            .collect();
        for (key, ports, mut listeners) in newly {
            info!(service = %key, "service has no container any more; route cleared, listeners released after the grace period");
            for (p, l) in ports.iter().zip(listeners.iter_mut()) {
                match self.route(l, &[], p.container, Duration::ZERO).await {
                    Ok(new) => *l = new,
                    Err(e) => tracing::warn!(service = %key, error = %e, "cannot clear the route"),
                }
            }
            if let Some(r) = self.lock().get_mut(&key) {
                r.listeners = listeners;
            }
        }
    }

    /// Releases the listeners (closes the ports) of services gone for at least `grace`.
    /// Returns the services released.
    pub fn release_gone(&self, grace: Duration) -> Vec<ServiceKey> {
        let mut services = self.lock();
        let expired: Vec<ServiceKey> = services
            .iter()
            .filter(|(_, r)| r.gone_since.is_some_and(|t| t.elapsed() >= grace))
            .map(|(k, _)| k.clone())
            .collect();
        for key in &expired {
            if let Some(r) = services.remove(key) {
                for l in &r.listeners {
                    let _ = self.proxy.remove_listener(l.name());
                }
                info!(service = %key, "service gone: listeners released");
            }
        }
        expired
    }

    /// Takes out of the service's route every member for which `exists` is false (its
    /// container was removed, e.g. by a `docker compose up` run during a rotation, which
    /// removes the newer of two containers with the service's labels). Used for services
    /// whose rotation owns the route: their route is otherwise left to the rotation, and
    /// must still never dial a removed container's address. With no member left the route
    /// is cleared (new connections are closed at once). A listener that holds (a `restart`
    /// rotation between blue's removal and green's swap) is left alone: nothing is dialed
    /// while it holds. Returns the members taken out.
    pub async fn drop_missing(&self, key: &ServiceKey, exists: impl Fn(&str) -> bool) -> Vec<Member> {
        let _one = self.installing.lock().await;
        let found = self.lock().get(key).and_then(|r| {
            let (gone, rest): (Vec<Member>, Vec<Member>) =
                r.members.iter().cloned().partition(|m| !exists(&m.id));
            (!gone.is_empty()).then(|| (gone, rest, r.ports.clone(), r.listeners.clone()))
        });
        let Some((gone, rest, ports, mut listeners)) = found else {
            return Vec::new();
        };
        if listeners.iter().any(|l| l.snapshot().mode == "hold") {
            // A `restart` rotation holds new connections while blue is stopped and removed:
            // nothing is dialed, and it swaps to green or resumes itself.
            return Vec::new();
        }
        tracing::warn!(service = %key, removed = ?gone.iter().map(|m| short(&m.id)).collect::<Vec<_>>(), "a container of the route was removed during a rotation; taken out of the route");
        for (p, l) in ports.iter().zip(listeners.iter_mut()) {
            match self.route(l, &rest, p.container, Duration::ZERO).await {
                Ok(new) => *l = new,
                Err(e) => {
                    tracing::warn!(service = %key, error = %e, "cannot take a removed container out of the route")
                }
            }
        }
        if let Some(r) = self.lock().get_mut(key) {
            r.listeners = listeners;
            r.members = rest;
        }
        gone
    }

    /// Releases at once, without the grace, the listeners of the gone services `which`
    /// selects (`dso down`: the project's containers were removed on purpose). A service
    /// with a container left is not gone and keeps its listeners. Returns the services
    /// released with their listener names.
    pub async fn release_gone_now(
        &self,
        which: impl Fn(&ServiceKey) -> bool,
    ) -> Vec<(ServiceKey, Vec<String>)> {
        let _one = self.installing.lock().await;
        let mut services = self.lock();
        let chosen: Vec<ServiceKey> = services
            .iter()
            .filter(|(k, r)| r.gone_since.is_some() && which(k))
            .map(|(k, _)| k.clone())
            .collect();
        let mut out = Vec::new();
        for key in chosen {
            if let Some(r) = services.remove(&key) {
                let names: Vec<String> = r.listeners.iter().map(|l| l.name().to_owned()).collect();
                for l in &r.listeners {
                    let _ = self.proxy.remove_listener(l.name());
                }
                info!(service = %key, "service taken down: listeners released");
                out.push((key, names));
            }
        }
        out
    }

    /// Whether some service waits for [`Gateway::release_gone`].
    pub fn has_gone(&self) -> bool {
        self.lock().values().any(|r| r.gone_since.is_some())
    }

    /// An error when the service has ports but not all of its listeners: a rotation would
    /// then neither hold nor swap, and report no downtime while clients are cut off.
    pub fn check_bound(&self, key: &ServiceKey, ports: &[PortMap]) -> Result<(), Error> {
        if ports.is_empty() {
            return Ok(());
        }
        let bound = self.lock().get(key).is_some_and(|r| r.ports == ports);
        if bound {
            return Ok(());
        }
        let why = self
            .unbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_else(|| "not bound yet".to_owned());
        Err(Error::Proxy(format!(
            "service {key} has no listener on {}: {why}; a rotation could not hold or swap its clients (free the port, or fix dso.host_ports)",
            ports
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// Why the service's listeners could not be bound, if they could not.
    pub fn bind_error(&self, key: &ServiceKey) -> Option<String> {
        self.unbound
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
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

    /// Takes member `id` out of the service's route when other members remain (they
    /// serve its new connections; its open ones drain for `drain`). Returns `false`, and
    /// changes nothing, when `id` is the last member: then the caller holds instead.
    pub fn take_out(&self, key: &ServiceKey, id: &str, drain: Duration) -> Result<bool, Error> {
        let mut services = self.lock();
        let Some(r) = services.get_mut(key) else {
            return Ok(false);
        };
        let rest: Vec<Member> = r.members.iter().filter(|m| m.id != id).cloned().collect();
        if rest.is_empty() {
            return Ok(false);
        }
        for (p, l) in r.ports.iter().zip(&r.listeners) {
            l.swap(rest.iter().map(|m| m.backend(p.container)).collect(), Some(drain))?;
        }
        r.members = rest;
        Ok(true)
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
