//! The create request of a container's copy, from the container's inspect data.

use std::collections::HashMap;

use bollard::models::{ContainerCreateBody, ContainerInspectResponse, EndpointSettings, NetworkingConfig};

use super::CloneSpec;

/// A create request plus the networks to connect before start.
pub(super) struct CloneBody {
    pub create: ContainerCreateBody,
    pub more_networks: Vec<(String, EndpointSettings)>,
    /// Blue had AutoRemove (`--rm`); the clone does not.
    pub auto_remove_cleared: bool,
}

/// Copies blue's configuration (docs/rotation.md has the table): `image` as the caller
/// checked it (blue's image name when it still names blue's image ID, else the ID);
/// networks, aliases, volumes, labels and the host config kept; a hostname the user set
/// kept, Docker's default hostname (blue's short ID) dropped; static IP and MAC address
/// dropped (Docker picks new ones); AutoRemove cleared.
pub(super) fn clone_body(blue: &ContainerInspectResponse, spec: &CloneSpec, image: String) -> CloneBody {
    let cfg = blue.config.clone().unwrap_or_default();
    let mut hc = blue.host_config.clone().unwrap_or_default();
    let blue_id = blue.id.clone().unwrap_or_default();
    // Without --hostname Docker sets the short ID; a copy gets its own ID, so its own
    // default. A hostname the user chose (a RabbitMQ node name) is the service's identity.
    let hostname = cfg
        .hostname
        .clone()
        .filter(|h| !h.is_empty() && !blue_id.starts_with(h.as_str()));
    // A --rm container is deleted by the daemon when it stops; the replacement must not be,
    // or a later restart rotation's rollback would have nothing to start.
    let auto_remove_cleared = hc.auto_remove == Some(true);
    hc.auto_remove = Some(false);

    let mut env: Vec<String> = cfg.env.clone().unwrap_or_default();
    let ov = &spec.overrides;
    env.retain(|e| {
        let name = e.split_once('=').map_or(e.as_str(), |(n, _)| n);
        !ov.remove_env.iter().any(|r| r == name)
    });
    for (k, v) in &spec.env {
        env.retain(|e| e.split_once('=').map_or(e.as_str(), |(n, _)| n) != k);
        env.push(format!("{k}={v}"));
    }
    let mut labels = cfg.labels.clone().unwrap_or_default();
    for (k, v) in &spec.labels {
        labels.insert(k.clone(), v.clone());
    }

    // Anonymous and named volumes that are not in Binds/Mounts (declared by the image or
    // with `-v /path`) are carried over by name, so the replacement sees the same data.
    let mut binds = hc.binds.clone().unwrap_or_default();
    binds.retain(|b| !ov.drop_binds.contains(b));
    // What delivery drops is not carried over either: its volumes show in blue's mounts.
    let declared: Vec<String> = binds
        .iter()
        .chain(&ov.drop_binds)
        .filter_map(|b| b.split(':').nth(1).map(str::to_owned))
        .chain(hc.mounts.iter().flatten().filter_map(|m| m.target.clone()))
        .collect();
    for m in blue.mounts.iter().flatten() {
        let (Some(name), Some(dest)) = (&m.name, &m.destination) else {
            continue;
        };
        if m.typ.as_deref() == Some("volume") && !declared.contains(dest) {
            let mode = if m.rw == Some(false) { ":ro" } else { "" };
            binds.push(format!("{name}:{dest}{mode}"));
        }
    }
    binds.extend(ov.add_binds.iter().cloned());
    if !binds.is_empty() || hc.binds.is_some() {
        hc.binds = Some(binds);
    }
    let (entrypoint, cmd) = match &ov.entrypoint {
        Some((e, c)) => (Some(e.clone()), Some(c.clone())),
        None => (cfg.entrypoint, cfg.cmd),
    };

    let mut endpoints: Vec<(String, EndpointSettings)> = blue
        .network_settings
        .as_ref()
        .and_then(|n| n.networks.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|(name, ep)| {
            let aliases = ep.aliases.map(|a| {
                a.into_iter()
                    .filter(|x| !blue_id.starts_with(x.as_str()))
                    .collect::<Vec<_>>()
            });
            let keep = EndpointSettings {
                aliases: aliases.filter(|a| !a.is_empty()),
                links: ep.links,
                driver_opts: ep.driver_opts,
                ..Default::default()
            };
            (name, keep)
        })
        .collect();
    endpoints.sort_by(|a, b| a.0.cmp(&b.0));
    // The network given at create time must be the network mode's (Docker ignores or
    // rejects another); then the route's network; then the first by name.
    let mode = hc.network_mode.clone().unwrap_or_default();
    let mode_net = if mode == "default" {
        "bridge"
    } else {
        mode.as_str()
    };
    let first = endpoints
        .iter()
        .find(|(e, _)| e == mode_net)
        .map(|(e, _)| e.clone())
        .or_else(|| {
            spec.primary_network
                .clone()
                .filter(|n| endpoints.iter().any(|(e, _)| e == n))
        })
        .or_else(|| endpoints.first().map(|(e, _)| e.clone()));
    let mut first_ep = HashMap::new();
    let mut more = Vec::new();
    for (name, ep) in endpoints {
        if Some(&name) == first.as_ref() {
            first_ep.insert(name, ep);
        } else if !matches!(mode.as_str(), "host" | "none") && !mode.starts_with("container:") {
            more.push((name, ep));
        }
    }

    let create = ContainerCreateBody {
        hostname,
        domainname: cfg.domainname,
        user: cfg.user,
        exposed_ports: cfg.exposed_ports,
        tty: cfg.tty,
        open_stdin: cfg.open_stdin,
        stdin_once: cfg.stdin_once,
        env: Some(env),
        cmd,
        healthcheck: cfg.healthcheck,
        args_escaped: cfg.args_escaped,
        image: Some(image),
        volumes: cfg.volumes,
        working_dir: cfg.working_dir,
        entrypoint,
        network_disabled: cfg.network_disabled,
        labels: Some(labels),
        stop_signal: cfg.stop_signal,
        stop_timeout: cfg.stop_timeout,
        shell: cfg.shell,
        host_config: Some(hc),
        networking_config: (!first_ep.is_empty()).then_some(NetworkingConfig {
            endpoints_config: Some(first_ep),
        }),
        ..Default::default()
    };
    CloneBody {
        create,
        more_networks: more,
        auto_remove_cleared,
    }
}
