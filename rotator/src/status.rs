//! `dso status`: every managed service with its ports, containers and last rotation.

use serde::{Deserialize, Serialize};

use crate::discovery;
use crate::engine::{Engine, short};
use crate::error::Error;
use crate::journal::History;
use crate::labels::{PortMap, ServiceKey, Strategy};
use crate::rotator::Rotator;

/// A managed service as `dso status` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// Service key.
    pub service: ServiceKey,
    /// Strategy label (`auto` unresolved).
    pub strategy: Strategy,
    /// Ports owned, as `IP:HOST:CONTAINER` with the bound host port.
    pub ports: Vec<String>,
    /// Containers serving: `name (short id)`.
    pub containers: Vec<String>,
    /// Whether a rotation runs now.
    pub rotating: bool,
    /// The last finished rotation.
    pub last: Option<History>,
    /// Why the service is not (fully) managed: a bad label (the service is left alone
    /// until it is fixed) or a port that could not be bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl<E: Engine> Rotator<E> {
    /// Every managed service with its ports, containers and last rotation.
    pub async fn status(&self) -> Result<Vec<ServiceStatus>, Error> {
        let scan = discovery::scan(&self.inner.engine, self.inner.cfg.scope.as_ref()).await?;
        let gw = &self.inner.gateway;
        let mut out: Vec<ServiceStatus> = scan
            .services
            .values()
            .map(|m| {
                let listeners = gw.listeners(&m.key);
                let ports = m
                    .spec
                    .ports
                    .iter()
                    .zip(listeners.iter().map(Some).chain(std::iter::repeat(None)))
                    .map(|(p, l)| {
                        let bound = l.map_or(p.host, |l| l.local_addr().port());
                        PortMap { host: bound, ..*p }.to_string()
                    })
                    .collect();
                ServiceStatus {
                    service: m.key.clone(),
                    strategy: m.spec.strategy,
                    ports,
                    containers: gw
                        .members(&m.key)
                        .iter()
                        .map(|x| format!("{} ({})", x.name, short(&x.id)))
                        .collect(),
                    rotating: self.inner.queue.is_busy(&m.key),
                    last: self.inner.journal.history(&m.key),
                    error: gw.bind_error(&m.key),
                }
            })
            .collect();
        // Containers left unmanaged for a bad label: shown with the error, nothing else.
        for (key, e) in scan.rejected.iter().zip(&scan.errors) {
            if scan.services.contains_key(key) {
                if let Some(s) = out.iter_mut().find(|s| s.service == *key) {
                    s.error = Some(e.to_string());
                }
                continue;
            }
            if out.iter().any(|s| s.service == *key) {
                continue;
            }
            out.push(ServiceStatus {
                service: key.clone(),
                strategy: Strategy::Auto,
                ports: Vec::new(),
                containers: Vec::new(),
                rotating: false,
                last: self.inner.journal.history(key),
                error: Some(e.to_string()),
            });
        }
        out.sort_by(|a, b| a.service.cmp(&b.service));
        Ok(out)
    }
}
