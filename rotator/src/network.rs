//! Which network's IP the proxy dials for a container.
//!
//! Deterministic, so every agent start picks the same: the `dso.network` label when set;
//! else the Compose project's default network (`PROJECT_default`) when the container is on
//! it; else the first network by name that gives the container an IP.

use std::net::IpAddr;

use crate::engine::Container;

/// The network and IP to dial for `c`, or `None` when it has no usable address (yet).
pub fn choose(c: &Container, label: Option<&str>, project: &str) -> Option<(String, IpAddr)> {
    let on = |name: &str| {
        c.networks
            .get(name)
            .copied()
            .flatten()
            .map(|ip| (name.to_owned(), ip))
    };
    if let Some(name) = label {
        // The label is a promise: no fallback to another network when it names one the
        // container is not on.
        return on(name);
    }
    if !project.is_empty()
        && let Some(found) = on(&format!("{project}_default"))
    {
        return Some(found);
    }
    c.networks
        .iter()
        .find_map(|(name, ip)| ip.map(|ip| (name.clone(), ip)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::DockerHealth;

    fn container(nets: &[(&str, Option<&str>)]) -> Container {
        Container {
            id: "abc".into(),
            name: "c".into(),
            image: "i".into(),
            image_id: "sha256:i".into(),
            labels: Default::default(),
            running: true,
            health: DockerHealth::None,
            networks: nets
                .iter()
                .map(|(n, ip)| (n.to_string(), ip.map(|s| s.parse().unwrap())))
                .collect(),
            publishes_ports: false,
            auto_remove: false,
            mounts: vec![],
            process: Default::default(),
        }
    }

    #[test]
    fn label_then_project_default_then_first_by_name() {
        let c = container(&[
            ("zeta", Some("10.0.3.2")),
            ("p_default", Some("10.0.2.2")),
            ("alpha", None),
            ("beta", Some("10.0.1.2")),
        ]);
        assert_eq!(choose(&c, Some("zeta"), "p").unwrap().0, "zeta");
        assert_eq!(choose(&c, None, "p").unwrap().0, "p_default");
        assert_eq!(choose(&c, None, "").unwrap().0, "beta", "alpha has no IP");
        assert!(choose(&c, Some("missing"), "p").is_none());
    }
}
