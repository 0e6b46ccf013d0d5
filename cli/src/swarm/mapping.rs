//! Which dso value a Swarm secret maps to, read from its labels (Swarm forwards a
//! secret's labels to the driver, never its driver options).
//!
//! | label | meaning |
//! |---|---|
//! | `dso.secret=NAME` | the value of the configured `secrets[]` entry `NAME` |
//! | `dso.key=KEY` | with `dso.secret`: which of its mappings (needed when it has several) |
//! | `dso.ref=REF` | a reference in a provider's own syntax (`myapp/db_password`, `prod/db#password`) |
//! | `dso.ref=PROVIDER://REF` | the same, naming the provider instance inline |
//! | `dso.provider=NAME` | with `dso.ref`: the provider instance (needed when there are several) |
//!
//! The labels dso adds to the versions it creates: [`LABEL_BASE`] and [`LABEL_VERSION`].

use std::collections::HashMap;

use dso_secrets::Reference;
use dso_secrets::config::SecretsConfig;

/// A configured secret by name.
pub const LABEL_SECRET: &str = "dso.secret";
/// Which mapping of that secret.
pub const LABEL_KEY: &str = "dso.key";
/// A reference.
pub const LABEL_REF: &str = "dso.ref";
/// The reference's provider instance.
pub const LABEL_PROVIDER: &str = "dso.provider";
/// On a version dso created: the name of the Swarm secret it is a version of.
pub const LABEL_BASE: &str = "dso.swarm.base";
/// On a version dso created: its number (the secret created by hand is version 1).
pub const LABEL_VERSION: &str = "dso.swarm.version";

/// The name policy rules and rotation know a Swarm secret by: the name it was created
/// with, whatever version of it this is.
pub fn base_name<'a>(name: &'a str, labels: &'a HashMap<String, String>) -> &'a str {
    labels.get(LABEL_BASE).map_or(name, String::as_str)
}

/// The version number of a Swarm secret (1 for one dso did not create).
pub fn version_of(labels: &HashMap<String, String>) -> u64 {
    labels
        .get(LABEL_VERSION)
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// The reference Swarm secret `name`'s labels map to, or why they map to none (an error
/// that names the label and the fix).
pub fn resolve(
    name: &str,
    labels: &HashMap<String, String>,
    cfg: &SecretsConfig,
) -> Result<Reference, String> {
    match (labels.get(LABEL_SECRET), labels.get(LABEL_REF)) {
        (Some(_), Some(_)) => Err(format!(
            "Swarm secret {name} has both {LABEL_SECRET} and {LABEL_REF}; keep one"
        )),
        (None, None) => Err(format!(
            "Swarm secret {name} has no {LABEL_SECRET} or {LABEL_REF} label, so dso does not know its value; create it with --label {LABEL_SECRET}=NAME (a secrets[] entry) or --label {LABEL_REF}=REFERENCE"
        )),
        (Some(secret), None) => by_secret(name, secret, labels.get(LABEL_KEY), cfg),
        (None, Some(raw)) => by_ref(name, raw, labels.get(LABEL_PROVIDER), cfg),
    }
}

fn by_secret(
    name: &str,
    secret: &str,
    key: Option<&String>,
    cfg: &SecretsConfig,
) -> Result<Reference, String> {
    let Some(spec) = cfg.secrets.iter().find(|s| s.name == secret) else {
        let known: Vec<&str> = cfg.secrets.iter().map(|s| s.name.as_str()).collect();
        return Err(format!(
            "Swarm secret {name}: {LABEL_SECRET}={secret} names no secrets[] entry of the agent's config (known: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ));
    };
    let keys = || {
        spec.mappings
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match key {
        Some(k) => spec
            .mappings
            .iter()
            .find(|(mk, _)| mk == k)
            .map(|(_, r)| r.clone())
            .ok_or_else(|| {
                format!(
                    "Swarm secret {name}: secret {secret} has no mapping {LABEL_KEY}={k} (its keys: {})",
                    keys()
                )
            }),
        None => match spec.mappings.as_slice() {
            [(_, r)] => Ok(r.clone()),
            _ => Err(format!(
                "Swarm secret {name}: secret {secret} has {} mappings; say which with --label {LABEL_KEY}=KEY (its keys: {})",
                spec.mappings.len(),
                keys()
            )),
        },
    }
}

fn by_ref(
    name: &str,
    raw: &str,
    provider: Option<&String>,
    cfg: &SecretsConfig,
) -> Result<Reference, String> {
    let inline = raw.split_once("://").filter(|(p, _)| cfg.provider(p).is_some());
    let (provider, raw) = match (provider, inline) {
        (Some(p), _) => (p.as_str(), raw),
        (None, Some((p, rest))) => (p, rest),
        (None, None) => match cfg.providers.as_slice() {
            [only] => (only.name.as_str(), raw),
            _ => {
                let known: Vec<&str> = cfg.providers.iter().map(|p| p.name.as_str()).collect();
                return Err(format!(
                    "Swarm secret {name}: {LABEL_REF}={raw} names no provider and the agent has {}; add --label {LABEL_PROVIDER}=NAME or write {LABEL_REF}=NAME://REFERENCE (providers: {})",
                    known.len(),
                    known.join(", ")
                ));
            }
        },
    };
    let Some(spec) = cfg.provider(provider) else {
        let known: Vec<&str> = cfg.providers.iter().map(|p| p.name.as_str()).collect();
        return Err(format!(
            "Swarm secret {name}: provider {provider} is not in the agent's providers: ({})",
            known.join(", ")
        ));
    };
    Reference::parse(spec.kind(), provider, raw).map_err(|e| format!("Swarm secret {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> SecretsConfig {
        let text = "providers:\n  local:\n    type: local\n    vault_file: /tmp/v.enc\n    master_key_file: /tmp/m.key\n  other:\n    type: local\n    vault_file: /tmp/w.enc\n    master_key_file: /tmp/n.key\nsecrets:\n  - name: db\n    provider: local\n    mappings:\n      PASSWORD: app/db_password\n      USER: app/db_user\n  - name: one\n    provider: local\n    mappings:\n      TOKEN: app/token\n";
        crate::config::parse(text, |_| None).unwrap().secrets
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_configured_secret_with_one_mapping_needs_no_key() {
        let r = resolve("s", &labels(&[("dso.secret", "one")]), &cfg()).unwrap();
        assert_eq!((r.provider.as_str(), r.raw.as_str()), ("local", "app/token"));
    }

    #[test]
    fn a_configured_secret_with_several_mappings_needs_its_key() {
        let e = resolve("s", &labels(&[("dso.secret", "db")]), &cfg()).unwrap_err();
        assert!(e.contains("dso.key=KEY") && e.contains("PASSWORD, USER"), "{e}");
        let r = resolve("s", &labels(&[("dso.secret", "db"), ("dso.key", "USER")]), &cfg()).unwrap();
        assert_eq!(r.raw, "app/db_user");
        let e = resolve("s", &labels(&[("dso.secret", "db"), ("dso.key", "X")]), &cfg()).unwrap_err();
        assert!(e.contains("no mapping dso.key=X"), "{e}");
        let e = resolve("s", &labels(&[("dso.secret", "nope")]), &cfg()).unwrap_err();
        assert!(e.contains("known: db, one"), "{e}");
    }

    #[test]
    fn a_reference_names_its_provider_inline_or_by_label() {
        let r = resolve("s", &labels(&[("dso.ref", "other://x/y#k")]), &cfg()).unwrap();
        assert_eq!(
            (r.provider.as_str(), r.object.as_str(), r.field.as_deref()),
            ("other", "x/y", Some("k"))
        );
        let r = resolve(
            "s",
            &labels(&[("dso.ref", "x/y"), ("dso.provider", "local")]),
            &cfg(),
        )
        .unwrap();
        assert_eq!(r.provider, "local");
        let e = resolve("s", &labels(&[("dso.ref", "x/y")]), &cfg()).unwrap_err();
        assert!(e.contains("dso.provider=NAME"), "{e}");
        let e = resolve(
            "s",
            &labels(&[("dso.ref", "x/y"), ("dso.provider", "zz")]),
            &cfg(),
        )
        .unwrap_err();
        assert!(e.contains("provider zz"), "{e}");
    }

    #[test]
    fn no_label_or_both_is_an_error_that_names_them() {
        let e = resolve("s", &labels(&[]), &cfg()).unwrap_err();
        assert!(e.contains("dso.secret") && e.contains("dso.ref"), "{e}");
        let e = resolve("s", &labels(&[("dso.secret", "one"), ("dso.ref", "a")]), &cfg()).unwrap_err();
        assert!(e.contains("keep one"), "{e}");
    }

    #[test]
    fn versions_keep_their_base_name() {
        assert_eq!(base_name("db", &labels(&[])), "db");
        assert_eq!(base_name("db.v3", &labels(&[(LABEL_BASE, "db")])), "db");
        assert_eq!(version_of(&labels(&[])), 1);
        assert_eq!(version_of(&labels(&[(LABEL_VERSION, "3")])), 3);
    }
}
