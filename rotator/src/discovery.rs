//! Finding managed containers and grouping them into services.
//!
//! A scan lists containers labelled `dso.reloader=true`, groups them by (Compose project,
//! service), and parses each service's labels. A container whose labels are malformed is
//! reported and left out, never guessed at. [`crate::Rotator::watch`] follows Docker
//! events and rescans after each relevant one, and after a reconnect.

use std::collections::BTreeMap;

use tracing::warn;

use crate::engine::{Container, Engine};
use crate::error::Error;
use crate::gateway::Member;
use crate::labels::{self, LabelError, ServiceKey, ServiceSpec};
use crate::network;

/// A managed service: its settings and containers.
#[derive(Debug, Clone)]
pub struct Managed {
    /// Service key.
    pub key: ServiceKey,
    /// Settings, from the first container by name.
    pub spec: ServiceSpec,
    /// Its containers, running or not, sorted by name.
    pub containers: Vec<Container>,
}

impl Managed {
    /// Running containers with an address on the chosen network.
    pub fn members(&self) -> Vec<Member> {
        self.containers
            .iter()
            .filter(|c| c.running)
            .filter_map(|c| {
                network::choose(c, self.spec.network.as_deref(), &self.key.project).map(|(_, ip)| Member {
                    id: c.id.clone(),
                    name: c.name.clone(),
                    ip,
                })
            })
            .collect()
    }
}

/// The result of a scan: services, and containers left out for bad labels.
#[derive(Debug, Clone, Default)]
pub struct Scan {
    /// Services by key.
    pub services: BTreeMap<ServiceKey, Managed>,
    /// Label errors, one per container left out.
    pub errors: Vec<LabelError>,
    /// The service each container of `errors` would belong to, in the same order.
    pub rejected: Vec<ServiceKey>,
}

/// Lists and groups the managed containers; with `scope`, only those carrying that
/// label with that value.
pub async fn scan<E: Engine>(engine: &E, scope: Option<&(String, String)>) -> Result<Scan, Error> {
    let mut out = Scan::default();
    // With a scope, the daemon filters by it: containers outside it are not even inspected.
    let listed = match scope {
        Some((k, v)) => engine.list_labeled(k, v).await?,
        None => engine.list_managed().await?,
    };
    for c in listed {
        if !labels::is_managed(&c.labels) {
            continue;
        }
        if let Some((k, v)) = scope
            && c.labels.get(k) != Some(v)
        {
            continue;
        }
        let key = ServiceKey::of(&c.name, &c.labels);
        let spec = match labels::parse(&c.name, &c.labels) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "container left unmanaged");
                out.errors.push(e);
                out.rejected.push(key);
                continue;
            }
        };
        out.services
            .entry(key.clone())
            .or_insert_with(|| Managed {
                key,
                spec,
                containers: Vec::new(),
            })
            .containers
            .push(c);
    }
    Ok(out)
}

impl Scan {
    /// The service `target` names: `project/service`, a service name that only one
    /// project has, or a container name or ID (prefix of at least 4 characters).
    pub fn find(&self, target: &str) -> Result<&Managed, Error> {
        if let Some(m) = self.services.values().find(|m| m.key.to_string() == target) {
            return Ok(m);
        }
        let by_service: Vec<&Managed> = self
            .services
            .values()
            .filter(|m| m.key.service == target)
            .collect();
        match by_service.as_slice() {
            [one] => return Ok(one),
            [] => {}
            many => {
                return Err(Error::Ambiguous {
                    target: target.to_owned(),
                    candidates: many
                        .iter()
                        .map(|m| m.key.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
        }
        self.services
            .values()
            .find(|m| {
                m.containers
                    .iter()
                    .any(|c| c.name == target || (target.len() >= 4 && c.id.starts_with(target)))
            })
            .ok_or_else(|| Error::NotFound {
                target: target.to_owned(),
                known: self.names(),
            })
    }

    /// Managed service names, comma-separated (for errors).
    pub fn names(&self) -> String {
        let v: Vec<String> = self.services.keys().map(ToString::to_string).collect();
        if v.is_empty() {
            "(none)".to_owned()
        } else {
            v.join(", ")
        }
    }
}
