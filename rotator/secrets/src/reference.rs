//! [`Reference`]: what a mapping points at, in its provider's syntax.
//!
//! | kind | syntax | object | field |
//! |---|---|---|---|
//! | `aws` | `SECRET_ID[#json_key]` (a name or an ARN) | the secret | a key of its JSON |
//! | `vault` | `MOUNT/data/PATH#FIELD`, or `MOUNT/data/PATH/FIELD` (last segment = field) | KV v2 secret `PATH` on `MOUNT` | a key of its data |
//! | `azure` | `NAME[#json_key]` | the Key Vault secret | a key of its JSON |
//! | `local` | `PATH[#json_key]` like `myapp/db_password` | the vault entry | a key of its JSON |
//! | `plugin` | anything non-empty | what the plugin makes of it | none |
//!
//! Two references to the same object (two fields of one Vault secret) share one version
//! poll: [`Reference::object`] is the key the watcher polls by.

use std::fmt;

use serde::Serialize;

use crate::error::{Error, Result};
use crate::spec::ProviderKind;
use crate::value::SecretValue;

/// A parsed reference. Printable: it names a secret, it is not one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Reference {
    /// Provider instance name.
    pub provider: String,
    /// The text as written in the config.
    pub raw: String,
    /// Vault only: the KV v2 mount (`secret`).
    pub mount: Option<String>,
    /// The provider-side object: AWS secret id, Vault path under the mount, Azure secret
    /// name, local entry name, or the plugin's opaque string.
    pub object: String,
    /// The key selected inside the object's JSON (or the Vault data field).
    pub field: Option<String>,
}

impl Reference {
    /// Parses `raw` in the syntax of `kind`, for provider instance `provider`.
    pub fn parse(kind: ProviderKind, provider: &str, raw: &str) -> Result<Reference> {
        let bad = |reason: &str| Error::InvalidReference {
            provider: provider.to_string(),
            reference: raw.to_string(),
            reason: reason.to_string(),
        };
        if raw.trim().is_empty() {
            return Err(bad("empty reference"));
        }
        if raw.chars().any(char::is_control) {
            return Err(bad("control characters are not allowed"));
        }
        let (mount, object, field) = match kind {
            ProviderKind::Plugin => (None, raw.to_string(), None),
            ProviderKind::Aws => {
                let (id, field) = split_field(raw).map_err(|r| bad(&r))?;
                if id.contains(char::is_whitespace) {
                    return Err(bad("a secret id has no spaces; expected SECRET_ID[#json_key]"));
                }
                (None, id, field)
            }
            ProviderKind::Azure => {
                let (name, field) = split_field(raw).map_err(|r| bad(&r))?;
                if name.len() > 127 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
                    return Err(bad(
                        "a Key Vault secret name is 1-127 letters, digits and '-'; expected NAME[#json_key]",
                    ));
                }
                (None, name, field)
            }
            ProviderKind::Local => {
                let (path, field) = split_field(raw).map_err(|r| bad(&r))?;
                check_path(&path).map_err(|r| bad(&r))?;
                (None, path, field)
            }
            ProviderKind::Vault => {
                let (path, field) = match raw.split_once('#') {
                    Some((p, f)) => (p, Some(f)),
                    None => (raw, None),
                };
                let Some((mount, rest)) = path.split_once("/data/") else {
                    return Err(bad(
                        "expected a KV v2 path MOUNT/data/PATH#FIELD (or MOUNT/data/PATH/FIELD)",
                    ));
                };
                if mount.is_empty() || mount.starts_with('/') {
                    return Err(bad("the mount before /data/ is empty"));
                }
                let (object, field) = match field {
                    Some("") => return Err(bad("empty field after '#'")),
                    Some(f) => (rest.to_string(), f.to_string()),
                    None => match rest.rsplit_once('/') {
                        Some((p, f)) if !p.is_empty() && !f.is_empty() => (p.to_string(), f.to_string()),
                        _ => {
                            return Err(bad(
                                "no field: write MOUNT/data/PATH#FIELD, or MOUNT/data/PATH/FIELD where the last segment is the field",
                            ));
                        }
                    },
                };
                check_path(&object).map_err(|r| bad(&r))?;
                (Some(mount.to_string()), object, Some(field))
            }
        };
        Ok(Reference {
            provider: provider.to_string(),
            raw: raw.to_string(),
            mount,
            object,
            field,
        })
    }

    /// The key the watcher polls by: references that differ only in their field share it.
    pub fn object_key(&self) -> (String, Option<String>, String) {
        (self.provider.clone(), self.mount.clone(), self.object.clone())
    }

    /// Picks this reference's field out of the object's value (a JSON object), or returns
    /// the whole value when there is no field. A string field gives its text; any other
    /// JSON value gives its JSON text. Empty results are refused: an empty secret is
    /// never delivered.
    pub fn select(&self, value: &SecretValue) -> Result<SecretValue> {
        let unusable = |reason: String| Error::Unusable {
            provider: self.provider.clone(),
            reference: self.raw.clone(),
            reason,
        };
        let picked = match &self.field {
            None => value.duplicate(),
            Some(field) => {
                let doc: serde_json::Value = serde_json::from_slice(value.expose()).map_err(|_| {
                    unusable(format!(
                        "the value is not a JSON object, so it has no key {field:?}"
                    ))
                })?;
                let serde_json::Value::Object(map) = doc else {
                    return Err(unusable(format!(
                        "the value is not a JSON object, so it has no key {field:?}"
                    )));
                };
                match map.get(field) {
                    None => {
                        let mut keys: Vec<&str> = map.keys().map(String::as_str).collect();
                        keys.sort_unstable();
                        return Err(unusable(format!("no key {field:?} (keys: {})", keys.join(", "))));
                    }
                    Some(serde_json::Value::String(s)) => SecretValue::from_slice(s.as_bytes()),
                    Some(serde_json::Value::Null) => {
                        return Err(unusable(format!("key {field:?} is null")));
                    }
                    Some(other) => SecretValue::new(other.to_string().into_bytes()),
                }
            }
        };
        if picked.is_empty() {
            return Err(unusable("the value is empty".to_string()));
        }
        Ok(picked)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.provider, self.raw)
    }
}

/// Splits `OBJECT#FIELD` at the first `#`.
fn split_field(raw: &str) -> Result<(String, Option<String>), String> {
    match raw.split_once('#') {
        None => Ok((raw.to_string(), None)),
        Some(("", _)) => Err("empty name before '#'".to_string()),
        Some((_, "")) => Err("empty JSON key after '#'".to_string()),
        Some((o, f)) => Ok((o.to_string(), Some(f.to_string()))),
    }
}

/// A relative slash-separated path: no empty, `.` or `..` segment, no leading `/`.
fn check_path(path: &str) -> Result<(), String> {
    if path.starts_with('/') {
        return Err("a path does not start with '/'".to_string());
    }
    if path.split('/').any(|s| s.is_empty() || s == "." || s == "..") {
        return Err("a path has no empty, '.' or '..' segment".to_string());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(kind: ProviderKind, raw: &str) -> Result<Reference> {
        Reference::parse(kind, "p", raw)
    }

    #[test]
    fn vault_forms() {
        let r = parse(ProviderKind::Vault, "secret/data/prod/database/password").unwrap();
        assert_eq!(r.mount.as_deref(), Some("secret"));
        assert_eq!(r.object, "prod/database");
        assert_eq!(r.field.as_deref(), Some("password"));
        let r = parse(ProviderKind::Vault, "kv/team/data/app/db#user").unwrap();
        assert_eq!(r.mount.as_deref(), Some("kv/team"));
        assert_eq!(r.object, "app/db");
        assert_eq!(r.field.as_deref(), Some("user"));
        for bad in [
            "secret/prod/db",
            "secret/data/onlyone",
            "/data/x/y",
            "secret/data/a#",
        ] {
            assert!(parse(ProviderKind::Vault, bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn aws_azure_local_plugin() {
        let r = parse(ProviderKind::Aws, "prod/mysql/root_password").unwrap();
        assert_eq!((r.object.as_str(), r.field), ("prod/mysql/root_password", None));
        let r = parse(
            ProviderKind::Aws,
            "arn:aws:secretsmanager:us-east-1:1:secret:db-AbC#pw",
        )
        .unwrap();
        assert_eq!(r.field.as_deref(), Some("pw"));
        assert!(parse(ProviderKind::Azure, "db-password#user").is_ok());
        assert!(parse(ProviderKind::Azure, "db_password").is_err());
        assert!(parse(ProviderKind::Local, "myapp/db_password").is_ok());
        assert!(parse(ProviderKind::Local, "../etc/passwd").is_err());
        assert!(parse(ProviderKind::Plugin, "anything goes #here").is_ok());
        assert!(parse(ProviderKind::Plugin, " ").is_err());
    }

    #[test]
    fn select_fields() {
        let r = parse(ProviderKind::Aws, "db#password").unwrap();
        let v = SecretValue::from_slice(br#"{"password":"pw","port":5432}"#);
        assert_eq!(r.select(&v).unwrap().expose(), b"pw");
        let r = parse(ProviderKind::Aws, "db#port").unwrap();
        assert_eq!(r.select(&v).unwrap().expose(), b"5432");
        let r = parse(ProviderKind::Aws, "db#user").unwrap();
        let e = r.select(&v).err().unwrap().to_string();
        assert!(
            e.contains("no key \"user\"") && e.contains("password, port"),
            "{e}"
        );
        assert!(!e.contains("pw\""), "{e}");
        let r = parse(ProviderKind::Aws, "db").unwrap();
        assert!(r.select(&SecretValue::from_slice(b"")).is_err());
    }
}
