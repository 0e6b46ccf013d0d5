//! `swarm:`: the file section (serde) and the checked [`SwarmSettings`] the driver runs on.
//!
//! The section is off unless present: `swarm: {}` turns the driver on with its defaults
//! (driver name `dso`, rotation on, a scan every 10 s, no policy rule, so every request is
//! denied until one is written).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::config::ConfigError;
use crate::duration::HumanDuration;

/// The driver name when `swarm.driver` is not set (socket `/run/docker/plugins/dso.sock`).
pub const DEFAULT_DRIVER: &str = "dso";
/// How often the leader lists secrets, services and tasks when `swarm.scan_interval` is
/// not set.
pub const DEFAULT_SCAN_INTERVAL: Duration = Duration::from_secs(10);

/// `swarm:` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SwarmSection {
    /// `false` keeps the section but serves nothing (default true).
    pub enabled: Option<bool>,
    /// The plugin name Swarm secrets give with `--driver` (default `dso`).
    pub driver: Option<String>,
    /// Whether a changed value rolls the services that use it (default true).
    pub rotate: Option<bool>,
    /// How often the leader looks at secrets, services and tasks (default 10s).
    pub scan_interval: Option<HumanDuration>,
    /// Who may read what; no rule denies every request.
    pub policy: Option<Vec<RuleEntry>>,
}

/// `swarm.policy[]` as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    /// Swarm secret names (without dso's version suffix); `*` matches any run of characters.
    pub secrets: Option<Vec<String>>,
    /// Service names; `*` as above.
    pub services: Option<Vec<String>>,
    /// Service labels that must all be present with these values.
    pub service_labels: Option<BTreeMap<String, String>>,
}

/// The checked `swarm:` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwarmSettings {
    /// Plugin name: the socket is `/run/docker/plugins/<driver>.sock`.
    pub driver: String,
    /// Whether changes roll services.
    pub rotate: bool,
    /// The leader's scan period.
    pub scan_interval: Duration,
    /// The access rules, in file order.
    pub policy: Vec<Rule>,
}

/// One access rule: a request is allowed when its secret matches one of `secrets` and its
/// service matches one of `services` (when given) and carries every `service_labels`
/// entry (when given).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    /// Secret name patterns.
    pub secrets: Vec<String>,
    /// Service name patterns; empty means any name.
    pub services: Vec<String>,
    /// Required service labels; empty means none required.
    pub service_labels: BTreeMap<String, String>,
}

/// Checks `swarm:` (`lines` gives the line of a key path); `None` when the section is absent or `enabled: false`.
pub fn check(
    lines: &dyn Fn(&str) -> Option<usize>,
    raw: Option<SwarmSection>,
) -> Result<Option<SwarmSettings>, ConfigError> {
    let Some(raw) = raw else { return Ok(None) };
    if raw.enabled == Some(false) {
        return Ok(None);
    }
    let driver = raw.driver.unwrap_or_else(|| DEFAULT_DRIVER.to_owned());
    if !valid_name(&driver) {
        return Err(invalid(
            lines,
            "swarm.driver",
            format!(
                "{driver:?} is not a plugin name: 1-64 letters, digits, '_', '.' and '-', starting with a letter or digit (the socket is /run/docker/plugins/NAME.sock)"
            ),
        ));
    }
    let scan_interval = raw
        .scan_interval
        .map_or(DEFAULT_SCAN_INTERVAL, HumanDuration::get);
    if scan_interval < Duration::from_millis(100) || scan_interval > Duration::from_secs(3600) {
        return Err(invalid(
            lines,
            "swarm.scan_interval",
            format!(
                "{} is out of range; give 100ms to 1h",
                crate::duration::format(scan_interval)
            ),
        ));
    }
    let mut policy = Vec::new();
    for (i, r) in raw.policy.unwrap_or_default().into_iter().enumerate() {
        let key = format!("swarm.policy[{i}]");
        let secrets = r.secrets.unwrap_or_default();
        if secrets.is_empty() {
            return Err(invalid(
                lines,
                &format!("{key}.secrets"),
                "a rule names the Swarm secrets it allows (e.g. secrets: [\"db-*\"]; [\"*\"] for all)"
                    .to_owned(),
            ));
        }
        let services = r.services.unwrap_or_default();
        let service_labels = r.service_labels.unwrap_or_default();
        if services.is_empty() && service_labels.is_empty() {
            return Err(invalid(
                lines,
                &key,
                "a rule names the services it allows: services: [NAME, ...] and/or service_labels: {KEY: VALUE} ([\"*\"] for every service)".to_owned(),
            ));
        }
        for (field, patterns) in [("secrets", &secrets), ("services", &services)] {
            if let Some(p) = patterns.iter().find(|p| p.trim().is_empty()) {
                return Err(invalid(
                    lines,
                    &format!("{key}.{field}"),
                    format!("empty pattern {p:?}; write a name or a pattern with '*'"),
                ));
            }
        }
        policy.push(Rule {
            secrets,
            services,
            service_labels,
        });
    }
    Ok(Some(SwarmSettings {
        driver,
        rotate: raw.rotate.unwrap_or(true),
        scan_interval,
        policy,
    }))
}

/// Docker's plugin names as the legacy socket lookup takes them.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
}

fn invalid(lines: &dyn Fn(&str) -> Option<usize>, key: &str, message: String) -> ConfigError {
    ConfigError::Invalid {
        key: key.to_owned(),
        line: lines(key),
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Option<SwarmSettings>, String> {
        crate::config::parse(text, |_| None)
            .map(|c| c.swarm)
            .map_err(|e| e.to_string())
    }

    #[test]
    fn absent_or_disabled_is_off_and_present_has_defaults() {
        assert_eq!(parse("proxy:\n  listeners: []\n").unwrap(), None);
        assert_eq!(parse("swarm:\n  enabled: false\n").unwrap(), None);
        let s = parse("swarm: {}\n").unwrap().unwrap();
        assert_eq!(s.driver, "dso");
        assert!(s.rotate);
        assert_eq!(s.scan_interval, DEFAULT_SCAN_INTERVAL);
        assert!(s.policy.is_empty());
    }

    #[test]
    fn rules_are_read_in_order() {
        let s = parse(
            "swarm:\n  driver: dso-test\n  rotate: false\n  scan_interval: 2s\n  policy:\n    - secrets: [db]\n      services: [api]\n    - secrets: [\"*\"]\n      service_labels:\n        team: pay\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            (s.driver.as_str(), s.rotate, s.scan_interval),
            ("dso-test", false, Duration::from_secs(2))
        );
        assert_eq!(s.policy.len(), 2);
        assert_eq!(s.policy[0].services, vec!["api".to_owned()]);
        assert_eq!(s.policy[1].service_labels["team"], "pay");
    }

    #[test]
    fn bad_values_name_the_key_and_the_line() {
        let e = parse("swarm:\n  driver: ../x\n").unwrap_err();
        assert!(e.contains("swarm.driver") && e.contains("line 2"), "{e}");
        let e = parse("swarm:\n  scan_interval: 10ms\n").unwrap_err();
        assert!(e.contains("swarm.scan_interval"), "{e}");
        let e = parse("swarm:\n  policy:\n    - services: [api]\n").unwrap_err();
        assert!(e.contains("swarm.policy[0].secrets"), "{e}");
        let e = parse("swarm:\n  policy:\n    - secrets: [db]\n").unwrap_err();
        assert!(
            e.contains("swarm.policy[0]") && e.contains("service_labels"),
            "{e}"
        );
        let e = parse("swarm:\n  policy:\n    - secrets: [\"\"]\n      services: [a]\n").unwrap_err();
        assert!(e.contains("empty pattern"), "{e}");
        let e = parse("swarm:\n  polcy: []\n").unwrap_err();
        assert!(e.contains("polcy"), "{e}");
    }
}
