//! The reload's diff: which listeners are added, moved, swapped, updated, removed or left
//! alone, and which keys need a restart.

use std::collections::BTreeMap;

use super::{plan, secret_restart_keys};
use crate::config::{Config, parse};

fn cfg(text: &str) -> Config {
    parse(text, |_| None).unwrap_or_else(|e| panic!("{e}"))
}

fn applied(c: &Config) -> BTreeMap<String, dso_proxy::ListenerConfig> {
    c.listeners.iter().map(|l| (l.name.clone(), l.clone())).collect()
}

const BASE: &str = "\
proxy:
  listeners:
    - name: a
      listen: 127.0.0.1:20001
      backends: [127.0.0.1:30001]
    - name: b
      listen: 127.0.0.1:20002
      backends: [127.0.0.1:30002]
    - name: c
      listen: 127.0.0.1:20003
      backends: [127.0.0.1:30003]
";

#[test]
fn the_same_file_changes_nothing() {
    let old = cfg(BASE);
    let p = plan(&applied(&old), &old, &cfg(BASE));
    assert_eq!(p.unchanged, ["a", "b", "c"]);
    assert!(p.add.is_empty() && p.moved.is_empty() && p.swap.is_empty());
    assert!(p.update.is_empty() && p.remove.is_empty() && p.restart.is_empty());
}

#[test]
fn each_kind_of_change_is_planned_once_and_the_rest_is_untouched() {
    let old = cfg(BASE);
    let new = cfg("\
proxy:
  listeners:
    - name: a
      listen: 127.0.0.1:20001
      backends: [127.0.0.1:30009]
      connect_timeout: 2s
      idle_timeout: 5m
    - name: c
      listen: 127.0.0.1:20013
      backends: [127.0.0.1:30003]
    - name: d
      listen: 127.0.0.1:20004
      backends: [127.0.0.1:30004]
");
    let p = plan(&applied(&old), &old, &new);
    assert_eq!(p.add.iter().map(|l| l.name.as_str()).collect::<Vec<_>>(), ["d"]);
    assert_eq!(p.moved.len(), 1);
    assert_eq!(p.moved[0].name, "c");
    assert_eq!(p.moved[0].listen.port(), 20013);
    assert_eq!(p.swap.len(), 1);
    assert_eq!(p.swap[0].0, "a");
    assert_eq!(p.swap[0].1[0].addr.port(), 30009);
    assert_eq!(p.update.len(), 1);
    assert_eq!(p.update[0].0.name, "a");
    assert_eq!(p.update[0].1, ["connect_timeout", "idle_timeout"]);
    assert_eq!(p.remove, ["b"]);
    assert!(p.unchanged.is_empty());
    assert!(p.restart.is_empty(), "{:?}", p.restart);
}

#[test]
fn a_settings_change_without_new_backends_swaps_nothing() {
    let old = cfg(BASE);
    let new = cfg(&BASE.replace(
        "      backends: [127.0.0.1:30002]\n",
        "      backends: [127.0.0.1:30002]\n      max_connections: 5\n      drain_timeout: 1s\n",
    ));
    let p = plan(&applied(&old), &old, &new);
    assert!(p.swap.is_empty());
    assert_eq!(p.update.len(), 1);
    assert_eq!(p.update[0].1, ["drain_timeout", "max_connections"]);
    assert_eq!(p.unchanged, ["a", "c"]);
}

#[test]
fn socket_settings_and_agent_keys_are_reported_as_needing_a_restart() {
    let old = cfg(BASE);
    let new = cfg(&format!(
        "agent:\n  socket: /tmp/other.sock\n  shutdown_timeout: 5s\nlogging:\n  level: debug\n{}",
        BASE.replace("proxy:\n", "proxy:\n  max_connections: 10\n")
            .replace(
                "      backends: [127.0.0.1:30003]\n",
                "      backends: [127.0.0.1:30003]\n      backlog: 16\n      keepalive: off\n",
            )
    ));
    let p = plan(&applied(&old), &old, &new);
    assert_eq!(
        p.restart,
        [
            "proxy.listeners[c].backlog",
            "proxy.listeners[c].keepalive",
            "agent.socket",
            "agent.shutdown_timeout",
            "proxy.max_connections",
            "logging",
        ]
    );
    // The listener is otherwise unchanged: nothing is applied to it.
    assert!(p.update.is_empty() && p.swap.is_empty() && p.moved.is_empty());
}

#[test]
fn providers_and_secrets_added_removed_or_changed_are_diffed_not_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let vault = |name: &str| dir.path().join(name).display().to_string();
    let with =
        |providers: &str, secrets: &str| cfg(&format!("{BASE}providers:\n{providers}secrets:\n{secrets}"));
    let old = with(
        &format!("  v1:\n    type: local\n    vault_file: {}\n", vault("a.vault")),
        "  - name: s1\n    provider: v1\n    mappings: {K: app/x}\n",
    );
    let new = with(
        &format!(
            "  v1:\n    type: local\n    vault_file: {}\n  v2:\n    type: local\n    vault_file: {}\n",
            vault("b.vault"),
            vault("c.vault")
        ),
        "  - name: s2\n    provider: v2\n    mappings: {K: app/y}\n",
    );
    // An agent with a secret side applies them live: the plan names none as a restart,
    // the secret side's diff names each.
    let p = plan(&applied(&old), &old, &new);
    assert!(p.restart.is_empty(), "{:?}", p.restart);
    let d = crate::secrets::diff(&old.secrets, &new.secrets);
    assert_eq!(d.providers_added, ["v2"]);
    assert_eq!(d.providers_replaced, ["v1"]);
    assert!(d.providers_removed.is_empty());
    assert_eq!(d.secrets_added, ["s2"]);
    assert_eq!(d.secrets_removed, ["s1"]);
    assert!(d.secrets_replaced.is_empty());
    assert!(crate::secrets::diff(&new.secrets, &new.secrets).is_empty());
    // An agent started without one needs a restart to start it.
    assert_eq!(
        secret_restart_keys(&old, &new),
        ["providers[v1]", "providers[v2]", "secrets[s1]", "secrets[s2]"]
    );
}

#[test]
fn a_listener_added_back_after_a_removal_is_an_add() {
    let old = cfg(BASE);
    let mut a = applied(&old);
    a.remove("b");
    let p = plan(&a, &old, &old);
    assert_eq!(p.add.len(), 1);
    assert_eq!(p.add[0].name, "b");
    assert_eq!(p.unchanged, ["a", "c"]);
}
