//! What `dso up` changes in each managed service, written for Compose: an override file
//! for v2 (read with the user's files, `-f -`, `!reset` removing ports and variables), or
//! the whole merged model, changed, for v1 (which takes `-f -` only as the single file).
//!
//! Nothing here is a secret value: labels name references, binds name the store's
//! directories, variables hold file paths. Every string written is `$`-escaped for
//! Compose's interpolation.

use std::collections::BTreeMap;
use std::fmt::Write;

use anyhow::{Context, bail};
use serde_json::{Map, Value, json};

use super::prepare::PrepareReply;
use super::service::{LABEL_HOST_PORTS, LABEL_RELOADER, ServiceView, escape};

/// One managed service's changes (all strings unescaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// The service.
    pub service: String,
    /// Labels to set.
    pub labels: BTreeMap<String, String>,
    /// Whether `ports:` is removed (moved into the label `dso.host_ports`).
    pub remove_ports: bool,
    /// Variables to remove (`dso://`: the launcher sets them).
    pub remove_env: Vec<String>,
    /// Variables to set (`dsofile://`: the file's path).
    pub set_env: BTreeMap<String, String>,
    /// The service's whole environment afterwards, `$`-escaped (v2 replaces it with
    /// `!override`: `!reset` of one key does not remove a `KEY=VALUE` list item).
    pub environment: BTreeMap<String, Option<String>>,
    /// Read-only binds `(source, target)`.
    pub binds: Vec<(String, String)>,
    /// Entrypoint, when the launcher wraps it.
    pub entrypoint: Option<Vec<String>>,
    /// Command, set with the entrypoint.
    pub command: Option<Vec<String>>,
}

impl Change {
    /// The change of `svc`, given prepare's reply (`None` when it has no references).
    pub fn new(svc: &ServiceView, reply: Option<&PrepareReply>) -> anyhow::Result<Change> {
        let mut labels = BTreeMap::from([(LABEL_RELOADER.to_owned(), "true".to_owned())]);
        if let Some(h) = &svc.host_ports {
            labels.insert(LABEL_HOST_PORTS.to_owned(), h.clone());
        }
        let mut c = Change {
            service: svc.name.clone(),
            labels,
            remove_ports: svc.has_ports,
            remove_env: Vec::new(),
            set_env: BTreeMap::new(),
            environment: svc.environment.clone(),
            binds: Vec::new(),
            entrypoint: None,
            command: None,
        };
        if let Some(r) = reply {
            c.labels.extend(r.labels.clone());
            c.remove_env = r.remove_env.clone();
            c.remove_env.sort();
            c.set_env = r.environment.clone();
            for k in &c.remove_env {
                c.environment.remove(k);
            }
            for (k, v) in &c.set_env {
                c.environment.insert(k.clone(), Some(escape(v)));
            }
            for b in &r.binds {
                let spec = b.strip_suffix(":ro").unwrap_or(b);
                let Some((source, target)) = spec.rsplit_once(':') else {
                    bail!(
                        "service {}: bind {b:?} from prepare is not SOURCE:TARGET:ro",
                        svc.name
                    );
                };
                c.binds.push((source.to_owned(), target.to_owned()));
            }
            c.entrypoint = r.entrypoint.clone();
            c.command = r.command.clone();
        }
        Ok(c)
    }
}

/// A YAML double-quoted scalar (JSON's string syntax is valid YAML), `$`-escaped.
fn q(s: &str) -> String {
    serde_json::to_string(&escape(s)).expect("strings serialize")
}

fn list(items: &[String]) -> String {
    format!("[{}]", items.iter().map(|s| q(s)).collect::<Vec<_>>().join(", "))
}

/// The Compose v2 override: one entry per changed service, in the given order, byte-stable
/// for unchanged inputs.
pub fn v2_override(project: &str, changes: &[Change]) -> String {
    let mut y = String::new();
    let _ = writeln!(
        y,
        "# dso up: override of project {project} (given on stdin, never written to disk)"
    );
    y.push_str("services:\n");
    for c in changes {
        let _ = writeln!(y, "  {}:", q(&c.service));
        y.push_str("    labels:\n");
        for (k, v) in &c.labels {
            let _ = writeln!(y, "      {}: {}", q(k), q(v));
        }
        if c.remove_ports {
            y.push_str("    ports: !reset []\n");
        }
        if !c.remove_env.is_empty() || !c.set_env.is_empty() {
            // Compose v2 applies `env_file:` after merging the files; its variables are
            // in the printed environment already, so the files are dropped with it.
            y.push_str("    env_file: !reset []\n");
            if c.environment.is_empty() {
                y.push_str("    environment: !reset {}\n");
            } else {
                y.push_str("    environment: !override\n");
            }
            for (k, v) in &c.environment {
                match v {
                    // Already escaped: as Compose printed it, or escaped above.
                    Some(v) => {
                        let _ = writeln!(
                            y,
                            "      {}: {}",
                            q(k),
                            serde_json::to_string(v).expect("strings serialize")
                        );
                    }
                    None => {
                        let _ = writeln!(y, "      {}: null", q(k));
                    }
                }
            }
        }
        if !c.binds.is_empty() {
            y.push_str("    volumes:\n");
            for (source, target) in &c.binds {
                let _ = writeln!(
                    y,
                    "      - {{type: bind, source: {}, target: {}, read_only: true}}",
                    q(source),
                    q(target)
                );
            }
        }
        if let Some(e) = &c.entrypoint {
            let _ = writeln!(y, "    entrypoint: {}", list(e));
        }
        if let Some(cmd) = &c.command {
            let _ = writeln!(y, "    command: {}", list(cmd));
        }
    }
    y
}

/// The Compose v1 input: the printed model (still `$`-escaped) with the changes applied,
/// as YAML.
pub fn v1_model(model: &Value, changes: &[Change]) -> anyhow::Result<String> {
    let mut model = model.clone();
    let services = model
        .get_mut("services")
        .and_then(Value::as_object_mut)
        .context("the model has no services")?;
    for c in changes {
        let svc = services
            .get_mut(&c.service)
            .and_then(Value::as_object_mut)
            .with_context(|| format!("service {} is not in the model", c.service))?;
        apply_v1(svc, c);
    }
    serde_yaml::to_string(&model).context("writing the merged model")
}

fn apply_v1(svc: &mut Map<String, Value>, c: &Change) {
    let labels = object_entry(svc, "labels");
    for (k, v) in &c.labels {
        labels.insert(k.clone(), Value::String(escape(v)));
    }
    if c.remove_ports {
        svc.remove("ports");
    }
    let env = object_entry(svc, "environment");
    for k in &c.remove_env {
        env.remove(k);
    }
    for (k, v) in &c.set_env {
        env.insert(k.clone(), Value::String(escape(v)));
    }
    if env.is_empty() {
        svc.remove("environment");
    }
    if !c.binds.is_empty() {
        let vols = svc.entry("volumes").or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(a) = vols {
            let targets: Vec<&str> = c.binds.iter().map(|(_, t)| t.as_str()).collect();
            a.retain(|v| !targets.contains(&volume_target(v).unwrap_or_default().as_str()));
            for (source, target) in &c.binds {
                a.push(json!({"type": "bind", "source": escape(source), "target": escape(target), "read_only": true}));
            }
        }
    }
    let words = |w: &[String]| Value::Array(w.iter().map(|s| Value::String(escape(s))).collect());
    if let Some(e) = &c.entrypoint {
        svc.insert("entrypoint".to_owned(), words(e));
    }
    if let Some(cmd) = &c.command {
        svc.insert("command".to_owned(), words(cmd));
    }
}

/// A map entry of the service, a list `KEY=VALUE` turned into a map first.
fn object_entry<'a>(svc: &'a mut Map<String, Value>, key: &str) -> &'a mut Map<String, Value> {
    let v = svc.entry(key).or_insert_with(|| Value::Object(Map::new()));
    if let Value::Array(a) = v {
        let m: Map<String, Value> = a
            .iter()
            .filter_map(Value::as_str)
            .map(|s| match s.split_once('=') {
                Some((k, v)) => (k.to_owned(), Value::String(v.to_owned())),
                None => (s.to_owned(), Value::Null),
            })
            .collect();
        *v = Value::Object(m);
    }
    if !v.is_object() {
        *v = Value::Object(Map::new());
    }
    v.as_object_mut().expect("made an object")
}

/// The container path of a volume entry (`SRC:DST[:MODE]` or the long syntax).
fn volume_target(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => {
            let parts: Vec<&str> = s.split(':').collect();
            match parts.len() {
                1 => Some(parts[0].to_owned()),
                _ => Some(parts[1].to_owned()),
            }
        }
        Value::Object(m) => m.get("target").and_then(Value::as_str).map(str::to_owned),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change() -> Change {
        Change {
            service: "web".into(),
            labels: BTreeMap::from([
                ("dso.reloader".into(), "true".into()),
                (
                    "dso.refs".into(),
                    r#"{"env":[{"var":"A","provider":"local","ref":"a$b"}]}"#.into(),
                ),
            ]),
            remove_ports: true,
            remove_env: vec!["A".into()],
            set_env: BTreeMap::from([("F".into(), "/run/secrets/F".into())]),
            environment: BTreeMap::from([
                ("F".into(), Some("/run/secrets/F".into())),
                ("P".into(), Some("x$$y".into())),
            ]),
            binds: vec![("/run/dso/secrets/compose-1/env".into(), "/run/dso/env".into())],
            entrypoint: Some(vec!["/run/dso/init".into(), "--".into(), "/app".into()]),
            command: Some(vec!["--x".into()]),
        }
    }

    #[test]
    fn the_v2_override_resets_ports_and_variables_and_escapes_dollars() {
        let y = v2_override("shop", &[change()]);
        assert!(y.contains("    ports: !reset []\n"), "{y}");
        assert!(y.contains("    environment: !override\n"), "{y}");
        assert!(!y.contains("\"A\""), "{y}");
        assert!(
            y.contains("      \"P\": \"x$$y\"\n"),
            "the model's escaping is kept: {y}"
        );
        assert!(y.contains(r#"a$$b"#), "{y}");
        assert!(y.contains(r#"read_only: true"#), "{y}");
        let parsed: serde_yaml::Value =
            serde_yaml::from_str(&y.replace("!reset ", "").replace("!override", "")).unwrap();
        assert!(parsed["services"]["web"]["entrypoint"].is_sequence());
        assert_eq!(y, v2_override("shop", &[change()]), "byte-stable");
    }

    #[test]
    fn the_v1_model_is_changed_in_place() {
        let model = json!({"services": {"web": {
            "image": "app", "ports": ["127.0.0.1:80:80/tcp"],
            "environment": {"A": "dso://a$$b", "B": "x$$y"},
            "volumes": ["/data:/run/dso/env:rw", "/keep:/keep:rw"],
        }, "db": {"image": "pg"}}});
        let y = v1_model(&model, &[change()]).unwrap();
        let back: Value = serde_yaml::from_str(&y).unwrap();
        let web = &back["services"]["web"];
        assert!(web.get("ports").is_none());
        assert!(web["environment"].get("A").is_none());
        assert_eq!(web["environment"]["B"], "x$$y");
        assert_eq!(
            web["labels"]["dso.refs"].as_str().unwrap().matches("$$").count(),
            1
        );
        let vols = web["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 2, "{vols:?}");
        assert_eq!(back["services"]["db"]["image"], "pg");
    }
}
