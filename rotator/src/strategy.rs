//! Choosing a strategy: `auto` resolution, the stateful guess, and refusing `rolling` when
//! two copies of a container cannot run side by side.

use crate::engine::Container;
use crate::error::Error;
use crate::labels::{ServiceKey, ServiceSpec, Strategy};

/// Image names (last path part, before the tag) that hold state: two copies on the same
/// data corrupt it, so they are restarted, not rolled.
const STATEFUL_IMAGES: &[&str] = &[
    "postgres",
    "postgis",
    "mysql",
    "mariadb",
    "percona",
    "mongo",
    "mongodb",
    "redis",
    "valkey",
    "elasticsearch",
    "opensearch",
    "rabbitmq",
    "cassandra",
    "clickhouse",
    "etcd",
    "zookeeper",
    "kafka",
    "influxdb",
    "couchdb",
    "neo4j",
    "minio",
    "timescaledb",
    "cockroach",
];

/// Mount destinations that mean "this container keeps data".
const DATA_PATHS: &[&str] = &["/var/lib/", "/data", "/bitnami", "/var/opt/"];

/// Why a container looks stateful, if it does (`dso.stateful` overrides the guess).
pub fn stateful_reason(c: &Container, spec: &ServiceSpec) -> Option<String> {
    if let Some(s) = spec.stateful {
        return s.then(|| "label dso.stateful=true".to_owned());
    }
    let base = c.image.rsplit('/').next().unwrap_or("");
    let base = base.split([':', '@']).next().unwrap_or("");
    if STATEFUL_IMAGES.contains(&base) {
        return Some(format!("image {} is a database or queue", c.image));
    }
    c.mounts
        .iter()
        .filter(|m| m.kind == "volume" || m.kind == "bind")
        .find(|m| DATA_PATHS.iter().any(|p| m.destination.starts_with(p)))
        .map(|m| format!("a {} is mounted on data path {}", m.kind, m.destination))
}

/// The strategy to run for `c`: `requested` (from `dso rotate --strategy`) else the label,
/// with `auto` resolved. `rolling` is refused, with the reason and how to override it,
/// when the container publishes its own host ports or looks stateful.
pub fn resolve(
    key: &ServiceKey,
    c: &Container,
    spec: &ServiceSpec,
    requested: Option<Strategy>,
) -> Result<Strategy, Error> {
    let asked = requested.unwrap_or(spec.strategy);
    let stateful = stateful_reason(c, spec);
    let chosen = match asked {
        Strategy::Auto if stateful.is_some() || c.publishes_ports => Strategy::Restart,
        Strategy::Auto => Strategy::Rolling,
        s => s,
    };
    if chosen == Strategy::Restart && c.auto_remove {
        return Err(Error::Refused {
            service: key.to_string(),
            strategy: "restart".to_owned(),
            reason: format!(
                "container {} was started with --rm (AutoRemove): stopping it makes Docker delete it, so a failed restart would have nothing to bring back",
                c.name
            ),
            hint: "use --strategy rolling (the replacement is created without --rm), or recreate the container without --rm".to_owned(),
        });
    }
    if chosen == Strategy::Rolling {
        let refuse = |reason: String, hint: &str| Error::Refused {
            service: key.to_string(),
            strategy: "rolling".to_owned(),
            reason,
            hint: hint.to_owned(),
        };
        if c.publishes_ports {
            return Err(refuse(
                format!(
                    "container {} publishes host ports itself, so a second copy cannot start",
                    c.name
                ),
                "remove its `ports:` and list them in the dso.host_ports label, or use --strategy restart",
            ));
        }
        if let Some(reason) = stateful {
            return Err(refuse(
                format!("container {} looks stateful ({reason})", c.name),
                "use --strategy restart, or set label dso.stateful=false if two copies may share its data",
            ));
        }
    }
    Ok(chosen)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{DockerHealth, Mount};
    use std::collections::BTreeMap;

    fn container(image: &str, mounts: &[(&str, &str)], publishes: bool) -> Container {
        Container {
            id: "0123456789abcdef".into(),
            name: "c".into(),
            image: image.into(),
            image_id: "sha256:x".into(),
            labels: BTreeMap::new(),
            running: true,
            health: DockerHealth::None,
            networks: BTreeMap::new(),
            publishes_ports: publishes,
            auto_remove: false,
            mounts: mounts
                .iter()
                .map(|(k, d)| Mount {
                    kind: k.to_string(),
                    destination: d.to_string(),
                })
                .collect(),
            process: Default::default(),
        }
    }

    fn spec(strategy: Strategy, stateful: Option<bool>) -> ServiceSpec {
        let mut s = crate::labels::parse("c", &BTreeMap::new()).unwrap();
        s.strategy = strategy;
        s.stateful = stateful;
        s
    }

    fn key() -> ServiceKey {
        ServiceKey::of("c", &BTreeMap::new())
    }

    #[test]
    fn auto_picks_restart_for_databases_and_rolling_otherwise() {
        let pg = container("library/postgres:16", &[], false);
        assert_eq!(
            resolve(&key(), &pg, &spec(Strategy::Auto, None), None).unwrap(),
            Strategy::Restart
        );
        let vol = container("myapp", &[("volume", "/var/lib/myapp")], false);
        assert_eq!(
            resolve(&key(), &vol, &spec(Strategy::Auto, None), None).unwrap(),
            Strategy::Restart
        );
        let web = container(
            "nginx:1",
            &[("tmpfs", "/var/lib/x"), ("bind", "/etc/nginx")],
            false,
        );
        assert_eq!(
            resolve(&key(), &web, &spec(Strategy::Auto, None), None).unwrap(),
            Strategy::Rolling
        );
        assert_eq!(
            resolve(&key(), &pg, &spec(Strategy::Auto, Some(false)), None).unwrap(),
            Strategy::Rolling
        );
    }

    #[test]
    fn rolling_is_refused_with_reason_and_override() {
        let pg = container("postgres", &[], false);
        let e = resolve(&key(), &pg, &spec(Strategy::Rolling, None), None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stateful") && e.contains("--strategy restart") && e.contains("dso.stateful=false"),
            "{e}"
        );
        let web = container("nginx", &[], true);
        let e = resolve(&key(), &web, &spec(Strategy::Auto, None), Some(Strategy::Rolling))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("publishes host ports") && e.contains("dso.host_ports"),
            "{e}"
        );
        assert_eq!(
            resolve(&key(), &web, &spec(Strategy::Auto, None), Some(Strategy::Signal)).unwrap(),
            Strategy::Signal
        );
    }
}
